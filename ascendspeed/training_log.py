"""Megatron-LM's log lines, model-FLOPs accounting and an optional TensorBoard writer.

The iteration and validation lines keep Megatron-LM's `training_log` / `evaluate_and_print_results`
formats field for field, so existing log parsers keep working. Throughput fields (tokens per
second, TFLOP/s per device, MFU) are appended after Megatron's last field.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Mapping

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- FLOPs
def model_flops_per_iteration(config, global_batch: int, seq_length: int, vocab: int) -> float:
    """Model FLOPs of one training iteration (forward + backward) of a GPT/BLOOM model.

    Megatron-LM's `num_floating_point_operations` (training.py, 2024) without grouped-query
    attention, MoE or SwiGLU:

        12 * B * s * L * h^2 * (2 + s/h + f/h + V/(2*L*h))

    12 = 3 (forward, weight-gradient and data-gradient GEMMs) x 2 (GEMMs come in pairs) x 2
    (multiply + add). With the usual f = 4h this is 72*B*s*L*h^2 * (1 + s/(6h) + V/(12*L*h)).
    The attention term counts the full s x s score matrix (no causal halving), the logit GEMM is
    counted once, and activation recompute is NOT counted: these are model FLOPs, so the MFU
    derived from them does not rise when recompute adds work. (Megatron-DeepSpeed's older
    `flops_calculator` uses 96 with recompute and V/(16*L*h); the numbers here will differ.)

    `config` needs num_layers and hidden_size; ffn_hidden_size defaults to 4 * hidden_size.
    `vocab` is the padded vocabulary size (the logit GEMM's width)."""
    layers, hidden = config.num_layers, config.hidden_size
    ffn = getattr(config, "ffn_hidden_size", None) or 4 * hidden
    return (12.0 * global_batch * seq_length * layers * hidden * hidden
            * (2.0 + seq_length / hidden + ffn / hidden + vocab / (2.0 * layers * hidden)))


@dataclass(frozen=True)
class Throughput:
    tokens_per_second: float
    tflops_per_device: float
    mfu: float | None = None  # fraction of the device's peak; None without --peak-flops


def measure_throughput(*, flops_per_iteration: float, tokens_per_iteration: int,
                       seconds_per_iteration: float, world_size: int,
                       peak_flops: float | None = None) -> Throughput:
    """Per-device TFLOP/s as Megatron-LM computes it (model FLOPs / (time * world size)); MFU
    against `peak_flops` (FLOP/s of one device) when given."""
    per_device = flops_per_iteration / (seconds_per_iteration * world_size)
    return Throughput(tokens_per_second=tokens_per_iteration / seconds_per_iteration,
                      tflops_per_device=per_device / 1e12,
                      mfu=per_device / peak_flops if peak_flops else None)


# ---------------------------------------------------------------------------------- intervals
class LogInterval:
    """What one log interval accumulated, counted as Megatron-LM's training_log counts it: the
    iterations this run actually trained since the last line (a resumed run's first interval is
    short), the skipped (fp16 overflow) and NaN ones among them, the loss summed over the ones
    that stepped, and the training time (paused for evaluation and checkpoint saves)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        self.iterations = self.skipped = self.nans = 0
        self._loss_sum = 0.0
        self._elapsed = 0.0
        self._started: float | None = self._clock()

    def add(self, loss: float, updated: bool) -> None:
        self.iterations += 1
        self.skipped += 0 if updated else 1
        self.nans += 0 if math.isfinite(loss) else 1
        if updated:  # Megatron averages the loss over the iterations that stepped
            self._loss_sum += loss

    def pause(self) -> None:
        if self._started is not None:
            self._elapsed += self._clock() - self._started
            self._started = None

    def resume(self) -> None:
        if self._started is None:
            self._started = self._clock()

    def seconds_per_iteration(self) -> float:
        running = self._clock() - self._started if self._started is not None else 0.0
        return (self._elapsed + running) / max(1, self.iterations)

    def mean_losses(self, name: str = "lm loss") -> dict[str, float]:
        """{name: mean}, or {} when every step of the interval was skipped (Megatron prints no
        loss then)."""
        stepped = self.iterations - self.skipped
        return {name: self._loss_sum / stepped} if stepped else {}


# ---------------------------------------------------------------------------------- log lines
def format_iteration_line(*, iteration: int, train_iters: int, consumed_samples: int,
                          seconds_per_iteration: float, learning_rate: float,
                          global_batch_size: int, losses: Mapping[str, float],
                          loss_scale: float = 1.0, grad_norm: float | None = None,
                          num_zeros_in_grad: float | None = None,
                          params_norm: float | None = None, skipped_iterations: int = 0,
                          nan_iterations: int = 0, throughput: Throughput | None = None) -> str:
    """Megatron-LM's training_log line; `losses` are the averages over the logging interval
    (e.g. {"lm loss": 6.51}). Every loss is printed (Megatron drops averages <= 0)."""
    line = f" iteration {iteration:8d}/{train_iters:8d} |"
    line += f" consumed samples: {consumed_samples:12d} |"
    line += f" elapsed time per iteration (ms): {seconds_per_iteration * 1000.0:.1f} |"
    line += f" learning rate: {learning_rate:.3E} |"
    line += f" global batch size: {global_batch_size:5d} |"
    for key, value in losses.items():
        line += f" {key}: {value:.6E} |"
    line += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        line += f" grad norm: {grad_norm:.3f} |"
    if num_zeros_in_grad is not None:
        line += f" num zeros: {num_zeros_in_grad:.1f} |"
    if params_norm is not None:
        line += f" params norm: {params_norm:.3f} |"
    line += f" number of skipped iterations: {skipped_iterations:3d} |"
    line += f" number of nan iterations: {nan_iterations:3d} |"
    if throughput is not None:
        line += f" tokens per second: {throughput.tokens_per_second:.1f} |"
        line += f" TFLOP/s per device: {throughput.tflops_per_device:.3f} |"
        if throughput.mfu is not None:
            line += f" MFU: {100.0 * throughput.mfu:.2f}% |"
    return line


_ITERATION_LINE = re.compile(r"\biteration\s+(\d+)/\s*(\d+)\s*\|")


def parse_iteration_line(line: str) -> tuple[int, dict[str, str]] | None:
    """(iteration, {field: text}) of a format_iteration_line line, e.g. (4, {"lm loss":
    "9.994644E+00", ...}); None for any other line (validation lines included). Text before
    'iteration' (a launcher's rank prefix) is ignored. A log interval whose every step was
    skipped has no loss field (Megatron prints none)."""
    match = _ITERATION_LINE.search(line)
    if match is None:
        return None
    fields = {}
    for part in line[match.end():].split("|"):
        key, colon, value = part.partition(":")
        if colon:
            fields[key.strip()] = value.strip()
    return int(match.group(1)), fields


def validation_ppl(loss: float) -> float:
    """Megatron's perplexity: exp(loss), with the loss clipped at 20."""
    return math.exp(min(20.0, loss))


def validation_log_lines(prefix: str | int, losses: Mapping[str, float]) -> list[str]:
    """Megatron-LM's evaluate_and_print_results: the line framed by dashes one longer than it.
    `prefix` is 'iteration N' (an int N is taken as that) or e.g. 'the end of training for val
    data'."""
    if isinstance(prefix, int):
        prefix = f"iteration {prefix}"
    line = f" validation loss at {prefix} | "
    for key, value in losses.items():
        line += f"{key} value: {value:.6E} | "
        line += f"{key} PPL: {validation_ppl(value):.6E} | "
    dashes = "-" * (len(line) + 1)
    return [dashes, line, dashes]


# ---------------------------------------------------------------------------------- TensorBoard
_warned_no_tensorboard = False


def _summary_writer_class():
    """torch's SummaryWriter, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


class TensorBoardWriter:
    """Megatron's TensorBoard scalars, through torch.utils.tensorboard when `tensorboard` is
    installed. Without a log_dir it does nothing; without the package it warns once and does
    nothing. Create it on one rank only (Megatron: the last)."""

    def __init__(self, log_dir: str | None, max_queue: int = 1000):
        global _warned_no_tensorboard
        self._writer = None
        if log_dir is None:
            return
        writer_class = _summary_writer_class()
        if writer_class is None:
            if not _warned_no_tensorboard:
                logger.warning("--tensorboard-dir %s: the tensorboard package is not installed, "
                               "so nothing is written there (pip install tensorboard)", log_dir)
                _warned_no_tensorboard = True
            return
        self._writer = writer_class(log_dir=log_dir, max_queue=max_queue)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    def _pair(self, tag: str, value: float, iteration: int, consumed_samples: int) -> None:
        self.add_scalar(tag, value, iteration)
        self.add_scalar(f"{tag} vs samples", value, consumed_samples)

    def log_training(self, iteration: int, consumed_samples: int, *, learning_rate: float,
                     global_batch_size: int, losses: Mapping[str, float],
                     loss_scale: float | None = None, grad_norm: float | None = None,
                     seconds_per_iteration: float | None = None,
                     throughput: Throughput | None = None, log_batch_size: bool = False) -> None:
        """Megatron's tags: learning-rate, batch-size, each loss, loss-scale, grad-norm (each
        also '... vs samples'), iteration-time; plus throughput (TFLOP/s per device),
        tokens-per-second and mfu."""
        if self._writer is None:
            return
        self._pair("learning-rate", learning_rate, iteration, consumed_samples)
        if log_batch_size:
            self._pair("batch-size", global_batch_size, iteration, consumed_samples)
        for key, value in losses.items():
            self._pair(key, value, iteration, consumed_samples)
        if loss_scale is not None:
            self._pair("loss-scale", loss_scale, iteration, consumed_samples)
        if grad_norm is not None:
            self._pair("grad-norm", grad_norm, iteration, consumed_samples)
        if seconds_per_iteration is not None:
            self.add_scalar("iteration-time", seconds_per_iteration, iteration)
        if throughput is not None:
            self.add_scalar("throughput", throughput.tflops_per_device, iteration)
            self.add_scalar("tokens-per-second", throughput.tokens_per_second, iteration)
            if throughput.mfu is not None:
                self.add_scalar("mfu", throughput.mfu, iteration)

    def log_validation(self, iteration: int, consumed_samples: int, losses: Mapping[str, float],
                       *, log_ppl: bool = False) -> None:
        """'{loss} validation' (and '{loss} validation ppl' with log_ppl), each also vs samples."""
        if self._writer is None:
            return
        for key, value in losses.items():
            self._pair(f"{key} validation", value, iteration, consumed_samples)
            if log_ppl:
                self._pair(f"{key} validation ppl", validation_ppl(value), iteration,
                           consumed_samples)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
