"""Run under torchrun by tests/test_bloom_tp.py: a random HF BloomForCausalLM loaded into our
BloomModel at the launched TP size. Checks logits against HF, vocab-parallel CE against
F.cross_entropy, then trains a few AdamW steps and writes losses + gathered weights to --out."""
import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers

from ascendspeed import device
from ascendspeed.core import parallel_state as ps
from ascendspeed.core.tensor_parallel import (gather_from_tensor_model_parallel_region,
                                              model_parallel_seed, vocab_parallel_cross_entropy)
from ascendspeed.model.bloom import BloomConfig, BloomModel
from ascendspeed.checkpoint.hf import shard_from_hf


def gathered_state(model):
    out = {}
    for name, param in model.named_parameters():
        tensor = param.detach()
        if getattr(param, "tensor_model_parallel", False) and ps.get_tensor_model_parallel_world_size() > 1:
            parts = [torch.empty_like(tensor) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(parts, tensor.contiguous(), group=ps.get_tensor_model_parallel_group())
            tensor = torch.cat(parts, dim=param.partition_dim)
        out[name] = tensor.clone()
    return out


def replicated_identical(model):
    """Every replicated parameter bitwise equal on all TP ranks (BLOOM-176B's drift bug)."""
    for name, param in model.named_parameters():
        if getattr(param, "tensor_model_parallel", False) is False:
            parts = [torch.empty_like(param) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(parts, param.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
            if not all(torch.equal(parts[0], p) for p in parts):
                return name
    return None


def run_bf16(model, config, args, generator, tp):
    """BLOOM-176B's drift bug: bf16 training must keep replicated parameters bitwise equal."""
    from ascendspeed.optimizer import build_optimizer

    model = model.to(torch.bfloat16).train()
    optimizer = build_optimizer([model], [{"params": list(model.parameters())}],
                                lambda groups: torch.optim.AdamW(groups, lr=1e-3),
                                params_dtype=torch.bfloat16)
    losses = []
    for _ in range(args.bf16_steps):
        batch = torch.randint(0, 240, (4, 19), generator=generator)
        optimizer.zero_grad(1)
        loss = model(batch[:, :-1], labels=batch[:, 1:]).mean()
        optimizer.scale_loss(loss).backward()
        optimizer.step()
        losses.append(loss.item())
    result = {"losses": losses, "replicated_differs": replicated_identical(model)}
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--bf16-steps", type=int, default=0,
                        help="instead: train a bf16 model this many AdamW steps (fp32 masters)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group(device.distributed_backend())  # the product's map
    tp = dist.get_world_size()
    ps.initialize_model_parallel(tp, 1)
    model_parallel_seed(1234)

    hidden = 12 * args.heads
    hf_config = transformers.BloomConfig(vocab_size=240, hidden_size=hidden, n_layer=2, n_head=args.heads,
                                         hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    hf = transformers.BloomForCausalLM(hf_config).eval()
    config = BloomConfig(vocab_size=240, hidden_size=hidden, num_layers=2, num_attention_heads=args.heads,
                         sequence_parallel=args.sequence_parallel)
    if args.dropout:
        config = BloomConfig(**{**config.__dict__, "hidden_dropout": args.dropout,
                                "attention_dropout": args.dropout})
    model = BloomModel(config)
    model.load_state_dict(shard_from_hf(hf.state_dict(), config, ps.get_tensor_model_parallel_rank(), tp))
    model.eval()

    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 240, (4, 19), generator=generator)  # 18 tokens + 1 label: SP splits 18
    mask = torch.ones(4, 19, dtype=torch.long)
    mask[1, :6] = 0
    result = {"parity": {}, "parity_scale": {}}
    with torch.no_grad():
        for label, attention_mask in (("no_mask", None), ("left_padding", mask)):
            inputs = ids[:, :-1]  # 18 tokens (sequence parallelism splits them over TP)
            if attention_mask is not None:
                attention_mask = attention_mask[:, :-1]
            ours = gather_from_tensor_model_parallel_region(model(inputs, attention_mask=attention_mask))
            ref = hf(inputs, attention_mask=attention_mask).logits
            result["parity"][label] = (ours - ref).abs().max().item()
            result["parity_scale"][label] = ref.abs().max().item()
        logits = model(ids[:, :-1])
        targets = ids[:, 1:]
        ce = vocab_parallel_cross_entropy(logits.float(), targets)
        full = gather_from_tensor_model_parallel_region(logits)
        reference = F.cross_entropy(full.reshape(-1, 240).float(), targets.reshape(-1), reduction="none")
        result["ce_diff"] = (ce.reshape(-1) - reference).abs().max().item()
        result["ce_scale"] = reference.abs().max().item()

    if args.bf16_steps:
        run_bf16(model, config, args, generator, tp)
        return

    # Training: same data, fp32, no dropout, through the trainer's optimizer (gradient buffers,
    # then its finalize step: under sequence parallelism each TP rank's LayerNorm / row-bias
    # gradient covers only its tokens and finalize_model_grads sums them over TP). The inner
    # optimizer is SGD with momentum, because Adam divides by the root of tiny second moments and
    # so turns rounding noise into full-size steps (AdamW end to end is tested through
    # pretrain_bloom.py's losses). --micro-batches 2: each batch as two halves whose gradients
    # accumulate (the same step summed in another order: the tests' measure of rounding).
    from ascendspeed.optimizer import build_optimizer

    model.train()
    optimizer = build_optimizer([model], [{"params": list(model.parameters())}],
                                lambda groups: torch.optim.SGD(groups, lr=0.5, momentum=0.9))
    losses = []
    for _ in range(args.steps):
        batch = torch.randint(0, 240, (4, 19), generator=generator)
        optimizer.zero_grad(args.micro_batches)
        total = 0.0
        for micro in batch.chunk(args.micro_batches):
            loss = model(micro[:, :-1], labels=micro[:, 1:]).mean()
            optimizer.scale_loss(loss / args.micro_batches).backward()
            total += loss.item() / args.micro_batches
        assert optimizer.step()[0]
        losses.append(total)
    result["losses"] = losses
    if args.dropout:  # the TP-rank stream must differ across ranks, the default stream must not
        from ascendspeed.core.tensor_parallel import get_rng_tracker
        with get_rng_tracker().fork():
            private = torch.rand(4)
        shared = torch.rand(4)
        gathered = [torch.empty(8) for _ in range(tp)]
        dist.all_gather(gathered, torch.cat([private, shared]))
        result["tp_streams_differ"] = not torch.equal(gathered[0][:4], gathered[-1][:4])
        result["default_streams_equal"] = all(torch.equal(g[4:], gathered[0][4:]) for g in gathered)
    result["replicated_differs"] = replicated_identical(model)
    state = gathered_state(model)
    if dist.get_rank() == 0:
        torch.save(state, args.out + ".pt")
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.barrier()  # nobody tears gloo down while a peer is still in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
