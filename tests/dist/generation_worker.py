"""Run under torchrun by tests/test_generation.py (also imported there for its model helpers): the
test's random tiny HF BloomForCausalLM (its state dict, --weights) loaded into this rank's stage
at the launched TP x PP layout; greedy and seeded sampled generation of a left-padded batch.
Every rank writes what it got to --out.rank{R}.json, so the test can check that all ranks agree
and equal the one-process run."""
import argparse
import json

import torch
import torch.distributed as dist

from ascendspeed import device
from ascendspeed.core import parallel_state as ps
from ascendspeed.core.pipeline_parallel.partition import stage_layout
from ascendspeed.core.tensor_parallel import model_parallel_seed
from ascendspeed.generation import SamplingParams, StageRunner, generate_tokens
from ascendspeed.model.bloom import BloomConfig, BloomModel
from ascendspeed.checkpoint.hf import shard_from_hf

VOCAB, PADDED, HIDDEN, HEADS, LAYERS = 250, 256, 32, 4, 4
PROMPTS = [[17, 3, 99, 142, 8], [5, 230, 71, 16, 16, 44, 200, 9, 61], [120, 7, 33]]
RUNS = {  # name -> (SamplingParams, max new tokens)
    "greedy": (SamplingParams(greedy=True), 10),
    "top_p": (SamplingParams(temperature=0.9, top_p=0.95, seed=11), 10),
    "top_k": (SamplingParams(temperature=1.3, top_k=20, seed=12), 10),
}


def stage_from_hf(hf_state: dict, tp_rank: int = 0, tp: int = 1, pp_rank: int = 0,
                  pp: int = 1) -> BloomModel:
    """This rank's stage (layers numbered globally from 1) with the HF weights' TP slices."""
    config = BloomConfig(vocab_size=PADDED, hidden_size=HIDDEN, num_layers=LAYERS,
                         num_attention_heads=HEADS)
    full = shard_from_hf(hf_state, config, tp_rank, tp)
    layout = stage_layout(LAYERS, pp, pp_rank)
    layers = layout.chunks[0]
    model = BloomModel(config, layout.pre_process, layout.post_process, layers)
    state = {}
    for name in model.state_dict():
        if name.startswith("layers."):
            _, local, rest = name.split(".", 2)
            state[name] = full[f"layers.{layers[int(local)] - 1}.{rest}"]
        else:
            state[name] = full[name]
    model.load_state_dict(state)
    return model.eval()


def run_all(runner) -> dict:
    out = {}
    for name, (params, new) in RUNS.items():
        results = generate_tokens(runner, PROMPTS, max_new_tokens=new, sampling=params,
                                  return_logprobs=True)
        out[name] = {"tokens": [r.token_ids for r in results],
                     "logprobs": [r.logprobs for r in results]}
    recomputed = generate_tokens(runner, PROMPTS, max_new_tokens=10, recompute=True,
                                 sampling=RUNS["greedy"][0])
    out["greedy_recompute"] = {"tokens": [r.token_ids for r in recomputed]}
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--weights", required=True, help="torch.save'd HF state dict")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group(device.distributed_backend())  # the product's map
    ps.initialize_model_parallel(args.tp, args.pp)
    model_parallel_seed(1234)  # the attention forks the TP-rank RNG stream (dropout) even in eval
    model = stage_from_hf(torch.load(args.weights, weights_only=True),
                          ps.get_tensor_model_parallel_rank(), args.tp,
                          ps.get_pipeline_model_parallel_rank(), args.pp)
    with torch.no_grad():
        report = run_all(StageRunner(model, VOCAB))
    with open(f"{args.out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
