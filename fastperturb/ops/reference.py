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
            u = p * u if norm == "l2" else torch.minimum(torch.maximum(u, -p), p)
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
