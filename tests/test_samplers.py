"""Megatron's samplers: the same micro-batches, and exact continuation from consumed_samples."""
import numpy as np
import pytest
import torch

from ascendspeed.data.samplers import (MegatronPretrainingRandomSampler, MegatronPretrainingSampler,
                                       build_pretraining_data_loader)


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_single_spec_example():
    assert take(MegatronPretrainingSampler(5195, 8, 2, 0, 2), 3) == [[8, 9], [12, 13], [16, 17]]
    assert take(MegatronPretrainingSampler(5195, 8, 2, 1, 2), 3) == [[10, 11], [14, 15], [18, 19]]


def test_cyclic_spec_example():
    assert take(MegatronPretrainingRandomSampler(5195, 8, 2, 0, 2), 2) == [[839, 732], [1363, 1340]]
    assert take(MegatronPretrainingRandomSampler(5195, 8, 2, 1, 2), 1) == [[3435, 3328]]


def test_single_drops_trailing_partial_block():
    batches = list(MegatronPretrainingSampler(11, 0, 2, 1, 2))
    assert batches == [[2, 3], [6, 7]]
    assert list(MegatronPretrainingSampler(11, 8, 2, 0, 2, drop_last=False)) == [[8, 9]]


def cyclic_take(sampler, n):
    """The training loop's cyclic_iter: re-enter the sampler at each epoch's end."""
    out = []
    while len(out) < n:
        for batch in sampler:
            out.append(batch)
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("cls,steps", [(MegatronPretrainingSampler, 16),
                                       (MegatronPretrainingRandomSampler, 40)])
def test_resume_continues_the_exact_stream(cls, steps):
    mbs, dp, total = 3, 2, 101  # 16 global micro-batches per cyclic epoch
    for rank in range(dp):
        straight = cyclic_take(cls(total, 0, mbs, rank, dp), steps)
        resumed = cyclic_take(cls(total, 7 * mbs * dp, mbs, rank, dp), steps - 7)
        assert straight[7:] == resumed
        assert len({tuple(b) for b in straight[:16]}) == 16


def test_single_global_batch_is_independent_of_dp_and_mbs():
    def global_batch(mbs, dp, consumed, steps):
        ranks = [take(MegatronPretrainingSampler(1000, consumed, mbs, r, dp), steps) for r in range(dp)]
        return sorted(i for r in ranks for batch in r for i in batch)

    assert global_batch(4, 2, 16, 2) == global_batch(2, 4, 16, 2) == global_batch(8, 1, 16, 2)


@pytest.mark.parametrize("args,message", [((0, 0, 1, 0, 1), "no samples"),
                                          ((10, 10, 1, 0, 1), "exhausted"),
                                          ((10, 0, 0, 0, 1), "micro batch"),
                                          ((10, 0, 1, 2, 2), "rank 2 not in")])
def test_bad_sampler_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        MegatronPretrainingSampler(*args)


def test_data_loader_collates_text_batches(megatron_fixture, tmp_path):
    from ascendspeed.data.builders import build_train_valid_test_datasets

    train, _, _ = build_train_valid_test_datasets([megatron_fixture], "969, 30, 1", [64, 0, 0], 128,
                                                  1234, data_cache_path=str(tmp_path))
    loader = build_pretraining_data_loader(train, 8, 4, 1, 2, num_workers=0)
    batch = next(iter(loader))
    assert batch["text"].dtype == torch.int64 and batch["text"].shape == (4, 129)
    assert np.array_equal(batch["text"][0].numpy(), train[12]["text"])
