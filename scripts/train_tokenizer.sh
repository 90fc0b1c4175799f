#!/usr/bin/env bash
# Train or fine-tune a MedITok tokenizer: one torchrun command; every variable can be set from the environment.
#
#   TRAIN_DATA=data/demo/metadata.csv OUT_DIR=runs/tok_tiny bash scripts/train_tokenizer.sh
#   INIT_CKPT=weights/meditok/meditok_simple_v1.pth CONFIG=MedITok-L IMAGE_SIZE=256 LR=1e-4 \
#       TRAIN_DATA=my/metadata.csv OUT_DIR=runs/tok_ft EXTRA_ARGS="--grad-checkpointing" bash scripts/train_tokenizer.sh
#
# TRAIN_DATA / VAL_DATA are metadata files (VAL_DATA defaults to TRAIN_DATA: its `val` rows are used).
# Rerunning with the same OUT_DIR resumes from OUT_DIR/checkpoints. The result is OUT_DIR/tokenizer.pt.
# EXTRA_ARGS passes any other flag of scripts/train_tokenizer.py (e.g. "--max-minutes 5 --hflip 0.5").
# NPROC_PER_NODE: processes on this machine [GPU count, 1 without GPU]. Several machines: run the same
# command on each with NNODES, NODE_RANK, MASTER_ADDR (node 0's address) and MASTER_PORT [29500].
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Relative paths given by the caller are relative to where the script was started from.
CALLER_DIR="$(pwd)"
abspath() { case "$1" in /*|"") echo "$1" ;; *) echo "$CALLER_DIR/$1" ;; esac; }

TRAIN_DATA="$(abspath "${TRAIN_DATA:-data/demo/metadata.csv}")"
VAL_DATA="$(abspath "${VAL_DATA:-$TRAIN_DATA}")"
OUT_DIR="$(abspath "${OUT_DIR:-runs/tokenizer}")"
CONFIG="${CONFIG:-MedITok-Tiny}"
IMAGE_SIZE="${IMAGE_SIZE:-64}"
BATCH_SIZE="${BATCH_SIZE:-16}"
EPOCHS="${EPOCHS:-40}"
LR="${LR:-2e-3}"
INIT_CKPT="$(abspath "${INIT_CKPT:-}")"
EXTRA_ARGS="${EXTRA_ARGS:-}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    [ "${NPROC_PER_NODE:-0}" -ge 1 ] || NPROC_PER_NODE=1
fi

if [ "${NNODES:-1}" -gt 1 ]; then
    RDZV=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK on every node}"
          --master_addr="${MASTER_ADDR:?set MASTER_ADDR to node 0}" --master_port="${MASTER_PORT:-29500}")
else
    RDZV=(--standalone)
fi

cd "$REPO_ROOT"
source scripts/venv.sh
INIT_FLAG=()
[ -n "$INIT_CKPT" ] && INIT_FLAG=(--init-ckpt "$INIT_CKPT")
# shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
exec torchrun "${RDZV[@]}" --nproc_per_node="$NPROC_PER_NODE" -m scripts.train_tokenizer \
    --train-data "$TRAIN_DATA" --val-data "$VAL_DATA" --out-dir "$OUT_DIR" \
    --config "$CONFIG" --image-size "$IMAGE_SIZE" --batch-size "$BATCH_SIZE" --epochs "$EPOCHS" --lr "$LR" \
    "${INIT_FLAG[@]}" $EXTRA_ARGS
