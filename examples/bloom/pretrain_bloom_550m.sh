#!/usr/bin/env bash
# Pretrain BLOOM 560M ("550m"): the 7B1 flag set with 24 layers, hidden 1024, 16 heads, sequence
# 1024, TP=8, micro batch 4, global batch 16 (no ramp-up: it starts above 16).
# Needs DATA_PATH and TOKENIZER_PATH, like pretrain_bloom_7b1.sh.
set -euo pipefail
export NUM_LAYERS=${NUM_LAYERS:-24} HIDDEN=${HIDDEN:-1024} HEADS=${HEADS:-16}
export SEQ_LEN=${SEQ_LEN:-1024} TP=${TP:-8} MICRO_BATCH=${MICRO_BATCH:-4}
export GLOBAL_BATCH=${GLOBAL_BATCH:-16} RAMPUP=${RAMPUP-}
export TENSORBOARD_DIR=${TENSORBOARD_DIR:-./tensorboard/bloom_550m}
exec "$(dirname "$0")/pretrain_bloom_7b1.sh" "$@"
