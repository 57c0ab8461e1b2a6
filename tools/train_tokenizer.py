"""Train a small byte-level BPE tokenizer on a JSON-lines corpus and save it as a Hugging Face
tokenizer directory, usable with `--tokenizer-type PretrainedFromHF --tokenizer-name-or-path DIR`.

    python tools/train_tokenizer.py --input data/shakespeare/shakespeare.jsonl \
        --vocab-size 8000 --output-dir data/shakespeare/tokenizer

Special tokens sit where BLOOM has them: <unk> 0, <s> 1, </s> 2 (eos, the eod), <pad> 3. Nothing is
added around a text by encode(), as with BLOOM; preprocess_data.py --append-eod adds the </s>.
The same input always gives the same files. The directory appears complete or not at all.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.errors import AscendSpeedError, PreprocessError, error_line  # noqa: E402

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def iter_texts(path: str, json_keys):
    """Every value of `json_keys` in a JSON-lines file, in order."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise PreprocessError(f"{path}:{lineno}: not valid JSON ({error})") from error
            for key in json_keys:
                value = record.get(key) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    raise PreprocessError(f"{path}:{lineno}: expected a string under key {key!r}")
                yield value


def train(texts, vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))  # byte-level: every byte has a token
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save(tokenizer, output_dir: str) -> None:
    """Write a Hugging Face tokenizer directory, swapping it in only once complete."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>", pad_token="<pad>")
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    try:
        hf.save_pretrained(tmp)
        _portable_config(os.path.join(tmp, "tokenizer_config.json"))
        old = None
        if os.path.exists(output_dir):
            old = tempfile.mkdtemp(prefix=".tokenizer-old-", dir=parent)
            os.rename(output_dir, os.path.join(old, "dir"))
        os.rename(tmp, output_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _portable_config(path: str) -> None:
    """Name the class every transformers version knows (4.x has no "TokenizersBackend")."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="JSON-lines corpus, one object per line")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    if args.vocab_size <= 256 + len(SPECIAL_TOKENS):
        parser.error(f"--vocab-size {args.vocab_size} must exceed the 256 bytes + "
                     f"{len(SPECIAL_TOKENS)} special tokens")
    if not os.path.isfile(args.input):
        print(f"error: --input {args.input}: file not found", file=sys.stderr)
        return 2
    try:
        tokenizer = train(iter_texts(args.input, args.json_keys), args.vocab_size)
    except AscendSpeedError as error:
        print(error_line(error), file=sys.stderr)
        return 2
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, (token, tokenizer.token_to_id(token))
    save(tokenizer, args.output_dir)
    print(f"wrote {args.output_dir}: {tokenizer.get_vocab_size()} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
