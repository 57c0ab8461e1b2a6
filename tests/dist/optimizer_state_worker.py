"""Run under torchrun (2 processes, DP=2) by tests/test_optimizer_state.py; its helpers also run
in one process (DP=1) there.

Exact resume: a tiny BLOOM trains 3 AdamW steps, its optimizer state (`state_dict(param_names)`)
goes through torch.save / torch.load(weights_only=True), training continues 3 more steps; fresh
model and optimizer objects (another seed) load the model weights and then the optimizer state
and run the same 3 steps. Cross-layout: the state saved with ZeRO-1 resumes without it and vice
versa; a state saved by a one-process run (--dp1-state) resumes under ZeRO-1 at DP=2.
Rank 0 saves {case name: results} to --out.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from ascendspeed import device
from ascendspeed.core import parallel_state as ps
from ascendspeed.core.tensor_parallel import model_parallel_seed
from ascendspeed.model.bloom import BloomConfig, BloomModel
from ascendspeed.optimizer import build_optimizer, get_param_groups
from ascendspeed.optimizer.mixed_precision import DynamicLossScaler

GLOBAL_BATCH, MICRO_BATCH, TOKENS, VOCAB = 8, 2, 9, 128
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def batches(step: int) -> list[torch.Tensor]:
    """This DP rank's micro-batches of the step's global batch."""
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, TOKENS),
                        generator=torch.Generator().manual_seed(100 + step))
    mine = ids.chunk(ps.get_data_parallel_world_size())[ps.get_data_parallel_rank()]
    return list(mine.split(MICRO_BATCH))


def build(dtype_name: str, zero: bool, seed: int, clip_grad: float):
    """Model, optimizer and the parameter names (as a caller would build them from chunks)."""
    if distributed():
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(1, 1)
        model_parallel_seed(seed)
    else:
        torch.manual_seed(seed)
    dtype = DTYPES[dtype_name]
    model = BloomModel(BloomConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2,
                                   num_attention_heads=4, params_dtype=dtype)).train()
    scaler = DynamicLossScaler(initial_scale=1024, window=2, hysteresis=2) \
        if dtype == torch.float16 else None
    optimizer = build_optimizer([model], get_param_groups(model, 0.1),
                                lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95)),
                                params_dtype=dtype, scaler=scaler, clip_grad=clip_grad,
                                bucket_size=2000, use_distributed_optimizer=zero)
    names = {p: f"chunk0.{n}" for n, p in model.named_parameters()}
    return model, optimizer, names


def run_steps(model, optimizer, steps) -> dict:
    out = {"losses": [], "scales": [], "updated": []}
    for step in steps:
        micro = batches(step)
        optimizer.zero_grad(len(micro))
        total = 0.0
        for ids in micro:
            loss = model(ids[:, :-1], labels=ids[:, 1:]).float().mean()
            optimizer.scale_loss(loss / len(micro)).backward()
            total += loss.item()
        updated, _ = optimizer.step()
        value = torch.tensor([total / len(micro)], dtype=torch.float64)
        if distributed():
            dist.all_reduce(value)
        out["losses"].append(value.item() / ps.get_data_parallel_world_size())
        out["scales"].append(optimizer.loss_scale)
        out["updated"].append(updated)
    return out


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def share(state, path: str):
    """DP rank 0's state, through a file, on every rank (as a checkpoint load would)."""
    if not distributed() or dist.get_rank() == 0:
        torch.save(state, path)
    if distributed():
        dist.barrier()
    return torch.load(path, weights_only=True)


def states_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(a[n].keys() == b[n].keys() and all(
        torch.equal(a[n][k], b[n][k]) if torch.is_tensor(a[n][k]) else a[n][k] == b[n][k]
        for k in a[n]) for n in a)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: a difference measured at the tensor's scale (tests/tolerances.py)."""
    diff = (a.double() - b.double()).abs().max().item()
    return 0.0 if diff == 0 else diff / max(b.double().abs().max().item(), 1e-300)


def resume_case(dtype: str, zero_save: bool, zero_load: bool, clip_grad: float, path: str) -> dict:
    model, optimizer, names = build(dtype, zero_save, 1234, clip_grad)
    run_steps(model, optimizer, range(3))
    state = share(optimizer.state_dict(names), path)
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = run_steps(model, optimizer, range(3, 6))
    ref_weights, ref_final = weights(model), optimizer.state_dict(names)
    optimizer.grads.remove_hooks()

    model, optimizer, names = build(dtype, zero_load, 999, clip_grad)
    model.load_state_dict(model_state)  # model weights first, then the optimizer state
    optimizer.load_state_dict(state, names)
    resumed = run_steps(model, optimizer, range(3, 6))
    ours, final = weights(model), optimizer.state_dict(names)
    optimizer.grads.remove_hooks()
    result = {"reference": reference, "resumed": resumed, "path": path,
              "weights_equal": all(torch.equal(ours[n], ref_weights[n]) for n in ours),
              "weights_max_rel_diff": max(max_rel_diff(ours[n], ref_weights[n]) for n in ours)}
    if final is not None:  # DP rank 0
        result["final_state_equal"] = states_equal(final["state"], ref_final["state"])
        result["final_state_max_rel_diff"] = max(
            max_rel_diff(final["state"][n][k], ref_final["state"][n][k])
            for n in final["state"] for k in final["state"][n] if torch.is_tensor(final["state"][n][k]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--dp1-state", default=None)
    args = parser.parse_args()
    dist.init_process_group(device.distributed_backend())  # the product's map
    torch.set_num_threads(1)
    results = {}
    for dtype in DTYPES:
        for zero in (False, True):
            name = f"{dtype}{'_zero' if zero else ''}"
            results[f"resume_{name}"] = resume_case(dtype, zero, zero, 1.0,
                                                    os.path.join(args.dir, f"{name}.pt"))
            other = f"{dtype}{'' if zero else '_zero'}"
            # without clipping (whose norm sums in a layout-dependent order) bitwise is expected
            results[f"cross_{name}_to_{other}"] = resume_case(
                dtype, zero, not zero, 0.0, os.path.join(args.dir, f"cross_{name}.pt"))
    results["cross_fp32_zero_to_fp32_clipped"] = resume_case(
        "fp32", True, False, 1.0, os.path.join(args.dir, "cross_clipped.pt"))
    if args.dp1_state:
        saved = torch.load(args.dp1_state, weights_only=True)
        model, optimizer, names = build("fp32", True, 999, 1.0)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"], names)
        results["dp1_to_dp2_zero"] = {"resumed": run_steps(model, optimizer, range(3, 6)),
                                      "weights": weights(model)}
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
