"""The chunked cross entropy (reads the logits in their own dtype, no fp32 copy of them) against
its reference (fp32 copy, softmax saved) and against float64: loss and gradient, fp32 and bf16,
several row chunks. Its TP > 1 path runs in tests/test_bloom_tp.py (the model at TP 2 and 3)."""
import pytest
import torch

from ascendspeed.core.tensor_parallel import cross_entropy
from ascendspeed.core.tensor_parallel.cross_entropy import (reference_vocab_parallel_cross_entropy,
                                                            vocab_parallel_cross_entropy)

chunked_cross_entropy = cross_entropy._ChunkedVocabParallelCrossEntropy.apply


def _loss_and_grad(function, logits, target, weights):
    logits = logits.detach().clone().requires_grad_()
    loss = function(logits, target)
    (loss * weights).sum().backward()
    return loss.detach(), logits.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_the_reference(dtype, monkeypatch):
    """The chunked Function itself (what TP > 1 runs, and bf16 at TP = 1)."""
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 3 * 997)  # 3 rows a chunk: 23 chunks
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(3, 23, 997, generator=generator)).to(dtype)
    target = torch.randint(0, 997, (3, 23), generator=generator)
    weights = torch.rand(3, 23, generator=generator)  # a non-uniform upstream gradient
    loss, grad = _loss_and_grad(chunked_cross_entropy, logits, target, weights)
    ref_loss, ref_grad = _loss_and_grad(reference_vocab_parallel_cross_entropy, logits, target,
                                        weights)
    exact_loss, exact_grad = _loss_and_grad(
        lambda x, t: torch.nn.functional.cross_entropy(x.view(-1, 997), t.view(-1),
                                                       reduction="none").view_as(t),
        logits.double(), target, weights.double())
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # Both compute in fp32 from the same (bf16-rounded) logits: the loss of a few units agrees
    # with float64 to fp32 rounding of the log-sum-exp, ~1e-6; the gradient, in (0, 1), to
    # fp32 rounding in fp32 and to bf16 rounding (2^-8 relative) when it is stored in bf16.
    assert (loss.double() - exact_loss).abs().max() < 4e-6
    assert (ref_loss.double() - exact_loss).abs().max() < 4e-6
    grad_tolerance = 1e-6 if dtype == torch.float32 else 2 ** -8
    assert (grad.double() - exact_grad).abs().max() < grad_tolerance
    assert (grad.double() - ref_grad.double()).abs().max() < grad_tolerance


def test_the_logits_are_not_modified():
    """fp32 logits are read in place by the chunked path (TP > 1): it must work on copies."""
    logits = torch.randn(5, 64)
    before = logits.clone()
    chunked_cross_entropy(logits.requires_grad_(), torch.randint(0, 64, (5,))).sum().backward()
    assert torch.equal(logits.detach(), before)


def test_fp32_at_tp1_takes_aten_and_bf16_the_chunked_path():
    """The dispatch: fp32 logits at TP = 1 measure faster through F.cross_entropy."""
    logits, target = torch.randn(4, 32, requires_grad=True), torch.randint(0, 32, (4,))
    assert vocab_parallel_cross_entropy(logits, target).grad_fn.name().startswith("View")
    loss = vocab_parallel_cross_entropy(logits.bfloat16(), target)
    assert "Chunked" in loss.grad_fn.name()
