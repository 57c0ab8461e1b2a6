"""Installs ascendspeed, megatron_ext and tools, and compiles csrc/ into ascendspeed._C.

A compiler failure stops the install with a message that says what is missing; there is no
silent pure-Python fallback.
"""
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError


class BuildNativeOrFail(build_ext):
    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except (CCompilerError, CompileError, ExecError, LinkError, PlatformError) as error:
            sys.stderr.write(
                f"\nerror: AscendSpeed could not compile its native helpers ({ext.name} from "
                f"{', '.join(ext.sources)}): {error}\n"
                "They need a C++17 compiler (g++) and the Python development headers "
                "(e.g. `apt-get install g++ python3-dev`).\n\n")
            raise SystemExit(1) from error


native = Pybind11Extension(
    "ascendspeed._C",
    sources=["csrc/dataset_helpers.cpp"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    name="ascendspeed",
    version="0.1.0",
    description="Megatron-style pretraining of BLOOM with tensor, pipeline and data parallelism",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ascendspeed", "ascendspeed.*", "megatron_ext", "megatron_ext.*",
                                    "tools", "tools.*"]),
    ext_modules=[native],
    cmdclass={"build_ext": BuildNativeOrFail},
    install_requires=[
        "torch==2.13.0",
        "numpy>=1.23",
        "tokenizers>=0.15",
        "transformers>=4.40",
        "sentencepiece",
        "regex",
        "safetensors",
        "zstandard",
        "pybind11>=2.10",  # also what setup.py builds csrc/ with
        "tensorboard",  # --tensorboard-dir
        "flask>=3.0",  # tools/run_text_generation_server.py
    ],
    # lm-evaluation-harness for ascendspeed.evaluation.lm_eval_adapter (large: datasets, pandas, ...)
    extras_require={"test": ["pytest>=7"], "eval": ["lm_eval==0.4.13"]},
)
