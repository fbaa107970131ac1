"""What both notebooks do for Colab: ask for a GPU runtime, and warn where PROFILE "auto" fell back to the CPU."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from tools.nbdefs import load_definitions
from tools.run_notebooks import NOTEBOOKS

# (profile chosen by "auto", device, running on Colab, warning expected)
CASES = [(True, "cpu", True, True), (False, "cpu", True, False), (True, "cuda", True, False),
         (True, "cpu", False, False)]


def load(repo_root, notebook, folder, profile):
    folders = {name: str(folder / name.split("_")[0].lower()) for name in ("DATA_DIR", "REPORT_DIR", "CHECKPOINT_DIR")}
    return load_definitions(repo_root / notebook, env={**folders, "PROFILE": profile})


@pytest.fixture(scope="module")
def definitions(repo_root, tmp_path_factory):
    return {notebook: load(repo_root, notebook, tmp_path_factory.mktemp("colab"), "smoke") for notebook in NOTEBOOKS}


@pytest.mark.parametrize("notebook", NOTEBOOKS)
@pytest.mark.parametrize(("chosen_by_auto", "device", "on_colab", "warns"), CASES)
def test_cpu_runtime_warning(definitions, monkeypatch, notebook, chosen_by_auto, device, on_colab, warns):
    """Only Colab without a GPU, where PROFILE "auto" fell back to "cpu", gets the warning."""
    if on_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    warning = definitions[notebook].colab_without_gpu_warning(chosen_by_auto, torch.device(device))
    assert (warning is not None) == warns
    if warns:
        assert 'this Colab runtime has no GPU, so PROFILE "auto" chose the "cpu" profile' in warning


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_auto_profile_recorded(repo_root, tmp_path, notebook):
    """The setup cell's warning needs to know that PROFILE was "auto" before it resolved to a profile."""
    chosen = load(repo_root, notebook, tmp_path, " Auto ")
    assert chosen.profile_chosen_by_auto is True
    assert chosen.PROFILE == ("full" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_metadata_requests_gpu_runtime(repo_root, notebook):
    metadata = json.loads((repo_root / notebook).read_text())["metadata"]
    assert metadata["accelerator"] == "GPU"
    assert metadata["colab"]["gpuType"] == "T4"
