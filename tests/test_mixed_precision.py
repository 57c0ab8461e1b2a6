"""Mixed precision: fp32 master weights and gradient accumulation, loss scaling, skipped steps."""
import math

import pytest
import torch

from ascendspeed.model.bloom import BloomConfig, BloomModel
from ascendspeed.optimizer.mixed_precision import (ConstantLossScaler, DynamicLossScaler,
                                                   Float16Optimizer, FP32Optimizer, build_optimizer)


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


def tiny_model(dtype):
    return BloomModel(BloomConfig(vocab_size=64, hidden_size=16, num_layers=1, num_attention_heads=2,
                                  params_dtype=dtype))


def adamw(groups):
    return torch.optim.AdamW(groups, lr=1e-2)


def no_reduce(grads):
    pass


def test_overflow_skips_the_step_and_halves_the_scale():
    model = tiny_model(torch.float16)
    optimizer = Float16Optimizer([{"params": list(model.parameters())}], adamw,
                                 DynamicLossScaler(initial_scale=4096, hysteresis=1))
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 64, (2, 9))
    loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
    optimizer.scale_loss(loss).backward()
    optimizer.accumulate_grads()
    optimizer.master_params[0].grad[0, 0] = float("inf")  # forced overflow
    updated, grad_norm = optimizer.step(no_reduce, lambda params: 0.0)
    assert not updated and grad_norm is None
    assert optimizer.loss_scale == 2048
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_master_weights_and_fp32_accumulation_match_an_fp32_step():
    """Two micro-batches on a bf16 model: gradients summed in fp32 masters; after the step the
    bf16 weights are the rounded fp32 masters, which follow the fp32 model's update closely."""
    torch.manual_seed(0)
    fp32_model, bf16_model = tiny_model(torch.float32), tiny_model(torch.bfloat16)
    reference = FP32Optimizer([{"params": list(fp32_model.parameters())}], adamw)
    optimizer = build_optimizer([{"params": list(bf16_model.parameters())}], adamw, torch.bfloat16)
    assert isinstance(optimizer, Float16Optimizer) and isinstance(optimizer.scaler, ConstantLossScaler)
    batches = [torch.randint(0, 64, (2, 9)) for _ in range(2)]
    for model, opt in ((fp32_model, reference), (bf16_model, optimizer)):
        for ids in batches:
            loss = model(ids[:, :-1], labels=ids[:, 1:]).mean() / 2
            opt.scale_loss(loss).backward()
            opt.accumulate_grads()
        assert opt.step(no_reduce, lambda params: 0.0)[0]
    assert all(m.dtype == torch.float32 for m in optimizer.master_params)
    for param, master in zip(bf16_model.parameters(), optimizer.master_params):
        assert param.dtype == torch.bfloat16 and torch.equal(param, master.to(torch.bfloat16))
    for master, ref in zip(optimizer.master_params, fp32_model.parameters()):
        assert torch.allclose(master, ref, atol=2e-2), (master - ref).abs().max()
