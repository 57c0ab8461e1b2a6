"""Data-parallel gradient machinery (Megatron's "local DDP"): contiguous fp32 gradient buffers cut
into buckets whose reduction over the data-parallel group overlaps with backward, and the
finalize step that adds up gradients split across TP (sequence parallelism) and across the first
and last pipeline stages (shared word embeddings)."""
from ascendspeed.core.distributed.data_parallel import DataParallelGrads
from ascendspeed.core.distributed.finalize import finalize_model_grads
from ascendspeed.core.distributed.grad_buffer import Bucket, GradBuffer, bucket_layout

__all__ = ["Bucket", "DataParallelGrads", "GradBuffer", "bucket_layout", "finalize_model_grads"]
