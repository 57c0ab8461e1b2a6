"""Run under torchrun by tests/test_collective_devices.py: shows the collective guard is live in
a launched worker. Legal collectives first (host tensors, an object collective, a barrier, over
the product's default group and a dist.new_group), then, with --bad, a meta tensor handed to
all_reduce on the new group, which the guard must refuse."""
import sys

import torch
import torch.distributed as dist

from ascendspeed import device

dist.init_process_group(device.distributed_backend())
group = dist.new_group(list(range(dist.get_world_size())))
guard = sys.modules.get("collective_guard")
print(f"rank {dist.get_rank()}: guard {'on' if guard and guard.installed() else 'off'}, "
      f"default {dist.get_backend_config()}, new_group {dist.get_backend_config(group)}",
      flush=True)
flag = torch.tensor([float(dist.get_rank())])
dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
names = [None] * dist.get_world_size()
dist.all_gather_object(names, f"rank{dist.get_rank()}", group=group)
dist.barrier()
print(f"rank {dist.get_rank()}: legal collectives done ({flag.item():.0f}, {names})", flush=True)
if "--bad" in sys.argv:
    dist.all_reduce(torch.ones(3, device="meta"), group=group)  # BAD-LINE
dist.destroy_process_group()
