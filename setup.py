"""Builds fastperturb and its compiled extension fastperturb._C.

The sources come from csrc/sources.txt and the compiler flags from
csrc/flags.txt, the files CMakeLists.txt reads too. Build with the torch you
run: `pip install --no-build-isolation .` (or `-e .`).

Environment switches (all read at build time):

* FASTPERTURB_CUDA: the [cuda] sources are compiled when torch is a CUDA build
  and nvcc is found (CUDA_HOME), or when FASTPERTURB_CUDA=1; FASTPERTURB_CUDA=0
  builds the CPU kernels only. A toolkit home without nvcc or the runtime
  headers (torch guesses it from an nvcc wrapper on PATH) is refused by name.
* TORCH_CUDA_ARCH_LIST: torch's, read as torch reads it; the CUDA kernels need
  compute capability 7.0 or newer, so an older entry (or visible GPU) is refused
  with a message. Unset on a machine without a GPU: torch's own architectures
  from 7.0 on.
* FASTPERTURB_BUILD_TESTING=1: also build fastperturb._C_testing from the
  [testing] sources (the native test harnesses the test suite needs). Never
  set for the wheel users install.
* FASTPERTURB_WERROR=1: compiler warnings are errors (the [*-werror] flags;
  CI sets it, users' builds never get it).
"""

from __future__ import annotations

import os
import re
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
    import torch

    if forced and torch.version.cuda is None:
        # (torch's own error here blames CUDA_HOME, set or not: a CPU build of torch never has one)
        raise SystemExit(
            f"fastperturb: FASTPERTURB_CUDA=1 needs a CUDA build of torch; this one is {torch.__version__} "
            "(install a CUDA wheel of torch, or build without FASTPERTURB_CUDA)"
        )
    if forced is False:
        return False
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if torch.version.cuda is None or (home is None and not forced):
        return False
    problem = toolkit_problem(home)
    if problem is not None:
        # (else the build failed later, in the middle of compiling, on a missing cuda_runtime.h)
        fix = "set CUDA_HOME to a complete CUDA toolkit"
        if home != "/usr/local/cuda" and toolkit_problem("/usr/local/cuda") is None:
            fix += " (/usr/local/cuda is one)"
        raise SystemExit(
            f"fastperturb: torch {torch.__version__} is a CUDA build, so the CUDA kernels would be compiled, but "
            f"{problem}; {fix} to compile them, or build with FASTPERTURB_CUDA=0 for the CPU kernels only"
        )
    return True


def toolkit_problem(home: str | None) -> str | None:
    """Why ``home`` (torch's CUDA_HOME: CUDA_HOME or CUDA_PATH, else the parent of the nvcc on PATH, else
    /usr/local/cuda) is not a CUDA toolkit the build can use, or None. An nvcc wrapper script elsewhere on PATH
    makes torch guess a home without the compiler or the runtime headers beside it."""
    if home is None:
        return "no CUDA toolkit was found (CUDA_HOME unset and no nvcc on PATH)"
    root, missing = Path(home), []
    if not any((root / "bin" / n).is_file() for n in ("nvcc", "nvcc.exe")):
        missing.append("bin/nvcc")
    # Where torch's cpp_extension looks, a conda toolkit's targets/<arch>/include, the compiler's own search paths
    # (CPATH, CPLUS_INCLUDE_PATH) and the system's: no build that would compile is refused.
    headers = [root / "include", *root.glob("targets/*/include"), Path("/usr/include")]
    for var in ("CUDA_INC_PATH", "CPATH", "CPLUS_INCLUDE_PATH"):
        headers += [Path(d) for d in os.environ.get(var, "").split(os.pathsep) if d]
    if not any((d / "cuda_runtime.h").is_file() for d in headers):
        missing.append("include/cuda_runtime.h")
    if missing:
        return (
            f"the CUDA toolkit home {home} (CUDA_HOME or CUDA_PATH, or guessed from the nvcc on PATH) has no "
            f"{' or '.join(missing)}"
        )
    return None


ARCH_HEADER = "csrc/include/fastperturb/worklist/launch_args.h"


def _min_cuda_arch() -> tuple[int, int]:
    """The oldest GPU architecture the CUDA kernels compile for, from its one definition in ARCH_HEADER (whose
    ``#error`` stops a build by other means): they take their launch arguments as ``__grid_constant__``
    parameters."""
    found = re.search(
        r"^\s*#\s*define\s+FASTPERTURB_MIN_CUDA_ARCH\s+\(?\s*(\d+)", (ROOT / ARCH_HEADER).read_text(), re.M
    )
    if found is None:
        raise RuntimeError(f"{ARCH_HEADER} does not define FASTPERTURB_MIN_CUDA_ARCH")
    return divmod(int(found.group(1)) // 10, 10)


MIN_CUDA_ARCH = _min_cuda_arch()
_NAMED_ARCHS = {"kepler": "3.5", "maxwell": "5.0", "pascal": "6.0", "volta": "7.0", "turing": "7.5"}


def _arch_name(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def _arch_version(entry: str) -> tuple[int, int] | None:
    """(major, minor) of a TORCH_CUDA_ARCH_LIST entry ("8.6", "7.5+PTX", "Pascal") or of a torch arch name
    ("sm_86", "compute_90"); None for names newer than any refused here (Ampere, Ada, Hopper, ...)."""
    e = entry.strip().lower().split("+")[0]
    e = _NAMED_ARCHS.get(e, e)
    if e.startswith(("sm_", "compute_")):
        digits = e.split("_", 1)[1].rstrip("abf")
        e = f"{digits[:-1]}.{digits[-1]}" if len(digits) >= 2 and digits.isdigit() else ""
    major, _, minor = e.partition(".")
    if not (major.isdigit() and minor[:1].isdigit()):
        return None
    return int(major), int(minor[0])


def cuda_arch_plan(
    arch_list: str | None, visible: list[tuple[int, int]], torch_archs: list[str]
) -> tuple[str | None, str | None]:
    """(TORCH_CUDA_ARCH_LIST to set or None, error or None) for a CUDA build.

    ``arch_list``: the user's TORCH_CUDA_ARCH_LIST (None if unset); ``visible``: the compute capabilities of the
    visible GPUs; ``torch_archs``: ``torch.cuda.get_arch_list()``, the architectures torch itself was built for.
    An architecture older than MIN_CUDA_ARCH that the user or the GPU asks for is an error (the kernels could
    not run there). With neither (no GPU on the build machine, where torch's extension builder finds no
    architecture to compile for), the list is torch's own without the architectures older than that."""
    floor = _arch_name(MIN_CUDA_ARCH)
    if arch_list is not None and arch_list.strip() not in ("", "native"):
        old = [
            e for e in arch_list.replace(";", " ").split() if (v := _arch_version(e)) is not None and v < MIN_CUDA_ARCH
        ]
        if old:
            return None, (
                f"TORCH_CUDA_ARCH_LIST={arch_list!r} names {', '.join(old)}: fastperturb's CUDA kernels need compute "
                f"capability {floor} or newer; drop those entries (or build without CUDA: FASTPERTURB_CUDA=0)"
            )
        return None, None
    if visible:
        old = sorted({v for v in visible if v < MIN_CUDA_ARCH})
        if old:
            names = ", ".join(map(_arch_name, old))
            return None, (
                f"the visible GPU has compute capability {names}: fastperturb's CUDA kernels need {floor} or newer; "
                "build without CUDA (FASTPERTURB_CUDA=0) or set TORCH_CUDA_ARCH_LIST to newer architectures"
            )
        return None, None
    versions = [v for v in map(_arch_version, torch_archs) if v is not None]
    if not versions:
        return None, None  # (torch's builder then says what it needs)
    keep = sorted({v for v in versions if v >= MIN_CUDA_ARCH})
    if not keep:
        return None, f"this torch is built only for CUDA architectures older than {floor}: {torch_archs}"
    return ";".join(map(_arch_name, keep)), None


def _set_cuda_archs() -> None:
    """Checks (and, with neither TORCH_CUDA_ARCH_LIST nor a GPU to say, chooses) the architectures."""
    import torch

    visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    archs, error = cuda_arch_plan(os.environ.get("TORCH_CUDA_ARCH_LIST"), visible, torch.cuda.get_arch_list())
    if error is not None:
        raise SystemExit(f"fastperturb: {error}")
    if archs is not None:
        print(
            f"fastperturb: no GPU and no TORCH_CUDA_ARCH_LIST: building the CUDA kernels for {archs} (torch's own "
            f"architectures from {_arch_name(MIN_CUDA_ARCH)} on)"
        )
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs


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
        _set_cuda_archs()
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

    try:
        from torch.utils.cpp_extension import BuildExtension
    except ModuleNotFoundError as e:  # pip install --no-build-isolation . into an environment without torch
        raise SystemExit(
            f"fastperturb: the extension is built against the torch it will run with, and none is importable here "
            f"({e}); install torch first (pip install torch==2.13.0), then pip install --no-build-isolation ."
        ) from None

    # metadata and packages: pyproject.toml
    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )
