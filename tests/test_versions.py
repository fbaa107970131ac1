"""Both notebooks stop at once, with the fix, where torch or torchvision is older than requirements.txt's floor."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision

from tools.nbdefs import load_definitions
from tools.run_notebooks import NOTEBOOKS

# The libraries each notebook checks, with a release older than requirements.txt's floor.
TOO_OLD = {"part1_lstm.ipynb": {"torch": "2.9.1+cu126"},
           "part2_cyclegan.ipynb": {"torch": "2.9.1+cu126", "torchvision": "0.24.1"}}
MODULES = {"torch": torch, "torchvision": torchvision}
FLOORS = {"torch": "2.10", "torchvision": "0.25"}


def load(repo_root, notebook, folder):
    folders = {name: str(folder / name.split("_")[0].lower()) for name in ("DATA_DIR", "REPORT_DIR", "CHECKPOINT_DIR")}
    return load_definitions(repo_root / notebook, env={**folders, "PROFILE": "smoke"})


def requirement_floors(repo_root):
    """Return {name: version} for each `name>=version` line of requirements.txt."""
    text = (repo_root / "requirements.txt").read_text()
    return dict(re.findall(r"^([A-Za-z0-9_-]+)>=([0-9.]+)", text, flags=re.MULTILINE))


@pytest.fixture(scope="module")
def definitions(repo_root, tmp_path_factory):
    return {notebook: load(repo_root, notebook, tmp_path_factory.mktemp("versions")) for notebook in NOTEBOOKS}


@pytest.mark.parametrize(("notebook", "library"), [(notebook, library) for notebook, libraries in TOO_OLD.items()
                                                   for library in libraries])
def test_old_library_stops_notebook(repo_root, tmp_path, monkeypatch, notebook, library):
    old = TOO_OLD[notebook][library]
    monkeypatch.setattr(MODULES[library], "__version__", old)
    with pytest.raises(RuntimeError) as error:
        load(repo_root, notebook, tmp_path)
    floor = requirement_floors(repo_root)[library]
    assert str(error.value).startswith(f"This notebook needs {library} {floor} or newer, but found {library} {old}. ")
    assert "restart the kernel (on Colab: Runtime > Restart session)" in str(error.value)


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_upgrade_names_torch_and_torchvision(repo_root, tmp_path, monkeypatch, notebook):
    """Both notebooks upgrade the pair, so that Colab's torchvision keeps matching torch."""
    monkeypatch.setattr(torch, "__version__", "2.9.1")
    with pytest.raises(RuntimeError) as error:
        load(repo_root, notebook, tmp_path)
    floors = requirement_floors(repo_root)
    command = f'pip install -U "torch>={floors["torch"]}" "torchvision>={floors["torchvision"]}", then'
    assert command in str(error.value)


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_floor_releases_load(repo_root, tmp_path, monkeypatch, notebook):
    """With each library at requirements.txt's floor, the definitions load."""
    floors = requirement_floors(repo_root)
    for library in TOO_OLD[notebook]:
        monkeypatch.setattr(MODULES[library], "__version__", floors[library] + ".0")
    assert load(repo_root, notebook, tmp_path).SETTINGS["PROFILE"] == "smoke"


@pytest.mark.parametrize("notebook", NOTEBOOKS)
@pytest.mark.parametrize("version", ["2.10.0", "2.14.1+cu130", "2.11.0.dev20260101", "3.0.0", "unknown"])
def test_supported_torch_passes(definitions, notebook, version):
    """Releases from the floor on pass, pre-releases of later releases too, and so does a version that is not
    a valid version string."""
    assert definitions[notebook].check_versions({"torch": version}, FLOORS) is None


@pytest.mark.parametrize("notebook", NOTEBOOKS)
@pytest.mark.parametrize("version", ["2.10.0a0+git5e1f2b3", "2.10.0rc1", "2.10.0.dev20251201"])
def test_floor_prerelease_rejected(definitions, notebook, version):
    """pip's torch>=2.10 leaves out pre-releases of 2.10, which may predate its fixes, and so does the check."""
    with pytest.raises(RuntimeError) as error:
        definitions[notebook].check_versions({"torch": version}, FLOORS)
    assert str(error.value).startswith(f"This notebook needs torch 2.10 or newer, but found torch {version}. ")


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_all_old_libraries_named(definitions, notebook):
    with pytest.raises(RuntimeError) as error:
        definitions[notebook].check_versions({"torch": "1.13.1", "torchvision": "0.14.1"}, FLOORS)
    assert str(error.value).startswith("This notebook needs torch 2.10 and torchvision 0.25 or newer, but found "
                                       "torch 1.13.1 and torchvision 0.14.1. Upgrade with pip install -U ")
