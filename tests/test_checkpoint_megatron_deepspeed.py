"""ascendspeed.checkpoint.megatron_deepspeed against synthetic Meg-DS checkpoints written from a tiny
random transformers BloomForCausalLM (tests/megatron_deepspeed_fixture.py): names, exact tensors,
TP merge (drifted replicas averaged with a warning), logits of the rebuilt model, streaming, and
errors that name the file."""
import os

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

import ascendspeed.checkpoint.megatron_deepspeed as mds
from ascendspeed.checkpoint.megatron_deepspeed import MegatronDeepSpeedSource
from ascendspeed.errors import MegatronDeepSpeedError
from megatron_deepspeed_fixture import write_megatron_deepspeed_checkpoint

VOCAB, HIDDEN, HEADS, LAYERS = 256, 32, 4, 3


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_head=HEADS,
                                         n_layer=LAYERS))
    with torch.no_grad():  # LayerNorms and biases away from 1/0, so a mix-up would show
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def hf_state(model, dtype=torch.float32):
    return {k.removeprefix("transformer."): v.to(dtype) for k, v in model.state_dict().items()
            if k != "lm_head.weight"}


def source(directory, **kwargs):
    lines = []
    return MegatronDeepSpeedSource(str(directory), log=lines.append, **kwargs), lines


@pytest.mark.parametrize("tp,dtype", [(1, torch.float32), (2, torch.float32), (2, torch.bfloat16)])
def test_names_tensors_and_metadata(hf_model, tmp_path, tp, dtype):
    write_megatron_deepspeed_checkpoint(hf_model, tmp_path, tp, iteration=95, dtype=dtype,
                                        original_vocab_size=250)
    src, lines = source(tmp_path)
    expected = hf_state(hf_model, dtype)
    assert src.keys() == list(expected)  # HF's model order, no prefix
    for name, tensor in expected.items():
        got = src.get(name)
        assert got.dtype == dtype and torch.equal(got, tensor), name
    assert lines == []
    assert src.iteration == 95 and src.tp == tp and src.num_layers == LAYERS
    assert src.info == {"padded_vocab_size": VOCAB, "original_vocab_size": 250,
                        "consumed_train_samples": 0, "consumed_train_tokens": 95 * 4 * 64}
    assert src.args["num_attention_heads"] == HEADS and src.args["seq_length"] == 64
    assert repr(src.args["position_embedding_type"]) == "megatron.enums.PositionEmbeddingType(3)"
    config = src.hf_config()
    assert config == {**config, "vocab_size": VOCAB, "hidden_size": HIDDEN, "n_layer": LAYERS,
                      "n_head": HEADS, "layer_norm_epsilon": 1e-5, "pretraining_tp": tp,
                      "slow_but_exact": False, "apply_residual_connection_post_layernorm": False,
                      "model_type": "bloom", "architectures": ["BloomForCausalLM"],
                      "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": 1,
                      "eos_token_id": 2, "pad_token_id": 3, "hidden_dropout": 0.1,
                      "attention_dropout": 0.1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rebuilt_model_gives_the_same_logits(hf_model, tmp_path, dtype):
    write_megatron_deepspeed_checkpoint(hf_model, tmp_path, tp=2, dtype=dtype)
    src, _ = source(tmp_path)
    rebuilt = BloomForCausalLM(BloomConfig(**src.hf_config())).to(dtype).eval()
    result = rebuilt.load_state_dict({"transformer." + k: src.get(k) for k in src.keys()},
                                     strict=False)
    assert result.missing_keys == ["lm_head.weight"] and result.unexpected_keys == []
    original = BloomForCausalLM(hf_model.config).to(dtype).eval()
    original.load_state_dict(hf_model.state_dict())
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, original(ids).logits)


def test_ten_tp_ranks(tmp_path):
    """TP >= 10: ranks are parsed from the file names (no 'model_0{i}' string building)."""
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=260, hidden_size=40, n_head=10, n_layer=1))
    write_megatron_deepspeed_checkpoint(model, tmp_path, tp=10)
    src, _ = source(tmp_path)
    assert src.tp == 10 and src.hf_config()["vocab_size"] == 260
    for name, tensor in hf_state(model).items():
        assert torch.equal(src.get(name), tensor), name


def test_drifted_replica_is_averaged_in_fp32_with_a_warning(hf_model, tmp_path):
    step_dir = write_megatron_deepspeed_checkpoint(hf_model, tmp_path, tp=2, dtype=torch.bfloat16)
    path = os.path.join(step_dir, "layer_04-model_01-model_states.pt")
    shard = torch.load(path, weights_only=True)
    rank0 = shard["input_layernorm.weight"].clone()
    shard["input_layernorm.weight"] = rank0 + 0.5
    torch.save(shard, path)
    src, lines = source(tmp_path)
    got = src.get("h.1.input_layernorm.weight")
    rank1 = shard["input_layernorm.weight"]  # rank0 + 0.5 rounded to bf16
    assert torch.equal(got, ((rank0.float() + rank1.float()) / 2).to(torch.bfloat16))
    assert len(lines) == 1 and "WARNING" in lines[0] and "h.1.input_layernorm.weight" in lines[0]
    assert "0.5" in lines[0]  # the max abs difference
    assert torch.equal(src.get("h.1.input_layernorm.bias"), shard["input_layernorm.bias"])
    assert len(lines) == 1  # equal replicas: rank 0's copy, silently


def test_get_loads_only_the_layer_of_the_tensor(hf_model, tmp_path, monkeypatch):
    write_megatron_deepspeed_checkpoint(hf_model, tmp_path, tp=2)
    src, _ = source(tmp_path)
    loaded = []
    real_load = mds.load_file
    monkeypatch.setattr(mds, "load_file", lambda path, **kw: loaded.append(
        os.path.basename(path)) or real_load(path, **kw))
    src.get("h.1.mlp.dense_h_to_4h.weight")
    src.get("h.1.self_attention.dense.weight")  # same layer: cached
    assert loaded == ["layer_04-model_00-model_states.pt", "layer_04-model_01-model_states.pt"]
    src.get("ln_f.bias")
    assert loaded[2:] == ["layer_07-model_00-model_states.pt", "layer_07-model_01-model_states.pt"]
    assert src._cache[0] == 7  # only the latest layer is held


def test_step_dir_tag_and_layer_files_without_mp_rank(hf_model, tmp_path):
    step_dir = write_megatron_deepspeed_checkpoint(hf_model, tmp_path, tp=2, iteration=7,
                                                   mp_rank_files=False)
    os.remove(os.path.join(tmp_path, "latest"))
    for kwargs in ({"path": step_dir}, {"path": str(tmp_path), "tag": "global_step7"}):
        src = MegatronDeepSpeedSource(log=print, **kwargs)
        assert src.args == {} and src.iteration == 7 and src.info == {}
        with pytest.raises(MegatronDeepSpeedError, match="num_attention_heads"):
            src.hf_config()
    src = MegatronDeepSpeedSource(step_dir, num_attention_heads=HEADS)
    assert src.hf_config()["n_head"] == HEADS and src.hf_config()["vocab_size"] == VOCAB
    assert torch.equal(src.get("h.2.mlp.dense_4h_to_h.weight"),
                       hf_model.state_dict()["transformer.h.2.mlp.dense_4h_to_h.weight"])


def test_errors_name_the_file(hf_model, tmp_path):
    with pytest.raises(MegatronDeepSpeedError, match="latest: missing"):
        MegatronDeepSpeedSource(str(tmp_path))
    step_dir = write_megatron_deepspeed_checkpoint(hf_model, tmp_path, tp=2)
    with pytest.raises(MegatronDeepSpeedError, match="global_step5: tag directory missing"):
        MegatronDeepSpeedSource(str(tmp_path), tag="global_step5")

    truncated = os.path.join(step_dir, "layer_05-model_00-model_states.pt")
    with open(truncated, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    src, _ = source(tmp_path)
    with pytest.raises(MegatronDeepSpeedError, match="layer_05-model_00-model_states.pt: unreadable"):
        src.get("h.2.input_layernorm.weight")

    wrong = os.path.join(step_dir, "layer_03-model_01-model_states.pt")
    shard = torch.load(wrong, weights_only=True)
    shard["self_attention.query_key_value.bias"] = shard["self_attention.query_key_value.bias"][:-3]
    torch.save(shard, wrong)
    with pytest.raises(MegatronDeepSpeedError, match="layer_03-model_01-model_states.pt: "
                                                     "self_attention.query_key_value.bias"):
        src.get("h.0.self_attention.query_key_value.bias")

    os.remove(os.path.join(step_dir, "layer_04-model_01-model_states.pt"))
    with pytest.raises(MegatronDeepSpeedError, match="layer_04-model_01-model_states.pt: missing"):
        MegatronDeepSpeedSource(str(tmp_path))


def test_args_that_contradict_the_files(hf_model, tmp_path):
    write_megatron_deepspeed_checkpoint(hf_model, tmp_path, tp=2, num_layers=2)
    with pytest.raises(MegatronDeepSpeedError, match="num_layers=3 but .*mp_rank_00_model_states.pt"
                                                     " says 2"):
        MegatronDeepSpeedSource(str(tmp_path))


def test_missing_tp_rank_is_found_from_args(hf_model, tmp_path):
    step_dir = write_megatron_deepspeed_checkpoint(hf_model, tmp_path, tp=2)
    for name in os.listdir(step_dir):
        if "-model_01-" in name:
            os.remove(os.path.join(step_dir, name))
    with pytest.raises(MegatronDeepSpeedError, match="layer_01-model_01-model_states.pt: missing"):
        MegatronDeepSpeedSource(str(tmp_path))


def test_unknown_global_in_mp_rank_file_is_refused(hf_model, tmp_path):
    import datetime

    step_dir = write_megatron_deepspeed_checkpoint(hf_model, tmp_path, tp=1)
    path = os.path.join(step_dir, "mp_rank_00_model_states.pt")
    torch.save({"iteration": 3, "when": datetime.date(2022, 7, 5)}, path)
    with pytest.raises(MegatronDeepSpeedError, match="mp_rank_00_model_states.pt: .*datetime.date"):
        MegatronDeepSpeedSource(str(tmp_path))
