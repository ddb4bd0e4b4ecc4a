"""Fake (meta) implementations of the op set, shared by every op namespace that
carries these schemas (``fastperturb::`` and ``fastperturb_triton::``), so
torch.compile and ``opcheck`` can trace the ops without running them."""

from __future__ import annotations

import torch


def norms(tensors, ord):
    dev = tensors[0].device if len(tensors) else torch.device("cpu")
    return (
        torch.empty(len(tensors), dtype=torch.float32, device=dev),
        torch.empty((), dtype=torch.float32, device=dev),
    )


def grad_stats_(grads, accum, params, backups, *, accum_weight=1.0, accum_init=False, adaptive_eta=-1.0):
    dev = grads[0].device if len(grads) else torch.device("cpu")
    return torch.empty(len(grads), 3, dtype=torch.float32, device=dev)


def ascent_step_(params, grads, backups, step_coef, proj, *, norm="l2", first=False, adaptive_eta=-1.0, zero_grads=False):
    return None


def restore_(params, backups):
    return None


def combine_grads_(grads, accum, weight):
    return None


OPS = ("norms", "grad_stats_", "ascent_step_", "restore_", "combine_grads_")


def register(namespace: str) -> None:
    """Register the fake impls for every op of ``namespace``."""
    for name in OPS:
        torch.library.register_fake(f"{namespace}::{name}")(globals()[name])
