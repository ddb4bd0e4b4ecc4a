"""Which implementation of the op set runs: one switch, resolved per device.

Backends:

* ``cpp``: the C++ CPU kernels (``fastperturb._C``), for CPU tensors;
* ``cuda``: the CUDA C++ kernels, for CUDA tensors (when the extension was
  built with CUDA);
* ``triton``: the Triton kernels, for CUDA tensors (and CPU tensors under
  ``TRITON_INTERPRET=1``);
* ``reference``: the pure-PyTorch reference, anywhere.

``auto`` (the default) picks ``cpp`` for CPU tensors and, on CUDA tensors,
``triton`` before ``cuda``: the Triton kernels are executed by the test suite
(interpreted) while the CUDA kernel bodies have only been compiled here. When
none of those can run it falls back to ``reference`` and says why, once per
reason (a ``RuntimeWarning``): most often the checkout's ``fastperturb/``
shadowing the installed package.
Choose with :func:`set_backend` or the ``FASTPERTURB_BACKEND`` environment
variable.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Callable, Iterator

import torch

from .._callers import user_stacklevel
from . import native

BACKENDS = ("auto", "cpp", "cuda", "triton", "reference")
ENV_VAR = "FASTPERTURB_BACKEND"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not built, not installed, wrong device)."""


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


_choice = _validate(os.environ.get(ENV_VAR, "auto") or "auto")


def set_backend(name: str) -> None:
    """Select the backend for all fused ops (``auto``, ``cpp``, ``cuda``, ``triton``, ``reference``)."""
    global _choice
    _choice = _validate(name)


def get_backend() -> str:
    """The current choice (possibly ``auto``)."""
    return _choice


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily select a backend."""
    global _choice
    old, _choice = _choice, _validate(name)
    try:
        yield
    finally:
        _choice = old


_triton_loaded = None  # the module once imported: every op call asks (an import_module costs ~1.5 us)


def _triton_module():
    global _triton_loaded
    if _triton_loaded is not None:
        return _triton_loaded
    try:
        _triton_loaded = importlib.import_module("fastperturb.ops.triton")
    except Exception as e:  # ImportError, or triton failing to initialise (not cached: the cause may be fixed)
        return e
    return _triton_loaded


def why_unavailable(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can run ops on ``device``, else the reason."""
    if name == "reference":
        return None
    if name == "cpp":
        if native.load_error is not None:
            return f"the compiled extension fastperturb._C did not load ({native.load_error})"
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, not {device.type}"
        return None
    if name == "cuda":
        if native.load_error is not None:
            return f"the compiled extension fastperturb._C did not load ({native.load_error})"
        if not native.has_cuda_kernels():
            return "fastperturb was built without CUDA kernels (build with a CUDA torch and nvcc)"
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, not {device.type}"
        return None
    if name == "triton":
        mod = _triton_module()
        if isinstance(mod, Exception):
            return f"the Triton backend did not load ({mod})"
        return mod.why_unavailable(device)
    raise ValueError(f"unknown backend {name!r}")


def resolve(device: torch.device) -> str:
    """The concrete backend that runs ops on ``device`` under the current choice."""
    if _choice != "auto":
        reason = why_unavailable(_choice, device)
        if reason is not None:
            raise BackendUnavailable(f"backend {_choice!r} is unavailable: {reason}")
        return _choice
    candidates = ("cpp",) if device.type == "cpu" else ("triton", "cuda")
    reasons = []
    for name in candidates:
        reason = why_unavailable(name, device)
        if reason is None:
            return name
        reasons.append((name, reason))
    _say_fallback(device, reasons)
    return "reference"


_fallbacks_said: set = set()


def _say_fallback(device: torch.device, reasons: list) -> None:
    """``auto`` ran an op on the reference where a compiled backend was expected: correct, but slower and not
    what the README's figures measure, so it is said (once per reason; ``set_backend("reference")`` chooses it
    without a word). The common case is a script run inside the source checkout, whose ``fastperturb/`` has no
    compiled extension and shadows the installed one. Not for meta tensors (no backend computes on them), and not
    while torch.compile traces (dynamo cannot trace the frame walk; the next eager call says it)."""
    if device.type == "meta" or torch.compiler.is_compiling():
        return
    why = "; ".join(f"{name}: {reason}" for name, reason in reasons)
    key = (device.type, why)
    if key in _fallbacks_said:
        return
    _fallbacks_said.add(key)
    warnings.warn(
        f"fastperturb runs its ops on the pure-PyTorch reference backend for {device.type} tensors (correct, "
        f"slower): {why}. set_backend('reference') chooses it without this warning",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def op(name: str, backend: str) -> Callable:
    """The callable implementing op ``name`` on ``backend``."""
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.fastperturb, name)
    if backend == "triton":
        return getattr(torch.ops.fastperturb_triton, name)
    from . import reference

    return getattr(reference, name)
