#!/usr/bin/env bash
# Create the virtual environment (VENV_DIR, default .venv) if needed and install
# requirements-dev.txt under constraints.txt. Re-running is cheap: it installs
# again only when one of those files changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV_DIR:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.requirements.sha256"
wanted=$(cat requirements.txt requirements-dev.txt constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "installing requirements into $venv (torch is large: a few minutes the first time)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r requirements-dev.txt -c constraints.txt
  echo "$wanted" > "$stamp"
fi
