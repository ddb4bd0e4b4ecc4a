"""Pure-PyTorch reference of every fused op: the executable spec.

Each function here is short and obviously correct; it loops over the tensor list
in Python and computes in float64. Every backend (C++ CPU, CUDA, Triton) is
tested against these functions. The schemas live in
``csrc/include/fastperturb/schemas.h``; ``docs/design.md`` §3 states the contract.

Conventions shared by all ops:

* Tensor lists are parallel: ``params[i]``, ``grads[i]``, ``backups[i]`` and
  ``accum[i]`` describe the same layer (same shape, dtype and device).
* Per-tensor coefficients (``step_coef``, ``proj``) are float32 tensors of
  shape ``[n]`` on the tensors' device.
* Reductions return float32; they accumulate in at least float32 (the
  reference uses float64).
* Element-wise results are computed in float32 (float64 for float64 tensors)
  and rounded once to the tensor's dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .names import OPS
from .validation import first_device

__all__ = list(OPS)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def norms(tensors: Sequence[Tensor], ord: float) -> tuple[Tensor, Tensor]:
    """Per-tensor ``ord``-norms (float32 ``[n]``) and the norm of the whole list."""
    if ord not in (2.0, math.inf):
        raise ValueError(f"ord must be 2 or inf, got {ord}")
    dev = first_device(tensors)
    per = []
    for x in tensors:
        x64 = x.detach().to(torch.float64).reshape(-1)
        if x64.numel() == 0:
            per.append(torch.zeros((), dtype=torch.float64, device=dev))
        elif ord == 2.0:
            per.append(x64.square().sum().sqrt())
        else:
            a = x64.abs()
            # max() ignores nothing: a NaN anywhere gives NaN.
            per.append(a.max() if not a.isnan().any() else torch.tensor(math.nan, dtype=torch.float64, device=dev))
    per64 = torch.stack(per) if per else torch.zeros(0, dtype=torch.float64, device=dev)
    if per64.numel() == 0:
        total = torch.zeros((), dtype=torch.float64, device=dev)
    elif ord == 2.0:
        total = per64.square().sum().sqrt()
    else:
        total = per64.max() if not per64.isnan().any() else per64.new_tensor(math.nan)
    return per64.float(), total.float()


def grad_stats_(
    grads: Sequence[Tensor],
    accum: Sequence[Tensor],
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    *,
    accum_weight: float = 1.0,
    accum_init: bool = False,
    adaptive_eta: float = -1.0,
) -> Tensor:
    """Statistics of the gradients for the next ascent step, plus accumulation.

    Returns float32 ``[n, 3]``: ``sum((t*g)**2)``, ``sum(d*g)``, ``sum(d**2)`` per
    tensor, with ``d = params - backups`` (0 if those lists are empty) and
    ``t = |params| + adaptive_eta`` if ``adaptive_eta >= 0`` else 1.
    If ``accum`` is non-empty, ``accum = w*g`` (``accum_init``) or ``accum += w*g``.
    """
    n = len(grads)
    dev = first_device(grads)
    out = torch.zeros(n, 3, dtype=torch.float64, device=dev)
    for i, g in enumerate(grads):
        g64 = g.detach().to(torch.float64)
        tg = g64
        if adaptive_eta >= 0:
            tg = (params[i].detach().to(torch.float64).abs() + adaptive_eta) * g64
        out[i, 0] = tg.square().sum()
        if len(backups):
            d = params[i].detach().to(torch.float64) - backups[i].to(torch.float64)
            out[i, 1] = (d * g64).sum()
            out[i, 2] = d.square().sum()
        if len(accum):
            cd = _compute_dtype(accum[i])
            gc = g.detach().to(cd)
            new = accum_weight * gc if accum_init else accum[i].to(cd) + accum_weight * gc
            accum[i].copy_(new)
    return out.float()


def ascent_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    step_coef: Tensor,
    proj: Tensor,
    *,
    norm: str = "l2",
    first: bool = False,
    adaptive_eta: float = -1.0,
    zero_grads: bool = False,
) -> None:
    """One projected ascent step in place (the formula: ``csrc/include/fastperturb/schemas.h``)."""
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    for i, (w, g, b) in enumerate(zip(params, grads, backups)):
        cd = _compute_dtype(w)
        with torch.no_grad():
            wc = w.to(cd)
            base = wc if first else b.to(cd)
            delta = torch.zeros_like(wc) if first else wc - base
            gc = g.to(cd)
            # sign() keeping NaN as NaN (torch.sign maps NaN to 0): a NaN gradient
            # must never look like "no move".
            direction = gc if norm == "l2" else torch.where(gc.isnan(), gc, torch.sign(gc))
            if adaptive_eta >= 0:
                direction = (base.abs() + adaptive_eta).square() * gc
            a = step_coef[i].to(cd)
            p = proj[i].to(cd)
            u = delta + a * direction
            # the kernels' clamp (math.h clamp_sym): a NaN in u stays NaN; a NaN radius clamps nothing
            u = p * u if norm == "l2" else torch.where(u < -p, -p, torch.where(u > p, p, u))
            if first:
                b.copy_(w)
            w.copy_(base + u)
            if zero_grads:
                g.zero_()


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """``params = backups`` bit for bit."""
    with torch.no_grad():
        for w, b in zip(params, backups):
            w.copy_(b)


def combine_grads_(grads: Sequence[Tensor], accum: Sequence[Tensor], weight: float) -> None:
    """``grads = accum + weight * grads``."""
    with torch.no_grad():
        for g, a in zip(grads, accum):
            cd = _compute_dtype(g)
            g.copy_(a.to(cd) + weight * g.to(cd))


def dot_stats(x: Sequence[Tensor], y: Sequence[Tensor]) -> Tensor:
    """float32 ``[n, 3]``: ``[sum x*x, sum x*y, sum y*y]`` per tensor pair."""
    dev = first_device(x)
    out = torch.zeros(len(x), 3, dtype=torch.float64, device=dev)
    for i, (a, b) in enumerate(zip(x, y)):
        a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
        out[i, 0] = a64.square().sum()
        out[i, 1] = (a64 * b64).sum()
        out[i, 2] = b64.square().sum()
    return out.float()


def lincomb_(out: Sequence[Tensor], x: Sequence[Tensor], y: Sequence[Tensor], coef: Tensor) -> Tensor:
    """``out = c0*out + c1*x + c2*y`` per tensor with ``(c0, c1, c2) = coef[i]``; returns float32 ``[n]`` of
    ``sum out**2`` over the stored values.

    ``c0 == 0`` exactly: ``out`` is not read (a NaN in it does not leak). No ``y``: no ``c2`` term. The terms
    are added left to right in the compute dtype and rounded once.
    """
    sq = torch.zeros(len(out), dtype=torch.float64, device=first_device(out))
    with torch.no_grad():
        for i, o in enumerate(out):
            cd = _compute_dtype(o)
            c0, c1, c2 = (c.to(cd) for c in coef[i].unbind())
            new = c1 * x[i].to(cd)
            if bool(c0 != 0):
                new = c0 * o.to(cd) + new
            if len(y):
                new = new + c2 * y[i].to(cd)
            o.copy_(new)
            sq[i] = o.to(torch.float64).square().sum()
    return sq.float()


def ema_residual_(
    grads: Sequence[Tensor],
    ema: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    sigma: float,
    lmbda: float,
    init: bool,
    grad_scale: float = 1.0,
    adaptive_eta: float = -1.0,
) -> Tensor:
    """FriendlySAM's residual of the gradient against its running mean, in place.

    Per element, ``g = grad_scale * grads`` and ``m = ema``: ``init``: ``m = g``, ``d = g``; else
    ``d = g - sigma*m`` and ``m = lmbda*m + (1 - lmbda)*g``; then ``grads = d``. Where ``g`` is not finite
    ``m`` keeps its value (``init``: becomes 0), so a bad gradient never poisons the running mean; ``d`` is
    still written and non-finite. Returns float32 ``[n]``: ``sum (t*d)**2`` per tensor over the stored ``d``,
    ``t = |params| + adaptive_eta`` if ``adaptive_eta >= 0`` else 1.
    """
    stat = torch.zeros(len(grads), dtype=torch.float64, device=first_device(grads))
    with torch.no_grad():
        for i, (gr, m) in enumerate(zip(grads, ema)):
            cd = _compute_dtype(gr)
            g = torch.tensor(grad_scale, dtype=cd) * gr.to(cd)
            ok = g.isfinite()
            if init:
                d = g
                m_new = torch.where(ok, g, torch.zeros_like(g))
            else:
                mc = m.to(cd)
                d = g - torch.tensor(sigma, dtype=cd) * mc
                blend = torch.tensor(lmbda, dtype=cd) * mc + torch.tensor(1.0 - lmbda, dtype=cd) * g
                m_new = torch.where(ok, blend, mc)
            m.copy_(m_new)
            gr.copy_(d)
            d64 = gr.to(torch.float64)
            if adaptive_eta >= 0:
                d64 = (params[i].to(torch.float64).abs() + adaptive_eta) * d64
            stat[i] = d64.square().sum()
    return stat.float()


def _coef(x: float, cd: torch.dtype) -> Tensor:
    """A hyperparameter rounded to the compute dtype once, as the kernels convert it (step_math.h)."""
    return torch.tensor(x, dtype=cd)


def restore_sgd_step_(
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    init_momentum: bool = False,
) -> None:
    """torch.optim.SGD's single-tensor step taken from the backups (the restore folded in).

    ``params = b - lr * d`` with ``d`` the SGD direction of ``g`` at ``b``; the momentum buffer as torch
    keeps it (``init_momentum``: the buffer is new and becomes the direction's ``g``)."""
    with torch.no_grad():
        for i, (w, b, g) in enumerate(zip(params, backups, grads)):
            cd = _compute_dtype(w)
            base = b.to(cd, copy=True)  # read before any write: b may be w itself
            gc = g.to(cd, copy=True)
            if maximize:
                gc = -gc
            if weight_decay != 0:
                gc = gc + _coef(weight_decay, cd) * base
            if momentum != 0:
                buf = momentum_buffers[i]
                mom = _coef(momentum, cd)
                new_buf = gc if init_momentum else buf.to(cd) * mom + _coef(1.0 - dampening, cd) * gc
                gc = gc + mom * new_buf if nesterov else new_buf
                buf.copy_(new_buf)
            w.copy_(base + _coef(-lr, cd) * gc)


def _sqrt_rn(x: Tensor) -> Tensor:
    """The correctly rounded square root (IEEE, as the kernels' sqrt). torch.sqrt's vectorised CPU
    kernels may be an ulp off (measured here: about 20% of float32 and 1% of float64 elements), which the
    cancellation in ``w - step * m / denom`` can turn into a large relative error of a small weight.
    float32: the float64 root rounded once is the correctly rounded float32 root; float64: Python's
    math.sqrt element by element (slow, but this is the spec)."""
    if x.dtype == torch.float32:
        return x.double().sqrt().float()
    flat = [math.sqrt(v) if v >= 0 else math.nan for v in x.reshape(-1).tolist()]
    return torch.tensor(flat, dtype=x.dtype, device=x.device).reshape(x.shape)


def _lerp(a: Tensor, b: Tensor, weight: Tensor) -> Tensor:
    """torch.lerp's two formulas, split at weight 0.5."""
    return a + weight * (b - a) if float(weight) < 0.5 else b - (b - a) * (1 - weight)


def restore_adam_step_(
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> None:
    """torch.optim.Adam's single-tensor step (AdamW: ``decoupled_weight_decay``) taken from the backups.

    ``step`` is the step count after its increment, the same for every tensor of the call;
    amsgrad when ``max_exp_avg_sqs`` is non-empty."""
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    decay_factor = 1 - lr * weight_decay if decoupled_weight_decay and weight_decay != 0 else 1.0
    l2 = 0.0 if decoupled_weight_decay else weight_decay
    with torch.no_grad():
        for i, (w, b, g) in enumerate(zip(params, backups, grads)):
            cd = _compute_dtype(w)
            base = b.to(cd, copy=True)
            gc = g.to(cd, copy=True)
            if maximize:
                gc = -gc
            if decay_factor != 1.0:
                base = base * _coef(decay_factor, cd)
            if l2 != 0:
                gc = gc + _coef(l2, cd) * base
            m = _lerp(exp_avgs[i].to(cd), gc, _coef(1 - beta1, cd))
            v = exp_avg_sqs[i].to(cd) * _coef(beta2, cd) + _coef(1 - beta2, cd) * gc * gc
            s = v
            if len(max_exp_avg_sqs):
                s = torch.maximum(max_exp_avg_sqs[i].to(cd), v)
                max_exp_avg_sqs[i].copy_(s)
            denom = _sqrt_rn(s) / _coef(bias_correction2_sqrt, cd) + _coef(eps, cd)
            exp_avgs[i].copy_(m)
            exp_avg_sqs[i].copy_(v)
            w.copy_(base + _coef(-(lr / bias_correction1), cd) * m / denom)


def ascent_coefficients(
    stats: Tensor, step_size: Tensor, radius: Tensor, *, global_scope: bool, project: bool
) -> tuple[Tensor, Tensor]:
    """The l2 ascent step's per-tensor ``(step_coef, proj)`` (float32 ``[n]``) from ``grad_stats_``'s rows
    ``[gg, dg, dd]`` and the float64 ``[n]`` step sizes and radii: not a list op (see schemas.h). Torch ops on
    ``[n]``-vectors, in float64; the path of torch.compile and of devices without a native kernel."""
    s = stats.to(torch.float64)
    gg = s[:, 0]
    gnorm = (gg.sum() if global_scope else gg).sqrt()
    # eta / ||g||, and 0 where ||g|| = 0 (eta/0 is inf, or NaN for eta = 0): the steps are finite otherwise.
    step = (step_size / gnorm).nan_to_num_(nan=0.0, posinf=0.0)
    if not project:
        return step.float(), torch.ones(step.shape, dtype=torch.float32, device=step.device)
    uu = s[:, 2] + 2 * step * s[:, 1] + step * step * gg
    own = uu.clamp_min(0).sqrt()
    own_proj = torch.where(own > radius, radius / own, 1.0)
    if not global_scope or radius.numel() == 0:
        return step.float(), own_proj.float()
    # The global ball with per-tensor radii (a param group's own eps) is the ellipsoid sum_i ||u_i||^2 / r_i^2 <= 1:
    # the u^2 terms are summed in units of the largest radius R, each weighed (R / r_i)^2, exactly 1 for r_i = R, so
    # one shared radius sums and projects as a plain ball. A tensor of radius 0 may not move: it is left out of the
    # sum and projected on its own (math.h ball_weight, global_projection_coef).
    r_max = radius.max()
    q = r_max / radius
    weight = torch.where(radius > 0, torch.where(radius == r_max, 1.0, q * q), 0.0)
    total = (weight * uu).sum().clamp_min(0).sqrt()
    proj = torch.where(radius > 0, torch.where(total > r_max, r_max / total, 1.0), own_proj)
    return step.float(), proj.float()
