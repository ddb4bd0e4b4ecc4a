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


@_non_differentiable
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
    """torch.optim.SGD's step taken from ``backups`` into ``params`` in one pass (restore + update)."""
    params, backups, grads, momentum_buffers = list(params), list(backups), list(grads), list(momentum_buffers)
    backend = dispatch.resolve(V.first_device(params))
    if backend in _PY_BACKENDS:
        V.check_restore_sgd_step(params, backups, grads, momentum_buffers, lr, weight_decay, momentum, dampening)
    dispatch.op("restore_sgd_step_", backend)(
        params,
        backups,
        grads,
        momentum_buffers,
        lr=float(lr),
        weight_decay=float(weight_decay),
        momentum=float(momentum),
        dampening=float(dampening),
        nesterov=bool(nesterov),
        maximize=bool(maximize),
        init_momentum=bool(init_momentum),
    )


@_non_differentiable
def restore_adam_step_(
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] = (),
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
    """torch.optim.Adam's (AdamW's) step taken from ``backups`` into ``params`` in one pass (restore + update)."""
    lists = [list(x) for x in (params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)]
    backend = dispatch.resolve(V.first_device(lists[0]))
    if backend in _PY_BACKENDS:
        V.check_restore_adam_step(*lists, lr, beta1, beta2, eps, step, weight_decay)
    dispatch.op("restore_adam_step_", backend)(
        *lists,
        lr=float(lr),
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(eps),
        step=float(step),
        weight_decay=float(weight_decay),
        decoupled_weight_decay=bool(decoupled_weight_decay),
        maximize=bool(maximize),
    )
