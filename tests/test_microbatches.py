"""Batch-size ramp-up as Megatron computes it, and its iteration count."""
import pytest

from ascendspeed.microbatches import NumMicroBatchesCalculator, train_iters_with_rampup


def test_bloom_176b_rampup():
    # BLOOM-176B: global 2048, ramp from 192 by 16 over 9,765,625 samples; micro 2 x DP 8.
    calc = NumMicroBatchesCalculator(2048, 2, 8, (192, 16, 9_765_625))
    assert calc.current_global_batch_size == 192 and calc.num_microbatches == 12
    per_increment = 9_765_625 / ((2048 - 192) // 16)
    calc.update(int(per_increment) + 1)
    assert calc.current_global_batch_size == 208 and calc.num_microbatches == 13
    calc.update(9_765_626)
    assert calc.current_global_batch_size == 2048 and calc.num_microbatches == 128


def test_train_iters_with_rampup_counts_the_ramp():
    calc = NumMicroBatchesCalculator(16, 2, 1, (4, 4, 40))
    # ramp: 4 samples/increment step 4 -> consumed 0:4, 4..: sizes 4,4,...; then constant 16
    iterations = train_iters_with_rampup(200, calc)
    assert calc.current_global_batch_size == 4  # reset to the start after counting
    consumed, expected = 0, 0
    while consumed <= 40:
        calc.update(consumed, consistency_check=False)
        consumed += calc.current_global_batch_size
        expected += 1
    assert iterations == expected + (200 - consumed) // 16


def test_bad_rampup():
    with pytest.raises(ValueError, match="whole increments"):
        NumMicroBatchesCalculator(100, 1, 1, (8, 16, 1000))
    with pytest.raises(ValueError, match="multiples of micro batch size x data-parallel size"):
        NumMicroBatchesCalculator(16, 4, 1, (4, 2, 100))
