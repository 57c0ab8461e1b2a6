"""Mixed precision in one process: fp32 gradient buffers and master weights, loss scaling,
skipped steps, and the optimizer against plain torch AdamW + clipping."""

import pytest
import torch

from ascendspeed.model.bloom import BloomConfig, BloomModel
from ascendspeed.optimizer import build_optimizer, get_param_groups
from ascendspeed.optimizer.distrib_optimizer import DistributedOptimizer
from ascendspeed.optimizer.mixed_precision import (ConstantLossScaler, DynamicLossScaler,
                                                   Float16Optimizer, FP32Optimizer)
from tolerances import FP32_EPS, assert_close_to_scale, max_rel_diff, spread_tolerance


def test_dynamic_scaler_hysteresis_backoff_and_growth():
    scaler = DynamicLossScaler(initial_scale=1024, min_scale=256, window=3, hysteresis=2)
    scaler.update(True)
    assert scaler.scale == 1024  # first overflow absorbed by hysteresis
    scaler.update(True)
    assert scaler.scale == 512
    scaler.update(True)
    assert scaler.scale == 256
    scaler.update(True)
    assert scaler.scale == 256  # never below min_scale
    for _ in range(3):
        scaler.update(False)
    assert scaler.scale == 512  # doubled after a clean window
    state = scaler.state_dict()
    again = DynamicLossScaler()
    again.load_state_dict(state)
    assert again.state_dict() == state


def tiny_model(dtype, seed=0):
    torch.manual_seed(seed)
    return BloomModel(BloomConfig(vocab_size=64, hidden_size=16, num_layers=1, num_attention_heads=2,
                                  params_dtype=dtype))


def adamw(groups):
    return torch.optim.AdamW(groups, lr=1e-2)


def make_optimizer(model, dtype, **options):
    return build_optimizer([model], get_param_groups(model, 0.1), adamw, params_dtype=dtype,
                           **options)


def backward(model, optimizer, batches):
    for ids in batches:
        loss = model(ids[:, :-1], labels=ids[:, 1:]).mean() / len(batches)
        optimizer.scale_loss(loss).backward()


def test_gradients_accumulate_in_fp32_buffers_and_free_param_grad():
    model = tiny_model(torch.bfloat16)
    optimizer = make_optimizer(model, torch.bfloat16, bucket_size=500)
    assert len(optimizer.grads.buckets) > 1
    optimizer.zero_grad(2)
    backward(model, optimizer, [torch.randint(0, 64, (2, 9)) for _ in range(2)])
    for param in model.parameters():
        assert param.grad is None and param.main_grad.dtype == torch.float32
        assert param.main_grad.abs().sum() > 0
    optimizer.zero_grad(1)  # a third backward in a step announced with two is refused
    backward(model, optimizer, [torch.randint(0, 64, (2, 9))])
    with pytest.raises(RuntimeError, match="zero_grad"):
        backward(model, optimizer, [torch.randint(0, 64, (2, 9))])


def test_overflow_skips_the_step_and_halves_the_scale():
    model = tiny_model(torch.float16)
    optimizer = make_optimizer(model, torch.float16,
                               scaler=DynamicLossScaler(initial_scale=4096, hysteresis=1))
    assert isinstance(optimizer, Float16Optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad(1)
    backward(model, optimizer, [torch.randint(0, 64, (2, 9))])
    next(model.parameters()).main_grad[0, 0] = float("inf")  # forced overflow
    updated, grad_norm = optimizer.step()
    assert not updated and grad_norm is None
    assert optimizer.loss_scale == 2048
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("distributed", [False, True])
def test_fp32_step_equals_torch_adamw_with_clipping(distributed):
    """Two micro-batches, weight-decay groups and clipping: the buffers + optimizer (plain or
    ZeRO-1 at DP=1) step like autograd + clip_grad_norm_ + AdamW.

    Tolerances: the grad norm is one fp32 sum of squares in another order, 8 ulps. The weights
    after 3 AdamW steps: AdamW divides by the root of tiny second moments and so lifts rounding
    to real steps on some elements; the reference is run a second time with each sequence as its
    own micro-batch (the same steps summed in another order), and the weights may differ by
    SPREAD_FACTOR x that spread of each tensor's scale (measured ~1e-5 here; a gradient, bucket
    or micro-batch lost moves them by ~1e-1)."""
    model, reference, reordered = (tiny_model(torch.float32) for _ in range(3))
    optimizer = make_optimizer(model, torch.float32, clip_grad=0.5, bucket_size=300,
                               use_distributed_optimizer=distributed)
    assert isinstance(optimizer, DistributedOptimizer if distributed else FP32Optimizer)
    torch_adamws = [adamw(get_param_groups(m, 0.1)) for m in (reference, reordered)]
    for _ in range(3):
        batches = [torch.randint(0, 64, (2, 9)) for _ in range(2)]
        optimizer.zero_grad(2)
        backward(model, optimizer, batches)
        updated, grad_norm = optimizer.step()
        norms = []
        for m, torch_adamw, split in zip((reference, reordered), torch_adamws, (2, 1)):
            torch_adamw.zero_grad()
            micro = [part for ids in batches for part in ids.split(split)]
            for ids in micro:
                (m(ids[:, :-1], labels=ids[:, 1:]).mean() / len(micro)).backward()
            norms.append(torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5).item())
            torch_adamw.step()
        expected = norms[0]
        assert updated and grad_norm == pytest.approx(expected, rel=8 * FP32_EPS, abs=0)
    spread = max(max_rel_diff(a, b) for a, b in zip(reordered.parameters(),
                                                    reference.parameters()))
    rel = spread_tolerance(spread, floor=8 * FP32_EPS, ceiling=1e-3, what="weights")
    for (name, ours), ref in zip(model.named_parameters(), reference.parameters()):
        assert_close_to_scale(ours, ref, rel=rel, what=name)


@pytest.mark.parametrize("dtype,distributed", [(torch.float32, False), (torch.bfloat16, False),
                                               (torch.bfloat16, True), (torch.float32, True)])
def test_the_step_applies_the_schedulers_learning_rate(dtype, distributed):
    """The LR scheduler writes each group's lr (here mid warm-up: 0.05 * 2 / 8, not the 1e-2 the
    inner AdamW was built with, with lr_mult 0.5 on the no-decay group); the step must move the
    stepped fp32 tensors (the masters) exactly as torch AdamW with those learning rates does on
    the same gradients. A learning rate lost on the way (a copied group, the factory's lr, the
    mult ignored) changes the step by 4x or 2x, far above the 4 ulps allowed."""
    from ascendspeed.optimizer import OptimizerParamScheduler

    model = tiny_model(dtype)
    groups = get_param_groups(model, 0.1)
    groups[1]["lr_mult"] = 0.5
    optimizer = build_optimizer([model], groups, adamw, params_dtype=dtype,
                                use_distributed_optimizer=distributed)
    scheduler = OptimizerParamScheduler(optimizer, max_lr=0.05, min_lr=0.0, lr_warmup_steps=8,
                                        lr_decay_steps=100, lr_decay_style="linear")
    scheduler.step(increment=2)
    lrs = [0.05 * 2 / 8, 0.05 * 2 / 8 * 0.5]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(lrs, rel=1e-12)
    optimizer.zero_grad(1)
    backward(model, optimizer, [torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))])
    stepped = {param: (tensor, span) for param, tensor, span, _ in optimizer._local_entries()}
    reference_groups, expected = [], []
    for group, lr in zip(groups, lrs):
        tensors = []
        for param in group["params"]:
            tensor, span = stepped[param]
            grad = param.main_grad.reshape(-1)
            copy = tensor.detach().clone().requires_grad_()
            copy.grad = (grad if span is None else grad[span[0]:span[1]]).reshape(copy.shape).clone()
            tensors.append(copy)
            expected.append((param, tensor, copy, tensor.detach().clone()))
        reference_groups.append({"params": tensors, "lr": lr, "weight_decay": group["weight_decay"]})
    reference = torch.optim.AdamW(reference_groups)
    assert optimizer.step()[0]
    reference.step()
    for param, tensor, copy, before in expected:
        assert (copy.detach() - before).abs().max() > 0, "the reference step moved nothing"
        assert_close_to_scale(tensor.detach(), copy.detach(), rel=4 * FP32_EPS,
                              what=f"{tuple(param.shape)} ({dtype}, ZeRO {distributed})")


def test_master_weights_and_fp32_accumulation_match_an_fp32_step():
    """Two micro-batches on a bf16 model: gradients summed in fp32 buffers; after the step the
    bf16 weights are the rounded fp32 masters, which follow the fp32 model's update closely."""
    fp32_model, bf16_model = tiny_model(torch.float32), tiny_model(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in fp32_model.named_parameters()}
    reference = make_optimizer(fp32_model, torch.float32)
    optimizer = make_optimizer(bf16_model, torch.bfloat16)
    assert isinstance(optimizer, Float16Optimizer) and isinstance(optimizer.scaler, ConstantLossScaler)
    batches = [torch.randint(0, 64, (2, 9)) for _ in range(2)]
    for model, opt in ((fp32_model, reference), (bf16_model, optimizer)):
        opt.zero_grad(2)
        backward(model, opt, batches)
        assert opt.step()[0]
    assert all(m.dtype == torch.float32 for m in optimizer.master_params)
    for param, master in zip(optimizer.model_params, optimizer.master_params):
        assert param.dtype == torch.bfloat16 and torch.equal(param, master.to(torch.bfloat16))
    # The masters' update against the fp32 model's. AdamW's first step is lr * g / (|g| + eps),
    # about lr * sign(g): the bf16 forward/backward (8-bit mantissas) flips the sign of the
    # gradients smaller than its error, 0.1-0.4% of the elements here, which puts the update
    # difference at ~0.07 of the update's norm. 0.25 allows ~1.5% of the signs flipped; no
    # update, a wrong learning rate or a lost micro-batch give 0.5 to 2.
    names = {p: n for n, p in bf16_model.named_parameters()}
    fp32_params = dict(fp32_model.named_parameters())
    difference = total = 0.0
    for param, master in zip(optimizer.model_params, optimizer.master_params):
        name = names[param]
        ours, ref = master.detach() - before[name], fp32_params[name].detach() - before[name]
        difference += (ours - ref).double().pow(2).sum().item()
        total += ref.double().pow(2).sum().item()
    assert (difference / total) ** 0.5 < 0.25
