"""Mixed precision in one process: fp32 gradient buffers and master weights, loss scaling,
skipped steps, and the optimizer against plain torch AdamW + clipping."""

import pytest
import torch

from ascendspeed.model.bloom import BloomConfig, BloomModel
from ascendspeed.optimizer import build_optimizer, get_param_groups
from ascendspeed.optimizer.distrib_optimizer import DistributedOptimizer
from ascendspeed.optimizer.mixed_precision import (ConstantLossScaler, DynamicLossScaler,
                                                   Float16Optimizer, FP32Optimizer)


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
    ZeRO-1 at DP=1) step like autograd + clip_grad_norm_ + AdamW."""
    model, reference = tiny_model(torch.float32), tiny_model(torch.float32)
    optimizer = make_optimizer(model, torch.float32, clip_grad=0.5, bucket_size=300,
                               use_distributed_optimizer=distributed)
    assert isinstance(optimizer, DistributedOptimizer if distributed else FP32Optimizer)
    torch_adamw = adamw(get_param_groups(reference, 0.1))
    for _ in range(3):
        batches = [torch.randint(0, 64, (2, 9)) for _ in range(2)]
        optimizer.zero_grad(2)
        torch_adamw.zero_grad()
        backward(model, optimizer, batches)
        for ids in batches:
            (reference(ids[:, :-1], labels=ids[:, 1:]).mean() / 2).backward()
        updated, grad_norm = optimizer.step()
        expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5).item()
        torch_adamw.step()
        assert updated and grad_norm == pytest.approx(expected, rel=1e-6)
    for ours, ref in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(ours, ref, atol=1e-6), (ours - ref).abs().max()


def test_lr_set_on_param_groups_reaches_the_inner_optimizer():
    model = tiny_model(torch.bfloat16)
    optimizer = make_optimizer(model, torch.bfloat16, use_distributed_optimizer=True)
    for group in optimizer.param_groups:
        group["lr"] = 0.25
    assert all(g["lr"] == 0.25 for g in optimizer.optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_master_weights_and_fp32_accumulation_match_an_fp32_step():
    """Two micro-batches on a bf16 model: gradients summed in fp32 buffers; after the step the
    bf16 weights are the rounded fp32 masters, which follow the fp32 model's update closely."""
    fp32_model, bf16_model = tiny_model(torch.float32), tiny_model(torch.bfloat16)
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
    for param, ref in zip(bf16_model.parameters(), fp32_model.parameters()):
        assert torch.allclose(param.float(), ref, atol=2e-2), (param.float() - ref).abs().max()
