"""Where and how the Triton kernels run: interpreter or compiled, kernel
launches (with pinned ``num_warps`` and no FMA contraction), launch counting,
the chunk and block sizes, and why the backend cannot run on a device."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import triton

from .kernels import _norms_kernel

# --------------------------------------------------------------------------
# Backend state: interpreter or not, launch counting, chunking.

try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - every triton with an interpreter has it
    _InterpretedFunction = ()

#: True when the kernels above were defined under ``TRITON_INTERPRET=1``
#: (they then run on CPU tensors only).
INTERPRETED: bool = isinstance(_norms_kernel, _InterpretedFunction)

#: Kernel launches since import (all kernels of this module).
launches: int = 0

_counters: list["LaunchCounter"] = []


class LaunchCounter:
    """Kernel launches seen while :func:`count_launches` was active: ``total`` and ``by_kernel``."""

    def __init__(self) -> None:
        self.total = 0
        self.by_kernel: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"LaunchCounter(total={self.total}, by_kernel={self.by_kernel})"


@contextlib.contextmanager
def count_launches() -> Iterator[LaunchCounter]:
    """Count the kernel launches made inside the ``with`` block."""
    counter = LaunchCounter()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


#: The most elements one lane of a program sums in the compute type: its sum then goes into float64 with the other
#: lanes' (the CPU kernels' lanes sum 64, the CUDA blocks' runs of 64), so a float32 reduction overflows on no
#: backend where the others are finite. chunk_size / block_size is each lane's count.
LANE_RUN = 64


#: (chunk_size, block_size) on a GPU and under the interpreter, which pays per program and per loop iteration, not
#: per element.
DEFAULTS = {False: (1 << 16, 1 << 10), True: (1 << 14, 1 << 14)}


class Tuning:
    # Elements per program, and per loop iteration inside a program.
    chunk_size, block_size = DEFAULTS[INTERPRETED]


@contextlib.contextmanager
def tuning(chunk_size: int | None = None, block_size: int | None = None) -> Iterator[None]:
    """Temporarily change the chunk (elements per program) and block (elements
    per loop iteration) sizes: powers of two, block <= chunk. Results of the
    reductions depend on both (they set the summation order), so they are
    fixed constants outside tests."""
    old = (Tuning.chunk_size, Tuning.block_size)
    chunk = old[0] if chunk_size is None else int(chunk_size)
    block = old[1] if block_size is None else int(block_size)
    for name, v in (("chunk_size", chunk), ("block_size", block)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a positive power of two, got {v}")
    if block > chunk:
        raise ValueError(f"block_size ({block}) must not exceed chunk_size ({chunk})")
    if chunk // block > LANE_RUN:
        raise ValueError(
            f"chunk_size / block_size ({chunk} / {block}) must not exceed {LANE_RUN}: a lane sums that many elements "
            "in the compute type before float64 (as the CPU kernels' lanes), beyond it float32 sums overflow first"
        )
    Tuning.chunk_size, Tuning.block_size = chunk, block
    try:
        yield
    finally:
        Tuning.chunk_size, Tuning.block_size = old


#: Warps per program, pinned: the lanes of a block-wide ``tl.sum`` / ``tl.max``
#: are combined in an order that depends on the warp count, so the bits of
#: every reduction do too. Triton's default (4), written down so a change of
#: default can never change results.
NUM_WARPS = 4

#: Options every compilation uses (launches and ahead-of-time): no mul+add
#: contraction into FMA, so the GPU rounds exactly as the interpreter (and
#: math.h without FMA) does, one operation at a time; pinned warps.
COMPILE_OPTIONS = {"enable_fp_fusion": False, "num_warps": NUM_WARPS}


def launch(kernel, grid: int, *args, **constexprs) -> None:
    """Launch ``kernel`` on ``grid`` programs with :data:`COMPILE_OPTIONS`, and count it."""
    global launches
    kernel[(grid,)](*args, **constexprs, **COMPILE_OPTIONS)
    launches += 1
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel)
    for counter in _counters:
        counter.total += 1
        counter.by_kernel[name] = counter.by_kernel.get(name, 0) + 1


def why_unavailable(device: torch.device | str) -> str | None:
    """None if the Triton kernels can run on tensors of ``device``, else the reason."""
    device = torch.device(device)
    if device.type not in _available:
        _available[device.type] = _why_unavailable(device)
    return _available[device.type]


_available: dict[str, str | None] = {}


def _why_unavailable(device: torch.device) -> str | None:
    if device.type == "cpu":
        if not INTERPRETED:
            return (
                "Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                "before triton and fastperturb are imported"
            )
        return None
    if device.type == "cuda":
        if INTERPRETED:
            return (
                "the Triton kernels were defined under TRITON_INTERPRET=1, which runs them on CPU "
                "tensors only (the interpreter cannot follow the pointer tables into GPU memory); "
                "unset TRITON_INTERPRET to use them on CUDA tensors"
            )
        if not torch.cuda.is_available():
            return "torch finds no usable CUDA device"
        try:
            triton.runtime.driver.active.get_current_target()
        except Exception as e:  # no driver, or a broken installation
            return f"triton has no working GPU driver ({e})"
        return None
    return f"the Triton backend runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {device.type}"
