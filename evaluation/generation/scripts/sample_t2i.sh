#!/usr/bin/env bash
# Sample images for written prompts from a trained text-to-image GPT and decode them with MedITok: one
# torchrun command. Run from any folder; relative paths are taken from the folder you run it in.
# Variables (unset: the default of evaluation/generation/sample_t2i.py):
#   GPT_PATH        text-to-image GPT checkpoint (train_t2i.sh) (required)                   --gpt-ckpt
#   VQ_PATH         tokenizer weights that decode the codes (required)                        --vq-ckpt
#   PROMPTS         text file, one prompt per line                                            --prompts
#   TEST_DATA_PATH  instead of PROMPTS: metadata whose test rows' `text` gives the prompts    --test-data-path
#   NUM_PER_PROMPT  images per prompt (per test row)                                          --num-per-prompt
#   TEXT_ENCODER    where the Hugging Face text encoder lives, if not where training found it --text-encoder
#   SAMPLE_DIR      samples go to SAMPLE_DIR/<run name from the settings>/                   --sample-dir
#   CFG_SCALE  TEMPERATURE  SEED                                                              --cfg-scale --temperature --global-seed
#   EXTRA_ARGS      more flags for sample_t2i.py, e.g. "--top-k 100 --no-ema"
# Python, NPROC_PER_NODE, MASTER_PORT, NNODES/NODE_RANK/MASTER_ADDR: see scripts/launcher.sh.
# Rerunning skips the images already written.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../../scripts/launcher.sh"

ARGS=(--gpt-ckpt "$(abspath "${GPT_PATH:?set GPT_PATH to the GPT checkpoint}")"
      --vq-ckpt "$(abspath "${VQ_PATH:?set VQ_PATH to the tokenizer weights}")")
add_flag --prompts "$(abspath "${PROMPTS:-}")"
add_flag --test-data-path "$(abspath "${TEST_DATA_PATH:-}")"
add_flag --num-per-prompt "${NUM_PER_PROMPT:-}"
add_flag --text-encoder "$(case "${TEXT_ENCODER:-}" in hf://*) echo "$TEXT_ENCODER" ;; *) abspath "${TEXT_ENCODER:-}" ;; esac)"
add_flag --sample-dir "$(abspath "${SAMPLE_DIR:-}")"
add_flag --cfg-scale "${CFG_SCALE:-}"
add_flag --temperature "${TEMPERATURE:-}"
add_flag --global-seed "${SEED:-}"

launcher_python
# shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
launcher_torchrun evaluation.generation.sample_t2i "${ARGS[@]}" ${EXTRA_ARGS:-}
