"""A setting set again after the settings were read, in both notebooks: the results file, which records the
settings as read, is not written, and the error names each setting and the fix."""

from __future__ import annotations

import json

import nbformat
import numpy as np
import pytest

from tools.nbdefs import load_definitions
from tools.run_notebooks import NOTEBOOKS, execute_notebook

# A setting of each notebook whose new value changes what a run computes, and that value.
CHANGES = {"part1_lstm.ipynb": ("TRAIN_STEPS", 7), "part2_cyclegan.ipynb": ("RUN_ABLATION", False)}


@pytest.fixture
def nb(request, repo_root, tmp_path, monkeypatch):
    env = {name: str(tmp_path / name.split("_")[0].lower()) for name in ("DATA_DIR", "REPORT_DIR", "CHECKPOINT_DIR")}
    definitions = load_definitions(repo_root / request.param, env={**env, "PROFILE": "smoke",
                                                                   "TARGET_DOMAIN": "synthetic"})
    monkeypatch.setattr(definitions, "FIGURE_DIR", tmp_path / "figures")
    monkeypatch.setattr(definitions, "RESULTS_PATH", tmp_path / "results" / "run.json")
    definitions.notebook = request.param
    return definitions


def save_all_figures(nb):
    """Save a small figure under every name that the settings call for; return the pending PNG paths."""
    fig, ax = nb.plt.subplots()
    ax.plot([0, 1], [1, 0])
    names = [name for name in nb.FIGURE_NAMES if any(f"_{name}.png" in file for file in nb.expected_figures())]
    pngs = [nb.save_figure(fig, name) for name in names]
    nb.plt.close(fig)
    return pngs


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_unchanged_settings_pass(nb, monkeypatch):
    """No setting set again, or one set again to an equal value, as SEED = 0.0 for SEED = 0."""
    assert nb.changed_settings() == []
    monkeypatch.setattr(nb, "SEED", float(nb.SETTINGS["SEED"]))
    assert nb.changed_settings() == []
    assert nb.check_settings_unchanged("writing the results file") is None


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_changed_setting_message(nb, monkeypatch):
    name, value = CHANGES[nb.notebook]
    read = nb.SETTINGS[name]
    monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(nb, name, value)
    with pytest.raises(RuntimeError) as error:
        nb.check_settings_unchanged("writing the results file")
    assert str(error.value) == (
        f"stopped before writing the results file, because a cell set {name} = {value!r} (read as {read!r}) after "
        f"the settings were read. The checkpoints and the results file record the settings as read, and cells may "
        f"have computed with the new value since. Put the values you want in the settings cell and run all cells "
        f"again; finished checkpoints whose settings match are reused. This call has written nothing.")


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_several_changed_settings_named(nb, monkeypatch):
    name, value = CHANGES[nb.notebook]
    monkeypatch.setattr(nb, name, value)
    monkeypatch.setattr(nb, "SEED", 5)
    with pytest.raises(RuntimeError) as error:
        nb.check_settings_unchanged("writing the results file")
    message = str(error.value)
    assert nb.changed_settings() == sorted([name, "SEED"], key=list(nb.SETTINGS).index)
    assert f"{name} = {value!r} (read as {nb.SETTINGS[name]!r})" in message
    assert f"SEED = 5 (read as {nb.SETTINGS['SEED']!r})" in message
    assert "cells may have computed with the new values since" in message


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_set_back_setting_still_stops(nb, monkeypatch):
    """A setting set back to the value read still stops the run, because cells may have computed with the other
    value in between. Its first new value is the one named."""
    name, value = CHANGES[nb.notebook]
    read = nb.SETTINGS[name]
    monkeypatch.setattr(nb, name, value)
    assert nb.changed_settings() == [name]
    nb.__dict__[name] = read
    with pytest.raises(RuntimeError) as error:
        nb.check_settings_unchanged("writing the results file")
    assert f"{name} = {value!r} (read as {read!r})" in str(error.value)


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_environment_variable_named(nb, monkeypatch):
    """Where an environment variable sets the changed setting, the settings cell alone cannot change it."""
    monkeypatch.setenv("SEED", "0")
    monkeypatch.setattr(nb, "SEED", 5)
    with pytest.raises(RuntimeError) as error:
        nb.check_settings_unchanged("writing the results file")
    assert ("The environment variable SEED overrides the settings cell, so change or unset it as well (the "
            "runner's option --set sets it).") in str(error.value)


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_force_retrain_may_change(nb, monkeypatch):
    """FORCE_RETRAIN and DOWNLOAD choose whether to train and download, not what is computed."""
    monkeypatch.setattr(nb, "FORCE_RETRAIN", not nb.SETTINGS["FORCE_RETRAIN"])
    monkeypatch.setattr(nb, "DOWNLOAD", not nb.SETTINGS["DOWNLOAD"])
    assert nb.changed_settings() == []


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_array_setting_counts_as_changed(nb, monkeypatch):
    """A value whose comparison has no single truth value is a change, not a crash."""
    monkeypatch.setattr(nb, "SEED", np.array([0, 1]))
    assert nb.changed_settings() == ["SEED"]


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_results_kept_on_changed_setting(nb, monkeypatch):
    """The earlier results file and figures stay, and this run's figures stay pending, also once the setting is
    set back."""
    nb.RESULTS_PATH.parent.mkdir(parents=True)
    nb.RESULTS_PATH.write_text('{"run": "earlier"}')
    pngs = save_all_figures(nb)
    name, value = CHANGES[nb.notebook]
    read = nb.SETTINGS[name]
    monkeypatch.setattr(nb, name, value)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="stopped before writing the results file"):
            nb.write_results({"run": "this"})
        assert json.loads(nb.RESULTS_PATH.read_text()) == {"run": "earlier"}
        assert all(png.is_file() for png in pngs)
        assert not list(nb.FIGURE_DIR.glob("*.png"))
        nb.__dict__[name] = read


CHECK_IN_KERNEL = """
import json
hooks = [callback for callback in get_ipython().events.callbacks["post_run_cell"]
         if callback.__name__ == "watch_settings"]
print("CHECK", json.dumps({"changed": changed_settings(), "hooks": len(hooks)}))
"""


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_kernel_catches_set_back_setting(notebook, repo_root, tmp_path):
    """In a real kernel, a setting set in one cell and set back in the next is caught by the hook after each cell,
    and running the first definitions cell again reads the settings afresh with one hook."""
    name, value = CHANGES[notebook]
    original = nbformat.read(repo_root / notebook, as_version=4)
    parameters = next(cell for cell in original.cells if "parameters" in cell.metadata.get("tags", []))
    definitions = next(cell for cell in original.cells if "definitions" in cell.metadata.get("tags", []))
    new_cell = nbformat.v4.new_code_cell
    test_notebook = nbformat.v4.new_notebook(metadata=original.metadata)
    test_notebook.cells = [new_cell(parameters.source), new_cell(definitions.source), new_cell(f"{name} = {value!r}"),
                           new_cell(f"{name} = SETTINGS[{name!r}]"), new_cell(CHECK_IN_KERNEL),
                           new_cell(definitions.source), new_cell(CHECK_IN_KERNEL)]
    path = tmp_path / notebook
    nbformat.write(test_notebook, path)
    env = {"PROFILE": "smoke", "TARGET_DOMAIN": "synthetic", "DATA_DIR": str(tmp_path / "data"),
           "REPORT_DIR": str(tmp_path / "report"), "CHECKPOINT_DIR": str(tmp_path / "checkpoints")}
    executed = execute_notebook(path, tmp_path / "executed.ipynb", env=env, log=lambda *args, **kwargs: None,
                                echo_output=False)
    printed = [output["text"] for cell in executed.cells for output in cell.get("outputs", [])
               if output.get("name") == "stdout" and output["text"].startswith("CHECK ")]
    checks = [json.loads(text.removeprefix("CHECK ")) for text in printed]
    assert checks[0] == {"changed": [name], "hooks": 1}
    assert checks[1] == {"changed": [], "hooks": 1}
