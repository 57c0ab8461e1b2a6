"""Tokenizers with Megatron's interface, and the vocabulary padding rule.

Every tokenizer exposes `vocab_size` (unpadded), `vocab`, `inv_vocab`, `tokenize(text)`,
`detokenize(ids)`, `eod`, `pad` (None when there is none) and `encode_batch(texts)`, the fast path
used by tools/preprocess_data.py. Each one produces the same ids as the Megatron tokenizer of the
same name, so datasets made here and there are interchangeable:

- GPT2BPETokenizer: GPT-2 byte-level BPE from vocab.json + merges.txt (Megatron's `GPT2Tokenizer`),
  run by the Rust `tokenizers` library. `<|endoftext|>` inside a text is split like any other text.
- PretrainedFromHF: a local Hugging Face tokenizer directory (BigScience's `_AutoTokenizer`).
- SentencePieceTokenizer: Megatron-LM's T5/BERT-style wrapper, which adds <CLS> <SEP> <EOD> <MASK>
  (and pad/bos/eos pieces when the model lacks them) after the model's pieces; eod is <EOD>.
- GPTSentencePieceTokenizer: plain sentencepiece ids; eod is the model's eos.
"""
from __future__ import annotations

import json
import os
from functools import cached_property

from ascendspeed.arguments import TokenizerConfig
from ascendspeed.errors import ConfigError


def build_tokenizer(config: TokenizerConfig):
    """The tokenizer `config` describes. Its `vocab_size` is unpadded; see vocab_size_with_padding."""
    kind = config.tokenizer_type
    if kind == "GPT2BPETokenizer":
        return GPT2BPETokenizer(config.vocab_file, config.merge_file)
    if kind == "PretrainedFromHF":
        return HFTokenizer(config.tokenizer_name_or_path, config.vocab_extra_ids)
    if kind == "SentencePieceTokenizer":
        return SentencePieceTokenizer(config.tokenizer_model, config.vocab_extra_ids)
    if kind == "GPTSentencePieceTokenizer":
        return GPTSentencePieceTokenizer(config.tokenizer_model)
    raise ConfigError(f"--tokenizer-type {kind!r} is not supported")  # TokenizerConfig checks first


def vocab_size_with_padding(orig_vocab_size: int, make_vocab_size_divisible_by: int,
                            tensor_model_parallel_size: int, pad_vocab_size_to: int | None = None) -> int:
    """The embedding size: BigScience's rule. Each tensor-parallel rank holds an equal vocab slice,
    so the padded size must split evenly; otherwise round up to keep GPU/NPU-friendly shapes."""
    if tensor_model_parallel_size < 1:
        raise ConfigError(f"--tensor-model-parallel-size must be >= 1, got {tensor_model_parallel_size}")
    if pad_vocab_size_to is not None:
        if pad_vocab_size_to < orig_vocab_size:
            raise ConfigError(f"--pad-vocab-size-to {pad_vocab_size_to} is smaller than the tokenizer's "
                              f"vocabulary ({orig_vocab_size}); it can only pad to a larger size")
        if pad_vocab_size_to % make_vocab_size_divisible_by:
            raise ConfigError(f"--pad-vocab-size-to {pad_vocab_size_to} is not divisible by "
                              f"--make-vocab-size-divisible-by {make_vocab_size_divisible_by}")
        if pad_vocab_size_to % tensor_model_parallel_size:
            raise ConfigError(f"--pad-vocab-size-to {pad_vocab_size_to} is not divisible by "
                              f"--tensor-model-parallel-size {tensor_model_parallel_size}")
        return pad_vocab_size_to
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-orig_vocab_size // multiple) * multiple


def _require_file(path: str | None, flag: str) -> str:
    if path is None or not os.path.isfile(path):
        raise ConfigError(f"{flag} {path}: file not found")
    return path


class AbstractTokenizer:
    """Megatron's tokenizer interface. Subclasses set `name` and implement the abstract parts."""

    name = "tokenizer"

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def vocab(self) -> dict[str, int]:
        raise NotImplementedError

    @cached_property
    def inv_vocab(self) -> dict[int, str]:
        return {i: token for token, i in self.vocab.items()}

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids) -> str:
        raise NotImplementedError

    def encode_batch(self, texts) -> list[list[int]]:
        """Same as tokenize on each text; subclasses override with a faster batched call."""
        return [self.tokenize(text) for text in texts]

    @property
    def eod(self) -> int | None:
        raise NotImplementedError

    @property
    def pad(self) -> int | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, vocab_size={self.vocab_size})"


# ------------------------------------------------------------------------------------ GPT-2 BPE
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character (bytes that are already
    printable map to themselves; the rest are shifted past U+0100)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shift)
            shift += 1
    return dict(zip(printable, map(chr, chars)))


class GPT2BPETokenizer(AbstractTokenizer):
    """GPT-2 byte-level BPE, id for id Megatron's GPT2Tokenizer (no special tokens: a literal
    `<|endoftext|>` in a text is split into ordinary pieces; only `eod` is that token's id)."""

    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        self.name = f"GPT2BPETokenizer({vocab_file})"
        _require_file(vocab_file, "--vocab-file")
        _require_file(merge_file, "--merge-file")
        try:
            with open(vocab_file, encoding="utf-8") as f:
                self._vocab = json.load(f)
        except ValueError as error:
            raise ConfigError(f"--vocab-file {vocab_file}: not a JSON vocabulary ({error})") from error
        if not isinstance(self._vocab, dict):
            raise ConfigError(f"--vocab-file {vocab_file}: expected a JSON object token -> id")
        if self.EOD_TOKEN not in self._vocab:
            raise ConfigError(f"--vocab-file {vocab_file}: has no {self.EOD_TOKEN} token (the eod)")
        missing = [c for c in _bytes_to_unicode().values() if c not in self._vocab]
        if missing:
            # Megatron would fail with a KeyError on the first text holding such a byte.
            raise ConfigError(f"--vocab-file {vocab_file}: not a byte-level BPE vocabulary; "
                              f"{len(missing)} of the 256 byte symbols are missing")
        with open(merge_file, encoding="utf-8") as f:
            # Megatron drops the first line (the "#version" header) and the last one (empty after
            # the final newline); doing the same keeps the merge ranks, hence the ids, identical.
            lines = f.read().split("\n")[1:-1]
        merges = [tuple(line.split()) for line in lines if line.split()]
        bad = next((m for m in merges if len(m) != 2 or m[0] + m[1] not in self._vocab), None)
        if bad is not None:
            raise ConfigError(f"--merge-file {merge_file}: merge {' '.join(bad)!r} does not make a "
                              f"token of --vocab-file {vocab_file}")
        self._tokenizer = Tokenizer(models.BPE(vocab=self._vocab, merges=merges))
        # GPT-2's split regex, without the leading space that add_prefix_space would insert.
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self._tokenizer.decoder = decoders.ByteLevel()
        self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list[list[int]]:
        # encode_batch_fast skips the offsets nobody here needs (tokenizers >= 0.20).
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def detokenize(self, ids) -> str:
        # Megatron's exact rule: map ids to their byte symbols, then decode the bytes with errors
        # replaced (a document cut mid-character still decodes).
        text = "".join(self.inv_vocab[int(i)] for i in ids)
        return bytes(self._byte_decoder[c] for c in text).decode("utf-8", errors="replace")

    @property
    def eod(self) -> int:
        return self._vocab[self.EOD_TOKEN]


# ------------------------------------------------------------------------------------ Hugging Face
class HFTokenizer(AbstractTokenizer):
    """A local Hugging Face tokenizer directory (`--tokenizer-type PretrainedFromHF`), used exactly as
    BigScience trained BLOOM: ids = `encode(text)` with the tokenizer's own special-token handling."""

    def __init__(self, path: str, vocab_extra_ids: int = 0):
        from transformers import AutoTokenizer

        self.name = f"PretrainedFromHF({path})"
        if path is None or not os.path.isdir(path):
            # Never a hub download: training machines are often offline, and a silent download
            # of a different revision would change the ids.
            raise ConfigError(f"--tokenizer-name-or-path {path}: not a local tokenizer directory")
        kwargs = {}
        if vocab_extra_ids > 0:
            kwargs["additional_special_tokens"] = [f"<extra_id_{i}>" for i in range(vocab_extra_ids)]
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
        except (OSError, ValueError) as error:
            raise ConfigError(f"--tokenizer-name-or-path {path}: cannot load a tokenizer there "
                              f"({error})") from error

    @property
    def hf_tokenizer(self):
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)  # includes added tokens, unlike .vocab_size

    @cached_property
    def vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab()

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def encode_batch(self, texts) -> list[list[int]]:
        # A fast tokenizer encodes the whole batch in one Rust call; the ids equal encode()'s.
        return self._tokenizer(list(texts), return_attention_mask=False,
                               return_token_type_ids=False)["input_ids"]

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode(ids)

    @property
    def eod(self) -> int | None:
        return self._tokenizer.eos_token_id

    @property
    def pad(self) -> int | None:
        return self._tokenizer.pad_token_id


# ------------------------------------------------------------------------------------ sentencepiece
def _load_sentencepiece(model_file: str):
    import sentencepiece

    _require_file(model_file, "--tokenizer-model")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=model_file)
    except (OSError, RuntimeError) as error:
        raise ConfigError(f"--tokenizer-model {model_file}: not a sentencepiece model ({error})") from error


class GPTSentencePieceTokenizer(AbstractTokenizer):
    """Plain sentencepiece ids (Megatron-LM's GPTSentencePieceTokenizer): eod is the model's eos."""

    def __init__(self, model_file: str):
        self.name = f"GPTSentencePieceTokenizer({model_file})"
        self._sp = _load_sentencepiece(model_file)

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @cached_property
    def vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self._sp.vocab_size())}

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode_as_ids(text)

    def encode_batch(self, texts) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def detokenize(self, ids) -> str:
        return self._sp.decode_ids([int(i) for i in ids])

    @property
    def eod(self) -> int | None:
        return None if self._sp.eos_id() < 0 else self._sp.eos_id()

    @property
    def pad(self) -> int | None:
        return None if self._sp.pad_id() < 0 else self._sp.pad_id()


class SentencePieceTokenizer(AbstractTokenizer):
    """Megatron-LM's SentencePieceTokenizer: the model's pieces, then <CLS> <SEP> <EOD> <MASK>, the
    pad/bos/eos pieces (<PAD>/<BOS>/<EOS> when the model has none) and <extra_id_N>, each added at
    the end of the vocabulary unless the model already has it. Those special tokens are recognised
    inside texts; `eod` is <EOD>."""

    def __init__(self, model_file: str, vocab_extra_ids: int = 0):
        self.name = f"SentencePieceTokenizer({model_file})"
        self._sp = _load_sentencepiece(model_file)
        self._vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.vocab_size())}
        self._special: dict[str, int] = {}
        for token in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"):
            self._add_special(token)
        for model_id, fallback in ((self._sp.pad_id(), "<PAD>"), (self._sp.bos_id(), "<BOS>"),
                                   (self._sp.eos_id(), "<EOS>")):
            self._add_special(self._sp.id_to_piece(model_id) if model_id >= 0 else fallback)
        self._pad_id = self._special[self._sp.id_to_piece(self._sp.pad_id())
                                     if self._sp.pad_id() >= 0 else "<PAD>"]
        for i in range(vocab_extra_ids):
            self._add_special(f"<extra_id_{i}>")
        self._inv_special = {i: token for token, i in self._special.items()}

    def _add_special(self, token: str) -> None:
        if token not in self._vocab:
            self._vocab[token] = len(self._vocab)
        self._special[token] = self._vocab[token]

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    def tokenize(self, text: str) -> list[int]:
        # Cut the text at each special token (the earliest first); encode the pieces between.
        ids: list[int] = []
        start = 0
        while True:
            found = [(text.find(token, start), token) for token in self._special]
            found = [(pos, token) for pos, token in found if pos >= 0]
            if not found:
                break
            pos, token = min(found, key=lambda item: item[0])  # ties: first added wins
            ids.extend(self._sp.encode_as_ids(text[start:pos]))
            ids.append(self._special[token])
            start = pos + len(token)
        ids.extend(self._sp.encode_as_ids(text[start:]))
        return ids

    def detokenize(self, ids) -> str:
        ids = [int(i) for i in ids]
        text, last = "", 0
        for k, i in enumerate(ids):
            if i in self._inv_special:
                text += self._sp.decode_ids(ids[last:k]) + " " + self._inv_special[i] + " "
                last = k + 1
        return text + self._sp.decode_ids(ids[last:])

    @property
    def eod(self) -> int:
        return self._special["<EOD>"]

    @property
    def pad(self) -> int:
        return self._pad_id
