"""Loads the compiled extension (which registers the ``fastperturb::`` ops)."""

from __future__ import annotations

from pathlib import Path

import torch

load_error: Exception | None = None
try:
    from .. import _C  # noqa: F401  (registers torch.ops.fastperturb.*)
except Exception as e:  # ImportError, or an ABI mismatch with this torch
    load_error = e


def _source_checkout_error(package: Path) -> ImportError | None:
    """The common newcomer's case, said as it is: Python imported the checkout's ``fastperturb/`` (the current
    directory comes first on its path), which has no compiled extension, while ``pip install .`` put the built one
    in site-packages (Python's own message blames a circular import). ``package``: the imported package's folder."""
    if any(package.glob("_C*.so")) or any(package.glob("_C*.pyd")) or not (package.parent / "setup.py").is_file():
        return None
    return ImportError(
        f"fastperturb was imported from the source checkout {package}, which has no compiled extension (an installed "
        "copy, if any, is shadowed: Python looks in the current directory first). Build it in place with "
        "`pip install --no-build-isolation -e .`, or run from outside the checkout"
    )


if load_error is not None:
    load_error = _source_checkout_error(Path(__file__).resolve().parents[1]) or load_error


def has_cuda_kernels() -> bool:
    if load_error is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastperturb::norms", "CUDA")
