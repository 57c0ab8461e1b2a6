#!/usr/bin/env bash
# Pretrain BLOOM 7B1 on one node of 8 devices: TP=8, fp16 with dynamic loss scaling (from the
# DeepSpeed config written below), sequence parallelism and batch-size ramp-up.
#
# Every size can be overridden from the environment, which is how the test suite runs this exact
# flag set on a tiny model with 4 CPU processes (NPROC=4 TP=4 NUM_LAYERS=2 HIDDEN=64 ...).
#   DATA_PATH        dataset prefix written by tools/preprocess_data.py, or a blend
#                    "W1 PREFIX1 W2 PREFIX2 ..." (split on spaces; required)
#   TOKENIZER_PATH   Hugging Face tokenizer directory (required)
#   CHECKPOINT_PATH  --save/--load directory (left out when empty)
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${DATA_PATH:?set DATA_PATH to the dataset prefix (tools/preprocess_data.py output)}"
: "${TOKENIZER_PATH:?set TOKENIZER_PATH to the Hugging Face tokenizer directory}"
CHECKPOINT_PATH=${CHECKPOINT_PATH:-}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-./tensorboard/bloom_7b1}

NPROC=${NPROC:-8}
TP=${TP:-8}
PP=${PP:-1}
NUM_LAYERS=${NUM_LAYERS:-30}
HIDDEN=${HIDDEN:-4096}
HEADS=${HEADS:-32}
SEQ_LEN=${SEQ_LEN:-2048}
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}
RAMPUP=${RAMPUP-"192 16 9_765_625"}   # START INCREMENT SAMPLES; RAMPUP= turns it off
TRAIN_SAMPLES=${TRAIN_SAMPLES:-220_000_000}
LR_DECAY_SAMPLES=${LR_DECAY_SAMPLES:-200_000_000}
LR_WARMUP_SAMPLES=${LR_WARMUP_SAMPLES:-183_105}
PAD_VOCAB_TO=${PAD_VOCAB_TO:-250880}
BACKEND=${BACKEND:-nccl}   # hccl on Ascend NPUs, gloo on CPUs
SAVE_INTERVAL=${SAVE_INTERVAL:-250}
EVAL_INTERVAL=${EVAL_INTERVAL:-1000}

export TRANSFORMERS_OFFLINE=1
export HCCL_CONNECT_TIMEOUT=1200
export HCCL_OP_BASE_FFTS_MODE_ENABLE=TRUE
if [ -n "${ASCEND_TOOLKIT_SET_ENV:-}" ]; then source "$ASCEND_TOOLKIT_SET_ENV"; fi

DS_CONFIG=${DS_CONFIG:-$(mktemp -d)/ds_config.json}
cat > "$DS_CONFIG" <<JSON
{
  "train_micro_batch_size_per_gpu": $MICRO_BATCH,
  "train_batch_size": $GLOBAL_BATCH,
  "gradient_clipping": 1.0,
  "zero_optimization": {"stage": 0},
  "fp16": {"enabled": true, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2,
           "min_loss_scale": 1, "initial_scale_power": 12},
  "steps_per_print": 2000,
  "wall_clock_breakdown": false
}
JSON

read -r -a DATA_ARGS <<< "$DATA_PATH"
RAMPUP_ARGS=()
if [ -n "$RAMPUP" ]; then read -r -a RAMPUP_ARGS <<< "--rampup-batch-size $RAMPUP"; fi
CHECKPOINT_ARGS=()
if [ -n "$CHECKPOINT_PATH" ]; then
  CHECKPOINT_ARGS=(--save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval "$SAVE_INTERVAL")
fi

python -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes 1 \
  --rdzv_endpoint "localhost:${MASTER_PORT:-5999}" --rdzv_backend c10d --max_restarts 0 --tee 3 \
  pretrain_bloom.py \
  --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "$TOKENIZER_PATH" \
  --data-path "${DATA_ARGS[@]}" --data-impl mmap \
  --embed-layernorm --position-embedding-type alibi \
  --attention-dropout 0 --hidden-dropout 0 --pad-vocab-size-to "$PAD_VOCAB_TO" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS" \
  --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN" \
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
  "${RAMPUP_ARGS[@]}" \
  --train-samples "$TRAIN_SAMPLES" \
  --init-method-std 0.0048 --fp16 --seed 42 \
  --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 \
  --lr 1.2e-4 --min-lr 6e-6 --lr-decay-style cosine \
  --lr-decay-samples "$LR_DECAY_SAMPLES" --lr-warmup-samples "$LR_WARMUP_SAMPLES" \
  --clip-grad 1.0 --weight-decay 1e-1 \
  --log-interval 1 --eval-interval "$EVAL_INTERVAL" --eval-iters 1 \
  --tensorboard-dir "$TENSORBOARD_DIR" --tensorboard-queue-size 5 \
  --log-timers-to-tensorboard --log-batch-size-to-tensorboard --log-validation-ppl-to-tensorboard \
  "${CHECKPOINT_ARGS[@]}" \
  --deepspeed --deepspeed_config "$DS_CONFIG" --zero-stage 0 \
  --deepspeed-activation-checkpointing \
  --distributed-backend "$BACKEND" --sequence-parallel \
  "$@"
