"""Gradient buffers in one process: bucket layout, main_grad views in backward order, the shared
embedding alone in its bucket, ZeRO-1 padding, shards and the parameter buffer."""
import torch

from ascendspeed.core.distributed import GradBuffer, bucket_layout
from ascendspeed.core.distributed.data_parallel import trainable_parameters
from ascendspeed.model.bloom import BloomConfig, BloomModel


def test_bucket_layout_closes_full_buckets_isolates_and_pads():
    params, buckets = bucket_layout([5, 3, 4, 6, 2], [False, False, True, False, False],
                                    bucket_size=6, pad_to=4)
    # [5, 3] padded to 8 | [4] alone | [6] full, padded to 8 | [2] padded to 4
    assert buckets == [(0, 8), (8, 12), (12, 20), (20, 24)]
    assert params == [(0, 5), (5, 8), (8, 12), (12, 18), (20, 22)]
    assert bucket_layout([3, 3], [False, False], bucket_size=100) == ([(0, 3), (3, 6)], [(0, 6)])


def stage_model(**kwargs):
    config = BloomConfig(vocab_size=64, hidden_size=16, num_layers=2, num_attention_heads=2)
    return BloomModel(config, **kwargs)


def buffer_for(model, dp_size=1, dp_rank=0, distributed=False, bucket_size=300):
    params = list(reversed(trainable_parameters([model])))
    return GradBuffer(params, bucket_size=bucket_size, dp_group=None, dp_size=dp_size,
                      dp_rank=dp_rank, distributed_optimizer=distributed)


def test_main_grads_are_fp32_views_in_backward_order():
    model = stage_model()
    buffer = buffer_for(model)
    params = list(model.parameters())
    assert buffer.ranges[params[-1]][0] == 0  # the last registered parameter comes first
    for param in params:
        start, end = buffer.ranges[param]
        assert param.main_grad.dtype == torch.float32 and param.main_grad.shape == param.shape
        assert param.main_grad.data_ptr() == buffer.grad_data[start:].data_ptr()
    assert len(buffer.buckets) > 2
    assert sorted(p for b in buffer.buckets for p in map(id, b.params)) == sorted(map(id, params))


def test_shared_embedding_is_alone_in_its_bucket_on_first_and_last_stage():
    first = stage_model(post_process=False, layer_numbers=[1])
    last = stage_model(pre_process=False, layer_numbers=[2])
    shards = []
    for model in (first, last):
        embedding = model.word_embeddings.weight
        assert embedding.shared_embedding
        buffer = buffer_for(model, dp_size=3, dp_rank=1, distributed=True, bucket_size=10 ** 6)
        bucket = next(b for b in buffer.buckets if any(p is embedding for p in b.params))
        assert len(bucket.params) == 1 and bucket.grad_data.numel() % 3 == 0
        shards.append(buffer.local_range(embedding, bucket))
    assert shards[0] == shards[1]  # so summing over the embedding group lines up


def test_zero1_shards_cover_every_element_once_and_params_live_in_the_buffer():
    dp = 3
    covered = None
    for rank in range(dp):
        model = stage_model()
        before = [p.detach().clone() for p in model.parameters()]
        buffer = buffer_for(model, dp_size=dp, dp_rank=rank, distributed=True)
        for param, value in zip(model.parameters(), before):
            start, _ = buffer.ranges[param]
            assert torch.equal(param, value)  # moved into the buffer, values kept
            assert param.data_ptr() == buffer.param_data[start:].data_ptr()
        assert all(b.grad_data.numel() % dp == 0 for b in buffer.buckets)
        counts = {p: torch.zeros(p.numel(), dtype=torch.int32) for p in model.parameters()}
        for bucket in buffer.buckets:
            for param in bucket.params:
                local = buffer.local_range(param, bucket)
                if local is not None:
                    counts[param][local[0]:local[1]] += 1
        flat = torch.cat([c for c in counts.values()])
        covered = flat if covered is None else covered + flat
    assert torch.equal(covered, torch.ones_like(covered))
