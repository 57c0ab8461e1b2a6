"""Layout-independent optimizer state dicts (`state_dict(param_names)` /
`load_state_dict(state, param_names, strict=True)`): the format, a torch.save /
torch.load(weights_only=True) round trip, the errors, and - with real processes
(tests/dist/optimizer_state_worker.py) - bit-exact resume for fp32, bf16 and fp16 (dynamic
scaler) with and without ZeRO-1 at DP=2, and states moving between layouts (ZeRO <-> plain DP,
DP=1 -> DP=2 ZeRO)."""
import importlib.util
import os

import pytest
import torch

from ascendspeed.optimizer.distrib_optimizer import DistributedOptimizer
from ascendspeed.optimizer.mixed_precision import (STATE_FORMAT, Float16Optimizer,
                                                   FP32Optimizer)
from launch import REPO_ROOT, run_torchrun
from tolerances import (FP32_EPS, assert_close_to_scale, max_rel_diff_of_dicts,
                        max_rel_diff_of_values, spread_tolerance)

WORKER = os.path.join(REPO_ROOT, "tests", "dist", "optimizer_state_worker.py")
_spec = importlib.util.spec_from_file_location("optimizer_state_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)  # its helpers run in one process too (DP=1)


def trained(dtype="bf16", zero=False, steps=2, clip_grad=1.0, seed=1234):
    model, optimizer, names = worker.build(dtype, zero, seed, clip_grad)
    worker.run_steps(model, optimizer, range(steps))
    return model, optimizer, names


def roundtrip(state, tmp_path):
    torch.save(state, tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=True)


# -- format, one process

@pytest.mark.parametrize("dtype,zero,kind", [("fp32", False, FP32Optimizer),
                                             ("bf16", False, Float16Optimizer),
                                             ("fp16", False, Float16Optimizer),
                                             ("bf16", True, DistributedOptimizer),
                                             ("fp32", True, DistributedOptimizer)])
def test_state_dict_format_is_plain_data_by_name(dtype, zero, kind, tmp_path):
    model, optimizer, names = trained(dtype, zero)
    assert isinstance(optimizer, kind)
    state = roundtrip(optimizer.state_dict(names), tmp_path)
    assert set(state) == {"format", "param_groups", "state", "loss_scaler"}
    assert state["format"] == STATE_FORMAT
    decay, no_decay = state["param_groups"]
    assert decay["name"] == "decay" and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == [0.9, 0.95] and decay["lr"] == 1e-2 and decay["amsgrad"] is False
    assert {"eps", "wd_mult", "lr_mult"} <= set(decay)
    assert sorted(decay["params"] + no_decay["params"]) == sorted(names.values())
    assert "chunk0.word_embeddings.weight" in decay["params"]
    half = dtype != "fp32"
    for param, name in names.items():
        entry = state["state"][name]
        assert entry["step"] == 2.0 and isinstance(entry["step"], float)
        expected = {"step", "exp_avg", "exp_avg_sq"} | ({"master"} if half else set())
        assert set(entry) == expected, name
        for key in expected - {"step"}:
            assert entry[key].dtype == torch.float32 and entry[key].shape == param.shape
            assert entry[key].device.type == "cpu"
            assert entry[key].untyped_storage().nbytes() == 4 * param.numel()  # not a bucket view
        if half:  # the master rounds to the model weight
            assert torch.equal(entry["master"].to(param.dtype), param.detach())
    if dtype == "fp16":
        assert set(state["loss_scaler"]) == {"scale", "growth_tracker", "hysteresis_tracker"}
    else:
        assert state["loss_scaler"] == {"scale": 1.0}


def test_zero_and_plain_states_are_the_same_at_dp1():
    """Same training, ZeRO-1 (DP=1, several buckets) or not: the same saved tensors."""
    _, plain, names = trained("bf16", False, clip_grad=0.0)
    _, zero, zero_names = trained("bf16", True, clip_grad=0.0)
    assert len(zero.grads.buckets) > 3
    a, b = plain.state_dict(names), zero.state_dict(zero_names)
    assert a["param_groups"] == b["param_groups"]
    assert worker.states_equal(a["state"], b["state"])


@pytest.mark.parametrize("zero", [False, True])
def test_state_before_any_step_is_empty_and_loads(zero):
    model, optimizer, names = worker.build("bf16", zero, 1, 0.0)
    state = optimizer.state_dict(names)
    assert state["state"] == {}
    fresh_model, fresh, fresh_names = worker.build("bf16", zero, 2, 0.0)
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(state, fresh_names)  # masters come from the (loaded) model weights
    a = worker.run_steps(model, optimizer, range(2))
    b = worker.run_steps(fresh_model, fresh, range(2))
    assert a == b
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh_model.parameters()))


def test_group_options_and_scaler_are_restored(tmp_path):
    _, optimizer, names = trained("fp16", False)
    for group in optimizer.param_groups:
        group["lr"] = 0.123
    optimizer.param_groups[0]["betas"] = (0.8, 0.9)
    state = roundtrip(optimizer.state_dict(names), tmp_path)
    _, fresh, fresh_names = worker.build("fp16", True, 7, 1.0)
    fresh.load_state_dict(state, fresh_names)
    assert [g["lr"] for g in fresh.param_groups] == [0.123, 0.123]
    assert fresh.param_groups[0]["betas"] == (0.8, 0.9)  # a tuple again, as torch keeps it
    assert fresh.scaler.state_dict() == optimizer.scaler.state_dict()
    for group in fresh.optimizer.param_groups:
        step = fresh.optimizer.state[group["params"][0]]["step"]
        assert step.dtype == torch.float32 and step.device.type == "cpu" and step.item() == 2.0


def test_masters_come_from_the_state_not_from_the_half_precision_weights():
    """Loading the bf16 weights alone would lose the masters' low bits: the resumed run would
    drift. With strict=False a state without masters falls back to the weights (and differs)."""
    model, optimizer, names = trained("bf16", False)
    state = optimizer.state_dict(names)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    reference = worker.run_steps(model, optimizer, range(2, 4))
    runs = {}
    for with_masters in (True, False):
        saved = {**state, "state": {n: {k: v for k, v in e.items() if with_masters or k != "master"}
                                    for n, e in state["state"].items()}}
        fresh_model, fresh, fresh_names = worker.build("bf16", False, 3, 1.0)
        fresh_model.load_state_dict(weights)
        fresh.load_state_dict(saved, fresh_names, strict=with_masters)
        runs[with_masters] = (worker.run_steps(fresh_model, fresh, range(2, 4)),
                              [p.detach().clone() for p in fresh_model.parameters()])
    assert runs[True][0] == reference
    assert all(torch.equal(p, q) for p, q in zip(runs[True][1], model.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(runs[False][1], model.parameters()))


# -- errors

@pytest.fixture(scope="module")
def saved():
    _, optimizer, names = trained("bf16", False)
    return optimizer.state_dict(names)


def fresh_optimizer(zero=False):
    _, optimizer, names = worker.build("bf16", zero, 5, 1.0)
    return optimizer, names


def without(state, name):
    return {**state, "state": {n: e for n, e in state["state"].items() if n != name},
            "param_groups": [{**g, "params": [n for n in g["params"] if n != name]}
                             for g in state["param_groups"]]}


@pytest.mark.parametrize("zero", [False, True])
def test_errors_name_the_parameter(saved, zero):
    optimizer, names = fresh_optimizer(zero)
    name = "chunk0.layers.1.mlp.dense_h_to_4h.weight"
    with pytest.raises(ValueError, match="format 'megatron'.*ascendspeed-optimizer-v1"):
        optimizer.load_state_dict({**saved, "format": "megatron"}, names)
    with pytest.raises(ValueError, match=f"{name}.*missing"):
        optimizer.load_state_dict(without(saved, name), names)
    only_state = {**saved, "state": {n: e for n, e in saved["state"].items() if n != name}}
    with pytest.raises(ValueError, match=f"{name}.*missing from the saved optimizer state"):
        optimizer.load_state_dict(only_state, names)
    wrong = {**saved["state"][name], "exp_avg": torch.zeros(64, 32)}
    with pytest.raises(ValueError, match=rf"'exp_avg' of parameter '{name}' has shape "
                                         rf"\(64, 32\).*\(128, 32\)"):
        optimizer.load_state_dict({**saved, "state": {**saved["state"], name: wrong}}, names)
    renamed = {p: n.replace("chunk0", "chunk1") for p, n in names.items()}
    with pytest.raises(ValueError, match="chunk1.*missing"):
        optimizer.load_state_dict(saved, renamed)
    del renamed[next(iter(renamed))]
    with pytest.raises(ValueError, match="no name for a parameter of shape"):
        optimizer.load_state_dict(saved, renamed)
    with pytest.raises(ValueError, match="no name for a parameter of shape"):
        optimizer.state_dict(renamed)
    assert len(optimizer.optimizer.state) == 0  # nothing was loaded by the failed calls


def test_unknown_names_fail_strict_and_are_ignored_otherwise(saved):
    optimizer, names = fresh_optimizer()
    name = "chunk1.layers.0.mlp.dense_4h_to_h.weight"
    extra = {**saved, "state": {**saved["state"], name: saved["state"]["chunk0.layers.0.mlp.dense_4h_to_h.weight"]},
             "param_groups": [{**g, "params": g["params"] + [name] * (i == 0)}
                              for i, g in enumerate(saved["param_groups"])]}
    with pytest.raises(ValueError, match=f"saved optimizer state has parameter '{name}'"):
        optimizer.load_state_dict(extra, names)
    optimizer.load_state_dict(extra, names, strict=False)
    assert len(optimizer.optimizer.state) == len(names)


def test_non_strict_load_starts_missing_parameters_fresh(saved):
    optimizer, names = fresh_optimizer(zero=True)
    name = "chunk0.layers.0.self_attention.dense.weight"
    optimizer.load_state_dict(without(saved, name), names, strict=False)
    param = next(p for p, n in names.items() if n == name)
    assert optimizer.optimizer.state.get(optimizer.shards[param].master) in (None, {})
    assert sum(1 for s in optimizer.optimizer.state.values() if s) == len(optimizer.shards) - 1


# -- real processes

def run_worker(tmp_path, dp1_state):
    out = tmp_path / "results.pt"
    run_torchrun(WORKER, ["--out", out, "--dir", tmp_path, "--dp1-state", dp1_state], 2,
                 check=True)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def dp1(tmp_path_factory):
    """One process (DP=1, no ZeRO): 3 steps, the state saved, 3 more steps as the reference;
    and the tolerances of a run that resumes the state in another layout: the 3 steps resumed
    again in this process in micro-batches of 4 instead of 2 (the same steps summed in another
    order) measure what rounding alone does, and another layout may differ by SPREAD_FACTOR x
    that (AdamW lifts the rounding of tiny gradients to real steps: ~1e-5 of a weight tensor's
    scale here; a lost gradient, bucket or state moves weights by ~1e-1 of it)."""
    model, optimizer, names = trained("fp32", False, steps=3)
    path = tmp_path_factory.mktemp("dp1") / "state.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(names)}, path)
    reference = worker.run_steps(model, optimizer, range(3, 6))
    saved = torch.load(path, weights_only=True)
    again, again_optimizer, again_names = worker.build("fp32", False, 999, 1.0)
    again.load_state_dict(saved["model"])
    again_optimizer.load_state_dict(saved["optimizer"], again_names)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(worker, "MICRO_BATCH", 2 * worker.MICRO_BATCH)
        resummed = worker.run_steps(again, again_optimizer, range(3, 6))
    tolerance = {
        "losses": spread_tolerance(max_rel_diff_of_values(resummed["losses"], reference["losses"]),
                                   floor=8 * FP32_EPS, ceiling=1e-5, what="losses"),
        "weights": spread_tolerance(max_rel_diff_of_dicts(worker.weights(again),
                                                          worker.weights(model)),
                                    floor=8 * FP32_EPS, ceiling=1e-3, what="weights")}
    return path, reference, worker.weights(model), tolerance


@pytest.fixture(scope="module")
def dp2(tmp_path_factory, dp1):
    return run_worker(tmp_path_factory.mktemp("dp2"), dp1[0])


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["fp32", "fp32_zero", "bf16", "bf16_zero", "fp16", "fp16_zero"])
def test_resume_is_bit_exact_at_dp2(dp2, name):
    case = dp2[f"resume_{name}"]
    assert case["resumed"] == case["reference"]  # losses, loss scales, applied steps: bitwise
    assert all(case["resumed"]["updated"])
    assert case["weights_equal"] and case["final_state_equal"]
    if name.startswith("fp16"):  # the dynamic scaler's trackers came back: it grew on schedule
        assert case["resumed"]["scales"] == [4096.0, 4096.0, 8192.0]
    state = torch.load(case["path"], weights_only=True)  # the file DP rank 0 wrote
    model, _, names = worker.build("fp32", False, 0, 0.0)
    assert state["format"] == STATE_FORMAT and set(state["state"]) == set(names.values())


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["fp32_zero_to_fp32", "fp32_to_fp32_zero", "bf16_zero_to_bf16",
                                  "bf16_to_bf16_zero", "fp16_zero_to_fp16", "fp16_to_fp16_zero"])
def test_state_moves_between_zero_and_plain_data_parallel(dp2, name):
    """Without clipping the two layouts step identically, so the move is bitwise exact."""
    case = dp2[f"cross_{name}"]
    assert case["resumed"] == case["reference"]
    assert case["weights_equal"] and case["final_state_equal"]


@pytest.mark.multiprocess
def test_state_moves_between_layouts_with_clipping_within_rounding(dp2):
    """With clipping the grad norm sums in a layout-dependent order (last bits), nothing else:
    the clip factor differs in its last bits (the norm's rounding, a few ulps), which enters
    exp_avg once and exp_avg_sq twice per step and which AdamW's m / sqrt(v) cancels in the
    weights. Losses, weights and every optimizer-state tensor (exp_avg_sq is ~g^2: compared at
    its own scale, never with an absolute number) within 32 ulps of their scale (measured: the
    weights 1 ulp, the state 3); a state entry lost or mismatched is off by ~1e-1 or more."""
    case = dp2["cross_fp32_zero_to_fp32_clipped"]
    assert max_rel_diff_of_values(case["resumed"]["losses"], case["reference"]["losses"]) \
        <= 32 * FP32_EPS
    assert case["weights_max_rel_diff"] <= 32 * FP32_EPS
    assert case["final_state_max_rel_diff"] <= 32 * FP32_EPS


@pytest.mark.multiprocess
def test_dp1_state_resumes_under_zero_at_dp2(dp1, dp2):
    """A DP=1 state resumed at DP=2 under ZeRO-1 follows the DP=1 run: the gradients now sum
    over two ranks (rounding, which AdamW's normalisation lifts on tiny gradients: the dp1
    fixture's measured tolerances)."""
    _, reference, weights, tolerance = dp1
    ours = dp2["dp1_to_dp2_zero"]
    assert max_rel_diff_of_values(ours["resumed"]["losses"], reference["losses"]) \
        <= tolerance["losses"]
    for name, value in ours["weights"].items():
        assert_close_to_scale(value, weights[name], rel=tolerance["weights"], what=name)


@pytest.mark.parametrize("dtype,zero", [("fp32", False), ("bf16", False), ("bf16", True),
                                        ("fp32", True)])
def test_reload_model_params_takes_the_masters_from_loaded_weights(dtype, zero):
    """Weights loaded without an optimizer state (finetune, release): the masters follow."""
    source, _, _ = worker.build(dtype, False, 11, 0.0)
    model, optimizer, _ = worker.build(dtype, zero, 12, 0.0)
    model.load_state_dict(source.state_dict())
    optimizer.reload_model_params()
    for param, tensor, span, _ in optimizer._local_entries():
        flat = param.detach().reshape(-1)
        expected = flat if span is None else flat[span[0]:span[1]]
        assert torch.equal(tensor.detach().reshape(-1), expected.float())
