"""A client for tools/run_text_generation_server.py (and Megatron-LM's server), as Megatron's:

    python tools/text_generation_cli.py localhost:5000
    python tools/text_generation_cli.py http://127.0.0.1:5000/api --prompt "To be" \\
        --tokens-to-generate 20 [--temperature T] [--top-k K] [--top-p P] [--random-seed S]

Without --prompt it asks for a prompt and a number of tokens, PUTs them and prints the text,
until end of input. The URL's scheme defaults to http:// and its path to /api. Standard library
only (urllib). A refused request prints "Error STATUS: message" on stderr, exit status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def api_url(url: str) -> str:
    if "://" not in url:
        url = "http://" + url
    scheme, rest = url.split("://", 1)
    return url if "/" in rest else f"{scheme}://{rest}/api"


def put(url: str, body: dict, timeout: float | None = None) -> tuple[int, dict]:
    """(HTTP status, the JSON answer); errors come back as Megatron's {"message": ...}."""
    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), method="PUT",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode("utf-8", "replace")
        try:
            return error.code, json.loads(text)
        except json.JSONDecodeError:
            return error.code, {"message": text}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the server, e.g. localhost:5000 or http://HOST:PORT/api")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt (repeatable); without one, prompts are asked for")
    parser.add_argument("--tokens-to-generate", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--random-seed", type=int, default=None)
    return parser.parse_args(argv)


def request_body(args: argparse.Namespace, prompts: list[str], tokens: int) -> dict:
    body = {"prompts": prompts, "tokens_to_generate": tokens}
    for name in ("temperature", "top_k", "top_p", "random_seed"):
        if getattr(args, name) is not None:  # unset: the server's (Megatron's) default
            body[name] = getattr(args, name)
    return body


def show(status: int, answer: dict) -> bool:
    if status != 200:
        print(f"Error {status}: {answer.get('message', answer)}", file=sys.stderr)
        return False
    for text in answer["text"]:
        print(text, flush=True)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    url = api_url(args.url)
    try:
        if args.prompt:
            ok = show(*put(url, request_body(args, args.prompt, args.tokens_to_generate)))
            return 0 if ok else 1
        while True:  # Megatron's loop: a prompt, then how many tokens
            try:
                prompt = input("Enter prompt: ")
                tokens = int(input("Enter number of tokens to generate: "))
            except EOFError:
                return 0
            except ValueError:
                print("the number of tokens must be an integer", file=sys.stderr)
                continue
            print("Megatron Response: ")
            show(*put(url, request_body(args, [prompt], tokens)))
    except urllib.error.URLError as error:
        print(f"error: cannot reach {url} ({error.reason})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
