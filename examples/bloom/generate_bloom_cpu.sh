#!/usr/bin/env bash
# Generate text on a CPU from the small BLOOM that examples/bloom/quickstart_cpu.sh trains
# (checkpoint in $CHECKPOINT_DIR, default data/shakespeare/checkpoint, saved at TP=2): 2 processes,
# tensor parallelism 2, model flags from the checkpoint. Extra arguments are passed on; the
# default prompts are three Shakespearean openings, generated together as one left-padded batch.
set -euo pipefail
cd "$(dirname "$0")/../.."

DATA_DIR=${DATA_DIR:-data/shakespeare}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-$DATA_DIR/checkpoint}
NPROC=${NPROC:-2}
TP=${TP:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ $# -eq 0 ]; then
  set -- --prompt "KING HENRY: " --prompt "To be, or not to be" --prompt "ROMEO: O, she doth" \
    --max-new-tokens 40 --top_k 40 --temperature 0.8 --seed 7
fi

python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  examples/bloom/generate_bloom.py \
  --load "$CHECKPOINT_DIR" --use-checkpoint-args \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size 1 \
  --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "$DATA_DIR/tokenizer" \
  --distributed-backend gloo --micro-batch-size 4 \
  "$@"
