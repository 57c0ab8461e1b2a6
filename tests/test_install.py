"""The native helpers are part of the install: built and importable, and a compiler failure is a
clear install error rather than a silent fallback."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def test_native_module_is_built():
    from ascendspeed import _C

    assert hasattr(_C, "legacy_shuffle") and hasattr(_C, "build_sample_idx")


@pytest.mark.multiprocess
def test_compiler_failure_stops_the_build_with_a_clear_message(tmp_path):
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO_ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(REPO_ROOT, "csrc"), tmp_path / "csrc")
    (tmp_path / "ascendspeed").mkdir()
    env = dict(os.environ, CC="/bin/false", CXX="/bin/false")
    result = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "could not compile its native helpers" in result.stderr
    assert "C++17 compiler (g++)" in result.stderr
    assert not list((tmp_path / "ascendspeed").glob("_C*"))
