"""Runs of one profile at once, and reruns of the last cell, in both notebooks: each run keeps its pending figures,
and the results file and the figures in FIGURE_DIR come from the same run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tools.nbdefs import load_definitions
from tools.run_notebooks import NOTEBOOKS

PREFIXES = {"part1_lstm.ipynb": ".pending_part1_smoke", "part2_cyclegan.ipynb": ".pending_part2_smoke_synthetic"}
FIGURE_STEMS = {"part1_lstm.ipynb": "part1_smoke", "part2_cyclegan.ipynb": "part2_smoke_synthetic"}
# The run name of another profile (part 1) or target domain (part 2), whose pending folders and figures a smoke
# run leaves alone.
OTHER_RUNS = {"part1_lstm.ipynb": "part1_cpu", "part2_cyclegan.ipynb": "part2_smoke_svhn"}
OTHER_TOKEN = "0123456789ab"
THREE_DAYS_S = 3 * 24 * 3600


@pytest.fixture
def nb(request, smoke_definitions, tmp_path):
    definitions = smoke_definitions(request.param)
    (tmp_path / "figures").mkdir()
    return definitions


def pending_folder(nb, suffix, prefix=None, age_s=0):
    """Create a pending folder named prefix + suffix in FIGURE_DIR with one figure in it, last written `age_s`
    seconds ago; return the figure."""
    folder = nb.FIGURE_DIR / ((prefix or PREFIXES[nb.notebook]) + suffix)
    folder.mkdir()
    figure = folder / "figure.png"
    figure.write_bytes(b"a pending figure")
    written = time.time() - age_s
    os.utime(folder, (written, written))
    return figure


def save_figures(nb, names=None):
    """Save a small figure under each of `names`, by default every figure the settings call for; return the PNG
    paths."""
    stem = FIGURE_STEMS[nb.notebook]
    names = names or [name for name in nb.FIGURE_NAMES if f"{stem}_{name}.png" in nb.expected_figures()]
    fig, ax = nb.plt.subplots()
    ax.plot([0, 1], [1, 0])
    pngs = [nb.save_figure(fig, name) for name in names]
    nb.plt.close(fig)
    return pngs


def write_earlier_run(nb):
    """Write the results file and the first figure of an earlier run; return that figure."""
    nb.RESULTS_PATH.parent.mkdir()
    nb.RESULTS_PATH.write_text('{"run": "earlier"}')
    earlier = nb.FIGURE_DIR / f"{FIGURE_STEMS[nb.notebook]}_{nb.FIGURE_NAMES[0]}.png"
    earlier.write_bytes(b"the earlier run's")
    return earlier


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_pending_folder_per_kernel(nb, repo_root):
    assert nb.pending_figures() == nb.FIGURE_DIR / f"{PREFIXES[nb.notebook]}_{nb.pending_token}"
    assert len(nb.pending_token) == 12
    other_kernel = load_definitions(repo_root / nb.notebook, env={"PROFILE": "smoke"})
    assert other_kernel.pending_token != nb.pending_token


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_running_runs_figures_kept(nb, monkeypatch):
    """A run that starts while another run of its profile is going leaves the other run's figures alone."""
    with monkeypatch.context() as other_run:
        other_run.setattr(nb, "pending_token", OTHER_TOKEN)
        png = save_figures(nb, nb.FIGURE_NAMES[:1])[0]
    nb.discard_pending_figures()
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_stopped_runs_figures_discarded(nb):
    """This kernel's earlier run, another kernel's run untouched for three days, and an older version's run."""
    for suffix, age_s in ((f"_{nb.pending_token}", 0), (f"_{OTHER_TOKEN}", THREE_DAYS_S), ("", 0)):
        figure = pending_folder(nb, suffix, age_s=age_s)
        nb.discard_pending_figures()
        assert not figure.parent.exists(), suffix


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_recent_pending_folder_kept(nb):
    """Another kernel's pending folder last written 47 hours ago, within the two days of a run that may still be
    going, stays."""
    figure = pending_folder(nb, f"_{OTHER_TOKEN}", age_s=47 * 3600)
    nb.discard_pending_figures()
    assert figure.read_bytes() == b"a pending figure"


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_other_runs_figures_kept(nb):
    """Folders of another profile or target domain, a link, and names that only start like this run's stay."""
    other = f".pending_{OTHER_RUNS[nb.notebook]}"
    untouched = [pending_folder(nb, f"_{OTHER_TOKEN}", other, age_s=THREE_DAYS_S),
            pending_folder(nb, f"_Old{OTHER_TOKEN}", age_s=THREE_DAYS_S),
            pending_folder(nb, f"x_{OTHER_TOKEN}", age_s=THREE_DAYS_S)]
    link = nb.FIGURE_DIR / f"{PREFIXES[nb.notebook]}_{nb.pending_token}"
    link.symlink_to(untouched[0].parent, target_is_directory=True)
    nb.discard_pending_figures()
    assert [figure.read_bytes() for figure in untouched] == [b"a pending figure"] * 3
    assert link.is_symlink()


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_results_wait_for_figure_lock(nb):
    """While another run holds FIGURE_DIR's lock, this run writes neither its results file nor its figures."""
    pngs = save_figures(nb)
    outcome = {}
    writer = threading.Thread(target=lambda: outcome.update(published=nb.write_results({"run": "this"})),
                              daemon=True)
    with nb.locked_folder(nb.FIGURE_DIR):
        writer.start()
        writer.join(timeout=1)
        assert writer.is_alive(), "write_results did not wait for the lock"
        assert not nb.RESULTS_PATH.exists()
        assert all(png.exists() for png in pngs)
    writer.join(timeout=60)
    assert json.loads(nb.RESULTS_PATH.read_text()) == {"run": "this"}
    assert outcome["published"] == [nb.FIGURE_DIR / name for name in nb.expected_figures()]
    assert not pngs[0].parent.exists()


@pytest.mark.parametrize("nb", ["part2_cyclegan.ipynb"], indirect=True)
def test_other_settings_figures_removed(nb, set_setting):
    """With RUN_ABLATION off, an earlier run's 2-class figure goes, so that FIGURE_DIR holds only the figures of
    the results file beside it. Files with other names stay, a user's among them."""
    set_setting(nb, "RUN_ABLATION", False)
    stale = nb.FIGURE_DIR / "part2_smoke_synthetic_losses_2class.png"
    untouched = [nb.FIGURE_DIR / "part2_smoke_svhn_losses_2class.png",
                 nb.FIGURE_DIR / "part2_smoke_synthetic_notes.png",
                 nb.FIGURE_DIR / "part2_smoke_synthetic_losses_2class.PNG", nb.FIGURE_DIR / "notes.png"]
    for path in [stale, *untouched]:
        path.write_bytes(b"an earlier file")
    save_figures(nb)
    nb.write_results({"run": "this"})
    assert not stale.exists()
    assert [path.read_bytes() for path in untouched] == [b"an earlier file"] * 4


@pytest.mark.parametrize("nb", ["part2_cyclegan.ipynb"], indirect=True)
def test_ablation_off_drops_figures(nb, set_setting):
    """Part 2 run again in one kernel with RUN_ABLATION off: the 2-class figures of its first run go."""
    save_figures(nb)
    nb.write_results({"run": "with ablation"})
    set_setting(nb, "RUN_ABLATION", False)
    save_figures(nb, ["confusion", "class_preservation"])
    published = nb.write_results({"run": "without ablation"})
    assert not list(nb.FIGURE_DIR.glob("*_2class.p*"))
    assert sorted(path.name for path in nb.FIGURE_DIR.glob("part2_*")) == sorted(path.name for path in published)
    assert len(published) == 2 * 6


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_deleted_pending_keeps_results(nb):
    """Where a later run's start deleted this run's pending figures, the earlier results and figures stay."""
    earlier = write_earlier_run(nb)
    pngs = save_figures(nb)
    shutil.rmtree(pngs[0].parent)
    with pytest.raises(FileNotFoundError) as error:
        nb.write_results({"run": "this"})
    assert str(error.value).startswith(f"this run's figure {pngs[0].with_suffix('.pdf')} is missing, deleted by hand "
                                       f"or by the start of a run of this profile")
    assert json.loads(nb.RESULTS_PATH.read_text()) == {"run": "earlier"}
    assert earlier.read_bytes() == b"the earlier run's"


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_missing_figure_keeps_results(nb):
    """The last cell run without all the cells that make the figures (after the first cells again, say)."""
    earlier = write_earlier_run(nb)
    save_figures(nb, nb.FIGURE_NAMES[1:2])
    with pytest.raises(RuntimeError) as error:
        nb.write_results({"run": "this"})
    first = f"{FIGURE_STEMS[nb.notebook]}_{nb.FIGURE_NAMES[0]}"
    assert str(error.value).startswith(f"this run has not saved {first}.pdf, {first}.png, ")
    assert json.loads(nb.RESULTS_PATH.read_text()) == {"run": "earlier"}
    assert earlier.read_bytes() == b"the earlier run's"


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_rerun_last_cell_keeps_figures(nb):
    pngs = save_figures(nb)
    first = nb.write_results({"run": "first"})
    assert nb.write_results({"run": "again"}) == first
    assert json.loads(nb.RESULTS_PATH.read_text()) == {"run": "again"}
    assert (nb.FIGURE_DIR / pngs[0].name).read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_figure_replaced_by_link_stops_rerun(nb, tmp_path):
    """A published figure moved away and linked back from its name counts as replaced: a link is not the figure."""
    pngs = save_figures(nb)
    nb.write_results({"run": "this"})
    published = nb.FIGURE_DIR / pngs[0].name
    moved = tmp_path / "moved.png"
    published.replace(moved)
    published.symlink_to(moved)
    with pytest.raises(FileNotFoundError) as error:
        nb.write_results({"run": "this, again"})
    assert str(error.value).startswith(f"{published}, which this kernel published, has been replaced or removed "
                                       f"since, ")


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_replaced_figure_stops_rerun(nb):
    """Once another run has published its figures, a rerun of this run's last cell writes no results."""
    pngs = save_figures(nb)
    nb.write_results({"run": "this"})
    other = nb.FIGURE_DIR / "other.png"
    other.write_bytes(b"another run's")
    other.replace(nb.FIGURE_DIR / pngs[0].name)
    with pytest.raises(FileNotFoundError) as error:
        nb.write_results({"run": "this, again"})
    assert str(error.value).startswith(f"{nb.FIGURE_DIR / pngs[0].name}, which this kernel published, has been "
                                       f"replaced or removed since, ")
    assert json.loads(nb.RESULTS_PATH.read_text()) == {"run": "this"}


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_folder_in_way_keeps_results(nb):
    write_earlier_run(nb)
    pngs = save_figures(nb)
    (nb.FIGURE_DIR / pngs[-1].name).mkdir()
    with pytest.raises(IsADirectoryError) as error:
        nb.write_results({"run": "this"})
    assert str(error.value).startswith(f"{nb.FIGURE_DIR / pngs[-1].name} is a folder, where this run's figure of "
                                       f"that name goes. Remove or rename it, then run this cell again. ")
    assert json.loads(nb.RESULTS_PATH.read_text()) == {"run": "earlier"}
    assert all(png.exists() for png in pngs)
    (nb.FIGURE_DIR / pngs[-1].name).rmdir()
    assert len(nb.write_results({"run": "this"})) == 2 * len(pngs), "a rerun of the cell publishes them"


def deny_files_in(folder, monkeypatch):
    """Make tempfile.mkstemp, with which check_writable probes a folder, fail with EACCES in `folder`."""
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if Path(dir) == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_unwritable_figures_keep_results(nb, monkeypatch):
    """Where FIGURE_DIR can no longer be written, the earlier results file stays beside the earlier figures."""
    write_earlier_run(nb)
    pngs = save_figures(nb)
    deny_files_in(nb.FIGURE_DIR, monkeypatch)
    with pytest.raises(OSError) as error:
        nb.write_results({"run": "this"})
    assert str(error.value).startswith(f"cannot write to {nb.FIGURE_DIR} (PermissionError: Permission denied); this "
                                       f"process may not write to {nb.FIGURE_DIR}. Make that folder writable, then "
                                       f"run this cell again. The results file is not written, ")
    assert json.loads(nb.RESULTS_PATH.read_text()) == {"run": "earlier"}
    assert all(png.exists() for png in pngs)


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_unwritable_results_folder_keeps_figures(nb, monkeypatch):
    """Where the results folder can no longer be written, the check stops before any file moves, so the earlier
    results file stays beside the earlier figures."""
    earlier = write_earlier_run(nb)
    pngs = save_figures(nb)
    deny_files_in(nb.RESULTS_PATH.parent, monkeypatch)
    with pytest.raises(OSError) as error:
        nb.write_results({"run": "this"})
    assert str(error.value).startswith(f"cannot write to {nb.RESULTS_PATH.parent} (PermissionError: Permission "
                                       f"denied); ")
    assert json.loads(nb.RESULTS_PATH.read_text()) == {"run": "earlier"}
    assert earlier.read_bytes() == b"the earlier run's"
    assert all(png.exists() for png in pngs)


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
@pytest.mark.parametrize("protected", ["figure", "results"])
def test_others_file_in_sticky_folder(nb, monkeypatch, protected):
    """In a folder with the sticky bit, another user's earlier figure or results file cannot be replaced: stop
    before the results file is written."""
    earlier = write_earlier_run(nb)
    save_figures(nb)
    blocked = earlier if protected == "figure" else nb.RESULTS_PATH
    monkeypatch.setattr(nb, "may_replace", lambda path: path != blocked)
    with pytest.raises(PermissionError) as error:
        nb.write_results({"run": "this"})
    assert str(error.value).startswith(f"{blocked} belongs to another user, and {blocked.parent} has the sticky bit")
    assert json.loads(nb.RESULTS_PATH.read_text()) == {"run": "earlier"}
    assert earlier.read_bytes() == b"the earlier run's"


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_partial_publish_rerun_warns(nb, monkeypatch):
    """A rerun of the last cell after a move failed midway: its check must not claim the results are unchanged."""
    save_figures(nb)
    real_replace = Path.replace
    moved = []

    def replace_once(self, target):
        """Move the first pending figure, then fail; leave other renames (the results file's) alone."""
        if self.parent == nb.pending_figures():
            if moved:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            moved.append(self)
        return real_replace(self, target)

    with monkeypatch.context() as failing:
        failing.setattr(Path, "replace", replace_once)
        with pytest.raises(OSError):
            nb.write_results({"run": "this"})
    (nb.FIGURE_DIR / moved[0].name).unlink()
    with pytest.raises(FileNotFoundError) as error:
        nb.write_results({"run": "this"})
    assert str(error.value).endswith("This kernel wrote its results file before, so until this cell runs through, "
                                     "that file and the figures in FIGURE_DIR may not match.")


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
@pytest.mark.parametrize(("failure", "fix"),
                         [(errno.EACCES, "check the permissions of {pending}, {figures} and {target}, then run this "
                                         "cell again, which moves the rest"),
                          (errno.ENOTEMPTY, "remove what is in the way at {target}, then run this cell again, which "
                                            "moves the rest"),
                          (errno.ENOENT, "{path} was removed meanwhile; run the notebook from the top")],
                         ids=["permission", "in the way", "removed"])
def test_failed_move_names_fix(nb, monkeypatch, failure, fix):
    pngs = save_figures(nb)

    def replace(self, target):
        raise OSError(failure, os.strerror(failure), str(self))

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(OSError) as error:
        nb.publish_figures()
    path = pngs[0].with_suffix(".pdf")
    target = nb.FIGURE_DIR / path.name
    expected = fix.format(pending=path.parent, figures=nb.FIGURE_DIR, target=target, path=path)
    assert str(error.value).endswith(f"The results file is written, but only some of this run's figures are in "
                                     f"{nb.FIGURE_DIR}: {expected}")


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_other_runs_probe_kept(nb):
    """The write check of a run that starts at the same moment is not this run's to delete."""
    probe = nb.FIGURE_DIR / ".write-check"
    probe.write_bytes(b"another run's")
    nb.check_output_folders({nb.FIGURE_DIR: "REPORT_DIR"})
    assert probe.read_bytes() == b"another run's"
    assert sorted(path.name for path in nb.FIGURE_DIR.iterdir()) == [".write-check"]


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_unwritable_output_folder_named(nb, monkeypatch):
    """An output folder where no file can be created stops the run at its start, naming the folder and setting."""
    deny_files_in(nb.FIGURE_DIR, monkeypatch)
    with pytest.raises(OSError) as error:
        nb.check_output_folders({nb.FIGURE_DIR: "REPORT_DIR"})
    assert str(error.value) == (f"cannot write to {nb.FIGURE_DIR} (PermissionError: Permission denied); set "
                                f"REPORT_DIR to a folder that can be written")


@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_unknown_figure_name_rejected(nb):
    """Only names in FIGURE_NAMES, whose files publish_figures may delete, can be saved."""
    fig, _ = nb.plt.subplots()
    with pytest.raises(ValueError) as error:
        nb.save_figure(fig, "my_plot")
    nb.plt.close(fig)
    assert str(error.value).startswith("figure name 'my_plot' is not in FIGURE_NAMES (")
    assert not nb.pending_figures().exists()


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="file owners and the sticky bit are POSIX")
@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_may_replace_reads_sticky_bit(nb, monkeypatch, tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    path = folder / "figure.png"
    path.write_bytes(b"")
    owner = path.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)      # another user, not root
    assert nb.may_replace(path), "without the sticky bit anyone who may write the folder may"
    folder.chmod(0o1777)
    assert not nb.may_replace(path)
    if owner == 0:                       # root may give the file to another user, who then owns it
        os.chown(path, 12345, -1)
        monkeypatch.setattr(os, "geteuid", lambda: 12345)
        assert nb.may_replace(path), "the file's owner may"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a folder away needs root")
@pytest.mark.parametrize("nb", NOTEBOOKS, indirect=True)
def test_sticky_folder_owner_may_replace(nb, monkeypatch, tmp_path):
    """In a folder with the sticky bit, the folder's owner may replace a file that another user owns."""
    folder = tmp_path / "shared"
    folder.mkdir()
    path = folder / "figure.png"
    path.write_bytes(b"")
    folder.chmod(0o1777)
    os.chown(folder, 12345, -1)
    monkeypatch.setattr(os, "geteuid", lambda: 12345)      # the folder's owner, while root owns the file
    assert nb.may_replace(path)
