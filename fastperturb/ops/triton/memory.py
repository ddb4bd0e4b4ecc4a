"""Element access of the Triton kernels: loads that widen a tensor's dtype to
the compute type and stores that round back to nearest even, bfloat16 done by
hand (``docs/design.md`` §5.2)."""

from __future__ import annotations

import triton
import triton.language as tl

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
def load_elem(ptr, offs, mask, ELEM: tl.constexpr, CT: tl.constexpr):
    if ELEM == tl.bfloat16:
        raw = tl.load(ptr + offs, mask=mask, other=0)
        x = ((raw.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0).to(CT)
    return x


@triton.jit
def store_elem(ptr, offs, x, mask, ELEM: tl.constexpr):
    if ELEM == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        tl.store(ptr + offs, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ELEM), mask=mask)


@triton.jit
def round_elem(x, ELEM: tl.constexpr, CT: tl.constexpr):
    """``x`` (compute type) rounded to ELEM as :func:`store_elem` stores it, returned in CT: the value a
    reduction over the stored result sees."""
    if ELEM == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        y = (r << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(ELEM).to(CT)
    return y
