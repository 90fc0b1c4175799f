#!/usr/bin/env bash
# Sample images from a trained class-to-image GPT and decode them with MedITok: one torchrun command.
# Run from anywhere. Every variable can be set from the environment (defaults in brackets):
#   ROOT_DIR        repository root                           [the repo holding this script]
#   SAMPLE_DIR      samples go to $SAMPLE_DIR/<run name from the settings>/   [$ROOT_DIR/outputs/generation/inference/c2i]
#   GPT_PATH        GPT checkpoint: ours or the released meditok_c2i_gptb.pt
#                   [$ROOT_DIR/outputs/generation/meditok_c2i_gptb/checkpoints/latest.pt, train_c2i.sh's default]
#   VQ_PATH         tokenizer weights                         [$ROOT_DIR/weights/meditok/meditok_simple_v1.pth]
#   TEST_DATA_PATH  metadata whose test rows give the labels (one image per row)   [$ROOT_DIR/outputs/codes]
#   NUM_PER_CLASS   if set, sample this many images per class instead of using TEST_DATA_PATH   []
#   NUM_CLASSES     checked against the checkpoint            [6]
#   GPT_MODEL       checked against the checkpoint; empty: taken from the checkpoint   []
#   CFG_SCALE       classifier-free guidance scale (1 = off)  [1.5]
#   NPROC_PER_NODE  processes                                 [number of GPUs, or 1 without GPU]
#   MASTER_PORT     rendezvous port                           [a free port]
#   EXTRA_ARGS      more flags for sample_c2i.py, e.g. "--top-k 100 --temperature 0.9 --no-ema"   []
# Rerunning skips the images already written.
set -euo pipefail

ROOT_DIR="${ROOT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)}"
SAMPLE_DIR="${SAMPLE_DIR:-$ROOT_DIR/outputs/generation/inference/c2i}"
GPT_PATH="${GPT_PATH:-$ROOT_DIR/outputs/generation/meditok_c2i_gptb/checkpoints/latest.pt}"
VQ_PATH="${VQ_PATH:-$ROOT_DIR/weights/meditok/meditok_simple_v1.pth}"
TEST_DATA_PATH="${TEST_DATA_PATH:-$ROOT_DIR/outputs/codes}"
NUM_PER_CLASS="${NUM_PER_CLASS:-}"
NUM_CLASSES="${NUM_CLASSES:-6}"
GPT_MODEL="${GPT_MODEL:-}"
CFG_SCALE="${CFG_SCALE:-1.5}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

cd "$ROOT_DIR"
PYTHON="${PYTHON:-python}"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$ROOT_DIR/.venv/bin/python" ]; then PYTHON="$ROOT_DIR/.venv/bin/python"; fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
MASTER_PORT="${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
if [ -n "$NUM_PER_CLASS" ]; then LABELS=(--num-per-class "$NUM_PER_CLASS"); else LABELS=(--test-data-path "$TEST_DATA_PATH"); fi
if [ -n "$GPT_MODEL" ]; then MODEL=(--gpt-model "$GPT_MODEL"); else MODEL=(); fi

set -x
# shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
exec "$PYTHON" -m torch.distributed.run \
    --nnodes=1 --nproc_per_node="$NPROC_PER_NODE" \
    --master_addr=127.0.0.1 --master_port="$MASTER_PORT" \
    -m evaluation.generation.sample_c2i \
    --gpt-ckpt "$GPT_PATH" \
    --vq-ckpt "$VQ_PATH" \
    --sample-dir "$SAMPLE_DIR" \
    --num-classes "$NUM_CLASSES" \
    --cfg-scale "$CFG_SCALE" \
    --global-seed 0 \
    "${LABELS[@]}" "${MODEL[@]}" \
    $EXTRA_ARGS
