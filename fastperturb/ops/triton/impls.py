"""The fused ops on the Triton kernels, one function per op named as the
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
    _dot_kernel,
    _ema_kernel,
    _finalize_kernel,
    _grad_stats_kernel,
    _lincomb_kernel,
    _norms_kernel,
    _restore_kernel,
)
from .plan import INT_OF_SIZE, TYPES, Plan
from .runtime import Tuning, launch, why_unavailable

#: The op namespace of the Triton backend: ``torch.ops.fastperturb_triton.*``.
NAMESPACE = "fastperturb_triton"


def _device_guard(op: str, device: torch.device):
    """Refuse devices the kernels cannot run on (before anything is written); select the CUDA device."""
    if device.type == "cpu" and _cpu_ok:
        return _NO_GUARD
    reason = why_unavailable(device)
    if reason is not None:
        raise NotImplementedError(f"{NAMESPACE}::{op} cannot run on {device.type} tensors: {reason}")
    if device.type == "cuda":
        return torch.cuda.device(device)
    return _NO_GUARD


_NO_GUARD = contextlib.nullcontext()  # (reusable: it holds nothing)
_cpu_ok = why_unavailable(torch.device("cpu")) is None  # (fixed when the kernels were defined)


def _scratch(plan: Plan, name: str, shape: tuple) -> Tensor:
    """The plan's float64 scratch buffer ``name`` (allocated with the plan, reused while it is cached)."""
    buf = plan.scratch.get(name)
    if buf is None or buf.shape != shape:
        buf = plan.scratch[name] = torch.empty(shape, dtype=torch.float64, device=plan.buf.device)
    return buf


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
        _norms_launch(Plan(device, [tensors], [t.dtype for t in tensors]), per, total, ord)
    return per, total


def _norms_launch(plan: Plan, per: Tensor, total: Tensor, ord: float, restore: bool = False) -> None:
    """``restore``: a plan over (grads, params, backups) whose kernels also copy the backups into the params."""
    linf = math.isinf(ord)
    partials = _scratch(plan, "partials", (max(plan.slots, 1),))
    for grp in plan.groups:
        elem, st, it, ct = TYPES[grp.key]
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
            RESTORE=restore,
            ITYPE=it,
        )
    _finalize(plan, partials, per, total, 1, 1 if linf else 0)


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
        _grad_stats_launch(plan, out, bool(accum), bool(accum_init), adaptive_eta, bool(backups))
    return out


def _grad_stats_launch(
    plan: Plan, out: Tensor, has_acc: bool, accum_init: bool, adaptive_eta: float, has_delta: bool
) -> None:
    partials = _scratch(plan, "partials", (max(plan.slots, 1), 3))
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
            HAS_ACC=has_acc,
            ACC_INIT=has_acc and accum_init,
            ADAPTIVE=adaptive_eta >= 0,
            HAS_DELTA=has_delta,
        )
    _finalize(plan, partials, out, out, 3, 2)


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
    V.check_ascent_step(params, grads, backups, step_coef, proj, norm, adaptive_eta, first, zero_grads)
    if not params:
        return
    device = params[0].device
    with _device_guard("ascent_step_", device):
        plan = Plan(device, [params, grads, backups], [w.dtype for w in params], scalars=(adaptive_eta,))
        _ascent_launch(plan, step_coef, proj, norm, first, adaptive_eta, zero_grads)


def _ascent_launch(
    plan: Plan, step_coef: Tensor, proj: Tensor, norm: str, first: bool, adaptive_eta: float, zero_grads: bool
) -> None:
    # The kernel reads step_coef[i] and proj[i] at offset i: a strided or expanded [n] vector is made dense first
    # (no copy for the engine's own, which are).
    step_coef, proj = step_coef.contiguous(), proj.contiguous()
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
        _restore_launch(Plan(device, [params, backups], [w.element_size() for w in params]))


def _restore_launch(plan: Plan) -> None:
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
        _combine_launch(Plan(device, [grads, accum], [g.dtype for g in grads], scalars=(weight,)))


def _combine_launch(plan: Plan) -> None:
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


# ---- the ops on a TensorLists handle (fastperturb/ops/lists.py) ---------------------------------------------
# The handle was validated when built. Each call makes one call into C++ (TensorLists::enter): the fingerprint
# check of the lists the op reads, the check of the params' .grad, and the version-counter bumps of what the op
# writes; no tensor list crosses into Python. The launch plan is cached on the handle, device buffer included:
# only the scalars are rewritten, and the gradients' pointers, which enter() writes into the plan's host buffer
# (it is uploaded when one changed: in training every .grad is a new tensor each step). Lists by role: params,
# backups, accum; gradients: the params' .grad.

_PARAMS, _BACKUPS, _ACCUM = 0, 1, 2
_P, _B, _A = 1 << _PARAMS, 1 << _BACKUPS, 1 << _ACCUM  # list masks of enter()
_PG = 1 << (16 + _PARAMS)  # the params' .grad, in a bump mask


def _lists_plan(
    lists, op: str, key: tuple, check: int, bump: int, grads_column: int, build, scalars: tuple = ()
) -> Plan:
    """The cached plan of ``op`` with ``key`` on ``lists`` (``build()`` makes one), after the handle's checks of
    the lists of mask ``check`` (and of the params' gradients if ``grads_column`` >= 0: the plan's column holding
    them) and the version bumps of mask ``bump`` (the caller launches next). ``scalars``: the call's, written with
    the new gradient pointers and uploaded with them: a second upload in the same call would first wait for the
    first, which on a GPU queues behind everything the stream holds (a backward pass)."""
    full_key = (op, Tuning.chunk_size, Tuning.block_size, *key)
    plan = lists.plans.get(full_key)
    if plan is not None:
        plan.follow_stream()
        if grads_column < 0:
            lists.enter(op, check, bump)
            plan.set_scalars(scalars)
            return plan
        plan.host_writable()
        status = lists.enter_grads(op, check, _PARAMS, plan.host, plan.grad_codes, bump)
        if status != 2:
            if plan.write_scalars(scalars) or status == 1:
                plan.upload()
            return plan
        # a gradient is misaligned where the plan assumed 16-byte alignment: a new plan (checked and bumped)
        plan = lists.plans[full_key] = build()
        return plan
    h = lists.handle
    h.check_mask(op, check)
    plan = lists.plans[full_key] = build()  # (reads the gradients with grads_of: checked)
    h.bump(bump)
    return plan


def _require(lists, op: str, *roles: int) -> None:
    names = {_BACKUPS: "backups", _ACCUM: "accum"}
    for r in roles:
        have = (lists.params, lists.backups, lists.accum)[r]
        if lists.params and not have:
            raise ValueError(f"{op}: the TensorLists handle has no {names[r]} list; build it with one")


def norms_lists(lists, ord: float, of_grads: bool = False) -> tuple[Tensor, Tensor]:
    return _norms_on_handle(lists, "norms_lists", ord, "grads" if of_grads else "params")


def restore_norms_lists_(lists, ord: float) -> tuple[Tensor, Tensor]:
    _require(lists, "restore_norms_lists_", _BACKUPS)
    return _norms_on_handle(lists, "restore_norms_lists_", ord, "restore")


def _norms_on_handle(lists, op: str, ord: float, of: str) -> tuple[Tensor, Tensor]:
    """The norms of the params (``of="params"``), of their ``.grad`` (``"grads"``), or of their ``.grad`` with the
    params restored from the backups in the same kernels (``"restore"``: checked, params, backups and every
    gradient, before the launch, so a refused call restores nothing)."""
    if not (ord == 2.0 or math.isinf(ord) and ord > 0):
        raise ValueError(f"ord must be 2 or inf, got {ord}")
    device = lists.device
    with _device_guard(op, device):
        n = len(lists.params)
        per = torch.empty(n, dtype=torch.float32, device=device)
        total = torch.empty((), dtype=torch.float32, device=device)
        if n == 0:
            return per, total.zero_()
        restore = of == "restore"
        if of == "params":
            plan = _lists_plan(
                lists, op, (), _P, 0, -1, lambda: Plan(device, [lists.params], [t.dtype for t in lists.params])
            )
        else:

            def build() -> Plan:
                grads = lists.handle.grads_of(_PARAMS, op)
                cols = [grads, lists.params, lists.backups] if restore else [grads]
                return Plan(device, cols, [g.dtype for g in grads], grads_column=0)

            plan = _lists_plan(lists, op, (True,), _P | _B if restore else 0, _P if restore else 0, 0, build)
        _norms_launch(plan, per, total, ord, restore=restore)
    return per, total


def grad_stats_lists_(
    lists,
    *,
    with_accum: bool,
    with_params: bool,
    with_backups: bool,
    accum_weight: float = 1.0,
    accum_init: bool = False,
    adaptive_eta: float = -1.0,
) -> Tensor:
    op = "grad_stats_lists_"
    if with_backups and not with_params:
        raise ValueError("backups given without params: the perturbation d = params - backups needs both")
    if adaptive_eta >= 0 and lists.params and not with_params:
        raise ValueError("adaptive_eta >= 0 needs params (the adaptive scale is |params| + eta)")
    V.check_finite("accum_weight", accum_weight)
    V.check_finite("adaptive_eta", adaptive_eta)
    if with_accum:
        _require(lists, op, _ACCUM)
    if with_backups:
        _require(lists, op, _BACKUPS)
    device = lists.device
    with _device_guard(op, device):
        n = len(lists.params)
        out = torch.empty(n, 3, dtype=torch.float32, device=device)
        if n == 0:
            return out

        def build() -> Plan:
            grads = lists.handle.grads_of(_PARAMS, op)
            return Plan(
                device,
                [
                    grads,
                    lists.accum if with_accum else [],
                    lists.params if with_params else [],
                    lists.backups if with_backups else [],
                ],
                [g.dtype for g in grads],
                scalars=(accum_weight, adaptive_eta),
                grads_column=0,
            )

        check = (_A if with_accum else 0) | (_P if with_params else 0) | (_B if with_backups else 0)
        plan = _lists_plan(
            lists,
            op,
            (with_accum, with_params, with_backups),
            check,
            _A if with_accum else 0,
            0,
            build,
            scalars=(accum_weight, adaptive_eta),
        )
        _grad_stats_launch(plan, out, with_accum, accum_init, adaptive_eta, with_backups)
    return out


def ascent_step_lists_(
    lists,
    step_coef: Tensor,
    proj: Tensor,
    *,
    norm: str = "l2",
    first: bool = False,
    adaptive_eta: float = -1.0,
    zero_grads: bool = False,
) -> None:
    op = "ascent_step_lists_"
    n = len(lists.params)
    V.check_coef("step_coef", step_coef, n, lists.device if n else None)
    V.check_coef("proj", proj, n, lists.device if n else None)
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    V.check_finite("adaptive_eta", adaptive_eta)
    _require(lists, op, _BACKUPS)
    if not n:
        return
    device = lists.device
    with _device_guard(op, device):

        def build() -> Plan:
            grads = lists.handle.grads_of(_PARAMS, op)
            return Plan(
                device,
                [lists.params, grads, lists.backups],
                [w.dtype for w in lists.params],
                scalars=(adaptive_eta,),
                grads_column=1,
            )

        bump = _P | (_B if first else 0) | (_PG if zero_grads else 0)
        plan = _lists_plan(lists, op, (), _P | _B, bump, 1, build, scalars=(adaptive_eta,))
        _ascent_launch(plan, step_coef, proj, norm, first, adaptive_eta, zero_grads)


def restore_lists_(lists) -> None:
    op = "restore_lists_"
    _require(lists, op, _BACKUPS)
    if not lists.params:
        return
    device = lists.device
    with _device_guard(op, device):
        plan = _lists_plan(
            lists,
            op,
            (),
            _P | _B,
            _P,
            -1,
            lambda: Plan(device, [lists.params, lists.backups], [w.element_size() for w in lists.params]),
        )
        _restore_launch(plan)


def combine_grads_lists_(lists, weight: float) -> None:
    op = "combine_grads_lists_"
    V.check_finite("weight", weight)
    _require(lists, op, _ACCUM)
    if not lists.params:
        return
    device = lists.device
    with _device_guard(op, device):

        def build() -> Plan:
            grads = lists.handle.grads_of(_PARAMS, op)
            return Plan(device, [grads, lists.accum], [g.dtype for g in grads], scalars=(weight,), grads_column=0)

        plan = _lists_plan(lists, op, (), _A, _PG, 0, build, scalars=(weight,))
        _combine_launch(plan)


def dot_stats(x: list[Tensor], y: list[Tensor]) -> Tensor:
    V.check_dot_stats(x, y)
    device = V.first_device(x)
    with _device_guard("dot_stats", device):
        n = len(x)
        out = torch.empty(n, 3, dtype=torch.float32, device=device)
        if n == 0:
            return out
        plan = Plan(device, [x, y], [t.dtype for t in x])
        partials = torch.empty(max(plan.slots, 1), 3, dtype=torch.float64, device=device)
        for grp in plan.groups:
            elem, st, _, ct = TYPES[grp.key]
            launch(
                _dot_kernel,
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
            )
        _finalize(plan, partials, out, out, 3, 2)
    return out


def lincomb_(out: list[Tensor], x: list[Tensor], y: list[Tensor], coef: Tensor) -> Tensor:
    V.check_lincomb(out, x, y, coef)
    device = V.first_device(out)
    with _device_guard("lincomb_", device):
        n = len(out)
        sq = torch.empty(n, dtype=torch.float32, device=device)
        if n == 0:
            return sq
        coef = coef.contiguous()  # read on the device as a flat [n, 3] array
        plan = Plan(device, [out, x, y], [t.dtype for t in out])
        partials = torch.empty(max(plan.slots, 1), dtype=torch.float64, device=device)
        for grp in plan.groups:
            elem, st, _, ct = TYPES[grp.key]
            launch(
                _lincomb_kernel,
                grp.programs,
                grp.meta,
                grp.work,
                coef,
                partials,
                CHUNK=plan.chunk,
                BLOCK=plan.block,
                VEC=grp.vec,
                ELEM=elem,
                ST=st,
                CT=ct,
                HAS_Y=bool(y),
            )
        _finalize(plan, partials, sq, sq, 1, 2)
    return sq


def ema_residual_(
    grads: list[Tensor],
    ema: list[Tensor],
    params: list[Tensor],
    *,
    sigma: float,
    lmbda: float,
    init: bool,
    grad_scale: float = 1.0,
    adaptive_eta: float = -1.0,
) -> Tensor:
    V.check_ema_residual(grads, ema, params, sigma, lmbda, grad_scale, adaptive_eta)
    device = V.first_device(grads, params)
    with _device_guard("ema_residual_", device):
        n = len(grads)
        stat = torch.empty(n, dtype=torch.float32, device=device)
        if n == 0:
            return stat
        adaptive = adaptive_eta >= 0
        # 1 - lmbda in double before the conversion to the compute type, as math.h's callers do
        scalars = (grad_scale, sigma, lmbda, 1.0 - lmbda, adaptive_eta)
        plan = Plan(device, [grads, ema, params if adaptive else []], [g.dtype for g in grads], scalars=scalars)
        partials = torch.empty(max(plan.slots, 1), dtype=torch.float64, device=device)
        for grp in plan.groups:
            elem, st, _, ct = TYPES[grp.key]
            launch(
                _ema_kernel,
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
                INIT=bool(init),
                ADAPTIVE=adaptive,
            )
        _finalize(plan, partials, stat, stat, 1, 2)
    return stat


# The fused restore + base-optimizer steps live in their own module; re-exported under their op names.
from .coefficient_impls import ascent_coefficients  # noqa: E402,F401
from .step_impls import restore_adam_step_, restore_sgd_step_  # noqa: E402,F401
