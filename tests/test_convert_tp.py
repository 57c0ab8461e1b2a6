"""tools/convert_tp.py end to end: checkpoints written by pretrain_bloom.py (TP=2; TP=1 PP=2) are
resharded to other TP/PP sizes; the resharded model computes the same logits, training resumes
from it with the loss of the unconverted run, and unfit requests fail with exit status 2."""
import os
import shutil

import pytest
import torch

from launch import REPO_ROOT, run_python, run_torchrun
from test_pretrain import corpus, launch, losses, model_args  # noqa: F401 (corpus is a fixture)
from tolerances import FORWARD_REL, assert_close_to_scale, assert_values_close, printed_resolution

pytestmark = pytest.mark.multiprocess

WORKER = os.path.join(REPO_ROOT, "tests", "dist", "convert_tp_logits_worker.py")
TOOL = os.path.join(REPO_ROOT, "tools", "convert_tp.py")


def assert_same_logits(got, reference, what):
    """The same weights at another TP/PP layout: one fp32 forward each, ulps of the scale."""
    assert got.shape == reference.shape, what
    assert_close_to_scale(got, reference, rel=FORWARD_REL, what=what)


def assert_resumed_losses(resumed, source):
    """Training resumed from the converted checkpoint (weights, optimizer state, consumed
    samples: the same next batches) prints the unconverted run's losses: another layout's fp32
    forward (FORWARD_REL) plus two printed units (7 digits each side). A fresh optimizer or
    another batch would move them by 1e-3 or more."""
    rel = FORWARD_REL + 2 * max(printed_resolution(value) for value in source)
    assert_values_close(resumed, source, rel=rel, what="losses after the conversion")


def args_for(corpus, tp=1, pp=1, *extra):
    return model_args(corpus, "--num-layers", "4", "--tensor-model-parallel-size", str(tp),
                      "--pipeline-model-parallel-size", str(pp), "--eval-iters", "1", *extra)


def convert(src, dst, tp, pp=1, *extra):
    return run_python(TOOL, ["--input-folder", src, "--output-folder", dst, "--target-tp", tp,
                             "--target-pp", pp, *extra], timeout=120)


def converted(src, dst, tp, pp=1, *extra):
    """The tool's main() in this process (no interpreter start-up); its printed lines."""
    from tools.convert_tp import main

    lines = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
        status = main(["--input-folder", str(src), "--output-folder", str(dst),
                       "--target-tp", str(tp), "--target-pp", str(pp), *extra])
    assert status == 0, lines
    assert sum(line.startswith("wrote ") for line in lines) == tp * pp, lines
    return lines


def logits(corpus, iteration_dir, tp, pp, out):
    run_torchrun(WORKER, ["--iteration-dir", iteration_dir, "--out", out, "--",
                          *args_for(corpus, tp, pp)], tp * pp, timeout=180, check=True)
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def source_tp2(corpus, tmp_path_factory):
    """TP=2, 5 iterations, saved at 3 (and 5): (save dir, losses, logits of iteration 3)."""
    root = tmp_path_factory.mktemp("convert_tp2")
    result = launch(2, args_for(corpus, 2, 1, "--train-iters", "5", "--save-interval", "3",
                                "--save", str(root / "src")))
    got = losses(result)
    assert len(got) == 5
    reference = logits(corpus, root / "src" / "iter_0000003", 2, 1, root / "src_logits.pt")
    return root, got, reference


def test_tp2_to_tp1_same_logits_and_training_resumes(corpus, source_tp2):
    root, source_losses, reference = source_tp2
    dst = root / "tp1"
    converted(root / "src", dst, 1, 1, "--iteration", "3", "--pad-vocab-size-to", "512")
    assert open(dst / "latest_checkpointed_iteration.txt").read().strip() == "3"
    state = torch.load(dst / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt",
                       weights_only=True)
    assert state["args"]["tensor_model_parallel_size"] == 1
    assert state["checkpoint_info"]["padded_vocab_size"] == 512
    assert "torch_rng_state" not in state and state["iteration"] == 3
    got = logits(corpus, dst / "iter_0000003", 1, 1, root / "tp1_logits.pt")
    assert_same_logits(got, reference, "TP=2 -> TP=1")

    result = launch(1, args_for(corpus, 1, 1, "--train-iters", "5", "--load", str(dst),
                                "--save", str(root / "tp1_resumed")))
    resumed = losses(result)
    assert "loaded checkpoint" in result.stdout and "at iteration 3" in result.stdout
    assert len(resumed) == 2
    assert_resumed_losses(resumed[:1], source_losses[3:4])


def test_tp2_to_tp4_and_vocab_repadding(corpus, source_tp2):
    root, _, reference = source_tp2
    converted(root / "src", root / "tp4", 4, 1, "--iteration", "3", "--pad-vocab-size-to", "512")
    got = logits(corpus, root / "tp4" / "iter_0000003", 4, 1, root / "tp4_logits.pt")
    assert_same_logits(got, reference, "TP=2 -> TP=4")
    # Without --pad-vocab-size-to: 257 ids pad to 384 at TP=1 (rows cut), 512 at TP=2 (padded).
    converted(root / "src", root / "tp1_384", 1, 1, "--iteration", "3")
    state = torch.load(root / "tp1_384" / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt",
                       weights_only=True)
    embedding = state["model"]["language_model"]["embedding"]["word_embeddings"]["weight"]
    assert embedding.shape[0] == 384 == state["args"]["padded_vocab_size"]
    assert state["optimizer"]["state"]["chunk0.word_embeddings.weight"]["exp_avg"].shape[0] == 384
    got = logits(corpus, root / "tp1_384" / "iter_0000003", 1, 1, root / "tp1_384_logits.pt")
    assert_same_logits(got, reference, "TP=2 -> TP=1, vocab 384")
    converted(root / "tp1_384", root / "tp2_512", 2, 1, "--make-vocab-size-divisible-by", "256")
    got = logits(corpus, root / "tp2_512" / "iter_0000003", 2, 1, root / "tp2_512_logits.pt")
    assert_same_logits(got, reference, "TP=1 vocab 384 -> TP=2 vocab 512")
    state = torch.load(root / "tp2_512" / "iter_0000003" / "mp_rank_01" / "model_optim_rng.pt",
                       weights_only=True)
    rows = state["model"]["language_model"]["embedding"]["word_embeddings"]["weight"]
    assert rows.shape[0] == 256 and not rows[384 - 256:].any()  # zero rows past the old padding


def test_pp2_to_pp1_and_tp2_to_pp2(corpus, source_tp2, tmp_path):
    root, _, reference = source_tp2
    src = tmp_path / "pp2"
    result = launch(2, args_for(corpus, 1, 2, "--train-iters", "4", "--save-interval", "3",
                                "--save", str(src)))
    source_losses = losses(result)
    assert len(source_losses) == 4
    pp_reference = logits(corpus, src / "iter_0000003", 1, 2, tmp_path / "pp2_logits.pt")
    converted(src, tmp_path / "pp1", 1, 1, "--iteration", "3", "--pad-vocab-size-to", "512")
    got = logits(corpus, tmp_path / "pp1" / "iter_0000003", 1, 1, tmp_path / "pp1_logits.pt")
    assert_same_logits(got, pp_reference, "PP=2 -> PP=1")
    resumed = launch(1, args_for(corpus, 1, 1, "--train-iters", "4", "--load",
                                 str(tmp_path / "pp1")))
    assert "at iteration 3" in resumed.stdout
    assert_resumed_losses(losses(resumed), source_losses[3:])
    # TP=2 PP=1 -> TP=1 PP=2: the last stage gets its own copy of the embedding for the head.
    converted(root / "src", tmp_path / "tp1pp2", 1, 2, "--iteration", "3",
              "--pad-vocab-size-to", "512")
    got = logits(corpus, tmp_path / "tp1pp2" / "iter_0000003", 1, 2, tmp_path / "tp1pp2.pt")
    assert_same_logits(got, reference, "TP=2 PP=1 -> TP=1 PP=2")


def test_unfit_requests_fail_with_status_2(corpus, source_tp2, tmp_path):
    root = source_tp2[0]
    result = convert(tmp_path / "empty", tmp_path / "out", 1)
    assert result.returncode == 2 and "latest_checkpointed_iteration.txt" in result.stderr
    result = convert(root / "src", tmp_path / "out", 3, 1, "--iteration", "3")
    assert result.returncode == 2
    assert "--num-attention-heads 4" in result.stderr and "target tensor-parallel size 3" \
        in result.stderr
    result = convert(root / "src", tmp_path / "out", 1, 3, "--iteration", "3")
    assert result.returncode == 2 and "PP=3" in result.stderr
    broken = tmp_path / "broken"
    os.makedirs(broken / "iter_0000003" / "mp_rank_00")
    shutil.copy(root / "src" / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt",
                broken / "iter_0000003" / "mp_rank_00")
    (broken / "latest_checkpointed_iteration.txt").write_text("3")
    result = convert(broken, tmp_path / "out", 1)
    assert result.returncode == 2
    assert os.path.join("iter_0000003", "mp_rank_01", "model_optim_rng.pt") in result.stderr
    assert not os.path.exists(tmp_path / "out" / "latest_checkpointed_iteration.txt")
