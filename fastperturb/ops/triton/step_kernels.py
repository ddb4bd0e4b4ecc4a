"""The Triton kernels of the fused restore + base-optimizer steps (``restore_sgd_step_``,
``restore_adam_step_``). One program handles one chunk of one tensor of the plan's pointer table
(:mod:`.plan`); the arithmetic follows ``csrc/include/fastperturb/step_math.h`` operation by
operation, with IEEE-rounded division and square root (``div_rn``/``sqrt_rn`` for float32), so the
results match the reference and the C++ kernels bit for bit. ``scal`` holds the per-call
coefficients as float64 bits, computed on the host as step_math.h's ``sgd_coefs``/``adam_coefs`` do."""

from __future__ import annotations

import triton
import triton.language as tl

from .memory import load_elem, store_elem


@triton.jit
def _coef(scal, i, CT: tl.constexpr):
    return tl.load(scal + i).to(tl.float64, bitcast=True).to(CT)


@triton.jit
def _sgd_step_kernel(
    meta,
    work,
    scal,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    ELEM: tl.constexpr,
    ST: tl.constexpr,
    CT: tl.constexpr,
    MOMENTUM: tl.constexpr,
    INIT: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECAY: tl.constexpr,
):
    # meta rows: params, backups, grads, momentum buffers (0 if absent), numel, slot, index
    pid = tl.program_id(0)
    row = tl.load(work + 2 * pid)
    c = tl.load(work + 2 * pid + 1)
    w_ptr = tl.load(meta + 7 * row).to(tl.pointer_type(ST))
    b_ptr = tl.load(meta + 7 * row + 1).to(tl.pointer_type(ST))
    g_ptr = tl.load(meta + 7 * row + 2).to(tl.pointer_type(ST))
    m_ptr = tl.load(meta + 7 * row + 3).to(tl.pointer_type(ST))
    numel = tl.load(meta + 7 * row + 4)
    if VEC > 1:
        w_ptr = tl.multiple_of(w_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        numel = tl.multiple_of(numel, VEC)
    neg_lr = _coef(scal, 0, CT)
    wd = _coef(scal, 1, CT)
    mom = _coef(scal, 2, CT)
    one_minus_damp = _coef(scal, 3, CT)
    start = c * CHUNK
    lanes = tl.arange(0, BLOCK)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + lanes
        m = offs < numel
        b = load_elem(b_ptr, offs, m, ELEM, CT)
        g = load_elem(g_ptr, offs, m, ELEM, CT)
        if MAXIMIZE:
            g = -g
        if DECAY:
            g = g + wd * b
        if MOMENTUM:
            if INIT:
                buf = g
            else:
                buf = load_elem(m_ptr, offs, m, ELEM, CT) * mom + one_minus_damp * g
            store_elem(m_ptr, offs, buf, m, ELEM)
            if NESTEROV:
                g = g + mom * buf
            else:
                g = buf
        store_elem(w_ptr, offs, b + neg_lr * g, m, ELEM)


@triton.jit
def _adam_step_kernel(
    meta,
    work,
    scal,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    ELEM: tl.constexpr,
    ST: tl.constexpr,
    CT: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    L2: tl.constexpr,
    DECOUPLED: tl.constexpr,
):
    # meta rows: params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs (0 if absent),
    # numel, slot, index
    pid = tl.program_id(0)
    row = tl.load(work + 2 * pid)
    c = tl.load(work + 2 * pid + 1)
    w_ptr = tl.load(meta + 9 * row).to(tl.pointer_type(ST))
    b_ptr = tl.load(meta + 9 * row + 1).to(tl.pointer_type(ST))
    g_ptr = tl.load(meta + 9 * row + 2).to(tl.pointer_type(ST))
    m_ptr = tl.load(meta + 9 * row + 3).to(tl.pointer_type(ST))
    v_ptr = tl.load(meta + 9 * row + 4).to(tl.pointer_type(ST))
    x_ptr = tl.load(meta + 9 * row + 5).to(tl.pointer_type(ST))
    numel = tl.load(meta + 9 * row + 6)
    if VEC > 1:
        w_ptr = tl.multiple_of(w_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        x_ptr = tl.multiple_of(x_ptr, 16)
        numel = tl.multiple_of(numel, VEC)
    wd = _coef(scal, 0, CT)
    decay = _coef(scal, 1, CT)
    omb1 = _coef(scal, 2, CT)
    beta2 = _coef(scal, 3, CT)
    omb2 = _coef(scal, 4, CT)
    bc2_sqrt = _coef(scal, 5, CT)
    eps = _coef(scal, 6, CT)
    neg_step = _coef(scal, 7, CT)
    start = c * CHUNK
    lanes = tl.arange(0, BLOCK)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + lanes
        m = offs < numel
        w = load_elem(b_ptr, offs, m, ELEM, CT)
        g = load_elem(g_ptr, offs, m, ELEM, CT)
        if MAXIMIZE:
            g = -g
        if DECOUPLED:
            w = w * decay
        if L2:
            g = g + wd * w
        ea = load_elem(m_ptr, offs, m, ELEM, CT)
        # torch.lerp's two formulas, split at weight 0.5
        ea = tl.where(omb1 < 0.5, ea + omb1 * (g - ea), g - (g - ea) * (1.0 - omb1))
        v = load_elem(v_ptr, offs, m, ELEM, CT) * beta2 + omb2 * g * g
        s = v
        if AMSGRAD:
            vmax = load_elem(x_ptr, offs, m, ELEM, CT)
            # math.h max_nan(vmax, v)
            s = tl.where(vmax != vmax, vmax, tl.where(v != v, v, tl.where(vmax > v, vmax, v)))
            store_elem(x_ptr, offs, s, m, ELEM)
        if CT == tl.float32:
            denom = tl.math.div_rn(tl.math.sqrt_rn(s), bc2_sqrt) + eps
            nw = w + tl.math.div_rn(neg_step * ea, denom)
        else:
            denom = tl.sqrt(s) / bc2_sqrt + eps
            nw = w + neg_step * ea / denom
        store_elem(m_ptr, offs, ea, m, ELEM)
        store_elem(v_ptr, offs, v, m, ELEM)
        store_elem(w_ptr, offs, nw, m, ELEM)
