#!/usr/bin/env bash
# Train the class-to-image GPT on MedITok codes: one torchrun command. Run from anywhere.
# Every variable can be set from the environment (defaults in brackets):
#   ROOT_DIR        repository root                           [the repo holding this script]
#   CODE_DIR        code metadata from batch_infer.py, or its --output_dir   [$ROOT_DIR/outputs/codes]
#   VQ_PATH         tokenizer weights, only read when the code files are latents (--infer_type latent)
#                                                             [$ROOT_DIR/weights/meditok/meditok_simple_v1.pth]
#   RES_DIR         results folder                            [$ROOT_DIR/outputs/generation]
#   EXP_NAME        run name: checkpoints go to $RES_DIR/$EXP_NAME/checkpoints/   [meditok_c2i_gptb]
#   EPOCHS [300]  LR [1e-4]  BATCH_SIZE (global, all processes) [128]
#   VOCAB_SIZE      total codes over all codebooks            [32768]
#   NUM_CLASSES     labels must lie in [0, NUM_CLASSES)       [6]
#   GPT_MODEL       GPT-Tiny GPT-Small GPT-B GPT-L GPT-XL GPT-XXL GPT-XXXL   [GPT-B]
#   NPROC_PER_NODE  processes on this machine                 [number of GPUs, or 1 without GPU]
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]  (multi-node: same MASTER_ADDR/PORT on every node)
#   MASTER_PORT     rendezvous port                           [a free port]
#   EXTRA_ARGS      more flags for train_c2i.py, e.g. "--ema --max-steps 1000 --no-compile"   []
# The run resumes by itself from its newest checkpoint (--auto-resume): rerun the same command after a crash.
set -euo pipefail

ROOT_DIR="${ROOT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)}"
CODE_DIR="${CODE_DIR:-$ROOT_DIR/outputs/codes}"
VQ_PATH="${VQ_PATH:-$ROOT_DIR/weights/meditok/meditok_simple_v1.pth}"
RES_DIR="${RES_DIR:-$ROOT_DIR/outputs/generation}"
EXP_NAME="${EXP_NAME:-meditok_c2i_gptb}"
EPOCHS="${EPOCHS:-300}"
LR="${LR:-1e-4}"
BATCH_SIZE="${BATCH_SIZE:-128}"
VOCAB_SIZE="${VOCAB_SIZE:-32768}"
NUM_CLASSES="${NUM_CLASSES:-6}"
GPT_MODEL="${GPT_MODEL:-GPT-B}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

cd "$ROOT_DIR"
PYTHON="${PYTHON:-python}"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$ROOT_DIR/.venv/bin/python" ]; then PYTHON="$ROOT_DIR/.venv/bin/python"; fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
MASTER_PORT="${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

set -x
# shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$NPROC_PER_NODE" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="$MASTER_PORT" \
    -m evaluation.generation.train_c2i \
    --code-dir "$CODE_DIR" \
    --vq-ckpt "$VQ_PATH" \
    --results-dir "$RES_DIR" \
    --exp-name "$EXP_NAME" \
    --gpt-model "$GPT_MODEL" \
    --epochs "$EPOCHS" \
    --lr "$LR" \
    --global-batch-size "$BATCH_SIZE" \
    --vocab-size "$VOCAB_SIZE" \
    --num-classes "$NUM_CLASSES" \
    --auto-resume \
    $EXTRA_ARGS
