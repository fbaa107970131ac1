"""The README's run command: both notebooks headless in the smoke profile, and failure reporting."""

from __future__ import annotations

import json

import nbformat
import pytest
import test_part1
import test_part2

from tools import run_notebooks


def test_run_command_executes_both_notebooks(tmp_path, capsys):
    data = tmp_path / "data"
    test_part1.write_tiny_corpus(data / "ptb")
    test_part2.write_tiny_data(data)
    report = tmp_path / "report"
    status = run_notebooks.main(["--profile", "smoke", "--data-dir", str(data), "--report-dir", str(report),
                                 "--set", f"CHECKPOINT_DIR={tmp_path / 'checkpoints'}"])
    output = capsys.readouterr().out
    assert status == 0
    for name in run_notebooks.NOTEBOOKS:
        assert (report / "executed" / name.replace(".ipynb", ".smoke.ipynb")).is_file()
        assert f"{name}: profile smoke" in output, "the summary names each notebook"
    assert "cell 1/" in output, "progress names the cell"
    assert "target domain svhn" in output, "the summary names part 2's target domain"
    part1 = json.loads((report / "results" / "part1_smoke.json").read_text())
    assert part1["profile"] == "smoke"
    part2_files = list((report / "results").glob("part2_smoke_*.json"))
    assert len(part2_files) == 1


def test_failing_cell_names_notebook_and_keeps_copy(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_markdown_cell("text"),
                      nbformat.v4.new_code_cell("raise ValueError('broken on purpose')"),
                      nbformat.v4.new_code_cell("y = 2")]
    path = tmp_path / "broken.ipynb"
    nbformat.write(notebook, path)
    output = tmp_path / "executed" / "broken.ipynb"
    with pytest.raises(run_notebooks.NotebookFailed) as error:
        run_notebooks.execute_notebook(path, output, log=lambda *args, **kwargs: None)
    message = str(error.value)
    assert "broken.ipynb" in message
    assert "code cell 2 of 3" in message
    assert "failed with ValueError: broken on purpose" in message
    assert "cell 3 of 4 counting markdown" in message
    assert "\x1b[" not in message, "the traceback is free of terminal colour codes"
    executed = nbformat.read(output, as_version=4)
    assert executed.cells[0].execution_count == 1
    assert executed.cells[0].outputs == []
    assert executed.cells[2].outputs[0]["ename"] == "ValueError"
    assert executed.cells[3].execution_count is None, "cells after the failure do not run"


def test_invalid_set_option_is_rejected(capsys):
    with pytest.raises(SystemExit):
        run_notebooks.main(["--set", "NOVALUE"])
    assert "NAME=VALUE" in capsys.readouterr().err


def test_unknown_setting_name_is_rejected(capsys):
    with pytest.raises(SystemExit):
        run_notebooks.main(["--set", "TARGET_DOMIAN=synthetic"])
    message = capsys.readouterr().err
    assert "TARGET_DOMIAN" in message
    assert "TARGET_DOMAIN" in message, "the error lists the valid settings"


def test_set_rejects_settings_with_own_option(capsys):
    with pytest.raises(SystemExit):
        run_notebooks.main(["--profile", "smoke", "--set", "PROFILE=full"])
    assert "--profile" in capsys.readouterr().err


def test_setting_names_come_from_parameters_cell(repo_root):
    assert {"PROFILE", "DATA_DIR", "SEED", "HIDDEN_SIZE"} <= run_notebooks.setting_names(repo_root / "part1_lstm.ipynb")
    assert {"TARGET_DOMAIN", "CYCLE_WEIGHT"} <= run_notebooks.setting_names(repo_root / "part2_cyclegan.ipynb")


@pytest.mark.parametrize("profile, cuda, expected", [
    ("auto", False, "cpu"), ("auto", True, "full"), (" Auto ", False, "cpu"), ("smoke", True, "smoke"),
    ("cpu", True, "cpu")])
def test_auto_profile_resolves_by_cuda(monkeypatch, profile, cuda, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert run_notebooks.resolved_profile(profile) == expected
