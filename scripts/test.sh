#!/usr/bin/env bash
# Set up the environment if needed, lint, then run the tests. Arguments go to
# pytest. Tests on the real data run where REAL_DATA_DIR (default ../shared/data)
# has ptb/ and mnist/; elsewhere they are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
venv="${VENV_DIR:-.venv}"
"$venv/bin/ruff" check .
exec "$venv/bin/python" -m pytest "$@"
