"""Two runs of one profile at once, in both notebooks: each keeps its pending figures, and the results file and
the figures in FIGURE_DIR come from the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from tools.nbdefs import load_definitions
from tools.run_notebooks import NOTEBOOKS

PREFIXES = {"part1_lstm.ipynb": ".pending_part1_smoke", "part2_cyclegan.ipynb": ".pending_part2_smoke_synthetic"}
# The pending folder of another profile (part 1) or target domain (part 2), which a smoke run leaves alone.
OTHER_RUNS = {"part1_lstm.ipynb": ".pending_part1_cpu", "part2_cyclegan.ipynb": ".pending_part2_smoke_svhn"}


@pytest.fixture
def nb(request, repo_root, tmp_path, monkeypatch):
    env = {name: str(tmp_path / name.split("_")[0].lower()) for name in ("DATA_DIR", "REPORT_DIR", "CHECKPOINT_DIR")}
    definitions = load_definitions(repo_root / request.param, env={**env, "PROFILE": "smoke",
                                                                   "TARGET_DOMAIN": "synthetic"})
    monkeypatch.setattr(definitions, "FIGURE_DIR", tmp_path / "figures")
    monkeypatch.setattr(definitions, "RESULTS_PATH", tmp_path / "results" / "run.json")
    (tmp_path / "figures").mkdir()
    definitions.notebook = request.param
    return definitions


@pytest.fixture
def running_pid():
    """The process ID of a process that runs until the test ends."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture
def ended_pid():
    """The process ID of a process that has ended and been waited for."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def pending_folder(nb, suffix, prefix=None):
    """Create a pending folder named prefix + suffix in FIGURE_DIR with one figure in it; return the figure."""
    folder = nb.FIGURE_DIR / ((prefix or PREFIXES[nb.notebook]) + suffix)
    folder.mkdir()
    figure = folder / "figure.png"
    figure.write_bytes(b"a pending figure")
    return figure


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_pending_folder_per_process(nb):
    assert nb.pending_figures() == nb.FIGURE_DIR / f"{PREFIXES[nb.notebook]}_{os.getpid()}"


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_running_runs_figures_kept(nb, running_pid, monkeypatch):
    """A run that starts while another run of its profile is going leaves the other run's figures alone."""
    fig, ax = nb.plt.subplots()
    ax.plot([0, 1], [1, 0])
    with monkeypatch.context() as other_run:
        other_run.setattr(os, "getpid", lambda: running_pid)
        png = nb.save_figure(fig, "curve")
    nb.plt.close(fig)
    nb.discard_pending_figures()
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_stopped_runs_figures_discarded(nb, ended_pid):
    """This process's earlier run, an ended process's run, and a run of an older version that had no process ID."""
    for suffix in (f"_{os.getpid()}", f"_{ended_pid}", ""):
        figure = pending_folder(nb, suffix)
        nb.discard_pending_figures()
        assert not figure.parent.exists(), suffix


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_other_runs_figures_kept(nb, ended_pid):
    """Folders of another profile or target domain, and names that only start like this run's, stay."""
    kept = [pending_folder(nb, f"_{ended_pid}", OTHER_RUNS[nb.notebook]), pending_folder(nb, "_old"),
            pending_folder(nb, f"x_{ended_pid}")]
    nb.discard_pending_figures()
    assert [figure.read_bytes() for figure in kept] == [b"a pending figure"] * 3


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_results_wait_for_figure_lock(nb):
    """While another run holds FIGURE_DIR's lock, this run writes neither its results file nor its figures."""
    fig, ax = nb.plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = nb.save_figure(fig, "curve")
    nb.plt.close(fig)
    outcome = {}
    writer = threading.Thread(target=lambda: outcome.update(published=nb.write_results({"run": "this"})),
                              daemon=True)
    with nb.locked_folder(nb.FIGURE_DIR):
        writer.start()
        writer.join(timeout=1)
        assert writer.is_alive(), "write_results did not wait for the lock"
        assert not nb.RESULTS_PATH.exists()
        assert png.exists()
    writer.join(timeout=60)
    assert json.loads(nb.RESULTS_PATH.read_text()) == {"run": "this"}
    assert outcome["published"] == [nb.FIGURE_DIR / png.with_suffix(".pdf").name, nb.FIGURE_DIR / png.name]
    assert not png.parent.exists()
