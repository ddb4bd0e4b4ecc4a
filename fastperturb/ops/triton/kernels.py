"""The Triton kernels of the fused ops and the fixed-order reduction of
their partials. Each program handles one chunk of one tensor of a pointer
table built by :mod:`.plan`; the arithmetic follows
``csrc/include/fastperturb/math.h`` operation by operation
(``docs/design.md`` §5.2)."""

from __future__ import annotations

import triton
import triton.language as tl

from .memory import load_elem, round_elem, store_elem

#: Tensors the finalize kernel reduces side by side.
FINALIZE_LANES = 128

# --------------------------------------------------------------------------
# Kernels. ``meta`` rows: pointer columns, then numel, first partial slot,
# index in the list. ``work``: (row, chunk) pairs, one per program.


@triton.jit
def _norms_kernel(
    meta,
    work,
    partials,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    ELEM: tl.constexpr,
    ST: tl.constexpr,
    CT: tl.constexpr,
    LINF: tl.constexpr,
    RESTORE: tl.constexpr,
    ITYPE: tl.constexpr,
):
    # RESTORE (restore_norms_lists_): rows (x, params, backups, ...), and params = backups, bit for bit, block by
    # block beside the reduction.
    pid = tl.program_id(0)
    row = tl.load(work + 2 * pid)
    c = tl.load(work + 2 * pid + 1)
    NPTR: tl.constexpr = 3 if RESTORE else 1
    x_ptr = tl.load(meta + (NPTR + 3) * row).to(tl.pointer_type(ST))
    numel = tl.load(meta + (NPTR + 3) * row + NPTR)
    slot = tl.load(meta + (NPTR + 3) * row + NPTR + 1) + c
    if VEC > 1:
        x_ptr = tl.multiple_of(x_ptr, 16)
        numel = tl.multiple_of(numel, VEC)
    if RESTORE:
        w_ptr = tl.load(meta + (NPTR + 3) * row + 1).to(tl.pointer_type(ITYPE))
        b_ptr = tl.load(meta + (NPTR + 3) * row + 2).to(tl.pointer_type(ITYPE))
        if VEC > 1:
            w_ptr = tl.multiple_of(w_ptr, 16)
            b_ptr = tl.multiple_of(b_ptr, 16)
    start = c * CHUNK
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], CT)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + lanes
        m = offs < numel
        x = load_elem(x_ptr, offs, m, ELEM, CT)
        if RESTORE:
            tl.store(w_ptr + offs, tl.load(b_ptr + offs, mask=m), mask=m)
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
        # (the lanes' float sums combined in float64, as the CPU kernels' and the CUDA blocks' lanes: in float, a
        # chunk of values near 1e18 overflowed where the reference's norm is finite)
        r = tl.sum(acc.to(tl.float64), axis=0)
    tl.store(partials + slot, r.to(tl.float64))


@triton.jit
def _grad_stats_kernel(
    meta,
    work,
    scal,
    partials,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    ELEM: tl.constexpr,
    ST: tl.constexpr,
    CT: tl.constexpr,
    HAS_ACC: tl.constexpr,
    ACC_INIT: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    HAS_DELTA: tl.constexpr,
):
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
        g = load_elem(g_ptr, offs, m, ELEM, CT)
        tg = g
        if ADAPTIVE:
            w = load_elem(w_ptr, offs, m, ELEM, CT)
            tg = (tl.where(w < 0, -w, w) + eta) * g
        s0 += tg * tg
        if HAS_DELTA:
            if not ADAPTIVE:
                w = load_elem(w_ptr, offs, m, ELEM, CT)
            d = w - load_elem(b_ptr, offs, m, ELEM, CT)
            s1 += d * g
            s2 += d * d
        if HAS_ACC:
            if ACC_INIT:
                new = weight * g
            else:
                new = load_elem(a_ptr, offs, m, ELEM, CT) + weight * g
            store_elem(a_ptr, offs, new, m, ELEM)
    tl.store(partials + 3 * slot, tl.sum(s0.to(tl.float64), axis=0))
    tl.store(partials + 3 * slot + 1, tl.sum(s1.to(tl.float64), axis=0))
    tl.store(partials + 3 * slot + 2, tl.sum(s2.to(tl.float64), axis=0))


@triton.jit
def _ascent_kernel(
    meta,
    work,
    scal,
    step_coef,
    proj,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    ELEM: tl.constexpr,
    ST: tl.constexpr,
    ITYPE: tl.constexpr,
    CT: tl.constexpr,
    LINF: tl.constexpr,
    FIRST: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    ZERO_GRADS: tl.constexpr,
):
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
        g = load_elem(g_ptr, offs, m, ELEM, CT)
        if FIRST:
            # base = w, delta = 0; the backup gets w's bits unchanged.
            w_bits = tl.load(wbits_ptr + offs, mask=m, other=0)
            if ELEM == tl.bfloat16:
                base = ((w_bits.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
            else:
                base = w_bits.to(ELEM, bitcast=True).to(CT)
            delta = tl.zeros([BLOCK], CT)
        else:
            base = load_elem(b_ptr, offs, m, ELEM, CT)
            delta = load_elem(w_ptr, offs, m, ELEM, CT) - base
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
        store_elem(w_ptr, offs, base + u, m, ELEM)
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
def _combine_kernel(
    meta,
    work,
    scal,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    ELEM: tl.constexpr,
    ST: tl.constexpr,
    CT: tl.constexpr,
):
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
        g = load_elem(g_ptr, offs, m, ELEM, CT)
        store_elem(g_ptr, offs, load_elem(a_ptr, offs, m, ELEM, CT) + weight * g, m, ELEM)


# --------------------------------------------------------------------------
# The SAM-family ops (math.h dot_element, lincomb_element, ema_element).


@triton.jit
def _dot_kernel(
    meta,
    work,
    partials,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    ELEM: tl.constexpr,
    ST: tl.constexpr,
    CT: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(work + 2 * pid)
    c = tl.load(work + 2 * pid + 1)
    x_ptr = tl.load(meta + 5 * row).to(tl.pointer_type(ST))
    y_ptr = tl.load(meta + 5 * row + 1).to(tl.pointer_type(ST))
    numel = tl.load(meta + 5 * row + 2)
    slot = tl.load(meta + 5 * row + 3) + c
    if VEC > 1:
        x_ptr = tl.multiple_of(x_ptr, 16)
        y_ptr = tl.multiple_of(y_ptr, 16)
        numel = tl.multiple_of(numel, VEC)
    start = c * CHUNK
    lanes = tl.arange(0, BLOCK)
    s0 = tl.zeros([BLOCK], CT)
    s1 = tl.zeros([BLOCK], CT)
    s2 = tl.zeros([BLOCK], CT)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + lanes
        m = offs < numel
        x = load_elem(x_ptr, offs, m, ELEM, CT)
        y = load_elem(y_ptr, offs, m, ELEM, CT)
        s0 += x * x
        s1 += x * y
        s2 += y * y
    tl.store(partials + 3 * slot, tl.sum(s0.to(tl.float64), axis=0))
    tl.store(partials + 3 * slot + 1, tl.sum(s1.to(tl.float64), axis=0))
    tl.store(partials + 3 * slot + 2, tl.sum(s2.to(tl.float64), axis=0))


@triton.jit
def _lincomb_kernel(
    meta,
    work,
    coef,
    partials,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    ELEM: tl.constexpr,
    ST: tl.constexpr,
    CT: tl.constexpr,
    HAS_Y: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(work + 2 * pid)
    c = tl.load(work + 2 * pid + 1)
    o_ptr = tl.load(meta + 6 * row).to(tl.pointer_type(ST))
    x_ptr = tl.load(meta + 6 * row + 1).to(tl.pointer_type(ST))
    y_ptr = tl.load(meta + 6 * row + 2).to(tl.pointer_type(ST))
    numel = tl.load(meta + 6 * row + 3)
    slot = tl.load(meta + 6 * row + 4) + c
    index = tl.load(meta + 6 * row + 5)
    if VEC > 1:
        o_ptr = tl.multiple_of(o_ptr, 16)
        x_ptr = tl.multiple_of(x_ptr, 16)
        y_ptr = tl.multiple_of(y_ptr, 16)
        numel = tl.multiple_of(numel, VEC)
    c0f = tl.load(coef + 3 * index)
    # c0 != 0 on its bits, not as a float compare: a NaN c0 reads (and propagates), also where a compiler free to
    # assume no NaNs (LLVM's NoNaNsFPMath, which Triton sets) would fold an unordered != into an ordered one
    read_out = (c0f.to(tl.int32, bitcast=True) & 0x7FFFFFFF) != 0
    c0 = c0f.to(CT)
    c1 = tl.load(coef + 3 * index + 1).to(CT)
    c2 = tl.load(coef + 3 * index + 2).to(CT)
    start = c * CHUNK
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], CT)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + lanes
        m = offs < numel
        v = c1 * load_elem(x_ptr, offs, m, ELEM, CT)
        # c0 == 0: the loaded out values are discarded, whatever the buffer holds
        v = tl.where(read_out, c0 * load_elem(o_ptr, offs, m, ELEM, CT) + v, v)
        if HAS_Y:
            v = v + c2 * load_elem(y_ptr, offs, m, ELEM, CT)
        store_elem(o_ptr, offs, v, m, ELEM)
        stored = tl.where(m, round_elem(v, ELEM, CT), 0.0)
        acc += stored * stored
    tl.store(partials + slot, tl.sum(acc.to(tl.float64), axis=0))


@triton.jit
def _ema_kernel(
    meta,
    work,
    scal,
    partials,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    ELEM: tl.constexpr,
    ST: tl.constexpr,
    CT: tl.constexpr,
    INIT: tl.constexpr,
    ADAPTIVE: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(work + 2 * pid)
    c = tl.load(work + 2 * pid + 1)
    g_ptr = tl.load(meta + 6 * row).to(tl.pointer_type(ST))
    e_ptr = tl.load(meta + 6 * row + 1).to(tl.pointer_type(ST))
    w_ptr = tl.load(meta + 6 * row + 2).to(tl.pointer_type(ST))
    numel = tl.load(meta + 6 * row + 3)
    slot = tl.load(meta + 6 * row + 4) + c
    if VEC > 1:
        g_ptr = tl.multiple_of(g_ptr, 16)
        e_ptr = tl.multiple_of(e_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
        numel = tl.multiple_of(numel, VEC)
    grad_scale = tl.load(scal).to(tl.float64, bitcast=True).to(CT)
    sigma = tl.load(scal + 1).to(tl.float64, bitcast=True).to(CT)
    lmbda = tl.load(scal + 2).to(tl.float64, bitcast=True).to(CT)
    lmbda_c = tl.load(scal + 3).to(tl.float64, bitcast=True).to(CT)
    eta = tl.load(scal + 4).to(tl.float64, bitcast=True).to(CT)
    start = c * CHUNK
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], CT)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + lanes
        m = offs < numel
        g = grad_scale * load_elem(g_ptr, offs, m, ELEM, CT)
        z = g - g
        ok = z == z  # g finite
        if INIT:
            d = g
            mean = tl.where(ok, g, 0.0)
        else:
            mc = load_elem(e_ptr, offs, m, ELEM, CT)
            d = g - sigma * mc
            mean = tl.where(ok, lmbda * mc + lmbda_c * g, mc)
        store_elem(g_ptr, offs, d, m, ELEM)
        store_elem(e_ptr, offs, mean.to(CT), m, ELEM)
        td = tl.where(m, round_elem(d, ELEM, CT), 0.0)
        if ADAPTIVE:
            w = load_elem(w_ptr, offs, m, ELEM, CT)
            td = (tl.where(w < 0, -w, w) + eta) * td
        acc += td * td
    tl.store(partials + slot, tl.sum(acc.to(tl.float64), axis=0))


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
