"""The fused restore + base-optimizer step ops on the Triton kernels (:mod:`.step_kernels`), named
as the ops; :mod:`.impls` re-exports them for the registration. Validation first, then the device
guard, then one plan and at most two launches per dtype, as the other ops."""

from __future__ import annotations

from torch import Tensor

from .. import validation as V
from .plan import TYPES, Plan
from .runtime import launch
from .step_kernels import _adam_step_kernel, _sgd_step_kernel


def _guard(op: str, device):
    from .impls import _device_guard  # (impls imports this module)

    return _device_guard(op, device)


def restore_sgd_step_(
    params: list[Tensor],
    backups: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    init_momentum: bool = False,
) -> None:
    V.check_restore_sgd_step(params, backups, grads, momentum_buffers, lr, weight_decay, momentum, dampening)
    if not params:
        return
    device = params[0].device
    with _guard("restore_sgd_step_", device):
        scalars = (-lr, weight_decay, momentum, 1.0 - dampening)  # step_math.h sgd_coefs
        plan = Plan(device, [params, backups, grads, momentum_buffers], [w.dtype for w in params], scalars)
        for grp in plan.groups:
            elem, st, _, ct = TYPES[grp.key]
            launch(
                _sgd_step_kernel,
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
                MOMENTUM=momentum != 0,
                INIT=bool(init_momentum),
                NESTEROV=bool(nesterov),
                MAXIMIZE=bool(maximize),
                DECAY=weight_decay != 0,
            )


def restore_adam_step_(
    params: list[Tensor],
    backups: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
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
    V.check_restore_adam_step(
        params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps, step, weight_decay
    )
    if not params:
        return
    device = params[0].device
    with _guard("restore_adam_step_", device):
        decoupled = decoupled_weight_decay and weight_decay != 0
        # step_math.h adam_coefs, in double
        scalars = (
            0.0 if decoupled_weight_decay else weight_decay,
            1.0 - lr * weight_decay if decoupled else 1.0,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            (1.0 - beta2**step) ** 0.5,
            eps,
            -(lr / (1.0 - beta1**step)),
        )
        lists = [params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs]
        plan = Plan(device, lists, [w.dtype for w in params], scalars)
        for grp in plan.groups:
            elem, st, _, ct = TYPES[grp.key]
            launch(
                _adam_step_kernel,
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
                AMSGRAD=len(max_exp_avg_sqs) > 0,
                MAXIMIZE=bool(maximize),
                L2=not decoupled_weight_decay and weight_decay != 0,
                DECOUPLED=decoupled,
            )
