"""ascendspeed/checkpoint/tensors.py's table against the things it describes: our BloomModel (its
parameter names and order, the TP split its layers mark on each parameter, full shapes), a
transformers BloomForCausalLM (every name, both ways, and shapes), Megatron's nesting (a round
trip) and the Megatron-DeepSpeed layer files (tests/megatron_deepspeed_fixture.py, written from
the spec's file list). One process, tiny models."""
import pytest
import torch
import transformers

from ascendspeed.checkpoint import tensors
from ascendspeed.checkpoint.tensors import (HF_PREFIX, TABLE, Chunk, chunk_tensors, flatten_model,
                                            hf_split_dim, nest_model, parse_hf, parse_key,
                                            parse_ours, split_dim, to_global, whole_model)
from ascendspeed.model.bloom import BloomConfig, BloomModel
from megatron_deepspeed_fixture import layer_states

VOCAB, HIDDEN, HEADS, LAYERS, FFN = 128, 16, 2, 3, 40
CHUNKS = {  # name -> (pre_process, post_process, layer numbers)
    "whole model": (True, True, (1, 2, 3)),
    "first stage": (True, False, (1,)),
    "middle stage": (False, False, (2,)),
    "last stage": (False, True, (2, 3)),
}


def model_chunk(pre, post, layers, embed_layernorm=True):
    config = BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS,
                         num_attention_heads=HEADS, ffn_hidden_size=FFN,
                         embed_layernorm=embed_layernorm)
    return BloomModel(config, pre_process=pre, post_process=post, layer_numbers=list(layers))


def model_split_dim(param) -> int | None:
    """The split core/tensor_parallel/layers.py marks on a parameter (at any TP size)."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


@pytest.fixture(scope="module")
def hf_model():
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS,
                                      n_head=HEADS)
    torch.manual_seed(0)
    return transformers.BloomForCausalLM(config).eval()


@pytest.mark.parametrize("embed_layernorm", [True, False])
@pytest.mark.parametrize("name", list(CHUNKS))
def test_table_is_the_models_parameters_and_their_tp_split(name, embed_layernorm):
    pre, post, layers = CHUNKS[name]
    model = model_chunk(pre, post, layers, embed_layernorm)
    chunk = Chunk(layers, pre, post)
    listed = chunk_tensors(chunk, embed_layernorm)
    params = dict(model.named_parameters())
    assert [c.local for c in listed] == list(model.state_dict()) == list(params)
    for c in listed:
        param = params[c.local]
        assert c.tensor.split_dim == model_split_dim(param), c.local
        assert split_dim(c.local) == split_dim(c.key) == model_split_dim(param), c.local
        assert parse_ours(c.local, pre) == (c.tensor, None if c.number is None
                                            else layers.index(c.number))
        assert to_global(c.local, chunk) == c.key and parse_key(c.key) == (c.tensor, c.number)
        assert tuple(param.shape) == c.tensor.full_shape(VOCAB, HIDDEN, FFN), c.local
    assert {c.tensor.part for c in listed} >= {"block"}
    assert any(c.tensor is tensors.HEAD_COPY for c in listed) == (post and not pre)


def test_every_row_is_some_parameter_and_the_head_copy_is_the_embedding():
    seen = {c.tensor for pre, post, layers in CHUNKS.values()
            for c in chunk_tensors(Chunk(layers, pre, post))}
    assert seen == set(TABLE)
    head, embedding = tensors.HEAD_COPY, tensors.WORD_EMBEDDINGS
    assert (head.ours, head.split_dim, head.shape, head.hf) == \
        (embedding.ours, embedding.split_dim, embedding.shape, embedding.hf)
    assert (tensors.EMBED, tensors.HEAD) == ("embed.word_embeddings.weight",
                                             "head.word_embeddings.weight")


def test_every_name_is_a_bloom_for_causal_lm_key_and_back(hf_model):
    state = hf_model.state_dict()
    ours = whole_model(LAYERS)
    names = [HF_PREFIX + c.tensor.hf_name(c.number) for c in ours]
    assert len(set(names)) == len(names)
    assert sorted(names) == sorted(k for k in state if k != "lm_head.weight")
    hidden = hf_model.config.hidden_size
    for c, name in zip(ours, names):
        assert tuple(state[name].shape) == c.tensor.full_shape(VOCAB, hidden, 4 * hidden), name
        assert parse_hf(name[len(HF_PREFIX):]) == (c.tensor, c.number)
        assert hf_split_dim(name[len(HF_PREFIX):]) == c.tensor.split_dim
    # the tied head: the last stage's copy reads the HF embedding
    last = chunk_tensors(Chunk((LAYERS,), False, True))
    assert HF_PREFIX + last[0].tensor.hf_name() in state


@pytest.mark.parametrize("name", list(CHUNKS))
def test_megatron_nesting_round_trips(name):
    pre, post, layers = CHUNKS[name]
    model = model_chunk(pre, post, layers)
    flat = list(model.state_dict().items())
    nested = nest_model(flat, pre)
    if pre:
        assert set(nested["language_model"]["embedding"]["word_embeddings"]) == \
            {"weight", "norm.weight", "norm.bias"}
    assert ("word_embeddings_for_head" in nested) == (post and not pre)
    back = flatten_model(nested, "test")
    assert list(back) == [n for n, _ in flat]
    assert all(back[n] is t for n, t in flat)


def test_megatron_deepspeed_layer_files_hold_the_table_keys(hf_model):
    """Every row with a Meg-DS key sits in its layer file (the fixture's, written from the
    spec's file list), holding that HF tensor; the files hold nothing else."""
    files = layer_states(hf_model, tp=1, dtype=torch.float32)
    state = hf_model.state_dict()
    found = {(layer, key) for layer, shards in files.items() for key in shards[0]}
    expected = set()
    for c in whole_model(LAYERS):
        layer = c.tensor.deepspeed_layer(c.number, LAYERS)
        expected.add((layer, c.tensor.deepspeed))
        assert torch.equal(files[layer][0][c.tensor.deepspeed],
                           state[HF_PREFIX + c.tensor.hf_name(c.number)]), c.key
    assert found == expected
