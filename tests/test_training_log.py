"""Megatron-LM's log-line formats, the model-FLOPs formula and the TensorBoard wrapper."""
import logging
import math
from types import SimpleNamespace

import pytest

from ascendspeed import training_log
from ascendspeed.arguments import ModelConfig
from ascendspeed.training_log import (TensorBoardWriter, Throughput, format_iteration_line,
                                      measure_throughput, model_flops_per_iteration,
                                      validation_log_lines)

ISSUE_LINE = (" iteration       10/     100 | consumed samples:          320 | elapsed time per "
              "iteration (ms): 812.3 | learning rate: 1.500E-04 | global batch size:    32 | "
              "lm loss: 6.512345E+00 | loss scale: 1.0 | grad norm: 1.234 | number of skipped "
              "iterations:   0 | number of nan iterations:   0 |")


def iteration_line(**kwargs):
    fields = dict(iteration=10, train_iters=100, consumed_samples=320,
                  seconds_per_iteration=0.8123, learning_rate=1.5e-4, global_batch_size=32,
                  losses={"lm loss": 6.512345}, loss_scale=1.0, grad_norm=1.2344)
    fields.update(kwargs)
    return format_iteration_line(**fields)


def test_iteration_line_is_megatrons():
    assert iteration_line() == ISSUE_LINE


def test_iteration_line_optional_fields_and_widths():
    line = iteration_line(iteration=123456, train_iters=1000000, consumed_samples=7,
                          grad_norm=None, params_norm=12.34567, num_zeros_in_grad=3,
                          skipped_iterations=2, nan_iterations=1000, loss_scale=4096)
    assert line.startswith(" iteration   123456/ 1000000 | consumed samples:            7 |")
    assert "grad norm" not in line
    assert line.endswith(" loss scale: 4096.0 | num zeros: 3.0 | params norm: 12.346 |"
                         " number of skipped iterations:   2 | number of nan iterations: 1000 |")


def test_throughput_fields_are_appended():
    line = iteration_line(throughput=Throughput(tokens_per_second=20171.25,
                                                tflops_per_device=1.23456, mfu=0.41234))
    assert line == ISSUE_LINE + (" tokens per second: 20171.2 | TFLOP/s per device: 1.235 |"
                                 " MFU: 41.23% |")
    line = iteration_line(throughput=Throughput(tokens_per_second=1.0, tflops_per_device=0.5))
    assert line.endswith(" TFLOP/s per device: 0.500 |") and "MFU" not in line


def test_validation_lines():
    lines = validation_log_lines(100, {"lm loss": 5.123456})
    ppl = math.exp(5.123456)
    assert lines[1] == (f" validation loss at iteration 100 | lm loss value: 5.123456E+00 | "
                        f"lm loss PPL: {ppl:.6E} | ")
    assert lines[0] == lines[2] == "-" * (len(lines[1]) + 1)
    end = validation_log_lines("the end of training for val data", {"lm loss": 30.0})
    assert end[1].startswith(" validation loss at the end of training for val data | ")
    assert f"lm loss PPL: {math.exp(20):.6E} | " in end[1]  # Megatron clips the loss at 20


def test_flops_formula():
    config = ModelConfig(num_layers=30, hidden_size=4096, num_attention_heads=32, seq_length=2048,
                         position_embedding_type="alibi")
    B, s, L, h, V = 512, 2048, 30, 4096, 250880
    expected = 72 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))
    assert model_flops_per_iteration(config, B, s, V) == pytest.approx(expected, rel=1e-12)
    # a non-default ffn: Megatron's general form, 12 B s L h^2 (2 + s/h + f/h + V/(2 L h))
    small = SimpleNamespace(num_layers=2, hidden_size=8, ffn_hidden_size=16)
    assert model_flops_per_iteration(small, 1, 4, 10) == \
        pytest.approx(12 * 4 * 2 * 64 * (2 + 0.5 + 2 + 10 / 32))


def test_measure_throughput():
    t = measure_throughput(flops_per_iteration=8e12, tokens_per_iteration=4096,
                           seconds_per_iteration=2.0, world_size=4, peak_flops=2e12)
    assert t.tokens_per_second == 2048 and t.tflops_per_device == 1.0 and t.mfu == 0.5
    assert measure_throughput(flops_per_iteration=1e12, tokens_per_iteration=1,
                              seconds_per_iteration=1.0, world_size=1).mfu is None


class FakeWriter:
    def __init__(self, log_dir, max_queue):
        self.log_dir, self.max_queue, self.scalars, self.closed = log_dir, max_queue, [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_scalars_use_megatrons_tags(monkeypatch, tmp_path):
    monkeypatch.setattr(training_log, "_summary_writer_class", lambda: FakeWriter)
    writer = TensorBoardWriter(str(tmp_path), max_queue=5)
    fake = writer._writer
    assert writer.enabled and fake.max_queue == 5
    writer.log_training(10, 320, learning_rate=1e-4, global_batch_size=32,
                        losses={"lm loss": 6.5}, loss_scale=1.0, grad_norm=1.5,
                        seconds_per_iteration=0.8, log_batch_size=True,
                        throughput=Throughput(100.0, 2.0, 0.25))
    writer.log_validation(10, 320, {"lm loss": 2.0}, log_ppl=True)
    tags = {tag: (value, step) for tag, value, step in fake.scalars}
    assert tags["learning-rate"] == (1e-4, 10) and tags["learning-rate vs samples"] == (1e-4, 320)
    assert tags["batch-size"] == (32, 10) and tags["lm loss vs samples"] == (6.5, 320)
    assert tags["loss-scale"] == (1.0, 10) and tags["grad-norm"] == (1.5, 10)
    assert tags["iteration-time"] == (0.8, 10) and tags["throughput"] == (2.0, 10)
    assert tags["mfu"] == (0.25, 10) and tags["tokens-per-second"] == (100.0, 10)
    assert tags["lm loss validation"] == (2.0, 10)
    assert tags["lm loss validation ppl vs samples"] == (pytest.approx(math.exp(2.0)), 320)
    writer.close()
    assert fake.closed and not writer.enabled


def test_tensorboard_missing_warns_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(training_log, "_summary_writer_class", lambda: None)
    monkeypatch.setattr(training_log, "_warned_no_tensorboard", False)
    with caplog.at_level(logging.WARNING, logger="ascendspeed.training_log"):
        first = TensorBoardWriter(str(tmp_path))
        TensorBoardWriter(str(tmp_path))
    assert not first.enabled
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "tensorboard package is not installed" in warnings[0]
    assert str(tmp_path) in warnings[0]
    first.log_training(1, 1, learning_rate=0.1, global_batch_size=1, losses={"lm loss": 1.0})
    first.close()


def test_no_log_dir_is_silent(caplog):
    writer = TensorBoardWriter(None)
    assert not writer.enabled and not caplog.records
