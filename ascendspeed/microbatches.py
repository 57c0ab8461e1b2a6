"""Megatron's number-of-micro-batches calculator, with `--rampup-batch-size START INCR SAMPLES`:
the global batch grows from START by INCR, evenly over the first SAMPLES consumed samples."""
from __future__ import annotations


class NumMicroBatchesCalculator:
    def __init__(self, global_batch_size: int, micro_batch_size: int, data_parallel_size: int,
                 rampup_batch_size: tuple[int, int, int] | None = None):
        self.global_batch_size = global_batch_size
        self.micro_batch_times_data_parallel = micro_batch_size * data_parallel_size
        self.rampup = rampup_batch_size
        if rampup_batch_size is not None:
            start, increment, samples = rampup_batch_size
            difference = global_batch_size - start
            if start <= 0 or increment <= 0 or samples < 0 or difference < 0 or difference % increment:
                raise ValueError(
                    f"--rampup-batch-size {start} {increment} {samples}: the start must be positive "
                    f"and reach --global-batch-size {global_batch_size} in whole increments")
            step = self.micro_batch_times_data_parallel
            if start % step or increment % step:
                raise ValueError(
                    f"--rampup-batch-size {start} {increment} {samples}: start and increment must be "
                    f"multiples of micro batch size x data-parallel size ({step}), or the ramp "
                    f"would stop the run part-way")
            increments = difference // increment
            self.samples_per_increment = samples / increments if increments else float("inf")
        self.update(0, consistency_check=False)

    def update(self, consumed_samples: int, consistency_check: bool = True) -> None:
        if self.rampup is None or consumed_samples > self.rampup[2]:
            current = self.global_batch_size
        else:
            start, increment, _ = self.rampup
            current = start + int(consumed_samples / self.samples_per_increment) * increment
        if consistency_check and current % self.micro_batch_times_data_parallel:
            raise ValueError(f"global batch size {current} (ramp-up) is not divisible by micro batch "
                             f"size x data-parallel size {self.micro_batch_times_data_parallel}")
        self.current_global_batch_size = current
        self.num_microbatches = current // self.micro_batch_times_data_parallel


def train_iters_with_rampup(train_samples: int, calculator: NumMicroBatchesCalculator) -> int:
    """Megatron's update_train_iters: iterations of the ramp-up, then of the constant phase."""
    iterations, consumed = 0, 0
    while consumed <= calculator.rampup[2]:
        calculator.update(consumed, consistency_check=False)
        consumed += calculator.current_global_batch_size
        iterations += 1
    calculator.update(0, consistency_check=False)
    return iterations + (train_samples - consumed) // calculator.global_batch_size
