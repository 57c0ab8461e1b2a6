"""Plan a BLOOM training run on paper: parameters, memory per device of the first, a middle and
the last pipeline stage, whether it fits, FLOPs, throughput and time to train.

    python tools/plan.py --model bloom-176b --tensor-model-parallel-size 4 \
        --pipeline-model-parallel-size 12 --data-parallel-size 8 --micro-batch-size 2 \
        --global-batch-size 2048 --bf16 --use-distributed-optimizer \
        --recompute-granularity full --pp-partition-method 'type:transformer|embedding' \
        --device-memory-gb 80 --seconds-per-iteration 104.7 [--train-tokens 366e9] [--json]

Megatron's flag names. `--model` gives a BLOOM's shape (each of --num-layers, --hidden-size,
--num-attention-heads, --padded-vocab-size overrides it; without --model all four are needed).
The parallel layout is TP x PP x DP (`--data-parallel-size`, or `--world-size`). Time per
iteration: `--seconds-per-iteration`, or `--mfu` with `--peak-flops` (FLOP/s of one device).
Memory is in GiB (2^30 bytes: an "80 GB" A100 has 80). Everything printed is an estimate from
the formulas in ascendspeed/planning.py, which says what they count and what they leave out.
Exit status 2 with a one-line error for a layout the trainer would refuse.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as `python tools/plan.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.errors import AscendSpeedError, ConfigError, error_line  # noqa: E402
from ascendspeed.planning import MODELS, ModelShape, Plan, RunLayout, plan  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=sorted(MODELS), default=None)
    model.add_argument("--num-layers", type=int, default=None)
    model.add_argument("--hidden-size", type=int, default=None)
    model.add_argument("--num-attention-heads", type=int, default=None)
    model.add_argument("--padded-vocab-size", type=int, default=None,
                       help="the vocabulary after padding (BLOOM: 250880)")
    model.add_argument("--seq-length", type=int, default=2048)
    model.add_argument("--hidden-dropout", type=float, default=0.1)
    model.add_argument("--attention-dropout", type=float, default=0.1,
                       help="> 0 keeps the s x s attention probabilities (the fused attention "
                            "takes only dropout 0)")
    layout = parser.add_argument_group("layout")
    layout.add_argument("--tensor-model-parallel-size", type=int, default=1)
    layout.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    sizes = layout.add_mutually_exclusive_group()
    sizes.add_argument("--data-parallel-size", type=int, default=None)
    sizes.add_argument("--world-size", type=int, default=None)
    layout.add_argument("--micro-batch-size", type=int, default=1)
    layout.add_argument("--global-batch-size", type=int, default=None,
                        help="default: micro-batch size x data-parallel size")
    precision = layout.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true")
    precision.add_argument("--fp16", action="store_true")
    layout.add_argument("--use-distributed-optimizer", action="store_true",
                        help="ZeRO-1: masters and AdamW state sharded over DP")
    layout.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    layout.add_argument("--checkpoint-activations", action="store_true",
                        help="Megatron-DeepSpeed's name for --recompute-granularity full")
    layout.add_argument("--sequence-parallel", action="store_true")
    layout.add_argument("--pp-partition-method", default=None,
                        help="e.g. 'type:transformer|embedding' (default: L / PP layers each)")
    outcome = parser.add_argument_group("device and time")
    outcome.add_argument("--device-memory-gb", type=float, default=None,
                         help="memory of one device in GiB; gives `fits`")
    timing = outcome.add_mutually_exclusive_group()
    timing.add_argument("--seconds-per-iteration", type=float, default=None)
    timing.add_argument("--mfu", type=float, default=None,
                        help="model FLOPs utilization (0-1); needs --peak-flops")
    outcome.add_argument("--peak-flops", type=float, default=None,
                         help="peak FLOP/s of one device (e.g. 312e12 for an A100 in bf16)")
    outcome.add_argument("--train-tokens", type=float, default=None,
                         help="tokens to train on; gives the days to train")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return parser


def model_shape(args: argparse.Namespace) -> ModelShape:
    preset = MODELS.get(args.model)
    values = {}
    for name in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size"):
        value = getattr(args, name)
        values[name] = getattr(preset, name) if value is None and preset is not None else value
    missing = [f"--{name.replace('_', '-')}" for name, value in values.items() if value is None]
    if missing:
        raise ConfigError(f"give --model, or {', '.join(missing)}")
    return ModelShape(**values)


def run_layout(args: argparse.Namespace) -> RunLayout:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    dp = args.data_parallel_size
    if args.world_size is not None:
        if tp < 1 or pp < 1 or args.world_size % (tp * pp):
            raise ConfigError(f"--world-size {args.world_size} is not divisible by "
                              f"--tensor-model-parallel-size {tp} x "
                              f"--pipeline-model-parallel-size {pp}")
        dp = args.world_size // (tp * pp)
    recompute = args.recompute_granularity or ("full" if args.checkpoint_activations else None)
    return RunLayout(tensor_parallel=tp, pipeline_parallel=pp, data_parallel=dp or 1,
                     micro_batch_size=args.micro_batch_size,
                     global_batch_size=args.global_batch_size, seq_length=args.seq_length,
                     precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
                     distributed_optimizer=args.use_distributed_optimizer,
                     recompute_granularity=recompute, sequence_parallel=args.sequence_parallel,
                     pp_partition_method=args.pp_partition_method,
                     hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout)


def make_plan(args: argparse.Namespace) -> Plan:
    return plan(model_shape(args), run_layout(args), device_memory_gb=args.device_memory_gb,
                seconds_per_iteration=args.seconds_per_iteration, mfu=args.mfu,
                peak_flops=args.peak_flops, train_tokens=args.train_tokens)


def format_table(p: Plan) -> str:
    m, lay = p.model, p.layout
    data = p.as_dict()
    extras = [lay.precision]
    if lay.distributed_optimizer:
        extras.append("ZeRO-1")
    if lay.recompute_granularity:
        extras.append(f"{lay.recompute_granularity} recompute")
    if lay.sequence_parallel:
        extras.append("sequence parallel")
    if lay.pp_partition_method:
        extras.append(f"partition {lay.pp_partition_method}")
    lines = [
        (f"BLOOM plan (an estimate): {m.num_layers} layers, hidden {m.hidden_size}, "
         f"{m.num_attention_heads} heads, padded vocab {m.padded_vocab_size}, "
         f"seq {lay.seq_length}"),
        f"parameters: {p.parameters / 1e9:.2f} B ({p.parameters:,})",
        (f"layout: TP {lay.tensor_parallel} x PP {lay.pipeline_parallel} x DP "
         f"{lay.data_parallel} = {lay.world_size} devices; micro-batch {lay.micro_batch_size}, "
         f"global batch {lay.global_batch} ({lay.num_microbatches} micro-batches); "
         + ", ".join(extras)),
        "",
        "memory per device (GiB)",
        (f"{'stage':>12} | {'layers':>6} | {'params':>7} | {'grads':>7} | {'optimizer':>9} | "
         f"{'activations':>11} | {'total':>7}"),
    ]
    for stage in data["stages"]:
        name = f"{stage['stage']} ({stage['role']})"
        lines.append(f"{name:>12} | {stage['layers']:>6} | {stage['params_gb']:7.2f} | "
                     f"{stage['grads_gb']:7.2f} | {stage['optimizer_gb']:9.2f} | "
                     f"{stage['activations_gb']:11.2f} | {stage['total_gb']:7.2f}")
    peak = max(p.stages, key=lambda s: s.total_gb)
    verdict = f"peak {peak.total_gb:.2f} GiB on stage {peak.stage}"
    if p.fits is not None:
        spare = p.device_memory_gb - peak.total_gb
        verdict += (f": fits {p.device_memory_gb:g} GiB ({spare:.2f} GiB to spare)" if p.fits
                    else f": does NOT fit {p.device_memory_gb:g} GiB ({-spare:.2f} GiB over)")
    recompute = ", recompute counted" if lay.recompute_granularity == "full" else ""
    lines += [verdict, "",
              (f"FLOPs per iteration: model {p.model_flops_per_iteration:.4g} (Megatron-LM), "
               f"hardware {p.hardware_flops_per_iteration:.4g} (Megatron-DeepSpeed{recompute})")]
    if p.seconds_per_iteration is not None:
        line = (f"at {p.seconds_per_iteration:.4g} s/iteration: "
                f"{data['model_tflops_per_device']:.1f} model TFLOP/s per device, "
                f"{data['hardware_tflops_per_device']:.1f} hardware TFLOP/s per device, "
                f"{data['tokens_per_second']:,.0f} tokens/s")
        if data["mfu"] is not None:
            line += f", MFU {100 * data['mfu']:.1f}%"
        lines.append(line)
        if data["days_to_train"] is not None:
            lines.append(f"{p.train_tokens:.4g} tokens: {data['days_to_train']:.1f} days")
    lines += [f"note: {note}" for note in p.notes]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = make_plan(args)
    except AscendSpeedError as error:
        print(f"plan.py: {error_line(error)}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
