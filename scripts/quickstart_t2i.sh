# shellcheck shell=bash
# The text-to-image stages of `bash scripts/quickstart.sh t2i`, sourced by quickstart.sh after its data,
# tokenizer, tokenize and classifier stages (reused when an earlier run finished them, built otherwise):
#   t2i_1_captions  orientation + slice level in words for every demo image    (scripts/quickstart_t2i.py)
#   t2i_2_gpt       a small GPT with the built-in word-level text encoder       (train_t2i.sh)
#   t2i_3_sample    T2I_SAMPLES_PER_PROMPT images for every caption             (sample_t2i.sh)
#   report          OUT/t2i/report.json (orientation accuracy, slice-level error vs shuffled prompts), grid.png
# Settings (environment): T2I_STEPS, T2I_BATCH_SIZE, T2I_LR, T2I_TEXT_DIM, T2I_TEXT_LAYERS, T2I_SAMPLES_PER_PROMPT,
# T2I_CFG_SCALE, T2I_TEMPERATURE, T2I_EXTRA_ARGS, T2I_SAMPLE_EXTRA_ARGS.
T2I_DIR=$OUT/t2i
T2I_STEPS=${T2I_STEPS:-$GPT_STEPS}
T2I_BATCH_SIZE=${T2I_BATCH_SIZE:-$GPT_BATCH_SIZE}
T2I_LR=${T2I_LR:-$GPT_LR}
T2I_TEXT_DIM=${T2I_TEXT_DIM:-128}                 # width of the built-in text encoder
T2I_TEXT_LAYERS=${T2I_TEXT_LAYERS:-0}             # its bidirectional blocks (0: word + position embeddings)
T2I_SAMPLES_PER_PROMPT=${T2I_SAMPLES_PER_PROMPT:-20}
T2I_CFG_SCALE=${T2I_CFG_SCALE:-$CFG_SCALE}
T2I_TEMPERATURE=${T2I_TEMPERATURE:-$TEMPERATURE}
T2I_EXTRA_ARGS=${T2I_EXTRA_ARGS:-}
T2I_SAMPLE_EXTRA_ARGS=${T2I_SAMPLE_EXTRA_ARGS:-}
T2I_GPT=$T2I_DIR/gpt/quickstart_t2i/checkpoints/latest.pt

stage t2i_1_captions "caption every image (orientation, slice level) into $T2I_DIR" \
    python -m scripts.quickstart_t2i captions --codes "$CODE_DIR" --out "$T2I_DIR"

stage t2i_2_gpt "train $GPT_MODEL + a word-level text encoder on the captions for $T2I_STEPS steps" \
    env CODE_DIR="$T2I_DIR/codes.csv" VQ_PATH="$TOKENIZER_DIR/tokenizer.pt" RES_DIR="$T2I_DIR/gpt" \
        EXP_NAME=quickstart_t2i LR="$T2I_LR" BATCH_SIZE="$T2I_BATCH_SIZE" GPT_MODEL="$GPT_MODEL" NPROC_PER_NODE=1 \
        EXTRA_ARGS="--max-steps $T2I_STEPS --schedule cosine --global-seed $SEED --no-compile --log-every 100 --ckpt-every $T2I_STEPS --text-dim $T2I_TEXT_DIM --text-layers $T2I_TEXT_LAYERS $T2I_EXTRA_ARGS" \
    bash evaluation/generation/scripts/train_t2i.sh

stage t2i_3_sample "generate $T2I_SAMPLES_PER_PROMPT images per caption (cfg $T2I_CFG_SCALE, temperature $T2I_TEMPERATURE)" \
    env SAMPLE_DIR="$T2I_DIR/samples" GPT_PATH="$T2I_GPT" VQ_PATH="$TOKENIZER_DIR/tokenizer.pt" \
        PROMPTS="$T2I_DIR/prompts.txt" NUM_PER_PROMPT="$T2I_SAMPLES_PER_PROMPT" CFG_SCALE="$T2I_CFG_SCALE" NPROC_PER_NODE=1 \
        EXTRA_ARGS="--temperature $T2I_TEMPERATURE --grid-columns 8 $T2I_SAMPLE_EXTRA_ARGS" \
    bash evaluation/generation/scripts/sample_t2i.sh

# sample_t2i.sh writes into SAMPLE_DIR/<run name derived from its settings>/: take the newest run.
CURRENT_STAGE=t2i_report
T2I_SAMPLES_NPZ=$(ls -t "$T2I_DIR"/samples/*/samples.npz 2>/dev/null | head -n 1 || true)
if [ -z "$T2I_SAMPLES_NPZ" ]; then
    echo "[quickstart] no samples.npz under $T2I_DIR/samples: delete $STAGE_DIR/t2i_3_sample.seconds and rerun" >&2
    exit 1
fi
python -m scripts.quickstart_t2i report --data_meta "$DATA_DIR/metadata.csv" --t2i_dir "$T2I_DIR" \
    --samples "$T2I_SAMPLES_NPZ" --classifier "$EVAL_DIR/classifier.pt" --stage_dir "$STAGE_DIR" --image_size "$IMAGE_SIZE"
echo "[quickstart] this invocation took $(awk -v a="$RUN_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }') s; results in $T2I_DIR/ (grid.png, report.json)"
