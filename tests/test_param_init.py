"""Parameters built on their device: the seeded init drawn chunk by chunk gives, bit for bit, the
numbers of the full-matrix draw (`_master_slice`) at TP 1, 2 and 4; a model built on "meta" and
materialised with to_empty is filled by reset_parameters (seeded init) or a checkpoint alone.

TP sizes other than 1 run in this process: the layers ask parallel_state for the TP size and
rank, which these tests set (a TP rank's slice depends on nothing else)."""
import contextlib
import math
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from ascendspeed.core import parallel_state as ps
from ascendspeed.core.tensor_parallel import layers
from ascendspeed.core.tensor_parallel.layers import (NormalInit, _fill_slice_, _master_slice,
                                                     _row_chunks)
from ascendspeed.model.bloom import BloomConfig, BloomModel, _layer_seed


@contextlib.contextmanager
def tp_rank(world: int, rank: int):
    with mock.patch.object(ps, "get_tensor_model_parallel_world_size", return_value=world), \
            mock.patch.object(ps, "get_tensor_model_parallel_rank", return_value=rank):
        yield


@pytest.mark.parametrize("rows,cols", [(244, 40), (61, 3), (250880, 4), (33, 1), (1, 33),
                                       (9, 2), (7, 2), (16, 16), (5, 7), (32, 12)])
@pytest.mark.parametrize("target", [1, 16, 37, 100, 1000, 1 << 22])
def test_row_chunks_keep_normal_groups(rows, cols, target):
    """Contiguous ranges covering the rows; all but the last a multiple of 16 elements, the last
    at least 16 unless it is the whole matrix."""
    chunks = _row_chunks(rows, cols, target)
    assert chunks[0][0] == 0 and chunks[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all((stop - start) * cols % 16 == 0 for start, stop in chunks[:-1])
    last = (chunks[-1][1] - chunks[-1][0]) * cols
    assert last >= 16 or len(chunks) == 1
    assert all((stop - start) * cols <= max(target, math.lcm(cols, 16)) + 16 + cols
               for start, stop in chunks)  # bounded by the target (or one 16-element step)


def _fill_cases():
    # (rows, cols): vocab-like rows that are not multiples of 16, odd and single columns, a
    # matrix under 16 elements (normal_'s serial path: drawn whole); chunk targets from one
    # 16-element group up to the default. The padded BLOOM vocab (250880 rows) with few columns
    # in ~1000 chunks and in one.
    small = [(244, 40), (244, 3), (12, 44), (44, 12), (4, 5), (8, 1), (4, 4), (20, 36), (36, 20)]
    cases = [(shape, target) for shape in small for target in (16, 48, 100, 1 << 22)]
    cases += [((250880, 4), target) for target in (1000, 1 << 22)]
    for (rows, cols), target in cases:
        for dim in (0, 1):
            for world in (1, 2, 4):
                if (rows, cols)[dim] % world == 0:
                    yield rows, cols, dim, target, world


@pytest.mark.parametrize("rows,cols,dim,target,world", list(_fill_cases()))
def test_chunked_fill_equals_the_full_matrix_draw(monkeypatch, rows, cols, dim, target, world):
    """Every TP rank's slice, fp32 and bf16, equals _master_slice's (the full fp32 draw on the
    host, sliced); the generator ends where the full draw leaves it (the next matrix of a layer
    draws on from there)."""
    monkeypatch.setattr(layers, "_CHUNK_ELEMENTS", target)
    for rank in range(world):
        for dtype in (torch.float32, torch.bfloat16):
            with tp_rank(world, rank):
                expected_generator = torch.Generator().manual_seed(5)
                expected = _master_slice((rows, cols), dim, NormalInit(0.02, expected_generator),
                                         dtype)
                generator = torch.Generator().manual_seed(5)
                weight = torch.full(expected.shape, float("nan"), dtype=dtype)
                _fill_slice_(weight, (rows, cols), dim, NormalInit(0.02, generator))
            assert torch.equal(weight, expected), (rank, dtype)
            assert torch.equal(generator.get_state(), expected_generator.get_state())


def test_other_init_methods_draw_the_whole_matrix():
    """An init_method that is not a NormalInit may depend on the whole tensor: drawn whole."""
    shapes = []

    def init(tensor):
        shapes.append(tuple(tensor.shape))
        torch.nn.init.xavier_normal_(tensor, generator=torch.Generator().manual_seed(1))

    with tp_rank(2, 1):
        weight = torch.empty(8, 20)
        _fill_slice_(weight, (16, 20), 0, init)
        assert shapes == [(16, 20)]
        assert torch.equal(weight, _master_slice((16, 20), 0, init, torch.float32))


def reference_state(config: BloomConfig, world: int, rank: int) -> dict:
    """The whole model's initial state as the full-matrix code gives it (one fp32 master per
    weight drawn whole on the host, then this rank's slice): each component's own generator,
    the embedding as layer 0; per block QKV and the MLP's first projection N(0, std) split by
    rows, the attention and MLP outputs N(0, std / sqrt(2L)) split by columns, in that order."""
    h, ffn, dtype = config.hidden_size, config.ffn_size, config.params_dtype
    std, out_std = config.init_method_std, config.init_method_std / math.sqrt(2 * config.num_layers)

    def master(shape, dim, sd, generator):
        with tp_rank(world, rank):
            return _master_slice(shape, dim, NormalInit(sd, generator), dtype)

    ones, zeros = torch.ones(h, dtype=dtype), torch.zeros(h, dtype=dtype)
    state = {"word_embeddings.weight": master((config.vocab_size, h), 0, std, torch.Generator()
                                              .manual_seed(_layer_seed(config.init_seed, 0))),
             "embedding_layernorm.weight": ones, "embedding_layernorm.bias": zeros,
             "final_layernorm.weight": ones, "final_layernorm.bias": zeros}
    for i in range(config.num_layers):
        generator = torch.Generator().manual_seed(_layer_seed(config.init_seed, i + 1))
        p = f"layers.{i}."
        state[p + "self_attention.query_key_value.weight"] = master((3 * h, h), 0, std, generator)
        state[p + "self_attention.query_key_value.bias"] = torch.zeros(3 * h // world, dtype=dtype)
        state[p + "self_attention.dense.weight"] = master((h, h), 1, out_std, generator)
        state[p + "self_attention.dense.bias"] = zeros
        state[p + "mlp.dense_h_to_4h.weight"] = master((ffn, h), 0, std, generator)
        state[p + "mlp.dense_h_to_4h.bias"] = torch.zeros(ffn // world, dtype=dtype)
        state[p + "mlp.dense_4h_to_h.weight"] = master((h, ffn), 1, out_std, generator)
        state[p + "mlp.dense_4h_to_h.bias"] = zeros
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[p + norm + ".weight"], state[p + norm + ".bias"] = ones, zeros
    return state


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_model_reset_parameters_gives_the_full_matrix_numbers(monkeypatch, world, dtype):
    """A tiny BLOOM with a vocabulary that is not a multiple of 16 (244 = 4 x 61) and small
    chunks (so every matrix is drawn in many, with tails): built on "meta", to_empty on the
    CPU (filled with NaN, so that anything left unfilled shows), reset_parameters; and built
    directly on the CPU: both equal the full-matrix reference on every TP rank, each parameter
    in storage of its own size."""
    monkeypatch.setattr(layers, "_CHUNK_ELEMENTS", 40)
    config = BloomConfig(vocab_size=244, hidden_size=40, num_layers=2, num_attention_heads=4,
                         ffn_hidden_size=44, params_dtype=dtype, init_seed=11)
    for rank in range(world):
        with tp_rank(world, rank):
            model = BloomModel(config, device="meta")
            assert all(p.is_meta for p in model.parameters())
            model.to_empty(device="cpu")
            with torch.no_grad():
                for param in model.parameters():
                    param.fill_(float("nan"))
            model.reset_parameters()
            direct = BloomModel(config)
            expected = reference_state(config, world, rank)
            slopes = BloomModel(config).alibi_slopes
        for built in (model, direct):
            state = built.state_dict()
            assert state.keys() == expected.keys()
            for name, tensor in state.items():
                assert tensor.device.type == "cpu" and tensor.dtype == dtype, name
                assert torch.equal(tensor, expected[name]), (world, rank, name)
                # its own storage: no view keeping a full master matrix alive
                assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        assert torch.equal(model.alibi_slopes, slopes)


def test_to_empty_keeps_parameter_attributes_and_slopes():
    """Leaving "meta" makes new Parameter objects; the Megatron attributes the optimizer and the
    gradient sums read (tensor_model_parallel, partition_dim, sequence_parallel,
    shared_embedding) survive, and the computed ALiBi slopes are real numbers again."""
    config = BloomConfig(vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=4,
                         sequence_parallel=True)
    with tp_rank(2, 1):
        with torch.device("meta"):
            model = BloomModel(config, pre_process=False)
        before = {name: dict(vars(p)) for name, p in model.named_parameters()}
        model.to_empty(device="cpu")
        expected_slopes = BloomModel(config, pre_process=False).alibi_slopes
    assert before["word_embeddings.weight"]["shared_embedding"] is True
    assert before["layers.0.input_layernorm.weight"]["sequence_parallel"] is True
    for name, param in model.named_parameters():
        assert not param.is_meta and vars(param) == before[name], name
    assert torch.equal(model.alibi_slopes, expected_slopes)


def test_generation_stage_is_filled_by_the_checkpoint_alone(monkeypatch):
    """generation.loading.build_stage draws nothing (no NormalInit, no full matrix); loading a
    checkpoint's state fills every parameter with it."""
    from ascendspeed.checkpoint.save_load import load_model_state_dict, model_state_dict
    from ascendspeed.generation.loading import build_stage

    config = BloomConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4)
    saved = BloomModel(config)
    state = model_state_dict(saved)

    def no_draw(*_args, **_kwargs):
        raise AssertionError("a parameter was drawn for a model the checkpoint fills")

    monkeypatch.setattr(NormalInit, "__call__", no_draw)
    monkeypatch.setattr(layers, "_master_slice", no_draw)
    setup = SimpleNamespace(
        model=SimpleNamespace(hidden_size=32, num_layers=2, num_attention_heads=4,
                              ffn_hidden_size=None, layernorm_epsilon=1e-5, embed_layernorm=True),
        padded_vocab_size=64, params_dtype="float32", fused_kernels=True,
        pipeline_model_parallel_size=1, saved_args={})
    stage = build_stage(setup)
    assert not stage.training
    with torch.no_grad():
        for param in stage.parameters():
            param.fill_(float("nan"))
    load_model_state_dict(stage, state, "test")
    for (name, got), expected in zip(stage.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(got, expected), name


def test_a_model_built_for_a_checkpoint_is_not_trained_when_the_tracker_vanished(tmp_path):
    """The trainer builds the model without init when --load has a tracker. If the tracker is
    gone when the load runs, that model holds no weights: the load refuses instead of starting
    from scratch (which it does, with a warning, when the model was initialised)."""
    from ascendspeed.checkpoint.save_load import load_checkpoint
    from ascendspeed.errors import CheckpointError

    missing = str(tmp_path / "ckpt")
    messages = []
    assert load_checkpoint(missing, [], None, None, None, 64, log=messages.append).iteration == 0
    assert "starting from scratch" in messages[0]
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt disappeared"):
        load_checkpoint(missing, [], None, None, None, 64, log=messages.append, required=True)
