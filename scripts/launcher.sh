# shellcheck shell=bash
# Sourced by every shell wrapper (train_tokenizer.sh, train_c2i.sh, sample_c2i.sh, quickstart.sh, test.sh):
# one policy for the Python, relative paths, the GPU count, the port and several machines.
#
# Python (launcher_python sets and exports PYTHON):
#   1. PYTHON=...                                   used as given
#   2. an active virtualenv (VIRTUAL_ENV) or conda environment (CONDA_PREFIX): its python, as is
#   3. a `python` (else `python3`) on PATH that imports torch: used as is
#   4. none of these: the repository's .venv, created once from requirements.txt (scripts/venv.sh)
#   Never a pip install into an environment the user brought.
# Relative paths: wrappers pass every path variable through `abspath`, which resolves it against the folder
#   the wrapper was started from (CALLER_DIR). Nothing cds away, so relative paths inside EXTRA_ARGS mean
#   the same. Python finds the repository's packages through PYTHONPATH; PYTHONSAFEPATH keeps the caller's
#   folder off sys.path, so a `datasets/` folder there cannot shadow ours.
# Processes (launcher_torchrun): NPROC_PER_NODE [the number of visible GPUs, at least 1];
#   one machine: MASTER_PORT [a free port];
#   several: NNODES, NODE_RANK, MASTER_ADDR (node 0's address) and MASTER_PORT [29500], the same on every node.
# LAUNCHER_DRY_RUN=1: print the final command instead of running it (after the Python was chosen).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALLER_DIR="${CALLER_DIR:-$(pwd)}"

# abspath VALUE: VALUE made absolute against CALLER_DIR ("" stays "", absolute paths and Hugging Face Hub
# references hf://... stay as they are).
abspath() {
    case "$1" in
        "" | /* | hf://* | https://huggingface.co/*) printf '%s\n' "$1" ;;
        "~"/*) printf '%s\n' "$HOME/${1#"~/"}" ;;
        *) printf '%s\n' "$CALLER_DIR/$1" ;;
    esac
}

# _probe PY: true when PY imports torch and LAUNCHER_NEEDS (e.g. "pytest" for the tests); records its
# GPU count in LAUNCHER_GPUS, so that torch is imported once per wrapper call.
_probe() {
    LAUNCHER_GPUS="$("$1" -c "import torch${LAUNCHER_NEEDS:+, ${LAUNCHER_NEEDS// /, }}; print(torch.cuda.device_count())" 2>/dev/null)"
}

launcher_python() {
    local how candidate
    if [ -n "${PYTHON:-}" ]; then
        case "$PYTHON" in */*) PYTHON="$(abspath "$PYTHON")" ;; esac
        how="PYTHON"
    elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
        PYTHON="$VIRTUAL_ENV/bin/python" how="the active virtualenv"
    elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
        PYTHON="$CONDA_PREFIX/bin/python" how="the active conda environment"
    else
        for candidate in python python3; do
            candidate="$(command -v "$candidate" 2>/dev/null || true)"
            if [ -n "$candidate" ] && _probe "$candidate"; then
                PYTHON="$candidate" how="python on PATH with torch"
                break
            fi
        done
        if [ -z "${PYTHON:-}" ]; then
            # shellcheck disable=SC1091
            source "$REPO_ROOT/scripts/venv.sh"
            PYTHON="$REPO_ROOT/.venv/bin/python" how="the repository's .venv (no environment with torch found)"
        fi
    fi
    if [ -z "${LAUNCHER_GPUS:-}" ] && ! _probe "$PYTHON"; then
        echo "[launcher] $PYTHON ($how) cannot import torch ${LAUNCHER_NEEDS:-}: install them there, set PYTHON=...," \
             "or leave every environment (deactivate) to use the repository's .venv" >&2
        return 1
    fi
    export PYTHON
    export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONSAFEPATH=1
    [ -n "${LAUNCHER_QUIET:-}" ] || echo "[launcher] python: $PYTHON ($how)" >&2
}

_free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# launcher_torchrun MODULE ARG...: run `python -m MODULE ARG...` under torch.distributed.run.
launcher_torchrun() {
    local module=$1; shift
    local nproc="${NPROC_PER_NODE:-}" nnodes="${NNODES:-1}" rdzv
    if [ -z "$nproc" ]; then
        nproc=$(( LAUNCHER_GPUS > 1 ? LAUNCHER_GPUS : 1 ))
    fi
    if [ "$nnodes" -gt 1 ]; then
        rdzv=(--nnodes="$nnodes" --node_rank="${NODE_RANK:?set NODE_RANK (0..NNODES-1) on every node}"
              --master_addr="${MASTER_ADDR:?set MASTER_ADDR to the address of node 0 on every node}"
              --master_port="${MASTER_PORT:-29500}")
    else
        rdzv=(--nnodes=1 --node_rank=0 --master_addr="${MASTER_ADDR:-127.0.0.1}"
              --master_port="${MASTER_PORT:-$(_free_port)}")
    fi
    launcher_exec "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node="$nproc" -m "$module" "$@"
}

# launcher_exec CMD...: run it (exec), or print it with LAUNCHER_DRY_RUN=1.
launcher_exec() {
    if [ -n "${LAUNCHER_DRY_RUN:-}" ]; then
        printf '%q ' "$@"
        printf '\n'
        exit 0
    fi
    echo "[launcher] $*" >&2
    exec "$@"
}

# add_flag --NAME VALUE: append "--NAME VALUE" to the array ARGS when VALUE is set, nothing otherwise,
# so that every default lives once, in the .py.
add_flag() {
    if [ -n "$2" ]; then ARGS+=("$1" "$2"); fi
}
