#!/usr/bin/env bash
# Train or fine-tune a MedITok tokenizer: one torchrun command. Run from any folder; relative paths are
# taken from the folder you run it in. Variables (unset: the default of scripts/train_tokenizer.py):
#   TRAIN_DATA   metadata file of the training images (required)          --train-data
#   VAL_DATA     metadata file whose `val` rows are validated on            --val-data  [TRAIN_DATA]
#   OUT_DIR      output folder: tokenizer.pt, checkpoints/, log (required)  --out-dir
#   CONFIG  IMAGE_SIZE  BATCH_SIZE (global)  EPOCHS  LR  SEED                --config --image-size --batch-size --epochs --lr --seed
#   INIT_CKPT    start from these weights (e.g. meditok_simple_v1.pth)      --init-ckpt
#   EXTRA_ARGS   any other flags of scripts/train_tokenizer.py, e.g. "--max-steps 1200 --hflip 0.5"
# Python, NPROC_PER_NODE, MASTER_PORT, NNODES/NODE_RANK/MASTER_ADDR: see scripts/launcher.sh.
#
#   TRAIN_DATA=data/demo/metadata.csv OUT_DIR=runs/tok_tiny IMAGE_SIZE=64 bash scripts/train_tokenizer.sh
#   INIT_CKPT=weights/meditok/meditok_simple_v1.pth CONFIG=MedITok-L IMAGE_SIZE=256 LR=1e-4 \
#       TRAIN_DATA=my/metadata.csv OUT_DIR=runs/tok_ft EXTRA_ARGS="--grad-checkpointing" bash scripts/train_tokenizer.sh
# Rerunning with the same OUT_DIR resumes from OUT_DIR/checkpoints. The result is OUT_DIR/tokenizer.pt.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launcher.sh"

ARGS=(--train-data "$(abspath "${TRAIN_DATA:?set TRAIN_DATA to a metadata file of training images}")"
      --out-dir "$(abspath "${OUT_DIR:?set OUT_DIR to the output folder}")")
add_flag --val-data "$(abspath "${VAL_DATA:-}")"
add_flag --init-ckpt "$(abspath "${INIT_CKPT:-}")"
add_flag --config "${CONFIG:-}"
add_flag --image-size "${IMAGE_SIZE:-}"
add_flag --batch-size "${BATCH_SIZE:-}"
add_flag --epochs "${EPOCHS:-}"
add_flag --lr "${LR:-}"
add_flag --seed "${SEED:-}"

launcher_python
# shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
launcher_torchrun scripts.train_tokenizer "${ARGS[@]}" ${EXTRA_ARGS:-}
