"""pretrain_bloom.py end to end with real processes: TP=2 and DP=2 reproduce the TP=1 losses,
and bad input is refused before any process group can hang."""
import re

import numpy as np
import pytest
import torch

from launch import run_torchrun
from megatron_ext.indexed_dataset import MMapIndexedDatasetBuilder
from tolerances import (assert_values_close, half_precision_loss_rel, max_rel_diff_of_values,
                        printed_resolution, spread_tolerance)

# Tests that launch pretrain_bloom.py are marked multiprocess one by one: the configuration
# checks run in this process and stay in the fast tier.


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
    return run_torchrun("pretrain_bloom.py", args, nproc, timeout=timeout)


def losses(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [float(x) for x in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", result.stdout)]


@pytest.fixture(scope="module")
def reference(corpus):
    return losses(launch(1, model_args(corpus, "--tensorboard-dir", str(corpus[0] / "tb"))))


def layout_tolerance(again, reference):
    """Relative tolerance on the printed losses of a run in another layout (TP, DP, ZeRO, PP):
    another layout is another summation order of the same fp32 steps, so it may differ from the
    reference by SPREAD_FACTOR x the spread measured between the reference and `again`, the same
    run in micro-batches of 1 instead of 2 (measured: 1 unit of the printed 7th digit, 1.6e-7).
    At least 4 printed units (two values rounded to 7 digits), at most 1e-4 (equivalent runs
    further apart are a bug of the reference). What 10 steps of training change in the loss
    (lr 1e-3) is ~1e-3, 1000x more; a bucket left unreduced moved it by 4-5e-5 (checked)."""
    unit = max(printed_resolution(value) for value in reference)
    return spread_tolerance(max_rel_diff_of_values(again, reference), floor=4 * unit,
                            ceiling=1e-4, what="losses of equivalent one-process runs")


@pytest.fixture(scope="module")
def loss_tolerance(corpus, reference):
    again = losses(launch(1, model_args(corpus, "--micro-batch-size", "1")))
    return layout_tolerance(again, reference)


@pytest.mark.multiprocess
def test_reference_run_logs_megatron_lines_and_tensorboard(corpus, reference):
    assert len(reference) == 10 and reference[-1] < reference[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(corpus[0] / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"lm loss", "learning-rate", "grad-norm", "lm loss validation"} <= set(scalars)
    logged = [e.value for e in events.Scalars("lm loss")]
    # the same values, printed to 7 digits on one side: one unit of the printed last digit
    assert len(logged) == len(reference)
    for value, printed in zip(logged, reference):
        assert abs(value - printed) <= printed_resolution(printed) * abs(printed), (logged, reference)


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"],
                                    ["--tensor-model-parallel-size", "1"],  # DP = 2
                                    ["--tensor-model-parallel-size", "2", "--checkpoint-activations"],
                                    # DP = 2, ZeRO-1, several overlapped buckets
                                    ["--use-distributed-optimizer", "--ddp-bucket-size", "20000"],
                                    ["--no-overlap-grad-reduce", "--ddp-bucket-size", "20000"]])
def test_two_process_layouts_reproduce_tp1(corpus, reference, loss_tolerance, layout):
    got = losses(launch(2, model_args(corpus, *layout)))
    assert len(got) == len(reference)
    assert_values_close(got, reference, rel=loss_tolerance, what=" ".join(layout))


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


@pytest.mark.multiprocess
def test_bad_configuration_exits_non_zero_under_torchrun(corpus):
    result = launch(2, model_args(corpus, "--tensor-model-parallel-size", "3"), timeout=120)
    assert result.returncode != 0 and "world size 2 is not divisible" in result.stderr


def test_unknown_flag(corpus, capsys):
    from pretrain_bloom import main

    with pytest.raises(SystemExit) as exit_status:
        main(model_args(corpus, "--no-such-flag"))
    assert exit_status.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_exit_interval_stops_the_run(corpus):
    result = launch(1, model_args(corpus, "--exit-interval", "3"), timeout=120)
    assert len(losses(result)) == 3
    assert "exiting at iteration 3 (--exit-interval 3)" in result.stdout


@pytest.mark.multiprocess
def test_bf16_tracks_fp32(corpus, reference):
    """bf16 weights with fp32 master weights, fp32 softmax/CE and an fp32 ALiBi bias: the loss
    curve follows the fp32 one over 10 steps to half_precision_loss_rel (see there: 2.4e-4
    relative, 20x what was measured, below what the training steps change)."""
    got = losses(launch(1, model_args(corpus, "--bf16")))
    assert len(got) == len(reference)
    assert_values_close(got, reference, rel=half_precision_loss_rel(torch.bfloat16), what="bf16")


@pytest.mark.multiprocess
def test_fp16_with_dynamic_loss_scaling_runs_and_logs_the_scale(corpus, reference):
    result = launch(1, model_args(corpus, "--fp16", "--initial-loss-scale", "4096",
                                  "--train-iters", "4"))
    got = losses(result)
    assert len(got) == 4
    assert_values_close(got, reference[:4], rel=half_precision_loss_rel(torch.float16), what="fp16")
    assert "| loss scale: 4096.0 |" in result.stdout


def overflow_run(corpus, log_interval):
    """fp16 from loss scale 2^40 with hysteresis 1: its ' iteration' lines."""
    result = launch(1, model_args(corpus, "--fp16", "--initial-loss-scale", str(2.0 ** 40),
                                  "--hysteresis", "1", "--train-iters", "30",
                                  "--log-interval", str(log_interval)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, [line for line in result.stdout.splitlines() if line.startswith(" iteration ")]


@pytest.fixture(scope="module")
def overflow(corpus):
    return overflow_run(corpus, 1)


@pytest.mark.multiprocess
def test_fp16_overflow_skips_the_step_halves_the_scale_and_logs_no_loss(overflow):
    """Scale 2^40 overflows fp16: the step is skipped (counted, no loss printed for an interval of
    skipped steps, as Megatron), the scale halves each time, and training then proceeds."""
    result, lines = overflow
    first = lines[0]
    assert "lm loss" not in first and "number of skipped iterations:   1" in first
    assert f"| loss scale: {2.0 ** 39:.1f} |" in first
    scales = [float(x) for x in re.findall(r"loss scale: ([0-9.E+-]+)", result.stdout)]
    assert all(b == a / 2 for a, b in zip(scales, scales[1:]) if b < a)
    stepped = [line for line in lines if "lm loss" in line]
    assert stepped and "number of skipped iterations:   0" in stepped[-1]


def interval_fields(line):
    skipped = int(re.search(r"number of skipped iterations: +(\d+)", line).group(1))
    loss = re.search(r"\| lm loss: ([0-9.E+-]+) \|", line)
    return skipped, float(loss.group(1)) if loss else None


@pytest.mark.multiprocess
def test_fp16_interval_line_averages_only_the_steps_taken(corpus, overflow):
    """The same run logged every few iterations (a counterpart of the --log-interval 1 run, the
    interval chosen so that one interval mixes skipped and taken steps): each line counts the
    interval's skipped steps, prints no loss when all were skipped, and otherwise the mean of
    the losses of the steps taken (Megatron's average), which the --log-interval 1 lines give
    one by one. Tolerance: both sides printed to 7 digits, one printed unit each."""
    _, every = overflow
    per_iteration = [interval_fields(line) for line in every]
    assert len(every) == 30
    skipped_in_all = sum(flag for flag, _ in per_iteration)
    interval = next(k for k in (4, 6, 7, 8) if skipped_in_all % k)
    _, lines = overflow_run(corpus, interval)
    assert len(lines) == -(-30 // interval)  # and the last iteration
    mixed = 0
    for k, line in enumerate(lines):
        skipped, loss = interval_fields(line)
        window = per_iteration[interval * k:interval * (k + 1)]
        taken = [value for flag, value in window if flag == 0]
        assert skipped == len(window) - len(taken), (line, window)
        if not taken:
            assert loss is None, line
            continue
        mixed += len(taken) < 5
        mean = sum(taken) / len(taken)
        assert abs(loss - mean) <= 2 * printed_resolution(mean) * abs(mean), (line, window)
    assert interval_fields(lines[0])[1] is None and mixed >= 1  # all skipped; some skipped


@pytest.mark.multiprocess
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


def loss_and_validation_lines(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return ([float(x) for x in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", result.stdout)],
            re.findall(r"validation loss at iteration \d+ \| lm loss value: \S+", result.stdout))


@pytest.mark.multiprocess
def test_weighted_split_paths_train_on_the_same_samples_as_data_path(corpus):
    """BigScience's option-2 data flags reach the trainer (not only the index tool), and mean
    what the equivalent --data-path / --split flags mean: 'TRAIN: 1 0:0.9 P, 2 0:0.9 P' (a blend
    of the first 90% of the documents, weights 1:2) trains on the samples of
    '--data-path 1 P 2 P --split 90,10,0', and 'VALID: ... 0.9:1 ...' validates on its last 10%:
    the same computation, so the same printed training and validation losses, exactly."""
    root, prefix = corpus
    args = model_args(corpus, "--train-iters", "4", "--eval-interval", "2")
    i = args.index("--data-path")
    del args[i:i + 2]
    i = args.index("--split")
    del args[i:i + 2]
    weighted = args + ["--train-weighted-split-paths", f"TRAIN: 1 0:0.9 {prefix}, 2 0:0.9 {prefix}",
                       "--valid-weighted-split-paths", f"VALID: 1 0.9:1 {prefix}, 2 0.9:1 {prefix}"]
    blended = args + ["--data-path", "1", prefix, "2", prefix, "--split", "90,10,0"]
    got = loss_and_validation_lines(launch(1, weighted, timeout=120))
    expected = loss_and_validation_lines(launch(1, blended, timeout=120))
    assert len(got[0]) == 4 and len(got[1]) == 2
    assert got == expected


@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["--use-distributed-optimizer"]),
                                          (2, ["--pipeline-model-parallel-size", "2"])],
                         ids=["one-process", "dp2-zero1", "pp2"])
def test_log_interval_line_is_the_mean_of_its_iterations(corpus, reference, loss_tolerance,
                                                          nproc, layout):
    """--log-interval 5 (the other tests log every iteration): each line is the mean of its 5
    iterations' losses, which the --log-interval 1 reference prints one by one (also at DP=2
    with ZeRO-1, where each iteration's loss is itself averaged over the ranks, and at PP=2,
    where the last stage has the losses and the last rank logs). Tolerance: the
    layout's (loss_tolerance) plus one printed unit for the mean of rounded values."""
    result = launch(nproc, model_args(corpus, "--log-interval", "5", *layout))
    got = losses(result)
    assert len(got) == 2
    for k, value in enumerate(got):
        mean = sum(reference[5 * k:5 * k + 5]) / 5
        assert abs(value - mean) <= (loss_tolerance + printed_resolution(mean)) * abs(mean), \
            (got, reference)
