"""Checkpoints end to end through pretrain_bloom.py with real processes: exact resume, a kill -9
at a random moment leaves a loadable checkpoint, --exit-signal-handler saves on SIGTERM, and bad
or mismatched checkpoints are refused with a message naming the file."""
import os
import random
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from launch import kill_process_tree, start_torchrun
from megatron_ext.indexed_dataset import MMapIndexedDatasetBuilder
from test_pretrain import corpus, launch, losses, model_args  # noqa: F401 (corpus is a fixture)

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def tiny_corpus(corpus, tmp_path_factory):
    """About 40 samples of 32 tokens: a 10-iteration run of 8 samples walks several epochs."""
    root = tmp_path_factory.mktemp("tiny")
    prefix = str(root / "tiny_text_document")
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.RandomState(1)
    for _ in range(25):
        builder.add_item(rng.randint(0, 257, size=rng.randint(20, 90)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return corpus[0], prefix


def run_args(tiny_corpus, save, *extra, iters=8):
    return model_args(tiny_corpus, "--num-layers", "4", "--train-iters", str(iters),
                      "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--bf16",
                      "--eval-interval", "3", "--eval-iters", "1", "--split", "80,20,0",
                      "--save", str(save), "--load", str(save), *extra)


def final_weights(save, iteration):
    weights = {}
    directory = os.path.join(save, f"iter_{iteration:07d}")
    for rank in sorted(os.listdir(directory)):
        state = torch.load(os.path.join(directory, rank, "model_optim_rng.pt"), weights_only=True)
        weights[rank] = state
    return weights


def assert_same_tensors(a, b, where=""):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def iteration_of(line: str) -> int:
    return int(re.search(r"iteration +(\d+)", line).group(1))


def loaded_iteration(output: str) -> int:
    """The iteration of the ' > loaded checkpoint ... at iteration N' line (there must be one)."""
    found = re.findall(r" > loaded checkpoint \S+ at iteration (\d+) ", output)
    assert len(found) == 1, output[-3000:]
    return int(found[0])


def wait_for(condition, process, deadline_s, log):
    """Poll `condition()` until it holds, the process ends, or `deadline_s` seconds pass."""
    deadline = time.time() + deadline_s
    while not condition():
        if process.poll() is not None or time.time() > deadline:
            kill_process_tree(process.pid)
            pytest.fail(f"gave up waiting ({deadline_s} s, or the job ended):\n"
                        f"{log.read_text()[-3000:]}", pytrace=False)
        time.sleep(0.05)


def log_lines(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [re.sub(r"elapsed time per iteration \(ms\): [0-9.]+ \|", "", line)
             for line in result.stdout.splitlines()
             if line.startswith(" iteration ") or "validation loss at" in line]
    return [re.sub(r"\| tokens per second.*", "", line) for line in lines]


@pytest.mark.parametrize("nproc,layout", [
    (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    (4, ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"]),  # DP = 2
    (4, ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer",
         "--sequence-parallel"]),  # DP = 2
], ids=["tp2-pp2", "pp2-dp2-zero1", "tp2-dp2-zero1-sp"])
def test_resume_is_bit_exact(tiny_corpus, tmp_path, nproc, layout):
    """8 iterations straight (saving at 4 and 8) == resume from its iteration-4 checkpoint + 4:
    the same log lines after iteration 4 (losses, grad norms, loss scale, validation) and bitwise
    the same final weights, optimizer state and RNG states; bf16, dropout on, several epochs of
    data. (Saving must not disturb the run that saves, either.)"""
    straight = log_lines(launch(nproc, run_args(tiny_corpus, tmp_path / "straight", *layout,
                                                "--save-interval", "4")))
    assert (tmp_path / "straight" / "latest_checkpointed_iteration.txt").read_text() == "8"
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "straight" / "iter_0000004", tmp_path / "resumed" / "iter_0000004")
    (tmp_path / "resumed" / "latest_checkpointed_iteration.txt").write_text("4")
    second = log_lines(launch(nproc, run_args(tiny_corpus, tmp_path / "resumed", *layout)))
    assert second == [line for line in straight if iteration_of(line) > 4]
    assert len(second) == 4 + 1  # iterations 5-8 and the validation at 6
    resumed = final_weights(tmp_path / "resumed", 8)
    assert_same_tensors(final_weights(tmp_path / "straight", 8), resumed)
    if "--pipeline-model-parallel-size" in layout:  # Megatron's names for PP > 1
        tp = 2 if "--tensor-model-parallel-size" in layout else 1
        assert set(resumed) == {f"mp_rank_{t:02d}_{p:03d}" for t in range(tp) for p in range(2)}
        first_stage, last_stage = resumed["mp_rank_00_000"]["model"], resumed["mp_rank_00_001"]["model"]
        assert "word_embeddings" in first_stage["language_model"]["embedding"]
        assert "word_embeddings_for_head" not in first_stage
        assert set(last_stage["word_embeddings_for_head"]) == {"weight"}
        assert "language_model.encoder.layers.0.input_layernorm.weight" not in last_stage
        assert {"layers.0.input_layernorm.weight", "layers.1.mlp.dense_4h_to_h.bias",
                "final_layernorm.weight"} <= set(last_stage["language_model"]["encoder"])


def test_kill_at_random_moments_leaves_a_loadable_checkpoint(tiny_corpus, tmp_path):
    """kill -9 of every process at random moments while it saves every iteration: the tracker
    always names a complete checkpoint, and the run resumes from it to the end."""
    save = tmp_path / "ckpt"
    args = run_args(tiny_corpus, save, "--tensor-model-parallel-size", "2", "--save-interval", "1",
                    iters=20)
    tracker = save / "latest_checkpointed_iteration.txt"
    rng = random.Random(0)
    for attempt in range(2):
        before = tracker.read_text() if tracker.exists() else None
        log = tmp_path / f"attempt{attempt}.log"
        with open(log, "w") as output:
            process = start_torchrun("pretrain_bloom.py", args, 2, stdout=output, stderr=output)
            # Kill while it saves: once this attempt has saved at least once (slow under load).
            wait_for(lambda: tracker.exists() and tracker.read_text() != before, process, 300, log)
            time.sleep(rng.uniform(0.0, 1.0))
            kill_process_tree(process.pid)
            process.wait(timeout=60)
        assert tracker.exists(), (tmp_path / f"attempt{attempt}.log").read_text()[-3000:]
        iteration = int(tracker.read_text())
        for rank in ("mp_rank_00", "mp_rank_01"):
            state = torch.load(save / f"iter_{iteration:07d}" / rank / "model_optim_rng.pt",
                               weights_only=True)
            assert state["iteration"] == iteration
    result = launch(2, args)
    lines = log_lines(result)
    # what was loaded: the iteration the tracker named, training on from the next one, and the
    # run ends where an uninterrupted run ends, bitwise (weights, optimizer, RNG states)
    assert loaded_iteration(result.stdout) == iteration
    assert iteration_of(lines[0]) == iteration + 1 and iteration_of(lines[-1]) == 20
    assert tracker.read_text() == "20"
    assert not [p for p in os.listdir(save) if p.endswith(".tmp")]
    straight = tmp_path / "straight"
    log_lines(launch(2, run_args(tiny_corpus, straight, "--tensor-model-parallel-size", "2",
                                 iters=20)))
    assert_same_tensors(final_weights(straight, 20), final_weights(save, 20))


def test_exit_signal_handler_saves_then_exits_cleanly(tiny_corpus, tmp_path):
    save = tmp_path / "ckpt"
    args = run_args(tiny_corpus, save, "--exit-signal-handler", iters=2000)
    log = tmp_path / "job.log"
    with open(log, "w") as output:
        process = start_torchrun("pretrain_bloom.py", [*args, "--tensor-model-parallel-size", "2"],
                                 2, stdout=output, stderr=output, new_session=False)
        try:
            wait_for(lambda: " iteration        3/" in log.read_text(), process, 300, log)
            workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                     text=True, timeout=30)
            for pid in workers.stdout.split():  # as a cluster scheduler does: every task gets it
                os.kill(int(pid), signal.SIGTERM)
            process.wait(timeout=120)
        finally:
            if process.poll() is None:
                kill_process_tree(process.pid)
    out = log.read_text()
    assert process.returncode == 0, out[-3000:]
    assert "signal received, --exit-signal-handler" in out
    iteration = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= iteration < 2000 and f"saved checkpoint at iteration {iteration}" in out


# ------------------------------------------------------------------------- bad checkpoints
@pytest.fixture(scope="module")
def continued(tiny_corpus, tmp_path_factory):
    """A TP=2 run of 5 iterations that saved at 3 and 5: (checkpoint dir holding only iteration
    3 now, the run's log lines of iterations 4-5, its iteration-5 rank states)."""
    save = tmp_path_factory.mktemp("saved") / "ckpt"
    lines = log_lines(launch(2, run_args(tiny_corpus, save, "--tensor-model-parallel-size", "2",
                                         "--save-interval", "3", iters=5)))
    final = final_weights(save, 5)
    shutil.rmtree(save / "iter_0000005")
    (save / "latest_checkpointed_iteration.txt").write_text("3")
    return save, [line for line in lines if iteration_of(line) > 3], final


@pytest.fixture(scope="module")
def saved(continued):
    """A TP=2 checkpoint at iteration 3."""
    return continued[0]


def refused(tiny_corpus, save, nproc=2, *extra):
    result = launch(nproc, run_args(tiny_corpus, save, "--tensor-model-parallel-size", str(nproc),
                                    *extra, iters=5), timeout=120)
    assert result.returncode != 0
    return result.stderr


def test_megatron_layout_and_plain_data(saved):
    """Megatron-LM's names and nesting (tracker, iter_N/mp_rank_TT, language_model.embedding /
    encoder with stage-local layers), and nothing in the file that weights_only cannot load."""
    assert (saved / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert sorted(os.listdir(saved / "iter_0000003")) == ["mp_rank_00", "mp_rank_01"]
    state = torch.load(saved / "iter_0000003" / "mp_rank_01" / "model_optim_rng.pt",
                       weights_only=True)
    assert state["checkpoint_version"] == 3.0 and state["iteration"] == 3
    assert state["checkpoint_info"] == {"padded_vocab_size": 512, "original_vocab_size": 257}
    embedding = state["model"]["language_model"]["embedding"]["word_embeddings"]
    assert set(embedding) == {"weight", "norm.weight", "norm.bias"}
    assert embedding["weight"].shape == (256, 64)  # this TP rank's half of the padded vocab
    encoder = state["model"]["language_model"]["encoder"]
    assert encoder["layers.3.self_attention.query_key_value.weight"].shape == (96, 64)
    assert {"final_layernorm.weight", "final_layernorm.bias"} <= set(encoder)
    assert state["args"]["tensor_model_parallel_size"] == 2
    for key in ("optimizer", "opt_param_scheduler", "torch_rng_state", "rng_tracker_states"):
        assert key in state, key


def copy_of(saved, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(saved, target)
    return target


def test_truncated_file_is_named(tiny_corpus, saved, tmp_path):
    save = copy_of(saved, tmp_path)
    path = save / "iter_0000003" / "mp_rank_01" / "model_optim_rng.pt"
    path.write_bytes(path.read_bytes()[:1000])
    assert f"{path}: cannot be read as a checkpoint" in refused(tiny_corpus, save)


def test_missing_rank_directory_is_named(tiny_corpus, saved, tmp_path):
    save = copy_of(saved, tmp_path)
    shutil.rmtree(save / "iter_0000003" / "mp_rank_01")
    message = refused(tiny_corpus, save)
    assert "mp_rank_01/model_optim_rng.pt is missing" in message and "mp_rank_00" in message


def test_tracker_naming_a_missing_iteration(tiny_corpus, saved, tmp_path):
    save = copy_of(saved, tmp_path)
    (save / "latest_checkpointed_iteration.txt").write_text("7")
    assert "names iteration 7, but" in refused(tiny_corpus, save)


def test_other_tensor_parallel_size_points_at_convert_tp(tiny_corpus, saved, tmp_path):
    message = refused(tiny_corpus, copy_of(saved, tmp_path), 1)
    assert "--tensor-model-parallel-size: checkpoint 2, this run 1" in message
    assert "tools/convert_tp.py" in message


def test_other_model_shape_is_named(tiny_corpus, saved, tmp_path):
    save = copy_of(saved, tmp_path)
    message = refused(tiny_corpus, save, 2, "--hidden-size", "128")
    assert "--hidden-size: checkpoint 64, this run 128" in message


def test_use_checkpoint_args_takes_the_model_shape(tiny_corpus, continued, tmp_path):
    """--hidden-size 128 given, the checkpoint's 64 used: the iteration-3 state is loaded and
    training continues exactly as the run that saved it did (log lines of iterations 4-5 and
    the iteration-5 states bitwise)."""
    saved, lines, final = continued
    save = copy_of(saved, tmp_path)
    result = launch(2, run_args(tiny_corpus, save, "--tensor-model-parallel-size", "2",
                                "--hidden-size", "128", "--use-checkpoint-args", iters=5))
    assert log_lines(result) == lines
    assert loaded_iteration(result.stdout) == 3
    assert_same_tensors(final_weights(save, 5), final)
