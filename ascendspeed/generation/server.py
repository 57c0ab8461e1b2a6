"""A Megatron-compatible text generation server (tools/run_text_generation_server.py).

Megatron-LM's design: every rank of the TP x PP job holds its part of the model, rank 0 also
serves HTTP. For each request rank 0 checks it, then broadcasts a command (a header tensor
[command, payload bytes] and the payload, the request as JSON with the prompts already
tokenized) and every rank calls `generate_tokens` with the same arguments, exactly as Megatron's
GENERATE_NUM loop; the other ranks (`follow`) do nothing else. One lock around broadcast +
generation queues concurrent requests instead of interleaving their collectives. Stopping
(SIGINT / SIGTERM on rank 0) broadcasts STOP, so every rank leaves its loop and exits cleanly.

PUT /api takes Megatron's MegatronGenerate fields and answers with its field names ("text",
"segments", "logprobs") plus "tokens"; a bad request is a 400 `{"message": ...}` naming the field
(413 for a body over --max-request-bytes), and the server keeps serving.
"""
from __future__ import annotations

import argparse
import json
import math
import secrets
import signal
import socket
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from ascendspeed import device
from ascendspeed.errors import ConfigError, RequestError
from ascendspeed.generation.generate import (Generation, StageRunner, _cut_at_stop,
                                             generate_tokens)
from ascendspeed.generation.sampling import SamplingParams

GENERATE, STOP = 0, -1  # commands rank 0 broadcasts (Megatron: GENERATE_NUM = 0)
TOKENS_TO_GENERATE = 64  # Megatron's default when a request does not say
# Megatron fields we do not implement: refused unless they hold Megatron's default.
UNSUPPORTED = {"beam_width": None, "top_p_decay": 0.0, "top_p_bound": 0.0,
               "prevent_newline_after_colon": False, "length_penalty": 1}


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("text generation server")
    group.add_argument("--host", type=str, default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only)")
    group.add_argument("--port", type=int, default=5000, help="0 picks a free port (logged)")
    group.add_argument("--max-request-bytes", type=int, default=1 << 20)
    group.add_argument("--max-prompts", type=int, default=128)
    group.add_argument("--max-tokens-to-generate", type=int, default=1024)
    return parser


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 5000
    max_request_bytes: int = 1 << 20
    max_prompts: int = 128
    max_tokens_to_generate: int = 1024

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535], got {self.port}")
        for name in ("max_request_bytes", "max_prompts", "max_tokens_to_generate"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got "
                                  f"{getattr(self, name)}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServerConfig":
        return cls(host=args.host, port=args.port, max_request_bytes=args.max_request_bytes,
                   max_prompts=args.max_prompts,
                   max_tokens_to_generate=args.max_tokens_to_generate)


@dataclass(frozen=True)
class GenerateRequest:
    """A checked request, as every rank receives it (the prompts tokenized by rank 0)."""
    prompts: list[str]
    prompt_ids: list[list[int]]
    tokens_to_generate: int
    temperature: float
    top_k: int
    top_p: float
    random_seed: int
    logprobs: bool
    stop: list[str]
    stop_token: int | None

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              seed=self.random_seed)


# ------------------------------------------------------------------------------ validation
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _field(body: dict, name: str, default: Any, check: Callable[[Any], bool], expected: str):
    value = body.get(name, default)
    if name in body and not check(value):
        raise RequestError(f"{name} must be {expected}, got {json.dumps(value)[:80]}")
    return value


def parse_request(data: bytes, tokenizer, config: ServerConfig,
                  context_length: int) -> GenerateRequest:
    """The request body checked as Megatron's MegatronGenerate.put does, plus our limits;
    RequestError naming the field otherwise."""
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"the request body is not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object with a \"prompts\" list")
    if "max_len" in body:
        raise RequestError("max_len is no longer used.  Replace with tokens_to_generate")
    if "sentences" in body:
        raise RequestError("sentences is no longer used.  Replace with prompts")
    for name, default in UNSUPPORTED.items():
        if body.get(name, default) != default:
            raise RequestError(f"{name} is not supported by this server")
    if "prompts" not in body:
        raise RequestError("prompts argument required")
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts must be a list of strings")
    if not prompts:
        raise RequestError("prompts is empty")
    if len(prompts) > config.max_prompts:
        raise RequestError(f"prompts: {len(prompts)} prompts, the maximum is "
                           f"{config.max_prompts} (--max-prompts)")
    n = _field(body, "tokens_to_generate",
               min(TOKENS_TO_GENERATE, config.max_tokens_to_generate),
               lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    logprobs = _field(body, "logprobs", False, lambda v: isinstance(v, bool), "a boolean")
    if n == 0:  # Megatron scores the prompts then; generate_tokens gives generated tokens' only
        raise RequestError("tokens_to_generate must be >= 1: scoring prompts "
                           "(tokens_to_generate=0 with logprobs) is not supported")
    if n > config.max_tokens_to_generate:
        raise RequestError(f"tokens_to_generate must be <= {config.max_tokens_to_generate} "
                           f"(--max-tokens-to-generate), got {n}")
    temperature = _field(body, "temperature", 1.0, lambda v: _is_number(v) and 0.0 < v <= 100.0,
                         "a number in (0, 100]")
    top_k = _field(body, "top_k", 0, lambda v: _is_int(v) and 0 <= v <= 1000,
                   "an integer in [0, 1000]")
    top_p = _field(body, "top_p", 0.0, lambda v: _is_number(v) and 0.0 <= v <= 1.0,
                   "a number in [0, 1]")
    if top_k > 0 and top_p > 0.0:
        raise RequestError("cannot set both top-k and top-p samplings (top_k and top_p)")
    add_bos = _field(body, "add_BOS", False, lambda v: isinstance(v, bool), "a boolean")
    seed = _field(body, "random_seed", None, lambda v: _is_int(v) and 0 <= v < 2 ** 63,
                  "an integer in [0, 2**63)")
    if seed is None:  # Megatron: unseeded requests draw differently each time
        seed = secrets.randbelow(2 ** 63)
    stop = list(_field(body, "stop_sequences", [], lambda v: isinstance(v, list) and all(
        isinstance(s, str) and s for s in v), "a list of non-empty strings"))
    for name, text in (("stop_on_eol", "\n"), ("stop_on_double_eol", "\n\n")):
        if _field(body, name, False, lambda v: isinstance(v, bool), "a boolean"):
            stop.append(text)
    stop_token = _field(body, "stop_token", None,
                        lambda v: _is_int(v) and 0 <= v < tokenizer.vocab_size,
                        f"a token id in [0, {tokenizer.vocab_size})")
    _field(body, "no_log", False, lambda v: isinstance(v, bool), "a boolean")
    if any(not p for p in prompts) and not add_bos:
        raise RequestError("Empty prompts require add_BOS=true")
    if add_bos and tokenizer.eod is None:
        raise RequestError("add_BOS: this tokenizer has no end-of-document token to use")
    bos = [tokenizer.eod] if add_bos else []
    prompt_ids = [bos + ids for ids in tokenizer.encode_batch(prompts)]
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise RequestError(f"prompts[{i}] has no tokens")
        if len(ids) >= context_length:
            raise RequestError(f"prompts[{i}] has {len(ids)} tokens; the context is "
                               f"{context_length} tokens, leaving none to generate")
    return GenerateRequest(prompts=prompts, prompt_ids=prompt_ids, tokens_to_generate=n,
                           temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                           random_seed=seed, logprobs=logprobs, stop=stop, stop_token=stop_token)


# ------------------------------------------------------------------------- every rank runs
def run_request(runner: StageRunner, tokenizer, request: GenerateRequest,
                context_length: int) -> list[Generation]:
    """generate_tokens for a checked request (every rank calls it with the same request); each
    Generation's `text` is the continuation cut before the first stop string."""
    stop = request.stop

    def should_stop(_, result: Generation) -> bool:
        return _cut_at_stop(tokenizer.detokenize(result.token_ids), stop)[1]

    eod = request.stop_token if request.stop_token is not None else tokenizer.eod
    pad = tokenizer.pad if tokenizer.pad is not None else (tokenizer.eod or 0)
    results = generate_tokens(runner, request.prompt_ids,
                              max_new_tokens=request.tokens_to_generate,
                              sampling=request.sampling(), eod=eod,
                              context_length=context_length, return_logprobs=request.logprobs,
                              should_stop=should_stop if stop else None, pad_id=pad)
    for result in results:
        result.text = _cut_at_stop(tokenizer.detokenize(result.token_ids), stop)[0]
    return results


def response(tokenizer, request: GenerateRequest, results: list[Generation]) -> dict:
    """Megatron's fields: "text" (prompt + continuation), "segments" (each token's text),
    "logprobs" (of the generated tokens; null unless asked), and "tokens" (prompt + generated)."""
    tokens = [r.prompt_ids + r.token_ids for r in results]
    return {"text": [p + r.text for p, r in zip(request.prompts, results)],
            "segments": [[tokenizer.detokenize([t]) for t in ids] for ids in tokens],
            "logprobs": [r.logprobs for r in results] if request.logprobs else None,
            "tokens": tokens}


def send_command(command: int, payload: bytes = b"") -> None:
    """Rank 0: [command, len(payload)] then the payload bytes, to every rank."""
    if not dist.is_initialized():
        return
    on = device.current_device()
    dist.broadcast(torch.tensor([command, len(payload)], dtype=torch.long, device=on), src=0)
    if payload:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(on)
        dist.broadcast(data, src=0)


def receive_command() -> tuple[int, bytes]:
    on = device.current_device()
    header = torch.zeros(2, dtype=torch.long, device=on)
    dist.broadcast(header, src=0)
    command, size = header.tolist()
    if not size:
        return command, b""
    data = torch.empty(size, dtype=torch.uint8, device=on)
    dist.broadcast(data, src=0)
    return command, data.cpu().numpy().tobytes()


def follow(runner: StageRunner, tokenizer, context_length: int, log=print) -> None:
    """Ranks other than 0: generate what rank 0 says until it says STOP. Signals are ignored
    (torchrun forwards its SIGTERM to every worker): rank 0 decides when all stop."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        command, payload = receive_command()
        if command == STOP:
            return
        try:
            run_request(runner, tokenizer, GenerateRequest(**json.loads(payload)), context_length)
        except Exception as error:  # noqa: BLE001  rank 0 meets the same one and reports it
            log(f" > request failed: {error}")


# ------------------------------------------------------------------------------- rank 0
class GenerationServer:
    """Rank 0's HTTP side: checks a request, then (under the lock) broadcasts it and generates."""

    def __init__(self, runner: StageRunner, tokenizer, context_length: int,
                 config: ServerConfig, log=print):
        self.runner, self.tokenizer, self.context_length = runner, tokenizer, context_length
        self.config, self.log = config, log
        self.lock = threading.Lock()

    def handle(self, data: bytes) -> tuple[int, dict]:
        try:
            request = parse_request(data, self.tokenizer, self.config, self.context_length)
        except RequestError as error:
            return 400, {"message": str(error)}
        with self.lock:  # one request at a time on every rank: the collectives must not mix
            send_command(GENERATE, json.dumps(asdict(request)).encode("utf-8"))
            try:
                results = run_request(self.runner, self.tokenizer, request, self.context_length)
            except Exception as error:  # noqa: BLE001  the other ranks failed alike and follow on
                self.log(f" > request failed: {error}")
                return 500, {"message": f"generation failed: {error}"}
        return 200, response(self.tokenizer, request, results)

    def app(self):
        from flask import Flask, jsonify, request
        from werkzeug.exceptions import HTTPException

        app = Flask(__name__)
        app.config["MAX_CONTENT_LENGTH"] = self.config.max_request_bytes  # 413 beyond it

        @app.put("/api")
        def api():
            status, body = self.handle(request.get_data())
            return jsonify(body), status

        @app.errorhandler(HTTPException)
        def http_error(error: HTTPException):
            message = error.description
            if error.code == 413:
                message = f"the request body is over {self.config.max_request_bytes} bytes " \
                          f"(--max-request-bytes)"
            return jsonify(message=message), error.code

        return app

    def serve(self) -> int:
        """Serve until SIGINT / SIGTERM, then tell every rank to stop; 2 if the port is taken."""
        from werkzeug.serving import make_server

        try:
            try:  # bound here: werkzeug's own bind failure prints two lines and exits
                listening = socket.create_server((self.config.host, self.config.port))
            except OSError as error:
                self.log(f"error: cannot listen on {self.config.host}:{self.config.port} "
                         f"({error.strerror or error})")
                return 2
            with listening:
                http = make_server(self.config.host, self.config.port, self.app(),
                                   threaded=True, fd=listening.fileno())

            def stop(signum, frame):  # ends serve_forever (it catches KeyboardInterrupt)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, stop)
            signal.signal(signal.SIGTERM, stop)
            self.log(f" > serving on http://{self.config.host}:{http.port}/api")
            http.serve_forever()
            self.log(" > stopping: no new requests; the other ranks stop after the current one")
            return 0
        finally:
            with self.lock:  # a request in flight finishes first
                send_command(STOP)
