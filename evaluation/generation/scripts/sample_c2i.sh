#!/usr/bin/env bash
# Sample images from a trained class-to-image GPT and decode them with MedITok: one torchrun command.
# Run from any folder; relative paths are taken from the folder you run it in.
# Variables (unset: the default of evaluation/generation/sample_c2i.py):
#   GPT_PATH        GPT checkpoint: ours or the released meditok_c2i_gptb.pt (required)      --gpt-ckpt
#   VQ_PATH         tokenizer weights that decode the codes (required)                        --vq-ckpt
#   SAMPLE_DIR      samples go to SAMPLE_DIR/<run name from the settings>/                   --sample-dir
#   TEST_DATA_PATH  metadata: one sample per test row, with its label                         --test-data-path
#   NUM_PER_CLASS   instead of TEST_DATA_PATH: this many samples of every class               --num-per-class
#   NUM_CLASSES  GPT_MODEL   checked against the checkpoint                                   --num-classes --gpt-model
#   CFG_SCALE  TEMPERATURE  SEED                                                              --cfg-scale --temperature --global-seed
#   EXTRA_ARGS      more flags for sample_c2i.py, e.g. "--top-k 100 --no-ema"
# Python, NPROC_PER_NODE, MASTER_PORT, NNODES/NODE_RANK/MASTER_ADDR: see scripts/launcher.sh.
# Rerunning skips the images already written.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../../scripts/launcher.sh"

ARGS=(--gpt-ckpt "$(abspath "${GPT_PATH:?set GPT_PATH to the GPT checkpoint}")"
      --vq-ckpt "$(abspath "${VQ_PATH:?set VQ_PATH to the tokenizer weights}")")
add_flag --sample-dir "$(abspath "${SAMPLE_DIR:-}")"
add_flag --test-data-path "$(abspath "${TEST_DATA_PATH:-}")"
add_flag --num-per-class "${NUM_PER_CLASS:-}"
add_flag --num-classes "${NUM_CLASSES:-}"
add_flag --gpt-model "${GPT_MODEL:-}"
add_flag --cfg-scale "${CFG_SCALE:-}"
add_flag --temperature "${TEMPERATURE:-}"
add_flag --global-seed "${SEED:-}"

launcher_python
# shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
launcher_torchrun evaluation.generation.sample_c2i "${ARGS[@]}" ${EXTRA_ARGS:-}
