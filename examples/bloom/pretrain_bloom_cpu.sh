#!/usr/bin/env bash
# Pretrain a small BLOOM (~5 M parameters: 4 layers, hidden 256, 8 heads, ALiBi, embedding
# LayerNorm) on the bundled Shakespeare dataset with 2 CPU processes and tensor parallelism 2.
# Run examples/bloom/quickstart_cpu.sh (or set DATA_DIR to a prepared dataset, or DATA_PATH and
# TOKENIZER_PATH) first. NPROC, TP, PP, TRAIN_ITERS and LR_WARMUP_ITERS come from the environment; DP is
# NPROC / (TP x PP). Extra arguments are passed on (the last of a repeated flag wins).
set -euo pipefail
cd "$(dirname "$0")/../.."

DATA_DIR=${DATA_DIR:-data/shakespeare}
NPROC=${NPROC:-2}
TP=${TP:-2}
PP=${PP:-1}
DATA_PATH=${DATA_PATH:-$DATA_DIR/shakespeare_text_document}
TOKENIZER_PATH=${TOKENIZER_PATH:-$DATA_DIR/tokenizer}
TRAIN_ITERS=${TRAIN_ITERS:-150}
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-10}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" pretrain_bloom.py \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --num-layers 4 --hidden-size 256 --num-attention-heads 8 \
  --seq-length 256 --max-position-embeddings 256 \
  --position-embedding-type alibi --embed-layernorm \
  --attention-dropout 0 --hidden-dropout 0 --init-method-std 0.02 \
  --micro-batch-size 4 --global-batch-size 8 --train-iters "$TRAIN_ITERS" \
  --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters "$LR_WARMUP_ITERS" \
  --clip-grad 1.0 --weight-decay 0.1 --seed 42 \
  --data-path "$DATA_PATH" --split 949,50,1 --data-impl mmap \
  --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "$TOKENIZER_PATH" \
  --distributed-backend gloo --num-workers 0 \
  --log-interval 10 --eval-interval 50 --eval-iters 5 \
  "$@"
