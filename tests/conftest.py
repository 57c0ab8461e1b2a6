import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.join(REPO_ROOT, "..", "shared", "fixtures", "megatron")
FIXTURE_PREFIX = os.path.join(FIXTURE_DIR, "meg-gpt2-openwebtext_text_document")

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


@pytest.fixture
def megatron_fixture():
    """Prefix of the Megatron-written test dataset in ../shared/fixtures/megatron (read-only)."""
    if not os.path.exists(FIXTURE_PREFIX + ".idx"):
        pytest.skip(f"Megatron fixture not found at {FIXTURE_DIR} (expected beside the repo)")
    return FIXTURE_PREFIX


def kill_process_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it at once (kill -9 of a whole torchrun job):
    torchrun starts each worker in its own session, so killing its process group alone would
    leave the workers running."""
    import signal
    import subprocess

    pids, frontier = [pid], [pid]
    while frontier:
        children = subprocess.run(["pgrep", "-P", ",".join(map(str, frontier))],
                                  capture_output=True, text=True).stdout.split()
        frontier = [int(child) for child in children]
        pids += frontier
    for each in pids:
        try:
            os.kill(each, signal.SIGKILL)
        except ProcessLookupError:
            pass
