"""Process groups for tensor (TP), pipeline (PP) and data (DP) parallelism, in Megatron's rank
order, plus the embedding group that ties the first and last pipeline stages' word embeddings.

With world size W = TP * PP * DP: TP groups are runs of TP consecutive ranks; a pipeline stage
holds W / PP consecutive ranks; DP groups take every TP-th rank inside a stage; PP groups take
every (W / PP)-th rank. Before `initialize_model_parallel` (or without torch.distributed) every
size is 1 and every rank 0, so a model runs unchanged in a single process.
"""
from __future__ import annotations

import torch.distributed as dist

from ascendspeed.errors import ParallelLayoutError

_TP_GROUP = None
_PP_GROUP = None
_DP_GROUP = None
_EMBEDDING_GROUP = None
_TP_RANKS: list[int] | None = None
_PP_RANKS: list[int] | None = None
_DP_RANKS: list[int] | None = None


def rank_groups(world_size: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """The rank lists of every TP, PP, DP and embedding group (pure; testable without processes)."""
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise ParallelLayoutError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}")
    dp = world_size // (tp * pp)
    stage = world_size // pp
    tp_groups = [list(range(i * tp, (i + 1) * tp)) for i in range(world_size // tp)]
    dp_groups = [list(range(s * stage + j, (s + 1) * stage, tp)) for s in range(pp) for j in range(tp)]
    pp_groups = [list(range(i, world_size, stage)) for i in range(stage)]
    embedding = [[g[0], g[-1]] if len(g) > 1 else [g[0]] for g in pp_groups]
    assert all(len(g) == dp for g in dp_groups)
    return {"tp": tp_groups, "pp": pp_groups, "dp": dp_groups, "embedding": embedding}


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1, timeout=None) -> None:
    """Create the groups. Every rank must call this (gloo/nccl create groups collectively).
    `timeout` (a timedelta; None: torch's default) bounds the creation and every collective
    of each group, as the default group's."""
    global _TP_GROUP, _PP_GROUP, _DP_GROUP, _EMBEDDING_GROUP, _TP_RANKS, _PP_RANKS, _DP_RANKS
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised before the model-parallel groups")
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = rank_groups(world, tensor_model_parallel_size, pipeline_model_parallel_size)
    for kind in ("tp", "pp", "dp", "embedding"):
        for ranks in layout[kind]:
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                if kind == "tp":
                    _TP_GROUP, _TP_RANKS = group, ranks
                elif kind == "pp":
                    _PP_GROUP, _PP_RANKS = group, ranks
                elif kind == "dp":
                    _DP_GROUP, _DP_RANKS = group, ranks
                else:
                    _EMBEDDING_GROUP = group


def model_parallel_is_initialized() -> bool:
    return _TP_GROUP is not None


def destroy_model_parallel() -> None:
    global _TP_GROUP, _PP_GROUP, _DP_GROUP, _EMBEDDING_GROUP, _TP_RANKS, _PP_RANKS, _DP_RANKS
    _TP_GROUP = _PP_GROUP = _DP_GROUP = _EMBEDDING_GROUP = None
    _TP_RANKS = _PP_RANKS = _DP_RANKS = None


def _size(ranks) -> int:
    return 1 if ranks is None else len(ranks)


def _rank(ranks) -> int:
    return 0 if ranks is None else ranks.index(dist.get_rank())


def get_tensor_model_parallel_group():
    return _TP_GROUP


def get_tensor_model_parallel_world_size() -> int:
    return _size(_TP_RANKS)


def get_tensor_model_parallel_rank() -> int:
    return _rank(_TP_RANKS)


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group (it broadcasts data to its peers)."""
    return 0 if _TP_RANKS is None else _TP_RANKS[0]


def get_pipeline_model_parallel_group():
    return _PP_GROUP


def get_pipeline_model_parallel_world_size() -> int:
    return _size(_PP_RANKS)


def get_pipeline_model_parallel_rank() -> int:
    return _rank(_PP_RANKS)


def is_pipeline_first_stage() -> bool:
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage() -> bool:
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def get_data_parallel_group():
    return _DP_GROUP


def get_data_parallel_world_size() -> int:
    return _size(_DP_RANKS)


def get_data_parallel_rank() -> int:
    return _rank(_DP_RANKS)


def get_embedding_group():
    return _EMBEDDING_GROUP


def is_rank_in_embedding_group() -> bool:
    """Whether this rank holds a copy of the shared word embeddings whose gradient is summed
    over the embedding group: the first or last stage, with pipeline parallelism only."""
    return (_EMBEDDING_GROUP is not None and get_pipeline_model_parallel_world_size() > 1
            and (is_pipeline_first_stage() or is_pipeline_last_stage()))


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next stage (wrapping around: the interleaved schedule sends from the
    last stage's chunk c to the first stage's chunk c + 1)."""
    rank = get_pipeline_model_parallel_rank()
    return _PP_RANKS[(rank + 1) % len(_PP_RANKS)]


def get_pipeline_model_parallel_prev_rank() -> int:
    """Global rank of the previous stage (wrapping around, as the next rank)."""
    rank = get_pipeline_model_parallel_rank()
    return _PP_RANKS[(rank - 1) % len(_PP_RANKS)]
