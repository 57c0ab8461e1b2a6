"""Collectives on every backend.

1. ascendspeed.device.distributed_backend: the per-device map every process group of ours is
   created with (host tensors over cpu:gloo, the device's over nccl / hccl), per device type and
   for the users' --distributed-backend values; torch's dist.new_group inherits it.
2. tests/collective_guard.py, installed in this process and in every launched one: a collective
   handed a tensor its group cannot carry raises, naming the collective and the caller. Here
   every group is gloo, so a meta tensor plays the tensor gloo cannot carry.
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist

import collective_guard
from ascendspeed import device
from ascendspeed.arguments import ParallelConfig, parse_args
from ascendspeed.core import parallel_state as ps
from ascendspeed.errors import ConfigError
from launch import REPO_ROOT, run_command, run_torchrun


# ------------------------------------------------------------------------------- 1. the map
@pytest.mark.parametrize("kind,expected", [
    ("cpu", "cpu:gloo"), ("cuda", "cpu:gloo,cuda:nccl"), ("npu", "cpu:gloo,npu:hccl")])
def test_each_device_gets_gloo_for_the_host_and_its_own_backend(kind, expected):
    assert device.distributed_backend(None, kind=kind) == expected


def test_this_process_gets_its_devices_map():
    assert device.distributed_backend() == device.distributed_backend(None, device.device_type())


@pytest.mark.parametrize("requested,kind,expected", [
    ("gloo", "cpu", "cpu:gloo"),
    ("GLOO", "cpu", "cpu:gloo"),
    ("nccl", "cuda", "cpu:gloo,cuda:nccl"),  # examples/bloom/pretrain_bloom_7b1.sh's BACKEND
    ("gloo", "cuda", "cpu:gloo,cuda:gloo"),
    ("hccl", "npu", "cpu:gloo,npu:hccl"),
    ("cpu:gloo", "cpu", "cpu:gloo"),
    ("cuda:nccl, cpu:gloo", "cuda", "cpu:gloo,cuda:nccl"),  # a map passes through, cpu first
    ("cpu:gloo,cuda:gloo", "cuda", "cpu:gloo,cuda:gloo"),
    ("cpu:gloo,npu:hccl", "npu", "cpu:gloo,npu:hccl"),
])
def test_a_users_backend_becomes_a_map(requested, kind, expected):
    assert device.distributed_backend(requested, kind=kind) == expected


@pytest.mark.parametrize("requested,kind,message", [
    ("nccl", "cpu", "'nccl' cannot carry cpu tensors and this process runs on cpu: use gloo"),
    ("hccl", "cuda", "'hccl' cannot carry cuda tensors and this process runs on cuda: use nccl"),
    ("gloo", "npu", "'gloo' cannot carry npu tensors and this process runs on npu: use hccl"),
    ("ncl", "cpu", "expected one of gloo, nccl, hccl, or a device map such as cpu:gloo,cuda:nccl"),
    ("cuda:nccl", "cuda", "the map needs a cpu entry (cpu:gloo)"),
    ("cpu:gloo", "cuda", "has no entry for cuda, the device this process runs on (add cuda:nccl)"),
    ("cpu:gloo,cuda:nccl", "npu", "has no entry for npu"),
    ("cpu:gloo,cuda:gloo,npu:hccl", "npu", "has an entry for cuda, which this process does not "
                                           "use (it runs on npu)"),
    ("cpu:nccl", "cpu", "nccl cannot carry cpu tensors (it carries cuda)"),
    ("cpu:gloo,cpu:gloo", "cpu", "device type 'cpu' given twice"),
    ("cpu:gloo,tpu:xla", "cpu", "unknown device type 'tpu'"),
    ("cpu:gloo,cuda:ucc", "cuda", "unknown backend 'ucc' (expected one of gloo, nccl, hccl)"),
    ("cpu:gloo:x", "cpu", "'cpu:gloo:x' is not DEVICE:BACKEND"),
    ("cpu:gloo,", "cpu", "'' is not DEVICE:BACKEND"),
])
def test_a_backend_that_cannot_work_is_refused_naming_the_flag(requested, kind, message):
    with pytest.raises(ConfigError) as caught:
        device.distributed_backend(requested, kind=kind)
    assert str(caught.value).startswith(f"--distributed-backend {requested!r}")
    assert message in str(caught.value)


def test_the_flag_takes_a_map_and_the_config_checks_it_on_any_machine():
    assert parse_args(["--distributed-backend", "cpu:gloo,cuda:nccl"]).distributed_backend == \
        "cpu:gloo,cuda:nccl"
    for value in ("nccl", "hccl", "cpu:gloo,cuda:nccl", "cpu:gloo,npu:hccl"):  # the device's fit:
        ParallelConfig(world_size=2, distributed_backend=value)  # checked at initialisation
    with pytest.raises(ConfigError, match="unknown backend 'mpi'"):
        ParallelConfig(world_size=2, distributed_backend="cpu:gloo,cuda:mpi")


# ------------------------------------------- torch's groups and object collectives (one rank)
@pytest.fixture
def world(request):
    """A one-process default group with the backend string `request.param`."""
    dist.init_process_group(request.param, store=dist.HashStore(), rank=0, world_size=1)
    yield request.param
    dist.destroy_process_group()


@pytest.mark.parametrize("world", ["cpu:gloo", "cpu:gloo,cuda:gloo"], indirect=True)
def test_new_group_inherits_the_default_groups_map(world):
    group = dist.new_group([0])  # backend=None: the default group's backend string
    assert dist.get_backend_config(group) == dist.get_backend_config() == world
    # object collectives and barrier pick cpu wherever the map has it
    assert dist.distributed_c10d._get_object_coll_device(group) == "cpu"


@pytest.mark.parametrize("world", [device.distributed_backend()], indirect=True)
def test_the_model_parallel_groups_carry_the_products_map(world):
    ps.initialize_model_parallel(1, 1)
    try:
        for group in (ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
                      ps.get_data_parallel_group(), ps.get_embedding_group()):
            assert dist.get_backend_config(group) == world
    finally:
        ps.destroy_model_parallel()


def test_the_guard_is_installed_in_this_process():
    assert collective_guard.installed()
    assert getattr(dist.all_reduce, "__wrapped_by_collective_guard__", None) is not None


@pytest.mark.parametrize("world", ["cpu:gloo"], indirect=True)
def test_host_tensors_and_object_collectives_pass(world):
    group = dist.new_group([0])
    flag = torch.tensor([1.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    dist.broadcast(flag, src=0, group=group)
    gathered = [None]
    dist.all_gather_object(gathered, {"keys": ["exp_avg"]}, group=group)
    objects = ["header", 3]
    dist.broadcast_object_list(objects, src=0, group=group)
    dist.barrier()
    assert gathered == [{"keys": ["exp_avg"]}] and objects == ["header", 3]


_META = torch.ones(4, device="meta")


@pytest.mark.parametrize("world", ["cpu:gloo"], indirect=True)
@pytest.mark.parametrize("name,call", [
    ("all_reduce", lambda t: dist.all_reduce(t)),
    ("broadcast", lambda t: dist.broadcast(t, src=0)),
    ("all_gather", lambda t: dist.all_gather([torch.empty_like(t)], t)),
    ("all_gather_into_tensor", lambda t: dist.all_gather_into_tensor(torch.empty_like(t), t)),
    ("reduce_scatter_tensor", lambda t: dist.reduce_scatter_tensor(torch.empty_like(t), t)),
    ("send", lambda t: dist.send(t, dst=0)),
    ("irecv", lambda t: dist.irecv(t, src=0)),
    ("batch_isend_irecv", lambda t: dist.batch_isend_irecv([dist.P2POp(dist.isend, t, 0)])),
], ids=lambda value: value if isinstance(value, str) else "")
def test_a_tensor_the_group_cannot_carry_is_refused(world, name, call):
    with pytest.raises(collective_guard.CollectiveDeviceError) as caught:
        call(_META)
    message = str(caught.value)
    assert message.startswith(f"{name} got a meta tensor (4,) float32, which its group "
                              f"(backends cpu:gloo) cannot carry, at {__file__}:"), message


@pytest.mark.parametrize("world", ["cpu:gloo"], indirect=True)
def test_the_refusal_names_the_callers_line_and_the_object_collective(world):
    group = dist.new_group([0])
    line = sys._getframe().f_lineno + 2
    with pytest.raises(collective_guard.CollectiveDeviceError) as caught:
        dist.all_reduce(_META, group=group)
    assert str(caught.value).endswith(f"at {__file__}:{line}")
    line = sys._getframe().f_lineno + 2  # an object collective on a device the group lacks
    with pytest.raises(collective_guard.CollectiveDeviceError) as caught:
        dist.broadcast_object_list(["x"], src=0, group=group, device=torch.device("meta"))
    assert str(caught.value).startswith("broadcast_object_list (its broadcast) got a meta tensor")
    assert str(caught.value).endswith(f"at {__file__}:{line}")


def test_large_host_tensors_are_refused_where_the_group_has_a_device_backend():
    check, where = collective_guard.check_tensors, "caller.py:1"
    big = torch.zeros(collective_guard.HOST_LIMIT // 4 + 1)
    check("all_reduce", [torch.zeros(1)], "cpu:gloo,cuda:nccl", where)  # a flag: over gloo
    check("all_reduce", [big], "cpu:gloo", where)  # a CPU run: everything is on the host
    check("all_reduce", [big], "cpu:gloo,cuda:gloo", where)
    check("all_reduce", [big.to("meta")], "cpu:gloo, meta:hccl", where)  # on the "device"
    with pytest.raises(collective_guard.CollectiveDeviceError,
                       match=r"all_reduce got a cpu tensor \(16385,\) float32 of 65540 bytes on "
                             r"the host while its group \(backends cpu:gloo, npu:hccl\) has a "
                             r"device backend: it would travel over gloo, at caller.py:1"):
        check("all_reduce", [big], "cpu:gloo, npu:hccl", where)


# ------------------------------------------------------------------------ launched workers
@pytest.mark.multiprocess
def test_launched_workers_are_guarded():
    """tests/launch.py switches the guard on in every process it starts: legal collectives pass
    there, and a tensor the group cannot carry stops the job, naming the line."""
    script = os.path.join(REPO_ROOT, "tests", "dist", "guard_worker.py")
    result = run_torchrun(script, [], 2, timeout=120, check=True)
    assert result.stdout.count("guard on, default cpu:gloo, new_group cpu:gloo") == 2, result.stdout
    assert result.stdout.count("legal collectives done (1, ['rank0', 'rank1'])") == 2
    bad = run_torchrun(script, ["--bad"], 2, timeout=120)
    with open(script, encoding="utf-8") as f:
        line = next(i for i, text in enumerate(f, 1) if "# BAD-LINE" in text)
    assert bad.returncode != 0
    assert (f"all_reduce got a meta tensor (3,) float32, which its group (backends cpu:gloo) "
            f"cannot carry, at {script}:{line}") in bad.stderr, bad.stderr[-3000:]


@pytest.mark.multiprocess
def test_the_guard_imports_nothing_before_torch_distributed():
    result = run_command([sys.executable, "-c", "import sys; print('torch' in sys.modules, "
                          "'collective_guard' in sys.modules)"], timeout=60)
    assert result.stdout.split() == ["False", "True"], result.stderr
