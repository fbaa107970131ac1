#!/usr/bin/env bash
# Set up the environment if needed, then execute the notebooks headless.
# Arguments go to tools/run_notebooks.py, e.g.:
#   scripts/run_notebooks.sh --profile cpu --data-dir ../shared/data
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${VENV_DIR:-.venv}/bin/python" -m tools.run_notebooks "$@"
