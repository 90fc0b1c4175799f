#!/usr/bin/env bash
# Run the test suite: sets up .venv (once) from requirements.txt, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k gpt -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh
exec python -m pytest "$@"
