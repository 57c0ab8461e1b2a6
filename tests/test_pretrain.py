"""pretrain_bloom.py end to end with real processes: TP=2 and DP=2 reproduce the TP=1 losses,
and bad input is refused before any process group can hang."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from megatron_ext.indexed_dataset import MMapIndexedDatasetBuilder

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A random-token dataset and a GPT-2 BPE tokenizer of 200 ids (vocab + merges files)."""
    import json

    root = tmp_path_factory.mktemp("pretrain")
    symbols = [chr(c) for c in range(ord("!"), ord("~") + 1)] + \
        [chr(c) for c in range(ord("¡"), ord("¬") + 1)] + [chr(c) for c in range(ord("®"), ord("ÿ") + 1)]
    symbols += [chr(256 + i) for i in range(256 - len(symbols))]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab["<|endoftext|>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    prefix = str(root / "random_text_document")
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.RandomState(0)
    for _ in range(300):
        builder.add_item(rng.randint(0, 257, size=rng.randint(20, 200)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return root, prefix


def model_args(corpus, *extra):
    root, prefix = corpus
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", "10", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2",
            "--position-embedding-type", "alibi", "--embed-layernorm", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--data-path", prefix, "--split", "90,10,0",
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(root / "vocab.json"),
            "--merge-file", str(root / "merges.txt"), "--log-interval", "1", "--eval-interval", "5",
            "--eval-iters", "2", "--num-workers", "0", "--seed", "7",
            "--pad-vocab-size-to", "512", *extra]  # the same padded vocab at every TP size


def launch(nproc, args, timeout=300):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", os.path.join(REPO_ROOT, "pretrain_bloom.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def losses(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [float(x) for x in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", result.stdout)]


@pytest.fixture(scope="module")
def reference(corpus):
    return losses(launch(1, model_args(corpus, "--tensorboard-dir", str(corpus[0] / "tb"))))


def test_reference_run_logs_megatron_lines_and_tensorboard(corpus, reference):
    assert len(reference) == 10 and reference[-1] < reference[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(corpus[0] / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"lm loss", "learning-rate", "grad-norm", "lm loss validation"} <= set(scalars)
    logged = [e.value for e in events.Scalars("lm loss")]
    assert logged == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"],
                                    ["--tensor-model-parallel-size", "1"],  # DP = 2
                                    ["--tensor-model-parallel-size", "2", "--checkpoint-activations"],
                                    # DP = 2, ZeRO-1, several overlapped buckets
                                    ["--use-distributed-optimizer", "--ddp-bucket-size", "20000"],
                                    ["--no-overlap-grad-reduce", "--ddp-bucket-size", "20000"]])
def test_two_process_layouts_reproduce_tp1(corpus, reference, layout):
    got = losses(launch(2, model_args(corpus, *layout)))
    assert len(got) == len(reference)
    for ours, ref in zip(got, reference):
        assert abs(ours - ref) <= 1e-5 * abs(ref), (got, reference)


@pytest.mark.parametrize("nproc,extra,message", [
    (2, ["--tensor-model-parallel-size", "2", "--num-attention-heads", "3", "--hidden-size", "63"],
     "--num-attention-heads 3 is not divisible by --tensor-model-parallel-size 2"),
    (2, ["--tensor-model-parallel-size", "3"], "world size 2 is not divisible"),
    (1, ["--global-batch-size", "7"], "--global-batch-size 7"),
    (1, ["--data-path", "/nonexistent/prefix"], "/nonexistent/prefix"),
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "33"],
     "--sequence-parallel: --seq-length 33 is not divisible by --tensor-model-parallel-size 2"),
    (1, ["--fp16", "--bf16"], "--fp16 and --bf16"),
])
def test_bad_configuration_is_refused_clearly(corpus, nproc, extra, message, monkeypatch, capsys):
    """Refused by pretrain_bloom.main before any process group (so in this process, as rank 0 of
    `nproc`): exit status 2 and the message on stderr."""
    from ascendspeed import training
    from pretrain_bloom import main

    monkeypatch.setenv("WORLD_SIZE", str(nproc))
    monkeypatch.setattr(training, "pretrain", lambda *a, **k: pytest.fail("config accepted"))
    assert main(model_args(corpus, *extra)) == 2
    assert message in capsys.readouterr().err


def test_bad_configuration_exits_non_zero_under_torchrun(corpus):
    result = launch(2, model_args(corpus, "--tensor-model-parallel-size", "3"), timeout=120)
    assert result.returncode != 0 and "world size 2 is not divisible" in result.stderr


def test_unknown_flag(corpus, capsys):
    from pretrain_bloom import main

    with pytest.raises(SystemExit) as exit_status:
        main(model_args(corpus, "--no-such-flag"))
    assert exit_status.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_exit_interval_stops_the_run(corpus):
    result = launch(1, model_args(corpus, "--exit-interval", "3"), timeout=120)
    assert len(losses(result)) == 3
    assert "exiting at iteration 3 (--exit-interval 3)" in result.stdout


def test_bf16_tracks_fp32(corpus, reference):
    """bf16 weights with fp32 master weights, fp32 softmax/CE and an fp32 ALiBi bias: the loss
    curve stays within 2% of the fp32 one over 10 steps."""
    got = losses(launch(1, model_args(corpus, "--bf16")))
    for ours, ref in zip(got, reference):
        assert abs(ours - ref) <= 0.02 * abs(ref), (got, reference)


def test_fp16_with_dynamic_loss_scaling_runs_and_logs_the_scale(corpus, reference):
    result = launch(1, model_args(corpus, "--fp16", "--initial-loss-scale", "4096",
                                  "--train-iters", "4"))
    got = losses(result)
    assert all(abs(o - r) <= 0.02 * abs(r) for o, r in zip(got, reference))
    assert "| loss scale: 4096.0 |" in result.stdout


def test_fp16_overflow_skips_the_step_halves_the_scale_and_logs_no_loss(corpus):
    """Scale 2^40 overflows fp16: the step is skipped (counted, no loss printed for an interval of
    skipped steps, as Megatron), the scale halves each time, and training then proceeds."""
    result = launch(1, model_args(corpus, "--fp16", "--initial-loss-scale", str(2.0 ** 40),
                                  "--hysteresis", "1", "--train-iters", "30"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(" iteration ")]
    first = lines[0]
    assert "lm loss" not in first and "number of skipped iterations:   1" in first
    assert f"| loss scale: {2.0 ** 39:.1f} |" in first
    scales = [float(x) for x in re.findall(r"loss scale: ([0-9.E+-]+)", result.stdout)]
    assert all(b == a / 2 for a, b in zip(scales, scales[1:]) if b < a)
    stepped = [line for line in lines if "lm loss" in line]
    assert stepped and "number of skipped iterations:   0" in stepped[-1]


def test_rampup_batch_size_grows_the_batch(corpus):
    args = model_args(corpus, "--train-samples", "64", "--rampup-batch-size", "2", "2", "16",
                      "--global-batch-size", "8")
    for flag in ("--train-iters", "--lr-warmup-iters"):
        i = args.index(flag)
        del args[i:i + 2]
    result = launch(1, args, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    sizes = [int(x) for x in re.findall(r"global batch size: +(\d+) \|", result.stdout)]
    consumed = [int(x) for x in re.findall(r"consumed samples: +(\d+) \|", result.stdout)]
    assert sizes[:3] == [2, 2, 2] and sizes[-1] == 8 and sorted(sizes) == sizes
    assert consumed == [sum(sizes[:k + 1]) for k in range(len(sizes))]


def test_exit_duration_in_mins_stops_every_rank_together(corpus, monkeypatch):
    from ascendspeed import training

    calls = []
    monkeypatch.setattr(training, "_time_is_up", lambda start, minutes: calls.append(minutes) or len(calls) >= 2)
    from ascendspeed.arguments import PretrainConfig, parse_args

    config = PretrainConfig.from_args(parse_args(model_args(corpus, "--exit-duration-in-mins", "1")),
                                      world_size=1)
    lines = []
    result = training.pretrain(config, log=lines.append)
    assert result.iteration == 2 and calls == [1, 1]
    assert any("exiting at iteration 2 (--exit-duration-in-mins 1)" in line for line in lines)


def test_weighted_split_paths_train_the_model(corpus):
    """BigScience's option-2 data flags reach the trainer (not only the index tool)."""
    root, prefix = corpus
    args = model_args(corpus, "--train-iters", "3")
    i = args.index("--data-path")
    del args[i:i + 2]
    i = args.index("--split")
    del args[i:i + 2]
    args += ["--train-weighted-split-paths", f"TRAIN: 1 0:0.9 {prefix}, 1 0:0.9 {prefix}",
             "--valid-weighted-split-paths", f"VALID: 1 0.9:1 {prefix}"]
    assert len(losses(launch(1, args, timeout=120))) == 3
