"""Build script. Metadata lives in pyproject.toml; this file builds the native extension.

reflexflow._C (csrc/): a CppExtension, or a CUDAExtension when torch is a CUDA build,
CUDA_HOME is set and a GPU is visible (or REFLEXFLOW_FORCE_CUDA=1). The build is
optional: if it fails, the package installs without it and falls back at run time
(JIT build, else the pure-PyTorch engine). REFLEXFLOW_NO_EXT=1 skips it.

Every build (wheel, plain ``pip install .``) also ships the extension's sources as
package data, reflexflow/_csrc/, so that the JIT build on first use works outside a
checkout too (reflexflow.native looks there when there is no checkout csrc/).
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CSRC_SUFFIXES = (".cpp", ".h", ".cu")


class BuildPyWithSources(build_py):
    """build_py, plus csrc/'s C++/CUDA sources copied into the built reflexflow/_csrc/."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's csrc/
        dest = Path(self.build_lib) / "reflexflow" / "_csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted((HERE / "csrc").iterdir()):
            if src.suffix in CSRC_SUFFIXES:
                shutil.copy2(src, dest / src.name)


def _extensions() -> dict:
    if os.environ.get("REFLEXFLOW_NO_EXT") == "1":
        return {"cmdclass": {"build_py": BuildPyWithSources}}
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
        )
    except ImportError:  # torch not installed yet: pure-Python package
        return {"cmdclass": {"build_py": BuildPyWithSources}}
    sources = ["csrc/ops.cpp", "csrc/rollout.cpp"]
    flags = {"cxx": ["-O3", "-ffp-contract=off"]}
    use_cuda = (
        bool(torch.version.cuda)
        and CUDA_HOME is not None
        and (torch.cuda.is_available() or os.environ.get("REFLEXFLOW_FORCE_CUDA") == "1")
    )
    if use_cuda:
        flags["nvcc"] = ["-O3", "--fmad=false"]
        ext = CUDAExtension(
            "reflexflow._C", sources + ["csrc/rollout_cuda.cu"], extra_compile_args=flags
        )
    else:
        ext = CppExtension("reflexflow._C", sources, extra_compile_args=flags)
    ext.optional = True  # a failed build warns and installs without it

    class OptionalBuild(BuildExtension.with_options(use_ninja=True)):
        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
            except Exception as err:  # ninja/compiler errors are not distutils errors
                if not getattr(ext, "optional", False):
                    raise
                print(
                    f"WARNING: reflexflow: building {ext.name} failed ({err}); installing "
                    "without it (it is JIT-built on first use, else the pure-PyTorch "
                    "rollout engine runs)",
                    file=sys.stderr,
                )

    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": OptionalBuild, "build_py": BuildPyWithSources},
    }


setup(**_extensions())
