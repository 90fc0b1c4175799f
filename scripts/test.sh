#!/usr/bin/env bash
# Run the test suite with the Python chosen by scripts/launcher.sh (an active environment with torch and
# pytest, else the repository's .venv, created once from requirements.txt), then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k gpt -x`.
set -euo pipefail
LAUNCHER_NEEDS="pytest"
source "$(dirname "${BASH_SOURCE[0]}")/launcher.sh"
launcher_python
cd "$REPO_ROOT"  # pytest.ini and tests/ live here; test paths given as arguments are taken from here too
launcher_exec "$PYTHON" -m pytest "$@"
