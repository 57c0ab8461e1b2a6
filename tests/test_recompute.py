"""Activation recompute (full: whole blocks; selective: the attention core) replays every dropout
mask: the same loss and gradients as without."""
import pytest

import torch

from ascendspeed.core.tensor_parallel import get_rng_tracker
from ascendspeed.core.tensor_parallel.random import RNGStatesTracker
from ascendspeed.model.bloom import BloomConfig, BloomModel


def loss_and_grads(recompute: str | None, attention_dropout: float = 0.3):
    torch.manual_seed(3)
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 99)
    config = BloomConfig(vocab_size=128, hidden_size=32, num_layers=3, num_attention_heads=4,
                         hidden_dropout=0.3, attention_dropout=attention_dropout,
                         recompute_granularity=recompute)
    model = BloomModel(config).train()
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(5))
    loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
    loss.backward()
    state = (torch.get_rng_state(), tracker.get_states()["model-parallel-rng"])
    tracker.reset()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, state


@pytest.mark.parametrize("attention_dropout", [0.3, 0.0])  # SDPA with the bias; the fused kernel
@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_matches_no_recompute_with_dropout(granularity, attention_dropout):
    plain_loss, plain_grads, plain_state = loss_and_grads(None, attention_dropout)
    loss, grads, state = loss_and_grads(granularity, attention_dropout)
    assert loss == plain_loss
    # The replayed forward is the same computation on the same inputs (bitwise on one CPU), so
    # the gradients equal; only the order in which autograd accumulates a parameter's gradient
    # may differ, a few float32 ulps of the gradient's scale. A mask not replayed changes them
    # at the scale of the gradient itself.
    for name, grad in plain_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item()), name
    # and the streams end where a run without recompute leaves them
    assert torch.equal(state[0], plain_state[0]) and torch.equal(state[1], plain_state[1])


def test_tracker_fork_restores_the_default_stream():
    tracker = RNGStatesTracker()
    tracker.add("x", 1)
    before = torch.get_rng_state()
    with tracker.fork("x"):
        torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)


def test_selective_recompute_reruns_only_the_attention_core(monkeypatch):
    """Each layer's core runs twice (forward, and again in backward); the blocks run once."""
    from ascendspeed.model import bloom

    calls = {"core": 0, "mlp": 0}
    core, mlp = bloom.BloomAttention._core, bloom.BloomMLP.forward

    def counting_core(self, *args):
        calls["core"] += 1
        return core(self, *args)

    def counting_mlp(self, *args, **kwargs):
        calls["mlp"] += 1
        return mlp(self, *args, **kwargs)

    monkeypatch.setattr(bloom.BloomAttention, "_core", counting_core)
    monkeypatch.setattr(bloom.BloomMLP, "forward", counting_mlp)
    loss_and_grads("selective")
    assert calls == {"core": 6, "mlp": 3}  # 3 layers
