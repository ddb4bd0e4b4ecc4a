"""The five fused ops on the Triton kernels, one function per op named as the
op (the registration takes them by :data:`fastperturb.ops.names.OPS`). Each
validates its arguments (the kernels follow raw pointers, so a bad list must
never reach them, whoever calls the op) and refuses a device it cannot run on,
before writing anything."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .. import validation as V
from .kernels import (
    FINALIZE_LANES,
    _ascent_kernel,
    _combine_kernel,
    _finalize_kernel,
    _grad_stats_kernel,
    _norms_kernel,
    _restore_kernel,
)
from .plan import INT_OF_SIZE, TYPES, Plan
from .runtime import launch, why_unavailable

#: The op namespace of the Triton backend: ``torch.ops.fastperturb_triton.*``.
NAMESPACE = "fastperturb_triton"


def _device_guard(op: str, device: torch.device):
    """Refuse devices the kernels cannot run on (before anything is written); select the CUDA device."""
    reason = why_unavailable(device)
    if reason is not None:
        raise NotImplementedError(f"{NAMESPACE}::{op} cannot run on {device.type} tensors: {reason}")
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _finalize(plan: Plan, partials: Tensor, out: Tensor, total: Tensor, ncol: int, mode: int) -> None:
    launch(_finalize_kernel, 1, partials, plan.pbase, out, total, plan.n, NCOL=ncol, MODE=mode, TB=FINALIZE_LANES)


def norms(tensors: list[Tensor], ord: float) -> tuple[Tensor, Tensor]:
    V.check_norms(tensors, ord)
    device = V.first_device(tensors)
    with _device_guard("norms", device):
        n = len(tensors)
        per = torch.empty(n, dtype=torch.float32, device=device)
        total = torch.empty((), dtype=torch.float32, device=device)
        if n == 0:
            return per, total.zero_()
        linf = math.isinf(ord)
        plan = Plan(device, [tensors], [t.dtype for t in tensors])
        partials = torch.empty(max(plan.slots, 1), dtype=torch.float64, device=device)
        for grp in plan.groups:
            elem, st, _, ct = TYPES[grp.key]
            launch(
                _norms_kernel,
                grp.programs,
                grp.meta,
                grp.work,
                partials,
                CHUNK=plan.chunk,
                BLOCK=plan.block,
                VEC=grp.vec,
                ELEM=elem,
                ST=st,
                CT=ct,
                LINF=linf,
            )
        _finalize(plan, partials, per, total, 1, 1 if linf else 0)
    return per, total


def grad_stats_(
    grads: list[Tensor],
    accum: list[Tensor],
    params: list[Tensor],
    backups: list[Tensor],
    *,
    accum_weight: float = 1.0,
    accum_init: bool = False,
    adaptive_eta: float = -1.0,
) -> Tensor:
    V.check_grad_stats(grads, accum, params, backups, accum_weight, adaptive_eta)
    device = V.first_device(grads, accum, params, backups)
    with _device_guard("grad_stats_", device):
        n = len(grads)
        out = torch.empty(n, 3, dtype=torch.float32, device=device)
        if n == 0:
            return out
        plan = Plan(
            device, [grads, accum, params, backups], [g.dtype for g in grads], scalars=(accum_weight, adaptive_eta)
        )
        partials = torch.empty(max(plan.slots, 1), 3, dtype=torch.float64, device=device)
        for grp in plan.groups:
            elem, st, _, ct = TYPES[grp.key]
            launch(
                _grad_stats_kernel,
                grp.programs,
                grp.meta,
                grp.work,
                plan.scal,
                partials,
                CHUNK=plan.chunk,
                BLOCK=plan.block,
                VEC=grp.vec,
                ELEM=elem,
                ST=st,
                CT=ct,
                HAS_ACC=bool(accum),
                ACC_INIT=bool(accum) and bool(accum_init),
                ADAPTIVE=adaptive_eta >= 0,
                HAS_DELTA=bool(backups),
            )
        _finalize(plan, partials, out, out, 3, 2)
    return out


def ascent_step_(
    params: list[Tensor],
    grads: list[Tensor],
    backups: list[Tensor],
    step_coef: Tensor,
    proj: Tensor,
    *,
    norm: str = "l2",
    first: bool = False,
    adaptive_eta: float = -1.0,
    zero_grads: bool = False,
) -> None:
    V.check_ascent_step(params, grads, backups, step_coef, proj, norm, adaptive_eta)
    if not params:
        return
    device = params[0].device
    with _device_guard("ascent_step_", device):
        plan = Plan(device, [params, grads, backups], [w.dtype for w in params], scalars=(adaptive_eta,))
        for grp in plan.groups:
            elem, st, itype, ct = TYPES[grp.key]
            launch(
                _ascent_kernel,
                grp.programs,
                grp.meta,
                grp.work,
                plan.scal,
                step_coef,
                proj,
                CHUNK=plan.chunk,
                BLOCK=plan.block,
                VEC=grp.vec,
                ELEM=elem,
                ST=st,
                ITYPE=itype,
                CT=ct,
                LINF=norm == "linf",
                FIRST=bool(first),
                ADAPTIVE=adaptive_eta >= 0,
                ZERO_GRADS=bool(zero_grads),
            )


def restore_(params: list[Tensor], backups: list[Tensor]) -> None:
    V.check_restore(params, backups)
    if not params:
        return
    device = params[0].device
    with _device_guard("restore_", device):
        plan = Plan(device, [params, backups], [w.element_size() for w in params])
        for grp in plan.groups:
            launch(
                _restore_kernel,
                grp.programs,
                grp.meta,
                grp.work,
                CHUNK=plan.chunk,
                BLOCK=plan.block,
                VEC=grp.vec,
                ITYPE=INT_OF_SIZE[grp.key],
            )


def combine_grads_(grads: list[Tensor], accum: list[Tensor], weight: float) -> None:
    V.check_combine_grads(grads, accum, weight)
    if not grads:
        return
    device = grads[0].device
    with _device_guard("combine_grads_", device):
        plan = Plan(device, [grads, accum], [g.dtype for g in grads], scalars=(weight,))
        for grp in plan.groups:
            elem, st, _, ct = TYPES[grp.key]
            launch(
                _combine_kernel,
                grp.programs,
                grp.meta,
                grp.work,
                plan.scal,
                CHUNK=plan.chunk,
                BLOCK=plan.block,
                VEC=grp.vec,
                ELEM=elem,
                ST=st,
                CT=ct,
            )


# TEMPORARY (samfam-ops step 1): the SAM-family ops run the reference until their Triton kernels land
# (step 2); the registration needs a function per op of the op set.


def dot_stats(x: list[Tensor], y: list[Tensor]) -> Tensor:
    from .. import reference

    V.check_dot_stats(x, y)
    return reference.dot_stats(x, y)


def lincomb_(out: list[Tensor], x: list[Tensor], y: list[Tensor], coef: Tensor) -> Tensor:
    from .. import reference

    V.check_lincomb(out, x, y, coef)
    return reference.lincomb_(out, x, y, coef)


def ema_residual_(grads, ema, params, *, sigma, lmbda, init, grad_scale=1.0, adaptive_eta=-1.0) -> Tensor:
    from .. import reference

    V.check_ema_residual(grads, ema, params, sigma, lmbda, grad_scale, adaptive_eta)
    return reference.ema_residual_(
        grads, ema, params, sigma=sigma, lmbda=lmbda, init=init, grad_scale=grad_scale, adaptive_eta=adaptive_eta
    )
