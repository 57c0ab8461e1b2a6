"""The guides keep their promises on paper: no placeholder is left, every link to a file or a
heading resolves, every picture exists, every script in examples/bloom/ is described in the BLOOM
guide and run by a test, and every tool flag the guide's commands use exists."""
import glob
import os
import re
import subprocess
import sys

import pytest

from launch import REPO_ROOT

GUIDES = ["README.md", "examples/bloom/README.md"]


def _read(path: str) -> str:
    with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
        return f.read()


def _prose(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _anchors(path: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+\s+(.*)$", _prose(_read(path)), flags=re.M)}


@pytest.mark.parametrize("guide", GUIDES)
def test_no_placeholder_is_left(guide):
    assert not re.search(r"TODO|XXXX|xxxx|@@", _read(guide))


@pytest.mark.parametrize("guide", GUIDES)
def test_every_link_and_picture_resolves(guide):
    for link in re.findall(r"\]\(([^)\s]+)\)", _prose(_read(guide))):
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        target = os.path.normpath(os.path.join(os.path.dirname(guide), path)) if path else guide
        assert os.path.exists(os.path.join(REPO_ROOT, target)), f"{guide}: {link}"
        if anchor:
            assert anchor in _anchors(target), f"{guide}: {link}"


def test_every_bloom_script_is_in_the_guide_and_run_by_a_test():
    guide = _read("examples/bloom/README.md")
    tests = "".join(_read(os.path.relpath(p, REPO_ROOT))
                    for p in glob.glob(os.path.join(REPO_ROOT, "tests", "test_*.py")))
    scripts = sorted(os.path.basename(p)
                     for p in glob.glob(os.path.join(REPO_ROOT, "examples", "bloom", "*.sh")))
    assert len(scripts) >= 9
    for script in scripts:
        assert f"`{script}`" in guide, script
        assert script in tests.replace(os.path.basename(__file__), ""), script


# The programs the guides' commands run (with python or torchrun), and the flags they give them.
_TOOL_COMMAND = re.compile(r"(?:python|torchrun[^\n]*?) ((?:tools|examples/bloom)/\w+\.py|pretrain_bloom\.py)"
                           r"((?:\\\n|[^\n])*)")


@pytest.mark.multiprocess  # starts each program for its --help
def test_the_guides_flags_exist():
    used: dict[str, set[str]] = {}
    for guide in GUIDES:
        for tool, rest in _TOOL_COMMAND.findall(_read(guide)):
            used.setdefault(tool, set()).update(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest))
    assert {"tools/plan.py", "tools/convert_checkpoint.py", "tools/convert_tp.py",
            "tools/compare_loss.py", "tools/build_dataset_indices.py", "tools/evaluate.py",
            "pretrain_bloom.py", "examples/bloom/generate_bloom.py"} <= set(used)
    for tool, flags in sorted(used.items()):
        result = subprocess.run([sys.executable, tool, "--help"], cwd=REPO_ROOT, text=True,
                                capture_output=True, timeout=120)
        assert result.returncode == 0, f"{tool}: {result.stderr[-500:]}"
        missing = sorted(flag for flag in flags
                         if not re.search(re.escape(flag) + r"(?![\w-])", result.stdout))
        assert not missing, f"{tool} has no {missing}"
