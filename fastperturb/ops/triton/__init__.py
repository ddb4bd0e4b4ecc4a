"""Triton kernels of the fused op set, registered as ``torch.ops.fastperturb_triton.*``.

Importing this module defines the five ops of ``csrc/schemas.cpp`` a second
time, under the namespace ``fastperturb_triton``, with these kernels behind
them. The schema strings are read from the ops the compiled extension
registers (``torch.ops.fastperturb.<op>.default._schema``), so the schemas are
written in one place only; importing this module therefore needs
``fastperturb._C``. The fake (meta) impls are the shared ones of
:mod:`fastperturb.ops.fake`. Semantics: :mod:`fastperturb.ops.reference`; per-element
arithmetic: ``csrc/include/fastperturb/math.h`` (same formulas, same order of
operations).

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
included. Under the interpreter the element-wise results are bit-identical to
:mod:`fastperturb.ops.reference` (tested), with one exception where the contract
disagrees with itself: for ``norm="linf"`` a NaN gradient has sign NaN here
(math.h ``sign_of``, as in the C++ kernels) but 0 in the reference
(``torch.sign(nan)`` is 0).

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
scheduling; reruns are bit-identical. Accumulation is float32 within a chunk
(float64 for float64 tensors) and float64 across chunks.

Where it runs
-------------
On CUDA tensors with a working Triton GPU driver, and on CPU tensors when
``TRITON_INTERPRET=1`` was set before this module (better: before triton) was
imported; :func:`why_unavailable` says why not otherwise. Under the interpreter
every program instance costs milliseconds of Python, so the chunk there is
large by default; :func:`tuning` changes chunk and block sizes (tests use small
ones to split tensors over many chunks). :func:`count_launches` counts kernel
launches.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import struct
from typing import Callable, Iterator, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import fake, native, pure
from .. import validation as V

__all__ = ["why_unavailable", "count_launches", "LaunchCounter", "tuning", "launches", "INTERPRETED"]


# --------------------------------------------------------------------------
# Element access. ELEM is the tensor dtype; ST the type the kernels load and
# store it as (ELEM, or int16 for bfloat16, converted by hand); ITYPE the
# integer type of the same width (raw bits); CT the compute type (float32, or
# float64 for float64 tensors). VEC > 1 promises that every pointer of the
# group is 16-byte aligned and every numel a multiple of VEC (16 bytes of
# elements), which lets the compiler use 128-bit loads and stores.
#
# Loads widen to CT, stores round to nearest even. Only these two helpers:
# under the interpreter each call of a @triton.jit function costs about a
# millisecond, so the small pieces of math.h (abs, sign, clamp, the
# NaN-propagating max) and the pointer set-up are written out where used.


@triton.jit
def _load(ptr, offs, mask, ELEM: tl.constexpr, CT: tl.constexpr):
    if ELEM == tl.bfloat16:
        raw = tl.load(ptr + offs, mask=mask, other=0)
        x = ((raw.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0).to(CT)
    return x


@triton.jit
def _store(ptr, offs, x, mask, ELEM: tl.constexpr):
    if ELEM == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        tl.store(ptr + offs, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ELEM), mask=mask)


# --------------------------------------------------------------------------
# Kernels. ``meta`` rows: pointer columns, then numel, first partial slot,
# index in the list. ``work``: (row, chunk) pairs, one per program.


@triton.jit
def _norms_kernel(meta, work, partials, CHUNK: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
                  ELEM: tl.constexpr, ST: tl.constexpr, CT: tl.constexpr, LINF: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.load(work + 2 * pid)
    c = tl.load(work + 2 * pid + 1)
    x_ptr = tl.load(meta + 4 * row).to(tl.pointer_type(ST))
    numel = tl.load(meta + 4 * row + 1)
    slot = tl.load(meta + 4 * row + 2) + c
    if VEC > 1:
        x_ptr = tl.multiple_of(x_ptr, 16)
        numel = tl.multiple_of(numel, VEC)
    start = c * CHUNK
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], CT)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + lanes
        m = offs < numel
        x = _load(x_ptr, offs, m, ELEM, CT)
        if LINF:
            # math.h max_abs_nan, per lane: a NaN sticks.
            a = tl.where(x < 0, -x, x)
            acc = tl.where((a > acc) | (a != a), a, acc)
        else:
            acc += x * x
    if LINF:
        # Max over lanes, NaN if any lane is NaN (tl.max alone may drop NaNs on GPU).
        nan = acc != acc
        r = tl.max(tl.where(nan, 0.0, acc), axis=0) + tl.sum(tl.where(nan, acc, 0.0), axis=0)
    else:
        r = tl.sum(acc, axis=0)
    tl.store(partials + slot, r.to(tl.float64))


@triton.jit
def _grad_stats_kernel(meta, work, scal, partials, CHUNK: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
                       ELEM: tl.constexpr, ST: tl.constexpr, CT: tl.constexpr, HAS_ACC: tl.constexpr,
                       ACC_INIT: tl.constexpr, ADAPTIVE: tl.constexpr, HAS_DELTA: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.load(work + 2 * pid)
    c = tl.load(work + 2 * pid + 1)
    g_ptr = tl.load(meta + 7 * row).to(tl.pointer_type(ST))
    a_ptr = tl.load(meta + 7 * row + 1).to(tl.pointer_type(ST))
    w_ptr = tl.load(meta + 7 * row + 2).to(tl.pointer_type(ST))
    b_ptr = tl.load(meta + 7 * row + 3).to(tl.pointer_type(ST))
    numel = tl.load(meta + 7 * row + 4)
    slot = tl.load(meta + 7 * row + 5) + c
    if VEC > 1:
        g_ptr = tl.multiple_of(g_ptr, 16)
        a_ptr = tl.multiple_of(a_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        numel = tl.multiple_of(numel, VEC)
    weight = tl.load(scal).to(tl.float64, bitcast=True).to(CT)
    eta = tl.load(scal + 1).to(tl.float64, bitcast=True).to(CT)
    start = c * CHUNK
    lanes = tl.arange(0, BLOCK)
    s0 = tl.zeros([BLOCK], CT)
    s1 = tl.zeros([BLOCK], CT)
    s2 = tl.zeros([BLOCK], CT)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + lanes
        m = offs < numel
        g = _load(g_ptr, offs, m, ELEM, CT)
        tg = g
        if ADAPTIVE:
            w = _load(w_ptr, offs, m, ELEM, CT)
            tg = (tl.where(w < 0, -w, w) + eta) * g
        s0 += tg * tg
        if HAS_DELTA:
            if not ADAPTIVE:
                w = _load(w_ptr, offs, m, ELEM, CT)
            d = w - _load(b_ptr, offs, m, ELEM, CT)
            s1 += d * g
            s2 += d * d
        if HAS_ACC:
            if ACC_INIT:
                new = weight * g
            else:
                new = _load(a_ptr, offs, m, ELEM, CT) + weight * g
            _store(a_ptr, offs, new, m, ELEM)
    tl.store(partials + 3 * slot, tl.sum(s0, axis=0).to(tl.float64))
    tl.store(partials + 3 * slot + 1, tl.sum(s1, axis=0).to(tl.float64))
    tl.store(partials + 3 * slot + 2, tl.sum(s2, axis=0).to(tl.float64))


@triton.jit
def _ascent_kernel(meta, work, scal, step_coef, proj, CHUNK: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
                   ELEM: tl.constexpr, ST: tl.constexpr, ITYPE: tl.constexpr, CT: tl.constexpr,
                   LINF: tl.constexpr, FIRST: tl.constexpr, ADAPTIVE: tl.constexpr, ZERO_GRADS: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.load(work + 2 * pid)
    c = tl.load(work + 2 * pid + 1)
    w_addr = tl.load(meta + 6 * row)
    w_ptr = w_addr.to(tl.pointer_type(ST))
    wbits_ptr = w_addr.to(tl.pointer_type(ITYPE))
    g_ptr = tl.load(meta + 6 * row + 1).to(tl.pointer_type(ST))
    b_addr = tl.load(meta + 6 * row + 2)
    b_ptr = b_addr.to(tl.pointer_type(ST))
    bbits_ptr = b_addr.to(tl.pointer_type(ITYPE))
    numel = tl.load(meta + 6 * row + 3)
    if VEC > 1:
        w_ptr = tl.multiple_of(w_ptr, 16)
        wbits_ptr = tl.multiple_of(wbits_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        bbits_ptr = tl.multiple_of(bbits_ptr, 16)
        numel = tl.multiple_of(numel, VEC)
    index = tl.load(meta + 6 * row + 5)
    a = tl.load(step_coef + index).to(CT)
    p = tl.load(proj + index).to(CT)
    eta = tl.load(scal).to(tl.float64, bitcast=True).to(CT)
    start = c * CHUNK
    lanes = tl.arange(0, BLOCK)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + lanes
        m = offs < numel
        g = _load(g_ptr, offs, m, ELEM, CT)
        if FIRST:
            # base = w, delta = 0; the backup gets w's bits unchanged.
            w_bits = tl.load(wbits_ptr + offs, mask=m, other=0)
            if ELEM == tl.bfloat16:
                base = ((w_bits.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
            else:
                base = w_bits.to(ELEM, bitcast=True).to(CT)
            delta = tl.zeros([BLOCK], CT)
        else:
            base = _load(b_ptr, offs, m, ELEM, CT)
            delta = _load(w_ptr, offs, m, ELEM, CT) - base
        if LINF:
            direction = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, g)).to(CT)
        else:
            direction = g
        if ADAPTIVE:
            t = tl.where(base < 0, -base, base) + eta
            direction = t * t * g
        u = delta + a * direction
        if LINF:
            u = tl.where(u < -p, -p, tl.where(u > p, p, u))
        else:
            u = p * u
        _store(w_ptr, offs, base + u, m, ELEM)
        if FIRST:
            tl.store(bbits_ptr + offs, w_bits, mask=m)
        if ZERO_GRADS:
            tl.store(g_ptr + offs, tl.zeros([BLOCK], ST), mask=m)


@triton.jit
def _restore_kernel(meta, work, CHUNK: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, ITYPE: tl.constexpr):
    # Raw bits, so every value (NaN payloads included) comes back unchanged.
    pid = tl.program_id(0)
    row = tl.load(work + 2 * pid)
    c = tl.load(work + 2 * pid + 1)
    w_ptr = tl.load(meta + 5 * row).to(tl.pointer_type(ITYPE))
    b_ptr = tl.load(meta + 5 * row + 1).to(tl.pointer_type(ITYPE))
    numel = tl.load(meta + 5 * row + 2)
    if VEC > 1:
        w_ptr = tl.multiple_of(w_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        numel = tl.multiple_of(numel, VEC)
    start = c * CHUNK
    lanes = tl.arange(0, BLOCK)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + lanes
        m = offs < numel
        tl.store(w_ptr + offs, tl.load(b_ptr + offs, mask=m), mask=m)


@triton.jit
def _combine_kernel(meta, work, scal, CHUNK: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
                    ELEM: tl.constexpr, ST: tl.constexpr, CT: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.load(work + 2 * pid)
    c = tl.load(work + 2 * pid + 1)
    g_ptr = tl.load(meta + 5 * row).to(tl.pointer_type(ST))
    a_ptr = tl.load(meta + 5 * row + 1).to(tl.pointer_type(ST))
    numel = tl.load(meta + 5 * row + 2)
    if VEC > 1:
        g_ptr = tl.multiple_of(g_ptr, 16)
        a_ptr = tl.multiple_of(a_ptr, 16)
        numel = tl.multiple_of(numel, VEC)
    weight = tl.load(scal).to(tl.float64, bitcast=True).to(CT)
    start = c * CHUNK
    lanes = tl.arange(0, BLOCK)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + lanes
        m = offs < numel
        g = _load(g_ptr, offs, m, ELEM, CT)
        _store(g_ptr, offs, _load(a_ptr, offs, m, ELEM, CT) + weight * g, m, ELEM)


@triton.jit
def _finalize_kernel(partials, pbase, out, total, n, NCOL: tl.constexpr, MODE: tl.constexpr, TB: tl.constexpr):
    # One program. Tensor i owns partial slots pbase[i] .. pbase[i+1]-1 (NCOL
    # float64 values each); they are combined in slot order, TB tensors side by
    # side. MODE 0: L2 norms (out[i] = sqrt(sum), total = sqrt(sum of sums));
    # 1: L-inf norms (NaN-propagating max, total likewise); 2: plain sums of
    # every column into out[i, col], no total.
    lanes = tl.arange(0, TB)
    tot = tl.zeros([TB], tl.float64)
    for t0 in range(0, n, TB):
        idx = t0 + lanes
        m = idx < n
        lo = tl.load(pbase + idx, mask=m, other=0)
        cnt = tl.load(pbase + idx + 1, mask=m, other=0) - lo
        longest = tl.max(cnt, axis=0)
        for col in tl.static_range(NCOL):
            acc = tl.zeros([TB], tl.float64)
            for j in range(0, longest):
                v = tl.load(partials + (lo + j) * NCOL + col, mask=m & (j < cnt), other=0.0)
                if MODE == 1:
                    acc = tl.where((v > acc) | (v != v), v, acc)
                else:
                    acc += v
            if MODE == 0:
                tl.store(out + idx, tl.sqrt(acc).to(tl.float32), mask=m)
                tot += acc
            elif MODE == 1:
                tl.store(out + idx, acc.to(tl.float32), mask=m)
                tot = tl.where((acc > tot) | (acc != acc), acc, tot)
            else:
                tl.store(out + idx * NCOL + col, acc.to(tl.float32), mask=m)
    if MODE == 0:
        tl.store(total, tl.sqrt(tl.sum(tot, axis=0)).to(tl.float32))
    elif MODE == 1:
        nan = tot != tot
        r = tl.max(tl.where(nan, 0.0, tot), axis=0) + tl.sum(tl.where(nan, tot, 0.0), axis=0)
        tl.store(total, r.to(tl.float32))


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


class _Tuning:
    # Elements per program, and per loop iteration inside a program. The
    # interpreter pays per program and per loop iteration, not per element.
    chunk_size = 1 << 16 if not INTERPRETED else 1 << 14
    block_size = 1 << 10 if not INTERPRETED else 1 << 14


_FINALIZE_LANES = 128


@contextlib.contextmanager
def tuning(chunk_size: int | None = None, block_size: int | None = None) -> Iterator[None]:
    """Temporarily change the chunk (elements per program) and block (elements
    per loop iteration) sizes: powers of two, block <= chunk. Results of the
    reductions depend on both (they set the summation order), so they are
    fixed constants outside tests."""
    old = (_Tuning.chunk_size, _Tuning.block_size)
    chunk = old[0] if chunk_size is None else int(chunk_size)
    block = old[1] if block_size is None else int(block_size)
    for name, v in (("chunk_size", chunk), ("block_size", block)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a positive power of two, got {v}")
    if block > chunk:
        raise ValueError(f"block_size ({block}) must not exceed chunk_size ({chunk})")
    _Tuning.chunk_size, _Tuning.block_size = chunk, block
    try:
        yield
    finally:
        _Tuning.chunk_size, _Tuning.block_size = old


def _launch(kernel, grid: int, *args, **constexprs) -> None:
    global launches
    # No mul+add contraction into FMA: the GPU then rounds exactly as the
    # interpreter (and math.h without FMA) does, one operation at a time.
    kernel[(grid,)](*args, **constexprs, enable_fp_fusion=False)
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
            return ("Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                    "before triton and fastperturb are imported")
        return None
    if device.type == "cuda":
        if INTERPRETED:
            return ("the Triton kernels were defined under TRITON_INTERPRET=1, which runs them on CPU "
                    "tensors only (the interpreter cannot follow the pointer tables into GPU memory); "
                    "unset TRITON_INTERPRET to use them on CUDA tensors")
        if not torch.cuda.is_available():
            return "torch finds no usable CUDA device"
        try:
            triton.runtime.driver.active.get_current_target()
        except Exception as e:  # no driver, or a broken installation
            return f"triton has no working GPU driver ({e})"
        return None
    return f"the Triton backend runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {device.type}"


# --------------------------------------------------------------------------
# Host side: the launch plan.

_TYPES = {
    # torch dtype: (element type, load/store type, integer type of the same width, compute type)
    torch.float16: (tl.float16, tl.float16, tl.int16, tl.float32),
    torch.bfloat16: (tl.bfloat16, tl.int16, tl.int16, tl.float32),
    torch.float32: (tl.float32, tl.float32, tl.int32, tl.float32),
    torch.float64: (tl.float64, tl.float64, tl.int64, tl.float64),
}
_INT_OF_SIZE = {2: tl.int16, 4: tl.int32, 8: tl.int64}
_VECTOR_BYTES = 16


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


class _Group:
    __slots__ = ("key", "vec", "meta", "work", "programs")

    def __init__(self, key, vec: int, meta: Tensor, work: Tensor, programs: int) -> None:
        self.key, self.vec, self.meta, self.work, self.programs = key, vec, meta, work, programs


class _Plan:
    """The launch plan of one op call, in one int64 buffer on the device.

    ``pbase``: first partial slot of each tensor (n + 1 entries; tensor i owns
    slots ``pbase[i] .. pbase[i+1]-1``, one per chunk). ``scal``: float64
    scalars stored as bits. ``groups``: one per (key, vec) present among the
    non-empty tensors, where key is what the kernel is specialised on (the
    dtype) and vec is 16 bytes of elements when all the tensor's pointers are
    16-byte aligned and its numel a multiple of that (else 1): a pointer table
    (rows of ``ptr columns + [numel, first slot, index]``) and the work list of
    (row, chunk) pairs. So at most two launches per key, whatever the number
    of tensors.
    """

    def __init__(self, device: torch.device, lists: Sequence[Sequence[Tensor]], keys: Sequence[object],
                 scalars: Sequence[float] = ()) -> None:
        chunk = _Tuning.chunk_size
        ref = lists[0]
        n = len(ref)
        numels = [t.numel() for t in ref]
        nchunks = [-(-k // chunk) for k in numels]
        pbase = [0] * (n + 1)
        for i, k in enumerate(nchunks):
            pbase[i + 1] = pbase[i] + k
        self.n = n
        self.slots = pbase[n]
        self.chunk, self.block = chunk, _Tuning.block_size

        members: dict[tuple, list[int]] = {}
        rows_of: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            if not nchunks[i]:
                continue
            row = [ts[i].data_ptr() if len(ts) else 0 for ts in lists]
            vec = _VECTOR_BYTES // ref[i].element_size()
            if numels[i] % vec or any(ptr % _VECTOR_BYTES for ptr in row):  # (0 for an absent list)
                vec = 1
            members.setdefault((k, vec), []).append(i)
            rows_of[i] = row

        head = pbase + [_f64_bits(s) for s in scalars]
        ints = list(head)
        layout = []  # (key, vec, meta offset, meta length, work offset, work length, programs)
        for (key, vec), idx in members.items():
            meta_at = len(ints)
            for i in idx:
                ints += rows_of[i]
                ints += (numels[i], pbase[i], i)
            work_at = len(ints)
            for r, i in enumerate(idx):
                k = nchunks[i]
                ints += itertools.chain.from_iterable(zip(itertools.repeat(r, k), range(k)))
            layout.append((key, vec, meta_at, work_at - meta_at, work_at, len(ints) - work_at,
                           (len(ints) - work_at) // 2))
        buf = torch.tensor(ints, dtype=torch.int64)
        if device.type == "cuda":
            buf = buf.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            buf = buf.to(device)
        self.buf = buf
        self.pbase = buf[: n + 1]
        self.scal = buf[n + 1: len(head)]
        self.groups = [
            _Group(key, vec, buf[mo: mo + ml], buf[wo: wo + wl], programs)
            for key, vec, mo, ml, wo, wl, programs in layout
        ]


def _device_guard(op: str, device: torch.device):
    """Refuse devices the kernels cannot run on (before anything is written); select the CUDA device."""
    reason = why_unavailable(device)
    if reason is not None:
        raise NotImplementedError(f"{NAMESPACE}::{op} cannot run on {device.type} tensors: {reason}")
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _finalize(plan: _Plan, partials: Tensor, out: Tensor, total: Tensor, ncol: int, mode: int) -> None:
    _launch(_finalize_kernel, 1, partials, plan.pbase, out, total, plan.n,
            NCOL=ncol, MODE=mode, TB=_FINALIZE_LANES)


# --------------------------------------------------------------------------
# The ops.
# Each validates its arguments (the kernels follow raw pointers, so a bad list
# must never reach them, whoever calls the op) and refuses a device it cannot
# run on, before writing anything.


def _device_of(*lists: Sequence[Tensor]) -> torch.device:
    for ts in lists:
        if len(ts):
            return ts[0].device
    return torch.device("cpu")


def _norms(tensors: list[Tensor], ord: float) -> tuple[Tensor, Tensor]:
    V.check_norms(tensors, ord)
    device = _device_of(tensors)
    with _device_guard("norms", device):
        n = len(tensors)
        per = torch.empty(n, dtype=torch.float32, device=device)
        total = torch.empty((), dtype=torch.float32, device=device)
        if n == 0:
            return per, total.zero_()
        linf = math.isinf(ord)
        plan = _Plan(device, [tensors], [t.dtype for t in tensors])
        partials = torch.empty(max(plan.slots, 1), dtype=torch.float64, device=device)
        for grp in plan.groups:
            elem, st, _, ct = _TYPES[grp.key]
            _launch(_norms_kernel, grp.programs, grp.meta, grp.work, partials,
                    CHUNK=plan.chunk, BLOCK=plan.block, VEC=grp.vec, ELEM=elem, ST=st, CT=ct, LINF=linf)
        _finalize(plan, partials, per, total, 1, 1 if linf else 0)
    return per, total


def _grad_stats(grads: list[Tensor], accum: list[Tensor], params: list[Tensor], backups: list[Tensor], *,
                accum_weight: float = 1.0, accum_init: bool = False, adaptive_eta: float = -1.0) -> Tensor:
    V.check_grad_stats(grads, accum, params, backups, accum_weight, adaptive_eta)
    device = _device_of(grads, accum, params, backups)
    with _device_guard("grad_stats_", device):
        n = len(grads)
        out = torch.empty(n, 3, dtype=torch.float32, device=device)
        if n == 0:
            return out
        plan = _Plan(device, [grads, accum, params, backups], [g.dtype for g in grads],
                     scalars=(accum_weight, adaptive_eta))
        partials = torch.empty(max(plan.slots, 1), 3, dtype=torch.float64, device=device)
        for grp in plan.groups:
            elem, st, _, ct = _TYPES[grp.key]
            _launch(_grad_stats_kernel, grp.programs, grp.meta, grp.work, plan.scal, partials,
                    CHUNK=plan.chunk, BLOCK=plan.block, VEC=grp.vec, ELEM=elem, ST=st, CT=ct,
                    HAS_ACC=bool(accum), ACC_INIT=bool(accum) and bool(accum_init), ADAPTIVE=adaptive_eta >= 0,
                    HAS_DELTA=bool(backups))
        _finalize(plan, partials, out, out, 3, 2)
    return out


def _ascent_step(params: list[Tensor], grads: list[Tensor], backups: list[Tensor], step_coef: Tensor,
                 proj: Tensor, *, norm: str = "l2", first: bool = False, adaptive_eta: float = -1.0,
                 zero_grads: bool = False) -> None:
    V.check_ascent_step(params, grads, backups, step_coef, proj, norm, adaptive_eta)
    if not params:
        return
    device = params[0].device
    with _device_guard("ascent_step_", device):
        plan = _Plan(device, [params, grads, backups], [w.dtype for w in params], scalars=(adaptive_eta,))
        for grp in plan.groups:
            elem, st, itype, ct = _TYPES[grp.key]
            _launch(_ascent_kernel, grp.programs, grp.meta, grp.work, plan.scal, step_coef, proj,
                    CHUNK=plan.chunk, BLOCK=plan.block, VEC=grp.vec, ELEM=elem, ST=st, ITYPE=itype, CT=ct,
                    LINF=norm == "linf",
                    FIRST=bool(first), ADAPTIVE=adaptive_eta >= 0, ZERO_GRADS=bool(zero_grads))


def _restore(params: list[Tensor], backups: list[Tensor]) -> None:
    V.check_restore(params, backups)
    if not params:
        return
    device = params[0].device
    with _device_guard("restore_", device):
        plan = _Plan(device, [params, backups], [w.element_size() for w in params])
        for grp in plan.groups:
            _launch(_restore_kernel, grp.programs, grp.meta, grp.work,
                    CHUNK=plan.chunk, BLOCK=plan.block, VEC=grp.vec, ITYPE=_INT_OF_SIZE[grp.key])


def _combine_grads(grads: list[Tensor], accum: list[Tensor], weight: float) -> None:
    V.check_combine_grads(grads, accum, weight)
    if not grads:
        return
    device = grads[0].device
    with _device_guard("combine_grads_", device):
        plan = _Plan(device, [grads, accum], [g.dtype for g in grads], scalars=(weight,))
        for grp in plan.groups:
            elem, st, _, ct = _TYPES[grp.key]
            _launch(_combine_kernel, grp.programs, grp.meta, grp.work, plan.scal,
                    CHUNK=plan.chunk, BLOCK=plan.block, VEC=grp.vec, ELEM=elem, ST=st, CT=ct)


# --------------------------------------------------------------------------
# Ahead-of-time compilation of every kernel specialisation (no GPU needed).


def specializations(chunk_size: int = 1 << 16, block_size: int = 1 << 10, exhaustive: bool = True):
    """The (kernel, signature, constexprs) the ops can launch with these sizes:
    all of them, or (``exhaustive=False``) a subset in which every static branch
    of every kernel is taken both ways, for every dtype, with the vector hints
    (VEC > 1), and once more without them (float32)."""
    flags = (False, True)
    table = {"meta": "*i64", "work": "*i64"}
    scal = dict(table, scal="*i64")
    all4 = list(itertools.product(flags, repeat=4))
    # (HAS_ACC, ACC_INIT, ADAPTIVE, HAS_DELTA) and (LINF, FIRST, ADAPTIVE, ZERO_GRADS)
    stats_flags = [f for f in all4 if f[0] or not f[1]] if exhaustive else [
        (True, False, True, True), (True, True, False, True), (False, False, False, False)]
    ascent_flags = all4 if exhaustive else [
        (False, False, False, False), (True, True, True, True), (True, False, True, False)]
    for dtype, (elem, st, itype, ct) in _TYPES.items():
        vecs = (1, _VECTOR_BYTES // dtype.itemsize)
        if not exhaustive and dtype != torch.float32:
            vecs = vecs[1:]
        for vec in vecs:
            base = dict(CHUNK=chunk_size, BLOCK=block_size, VEC=vec, ELEM=elem, ST=st, CT=ct)
            for linf in flags:
                yield _norms_kernel, dict(table, partials="*fp64"), dict(base, LINF=linf)
            for has_acc, acc_init, adaptive, has_delta in stats_flags:
                yield (_grad_stats_kernel, dict(scal, partials="*fp64"),
                       dict(base, HAS_ACC=has_acc, ACC_INIT=acc_init, ADAPTIVE=adaptive, HAS_DELTA=has_delta))
            for linf, first, adaptive, zero_grads in ascent_flags:
                yield (_ascent_kernel, dict(scal, step_coef="*fp32", proj="*fp32"),
                       dict(base, ITYPE=itype, LINF=linf, FIRST=first, ADAPTIVE=adaptive, ZERO_GRADS=zero_grads))
            yield _combine_kernel, scal, base
    for size, itype in _INT_OF_SIZE.items():
        for vec in (1, _VECTOR_BYTES // size):
            yield _restore_kernel, table, dict(CHUNK=chunk_size, BLOCK=block_size, VEC=vec, ITYPE=itype)
    for ncol, mode in ((1, 0), (1, 1), (3, 2)):
        yield (_finalize_kernel, {"partials": "*fp64", "pbase": "*i64", "out": "*fp32", "total": "*fp32", "n": "i32"},
               dict(NCOL=ncol, MODE=mode, TB=_FINALIZE_LANES))


def compile_all(target, chunk_size: int = 1 << 16, block_size: int = 1 << 10, exhaustive: bool = True) -> list:
    """Compile the kernel specialisations (see :func:`specializations`) for ``target`` (a
    ``triton.backends.compiler.GPUTarget``, e.g. ``GPUTarget("cuda", 80, 32)``) down to
    machine code, without a GPU. Returns ``(kernel name, constexprs, compiled kernel)``
    triples (``compiled.asm`` holds the ptx, cubin, ...). Needs a process where the
    kernels were not defined under the interpreter."""
    if INTERPRETED:
        raise RuntimeError("compile_all needs the compiled kernels: run it without TRITON_INTERPRET=1")
    from triton.compiler import ASTSource

    out = []
    for kernel, signature, constexprs in specializations(chunk_size, block_size, exhaustive):
        signature = dict(signature, **{k: "constexpr" for k in constexprs})
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                                  options={"enable_fp_fusion": False})
        out.append((kernel.fn.__name__, constexprs, compiled))
    return out


# --------------------------------------------------------------------------
# Registration under fastperturb_triton::, with the schemas of fastperturb::.

NAMESPACE = "fastperturb_triton"

_IMPLS: dict[str, Callable] = {
    "norms": _norms,
    "grad_stats_": _grad_stats,
    "ascent_step_": _ascent_step,
    "restore_": _restore,
    "combine_grads_": _combine_grads,
}


def _schema_of(name: str) -> str:
    """The argument and return part of the schema the compiled extension registered for ``name``."""
    try:
        schema = str(getattr(torch.ops.fastperturb, name).default._schema)
    except (AttributeError, RuntimeError) as e:
        reason = native.load_error or e
        raise ImportError(
            f"fastperturb.ops.triton takes the op schemas from the compiled extension, but "
            f"torch.ops.fastperturb.{name} is not defined ({reason}); build fastperturb._C first"
        ) from e
    return schema[schema.index("("):]


def _already_defined() -> bool:
    try:
        getattr(torch.ops, NAMESPACE).norms
    except (AttributeError, RuntimeError):
        return False
    return True


def _register() -> None:
    if _already_defined():
        return
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    for name, impl in _IMPLS.items():
        qualname = f"{NAMESPACE}::{name}"
        torch.library.define(qualname, _schema_of(name), lib=lib)
        # CompositeExplicitAutograd ("default") serves calls whose lists are all
        # empty (no tensor to dispatch on) and devices without a kernel, which
        # the impl refuses with the reason.
        torch.library.impl(qualname, ("cpu", "cuda", "default"), impl, lib=lib)
    fake.register(NAMESPACE)
    pure.register(NAMESPACE)
    _LIBS.append(lib)


_LIBS: list[torch.library.Library] = []  # keeps the registrations alive
_register()
