"""A paper plan of a BLOOM training run: parameters, per-device memory of each pipeline stage,
FLOPs and time. An estimate from formulas, not a measurement (tools/plan.py prints it).

Shapes: h hidden, a heads, L layers, V padded vocabulary, f = 4h, s sequence, b micro-batch;
t, p, d the tensor-, pipeline- and data-parallel sizes; m = global batch / (b * d) micro-batches.

Parameters. BLOOM has V*h + L*(12h^2 + 13h) + 4h: the word embeddings counted once (the head is
tied), each block's QKV, dense and two MLP matrices with their biases and two LayerNorms, plus
the embedding and final LayerNorms. One device holds each of its stage's tensors whole or, where
checkpoint/tensors.py's table gives a TP split dim, 1/t of it: a block is 12h^2/t + 7h/t + 6h;
the first stage adds V*h/t + 2h (embedding, its LayerNorm), the last 2h (final LayerNorm) and,
when p > 1, its own copy of the tied embedding, V*h/t. Which layers a stage holds is the
trainer's partition (even, or `--pp-partition-method`: core/pipeline_parallel/partition.py).

Memory per device, for P parameters on the stage (as the trainer keeps them):
- params: P * 2 bytes (bf16/fp16) or P * 4 (fp32);
- grads: P * 4, the fp32 `main_grad` buffers (core/distributed/grad_buffer.py), whatever the
  model dtype, and not sharded by ZeRO-1 (it reduce-scatters into them);
- optimizer: fp32 master weights (bf16/fp16 only: 4 bytes) + AdamW's exp_avg and exp_avg_sq
  (8 bytes), divided by d under ZeRO-1 (`--use-distributed-optimizer`);
- activations: Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
  Models" (2022), eq. 1-3, with its 2-byte tensors taken at the activation element size e (2, or
  4 in fp32) and 1-byte dropout masks. One block, one micro-batch, in bytes:
      sbh * (4e + 2 + 12e/t)   + a*s^2*b * (2e + 1)/t   (tensor parallelism)
      sbh * (16e + 2)/t        + a*s^2*b * (2e + 1)/t   (with sequence parallelism)
  (e = 2: Korthikanti's 34 sbh + 5as^2b, and 10 + 24/t). The 2 sbh of masks count only with
  hidden dropout > 0. The s^2 term is the stored attention probabilities and their dropout mask:
  the fused attention the trainer chooses when attention dropout is 0 (model/fused.py: the CPU
  kernel, flash-attn, npu_fusion_attention) keeps no s x s tensor, so the term counts only with
  attention dropout > 0, and selective recompute drops it. Full recompute keeps each block's
  input (e*sbh, /t with sequence parallelism) plus, while one block is recomputed, that block's
  full set. A stage keeps a micro-batch's activations while 1F1B has it in flight:
  min(p - stage, m) micro-batches on stage `stage` (0-based), 1 without pipelining. The first
  stage also keeps the embedding's output for its LayerNorm (e*sbh per micro-batch, /t with SP).
  The last stage, one micro-batch at a time, keeps the final LayerNorm's input and the head's
  input (e*sbh each) and the logits [s, b, V/t]: the (default, fused) vocab-parallel cross
  entropy saves them in the model dtype and writes their gradient (2 copies;
  core/tensor_parallel/cross_entropy.py), and fp32 logits at t = 1 go to ATen's cross entropy,
  whose log-softmax output and the two gradients of its backward make 3 fp32 copies. Autograd
  makes each parameter's gradient in the model dtype before the hook adds it into main_grad:
  the largest one (the embedding's, or a block's 4h x h/t matrix) is added on every stage; on
  the last it is the head's, made beside the logits' gradient once the saved logits are freed.

Not modelled: the framework's own memory (device context, torch, the interpreter, the data
loader; about 320 MiB per process on a CPU), allocator fragmentation and caching (on a CPU,
glibc's heap can keep what tensors under 32 MiB freed, so peak RSS runs tens of MiB over the
live bytes), communication buffers, the optimizer step's temporaries (none with the fused AdamW
the trainer takes on CPU and CUDA; foreach's, about 4 bytes per stepped element, on an NPU) and
the interleaved schedule.

FLOPs per iteration, for the global batch B:
- model FLOPs: Megatron-LM's, `training_log.model_flops_per_iteration`:
  72*B*s*L*h^2 * (1 + s/(6h) + V/(12*L*h)), recompute not counted;
- hardware FLOPs: Megatron-DeepSpeed's throughput formula, the one BLOOM's logs printed:
  24*k*B*s*L*h^2 * (1 + s/(6h) + V/(16*L*h)) with k = 4 under full recompute (the extra
  forward), else 3 (then it reads a little under the model FLOPs: its logit term is 3/4 of
  Megatron-LM's).
Per device: FLOPs / (seconds per iteration * world size).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ascendspeed.checkpoint.tensors import Chunk, chunk_tensors, whole_model
from ascendspeed.core.pipeline_parallel.partition import stage_layout, validate_pipeline
from ascendspeed.errors import ConfigError
from ascendspeed.training_log import model_flops_per_iteration

GIB = 2 ** 30


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    padded_vocab_size: int = 250880

    @property
    def ffn_hidden_size(self) -> int:
        return 4 * self.hidden_size


# The BLOOM family (HF configs; BigScience padded the 250,680-token vocabulary to 250,880).
MODELS = {
    "bloom-560m": ModelShape(24, 1024, 16),
    "bloom-1b7": ModelShape(24, 2048, 16),
    "bloom-7b1": ModelShape(30, 4096, 32),
    "bloom-176b": ModelShape(70, 14336, 112),
}


@dataclass(frozen=True)
class RunLayout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    micro_batch_size: int = 1
    global_batch_size: int | None = None  # default: micro batch x DP (one micro-batch)
    seq_length: int = 2048
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16"
    distributed_optimizer: bool = False
    recompute_granularity: str | None = None  # None | "full" | "selective"
    sequence_parallel: bool = False
    pp_partition_method: str | None = None
    hidden_dropout: float = 0.1  # Megatron's defaults, which BLOOM-176B kept
    attention_dropout: float = 0.1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel

    @property
    def global_batch(self) -> int:
        if self.global_batch_size is None:
            return self.micro_batch_size * self.data_parallel
        return self.global_batch_size

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.micro_batch_size * self.data_parallel)


@dataclass
class StageMemory:
    stage: int
    layers: int
    parameters: int  # on one device of this stage
    params_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    total_gb: float
    microbatches_in_flight: int


@dataclass
class Plan:
    model: ModelShape
    layout: RunLayout
    parameters: int
    stages: list[StageMemory]  # every pipeline stage
    model_flops_per_iteration: float
    hardware_flops_per_iteration: float
    device_memory_gb: float | None = None
    seconds_per_iteration: float | None = None
    train_tokens: float | None = None
    peak_flops: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gb(self) -> float:
        return max(s.total_gb for s in self.stages)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory_gb is None else self.peak_gb <= self.device_memory_gb

    @property
    def tokens_per_iteration(self) -> int:
        return self.layout.global_batch * self.layout.seq_length

    def per_device_tflops(self, flops: float) -> float | None:
        if self.seconds_per_iteration is None:
            return None
        return flops / (self.seconds_per_iteration * self.layout.world_size) / 1e12

    def reported_stages(self) -> list[StageMemory]:
        """The first, a middle and the last stage (fewer when the pipeline is shorter)."""
        picks = sorted({0, len(self.stages) // 2, len(self.stages) - 1})
        return [self.stages[i] for i in picks]

    def as_dict(self) -> dict:
        tflops_model = self.per_device_tflops(self.model_flops_per_iteration)
        tflops_hardware = self.per_device_tflops(self.hardware_flops_per_iteration)
        seconds = self.seconds_per_iteration
        tokens_per_second = self.tokens_per_iteration / seconds if seconds else None
        last = len(self.stages) - 1
        names = {0: "first, last"} if last == 0 else {0: "first", last: "last"}
        result = {
            "estimate": True,  # from formulas (ascendspeed/planning.py), not measured
            "memory_unit": "GiB (2^30 bytes)",
            "model": asdict(self.model),
            "layout": dict(asdict(self.layout), world_size=self.layout.world_size,
                           global_batch_size=self.layout.global_batch,
                           num_microbatches=self.layout.num_microbatches),
            "parameters": self.parameters,
            "stages": [dict(asdict(s), role=names.get(s.stage, "middle"))
                       for s in self.reported_stages()],
            "peak_gb": self.peak_gb,  # over every stage, not only those listed
            "peak_stage": max(self.stages, key=lambda s: s.total_gb).stage,
            "device_memory_gb": self.device_memory_gb,
            "fits": self.fits,
            "model_flops_per_iteration": self.model_flops_per_iteration,
            "hardware_flops_per_iteration": self.hardware_flops_per_iteration,
            "model_tflops_per_device": tflops_model,
            "hardware_tflops_per_device": tflops_hardware,
            "mfu": (tflops_model * 1e12 / self.peak_flops
                    if tflops_model is not None and self.peak_flops else None),
            "seconds_per_iteration": seconds,
            "tokens_per_second": tokens_per_second,
            "train_tokens": self.train_tokens,
            "days_to_train": (self.train_tokens / tokens_per_second / 86400.0
                              if self.train_tokens and tokens_per_second else None),
            "notes": list(self.notes),
        }
        return result


# ------------------------------------------------------------------------------ parameters
def _numel(tensor, model: ModelShape, tp: int) -> int:
    """One device's elements of a row of checkpoint/tensors.py's table."""
    numel = math.prod(tensor.full_shape(model.padded_vocab_size, model.hidden_size,
                                        model.ffn_hidden_size))
    return numel if tensor.split_dim is None else numel // tp


def _stage_tensors(model: ModelShape, layers: tuple[int, ...], first: bool, last: bool):
    return [entry.tensor for entry in chunk_tensors(Chunk(tuple(layers), first, last))]


def total_parameters(model: ModelShape) -> int:
    """Every tensor of the model once (the tied head is the word embeddings):
    V*h + L*(12h^2 + 13h) + 4h."""
    return sum(_numel(entry.tensor, model, 1) for entry in whole_model(model.num_layers))


def stage_parameters(model: ModelShape, tp: int, layers: tuple[int, ...], first: bool,
                     last: bool) -> tuple[int, int]:
    """(elements on one device of the stage, elements of its largest parameter)."""
    sizes = [_numel(tensor, model, tp) for tensor in _stage_tensors(model, layers, first, last)]
    return sum(sizes), max(sizes)


# ------------------------------------------------------------------------------ activations
def block_activation_bytes(model: ModelShape, layout: RunLayout, element: int) -> float:
    """Korthikanti et al.'s per-block activations of one micro-batch, element size `element`."""
    s, b, h, a = layout.seq_length, layout.micro_batch_size, model.hidden_size, \
        model.num_attention_heads
    t, e = layout.tensor_parallel, element
    sbh = s * b * h
    masks = 2 if layout.hidden_dropout > 0 else 0
    sp = layout.sequence_parallel and t > 1
    linear = sbh * (16 * e + masks) / t if sp else sbh * (4 * e + masks + 12 * e / t)
    scores = 0.0
    if layout.attention_dropout > 0 and layout.recompute_granularity != "selective":
        scores = a * s * s * b * (2 * e + 1) / t
    return linear + scores


def stage_activation_bytes(model: ModelShape, layout: RunLayout, layers: int, first: bool,
                           last: bool, in_flight: int, largest_parameter: int) -> float:
    s, b, h, t = layout.seq_length, layout.micro_batch_size, model.hidden_size, \
        layout.tensor_parallel
    e = 4 if layout.precision == "fp32" else 2
    sp_div = t if layout.sequence_parallel and t > 1 else 1
    sbh = s * b * h
    block = block_activation_bytes(model, layout, e)
    if layout.recompute_granularity == "full":
        per_microbatch = layers * e * sbh / sp_div
        working = block
    else:
        per_microbatch = layers * block
        working = 0.0
    if first:
        per_microbatch += e * sbh / sp_div  # the embedding's output, kept for its LayerNorm
    total = in_flight * per_microbatch + working
    gradient = e * largest_parameter  # made by autograd before the hook adds it to main_grad
    if last:
        logits = s * b * model.padded_vocab_size / t
        if layout.precision == "fp32" and t == 1:
            copies, size = 3, 4  # ATen's cross entropy: log-softmax output + 2 gradients
        else:
            copies, size = 2, e  # chunked cross entropy: the saved logits + their gradient
        # The head's weight gradient comes once the saved logits are freed, beside theirs.
        total += max(copies * size * logits, size * logits + gradient)
        total += e * sbh / sp_div + e * sbh  # final LayerNorm's input, the head's input
    else:
        total += gradient
    return total


# ------------------------------------------------------------------------------ FLOPs
def hardware_flops_per_iteration(model: ModelShape, global_batch: int, seq_length: int,
                                 recompute_full: bool) -> float:
    """Megatron-DeepSpeed's throughput formula (what BLOOM's training logs printed):
    24*k*B*s*L*h^2 * (1 + s/(6h) + V/(16*L*h)), k = 4 with full recompute, else 3."""
    layers, h, v = model.num_layers, model.hidden_size, model.padded_vocab_size
    k = 4 if recompute_full else 3
    return (24.0 * k * global_batch * seq_length * layers * h * h
            * (1.0 + seq_length / (6.0 * h) + v / (16.0 * layers * h)))


# ------------------------------------------------------------------------------ the plan
def _check(model: ModelShape, layout: RunLayout) -> None:
    for name, value in (("--num-layers", model.num_layers), ("--hidden-size", model.hidden_size),
                        ("--num-attention-heads", model.num_attention_heads),
                        ("--padded-vocab-size", model.padded_vocab_size),
                        ("--seq-length", layout.seq_length),
                        ("--tensor-model-parallel-size", layout.tensor_parallel),
                        ("--pipeline-model-parallel-size", layout.pipeline_parallel),
                        ("--data-parallel-size", layout.data_parallel),
                        ("--micro-batch-size", layout.micro_batch_size)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    t = layout.tensor_parallel
    if model.hidden_size % model.num_attention_heads:
        raise ConfigError(f"--hidden-size {model.hidden_size} is not divisible by "
                          f"--num-attention-heads {model.num_attention_heads}")
    for name, value in (("--num-attention-heads", model.num_attention_heads),
                        ("--padded-vocab-size", model.padded_vocab_size),
                        ("--hidden-size", model.hidden_size)):
        if value % t:
            raise ConfigError(f"{name} {value} is not divisible by --tensor-model-parallel-size {t}")
    if layout.sequence_parallel and layout.seq_length % t:
        raise ConfigError(f"--sequence-parallel: --seq-length {layout.seq_length} is not divisible "
                          f"by --tensor-model-parallel-size {t}")
    step = layout.micro_batch_size * layout.data_parallel
    if layout.global_batch < 1 or layout.global_batch % step:
        raise ConfigError(f"--global-batch-size {layout.global_batch} is not a multiple of "
                          f"--micro-batch-size {layout.micro_batch_size} x data-parallel size "
                          f"{layout.data_parallel} = {step}")
    if layout.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision {layout.precision!r}: expected fp32, bf16 or fp16")
    if layout.recompute_granularity not in (None, "full", "selective"):
        raise ConfigError(f"--recompute-granularity {layout.recompute_granularity!r}: expected "
                          f"full or selective")


def plan(model: ModelShape, layout: RunLayout, *, device_memory_gb: float | None = None,
         seconds_per_iteration: float | None = None, mfu: float | None = None,
         peak_flops: float | None = None, train_tokens: float | None = None) -> Plan:
    """The plan of `layout` for `model`. Time per iteration: `seconds_per_iteration`, or from
    `mfu` (model FLOPs / peak) and `peak_flops` (FLOP/s of one device); neither: no time."""
    _check(model, layout)
    pp, half = layout.pipeline_parallel, layout.precision != "fp32"
    validate_pipeline(model.num_layers, pp, None, layout.pp_partition_method,
                      half_precision=half, num_microbatches=(layout.num_microbatches,))
    zero = layout.data_parallel if layout.distributed_optimizer else 1
    param_bytes = 2 if half else 4
    optimizer_bytes = (4 if half else 0) + 8
    stages = []
    for p in range(pp):
        shape = stage_layout(model.num_layers, pp, p, None, layout.pp_partition_method, half)
        (numbers,) = shape.chunks
        layers = len(numbers)
        count, largest = stage_parameters(model, layout.tensor_parallel, numbers,
                                          shape.pre_process, shape.post_process)
        in_flight = min(pp - p, layout.num_microbatches) if pp > 1 else 1
        params = count * param_bytes / GIB
        grads = count * 4 / GIB
        optimizer = count * optimizer_bytes / zero / GIB
        activations = stage_activation_bytes(model, layout, layers, shape.pre_process,
                                             shape.post_process, in_flight, largest) / GIB
        stages.append(StageMemory(stage=p, layers=layers, parameters=count, params_gb=params,
                                  grads_gb=grads, optimizer_gb=optimizer,
                                  activations_gb=activations,
                                  total_gb=params + grads + optimizer + activations,
                                  microbatches_in_flight=in_flight))
    model_flops = model_flops_per_iteration(model, layout.global_batch, layout.seq_length,
                                            model.padded_vocab_size)
    hardware_flops = hardware_flops_per_iteration(model, layout.global_batch, layout.seq_length,
                                                  layout.recompute_granularity == "full")
    if seconds_per_iteration is None and mfu is not None:
        if not peak_flops:
            raise ConfigError("--mfu needs --peak-flops (FLOP/s of one device)")
        if not 0 < mfu <= 1:
            raise ConfigError(f"--mfu {mfu:g}: give a fraction in (0, 1]")
        seconds_per_iteration = model_flops / (mfu * peak_flops * layout.world_size)
    if seconds_per_iteration is not None and not seconds_per_iteration > 0:
        raise ConfigError(f"--seconds-per-iteration {seconds_per_iteration:g} must be > 0")
    notes = [("an estimate from formulas (ascendspeed/planning.py): the framework's own memory "
              "(device context, torch), allocator fragmentation, communication buffers and "
              "optimizer-step temporaries are not counted")]
    if pp > 1 and layout.num_microbatches < pp:
        notes.append(f"{layout.num_microbatches} micro-batches for {pp} pipeline stages: "
                     f"most of each iteration is pipeline bubble")
    return Plan(model=model, layout=layout, parameters=total_parameters(model), stages=stages,
                model_flops_per_iteration=model_flops,
                hardware_flops_per_iteration=hardware_flops, device_memory_gb=device_memory_gb,
                seconds_per_iteration=seconds_per_iteration, train_tokens=train_tokens,
                peak_flops=peak_flops, notes=notes)
