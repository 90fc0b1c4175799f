#!/usr/bin/env bash
# One command from real medical images to generated images, on a CPU, with no download:
#   1 data       4-class dataset of real images shipped in PyPI packages (datasets.demo)
#   2 tokenizer  train MedITok-Tiny                      (scripts/train_tokenizer.sh)
#   3 tokenize   images -> codes                         (batch_infer.py --infer_type code)
#   4 gpt        train a small class-conditional GPT     (evaluation/generation/scripts/train_c2i.sh)
#   5 sample     generate images for every class         (evaluation/generation/scripts/sample_c2i.sh)
#   6 evaluate   classifier on real train images, tokenizer PSNR on val images, generation FID/accuracy
#   7 report     OUT/grid.png, OUT/report.json, OUT/report.md (scripts/quickstart_report.py)
# Each stage prints what it runs and how long it took; a rerun skips the stages that finished
# (delete OUT/stages/<NN>_<stage>.seconds, or the whole OUT, to redo one). Every setting below can be
# overridden from the environment, e.g. `GPT_STEPS=300 bash scripts/quickstart.sh`.
set -Eeuo pipefail  # -E: the ERR trap below also fires inside the stage function
# `bash scripts/quickstart.sh t2i`: the text-to-image stages (scripts/quickstart_t2i.sh) instead of the GPT ones.
QUICKSTART_MODE=${1:-c2i}
case "$QUICKSTART_MODE" in c2i | t2i) ;; *) echo "usage: bash scripts/quickstart.sh [c2i|t2i]" >&2; exit 2 ;; esac
# The Python: an active environment with torch, else the repository's .venv (see scripts/launcher.sh).
source "$(dirname "${BASH_SOURCE[0]}")/launcher.sh"
launcher_python
python() { "$PYTHON" "$@"; }  # every stage runs the launcher's Python
# Relative OUT / DATA_DIR are taken from the folder the script was started in; then run from the repo root.
OUT=$(abspath "${OUT:-$REPO_ROOT/outputs/quickstart}")
DATA_DIR=$(abspath "${DATA_DIR:-$OUT/data}")
cd "$REPO_ROOT"

# ---- settings ---------------------------------------------------------------------------------
# OUT [outputs/quickstart]; DATA_DIR [$OUT/data]: images/ + metadata.csv of the real images
DATA_IMAGE_SIZE=${DATA_IMAGE_SIZE:-128}          # side of the stored PNGs (stages resize to IMAGE_SIZE)
IMAGE_SIZE=${IMAGE_SIZE:-64}                     # side the tokenizer, GPT and evaluation work at
NUM_CLASSES=${NUM_CLASSES:-4}
NUM_WORKERS=${NUM_WORKERS:-0}                    # data-loader workers (0: in the main process)
SEED=${SEED:-0}
# Same command, same numbers: every stage is a fixed amount of seeded work, and torch's thread count is
# pinned because float sums (and so the weights) depend on it. PASSIVE: idle threads sleep instead of
# spinning, which keeps a busy machine from slowing down several-fold.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# tokenizer
TOKENIZER_CONFIG=${TOKENIZER_CONFIG:-MedITok-Tiny}
TOKENIZER_STEPS=${TOKENIZER_STEPS:-1200}          # a fixed amount of work (not a time budget): same result on any machine
TOKENIZER_EPOCHS=${TOKENIZER_EPOCHS:-40}
TOKENIZER_BATCH_SIZE=${TOKENIZER_BATCH_SIZE:-16}
TOKENIZER_LR=${TOKENIZER_LR:-2e-3}
TOKENIZER_EXTRA_ARGS=${TOKENIZER_EXTRA_ARGS:---dead-code-every 25}  # restart unused codes: ~73 % codebook use instead of ~12 %
# tokenization
INFER_BATCH_SIZE=${INFER_BATCH_SIZE:-64}
# GPT
GPT_MODEL=${GPT_MODEL:-GPT-Tiny}
GPT_STEPS=${GPT_STEPS:-1200}                      # optimizer steps (the schedule spans them); 200 left samples at noise
GPT_BATCH_SIZE=${GPT_BATCH_SIZE:-16}
GPT_LR=${GPT_LR:-1e-3}
GPT_EXTRA_ARGS=${GPT_EXTRA_ARGS:-}
# sampling
SAMPLES_PER_CLASS=${SAMPLES_PER_CLASS:-25}
CFG_SCALE=${CFG_SCALE:-2.0}
TEMPERATURE=${TEMPERATURE:-0.5}                   # < 1 sharpens; 0.5 gave no broken samples (docs/QUICKSTART.md)
SAMPLE_EXTRA_ARGS=${SAMPLE_EXTRA_ARGS:-}
# evaluation
CLASSIFIER_EPOCHS=${CLASSIFIER_EPOCHS:-15}               # 15 reached 1.0 val accuracy on the demo data
CLASSIFIER_EXTRA_ARGS=${CLASSIFIER_EXTRA_ARGS:-}
GRID_PER_CLASS=${GRID_PER_CLASS:-6}               # real and generated images per class in grid.png

TOKENIZER_DIR=$OUT/tokenizer
CODE_DIR=$OUT/codes
GPT_RES_DIR=$OUT/gpt
GPT_EXP_NAME=quickstart
SAMPLE_DIR=$OUT/samples
EVAL_DIR=$OUT/eval
STAGE_DIR=$OUT/stages
mkdir -p "$STAGE_DIR"

# ---- stage runner ----------------------------------------------------------------------------
CURRENT_STAGE=setup
trap 'echo "[quickstart] FAILED in stage $CURRENT_STAGE (exit $?); its output is above. Rerunning resumes here." >&2' ERR
RUN_START=$(date +%s.%N)

# stage NN_NAME "what it does" command... : runs the command unless an earlier run finished it;
# writes the stage's seconds to STAGE_DIR/NN_NAME.seconds, which marks it as done, and the command
# to STAGE_DIR/NN_NAME.cmd (report.json records what actually produced each output).
stage() {
    local name=$1 what=$2; shift 2
    local marker=$STAGE_DIR/$name.seconds
    CURRENT_STAGE=$name
    if [ -f "$marker" ]; then
        echo "[quickstart] == $name: skipped, finished in an earlier run ($(cat "$marker") s)"
        return 0
    fi
    echo "[quickstart] == $name: $what"
    echo "[quickstart]    \$ $*"
    local t0 t1
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    printf '%q ' "$@" > "$STAGE_DIR/$name.cmd"
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f\n", b - a }' > "$marker.tmp"
    mv "$marker.tmp" "$marker"
    echo "[quickstart] == $name: done in $(cat "$marker") s"
}

# ---- stages ----------------------------------------------------------------------------------
stage 1_data "build the real-image dataset in $DATA_DIR" \
    python -m datasets.demo --out "$DATA_DIR" --output_size "$DATA_IMAGE_SIZE"

stage 2_tokenizer "train $TOKENIZER_CONFIG at ${IMAGE_SIZE}px for $TOKENIZER_STEPS steps" \
    env TRAIN_DATA="$DATA_DIR/metadata.csv" VAL_DATA="$DATA_DIR/metadata.csv" OUT_DIR="$TOKENIZER_DIR" \
        CONFIG="$TOKENIZER_CONFIG" IMAGE_SIZE="$IMAGE_SIZE" BATCH_SIZE="$TOKENIZER_BATCH_SIZE" \
        EPOCHS="$TOKENIZER_EPOCHS" LR="$TOKENIZER_LR" NPROC_PER_NODE=1 \
        EXTRA_ARGS="--max-steps $TOKENIZER_STEPS --seed $SEED $TOKENIZER_EXTRA_ARGS" \
    bash scripts/train_tokenizer.sh

stage 3_tokenize "encode every image into codes in $CODE_DIR" \
    python batch_infer.py --output_dir "$CODE_DIR" --pretrained_path "$TOKENIZER_DIR/tokenizer.pt" \
        --meta_path "$DATA_DIR/metadata.csv" --infer_type code --image_size "$IMAGE_SIZE" \
        --batch_size "$INFER_BATCH_SIZE" --num_workers "$NUM_WORKERS" --overwrite_changed  # the folder is derived

if [ "$QUICKSTART_MODE" = c2i ]; then
# The vocabulary, codebooks and grid come from the codes' manifest (CODE_DIR/tokenizer.json).
stage 4_gpt "train $GPT_MODEL on the codes for $GPT_STEPS steps" \
    env CODE_DIR="$CODE_DIR" VQ_PATH="$TOKENIZER_DIR/tokenizer.pt" RES_DIR="$GPT_RES_DIR" \
        EXP_NAME="$GPT_EXP_NAME" LR="$GPT_LR" BATCH_SIZE="$GPT_BATCH_SIZE" \
        NUM_CLASSES="$NUM_CLASSES" GPT_MODEL="$GPT_MODEL" NPROC_PER_NODE=1 \
        EXTRA_ARGS="--max-steps $GPT_STEPS --schedule cosine --global-seed $SEED --no-compile --log-every 100 --ckpt-every $GPT_STEPS $GPT_EXTRA_ARGS" \
    bash evaluation/generation/scripts/train_c2i.sh

stage 5_sample "generate $SAMPLES_PER_CLASS images per class (cfg $CFG_SCALE, temperature $TEMPERATURE) into $SAMPLE_DIR" \
    env SAMPLE_DIR="$SAMPLE_DIR" GPT_PATH="$GPT_RES_DIR/$GPT_EXP_NAME/checkpoints/latest.pt" \
        VQ_PATH="$TOKENIZER_DIR/tokenizer.pt" NUM_PER_CLASS="$SAMPLES_PER_CLASS" NUM_CLASSES="$NUM_CLASSES" \
        GPT_MODEL="$GPT_MODEL" CFG_SCALE="$CFG_SCALE" SEED="$SEED" NPROC_PER_NODE=1 EXTRA_ARGS="--temperature $TEMPERATURE $SAMPLE_EXTRA_ARGS" \
    bash evaluation/generation/scripts/sample_c2i.sh
fi

stage 6_classifier "train the evaluation classifier on the real train images" \
    python -m evaluation.train_classifier --meta "$DATA_DIR/metadata.csv" --image_size "$IMAGE_SIZE" \
        --epochs "$CLASSIFIER_EPOCHS" --seed "$SEED" --num_workers "$NUM_WORKERS" --classifier_ckpt "$EVAL_DIR/classifier.pt" --codes "$CODE_DIR" \
        $CLASSIFIER_EXTRA_ARGS

if [ "$QUICKSTART_MODE" = t2i ]; then
    source scripts/quickstart_t2i.sh
    exit 0
fi

stage 7_eval_tokenizer "reconstruction PSNR/SSIM of the tokenizer on the val images" \
    python -m evaluation.tokenizer.evaluate --meta "$DATA_DIR/metadata.csv" --tokenizer_ckpt "$TOKENIZER_DIR/tokenizer.pt" \
        --split val --feature_space classifier --classifier_ckpt "$EVAL_DIR/classifier.pt" --codes "$CODE_DIR" \
        --num_workers "$NUM_WORKERS" --out "$EVAL_DIR/tokenizer"

# sample_c2i.sh writes into SAMPLE_DIR/<run name derived from its settings>/: take the newest run.
CURRENT_STAGE=8_eval_generation
SAMPLES_NPZ=$(ls -t "$SAMPLE_DIR"/*/samples.npz 2>/dev/null | head -n 1 || true)
if [ -z "$SAMPLES_NPZ" ]; then
    echo "[quickstart] no samples.npz under $SAMPLE_DIR: delete $STAGE_DIR/5_sample.seconds and rerun" >&2
    exit 1
fi
stage 8_eval_generation "FID/KID/precision/recall in classifier features, classifier accuracy on the samples" \
    python -m evaluation.generation.evaluate --real_meta "$DATA_DIR/metadata.csv" --samples "$SAMPLES_NPZ" \
        --feature_space classifier --classifier_ckpt "$EVAL_DIR/classifier.pt" --codes "$CODE_DIR" --num_workers "$NUM_WORKERS" \
        --out "$EVAL_DIR/generation"

# The report is cheap and reflects the latest outputs, so it always runs.
CURRENT_STAGE=report
python -m scripts.quickstart_report --out "$OUT" --meta_path "$DATA_DIR/metadata.csv" --samples "$SAMPLES_NPZ" \
    --classifier_eval "$EVAL_DIR/classifier.json" \
    --tokenizer_eval "$EVAL_DIR/tokenizer/tokenizer_metrics.json" --generation_eval "$EVAL_DIR/generation/generation_metrics.json" \
    --stage_dir "$STAGE_DIR" --per_class "$GRID_PER_CLASS" --tokenizer "$TOKENIZER_DIR/tokenizer.pt" --codes "$CODE_DIR"
echo "[quickstart] this invocation took $(awk -v a="$RUN_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }') s; results in $OUT/ (grid.png, report.json, report.md)"
