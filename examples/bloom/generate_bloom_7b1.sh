#!/usr/bin/env bash
# Generate text with BLOOM 7B1 on one node of 8 devices (TP=8, fp16), with the flags of the
# published AscendSpeed generate script. The model's shape comes from the checkpoint
# (--use-checkpoint-args): the published --layernorm-epsilon 1e-6 is replaced by the checkpoint's
# value (1e-5 for the BLOOM models), and the change is logged. The published --recompute runs
# without the key/value cache (the same tokens, much slower); drop it for speed.
#
#   CHECKPOINT_PATH  a pretrain_bloom.py checkpoint saved at TP=8 (tools/convert_tp.py reshards)
#   TOKENIZER_PATH   Hugging Face tokenizer directory
# Extra arguments are passed on, e.g. --prompt "..." (repeatable), --sample-input-file FILE
# --sample-output-file OUT.jsonl, --max-new-tokens N, --greedy, --top_k K, --stop STRING;
# without prompts, prompts are read from stdin. Sizes can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${CHECKPOINT_PATH:?set CHECKPOINT_PATH to the checkpoint directory (--load)}"
: "${TOKENIZER_PATH:?set TOKENIZER_PATH to the Hugging Face tokenizer directory}"
NPROC=${NPROC:-8}
TP=${TP:-8}
NNODES=${NNODES:-1}   # the published script passed --nnodes 2 (a second node it never started)
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6001}
BACKEND=${BACKEND:-nccl}   # hccl on Ascend NPUs, gloo on CPUs

export TRANSFORMERS_OFFLINE=1
if [ -n "${ASCEND_TOOLKIT_SET_ENV:-}" ]; then source "$ASCEND_TOOLKIT_SET_ENV"; fi

python -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes "$NNODES" \
  --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  examples/bloom/generate_bloom.py \
  --load "$CHECKPOINT_PATH" --use-checkpoint-args \
  --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "$TOKENIZER_PATH" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size 1 \
  --embed-layernorm --position-embedding-type alibi \
  --num-layers 30 --hidden-size 4096 --attention-dropout 0 --hidden-dropout 0 \
  --num-attention-heads 32 --micro-batch-size 1 --seq-length 2048 \
  --max-position-embeddings 2048 --init-method-std 0.0048 --log-interval 1 \
  --layernorm-epsilon 1e-6 --fp16 --no-load-optim --no-load-rng \
  --out-seq-length 1024 --temperature 1.0 --top_p 0.9 --recompute \
  --distributed-backend "$BACKEND" \
  "$@"
