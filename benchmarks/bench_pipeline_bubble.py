"""The 1F1B pipeline bubble, measured with real processes (gloo on CPU), next to the textbook
(p - 1) / (m + p - 1) for p stages and m micro-batches.

    python benchmarks/bench_pipeline_bubble.py [--iters 3 --sleep-forward-ms 20]

One iteration of forward_backward_pipelining_without_interleaving, with its real point-to-point
exchange, takes T (the slowest stage's time from a common barrier). Stage r spends `wait_r` inside
the exchange (waiting for its neighbour, plus the copy itself), so it computes for
busy_r = elapsed_r - wait_r, and its bubble is 1 - busy_r / T. The stages' mean is printed with
the theory and their ratio (best of --iters iterations after one warm-up).

Two kinds of stage: 'sleep' stages (each forward sleeps t_f, each backward 2 t_f) measure the
schedule and the exchange alone, free of CPU contention, so p may exceed the cores; 'bloom'
stages (BloomModel blocks, 1 thread each) run only while p <= the CPU cores.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.core import parallel_state as ps  # noqa: E402
from ascendspeed.core.pipeline_parallel import p2p_communication as p2p  # noqa: E402
from ascendspeed.core.pipeline_parallel.partition import stage_layout  # noqa: E402
from ascendspeed.core.pipeline_parallel.schedules import (  # noqa: E402
    forward_backward_pipelining_without_interleaving)
from ascendspeed.model.bloom import BloomConfig, BloomModel  # noqa: E402
from ascendspeed.training import forward_step as bloom_forward_step  # noqa: E402

BATCH, SEQ = 2, 128  # micro-batch


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)  # backward costs about twice the forward
        return grad * 1.0, None


class SleepStage(torch.nn.Module):
    """A stage that only takes time; the first makes its input from a parameter."""

    def __init__(self, hidden: int, seconds: float, pre_process: bool, post_process: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(hidden))
        self.seconds, self.pre_process, self.post_process = seconds, pre_process, post_process

    def forward(self, hidden_states):
        x = self.weight.expand(BATCH, SEQ, -1) if self.pre_process else hidden_states
        x = _Sleep.apply(x, self.seconds)
        return x.float().mean() if self.post_process else x


def sleep_forward_step(model, batch, input_tensor):
    return model(input_tensor)


class _WaitClock:
    """Seconds spent in p2p_communication.communicate (every send/receive of the schedule goes
    through it), measured by wrapping that module function for the benchmark's lifetime."""

    def __init__(self):
        self.seconds, self._communicate = 0.0, p2p.communicate
        p2p.communicate = self._timed

    def _timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._communicate(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def _measure(kind: str, pp: int, m: int, args) -> tuple[float, float]:
    """(mean stage bubble fraction, iteration seconds) on this process group."""
    rank = ps.get_pipeline_model_parallel_rank()
    pre, post = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    if kind == "sleep":
        chunk, step = SleepStage(args.hidden, args.sleep_forward_ms / 1e3, pre, post), sleep_forward_step
    else:
        config = BloomConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                             num_layers=args.layers_per_stage * pp, num_attention_heads=8)
        layers = stage_layout(config.num_layers, pp, rank).chunks[0]
        chunk = BloomModel(config, pre_process=pre, post_process=post, layer_numbers=layers)
        step = bloom_forward_step
    shape = (BATCH, SEQ, args.hidden)
    batches = [{"text": torch.randint(0, args.vocab, (BATCH, SEQ + 1))} for _ in range(m)]

    results = []
    for _ in range(args.iters + 1):  # the first is a warm-up
        dist.barrier()
        CLOCK.seconds = 0.0
        start = time.perf_counter()
        forward_backward_pipelining_without_interleaving(
            step, iter(batches), [chunk], m, shape, torch.float32, lambda loss: loss)
        elapsed = time.perf_counter() - start
        busy = elapsed - CLOCK.seconds
        iteration = torch.tensor([elapsed])
        dist.all_reduce(iteration, op=dist.ReduceOp.MAX)  # it ends with the slowest stage
        bubble = torch.tensor([1.0 - busy / iteration.item()])
        dist.all_reduce(bubble)
        results.append((iteration.item(), bubble.item() / pp))
    iteration, bubble = min(results[1:])
    return bubble, iteration


CLOCK: _WaitClock | None = None


def _worker(rank: int, pp: int, port: int, kinds: list[str], args) -> None:
    global CLOCK
    CLOCK = _WaitClock()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=pp)
    ps.initialize_model_parallel(1, pp)
    for kind in kinds:
        for m in args.microbatches:
            torch.manual_seed(0)
            measured, seconds = _measure(kind, pp, m, args)
            theory = (pp - 1) / (m + pp - 1)
            if rank == 0:
                print(f"{kind:>5}  p={pp}  m={m}  iteration {seconds * 1e3:7.1f} ms  "
                      f"bubble measured {measured:.3f}  theory {theory:.3f}  "
                      f"ratio {measured / theory:.2f}", flush=True)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--sleep-forward-ms", type=float, default=20.0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--layers-per-stage", type=int, default=2)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"1F1B bubble, {cores} CPU cores; micro-batch {BATCH} x {SEQ} tokens", flush=True)
    for pp in args.stages:
        kinds = ["sleep"] + (["bloom"] if pp <= cores else [])
        if pp > cores:
            print(f"bloom  p={pp}  skipped: {pp} processes on {cores} cores would share cores",
                  flush=True)
        mp.spawn(_worker, args=(pp, _free_port(), kinds, args), nprocs=pp, join=True)


if __name__ == "__main__":
    main()
