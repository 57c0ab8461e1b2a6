"""Megatron's batch samplers: which dataset positions each data-parallel rank reads, starting
from `consumed_samples`, so that a resumed run continues the exact sample stream."""
from __future__ import annotations

import torch


class _PretrainingSampler:
    """What both samplers share: the checked arguments and Megatron's attribute names."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        if total_samples <= 0:
            raise ValueError(f"no samples to load (dataset of {total_samples} samples)")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"consumed samples {consumed_samples} must be in [0, {total_samples}): "
                             f"the dataset is exhausted; train for fewer samples or build more")
        if micro_batch_size <= 0:
            raise ValueError(f"micro batch size must be positive, got {micro_batch_size}")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data-parallel rank {data_parallel_rank} not in [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return self.total_samples


class MegatronPretrainingSampler(_PretrainingSampler):
    """`--dataloader-type single`: positions consumed, consumed+1, ... cut into global blocks of
    micro_batch_size * dp; rank r takes slice [r*mbs, (r+1)*mbs) of each block."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        super().__init__(total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
                         data_parallel_size)
        self.drop_last = drop_last

    def __iter__(self):
        block = self.micro_batch_times_data_parallel_size
        first = self.data_parallel_rank * self.micro_batch_size
        start = self.consumed_samples
        while start + block <= self.total_samples:
            yield list(range(start + first, start + first + self.micro_batch_size))
            start += block
        if start < self.total_samples and not self.drop_last:
            partial = list(range(start, self.total_samples))[first:first + self.micro_batch_size]
            if partial:
                yield partial


class MegatronPretrainingRandomSampler(_PretrainingSampler):
    """`--dataloader-type cyclic`: each rank owns a contiguous bucket of positions and walks a
    torch.randperm of it seeded with the epoch number."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        super().__init__(total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
                         data_parallel_size)
        self.last_batch_size = total_samples % self.micro_batch_times_data_parallel_size
        if total_samples < self.micro_batch_times_data_parallel_size:
            raise ValueError(f"{total_samples} samples cannot fill one global micro-batch of "
                             f"{self.micro_batch_times_data_parallel_size}")

    def __iter__(self):
        active_total_samples = self.total_samples - self.last_batch_size
        self.epoch = self.consumed_samples // active_total_samples
        current_epoch_samples = self.consumed_samples % active_total_samples
        if current_epoch_samples % self.micro_batch_times_data_parallel_size != 0:
            raise ValueError(f"consumed samples {self.consumed_samples} is not a whole number of "
                             f"global micro-batches ({self.micro_batch_times_data_parallel_size}); "
                             f"the cyclic sampler needs the same dp and micro batch size on resume")
        bucket_size = (self.total_samples // self.micro_batch_times_data_parallel_size) \
            * self.micro_batch_size
        bucket_offset = current_epoch_samples // self.data_parallel_size
        start_idx = self.data_parallel_rank * bucket_size
        generator = torch.Generator()
        generator.manual_seed(self.epoch)
        random_idx = torch.randperm(bucket_size, generator=generator).tolist()
        batch = []
        for x in random_idx[bucket_offset:]:  # an incomplete last batch is dropped
            batch.append(start_idx + x)
            if len(batch) == self.micro_batch_size:
                self.consumed_samples += self.micro_batch_times_data_parallel_size
                yield batch
                batch = []


def build_pretraining_data_loader(dataset, consumed_samples: int, micro_batch_size: int,
                                  data_parallel_rank: int, data_parallel_size: int, *,
                                  dataloader_type: str = "single", num_workers: int = 2,
                                  pin_memory: bool = False):
    """A DataLoader yielding `{'text': LongTensor[mbs, seq_length + 1]}` micro-batches."""
    if dataset is None:
        return None
    if dataloader_type == "single":
        batch_sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                                   data_parallel_rank, data_parallel_size)
    elif dataloader_type == "cyclic":
        batch_sampler = MegatronPretrainingRandomSampler(len(dataset), consumed_samples,
                                                         micro_batch_size, data_parallel_rank,
                                                         data_parallel_size)
    else:
        raise ValueError(f"--dataloader-type {dataloader_type!r}: expected single or cyclic")
    # Each new iterator of a DataLoader draws a seed from its generator; a private one keeps the
    # global torch RNG (dropout) untouched, so a resumed run replays the same dropout masks.
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler,
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=num_workers > 0,
                                       generator=torch.Generator().manual_seed(0))
