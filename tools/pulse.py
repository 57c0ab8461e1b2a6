"""Is the training job alive? One line and an exit status a cron job or a SLURM script acts on.

    python tools/pulse.py --save DIR [--heartbeat-file FILE] [--stall-minutes 30] \
        [--relaunch "CMD" --max-relaunches 3 --relaunch-log FILE]

Reads the job's heartbeat (`--heartbeat-file`, default DIR/heartbeat.json, written by
pretrain_bloom.py's global rank 0) and the checkpoint tracker under DIR, and prints one of:

    alive: iteration 120/1000, last beat 14 s ago, loss 3.210, latest checkpoint 100   (exit 0)
    finished: iteration 1000/1000 ...                                                 (exit 0)
    stopped: kill switch ... (the operator's stop: never relaunched)                  (exit 0)
    stopped: --exit-duration-in-mins 1200 at iteration 400/1000 ...                   (exit 5)
    stalled: no beat for 47 minutes (iteration 120/1000) ...                          (exit 3)
    dead: pid 4242 is gone (iteration 120/1000) ...  /  failed: REASON ...            (exit 4)
    not started: no heartbeat at DIR/heartbeat.json                                   (exit 4)

With `--relaunch CMD`, a job that is stalled, dead, failed, not started or stopped before its
last iteration is started again with CMD (a shell command, detached, its output appended to
`--relaunch-log`), at most `--max-relaunches` times in all (counted in DIR/pulse.json); a stalled
job on this host is stopped first (SIGTERM to its launcher and worker, SIGKILL after
`--grace-seconds`). The relaunched job resumes from the latest complete checkpoint (give CMD
`--load DIR`). Run it hourly from cron, as BigScience checked its BLOOM run:

    0 * * * * cd /path/to/AscendSpeed && python tools/pulse.py --save /ckpt/bloom \
        --relaunch "sbatch train_bloom.slurm" >> /ckpt/bloom/pulse.log 2>&1

Exit 2 with a one-line error when the heartbeat cannot be read.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as `python tools/pulse.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.checkpoint.io import read_tracker  # noqa: E402
from ascendspeed.errors import AscendSpeedError, CheckpointError, HeartbeatError, error_line  # noqa: E402
from ascendspeed.job import heartbeat as hb  # noqa: E402

ALIVE, STALLED, DEAD, STOPPED_EARLY, ERROR = 0, 3, 4, 5, 2
KILL_SWITCH = "kill switch"  # the start of the reason the trainer writes for --kill-switch-path
RELAUNCH_FILENAME = "pulse.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", required=True, help="the job's --save directory")
    parser.add_argument("--heartbeat-file", default=None, help="default: SAVE/heartbeat.json")
    parser.add_argument("--stall-minutes", type=float, default=30.0,
                        help="a running job with no beat for this long is stalled (default 30)")
    parser.add_argument("--relaunch", default=None, metavar="CMD",
                        help="shell command that starts the job again (e.g. an sbatch line)")
    parser.add_argument("--max-relaunches", type=int, default=3)
    parser.add_argument("--relaunch-log", default=None, help="default: SAVE/relaunch.log")
    parser.add_argument("--grace-seconds", type=float, default=30.0,
                        help="how long a stalled job gets after SIGTERM before SIGKILL")
    return parser.parse_args(argv)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _progress(status: dict) -> str:
    return f"iteration {status.get('iteration')}/{status.get('train_iters')}"


def diagnose(status: dict | None, heartbeat_path: str, stall_minutes: float, now: float) -> tuple[int, str]:
    """(exit status, the line) for a heartbeat (None: there is none)."""
    if status is None:
        return DEAD, f"not started: no heartbeat at {heartbeat_path}"
    state, reason = status["state"], status.get("reason")
    if state == hb.FINISHED:
        return ALIVE, f"finished: {_progress(status)}"
    if state == hb.STOPPED:
        if reason and reason.startswith(KILL_SWITCH):
            return ALIVE, f"stopped: {reason} at {_progress(status)} (not relaunched: the operator's stop)"
        return STOPPED_EARLY, f"stopped: {reason} at {_progress(status)}"
    if state == hb.FAILED:
        return DEAD, f"failed: {reason} (at {_progress(status)})"
    age = now - float(status["time"])
    local = status.get("host") == socket.gethostname()
    if local and not _pid_exists(int(status["pid"])):
        return DEAD, f"dead: pid {status['pid']} is gone ({_progress(status)}, last beat {age / 60:.0f} min ago)"
    if age > 60.0 * stall_minutes:
        return STALLED, f"stalled: no beat for {age / 60:.0f} minutes ({_progress(status)}, host {status.get('host')})"
    loss = status.get("loss")
    loss_text = f", loss {loss:.3f}" if isinstance(loss, (int, float)) else ""
    return ALIVE, f"alive: {_progress(status)}, last beat {age:.0f} s ago{loss_text}"


def _stop_stalled(status: dict, grace: float) -> None:
    """SIGTERM the launcher and the worker, then SIGKILL what is left after `grace` seconds."""
    pids = [int(status["launcher_pid"]), int(status["pid"])]
    for pid in pids:
        if _pid_exists(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_pid_exists(pid) for pid in pids):
        time.sleep(0.5)
    for pid in pids:
        if _pid_exists(pid):
            os.kill(pid, signal.SIGKILL)


def _read_relaunches(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {"relaunches": 0, "history": []}
    except (OSError, ValueError) as error:
        raise HeartbeatError(f"{path}: unreadable relaunch record ({error}); remove it to reset the count")


def relaunch(args, status: dict | None, code: int) -> str:
    """Start the job again if it may be (the line saying what was done)."""
    record_path = os.path.join(args.save, RELAUNCH_FILENAME)
    record = _read_relaunches(record_path)
    if record["relaunches"] >= args.max_relaunches:
        return f"not relaunched: --max-relaunches {args.max_relaunches} reached (see {record_path})"
    if code == STALLED:
        if status.get("host") != socket.gethostname():
            return f"not relaunched: the stalled job runs on {status.get('host')}; stop it there first"
        _stop_stalled(status, args.grace_seconds)
    log_path = args.relaunch_log or os.path.join(args.save, "relaunch.log")
    with open(log_path, "a", encoding="utf-8") as log:
        process = subprocess.Popen(args.relaunch, shell=True, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    record["relaunches"] += 1
    record["history"].append({"time": time.time(), "pid": process.pid, "command": args.relaunch,
                              "after": None if status is None else status.get("iteration")})
    temporary = record_path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(temporary, record_path)
    return f"relaunched ({record['relaunches']} of {args.max_relaunches}): {args.relaunch} (pid {process.pid})"


def main(argv=None) -> int:
    args = parse_args(argv)
    path = args.heartbeat_file or os.path.join(args.save, hb.HEARTBEAT_FILENAME)
    try:
        try:
            status = hb.read_heartbeat(path)
        except FileNotFoundError:
            status = None
        except (OSError, ValueError) as error:
            raise HeartbeatError(f"{path}: cannot read the heartbeat ({error})")
        code, line = diagnose(status, path, args.stall_minutes, time.time())
        try:
            latest = read_tracker(args.save)
        except CheckpointError:
            latest = "unreadable"
        line += f", latest checkpoint {latest if latest is not None else 'none'}"
        print(line, flush=True)
        if args.relaunch and code in (STALLED, DEAD, STOPPED_EARLY):
            print(relaunch(args, status, code), flush=True)
    except AscendSpeedError as error:
        print(error_line(error), file=sys.stderr)
        return ERROR
    return code


if __name__ == "__main__":
    sys.exit(main())
