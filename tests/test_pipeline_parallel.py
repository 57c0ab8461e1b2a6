"""Pipeline parallelism with real processes (torchrun, gloo on CPU).

1. The schedules against one whole model in one process: 1F1B and interleaved 1F1B give the
   same per-micro-batch losses and the same gradients, forward-only gives the same losses,
   and every output a stage sends holds no data by its backward (freed once sent)
   (this file is also the torchrun worker for that, with --worker).
2. pretrain_bloom.py at (TP, PP, DP) = (1,2,1), (2,2,1), (1,2,2), (2,1,2), with the interleaved
   schedule, sequence parallelism, ZeRO-1 and recompute switched on, and with the BigScience
   'type:transformer|embedding' partition, reproduces the (1,1,1) losses.
"""
import os
import sys

import pytest

from launch import run_torchrun
from test_pretrain import (corpus, launch, layout_tolerance, losses,  # noqa: F401 (a fixture)
                           model_args)
from tolerances import FORWARD_REL, assert_close_to_scale, assert_values_close

# The launching tests are marked multiprocess one by one; the layout refusal runs in this process.


# ------------------------------------------------------------------ 1. schedules vs one model
def _check_schedule(num_layers: int, pp: int, v: int | None, m: int) -> None:
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from ascendspeed.core import parallel_state as ps
    from ascendspeed.core.pipeline_parallel.partition import stage_layout
    from ascendspeed.core.pipeline_parallel import schedules as schedules_module
    from ascendspeed.core.pipeline_parallel.schedules import get_forward_backward_func
    from ascendspeed.model.bloom import BloomConfig, BloomModel
    from ascendspeed.training import forward_step

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, pp)
    config = BloomConfig(vocab_size=64, hidden_size=32, num_layers=num_layers,
                         num_attention_heads=4, init_seed=3)
    generator = torch.Generator().manual_seed(num_layers * 100 + m)  # same batches on all ranks
    batches = [{"text": torch.randint(0, 64, (2, 9), generator=generator)} for _ in range(m)]

    reference = BloomModel(config)
    expected = []
    for batch in batches:
        loss = forward_step(reference, batch, None)
        (loss / m).backward()
        expected.append(loss.item())

    layout = stage_layout(num_layers, pp, ps.get_pipeline_model_parallel_rank(), v)
    last = len(layout.chunks) - 1
    chunks = [BloomModel(config, pre_process=layout.pre_process and i == 0,
                         post_process=layout.post_process and i == last, layer_numbers=layers)
              for i, layers in enumerate(layout.chunks)]
    schedule = get_forward_backward_func(SimpleNamespace(
        pipeline_model_parallel_size=pp, num_layers_per_virtual_pipeline_stage=v))
    args = (forward_step, iter(batches), chunks, m, (2, 8, 32), torch.float32, lambda loss: loss)
    # The storage of each output at its backward: a sent one (it has a gradient from the next
    # stage; the loss has none) must have been freed to one element.
    sent_storage, backward_step = [], schedules_module._backward_step

    def recording_backward_step(input_tensor, output_tensor, output_tensor_grad, scale_loss):
        if output_tensor_grad is not None:
            sent_storage.append(output_tensor.untyped_storage().nbytes())
        return backward_step(input_tensor, output_tensor, output_tensor_grad, scale_loss)

    schedules_module._backward_step = recording_backward_step
    try:
        got = schedule(*args)
    finally:
        schedules_module._backward_step = backward_step
    with torch.no_grad():
        got_eval = schedule(forward_step, iter(batches), chunks, m, (2, 8, 32), torch.float32,
                            lambda loss: loss, forward_only=True)
    where = f"L={num_layers} pp={pp} v={v} m={m} stage {ps.get_pipeline_model_parallel_rank()}"
    # The stages run the whole model's operations on the same inputs: ulps at most (FORWARD_REL
    # of the scale; measured equal). A micro-batch run twice, skipped or fed another's
    # activations changes losses and gradients at their own scale.
    if ps.is_pipeline_last_stage():
        assert_values_close(got, expected, rel=FORWARD_REL, what=where)
        assert_values_close(got_eval, expected, rel=FORWARD_REL, what=where)
    else:
        assert got == [] and got_eval == [], where
    sending_chunks = len(chunks) - (1 if ps.is_pipeline_last_stage() else 0)
    assert sent_storage == [4] * (m * sending_chunks), (where, sent_storage)  # one fp32 each

    reference_params = dict(reference.named_parameters())
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            grad = param.grad
            if name.startswith("layers."):
                _, index, rest = name.split(".", 2)
                name = f"layers.{chunk.layer_numbers[int(index)] - 1}.{rest}"
            if name == "word_embeddings.weight" and pp > 1:  # input + head copies: summed
                grad = grad.clone()
                dist.all_reduce(grad, group=ps.get_embedding_group())
            assert_close_to_scale(grad, reference_params[name].grad, rel=FORWARD_REL,
                                  what=f"{where} {name}")
    ps.destroy_model_parallel()


def _worker() -> None:
    import torch.distributed as dist

    from ascendspeed import device

    dist.init_process_group(device.distributed_backend())  # the product's map
    pp = dist.get_world_size()
    cases = {2: [(4, None, 1), (4, None, 4), (4, 1, 2), (4, 1, 4), (8, 2, 6), (6, 1, 4)],
             4: [(4, None, 2), (4, None, 6), (8, 1, 4), (8, 1, 8), (12, 1, 4)]}[pp]
    for case in cases:
        _check_schedule(case[0], pp, case[1], case[2])
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"schedules OK: {cases}", flush=True)
    dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [2, 4])
def test_schedules_match_one_whole_model(nproc):
    """Cases (layers, v, micro-batches): warm-up longer than m, m = pp (interleaved: all
    warm-up), m > pp, 2 and 3 chunks per stage, 2 and 4 stages."""
    result = run_torchrun(os.path.abspath(__file__), ["--worker"], nproc, timeout=180, check=True)
    assert "schedules OK" in result.stdout


# ------------------------------------------------------------------ 2. the trainer end to end
def four_layer_args(corpus, *extra):
    return model_args(corpus, "--num-layers", "4", *extra)


@pytest.fixture(scope="module")
def reference4(corpus):
    return losses(launch(1, four_layer_args(corpus)))


@pytest.fixture(scope="module")
def tolerance4(corpus, reference4):
    """test_pretrain.layout_tolerance for the 4-layer model: the reference again in
    micro-batches of 1 measures what another summation order does to its printed losses."""
    return layout_tolerance(losses(launch(1, four_layer_args(corpus, "--micro-batch-size", "1"))),
                            reference4)


def assert_same_losses(got, reference, tolerance):
    assert len(got) == len(reference) == 10
    assert_values_close(got, reference, rel=tolerance, what="losses")


PP2, TP2 = ["--pipeline-model-parallel-size", "2"], ["--tensor-model-parallel-size", "2"]
INTERLEAVED = ["--num-layers-per-virtual-pipeline-stage", "1"]


@pytest.mark.parametrize("nproc,layout", [
    (2, PP2),
    (4, PP2 + TP2),
    (4, PP2),  # DP = 2
    (4, TP2),  # DP = 2
    (2, PP2 + INTERLEAVED),
    (2, TP2 + ["--sequence-parallel"]),
    (4, PP2 + TP2 + INTERLEAVED + ["--sequence-parallel"]),
    (4, PP2 + ["--use-distributed-optimizer", "--checkpoint-activations"]),  # DP = 2
], ids=["pp2", "tp2-pp2", "pp2-dp2", "tp2-dp2", "pp2-interleaved", "tp2-sequence-parallel",
        "tp2-pp2-interleaved-sequence-parallel", "pp2-dp2-zero1-recompute"])
@pytest.mark.multiprocess
def test_parallel_layouts_reproduce_one_process(corpus, reference4, tolerance4, nproc, layout):
    """The equivalence matrix (with tests/test_pretrain.py's two-process layouts): 10 iterations
    of 4 micro-batches of 2 (2 per DP rank with DP = 2), fp32, no dropout, same losses."""
    assert_same_losses(losses(launch(nproc, four_layer_args(corpus, *layout))), reference4,
                       tolerance4)


@pytest.mark.multiprocess
def test_bigscience_partition_reproduces_one_process(corpus, tolerance4):
    """5 layers on 2 stages (an even split refuses them), embedding and head weighing one layer
    each: 3 + 2 blocks. Tolerance: the 4-layer model's (one layer more changes the rounding
    little; the spread is a few printed units)."""
    from ascendspeed.core.pipeline_parallel.partition import deepspeed_partition

    assert deepspeed_partition(5, 2, "type:transformer|embedding", False) == [(1, 2, 3), (4, 5)]
    reference = losses(launch(1, model_args(corpus, "--num-layers", "5")))
    got = losses(launch(2, model_args(corpus, "--num-layers", "5", "--pipeline-model-parallel-size",
                                      "2", "--pp-partition-method", "type:transformer|embedding")))
    assert_same_losses(got, reference, tolerance4)


def test_bad_pipeline_layout_is_refused_before_any_process_group(corpus, monkeypatch, capsys):
    from ascendspeed import training
    from pretrain_bloom import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(training, "pretrain", lambda *a, **k: pytest.fail("config accepted"))
    assert main(four_layer_args(corpus, "--pipeline-model-parallel-size", "2",
                                "--num-layers", "5")) == 2
    assert "--num-layers 5 is not divisible by --pipeline-model-parallel-size 2" in \
        capsys.readouterr().err


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
