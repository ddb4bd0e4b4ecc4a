"""Builds fastperturb and its compiled extension fastperturb._C.

The sources come from csrc/sources.txt and the compiler flags from
csrc/flags.txt, the files CMakeLists.txt reads too. Build with the torch you
run: `pip install --no-build-isolation .` (or `-e .`).

Environment switches (all read at build time):

* FASTPERTURB_CUDA: the [cuda] sources are compiled when torch is a CUDA build
  and nvcc is found (CUDA_HOME), or when FASTPERTURB_CUDA=1; FASTPERTURB_CUDA=0
  builds the CPU kernels only.
* FASTPERTURB_BUILD_TESTING=1: also build fastperturb._C_testing from the
  [testing] sources (the native test harnesses the test suite needs). Never
  set for the wheel users install.
* FASTPERTURB_WERROR=1: compiler warnings are errors (the [*-werror] flags;
  CI sets it, users' builds never get it).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SOURCES_FILE = "csrc/sources.txt"
FLAGS_FILE = "csrc/flags.txt"


def read_sections(path: str, root: Path = ROOT) -> dict[str, list[str]]:
    """The ``[section]``s of a list file (one entry a line, '#' comments): {section: [lines]}."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in (root / path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
            sections.setdefault(current, [])
            continue
        if current is None:
            raise ValueError(f"{path}: {line!r} comes before any [section]")
        sections[current].append(line)
    return sections


def read_sources(root: Path = ROOT) -> dict[str, list[str]]:
    """The sections of csrc/sources.txt: {"cpu": [...], "cuda": [...], "testing": [...]} (paths relative to root)."""
    sections = read_sections(SOURCES_FILE, root)
    for path in (p for ps in sections.values() for p in ps):
        if not (root / path).is_file():
            raise FileNotFoundError(f"{SOURCES_FILE} lists {path}, which does not exist")
    return sections


def _switch(name: str) -> bool | None:
    """An environment switch: True for 1, False for 0, None when unset."""
    env = os.environ.get(name, "").strip()
    if env in ("0", "1"):
        return env == "1"
    if env:
        raise ValueError(f"{name} must be 0 or 1, got {env!r}")
    return None


def werror_enabled() -> bool:
    """Whether warnings are errors (FASTPERTURB_WERROR=1; CI only)."""
    return _switch("FASTPERTURB_WERROR") is True


def testing_enabled() -> bool:
    """Whether to build fastperturb._C_testing (FASTPERTURB_BUILD_TESTING=1)."""
    return _switch("FASTPERTURB_BUILD_TESTING") is True


def read_flags(werror: bool | None = None, root: Path = ROOT) -> dict[str, list[str]]:
    """Compiler and linker flags from csrc/flags.txt: {"cxx": [...], "nvcc": [...], "link": [...]},
    with the [*-werror] sections added when ``werror`` (default: :func:`werror_enabled`)."""
    sections = read_sections(FLAGS_FILE, root)
    werror = werror_enabled() if werror is None else werror
    out = {}
    for kind in ("cxx", "nvcc", "link"):
        lines = sections.get(kind, []) + (sections.get(f"{kind}-werror", []) if werror else [])
        out[kind] = [tok for line in lines for tok in shlex.split(line)]
    return out


def cuda_enabled() -> bool:
    """Whether to compile the [cuda] sources (see the module docstring)."""
    forced = _switch("FASTPERTURB_CUDA")
    if forced is not None:
        return forced
    import torch
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension_sources(cuda: bool) -> list[str]:
    """What goes into fastperturb._C: the [cpu] sources, plus [cuda] when cuda."""
    sections = read_sources()
    return sections.get("cpu", []) + (sections.get("cuda", []) if cuda else [])


def _include_dirs() -> list[str]:
    return [str(ROOT / "csrc" / "include"), str(ROOT / "csrc")]


def make_extension():
    """fastperturb._C: the ops, their CPU kernels and (when CUDA is enabled) the CUDA kernels."""
    from torch.utils import cpp_extension

    cuda = cuda_enabled()
    flags = read_flags()
    kwargs = dict(
        name="fastperturb._C",
        sources=extension_sources(cuda),
        include_dirs=_include_dirs(),
        extra_compile_args={"cxx": flags["cxx"], "nvcc": flags["nvcc"]},
        extra_link_args=flags["link"],
    )
    if cuda:
        kwargs["define_macros"] = [("FASTPERTURB_WITH_CUDA", "1")]
        return cpp_extension.CUDAExtension(**kwargs)
    return cpp_extension.CppExtension(**kwargs)


def make_testing_extension():
    """fastperturb._C_testing: the native test harnesses (the CPU executor of the CUDA work list)."""
    from torch.utils import cpp_extension

    flags = read_flags()
    return cpp_extension.CppExtension(
        name="fastperturb._C_testing",
        sources=read_sources().get("testing", []),
        include_dirs=_include_dirs(),
        extra_compile_args={"cxx": flags["cxx"]},
        extra_link_args=flags["link"],
    )


def extensions() -> list:
    """The extension modules this build makes (see the module docstring)."""
    return [make_extension()] + ([make_testing_extension()] if testing_enabled() else [])


if __name__ == "__main__":
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension

    # metadata and packages: pyproject.toml
    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )
