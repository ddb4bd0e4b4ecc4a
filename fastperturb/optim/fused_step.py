"""The fused base step: restore and the base optimizer's update in one pass (issue 14).

Unfused, a step ends with ``restore_`` (weights = backups) and then the base optimizer's update,
which reads the weights again. Fused, one op per optimizer family (``ops.restore_sgd_step_``,
``ops.restore_adam_step_``) reads the stored pre-perturbation weights and writes the updated ones,
so restore and update are one pass over the parameters.

The base optimizer stays the ``torch.optim`` instance: its ``param_groups`` are read at every step
(LR schedulers keep working; a tensor ``lr`` is read as a number) and its ``state[p]`` entries are
read and written exactly as torch keeps them (SGD ``momentum_buffer``; Adam/AdamW ``step`` as a
float CPU tensor, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), created lazily as torch does, so
``state_dict()`` round-trips and a run can switch between the fused path, the unfused path and plain
torch at any step.

What is fused: ``torch.optim.SGD``, ``Adam`` and ``AdamW`` (amsgrad, maximize, weight decay,
momentum, dampening, nesterov; ``foreach`` and ``fused`` are implementation choices the fused op
replaces, ``fused`` then serving the steps that fall back, as with the Hugging Face Trainer's default
``adamw_torch_fused``). Anything else falls back to restore + ``base_optimizer.step()`` for that step
(:func:`why_not_fused` says why): ``capturable``/``differentiable`` groups, an enabled
``GradScaler``, sharded (FSDP2) parameters, sparse or complex tensors, a gradient whose dtype or
memory layout differs from its parameter's, state tensors that do not match their parameter.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ..ops import validation as V

#: The base optimizer classes with a fused step, and the op family of each.
FAMILIES: Dict[type, str] = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}
# Group flags that change torch's state format or arithmetic in ways the fused ops do not reproduce
# (``fused`` does not: it picks torch's kernel for the same update, kept for the steps that fall back).
_FALLBACK_FLAGS = ("capturable", "differentiable")


def check_base(base_class: type, base_kwargs: Dict[str, Any]) -> None:
    """Raise at construction when ``fused_step=True`` cannot work for this base optimizer at all."""
    if base_class not in FAMILIES:
        names = ", ".join(f"torch.optim.{c.__name__}" for c in FAMILIES)
        raise TypeError(
            f"fused_step=True needs one of {names} as the base optimizer (exactly those classes; a subclass may "
            f"change the update), got {base_class.__module__}.{base_class.__qualname__}; pass fused_step=False"
        )
    on = [f for f in _FALLBACK_FLAGS if base_kwargs.get(f)]
    if on:
        raise ValueError(
            f"fused_step=True replaces {base_class.__name__}'s own implementation; it does not support "
            f"{', '.join(f'{f}=True' for f in on)}: drop {'that flag' if len(on) == 1 else 'those flags'} or pass "
            "fused_step=False"
        )


def _tensor_fits(p: Tensor, g: Tensor) -> Optional[str]:
    if g.layout != torch.strided or p.layout != torch.strided:
        return "a sparse gradient or parameter"
    if p.is_complex() or p.dtype not in V.FLOAT_DTYPES:
        return f"a {p.dtype} parameter"
    if g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
        return "a gradient whose dtype, device or shape differs from its parameter's"
    if (p.numel() > 1 and g.stride() != p.stride()) or not V.is_dense(p):
        return "a gradient whose memory layout differs from its parameter's (or a non-dense parameter)"
    return None


def _state_fits(p: Tensor, t: object) -> bool:
    return (
        isinstance(t, Tensor)
        and t.layout == torch.strided
        and t.shape == p.shape
        and t.dtype == p.dtype
        and t.device == p.device
        and (p.numel() <= 1 or t.stride() == p.stride())
    )


def why_not_fused(base: torch.optim.Optimizer) -> Optional[str]:
    """None if this step of ``base`` can be fused, else why it falls back (checked before anything is written)."""
    family = FAMILIES.get(type(base))
    if family is None:
        return f"{type(base).__name__} has no fused step"
    from torch.optim import optimizer as torch_optimizer

    if (
        base._optimizer_step_pre_hooks
        or base._optimizer_step_post_hooks
        or torch_optimizer._global_optimizer_pre_hooks
        or torch_optimizer._global_optimizer_post_hooks
    ):
        return "step hooks are registered (they run around base_optimizer.step(), which the fused path replaces)"
    for gi, group in enumerate(base.param_groups):
        flags = [f for f in _FALLBACK_FLAGS if group.get(f)]
        if flags:
            return f"param_groups[{gi}] sets {', '.join(flags)}"
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            reason = _tensor_fits(p, g)
            if reason is not None:
                return reason
            state = base.state.get(p)
            if not state:
                continue
            keys = ("momentum_buffer",) if family == "sgd" else ("exp_avg", "exp_avg_sq")
            if family == "adam" and group["amsgrad"]:
                keys += ("max_exp_avg_sq",)
            for key in keys:
                if key in state and not _state_fits(p, state[key]):
                    return f"state[{key!r}] of a parameter does not match it (shape, dtype, device or layout)"
            if family == "adam":
                step = state.get("step")
                if not (isinstance(step, Tensor) and step.numel() == 1 and step.device.type == "cpu"):
                    return "an Adam state whose 'step' is not a CPU scalar tensor"
                if group["amsgrad"] and "max_exp_avg_sq" not in state:
                    return "amsgrad was turned on after the state was created"
    return None


def _with_grad(group: Dict[str, Any]) -> List[Tensor]:
    return [p for p in group["params"] if p.grad is not None]


def _by_device(params: Iterable[Tensor], key=lambda p: None) -> Dict[tuple, List[Tensor]]:
    out: Dict[tuple, List[Tensor]] = {}
    for p in params:
        out.setdefault((p.device, key(p)), []).append(p)
    return out


def _sgd(base: torch.optim.SGD, backup_of: Dict[Tensor, Tensor]) -> None:
    for group in base.param_groups:
        momentum = float(group["momentum"])
        # A parameter's first step creates its buffer (torch: a clone of the direction's g).
        fresh = (lambda p: "momentum_buffer" not in base.state[p]) if momentum != 0 else (lambda p: False)
        for (_, init), params in _by_device(_with_grad(group), fresh).items():
            buffers: List[Tensor] = []
            if momentum != 0:
                for p in params:
                    state = base.state[p]
                    if init:
                        state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
                    buffers.append(state["momentum_buffer"])
            ops.restore_sgd_step_(
                params,
                [backup_of.get(p, p) for p in params],
                [p.grad for p in params],
                buffers,
                lr=float(group["lr"]),
                weight_decay=float(group["weight_decay"]),
                momentum=momentum,
                dampening=float(group["dampening"]),
                nesterov=bool(group["nesterov"]),
                maximize=bool(group["maximize"]),
                init_momentum=init,
            )


def _adam_state(p: Tensor, amsgrad: bool) -> Dict[str, Tensor]:
    """torch.optim.Adam's lazily created state (see its _init_group), created the same way."""
    from torch.optim.optimizer import _get_scalar_dtype

    state = {
        "step": torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu"),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }
    if amsgrad:
        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _adam(base: torch.optim.Adam, backup_of: Dict[Tensor, Tensor]) -> None:
    for group in base.param_groups:
        params = _with_grad(group)
        if not params:
            continue
        amsgrad = bool(group["amsgrad"])
        for p in params:
            if not base.state[p]:
                base.state[p] = _adam_state(p, amsgrad)
        steps = [base.state[p]["step"] for p in params]
        torch._foreach_add_(steps, 1)  # torch: step_t += 1 for every parameter with a gradient
        counts = torch.stack(steps).tolist() if len(steps) > 1 else [float(steps[0])]
        count_of = dict(zip(map(id, params), counts))
        beta1, beta2 = (float(b) for b in group["betas"])
        for (_, step), ps in _by_device(params, lambda p: count_of[id(p)]).items():
            states = [base.state[p] for p in ps]
            ops.restore_adam_step_(
                ps,
                [backup_of.get(p, p) for p in ps],
                [p.grad for p in ps],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=float(group["eps"]),
                step=step,
                weight_decay=float(group["weight_decay"]),
                decoupled_weight_decay=bool(group.get("decoupled_weight_decay", False)),
                maximize=bool(group["maximize"]),
            )


def _check_group_scalars(base: torch.optim.Optimizer) -> None:
    """The fused ops' checks of every group's settings (a NaN lr from a schedule, betas[0] = 1), all made before any
    state is created or advanced: a group refused after another had stepped would leave the state half-written
    (a momentum buffer allocated and never filled, Adam's step counts advanced) under restored weights."""
    sgd = FAMILIES[type(base)] == "sgd"
    for gi, group in enumerate(base.param_groups):
        if not _with_grad(group):
            continue
        try:
            if sgd:
                V.check_restore_sgd_step(
                    [], [], [], [], group["lr"], group["weight_decay"], group["momentum"], group["dampening"]
                )
            else:
                beta1, beta2 = group["betas"]
                V.check_restore_adam_step(
                    [], [], [], [], [], [], group["lr"], beta1, beta2, group["eps"], 1.0, group["weight_decay"]
                )
        except (TypeError, ValueError) as e:
            raise type(e)(f"param_groups[{gi}]: {e}; nothing was stepped") from None


def fused_base_step(base: torch.optim.Optimizer, params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """Take ``base``'s step with every perturbed tensor ``params[i]`` read from ``backups[i]`` (its
    pre-perturbation weights) and every other tensor from itself: restore and update in one pass.
    Call only when :func:`why_not_fused` returned None for this step."""
    _check_group_scalars(base)
    backup_of = dict(zip(params, backups))
    with torch.no_grad():
        if FAMILIES[type(base)] == "sgd":
            _sgd(base, backup_of)  # type: ignore[arg-type]
        else:
            _adam(base, backup_of)  # type: ignore[arg-type]
    base._opt_called = True  # type: ignore[attr-defined]  # what an LR scheduler bound to the base checks
