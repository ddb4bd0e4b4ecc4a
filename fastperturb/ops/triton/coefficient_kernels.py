"""The Triton kernel of ``ascent_coefficients`` (schemas.h): the l2 ascent step's per-tensor coefficients from
``grad_stats_``'s rows, in float64, following math.h's ``ascent_step_coef``, ``moved_sq``, ``projection_coef``
and ``ball_weight`` operation by operation (float64 division and square root are IEEE-rounded in Triton,
interpreted and compiled). One program walks all ``n`` rows in blocks: ``n`` is the number of tensors, and the
point is one launch where the reference's torch ops take a dozen. The global scope's sums are a per-lane running
sum and a ``tl.sum`` over the lanes: a fixed order for the fixed block and warp count, so reruns are
bit-identical."""

from __future__ import annotations

import triton
import triton.language as tl

DBL_MAX = tl.constexpr(1.7976931348623157e308)  # (a constexpr: jit code may read no other global)


@triton.jit
def _step_coef(eta, gg):
    # eta / sqrt(gg); 0 where NaN or +inf (a zero gradient), the lowest double for -inf (math.h ascent_step_coef)
    a = eta / tl.sqrt(gg)
    return tl.where(a - a == 0.0, a, tl.where(a < 0.0, -DBL_MAX, 0.0))


@triton.jit
def _moved_sq(a, gg, dg, dd):
    # |d + a g|^2 from the row's sums: dd + 2 a dg + a^2 gg, in math.h moved_sq's order
    return dd + 2.0 * a * dg + a * a * gg


@triton.jit
def _projection_coef(r, uu):
    # r / sqrt(max(uu, 0)) beyond the radius, else 1; a NaN uu gives 1 (math.h projection_coef)
    u = tl.sqrt(tl.where(uu < 0.0, 0.0, uu))
    return tl.where(u > r, r / u, 1.0)


@triton.jit
def _ball_weight(r_max, r):
    # (R / r)^2, exactly 1 for r = R, 0 for r = 0 (math.h ball_weight)
    q = r_max / tl.where(r > 0.0, r, 1.0)
    return tl.where(r > 0.0, tl.where(r == r_max, 1.0, q * q), 0.0)


@triton.jit
def _row(stats, i, m):
    gg = tl.load(stats + 3 * i, mask=m, other=0.0).to(tl.float64)
    dg = tl.load(stats + 3 * i + 1, mask=m, other=0.0).to(tl.float64)
    dd = tl.load(stats + 3 * i + 2, mask=m, other=0.0).to(tl.float64)
    return gg, dg, dd


@triton.jit
def _coefficients_kernel(
    stats,
    eta,
    radius,
    step_out,
    proj_out,
    n,
    GLOBAL: tl.constexpr,
    PROJECT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    gg_total = 0.0
    if GLOBAL:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for off in range(0, n, BLOCK):
            i = off + lanes
            acc += tl.load(stats + 3 * i, mask=i < n, other=0.0).to(tl.float64)
        gg_total = tl.sum(acc, axis=0)
    r_max = 0.0
    if PROJECT and GLOBAL:  # the largest radius: the global ball's unit (math.h ball_weight)
        # NaN if any radius is, as the reference's max (then nothing is projected); counted apart, since
        # maximum and max may drop a NaN
        r_acc = tl.zeros([BLOCK], dtype=tl.float64)
        nan_acc = tl.zeros([BLOCK], dtype=tl.int32)
        for off in range(0, n, BLOCK):
            i = off + lanes
            r = tl.load(radius + i, mask=i < n, other=0.0)
            nan_acc += (r != r).to(tl.int32)
            r_acc = tl.maximum(r_acc, tl.where(r != r, 0.0, r))
        r_max = tl.where(tl.sum(nan_acc, axis=0) > 0, float("nan"), tl.max(r_acc, axis=0))
    uu_acc = tl.zeros([BLOCK], dtype=tl.float64)
    for off in range(0, n, BLOCK):
        i = off + lanes
        m = i < n
        gg, dg, dd = _row(stats, i, m)
        e = tl.load(eta + i, mask=m, other=0.0)
        if GLOBAL:
            a = _step_coef(e, gg_total)
        else:
            a = _step_coef(e, gg)
        tl.store(step_out + i, a.to(tl.float32), mask=m)
        if PROJECT:
            uu = _moved_sq(a, gg, dg, dd)
            r = tl.load(radius + i, mask=m, other=0.0)
            if GLOBAL:
                uu_acc += tl.where(m, _ball_weight(r_max, r) * uu, 0.0)
            else:
                tl.store(proj_out + i, _projection_coef(r, uu).to(tl.float32), mask=m)
        else:
            tl.store(proj_out + i, tl.full([BLOCK], 1.0, tl.float32), mask=m)
    if PROJECT and GLOBAL:
        uu_total = tl.sum(uu_acc, axis=0)
        for off in range(0, n, BLOCK):
            i = off + lanes
            m = i < n
            gg, dg, dd = _row(stats, i, m)
            uu = _moved_sq(_step_coef(tl.load(eta + i, mask=m, other=0.0), gg_total), gg, dg, dd)
            r = tl.load(radius + i, mask=m, other=0.0)
            # (math.h global_projection_coef: the weighed ball for r > 0, a radius-0 tensor on its own u)
            proj = tl.where(r > 0.0, _projection_coef(r_max, uu_total), _projection_coef(r, uu))
            tl.store(proj_out + i, proj.to(tl.float32), mask=m)
