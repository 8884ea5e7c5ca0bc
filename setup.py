"""Builds emu_fast._C through CMakeLists.txt with ninja.

`pip install --no-build-isolation -e .` (or `pip install --no-build-isolation .`) needs torch,
pybind11, ninja, cmake and numpy already installed. The CMake build tree lives in
build/cmake-<python>-<torch> so that ninja rebuilds only what changed.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
        build_dir = ROOT / "build" / f"cmake-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE=Release",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        ]
        if os.environ.get("EMU_FAST_WITH_CUDA") is not None:
            cfg.append(f"-DEMU_FAST_WITH_CUDA={os.environ['EMU_FAST_WITH_CUDA']}")
        subprocess.check_call(cfg)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", str(build_dir), "--", f"-j{jobs}"])


setup(
    name="emu_fast",
    version="0.1.0",
    description="Fast KV-cached image-embedding generation for BAAI Emu models",
    packages=find_packages(include=["emu_fast", "emu_fast.*"]),
    # The real Emu tokenizer, so emu_fast.testing's tiny models (tests, benchmark, README
    # examples) need nothing beside the package.
    package_data={"emu_fast": ["data/emu1_tokenizer/*.json"]},
    ext_modules=[CMakeExtension("emu_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    zip_safe=False,
)
