"""Builds fastperturb and its compiled extension fastperturb._C.

The sources come from csrc/sources.txt, the one list CMakeLists.txt reads too.
Build with the torch you run: `pip install --no-build-isolation .` (or `-e .`).

CUDA kernels: the [cuda] section of csrc/sources.txt is compiled when torch is
a CUDA build and nvcc is found (CUDA_HOME), or when FASTPERTURB_CUDA=1; set
FASTPERTURB_CUDA=0 to build the CPU kernels only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SOURCES_FILE = "csrc/sources.txt"


def read_sources(root: Path = ROOT) -> dict[str, list[str]]:
    """The sections of csrc/sources.txt: {"cpu": [...], "cuda": [...]} (paths relative to root)."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in (root / SOURCES_FILE).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
            sections.setdefault(current, [])
            continue
        if current is None:
            raise ValueError(f"{SOURCES_FILE}: {line!r} comes before any [section]")
        sections[current].append(line)
    for path in (p for ps in sections.values() for p in ps):
        if not (root / path).is_file():
            raise FileNotFoundError(f"{SOURCES_FILE} lists {path}, which does not exist")
    return sections


def cuda_enabled() -> bool:
    """Whether to compile the [cuda] sources (see the module docstring)."""
    env = os.environ.get("FASTPERTURB_CUDA", "").strip()
    if env in ("0", "1"):
        return env == "1"
    if env:
        raise ValueError(f"FASTPERTURB_CUDA must be 0 or 1, got {env!r}")
    import torch
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension_sources(cuda: bool) -> list[str]:
    """What goes into fastperturb._C: the [cpu] sources, plus [cuda] when cuda."""
    sections = read_sources()
    return sections.get("cpu", []) + (sections.get("cuda", []) if cuda else [])


# nvcc: warnings are errors (front end, ptxas and the host compiler), and no
# fused multiply-adds, like the host build's -ffp-contract=off, so the CUDA
# kernels round element by element exactly as the reference and the CPU
# work-list executor (csrc/cuda/README.md).
NVCC_FLAGS = ["-O3", "--fmad=false", "-Werror", "all-warnings", "-Xcompiler=-Wall,-Wextra,-Werror"]


def make_extension():
    from torch.utils import cpp_extension

    cuda = cuda_enabled()
    # -g0: Python's CFLAGS add -g. -ffp-contract=off: no fused multiply-adds,
    # so every kernel variant rounds like the reference. -fopenmp: the
    # at::parallel_for of this ATen build is inlined OpenMP (libgomp comes
    # with torch and is already loaded).
    cxx = ["-O3", "-g0", "-ffp-contract=off", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    kwargs = dict(
        name="fastperturb._C",
        sources=extension_sources(cuda),
        include_dirs=[str(ROOT / "csrc" / "include"), str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS},
        extra_link_args=["-fopenmp"],
    )
    if cuda:
        kwargs["define_macros"] = [("FASTPERTURB_WITH_CUDA", "1")]
        return cpp_extension.CUDAExtension(**kwargs)
    return cpp_extension.CppExtension(**kwargs)


if __name__ == "__main__":
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension

    # metadata and packages: pyproject.toml
    setup(
        ext_modules=[make_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )
