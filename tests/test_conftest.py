"""REAL_DATA_DIR, which decides whether the tests on the real data sets run."""

from __future__ import annotations

import os

import pytest
from conftest import REPO_ROOT, real_data_dir


def test_relative_path_from_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REAL_DATA_DIR", os.path.relpath(tmp_path, REPO_ROOT))
    assert real_data_dir().resolve() == tmp_path.resolve()


def test_missing_folder_fails_not_skips(tmp_path, monkeypatch):
    monkeypatch.setenv("REAL_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(pytest.fail.Exception, match="REAL_DATA_DIR=.*missing.* is not a folder"):
        real_data_dir()
