"""The fused op set, as called by the rest of fastperturb.

Each function picks the backend for the tensors' device
(:mod:`fastperturb.ops.dispatch`) and runs it. The semantics are those of
:mod:`fastperturb.ops.reference`; the schemas are in
``csrc/include/fastperturb/schemas.h`` (``docs/design.md`` §3).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import dispatch, fake, native, pure
from . import validation as V

if native.load_error is None:
    fake.register("fastperturb")
    pure.register("fastperturb")

# The C++, CUDA and Triton ops validate their own arguments (they follow raw
# pointers and may be called directly through torch.ops); the reference is
# checked here so every backend rejects bad input alike.
_PY_BACKENDS = ("reference",)


def _non_differentiable(fn):
    """The ops are not differentiable: run them outside autograd so no backend's
    outputs require grad and in-place writes to leaf parameters are allowed."""

    def wrapper(*args, **kwargs):
        # A fresh context manager per call: torch.compile traces one created inside the
        # compiled region but graph-breaks on a shared instance created outside it.
        with torch.no_grad():
            return fn(*args, **kwargs)

    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    wrapper.__wrapped__ = fn
    return wrapper


@_non_differentiable
def norms(tensors: Sequence[Tensor], ord: float = 2.0) -> tuple[Tensor, Tensor]:
    """Per-tensor norms (float32 ``[n]``) and the global norm (float32 scalar); ``ord`` is 2 or inf."""
    tensors = list(tensors)
    backend = dispatch.resolve(V.first_device(tensors))
    if backend in _PY_BACKENDS:
        V.check_norms(tensors, ord)
    return dispatch.op("norms", backend)(tensors, float(ord))


@_non_differentiable
def grad_stats_(
    grads: Sequence[Tensor],
    accum: Sequence[Tensor] = (),
    params: Sequence[Tensor] = (),
    backups: Sequence[Tensor] = (),
    *,
    accum_weight: float = 1.0,
    accum_init: bool = False,
    adaptive_eta: float = -1.0,
) -> Tensor:
    """float32 ``[n, 3]`` of ``[sum (t g)^2, sum d g, sum d^2]``; optionally ``accum (+)= w g``."""
    grads, accum, params, backups = list(grads), list(accum), list(params), list(backups)
    backend = dispatch.resolve(V.first_device(grads, params))
    if backend in _PY_BACKENDS:
        V.check_grad_stats(grads, accum, params, backups, accum_weight, adaptive_eta)
    elif not accum and torch.compiler.is_compiling():
        # Nothing to accumulate: the non-mutating twin, which inductor can lower (see ops/pure.py).
        return dispatch.op("grad_stats", backend)(grads, params, backups, adaptive_eta=float(adaptive_eta))
    return dispatch.op("grad_stats_", backend)(
        grads,
        accum,
        params,
        backups,
        accum_weight=float(accum_weight),
        accum_init=bool(accum_init),
        adaptive_eta=float(adaptive_eta),
    )


@_non_differentiable
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
    """One projected ascent step on ``params`` in place (``first`` also fills ``backups``)."""
    params, grads, backups = list(params), list(grads), list(backups)
    backend = dispatch.resolve(V.first_device(params))
    if backend in _PY_BACKENDS:
        V.check_ascent_step(params, grads, backups, step_coef, proj, norm, adaptive_eta)
    dispatch.op("ascent_step_", backend)(
        params,
        grads,
        backups,
        step_coef,
        proj,
        norm=norm,
        first=bool(first),
        adaptive_eta=float(adaptive_eta),
        zero_grads=bool(zero_grads),
    )


@_non_differentiable
def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """``params = backups``, bit for bit."""
    params, backups = list(params), list(backups)
    backend = dispatch.resolve(V.first_device(params))
    if backend in _PY_BACKENDS:
        V.check_restore(params, backups)
    dispatch.op("restore_", backend)(params, backups)


@_non_differentiable
def combine_grads_(grads: Sequence[Tensor], accum: Sequence[Tensor], weight: float) -> None:
    """``grads = accum + weight * grads``."""
    grads, accum = list(grads), list(accum)
    backend = dispatch.resolve(V.first_device(grads))
    if backend in _PY_BACKENDS:
        V.check_combine_grads(grads, accum, weight)
    dispatch.op("combine_grads_", backend)(grads, accum, float(weight))


# TEMPORARY (samfam-ops step 1): the SAM-family ops have no C++/CUDA/Triton kernels yet, so every backend
# runs them in the reference; step 2 adds the kernels and removes this set.
_REFERENCE_ONLY = frozenset({"dot_stats", "lincomb_", "ema_residual_"})


def _backend_for(name: str, device: torch.device) -> str:
    backend = dispatch.resolve(device)
    return "reference" if name in _REFERENCE_ONLY else backend


@_non_differentiable
def dot_stats(x: Sequence[Tensor], y: Sequence[Tensor]) -> Tensor:
    """float32 ``[n, 3]`` of ``[sum x*x, sum x*y, sum y*y]`` per tensor pair (read-only)."""
    x, y = list(x), list(y)
    backend = _backend_for("dot_stats", V.first_device(x))
    if backend in _PY_BACKENDS:
        V.check_dot_stats(x, y)
    return dispatch.op("dot_stats", backend)(x, y)


@_non_differentiable
def lincomb_(out: Sequence[Tensor], x: Sequence[Tensor], y: Sequence[Tensor], coef: Tensor) -> Tensor:
    """``out = c0*out + c1*x + c2*y`` per tensor (``coef`` float32 ``[n, 3]``; ``out`` not read where ``c0 == 0``;
    ``y`` may be empty). Returns float32 ``[n]``: ``sum out**2`` of the new values."""
    out, x, y = list(out), list(x), list(y)
    backend = _backend_for("lincomb_", V.first_device(out))
    if backend in _PY_BACKENDS:
        V.check_lincomb(out, x, y, coef)
    return dispatch.op("lincomb_", backend)(out, x, y, coef)


@_non_differentiable
def ema_residual_(
    grads: Sequence[Tensor],
    ema: Sequence[Tensor],
    params: Sequence[Tensor] = (),
    *,
    sigma: float,
    lmbda: float,
    init: bool,
    grad_scale: float = 1.0,
    adaptive_eta: float = -1.0,
) -> Tensor:
    """FriendlySAM: ``grads = g - sigma*ema`` and ``ema = lmbda*ema + (1-lmbda)*g`` (``g = grad_scale*grads``;
    ``init``: ``ema = grads = g``); ``ema`` keeps its value where ``g`` is not finite. Returns float32 ``[n]``:
    ``sum (t*grads)**2`` (``t = |params| + adaptive_eta`` if ``adaptive_eta >= 0``, else 1)."""
    grads, ema, params = list(grads), list(ema), list(params)
    backend = _backend_for("ema_residual_", V.first_device(grads, params))
    if backend in _PY_BACKENDS:
        V.check_ema_residual(grads, ema, params, sigma, lmbda, grad_scale, adaptive_eta)
    return dispatch.op("ema_residual_", backend)(
        grads,
        ema,
        params,
        sigma=float(sigma),
        lmbda=float(lmbda),
        init=bool(init),
        grad_scale=float(grad_scale),
        adaptive_eta=float(adaptive_eta),
    )
