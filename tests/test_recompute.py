"""Full activation recompute replays every dropout mask: same loss and gradients as without."""
import torch

from ascendspeed.core.tensor_parallel import get_rng_tracker
from ascendspeed.core.tensor_parallel.random import RNGStatesTracker
from ascendspeed.model.bloom import BloomConfig, BloomModel


def loss_and_grads(recompute):
    torch.manual_seed(3)
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 99)
    config = BloomConfig(vocab_size=128, hidden_size=32, num_layers=3, num_attention_heads=4,
                         hidden_dropout=0.3, attention_dropout=0.3,
                         recompute_granularity="full" if recompute else None)
    model = BloomModel(config).train()
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(5))
    loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
    loss.backward()
    state = (torch.get_rng_state(), tracker.get_states()["model-parallel-rng"])
    tracker.reset()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, state


def test_full_recompute_matches_no_recompute_with_dropout():
    plain_loss, plain_grads, plain_state = loss_and_grads(False)
    loss, grads, state = loss_and_grads(True)
    assert loss == plain_loss
    for name, grad in plain_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-7), name
    # and the streams end where a run without recompute leaves them
    assert torch.equal(state[0], plain_state[0]) and torch.equal(state[1], plain_state[1])


def test_tracker_fork_restores_the_default_stream():
    tracker = RNGStatesTracker()
    tracker.add("x", 1)
    before = torch.get_rng_state()
    with tracker.fork("x"):
        torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
