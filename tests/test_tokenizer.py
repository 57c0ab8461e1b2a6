"""Tokenizers give Megatron's ids, and the vocabulary is padded by BigScience's rule."""
import os
import random

import numpy as np
import pytest

from ascendspeed.arguments import TokenizerConfig
from ascendspeed.data.tokenizer import (GPT2BPETokenizer, GPTSentencePieceTokenizer, HFTokenizer,
                                        SentencePieceTokenizer, build_tokenizer,
                                        vocab_size_with_padding)
from ascendspeed.errors import ConfigError
from megatron_ext.indexed_dataset import MMapIndexedDataset
from tokenizer_helpers import (FIXTURE_DIR, GPT2_MERGES, GPT2_VOCAB, ReferenceGPT2BPE,
                               generated_docs, train_hf_tokenizer, train_sentencepiece)

FIXTURE_PREFIX = os.path.join(FIXTURE_DIR, "meg-gpt2-openwebtext_text_document")


# ------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_bloom_vocab_padded_to_250880(tp):
    assert vocab_size_with_padding(250680, 128, tp, pad_vocab_size_to=250880) == 250880


@pytest.mark.parametrize("tp, padded", [(1, 50304), (2, 50432), (4, 50688), (8, 51200)])
def test_vocab_rounded_up_to_multiple_of_divisible_by_times_tp(tp, padded):
    assert vocab_size_with_padding(50257, 128, tp) == padded
    assert padded % (128 * tp) == 0 and padded - 50257 < 128 * tp


def test_vocab_already_a_multiple_is_kept():
    assert vocab_size_with_padding(51200, 128, 8) == 51200


@pytest.mark.parametrize("orig, divisible, tp, pad_to, words", [
    (250680, 128, 1, 250000, ["--pad-vocab-size-to 250000", "250680"]),
    (250680, 128, 1, 250700, ["--pad-vocab-size-to 250700", "--make-vocab-size-divisible-by 128"]),
    (250680, 1, 3, 250880, ["--pad-vocab-size-to 250880", "--tensor-model-parallel-size 3"]),
    (50257, 128, 0, None, ["--tensor-model-parallel-size"]),
])
def test_vocab_padding_errors_name_the_flag(orig, divisible, tp, pad_to, words):
    with pytest.raises(ConfigError) as error:
        vocab_size_with_padding(orig, divisible, tp, pad_to)
    for word in words:
        assert word in str(error.value)


# ------------------------------------------------------------------------------------ GPT-2 BPE
@pytest.fixture(scope="module")
def gpt2():
    from conftest import shared_fixture

    shared_fixture("megatron", os.path.basename(GPT2_VOCAB))
    shared_fixture("megatron", os.path.basename(GPT2_MERGES))
    shared_fixture("megatron", os.path.basename(FIXTURE_PREFIX) + ".idx")
    return build_tokenizer(TokenizerConfig("GPT2BPETokenizer", vocab_file=GPT2_VOCAB,
                                           merge_file=GPT2_MERGES))


def test_gpt2_reproduces_every_megatron_document(gpt2):
    """The fixture holds 1000 documents Megatron tokenized (--append-eod). Detokenizing one and
    tokenizing it again gives Megatron's ids exactly, for all of them; since the decoded text is the
    original text, this is the same tokenizer on 1.36M tokens of real web text."""
    data = MMapIndexedDataset(FIXTURE_PREFIX)
    docs = [data[i].tolist() for i in range(len(data))]
    assert all(doc[-1] == gpt2.eod == 4999 for doc in docs)
    texts = [gpt2.detokenize(doc[:-1]) for doc in docs]
    retokenized = gpt2.encode_batch(texts)
    mismatched = [i for i, (ids, doc) in enumerate(zip(retokenized, docs)) if ids != doc[:-1]]
    assert mismatched == []
    assert sum(len(ids) + 1 for ids in retokenized) == 1_361_845


def test_gpt2_equals_reference_bpe_on_awkward_text(gpt2):
    reference = ReferenceGPT2BPE(GPT2_VOCAB, GPT2_MERGES)
    rng = random.Random(7)
    alphabet = list("aAzZ09 '\t\n\r.,;!?-_<>|") + ["'s", "'ll", "'re", " '", "  ", "\u00a0", "é", "ñ",
                                                 "日本", "Ω", "\u0301", "😀", "\u200b", "<|endoftext|>"]
    texts = ["", " ", "  hello  world  ", "don't we'll they're I'M", "1234567 3.14159",
             "line\n\n  indented\r\nwindows", "a<|endoftext|>b", "<|endoftext|>"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    assert gpt2.encode_batch(texts) == [reference.encode(t) for t in texts]
    assert [gpt2.tokenize(t) for t in texts] == [reference.encode(t) for t in texts]


def test_gpt2_endoftext_inside_text_is_ordinary_text(gpt2):
    ids = gpt2.tokenize("end<|endoftext|>start")
    assert gpt2.eod not in ids and len(ids) > 3
    assert gpt2.detokenize(ids) == "end<|endoftext|>start"


def test_gpt2_interface(gpt2):
    assert gpt2.vocab_size == len(gpt2.vocab) == 5000
    assert gpt2.pad is None
    assert gpt2.inv_vocab[gpt2.eod] == "<|endoftext|>"
    text = "Shall I compare thee to a summer's day?\n\tThou art more lovely — ünd 日本."
    assert gpt2.detokenize(np.array(gpt2.tokenize(text))) == text
    cut = gpt2.tokenize("日")
    assert len(cut) > 1 and gpt2.detokenize(cut[:1]) == "\ufffd"  # part of a character, as Megatron


def test_gpt2_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"--vocab-file .*nope\.json: file not found"):
        GPT2BPETokenizer(str(tmp_path / "nope.json"), str(tmp_path / "merges.txt"))
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    with pytest.raises(ConfigError, match=r"--merge-file .*merges\.txt: file not found"):
        GPT2BPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ConfigError, match=r"vocab\.json: has no <\|endoftext\|> token"):
        GPT2BPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))


# ------------------------------------------------------------------------------------ Hugging Face
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return train_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tok", generated_docs(300), 400)


def test_hf_tokenizer_is_bigscience_autotokenizer(hf_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(hf_dir)
    tok = build_tokenizer(TokenizerConfig("PretrainedFromHF", tokenizer_name_or_path=hf_dir))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == len(reference) == len(tok.vocab)
    assert (tok.eod, tok.pad) == (reference.eos_token_id, reference.pad_token_id) == (2, 3)
    texts = generated_docs(50, seed=1) + ["", "x </s> y", "<s>"]
    assert [tok.tokenize(t) for t in texts] == [reference.encode(t) for t in texts]
    assert tok.encode_batch(texts) == [tok.tokenize(t) for t in texts]
    assert tok.tokenize("x </s>")[-1] == 2  # special tokens in text: HF's default, as BigScience
    assert tok.detokenize(tok.tokenize("the king, café")) == "the king, café"


def test_hf_vocab_extra_ids_are_special_tokens(hf_dir):
    plain = HFTokenizer(hf_dir)
    tok = HFTokenizer(hf_dir, vocab_extra_ids=3)
    assert tok.vocab_size == plain.vocab_size + 3
    extra = tok.vocab["<extra_id_1>"]
    assert extra >= plain.vocab_size
    assert tok.tokenize("a <extra_id_1> b").count(extra) == 1


def test_hf_tokenizer_must_be_a_local_directory(tmp_path):
    with pytest.raises(ConfigError, match="--tokenizer-name-or-path bigscience/bloom: not a local"):
        HFTokenizer("bigscience/bloom")
    with pytest.raises(ConfigError, match=f"--tokenizer-name-or-path {tmp_path}: cannot load"):
        HFTokenizer(str(tmp_path))


# ------------------------------------------------------------------------------------ sentencepiece
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "sp.model", generated_docs(300), 200)


def test_gpt_sentencepiece(sp_model):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    tok = build_tokenizer(TokenizerConfig("GPTSentencePieceTokenizer", tokenizer_model=sp_model))
    assert isinstance(tok, GPTSentencePieceTokenizer)
    assert tok.vocab_size == sp.vocab_size() == 200 == len(tok.vocab)
    assert tok.eod == sp.eos_id() and tok.pad is None  # pad_id() is -1 in this model
    texts = generated_docs(30, seed=2)
    assert tok.encode_batch(texts) == [sp.encode_as_ids(t) for t in texts] == [tok.tokenize(t) for t in texts]
    assert tok.detokenize(tok.tokenize("the king")) == "the king"


def test_gpt_sentencepiece_pad(tmp_path):
    model = train_sentencepiece(tmp_path / "pad.model", generated_docs(300), 200, pad_id=3)
    assert GPTSentencePieceTokenizer(model).pad == 3


def test_megatron_sentencepiece_adds_special_tokens(sp_model):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    n = sp.vocab_size()
    tok = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", tokenizer_model=sp_model,
                                          vocab_extra_ids=2))
    assert isinstance(tok, SentencePieceTokenizer)
    # <CLS> <SEP> <EOD> <MASK> <PAD> are new; <s> and </s> are the model's own; then 2 extra ids.
    assert [tok.vocab[t] for t in ("<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>")] == list(range(n, n + 5))
    assert tok.vocab["<s>"] == sp.bos_id() and tok.vocab["</s>"] == sp.eos_id()
    assert tok.vocab["<extra_id_1>"] == n + 6 and tok.vocab_size == n + 7
    assert tok.eod == n + 2 and tok.pad == n + 4
    ids = tok.tokenize("the king<EOD>queen</s>")
    assert ids == sp.encode_as_ids("the king") + [n + 2] + sp.encode_as_ids("queen") + [sp.eos_id()]
    assert tok.tokenize("plain text") == sp.encode_as_ids("plain text")
    assert tok.detokenize(ids) == "the king <EOD> queen </s> "


def test_sentencepiece_missing_model_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"--tokenizer-model .*absent\.model: file not found"):
        GPTSentencePieceTokenizer(str(tmp_path / "absent.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"junk\.model: not a sentencepiece model"):
        SentencePieceTokenizer(str(tmp_path / "junk.model"))
