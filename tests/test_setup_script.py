"""scripts/setup.sh stops with a clear error before pip when the interpreter or the environment cannot work."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO_ROOT

SETUP = REPO_ROOT / "scripts" / "setup.sh"


def run_setup(**env):
    return subprocess.run(["bash", str(SETUP)], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_old_python_rejected(tmp_path):
    old_python = tmp_path / "python3.8"
    old_python.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Python 3.8.10' && exit 0\nexit 1\n")
    old_python.chmod(0o755)
    result = run_setup(PYTHON=str(old_python), VENV_DIR=str(tmp_path / "venv"))
    assert result.returncode == 1
    assert "is not Python 3.10 or newer (Python 3.8.10)" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_environment_without_pip_rejected(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    result = run_setup(VENV_DIR=str(venv))
    assert result.returncode == 1
    assert f"error: {venv} has no pip." in result.stderr


def test_missing_python_named(tmp_path):
    result = run_setup(PYTHON=str(tmp_path / "python3.99"), VENV_DIR=str(tmp_path / "venv"))
    assert result.returncode == 1
    assert f"error: PYTHON={tmp_path / 'python3.99'} not found" in result.stderr
