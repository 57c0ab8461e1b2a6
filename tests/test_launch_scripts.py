"""The users' launch scripts run unchanged: examples/bloom/pretrain_bloom_7b1.sh (TP over every
device, fp16 with dynamic loss scaling from its DeepSpeed config, sequence parallelism, batch
ramp-up, sample-based schedule, --save/--load) trains a tiny model on 4 CPU processes with the
same flags."""
import re
import sys

import pytest

from launch import launch_env, run_command
from tokenizer_helpers import generated_docs, write_jsonl

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory):
    """A byte-level BPE tokenizer trained on the spot and a dataset preprocessed with it."""
    root = tmp_path_factory.mktemp("launch")
    corpus = write_jsonl(root / "corpus.jsonl", [{"text": d} for d in generated_docs(400)])
    tokenizer = root / "tokenizer"
    for command in (
            [sys.executable, "tools/train_tokenizer.py", "--input", corpus, "--vocab-size", "300",
             "--output-dir", str(tokenizer)],
            [sys.executable, "tools/preprocess_data.py", "--input", corpus, "--output-prefix",
             str(root / "corpus"), "--json-keys", "text", "--tokenizer-type", "PretrainedFromHF",
             "--tokenizer-name-or-path", str(tokenizer), "--append-eod", "--workers", "1"]):
        result = run_command(command, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    return root, str(root / "corpus_text_document"), str(tokenizer)


def test_7b1_flag_set_trains_a_tiny_model_on_four_processes(hf_dataset):
    root, data_path, tokenizer = hf_dataset
    # MASTER_PORT=0: the script's c10d rendezvous endpoint localhost:0 binds a free port at run
    # time (the workers then share that store), so no port is fixed in advance
    env = launch_env(DATA_PATH=data_path, TOKENIZER_PATH=tokenizer,
               TENSORBOARD_DIR=str(root / "tb"), DS_CONFIG=str(root / "ds_config.json"),
               NPROC="4", TP="4", NUM_LAYERS="2", HIDDEN="64", HEADS="4", SEQ_LEN="32",
               MICRO_BATCH="1", GLOBAL_BATCH="8", RAMPUP="4 2 16", TRAIN_SAMPLES="96",
               LR_DECAY_SAMPLES="96", LR_WARMUP_SAMPLES="8", PAD_VOCAB_TO="512", BACKEND="gloo",
               EVAL_INTERVAL="5", SAVE_INTERVAL="6", CHECKPOINT_PATH=str(root / "ckpt"),
               MASTER_PORT="0")
    result = run_command(["bash", "examples/bloom/pretrain_bloom_7b1.sh"], env=env, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    batches = [int(x) for x in re.findall(r"global batch size:\s+(\d+)", output)]
    assert batches[:3] == [4, 4, 6] and batches[-1] == 8  # ramp-up 4 -> 8 by 2 over 16 samples
    scales = [float(x) for x in re.findall(r"loss scale: ([0-9.E+-]+)", output)]
    assert scales[0] == 4096.0  # initial_scale_power 12 from the DeepSpeed config
    losses = [float(x) for x in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", output)]
    assert len(losses) >= 10 and losses[-1] < losses[0]
    assert "validation loss at iteration 5" in output
    saved = sorted(p.name for p in (root / "ckpt").iterdir())
    assert "iter_0000006" in saved and "latest_checkpointed_iteration.txt" in saved
