"""The SAM family on the one engine: GSAM, WSAM, LookSAM and FriendlySAM.

Each is a :class:`PerturbOptimizer` with a single global ascent step (SAM's ``delta = rho*v/||v||``)
plus a *descent rule*: a few hooks around the engine's cycle, all tensor work in the fused ops
(``dot_stats``, ``lincomb_``, ``ema_residual_``), all statistics per tensor and completed across
shards by the cycle's ``reduce`` like the engine's own. The hooks, in step order:

* ``_at_clean_point``: rewrite g_0 before the ascent (FriendlySAM: ``d = g - sigma*m``) or keep a
  copy of it for after the passes (GSAM, WSAM, LookSAM's refresh);
* ``_reuses``: skip the perturbed pass (LookSAM between refreshes);
* ``_form_descent``: turn the passes' gradients into the descent gradient G in ``.grad``, before the
  wrapper's clipping, non-finite check and base step;
* ``_commit`` after a base step that was taken (WSAM's decoupled update, LookSAM's counter and
  its new ``gv``), ``_rollback`` after a skipped step or an exception (FriendlySAM's EMA): the
  persistent state only moves with a step that happened.

The maths and where each preset departs from pytorch-optimizer 4.1.0 are in the README
("SAM family") and in each class's docstring.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .. import distributed, ops
from .._callers import user_stacklevel
from ..engine import (
    Cycle,
    NonFiniteGradient,
    PerturbSpec,
    check_finite,
    check_flag,
    check_radius,
    exact_tiny_dots,
    exact_tiny_norms,
    tiny_rows,
)
from . import frameworks
from .buffers import buffers_for, kept_in_layout, refit
from .wrapper import (
    Params,
    PerturbOptimizer,
    _group_key,
    _keyword_names,
    _Plan,
    _read_through,
    _scaling,
    check_signature,
)

__all__ = ["GSAM", "WSAM", "LookSAM", "FriendlySAM"]

FAMILY_KEY = "family"  # the preset's hyperparameters and persistent state inside state_dict()["fastperturb"]


def _finite(name: str, value: Any, lo: float, hi: float, hi_open: bool = False) -> float:
    """A float in ``[lo, hi]`` (``[lo, hi)`` if ``hi_open``), with a clear error otherwise."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(v) or v < lo or v > hi or (hi_open and v == hi):
        right = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in [{lo}, {hi}{right}, got {value}")
    return v


def _coef(rows: Tensor, n: int, device: torch.device) -> Tensor:
    """A float32 ``[n, 3]`` coefficient tensor for ``ops.lincomb_`` from rows broadcast to it."""
    return rows.to(device=device, dtype=torch.float32).expand(n, 3).contiguous()


class _FamilyCycle(Cycle):
    """A cycle whose clean-point measurement belongs to the preset (see :meth:`_Family._at_clean_point`)."""

    def __init__(self, owner: "_Family", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner = owner

    def start(self, grads: Sequence[Tensor]) -> None:
        n = len(self.params)
        sq = self.owner._at_clean_point(self, list(grads[:n])) if n else None
        if sq is None:  # the engine's own measurement (e.g. the adaptive form's |w|-weighted norm)
            super().start(grads)
            return
        # ascent_coefficients reads column 0 (the squared norm of the direction, which the preset left in
        # ``grads``); the other two columns serve the projection, which a single step of length rho never needs.
        # The engine's check completes it across shards, checks it and takes vanishing sums again in float64.
        stats = torch.nn.functional.pad(sq.to(torch.float32).unsqueeze(1), (0, 2))
        self._stats = self._checked(stats, grads, self.owner.spec.adaptive_eta is not None, 0)


class _Family(PerturbOptimizer):
    """What the four presets share: the hooks' sequencing, scratch buffers, checkpointed state."""

    radius_key = "rho"
    step_key = None
    #: whether first_step()/second_step() work (LookSAM's reuse steps have no second pass)
    two_call = True
    # Their descent rules run after the restore and reuse the backups (WSAM keeps g1 - g there): the restore
    # stays first, not in the pass that checks G.
    _restore_in_descend = False

    def __init__(self, params: Params, base_optimizer: type, rho: float, adaptive: bool, /, **kwargs: Any) -> None:
        # (positional-only: a base optimizer's own rho, Adadelta's, passes through kwargs; one given to GSAM,
        # whose radius is rho_max, is refused by the wrapper, naming the presets that take it)
        if kwargs.get("fused_step"):
            # Their descent rules need the restored weights' buffers after the passes (WSAM keeps
            # g1 - g in the backups) and hooks around the base step: the fused restore + base step
            # of SAM, ASAM, AWP and APD does not apply.
            raise ValueError(
                f"{type(self).__name__} does not take fused_step=True: the SAM family's descent rules run "
                "around an unfused base step; use fused_step with SAM, ASAM, AWP or APD"
            )
        self._scratch: Dict[Tensor, Tensor] = {}  # the clean gradient's copy, one per tensor
        self._lists: Dict[str, tuple] = {}
        self._cycle_plan: Optional[_Plan] = None  # the plan whose passes are done and descent not yet formed
        self._scaler: Optional[torch.amp.GradScaler] = None
        adaptive_eta = 0.0 if check_flag("adaptive", adaptive) else None
        spec = PerturbSpec(norm="l2", scope="global", steps=1, adaptive_eta=adaptive_eta)
        super().__init__(params, base_optimizer, spec, rho, **kwargs)
        self._watch_base_loads()

    def _watch_base_loads(self) -> None:
        """Whatever loads the base optimizer's state (this wrapper's load_state_dict, or a distributed checkpoint
        handed opt.base_optimizer) replaces the state the preset keeps across steps as well: a state dict that
        carries none (a plain torch one, DCP's) starts it afresh, as a new optimizer would, instead of leaving the
        gv or running mean of other weights in place; the wrapper's own load then sets what it carries. The hook
        holds this optimizer weakly (no reference cycle keeping its buffers alive), and torch drops hooks from a
        copy or a pickle, so ``__setstate__`` registers it again."""
        self.base_optimizer.register_load_state_dict_post_hook(functools.partial(_base_state_loaded, weakref.ref(self)))

    # ---- buffers ------------------------------------------------------------------------

    def _list(
        self, name: str, store: Dict[Tensor, Tensor], plan: _Plan, like: Sequence[Tensor], keep: bool = False
    ) -> List[Tensor]:
        """``store``'s buffer of each perturbed tensor (allocated like ``like``), cached per tensor list. ``keep``:
        the store is state kept across steps, brought to ``like``'s layout with its values (a scratch buffer that
        does not fit is replaced, uninitialised)."""
        key = (id(store), tuple(map(id, plan.params)))
        hit = self._lists.get(name)
        if hit is None or hit[0] != key:
            hit = self._lists[name] = (key, (kept_in_layout if keep else buffers_for)(store, plan.params, like))
        return hit[1]

    def _copy_coef(self, like: List[Tensor]) -> Tensor:
        """lincomb_'s exact-copy rows for ``like`` (cached: built on the host, moved once per length)."""
        key = (len(like), like[0].device)
        hit = self._lists.get("copy_coef")
        if hit is None or hit[0] != key:
            hit = self._lists["copy_coef"] = (key, _coef(_COPY, len(like), like[0].device))
        return hit[1]

    def _clean_copy(self, plan: _Plan, grads: Sequence[Tensor]) -> List[Tensor]:
        return self._list("scratch", self._scratch, plan, grads)

    def _copy_clean(self, cycle: Cycle, grads: List[Tensor]) -> Optional[Tensor]:
        """Keep g_0 (exact copy); its squared norms come free with the copy (non-adaptive only)."""
        plan = self._cycle_plan
        assert plan is not None
        sq = ops.lincomb_(self._clean_copy(plan, grads), grads, [], self._copy_coef(grads))
        return None if self.spec.adaptive_eta is not None else sq

    def _reduced(self, plan: _Plan, stats: Tensor) -> Tensor:
        stats = plan.reduce(stats, "sum") if plan.reduce is not None else stats
        return stats.to(torch.float64)

    # A gradient whose elements are all below about 1e-19 has float32 squares and products that are subnormal
    # or zero, so its float32 sums come out short: those sums are taken again in float64 (a rank's own shards
    # before the collective, as the engine does for the ascent's norms).

    def _dots(self, plan: _Plan, a: List[Tensor], b: List[Tensor], scope: str) -> Tensor:
        """``dot_stats(a, b)`` (``[<a,a>, <a,b>, <b,b>]`` per tensor) completed across shards, as float64."""
        s = ops.dot_stats(a, b)
        rows = tiny_rows(s[:, 0::2], "layer" if plan.reduce is not None else scope)
        if rows:
            s = exact_tiny_dots(s, rows, a, b)  # (float64: the collective keeps it)
        return self._reduced(plan, s)

    def _sums(self, plan: _Plan, sq: Tensor, tensors: List[Tensor], scope: str) -> Tensor:
        """``sq`` (``||tensors[i]||^2`` per tensor, from an op) completed across shards, as float64."""
        rows = tiny_rows(sq, "layer" if plan.reduce is not None else scope)
        if rows:
            sq = exact_tiny_norms(sq, rows, tensors)
        return self._reduced(plan, sq)

    def _local_grads(self, plan: _Plan) -> List[Tensor]:
        n = len(plan.params)
        return self._grads(plan, 1)[:n]

    def per_pass_clipping_is_exact(self) -> bool:
        """False: every descent rule here uses the clean gradient's length (GSAM's and LookSAM's projections,
        WSAM's mix, FriendlySAM's running mean), which clipping each pass changes."""
        return False

    # ---- the hooks (overridden by the presets) --------------------------------------------

    def _at_clean_point(self, cycle: Cycle, grads: List[Tensor]) -> Optional[Tensor]:
        """Before the ascent, with g_0 in ``grads``: may rewrite it; returns the per-tensor squared
        norms of the ascent direction (or None: the engine measures it)."""
        return self._copy_clean(cycle, grads)

    def _reuses(self, plan: _Plan) -> bool:
        """Whether this step takes no perturbed pass (the descent is formed from g_0 alone)."""
        return False

    def _refit_saved(self) -> None:
        """After the tensors changed dtype, layout or shape: bring the state kept across steps to them."""

    # (what a step keeps on the optimizer across calls is stored through the wrapper's eager _keep, and the hooks
    # that move the presets' own state run eagerly: dynamo drops attribute stores on an optimizer)
    @torch.compiler.disable
    def _follow_tensors(self, plan: _Plan) -> None:
        """When this step's tensors hold other data than at the last step (``module.to(float64)``, channels_last,
        ``.data`` of another shape): the cached lists are looked up again and the state kept across steps is
        brought to the tensors (``_refit_saved``)."""
        if self._changed("family", [*plan.local_params, *plan.local_passive]):
            self._list_cache.clear()
            self._lists.clear()
            self._refit_saved()

    def _form_descent(self, plan: _Plan, grads: List[Tensor], scaler: Optional[torch.amp.GradScaler]) -> None:
        """Leave G in ``grads``; raise :class:`NonFiniteGradient` to skip before persistent state moves."""

    def _commit(self, plan: _Plan, scaler: Optional[torch.amp.GradScaler]) -> None:
        """After the base step was taken."""

    def _rollback(self) -> None:
        """After a skipped step or an exception: undo this step's changes to the persistent state."""

    # ---- sequencing (the wrapper's paths, extended) -----------------------------------------

    def _new_cycle(self, plan: _Plan) -> Cycle:
        if self._cycle_plan is not plan:  # (_perturbed_passes has followed them for this plan already)
            self._follow_tensors(plan)
        self._keep(_cycle_plan=plan)
        return _FamilyCycle(
            self,
            self.spec,
            plan.local_params,
            self._backup_list(plan),
            plan.radius,
            plan.step,
            passive=plan.local_passive,
            reduce=plan.reduce,
        )

    def _perturbed_passes(self, plan: _Plan, closure: Any, restore: bool = True) -> Optional[Cycle]:
        self._follow_tensors(plan)
        self._keep(_cycle_plan=plan)
        if self._reuses(plan):
            return None
        try:
            return super()._perturbed_passes(plan, closure, restore)
        except BaseException:
            self._keep(_cycle_plan=None)
            self._rollback()
            raise

    def _descend(
        self, scaler: Optional[torch.amp.GradScaler], base_step: Optional[Any] = None, cycle: Optional[Cycle] = None
    ) -> None:
        plan = self._cycle_plan
        self._keep(_cycle_plan=None)
        try:
            if plan is not None:
                try:
                    self._form_descent(plan, self._local_grads(plan), scaler)
                except NonFiniteGradient as err:
                    self._rollback()
                    self._on_nonfinite(self._named(err, plan), scaler)  # raises in "raise" mode
                    return
            super()._descend(scaler, base_step, cycle)
        except BaseException:
            self._rollback()
            raise
        if self.last_step_skipped:
            self._rollback()
        elif plan is not None:
            self._commit(plan, scaler)

    def _run_step(self, closure: Any, scaler: Optional[torch.amp.GradScaler]) -> Any:
        if self._pending is not None:  # the wrapper refuses this; the pending first_step's state stays
            return super()._run_step(closure, scaler)
        self._keep(_cycle_plan=None, _scaler=scaler)
        try:
            return super()._run_step(closure, scaler)
        except BaseException:
            self._rollback()
            raise

    @functools.partial(frameworks.on_the_optimizer, takes_scaler=True)
    def first_step(self, zero_grad: bool = True, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        if not self.two_call:
            raise RuntimeError(
                f"{type(self).__name__} does not support first_step()/second_step(): its steps between refreshes "
                "take no second pass; use step(closure) (or loss.backward(); opt.step(closure))"
            )
        if self._pending is not None:  # refused by the wrapper, without touching the pending step's state
            return super().first_step(zero_grad, scaler)
        self._keep(_cycle_plan=None, _scaler=scaler)
        try:
            super().first_step(zero_grad, scaler)
        except BaseException:
            self._rollback()
            raise
        if self.last_step_skipped:
            self._rollback()

    @functools.partial(frameworks.on_the_optimizer_step, takes_scaler=True)
    def second_step(self, zero_grad: bool = True, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        if not self.two_call:
            raise RuntimeError(f"{type(self).__name__} does not support first_step()/second_step(): use step(closure)")
        try:
            super().second_step(zero_grad, scaler)
        except BaseException:
            self._rollback()
            raise

    @frameworks.on_the_optimizer
    def restore(self) -> None:
        had = self._pending is not None
        super().restore()
        if had:
            self._keep(_cycle_plan=None)
            self._rollback()

    # ---- checkpoints -----------------------------------------------------------------------

    def _hyper(self) -> Dict[str, Any]:
        """The preset's hyperparameters (saved with the settings, restored by load_state_dict)."""
        return {}

    def _set_hyper(self, hyper: Dict[str, Any]) -> None:
        pass

    def _optimizer_wide_names(self) -> tuple:
        # (pytorch-optimizer's FriendlySAM reads sigma and lmbda per group; these presets take them once)
        return super()._optimizer_wide_names() + tuple(self._hyper())

    def _optimizer_wide(self, key: str) -> Any:
        hyper = self._hyper()
        return hyper[key] if key in hyper else super()._optimizer_wide(key)

    def _persistent(self, index: Dict[Tensor, int]) -> Dict[str, Any]:
        """The persistent state, tensors keyed by parameter index (the state_dict's numbering)."""
        return {}

    # ---- torch.distributed.checkpoint ---------------------------------------------------------
    # DCP keeps only a state dict's per-parameter "state" and its "param_groups" (the "fastperturb" entry is
    # dropped), and its flattened form is unflattened by the names in the live opt.state[p]. So for DCP the
    # persistent state also travels as per-parameter entries named in ``dcp_keys``: tensors shaped and sharded like
    # the parameter (DCP saves and reshards them as it does AdamW's moments) and 0-dim tensors, with placeholders
    # where a parameter has none, so a fresh optimizer's template names what any checkpoint holds.

    #: the names of the per-parameter entries the persistent state takes in a distributed checkpoint
    dcp_keys: tuple = ()

    @PerturbOptimizer.state.getter  # type: ignore[attr-defined]
    def state(self) -> Dict[Any, Any]:
        st = _read_through(self, "state")
        # (DCP never runs under torch.compile, whose tracing cannot walk the frames)
        if self.dcp_keys and not torch.compiler.is_compiling() and frameworks.dcp_reads_directly():
            return _StateWithEntries(st, self)
        return st

    def _dcp_entries(self, saved: Dict[str, Any], params: List[Tensor]) -> Dict[int, Dict[str, Any]]:
        """The persistent state ``saved`` (as :meth:`_persistent` gives it) as entries per parameter index, for
        every parameter that requires a gradient (the ones DCP keeps state for)."""
        return {}

    def _from_dcp_entries(self, entries: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
        """:meth:`_persistent`'s form (local tensors) from the entries per parameter index."""
        return {}

    def state_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        sd = super().state_dict()
        if self.dcp_keys and frameworks.called_by_dcp():
            params = self._flat_params()
            entries = self._dcp_entries(self._persistent({p: i for i, p in enumerate(params)}), params)
            state = {k: dict(v) for k, v in sd["state"].items()}  # (the base's dicts are its live state)
            for i, e in entries.items():
                state.setdefault(i, {}).update(e)
            sd["state"] = state
        return sd

    def _split_dcp_entries(self, sd: Dict[str, Any]) -> tuple:
        """``sd`` without the persistent state's per-parameter entries, and those entries by parameter position
        (a loaded state's keys are the saved ids or, from DCP, names; positions follow its param_groups, as
        torch.optim maps them)."""
        state = sd.get("state")
        if not self.dcp_keys or not isinstance(state, dict):
            return sd, {}
        ids = [pid for g in sd.get("param_groups", []) for pid in g.get("params", [])]
        position = {pid: k for k, pid in enumerate(ids)}
        kept: Dict[Any, Any] = {}
        entries: Dict[int, Dict[str, Any]] = {}
        for pid, s in state.items():
            if not isinstance(s, dict) or not any(k in s for k in self.dcp_keys):
                kept[pid] = s
                continue
            if pid not in position:
                raise ValueError(
                    f"the state dict holds {type(self).__name__} state for a parameter ({pid!r}) its param_groups "
                    "do not list; nothing was loaded"
                )
            entries[position[pid]] = {k: s[k] for k in self.dcp_keys if k in s}
            rest = {k: v for k, v in s.items() if k not in self.dcp_keys}
            if rest:
                kept[pid] = rest
        return {**sd, "state": kept}, entries

    def _load_persistent(self, saved: Dict[str, Any], params: List[Tensor]) -> None:
        pass

    def _flat_params(self) -> List[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _settings(self) -> Dict[str, Any]:
        settings = super()._settings()
        index = {p: i for i, p in enumerate(self._flat_params())}
        settings[FAMILY_KEY] = {"hyper": self._hyper(), "state": self._persistent(index)}
        return settings

    def _load(self, state_dict: Dict[str, Any]) -> None:
        entries: Dict[int, Dict[str, Any]] = {}
        if isinstance(state_dict, dict):
            state_dict, entries = self._split_dcp_entries(state_dict)
        settings = (state_dict.get("fastperturb") or {}) if isinstance(state_dict, dict) else {}
        family = settings.get(FAMILY_KEY)
        if entries:  # (a distributed checkpoint's: the "fastperturb" entry is not in those)
            family = {"hyper": (family or {}).get("hyper", {}), "state": self._from_dcp_entries(entries)}
        before = self._hyper()
        try:
            if family is not None:  # checked before the base optimizer's state is replaced: nothing half-loaded
                self._check_saved(family.get("state", {}), self._flat_params())
                self._set_hyper(dict(family.get("hyper", {})))  # (checks them: a bad value refuses the whole load)
            super()._load(state_dict)
        except BaseException:
            self._set_hyper(before)
            raise
        if family is not None:
            self._load_persistent(family.get("state", {}), self._flat_params())

    def _saved_tensors(self, saved: Dict[str, Any]) -> List[tuple]:
        """(parameter index, tensor) of the preset's persistent state in ``saved`` (none by default)."""
        return []

    def _check_saved(self, saved: Dict[str, Any], params: List[Tensor]) -> None:
        for i, t in self._saved_tensors(saved):
            i = int(i)
            if not 0 <= i < len(params):
                raise ValueError(f"the state dict's {type(self).__name__} state names parameter {i} of {len(params)}")
            want = tuple(_local(params[i].detach()).shape)
            if not isinstance(t, Tensor) or tuple(t.shape) != want:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"the state dict's {type(self).__name__} state for parameter {i} has shape {got}, the parameter "
                    f"{want}: it is from another model; nothing was loaded"
                )

    def __getstate__(self) -> Dict[str, Any]:
        # The persistent state travels by parameter index (tensor identities do not survive a copy).
        index = {p: i for i, p in enumerate(self._flat_params())}
        state = super().__getstate__()
        state.update(_scratch={}, _lists={}, _cycle_plan=None, _scaler=None, _family_saved=self._persistent(index))
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        saved = state.pop("_family_saved", None)
        super().__setstate__(state)
        self._watch_base_loads()
        if saved is not None:
            self._load_persistent(saved, self._flat_params())


class _StateWithEntries(dict):
    """``opt.state`` as torch.distributed.checkpoint reads it to unflatten a flattened optimizer state dict: each
    parameter's live state plus the names of the persistent state's entries (their values are not read)."""

    def __init__(self, state: Dict[Any, Any], opt: _Family) -> None:
        super().__init__(state)
        self._extra = {id(p) for p in opt._flat_params() if p.requires_grad}
        self._keys = opt.dcp_keys

    def __getitem__(self, p: Any) -> Dict[str, Any]:
        live = dict(self.get(p, {}))
        if id(p) in self._extra:
            live.update(dict.fromkeys(self._keys))
        return live


def _scalar(value: Any) -> Optional[float]:
    """A 0-dim entry's value, or None when it is not one (a flattened template's ``{}`` for a missing name)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(distributed.local(value).item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _base_state_loaded(owner: "weakref.ref[_Family]", base: torch.optim.Optimizer) -> None:
    opt = owner()
    if opt is not None:
        opt._load_persistent({}, [])


_COPY = torch.tensor([0.0, 1.0, 0.0])  # lincomb_ row: out = x, exactly


def _refit(store: Dict[Tensor, Tensor]) -> bool:
    return refit(store, lambda p: _local(p.detach()))


def _local(t: Tensor) -> Tensor:
    return distributed.local(t)


class GSAM(_Family):
    """GSAM (Zhuang et al., ICLR 2022, Algorithm 1): SAM's perturbed gradient ``g1`` minus ``alpha`` times the
    part of the clean gradient ``g`` orthogonal to it, all vectors global::

        rho_t = rho_min + (rho_max - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)   (per group)
        e = rho_t * g / ||g||;   g1 = grad L(w + e)
        G = g1 - alpha * (g - (<g, g1> / ||g1||^2) * g1) = (1 + alpha*<g,g1>/||g1||^2) * g1 - alpha * g

    ``rho_t`` follows each group's current ``lr`` linearly (read at every step, so any LR scheduler
    drives it), clamped to ``[rho_min, rho_max]``; ``lr_max`` defaults to the group's ``lr`` when the
    optimizer is built, ``lr_min`` to 0; ``rho_min = rho_max`` is a constant radius. Group keys:
    ``rho_max``, ``rho_min``, ``lr_max``, ``lr_min``. Defaults: the paper's Table 4, ResNet rows.
    ``adaptive=True`` perturbs with ``rho*w^2 g/|| |w| g ||`` (the official code's form; the paper
    multiplies by ``|w|`` once). Differences from pytorch-optimizer: ``alpha = 1`` is allowed; a plain
    ``rho_max``/``rho_min`` pair replaces its ``ProportionScheduler``; ``<g,g1>/||g1||^2`` is taken
    without its two ``perturb_eps`` (0 when ``g1 = 0``); the weights are restored by copy, not
    ``(w + e) - e``. Other keywords: see :class:`PerturbOptimizer`, then the base optimizer's.
    """

    radius_key = "rho_max"

    def __init__(
        self,
        params: Params,
        base_optimizer: type,
        rho_max: float = 0.04,
        rho_min: float = 0.02,
        alpha: float = 0.01,
        lr_max: Optional[float] = None,
        lr_min: float = 0.0,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        check_signature(
            "GSAM", params, base_optimizer, dict(rho_max=rho_max, rho_min=rho_min, alpha=alpha, lr_max=lr_max)
        )
        self.alpha = _finite("alpha", alpha, 0.0, 1.0)
        taken = _keyword_names(base_optimizer)
        self._keys = {k: _group_key(k, taken) for k in ("rho_min", "lr_max", "lr_min")}
        self._group_defaults = {
            "rho_min": check_radius("rho_min", rho_min),
            "lr_max": None if lr_max is None else check_radius("lr_max", lr_max),
            "lr_min": check_radius("lr_min", lr_min),
        }
        super().__init__(params, base_optimizer, rho_max, adaptive, **kwargs)
        extra = {self._keys[k]: v for k, v in self._group_defaults.items() if v is not None}
        self._perturb_defaults.update(extra)
        self.defaults.update(extra)

    def _group_sizes(self, i: int, group: Dict[str, Any]) -> Optional[tuple]:
        base_defaults = getattr(getattr(self, "base_optimizer", None), "defaults", {})
        if "rho" in group and "rho" not in base_defaults and self.radius_key != "rho":
            raise ValueError(
                f"param_groups[{i}] sets 'rho' = {group['rho']!r}, which GSAM does not read: its radius follows the "
                f"group's lr between {self.radius_key!r} and {self._keys['rho_min']!r}; set those in the group "
                "(equal for a constant radius) and drop 'rho'"
            )
        sizes = super()._group_sizes(i, group)
        if sizes is None:
            return None
        k = self._keys
        if isinstance(group.get(k["lr_max"]), Tensor) and group[k["lr_max"]] is group.get("lr"):
            # A state dict from before lr_max took the value held the lr tensor itself (rho_t stuck at rho_max):
            # the lr the schedulers recorded when they were built, which is what lr_max defaulted to.
            group[k["lr_max"]] = float(group.get("initial_lr", group["lr"]))
        for name, default in self._group_defaults.items():
            if default is None and name == "lr_max" and k[name] not in group and group.get("lr") is not None:
                # The number, not the object: torch's schedulers write a Tensor lr in place, and an lr_max that
                # is that tensor would follow it (rho_t stuck at rho_max).
                default = float(group["lr"])
            if default is not None:
                group.setdefault(k[name], default)
        rho_max = sizes[0]
        rho_min = check_radius(f"param_groups[{i}][{k['rho_min']!r}]", group[k["rho_min"]])
        lr_max, lr_min, lr = group.get(k["lr_max"]), group[k["lr_min"]], group.get("lr")
        if lr is None or lr_max is None or not float(lr_max) > float(lr_min):
            return rho_max, rho_max
        lr, lr_max, lr_min = float(lr), float(lr_max), float(lr_min)  # (one read each: a CUDA lr syncs)
        if lr > lr_max * (1 + 1e-6):  # (a float32 Tensor lr's warm-up ends some ulps off)
            self._say_above_lr_max(i, lr, lr_max)
        frac = (lr - lr_min) / (lr_max - lr_min)
        rho = rho_min + (rho_max - rho_min) * frac
        rho = min(max(rho, min(rho_min, rho_max)), max(rho_min, rho_max))
        return rho, rho

    def _say_above_lr_max(self, i: int, lr: float, lr_max: float) -> None:
        """Once per optimizer: a group's lr above its lr_max pins rho_t at rho_max (the clamp), which a schedule
        that rises past the lr the optimizer was built with (OneCycleLR, CyclicLR, warm-up to a larger peak) does
        for most of its steps when lr_max was left to its default. Not while torch.compile traces."""
        if self.__dict__.get("_said_above_lr_max") or torch.compiler.is_compiling():
            return
        self.__dict__["_said_above_lr_max"] = True
        warnings.warn(
            f"GSAM: param_groups[{i}]'s lr {lr:.6g} is above its {self._keys['lr_max']!r} {lr_max:.6g}, so rho_t "
            f"is clamped to rho_max while it is; pass lr_max= the schedule's peak lr (OneCycleLR's max_lr, the "
            "official code's ProportionScheduler max_lr) for rho_t to follow the whole schedule",
            UserWarning,
            stacklevel=user_stacklevel(),
        )

    def update_rho_t(self) -> float:
        """The official GSAM loop's call after ``lr_scheduler.step()``. Here every step reads ``rho_t`` from each
        group's current ``lr`` itself, so the call changes nothing; it returns the first perturbed group's ``rho_t``
        for the next step (the official method's return value), 0.0 when no group is perturbed."""
        for i, group in enumerate(self.param_groups):
            sizes = self._group_sizes(i, group)
            if sizes is not None:
                return float(sizes[0])
        return 0.0

    def set_closure(self, *args: Any, **kwargs: Any) -> None:
        """The official GSAM / pytorch-optimizer loop's ``set_closure(loss_fn, inputs, targets)``: refused, saying
        what to write instead (this optimizer has no model to run the forward with)."""
        raise TypeError(
            "GSAM.set_closure(loss_fn, inputs, targets) is not offered (the optimizer has no model): write the "
            "closure yourself, `def closure(): loss = loss_fn(model(inputs), targets); loss.backward(); return loss`, "
            "and call `loss = opt.step(closure)` (it returns the clean loss, not (predictions, loss)); pass "
            "freeze_bn=model for the official code's BatchNorm handling. rho_t follows the lr at every step: "
            "update_rho_t() is not needed"
        )

    def _form_descent(self, plan: _Plan, grads: List[Tensor], scaler: Optional[torch.amp.GradScaler]) -> None:
        g0 = self._clean_copy(plan, grads)
        s = self._dots(plan, g0, grads, "global").sum(0)  # [<g,g>, <g,g1>, <g1,g1>], global
        c = torch.where(s[2] > 0, s[1] / s[2], torch.zeros_like(s[1]))
        row = torch.stack([1.0 + self.alpha * c, torch.full_like(c, -self.alpha), torch.zeros_like(c)])
        ops.lincomb_(grads, g0, [], _coef(row, len(grads), grads[0].device))

    def _hyper(self) -> Dict[str, Any]:
        return {"alpha": self.alpha}

    def _set_hyper(self, hyper: Dict[str, Any]) -> None:
        self.alpha = _finite("alpha", hyper.get("alpha", self.alpha), 0.0, 1.0)


class WSAM(_Family):
    """WSAM (Yue et al., KDD 2023): SAM's sharpness as a regulariser weighted by ``a = gamma/(1-gamma)``::

        e = rho * g / ||g||;   g1 = grad L(w + e)
        decouple=True  (the official code's default, "as used in our paper"):
            w <- Base(w, g);   then   w <- w - lr * a * (g1 - g)          (lr: the group's current lr)
        decouple=False:  w <- Base(w, a*g1 + (1 - a)*g)

    ``gamma = 0.5`` is SAM. Defaults: ``rho=0.05, gamma=0.9, decouple=True`` (official code and
    pytorch-optimizer). In the decoupled form ``max_grad_norm`` clips the base step's gradient ``g``
    only, and the sharpness update is unscaled under a ``GradScaler`` (its inverse scale goes into the
    update's coefficient, no device sync). Differences from pytorch-optimizer: no ``max_norm`` clip of
    ``g1`` (use ``max_grad_norm``); the weights are restored by copy, not ``(w + e) - e``; no
    ``sharpness`` buffer left in the state. Other keywords: see :class:`PerturbOptimizer`.
    """

    def __init__(
        self,
        params: Params,
        base_optimizer: type,
        rho: float = 0.05,
        gamma: float = 0.9,
        decouple: bool = True,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        self.gamma = _finite("gamma", gamma, 0.0, 1.0, hi_open=True)
        self.decouple = check_flag("decouple", decouple)
        super().__init__(params, base_optimizer, rho, adaptive, **kwargs)

    @property
    def weight(self) -> float:
        """``a = gamma / (1 - gamma)``, the weight of the sharpness term."""
        return self.gamma / (1.0 - self.gamma)

    def _form_descent(self, plan: _Plan, grads: List[Tensor], scaler: Optional[torch.amp.GradScaler]) -> None:
        g0 = self._clean_copy(plan, grads)
        n, dev, a = len(grads), grads[0].device, self.weight
        if not self.decouple:
            ops.lincomb_(grads, g0, [], _coef(torch.tensor([a, 1.0 - a, 0.0]), n, dev))
            return
        # H = g1 - g into the backups (free once the weights are restored), then .grad = g exactly.
        # Its squared norms (free with the write) are the non-finite check of g1, which G = g does not see.
        sharp = self._backup_list(plan)
        hh = self._reduced(plan, ops.lincomb_(sharp, grads, g0, _coef(torch.tensor([0.0, 1.0, -1.0]), n, dev)))
        check_finite(hh, 1)
        ops.lincomb_(grads, g0, [], self._copy_coef(grads))

    def _commit(self, plan: _Plan, scaler: Optional[torch.amp.GradScaler]) -> None:
        if not self.decouple or not plan.params:
            return
        dev = plan.local_params[0].device
        lrs = torch.tensor([float(g["lr"]) for g in self.param_groups], dtype=torch.float64, device=dev)
        idx, kept = self._group_index(plan, dev)
        if not kept:
            return
        col = lrs[idx] * (-self.weight)
        if _scaling(scaler):  # H is in the scaled units of this step's gradients
            col = col / scaler._get_scale_async().to(device=dev, dtype=torch.float64)  # type: ignore[union-attr]
        coef = torch.stack([torch.ones_like(col), col, torch.zeros_like(col)], 1)
        params, sharp = plan.local_params, self._backup_list(plan)
        if len(kept) < len(params):
            params, sharp = [params[i] for i in kept], [sharp[i] for i in kept]
        ops.lincomb_(params, sharp, [], coef.float())

    def _group_index(self, plan: _Plan, dev: torch.device) -> tuple:
        """The param group of each perturbed tensor still in one (long ``[m]``) and their places in the plan,
        cached per tensor list. A tensor taken out of its group between first_step() and second_step() gets no
        sharpness update, as it gets no base step."""
        # (each group's length too: a tensor moved in place from the end of one group's list to the front of the
        # next keeps the order and the lists)
        key = (tuple(map(id, plan.params)), tuple((id(g["params"]), len(g["params"])) for g in self.param_groups), dev)
        hit = self._lists.get("group_index")
        if hit is None or hit[0] != key:
            where = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
            kept = [i for i, p in enumerate(plan.params) if id(p) in where]
            idx = torch.tensor([where[id(plan.params[i])] for i in kept], dtype=torch.long, device=dev)
            hit = self._lists["group_index"] = (key, (idx, kept))
        return hit[1]

    def _hyper(self) -> Dict[str, Any]:
        return {"gamma": self.gamma, "decouple": self.decouple}

    def _set_hyper(self, hyper: Dict[str, Any]) -> None:
        self.gamma = _finite("gamma", hyper.get("gamma", self.gamma), 0.0, 1.0, hi_open=True)
        self.decouple = check_flag("decouple", hyper.get("decouple", self.decouple))


LOOKSAM_SCOPES = ("global", "layer")
LAYER_GV_TOL = 1e-5  # scope="layer": a gv_i shorter than this times ||g1_i|| is rounding, taken as 0


class LookSAM(_Family):
    """LookSAM (Liu et al., CVPR 2022): the SAM gradient every ``k`` steps, and in between the clean
    gradient plus the stored component ``gv`` of the last SAM gradient orthogonal to the clean one::

        t % k == 0 (refresh, 2 passes):  e = rho * g / ||g||;  g1 = grad L(w + e)
                                         gv = g1 - (<g, g1> / ||g||^2) * g;   G = g1
        otherwise  (reuse, 1 pass):      G = g + alpha * (||g|| / ||gv||) * gv

    ``scope="global"`` (the paper) takes the projection and the rescale over all perturbed tensors as
    one vector; ``scope="layer"`` per tensor, as pytorch-optimizer (``||gv_i|| + 1e-8`` in the rescale).
    ``t`` counts the steps taken: a skipped step (NaN/Inf, scaler overflow, exception) changes neither
    ``t`` nor ``gv``, so a skipped refresh is retried on the next step. A step on other tensors than
    ``gv`` was formed for (e.g. a new param group) refreshes. Over ``T`` steps the closure runs
    ``T + ceil(T/k)`` times, ``ceil(T/k)`` when the caller computes g_0 (``loss.backward();
    opt.step(closure)``). ``gv``, its norms and ``t`` are checkpointed. Defaults ``rho=0.1, k=10,
    alpha=0.7`` (pytorch-optimizer, rollovd's README; the paper's could not be checked). Differences
    from pytorch-optimizer: global scope by default; ``alpha`` may be 0 or 1; ``step(closure)`` skips
    the perturbed pass on reuse steps (pytorch-optimizer always runs 2); no ``use_gc``.
    ``first_step``/``second_step`` are not supported (reuse steps have no second pass).
    """

    dcp_keys = ("looksam_step", "looksam_gv", "looksam_gv_at", "looksam_gv_sq")

    two_call = False

    def __init__(
        self,
        params: Params,
        base_optimizer: type,
        rho: float = 0.1,
        k: int = 10,
        alpha: float = 0.7,
        scope: str = "global",
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        self.k, self.alpha, self.scope = _check_looksam(k, alpha, scope)
        self.looksam_step = 0  # steps taken (refresh when % k == 0)
        self._gv: Dict[Tensor, Tensor] = {}  # the stored orthogonal component, per tensor
        self._gv_key: tuple = ()  # the tensors (ids) gv was formed for
        self._gv_sq: Optional[Tensor] = None  # float64 [n]: ||gv_i||^2 (whole tensors)
        self._pending_gv: Optional[Tensor] = None  # a refresh's ||gv_i||^2, committed with its step
        super().__init__(params, base_optimizer, rho, adaptive, **kwargs)

    # The three methods that read and rebind LookSAM's state across steps (gv, the tensors it was formed for, the
    # step counter) run eagerly under torch.compile: in a compiled step dynamo lost the rebinding of _pending_gv
    # across the graph break of the finite check, so gv was never kept and every step ran as SAM's refresh.
    @torch.compiler.disable
    def _reuses(self, plan: _Plan) -> bool:
        return self.looksam_step % self.k != 0 and self._gv_key == tuple(map(id, plan.params))

    @torch.compiler.disable
    def _form_descent(self, plan: _Plan, grads: List[Tensor], scaler: Optional[torch.amp.GradScaler]) -> None:
        n = len(grads)
        self._pending_gv = None
        if self._reuses(plan):
            gg = self._sums(plan, ops.grad_stats_(grads)[:, 0], grads, self.scope)  # also the non-finite check
            check_finite(gg, 0)
            assert self._gv_sq is not None
            if self.scope == "global":
                vv = self._gv_sq.sum()
                f = torch.where(vv > 0, self.alpha * gg.sum().sqrt() / vv.sqrt(), torch.zeros_like(vv)).expand(n)
            else:
                vv = self._gv_sq
                f = torch.where(vv > 0, self.alpha * gg.sqrt() / (vv.sqrt() + 1e-8), torch.zeros_like(vv))
            coef = torch.stack([torch.ones_like(f), f, torch.zeros_like(f)], 1)
            ops.lincomb_(grads, self._list("gv", self._gv, plan, grads, keep=True), [], coef.float())
            return
        # refresh: G = g1 stays in .grad; gv = g1 - (<g,g1>/||g||^2) g is formed in the clean copy's
        # buffer and becomes the stored gv (a swap, no copy) only if the step is taken.
        g0 = self._clean_copy(plan, grads)
        s = self._dots(plan, g0, grads, self.scope)
        check_finite(s, 1)
        if self.scope == "global":
            t = s.sum(0)
            beta = torch.where(t[0] > 0, t[1] / t[0], torch.zeros_like(t[0])).expand(n)
        else:  # pytorch-optimizer's g1_i - ||g1_i|| <g^_i, g1^_i> g^_i with clamp_min(eps) on both norms
            eps = 1e-12
            ng, n1 = s[:, 0].sqrt(), s[:, 2].sqrt()
            beta = s[:, 1] / (ng.clamp_min(eps) * n1.clamp_min(eps)) * n1 / ng.clamp_min(eps)
        coef = torch.stack([-beta, torch.ones_like(beta), torch.zeros_like(beta)], 1)
        vv = self._sums(plan, ops.lincomb_(g0, grads, [], coef.float()), g0, self.scope)
        if self.scope == "layer":
            # A g1_i parallel to g_i (every one-element tensor) leaves only rounding in gv_i, which the
            # per-tensor rescale would blow up to alpha*||g_i||: below 1e-5 ||g1_i|| it counts as 0.
            vv = torch.where(vv > LAYER_GV_TOL**2 * s[:, 2], vv, torch.zeros_like(vv))
        self._pending_gv = vv

    @torch.compiler.disable
    def _commit(self, plan: _Plan, scaler: Optional[torch.amp.GradScaler]) -> None:
        if self._pending_gv is not None:
            self._gv, self._scratch = self._scratch, self._gv
            self._lists.pop("gv", None)
            self._lists.pop("scratch", None)
            self._gv_sq, self._gv_key = self._pending_gv, tuple(map(id, plan.params))
            self._pending_gv = None
        self.looksam_step += 1

    @torch.compiler.disable
    def _rollback(self) -> None:
        self._pending_gv = None

    def _hyper(self) -> Dict[str, Any]:
        return {"k": self.k, "alpha": self.alpha, "scope": self.scope}

    def _set_hyper(self, hyper: Dict[str, Any]) -> None:
        self.k, self.alpha, self.scope = _check_looksam(
            hyper.get("k", self.k), hyper.get("alpha", self.alpha), hyper.get("scope", self.scope)
        )

    def _persistent(self, index: Dict[Tensor, int]) -> Dict[str, Any]:
        out: Dict[str, Any] = {"step": self.looksam_step}
        ids = set(self._gv_key)
        by_id = {id(p): p for p in self._flat_params() if id(p) in ids}
        if self._gv_key and len(by_id) == len(self._gv_key) and self._gv_sq is not None:
            order = [by_id[i] for i in self._gv_key]
            out["gv_index"] = [index[p] for p in order]
            out["gv"] = [self._gv[p] for p in order]
            out["gv_sq"] = self._gv_sq.detach().cpu()
        return out

    def _saved_tensors(self, saved: Dict[str, Any]) -> List[tuple]:
        return list(zip(saved.get("gv_index", []), saved.get("gv", [])))

    def _dcp_entries(self, saved: Dict[str, Any], params: List[Tensor]) -> Dict[int, Dict[str, Any]]:
        # gv's place in the one vector it is (-1: none) and its squared norm beside each tensor's gv
        at = {i: j for j, i in enumerate(saved.get("gv_index", []))}
        out: Dict[int, Dict[str, Any]] = {}
        for i, p in enumerate(params):
            if not p.requires_grad:
                continue
            j = at.get(i)
            gv = torch.zeros_like(_local(p.detach())) if j is None else saved["gv"][j]
            out[i] = {
                "looksam_step": torch.tensor(saved.get("step", 0), dtype=torch.int64),
                "looksam_gv": distributed.like_param(gv, p),
                "looksam_gv_at": torch.tensor(-1 if j is None else j, dtype=torch.int64),
                "looksam_gv_sq": torch.tensor(0.0 if j is None else float(saved["gv_sq"][j]), dtype=torch.float64),
            }
        return out

    def _from_dcp_entries(self, entries: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
        steps = {_scalar(e.get("looksam_step")) for e in entries.values()} - {None}
        if not steps:
            return {}
        if len(steps) > 1:
            raise ValueError(
                f"the checkpoint's LookSAM step counters differ between parameters ({sorted(steps)}): it does not "
                "come from one optimizer; nothing was loaded"
            )
        out: Dict[str, Any] = {"step": int(steps.pop())}
        placed = []
        for i, e in entries.items():
            j, gv, sq = _scalar(e.get("looksam_gv_at")), e.get("looksam_gv"), _scalar(e.get("looksam_gv_sq"))
            if j is not None and j >= 0 and isinstance(gv, Tensor) and sq is not None:
                placed.append((int(j), i, gv, sq))
        placed.sort(key=lambda t: t[0])
        # gv is one vector over the tensors it was formed on: with a part missing (a tensor frozen since, whose
        # state DCP does not keep) it is no gv any more, and the next step refreshes, as it would have
        if placed and [t[0] for t in placed] == list(range(len(placed))):
            out["gv_index"] = [i for _, i, _, _ in placed]
            out["gv"] = [_local(gv.detach()) for _, _, gv, _ in placed]
            out["gv_sq"] = torch.tensor([sq for _, _, _, sq in placed], dtype=torch.float64)
        return out

    def _load_persistent(self, saved: Dict[str, Any], params: List[Tensor]) -> None:
        self.looksam_step = int(saved.get("step", 0))
        self._gv, self._gv_key, self._gv_sq, self._pending_gv = {}, (), None, None
        self._lists.clear()
        if "gv_index" in saved:
            order = [params[i] for i in saved["gv_index"]]
            for p, v in zip(order, saved["gv"]):
                buf = torch.empty_like(_local(p.detach()))
                buf.copy_(v)
                self._gv[p] = buf
            self._gv_key = tuple(map(id, order))
            dev = order[0].device if order else torch.device("cpu")
            self._gv_sq = saved["gv_sq"].to(device=dev, dtype=torch.float64)

    def _refit_saved(self) -> None:
        # gv converted to its tensor's new dtype or layout (its norms taken again from what was kept); a tensor of
        # another shape has no gv any more: the next step refreshes
        if not _refit(self._gv):
            self._gv_key = ()
        elif self._gv_key and self._gv_sq is not None:
            by_id = {id(p): v for p, v in self._gv.items()}
            gv = [by_id[i].detach() for i in self._gv_key]
            self._gv_sq = torch.stack(torch._foreach_norm(gv, 2, dtype=torch.float64)).square().to(self._gv_sq.device)

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state.update(_gv={}, _gv_key=(), _gv_sq=None, _pending_gv=None)
        return state


def _check_looksam(k: Any, alpha: Any, scope: Any) -> tuple:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (the refresh period) must be an integer >= 1, got {k!r}")
    if scope not in LOOKSAM_SCOPES:
        raise ValueError(f"scope must be one of {LOOKSAM_SCOPES}, got {scope!r}")
    return k, _finite("alpha", alpha, 0.0, 1.0), scope


class FriendlySAM(_Family):
    """FriendlySAM (Li et al., CVPR 2024): SAM perturbing along the clean gradient minus ``sigma`` times its
    running mean (the batch-specific part of the gradient)::

        first step:  m = g;  d = g
        later:       d = g - sigma * m;   m <- lmbda * m + (1 - lmbda) * g      (m: EMA of clean gradients)
        e = rho * d / ||d||;   G = grad L(w + e)

    as the official code (``nblt/F-SAM``) and pytorch-optimizer, in one fused sweep (``ops.ema_residual_``).
    ``m`` is kept in unscaled units under a ``GradScaler`` and is checkpointed; a skipped step
    (a NaN/Inf gradient in either pass, a scaler overflow) or an exception leaves it as it was (it is
    copied before the sweep and copied back). Defaults ``rho=0.05, sigma=1, lmbda=0.9`` (official class,
    pytorch-optimizer). Difference from pytorch-optimizer: ``.grad`` holds the descent gradient after
    the step, not ``d``. Other keywords: see :class:`PerturbOptimizer`.
    """

    dcp_keys = ("fsam_m", "fsam_has_m")

    def __init__(
        self,
        params: Params,
        base_optimizer: type,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        self.sigma, self.lmbda = _check_fsam(sigma, lmbda)
        self._ema: Dict[Tensor, Tensor] = {}  # m per tensor; present = initialised
        self._saved_ema: Dict[Tensor, Tensor] = {}  # transient copy for the rollback
        self._undo: Optional[tuple] = None  # (tensors initialised this step, tensors whose m was copied)
        self._ready_key: tuple = ()  # the tensor list (ids) whose EMAs all exist
        super().__init__(params, base_optimizer, rho, adaptive, **kwargs)

    # (eager under torch.compile, as LookSAM's: the rollback record set here was lost, so a skipped step kept m)
    @torch.compiler.disable
    def _at_clean_point(self, cycle: Cycle, grads: List[Tensor]) -> Optional[Tensor]:
        plan = self._cycle_plan
        assert plan is not None
        scaler = self._scaler
        grad_scale = 1.0 / float(scaler.get_scale()) if _scaling(scaler) else 1.0
        key = tuple(map(id, plan.params))
        if self._ready_key == key:  # the common case: every tensor has its EMA
            ema = self._ema_list(plan.params, grads)
            ops.lincomb_(self._list("saved_ema", self._saved_ema, plan, ema), ema, [], self._copy_coef(ema))
            self._undo = ([], plan.params)
            return self._sweep(cycle, grads, ema, [], [], init=False, grad_scale=grad_scale)
        old = [i for i, p in enumerate(plan.params) if p in self._ema]
        new = [i for i, p in enumerate(plan.params) if p not in self._ema]
        sq = torch.empty(len(grads), dtype=torch.float32, device=grads[0].device)
        fresh: List[Tensor] = []
        copied: List[Tensor] = []
        if old:
            copied = plan.params if not new else [plan.params[i] for i in old]
            ema = self._ema_list(copied, grads if not new else [grads[i] for i in old])
            saved = buffers_for(self._saved_ema, copied, ema)
            ops.lincomb_(saved, ema, [], self._copy_coef(ema))
            sq[old] = self._sweep(cycle, grads, ema, old, new, init=False, grad_scale=grad_scale)
        if new:
            fresh = [plan.params[i] for i in new]
            for p, i in zip(fresh, new):
                self._ema[p] = torch.empty_like(grads[i], memory_format=torch.preserve_format)
            self._lists.pop("ema", None)
            sq[new] = self._sweep(
                cycle, grads, [self._ema[p] for p in fresh], new, old, init=True, grad_scale=grad_scale
            )
            self._ready_key = key
        self._undo = (fresh, copied)
        return sq

    def _ema_list(self, params: List[Tensor], grads: Sequence[Tensor]) -> List[Tensor]:
        """m of each of ``params``, in the layout of its gradient (a loaded or converted m has its parameter's)."""
        key = (tuple(map(id, params)), id(self._ema))
        hit = self._lists.get("ema")
        if hit is None or hit[0] != key:
            hit = self._lists["ema"] = (key, kept_in_layout(self._ema, params, grads))
        return hit[1]

    def _sweep(
        self,
        cycle: Cycle,
        grads: List[Tensor],
        ema: List[Tensor],
        idx: List[int],
        others: List[int],
        *,
        init: bool,
        grad_scale: float,
    ) -> Tensor:
        """``ops.ema_residual_`` over the tensors ``idx`` (all of them when ``others`` is empty)."""
        adaptive = self.spec.adaptive_eta is not None
        g = grads if not others else [grads[i] for i in idx]
        w = (cycle.params if not others else [cycle.params[i] for i in idx]) if adaptive else []
        return ops.ema_residual_(
            g,
            ema,
            w,
            sigma=self.sigma,
            lmbda=self.lmbda,
            init=init,
            grad_scale=grad_scale,
            adaptive_eta=0.0 if adaptive else -1.0,
        )

    @torch.compiler.disable
    def _commit(self, plan: _Plan, scaler: Optional[torch.amp.GradScaler]) -> None:
        self._undo = None

    @torch.compiler.disable
    def _rollback(self) -> None:
        undo, self._undo = self._undo, None
        if undo is None:
            return
        fresh, copied = undo
        if fresh:
            self._ready_key = ()
            self._lists.pop("ema", None)
        for p in fresh:
            self._ema.pop(p, None)
        if copied:
            ema = [self._ema[p] for p in copied]
            ops.lincomb_(ema, [self._saved_ema[p] for p in copied], [], self._copy_coef(ema))

    def _hyper(self) -> Dict[str, Any]:
        return {"sigma": self.sigma, "lmbda": self.lmbda}

    def _set_hyper(self, hyper: Dict[str, Any]) -> None:
        self.sigma, self.lmbda = _check_fsam(hyper.get("sigma", self.sigma), hyper.get("lmbda", self.lmbda))

    def _persistent(self, index: Dict[Tensor, int]) -> Dict[str, Any]:
        return {"ema": {index[p]: m for p, m in self._ema.items() if p in index}}

    def _saved_tensors(self, saved: Dict[str, Any]) -> List[tuple]:
        return list(saved.get("ema", {}).items())

    def _dcp_entries(self, saved: Dict[str, Any], params: List[Tensor]) -> Dict[int, Dict[str, Any]]:
        ema = saved.get("ema", {})
        out: Dict[int, Dict[str, Any]] = {}
        for i, p in enumerate(params):
            if p.requires_grad:
                m = ema.get(i)
                out[i] = {
                    "fsam_m": distributed.like_param(torch.zeros_like(_local(p.detach())) if m is None else m, p),
                    "fsam_has_m": torch.tensor(int(m is not None), dtype=torch.int64),
                }
        return out

    def _from_dcp_entries(self, entries: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
        return {
            "ema": {
                i: _local(e["fsam_m"].detach())
                for i, e in entries.items()
                if _scalar(e.get("fsam_has_m")) == 1 and isinstance(e.get("fsam_m"), Tensor)
            }
        }

    def _load_persistent(self, saved: Dict[str, Any], params: List[Tensor]) -> None:
        self._ema, self._saved_ema, self._undo, self._ready_key = {}, {}, None, ()
        self._lists.clear()
        for i, m in saved.get("ema", {}).items():
            p = params[int(i)]
            buf = torch.empty_like(_local(p.detach()))
            buf.copy_(m)
            self._ema[p] = buf

    def _refit_saved(self) -> None:
        # m converted to its tensor's new dtype or layout; a tensor of another shape starts a new m
        if not _refit(self._ema):
            self._ready_key = ()
        self._saved_ema.clear()

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state.update(_ema={}, _saved_ema={}, _undo=None, _ready_key=())
        return state


def _check_fsam(sigma: Any, lmbda: Any) -> tuple:
    # A negative sigma would add the running mean instead of removing it: not FriendlySAM (pytorch-optimizer refuses
    # it too; the official code checks nothing).
    return check_radius("sigma", sigma), _finite("lmbda", lmbda, 0.0, 1.0)
