"""Bucketed, overlapped data-parallel reduction and the ZeRO-1 distributed optimizer with real
processes (tests/dist/optimizer_worker.py): every two-process layout, fed the same global batches,
reproduces the one-process run; ZeRO-1 halves the optimizer memory at DP=2; an fp16 overflow on
one rank skips the step everywhere."""
import pytest
import torch

from launch import run_torchrun
from tolerances import (BF16_EPS, FP32_EPS, assert_all_close_to_scale, max_rel_diff_of_dicts,
                        max_rel_diff_of_values, spread_tolerance)

pytestmark = pytest.mark.multiprocess


def run_worker(nproc, out):
    run_torchrun("tests/dist/optimizer_worker.py", ["--out", out], nproc, check=True)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_worker(1, tmp_path_factory.mktemp("opt") / "one.pt")


@pytest.fixture(scope="module")
def double(tmp_path_factory):
    return run_worker(2, tmp_path_factory.mktemp("opt") / "two.pt")


@pytest.fixture(scope="module")
def tolerance(single):
    """What rounding alone does to this training, measured here: the one-process fp32 run again
    with its micro-batches summed in the reverse order, and in micro-batches of 4 instead of 2
    (mathematically the same steps). Another layout is one more summation order, so it differs
    from the reference by about as much; the tolerances are SPREAD_FACTOR (10) times that.
    Weights after 3 AdamW steps (lr 1e-2) differ by up to ~1e-4 of a tensor's scale between
    such orders (AdamW normalises tiny gradients, so their rounding becomes a step), losses and
    grad norms by ~1 ulp. A gradient not reduced, a bucket skipped, a micro-batch dropped, a
    wrong learning rate or a gradient off by a factor (seen in the grad norm; AdamW itself is
    scale-invariant) move them by 1e-2 to 1 of their scale."""
    ref = single["fp32"]
    variants = [single["fp32_reordered"], single["fp32_rechunked"]]
    weights = max(max_rel_diff_of_dicts(v["weights"], ref["weights"]) for v in variants)
    scalars = max(max(max_rel_diff_of_values(v["losses"], ref["losses"]),
                      max_rel_diff_of_values(v["norms"], ref["norms"])) for v in variants)
    return {"weights": spread_tolerance(weights, floor=8 * FP32_EPS, ceiling=1e-3,
                                        what="weights"),
            "scalars": spread_tolerance(scalars, floor=8 * FP32_EPS, ceiling=1e-5,
                                        what="losses and grad norms")}


def assert_same_run(ours, ref, tolerance, *, half=False):
    """Same steps taken, losses and grad norms within the scalar tolerance, and every weight
    within the weight tolerance of its tensor's scale (`half`: bf16 weights, where a master
    differing in its last bits may round to the neighbouring bf16 value: one bf16 ulp at the
    scale, BF16_EPS, is allowed). Weights compared are those `ours` gathered (a PP=2 run: the
    first stage's), by name."""
    assert ours["updated"] == ref["updated"]
    assert max_rel_diff_of_values(ours["losses"], ref["losses"]) <= tolerance["scalars"], \
        (ours["losses"], ref["losses"], tolerance)
    assert max_rel_diff_of_values(ours["norms"], ref["norms"]) <= tolerance["scalars"], \
        (ours["norms"], ref["norms"], tolerance)
    rel = max(tolerance["weights"], BF16_EPS) if half else tolerance["weights"]
    assert ours["weights"].keys() <= ref["weights"].keys()
    assert_all_close_to_scale(ours["weights"], {n: ref["weights"][n] for n in ours["weights"]},
                              rel=rel, what="weight")


@pytest.mark.parametrize("layout", ["fp32", "fp32_no_overlap"])
def test_data_parallel_buckets_equal_one_process(single, double, tolerance, layout):
    """DP=2 (7 buckets of ~2000 elements) reproduces DP=1 over the same global batch; with
    overlap every bucket's all-reduce starts inside backward, without it none does."""
    ours = double[layout]
    assert_same_run(ours, single["fp32"], tolerance)
    assert ours["buckets"] > 3 and ours["dp_replicas_max_diff"] == 0.0
    assert ours["launched_during_backward"] == (0 if "no_overlap" in layout else ours["buckets"])


@pytest.mark.parametrize("zero,plain", [("fp32_zero", "fp32"), ("fp32_zero_no_overlap", "fp32"),
                                        ("bf16_zero", "bf16")])
def test_zero1_equals_plain_data_parallel(single, double, tolerance, zero, plain):
    assert_same_run(double[zero], double[plain], tolerance, half=plain == "bf16")
    assert double[zero]["dp_replicas_max_diff"] == 0.0  # the all-gather rebuilt whole weights
    if plain == "fp32":
        assert_same_run(double[zero], single["fp32"], tolerance)


@pytest.mark.parametrize("layout", ["fp32_tp2", "fp32_tp2_sp_zero", "fp32_pp2", "fp32_pp2_zero"])
def test_grad_norm_and_losses_equal_one_process_under_tp_and_pp(single, double, tolerance,
                                                                 layout):
    """Norm over TP x PP counting each parameter once (replicated ones on TP rank 0, the shared
    embedding on the first stage); sequence-parallel and shared-embedding gradients summed.
    TP: the gathered weights; PP: the first stage's weights (rank 0's)."""
    ours = double[layout]
    assert_same_run(ours, single["fp32"], tolerance)
    if "pp2" in layout:
        assert ours["embedding_copies_max_diff"] == 0.0


def test_fp16_overflow_on_one_rank_skips_the_step_everywhere_under_zero(double):
    run = double["fp16_zero_overflow"]
    assert run["updated_per_rank"] == [[False, True, True]] * 2
    assert run["scales_per_rank"] == [[2048.0] * 3] * 2  # halved once (hysteresis 1), no growth
    assert run["unchanged_after_first_step"] and run["norms"][0] is None
    assert run["dp_replicas_max_diff"] == 0.0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero1_halves_optimizer_memory_at_dp2(double, dtype):
    """fp32 master (shard) + exp_avg + exp_avg_sq bytes, from the tensors themselves."""
    plain = double[dtype]["state_bytes_per_rank"]
    sharded = double[f"{dtype}_zero"]["state_bytes_per_rank"]
    assert plain[0] == plain[1] and sum(sharded) == plain[0]  # the shards partition the state
    padding = 12 * double[dtype]["buckets"]  # < 1 element (x 3 fp32 tensors) per bucket
    assert all(abs(s - plain[0] / 2) <= padding for s in sharded), (sharded, plain)
