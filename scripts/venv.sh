#!/usr/bin/env bash
# Sourced by scripts/launcher.sh only when no environment with torch is found: creates .venv at the repo root
# (once) from requirements.txt and activates it.
# Idempotent: a stamp holding the hash of requirements.txt skips pip when nothing changed.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum "$REPO_ROOT/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[venv] creating $VENV"
    python3 -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "[venv] installing requirements.txt (torch takes a few minutes the first time)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r "$REPO_ROOT/requirements.txt"
    echo "$want" > "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
