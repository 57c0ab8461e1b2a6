"""Shared by the tokenizer / preprocessing tests: generated text, tokenizers trained on the spot,
and an independent pure-Python GPT-2 BPE written from the published algorithm (the reference the
fast tokenizer is checked against)."""
from __future__ import annotations

import io
import json
import os
import random

import regex

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.join(REPO_ROOT, "..", "shared", "fixtures", "megatron")
GPT2_VOCAB = os.path.join(FIXTURE_DIR, "gpt2-tiny-vocab.json")
GPT2_MERGES = os.path.join(FIXTURE_DIR, "gpt2-tiny-merges.txt")

_WORDS = ("the king queen night day love war peace sword crown shall thou thee hath doth "
          "o'er 'tis we'll they're I'm 1599 42 3.14 café naïve Ελλάδα 日本語 ü ß — « » "
          "! ? ; : (aside) [Exit.] HAMLET. Ophelia,").split()


def generated_docs(n: int, seed: int = 0) -> list[str]:
    """n deterministic documents: words, numbers, punctuation, non-Latin scripts, newlines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 60))]
        for k in range(len(words)):
            if rng.random() < 0.08:
                words[k] += rng.choice(["\n", "\n\n", "  ", "\t"])
        docs.append(" ".join(words))
    return docs


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def train_hf_tokenizer(out_dir, texts, vocab_size: int = 400) -> str:
    """A byte-level BPE Hugging Face tokenizer directory, made by tools/train_tokenizer.py."""
    from tools.train_tokenizer import save, train

    save(train(texts, vocab_size), str(out_dir))
    return str(out_dir)


def train_sentencepiece(path, texts, vocab_size: int = 200, **options) -> str:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, num_threads=1, minloglevel=2, **options)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return str(path)


# ------------------------------------------------------------------- reference GPT-2 byte-level BPE
_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def _byte_symbols() -> dict[int, str]:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols = {b: chr(b) for b in keep}
    shifted = [b for b in range(256) if b not in symbols]
    symbols.update({b: chr(256 + k) for k, b in enumerate(shifted)})
    return symbols


class ReferenceGPT2BPE:
    """GPT-2's encoder: regex pre-split, bytes to symbols, then repeatedly merge the lowest-ranked
    adjacent pair everywhere in the word (left to right) until no ranked pair remains."""

    def __init__(self, vocab_file: str, merge_file: str):
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = json.load(f)
        with open(merge_file, encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:-1]]
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.symbols = _byte_symbols()

    def _bpe(self, word: tuple) -> tuple:
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in _PATTERN.findall(text):
            word = tuple(self.symbols[b] for b in piece.encode("utf-8"))
            ids.extend(self.vocab[token] for token in self._bpe(word))
        return ids
