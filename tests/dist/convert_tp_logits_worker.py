"""Run under torchrun by tests/test_convert_tp.py: build this rank's BloomModel chunk the way
ascendspeed.training.build_model does, load it from a checkpoint iteration directory, run a fixed
batch through the pipeline and write the full-vocabulary logits (cut to the original vocabulary)
from the last stage's TP rank 0 to --out (and, with --tokens-out, the input tokens, so that a
caller can run the same batch through another model).

    torchrun ... convert_tp_logits_worker.py --iteration-dir DIR --out FILE [--tokens-out FILE] \
        -- <pretrain flags>
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

from ascendspeed.arguments import PretrainConfig, parse_args
from ascendspeed.checkpoint.io import read_checkpoint_file
from ascendspeed.checkpoint.save_load import _this_rank_file, load_model_state_dict
from ascendspeed.core import parallel_state as ps
from ascendspeed.core.tensor_parallel import gather_from_tensor_model_parallel_region
from ascendspeed.training import build_model, initialize_distributed


def main():
    split = sys.argv.index("--")
    own = argparse.ArgumentParser()
    own.add_argument("--iteration-dir", required=True)
    own.add_argument("--out", required=True)
    own.add_argument("--tokens-out", default=None)
    options = own.parse_args(sys.argv[1:split])
    config = PretrainConfig.from_args(parse_args(sys.argv[split + 1:]),
                                      world_size=int(os.environ.get("WORLD_SIZE", "1")))
    initialize_distributed(config)
    path = _this_rank_file(options.iteration_dir)
    state = read_checkpoint_file(path)
    padded = state["checkpoint_info"]["padded_vocab_size"]
    original = state["checkpoint_info"]["original_vocab_size"]
    (chunk,) = build_model(config, padded)
    load_model_state_dict(chunk, state["model"], path)
    chunk.eval()
    generator = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, original, (2, 16), generator=generator)
    shape = (2, 16, config.model.hidden_size)
    dtype = getattr(torch, config.precision.params_dtype)
    with torch.no_grad():
        hidden = None
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(shape, dtype=dtype)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        out = chunk(tokens, hidden_states=hidden)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        else:
            if ps.get_tensor_model_parallel_world_size() > 1:
                out = gather_from_tensor_model_parallel_region(out)
            if ps.get_tensor_model_parallel_rank() == 0:
                torch.save(out[..., :original].float().clone(), options.out)
                if options.tokens_out:
                    torch.save(tokens, options.tokens_out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
