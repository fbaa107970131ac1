"""Settings changed after a run started, in both notebooks: training and the writing of the results file, which
record the settings that the run started with, stop with an error that names each setting and the fix."""

from __future__ import annotations

import json
import symtable
from pathlib import Path

import nbformat
import numpy as np
import pytest

from tools.nbdefs import load_definitions, tagged_cells
from tools.run_notebooks import NOTEBOOKS, execute_notebook

# A setting of each notebook whose new value changes what a run computes, and that value.
CHANGES = {"part1_lstm.ipynb": ("TRAIN_STEPS", 7), "part2_cyclegan.ipynb": ("RUN_ABLATION", False)}
# A name of each notebook that a cell after the setup cell assigns and later cells read.
STATE_NAMES = {"part1_lstm.ipynb": "batcher", "part2_cyclegan.ipynb": "mnist"}


@pytest.fixture
def nb(request, smoke_definitions, monkeypatch):
    monkeypatch.delenv(CHANGES[request.param][0], raising=False)
    return smoke_definitions(request.param)


def run_cell(nb, tag):
    """Run the notebook's first cell tagged `tag` again in the loaded definitions, as a kernel reruns a cell."""
    source = next(source for cell_tag, source in tagged_cells(Path(nb.__file__)) if cell_tag == tag)
    exec(compile(source, f"<{tag} cell>", "exec"), nb.__dict__)


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
    started = nb.SETTINGS[name]
    monkeypatch.setattr(nb, name, value)
    with pytest.raises(RuntimeError) as error:
        nb.check_settings_unchanged("writing the results file")
    assert str(error.value) == (
        f"stopped before writing the results file, because {name} = {value!r} (the run started with {started!r}) "
        f"changed after the run started. The checkpoints and the results file record the settings that the run "
        f"started with, and cells may have computed with other values since. Put the values you want in the "
        f"settings cell and run all cells again; finished checkpoints whose settings match are reused. This call "
        f"has written nothing.")


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_several_changed_settings_named(nb, monkeypatch):
    name, value = CHANGES[nb.notebook]
    monkeypatch.setattr(nb, name, value)
    monkeypatch.setattr(nb, "SEED", 5)
    with pytest.raises(RuntimeError) as error:
        nb.check_settings_unchanged("writing the results file")
    message = str(error.value)
    assert nb.changed_settings() == sorted([name, "SEED"], key=list(nb.SETTINGS).index)
    assert f"{name} = {value!r} (the run started with {nb.SETTINGS[name]!r})" in message
    assert f"SEED = 5 (the run started with {nb.SETTINGS['SEED']!r})" in message
    assert "changed after the run started" in message


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_set_back_setting_still_stops(nb, monkeypatch):
    """A setting set back to the value that the run started with still stops the run, because cells may have
    computed with the other value in between. Its first new value is the one named."""
    name, value = CHANGES[nb.notebook]
    started = nb.SETTINGS[name]
    monkeypatch.setattr(nb, name, value)
    assert nb.changed_settings() == [name]
    nb.__dict__[name] = started
    with pytest.raises(RuntimeError) as error:
        nb.check_settings_unchanged("writing the results file")
    assert f"{name} = {value!r} (the run started with {started!r})" in str(error.value)


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_reread_setting_still_stops(nb):
    """The first definitions cell run again reads the new value, but the cells after the run started may have
    computed with the old one, until the setup cell starts a run again."""
    name, value = CHANGES[nb.notebook]
    started = nb.SETTINGS[name]
    nb.__dict__[name] = value
    run_cell(nb, "definitions")
    assert nb.SETTINGS[name] == value
    assert nb.settings_set_again == {name: (started, value)}
    with pytest.raises(RuntimeError, match=f"because {name} = {value!r} "):
        nb.check_settings_unchanged("writing the results file")


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_set_back_then_reread_stops(nb):
    """A value set, used and set back before the first definitions cell runs again stays recorded."""
    name, value = CHANGES[nb.notebook]
    started = nb.SETTINGS[name]
    nb.__dict__[name] = value
    nb.changed_settings()                   # as the hook does after the cell that set it
    nb.__dict__[name] = started
    run_cell(nb, "definitions")
    assert nb.changed_settings() == [name]


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_recorded_then_reread_setting_stops(nb):
    """A value set in a cell, recorded by the hook after it and then read by the first definitions cell still stops."""
    name, value = CHANGES[nb.notebook]
    started = nb.SETTINGS[name]
    nb.__dict__[name] = value
    nb.changed_settings()                   # as the hook does after the cell that set it
    run_cell(nb, "definitions")
    assert nb.settings_set_again == {name: (started, value)}
    with pytest.raises(RuntimeError, match=f"because {name} = {value!r} "):
        nb.check_settings_unchanged("writing the results file")


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_reread_setting_shows_value_now(nb):
    """After the first definitions cell read a new value, the message shows that value."""
    name, value = CHANGES[nb.notebook]
    started = nb.SETTINGS[name]
    nb.__dict__[name] = value
    run_cell(nb, "definitions")
    with pytest.raises(RuntimeError) as error:
        nb.check_settings_unchanged("writing the results file")
    assert f"because {name} = {value!r} (the run started with {started!r}) changed after" in str(error.value)


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_deleted_setting_named(nb):
    name, _ = CHANGES[nb.notebook]
    del nb.__dict__[name]
    with pytest.raises(NameError) as error:
        run_cell(nb, "definitions")
    assert str(error.value) == (f"setting {name} is not defined, because a cell deleted it: run the settings cell "
                                f"and then this cell")


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_same_folder_as_path_passes(nb, monkeypatch):
    """DATA_DIR = Path(...) of the folder that the run started with is no change."""
    monkeypatch.setattr(nb, "DATA_DIR", Path(nb.SETTINGS["DATA_DIR"]))
    assert nb.changed_settings() == []


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_settings_cell_rerun_named(nb, monkeypatch):
    """The settings cell run again writes its values as written (None, "auto"), and the message names that cause
    without listing them as values that a cell set, or their environment variables."""
    monkeypatch.setenv("PROFILE", "smoke")
    run_cell(nb, "parameters")
    with pytest.raises(RuntimeError) as error:
        nb.check_settings_unchanged("writing the results file")
    message = str(error.value)
    assert "PROFILE" in nb.changed_settings()
    assert message.startswith("stopped before writing the results file, because the settings cell ran again, "
                              "which leaves ")
    assert "until the cell after it reads them. The checkpoints" in message
    assert "(the run started with" not in message
    assert "environment variable" not in message


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_settings_cell_then_definitions_pass(nb, monkeypatch):
    """The settings cell and the first definitions cell run again, unchanged, as in a second "Run all": the values
    that the settings cell wrote are read as the run's, so nothing is recorded."""
    for name, value in {"PROFILE": "smoke", "TARGET_DOMAIN": "synthetic", "DATA_DIR": nb.DATA_DIR,
                        "REPORT_DIR": nb.REPORT_DIR, "CHECKPOINT_DIR": nb.CHECKPOINT_DIR}.items():
        monkeypatch.setenv(name, str(value))
    run_cell(nb, "parameters")
    assert nb.changed_settings() != []      # as the hook records after the settings cell
    run_cell(nb, "definitions")
    assert nb.changed_settings() == []


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
def test_environment_variables_named(nb, monkeypatch):
    name, value = CHANGES[nb.notebook]
    for changed, new in ((name, value), ("SEED", 5)):
        monkeypatch.setenv(changed, str(nb.SETTINGS[changed]))
        monkeypatch.setattr(nb, changed, new)
    with pytest.raises(RuntimeError) as error:
        nb.check_settings_unchanged("writing the results file")
    names = ", ".join(sorted([name, "SEED"], key=list(nb.SETTINGS).index))
    assert (f"The environment variables {names} override the settings cell, so change or unset them as well (the "
            f"runner's option --set sets them).") in str(error.value)


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_force_retrain_may_change(nb, monkeypatch):
    """FORCE_RETRAIN and DOWNLOAD choose whether to train and download, not what is computed."""
    monkeypatch.setattr(nb, "FORCE_RETRAIN", not nb.SETTINGS["FORCE_RETRAIN"])
    monkeypatch.setattr(nb, "DOWNLOAD", not nb.SETTINGS["DOWNLOAD"])
    assert nb.changed_settings() == []


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_force_retrain_on_named(nb, monkeypatch):
    """With FORCE_RETRAIN on, running all cells again trains every model again, and the message warns of it."""
    name, value = CHANGES[nb.notebook]
    monkeypatch.setattr(nb, name, value)
    monkeypatch.setattr(nb, "FORCE_RETRAIN", True)
    with pytest.raises(RuntimeError) as error:
        nb.check_settings_unchanged("writing the results file")
    assert ("run all cells again; with FORCE_RETRAIN = False there, finished checkpoints whose settings match are "
            "reused, while True trains every model again.") in str(error.value)


def globals_read(table, top=True):
    """Return the global names that a cell's symbol table reads, in the cell itself or in functions it defines."""
    names = {symbol.get_name() for symbol in table.get_symbols()
             if symbol.is_referenced() and (top or symbol.is_global())}
    for child in table.get_children():
        names |= globals_read(child, top=False)
    return names


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_run_state_names_complete(notebook, repo_root):
    """RUN_STATE_NAMES contains exactly the names that a cell after the setup cell, outside the definitions cells,
    assigns and that another cell reads without assigning them."""
    cells = [cell for cell in nbformat.read(repo_root / notebook, as_version=4).cells if cell.cell_type == "code"]
    tables = [symtable.symtable(cell.source, f"cell {index}", "exec") for index, cell in enumerate(cells)]
    assigned = [{symbol.get_name() for symbol in table.get_symbols() if symbol.is_assigned()} for table in tables]
    read = [globals_read(table) for table in tables]
    first = next(index for index, cell in enumerate(cells) if "definitions" in cell.metadata.get("tags", []))
    state = set()
    for index in range(first + 2, len(cells)):
        if "definitions" in cells[index].metadata.get("tags", []):
            continue
        others = [other for other in range(len(cells)) if other != index]
        state |= {name for name in assigned[index]
                  if any(name in read[other] and name not in assigned[other] for other in others)}
    definitions = load_definitions(repo_root / notebook, env={"PROFILE": "smoke", "TARGET_DOMAIN": "synthetic"})
    assert set(definitions.RUN_STATE_NAMES) == state
    assert STATE_NAMES[notebook] in state


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_deleted_force_retrain_message(nb, monkeypatch):
    """FORCE_RETRAIN, exempt from the record, deleted by a cell: the error about another setting still forms."""
    name, value = CHANGES[nb.notebook]
    monkeypatch.setattr(nb, name, value)
    monkeypatch.delattr(nb, "FORCE_RETRAIN")
    with pytest.raises(RuntimeError) as error:
        nb.check_settings_unchanged("writing the results file")
    assert "finished checkpoints whose settings match are reused." in str(error.value)


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
    started = nb.SETTINGS[name]
    monkeypatch.setattr(nb, name, value)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="stopped before writing the results file"):
            nb.write_results({"run": "this"})
        assert json.loads(nb.RESULTS_PATH.read_text()) == {"run": "earlier"}
        assert all(png.is_file() for png in pngs)
        assert not list(nb.FIGURE_DIR.glob("*.png"))
        nb.__dict__[name] = started


CHECK_IN_KERNEL = """
import json
hooks = [callback for callback in get_ipython().events.callbacks["post_run_cell"]
         if callback.__name__ == "watch_settings"]
print("CHECK", json.dumps({"changed": changed_settings(), "hooks": len(hooks)}))
"""


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_kernel_records_until_run_starts(notebook, repo_root, tmp_path):
    """A real kernel with one hook throughout. A setting set in one cell and set back in the next is recorded by
    the hook. It stays recorded when the first definitions cell runs again, and is cleared when the setup cell
    starts a run, which also deletes what cells of the earlier run built. A second "Run all" of those cells records
    nothing, and after %reset the hook stays silent."""
    name, value = CHANGES[notebook]
    original = nbformat.read(repo_root / notebook, as_version=4)
    code = [cell for cell in original.cells if cell.cell_type == "code"]
    first = next(index for index, cell in enumerate(code) if "definitions" in cell.metadata.get("tags", []))
    parameters, definitions, setup = (code[0].source, code[first].source, code[first + 1].source)
    state = STATE_NAMES[notebook]
    sources = [parameters, definitions, setup, f"{name} = {value!r}", f"{name} = SETTINGS[{name!r}]",
               CHECK_IN_KERNEL, definitions, CHECK_IN_KERNEL, f"{state} = 'built with other settings'", setup,
               CHECK_IN_KERNEL, f"print('STATE', {state!r} in globals())", parameters, definitions, setup,
               CHECK_IN_KERNEL, "%reset -f", "print('after reset')"]
    test_notebook = nbformat.v4.new_notebook(metadata=original.metadata)
    test_notebook.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    path = tmp_path / notebook
    nbformat.write(test_notebook, path)

    env = {"PROFILE": "smoke", "TARGET_DOMAIN": "synthetic", "DATA_DIR": str(tmp_path / "data"),
           "REPORT_DIR": str(tmp_path / "report"), "CHECKPOINT_DIR": str(tmp_path / "checkpoints")}
    executed = execute_notebook(path, tmp_path / "executed.ipynb", env=env, log=lambda *args, **kwargs: None,
                                echo_output=False)

    outputs = [output for cell in executed.cells for output in cell.get("outputs", [])]
    checks = [json.loads(output["text"].removeprefix("CHECK ")) for output in outputs
              if output.get("name") == "stdout" and output["text"].startswith("CHECK ")]
    assert checks == [{"changed": [name], "hooks": 1}, {"changed": [name], "hooks": 1},
                      {"changed": [], "hooks": 1}, {"changed": [], "hooks": 1}]
    assert [output["text"] for output in outputs if output.get("text", "").startswith("STATE ")] == ["STATE False\n"]
    assert executed.cells[-1].outputs == [nbformat.v4.new_output("stream", name="stdout", text="after reset\n")]
    assert not [output for output in outputs if output.get("name") == "stderr"]
