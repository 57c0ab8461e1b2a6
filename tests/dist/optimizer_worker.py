"""Run under torchrun by tests/test_distributed_optimizer.py: a tiny BLOOM trained a few AdamW steps
under several layouts (re-creating the TP/PP/DP groups between them) through the gradient buffers
and the (distributed) optimizer. Every layout sees the same global batches, so its losses, grad
norms and (gathered) weights can be compared with the one-process run; the one-process run is
also repeated with its micro-batches summed in another order, which measures how far rounding
alone moves the results (the tests' tolerance). Rank 0 saves a dict
{layout name: results} to --out with torch.save.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from ascendspeed import device
from ascendspeed.core import parallel_state as ps
from ascendspeed.core.tensor_parallel import model_parallel_seed
from ascendspeed.model.bloom import BloomConfig, BloomModel
from ascendspeed.optimizer import build_optimizer, get_param_groups
from ascendspeed.optimizer.mixed_precision import DynamicLossScaler

GLOBAL_BATCH, MICRO_BATCH, TOKENS, VOCAB = 8, 2, 9, 128


def batches(step: int, micro_batch: int = MICRO_BATCH, reverse: bool = False) -> list[torch.Tensor]:
    """This DP rank's micro-batches of the step's global batch (`reverse`: in the other order,
    the same gradient summed in another order)."""
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, TOKENS), generator=torch.Generator().manual_seed(100 + step))
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = list(ids.chunk(dp)[rank].split(micro_batch))
    return mine[::-1] if reverse else mine


def setup(tp: int = 1, pp: int = 1) -> None:
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, pp)
    model_parallel_seed(1234)


def build_model(dtype, sequence_parallel=False) -> BloomModel:
    config = BloomConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4,
                         params_dtype=dtype, sequence_parallel=sequence_parallel)
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return BloomModel(config)
    first = ps.is_pipeline_first_stage()
    return BloomModel(config, pre_process=first, post_process=not first, layer_numbers=[1 if first else 2])


def forward_backward(model, optimizer, micro_batches) -> float:
    """Loss sum over the micro-batches; with PP=2, stage 0 sends activations to stage 1 and gets
    their gradient back (one micro-batch at a time)."""
    n, total = len(micro_batches), 0.0
    for ids in micro_batches:
        if ps.get_pipeline_model_parallel_world_size() == 1:
            loss = model(ids[:, :-1], labels=ids[:, 1:]).float().mean()
            optimizer.scale_loss(loss / n).backward()
            total += loss.item()
            continue
        shape, dtype = (ids.shape[0], TOKENS - 1, 32), next(model.parameters()).dtype
        peer = ps.get_pipeline_model_parallel_next_rank()
        if ps.is_pipeline_first_stage():
            hidden = model(ids[:, :-1])
            dist.send(hidden.detach().contiguous(), peer)
            grad = torch.empty(shape, dtype=dtype)
            dist.recv(grad, peer)
            hidden.backward(grad)
        else:
            hidden = torch.empty(shape, dtype=dtype)
            dist.recv(hidden, peer)
            hidden.requires_grad_()
            loss = model(ids[:, :-1], labels=ids[:, 1:], hidden_states=hidden).float().mean()
            optimizer.scale_loss(loss / n).backward()
            dist.send(hidden.grad.contiguous(), peer)
            total += loss.item()
    return total


def mean_loss(total: float, count: int) -> float:
    """The step's loss averaged over DP: summed over the ranks of the last stage (DP x TP of them,
    the TP peers agreeing); the other stages add 0."""
    value = torch.tensor([total / count if ps.is_pipeline_last_stage() else 0.0], dtype=torch.float64)
    dist.all_reduce(value)
    return value.item() / (ps.get_data_parallel_world_size() * ps.get_tensor_model_parallel_world_size())


def gathered_weights(model) -> dict[str, torch.Tensor]:
    out = {}
    tp = ps.get_tensor_model_parallel_world_size()
    for name, param in model.named_parameters():
        tensor = param.detach().float()
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(parts, tensor.contiguous(), group=ps.get_tensor_model_parallel_group())
            tensor = torch.cat(parts, dim=param.partition_dim)
        out[name] = tensor.clone()
    return out


def replicas_max_diff(model, group) -> float:
    """Largest difference of the flat weights between the ranks of `group`."""
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    low, high = flat.clone(), flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    return (high - low).abs().max().item()


def train(*, dtype=torch.float32, tp=1, pp=1, zero=False, overlap=True, bucket_size=2000,
          sequence_parallel=False, clip_grad=1.0, steps=3, scaler=None, poison_step=None,
          micro_batch=MICRO_BATCH, reverse=False) -> dict:
    setup(tp, pp)
    model = build_model(dtype, sequence_parallel).train()
    optimizer = build_optimizer([model], get_param_groups(model, 0.1),
                                lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95)),
                                params_dtype=dtype, scaler=scaler, clip_grad=clip_grad,
                                bucket_size=bucket_size, overlap_grad_reduce=overlap,
                                use_distributed_optimizer=zero)
    result = {"losses": [], "norms": [], "updated": [], "scales": [], "weights_before": None,
              "buckets": len(optimizer.grads.buckets), "state_bytes": optimizer.state_bytes()}
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(steps):
        micro = batches(step, micro_batch, reverse)
        optimizer.zero_grad(len(micro))
        if poison_step == step and dist.get_rank() == 1:
            # An inf in rank 1's gradient, at the start of bucket 0: under ZeRO-1 the
            # reduce-scatter brings it to rank 0's shard only, so rank 1 skips the step only
            # because the overflow check is agreed over the world.
            optimizer.grads.buckets[0].grad_data[0] = float("inf")
        total = forward_backward(model, optimizer, micro)
        updated, norm = optimizer.step()
        result["losses"].append(mean_loss(total, len(micro)))
        result["norms"].append(norm)
        result["updated"].append(updated)
        result["scales"].append(optimizer.loss_scale)
        result["launched_during_backward"] = optimizer.grads.launched_during_backward
        if step == 0:
            result["unchanged_after_first_step"] = all(
                torch.equal(a, b) for a, b in zip(before, model.parameters()))
    result["state_bytes"] = optimizer.state_bytes()  # now with exp_avg / exp_avg_sq
    result["weights"] = gathered_weights(model)
    result["dp_replicas_max_diff"] = replicas_max_diff(model, ps.get_data_parallel_group())
    if pp > 1:  # the two copies of the word embeddings must stay equal
        embedding = model.word_embeddings.weight.detach().float().clone()
        peer = embedding.clone()
        dist.all_reduce(peer, group=ps.get_embedding_group())
        result["embedding_copies_max_diff"] = (2 * embedding - peer).abs().max().item()
    optimizer.grads.remove_hooks()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group(device.distributed_backend())  # the product's map
    torch.set_num_threads(1)
    world = dist.get_world_size()
    results = {"fp32": train(), "bf16": train(dtype=torch.bfloat16)}
    if world == 1:  # the same training summed in other orders: how far rounding alone moves it
        results.update({"fp32_reordered": train(reverse=True),
                        "fp32_rechunked": train(micro_batch=2 * MICRO_BATCH)})
    if world == 2:
        results.update({
            "fp32_zero": train(zero=True),
            "fp32_no_overlap": train(overlap=False),
            "fp32_zero_no_overlap": train(zero=True, overlap=False),
            "bf16_zero": train(dtype=torch.bfloat16, zero=True),
            "fp16_zero_overflow": train(dtype=torch.float16, zero=True, poison_step=0,
                                        scaler=DynamicLossScaler(initial_scale=4096, hysteresis=1)),
            "fp32_tp2": train(tp=2),
            "fp32_tp2_sp_zero": train(tp=2, sequence_parallel=True, zero=True),
            "fp32_pp2": train(pp=2),
            "fp32_pp2_zero": train(pp=2, zero=True),
        })
    for name, result in results.items():  # what ranks other than 0 saw, for the tests
        for key in ("updated", "scales", "state_bytes"):
            gathered = [None] * world
            dist.all_gather_object(gathered, result[key])
            result[f"{key}_per_rank"] = gathered
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
