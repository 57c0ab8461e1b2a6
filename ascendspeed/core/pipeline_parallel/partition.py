"""Which transformer layers each pipeline stage (and each virtual chunk of a stage) holds.

Three ways, all Megatron-family semantics, all pure functions (no process group needed, so
`validate_pipeline` runs while the flags are checked):

- even (default): Megatron-LM, L / PP consecutive layers per stage;
- `--pp-partition-method 'type:REGEX'` or `uniform`: the BigScience Megatron-DeepSpeed fork,
  where DeepSpeed's PipelineModule splits GPTModelPipe's list of layer specs. 'type:' weighs
  every spec whose class name matches REGEX with 1 (the others 0) and balances the weights with
  `ds_utils.partition_balanced`; 'uniform' cuts the spec list into equal runs of specs;
- interleaved (`--num-layers-per-virtual-pipeline-stage v`): Megatron-LM's virtual pipeline,
  chunk c of stage p holds layers from `c * (L / chunks) + p * v` (0-based), chunks = L / (PP v).

Layer numbers are 1-based and global, as BloomModel's `layer_numbers`.
"""
from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass

from ascendspeed.errors import PipelinePartitionError


# GPTModelPipe's specs (Megatron-DeepSpeed, BLOOM branch), by the class/function name that
# DeepSpeed's PipelineModule._find_layer_type matches the 'type:' regex against.
_PRE_SPECS = ("_to_float16", "EmbeddingPipe", "<lambda>")  # cast, embedding, transpose
_TRANSFORMER_SPEC = "ParallelTransformerLayerPipe"
_POST_SPECS = ("<lambda>", "MixedFusedLayerNorm", "EmbeddingPipe")  # undo transpose, LN, tied head
_FP32_CAST_SPEC = "float16_to_fp32"  # appended for fp16/bf16 only
_EMBEDDING_INDEX = 1


@dataclass(frozen=True)
class StageLayout:
    """One pipeline stage: its model chunks' layer numbers (one chunk unless interleaved)."""
    chunks: tuple[tuple[int, ...], ...]
    pre_process: bool  # the first chunk holds the embedding
    post_process: bool  # the last chunk holds the final LayerNorm and the head


# ------------------------------------------------------------------ DeepSpeed's ds_utils, as is
# (deepspeed/runtime/utils.py, unchanged from 0.4 to 0.9.5)
def prefix_sum_inc(weights: list[int]) -> list[int]:
    sums = list(weights)
    for i in range(1, len(sums)):
        sums[i] += sums[i - 1]
    return sums


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    parts = [0] * (num_parts + 1)
    if num_items <= num_parts:
        for p in range(num_parts + 1):
            parts[p] = min(p, num_items)
        return parts
    chunksize = num_items // num_parts
    for p in range(num_parts):
        parts[p] = min(chunksize * p, num_items)
    parts[num_parts] = num_items
    return parts


def _lprobe(weights: list[int], num_parts: int, bottleneck: float) -> tuple[list[int], bool]:
    """Greedy cut of the prefix sums `weights` into parts of at most `bottleneck`."""
    num_items = len(weights)
    total_weight = weights[-1]
    parts = [0] + [num_items] * num_parts
    bsum = bottleneck  # running target of the p-th part's end
    chunksize = num_items // num_parts
    step = chunksize
    for p in range(1, num_parts):
        while step < num_items and weights[step] < bsum:  # jump to the next bucket
            step += chunksize
        parts[p] = bisect_left(weights, bsum, lo=step - chunksize, hi=min(step, num_items))
        if parts[p] == num_items:  # nothing more to cut: is the last part overweight?
            part_size = weights[-1] - weights[parts[p - 1]]
            return parts, part_size < bottleneck
        bsum = weights[parts[p] - 1] + bottleneck
    return parts, bsum >= total_weight


def _rb_partition_balanced(weights: list[int], num_parts: int, eps: float) -> float:
    """Binary search for the smallest feasible bottleneck (heaviest part)."""
    lower, upper = weights[-1] / num_parts, weights[-1]
    while upper > lower + eps:
        mid = lower + (upper - lower) / 2
        _, success = _lprobe(weights, num_parts, mid)
        if success:
            upper = mid
        else:
            lower = mid + eps
    return upper


def partition_balanced(weights: list[int], num_parts: int, eps: float = 1e-3) -> list[int]:
    """Boundaries [0, ..., len(weights)]: part p is weights[parts[p]:parts[p + 1]]."""
    num_items = len(weights)
    if num_items <= num_parts:
        return partition_uniform(num_items, num_parts)
    sums = prefix_sum_inc(weights)
    bottleneck = _rb_partition_balanced(sums, num_parts, eps=eps)
    parts, success = _lprobe(sums, num_parts, bottleneck)
    assert success
    return parts


# ------------------------------------------------------------------ the three layouts
def even_partition(num_layers: int, pp: int) -> list[tuple[int, ...]]:
    if num_layers % pp:
        raise PipelinePartitionError(
            f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp}; "
            f"give a multiple of {pp}, or balance unevenly with --pp-partition-method "
            f"'type:transformer|embedding'")
    per_stage = num_layers // pp
    return [tuple(range(p * per_stage + 1, (p + 1) * per_stage + 1)) for p in range(pp)]


def deepspeed_partition(num_layers: int, pp: int, method: str,
                        half_precision: bool) -> list[tuple[int, ...]]:
    """The stage boundaries DeepSpeed's PipelineModule draws over GPTModelPipe's specs. Only
    layouts BloomModel can build are accepted: embedding on the first stage, final LayerNorm and
    head together on the last, at least one transformer layer per stage."""
    names = list(_PRE_SPECS) + [_TRANSFORMER_SPEC] * num_layers + list(_POST_SPECS)
    if half_precision:
        names.append(_FP32_CAST_SPEC)
    method = method.lower()  # as PipelineModule._partition_layers
    if method == "uniform":
        parts = partition_uniform(len(names), pp)
    elif method.startswith("type:"):
        pattern = method.split(":")[1]
        try:
            weights = [1 if re.search(pattern, name, re.IGNORECASE) else 0 for name in names]
        except re.error as error:
            raise PipelinePartitionError(
                f"--pp-partition-method {method!r}: bad regular expression ({error})") from error
        if not any(weights):
            raise PipelinePartitionError(
                f"--pp-partition-method {method!r} matches no layer type (the types are "
                f"EmbeddingPipe, ParallelTransformerLayerPipe, MixedFusedLayerNorm)")
        parts = partition_balanced(weights, pp)
    else:
        raise PipelinePartitionError(
            f"--pp-partition-method {method!r}: expected 'type:REGEX' (e.g. "
            f"'type:transformer|embedding') or 'uniform' ('parameters' is not supported)")
    first_layer = len(_PRE_SPECS)  # spec index of layer 1
    head, final_norm = len(_PRE_SPECS) + num_layers + 2, len(_PRE_SPECS) + num_layers + 1
    stages = []
    for p in range(pp):
        start, stop = parts[p], parts[p + 1]
        stages.append(tuple(i - first_layer + 1 for i in range(start, stop)
                            if first_layer <= i < first_layer + num_layers))
    where = f"--pp-partition-method {method!r} with --num-layers {num_layers} on " \
            f"--pipeline-model-parallel-size {pp} (stage boundaries {parts} over {len(names)} specs)"
    if not parts[0] <= _EMBEDDING_INDEX < parts[1]:
        raise PipelinePartitionError(f"{where}: the embedding is not on the first stage")
    if not parts[pp - 1] <= final_norm < head < parts[pp]:
        raise PipelinePartitionError(f"{where}: the final LayerNorm and the head are not both on "
                                     f"the last stage")
    _refuse_empty_stages(stages, where)
    return stages


def interleaved_chunks(num_layers: int, pp: int, layers_per_chunk: int,
                       pp_rank: int) -> list[tuple[int, ...]]:
    """Megatron-LM's ParallelTransformer offsets: chunk c of stage p starts at
    c * (L // chunks_per_stage) + p * v (0-based)."""
    chunks_per_stage = num_layers // (pp * layers_per_chunk)
    return [tuple(range(c * (num_layers // chunks_per_stage) + pp_rank * layers_per_chunk + 1,
                        c * (num_layers // chunks_per_stage) + (pp_rank + 1) * layers_per_chunk + 1))
            for c in range(chunks_per_stage)]


def _refuse_empty_stages(stages: list[tuple[int, ...]], where: str) -> None:
    empty = [p for p, layers in enumerate(stages) if not layers]
    if empty:
        raise PipelinePartitionError(f"{where}: stage(s) {empty} would hold no transformer layer "
                                     f"(per-stage layers {[len(s) for s in stages]})")


# ------------------------------------------------------------------ entry points
def validate_pipeline(num_layers: int, pp: int, layers_per_virtual_stage: int | None = None,
                      partition_method: str | None = None, half_precision: bool = False,
                      num_microbatches: tuple[int, ...] = ()) -> None:
    """Every check that needs no process group; raises PipelinePartitionError. Give every
    number of micro-batches the run will use (several with a batch-size ramp-up)."""
    if pp < 1:
        raise PipelinePartitionError(f"--pipeline-model-parallel-size must be >= 1, got {pp}")
    if num_layers < pp:
        raise PipelinePartitionError(
            f"--num-layers {num_layers} < --pipeline-model-parallel-size {pp}: some stage would "
            f"hold no transformer layer")
    if layers_per_virtual_stage is None:
        for p in range(pp):
            stage_layout(num_layers, pp, p, None, partition_method, half_precision)
        return
    v = layers_per_virtual_stage
    prefix = f"--num-layers-per-virtual-pipeline-stage {v}"
    if partition_method is not None:
        raise PipelinePartitionError(f"{prefix} (interleaved schedule) cannot be combined with "
                                     f"--pp-partition-method {partition_method!r}")
    if pp < 2:
        raise PipelinePartitionError(f"{prefix} needs --pipeline-model-parallel-size >= 2, "
                                     f"got {pp}")
    if v < 1 or num_layers % (pp * v):
        raise PipelinePartitionError(
            f"{prefix}: --num-layers {num_layers} is not divisible by "
            f"--pipeline-model-parallel-size {pp} x {v} = {pp * v}")
    for m in num_microbatches:
        if m % pp:
            raise PipelinePartitionError(
                f"{prefix}: the interleaved schedule needs the number of micro-batches ({m} = "
                f"--global-batch-size / (--micro-batch-size x data-parallel size)) to be a "
                f"multiple of --pipeline-model-parallel-size {pp}")


def stage_layout(num_layers: int, pp: int, pp_rank: int,
                 layers_per_virtual_stage: int | None = None,
                 partition_method: str | None = None,
                 half_precision: bool = False) -> StageLayout:
    """The chunks stage `pp_rank` builds (call validate_pipeline first for the full checks)."""
    if layers_per_virtual_stage is not None:
        chunks = interleaved_chunks(num_layers, pp, layers_per_virtual_stage, pp_rank)
    elif partition_method is not None:
        chunks = [deepspeed_partition(num_layers, pp, partition_method, half_precision)[pp_rank]]
    else:
        stages = even_partition(num_layers, pp)
        _refuse_empty_stages(stages, f"--num-layers {num_layers} on --pipeline-model-parallel-size "
                                     f"{pp}")
        chunks = [stages[pp_rank]]
    return StageLayout(chunks=tuple(chunks), pre_process=pp_rank == 0,
                       post_process=pp_rank == pp - 1)


def validate_pretrain_config(config) -> None:
    """validate_pipeline for a PretrainConfig (called by its validation), with every number of
    micro-batches of a batch-size ramp-up."""
    training, parallel = config.training, config.parallel
    micro_times_dp = training.micro_batch_size * parallel.data_parallel_size
    counts = {training.num_microbatches}
    if training.rampup_batch_size is not None:
        start, increment, _ = training.rampup_batch_size
        counts |= {size // micro_times_dp
                   for size in range(start, training.global_batch_size + 1, increment)}
    validate_pipeline(config.model.num_layers, parallel.pipeline_model_parallel_size,
                      parallel.num_layers_per_virtual_pipeline_stage, parallel.pp_partition_method,
                      half_precision=config.precision.params_dtype != "float32",
                      num_microbatches=tuple(sorted(counts)))
