"""Triton kernels of the fused op set, registered as ``torch.ops.fastperturb_triton.*``.

Importing this package defines the ops of
``csrc/include/fastperturb/schemas.h`` (the list ops of ``kAll`` and the
helper ``ascent_coefficients``) a second time, under the namespace
``fastperturb_triton``, with these kernels behind them (``docs/design.md``
§5.2). The schema strings are read from the ops the compiled extension
registers (``torch.ops.fastperturb.<op>.default._schema``), so the schemas are
written in one place only; importing this package therefore needs
``fastperturb._C``. The fake (meta) impls are the shared ones of
:mod:`fastperturb.ops.fake`. Semantics: :mod:`fastperturb.ops.reference`; per-element
arithmetic: ``csrc/include/fastperturb/math.h`` (same formulas, same order of
operations).

Modules
-------
``memory`` (element loads and stores, bfloat16 by hand), ``kernels`` (the
kernels), ``runtime`` (interpreter or compiled, launches with pinned
``num_warps``, launch counting, chunk and block sizes, availability), ``plan``
(the launch plan of one call), ``impls`` (the list ops), ``step_kernels`` and
``step_impls`` (the fused restore + base steps), ``coefficient_kernels`` and
``coefficient_impls`` (``ascent_coefficients``: one program, one launch),
``aot`` (ahead-of-time compilation for a GPU target), ``registration`` (the
``torch.library`` registration, with version-counter bumps on the written
tensors).

Registration: opaque ops, custom_op-style
-----------------------------------------
Each op is defined with ``torch.library.define`` and implemented with
``torch.library.impl`` for the CPU and CUDA keys by a Python function that
plans the launches and calls the Triton kernels. ``torch.library.triton_op`` +
``wrap_triton`` would instead let torch.compile trace into the kernels (and
fuse or reorder around them) on GPU, but under the interpreter its fake-tensor
path touches data pointers and ``torch.library.opcheck`` fails. The opaque
registration runs and passes every ``opcheck`` test here, on CPU tensors under
``TRITON_INTERPRET=1``. The cost: torch.compile sees each op as a black box (a
graph break-free call it cannot look into), which is also what it sees of the
C++ and CUDA backends.

Multi-tensor launches
---------------------
Every op runs in O(1) launches whatever the number of tensors. The host builds
one int64 buffer holding, per group (below), a *pointer table* (one row per
tensor: its ``data_ptr()``s, number of elements, first partial slot and index
in the list) and a *work list* of ``(row, chunk)`` pairs; each program handles
one chunk of ``chunk_size`` elements of one tensor, walking it in blocks of
``block_size``. On CUDA the buffer goes to the device in one copy. Tensors are
treated as flat runs of ``numel`` elements from their ``data_ptr()``, which is
right for the dense, non-overlapping tensors the validation admits (parallel
lists share strides, so element k is the same layer element in every list).

Lists may mix dtypes (float16, bfloat16, float32, float64). Tensors are
grouped by dtype (by element size for ``restore_``) and, within a dtype, by
whether all their pointers are 16-byte aligned and their numel a multiple of
16 bytes of elements: those groups get ``tl.multiple_of`` hints and 128-bit
loads and stores on GPU. One launch per group present, so at most two per
dtype, whatever the number of tensors. Computation is in float32 (float64 for
float64 tensors) and follows math.h operation by operation: kernels are
compiled with ``enable_fp_fusion=False`` (no mul+add contracted into an FMA),
so the GPU rounds exactly as the interpreter does. Results are rounded once
to the tensor's dtype, to nearest even. bfloat16 goes through explicit
integer conversions (exact widening; round-to-nearest-even narrowing as
``c10::BFloat16`` does, NaN -> 0x7FC0) so the compiled GPU code and the
interpreter, whose own bfloat16 cast truncates, give the same bits.
``restore_`` and the backup copy of ``ascent_step_(first=True)`` move raw bits
(integer loads and stores), so restore is exact for every value, NaN payloads
included. Under the interpreter the written tensors are bit-identical to those of
:mod:`fastperturb.ops.reference` (tested), except inside NaNs, which are NaN on
both sides but may carry another payload. ``sign`` keeps NaN as NaN for
``norm="linf"`` (math.h ``sign_of``), as the C++ kernels and the reference do
(the reference does not use ``torch.sign``'s NaN -> 0): a NaN gradient never
looks like "no move".

Deterministic reductions
------------------------
``norms`` and ``grad_stats_`` never use atomics. Each program writes the
partial of its chunk (a fixed-shape tree sum over lanes of a per-lane running
sum, or a NaN-propagating max) to its own float64 slot; the slots of tensor i
are contiguous. A second launch of one program then reduces every tensor's
slots in chunk order, sequentially in float64 (128 tensors side by side), and
for ``norms`` combines the per-tensor results into the total in a fixed order.
A tensor's result therefore depends only on its own values, the chunk size and
the block size (both fixed), not on the other tensors, the launch grid or the
scheduling (and ``num_warps`` is pinned: the lane order of a block-wide
reduction depends on it); reruns are bit-identical. One exception on a GPU
(not under the interpreter, which sums with numpy): the compiler gives each
thread 1 element of a block or a vector of them depending on whether the
tensor is in a 16-byte-aligned group (``VEC``), and a block's sum associates
in that layout, so the same values in an aligned tensor and in an unaligned
view can differ in the last bits of a chunk's partial. Accumulation is float32 within a chunk
(float64 for float64 tensors) and float64 across chunks.

Where it runs
-------------
On CUDA tensors with a working Triton GPU driver, and on CPU tensors when
``TRITON_INTERPRET=1`` was set before this package (better: before triton) was
imported; :func:`why_unavailable` says why not otherwise. Under the interpreter
every program instance costs milliseconds of Python, so the chunk there is
large by default; :func:`tuning` changes chunk and block sizes (tests use small
ones to split tensors over many chunks). :func:`count_launches` counts kernel
launches.
"""

from __future__ import annotations

from . import runtime
from .aot import compile_all, specializations
from .impls import NAMESPACE
from .registration import register
from .runtime import INTERPRETED, NUM_WARPS, LaunchCounter, count_launches, tuning, why_unavailable
from .runtime import Tuning as _Tuning  # noqa: F401  (the current sizes; tests read them)

__all__ = [
    "why_unavailable",
    "count_launches",
    "LaunchCounter",
    "tuning",
    "launches",
    "INTERPRETED",
    "NUM_WARPS",
    "NAMESPACE",
    "specializations",
    "compile_all",
]


def __getattr__(name: str):
    if name == "launches":  # kernel launches since import (a live count, so not a plain attribute)
        return runtime.launches
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register()
