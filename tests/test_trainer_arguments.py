"""The trainer's flags: the launch scripts parse, configs are validated once, refusals are clear."""
import dataclasses
import json

import pytest

from ascendspeed.arguments import (NOT_YET_SUPPORTED, ModelConfig, PretrainConfig, build_parser,
                                   parse_args)
from ascendspeed.errors import ConfigError


@pytest.fixture
def dataset(tmp_path):
    prefix = tmp_path / "corpus_text_document"
    for ext in (".idx", ".bin"):
        (tmp_path / f"corpus_text_document{ext}").write_bytes(b"")
    return str(prefix)


def write_ds_config(path, *, fp16=True, micro=2, train_batch=8, stage=0, **extra):
    config = {"train_micro_batch_size_per_gpu": micro, "train_batch_size": train_batch,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
              "fp16": {"enabled": fp16, "loss_scale": 0, "loss_scale_window": 500,
                       "hysteresis": 2, "min_loss_scale": 1, "initial_scale_power": 12},
              "steps_per_print": 2000, "wall_clock_breakdown": False, **extra}
    path.write_text(json.dumps(config))
    return str(path)


def base_argv(dataset, *extra):
    """A small run that builds: TP 2 on 4 processes -> DP 2, 2 micro-batches of 2."""
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--max-position-embeddings", "32",
            "--position-embedding-type", "alibi", "--tensor-model-parallel-size", "2",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "10",
            "--lr", "1e-3", "--data-path", dataset, "--tokenizer-type", "PretrainedFromHF",
            "--tokenizer-name-or-path", "tok", *extra]


def build(argv, world_size=4):
    return PretrainConfig.from_args(parse_args(argv), world_size)


def launch_7b1_argv(tmp_path, dataset, ds_config, *, full=True):
    """pretrain_bloom_7b1.sh's flags (launch_scripts.md), with small sizes."""
    argv = ["--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", str(tmp_path),
            "--embed-layernorm", "--data-path", dataset, "--attention-dropout", "0",
            "--hidden-dropout", "0", "--pad-vocab-size-to", "512",
            "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1",
            "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-samples", "2_000", "--init-method-std", "0.0048",
            "--seed", "42", "--position-embedding-type", "alibi", "--optimizer", "adam",
            "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--adam-eps", "1e-8", "--lr", "1.2e-4",
            "--min-lr", "6e-6", "--lr-decay-style", "cosine", "--lr-decay-samples", "1_800",
            "--lr-warmup-samples", "100", "--clip-grad", "1.0", "--weight-decay", "1e-1",
            "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1",
            "--tensorboard-dir", str(tmp_path / "tb"), "--tensorboard-queue-size", "5",
            "--log-timers-to-tensorboard", "--log-batch-size-to-tensorboard",
            "--log-validation-ppl-to-tensorboard", "--data-impl", "mmap", "--deepspeed",
            "--deepspeed_config", ds_config, "--zero-stage", "0", "--distributed-backend", "nccl"]
    if full:  # the flags beyond plain fp32 data parallelism
        argv += ["--rampup-batch-size", "4", "4", "1_000", "--fp16", "--save-interval", "250",
                 "--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"),
                 "--deepspeed-activation-checkpointing", "--sequence-parallel"]
    return argv


# ---------------------------------------------------------------------------------- launch scripts
def test_7b1_launch_flags_all_build(tmp_path, dataset):
    """Every flag of the 7B1 script is honoured: fp16 (flag and ds_config), ramp-up, sequence
    parallelism, checkpoint save/load, activation checkpointing."""
    ds = write_ds_config(tmp_path / "ds_config.json")
    args = parse_args(launch_7b1_argv(tmp_path, dataset, ds))
    assert args.train_samples == 2000 and args.lr_decay_samples == 1800
    assert args.rampup_batch_size == ["4", "4", "1_000"] and args.fp16 and args.sequence_parallel
    assert args.deepspeed and args.deepspeed_config == ds and args.zero_stage == 0
    config = PretrainConfig.from_args(args, world_size=4)
    assert config.parallel.sequence_parallel and config.precision.params_dtype == "float16"
    assert config.checkpoint.save == str(tmp_path / "ckpt") == config.checkpoint.load
    assert config.checkpoint.save_interval == 250


def test_7b1_launch_flags_build_for_plain_data_parallelism(tmp_path, dataset):
    ds = write_ds_config(tmp_path / "ds_config.json", fp16=False)
    config = build(launch_7b1_argv(tmp_path, dataset, ds, full=False), world_size=4)
    assert config.parallel.data_parallel_size == 2 and config.parallel.distributed_backend == "nccl"
    assert config.training.num_microbatches == 2 and config.training.train_iters == 2000 // 8
    assert config.training.train_samples == 2000 and config.training.seed == 42
    assert config.lr_schedule.style == "cosine" and config.lr_schedule.decay_steps == 1800
    assert config.lr_schedule.warmup_steps == 100
    assert config.optimizer.betas == (0.9, 0.95) and config.optimizer.weight_decay == 0.1
    assert config.model.embed_layernorm and config.model.hidden_dropout == 0.0
    assert config.model.ffn_hidden_size == 256 and config.model.init_method_std == 0.0048
    assert config.tokenizer.pad_vocab_size_to == 512 and config.data.seed == 42
    assert config.deepspeed_config_path == ds
    assert any(n.startswith("--deepspeed: accepted") for n in config.notices)
    assert any(n.startswith("--log-timers-to-tensorboard: accepted") for n in config.notices)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.training.train_iters = 1


def test_550m_sizes_build(dataset):
    argv = base_argv(dataset, "--num-layers", "24", "--hidden-size", "1024",
                     "--num-attention-heads", "16", "--seq-length", "1024",
                     "--max-position-embeddings", "1024", "--tensor-model-parallel-size", "8",
                     "--micro-batch-size", "4", "--global-batch-size", "16")
    config = build(argv, world_size=8)
    assert config.parallel.data_parallel_size == 1 and config.training.num_microbatches == 4


def test_generate_script_flags_parse():
    args = parse_args(["--load", "ckpt", "--tokenizer-type", "PretrainedFromHF",
                       "--tokenizer-name-or-path", "tok", "--tensor-model-parallel-size", "8",
                       "--pipeline-model-parallel-size", "1", "--embed-layernorm",
                       "--position-embedding-type", "alibi", "--num-layers", "30",
                       "--hidden-size", "4096", "--attention-dropout", "0", "--hidden-dropout", "0",
                       "--num-attention-heads", "32", "--micro-batch-size", "1",
                       "--seq-length", "2048", "--max-position-embeddings", "2048",
                       "--init-method-std", "0.0048", "--log-interval", "1",
                       "--layernorm-epsilon", "1e-6", "--fp16", "--no-load-optim", "--no-load-rng",
                       "--out-seq-length", "1024", "--temperature", "1.0", "--top_p", "0.9",
                       "--recompute"])
    assert args.top_p == 0.9 and args.out_seq_length == 1024 and args.recompute
    assert args.layernorm_epsilon == 1e-6 and args.no_load_optim and args.no_load_rng


def test_megatron_defaults():
    args = parse_args([])
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (1, 1)
    assert (args.lr_decay_style, args.min_lr, args.weight_decay, args.clip_grad) == \
        ("linear", 0.0, 0.01, 1.0)
    assert (args.adam_beta1, args.adam_beta2, args.adam_eps) == (0.9, 0.999, 1e-8)
    assert (args.lr_warmup_iters, args.lr_warmup_samples, args.lr_warmup_fraction) == (0, 0, None)
    assert (args.log_interval, args.eval_interval, args.eval_iters) == (100, 1000, 100)
    assert (args.hidden_dropout, args.attention_dropout, args.init_method_std) == (0.1, 0.1, 0.02)
    assert args.layernorm_epsilon == 1e-5 and args.position_embedding_type == "absolute"
    assert args.distributed_backend is None and args.peak_flops is None
    assert args.initial_loss_scale == 2 ** 32 and args.tensorboard_queue_size == 1000


def test_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as error:
        parse_args(["--num-layers", "2", "--no-such-flag"])
    assert error.value.code != 0
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no abbreviations, as in Megatron (allow_abbrev=False)
        parse_args(["--num-lay", "2"])
    assert parse_args(["--no-such-flag"], ignore_unknown_args=True).num_layers is None


def test_extra_args_provider():
    def extra(parser):
        parser.add_argument("--my-flag", type=int, default=3)
        return parser
    assert parse_args(["--my-flag", "5"], extra_args_provider=extra).my_flag == 5
    assert "--my-flag" in build_parser(extra).format_help()


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("extra,flag", [
    (["--zero-stage", "2"], "--zero-stage"),
    (["--optimizer", "sgd"], "--optimizer"),
])
def test_features_not_built_are_refused(dataset, extra, flag):
    with pytest.raises(ConfigError, match=f"^{flag}: not yet supported in this version"):
        build(base_argv(dataset, *extra))


def test_not_yet_supported_is_one_table():
    flags = [flag for flag, _ in NOT_YET_SUPPORTED]
    assert len(flags) == len(set(flags)) and "--zero-stage" in flags and "--fp16" not in flags


def test_generation_recompute_is_a_generation_flag(dataset):
    """--recompute (no KV cache) is built for generation; pretraining says it has no effect."""
    config = build(base_argv(dataset, "--recompute"))
    assert any("--recompute" in notice and "no effect on pretraining" in notice
               for notice in config.notices)


@pytest.mark.parametrize("ds_kwargs,message", [
    (dict(stage=3), "--deepspeed_config zero_optimization.stage: not yet supported .*ZeRO "
                    "stage 2/3 is not supported; stage 1 = --use-distributed-optimizer"),
    (dict(fp16=False, optimizer={"type": "Adam"}), "optimizer/scheduler sections: not yet"),
])
def test_deepspeed_config_features_not_built_are_refused(tmp_path, dataset, ds_kwargs, message):
    ds = write_ds_config(tmp_path / "ds.json", **ds_kwargs)
    with pytest.raises(ConfigError, match=message):
        build(base_argv(dataset, "--deepspeed", "--deepspeed_config", ds))


@pytest.mark.parametrize("extra,ds_stage", [(["--use-distributed-optimizer"], None),
                                             (["--zero-stage", "1"], None), ([], 1)])
def test_zero_stage_1_is_the_distributed_optimizer(tmp_path, dataset, extra, ds_stage):
    if ds_stage is not None:
        extra = ["--deepspeed", "--deepspeed_config",
                 write_ds_config(tmp_path / "ds.json", fp16=False, stage=ds_stage)]
    assert build(base_argv(dataset, *extra)).parallel.use_distributed_optimizer


def test_deepspeed_config_missing_malformed_or_inconsistent(tmp_path, dataset):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match=f"--deepspeed_config {missing}: file not found"):
        build(base_argv(dataset, "--deepspeed", "--deepspeed_config", missing))
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 8,,}')
    with pytest.raises(ConfigError, match=f"--deepspeed_config {bad}: not valid JSON"):
        build(base_argv(dataset, "--deepspeed_config", str(bad)))
    ds = write_ds_config(tmp_path / "ds.json", fp16=False, train_batch=16)
    with pytest.raises(ConfigError, match="train_batch_size is 16 but --global-batch-size gives 8"):
        build(base_argv(dataset, "--deepspeed", "--deepspeed_config", ds))
    ds = write_ds_config(tmp_path / "ds.json", fp16=False, gradient_clipping=0.5)
    with pytest.raises(ConfigError, match="gradient_clipping is 0.5 but --clip-grad gives 1.0"):
        build(base_argv(dataset, "--deepspeed", "--deepspeed_config", ds))


# ---------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("extra,world_size,message", [
    (["--num-attention-heads", "3", "--hidden-size", "66"], 4,
     "--num-attention-heads 3 is not divisible by --tensor-model-parallel-size 2"),
    (["--hidden-size", "66"], 4, "--hidden-size 66 is not divisible by --num-attention-heads 4"),
    (["--global-batch-size", "6"], 4,
     "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
    ([], 3, "world size 3 is not divisible by --tensor-model-parallel-size 2 x "
            "--pipeline-model-parallel-size 1"),
    (["--seq-length", "64"], 4, "--seq-length 64 is larger than --max-position-embeddings 32"),
    (["--position-embedding-type", "absolute"], 4, "--position-embedding-type absolute"),
    (["--train-samples", "80"], 4, "--train-iters 10 and --train-samples 80: give exactly one"),
    (["--lr-warmup-iters", "2", "--lr-warmup-samples", "16"], 4,
     "--lr-warmup-iters 2 and --lr-warmup-samples 16: .* not both"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"], 4,
     "--lr-warmup-fraction 0.1 and --lr-warmup-iters 2"),
    (["--lr-decay-samples", "80"], 4, "--lr-decay-samples 80 with --train-iters 10"),
    (["--lr-warmup-iters", "10"], 4, "warm-up .* must be shorter than the decay"),
    (["--min-lr", "1"], 4, r"--min-lr 1.0 must be in \[0, --lr 0.001\]"),
    (["--peak-flops", "312"], 4, "--peak-flops 312: give FLOP/s per device"),
    (["--ffn-hidden-size", "63"], 4, "--ffn-hidden-size 63 is not divisible"),
])
def test_bad_values_name_the_flags(dataset, extra, world_size, message):
    with pytest.raises(ConfigError, match=message):
        build(base_argv(dataset, *extra), world_size=world_size)


def test_missing_length_and_required_flags(dataset):
    argv = base_argv(dataset)
    without_iters = argv[:argv.index("--train-iters")] + argv[argv.index("--train-iters") + 2:]
    with pytest.raises(ConfigError, match="give --train-iters or --train-samples"):
        build(without_iters)
    without_lr = argv[:argv.index("--lr")] + argv[argv.index("--lr") + 2:]
    with pytest.raises(ConfigError, match="--lr is required"):
        build(without_lr)
    with pytest.raises(ConfigError, match="--num-layers is required"):
        build(["--train-iters", "1"])
    with pytest.raises(ConfigError, match=r"--train-samples 4 // --global-batch-size 8"):
        build(without_iters + ["--train-samples", "4"])


def test_data_path_files_are_checked(tmp_path, dataset):
    missing = str(tmp_path / "nothing_text_document")
    argv = base_argv(dataset)
    argv[argv.index(dataset)] = missing
    with pytest.raises(ConfigError, match=f"--data-path {missing}: {missing}.idx and "
                                          f"{missing}.bin not found"):
        build(argv)
    (tmp_path / "nothing_text_document.idx").write_bytes(b"")
    with pytest.raises(ConfigError, match=f"{missing}.bin not found"):
        build(argv)
    argv = base_argv(dataset)
    i = argv.index(dataset)
    blend = argv[:i] + ["0.5", dataset, "0.5", missing] + argv[i + 1:]
    with pytest.raises(ConfigError, match=f"--data-path {missing}: {missing}.bin not found"):
        build(blend)
    blend = argv[:i] + ["0.5", dataset, "0.5", dataset] + argv[i + 1:]
    assert build(blend).data.data_path == ("0.5", dataset, "0.5", dataset)
    split_paths = argv[:i - 1] + ["--train-weighted-split-paths", f"TRAIN: 1 0:0.9 {missing}"] \
        + argv[i + 1:]
    with pytest.raises(ConfigError, match=f"--train-weighted-split-paths {missing}"):
        build(split_paths)


# ---------------------------------------------------------------------------------- conversions
def test_train_samples_become_iterations_and_schedule_is_in_samples(dataset):
    argv = base_argv(dataset)
    i = argv.index("--train-iters")
    argv[i:i + 2] = ["--train-samples", "1000", "--lr-warmup-fraction", "0.01"]
    config = build(argv)
    assert config.training.train_iters == 1000 // 8 and config.training.train_samples == 1000
    assert config.lr_schedule.decay_steps == 1000 and config.lr_schedule.decay_samples == 1000
    assert config.lr_schedule.warmup_steps == pytest.approx(10.0)
    assert config.training.train_valid_test_num_samples() == (1000, (125 // 1000 + 1) * 100 * 8,
                                                               100 * 8)


def test_iteration_schedule_is_converted_to_samples(dataset):
    config = build(base_argv(dataset, "--lr-warmup-iters", "2", "--lr-decay-iters", "8"))
    assert config.lr_schedule.decay_iters == 8 and config.lr_schedule.decay_steps == 8 * 8
    assert config.lr_schedule.warmup_steps == 2 * 8
    config = build(base_argv(dataset))
    assert config.lr_schedule.decay_iters == 10 and config.lr_schedule.warmup_steps == 0
    assert config.training.train_valid_test_num_samples() == (80, 800, 800)


def test_global_batch_defaults_to_micro_times_dp(dataset):
    argv = base_argv(dataset)
    i = argv.index("--global-batch-size")
    del argv[i:i + 2]
    config = build(argv, world_size=8)
    assert config.training.global_batch_size == 2 * 4 and config.training.num_microbatches == 1


def test_model_config_defaults():
    config = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
                         position_embedding_type="alibi")
    assert config.ffn_hidden_size == 256 and config.max_position_embeddings == 32
    assert config.position_embedding_type == "alibi"


def test_precision_from_flags_and_ds_config(tmp_path, dataset):
    from ascendspeed.arguments import PrecisionConfig

    assert build(base_argv(dataset)).precision == PrecisionConfig()
    config = build(base_argv(dataset, "--bf16"))
    assert config.precision.params_dtype == "bfloat16"
    config = build(base_argv(dataset, "--fp16", "--loss-scale", "1024", "--hysteresis", "3"))
    assert config.precision.params_dtype == "float16" and config.precision.loss_scale == 1024
    # The launch script's ds_config: fp16 on, dynamic (loss_scale 0), 2**12, window 500.
    ds = write_ds_config(tmp_path / "ds.json")
    precision = build(base_argv(dataset, "--deepspeed", "--deepspeed_config", ds)).precision
    assert precision.params_dtype == "float16" and precision.loss_scale is None
    assert precision.initial_loss_scale == 4096 and precision.loss_scale_window == 500
    assert precision.hysteresis == 2 and precision.min_loss_scale == 1
    with pytest.raises(ConfigError, match="--fp16 and --bf16"):
        build(base_argv(dataset, "--fp16", "--bf16"))


def test_recompute_flags(dataset):
    assert build(base_argv(dataset)).model.recompute_granularity is None
    assert build(base_argv(dataset, "--checkpoint-activations")).model.recompute_granularity == "full"
    assert build(base_argv(dataset, "--recompute-activations")).model.recompute_granularity == "selective"
    config = build(base_argv(dataset, "--recompute-granularity", "full"))
    assert config.model.recompute_granularity == "full"
    # Megatron-DeepSpeed: this flag only picks the implementation; alone it recomputes nothing.
    assert build(base_argv(dataset, "--deepspeed-activation-checkpointing")).model.recompute_granularity is None


def test_rampup_batch_size_flags(dataset):
    argv = [a for a in base_argv(dataset)]
    i = argv.index("--train-iters")
    del argv[i:i + 2]
    config = build(argv + ["--train-samples", "1000", "--rampup-batch-size", "4", "4", "100"])
    assert config.training.rampup_batch_size == (4, 4, 100)
    assert config.training.train_iters > 1000 // config.training.global_batch_size
    with pytest.raises(ConfigError, match="multiples of micro batch size"):
        build(argv + ["--train-samples", "1000", "--rampup-batch-size", "2", "2", "100"])
    with pytest.raises(ConfigError, match="needs --train-samples"):
        build(base_argv(dataset, "--rampup-batch-size", "2", "2", "100"))
    with pytest.raises(ConfigError, match="three integers"):
        build(argv + ["--train-samples", "1000", "--rampup-batch-size", "2", "x"])


def test_parser_and_config_defaults_agree():
    """A config field built from a flag has the flag's default (a parser None means 'not given',
    which from_args maps to the field's default)."""
    import dataclasses

    from ascendspeed import arguments

    parser_defaults = {action.dest: action.default for action in build_parser()._actions}
    disagree = []
    for value in vars(arguments).values():
        if not (isinstance(value, type) and dataclasses.is_dataclass(value)):
            continue
        for field in dataclasses.fields(value):
            default = parser_defaults.get(field.name, dataclasses.MISSING)
            if dataclasses.MISSING in (default, field.default) or default is None:
                continue
            if default != field.default and not (isinstance(default, list)
                                                  and tuple(default) == field.default):
                disagree.append((value.__name__, field.name, default, field.default))
    assert disagree == []
