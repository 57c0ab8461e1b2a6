"""Megatron's weight-decay rule: Linear/Embedding weights decay; biases and norms do not."""
import torch

from ascendspeed.optimizer.param_groups import get_param_groups


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.linear = torch.nn.Linear(4, 8)
        self.out = torch.nn.Linear(8, 4, bias=False)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embedding.weight  # tied


def ids(params):
    return {id(p) for p in params}


def test_two_groups_by_megatron_rule():
    model = Tiny()
    decay, no_decay = get_param_groups(model, weight_decay=0.1)
    assert ids(decay["params"]) == ids([model.embedding.weight, model.linear.weight,
                                        model.out.weight])
    assert ids(no_decay["params"]) == ids([model.norm.weight, model.norm.bias, model.linear.bias])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert (decay["wd_mult"], no_decay["wd_mult"]) == (1.0, 0.0)
    assert len(decay["params"]) == 3  # the tied head weight is the embedding weight, once


def test_adamw_accepts_groups_and_skips_decay_on_no_decay_group():
    model = Tiny()
    optimizer = torch.optim.AdamW(get_param_groups(model), lr=0.1, weight_decay=0.5)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    before = model.norm.weight.detach().clone()
    optimizer.zero_grad()
    model.norm.weight.grad = torch.zeros_like(model.norm.weight)
    model.linear.weight.grad = torch.zeros_like(model.linear.weight)
    w = model.linear.weight.detach().clone()
    optimizer.step()
    assert torch.equal(model.norm.weight, before)  # no decay, zero gradient: unchanged
    # decoupled decay only: one fp32 multiplication by 1 - lr * wd, the same one (measured
    # bitwise); 2 ulps elementwise. An Adam step or a coupled decay would move it by ~lr.
    from tolerances import FP32_EPS

    assert torch.allclose(model.linear.weight, w * (1 - 0.1 * 0.5), rtol=2 * FP32_EPS, atol=0)


def test_model_chunks_and_empty_groups():
    chunks = [torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False)]
    groups = get_param_groups(chunks)
    assert len(groups) == 1 and groups[0]["name"] == "decay" and len(groups[0]["params"]) == 2
    assert "weight_decay" not in groups[0]  # the optimizer's default applies
