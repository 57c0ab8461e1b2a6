"""The accelerator tier: `python -m pytest -m accelerator`. Each test runs on the machine's GPU
(CUDA) or Ascend NPU (torch_npu) and skips cleanly where there is none, as on CPU-only CI.

The contracts: one device trains like the CPU; the device's fused attention kernel equals the
reference attention, alone and inside a bf16 training step; a save, load and resume goes through
the device's collective backend; greedy generation gives the CPU's tokens; the log line carries
TFLOP/s and MFU with --peak-flops.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from launch import launch_env, run_torchrun
from test_pretrain import corpus, losses, model_args  # noqa: F401  (corpus is a fixture)
from tolerances import half_precision_loss_rel, max_rel_diff, max_rel_diff_of_values


def _accelerator() -> str | None:
    try:
        import torch_npu  # noqa: F401
        if torch.npu.is_available():
            return "npu"
    except Exception:
        pass
    return "cuda" if torch.cuda.is_available() else None


DEVICE = _accelerator()
pytestmark = [pytest.mark.accelerator,
              pytest.mark.skipif(DEVICE is None, reason="no CUDA GPU or Ascend NPU on this machine")]

# fp32 on two devices: the same sums in other orders (GEMM tiling, reductions). On the CPU the
# equivalent-layout runs of test_pretrain differ by ~1e-6 relative over these 10 steps; 1e-4
# leaves room for the device's kernels and is still 10x below what one wrong step moves the
# loss by at lr 1e-3 (a wrong mask or attention term moves it by > 1e-2).
FP32_DEVICE_REL = 1e-4


def _env(device: str, **extra):
    return launch_env(ASCENDSPEED_DEVICE=device, **extra)


def _pretrain(corpus, device, *extra, timeout=600):  # noqa: F811
    return run_torchrun("pretrain_bloom.py", model_args(corpus, *extra), 1, env=_env(device), timeout=timeout)


@pytest.mark.multiprocess
def test_one_device_training_equals_the_cpu_run(corpus):  # noqa: F811
    on_cpu = losses(_pretrain(corpus, "cpu"))
    on_device = losses(_pretrain(corpus, DEVICE))
    assert len(on_device) == len(on_cpu) == 10
    assert max_rel_diff_of_values(on_device, on_cpu) < FP32_DEVICE_REL, (on_device, on_cpu)


@pytest.mark.multiprocess
def test_save_load_resume_through_the_device_backend(corpus, tmp_path):  # noqa: F811
    """World size 1 over NCCL/HCCL: every save and load runs its collectives. A 10-iteration run
    saves at 5 and 10; the tracker is pointed back at 5 (as an operator rolls back) and a second
    run resumes there. Its first iteration sees the weights saved at 5 and the same batch: the
    first run's loss bit for bit; later ones within fp32 tolerance (a device backward may
    accumulate in another order from run to run)."""
    save = tmp_path / "checkpoints"
    straight = losses(_pretrain(corpus, DEVICE, "--save", str(save), "--save-interval", "5"))
    (save / "latest_checkpointed_iteration.txt").write_text("5")
    resumed = losses(_pretrain(corpus, DEVICE, "--load", str(save)))
    assert len(resumed) == 5
    assert resumed[0] == straight[5], (resumed, straight)
    assert max_rel_diff_of_values(resumed, straight[5:]) < FP32_DEVICE_REL


@pytest.mark.multiprocess
def test_log_line_reports_tflops_and_mfu_with_peak_flops(corpus):  # noqa: F811
    result = _pretrain(corpus, DEVICE, "--peak-flops", "1e15", "--train-iters", "3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "| lm loss:" in line]
    assert len(lines) == 3
    for line in lines:
        tflops = float(re.search(r"TFLOP/s per device: ([0-9.]+) \|", line).group(1))
        mfu = float(re.search(r"MFU: ([0-9.]+)% \|", line).group(1))
        assert tflops > 0
        # MFU = TFLOP/s / peak (1000 TFLOP/s), both printed rounded.
        assert mfu == pytest.approx(100 * tflops / 1000, abs=0.01 + 100 * 0.0005 / 1000)


def _device_kernel(dtype, head_dim=64, heads=8, seq=256):
    from ascendspeed.model import fused

    kernel, why = fused.select_attention_kernel(DEVICE, dtype, head_dim, heads, dropout=0.0, mask="causal",
                                                query_start=0, s_q=seq, s_k=seq)
    if kernel is None:
        pytest.skip(f"no fused attention kernel on {DEVICE} here: {why}")
    return kernel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_attention_forward_and_backward_equal_the_reference_on_device(dtype):
    """The device kernel vs the reference path (SDPA with BLOOM's additive bias) computed in fp32
    from the same half-precision inputs: the kernel's error is the dtype's rounding of the output
    and gradients (a few eps relative to their scale), far below an ALiBi sign or alignment error."""
    from ascendspeed.model import fused
    from ascendspeed.model.bloom import alibi_slopes

    kernel = _device_kernel(dtype)
    g = torch.Generator().manual_seed(0)
    b, heads, s, hd = 2, 8, 256, 64
    qkv = torch.randn(b, s, heads, 3, hd, generator=g).to(DEVICE, dtype)
    grad = torch.randn(b, s, heads, hd, generator=g).to(DEVICE, dtype)
    slopes = alibi_slopes(heads).to(DEVICE)

    def run(fn, inputs, **kwargs):
        leaf = inputs.detach().requires_grad_()
        q, k, v = (t.transpose(1, 2) for t in leaf.unbind(3))
        out = fn(q, k, v, slopes, **kwargs)
        out.backward(grad.to(out.dtype))
        return out.float(), leaf.grad.float()

    out, dqkv = run(fused.alibi_attention, qkv, kernel=kernel)
    ref_out, ref_dqkv = run(fused.reference_alibi_attention, qkv.float())
    eps = torch.finfo(dtype).eps
    assert max_rel_diff(out, ref_out) < 4 * eps
    assert max_rel_diff(dqkv, ref_dqkv) < 16 * eps


def _tiny_model(dtype, fused_attention=True):
    from ascendspeed.model.bloom import BloomConfig, BloomModel

    config = BloomConfig(vocab_size=512, hidden_size=256, num_layers=2, num_attention_heads=4,
                         params_dtype=dtype, fused_attention=fused_attention)
    torch.manual_seed(0)
    return BloomModel(config)


def test_bf16_training_step_with_the_device_kernel_equals_the_reference_attention():
    """One forward + backward of a bf16 BloomModel on the device, fused attention on vs off: the
    loss within bf16 training tolerance, the gradients within bf16 rounding of their scale."""
    _device_kernel(torch.bfloat16, head_dim=64, heads=4, seq=128)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 128), generator=g).to(DEVICE)
    labels = torch.randint(0, 512, (2, 128), generator=g).to(DEVICE)
    results = []
    for fused_attention in (True, False):
        model = _tiny_model(torch.bfloat16, fused_attention).to(DEVICE)
        loss = model(ids, labels=labels).float().mean()
        loss.backward()
        results.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (fused_loss, fused_grads), (ref_loss, ref_grads) = results
    assert abs(fused_loss - ref_loss) / abs(ref_loss) < half_precision_loss_rel(torch.bfloat16)
    for name, grad in ref_grads.items():
        assert max_rel_diff(fused_grads[name], grad) < 0.05, name  # bf16: 8 bits of mantissa, summed


def test_greedy_generation_on_device_equals_the_cpu_tokens(monkeypatch):
    """fp32, a left-padded batch of three prompts, 16 greedy tokens each."""
    from ascendspeed import device
    from ascendspeed.generation import SamplingParams, StageRunner, generate_tokens

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (5, 9, 12)]
    tokens = {}
    for where in (DEVICE, "cpu"):
        if where == "cpu":  # generation puts its tensors on device.current_device()
            monkeypatch.setattr(device, "current_device", lambda: torch.device("cpu"))
        model = _tiny_model(torch.float32).to(where).eval()
        results = generate_tokens(StageRunner(model, 512), prompts, max_new_tokens=16,
                                  sampling=SamplingParams(greedy=True))
        tokens[where] = [r.token_ids for r in results]
    assert tokens[DEVICE] == tokens["cpu"]


def test_device_attention_in_generation_with_a_cache_equals_one_pass():
    """Decode steps through the device kernel (queries at the end of the cache) give the logits
    of one forward over the whole sequence, within fp16/bf16 rounding."""
    from ascendspeed.model.bloom import InferenceCache

    _device_kernel(torch.bfloat16, head_dim=64, heads=4, seq=24)
    model = _tiny_model(torch.bfloat16).to(DEVICE).eval()
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        full = model(ids).float()
        cache = InferenceCache()
        steps = [model(ids[:, :16], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(16, 24)]
    incremental = torch.cat([s.float() for s in steps], dim=1)
    assert max_rel_diff(incremental, full) < 8 * torch.finfo(torch.bfloat16).eps * math.sqrt(24)
