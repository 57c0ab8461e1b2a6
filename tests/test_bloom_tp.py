"""Tensor parallelism with real processes (gloo): HF logit parity at TP=2 and TP=3, vocab-parallel
cross-entropy, and 10 training steps giving the TP=1 losses and weights."""
import json

import pytest
import torch

from launch import run_torchrun
from tolerances import (FORWARD_REL, FP32_EPS, assert_all_close_to_scale, assert_values_close,
                        max_rel_diff_of_dicts, max_rel_diff_of_values, spread_tolerance)

pytestmark = pytest.mark.multiprocess


def launch_worker(out, nproc, *args):
    """Run tests/dist/bloom_tp_worker.py under torchrun; its JSON report."""
    run_torchrun("tests/dist/bloom_tp_worker.py", [*args, "--out", out], nproc, check=True)
    return json.loads(out.read_text())


def run_worker(tmp_path, nproc, heads, *extra):
    out = tmp_path / f"tp{nproc}_h{heads}{''.join(extra).replace('-', '_')}.json"
    report = launch_worker(out, nproc, "--heads", str(heads), *extra)
    return report, torch.load(str(out) + ".pt", weights_only=True)


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    """heads -> (report, weights, tolerances) of the one-process run. The tolerances: SGD's
    training is linear in rounding (no AdamW normalisation), so the one-process run is repeated
    with each batch as two accumulated halves (the same steps summed in another order); losses
    and weights of a TP run may differ from it by SPREAD_FACTOR x that spread (measured here:
    ~1e-7 of the losses, ~5e-7 of a weight tensor's scale after 10 steps; a gradient not summed
    over TP changes weights at their scale)."""
    cache = {}

    def get(heads):
        if heads not in cache:
            root = tmp_path_factory.mktemp(f"tp1_h{heads}")
            report, weights = run_worker(root, 1, heads)
            again, again_weights = run_worker(root, 1, heads, "--micro-batches", "2")
            tolerance = {
                "losses": spread_tolerance(max_rel_diff_of_values(again["losses"], report["losses"]),
                                           floor=8 * FP32_EPS, ceiling=1e-5, what="losses"),
                "weights": spread_tolerance(max_rel_diff_of_dicts(again_weights, weights),
                                            floor=8 * FP32_EPS, ceiling=1e-4, what="weights")}
            cache[heads] = report, weights, tolerance
        return cache[heads]

    return get


@pytest.mark.parametrize("nproc,heads,extra", [(2, 4, ()), (3, 6, ()),
                                               (2, 4, ("--sequence-parallel",))],
                         ids=["tp2", "tp3", "tp2-sequence-parallel"])
def test_tp_parity_and_training_equivalence(tmp_path, tp1, nproc, heads, extra):
    """Sequence parallelism splits LayerNorm/dropout regions along the sequence: the same logits,
    and (with the LayerNorm / row-bias gradients summed over TP by the optimizer's finalize step)
    the same training."""
    result, weights = run_worker(tmp_path, nproc, heads, *extra)
    # One fp32 forward each, ours split over TP and HF's: FORWARD_REL of the logits' (and the
    # per-token losses') scale; measured ~2e-7 (2 ulps) here.
    for label, diff in result["parity"].items():
        assert diff <= FORWARD_REL * result["parity_scale"][label], (label, diff)
    assert result["ce_diff"] <= FORWARD_REL * result["ce_scale"]
    assert result["replicated_differs"] is None  # replicated params bitwise equal across TP ranks
    reference, reference_weights, tolerance = tp1(heads)
    assert_values_close(result["losses"], reference["losses"], rel=tolerance["losses"],
                        what="losses")
    assert_all_close_to_scale(weights, reference_weights, rel=tolerance["weights"],
                              what="weight")


@pytest.mark.parametrize("extra", [(), ("--sequence-parallel",)], ids=["tp", "sequence-parallel"])
def test_dropout_keeps_replicated_parameters_identical(tmp_path, extra):
    """Hidden dropout draws the same mask on every TP rank (default stream), attention dropout a
    different one per rank (the tracker's stream): replicated parameters stay bitwise equal. Under
    sequence parallelism each rank drops out its own tokens, and the summed LayerNorm gradients
    keep the replicated parameters equal."""
    report = launch_worker(tmp_path / "dropout.json", 2, "--dropout", "0.2", *extra)
    assert report["replicated_differs"] is None
    assert report["tp_streams_differ"] and report["default_streams_equal"]


@pytest.mark.parametrize("extra", [(), ("--sequence-parallel",)], ids=["tp", "sequence-parallel"])
def test_bf16_training_keeps_replicated_parameters_identical(tmp_path, extra):
    """50 bf16 AdamW steps at TP=2 through our optimizer: LayerNorms and row-parallel biases stay
    bitwise equal on both ranks (BLOOM-176B's layer-norm drift bug), also under sequence
    parallelism, where their gradients are partial sums that the optimizer adds up over TP."""
    report = launch_worker(tmp_path / "bf16.json", 2, "--bf16-steps", "50", *extra)
    assert report["replicated_differs"] is None
    assert len(report["losses"]) == 50
