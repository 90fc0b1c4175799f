#!/usr/bin/env bash
# Train the text-to-image GPT on MedITok codes and their captions: one torchrun command. Run from any folder;
# relative paths are taken from the folder you run it in. Variables (unset: the default of
# evaluation/generation/train_t2i.py, which shares every flag of train_c2i.py):
#   CODE_DIR       code metadata with a `text` column (batch_infer.py output), or its folder (required)   --code-dir
#   EXP_NAME       run name: checkpoints go to RES_DIR/EXP_NAME/checkpoints/ (required)     --exp-name
#   TEXT_FEATURES  folder from `python -m datasets.text_features` (a Hugging Face encoder's features);
#                  unset: the built-in word-level text encoder is trained with the GPT       --text-features
#   RES_DIR        results folder                                                            --results-dir
#   VQ_PATH        tokenizer weights (vocabulary when no manifest is beside the codes; latents)   --vq-ckpt
#   GPT_CKPT       resume from / start from these GPT weights                                --gpt-ckpt
#   GPT_MODEL  VOCAB_SIZE  EPOCHS  LR  BATCH_SIZE (global)  SEED
#                  --gpt-model --vocab-size --epochs --lr --global-batch-size --global-seed
#   EXTRA_ARGS     more flags for train_t2i.py, e.g. "--ema --max-steps 1000 --text-dim 128"
# Python, NPROC_PER_NODE, MASTER_PORT, NNODES/NODE_RANK/MASTER_ADDR: see scripts/launcher.sh.
# The run resumes by itself from its newest checkpoint (--auto-resume): rerun the same command after a crash.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../../scripts/launcher.sh"

ARGS=(--code-dir "$(abspath "${CODE_DIR:?set CODE_DIR to the code metadata (with a text column) written by batch_infer.py}")"
      --exp-name "${EXP_NAME:?set EXP_NAME to a run name}" --auto-resume)
add_flag --text-features "$(abspath "${TEXT_FEATURES:-}")"
add_flag --results-dir "$(abspath "${RES_DIR:-}")"
add_flag --vq-ckpt "$(abspath "${VQ_PATH:-}")"
add_flag --gpt-ckpt "$(abspath "${GPT_CKPT:-}")"
add_flag --gpt-model "${GPT_MODEL:-}"
add_flag --vocab-size "${VOCAB_SIZE:-}"
add_flag --epochs "${EPOCHS:-}"
add_flag --lr "${LR:-}"
add_flag --global-batch-size "${BATCH_SIZE:-}"
add_flag --global-seed "${SEED:-}"

launcher_python
# shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
launcher_torchrun evaluation.generation.train_t2i "${ARGS[@]}" ${EXTRA_ARGS:-}
