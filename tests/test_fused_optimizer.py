"""The fused optimizer pieces against their references: torch's fused AdamW against foreach
AdamW, and the one-kernel unscale + inf check against the per-gradient one."""
import pytest
import torch

from ascendspeed.model.bloom import BloomConfig, BloomModel
from ascendspeed.optimizer import build_optimizer, get_param_groups
from ascendspeed.optimizer.mixed_precision import DynamicLossScaler


def _model(dtype):
    torch.manual_seed(0)
    return BloomModel(BloomConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4,
                                  params_dtype=dtype))


def _train(dtype, implementation, fused_unscale, steps=3, overflow_at=None):
    model = _model(dtype)
    scaler = DynamicLossScaler(initial_scale=4096, hysteresis=1) if dtype == torch.float16 else None
    optimizer = build_optimizer(
        [model], get_param_groups(model, 0.1),
        lambda groups: torch.optim.AdamW(groups, lr=1e-2, **{implementation: True}),
        params_dtype=dtype, scaler=scaler, clip_grad=1.0, fused_unscale=fused_unscale)
    generator = torch.Generator().manual_seed(1)
    results = []
    for step in range(steps):
        optimizer.zero_grad(1)
        ids = torch.randint(0, 64, (2, 9), generator=generator)
        optimizer.scale_loss(model(ids[:, :-1], labels=ids[:, 1:]).mean()).backward()
        if step == overflow_at:
            next(model.parameters()).main_grad[0, 0] = float("inf")
        results.append(optimizer.step())
    return model, results, optimizer.loss_scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_unscale_and_inf_check_equal_the_reference(dtype):
    """The same products (grad * 1/scale) and the same overflow decision: bitwise equal."""
    fused, fused_results, fused_scale = _train(dtype, "foreach", True, overflow_at=1)
    plain, plain_results, plain_scale = _train(dtype, "foreach", False, overflow_at=1)
    assert [updated for updated, _ in fused_results] == [True, False, True]
    assert fused_results == plain_results and fused_scale == plain_scale
    for a, b in zip(fused.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_fused_adamw_follows_foreach_adamw():
    """The same AdamW arithmetic in another order. Adam divides by sqrt(v), so where a gradient is
    rounding noise (the key bias: softmax ignores it) a last-bit difference in the weights after
    step 1 becomes a visible difference in the next steps' updates; every entry still moves by at
    most lr per step, so the weights must agree to 1e-3 of the 3 steps' reach (3e-5): measured
    ~1e-6. A wrong formula (bias correction, decay, eps placement) moves them by a share of lr."""
    fused, fused_results, _ = _train(torch.float32, "fused", True)
    plain, plain_results, _ = _train(torch.float32, "foreach", True)
    assert [norm for _, norm in fused_results] == pytest.approx([n for _, n in plain_results],
                                                                rel=1e-6)
    reach = 3 * 1e-2
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        assert (a - b).abs().max().item() <= 1e-3 * reach, name
