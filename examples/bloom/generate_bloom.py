"""Generate text from a pretrain_bloom.py checkpoint, under tensor and pipeline parallelism.

    torchrun --nproc_per_node 2 examples/bloom/generate_bloom.py --load CKPT --use-checkpoint-args \\
        --tensor-model-parallel-size 2 --tokenizer-type PretrainedFromHF \\
        --tokenizer-name-or-path TOKENIZER_DIR --prompt "To be, or not" --max-new-tokens 40 --top_p 0.9

Prompts come from --prompt (repeatable), --sample-input-file (UTF-8, one prompt per line, blank
lines skipped), or else stdin, one per line. Results go to stdout (a single prompt streams as it
is generated) and, with --sample-output-file, to JSON lines {"prompt", "text", "token_ids"}.
Sampling: --greedy (or --top_k 1), else --temperature with --top_k or --top_p; --seed makes it
reproducible at any TP/PP. A sequence ends at the tokenizer's EOD, a --stop string, after
--max-new-tokens (default --out-seq-length) tokens, or when it fills --seq-length.
Bad input (missing checkpoint or tokenizer, a prompt too long for the context, bad sampling
values, a non-UTF-8 prompt file) is one line on stderr and exit status 2.
"""
from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ascendspeed.arguments import GenerationConfig, parse_args  # noqa: E402
from ascendspeed.data.text_lines import read_utf8_lines  # noqa: E402
from ascendspeed.errors import AscendSpeedError, ConfigError, PromptError, error_line  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def log(message: str) -> None:
    if RANK == 0:
        print(message, file=sys.stderr, flush=True)


def read_prompt_file(path: str) -> list[str]:
    prompts = [text for _, text in read_utf8_lines(path, f"--sample-input-file {path}")
               if text.strip()]
    if not prompts:
        raise ConfigError(f"--sample-input-file {path}: no prompts (every line is blank)")
    return prompts


def check_prompts(prompts: list[str], tokenizer, context_length: int) -> None:
    for i, ids in enumerate(tokenizer.encode_batch(prompts)):
        if not ids:
            raise ConfigError(f"prompt {i + 1} ({prompts[i][:40]!r}) has no tokens")
        if len(ids) >= context_length:
            raise ConfigError(f"prompt {i + 1} ({prompts[i][:40]!r}...) has {len(ids)} tokens; the "
                              f"context (--seq-length) is {context_length}, leaving none to generate")


class Output:
    """Rank 0 prints results and writes the JSON lines (through a temporary name, renamed at the
    end, so a crash never leaves a partial file under the final name)."""

    def __init__(self, path: str | None):
        self.path, self.file = path, None
        if RANK == 0 and path:
            self.file = open(path + ".tmp", "w", encoding="utf-8")

    def write(self, prompt: str, generation) -> None:
        if self.file is not None:
            record = {"prompt": prompt, "text": generation.text, "token_ids": generation.token_ids}
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            os.replace(self.path + ".tmp", self.path)


def run(prompts: list[str], runner, setup, config: GenerationConfig, output: Output,
        stream: bool) -> None:
    from ascendspeed.generation import generate_text

    for start in range(0, len(prompts), config.batch_size):
        batch = prompts[start:start + config.batch_size]
        if stream and RANK == 0:
            print(batch[0], end="", flush=True)
        results = generate_text(runner, setup.tokenizer, batch,
                                max_new_tokens=config.max_new_tokens,
                                sampling=config.sampling(), context_length=setup.context_length,
                                stop=config.stop, recompute=config.recompute,
                                stream=(lambda i, text: print(text, end="", flush=True))
                                if stream and RANK == 0 else None)
        for prompt, result in zip(batch, results):
            if RANK == 0:
                print("" if stream else f"{prompt}{result.text}", flush=True)
                if not stream:
                    print("-" * 40, flush=True)
            output.write(prompt, result)


def interactive(runner, setup, config: GenerationConfig, output: Output) -> None:
    """Rank 0 reads a prompt per line from stdin and sends it to the other ranks; EOF ends."""
    import torch.distributed as dist


    while True:
        line = None
        if RANK == 0:
            if sys.stdin.isatty():
                print("prompt> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            line = line.rstrip("\r\n") if line else None
        if dist.is_initialized():
            box = [line]
            dist.broadcast_object_list(box, src=0)
            line = box[0]
        if line is None:
            return
        if not line.strip():
            continue
        try:
            run([line], runner, setup, config, output, stream=True)
        except PromptError as error:  # every rank raises it alike, before any message
            log(error_line(error))


def main(argv=None) -> int:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    from ascendspeed.generation.loading import load_stage, prepare

    try:
        config = GenerationConfig.from_args(args)
        setup = prepare(args, world_size, log)
        prompts = list(config.prompts)
        if config.sample_input_file:
            prompts += read_prompt_file(config.sample_input_file)
        if prompts:
            check_prompts(prompts, setup.tokenizer, setup.context_length)
        if config.sample_output_file:
            parent = os.path.dirname(os.path.abspath(config.sample_output_file))
            if not os.path.isdir(parent):
                raise ConfigError(f"--sample-output-file {config.sample_output_file}: directory "
                                  f"{parent} does not exist")
    except AscendSpeedError as error:  # before any process group: nothing can hang
        log(error_line(error))
        return 2

    import torch
    import torch.distributed as dist

    from ascendspeed.generation import StageRunner
    from ascendspeed.generation.launch import start_processes

    grad_was_enabled = torch.is_grad_enabled()  # main() may run inside another program (tests)
    torch.set_grad_enabled(False)
    start_processes(setup, args.distributed_backend, args.seed)
    output = Output(config.sample_output_file)
    try:
        runner = StageRunner(load_stage(setup, log), setup.tokenizer.vocab_size)
        if prompts:
            run(prompts, runner, setup, config, output, stream=len(prompts) == 1)
        else:
            interactive(runner, setup, config, output)
        output.close()
        if dist.is_initialized():
            dist.barrier()
    except AscendSpeedError as error:  # every rank raises it alike (loading agrees on failure)
        log(error_line(error))
        return 2
    finally:
        torch.set_grad_enabled(grad_was_enabled)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
