#!/usr/bin/env bash
# Pretrain a model of bigscience/bloom-560m's shape (24 layers, hidden 1024, 16 heads, sequence
# 2048, vocabulary padded to 250880) on one node of 8 devices: data parallelism over all 8 (TP=1),
# bf16, ZeRO-1 (--use-distributed-optimizer shards the fp32 masters and Adam state over DP), no
# recompute: python tools/plan.py --model bloom-560m --data-parallel-size 8 --micro-batch-size 4
# --bf16 --use-distributed-optimizer --device-memory-gb 64 puts the peak at ~48 GiB per device.
# (pretrain_bloom_550m.sh is the published 7B1-style flag set at 560M size: TP=8, fp16, seq 1024.)
#
#   DATA_PATH        dataset prefix, or a blend "W1 PREFIX1 W2 PREFIX2 ..." (split on spaces)
#   TOKENIZER_PATH   Hugging Face tokenizer directory
#   CHECKPOINT_PATH  --save/--load directory (left out when empty)
#   BACKEND          nccl (GPUs, the default), hccl (Ascend NPUs) or gloo (CPUs)
#   PRECISION        bf16 (default), fp16 (dynamic loss scaling) or fp32
# Every size can be overridden from the environment; the test suite runs this flag set scaled
# down on 2 CPU processes.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${DATA_PATH:?set DATA_PATH to the dataset prefix or blend (tools/preprocess_data.py output)}"
: "${TOKENIZER_PATH:?set TOKENIZER_PATH to the Hugging Face tokenizer directory}"
CHECKPOINT_PATH=${CHECKPOINT_PATH:-}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-./tensorboard/bloom_560m}

NPROC=${NPROC:-8}
TP=${TP:-1}
PP=${PP:-1}
NUM_LAYERS=${NUM_LAYERS:-24}
HIDDEN=${HIDDEN:-1024}
HEADS=${HEADS:-16}
SEQ_LEN=${SEQ_LEN:-2048}
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-220_000_000}
LR_DECAY_SAMPLES=${LR_DECAY_SAMPLES:-200_000_000}
LR_WARMUP_SAMPLES=${LR_WARMUP_SAMPLES:-183_105}
LR=${LR:-3e-4}
INIT_STD=${INIT_STD:-0.02}   # bloom-560m's initializer_range (176B used 0.0048)
MIN_LR=${MIN_LR:-1e-5}
PAD_VOCAB_TO=${PAD_VOCAB_TO:-250880}
BACKEND=${BACKEND:-nccl}
PRECISION=${PRECISION:-bf16}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
EVAL_INTERVAL=${EVAL_INTERVAL:-1000}

case "$PRECISION" in
  bf16|fp16) PRECISION_ARGS=(--"$PRECISION") ;;
  fp32) PRECISION_ARGS=() ;;
  *) echo "PRECISION=$PRECISION: expected bf16, fp16 or fp32" >&2; exit 2 ;;
esac

export TRANSFORMERS_OFFLINE=1
export HCCL_CONNECT_TIMEOUT=1200
if [ -n "${ASCEND_TOOLKIT_SET_ENV:-}" ]; then source "$ASCEND_TOOLKIT_SET_ENV"; fi

read -r -a DATA_ARGS <<< "$DATA_PATH"
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
  --use-distributed-optimizer \
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS" \
  --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN" \
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
  --train-samples "$TRAIN_SAMPLES" \
  --init-method-std "$INIT_STD" "${PRECISION_ARGS[@]}" --seed 42 \
  --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 \
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine \
  --lr-decay-samples "$LR_DECAY_SAMPLES" --lr-warmup-samples "$LR_WARMUP_SAMPLES" \
  --clip-grad 1.0 --weight-decay 1e-1 \
  --log-interval 1 --eval-interval "$EVAL_INTERVAL" --eval-iters 1 \
  --tensorboard-dir "$TENSORBOARD_DIR" --tensorboard-queue-size 5 \
  --log-batch-size-to-tensorboard --log-validation-ppl-to-tensorboard \
  "${CHECKPOINT_ARGS[@]}" \
  --distributed-backend "$BACKEND" \
  "$@"
