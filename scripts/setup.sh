#!/usr/bin/env bash
# Create the virtual environment (VENV_DIR, default .venv) if needed and install
# requirements-dev.txt under constraints.txt. Re-running is cheap: it installs
# again only when one of those files changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV_DIR:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  if ! command -v "$python" >/dev/null; then
    echo "error: PYTHON=$python not found. Install Python 3.10 or newer, or set PYTHON to its path" >&2
    exit 1
  fi
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "error: PYTHON=$python is not Python 3.10 or newer ($("$python" --version 2>&1 | head -n 1))." \
      "Set PYTHON to a newer interpreter, e.g. PYTHON=python3.11 scripts/setup.sh" >&2
    exit 1
  fi
  echo "creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
# python3 -m venv without the python3-venv package (Debian, Ubuntu) stops after creating the interpreter,
# and other tools (uv venv, for one) leave pip out.
if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  echo "error: $venv has no pip. If python -m venv made it, install the python3-venv package (Debian," \
    "Ubuntu) first. Then delete $venv and run scripts/setup.sh again, or set VENV_DIR to an environment" \
    "that has pip" >&2
  exit 1
fi
stamp="$venv/.requirements.sha256"
wanted=$(cat requirements.txt requirements-dev.txt constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "installing requirements into $venv (torch is large: a few minutes the first time)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r requirements-dev.txt -c constraints.txt
  echo "$wanted" > "$stamp"
fi
