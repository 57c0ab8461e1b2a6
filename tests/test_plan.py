"""tools/plan.py and ascendspeed/planning.py: the published BLOOM facts (parameter counts, the
BigScience 176B layout fitting 80 GB at ~149.8 hardware / ~112 model TFLOP/s per GPU, 7B1 on
8 x 64 GB), the per-stage parameters against the model the trainer builds, and the per-stage
memory against what benchmarks/bench_memory.py measures through the real trainer."""
import json

import pytest

from ascendspeed.planning import (GIB, MODELS, ModelShape, RunLayout, block_activation_bytes,
                                  plan, total_parameters)
from tools import plan as plan_tool

BIGSCIENCE_176B = [  # tr11-176B-ml: 384 A100 80GB, 104.7 s per iteration at global batch 2048
    "--model", "bloom-176b", "--tensor-model-parallel-size", "4",
    "--pipeline-model-parallel-size", "12", "--data-parallel-size", "8",
    "--micro-batch-size", "2", "--global-batch-size", "2048", "--seq-length", "2048", "--bf16",
    "--use-distributed-optimizer", "--recompute-granularity", "full",
    "--pp-partition-method", "type:transformer|embedding", "--device-memory-gb", "80",
    "--seconds-per-iteration", "104.7"]
# The ancestor project's BLOOM-7B1 script: 1 x 8 devices of 64 GB, TP 8, PP 1, fp16, micro-batch
# 4, global 512, sequence parallelism, dropout 0, no activation recompute.
ANCESTOR_7B1 = [
    "--model", "bloom-7b1", "--tensor-model-parallel-size", "8",
    "--pipeline-model-parallel-size", "1", "--world-size", "8", "--micro-batch-size", "4",
    "--global-batch-size", "512", "--fp16", "--sequence-parallel", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--device-memory-gb", "64"]


def run_plan(capsys, argv):
    assert plan_tool.main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name, published", [
    ("bloom-560m", 559_214_592), ("bloom-1b7", 1_722_408_960),
    ("bloom-7b1", 7_069_016_064), ("bloom-176b", 176_247_271_424)])
def test_parameter_counts_are_the_published_ones(name, published):
    # HF model cards / BigScience's configs; embedding counted once, LayerNorms and biases in.
    assert total_parameters(MODELS[name]) == published


def test_bloom_176b_bigscience_layout(capsys):
    result = run_plan(capsys, BIGSCIENCE_176B)
    assert result["parameters"] == 176_247_271_424
    assert round(result["parameters"] / 1e9, 1) == 176.2
    assert result["fits"] is True and result["peak_gb"] < 80 and result["peak_stage"] == 0
    # What the log printed (Megatron-DeepSpeed's formula, recompute counted), and Megatron-LM's.
    assert result["hardware_tflops_per_device"] == pytest.approx(149.8, rel=0.01)
    assert result["model_tflops_per_device"] == pytest.approx(112, rel=0.01)
    assert result["tokens_per_second"] == pytest.approx(2048 * 2048 / 104.7)
    # 'type:transformer|embedding' at PP 12: embedding + 5 blocks, 6 blocks, 5 blocks + head.
    assert [(s["stage"], s["role"], s["layers"]) for s in result["stages"]] == [
        (0, "first", 5), (6, "middle", 6), (11, "last", 5)]
    assert result["stages"][0]["microbatches_in_flight"] == 12
    assert result["stages"][-1]["microbatches_in_flight"] == 1
    for stage in result["stages"]:
        parts = sum(stage[k] for k in ("params_gb", "grads_gb", "optimizer_gb", "activations_gb"))
        assert stage["total_gb"] == pytest.approx(parts)
        assert stage["grads_gb"] == pytest.approx(2 * stage["params_gb"])  # fp32 main grads
        assert stage["optimizer_gb"] == pytest.approx(6 * stage["params_gb"] / 8)  # 12 B / DP 8


def test_bloom_176b_flops_constants():
    """Megatron-DeepSpeed's hardware formula is 96 = 24 x 4 with recompute, V/(16 L h); without
    recompute 72 = 24 x 3. Megatron-LM's model formula is 72 with V/(12 L h)."""
    model, b, s = MODELS["bloom-176b"], 2048, 2048
    l, h, v = model.num_layers, model.hidden_size, model.padded_vocab_size
    layout = dict(tensor_parallel=4, pipeline_parallel=12, data_parallel=8, micro_batch_size=2,
                  global_batch_size=b, precision="bf16",
                  pp_partition_method="type:transformer|embedding")
    full = plan(model, RunLayout(recompute_granularity="full", **layout))
    none = plan(model, RunLayout(**layout))
    assert full.hardware_flops_per_iteration == pytest.approx(
        96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h)))
    assert none.hardware_flops_per_iteration == pytest.approx(
        full.hardware_flops_per_iteration * 3 / 4)
    assert full.model_flops_per_iteration == none.model_flops_per_iteration == pytest.approx(
        72 * b * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h)))


def test_bloom_7b1_fits_eight_64gb_devices(capsys):
    result = run_plan(capsys, ANCESTOR_7B1)
    assert result["layout"]["data_parallel"] == 1 and result["layout"]["world_size"] == 8
    assert result["fits"] is True and result["peak_gb"] < 64
    # Still fits without sequence parallelism and with Megatron's default dropout 0.1.
    plain = run_plan(capsys, ["--model", "bloom-7b1", "--tensor-model-parallel-size", "8",
                              "--world-size", "8", "--micro-batch-size", "4",
                              "--global-batch-size", "512", "--fp16", "--device-memory-gb", "64"])
    assert plain["layout"]["attention_dropout"] == 0.1 and plain["fits"] is True
    # One device cannot hold it: 7.07 B parameters x 18 bytes (fp16 + fp32 grads, masters, Adam).
    alone = run_plan(capsys, ["--model", "bloom-7b1", "--fp16", "--device-memory-gb", "64"])
    assert alone["fits"] is False
    assert alone["stages"][0]["total_gb"] > 7_069_016_064 * 18 / GIB


def test_korthikanti_activations_at_two_bytes():
    """e = 2 gives the paper's 34 sbh + 5 a s^2 b, 10 sbh + 24 sbh / t + 5 a s^2 b / t with
    tensor parallelism, and 34 sbh / t + 5 a s^2 b / t with sequence parallelism."""
    model = ModelShape(4, 1024, 16, 50304)
    s, b, a, h = 2048, 2, 16, 1024
    sbh, scores = s * b * h, 5 * a * s * s * b
    base = dict(seq_length=s, micro_batch_size=b, precision="bf16")
    assert block_activation_bytes(model, RunLayout(**base), 2) == 34 * sbh + scores
    tp = RunLayout(tensor_parallel=4, **base)
    assert block_activation_bytes(model, tp, 2) == 10 * sbh + 24 * sbh / 4 + scores / 4
    sp = RunLayout(tensor_parallel=4, sequence_parallel=True, **base)
    assert block_activation_bytes(model, sp, 2) == 34 * sbh / 4 + scores / 4
    selective = RunLayout(recompute_granularity="selective", **base)
    assert block_activation_bytes(model, selective, 2) == 34 * sbh
    fused = RunLayout(attention_dropout=0.0, hidden_dropout=0.0, **base)
    assert block_activation_bytes(model, fused, 2) == 32 * sbh


@pytest.mark.parametrize("shape, pp, method", [
    (ModelShape(6, 64, 4, 512), 3, None),
    (ModelShape(5, 64, 4, 512), 2, "type:transformer|embedding"),
    (ModelShape(4, 64, 4, 512), 1, None),
    (MODELS["bloom-176b"], 12, "type:transformer|embedding")])
def test_stage_parameters_match_the_built_model(shape, pp, method):
    """Each stage's parameters as the trainer builds them (BloomModel on meta, TP 1)."""
    import torch

    from ascendspeed.core.pipeline_parallel.partition import stage_layout
    from ascendspeed.model.bloom import BloomConfig, BloomModel

    result = plan(shape, RunLayout(pipeline_parallel=pp, precision="bf16",
                                   pp_partition_method=method))
    config = BloomConfig(vocab_size=shape.padded_vocab_size, hidden_size=shape.hidden_size,
                         num_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
                         params_dtype=torch.bfloat16)
    for p, stage in enumerate(result.stages):
        layout = stage_layout(shape.num_layers, pp, p, None, method, half_precision=True)
        model = BloomModel(config, pre_process=layout.pre_process,
                           post_process=layout.post_process, layer_numbers=layout.chunks[0],
                           device="meta")
        assert stage.parameters == sum(t.numel() for t in model.parameters()), p
        assert stage.params_gb * GIB == sum(t.numel() * t.element_size()
                                            for t in model.parameters())


def test_plan_table_and_errors(capsys):
    assert plan_tool.main(BIGSCIENCE_176B + ["--train-tokens", "366e9"]) == 0
    table = capsys.readouterr().out
    assert "an estimate" in table and "176,247,271,424" in table
    assert "fits 80 GiB" in table and "149.8 hardware TFLOP/s" in table
    assert "112.9 model TFLOP/s" in table and "days" in table
    result = run_plan(capsys, ["--model", "bloom-560m", "--mfu", "0.5", "--peak-flops", "1e14",
                               "--train-tokens", "1e9"])
    assert result["model_tflops_per_device"] == pytest.approx(50.0)
    assert result["days_to_train"] == pytest.approx(1e9 / result["tokens_per_second"] / 86400)
    assert result["fits"] is None  # no --device-memory-gb
    for argv, message in (
            (["--num-layers", "2"], "give --model, or --hidden-size"),
            (["--model", "bloom-176b", "--pipeline-model-parallel-size", "12"], "not divisible"),
            (["--model", "bloom-560m", "--tensor-model-parallel-size", "3"], "not divisible"),
            (["--model", "bloom-560m", "--world-size", "6", "--tensor-model-parallel-size", "4"],
             "--world-size 6"),
            (["--model", "bloom-560m", "--mfu", "0.5"], "--peak-flops"),
            (["--model", "bloom-560m", "--data-parallel-size", "2", "--global-batch-size", "3"],
             "--global-batch-size 3")):
        assert plan_tool.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("plan.py: error: ") and message in err and "\n" not in err, err


# ------------------------------------------------------------------ against bench_memory.py
def _planned(flags: list[str], world_size: int):
    """The plan of a pretrain_bloom.py flag set, read through the trainer's own config."""
    from ascendspeed.arguments import PretrainConfig, parse_args
    from ascendspeed.data.tokenizer import build_tokenizer
    from ascendspeed.training import padded_vocab_size

    config = PretrainConfig.from_args(parse_args(flags), world_size=world_size)
    m, parallel, training = config.model, config.parallel, config.training
    shape = ModelShape(m.num_layers, m.hidden_size, m.num_attention_heads,
                       padded_vocab_size(config, build_tokenizer(config.tokenizer)))
    precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    return plan(shape, RunLayout(
        tensor_parallel=parallel.tensor_model_parallel_size,
        pipeline_parallel=parallel.pipeline_model_parallel_size,
        data_parallel=parallel.data_parallel_size, micro_batch_size=training.micro_batch_size,
        global_batch_size=training.global_batch_size, seq_length=m.seq_length,
        precision=precision[config.precision.params_dtype],
        distributed_optimizer=parallel.use_distributed_optimizer,
        recompute_granularity=m.recompute_granularity,
        sequence_parallel=parallel.sequence_parallel,
        pp_partition_method=parallel.pp_partition_method, hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout))


@pytest.mark.multiprocess
def test_stage_memory_against_bench_memory(tmp_path):
    """bench_memory's 'pp2' layout (the real trainer, 2 iterations of a 4-layer BLOOM, hidden
    512, vocab 32000, fp32, 2 stages) measures each rank's peak RSS and parameter bytes.

    Parameter bytes must match exactly. For the rest, the framework's own memory (~320 MiB:
    interpreter, torch, data loader), which the planner leaves out, is measured by the same
    layout with bench_memory's --quick model (hidden 64, vocab 512: its tensors are < 3 MiB) and
    subtracted. What remains must be at least 90% of the planner's stage total (everything it
    counts is there) and at most that total plus the stage's planned activations plus 10%:
    glibc's heap keeps part of what an iteration frees (its activations, in blocks under 32 MiB),
    so a process's peak RSS runs over the live bytes by up to about that much (here ~70 MiB). The
    last stage's extra memory over the first (the logits) must come out within half of the plan.
    """
    from benchmarks import bench_memory
    from benchmarks.bench_train_step import write_corpus

    corpus = write_corpus(str(tmp_path))
    nproc, extra = bench_memory.LAYOUTS["pp2"]
    measured, planned = {}, {}
    for quick in (False, True):
        flags = bench_memory.layout_model_flags(corpus, quick)
        measured[quick] = bench_memory.run_layout("pp2", flags, str(tmp_path / f"pp2-{quick}"),
                                                  timeout=300)
        planned[quick] = _planned(flags + extra, nproc).stages
    mib = 2 ** 20
    extras, plans = [], []
    for rank, (run, base, stage, tiny) in enumerate(zip(measured[False], measured[True],
                                                        planned[False], planned[True])):
        assert run["params"] == stage.params_gb * GIB, rank
        extra_rss = (run["peak_rss"] - base["peak_rss"]) / mib
        expected = (stage.total_gb - tiny.total_gb) * GIB / mib
        low, high = 0.9 * expected, 1.1 * expected + stage.activations_gb * GIB / mib
        assert low <= extra_rss <= high, (rank, extra_rss, expected, low, high)
        extras.append(extra_rss)
        plans.append(expected)
    assert plans[1] > plans[0]
    assert abs((extras[1] - extras[0]) - (plans[1] - plans[0])) <= 0.5 * (plans[1] - plans[0]), \
        (extras, plans)
