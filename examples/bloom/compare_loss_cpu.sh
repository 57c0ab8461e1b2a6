#!/usr/bin/env bash
# Train the quick-start model twice with one thing changed, then compare the two loss curves with
# tools/compare_loss.py (the pictures in examples/bloom/images/ come from this script):
#
#   COMPARE=parallel   (default) TP=1 on 1 process against TP=2 x PP=2 on 4 processes, both fp32:
#                      the same model, data and seed, so the curves must agree to fp32 rounding
#   COMPARE=precision  fp32 against bf16, both TP=2 on 2 processes: the bf16 curve follows the
#                      fp32 one within bf16's rounding
#   COMPARE=threads    TP=1 on 1 thread against TP=1 on 2 threads: the same run, only the order of
#                      the CPU kernels' sums differs; the spread any two fp32 runs have
#
# The runs take a gentler schedule than pretrain_bloom_cpu.sh's (lr 1e-3 after 30 warm-up
# iterations, not 2e-3 after 10): its loss spike near iteration 19 amplifies rounding differences
# a thousandfold, after which any two runs, even COMPARE=threads, part by a percent or two.
#
# Needs the quick-start dataset (examples/bloom/quickstart_cpu.sh, DATA_DIR) or DATA_PATH and
# TOKENIZER_PATH; PAD_VOCAB_TO (default 8192) must hold the tokenizer's vocabulary. Writes
# OUTPUT_DIR (default runs/compare_loss/$COMPARE): a.log, b.log (the two training logs, B being
# the reference), loss.png and relative_error.png. TRAIN_ITERS (default 150), LR_WARMUP_ITERS
# (30), LR (1e-3), MIN_LR (1e-4) and extra arguments (passed to both runs) go to
# examples/bloom/pretrain_bloom_cpu.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."

COMPARE=${COMPARE:-parallel}
OUTPUT_DIR=${OUTPUT_DIR:-runs/compare_loss/$COMPARE}
case "$COMPARE" in
  parallel)
    RUN_A=(env NPROC=4 TP=2 PP=2) A_ARGS=() LABEL_A="TP=2 x PP=2"
    RUN_B=(env NPROC=1 TP=1 PP=1) B_ARGS=() LABEL_B="TP=1" ;;
  precision)
    RUN_A=(env NPROC=2 TP=2 PP=1) A_ARGS=(--bf16) LABEL_A="bf16"
    RUN_B=(env NPROC=2 TP=2 PP=1) B_ARGS=() LABEL_B="fp32" ;;
  threads)
    RUN_A=(env NPROC=1 TP=1 PP=1 OMP_NUM_THREADS=2) A_ARGS=() LABEL_A="TP=1, 2 threads"
    RUN_B=(env NPROC=1 TP=1 PP=1 OMP_NUM_THREADS=1) B_ARGS=() LABEL_B="TP=1, 1 thread" ;;
  *) echo "COMPARE=$COMPARE: expected parallel, precision or threads" >&2; exit 2 ;;
esac
mkdir -p "$OUTPUT_DIR"
failed() { echo "training failed, see $1:" >&2; grep -m 3 '^error:' "$1" >&2 || tail -n 20 "$1" >&2; }

# Both runs get the same padded vocabulary: by default it is padded to a multiple of 128 x TP
# (8064 at TP=1, 8192 at TP=2 for the quick-start tokenizer's 8000 tokens), and the padding rows
# are logits like any other, so two paddings are two models. Every iteration is logged.
PAD_VOCAB_TO=${PAD_VOCAB_TO:-8192}
export LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-30}
COMMON_ARGS=(--log-interval 1 --pad-vocab-size-to "$PAD_VOCAB_TO" --lr "${LR:-1e-3}"
             --min-lr "${MIN_LR:-1e-4}")
echo "run A ($LABEL_A): $OUTPUT_DIR/a.log"
"${RUN_A[@]}" bash examples/bloom/pretrain_bloom_cpu.sh "${COMMON_ARGS[@]}" "${A_ARGS[@]}" "$@" \
  > "$OUTPUT_DIR/a.log" 2>&1 || { failed "$OUTPUT_DIR/a.log"; exit 1; }
echo "run B ($LABEL_B): $OUTPUT_DIR/b.log"
"${RUN_B[@]}" bash examples/bloom/pretrain_bloom_cpu.sh "${COMMON_ARGS[@]}" "${B_ARGS[@]}" "$@" \
  > "$OUTPUT_DIR/b.log" 2>&1 || { failed "$OUTPUT_DIR/b.log"; exit 1; }

python tools/compare_loss.py "$OUTPUT_DIR/a.log" "$OUTPUT_DIR/b.log" \
  --labels "$LABEL_A" "$LABEL_B" --output "$OUTPUT_DIR"
