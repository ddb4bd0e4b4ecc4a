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

import itertools
import operator
import weakref
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import ops
from ..ops import native
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
    if not V.same_memory_order(p, g) or not V.is_dense(p):
        return "a gradient whose memory layout differs from its parameter's (or a non-dense parameter)"
    return None


def _state_fits(p: Tensor, t: object) -> bool:
    return (
        isinstance(t, Tensor)
        and t.layout == torch.strided
        and t.shape == p.shape
        and t.dtype == p.dtype
        and t.device == p.device
        and V.same_memory_order(p, t)  # (torch's SGD clones its first momentum buffer from the gradient)
    )


def step_reason(base: torch.optim.Optimizer) -> Optional[str]:
    """Why no step of ``base`` can be fused as it is set up now (class, hooks, group flags), or None."""
    if type(base) not in FAMILIES:
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
    return None


def _state_keys(family: str, group: Dict[str, Any]) -> Tuple[str, ...]:
    if family == "sgd":
        return ("momentum_buffer",)
    return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")


def _state_reason(family: str, group: Dict[str, Any], p: Tensor, state: Dict[str, Any]) -> Optional[str]:
    for key in _state_keys(family, group):
        if key in state and not _state_fits(p, state[key]):
            return f"state[{key!r}] of a parameter does not match it (shape, dtype, device or layout)"
    if family == "adam":
        step = state.get("step")
        if not (isinstance(step, Tensor) and step.numel() == 1 and step.device.type == "cpu"):
            return "an Adam state whose 'step' is not a CPU scalar tensor"
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            return "amsgrad was turned on after the state was created"
    return None


def why_not_fused(base: torch.optim.Optimizer) -> Optional[str]:
    """None if this step of ``base`` can be fused, else why it falls back: the checks :func:`fused_base_step`
    makes before it writes anything, made here on the gradients now in ``.grad``."""
    return step_reason(base) or _gather(base, grads_checked=False)[0]


def _with_grad(group: Dict[str, Any]) -> List[Tensor]:
    return [p for p in group["params"] if p.grad is not None]


class _Gathered:
    """One step's tensors of one param group: the params with a gradient and their torch state dicts (``None``
    where torch has not created the state yet)."""

    __slots__ = ("group", "params", "states")

    def __init__(self, group: Dict[str, Any], params: List[Tensor], states: List[Optional[Dict[str, Any]]]):
        self.group, self.params, self.states = group, params, states


class _Checked:
    """The tensors a base optimizer's last fused step checked, by identity: each group's state keys, then its
    params with a gradient, their state dicts (None where torch has not created one) and those dicts' tensors.
    While every tensor is alive (a weak reference's callback marks the record stale when one is freed, so no id
    can have been reused) and every object is the same one in the same place, the per-tensor state checks are not
    made again: on 1000 tensors they cost about 10 ms a step in Python, more than the fused op itself. A state
    replaced (load_state_dict, an assignment) is a new object and is checked again; the ops check shapes and
    dtypes again in C++ before they write."""

    __slots__ = ("keys", "ids", "refs", "stale", "counts", "__weakref__")

    def __init__(self, keys: list, objs: list):
        self.keys, self.ids, self.stale = keys, list(map(id, objs)), False
        self.refs = [weakref.ref(o, self._freed) for o in objs if isinstance(o, Tensor)]
        # Each gathered group's Adam step counts as a compiled StepCounts, built on first use: valid while the
        # record holds (the same step tensors, which the record compares by identity).
        self.counts: Dict[int, Any] = {}

    def _freed(self, _ref: object) -> None:
        self.stale = True

    def holds(self, keys: list, objs: list) -> bool:
        return not self.stale and self.keys == keys and self.ids == list(map(id, objs))


_checked: "weakref.WeakKeyDictionary[torch.optim.Optimizer, _Checked]" = weakref.WeakKeyDictionary()


def forget_checks(base: torch.optim.Optimizer) -> None:
    """Make the next fused step check every state tensor again (the params changed dtype or layout in place: the
    same objects, so :class:`_Checked` cannot see it)."""
    _checked.pop(base, None)


def _flatten(family: str, gathered: Sequence[_Gathered]) -> Tuple[Optional[list], list]:
    """The objects :class:`_Checked` compares (None when a state lacks one of its group's keys: not recorded)."""
    objs: list = []
    keys: list = []
    for gat in gathered:
        names = _state_keys(family, gat.group) + (("step",) if family == "adam" else ())
        keys.append(names)
        objs += gat.params
        objs += gat.states
        present = [st for st in gat.states if st is not None]
        try:
            values = list(map(operator.itemgetter(*names), present))  # (a tuple per state when names has several)
        except KeyError:
            return None, keys
        objs += values if len(names) == 1 else itertools.chain.from_iterable(values)
    return objs, keys


def _gather(
    base: torch.optim.Optimizer, grads_checked: bool
) -> Tuple[Optional[str], List[_Gathered], Optional[_Checked]]:
    """Every group's params with a gradient and their states, why the step cannot be fused (None if it can),
    found before anything is written or created, and the record of this step's checked tensors (None when a
    state lacks a key, so none was made)."""
    family = FAMILIES[type(base)]
    state = base.state
    gathered = []
    for group in base.param_groups:
        params = _with_grad(group)
        if params:
            gathered.append(_Gathered(group, params, [state.get(p) or None for p in params]))
    if not grads_checked:
        for gat in gathered:
            for p in gat.params:
                reason = _tensor_fits(p, p.grad)
                if reason is not None:
                    return reason, gathered, None
    objs, keys = _flatten(family, gathered)
    last = _checked.get(base)
    if objs is not None and last is not None and last.holds(keys, objs):
        return None, gathered, last
    for gat in gathered:
        for p, st in zip(gat.params, gat.states):
            reason = _state_reason(family, gat.group, p, st) if st is not None else None
            if reason is not None:
                return reason, gathered, None
    if objs is None:
        return None, gathered, None
    record = _checked[base] = _Checked(keys, objs)
    return None, gathered, record


def _by_device(params: Iterable[Tensor], key=lambda p: None) -> Dict[tuple, List[Tensor]]:
    out: Dict[tuple, List[Tensor]] = {}
    for p in params:
        out.setdefault((p.device, key(p)), []).append(p)
    return out


def _sgd(base: torch.optim.SGD, gathered: Sequence[_Gathered], backup_of: Dict[int, Tensor]) -> None:
    for gat in gathered:
        group = gat.group
        momentum = float(group["momentum"])
        # A parameter's first step creates its buffer (torch: a clone of the direction's g).
        state_of = {id(p): st for p, st in zip(gat.params, gat.states)}
        if momentum != 0:
            fresh = {i for i, st in state_of.items() if st is None or "momentum_buffer" not in st}
        else:
            fresh = set()
        for (_, init), params in _by_device(gat.params, lambda p: id(p) in fresh).items():
            buffers: List[Tensor] = []
            if momentum != 0:
                for p in params:
                    if init:
                        buf = base.state[p]["momentum_buffer"] = torch.empty_like(
                            p, memory_format=torch.preserve_format
                        )
                    else:
                        buf = state_of[id(p)]["momentum_buffer"]
                    buffers.append(buf)
            ops.restore_sgd_step_(
                params,
                [backup_of.get(id(p), p) for p in params],
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


def _advance_steps(steps: List[Tensor], record: Optional[_Checked], gi: int) -> List[float]:
    """torch's ``step_t += 1`` for every parameter with a gradient; the counts after it, one per tensor, or a
    single one when they all have it.
    ``record``: this step's checked tensors, whose group ``gi`` holds these steps (None: they were just made)."""
    counter = None
    if record is not None and native.load_error is None and not torch.compiler.is_compiling():
        counter = record.counts.get(gi)
        if counter is None:
            counter = record.counts[gi] = torch.classes.fastperturb.StepCounts(steps)
    if counter is not None:
        common = counter.advance()
        if common == common:  # (NaN: they differ)
            return [common]
    else:
        torch._foreach_add_(steps, 1)  # one dispatched add_ per tensor on CPU: 4.4 ms on 1000 of them
    return torch.stack(steps).tolist() if len(steps) > 1 else [float(steps[0])]


def _adam(
    base: torch.optim.Adam, gathered: Sequence[_Gathered], backup_of: Dict[int, Tensor], record: Optional[_Checked]
) -> None:
    for gi, gat in enumerate(gathered):
        group, params = gat.group, gat.params
        amsgrad = bool(group["amsgrad"])
        states = gat.states
        if any(st is None for st in states):
            states = list(states)
            for i, (p, st) in enumerate(zip(params, states)):
                if st is None:
                    states[i] = base.state[p] = _adam_state(p, amsgrad)
            record = None  # (it holds None for the states made now: the next step makes its own)
        counts = _advance_steps([st["step"] for st in states], record, gi)
        if len(set(counts)) == 1 and len({p.device for p in params}) == 1:  # the common case: one call
            buckets = [(counts[0], params, states)]
        else:  # one call per device and step count (the op takes one count)
            counts = counts if len(counts) == len(params) else counts * len(params)  # (one shared count)
            state_of = {id(p): st for p, st in zip(params, states)}
            count_of = {id(p): c for p, c in zip(params, counts)}
            grouped = _by_device(params, lambda p: count_of[id(p)]).items()
            buckets = [(step, ps, [state_of[id(p)] for p in ps]) for (_, step), ps in grouped]
        beta1, beta2 = (float(b) for b in group["betas"])
        for step, ps, sts in buckets:
            ops.restore_adam_step_(
                ps,
                [backup_of.get(id(p), p) for p in ps],
                [p.grad for p in ps],
                [s["exp_avg"] for s in sts],
                [s["exp_avg_sq"] for s in sts],
                [s["max_exp_avg_sq"] for s in sts] if amsgrad else [],
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=float(group["eps"]),
                step=step,
                weight_decay=float(group["weight_decay"]),
                decoupled_weight_decay=bool(group.get("decoupled_weight_decay", False)),
                maximize=bool(group["maximize"]),
            )


def _check_group_scalars(base: torch.optim.Optimizer, gathered: Sequence[_Gathered]) -> None:
    """The fused ops' checks of every group's settings (a NaN lr from a schedule, betas[0] = 1), all made before any
    state is created or advanced: a group refused after another had stepped would leave the state half-written
    (a momentum buffer allocated and never filled, Adam's step counts advanced) under restored weights."""
    sgd = FAMILIES[type(base)] == "sgd"
    for gat in gathered:
        group = gat.group
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
            gi = next(i for i, g in enumerate(base.param_groups) if g is group)
            raise type(e)(f"param_groups[{gi}]: {e}; nothing was stepped") from None


# Run eagerly under torch.compile (a graph break, as torch.optim breaks around every optimizer's step()): the ops
# take Adam's step count and the group's settings as Python floats, on which a traced call guards, so every step
# recompiled (Adam's count changes every step) until dynamo's recompile limit.
@torch.compiler.disable
def fused_base_step(
    base: torch.optim.Optimizer, params: Sequence[Tensor], backups: Sequence[Tensor], grads_checked: bool = False
) -> Optional[str]:
    """Take ``base``'s step with every perturbed tensor ``params[i]`` read from ``backups[i]`` (its
    pre-perturbation weights) and every other tensor from itself: restore and update in one pass.

    Returns None when it stepped. When this step cannot be fused (see :func:`why_not_fused`) it writes nothing and
    returns why; the caller then restores and calls ``base.step()``. ``grads_checked``: the caller has checked
    that every ``.grad`` has its parameter's dtype, shape, strides and device (a handle's norm of them does)."""
    reason = step_reason(base)
    if reason is not None:
        return reason
    reason, gathered, record = _gather(base, grads_checked)
    if reason is not None:
        return reason
    _check_group_scalars(base, gathered)
    backup_of = {id(p): b for p, b in zip(params, backups)}
    with torch.no_grad():
        if FAMILIES[type(base)] == "sgd":
            _sgd(base, gathered, backup_of)  # type: ignore[arg-type]
        else:
            _adam(base, gathered, backup_of, record)  # type: ignore[arg-type]
    base._opt_called = True  # type: ignore[attr-defined]  # what an LR scheduler bound to the base checks
    return None
