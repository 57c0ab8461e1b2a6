"""The pretraining loop: set up processes and groups, build model, optimizer and data, then
iterate micro-batches through the pipeline schedule (Megatron's 1F1B, interleaved or not) ->
gradient all-reduce over data parallelism -> global-norm clipping -> AdamW step -> LR schedule,
logging in Megatron's format and evaluating on schedule.

Data: every rank builds the datasets (one process per node builds the index caches) and reads
its data-parallel slice; tensor-parallel peers read the same micro-batches, and so do all
pipeline stages (only the first and last use the tokens, but every iterator advances alike).
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ascendspeed import device
from ascendspeed.arguments import PretrainConfig
from ascendspeed.checkpoint.io import read_tracker
from ascendspeed.checkpoint.save_load import LoadedState, load_checkpoint, save_checkpoint
from ascendspeed.core import parallel_state as ps
from ascendspeed.core.pipeline_parallel.partition import stage_layout
from ascendspeed.core.pipeline_parallel.schedules import get_forward_backward_func
from ascendspeed.core.tensor_parallel import model_parallel_seed
from ascendspeed.data.builders import build_datasets
from ascendspeed.data.samplers import build_pretraining_data_loader
from ascendspeed.data.tokenizer import build_tokenizer, vocab_size_with_padding
from ascendspeed.errors import AscendSpeedError, ConfigError, JobLockError, TrainingError, error_line
from ascendspeed.job import heartbeat as hb
from ascendspeed.job import rendezvous
from ascendspeed.job.collectives import any_rank, every_rank, named_failures
from ascendspeed.job.launcher import watch_launcher
from ascendspeed.job.lock import DirectoryLock
from ascendspeed.microbatches import NumMicroBatchesCalculator
from ascendspeed.model.bloom import BloomConfig, BloomModel
from ascendspeed.optimizer import build_optimizer
from ascendspeed.optimizer.lr_scheduler import OptimizerParamScheduler
from ascendspeed.optimizer.mixed_precision import ConstantLossScaler, DynamicLossScaler
from ascendspeed.optimizer.param_groups import get_param_groups
from ascendspeed.training_log import (LogInterval, TensorBoardWriter, format_iteration_line,
                                      measure_throughput, model_flops_per_iteration,
                                      validation_log_lines)

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run did, for callers and tests (losses are averages over data-parallel ranks)."""
    iteration: int = 0
    consumed_train_samples: int = 0
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)
    skipped_iterations: int = 0
    global_batch_sizes: list[int] = field(default_factory=list)
    model: list[torch.nn.Module] | None = None  # this rank's model chunks
    validation_losses: dict[int, float] = field(default_factory=dict)


def initialize_distributed(config: PretrainConfig) -> None:
    """Join the process group torchrun describes (if any) and create the TP/PP/DP groups, every
    collective and group creation bounded by --distributed-timeout-minutes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != config.parallel.world_size:
        raise RuntimeError(f"configured for {config.parallel.world_size} processes, launched with "
                           f"{world_size}")
    if world_size > 1 and not dist.is_initialized():
        device.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = device.distributed_backend(config.parallel.distributed_backend)
        # e.g. cpu:gloo,cuda:nccl: flags go over gloo; safe after torchrun restarts the workers
        rendezvous.init_process_group(backend, config.parallel.distributed_timeout)
    if dist.is_initialized():
        ps.initialize_model_parallel(config.parallel.tensor_model_parallel_size,
                                     config.parallel.pipeline_model_parallel_size,
                                     timeout=config.parallel.distributed_timeout)
    model_parallel_seed(config.training.seed)


def is_logging_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def padded_vocab_size(config: PretrainConfig, tokenizer) -> int:
    """The model's vocabulary: the tokenizer's, padded as Megatron pads it for this TP size."""
    return vocab_size_with_padding(tokenizer.vocab_size,
                                   config.tokenizer.make_vocab_size_divisible_by,
                                   config.parallel.tensor_model_parallel_size,
                                   config.tokenizer.pad_vocab_size_to)


def build_model(config: PretrainConfig, padded_vocab_size: int,
                init: bool = True) -> list[BloomModel]:
    """This rank's model chunks: one per pipeline stage, several with the interleaved schedule.
    The embedding is on the first stage's first chunk, the head on the last stage's last.
    The parameters are allocated on the device (built on "meta", then to_empty) and filled by
    the seeded init, or with `init=False` left for a checkpoint load to fill."""
    m = config.model
    bloom = BloomConfig(vocab_size=padded_vocab_size, hidden_size=m.hidden_size,
                        num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                        ffn_hidden_size=m.ffn_hidden_size, layernorm_epsilon=m.layernorm_epsilon,
                        hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
                        init_method_std=m.init_method_std, embed_layernorm=m.embed_layernorm,
                        init_seed=config.training.seed,
                        params_dtype=getattr(torch, config.precision.params_dtype),
                        recompute_granularity=m.recompute_granularity,
                        sequence_parallel=config.parallel.sequence_parallel,
                        fused_cross_entropy=config.kernels.fused_cross_entropy,
                        fused_bias_gelu=config.kernels.bias_gelu_fusion,
                        fused_attention=config.kernels.fused_attention)
    layout = pipeline_stage(config, ps.get_pipeline_model_parallel_rank())
    last = len(layout.chunks) - 1
    chunks = [BloomModel(bloom, pre_process=layout.pre_process and i == 0,
                         post_process=layout.post_process and i == last, layer_numbers=layers,
                         device="meta").to_empty(device=device.current_device())
              for i, layers in enumerate(layout.chunks)]
    if init:
        for chunk in chunks:
            chunk.reset_parameters()
    return chunks


def pipeline_stage(config: PretrainConfig, pp_rank: int):
    """The StageLayout (model chunks' layers, embedding / head) of pipeline stage `pp_rank`."""
    parallel = config.parallel
    return stage_layout(config.model.num_layers, parallel.pipeline_model_parallel_size, pp_rank,
                        parallel.num_layers_per_virtual_pipeline_stage,
                        parallel.pp_partition_method,
                        half_precision=config.precision.params_dtype != "float32")


def build_data_loaders(config: PretrainConfig, consumed_train_samples: int = 0,
                       consumed_valid_samples: int = 0):
    """Train and validation loaders, started where a resumed run left off (Megatron's samplers
    skip the consumed samples, so the data stream continues exactly)."""
    data, training = config.data, config.training
    train_ds, valid_ds, _ = build_datasets(data, training.train_valid_test_num_samples())
    if isinstance(train_ds, list) or isinstance(valid_ds, list):
        raise ConfigError("several --valid-weighted-split-paths groups: not yet supported in this "
                          "version (give one validation group)")
    options = dict(dataloader_type=data.dataloader_type, num_workers=data.num_workers)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    train = build_pretraining_data_loader(train_ds, consumed_train_samples,
                                          training.micro_batch_size, dp_rank, dp_size, **options)
    valid = None
    if valid_ds is not None and len(valid_ds) and training.eval_iters > 0:
        if data.dataloader_type == "single":  # the validation stream restarts after its end
            consumed_valid_samples %= len(valid_ds)
        valid = build_pretraining_data_loader(valid_ds, consumed_valid_samples,
                                              training.micro_batch_size, dp_rank, dp_size,
                                              **options)
    return train, valid


def _iterate(loader, dataloader_type: str, name: str):
    """Megatron's iterators: 'cyclic' starts its sampler over at each epoch's end (cyclic_iter);
    'single' walks the dataset once, which was built to hold every sample the run asks for."""
    if dataloader_type == "cyclic":
        while True:
            yield from loader
    yield from loader
    raise RuntimeError(f"the {name} data ran out ({len(loader.batch_sampler)} samples); build the "
                       f"dataset for more samples (--train-samples/--train-iters, --eval-iters)")


def forward_step(model: BloomModel, batch, input_tensor: torch.Tensor | None) -> torch.Tensor:
    """One model chunk on one micro-batch: tokens = text[:, :-1]. A chunk with the head returns
    Megatron's GPT loss (labels = text[:, 1:], mean over the tokens); the others return their
    hidden states for the next stage. Chunks without the embedding take `input_tensor`."""
    text = batch["text"].to(device.current_device())
    if not model.post_process:
        return model(text[:, :-1], hidden_states=input_tensor)
    losses = model(text[:, :-1], labels=text[:, 1:], hidden_states=input_tensor)
    return losses.float().mean()


def run_microbatches(model: list[BloomModel], data_iterator, config: PretrainConfig,
                     num_microbatches: int, scale_loss, forward_only: bool = False) -> list[float]:
    """Forward (and backward) over the micro-batches with the configured pipeline schedule; the
    per-micro-batch losses on the last stage, [] elsewhere."""
    parallel, m = config.parallel, config.model
    seq = (m.seq_length // parallel.tensor_model_parallel_size if parallel.sequence_parallel
           else m.seq_length)
    tensor_shape = (config.training.micro_batch_size, seq, m.hidden_size)
    schedule = get_forward_backward_func(parallel)
    return schedule(forward_step, data_iterator, model, num_microbatches, tensor_shape,
                    getattr(torch, config.precision.params_dtype), scale_loss,
                    forward_only=forward_only)


def build_training_optimizer(model_chunks: list[torch.nn.Module], config: PretrainConfig):
    """AdamW over Megatron's parameter groups, on fp32 gradient buffers whose buckets are averaged
    over DP during backward (--overlap-grad-reduce); fp32 master weights for a bf16/fp16 model,
    a loss scaler for fp16 (dynamic unless --loss-scale); sharded over DP with ZeRO-1
    (--use-distributed-optimizer). `step()` also clips to --clip-grad."""
    opt, precision, parallel = config.optimizer, config.precision, config.parallel
    # torch's fused AdamW (one kernel over all tensors; ~4x foreach on CPU) exists for CPU and CUDA
    fused = config.kernels.fused_optimizer and device.current_device().type in ("cpu", "cuda")
    implementation = {"fused": True} if fused else {"foreach": True}

    def make(groups):
        return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.adam_eps,
                                 **implementation)

    scaler = None
    if precision.params_dtype == "float16":
        scaler = (ConstantLossScaler(precision.loss_scale) if precision.loss_scale else
                  DynamicLossScaler(precision.initial_loss_scale, precision.min_loss_scale,
                                    precision.loss_scale_window, precision.hysteresis))
    return build_optimizer(model_chunks, get_param_groups(model_chunks, opt.weight_decay), make,
                           params_dtype=getattr(torch, precision.params_dtype), scaler=scaler,
                           clip_grad=config.training.clip_grad,
                           bucket_size=parallel.bucket_size,
                           overlap_grad_reduce=parallel.overlap_grad_reduce,
                           use_distributed_optimizer=parallel.use_distributed_optimizer,
                           fused_unscale=config.kernels.fused_optimizer,
                           stop_on_non_finite_norm=config.training.check_for_nan_in_loss_and_grad)


def _average_over_data_parallel(value: float) -> float:
    if ps.get_data_parallel_world_size() == 1:
        return value
    # host tensors, as the flags below: the groups' cpu:gloo entry carries them on every device
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, group=ps.get_data_parallel_group())
    return tensor.item() / ps.get_data_parallel_world_size()


def _loss_from_last_stage(losses: list[float]) -> float:
    """The mean micro-batch loss, averaged over DP and then sent from the last pipeline stage to
    the others (every stage runs the same collectives), so every rank reports the same loss."""
    loss = _average_over_data_parallel(sum(losses) / len(losses) if losses else 0.0)
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return loss
    group = ps.get_pipeline_model_parallel_group()
    tensor = torch.tensor([loss], dtype=torch.float64)
    dist.broadcast(tensor, src=dist.get_process_group_ranks(group)[-1], group=group)
    return tensor.item()


def train_step(model, optimizer, scheduler, data_iterator, config: PretrainConfig,
               num_microbatches: int, global_batch_size: int, iteration: int = 0):
    """One iteration over num_microbatches micro-batches: (loss, grad norm, updated). An fp16
    overflow skips the update (and the LR step), as Megatron does. With
    --check-for-nan-in-loss-and-grad a non-finite loss or gradient norm raises TrainingError
    before the parameters change (fp16 overflow stays the loss scaler's: a skipped step)."""
    optimizer.zero_grad(num_microbatches)
    losses = run_microbatches(model, data_iterator, config, num_microbatches, optimizer.scale_loss)
    loss = _loss_from_last_stage(losses)  # every rank: the same value
    check = config.training.check_for_nan_in_loss_and_grad
    fp16 = config.precision.params_dtype == "float16"
    if check and not fp16 and not math.isfinite(loss):
        _stop_on_non_finite(iteration, "loss", loss, all(math.isfinite(x) for x in losses))
    updated, grad_norm = optimizer.step()
    if check and grad_norm is not None and not math.isfinite(grad_norm):  # (not an fp16 overflow)
        _stop_on_non_finite(iteration, "gradient norm", grad_norm, optimizer.local_grads_finite)
    if check and fp16 and updated and not math.isfinite(loss):
        _stop_on_non_finite(iteration, "loss", loss, all(math.isfinite(x) for x in losses))
    if updated:
        scheduler.step(global_batch_size)
    return loss, grad_norm, updated


def _stop_on_non_finite(iteration: int, what: str, value: float, locally_finite: bool) -> None:
    """Every rank arrives here together (the value is global): name the ranks whose own loss or
    gradients were not finite, and stop."""
    ranks = [rank for rank, finite in enumerate(every_rank(locally_finite)) if not finite]
    where = f"rank(s) {', '.join(map(str, ranks))}" if ranks else "no single rank (the sum overflowed)"
    raise TrainingError(f"iteration {iteration}: non-finite {what} ({value}) from {where}; stopped "
                        f"before the optimizer step, so no checkpoint holds non-finite weights "
                        f"(--no-check-for-nan-in-loss-and-grad trains on)")


@torch.no_grad()
def evaluate(model: list[BloomModel], data_iterator, config: PretrainConfig) -> float:
    """Mean loss over --eval-iters iterations of micro-batches, forward only."""
    for chunk in model:
        chunk.eval()
    losses: list[float] = []
    for _ in range(config.training.eval_iters):
        losses += run_microbatches(model, data_iterator, config,
                                   config.training.num_microbatches, lambda loss: loss,
                                   forward_only=True)
    for chunk in model:
        chunk.train()
    return _loss_from_last_stage(losses)


def _time_is_up(start: float, minutes: float) -> bool:
    """Whether any rank has run out of time (all ranks must stop at the same iteration)."""
    done = torch.tensor([float(time.time() - start > 60.0 * minutes)])
    if dist.is_initialized():
        dist.all_reduce(done, op=dist.ReduceOp.MAX)
    return bool(done.item())


def _quiet(*_args) -> None:
    pass


class ExitSignal:
    """--exit-signal-handler: SIGTERM or SIGINT asks the run to stop after the current iteration
    (saving a checkpoint first); every rank learns it at the same iteration."""

    def __init__(self, enabled: bool):
        self.received = False
        self._previous = {}
        if enabled:
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)

    @property
    def enabled(self) -> bool:
        return bool(self._previous)

    def _handle(self, number, _frame) -> None:
        self.received = True

    def any_rank_received(self) -> bool:
        flag = torch.tensor([float(self.received)])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _exit_reason(iteration: int, training, run_start: float, stop_signal: ExitSignal) -> str | None:
    """Why the run stops after this iteration (the same answer on every rank), or None."""
    if training.kill_switch_path and any_rank(os.path.exists(training.kill_switch_path)):
        return f"kill switch {training.kill_switch_path}"  # (tools/pulse.py never relaunches these)
    if training.exit_interval and iteration % training.exit_interval == 0:
        return f"--exit-interval {training.exit_interval}"
    if training.exit_duration_in_mins and _time_is_up(run_start, training.exit_duration_in_mins):
        return f"--exit-duration-in-mins {training.exit_duration_in_mins}"
    if stop_signal.enabled and stop_signal.any_rank_received():
        return "signal received, --exit-signal-handler"
    return None


# How long a restarted rank 0 waits for the lock of the attempt torchrun is still ending (its
# SIGTERM grace is 30 s; forked data-loader workers hold the lock's file until they notice).
RESTART_LOCK_PATIENCE = 60.0


def _claim_save_directory(config: PretrainConfig) -> DirectoryLock | None:
    """Global rank 0 locks --save for the life of the job; every rank stops if it cannot."""
    if not config.checkpoint.save:
        return None
    lock = DirectoryLock(config.checkpoint.save)
    refused = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            # (the other ranks wait in any_rank meanwhile: half their timeout at most)
            patience = min(RESTART_LOCK_PATIENCE, config.parallel.distributed_timeout_minutes * 30)
            lock.acquire(patience if "TORCHELASTIC_RUN_ID" in os.environ else 0.0)
        except JobLockError as error:
            refused = error
    if any_rank(refused is not None):
        raise refused or JobLockError(f"{lock.path}: another job is using this checkpoint directory "
                                      f"(rank 0 names it)")
    return lock if refused is None else None


def _heartbeat(config: PretrainConfig) -> hb.Heartbeat:
    """The status file on global rank 0 (--heartbeat-file, else SAVE/heartbeat.json)."""
    path = config.training.heartbeat_file
    if path is None and config.checkpoint.save:
        path = os.path.join(config.checkpoint.save, hb.HEARTBEAT_FILENAME)
    if dist.is_initialized() and dist.get_rank() != 0:
        path = None
    return hb.Heartbeat(path, config.training.train_iters)


def pretrain(config: PretrainConfig, log=print) -> TrainResult:
    minutes = config.parallel.distributed_timeout_minutes
    with named_failures(minutes, "before the first iteration"):
        initialize_distributed(config)
        watch_launcher()
        lock = _claim_save_directory(config)
    heartbeat = _heartbeat(config)
    heartbeat.beat(0, 0, None, force=True)
    try:
        with named_failures(minutes, lambda: _progress(heartbeat)):
            result, reason = _pretrain(config, log, heartbeat)
    except AscendSpeedError as error:
        heartbeat.end(hb.FAILED, error_line(error)[len("error: "):])
        raise
    except KeyboardInterrupt:
        heartbeat.end(hb.STOPPED, "interrupted (KeyboardInterrupt)")
        raise
    except Exception as error:
        heartbeat.end(hb.FAILED, f"{type(error).__name__}: {' '.join(str(error).split())}")
        raise
    finally:
        if lock is not None:
            lock.release()
    heartbeat.end(hb.STOPPED if reason else hb.FINISHED, reason)
    return result


def wait_for_every_rank(config: PretrainConfig) -> None:
    """A barrier over all ranks, bounded and named like every collective of the run."""
    if dist.is_initialized():
        with named_failures(config.parallel.distributed_timeout_minutes, "at the end of the run"):
            dist.barrier()


def describe_run(config: PretrainConfig) -> str:
    """One log line of what the flags chose: precision, ZeRO-1, recompute, sequence parallelism
    and every pipeline stage's layers (1-based), e.g. `bfloat16 | ZeRO-1 over DP 8 | recompute
    full | stages: 0 embedding + layers 1-5, 1 layers 6-11, ...`."""
    parallel = config.parallel
    parts = [config.precision.params_dtype]
    if parallel.use_distributed_optimizer:
        parts.append(f"ZeRO-1 over DP {parallel.data_parallel_size}")
    parts.append(f"recompute {config.model.recompute_granularity or 'none'}")
    if parallel.sequence_parallel:
        parts.append("sequence parallel")
    pp = parallel.pipeline_model_parallel_size
    if pp > 1:
        stages = []
        for p in range(pp):
            layout = pipeline_stage(config, p)
            pieces = [f"layers {c[0]}-{c[-1]}" if len(c) > 1 else f"layer {c[0]}"
                      for c in layout.chunks if c]
            if layout.pre_process:
                pieces.insert(0, "embedding")
            if layout.post_process:
                pieces.append("head")
            stages.append(f"{p} {' + '.join(pieces)}")
        parts.append(f"stages: {', '.join(stages)}")
    return " | ".join(parts)


def _progress(heartbeat: hb.Heartbeat) -> str:
    iteration = heartbeat.status["iteration"]
    return f"after iteration {iteration}" if iteration else "before the first iteration"


def _pretrain(config: PretrainConfig, log, heartbeat: hb.Heartbeat) -> tuple[TrainResult, str | None]:
    """The run; (what it did, why it stopped before --train-iters or None)."""
    for notice in config.notices:
        logger.info(notice)
    tokenizer = build_tokenizer(config.tokenizer)
    padded_vocab = padded_vocab_size(config, tokenizer)
    # A checkpoint to load fills every parameter (or the load fails): no init to overwrite.
    load = config.checkpoint.load
    from_checkpoint = bool(load) and read_tracker(load) is not None
    model = build_model(config, padded_vocab, init=not from_checkpoint)
    for chunk in model:
        chunk.train()
    optimizer = build_training_optimizer(model, config)
    scheduler = OptimizerParamScheduler.from_config(optimizer, config)
    loaded = LoadedState()
    if config.checkpoint.load:
        loaded = load_checkpoint(config.checkpoint.load, model, optimizer, scheduler, config,
                                 padded_vocab, log=log if is_logging_rank() else _quiet,
                                 required=from_checkpoint)
        heartbeat.beat(loaded.iteration, loaded.consumed_train_samples, None)
    if is_logging_rank():
        params = sum(p.numel() for chunk in model for p in chunk.parameters())
        log(f" > {params:,} parameters on this rank (padded vocab {padded_vocab}, tokenizer "
            f"{tokenizer.vocab_size}); world {config.parallel.world_size} = TP "
            f"{config.parallel.tensor_model_parallel_size} x PP "
            f"{config.parallel.pipeline_model_parallel_size} x DP {config.parallel.data_parallel_size}")
        log(f" > {describe_run(config)}")
    train_loader, valid_loader = build_data_loaders(config, loaded.consumed_train_samples,
                                                    loaded.consumed_valid_samples)
    kind = config.data.dataloader_type
    train_iterator = _iterate(train_loader, kind, "training")
    valid_iterator = _iterate(valid_loader, kind, "validation") if valid_loader is not None else None

    training = config.training
    writer = TensorBoardWriter(training.tensorboard_dir if is_logging_rank() else None,
                               training.tensorboard_queue_size)
    result = TrainResult(iteration=loaded.iteration,
                         consumed_train_samples=loaded.consumed_train_samples)
    consumed_valid_samples = loaded.consumed_valid_samples
    stop_signal = ExitSignal(config.checkpoint.exit_signal_handler)

    def save(iteration: int) -> None:
        interval.pause()  # saving is not training time
        path = save_checkpoint(config.checkpoint.save, iteration, model, optimizer, scheduler,
                               config, padded_vocab, tokenizer.vocab_size,
                               result.consumed_train_samples, consumed_valid_samples,
                               loaded.provenance)
        if is_logging_rank():
            log(f" saved checkpoint at iteration {iteration} to {path}")
        interval.resume()

    run_start = time.time()
    interval = LogInterval()
    microbatches = NumMicroBatchesCalculator(training.global_batch_size, training.micro_batch_size,
                                             config.parallel.data_parallel_size,
                                             training.rampup_batch_size)
    saved_iteration = loaded.iteration
    reason = None
    for iteration in range(loaded.iteration + 1, training.train_iters + 1):
        microbatches.update(result.consumed_train_samples)
        global_batch = microbatches.current_global_batch_size
        loss, grad_norm, updated = train_step(model, optimizer, scheduler, train_iterator, config,
                                              microbatches.num_microbatches, global_batch, iteration)
        result.iteration = iteration
        result.consumed_train_samples += global_batch
        result.global_batch_sizes.append(global_batch)
        result.losses.append(loss)
        result.grad_norms.append(grad_norm)
        result.skipped_iterations += 0 if updated else 1
        interval.add(loss, updated)
        logged = iteration % training.log_interval == 0 or iteration == training.train_iters
        seconds = None
        if logged:
            device.synchronize()
            seconds = interval.seconds_per_iteration()
        heartbeat.beat(iteration, result.consumed_train_samples, loss, seconds_per_iteration=seconds)
        if logged:
            throughput = measure_throughput(
                flops_per_iteration=model_flops_per_iteration(
                    config.model, global_batch, config.model.seq_length, padded_vocab),
                tokens_per_iteration=global_batch * config.model.seq_length,
                seconds_per_iteration=seconds, world_size=config.parallel.world_size,
                peak_flops=training.peak_flops)
            learning_rate = optimizer.param_groups[0]["lr"]
            interval_losses = interval.mean_losses()
            if is_logging_rank():
                log(format_iteration_line(
                    iteration=iteration, train_iters=training.train_iters,
                    consumed_samples=result.consumed_train_samples,
                    seconds_per_iteration=seconds, learning_rate=learning_rate,
                    global_batch_size=global_batch,
                    losses=interval_losses, grad_norm=grad_norm,
                    loss_scale=optimizer.loss_scale, skipped_iterations=interval.skipped,
                    nan_iterations=interval.nans, throughput=throughput))
                writer.log_training(iteration, result.consumed_train_samples,
                                    learning_rate=learning_rate,
                                    global_batch_size=global_batch,
                                    losses=interval_losses,
                                    loss_scale=(optimizer.loss_scale
                                                if training.log_loss_scale_to_tensorboard else None),
                                    grad_norm=grad_norm, seconds_per_iteration=seconds,
                                    throughput=throughput,
                                    log_batch_size=training.log_batch_size_to_tensorboard)
            interval.reset()
        if valid_iterator is not None and iteration % training.eval_interval == 0:
            interval.pause()  # evaluation is not training time
            valid_loss = evaluate(model, valid_iterator, config)
            consumed_valid_samples += training.eval_iters * training.global_batch_size
            result.validation_losses[iteration] = valid_loss
            if is_logging_rank():
                for line in validation_log_lines(iteration, {"lm loss": valid_loss}):
                    log(line)
                writer.log_validation(iteration, result.consumed_train_samples,
                                      {"lm loss": valid_loss},
                                      log_ppl=training.log_validation_ppl_to_tensorboard)
            interval.resume()
        checkpoint = config.checkpoint
        if checkpoint.save and checkpoint.save_interval and iteration % checkpoint.save_interval == 0:
            save(iteration)
            saved_iteration = iteration
        reason = _exit_reason(iteration, training, run_start, stop_signal)
        if reason:
            if checkpoint.save and saved_iteration != iteration:
                save(iteration)
                saved_iteration = iteration
            if is_logging_rank():
                log(f" exiting at iteration {iteration} ({reason})")
            break
    else:  # the run is complete: Megatron saves its last iteration too
        if config.checkpoint.save and result.iteration != saved_iteration:
            save(result.iteration)
    stop_signal.restore()
    writer.close()
    result.model = model
    return result, reason
