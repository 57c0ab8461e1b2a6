#!/usr/bin/env bash
# Pretrain BLOOM-176B (70 layers, hidden 14336, 112 heads, sequence 2048, vocabulary padded to
# 250880) in one of the two published layouts. Run this script once on every node.
#
#   LAYOUT=bigscience  (default) the layout BigScience trained BLOOM with: 48 nodes x 8 devices =
#                      384, TP=4 x PP=12 x DP=8, micro batch 2, global batch 2048 ramped up from
#                      192 by 16 over 9,765,625 samples, bf16, ZeRO-1 (optimizer state sharded
#                      over DP), full activation recompute, pipeline partition
#                      'type:transformer|embedding' (the first and last stages hold an embedding
#                      and 5 blocks, the others 6 blocks).
#   LAYOUT=ascendspeed the layout AscendSpeed published for 96 NPUs: 12 nodes x 8, TP=8 x PP=12 x
#                      DP=1, micro batch 1, global batch 2048, bf16, sequence parallelism, full
#                      activation recompute. 70 blocks do not split evenly over 12 stages, so it
#                      takes the same balanced partition.
#
# The Megatron-DeepSpeed spellings are kept: --checkpoint-activations is
# --recompute-granularity full, and --zero-stage 1 is --use-distributed-optimizer.
# Plan a layout on paper first: python tools/plan.py --model bloom-176b ... (examples/bloom/README.md).
#
#   DATA_PATH        dataset prefix, or a blend "W1 PREFIX1 W2 PREFIX2 ..." (split on spaces)
#   TOKENIZER_PATH   Hugging Face tokenizer directory (bigscience/bloom's, saved locally)
#   CHECKPOINT_PATH  --save/--load directory on a filesystem every node sees (left out when empty)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE   where and how many
#   BACKEND          nccl (GPUs, the default), hccl (Ascend NPUs) or gloo (CPUs)
#   KILL_SWITCH_PATH a file whose appearance stops the run after a checkpoint (left out when empty)
# Every size below can be overridden from the environment, which is how the test suite runs both
# layouts' flag sets scaled down on 4 CPU processes.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${DATA_PATH:?set DATA_PATH to the dataset prefix or blend (tools/preprocess_data.py output)}"
: "${TOKENIZER_PATH:?set TOKENIZER_PATH to the Hugging Face tokenizer directory}"
LAYOUT=${LAYOUT:-bigscience}
case "$LAYOUT" in
  bigscience)
    NNODES=${NNODES:-48} TP=${TP:-4} PP=${PP:-12} MICRO_BATCH=${MICRO_BATCH:-2}
    RAMPUP=${RAMPUP-"192 16 9_765_625"}
    LAYOUT_ARGS=(--zero-stage 1) ;;
  ascendspeed)
    NNODES=${NNODES:-12} TP=${TP:-8} PP=${PP:-12} MICRO_BATCH=${MICRO_BATCH:-1}
    RAMPUP=${RAMPUP-}
    LAYOUT_ARGS=(--sequence-parallel) ;;
  *) echo "LAYOUT=$LAYOUT: expected bigscience or ascendspeed" >&2; exit 2 ;;
esac
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
BACKEND=${BACKEND:-nccl}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-./tensorboard/bloom_176b}
KILL_SWITCH_PATH=${KILL_SWITCH_PATH:-}

NUM_LAYERS=${NUM_LAYERS:-70}
HIDDEN=${HIDDEN:-14336}
HEADS=${HEADS:-112}
SEQ_LEN=${SEQ_LEN:-2048}
GLOBAL_BATCH=${GLOBAL_BATCH:-2048}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-220_000_000}        # 450 B tokens
LR_DECAY_SAMPLES=${LR_DECAY_SAMPLES:-200_000_000}  # then constant at --min-lr
LR_WARMUP_SAMPLES=${LR_WARMUP_SAMPLES:-183_105}    # 375 M tokens
PAD_VOCAB_TO=${PAD_VOCAB_TO:-250880}
SAVE_INTERVAL=${SAVE_INTERVAL:-100}
EVAL_INTERVAL=${EVAL_INTERVAL:-1000}

export TRANSFORMERS_OFFLINE=1
export HCCL_CONNECT_TIMEOUT=1200
if [ -n "${ASCEND_TOOLKIT_SET_ENV:-}" ]; then source "$ASCEND_TOOLKIT_SET_ENV"; fi

read -r -a DATA_ARGS <<< "$DATA_PATH"
RAMPUP_ARGS=()
if [ -n "$RAMPUP" ]; then read -r -a RAMPUP_ARGS <<< "--rampup-batch-size $RAMPUP"; fi
CHECKPOINT_ARGS=()
if [ -n "$CHECKPOINT_PATH" ]; then
  CHECKPOINT_ARGS=(--save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval "$SAVE_INTERVAL")
fi
KILL_SWITCH_ARGS=()
if [ -n "$KILL_SWITCH_PATH" ]; then KILL_SWITCH_ARGS=(--kill-switch-path "$KILL_SWITCH_PATH"); fi

python -m torch.distributed.run --nproc_per_node "$NPROC_PER_NODE" --nnodes "$NNODES" \
  --node_rank "$NODE_RANK" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  --rdzv_id "${RDZV_ID:-bloom-176b}" --max_restarts "${MAX_RESTARTS:-0}" --tee 3 \
  pretrain_bloom.py \
  --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "$TOKENIZER_PATH" \
  --data-path "${DATA_ARGS[@]}" --data-impl mmap \
  --embed-layernorm --position-embedding-type alibi \
  --attention-dropout 0 --hidden-dropout 0 --pad-vocab-size-to "$PAD_VOCAB_TO" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --pp-partition-method "type:transformer|embedding" "${LAYOUT_ARGS[@]}" \
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS" \
  --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN" \
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
  "${RAMPUP_ARGS[@]}" \
  --train-samples "$TRAIN_SAMPLES" \
  --init-method-std 0.0048 --bf16 --seed 42 \
  --checkpoint-activations \
  --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 \
  --lr 6e-5 --min-lr 6e-6 --lr-decay-style cosine \
  --lr-decay-samples "$LR_DECAY_SAMPLES" --lr-warmup-samples "$LR_WARMUP_SAMPLES" \
  --clip-grad 1.0 --weight-decay 1e-1 \
  --log-interval 1 --eval-interval "$EVAL_INTERVAL" --eval-iters 1 \
  --tensorboard-dir "$TENSORBOARD_DIR" --tensorboard-queue-size 5 \
  --log-batch-size-to-tensorboard --log-validation-ppl-to-tensorboard \
  "${CHECKPOINT_ARGS[@]}" "${KILL_SWITCH_ARGS[@]}" \
  --distributed-backend "$BACKEND" \
  "$@"
