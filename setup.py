"""Installs ascendspeed, megatron_ext and tools, and compiles csrc/ at install time:

- ascendspeed._C: the dataset index helpers (pybind11, no torch dependency);
- ascendspeed._attn_{default,avx2,avx512}: the fused ALiBi attention kernel
  (csrc/alibi_attention.cpp) against torch's headers and libraries, once per CPU capability:
  baseline x86-64 code, AVX2 and AVX-512 (ATen's at::vec picks its implementation from
  CPU_CAPABILITY). ascendspeed/model/fused.py imports the one torch's CPU capability allows.

A compiler failure stops the install with a message that says what is missing; there is no
silent pure-Python fallback.
"""
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import find_packages, setup
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError
from torch.utils.cpp_extension import BuildExtension, CppExtension


COMPILER_FAILURES = (CCompilerError, CompileError, ExecError, LinkError, PlatformError,
                     subprocess.CalledProcessError, OSError)


def _stop(what: str, error: BaseException):
    sys.stderr.write(
        f"\nerror: AscendSpeed could not compile its native helpers ({what}): {error}\n"
        "They need a C++17 compiler (g++) and the Python development headers "
        "(e.g. `apt-get install g++ python3-dev`).\n\n")
    raise SystemExit(1) from error


class BuildNativeOrFail(BuildExtension):
    def build_extensions(self):
        try:  # torch's BuildExtension first asks the compiler for its version (ABI check)
            super().build_extensions()
        except COMPILER_FAILURES as error:
            _stop(", ".join(ext.name for ext in self.extensions), error)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except COMPILER_FAILURES as error:
            _stop(f"{ext.name} from {', '.join(ext.sources)}", error)


native = Pybind11Extension(
    "ascendspeed._C",
    sources=["csrc/dataset_helpers.cpp"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

# CPU capability -> extra compiler flags (those ATen builds its own AVX2 / AVX-512 kernels with).
_ATTENTION_VARIANTS = {
    "default": ("csrc/alibi_attention.cpp", []),
    "avx2": ("csrc/alibi_attention_avx2.cpp", ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"]),
    "avx512": ("csrc/alibi_attention_avx512.cpp",
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                "-mbmi", "-mbmi2"]),
}
attention = [
    CppExtension(
        f"ascendspeed._attn_{name}",
        sources=[source],
        depends=["csrc/alibi_attention.cpp"],
        extra_compile_args=["-O3", f"-DCPU_CAPABILITY={name.upper()}"]
        + ([f"-DCPU_CAPABILITY_{name.upper()}"] if flags else []) + flags,
    )
    for name, (source, flags) in _ATTENTION_VARIANTS.items()
]

setup(
    name="ascendspeed",
    version="0.1.0",
    description="Megatron-style pretraining of BLOOM with tensor, pipeline and data parallelism",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ascendspeed", "ascendspeed.*", "megatron_ext", "megatron_ext.*",
                                    "tools", "tools.*"]),
    ext_modules=[native, *attention],
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
