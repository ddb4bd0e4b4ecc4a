"""The optimizer wrapper: builds the engine's tensor lists from ``param_groups`` and
sequences closure calls around :mod:`fastperturb.engine`.

It owns no math: the perturbation, its restore and the accumulation of the descent
gradient are the engine's and the fused ops'; this module decides which tensors take
part, owns their buffers, checks the closure's contract and hands the result to the
base optimizer (with gradient clipping, the non-finite check and ``GradScaler``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import inspect
import math
import operator
import sys
import warnings
import weakref
from itertools import chain, repeat
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.optim.optimizer as optim_hooks
from torch import Tensor, nn

from .. import distributed, ops
from .._callers import user_stacklevel
from ..engine import Cycle, NonFiniteGradient, PerturbSpec, check_flag, check_radius, grads_of, run_cycle
from ..ops import dispatch, native
from ..ops import validation as V
from . import frameworks
from . import fused_step as fused
from .batchnorm import frozen_bn_stats
from .buffers import buffers_for
from .late_grads import LateGrads

__all__ = ["PerturbOptimizer", "NonFiniteGradient", "NonFiniteDescentGradient", "Params"]

Params = Union[Iterable[Tensor], Iterable[Dict[str, Any]]]
Closure = Callable[[], Any]

NONFINITE_MODES = ("skip", "raise")
GRAD_CLEARINGS = ("release", "zero")
STATE_KEY = "fastperturb"  # the wrapper's settings inside state_dict()


class NonFiniteDescentGradient(NonFiniteGradient):
    """The final descent gradient G had NaN/Inf: the base step was not taken, the weights are unchanged.

    A subclass of :class:`NonFiniteGradient`, which ``nonfinite="raise"`` raises for a
    NaN/Inf in any pass: ``except fp.NonFiniteGradient`` catches every case."""

    def __init__(self, names: Sequence[str], tensor_indices: Sequence[int], pass_index: int):
        self.names = list(names)
        self.tensor_indices = list(tensor_indices)
        self.pass_index = pass_index
        shown = ", ".join(self.names[:8]) + (" ..." if len(self.names) > 8 else "")
        FloatingPointError.__init__(
            self,
            f"non-finite descent gradient (NaN/Inf) in {shown}; the base optimizer step was not "
            "taken and the weights are unchanged",
        )


@dataclasses.dataclass
class _Plan:
    """The tensors of one step: perturbed ones with their radius/step, and passive ones
    (with a gradient but not perturbed: they still receive sum_k c_k g_k)."""

    params: List[Tensor]
    radius: List[float]
    step: List[float]
    passive: List[Tensor]
    every: List[Tensor] = dataclasses.field(default_factory=list)  # params + passive: whose .grad is read
    late: List[Tensor] = dataclasses.field(default_factory=list)  # no gradient at the clean point (late_grads.py)
    # What the ops see: the tensors themselves, or their local shards (FSDP2) with a reducer
    # completing the shards' statistics across ranks.
    local_params: List[Tensor] = dataclasses.field(default_factory=list)
    local_passive: List[Tensor] = dataclasses.field(default_factory=list)
    reduce: Optional[distributed.Reduce] = None
    #: (spec, backups, accum, passive_accum, handle, radius, step, longer) of the cycles on this plan (_new_cycle)
    cycle_parts: Optional[tuple] = None


#: GradWatch snapshot slots: since the last step() / zero_grad(), and since before a pass.
_SEEN, _PASS = 0, 1


@dataclasses.dataclass
class _Selection:
    """The cached group selection: its key, per group (perturbed, passive) candidates, every parameter in
    group order, and a compiled GradWatch on them (None if sharded or without the extension)."""

    key: tuple = ()
    groups: list = dataclasses.field(default_factory=list)
    every: list = dataclasses.field(default_factory=list)
    watch: Optional[Any] = None
    watch_built: bool = False


@dataclasses.dataclass
class _Pending:
    """State between first_step() and second_step()."""

    plan: _Plan
    cycle: Cycle
    scaler: Optional[torch.amp.GradScaler]
    skipped: bool = False
    #: the framework's GradScaler, when first_step() took it from the proxy (second_step() then updates it)
    plugin_scaler: Optional[torch.amp.GradScaler] = None
    versions: list = dataclasses.field(default_factory=list)
    watch: Optional[Any] = None  # a GradWatch holding the snapshot in place of versions
    stack: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)

    def backward_ran(self) -> bool:
        """Whether a gradient of the plan's tensors changed since first_step() (then forgets the snapshot)."""
        if self.watch is None:
            return _any_grad_changed(self.plan.every, self.versions)
        try:
            return self.watch.changed(_PASS)
        finally:
            self.watch.forget(_PASS)


@dataclasses.dataclass
class _GradHolder:
    """Just enough of an optimizer (``param_groups``) for ``GradScaler.unscale_``."""

    param_groups: list


def _version(g: Tensor) -> int:
    # A sharded gradient accumulates into its local tensor: that is where the version moves.
    # The type test keeps plain gradients (the common case, read per tensor and per pass) off
    # the DTensor check.
    return g._version if type(g) is Tensor else distributed.local(g)._version


_GRAD = operator.attrgetter("grad")


def _versions(params: Sequence[Tensor]) -> list:
    """Each tensor's gradient and its version counter: a backward either replaces the
    tensor (after ``zero_grad(set_to_none=True)``) or bumps its version. In eager mode the
    gradients are held by weak references: a snapshot must not keep alive the gradients the
    caller drops while it is kept (``model.zero_grad()`` between steps, or in a closure);
    torch.compile traces the plain references."""
    grads = [p.grad for p in params]
    if not torch.compiler.is_compiling():
        return [(None, -1) if g is None else (weakref.ref(g), _version(g)) for g in grads]
    return [(g, -1 if g is None else _version(g)) for g in grads]


def _any_grad_changed(params: Sequence[Tensor], before: list) -> bool:
    for p, (g, v) in zip(params, before):
        ng = p.grad
        if ng is None:
            continue
        if type(g) is weakref.ref:  # (a dead reference gives None: the gradient now is another tensor)
            g = g()
        if ng is not g or _version(ng) != v:
            return True
    return False


def _drop_unreached(params: Sequence[Tensor], before: list) -> None:
    """After a clean pass whose gradients were zeroed in place: set to None each gradient the pass's backward did
    not write (the tensor ``before`` holds, at its version), as a released gradient stays None."""
    for p, (g, v) in zip(params, before):
        ng = p.grad
        if type(g) is weakref.ref:
            g = g()
        if ng is not None and ng is g and _version(ng) == v:
            p.grad = None


def _any_grad(params: Sequence[Tensor]) -> bool:
    """Whether any tensor has a gradient (after they were all set to None: a backward ran)."""
    return any(map(operator.is_not, map(_GRAD, params), repeat(None)))


def _scaling(scaler: Optional[torch.amp.GradScaler]) -> bool:
    return scaler is not None and scaler.is_enabled()


class PerturbOptimizer(torch.optim.Optimizer):
    """A base optimizer driven through weight-perturbation cycles (docs/design.md §2, §7).

    ``step(closure)`` takes the gradient at ``w`` (the caller's, if a backward ran since the
    last ``step()``/``zero_grad()``; else from the closure), takes ``spec.steps`` ascent steps
    (each followed by the closure at the perturbed point), leaves the descent gradient
    ``G = sum_k c_k g_k`` in ``.grad`` at the exactly restored ``w`` and runs the base
    optimizer's step. The presets (:class:`SAM`, :class:`ASAM`, :class:`AWP`,
    :class:`APD`) are configurations of this class.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
            A group may carry its own radius (key ``opt.radius_key``, e.g. ``rho``) and
            step size (``opt.step_key``), or ``perturb=False`` to take plain
            base-optimizer steps. Where the base optimizer uses the same name (Adam's
            ``eps``, Adadelta's ``rho``) the group key is ``perturb_eps``/``perturb_rho``.
        base_optimizer: the base optimizer *class* (e.g. ``torch.optim.SGD``); it is
            built on the same ``param_groups`` (shared by identity) with ``base_kwargs``.
        spec: the perturbation (norm, scope, steps, relative, adaptive, clean term).
        radius: default radius r (a multiple of the weights' norm if ``spec.relative``).
        step_size: default ascent step eta; ``None`` -> :meth:`default_step_size`.
        perturb_filter: ``f(param) -> bool`` choosing the tensors to perturb (evaluated
            once per parameter); ``None`` = every parameter that has a gradient.
        max_grad_norm: clip the L2 norm of the final descent gradient to this value.
        nonfinite: ``"skip"`` (default) or ``"raise"`` when a gradient is NaN/Inf; the
            weights are bit-identical to before either way. With an enabled
            ``GradScaler`` overflow always skips (and the scaler backs off).
        freeze_bn: a module whose BatchNorm running statistics must not be updated by
            the perturbed passes (see :func:`frozen_bn_stats`).
        fused_step: take the base step of ``step(closure)`` from the stored pre-perturbation
            weights in one pass that restores and updates (``torch.optim.SGD``, ``Adam``,
            ``AdamW`` only; see :mod:`fastperturb.optim.fused_step`). A step it cannot fuse
            falls back to restore + ``base_optimizer.step()``; ``fused_step_fallback`` says why.
            Also ``second_step()``.
        **base_kwargs: keyword arguments of ``base_optimizer`` (``lr``, ``momentum``, ...).

    Attributes:
        base_optimizer: the base optimizer instance.
        last_step_skipped: whether the last step was skipped: a non-finite gradient (counted in
            ``skipped_steps``), or Lightning's ``training_step`` returned None in one of its passes.
        fused_step_fallback: with ``fused_step=True``, why the last step was not fused (None if it was).
        skipped_steps: how many steps were skipped so far.
    """

    #: name of the per-group radius (and step size) in ``param_groups``; an instance gets
    #: ``"perturb_" + name`` instead when its base optimizer has a setting of that name.
    radius_key: str = "radius"
    step_key: Optional[str] = "step_size"
    #: How a pass clears the gradients before its backward: ``"release"`` sets ``.grad`` to None
    #: (the backward then stores its fresh gradient instead of adding it to zeros), ``"zero"``
    #: zeroes them in place (fused into the ascent step). Both give the same steps: zeroed, a gradient the clean
    #: pass's backward does not write is set to None after it, as a released one stays None (README, "Tensors a
    #: perturbed pass reaches first"), except where gradients share a version counter (views of one buffer:
    #: DDP's gradient_as_bucket_view, FSDP2), whose unreached gradients look written and keep their zero. Release
    #: is the faster (benchmarks/README.md, "Clearing the gradients"). Under torch.compile the step zeroes.
    grad_clearing: str = "release"

    # Whether a step that is not fused leaves the restore to _descend, which does it in the pass that checks G
    # (restore_norms_lists_; one pass where a restore and a separate read of G take two).
    _restore_in_descend: bool = True

    def __init__(
        self,
        params: Params,
        base_optimizer: type,
        spec: PerturbSpec,
        radius: float,
        step_size: Optional[float] = None,
        *,
        perturb_filter: Optional[Callable[[Tensor], bool]] = None,
        max_grad_norm: Optional[float] = None,
        nonfinite: str = "skip",
        freeze_bn: Optional[nn.Module] = None,
        fused_step: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(spec, PerturbSpec):
            raise TypeError(f"spec must be a fastperturb.PerturbSpec, got {type(spec).__name__}")
        check_signature(type(self).__name__, params, base_optimizer, {type(self).radius_key: radius})
        # Group keys: the preset's names unless the base optimizer has a setting of the same
        # name (APD's eps vs Adam's eps, SAM's rho vs Adadelta's rho): then "perturb_<name>".
        taken = _keyword_names(base_optimizer)
        # Keywords of the wrappers people migrate from, and of the other presets (AWP(norm=...), GSAM(rho=...)),
        # that the base optimizer does not name: it would refuse them blaming itself, or swallow them (**kwargs).
        misplaced = {k: _misplaced_message(self, k) for k in base_kwargs if k not in taken}
        migrating = sorted(k for k, why in misplaced.items() if why is not None)
        if migrating and not _takes_any_keyword(base_optimizer):
            key = migrating[0]
            raise TypeError(f"{type(self).__name__} got {key}={base_kwargs[key]!r}: {misplaced[key]}")
        self.radius_key = _group_key(type(self).radius_key, taken)
        # Keys the SAM wrappers people migrate from read per group (davda54's and pytorch-optimizer's SAM: adaptive;
        # ASAM's eta; FriendlySAM's sigma and lmbda) but these presets take for the whole optimizer: a group that
        # sets one otherwise is refused, not ignored.
        self._optimizer_wide_keys = tuple(k for k in self._optimizer_wide_names() if k not in taken)
        self.step_key = None if type(self).step_key is None else _group_key(type(self).step_key, taken)
        radius = check_radius(type(self).radius_key, radius)
        if step_size is not None:
            if self.step_key is None:
                raise TypeError(f"{type(self).__name__} has no step_size setting (its step is the radius)")
            step_size = check_radius(type(self).step_key, step_size)
        if perturb_filter is not None and not callable(perturb_filter):
            raise TypeError(f"perturb_filter must be callable (param -> bool) or None, got {perturb_filter!r}")
        max_grad_norm = _checked_max_grad_norm(max_grad_norm)
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if freeze_bn is not None and not isinstance(freeze_bn, nn.Module):
            raise TypeError(f"freeze_bn must be an nn.Module (the model) or None, got {type(freeze_bn).__name__}")
        if not isinstance(fused_step, bool):
            raise TypeError(f"fused_step must be True or False, got {fused_step!r}")
        if fused_step:
            fused.check_base(base_optimizer, base_kwargs)
        _check_base_step(base_optimizer)

        self.spec = spec
        self.perturb_filter = perturb_filter
        self.max_grad_norm = max_grad_norm
        self.nonfinite = nonfinite
        self.freeze_bn = freeze_bn
        self.fused_step = fused_step
        self.fused_step_fallback: Optional[str] = None
        self.last_step_skipped = False
        self.skipped_steps = 0
        self._warned_skip = False
        self._last_cycle: Optional[Cycle] = None  # the running step's, to explain a NaN/Inf (_on_nonfinite)
        self._perturb_defaults: Dict[str, Any] = {self.radius_key: radius, "perturb": True}
        if self.step_key is not None:
            self._perturb_defaults[self.step_key] = step_size
        self._selected: Dict[Tensor, bool] = {}
        self._backups: Dict[Tensor, Tensor] = {}
        self._accums: Dict[Tensor, Tensor] = {}
        # Per-step Python work must not grow with per-parameter lookups: the group
        # selection and the buffer lists are cached while the tensors they cover stay the same.
        self._selection_cache: _Selection = _Selection()
        # Inside step(), between closure calls, the selection checked once (only the closure, the user's code, can
        # edit the groups there): on 1000 tensors each check of the groups' tensors costs about 50 us, and a step
        # asked for it ten times, a fifth of a SAM step's own time on this round's host.
        self._pinned: Optional[_Selection] = None
        self._plan_cache: Optional[tuple] = None  # (key, plan) of the last step where every tensor had a gradient
        self._list_cache: Dict[str, tuple] = {}
        self._fingerprints: Dict[str, tuple] = {}  # name -> (ids, the native handle on those tensors): _changed
        self._lists_cache = ops.ListsCache()
        self._pending: Optional[_Pending] = None
        self._overflow_holder: Optional[_GradHolder] = None
        # The gradients as the last step() / zero_grad() left them: a backward since then
        # makes them the caller's g_0 (see step()).
        # Python: a list of (gradient, version); compiled: kept in the selection's GradWatch (``_seen_by_watch``).
        self._grads_seen: list = []
        self._seen_by_watch = False
        # A backward seen on the tensors of an earlier selection (the groups changed since the last snapshot)
        self._g0_pending = False
        self._sharded = False  # any FSDP2 (DTensor) parameter; set with the group selection

        super().__init__(params, dict(self._perturb_defaults))
        try:
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        except TypeError as e:  # a misspelt keyword reached the base, whose error would name only itself
            raise TypeError(_unknown_keyword_message(self, base_optimizer, base_kwargs, e) or str(e)) from e
        # A base taking **kwargs that kept the keyword (pytorch-optimizer's Lion and AdamP read use_gc from their
        # groups) uses it; one that dropped it swallowed it (SGDW and WSAM's max_norm: no clipping at all).
        for key in migrating:
            if key not in self.base_optimizer.defaults:
                raise TypeError(
                    f"{type(self).__name__} got {key}={base_kwargs[key]!r}, which {base_optimizer.__name__} takes "
                    f"through **kwargs and does not keep: {misplaced[key]}"
                )
        self._guard_base_loads()
        clash = set(self._perturb_defaults) & set(self.base_optimizer.defaults)
        if clash:  # a base whose signature hid the name (**kwargs) uses it too
            raise TypeError(
                f"{base_optimizer.__name__} has its own setting(s) {sorted(clash)}, which would collide with "
                f"{type(self).__name__}'s per-group keys in the shared param_groups"
            )
        self._share()
        self.defaults = {**self.base_optimizer.defaults, **self._perturb_defaults}
        self._defaults_built = dict(self.defaults)  # (what add_param_group tells an edit of opt.defaults by)
        for i, group in enumerate(self.param_groups):
            self._group_sizes(i, group)
        every = [p for group in self.param_groups for p in group["params"]]
        distributed.check_engine(every)
        # Said here, eagerly, if auto will run the ops on the reference for want of a compiled backend: a training
        # step compiled whole resolves the backend only while dynamo traces, where the warning cannot be raised.
        # (A backend chosen by name is checked at the first op, as before.)
        if dispatch.get_backend() == "auto":
            dispatch.resolve(V.first_device(every))
        self._see_grads()
        frameworks.note_new_accelerate_wrappers()  # (when Accelerate is imported: the wrappers built around this one)

    # ---- param groups -------------------------------------------------------------

    # param_groups and state are the base optimizer's, by identity, looked up on every access:
    # code that replaces the base's lists (its load_state_dict(), or torch.distributed.checkpoint's
    # set_optimizer_state_dict(model, opt.base_optimizer, ...)) cannot leave this wrapper stale.
    # Before the base exists (in torch.optim.Optimizer.__init__) they are this object's own.

    @property
    def param_groups(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        return _read_through(self, "param_groups")

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:
            self.__dict__["_own_param_groups"] = value
        else:
            base.param_groups = value

    @property
    def state(self) -> Dict[Any, Any]:  # type: ignore[override]
        return _read_through(self, "state")

    @state.setter
    def state(self, value: Dict[Any, Any]) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:
            self.__dict__["_own_state"] = value
        else:
            base.state = value

    def _share(self) -> None:
        """From now on param_groups and state are the base optimizer's."""
        self.__dict__.pop("_own_param_groups", None)
        self.__dict__.pop("_own_state", None)

    @frameworks.on_the_optimizer
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group to the base optimizer (and so to this one), with the perturbation defaults."""
        if "base_optimizer" not in self.__dict__:  # during __init__, before the base exists
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        # From this optimizer's defaults, as torch.optim fills a group: an edit of opt.defaults (a dict of its own:
        # the base's defaults and the perturbation's) counts, and so does one of opt.base_optimizer.defaults where
        # opt.defaults still holds the value it was built with. A required setting left unset stays unset, for the
        # base to refuse by name.
        built = self.__dict__.get("_defaults_built", {})
        for k, v in self.defaults.items():
            if v is optim_hooks.required or (k in self.base_optimizer.defaults and built.get(k, self) is v):
                continue  # (unchanged here: the base fills it from its own defaults, edited there or not)
            param_group.setdefault(k, v)
        for k, v in self._perturb_defaults.items():
            param_group.setdefault(k, v)
        self._group_sizes(len(self.param_groups), param_group)
        # What the first step would refuse (tensors sharing memory with the others, complex ones), refused now with
        # nothing added: found at the step, the group stayed and every later step raised. (torch's own checks, of a
        # tensor listed twice and of the "params" type, come from the base below.)
        params = param_group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif params is not None and not isinstance(params, (list, tuple, set, dict, str)):
            # an iterator (model.fc.parameters(), the usual spelling): listed once here, as torch.optim lists it,
            # so the checks below see it
            params = param_group["params"] = list(params)
        if isinstance(params, (list, tuple)) and all(isinstance(p, Tensor) for p in params):
            groups = [*self.param_groups, {**param_group, "params": list(params)}]
            _check_no_shared_memory([p for g in groups for p in g["params"]], groups)
            self._check_real(groups)
        self.base_optimizer.add_param_group(param_group)
        if not torch.compiler.is_compiling():
            # Take the new selection now, eagerly: it snapshots the new tensors' gradients and keeps whether the
            # caller's backward ran since the last step (a compiled step cannot: it ran the clean pass again).
            # What it refuses leaves nothing added.
            try:
                self._selected_groups()
            except Exception:
                self.base_optimizer.param_groups.pop()
                raise

    def default_step_size(self, radius: float) -> float:
        """The ascent step when a group gives none: eta = r (one step to the ball's surface)."""
        return radius

    def _check_real(self, groups: Sequence[Dict[str, Any]]) -> None:
        """torch.optim steps complex parameters; the perturbation ops take real floating tensors only. Refused when
        the groups are read (at construction), not after the first passes ran the closure."""
        for group in groups:
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(
                        f"{_name_in(groups, p)} is complex ({p.dtype}): {type(self).__name__} works on real floating "
                        "tensors; register its real view (torch.view_as_real) as the parameter, or give it an "
                        "optimizer of its own"
                    )

    def _group_sizes(self, i: int, group: Dict[str, Any]) -> Optional[tuple]:
        """(radius, step) of group ``i``, validated; None if the group is not perturbed."""
        if group.get("maximize", False):
            # The ascent would still climb the loss the base optimizer climbs: the worst case of a maximised
            # objective lies the other way. Refused rather than silently perturbing towards the better point.
            raise ValueError(
                f"param_groups[{i}] has maximize=True, which {type(self).__name__} does not support (its ascent "
                "would go towards the better point of the objective); minimise the negated loss instead"
            )
        base_defaults = getattr(getattr(self, "base_optimizer", None), "defaults", {})
        for key in self._optimizer_wide_keys:
            if key in group and key not in base_defaults and group[key] != self._optimizer_wide(key):
                raise ValueError(
                    f"param_groups[{i}] sets {key!r} = {group[key]!r}, but {type(self).__name__} takes {key} for the "
                    f"whole optimizer ({self._optimizer_wide(key)!r} here), not per group as some SAM wrappers do: "
                    f"build it with {key}=... (or one optimizer per setting), and drop the key from the group"
                )
        if self.step_key is None and "step_size" in group and "step_size" not in base_defaults:
            raise ValueError(
                f"param_groups[{i}] sets 'step_size', which {type(self).__name__} does not read (its step is the "
                f"radius, {self.radius_key!r}); drop the key (APD takes a step size)"
            )
        if not check_flag(f"param_groups[{i}]['perturb']", group.get("perturb", True)):
            return None
        rk = self.radius_key
        if rk not in group:
            raise KeyError(f"param_groups[{i}] has no {rk!r}; set it or perturb=False")
        r = check_radius(f"param_groups[{i}][{rk!r}]", group[rk])
        s = group.get(self.step_key) if self.step_key is not None else None
        s = check_radius(f"param_groups[{i}][{self.step_key!r}]", s) if s is not None else self.default_step_size(r)
        if not math.isfinite(s):
            raise ValueError(f"param_groups[{i}]: the step size must be finite, got {s}")
        return r, s

    #: within step(): the caller had called ``scaler.unscale_(opt)`` before it (the closure computes g_0 again)
    _unscaled_before_step: bool = False
    #: set by frameworks.on_the_optimizer: the id of the framework proxy the running call came through
    _proxy_id: Optional[int] = None
    #: a weak reference to the Accelerate wrapper built around this optimizer (frameworks.note_accelerate_wrapper)
    _accelerated: Optional["weakref.ref"] = None
    #: whether frameworks.find_accelerate_wrapper has looked for that wrapper (once per optimizer)
    _accelerate_searched: bool = False

    #: the PerturbSpec fields a preset takes as arguments: one trajectory serves every group, so a group's own
    #: value of one is refused (it was silently ignored)
    spec_group_keys: tuple = ()

    def _optimizer_wide_names(self) -> tuple:
        """Settings this optimizer takes for all groups that some wrappers read per group."""
        return ("adaptive", "eta") + self.spec_group_keys

    def _optimizer_wide(self, key: str) -> Any:
        """The optimizer's own value of a key some wrappers read per group (``adaptive``, ``eta``, the spec's)."""
        if key in self.spec_group_keys:
            return getattr(self.spec, key)
        eta = self.spec.adaptive_eta
        return eta is not None if key == "adaptive" else eta

    def _is_selected(self, p: Tensor) -> bool:
        sel = self._selected.get(p)
        if sel is None:
            sel = self._selected[p] = self.perturb_filter is None or bool(self.perturb_filter(p))
        return sel

    def _selection(self) -> List[tuple]:
        """Per group: (perturbed candidates, passive candidates), cached while the groups'
        parameter lists and ``perturb`` flags are unchanged."""
        return self._selected_groups().groups

    def _selected_groups(self) -> "_Selection":
        # The tensors themselves (ids: the selection holds them, so an id is not reused while cached): a parameter
        # swapped into a group's list in place (torch.optim allows it) must not keep the old one's part (~20 us per
        # step on 1000 tensors).
        pinned = self._pinned
        if pinned is not None:
            return pinned
        key = tuple((tuple(map(id, g["params"])), bool(g.get("perturb", True))) for g in self.param_groups)
        if key != self._selection_cache.key:
            every = [p for g in self.param_groups for p in g["params"]]
            _check_no_shared_memory(every, self.param_groups)
            self._check_real(self.param_groups)
            self._sharded = distributed.check_engine(every)
            sel = []
            for group in self.param_groups:
                on = bool(group.get("perturb", True))
                flags = [on and self._is_selected(p) for p in group["params"]]
                sel.append(
                    (
                        [p for p, f in zip(group["params"], flags) if f],
                        [p for p, f in zip(group["params"], flags) if not f],
                    )
                )
            old = self._selection_cache
            new = _Selection(key, sel, every)
            same = len(old.every) == len(every) and all(map(operator.is_, old.every, every))
            if same:
                new.watch, new.watch_built = old.watch, old.watch_built  # same tensors (e.g. a `perturb` flag flipped)
            else:
                pending = self._backward_since_seen(old)
                self._seen_by_watch = False
            self._selection_cache = new
            self._plan_cache = None
            if not same and not torch.compiler.is_compiling():
                # Other tensors (a group added between steps): snapshot them now, and keep whether a backward ran
                # since the last snapshot of the old ones. Without it a caller's g_0 was unknown at the next step
                # and its clean pass ran again (a wasted pass, BatchNorm statistics moved once more).
                self._see_grads()
                self._g0_pending = pending
        return self._selection_cache

    def _backward_since_seen(self, old: "_Selection") -> bool:
        """Whether a backward ran on ``old``'s tensors since their last snapshot (step() / zero_grad())."""
        if self._g0_pending:
            return True
        if not old.every:
            return False
        if self._seen_by_watch:
            return old.watch is not None and old.watch.changed(_SEEN)
        seen = self._grads_seen
        return len(seen) == len(old.every) and _any_grad_changed(old.every, seen)

    def _pin_selection(self) -> None:
        """Check the groups once and hold that selection until :meth:`_unpin_selection` (a closure call, the end of the
        step). Not under torch.compile, whose traced step reads the groups itself."""
        self._pinned = None
        if not torch.compiler.is_compiling():
            self._pinned = self._selected_groups()

    def _unpin_selection(self) -> None:
        self._pinned = None

    def _handle_on_every(self) -> Optional[ops.TensorLists]:
        """The handle of this step's cycle when its params are every parameter, in order (all perturbed, none
        passive; the plan cached for the current selection), else None."""
        cached = self._plan_cache
        if cached is None or cached[0][0] != self._selection_cache.key or torch.compiler.is_compiling():
            return None
        plan = cached[1]
        parts = plan.cycle_parts
        if plan.passive or parts is None or parts[4] is None or len(plan.params) != len(self._selection_cache.every):
            return None
        lists = parts[4]
        # (a plan of an earlier step, when this step's ran without the cache: its tensors may have changed since)
        return lists if lists.handle is None or lists.handle.current() else None

    def _dense_watch(self, plan: _Plan) -> Optional[Any]:
        """The GradWatch when it watches exactly ``plan.every`` (every parameter has a gradient), else None."""
        watch = self._watch()  # (built on the selection's every; its length is the watch's size, no call needed)
        return watch if watch is not None and len(self._selection_cache.every) == len(plan.every) else None

    def _watch(self) -> Optional[Any]:
        """The compiled GradWatch on every parameter (None when sharded, compiling or without the extension)."""
        if torch.compiler.is_compiling():
            return None
        sel = self._selected_groups()
        if not sel.watch_built:  # built outside any compiled region, on first use
            sel.watch_built = True
            if not self._sharded and sel.every and native.load_error is None:
                sel.watch = torch.classes.fastperturb.GradWatch(sel.every)
        return sel.watch

    def _plan(self) -> _Plan:
        watch = self._watch()
        sel = self._selected_groups()
        dense = watch is not None and watch.count_defined() == len(sel.every)
        if dense:  # the common step: every tensor has a gradient, so the plan is the last one while sizes hold
            key = (sel.key, tuple(self._group_sizes(i, g) for i, g in enumerate(self.param_groups)))
            if self._plan_cache is not None and self._plan_cache[0] == key:
                return self._plan_cache[1]
        plan = self._build_plan()
        if dense:
            self._plan_cache = (key, plan)
        return plan

    def _build_plan(self) -> _Plan:
        plan = _Plan([], [], [], [])
        for i, (group, (chosen, passive)) in enumerate(zip(self.param_groups, self._selection())):
            sizes = self._group_sizes(i, group)
            if sizes is not None:
                with_grad = [p for p in chosen if p.grad is not None]
                plan.params += with_grad
                plan.radius += [sizes[0]] * len(with_grad)
                plan.step += [sizes[1]] * len(with_grad)
            plan.passive += [p for p in passive if p.grad is not None]
            plan.late += [p for p in chosen + passive if p.grad is None]
        plan.every = plan.params + plan.passive
        sparse = next((p for p in plan.every if p.grad.layout != torch.strided), None)
        if sparse is not None:  # (found here, before any buffer is shaped after it or any weight moves)
            raise TypeError(
                f"a parameter of shape {tuple(sparse.shape)} has a {sparse.grad.layout} gradient (e.g. "
                "nn.Embedding(sparse=True)): the perturbation passes need dense gradients; use sparse=False"
            )
        meta = next((p for p in plan.every if p.device.type == "meta"), None)
        if meta is not None:  # (torch.optim steps it; the passes have no values to read, and said so in an op's terms)
            raise ValueError(
                f"{_name_in(self.param_groups, meta)} is on the meta device: it has no values to perturb (materialise "
                "it first, e.g. module.to_empty(device=...) and initialise it)"
            )
        if self._sharded:  # FSDP2: the ops run on the local shards (looked up each step: FSDP may swap them)
            plan.local_params = distributed.local_list(plan.params)
            plan.local_passive = distributed.local_list(plan.passive)
            plan.reduce = self._cached_list("reduce", plan.params, lambda: distributed.reducer_for(plan.params))
        else:
            plan.local_params, plan.local_passive = plan.params, plan.passive
        return plan

    def _releases(self) -> bool:
        if self.grad_clearing not in GRAD_CLEARINGS:
            raise ValueError(f"grad_clearing must be one of {GRAD_CLEARINGS}, got {self.grad_clearing!r}")
        return self.grad_clearing == "release" and not torch.compiler.is_compiling()

    def _grads(self, plan: _Plan, pass_index: int) -> List[Tensor]:
        """The gradients of ``plan.every`` after ``pass_index`` (their shards if sharded)."""
        grads = [p.grad for p in plan.every]
        if not all(map(operator.is_not, grads, repeat(None))):  # rare: a tensor the backward did not reach
            if pass_index > 0 and self._releases():
                _fill_released(plan.every)
            grads = grads_of(plan.every, pass_index)
        return distributed.local_list(grads, plan.every) if self._sharded else grads

    # ---- buffers (wrapper-owned, allocated once, reused) ----------------------------

    def _cached_list(self, name: str, params: Sequence[Tensor], build: Callable[[], Any]) -> Any:
        """``build()``'s list (or reducer), reused while ``params`` are the same tensors in the same order
        (a tensor whose shape changed behind our back is caught by the fused ops' checks)."""
        key = tuple(map(id, params))
        hit = self._list_cache.get(name)
        if hit is None or hit[0] != key:
            hit = self._list_cache[name] = (key, build())
        return hit[1]

    def _backup_list(self, plan: _Plan) -> List[Tensor]:
        # Keyed by the parameter, shaped like what the ops see (a shard of a sharded parameter).
        return self._cached_list(
            "backups",
            plan.local_params,
            lambda: buffers_for(self._backups, plan.params, plan.local_params),
        )

    def _accum_list(self, params: Sequence[Tensor]) -> List[Tensor]:
        return self._cached_list(
            # shaped like the parameters, whose gradients the ops hold to them: a gradient in another layout is then
            # refused in its own name, not in the words of a buffer the user never made
            "accum",
            params,
            lambda: buffers_for(self._accums, params, [distributed.local(p) for p in params]),
        )

    def buffer_count(self) -> tuple:
        """(backups, accumulators) currently allocated: one backup per perturbed tensor, one
        accumulator per tensor with a gradient only when the descent gradient sums passes."""
        return len(self._backups), len(self._accums)

    def _new_cycle(self, plan: _Plan) -> Cycle:
        # A cached plan (_plan) keeps its buffer lists and handle: a step on the same tensors looks nothing up.
        parts = plan.cycle_parts
        native_handle = parts is not None and parts[4] is not None and parts[4].handle is not None
        stale = native_handle and not parts[4].handle.current()
        if self._changed("passive", plan.passive) or stale or parts is None or parts[0] is not self.spec:
            # The same tensors may hold other data now (module.to(float64), channels_last): every list cached by
            # their ids is looked up again, each buffer kept only while it still fits its tensor.
            self._list_cache.clear()
            if not self.spec.accumulates:  # (a spec loaded since that sums no passes: no accumulator kept alive)
                self._accums.clear()
            parts = plan.cycle_parts = (self.spec, *self._cycle_buffers(plan))
        _, backups, accum, passive_accum, lists, radius, step, longer = parts
        params = plan.local_params
        if lists is not None:  # the handle's own lists: the cycle then sees at once that they are its tensors
            params, backups, accum = lists.params, lists.backups, lists.accum
        return Cycle(
            self.spec,
            params,
            backups,
            radius,
            step,
            accum,
            plan.local_passive,
            passive_accum,
            plan.reduce,
            lists=lists,
            longer=longer,
        )

    def _changed(self, name: str, tensors: Sequence[Tensor]) -> bool:
        """Whether ``tensors`` (the same ones as at the last call for ``name``) hold other data now: dtype, shape,
        strides or storage (``module.to(float64)``, channels_last, ``.data`` assigned). A handle on them alone
        fingerprints them (its ``current()`` compares in C++, a few ns per tensor). False for another list (whose
        buffers are looked up by the new ids anyway), for shards (rebuilt every step) and while compiling."""
        if not tensors or self._sharded or torch.compiler.is_compiling() or native.load_error is not None:
            return False
        key = tuple(map(id, tensors))
        last = self._fingerprints.get(name)
        handle = None if last is None else last[1]
        if last is not None and last[0] == key and (handle is None or handle.current()):
            return False
        try:
            lists = ops.TensorLists(tensors)
        except (TypeError, ValueError, RuntimeError):  # tensors the ops refuse (they say so where they are used)
            lists = None
        self._fingerprints[name] = (key, None if lists is None else lists.handle)
        return last is not None and last[0] == key

    def _cycle_buffers(self, plan: _Plan) -> tuple:
        """(backups, accum, passive_accum, handle or None, radius, step, whether a step exceeds its radius) for a
        cycle on ``plan``."""
        accum = self._accum_list(plan.params) if self.spec.accumulates else []
        passive_accum = (
            self._cached_list(
                "passive_accum",
                plan.passive,
                lambda: buffers_for(self._accums, plan.passive, [distributed.local(p.grad) for p in plan.passive]),
            )
            if self.spec.accumulates
            else []
        )
        backups = self._backup_list(plan)
        # The ops' handle on these lists (fastperturb.ops.TensorLists): not on shards, whose gradients are not the
        # .grad of the tensors the ops see.
        lists = None
        if not self._sharded and plan.local_params and not torch.compiler.is_compiling():
            # (backups and accum are this optimizer's own buffers, never handed out: checked once, when built)
            lists = self._lists_cache.get(plan.local_params, backups, accum, private_buffers=True)
        radius, step = plan.radius, plan.step
        if not torch.compiler.is_compiling():  # as tensors once (a list of floats is converted by every cycle)
            dev = plan.local_params[0].device if plan.local_params else torch.device("cpu")
            radius = torch.tensor(radius, dtype=torch.float64, device=dev)
            step = torch.tensor(step, dtype=torch.float64, device=dev)
        return backups, accum, passive_accum, lists, radius, step, any(map(operator.gt, plan.step, plan.radius))

    # ---- which gradient is g_0 -------------------------------------------------------

    def _all_params(self) -> List[Tensor]:
        return self._selected_groups().every

    def _see_grads(self) -> None:
        watch = self._watch()
        self._seen_by_watch = watch is not None
        if watch is not None:
            self._grads_seen = []
            watch.snapshot(_SEEN)
        else:
            self._grads_seen = _versions(self._all_params())
        self._g0_pending = False

    def _forget_grads(self) -> None:
        """Hold no stale gradient while the passes run (see_grads() again after them)."""
        self._grads_seen = []
        watch = self._watch()
        if watch is not None:
            watch.forget(_SEEN)
        self._g0_pending = False

    def _caller_computed_g0(self, params: Sequence[Tensor]) -> bool:
        """Whether a backward ran since the last step() / zero_grad() (on these tensors, or on the earlier
        selection's before its groups changed)."""
        if torch.compiler.is_compiling() and (self._seen_by_watch or self._g0_pending):
            # The snapshot is in the GradWatch (an eager step(), zero_grad() or add_param_group() took it). A compiled
            # step cannot reach the watch from traced code, so it decides eagerly: else it took the caller's g_0 as
            # unknown and ran a clean pass of its own (a third pass per SAM step, BatchNorm statistics moved once
            # more). The flags are read again there: a trace after a change of the groups read them stale.
            return _watch_changed(self)
        if self._g0_pending:
            return True
        if self._seen_by_watch:
            watch = self._watch()
            if watch is not None:
                return watch.changed(_SEEN)  # False without a snapshot of these tensors: unknown, run the clean pass
        seen = self._grads_seen
        if len(seen) != len(params):  # unknown (unpickled, groups added): run the clean pass, always right
            return False
        return _any_grad_changed(params, seen)

    def _zeroed_in_place(self, params: Sequence[Tensor]) -> bool:
        """Whether every gradient in ``.grad`` is all zeros: zeroed in place (``model.zero_grad(set_to_none=False)``,
        ``p.grad.zero_()``) with no backward since, which bumps their versions as a backward does but leaves no
        g_0. Sharded: agreed over the shard group, so every rank runs the same passes."""
        zero = _all_zero(params, self._sharded)
        if self._sharded:
            reduce = self._cached_list("zero_scan", params, lambda: distributed.reducer_for(params))
            if reduce is not None:
                flag = torch.tensor([float(zero)], device=distributed.local(params[0]).device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=reduce.group)
                zero = bool(flag.item())
        return zero

    @frameworks.on_the_optimizer
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; a backward after it gives ``step()`` its g_0."""
        super().zero_grad(set_to_none=set_to_none)
        self._see_grads()

    # ---- the closure contract --------------------------------------------------------

    @staticmethod
    def _call_closure(
        closure: Closure,
        k: int,
        watch: Sequence[Tensor],
        released: bool = False,
        compiled: Optional[Any] = None,
        drop_unreached: bool = False,
    ) -> tuple[Any, Optional[int]]:
        """Run the closure for pass ``k`` and check its contract; ``released``: the gradients of
        ``watch`` were just set to None, so any gradient after it shows the backward. ``compiled``: a
        GradWatch on exactly ``watch``, which then does the looking. ``drop_unreached`` (gradients zeroed in place
        before the clean pass): a gradient the backward did not write is set to None after it, as a released one
        stays None, so a tensor the pass does not reach (frozen, or skipped by the forward) gets no base step: its
        zeroed gradient kept momentum, weight decay and Adam's moments moving it. Returns the loss and, where the
        check counted them, how many of ``watch`` have a gradient after the pass (else None)."""
        defined = None
        drop_unreached = drop_unreached and not released
        if compiled is not None:
            if released:  # (each GradWatch call costs ~10 us, tens on a cold host: count once, hand it on)
                with torch.enable_grad():
                    loss = closure()
                defined = compiled.count_defined()
                ran = defined > 0
            else:
                compiled.snapshot(_PASS)
                try:
                    with torch.enable_grad():
                        loss = closure()
                    ran = compiled.changed(_PASS)
                    if ran and drop_unreached:
                        compiled.release_unchanged(_PASS)
                finally:
                    compiled.forget(_PASS)
        else:
            before = None if released else _versions(watch)
            with torch.enable_grad():
                loss = closure()
            ran = _any_grad(watch) if before is None else _any_grad_changed(watch, before)
            if ran and drop_unreached:
                _drop_unreached(watch, before)
        if loss is None:
            if frameworks.skips_on_none(closure):  # Lightning's training_step returned None: skip this batch
                raise frameworks.TrainingStepSkipped(k)
            raise TypeError(
                f"the closure returned None at pass {k}; it must compute the loss, call loss.backward() "
                "and return the loss"
            )
        if not ran:
            raise RuntimeError(
                f"the closure did not call backward() at pass {k}: no gradient of the optimized "
                "parameters changed; it must compute the loss, call loss.backward() and return the loss"
            )
        return loss, defined

    # ---- non-finite handling, clipping, the base step ------------------------------

    def _mark_skipped(self) -> None:
        self.last_step_skipped = True
        self.skipped_steps += 1

    def _on_nonfinite(self, err: NonFiniteGradient, scaler: Optional[torch.amp.GradScaler]) -> None:
        """Skip the step (weights already restored); tell the scaler, or raise if asked to."""
        self._mark_skipped()
        # When the radius, not the model, made the NaN, the message says what to change (read on the host: only for
        # a message that may be shown).
        shown = self.nonfinite == "raise" or not self._warned_skip
        note = self._last_cycle.overflow_note() if self._last_cycle is not None and shown else ""
        if _scaling(scaler):  # routine while the scaler searches its scale: no warning, unless backing off cannot help
            self._report_overflow(scaler)
            if note and not self._warned_skip:
                self._warned_skip = True
                warnings.warn(
                    f"{type(self).__name__} skipped a step under a GradScaler: {note}. Backing off the loss scale does "
                    "not change the perturbation, so such steps keep skipping. Warned once per optimizer.",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
            return
        if note:
            err.args = (f"{err}; {note}",)
        if self.nonfinite == "raise":
            raise err from None
        if not self._warned_skip:
            self._warned_skip = True
            warnings.warn(
                f"{type(self).__name__} skipped a step: {err} (opt.skipped_steps counts skipped steps; "
                "nonfinite='raise' raises fastperturb.NonFiniteGradient instead). Warned once per optimizer.",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )

    def _named(self, err: NonFiniteGradient, plan: _Plan) -> NonFiniteGradient:
        """The engine's error, naming the parameters (``param_groups[i]['params'][j]``)."""
        if type(err) is not NonFiniteGradient:
            return err
        where = {
            id(p): f"param_groups[{gi}]['params'][{pj}]"
            for gi, group in enumerate(self.param_groups)
            for pj, p in enumerate(group["params"])
        }
        names = [where.get(id(plan.params[i]), f"perturbed tensor {i}") for i in err.tensor_indices]
        return NonFiniteGradient(err.tensor_indices, err.pass_index, names)

    def _report_overflow(self, scaler: torch.amp.GradScaler) -> None:
        """Make ``scaler.update()`` back off. The scaler only learns about overflows from
        the gradients it unscales, but a step can also overflow in the fused statistics
        (a finite gradient whose squared norm exceeds float32), so it unscales a one-element
        holder whose gradient is inf, through its public ``unscale_``."""
        holder = self._overflow_holder
        if holder is None:
            dev = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
            t = torch.zeros(1, device=dev)
            t.grad = torch.full((1,), math.inf, device=dev)
            holder = _GradHolder([{"params": [t]}])
            self._keep(_overflow_holder=holder)
        with torch.no_grad():
            holder.param_groups[0]["params"][0].grad.fill_(math.inf)
        scaler.unscale_(holder)  # type: ignore[arg-type]

    def _descend(
        self,
        scaler: Optional[torch.amp.GradScaler],
        base_step: Optional[Callable[[bool], None]] = None,
        cycle: Optional[Cycle] = None,
    ) -> None:
        """G is in .grad: check it, clip it, take the base step at the restored weights
        (``base_step``, default ``base_optimizer.step``; never with an enabled scaler).

        ``cycle``: still perturbed (G complete); restored here before anything reads the weights, in the
        same pass as the check of G where its handle holds every parameter (``restore_norms_lists_``). The
        caller restores it on any exception (``cycle.restore()`` is a no-op once restored)."""
        if _scaling(scaler):
            if not self._unscaled_before_step:
                _check_not_unscaled(self, scaler, "during the step (in the closure, or before second_step())")
            scaler.unscale_(self.base_optimizer)
        every, watch = self._all_params(), self._watch()
        dense = watch is not None and watch.count_defined() == len(every)
        with_grad = every if dense else [p for p in every if p.grad is not None]
        handle = self._handle_on_every() if dense else None
        # The restore's pass reads the backups and writes the weights: G's read rides on it where the handle can.
        in_restore = handle is not None and cycle is not None and cycle.perturbed and cycle.lists is handle
        if cycle is not None and not in_restore:
            cycle.restore()  # (a no-op when the caller restored it)
        grads: Optional[List[Tensor]] = None
        if handle is not None:  # the step's handle holds exactly these tensors: it reads their .grad itself
            if in_restore:
                per, total = ops.restore_norms_lists_(handle, 2.0)
                cycle.mark_restored()
            else:
                per, total = ops.norms_lists(handle, 2.0, of_grads=True)
        else:
            grads = [p.grad for p in with_grad]
            reduce = None
            if self._sharded:  # the norm of the whole gradient, the same on every rank
                grads = distributed.local_list(grads, with_grad)
                reduce = self._cached_list("descend_reduce", with_grad, lambda: distributed.reducer_for(with_grad))
            total, per = _grad_norm(grads, reduce)
        # The one place Python branches on G: both decisions in one device sync (one torch.compile graph break),
        # in as few ops as it can (each costs tens of microseconds on a host the passes have left cold).
        if self.max_grad_norm is not None and torch.compiler.is_compiling():
            # The clipping factor stays a tensor: as a Python float it would make dynamo recompile at every step
            # that clips.
            total = total.to(torch.float64)
            coef = torch.full_like(total, self.max_grad_norm) / (total + 1e-6)
            finite, clip = torch.stack([torch.isfinite(total), coef < 1.0]).tolist()
        else:  # the same float64 arithmetic on the host; the factor becomes a tensor only when it clips
            finite = math.isfinite(norm := total.item())
            factor = float(self.max_grad_norm) / (norm + 1e-6) if finite and self.max_grad_norm is not None else 1.0
            clip = factor < 1.0
            if clip:
                coef = torch.tensor(factor, dtype=torch.float64, device=total.device)
        if not finite:
            names = [
                f"param_groups[{gi}]['params'][{pj}]"
                for gi, group in enumerate(self.param_groups)
                for pj, p in enumerate(group["params"])
                if p.grad is not None
            ]
            bad = [i for i, v in enumerate(per.tolist() if isinstance(per, Tensor) else per) if not math.isfinite(v)]
            err = NonFiniteDescentGradient([names[i] for i in bad], bad, self.spec.steps)
            self._on_nonfinite(err, scaler)
            return
        if clip:
            torch._foreach_mul_(grads if grads is not None else [p.grad for p in with_grad], coef)
        if _scaling(scaler):
            scaler.step(self.base_optimizer)
        elif base_step is None:
            self.base_optimizer.step()
        else:  # (the handle's norm of G checked each .grad's layout against its parameter's)
            base_step(handle is not None)

    # ---- public API --------------------------------------------------------------------

    def step(  # type: ignore[override]
        self, closure: Optional[Closure] = None, scaler: Optional[torch.amp.GradScaler] = None
    ) -> Any:
        """One full step at the weights ``w``: the clean-point gradient g_0, ``spec.steps``
        perturbed passes, the base step with ``G = sum_k c_k g_k`` at the exactly restored ``w``.

        Where g_0 comes from: if a backward ran since the last ``step()`` or ``zero_grad()``
        (``loss.backward(); opt.step(closure); opt.zero_grad()``, the loop of the common SAM
        wrappers), the gradient in ``.grad`` is g_0 and the closure runs only at the
        ``spec.steps`` perturbed points; the return value is then ``None``, as with
        pytorch-optimizer's SAM (the clean loss was computed by the caller). Otherwise
        ``step()`` clears the gradients and calls the closure at ``w`` first
        (``spec.steps + 1`` calls) and returns that clean loss.

        ``closure()`` must compute the loss on the batch, call ``backward()`` on it (on
        ``scaler.scale(loss)`` when a scaler is given; several backward calls over
        micro-batches are fine; under DDP wrap all but the last in ``no_sync()``) and
        return the loss. It need not zero the gradients: the optimizer clears them before
        each pass (sets them to None, or zeroes them: :attr:`grad_clearing`; a tensor the clean pass's
        backward does not reach has no gradient and takes no base step, one a perturbed pass's does not
        reach gets a zero gradient; a closure that calls ``zero_grad()``
        first works too). The weights are
        restored bit for bit if it raises. With ``scaler`` (an enabled
        ``torch.amp.GradScaler``) the gradients are unscaled before clipping and the base
        step, an overflow skips the step, and the caller runs ``scaler.update()`` afterwards.
        """
        return self._run_step(closure, scaler)

    def _run_step(self, closure: Optional[Closure], scaler: Optional[torch.amp.GradScaler]) -> Any:
        """:meth:`step`'s work. Subclasses extend this, not ``step``: torch wraps each optimizer class's ``step``
        with the hook runner once an instance of it exists, so a ``step`` that called ``super().step()`` ran the
        step hooks twice once this class had been instantiated too."""
        if closure is None:
            if frameworks.dcp_initialising_state() and all(float(g.get("lr", 0.0)) == 0.0 for g in self.param_groups):
                # get/set_optimizer_state_dict(model, opt) on a fresh optimizer: zero gradients at lr 0, a step that
                # only creates the base optimizer's state (a perturbation of a zero gradient is zero). Not while a
                # first_step() is pending: that step would be the base's first (Adam's step count 1). Nothing is
                # done then; the state_dict() or load_state_dict() DCP calls next refuses (raising here would leave
                # the lr DCP set to 0 in the groups).
                if self._pending is None:
                    self.base_optimizer.step()
                return None
            raise TypeError(frameworks.no_closure_message(self))
        if not callable(closure):  # (e.g. the loss itself: it cannot be recomputed at the perturbed points)
            raise TypeError(
                f"{type(self).__name__}.step() takes a closure, a function that computes the loss, calls backward() "
                f"on it and returns it (it runs again at each perturbed point), not a {type(closure).__name__}"
            )
        if self._pending is not None:
            raise RuntimeError(
                "first_step() was called without second_step(), and the weights are still perturbed: call "
                "second_step() after the backward at the perturbed weights, or opt.restore() to undo first_step() "
                "(bit for bit, no base step)"
            )
        _check_scaler(scaler)
        frameworks.check_step(self, closure)
        self.last_step_skipped = False
        # An unscale_ before the step is the caller's business when the closure computes g_0 again (PerturbTrainer's
        # fp16 path, after Trainer's gradient norm); one during the step is refused (_descend, after pass 0).
        unscaled_before = _scaling(scaler) and _unscaled_by_caller(self, scaler)
        if unscaled_before:  # (only then: a write to the optimizer breaks a torch.compile graph)
            self._keep(_unscaled_before_step=True)
        self._pin_selection()
        every = self._all_params()
        watch = self._watch()
        try:
            g0_from_caller = self._caller_computed_g0(every) and not self._zeroed_in_place(every)
            self._forget_grads()  # hold no stale gradient while the passes run (seen again below)
            if g0_from_caller:
                # (its gradients at the perturbed points come scaled from the closure: G would mix the two)
                _check_not_unscaled(self, scaler, "on g_0 before step(closure, scaler=scaler)")
                loss = None
            else:
                release = self._releases()
                _release_grads(every, watch) if release else _zero_grads(every)
                self._unpin_selection()
                loss = self._call_closure(
                    closure, 0, every, released=release, compiled=watch, drop_unreached=not release
                )[0]
                if not unscaled_before:
                    _check_not_unscaled(self, scaler, "in the closure")
                self._pin_selection()
            plan = self._plan()
            fuse = self._fusable(scaler)
            cycle = None
            if plan.params:
                try:
                    cycle = self._perturbed_passes(plan, closure, restore=not (fuse or self._restore_in_descend))
                except NonFiniteGradient as err:
                    self._on_nonfinite(self._named(err, plan), scaler)
                    return loss
            if not fuse:
                try:
                    self._descend(scaler, cycle=cycle)
                finally:
                    if cycle is not None:
                        cycle.restore()  # an exception before _descend restored (no-op otherwise)
                return loss
            try:  # the weights are still perturbed: G is checked (and clipped) before the fused op reads it
                self._descend(scaler, base_step=lambda checked: self._fused_base_step(cycle, checked))
            finally:
                if cycle is not None:
                    cycle.restore()  # a skipped step or an exception (no-op after the fused step)
            return loss
        except frameworks.TrainingStepSkipped:  # (the weights were restored on the way out of the cycle)
            self.last_step_skipped = True
            return None
        finally:
            self._last_cycle = None  # (held for _on_nonfinite only: a family cycle refers back to its optimizer)
            if unscaled_before:
                self._keep(_unscaled_before_step=False)
            try:
                self._see_grads()
            finally:
                self._unpin_selection()

    def _fusable(self, scaler: Optional[torch.amp.GradScaler]) -> bool:
        """Whether this step's base step is fused (``fused_step=True`` and nothing needs the fallback)."""
        if not self.fused_step:
            return False
        if _scaling(scaler):
            reason = "an enabled GradScaler steps the base optimizer itself"
        elif self._sharded:
            reason = "sharded (FSDP2) parameters"
        else:  # (the checks of each tensor and its state are made by the fused step, on G, before it writes)
            reason = fused.step_reason(self.base_optimizer)
        self.fused_step_fallback = reason
        return reason is None

    def _fused_base_step(self, cycle: Optional[Cycle], grads_checked: bool) -> None:
        """Restore and base step in one pass (fused_step.py); the cycle's weights count as restored. A step the
        fused op cannot take (a gradient or a state that does not fit) is restored and given to the base optimizer.
        """
        params, backups = (cycle.params, cycle.backups) if cycle is not None else ([], [])
        if self._changed("fused_step", self._all_params()):  # (module.to(float64), channels_last: same objects)
            fused.forget_checks(self.base_optimizer)
        reason = fused.fused_base_step(self.base_optimizer, params, backups, grads_checked=grads_checked)
        if reason is None:
            if cycle is not None:
                cycle.mark_restored()
            return
        self.fused_step_fallback = reason
        if cycle is not None:
            cycle.restore()
        self.base_optimizer.step()

    def _perturbed_passes(self, plan: _Plan, closure: Closure, restore: bool = True) -> Cycle:
        cycle = self._last_cycle = self._new_cycle(plan)
        watch = plan.every
        compiled = self._dense_watch(plan)
        release = self._releases()
        # pass k -> how many of plan.every had a gradient after it, as the closure's check counted them (run_cycle
        # asks grads_at(k) right after run_pass(k), with nothing in between)
        counted: dict[int, int] = {}
        late = self._late_grads(plan, cycle)
        with contextlib.ExitStack() as stack:

            def run_pass(k: int) -> Any:
                if k == 1 and self.freeze_bn is not None:
                    stack.enter_context(frozen_bn_stats(self.freeze_bn))
                if late is not None and k >= 2:
                    late.collect(k - 1)
                if release:
                    _release_grads(watch, compiled)
                pinned = self._pinned is not None
                self._unpin_selection()  # (the closure may edit the groups: checked again after it, as before it)
                loss, defined = self._call_closure(closure, k, watch, released=release, compiled=compiled)
                if pinned:
                    self._pin_selection()
                if defined is not None:
                    counted[k] = defined
                return loss

            # A plain cycle on a handle reads the perturbed tensors' .grad itself: with no passive tensor and every
            # gradient there, it needs no list of them (building one per pass costs ~0.1 us per tensor).
            own = compiled is not None and type(cycle) is Cycle and cycle.lists is not None and not plan.passive

            def grads_at(k: int) -> Sequence[Tensor]:
                defined = counted.pop(k, None)
                if own and (defined if defined is not None else compiled.count_defined()) == len(plan.every):
                    return ()
                return self._grads(plan, k)

            try:
                run_cycle(cycle, run_pass, grads_at=grads_at, zero_grads=not release, restore=restore)
            except Exception as err:
                if self._sharded and not isinstance(err, NonFiniteGradient):
                    distributed.note_recovery(err)
                raise
        if late is not None:
            late.finish()
        return cycle

    def _late_grads(self, plan: _Plan, cycle: Cycle) -> Optional[LateGrads]:
        """The gatherer for the tensors a perturbed pass may reach first (None when the plain rule is right)."""
        if not plan.late or not LateGrads.needed(cycle.weights):
            return None
        return LateGrads(plan.late, cycle.weights)

    @functools.partial(frameworks.on_the_optimizer, takes_scaler=True)
    def first_step(self, zero_grad: bool = True, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        """SAM convention, part 1: with g_0 in ``.grad`` (after your backward), move the
        weights to ``w + delta``. Then run forward/backward again and call :meth:`second_step`.
        Single-step presets only. ``zero_grad`` clears the gradients for that second pass
        (see :attr:`grad_clearing`). The optimizer's step pre-hooks run here, at the clean weights, where they run
        in :meth:`step`; its post-hooks when :meth:`second_step` ends."""
        if self.spec.steps == 1 and self._pending is None:
            _check_scaler(scaler)
            _check_not_unscaled(self, scaler, "on g_0 before first_step(scaler=scaler)")  # (before any hook runs)
            args, kwargs = _run_pre_hooks(self, (), {"zero_grad": zero_grad, "scaler": scaler})
            return self._first_step(*args, **kwargs)
        return self._first_step(zero_grad, scaler)  # (refused below, before any hook runs)

    def _first_step(self, zero_grad: bool = True, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        if self.spec.steps != 1:
            raise RuntimeError(
                f"first_step()/second_step() are for single-step presets; this one takes {self.spec.steps} "
                "ascent steps: use step(closure)"
            )
        if self._pending is not None:
            raise RuntimeError(
                "first_step() was called twice without second_step(), and the weights are still perturbed by the "
                "first: call second_step() after the backward at the perturbed weights, or opt.restore() to undo "
                "first_step() (bit for bit, no base step; e.g. when a batch is skipped between the two)"
            )
        _check_scaler(scaler)
        self.last_step_skipped = False
        plan = self._plan()
        if not plan.params and not plan.passive:
            raise RuntimeError("first_step() found no gradients: compute the loss and call backward() first")
        cycle = self._new_cycle(plan)
        pending = _Pending(plan=plan, cycle=cycle, scaler=scaler)
        try:
            grads = self._grads(plan, 0)
            cycle.start(grads)
            release = zero_grad and self._releases()
            cycle.ascend(grads, zero_grads=zero_grad and not release)
            del grads
            if release:
                _release_grads(plan.every, self._dense_watch(plan))
        except NonFiniteGradient as err:
            cycle.restore()
            self._on_nonfinite(self._named(err, plan), scaler)  # raises in "raise" mode
            pending.skipped = True
        except BaseException:
            cycle.restore()
            raise
        if pending.skipped:
            if zero_grad:
                self.zero_grad(set_to_none=False)
        elif self.freeze_bn is not None:
            pending.stack.enter_context(frozen_bn_stats(self.freeze_bn))
        compiled = self._dense_watch(plan)
        if compiled is not None:
            compiled.snapshot(_PASS)
            pending.watch = compiled
        else:
            pending.versions = _versions(plan.every)
        self._keep(_pending=pending)

    @functools.partial(frameworks.on_the_optimizer_step, takes_scaler=True)
    def second_step(self, zero_grad: bool = True, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        """SAM convention, part 2: with the gradient at ``w + delta`` in ``.grad``, restore
        ``w`` exactly and take the base step with the descent gradient. The optimizer's step hooks
        (``register_step_pre_hook``/``post_hook``) run around the pair as they run around :meth:`step`: the
        pre-hooks when :meth:`first_step` starts (at the clean weights: here the weights are perturbed, and
        whatever a hook wrote to them would be overwritten by the restore), the post-hooks when this ends."""
        self._second_step(zero_grad, scaler)
        kwargs: Dict[str, Any] = {"zero_grad": zero_grad, "scaler": scaler}
        for hook in chain(self._optimizer_step_post_hooks.values(), optim_hooks._global_optimizer_post_hooks.values()):
            hook(self, (), kwargs)

    def _second_step(self, zero_grad: bool = True, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        pending = self._pending
        if pending is None:
            raise RuntimeError("second_step() called without first_step()")
        self._keep(_pending=None)
        scaler = scaler if scaler is not None else pending.scaler
        _check_scaler(scaler)
        cycle = pending.cycle
        fuse = not pending.skipped and self._fusable(scaler)  # then the fused base step restores
        try:
            if not pending.skipped:
                try:
                    if not pending.backward_ran():
                        raise RuntimeError(
                            "no backward() between first_step() and second_step(): compute the loss at the "
                            "perturbed weights and call backward() on it; the weights were restored"
                        )
                    grads = self._grads(pending.plan, 1)
                    cycle.observe(grads)
                    cycle.finish(grads)
                    late = self._late_grads(pending.plan, cycle)
                    if late is not None:
                        late.finish()
                except BaseException:
                    cycle.restore()
                    raise
                if not (fuse or self._restore_in_descend):
                    cycle.restore()
        finally:
            try:
                pending.stack.close()
            except BaseException:
                cycle.restore()
                raise
        if not pending.skipped:
            self._last_cycle = cycle
            try:
                if fuse:  # (the fused op restores: the cycle stays perturbed through the check of G)
                    self._descend(scaler, base_step=lambda checked: self._fused_base_step(cycle, checked))
                else:
                    self._descend(scaler, cycle=cycle)
            finally:
                self._last_cycle = None
                cycle.restore()  # no-op unless the fused step was skipped or raised
                self._see_grads()
        else:
            self._see_grads()
        self._opt_called = True  # what LR schedulers check (their patched step() sets it)
        if zero_grad:
            self.zero_grad()

    # torch.compile (dynamo, torch 2.13) drops attribute stores on a torch.optim.Optimizer in the code it traces
    # when the frame also runs tensor work, at graph breaks too: what a call keeps on the optimizer for a later
    # one (the pending first_step) is stored eagerly. (A compiled restore() left the first_step pending, so every
    # later step was refused; found by this round's second torch.compile review.)
    @torch.compiler.disable
    def _keep(self, **values: Any) -> None:
        self.__dict__.update(values)

    @frameworks.on_the_optimizer
    def restore(self) -> None:
        """Undo :meth:`first_step` without a base step: the weights are put back bit for
        bit (e.g. when the pass at the perturbed point raised). No-op if no step is pending."""
        pending = self._pending
        self._keep(_pending=None)
        if pending is None:
            return
        try:
            pending.cycle.restore()
        finally:
            pending.stack.close()

    # ---- checkpoints -----------------------------------------------------------------

    def _guard_base_loads(self) -> None:
        """A load of ``opt.base_optimizer`` itself (a distributed checkpoint handed the base) is refused while a
        first_step() is pending, as the wrapper's own load is, before anything loads. The hook holds this optimizer
        weakly."""
        self.base_optimizer.register_load_state_dict_pre_hook(functools.partial(_base_load_hook, weakref.ref(self)))

    def _refuse_while_pending(self, what: str) -> None:
        """Between first_step() and second_step() the weights are perturbed and their backups are transient: a copy
        or a checkpoint would hold w + delta with no way back, and a load would leave the pending step to write
        the old backups over the weights later."""
        if self._pending is None:
            return
        if self._pending.skipped:  # (a non-finite gradient: nothing was perturbed, the step is still open)
            raise RuntimeError(
                f"the optimizer cannot be {what} between first_step() and second_step(): this first_step() was "
                "skipped (non-finite gradient), the weights are clean, and the step is still open; call "
                "second_step() (which skips too) or restore() first"
            )
        if "loaded" in what:
            raise RuntimeError(
                f"the optimizer cannot be {what} between first_step() and second_step(): the weights are perturbed "
                "(w + delta) and the pending step would later put its backups of the weights from before "
                "first_step() back over them, also over weights loaded since; nothing was loaded. Call restore() "
                "first (then load the model's weights, if you are resuming, and the optimizer)"
            )
        raise RuntimeError(
            f"the optimizer cannot be {what} between first_step() and second_step(): the weights are perturbed "
            "(w + delta) and their backups are not part of the copy; call second_step() (or restore()) first"
        )

    def per_pass_clipping_is_exact(self) -> bool:
        """Whether clipping each pass's gradient by its norm (what a framework's closure does: Lightning's
        ``gradient_clip_val`` without :class:`~fastperturb.integrations.lightning.PerturbMixin`) takes the step that
        clipping the descent gradient takes: ascent steps whose direction ignores the gradient's length, and a
        descent gradient that is the last pass's (SAM, ASAM, one-step AWP, and AWP with ``descent="last"``: the
        engine's directions are g/||g|| or sign(g), which a common scale leaves alone)."""
        return (self.spec.steps == 1 or self.spec.descent == "last") and not self.spec.include_clean

    def __getstate__(self) -> Dict[str, Any]:
        # Everything (torch.optim.Optimizer would keep only defaults/state/param_groups),
        # without the transient perturbation buffers.
        self._refuse_while_pending("copied or pickled")
        state = self.__dict__.copy()
        # An LR scheduler wraps step() in an instance attribute bound to *this* optimizer (and sets _opt_called):
        # copied, the copy's step() would drive the original, and a closure does not pickle. torch.optim drops both.
        state.pop("step", None)
        state.pop("_opt_called", None)
        state.update(
            _backups={},
            _accums={},
            _list_cache={},
            _fingerprints={},
            _pending=None,
            _proxy_id=None,
            _accelerated=None,
            _accelerate_searched=False,
            _last_cycle=None,
            _overflow_holder=None,
            _grads_seen=[],
            _g0_pending=False,
        )
        state.update(_selection_cache=_Selection(), _plan_cache=None, _seen_by_watch=False, _pinned=None)
        state.update(_lists_cache=ops.ListsCache())
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._guard_base_loads()  # (torch drops an optimizer's hooks from its copies and pickles)
        self.__dict__.setdefault("_lists_cache", ops.ListsCache())
        self.__dict__.setdefault("_plan_cache", None)
        self.__dict__.setdefault("_seen_by_watch", False)
        self.__dict__.setdefault("_g0_pending", False)
        self.__dict__.setdefault("_pinned", None)
        self.__dict__.setdefault("_last_cycle", None)
        if not isinstance(self.__dict__.get("_selection_cache"), _Selection):
            self._selection_cache = _Selection()

    def _settings(self) -> Dict[str, Any]:
        return {
            "preset": type(self).__name__,
            "base": type(self.base_optimizer).__qualname__,
            "spec": dataclasses.asdict(self.spec),
            "max_grad_norm": self.max_grad_norm,
            "nonfinite": self.nonfinite,
        }

    @frameworks.on_the_optimizer
    def state_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict (its state and the shared param_groups, which hold
        the per-group radius/step) plus this wrapper's settings under ``"fastperturb"``.
        The perturbation buffers are transient and not saved. Hooks registered on this optimizer
        (``register_state_dict_pre_hook``/``post_hook``) run as torch.optim runs them."""
        self._refuse_while_pending("saved")
        for pre in self._optimizer_state_dict_pre_hooks.values():
            pre(self)
        sd = self.base_optimizer.state_dict()
        sd[STATE_KEY] = self._settings()
        for post in self._optimizer_state_dict_post_hooks.values():
            result = post(self, sd)
            if result is not None:
                sd = result
        return sd

    @frameworks.on_the_optimizer
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict` (or a plain base-optimizer state dict), between this
        optimizer's ``register_load_state_dict_pre_hook``/``post_hook`` hooks."""
        self._refuse_while_pending("loaded")
        if "accelerate.optimizer" in sys.modules:
            frameworks.note_accelerate_wrapper(self)
        sd = dict(state_dict)  # (a hook may change it in place: never the caller's)
        for pre in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre(self, sd)
            if result is not None:
                sd = result
        self._load(sd)
        for post in self._optimizer_load_state_dict_post_hooks.values():
            post(self)

    def _load(self, state_dict: Dict[str, Any]) -> None:
        sd = dict(state_dict)
        settings = sd.pop(STATE_KEY, None)
        if settings is not None:
            if settings.get("preset") != type(self).__name__:
                raise ValueError(
                    f"this state dict is from a {settings.get('preset')} optimizer, not {type(self).__name__}"
                )
            base = type(self.base_optimizer).__qualname__
            if settings.get("base", base) != base:
                # (its state and groups would load half: Adam's __setstate__ fails on SGD's state after taking its
                # groups, and SGD takes Adam's state silently, then fails at the step)
                raise ValueError(
                    f"this state dict is from {settings['preset']} over {settings['base']}, not over {base}; nothing "
                    f"was loaded. To change the base optimizer, build the new optimizer fresh (the model's weights "
                    f"load as usual)"
                )
            spec = PerturbSpec(**settings["spec"])
            max_grad_norm = _checked_max_grad_norm(settings.get("max_grad_norm"))
            nonfinite = settings.get("nonfinite", "skip")
            if nonfinite not in NONFINITE_MODES:
                raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        else:
            sd = _without_wrapper_backups(sd, self.base_optimizer)
        self.base_optimizer.load_state_dict(sd)
        self._share()
        for group in self.param_groups:
            for k, v in self._perturb_defaults.items():
                group.setdefault(k, v)
        if settings is not None:
            self.spec, self.max_grad_norm, self.nonfinite = spec, max_grad_norm, nonfinite


#: Per-parameter state that the SAM wrappers people migrate from keep for their own two calls: the weights before
#: first_step() (davda54's SAM and ASAM, pytorch-optimizer's SAM and LookSAM). Stale once their second_step() ran, it
#: would otherwise load into the base optimizer's state and stay there, a copy of every parameter in memory and in
#: every later checkpoint. No torch.optim optimizer has state of that name.
WRAPPER_BACKUP_KEYS = ("old_p",)


def _without_wrapper_backups(state_dict: Dict[str, Any], base: torch.optim.Optimizer) -> Dict[str, Any]:
    """A state dict without fastperturb's settings (another SAM wrapper's, or a plain base optimizer's) with the
    migrated wrapper's weight backups left out; only over torch's own optimizers, whose state names are known."""
    state = state_dict.get("state")
    if not type(base).__module__.startswith("torch.optim") or not isinstance(state, dict):
        return state_dict
    kept = {}
    for i, entry in state.items():
        if isinstance(entry, dict):
            entry = {k: v for k, v in entry.items() if k not in WRAPPER_BACKUP_KEYS}
            if not entry:
                continue
        kept[i] = entry
    return {**state_dict, "state": kept}


def _checked_max_grad_norm(value: Optional[float]) -> Optional[float]:
    """``max_grad_norm`` as given to the constructor or loaded from a state dict: None, or a finite number > 0 (0
    would scale every descent gradient to zero, a run that trains nothing)."""
    if value is None:
        return None
    value = check_radius("max_grad_norm", value)
    if value == 0:
        raise ValueError("max_grad_norm must be > 0 (None disables clipping)")
    return value


def _read_through(opt: Any, name: str) -> Any:
    """``opt.base_optimizer.<name>``, or this object's own before the base exists. An object that
    borrows this class without its attributes (Lightning's ``LightningOptimizer`` imitates the class
    of the optimizer it wraps) gets an AttributeError, so Python falls back to its ``__getattr__``."""
    d = opt.__dict__
    base = d.get("base_optimizer")
    if base is not None:
        return getattr(base, name)
    if f"_own_{name}" in d:
        return d[f"_own_{name}"]
    raise AttributeError(name)


#: Keywords of the SAM wrappers people migrate from (pytorch-optimizer's) that fastperturb's optimizers do not take,
#: and what to do instead. Passed on to a base optimizer that does not name them, they would be refused by it with an
#: error that blames the base, or swallowed by a base that takes ``**kwargs`` and ignored (WSAM's ``max_norm``: no
#: clipping at all). A base optimizer that names one of them in its signature gets it.
MIGRATION_KEYWORDS: Dict[str, str] = {
    "max_norm": "pytorch-optimizer's WSAM clipping; pass max_grad_norm=..., which clips the descent gradient "
    "(README, 'The SAM family')",
    "use_gc": "gradient centralisation of the ascent direction (pytorch-optimizer's SAM and LookSAM) is not offered; "
    "drop it",
    "perturb_eps": "pytorch-optimizer's epsilon in the ascent's norm is not needed here (a zero gradient takes no "
    "step); drop it (APD's radius is eps=, kept per group as 'perturb_eps' when the base has its own eps)",
    "model": "fastperturb's optimizers take no model; for the BatchNorm handling of pytorch-optimizer's WSAM and GSAM "
    "pass freeze_bn=model",
    "rho_scheduler": "GSAM here takes rho_max/rho_min (and lr_max/lr_min), linear in each group's lr, instead of a "
    "ProportionScheduler",
}


def _base_load_hook(owner: "weakref.ref[PerturbOptimizer]", base: torch.optim.Optimizer, state_dict: Any) -> None:
    opt = owner()
    if opt is not None:
        opt._refuse_while_pending("loaded")


def _misplaced_message(opt: "PerturbOptimizer", key: str) -> Optional[str]:
    """What to do about keyword ``key``, given to ``opt``'s preset and passed on to its base optimizer, when it is
    one of the migration keywords or another preset's setting; None for anything else (the base's own)."""
    if key in MIGRATION_KEYWORDS:
        return MIGRATION_KEYWORDS[key]
    takers = sorted(name for name, keys in _preset_keywords().items() if key in keys and name != type(opt).__name__)
    if not takers:
        return None
    return (
        f"{type(opt).__name__} has no {key!r} setting ({', '.join(takers)} take{'s' if len(takers) == 1 else ''} it; "
        f"{type(opt).__name__}'s radius is {type(opt).radius_key!r}); drop it, or use that optimizer"
    )


@functools.lru_cache(maxsize=8)
def _preset_keywords_of(classes: tuple) -> Dict[str, frozenset]:
    return {cls.__name__: frozenset(_keyword_names(cls) - {"base_optimizer", "args", "kwargs"}) for cls in classes}


def _preset_keywords() -> Dict[str, frozenset]:
    """The constructor keywords of fastperturb's presets (every public subclass of PerturbOptimizer defined in
    fastperturb: not the users' subclasses, nor the classes Lightning makes per wrapped optimizer), by name."""
    classes, stack = [], list(PerturbOptimizer.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if not cls.__name__.startswith("_") and cls.__module__.startswith("fastperturb."):
            classes.append(cls)
    return _preset_keywords_of(tuple(sorted(classes, key=lambda c: c.__qualname__)))


def check_signature(name: str, params: Any, base_optimizer: Any, named: Dict[str, Any]) -> None:
    """Refuse, naming the difference, the constructor calls of the SAM wrappers people migrate from whose arguments
    land in the wrong places here: a model first (pytorch-optimizer's WSAM), a base optimizer instance and a model
    and a ``ProportionScheduler`` (pytorch-optimizer's GSAM), before any setting is checked by value."""
    containers = (nn.ParameterList, nn.ParameterDict)  # (modules that are also plain iterables of parameters)
    if (isinstance(params, nn.Module) and not isinstance(params, containers)) or any(
        isinstance(v, nn.Module) for v in named.values()
    ):
        raise TypeError(
            f"{name}(params, base_optimizer, ...) takes the parameters (model.parameters()) and no model, unlike "
            "pytorch-optimizer's WSAM and GSAM; for their BatchNorm handling pass freeze_bn=model"
        )
    if isinstance(base_optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"{name}'s base_optimizer must be an optimizer class such as torch.optim.SGD, not an instance (as "
            "pytorch-optimizer's GSAM takes), with its arguments passed as keywords: "
            f"{name}(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9); got a {type(base_optimizer).__name__} "
            "instance"
        )
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise TypeError(
            "base_optimizer must be an optimizer class such as torch.optim.SGD (not an instance), "
            f"with its arguments passed as keywords; got {base_optimizer!r}"
        )
    if issubclass(base_optimizer, PerturbOptimizer):
        raise TypeError("base_optimizer cannot itself be a fastperturb optimizer; pass e.g. torch.optim.SGD")
    for key, value in named.items():
        if type(value).__name__ == "ProportionScheduler":
            raise TypeError(f"{name} got a ProportionScheduler as {key}: {MIGRATION_KEYWORDS['rho_scheduler']}")


def _takes_any_keyword(cls: type) -> bool:
    """Whether ``cls.__init__`` takes ``**kwargs`` (or its signature cannot be read)."""
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _unknown_keyword_message(
    opt: PerturbOptimizer, base: type, base_kwargs: Dict[str, Any], err: TypeError
) -> Optional[str]:
    """For the base optimizer's "unexpected keyword argument" error: the preset's and the base's keywords (and the
    nearest of them), since the keyword reached the base only because the preset does not take it either."""
    key = next((k for k in base_kwargs if f"unexpected keyword argument '{k}'" in str(err)), None)
    if key is None:
        return None
    name = type(opt).__name__
    shared = {n for n, p in inspect.signature(PerturbOptimizer.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY}
    own = sorted((_keyword_names(type(opt)) | shared) - {"base_optimizer", "args", "kwargs", "base_kwargs"})
    theirs = sorted(_keyword_names(base) - {"args", "kwargs"})
    near = difflib.get_close_matches(key, own + theirs, n=1)
    # (whose: APD's eps is its radius, not AdamW's eps, which APD's eps= does not reach)
    hint = f"did you mean {name if near[0] in own else base.__name__}'s {near[0]!r}? " if near else ""
    return (
        f"{name} got {key}={base_kwargs[key]!r}, which neither {name} nor its base optimizer {base.__name__} takes "
        f"(keywords {name} does not take go to the base optimizer); {hint}{name}'s keywords: {', '.join(own)}; "
        f"{base.__name__}'s: {', '.join(theirs)}"
    )


def _keyword_names(cls: type) -> set:
    try:
        return set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    except (TypeError, ValueError):
        return set()


def _group_key(name: str, taken: set) -> str:
    return f"perturb_{name}" if name in taken else name


@torch.compiler.disable
def _watch_changed(opt: PerturbOptimizer) -> bool:
    """``GradWatch.changed`` of ``opt``'s snapshot, run eagerly (called from a compiled step); True while a
    backward seen before a change of the groups is pending."""
    if opt._g0_pending:
        return True
    watch = opt._watch() if opt._seen_by_watch else None
    return watch is not None and watch.changed(_SEEN)


def _name_in(groups: Sequence[Dict[str, Any]], t: Tensor) -> str:
    """``param_groups[i]['params'][j]`` of ``t``."""
    return next(
        f"param_groups[{gi}]['params'][{pj}]"
        for gi, g in enumerate(groups)
        for pj, p in enumerate(g["params"])
        if p is t
    )


def _check_base_step(base: type) -> None:
    """A base optimizer whose step() needs a closure (LBFGS) re-evaluates the loss itself: there is no place for
    the perturbed passes in it, and calling it without one failed only after the passes. SparseAdam takes only
    sparse gradients, which the perturbation passes cannot use: it failed after the passes too."""
    if issubclass(base, torch.optim.SparseAdam):
        raise TypeError(
            "torch.optim.SparseAdam steps only on sparse gradients, and the perturbation passes need dense ones (an "
            "nn.Embedding(sparse=True) is refused), so it cannot be the base of a perturbation step; use "
            "torch.optim.Adam or AdamW with dense gradients"
        )
    closure = inspect.signature(base.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(
            f"{base.__name__}.step() needs a closure (it evaluates the loss several times itself), so it cannot be "
            "the base of a perturbation step; use a first-order optimizer such as torch.optim.SGD or AdamW"
        )


def _check_scaler(scaler: object) -> None:
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")


def _unscaled_by_caller(opt: PerturbOptimizer, scaler: torch.amp.GradScaler) -> bool:
    """Whether ``scaler.unscale_(opt)`` ran since the scaler's last ``update()``, on this optimizer or on the
    framework proxy (Lightning's, Fabric's) this call came through. The step unscales through the base optimizer, a
    separate entry of the scaler's: the caller's calls are the only ones under these ids."""
    states = getattr(scaler, "_per_optimizer_states", {})
    ids = (id(opt), opt.__dict__.get("_proxy_id"))
    return any(getattr(states.get(i, {}).get("stage"), "name", None) == "UNSCALED" for i in ids if i is not None)


def _check_not_unscaled(opt: PerturbOptimizer, scaler: Optional[torch.amp.GradScaler], when: str) -> None:
    """Refuse gradients the caller unscaled (``when``) that the step is about to unscale itself, or to combine with
    scaled ones: the base step would be 1/scale too short (SAM), or scaled and unscaled gradients mixed (WSAM)."""
    if _scaling(scaler) and _unscaled_by_caller(opt, scaler):
        raise RuntimeError(
            f"scaler.unscale_(optimizer) was called {when} (the scaler says so until its next update()): the "
            "optimizer unscales the descent gradient itself, "
            "before clipping and the base step, so these gradients would be unscaled twice or mixed with scaled "
            "ones (a step 1/scale too short, silently). Don't call unscale_ on it; clip with max_grad_norm=... "
            "(or opt.max_grad_norm = ...). The weights are restored and no step was taken"
        )


def _zero_grads(params: Sequence[Tensor]) -> None:
    """Zero the existing gradients in place in one fused call (``zero_grad(set_to_none=False)``
    issues one op per parameter unless the base optimizer runs in foreach mode)."""
    grads = [distributed.local(g) for g in map(operator.attrgetter("grad"), params) if g is not None]
    if grads:
        with torch.no_grad():
            torch._foreach_zero_(grads)


def _check_no_shared_memory(every: Sequence[Tensor], groups: Sequence[Dict[str, Any]]) -> None:
    """Refuse parameters that share memory (one listed twice, one a view of another): the perturbation would be
    applied twice to the shared elements and the restore of one would undo the other's backup, so the weights
    would not come back bit for bit. (The ops' own span, ``validation._span``: per device, none for fake tensors.)"""
    spans = []
    for i, p in enumerate(every):
        t = distributed.local(p)
        s = V._span(t)
        if s is not None:
            spans.append((str(t.device), s[0], s[1], i))
    spans.sort()
    # Sorted by start, some two spans overlap iff two neighbours on one device do.
    for (dev, _, end, i), (dev2, start, _, j) in zip(spans, spans[1:]):
        if dev == dev2 and start < end:
            names = [
                f"param_groups[{gi}]['params'][{pj}]" for gi, g in enumerate(groups) for pj in range(len(g["params"]))
            ]
            raise ValueError(
                f"{names[min(i, j)]} and {names[max(i, j)]} share memory (the same tensor twice, or one a view of "
                "the other): their perturbations would overlap and restore could not be exact; pass each tensor "
                "once, and not views of one another"
            )


# The elements of a gradient's head looked at before the rest of it (one op and one sync each).
_ZERO_SCAN_HEAD = 4096


def _all_zero(params: Sequence[Tensor], sharded: bool) -> bool:
    """Whether every element of the ``params``' gradients is zero (NaN is not; their local shards if ``sharded``).
    From the last tensor back, where a model's output layer sits, whose gradient any loss reaches: a real gradient
    ends the scan at the head of one tensor (each ``.grad`` is read only when reached: on 1000 tensors, building
    their list first cost 0.4 ms), and only gradients that are zero (or start with zeros) are read further."""
    for p in reversed(params):
        g = p.grad
        if g is None:
            continue
        if sharded:
            g = distributed.local(g)
        if g.numel() == 0:
            continue
        if g.layout != torch.strided or not g.is_contiguous():
            if bool(g.any()):  # (sparse: its stored values; other layouts: one look at the whole tensor)
                return False
            continue
        flat = g.view(-1)
        if bool(flat[:_ZERO_SCAN_HEAD].any()):
            return False
        if flat.numel() > _ZERO_SCAN_HEAD and bool(flat[_ZERO_SCAN_HEAD:].any()):
            return False
    return True


def _run_pre_hooks(opt: torch.optim.Optimizer, args: tuple, kwargs: Dict[str, Any]) -> tuple:
    """The global and the optimizer's step pre-hooks, as torch's ``Optimizer.step`` wrapper runs them: each may
    return replacement ``(args, kwargs)``."""
    for hook in chain(optim_hooks._global_optimizer_pre_hooks.values(), opt._optimizer_step_pre_hooks.values()):
        result = hook(opt, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(f"{hook} must return None or a tuple of (new_args, new_kwargs), got {result}")
            args, kwargs = result
    return args, kwargs


def _release_grads(params: Sequence[Tensor], compiled: Optional[Any] = None) -> None:
    """Set the gradients to None (``zero_grad(set_to_none=True)`` without its per-group loop):
    the next backward stores its fresh gradient instead of adding it to a zeroed one. ``compiled``: a
    GradWatch on exactly ``params``, which does it in one call."""
    if compiled is not None:
        compiled.release()
        return
    for p in params:
        p.grad = None


def _fill_released(params: Sequence[Tensor]) -> None:
    """A tensor the pass's backward did not reach gets a zero gradient, as it would have had
    if its gradient had been zeroed rather than released."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _grad_norm(grads: Sequence[Tensor], reduce: Optional[distributed.Reduce] = None) -> tuple:
    """Global L2 norm (float64 0-dim tensor) and per-tensor norms of ``grads`` (a tensor, or a
    list of floats when the gradients span devices): one fused pass per device. With ``reduce``,
    ``grads`` are shards and the norms are those of the whole tensors."""
    if reduce is not None:
        squares = reduce(ops.norms(grads, 2.0)[0].to(torch.float64).square(), "sum")
        return squares.sum().sqrt(), squares.sqrt()
    try:
        per_t, total_t = ops.norms(grads, 2.0)  # the common case: one device
        return total_t.to(torch.float64), per_t
    except ValueError:
        if len({g.device for g in grads}) < 2:
            raise
    by_device: Dict[torch.device, List[int]] = {}
    for i, g in enumerate(grads):
        by_device.setdefault(g.device, []).append(i)
    per = [0.0] * len(grads)
    sq = 0.0
    for idx in by_device.values():
        pn, total_t = ops.norms([grads[i] for i in idx], 2.0)
        for i, v in zip(idx, pn.tolist()):
            per[i] = v
        sq += float(total_t) ** 2
    return torch.tensor(math.sqrt(sq), dtype=torch.float64), per
