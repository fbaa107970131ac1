"""A setting set again after the settings were read, in both notebooks: the results file, which records the
settings as read, is not written, and the message gives the statement that restores them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tools.nbdefs import load_definitions
from tools.run_notebooks import NOTEBOOKS

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


def restore_command(message):
    """Return the Python statement that, by the message, restores the settings as read."""
    return re.search(r"To go on with the settings as read, run (.+) in a cell\.", message)[1]


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
    monkeypatch.setattr(nb, name, value)
    with pytest.raises(RuntimeError) as error:
        nb.check_settings_unchanged("writing the results file")
    assert str(error.value) == (
        f"stopped before writing the results file, because {name} = {value!r} was set after the settings were "
        f"read as {name} = {read!r}. The checkpoints and the results file record the settings as read, so they "
        f"would not match what the code computes. To use the new value, set it in the settings cell and run all "
        f"cells again. To go on with the settings as read, run {name} = {read!r} in a cell. This call has "
        f"written nothing.")


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_several_changed_settings_named(nb, monkeypatch):
    name, value = CHANGES[nb.notebook]
    monkeypatch.setattr(nb, name, value)
    monkeypatch.setattr(nb, "SEED", 5)
    with pytest.raises(RuntimeError) as error:
        nb.check_settings_unchanged("writing the results file")
    message = str(error.value)
    assert nb.changed_settings() == sorted([name, "SEED"], key=list(nb.SETTINGS).index)
    assert f"{name} = {value!r}" in message
    assert "SEED = 5" in message
    assert "To use the new values, set them in the settings cell" in message


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_restore_command_restores_settings(nb, monkeypatch):
    """The statement that the message gives, run in the notebook's namespace, brings back the settings as read."""
    name, value = CHANGES[nb.notebook]
    monkeypatch.setattr(nb, name, value)
    monkeypatch.setattr(nb, "DATA_DIR", "elsewhere")
    with pytest.raises(RuntimeError) as error:
        nb.check_settings_unchanged("writing the results file")
    exec(restore_command(str(error.value)), nb.__dict__)
    assert nb.changed_settings() == []


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_array_setting_counts_as_changed(nb, monkeypatch):
    """A value whose comparison has no single truth value is a change, not a crash."""
    monkeypatch.setattr(nb, "SEED", np.array([0, 1]))
    assert nb.changed_settings() == ["SEED"]


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_results_kept_on_changed_setting(nb, monkeypatch):
    """The earlier results file and figures stay, this run's figures stay pending, and once the settings are as
    read again, the results file is written."""
    nb.RESULTS_PATH.parent.mkdir(parents=True)
    nb.RESULTS_PATH.write_text('{"run": "earlier"}')
    pngs = save_all_figures(nb)
    name, value = CHANGES[nb.notebook]
    monkeypatch.setattr(nb, name, value)
    with pytest.raises(RuntimeError) as error:
        nb.write_results({"run": "this"})
    assert json.loads(nb.RESULTS_PATH.read_text()) == {"run": "earlier"}
    assert all(png.is_file() for png in pngs)
    assert not list(nb.FIGURE_DIR.glob("*.png"))
    exec(restore_command(str(error.value)), nb.__dict__)
    published = nb.write_results({"run": "this"})
    assert json.loads(nb.RESULTS_PATH.read_text()) == {"run": "this"}
    assert len(published) == len(nb.expected_figures())
