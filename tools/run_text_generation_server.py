"""Serve text generation from a pretrain_bloom.py checkpoint over HTTP, Megatron's way.

    torchrun --nproc_per_node 2 tools/run_text_generation_server.py --load CKPT \\
        --use-checkpoint-args --tensor-model-parallel-size 2 --tokenizer-type PretrainedFromHF \\
        --tokenizer-name-or-path TOKENIZER_DIR [--port 5000] [--host 127.0.0.1]
    curl -X PUT http://127.0.0.1:5000/api -H 'Content-Type: application/json' \\
        -d '{"prompts": ["To be, or not"], "tokens_to_generate": 20, "top_k": 1}'

Flags are generate_bloom.py's (the model and tokenizer, TP x PP = the launched processes) plus
--host, --port, --max-request-bytes, --max-prompts and --max-tokens-to-generate; sampling comes
with each request. Rank 0 serves; the other ranks follow (ascendspeed/generation/server.py).
SIGINT / SIGTERM stops every rank. Bad flags are one line on stderr and exit status 2.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from datetime import timedelta

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.arguments import parse_args  # noqa: E402
from ascendspeed.errors import AscendSpeedError, ConfigError, error_line  # noqa: E402
from ascendspeed.generation.launch import rank, start_processes, world_size  # noqa: E402
from ascendspeed.generation.server import ServerConfig, add_server_args  # noqa: E402

# The followers wait for the next request inside a broadcast: it must not time out while idle.
IDLE_TIMEOUT = timedelta(days=365)


def log(message: str) -> None:
    if rank() == 0:
        print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv, extra_args_provider=add_server_args)
    from ascendspeed.generation.loading import load_stage, prepare

    try:
        config = ServerConfig.from_args(args)
        if importlib.util.find_spec("flask") is None:
            raise ConfigError("the server needs Flask: pip install flask")
        setup = prepare(args, world_size(), log)
    except AscendSpeedError as error:  # before any process group: nothing can hang
        log(error_line(error))
        return 2

    import torch.distributed as dist

    from ascendspeed.generation import StageRunner
    from ascendspeed.generation.server import GenerationServer, follow

    start_processes(setup, args.distributed_backend, args.seed,
                    timeout=timedelta(minutes=args.distributed_timeout_minutes),
                    idle_timeout=IDLE_TIMEOUT)
    try:
        runner = StageRunner(load_stage(setup, log), setup.tokenizer.vocab_size)
        if rank() == 0:
            status = GenerationServer(runner, setup.tokenizer, setup.context_length, config,
                                      log).serve()
        else:
            follow(runner, setup.tokenizer, setup.context_length, log)
            status = 0
        if dist.is_initialized():
            dist.barrier()
        log(" > server stopped")
        return status
    except AscendSpeedError as error:
        log(error_line(error))
        return 2
    except KeyboardInterrupt:  # a signal before serving began (STOP was sent)
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
