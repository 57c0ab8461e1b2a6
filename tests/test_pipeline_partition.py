"""Which layers each pipeline stage and virtual chunk holds, and the layouts that are refused."""
import pytest

from ascendspeed.core.pipeline_parallel.partition import (deepspeed_partition, partition_balanced,
                                                          stage_layout, validate_pipeline)
from ascendspeed.errors import ConfigError, PipelinePartitionError

TYPE = "type:transformer|embedding"


def layers(num_layers, pp, **options):
    return [stage_layout(num_layers, pp, p, **options).chunks for p in range(pp)]


def test_even_split():
    assert layers(8, 2) == [((1, 2, 3, 4),), ((5, 6, 7, 8),)]
    assert layers(4, 1) == [((1, 2, 3, 4),)]
    first, last = stage_layout(8, 4, 0), stage_layout(8, 4, 3)
    assert (first.pre_process, first.post_process, last.pre_process, last.post_process) == \
        (True, False, False, True)
    assert not stage_layout(8, 4, 1).pre_process and not stage_layout(8, 4, 1).post_process


def test_uneven_even_split_suggests_the_partition_method():
    with pytest.raises(PipelinePartitionError, match=r"--num-layers 70 is not divisible by "
                       r"--pipeline-model-parallel-size 12.*--pp-partition-method "
                       r"'type:transformer\|embedding'"):
        validate_pipeline(70, 12)


def test_bigscience_70_layers_on_12_stages():
    """BLOOM-style: the embedding and the head each weigh as one transformer layer."""
    for half in (False, True):
        stages = deepspeed_partition(70, 12, TYPE, half)
        assert [len(s) for s in stages] == [5] + [6] * 10 + [5]
        assert stages[0] == (1, 2, 3, 4, 5) and stages[-1] == (66, 67, 68, 69, 70)
        assert [layer for s in stages for layer in s] == list(range(1, 71))
    layout = stage_layout(70, 12, 11, partition_method=TYPE)
    assert layout.post_process and layout.chunks == ((66, 67, 68, 69, 70),)


def test_type_partition_other_sizes():
    assert [len(s) for s in deepspeed_partition(30, 4, TYPE, False)] == [7, 8, 8, 7]
    assert deepspeed_partition(6, 2, TYPE, False) == [(1, 2, 3), (4, 5, 6)]
    assert [len(s) for s in deepspeed_partition(70, 12, "uniform", False)] == [3] + [6] * 10 + [7]


def test_even_30_layers_on_3_and_refused_on_4():
    assert [len(c[0]) for c in layers(30, 3)] == [10, 10, 10]
    with pytest.raises(PipelinePartitionError, match="--num-layers 30 is not divisible"):
        validate_pipeline(30, 4)
    validate_pipeline(30, 4, partition_method=TYPE)


def test_partition_balanced_is_deepspeeds():
    assert partition_balanced([1, 1, 1, 1], 2) == [0, 2, 4]
    assert partition_balanced([0, 1, 0, 1, 1, 1, 0, 0, 1, 0], 3) == [0, 4, 8, 10]
    assert partition_balanced([1, 1], 3) == [0, 1, 2, 2]  # fewer items than parts: uniform


def test_interleaved_assignment_is_megatrons():
    assert layers(8, 2, layers_per_virtual_stage=2) == [((1, 2), (5, 6)), ((3, 4), (7, 8))]
    assert layers(8, 4, layers_per_virtual_stage=1) == [((1,), (5,)), ((2,), (6,)), ((3,), (7,)),
                                                        ((4,), (8,))]
    assert layers(12, 2, layers_per_virtual_stage=2) == [((1, 2), (5, 6), (9, 10)),
                                                         ((3, 4), (7, 8), (11, 12))]
    validate_pipeline(8, 2, 2, num_microbatches=(2, 4, 8))


@pytest.mark.parametrize("args,kwargs,message", [
    ((8, 2, 3), {}, r"--num-layers-per-virtual-pipeline-stage 3: --num-layers 8 is not "
                    r"divisible by --pipeline-model-parallel-size 2 x 3 = 6"),
    ((8, 1, 2), {}, r"needs --pipeline-model-parallel-size >= 2, got 1"),
    ((8, 2, 2), {"num_microbatches": (3,)}, r"number of micro-batches \(3 .*\) to be a multiple "
                                             r"of --pipeline-model-parallel-size 2"),
    ((8, 2, 2), {"partition_method": TYPE}, r"cannot be combined with --pp-partition-method"),
    ((8, 2), {"partition_method": "parameters"}, r"--pp-partition-method 'parameters': expected "
                                                  r"'type:REGEX'"),
    ((8, 2), {"partition_method": "type:attention"}, r"matches no layer type"),
    ((4, 4), {"partition_method": TYPE}, r"--num-layers 4 on --pipeline-model-parallel-size 4 "
                                         r".*not both on the last stage"),
    ((3, 4), {}, r"--num-layers 3 < --pipeline-model-parallel-size 4"),
    ((2, 2), {"partition_method": "type:embedding|transformer|norm"},
     r"stage\(s\) \[1\] would hold no transformer layer \(per-stage layers \[2, 0\]\)"),
    ((4, 3), {"partition_method": "uniform"}, r"stage\(s\) \[0\] would hold no transformer"),
])
def test_refusals_name_the_numbers(args, kwargs, message):
    with pytest.raises(PipelinePartitionError, match=message):
        validate_pipeline(*args, **kwargs)


def test_refusals_are_config_errors():
    assert issubclass(PipelinePartitionError, ConfigError)


# ------------------------------------------------------------------ through the trainer's flags
@pytest.fixture
def argv(tmp_path):
    prefix = tmp_path / "corpus_text_document"
    for ext in (".idx", ".bin"):
        (tmp_path / f"corpus_text_document{ext}").write_bytes(b"")

    def make(*extra):
        return ["--num-layers", "8", "--hidden-size", "64", "--num-attention-heads", "4",
                "--seq-length", "32", "--max-position-embeddings", "32",
                "--position-embedding-type", "alibi", "--micro-batch-size", "2",
                "--global-batch-size", "8", "--train-iters", "10", "--lr", "1e-3",
                "--data-path", str(prefix), "--tokenizer-type", "PretrainedFromHF",
                "--tokenizer-name-or-path", "tok", *extra]
    return make


def build(argv, world_size):
    from ascendspeed.arguments import PretrainConfig, parse_args

    return PretrainConfig.from_args(parse_args(argv), world_size)


def test_pipeline_flags_are_accepted(argv):
    config = build(argv("--pipeline-model-parallel-size", "2",
                        "--num-layers-per-virtual-pipeline-stage", "2"), 2)
    assert config.parallel.pipeline_model_parallel_size == 2
    assert config.parallel.num_layers_per_virtual_pipeline_stage == 2
    assert build(argv("--pipeline-model-parallel-size", "2", "--pp-partition-method", TYPE),
                 2).parallel.pp_partition_method == TYPE
    with pytest.raises(ConfigError, match="the final LayerNorm and the head are not both on the "
                                          "last stage"):  # DeepSpeed would put the head alone
        build(argv("--pipeline-model-parallel-size", "4", "--pp-partition-method", TYPE), 4)


@pytest.mark.parametrize("extra,world,message", [
    (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 8 is not divisible by "
                                                 "--pipeline-model-parallel-size 3"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2",
      "--global-batch-size", "6"], 2, r"number of micro-batches \(3 = "),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2",
      "--train-samples", "64", "--rampup-batch-size", "2", "2", "16"], 2,
     r"number of micro-batches \(1 = "),  # the ramp's first step has 1 micro-batch
])
def test_bad_pipeline_layouts_are_config_errors(argv, extra, world, message):
    if "--train-samples" in extra:
        base = argv()
        i = base.index("--train-iters")
        del base[i:i + 2]
        args = base + extra
    else:
        args = argv(*extra)
    with pytest.raises(ConfigError, match=message):
        build(args, world)
