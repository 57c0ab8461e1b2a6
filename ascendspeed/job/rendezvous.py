"""Joining the default process group, also after torchrun restarted the workers.

torchrun's c10d and static rendezvous share the launcher's TCPStore with the workers
(TORCHELASTIC_USE_AGENT_STORE=True, unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), and torch
hosts that store once per launcher: the workers of a restarted attempt meet in the same store as
the dead attempt's, with no per-attempt prefix. Process-group names restart at "0", "1", ... in
every new process, so init_process_group and new_group read what the dead workers left there:
gloo dials their addresses ("Connection refused"), store-based barriers count their arrivals
(a hang). TORCHELASTIC_RESTART_COUNT is no attempt id either: it counts one launcher's
restarts, and a launcher restarted for a membership change does not count.

So the workers of an attempt agree on a prefix of their own, one that no earlier attempt used:
rank 0's fresh random id. A rank may read a dead attempt's id from the store, so rank 0
confirms the id to each rank by echoing that rank's own fresh random id; only a live rank 0
of this attempt can. Every key of the process groups then lives under that id.
"""
from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta

import torch.distributed as dist

from ascendspeed.errors import TrainingError

LEADER_KEY = "ascendspeed/rendezvous/leader"


def init_process_group(backend: str, timeout: timedelta) -> None:
    """dist.init_process_group for a launched worker (RANK, WORLD_SIZE, MASTER_ADDR/PORT in
    the environment); `timeout` bounds the rendezvous and every collective of the group."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        dist.init_process_group(backend=backend, timeout=timeout)  # a store of this attempt's
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    shared = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           is_master=False, timeout=timeout)
    attempt = _agree_on_attempt(shared, rank, world_size, timeout)
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"ascendspeed/{attempt}", shared),
                            rank=rank, world_size=world_size, timeout=timeout)


def _agree_on_attempt(store, rank: int, world_size: int, timeout: timedelta) -> str:
    """The id of this attempt, the same on every rank: rank 0's, confirmed by its echo."""
    mine = uuid.uuid4().hex
    minutes = f"{timeout.total_seconds() / 60:g}"
    if rank == 0:
        store.set(LEADER_KEY, mine)
        joins = [f"ascendspeed/rendezvous/{mine}/join/{other}" for other in range(1, world_size)]
        try:
            store.wait(joins, timeout)
        except dist.DistStoreError:
            missing = [key.rsplit("/", 1)[1] for key in joins if not store.check([key])]
            raise TrainingError(f"rank 0: rank(s) {', '.join(missing)} did not join within "
                                f"--distributed-timeout-minutes {minutes}") from None
        for key in joins:
            store.set(key.replace("/join/", "/echo/"), store.get(key))
        return mine
    deadline = time.monotonic() + timeout.total_seconds()
    pause = 0.01
    while time.monotonic() < deadline:
        if store.check([LEADER_KEY]):
            leader = store.get(LEADER_KEY).decode()
            store.set(f"ascendspeed/rendezvous/{leader}/join/{rank}", mine)
            echo = f"ascendspeed/rendezvous/{leader}/echo/{rank}"
            if store.check([echo]) and store.get(echo).decode() == mine:
                return leader
        time.sleep(pause)  # no rank 0 yet, or a dead attempt's id: ask again
        pause = min(2 * pause, 0.5)
    raise TrainingError(f"rank {rank}: no rank 0 of this attempt answered within "
                        f"--distributed-timeout-minutes {minutes}")
