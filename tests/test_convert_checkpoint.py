"""tools/convert_checkpoint.py: a tiny random BloomForCausalLM (vocab 260, not a multiple of 128)
goes HF -> ours (TP=2, PP=2) -> HF unchanged from safetensors, sharded safetensors and sharded
.bin; our model computes HF's logits from the converted checkpoint and pretrain_bloom.py trains
from it; vocabulary-row choices; bad input fails with exit status 2 and leaves no output."""
import contextlib
import io
import json
import os
import shutil

import pytest
import torch

from launch import REPO_ROOT, run_python, run_torchrun
from test_convert_tp import WORKER, args_for
from test_pretrain import corpus, launch, losses  # noqa: F401 (corpus is a fixture)
from tolerances import FORWARD_REL, assert_close_to_scale

TOOL = os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py")
VOCAB, HIDDEN, HEADS, LAYERS = 260, 32, 4, 4
TO_OURS = ("--source-format", "hf", "--target-format", "megatron")
TO_HF = ("--source-format", "megatron", "--target-format", "hf")


def tool(*argv) -> tuple[int, str, str]:
    """The tool's main() in this process (no interpreter start-up): status, stdout, stderr."""
    from tools.convert_checkpoint import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


def converted(*argv) -> str:
    status, out, err = tool(*argv)
    assert status == 0, out + err
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(root, model): the model saved as root/hf (single model.safetensors)."""
    from transformers import BloomConfig, BloomForCausalLM

    root = tmp_path_factory.mktemp("convert_checkpoint")
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS,
                                         n_head=HEADS)).eval()
    with torch.no_grad():  # LayerNorms and biases away from 1 / 0, so that every tensor matters
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(root / "hf")
    return root, model


def assert_same_model(model, directory):
    from transformers import BloomConfig, BloomForCausalLM

    back = BloomForCausalLM.from_pretrained(directory)
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name
    original = model.config.to_dict()
    again = BloomConfig.from_pretrained(directory).to_dict()
    differ = {k for k in set(original) | set(again) if original.get(k) != again.get(k)}
    assert differ <= {"_name_or_path"}, {k: (original.get(k), again.get(k)) for k in differ}


def rank_state(directory, tp_rank, pp_rank):
    path = os.path.join(directory, "release", f"mp_rank_{tp_rank:02d}_{pp_rank:03d}",
                        "model_optim_rng.pt")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def ours(hf):
    """root/ours: root/hf converted to TP=2, PP=2; the tool's output."""
    root, _ = hf
    out = converted(*TO_OURS, "--input", root / "hf", "--output", root / "ours",
                    "--target-tp", 2, "--target-pp", 2)
    return root / "ours", out


def test_safetensors_round_trip_tp2_pp2(hf, ours, tmp_path):
    root, model = hf
    directory, out = ours
    assert [line.split()[1] for line in out.splitlines() if line.startswith("wrote ")] == \
        [os.path.join(str(directory), "release", f"mp_rank_{t:02d}_{p:03d}", "model_optim_rng.pt")
         for p in range(2) for t in range(2)]
    assert (directory / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert not os.path.exists(str(directory) + ".tmp")
    first, last = rank_state(directory, 1, 0), rank_state(directory, 0, 1)
    assert "optimizer" not in first and first["iteration"] == 0
    assert first["args"] == {
        "num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 128,
        "seq_length": 2048, "max_position_embeddings": 2048, "layernorm_epsilon": 1e-5,
        "embed_layernorm": True, "position_embedding_type": "alibi", "padded_vocab_size": 512,
        "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
        "virtual_pipeline_chunks": 1, "pp_partition_method": None, "params_dtype": "float32"}
    info = first["checkpoint_info"]
    assert (info["padded_vocab_size"], info["original_vocab_size"], info["hf_vocab_size"]) == \
        (512, VOCAB, VOCAB)
    assert info["hf_config"]["n_layer"] == LAYERS
    # TP rank 1 holds vocab rows 256..511: rows 256..259 real, the rest zero padding
    rows = first["model"]["language_model"]["embedding"]["word_embeddings"]["weight"]
    embedding = model.transformer.word_embeddings.weight
    assert torch.equal(rows[:4], embedding[256:]) and not rows[4:].any()
    head = last["model"]["word_embeddings_for_head"]["weight"]
    assert torch.equal(head, embedding[:256])
    assert set(last["model"]["language_model"]["encoder"]) >= {"layers.0.mlp.dense_4h_to_h.weight",
                                                                "final_layernorm.weight"}
    converted(*TO_HF, "--input", directory, "--output", tmp_path / "back")
    assert sorted(os.listdir(tmp_path / "back")) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]
    assert_same_model(model, tmp_path / "back")


def test_sharded_safetensors_and_bin_round_trip(hf, tmp_path):
    """Sharded safetensors (save_pretrained) and sharded .bin files with the original BLOOM
    shards' unprefixed names and a tied lm_head; TP=2 PP=1 and TP=1 PP=4."""
    root, model = hf
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    converted(*TO_OURS, "--input", tmp_path / "sharded", "--output", tmp_path / "tp2",
              "--target-tp", 2)
    converted(*TO_HF, "--input", tmp_path / "tp2", "--output", tmp_path / "back1")
    assert sorted(os.listdir(tmp_path / "back1")) == ["config.json", "model.safetensors"]
    assert_same_model(model, tmp_path / "back1")

    bin_dir = tmp_path / "bin"
    os.makedirs(bin_dir)
    shutil.copy(root / "hf" / "config.json", bin_dir)
    state = {k[len("transformer."):]: v for k, v in model.state_dict().items()
             if k.startswith("transformer.")}
    state["lm_head.weight"] = model.lm_head.weight  # tied: equal to the embedding
    names, weight_map = sorted(state), {}
    for i in range(3):
        file = f"pytorch_model-0000{i + 1}-of-00003.bin"
        part = {k: state[k].clone() for k in names[i::3]}
        torch.save(part, bin_dir / file)
        weight_map.update({k: file for k in part})
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = converted(*TO_OURS, "--input", bin_dir, "--output", tmp_path / "pp4", "--target-pp", 4)
    assert "WARNING" not in out and out.count("wrote ") == 4
    converted(*TO_HF, "--input", tmp_path / "pp4", "--output", tmp_path / "back2")
    assert_same_model(model, tmp_path / "back2")

    # an untied lm_head is reported, and ignored
    state["lm_head.weight"] = state["word_embeddings.weight"] + 0.5
    torch.save({k: state[k] for k in names[0::3]}, bin_dir / "pytorch_model-00001-of-00003.bin")
    out = converted(*TO_OURS, "--input", bin_dir, "--output", tmp_path / "untied")
    assert "WARNING: lm_head.weight differs from word_embeddings.weight (max abs difference " \
        "0.5)" in out


def test_vocab_rows_and_dtype(hf, ours, tmp_path):
    root, model = hf
    directory, _ = ours

    def rows(name, *extra):
        converted(*TO_HF, "--input", directory, "--output", tmp_path / name, *extra)
        from safetensors import safe_open
        with safe_open(str(tmp_path / name / "model-00001-of-00002.safetensors"), "pt") as f:
            embedding = f.get_tensor("transformer.word_embeddings.weight")
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["vocab_size"] == embedding.shape[0]
        return embedding

    assert rows("padded", "--vocab-rows", "padded").shape[0] == 512
    cut = rows("tokenizer", "--vocab-rows", "tokenizer", "--tokenizer-vocab-size", 257)
    assert torch.equal(cut, model.transformer.word_embeddings.weight[:257])
    half = rows("bf16", "--dtype", "bf16")
    assert half.dtype == torch.bfloat16 and half.shape[0] == VOCAB
    # the original vocabulary recorded on the way in is what --vocab-rows tokenizer keeps
    converted(*TO_OURS, "--input", root / "hf", "--output", tmp_path / "tok",
              "--tokenizer-vocab-size", 257, "--params-dtype", "bf16")
    state = torch.load(tmp_path / "tok" / "release" / "mp_rank_00" / "model_optim_rng.pt",
                       weights_only=True)
    assert state["checkpoint_info"]["original_vocab_size"] == 257
    assert state["args"]["params_dtype"] == "bfloat16" and state["args"]["padded_vocab_size"] == 384
    converted(*TO_HF, "--input", tmp_path / "tok", "--output", tmp_path / "tok_hf",
              "--vocab-rows", "tokenizer")
    assert json.loads((tmp_path / "tok_hf" / "config.json").read_text())["vocab_size"] == 257


class PlainSource:
    """The smallest tensor source (hf_config / keys / get, as the Megatron-DeepSpeed reader)."""

    def __init__(self, model):
        self.config = model.config.to_dict()
        self.tensors = {k[len("transformer."):]: v for k, v in model.state_dict().items()
                        if k.startswith("transformer.")}

    def hf_config(self):
        return self.config

    def keys(self):
        return list(self.tensors)

    def get(self, name):
        return self.tensors[name]


def test_plain_source_reshard_and_virtual_pipeline_to_hf(hf, ours, tmp_path):
    """A source with only hf_config/keys/get writes the same rank files; the release reshards
    with tools/convert_tp.py; a virtual-pipeline checkpoint (model0/model1) converts to HF."""
    from ascendspeed.checkpoint.hf import hf_to_megatron
    from ascendspeed.checkpoint.reshard import chunk_layout
    from ascendspeed.checkpoint.tensors import flatten_model, nest_model, target_names, to_global
    from tools.convert_tp import main as convert_tp

    _, model = hf
    directory, _ = ours
    hf_to_megatron(PlainSource(model), str(tmp_path / "plain"), 2, 2, log=lambda m: None)
    for p in range(2):
        for t in range(2):
            got, want = rank_state(tmp_path / "plain", t, p), rank_state(directory, t, p)
            assert got["args"] == want["args"]
            flat, reference = flatten_model(got["model"], "got"), flatten_model(want["model"], "")
            assert flat.keys() == reference.keys()
            assert all(torch.equal(flat[k], reference[k]) for k in flat)

    with contextlib.redirect_stdout(io.StringIO()):
        assert convert_tp(["--input-folder", str(directory), "--output-folder",
                           str(tmp_path / "tp1"), "--target-tp", "1"]) == 0
    converted(*TO_HF, "--input", tmp_path / "tp1", "--output", tmp_path / "from_tp1")
    assert_same_model(model, tmp_path / "from_tp1")

    # PP=2 with 2 chunks per stage: stage 0 holds layers 1 and 3, stage 1 layers 2 and 4
    args = rank_state(directory, 0, 0)["args"]
    tensors = {}  # (tp rank, global key) -> tensor
    for p in range(2):
        (chunk,) = chunk_layout(args, 2, p, 1)
        for t in range(2):
            for local, tensor in flatten_model(rank_state(directory, t, p)["model"], "").items():
                tensors[(t, to_global(local, chunk))] = tensor
    virtual = dict(args, virtual_pipeline_chunks=2)
    keys = {key for _, key in tensors}
    for p in range(2):
        for t in range(2):
            state = dict(rank_state(directory, t, p), args=virtual)
            del state["model"]
            for c, chunk in enumerate(chunk_layout(virtual, 2, p, 2)):
                state[f"model{c}"] = nest_model([(local, tensors[(t, key)]) for local, key
                                                 in target_names(chunk, keys)], chunk.pre_process)
            path = tmp_path / "virtual" / "iter_0000007" / f"mp_rank_{t:02d}_{p:03d}"
            os.makedirs(path)
            torch.save(state, path / "model_optim_rng.pt")
    out = converted(*TO_HF, "--input", tmp_path / "virtual", "--iteration", 7, "--output",
                    tmp_path / "from_virtual")
    assert "(pipeline stage 0: layer 1, embedding, layer 3)" in out
    assert_same_model(model, tmp_path / "from_virtual")


def test_megatron_deepspeed_source(hf, tmp_path):
    """--source-format megatron-deepspeed: BLOOM's layer files (TP=2) -> ours (TP=1, PP=2) ->
    HF gives back the model the layer files were cut from."""
    fixture = pytest.importorskip("megatron_deepspeed_fixture")
    _, model = hf
    fixture.write_megatron_deepspeed_checkpoint(model, tmp_path / "ds", tp=2,
                                                original_vocab_size=257)
    out = converted("--source-format", "megatron-deepspeed", "--target-format", "megatron",
                    "--input", tmp_path / "ds", "--output", tmp_path / "ours", "--target-pp", 2)
    assert out.count("wrote ") == 2
    info = rank_state(tmp_path / "ours", 0, 1)["checkpoint_info"]
    assert (info["original_vocab_size"], info["hf_vocab_size"]) == (257, VOCAB)
    converted(*TO_HF, "--input", tmp_path / "ours", "--output", tmp_path / "back")
    from transformers import BloomForCausalLM
    back = BloomForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def refused(capture_dir, *argv) -> str:
    status, _, err = tool(*argv)
    assert status == 2, err
    line = err.strip()
    assert line.startswith("convert_checkpoint.py: error: ") and "\n" not in line, err
    assert not os.path.exists(capture_dir) and not os.path.exists(str(capture_dir) + ".tmp")
    return line


def truncated_copy(root, tmp_path):
    broken = tmp_path / "truncated"
    shutil.copytree(root / "hf", broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:len(data) // 2])
    return broken


@pytest.mark.multiprocess
def test_bad_input_exit_status_of_the_process(hf, tmp_path):
    """A truncated safetensors file, through a real process: exit status 2, one error line."""
    root, _ = hf
    out = tmp_path / "out"
    broken = truncated_copy(root, tmp_path)
    result = run_python(TOOL, [*TO_OURS, "--input", broken, "--output", out], timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("convert_checkpoint.py: error: ")
    assert str(broken / "model.safetensors") in result.stderr
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".tmp")


def test_bad_input_exit_2_and_no_output(hf, ours, tmp_path):
    from safetensors.torch import load_file, save_file

    root, _ = hf
    out = tmp_path / "out"
    to_ours = (*TO_OURS, "--output", out)
    broken = truncated_copy(root, tmp_path)
    line = refused(out, *to_ours, "--input", broken)
    assert str(broken / "model.safetensors") in line

    tensors = load_file(str(root / "hf" / "model.safetensors"))
    missing = tmp_path / "missing"
    shutil.copytree(root / "hf", missing)
    del tensors["transformer.h.2.mlp.dense_h_to_4h.weight"]
    save_file(tensors, str(missing / "model.safetensors"))
    line = refused(out, *to_ours, "--input", missing)
    assert str(missing / "model.safetensors") in line and "h.2.mlp.dense_h_to_4h.weight" in line

    tensors["transformer.h.2.mlp.dense_h_to_4h.weight"] = torch.zeros(128, 31)
    save_file(tensors, str(missing / "model.safetensors"))
    line = refused(out, *to_ours, "--input", missing)
    assert "h.2.mlp.dense_h_to_4h.weight has shape (128, 31)" in line and "(128, 32)" in line

    line = refused(out, *to_ours, "--input", root / "hf", "--target-tp", 3)
    assert "--num-attention-heads 4" in line and "tensor-parallel size 3" in line
    line = refused(out, *to_ours, "--input", root / "hf", "--target-pp", 3)
    assert "--target-pp 3" in line and "--num-layers 4" in line
    line = refused(out, *to_ours, "--input", tmp_path)
    assert os.path.join(str(tmp_path), "config.json") in line
    line = refused(out, *to_ours, "--input", root / "hf", "--pad-vocab-size-to", 256)
    assert "--pad-vocab-size-to 256" in line

    # a non-empty output is refused (and kept) unless --force
    os.makedirs(out)
    (out / "keep").write_text("x")
    status, _, err = tool(*to_ours, "--input", root / "hf")
    assert status == 2 and "exists and is not empty" in err and (out / "keep").exists()
    converted(*to_ours, "--input", root / "hf", "--force")
    assert not (out / "keep").exists() and (out / "release").is_dir()
    line = refused(tmp_path / "hf_out", *TO_HF, "--input", tmp_path / "nothing", "--output",
                   tmp_path / "hf_out")
    assert "latest_checkpointed_iteration.txt" in line


@pytest.mark.multiprocess
def test_logits_match_hf_tp2_pp2(hf, ours, corpus, tmp_path):
    """Our model on 4 processes (TP=2 x PP=2) computes HF's logits from the converted weights."""
    _, model = hf
    directory, _ = ours
    run_torchrun(WORKER, ["--iteration-dir", directory / "release", "--out", tmp_path / "logits.pt",
                          "--tokens-out", tmp_path / "tokens.pt", "--",
                          *args_for(corpus, 2, 2, "--hidden-size", str(HIDDEN))], 4,
                 timeout=180, check=True)
    ours_logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    tokens = torch.load(tmp_path / "tokens.pt", weights_only=True)
    with torch.no_grad():
        reference = model(tokens).logits
    assert ours_logits.shape == reference.shape == (2, 16, VOCAB)
    # one fp32 forward each (ours over TP=2 x PP=2, HF's): ulps of the logits' scale
    assert_close_to_scale(ours_logits, reference, rel=FORWARD_REL, what="logits")


@pytest.mark.multiprocess
def test_training_starts_from_release(hf, corpus, tmp_path):
    """pretrain_bloom.py --load DIR --use-checkpoint-args (TP=2, 2 processes) takes the model
    flags from the converted checkpoint, loads it at iteration 0 with a fresh optimizer (a
    release, as in Megatron) and trains."""
    root, _ = hf
    converted(*TO_OURS, "--input", root / "hf", "--output", tmp_path / "tp2", "--target-tp", 2)
    result = launch(2, args_for(corpus, 2, 1, "--load", str(tmp_path / "tp2"),
                                "--use-checkpoint-args", "--train-iters", "2",
                                "--global-batch-size", "4",
                                "--lr-warmup-iters", "1", "--eval-iters", "0"))
    assert len(losses(result)) == 2
    assert "(iteration 0: release)" in result.stdout
    assert "--hidden-size: 64 -> 32" in result.stdout + result.stderr
