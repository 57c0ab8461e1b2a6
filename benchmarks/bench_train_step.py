"""Training-iteration time of our trainer vs Hugging Face BloomForCausalLM, same weights, config,
batch, threads and optimizer (AdamW), one process.

    python benchmarks/bench_train_step.py [--layers 6 --hidden 512 --heads 8 --vocab 5120 \
        --micro-batch 4 --seq 512 --rounds 5 --threads 2] [--bf16] [--quick]

Ours is `ascendspeed.training.train_step` (zero_grad, the pipeline schedule's forward/backward
into the fp32 gradient buffers, clip to 1.0, fused AdamW, LR step) on the model, optimizer and
scheduler built exactly as `training.pretrain` builds them (build_model,
build_training_optimizer, OptimizerParamScheduler.from_config) from a PretrainConfig parsed from
pretrain_bloom.py flags (a tiny random .bin/.idx and a GPT-2 BPE vocab/merges pair are written to
a temp dir for --data-path and the tokenizer; --pad-vocab-size-to sets the vocab). With --bf16 the
model is bf16 with fp32 master weights.

The baseline is a transformers.BloomForCausalLM holding the same weights (our model is loaded
from it through shard_from_hf), its own loss (labels = the next tokens, shift_labels), backward,
torch.nn.utils.clip_grad_norm_(1.0) and torch.optim.AdamW(foreach=True; torch's CPU default is
the slower per-tensor loop), fp32 weights; with --bf16 its forward runs under
torch.autocast("cpu", dtype=torch.bfloat16).

Both are timed alternately, iteration by iteration (one warm-up iteration each first), so machine
noise hits both alike; prints the median ms/iteration of each and the ratio HF / ours.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import alternate, median  # noqa: E402


def write_corpus(root: str, docs: int = 64) -> tuple[str, str, str]:
    """A random-token .bin/.idx (uint16) and a GPT-2 BPE tokenizer of 257 ids (vocab.json with
    every byte symbol + <|endoftext|>, an empty merges.txt), as tests/test_pretrain.py's corpus
    fixture writes them. Returns (data prefix, vocab file, merge file)."""
    from megatron_ext.indexed_dataset import MMapIndexedDatasetBuilder

    symbols = [chr(c) for c in range(ord("!"), ord("~") + 1)] + \
        [chr(c) for c in range(ord("¡"), ord("¬") + 1)] + [chr(c) for c in range(ord("®"), ord("ÿ") + 1)]
    symbols += [chr(256 + i) for i in range(256 - len(symbols))]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab["<|endoftext|>"] = len(vocab)
    vocab_file, merge_file = os.path.join(root, "vocab.json"), os.path.join(root, "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump(vocab, f)
    with open(merge_file, "w") as f:
        f.write("#version: 0.2\n")
    prefix = os.path.join(root, "random_text_document")
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.RandomState(0)
    for _ in range(docs):
        builder.add_item(rng.randint(0, 257, size=rng.randint(20, 2000)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix, vocab_file, merge_file


def pretrain_flags(corpus: tuple[str, str, str], *, layers: int, hidden: int, heads: int, seq: int,
                   micro_batch: int, global_batch: int, vocab: int, bf16: bool = False,
                   train_iters: int = 1000, log_interval: int = 100) -> list[str]:
    """pretrain_bloom.py's flags for this benchmark's model (no dropout, AdamW, clip 1.0)."""
    prefix, vocab_file, merge_file = corpus
    return ["--num-layers", str(layers), "--hidden-size", str(hidden),
            "--num-attention-heads", str(heads), "--seq-length", str(seq),
            "--max-position-embeddings", str(seq), "--micro-batch-size", str(micro_batch),
            "--global-batch-size", str(global_batch), "--train-iters", str(train_iters),
            "--lr", "1e-4", "--min-lr", "1e-5", "--lr-warmup-iters", "0", "--optimizer", "adam",
            "--position-embedding-type", "alibi", "--embed-layernorm", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--data-path", prefix, "--split", "100,0,0",
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab_file,
            "--merge-file", merge_file, "--log-interval", str(log_interval), "--eval-iters", "0",
            "--num-workers", "0", "--seed", "1234", "--pad-vocab-size-to", str(vocab),
            *(["--bf16"] if bf16 else [])]


def build_ours(flags: list[str]):
    """(config, model chunks, padded vocab) as training.pretrain builds them on one process."""
    from ascendspeed.arguments import PretrainConfig, parse_args
    from ascendspeed.core.tensor_parallel import model_parallel_seed
    from ascendspeed.data.tokenizer import build_tokenizer
    from ascendspeed.training import build_model, padded_vocab_size

    config = PretrainConfig.from_args(parse_args(flags), world_size=1)
    model_parallel_seed(config.training.seed)
    padded_vocab = padded_vocab_size(config, build_tokenizer(config.tokenizer))
    model = build_model(config, padded_vocab)
    for chunk in model:
        chunk.train()
    return config, model, padded_vocab


class TrainBench:
    """Our train_step and the HF step on the same weights and batch, ready to be timed."""

    def __init__(self, *, layers=6, hidden=512, heads=8, vocab=5120, seq=512, micro_batch=4,
                 bf16=False, workdir: str | None = None):
        import transformers

        from ascendspeed.checkpoint.hf import shard_from_hf
        from ascendspeed.optimizer.lr_scheduler import OptimizerParamScheduler
        from ascendspeed.training import build_training_optimizer

        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory()
            workdir = self._tmp.name
        self.flags = pretrain_flags(write_corpus(workdir), layers=layers, hidden=hidden,
                                    heads=heads, seq=seq, micro_batch=micro_batch,
                                    global_batch=micro_batch, vocab=vocab, bf16=bf16)
        self.config, self.model, self.padded_vocab = build_ours(self.flags)
        self.bf16 = bf16
        hf_config = transformers.BloomConfig(vocab_size=self.padded_vocab, hidden_size=hidden,
                                             n_layer=layers, n_head=heads, hidden_dropout=0.0,
                                             attention_dropout=0.0)
        torch.manual_seed(0)
        self.hf = transformers.BloomForCausalLM(hf_config).train()
        # same weights, loaded before the optimizer takes its fp32 master copies
        self.model[0].load_state_dict(shard_from_hf(self.hf.state_dict(), self.model[0].config, 0, 1))
        self.optimizer = build_training_optimizer(self.model, self.config)
        self.scheduler = OptimizerParamScheduler.from_config(self.optimizer, self.config)
        self.hf_optimizer = torch.optim.AdamW(self.hf.parameters(), lr=1e-4, weight_decay=0.01,
                                              foreach=True)
        generator = torch.Generator().manual_seed(1)
        self.text = torch.randint(0, self.padded_vocab, (micro_batch, seq + 1), generator=generator)
        self.batches = itertools.repeat({"text": self.text})
        # HF's inputs and next-token labels, made once outside the timing
        self.tokens, self.targets = self.text[:, :-1].contiguous(), self.text[:, 1:].contiguous()
        self.num_microbatches = self.config.training.num_microbatches
        self.global_batch = self.config.training.global_batch_size
        self.losses = {"ours": [], "hf": []}

    def ours_step(self):
        from ascendspeed.training import train_step

        loss, _, _ = train_step(self.model, self.optimizer, self.scheduler, self.batches,
                                self.config, self.num_microbatches, self.global_batch)
        self.losses["ours"].append(loss)

    def hf_step(self):
        tokens, targets = self.tokens, self.targets
        if self.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = self.hf(tokens, labels=targets, shift_labels=targets).loss
        else:
            loss = self.hf(tokens, labels=targets, shift_labels=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.hf.parameters(), 1.0)
        self.hf_optimizer.step()
        self.hf_optimizer.zero_grad(set_to_none=True)
        self.losses["hf"].append(loss.item())

    def measure(self, rounds: int, warmup: int = 1) -> dict:
        """Median seconds per iteration of each, alternating (one warm-up iteration each)."""
        times = alternate({"ours": self.ours_step, "hf": self.hf_step}, rounds, warmup)
        return {"ours_s": median(times["ours"]), "hf_s": median(times["hf"]), "times": times,
                "first_losses": (self.losses["ours"][0], self.losses["hf"][0])}

    def close(self):
        if self._tmp is not None:
            self._tmp.cleanup()


def measure_train(*, layers=6, hidden=512, heads=8, vocab=5120, seq=512, micro_batch=4,
                  bf16=False, rounds=5, warmup=1) -> dict:
    bench = TrainBench(layers=layers, hidden=hidden, heads=heads, vocab=vocab, seq=seq,
                       micro_batch=micro_batch, bf16=bf16)
    try:
        out = bench.measure(rounds, warmup)
        out["config"] = bench.config
        out["padded_vocab"] = bench.padded_vocab
        out["global_batch"] = bench.global_batch
        return out
    finally:
        bench.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=5120, help="--pad-vocab-size-to")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.layers, args.hidden, args.heads, args.seq, args.micro_batch, args.rounds = 2, 64, 4, 64, 2, 2
        args.vocab = 512
    r = measure_train(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab,
                      seq=args.seq, micro_batch=args.micro_batch, bf16=args.bf16, rounds=args.rounds)
    tokens = args.micro_batch * args.seq
    for name, key in (("ascendspeed", "ours_s"), ("hf", "hf_s")):
        print(f"{name:>12}: {r[key] * 1e3:9.1f} ms/iteration, {tokens / r[key]:8.1f} tokens/s")
    print(f"first losses ours / hf: {r['first_losses'][0]:.5f} / {r['first_losses'][1]:.5f}")
    print(f"ratio hf / ascendspeed: {r['hf_s'] / r['ours_s']:.2f}x "
          f"({args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {r['padded_vocab']}, "
          f"batch {args.micro_batch}x{args.seq}, {'bf16' if args.bf16 else 'fp32'}, "
          f"{args.threads} threads, median of {args.rounds})")


if __name__ == "__main__":
    main()
