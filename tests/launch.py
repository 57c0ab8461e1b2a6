"""The one way tests start processes: torchrun jobs and plain scripts, every wait bounded.

torchrun always runs `--standalone`: its rendezvous store binds port 0 (the kernel picks a free
port while the socket is open) and the workers' process group reuses that store
(TORCH_DISABLE_SHARE_RDZV_TCP_STORE unset), so no port is chosen ahead of time, none is
hard-coded, and two launches in a row (or two test sessions at once) cannot collide.

On a timeout the whole process tree is killed (torchrun starts each worker in its own session,
so killing torchrun alone would leave workers blocked in a collective) and the test fails with
the end of the output.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Environment variables that would make torchrun pick a fixed port or stop sharing its store.
_PORT_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
# Its sitecustomize.py installs tests/collective_guard.py in every launched process.
GUARD_SITE = os.path.join(REPO_ROOT, "tests", "guard_site")


def launch_env(env: dict | None = None, **extra: str) -> dict:
    """`env` (default: os.environ less any inherited fixed port) for a launched process, with
    `extra` set: one thread per process (the tests run several processes on two cores), this
    checkout first on PYTHONPATH (workers under tests/dist import the repository, whether or not
    it is installed), then the collective guard's site directory, switched on unless the
    environment sets ASCENDSPEED_COLLECTIVE_GUARD=0."""
    if env is None:
        out = {k: v for k, v in os.environ.items() if k not in _PORT_VARIABLES}
    else:
        out = dict(env)
    out.setdefault("OMP_NUM_THREADS", "1")
    out.setdefault("ASCENDSPEED_COLLECTIVE_GUARD", "1")
    paths = [REPO_ROOT, GUARD_SITE] + [p for p in out.get("PYTHONPATH", "").split(os.pathsep)
                                       if p and p not in (REPO_ROOT, GUARD_SITE)]
    out["PYTHONPATH"] = os.pathsep.join(paths)
    out.update(extra)
    return out


def _target(script: str) -> list[str]:
    """A script path (relative to the repository root, or absolute), or `-m module`."""
    if script.startswith("-m "):
        return ["-m", script[3:]]
    return [script if os.path.isabs(script) else os.path.join(REPO_ROOT, script)]


def torchrun_command(script: str, args=(), nproc: int = 1, launcher_args=()) -> list[str]:
    """`launcher_args`: more torchrun flags (e.g. --max-restarts 1)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *launcher_args, *_target(script), *map(str, args)]


def kill_process_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it at once (kill -9 of a whole torchrun job)."""
    import signal

    pids, frontier = [pid], [pid]
    while frontier:
        children = subprocess.run(["pgrep", "-P", ",".join(map(str, frontier))],
                                  capture_output=True, text=True, timeout=30).stdout.split()
        frontier = [int(child) for child in children]
        pids += frontier
    for each in pids:
        try:
            os.kill(each, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_command(command: list[str], *, env: dict | None = None, timeout: float = 300,
                cwd: str = REPO_ROOT, input: str | None = None) -> subprocess.CompletedProcess:
    """Run `command` to completion within `timeout` seconds (then: its whole tree killed, and
    the test fails with the end of its output); stdout and stderr captured as text."""
    process = subprocess.Popen(command, cwd=cwd, env=launch_env(env), text=True,
                               stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(process.pid)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:6])} ... did not finish within {timeout} s:\n"
                    f"{stdout[-2000:]}\n{stderr[-3000:]}", pytrace=False)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_python(script: str, args=(), *, env: dict | None = None, timeout: float = 300,
               cwd: str = REPO_ROOT, input: str | None = None) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` (one process), bounded as run_command."""
    return run_command([sys.executable, *_target(script), *map(str, args)], env=env,
                       timeout=timeout, cwd=cwd, input=input)


def run_torchrun(script: str, args=(), nproc: int = 1, *, env: dict | None = None,
                 timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=NPROC SCRIPT ARGS`, bounded as run_command;
    `check`: fail the test (with the end of the output) on a non-zero exit status."""
    result = run_command(torchrun_command(script, args, nproc), env=env, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def start_torchrun(script: str, args=(), nproc: int = 1, *, env: dict | None = None,
                   stdout=None, stderr=None, new_session: bool = True,
                   launcher_args=()) -> subprocess.Popen:
    """A torchrun job left running (a server, a job to kill): the caller waits with a timeout
    and ends it with kill_process_tree."""
    return subprocess.Popen(torchrun_command(script, args, nproc, launcher_args), cwd=REPO_ROOT,
                            env=launch_env(env), stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=stderr, text=True, start_new_session=new_session)
