"""tools/run_text_generation_server.py: a real server (torchrun, 2 processes, TP=2) from a tiny
pretrain_bloom.py checkpoint, answering real HTTP requests: greedy and seeded text equal the
one-process generate_text, logprobs, Megatron's 400s (and 413) with the server still serving,
concurrent requests queued, tools/text_generation_cli.py, and SIGTERM stopping every rank."""
import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from launch import REPO_ROOT, kill_process_tree, run_python, start_torchrun
from test_generation import checkpoint, generate_args  # noqa: F401 (checkpoint: a fixture)
from test_pretrain import corpus  # noqa: F401 (a fixture)

from ascendspeed.generation import SamplingParams, StageRunner, generate_text, generate_tokens
from tolerances import assert_logprobs_close

SERVER = os.path.join(REPO_ROOT, "tools", "run_text_generation_server.py")
CLI = os.path.join(REPO_ROOT, "tools", "text_generation_cli.py")
PROMPTS = ["hello world", "the quick brown fox"]
LIMITS = ["--max-prompts", "3", "--max-tokens-to-generate", "16", "--max-request-bytes", "2000"]


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The one-process (TP=1) runner and tokenizer of the checkpoint, in this process."""
    from ascendspeed.arguments import parse_args
    from ascendspeed.generation.launch import start_processes
    from ascendspeed.generation.loading import load_stage, prepare

    args = parse_args(generate_args(checkpoint))
    setup = prepare(args, 1, log=lambda message: None)
    start_processes(setup, None, args.seed)
    runner = StageRunner(load_stage(setup, log=lambda message: None), setup.tokenizer.vocab_size)
    return runner, setup.tokenizer


def expected_text(reference, prompts, sampling, n=5):
    runner, tokenizer = reference
    results = generate_text(runner, tokenizer, prompts, max_new_tokens=n, sampling=sampling,
                            context_length=32)
    return [p + r.text for p, r in zip(prompts, results)], results


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """The server at TP=2 (the checkpoint resharded), on a free port; its log file."""
    url, proc, log = start_server(checkpoint, tmp_path_factory.mktemp("server"))
    yield url, proc, log
    if proc.poll() is None:
        kill_process_tree(proc.pid)


def start_server(checkpoint, root):
    """A TP=2 server of `checkpoint` (resharded under `root`) once it serves: (url, torchrun's
    Popen, its log file)."""
    from ascendspeed.checkpoint.reshard import reshard

    reshard(str(checkpoint[1]), str(root / "tp2"), 2, 1, pad_vocab_size_to=512,
            log=lambda message: None)
    log = root / "server.log"
    args = generate_args((checkpoint[0], root / "tp2"))[:-2]  # no --max-new-tokens
    with open(log, "w") as out:
        proc = start_torchrun(SERVER, [*args, "--tensor-model-parallel-size", "2", "--port", "0",
                                       *LIMITS], 2, stdout=out, stderr=subprocess.STDOUT,
                              new_session=False)
    deadline = time.time() + 120
    while not (found := re.search(r"serving on (http://127\.0\.0\.1:\d+/api)", log.read_text())):
        if proc.poll() is not None or time.time() > deadline:
            kill_process_tree(proc.pid)
            pytest.fail(log.read_text()[-3000:], pytrace=False)
        time.sleep(0.2)
    return found.group(1), proc, log


def put(url, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="PUT",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.multiprocess
def test_greedy_text_equals_one_process_generate_text(server, reference):
    url = server[0]
    status, answer = put(url, {"prompts": PROMPTS, "tokens_to_generate": 5, "top_k": 1})
    assert status == 200, answer
    texts, results = expected_text(reference, PROMPTS, SamplingParams(greedy=True))
    assert answer["text"] == texts
    assert answer["tokens"] == [r.prompt_ids + r.token_ids for r in results]
    tokenizer = reference[1]
    assert answer["segments"] == [[tokenizer.detokenize([t]) for t in ids]
                                  for ids in answer["tokens"]]
    assert answer["logprobs"] is None


@pytest.mark.multiprocess
def test_logprobs_and_seeded_sampling(server, reference):
    url = server[0]
    status, answer = put(url, {"prompts": PROMPTS, "tokens_to_generate": 5, "top_k": 1,
                               "logprobs": True})
    assert status == 200, answer
    runner, tokenizer = reference
    ids = tokenizer.encode_batch(PROMPTS)
    local = generate_tokens(runner, ids, max_new_tokens=5, sampling=SamplingParams(greedy=True),
                            eod=tokenizer.eod, context_length=32, return_logprobs=True,
                            pad_id=tokenizer.eod)
    for got, want in zip(answer["logprobs"], local):
        assert len(got) == len(want.token_ids) and all(g <= 0 for g in got)
        assert_logprobs_close(got, want.logprobs, what="server TP=2 vs one process")
    body = {"prompts": PROMPTS, "tokens_to_generate": 8, "temperature": 0.9, "top_p": 0.9,
            "random_seed": 3}
    first, second = put(url, body)[1], put(url, body)[1]
    texts, _ = expected_text(reference, PROMPTS, SamplingParams(temperature=0.9, top_p=0.9,
                                                                seed=3), n=8)
    assert first["text"] == second["text"] == texts


@pytest.mark.multiprocess
@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"tokens_to_generate": 3}, 400, "prompts argument required"),
    ({"prompts": "hello"}, 400, "prompts must be a list of strings"),
    ({"prompts": ["a", 3]}, 400, "prompts must be a list of strings"),
    ({"prompts": []}, 400, "prompts is empty"),
    ({"prompts": ["a"] * 4}, 400, "the maximum is 3 (--max-prompts)"),
    ({"prompts": ["a"], "tokens_to_generate": "5"}, 400, "tokens_to_generate must be an integer"),
    ({"prompts": ["a"], "tokens_to_generate": -1}, 400, "tokens_to_generate must be an integer"),
    ({"prompts": ["a"], "tokens_to_generate": 0, "logprobs": True}, 400, "scoring prompts"),
    ({"prompts": ["a"], "tokens_to_generate": 17}, 400, "<= 16 (--max-tokens-to-generate)"),
    ({"prompts": ["a"], "temperature": 0}, 400, "temperature must be a number in (0, 100]"),
    ({"prompts": ["a"], "temperature": 101.0}, 400, "temperature must be a number in (0, 100]"),
    ({"prompts": ["a"], "top_k": 1.5}, 400, "top_k must be an integer in [0, 1000]"),
    ({"prompts": ["a"], "top_k": -1}, 400, "top_k must be an integer in [0, 1000]"),
    ({"prompts": ["a"], "top_p": 1.5}, 400, "top_p must be a number in [0, 1]"),
    ({"prompts": ["a"], "top_k": 5, "top_p": 0.5}, 400, "cannot set both top-k and top-p"),
    ({"prompts": ["a"], "logprobs": "yes"}, 400, "logprobs must be a boolean"),
    ({"prompts": ["a"], "random_seed": -2}, 400, "random_seed must be an integer"),
    ({"prompts": [""]}, 400, "Empty prompts require add_BOS=true"),
    ({"prompts": ["a"], "beam_width": 2}, 400, "beam_width is not supported"),
    ({"prompts": ["x" * 40]}, 400, "prompts[0] has 40 tokens; the context is 32 tokens"),
    ({"prompts": ["x" * 3000]}, 413, "over 2000 bytes (--max-request-bytes)"),
], ids=lambda v: str(v)[:30] if not isinstance(v, (dict, bytes)) else None)
def test_bad_requests_are_refused_and_the_server_keeps_serving(server, body, status, message):
    got, answer = put(server[0], body, raw=isinstance(body, bytes))
    assert got == status and message in answer["message"], answer
    status, answer = put(server[0], {"prompts": ["hello world"], "tokens_to_generate": 2})
    assert status == 200 and answer["text"][0].startswith("hello world")


@pytest.mark.multiprocess
def test_concurrent_requests_are_queued(server, reference):
    bodies = [{"prompts": [p], "tokens_to_generate": 12, "top_k": 1} for p in PROMPTS]
    answers = [None, None]

    def ask(i):
        answers[i] = put(server[0], bodies[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for prompt, (status, answer) in zip(PROMPTS, answers):
        assert status == 200, answer
        assert answer["text"] == expected_text(reference, [prompt], SamplingParams(greedy=True),
                                               n=12)[0]


@pytest.mark.multiprocess
def test_cli_asks_the_server(server, reference):
    url = server[0]
    text = expected_text(reference, [PROMPTS[0]], SamplingParams(greedy=True))[0][0]
    address = url.replace("http://", "").replace("/api", "")
    result = run_python(CLI, [address, "--prompt", PROMPTS[0], "--tokens-to-generate", "5",
                              "--top-k", "1"], timeout=60)
    assert result.returncode == 0 and result.stdout == text + "\n", result.stderr
    result = run_python(CLI, [address], input=f"{PROMPTS[0]}\n3\n",
                        timeout=60)  # interactive, Megatron's prompts
    assert result.returncode == 0, result.stderr
    assert "Enter prompt: " in result.stdout and f"Megatron Response: \n{PROMPTS[0]}" in result.stdout
    result = run_python(CLI, [address, "--prompt", "a", "--tokens-to-generate", "99"], timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("Error 400: tokens_to_generate must be <= 16")


@pytest.mark.parametrize("extra,message", [
    (("--port", "70000"), "--port must be in [0, 65535], got 70000"),
    (("--max-prompts", "0"), "--max-prompts must be >= 1, got 0"),
    (("--port", "BUSY"), "cannot listen on 127.0.0.1:"),
], ids=["port", "max-prompts", "port-taken"])
def test_bad_flags_and_a_taken_port_exit_2(checkpoint, capsys, extra, message):
    """In one process (no torchrun): one line on stderr, exit status 2."""
    import importlib.util
    import socket

    spec = importlib.util.spec_from_file_location("run_text_generation_server", SERVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        extra = tuple(str(busy.getsockname()[1]) if e == "BUSY" else e for e in extra)
        assert module.main(generate_args(checkpoint)[:-2] + list(extra)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(" > ")]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.multiprocess
def test_workers_stop_when_their_launcher_is_killed(checkpoint, tmp_path):
    """kill -9 of torchrun alone (its workers live in their own sessions): each worker sees it
    was re-parented and exits within seconds, freeing its port and device."""
    url, proc, log = start_server(checkpoint, tmp_path)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                             text=True, timeout=30).stdout.split()
    assert len(workers) == 2
    try:
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.time() + 20
        while time.time() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), log.read_text()[-3000:]
        assert "the launcher (pid" in log.read_text()
    finally:
        for pid in workers:
            kill_process_tree(int(pid))


def _alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.multiprocess
def test_sigterm_stops_every_rank(server):
    """Last in the module: SIGTERM to torchrun (it forwards it to its workers, each in its own
    session); rank 0 broadcasts STOP, every rank leaves its loop and exits before torchrun's
    SIGKILL would come (30 s)."""
    url, proc, log = server
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                             text=True, timeout=30).stdout.split()
    assert len(workers) == 2
    start = time.time()
    proc.terminate()
    proc.wait(timeout=60)
    assert time.time() - start < 25
    assert "server stopped" in log.read_text(), log.read_text()[-3000:]
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z"
