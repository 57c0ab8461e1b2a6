"""Tensor-parallel building blocks (Megatron's mpu)."""
from ascendspeed.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy  # noqa: F401
from ascendspeed.core.tensor_parallel.layers import (ColumnParallelLinear, NormalInit,  # noqa: F401
                                                     RowParallelLinear, VocabParallelEmbedding,
                                                     divide)
from ascendspeed.core.tensor_parallel.mappings import (  # noqa: F401
    copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region)
from ascendspeed.core.tensor_parallel.random import (get_rng_tracker,  # noqa: F401
                                                     model_parallel_seed)
