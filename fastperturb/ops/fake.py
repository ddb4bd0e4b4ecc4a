"""Fake (meta) implementations of the op set, shared by every op namespace that
carries these schemas (``fastperturb::`` and ``fastperturb_triton::``), so
torch.compile and ``opcheck`` can trace the ops without running them.

They check their arguments as every backend does (:mod:`fastperturb.ops.validation`):
a real call with a meta tensor among CPU tensors dispatches here (Meta wins),
and must raise the device mismatch instead of returning uninitialised output."""

from __future__ import annotations

import torch

from . import validation as V
from .names import HELPER_OPS, OPS


def norms(tensors, ord):
    V.check_norms(tensors, ord)
    dev = V.first_device(tensors)
    return (
        torch.empty(len(tensors), dtype=torch.float32, device=dev),
        torch.empty((), dtype=torch.float32, device=dev),
    )


def grad_stats_(grads, accum, params, backups, *, accum_weight=1.0, accum_init=False, adaptive_eta=-1.0):
    V.check_grad_stats(grads, accum, params, backups, accum_weight, adaptive_eta)
    dev = V.first_device(grads)
    return torch.empty(len(grads), 3, dtype=torch.float32, device=dev)


def ascent_step_(
    params, grads, backups, step_coef, proj, *, norm="l2", first=False, adaptive_eta=-1.0, zero_grads=False
):
    V.check_ascent_step(params, grads, backups, step_coef, proj, norm, adaptive_eta, first, zero_grads)
    return None


def restore_(params, backups):
    V.check_restore(params, backups)
    return None


def combine_grads_(grads, accum, weight):
    V.check_combine_grads(grads, accum, weight)
    return None


def dot_stats(x, y):
    V.check_dot_stats(x, y)
    return torch.empty(len(x), 3, dtype=torch.float32, device=V.first_device(x))


def lincomb_(out, x, y, coef):
    V.check_lincomb(out, x, y, coef)
    return torch.empty(len(out), dtype=torch.float32, device=V.first_device(out))


def ema_residual_(grads, ema, params, *, sigma, lmbda, init, grad_scale=1.0, adaptive_eta=-1.0):
    V.check_ema_residual(grads, ema, params, sigma, lmbda, grad_scale, adaptive_eta)
    return torch.empty(len(grads), dtype=torch.float32, device=V.first_device(grads))


def restore_sgd_step_(
    params,
    backups,
    grads,
    momentum_buffers,
    *,
    lr,
    weight_decay=0.0,
    momentum=0.0,
    dampening=0.0,
    nesterov=False,
    maximize=False,
    init_momentum=False,
):
    V.check_restore_sgd_step(params, backups, grads, momentum_buffers, lr, weight_decay, momentum, dampening)
    return None


def restore_adam_step_(
    params,
    backups,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    *,
    lr,
    beta1,
    beta2,
    eps,
    step,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    maximize=False,
):
    V.check_restore_adam_step(
        params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps, step, weight_decay
    )
    return None


def ascent_coefficients(stats, step_size, radius, *, global_scope, project):
    V.check_ascent_coefficients(stats, step_size, radius)
    n = stats.shape[0]
    return tuple(torch.empty(n, dtype=torch.float32, device=stats.device) for _ in range(2))


def register(namespace: str) -> None:
    """Register the fake impls for every op of ``namespace``."""
    for name in (*OPS, *HELPER_OPS):
        torch.library.register_fake(f"{namespace}::{name}")(globals()[name])
