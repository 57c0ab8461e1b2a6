"""Numeric tolerances of the tests, in one place, each derived from what is compared.

Two equivalent float computations (another layout, another kernel, another CPU's BLAS) differ by
rounding, and rounding errors scale with the magnitude of the values involved, not per element:
an element near zero inherits the absolute error of the large terms summed into it. So a tensor
is compared at its scale (its largest magnitude), never with a bare absolute number:

    assert_close_to_scale(actual, expected, rel=..., what=...)
        max |actual - expected| <= rel * max |expected|

`rel` is then either a count of ulps at that scale (FP32_EPS, ...) for a single computation, or,
after training steps (where AdamW divides by the root of tiny second moments and so lifts
rounding to the size of real steps on some elements), a multiple of the spread measured on the
machine running the test between two equivalent fp32 computations with different summation
orders (`spread_tolerance`). Bugs (a gradient not summed, a bucket not reduced, a micro-batch
dropped, a wrong learning rate) move results at the scale of the values themselves, orders of
magnitude above either.

Exact contracts (resume, round trips, orderings, formats) are compared with torch.equal, not here.
"""
from __future__ import annotations

import math

import torch

FP64_EPS = torch.finfo(torch.float64).eps  # 2.2e-16
FP32_EPS = torch.finfo(torch.float32).eps  # 1.2e-7
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 7.8e-3 (8 bits of mantissa)

# One fp32 forward of a small model (a few layers, reductions of at most a few hundred terms) by
# two implementations (ours and Hugging Face's, TP-split or not, with or without the KV cache):
# rounding is a few ulps of the output's scale (measured 1-2 ulps here); 32 ulps leaves room for
# other BLAS kernels. A wrong mask, ALiBi slope, bias or weight moves logits by 1e-3 to 1 of their
# scale.
FORWARD_REL = 32 * FP32_EPS  # 3.8e-6

# A result of another summation order is another sample of the same rounding: its distance to
# the reference is of the size of the measured spread, give or take a few times (reorderings of
# the same run differed by 2-3x here). 10x the measured spread leaves room for that.
SPREAD_FACTOR = 10.0


def scale_of(tensor: torch.Tensor) -> float:
    return tensor.detach().double().abs().max().item() if tensor.numel() else 0.0


def max_rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 for two equal tensors, inf for a zero
    expected tensor and a non-zero difference)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual.detach().double() - expected.detach().double()).abs().max().item() \
        if actual.numel() else 0.0
    if diff == 0.0:
        return 0.0
    scale = scale_of(expected)
    return diff / scale if scale > 0 else math.inf


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, *, rel: float,
                          what: str = "") -> None:
    """max |actual - expected| <= rel * max |expected|, with the numbers in the message."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    got = max_rel_diff(actual, expected)
    assert got <= rel, (f"{what}: max |difference| is {got:.3g} of the scale "
                        f"{scale_of(expected):.3g} (allowed {rel:.3g})")


def assert_all_close_to_scale(actual: dict, expected: dict, *, rel: float, what: str = "") -> None:
    """assert_close_to_scale for every tensor of two dicts with the same keys."""
    assert actual.keys() == expected.keys(), (what, sorted(set(actual) ^ set(expected)))
    for name in expected:
        assert_close_to_scale(actual[name], expected[name], rel=rel, what=f"{what} {name}")


def max_rel_diff_of_dicts(actual: dict, expected: dict) -> float:
    """The largest max_rel_diff over the tensors of two dicts (the keys of `actual`)."""
    return max((max_rel_diff(actual[n], expected[n]) for n in actual), default=0.0)


def max_rel_diff_of_values(actual, expected) -> float:
    """The largest |a - e| / |e| over two sequences of numbers (each number is its own scale)."""
    assert len(actual) == len(expected), (actual, expected)
    worst = 0.0
    for a, e in zip(actual, expected):
        if a != e:
            worst = max(worst, abs(a - e) / abs(e) if e else math.inf)
    return worst


def spread_tolerance(spread: float, *, floor: float, ceiling: float, what: str) -> float:
    """SPREAD_FACTOR x `spread` (the measured difference of two equivalent computations),
    at least `floor` (a few ulps: a spread measured as 0 does not demand bitwise equality) and
    refusing a spread above `ceiling` (equivalent computations that disagree that much are a bug
    of the reference, which must not widen every tolerance derived from it)."""
    assert spread <= ceiling, (f"{what}: two equivalent computations differ by {spread:.3g} "
                               f"(relative), more than rounding ({ceiling:.3g})")
    return max(SPREAD_FACTOR * spread, floor)


def assert_values_close(actual, expected, *, rel: float, what: str = "") -> None:
    """Two sequences of numbers (losses, norms), each within `rel` of its reference value."""
    got = max_rel_diff_of_values(actual, expected)
    assert got <= rel, f"{what}: {actual} vs {expected}: {got:.3g} relative (allowed {rel:.3g})"


def printed_resolution(value: float, digits: int = 6) -> float:
    """One unit of the last digit of `value` printed as %.{digits}E, relative to the value
    (the trainer prints losses as %.6E: 7 significant digits, 1e-7 to 1e-6 relative)."""
    if value == 0:
        return 0.0
    return 10.0 ** (math.floor(math.log10(abs(value))) - digits) / abs(value)


def half_precision_loss_rel(dtype: torch.dtype) -> float:
    """Relative tolerance between the losses of a half-precision run (bf16/fp16 weights and
    activations, fp32 masters, softmax and cross entropy) and the same fp32 run: each of the
    batch's token losses carries an error of about the dtype's eps and their mean averages it
    down (measured over 10 steps of 8 x 32 tokens: 1.3e-5 for bf16, 1.4e-6 for fp16). eps / 32
    (2.4e-4 bf16, 3.1e-5 fp16) is ~20x that, and below what a few training steps change in the
    loss (3e-4 to 1.6e-3 from the 4th iteration on at lr 1e-3 here: a half-precision run that
    does not learn fails)."""
    return torch.finfo(dtype).eps / 32


def _flat(values) -> list[float]:
    if isinstance(values, torch.Tensor):
        return values.double().reshape(-1).tolist()
    if isinstance(values, (list, tuple)):
        return [x for value in values for x in _flat(value)]
    return [float(values)]


def assert_logprobs_close(actual, expected, *, what: str = "") -> None:
    """Log-probabilities, or sums of them over a text (nested lists or tensors), by two fp32
    implementations (ours and Hugging Face's, TP/PP-split or not, batched differently): each
    value within FORWARD_REL of max(|value|, 1 nat). A log-probability is a difference of logits
    and carries their rounding (FORWARD_REL of the logits' scale, O(1-10) for these models); a
    sum over n tokens carries n times that and is itself ~n nats, so it is compared at its own
    magnitude (measured: 1e-7 of it). An off-by-one window, a token scored twice or dropped, or
    another context moves a value by a whole token's log-probability (~1 to 10 nats)."""
    actual, expected = _flat(actual), _flat(expected)
    assert len(actual) == len(expected), (what, len(actual), len(expected))
    for a, e in zip(actual, expected):
        assert abs(a - e) <= FORWARD_REL * max(abs(e), 1.0), (what, a, e)
