"""Loads the compiled extension (which registers the ``fastperturb::`` ops)."""

from __future__ import annotations

import torch

load_error: Exception | None = None
try:
    from .. import _C  # noqa: F401  (registers torch.ops.fastperturb.*)
except Exception as e:  # ImportError, or an ABI mismatch with this torch
    load_error = e


def has_cuda_kernels() -> bool:
    if load_error is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastperturb::norms", "CUDA")
