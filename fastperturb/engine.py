"""The perturbation engine: one perturb-restore cycle over a list of tensors.

docs/design.md §2 in code (the engine itself: §6). A cycle starts at the weights ``w`` with the
gradient ``g_0`` already in ``.grad``; each ascent step moves the weights to
``w + delta_k`` with

    delta_k = Proj_B(delta_{k-1} + eta * D(g_{k-1}))

and after the last step the descent gradient ``G = sum_k c_k g_k`` is left in
``.grad`` and the weights are restored bit for bit. All tensor work is done by
the fused ops (:mod:`fastperturb.ops`); this module only turns the per-tensor
statistics those ops return into per-tensor coefficients (tiny ``[n]`` tensors)
and sequences the closure calls.

State: one backup per perturbed tensor (the pre-cycle weights, which is what
makes restore exact), plus one accumulator per tensor when the descent
gradient sums several passes (``steps > 1`` or ``include_clean``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from itertools import repeat
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import ops

NORMS = ("l2", "linf")
SCOPES = ("layer", "global")
DESCENTS = ("mean", "last")


class NonFiniteGradient(FloatingPointError):
    """A gradient had NaN/Inf; the weights were restored before this was raised.

    ``tensor_indices`` index the tensors of the cycle; ``names`` (when the optimizer
    wrapper raises it) say which parameters they are; ``pass_index`` is the pass k."""

    def __init__(self, tensor_indices: Sequence[int], pass_index: int, names: Sequence[str] = ()):
        self.tensor_indices = list(tensor_indices)
        self.pass_index = pass_index
        self.names = list(names)
        where = self.names or [f"perturbed tensor {i}" for i in self.tensor_indices]
        shown = ", ".join(where[:8]) + (" ..." if len(where) > 8 else "")
        super().__init__(
            f"non-finite gradient (NaN/Inf) at pass {pass_index} in {shown}; the weights were restored unchanged"
        )


def nonfinite_rows(stats: Tensor) -> list[int]:
    """The indices of the rows (or entries, for a 1-d tensor) of ``stats`` holding a NaN or Inf.

    One reduction and one host sync when every value is finite, the common case: each op on
    these tiny tensors costs tens of microseconds on a host whose caches the parameter-sized
    passes have just flushed, so the check takes as few of them as it can."""
    # Summed in float64, float32 statistics cannot overflow: the sum is finite exactly when every value is.
    if stats.numel() == 0 or math.isfinite(stats.sum(dtype=torch.float64).item()):
        return []
    bad = ~torch.isfinite(stats)
    if bad.dim() > 1:
        bad = bad.any(dim=1)
    return bad.nonzero().flatten().tolist()  # (empty when float64 values only overflowed their sum)


def check_finite(stats: Tensor, pass_index: int) -> None:
    """Raise :class:`NonFiniteGradient` naming the rows of the per-tensor ``stats`` that are not finite."""
    bad = nonfinite_rows(stats)
    if bad:
        raise NonFiniteGradient(bad, pass_index)


# Below this a float32 sum of squares may have lost bits to squares under float32's normal range (every
# element with |g| < 2^-63): each such square is off by at most 2^-150, so above it the sum is within
# n * 2^-60 of the exact one, relative; at or below it the sum is taken again in float64.
TINY_SUMSQ = 2.0**-90


def _tiny_rows(stats: Tensor, scope: str, low: float) -> list[int]:
    """The rows whose ``sum (t g)^2`` (column 0) is too small to trust in float32 for ``scope``, given ``low``:
    the smallest value of column 0 (``"layer"``) or its sum (``"global"``). A NaN or Inf compares False: never
    taken again (check_finite reports it)."""
    if not low <= TINY_SUMSQ:
        return []
    if scope == "global":
        return list(range(stats.shape[0]))
    return (stats[:, 0] <= TINY_SUMSQ).nonzero().flatten().tolist()


def exact_tiny_sums(
    stats: Tensor, rows: list[int], grads: Sequence[Tensor], params: Sequence[Tensor], adaptive_eta: Optional[float]
) -> Tensor:
    """``stats`` with column 0 of ``rows`` taken again in float64 from the gradients (and ``|w| + eta``).

    A gradient whose elements are all below about 1e-19 squares to float32 subnormals or zeros: its float32
    norm comes out short (0 below about 1e-23), and the step ``eta / ||g||`` overshoots the radius (2.7x at
    1e-23) or vanishes. Rare (vanishing gradients in float32 or bfloat16), so the fix is a float64 read of those
    tensors only, never of the rest. The rows come back as float64 (``ascent_coefficients`` takes either)."""
    g = [grads[i] for i in rows]
    if adaptive_eta is not None:
        g = torch._foreach_mul(g, torch._foreach_add(torch._foreach_abs([params[i] for i in rows]), adaptive_eta))
    out = stats.to(torch.float64)
    out[rows, 0] = torch.stack(torch._foreach_norm(g, 2, dtype=torch.float64)).square()
    return out


def tiny_rows(sums: Tensor, scope: str) -> list[int]:
    """The rows of ``sums`` (``[n]`` or ``[n, c]``: float sums of squares, one quantity per column) too small to
    trust in float32: every row when a column's total is at or below :data:`TINY_SUMSQ` (``"global"``), else the
    rows where a column is (``"layer"``; a rank's shards before the collective). NaN and Inf are never taken
    (check_finite reports them). One host read."""
    if sums.numel() == 0:
        return []
    s = sums.reshape(sums.shape[0], -1).to(torch.float64)
    if scope == "global":
        return list(range(s.shape[0])) if float(s.sum(0).min()) <= TINY_SUMSQ else []
    return (s.min(1).values <= TINY_SUMSQ).nonzero().flatten().tolist()


def exact_tiny_norms(sums: Tensor, rows: list[int], tensors: Sequence[Tensor]) -> Tensor:
    """``sums`` (``[n]``: ``||tensors[i]||^2``) as float64, with ``rows`` taken again in float64."""
    out = sums.to(torch.float64)
    if rows:
        out[rows] = torch.stack(torch._foreach_norm([tensors[i] for i in rows], 2, dtype=torch.float64)).square()
    return out


def exact_tiny_dots(stats: Tensor, rows: list[int], a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``dot_stats(a, b)``'s rows ``[<a,a>, <a,b>, <b,b>]`` as float64, with ``rows`` taken again in float64 (one
    tensor at a time: a float64 copy of a tensor pair and one product are alive at once), summed in a fixed order."""
    out = stats.to(torch.float64)
    for i in rows:
        x = a[i].detach().reshape(-1).to(torch.float64, copy=True)  # (copies: squared in place below)
        y = b[i].detach().reshape(-1).to(torch.float64, copy=True)
        xy = fixed_order_sum(x * y)
        out[i] = torch.stack([fixed_order_sum(x.square_()), xy, fixed_order_sum(y.square_())]).to(out.device)
    return out


_SUM_ROW = 64


def fixed_order_sum(v: Tensor) -> Tensor:
    """The sum of a 1-D tensor, the same whatever the number of threads. ``Tensor.dot`` (BLAS) and a long
    ``sum()`` split the reduction by thread count on the CPU (last bits differ at 1, 2 and 3 threads); here each
    level sums rows of 64 elements, and torch splits such a reduction by rows (many of them), or does not split
    it at all (a level of fewer than 64 rows is below its grain size). A level's leftover elements (fewer than
    64) are summed on their own and appended to its row sums (no padded copy of ``v``)."""
    while v.numel() > _SUM_ROW:
        whole = v.numel() - v.numel() % _SUM_ROW
        rows = v[:whole].view(-1, _SUM_ROW).sum(1)
        v = torch.cat([rows, v[whole:].sum().reshape(1)]) if whole < v.numel() else rows
    return v.sum()


@dataclass(frozen=True)
class PerturbSpec:
    """How the perturbation is built (the preset-independent part of docs/design.md §2).

    norm: ``"l2"`` (direction g/||g||, L2 ball) or ``"linf"`` (direction sign(g), box).
    scope: norms taken per tensor (``"layer"``) or over all perturbed tensors (``"global"``).
    steps: number K of ascent steps (K >= 1); a step costs K+1 forward/backward passes.
    relative: radius and step are multiples of the weights' norm (same p as the ball).
    adaptive_eta: ASAM's elementwise scale T = |w| + eta (single step, l2 only); None = off.
    include_clean: the descent gradient includes the clean-point gradient g_0.
    descent: ``"mean"`` (G is the mean of the perturbed passes' gradients, with g_0 if ``include_clean``) or
        ``"last"`` (G is the last pass's gradient alone, at the end of the ascent: AWP's Algorithm 1 for K > 1).
    """

    norm: str = "l2"
    scope: str = "layer"
    steps: int = 1
    relative: bool = False
    adaptive_eta: Optional[float] = None
    include_clean: bool = False
    descent: str = "mean"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.descent not in DESCENTS:
            raise ValueError(f"descent must be one of {DESCENTS}, got {self.descent!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        for flag in ("relative", "include_clean"):  # (normalised: the spec is saved in state dicts)
            object.__setattr__(self, flag, check_flag(flag, getattr(self, flag)))
        if self.adaptive_eta is not None:
            if not (math.isfinite(self.adaptive_eta) and self.adaptive_eta >= 0):
                raise ValueError(f"adaptive eta must be finite and >= 0, got {self.adaptive_eta}")
            if self.norm != "l2" or self.steps != 1:
                raise ValueError("the adaptive (ASAM) scaling is defined for norm='l2' with steps=1")
        if self.descent == "last" and self.include_clean:
            raise ValueError("descent='last' takes the last pass's gradient alone: it cannot include the clean one")

    @property
    def ord(self) -> float:
        return 2.0 if self.norm == "l2" else math.inf

    @property
    def projects(self) -> bool:
        # From delta_0 = 0 one step of length eta <= radius stays inside the ball,
        # so single-step presets skip the projection (and its statistics).
        return self.steps > 1

    @property
    def accumulates(self) -> bool:
        """Whether the descent gradient sums several passes (needs an accumulator)."""
        return (self.steps > 1 and self.descent == "mean") or self.include_clean

    def pass_weights(self) -> list[float]:
        """c_0..c_K of the descent gradient G = sum_k c_k g_k."""
        k = self.steps
        if self.descent == "last":
            return [0.0] * k + [1.0]
        if self.include_clean:
            return [1.0 / (k + 1)] * (k + 1)
        return [0.0] + [1.0 / k] * k


def check_flag(name: str, value: object) -> bool:
    """An on/off setting must be True or False (or 0/1): a string such as "false" or a None was taken for its
    truth value, silently."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    if isinstance(value, int) or (type(value).__module__ == "numpy" and hasattr(value, "__index__")):
        if int(value) in (0, 1):
            return bool(int(value))
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_radius(name: str, value: float) -> float:
    """A radius or step size must be a finite number >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return v


def _any_longer(step_size: object, radius: object, step_t: Tensor, radius_t: Tensor) -> bool:
    """Whether any step is longer than its radius: on the Python numbers when given lists of
    them (no device sync, so no torch.compile graph break), else on the float64 tensors."""
    if isinstance(step_size, (list, tuple)) and isinstance(radius, (list, tuple)):
        return any(map(operator.gt, step_size, radius))  # a C loop: this runs every step, per tensor
    return bool((step_t > radius_t).any())


def _float64_vector(values: Sequence[float] | Tensor, device: torch.device) -> Tensor:
    """``values`` as a float64 vector on ``device`` (itself when it already is one: no op)."""
    if isinstance(values, Tensor) and values.dtype == torch.float64 and values.dim() == 1 and values.device == device:
        return values
    return torch.as_tensor(values, dtype=torch.float64, device=device).reshape(-1)


def _scope_sum(x: Tensor, scope: str) -> Tensor:
    return x.sum().expand_as(x) if scope == "global" else x


def _scope_max(x: Tensor, scope: str) -> Tensor:
    return (x.max() if x.numel() else x.new_zeros(())).expand_as(x) if scope == "global" else x


def ascent_coefficients(
    spec: PerturbSpec,
    stats: Tensor,
    step_size: Tensor,
    radius: Tensor,
    project: bool,
) -> tuple[Tensor, Tensor]:
    """Per-tensor ``(step_coef, proj)`` for ``ops.ascent_step_`` from ``grad_stats_`` output.

    ``step_size`` and ``radius`` are the absolute per-tensor eta and r (float64 [n]).
    For l2 the projection scale uses ||delta + a g||^2 = ||d||^2 + 2a<d,g> + a^2||g||^2,
    so the stats pass that reads g also yields the norm of the candidate step.
    """
    if spec.norm == "linf":
        step = step_size
        proj = radius if project else torch.full_like(radius, math.inf)
        return step.float(), proj.float()
    return ops.ascent_coefficients(stats, step_size, radius, global_scope=spec.scope == "global", project=project)


#: ``reduce(stats, kind)``: per-tensor statistics of local shards (one row per tensor) completed
#: across ranks; ``kind`` is ``"sum"`` (squares, dot products) or ``"max"`` (L-infinity norms).
#: :class:`fastperturb.distributed.ShardReducer` is the one for FSDP2.
Reduce = Callable[[Tensor, str], Tensor]


def absolute_sizes(
    spec: PerturbSpec,
    params: Sequence[Tensor],
    radius: Tensor,
    step_size: Tensor,
    reduce: Optional[Reduce] = None,
    lists: Optional[ops.TensorLists] = None,
) -> tuple[Tensor, Tensor]:
    """Turn relative radius/step multipliers into absolute per-tensor values (no-op if absolute).
    ``lists``: a handle whose params are ``params`` (the norms then run on it)."""
    if not spec.relative:
        return radius, step_size
    per, _ = ops.norms_lists(lists, spec.ord) if lists is not None else ops.norms(params, spec.ord)
    per = per.to(torch.float64)
    if reduce is not None:  # norms of the whole tensors from those of their shards
        per = reduce(per.square(), "sum").sqrt() if spec.norm == "l2" else reduce(per, "max")
    wn = _scope_sum(per.square(), spec.scope).sqrt() if spec.norm == "l2" else _scope_max(per, spec.scope)
    return radius * wn, step_size * wn


#: Mean elements per tensor from which a handle's relative l2 cycle measures the weights with g_0 in one
#: list-op pass. The pass saves about 45 us per MB of parameters against the handle's two passes (AWP cycle,
#: ResNet-50: 38.1 against 42.6 ms; BERT-base 159 against 164 ms) and costs about 0.45 us more per tensor
#: (1000 tensors of 1024 elements: 2.97 against 2.51 ms): even at about 10 KB per tensor.
ONE_PASS_MIN_MEAN_NUMEL = 16384


class Cycle:
    """One perturb-restore cycle over ``params`` (the tensors to perturb) and ``passive``
    (tensors with a gradient that are not perturbed: they still receive G).

    ``backups`` (and ``accum``/``passive_accum`` when ``spec.accumulates``) are
    caller-owned buffers shaped like ``params``/``passive``: the engine allocates
    nothing of parameter size. ``radius`` and ``step_size`` are per-tensor values
    (relative multipliers when ``spec.relative``).

    Every method that takes ``grads`` wants the gradients of :attr:`tensors`
    (``params`` then ``passive``), as read after the latest pass.
    Usage: ``start(grads)`` at the clean point, then for each step
    ``ascend()``, a forward/backward at the perturbed point, ``observe(grads)``;
    finally ``finish(grads)`` and ``restore()``. :func:`run_cycle` does all of it
    around a closure, restoring the weights on any exception.

    Sharded tensors: pass the local shards and ``reduce``, which completes each pass's
    per-tensor statistics across ranks (one call per pass, plus one for relative radii where
    they are not measured with g_0: see :meth:`_weights_with_clean`).

    ``lists``: an :class:`fastperturb.ops.TensorLists` handle on exactly ``params``, ``backups`` and
    ``accum`` (built once and kept by the caller, e.g. with a :class:`fastperturb.ops.ListsCache`): the ops on
    the perturbed tensors then run on it, which saves their per-call costs. The gradients of ``params`` are
    then read from their ``.grad``, so the ``grads`` the methods take must be those (as :func:`grads_of` gives).

    ``longer``: whether any step size exceeds its radius, when the caller knows it (given ``radius`` and
    ``step_size`` as tensors, the cycle would otherwise compare them on the device).
    """

    def __init__(
        self,
        spec: PerturbSpec,
        params: Sequence[Tensor],
        backups: Sequence[Tensor],
        radius: Sequence[float] | Tensor,
        step_size: Sequence[float] | Tensor,
        accum: Sequence[Tensor] = (),
        passive: Sequence[Tensor] = (),
        passive_accum: Sequence[Tensor] = (),
        reduce: Optional[Reduce] = None,
        lists: Optional[ops.TensorLists] = None,
        longer: Optional[bool] = None,
    ):
        self.spec = spec
        self.reduce = reduce
        self.params = list(params)
        self.backups = list(backups)
        self.passive = list(passive)
        self.accum = list(accum) if spec.accumulates else []
        self.passive_accum = list(passive_accum) if spec.accumulates else []
        if spec.accumulates and len(self.accum) != len(self.params):
            raise ValueError(f"this spec sums several passes: pass one accumulator per tensor ({len(self.params)})")
        if spec.accumulates and len(self.passive_accum) != len(self.passive):
            raise ValueError(
                f"this spec sums several passes: pass one accumulator per passive tensor ({len(self.passive)})"
            )
        # The caller's own lists (not the copies above): a caller passing the handle's lists is then checked at once.
        if lists is not None and not lists.holds(params, backups, accum if spec.accumulates else []):
            raise ValueError("lists is a handle on other tensors than params, backups and accum; build one on them")
        self.lists = lists if self.params else None
        #: the tensors whose gradients every method takes, in this order
        self.tensors = self.params + self.passive
        dev = self.params[0].device if self.params else torch.device("cpu")
        self._radius = _float64_vector(radius, dev)
        self._step = _float64_vector(step_size, dev)
        for name, t in (("radius", self._radius), ("step_size", self._step)):
            if t.numel() != len(self.params):
                raise ValueError(f"{name} has {t.numel()} values for {len(self.params)} tensors")
        self.weights = spec.pass_weights()
        # The accumulator is initialised (not added to) by the first pass with a nonzero c_k.
        self._first_summed = next(k for k, c in enumerate(self.weights) if c != 0.0)
        # A single step from delta_0 = 0 needs no projection unless it is longer than the
        # radius (e.g. APD's default eta = 1.5 eps with K = 1): then project it too.
        if longer is None:
            longer = _any_longer(step_size, radius, self._step, self._radius)
        self.project = spec.projects or longer
        self.k = 0  # ascent steps taken
        self.perturbed = False
        self._stats: Optional[Tensor] = None
        self._coefs: list[Tensor] = []  # each ascent's step coefficients, read only to explain a NaN/Inf

    def _sums(self, k: int) -> bool:
        """Whether c_k g_k goes into the accumulators now (g_K is combined by finish())."""
        return self.spec.accumulates and k < self.spec.steps and self.weights[k] != 0.0

    def _measure(self, grads: Sequence[Tensor]) -> None:
        k = self.k
        n = len(self.params)
        at_clean = k == 0
        want_delta = self.spec.projects and self.spec.norm == "l2" and not at_clean and k < self.spec.steps
        accumulate = self._sums(k)
        init = accumulate and k == self._first_summed
        adaptive = self.spec.adaptive_eta is not None and at_clean
        if accumulate and self.passive:  # passive tensors: accumulate only, their norms play no part
            ops.grad_stats_(grads[n:], self.passive_accum, accum_weight=self.weights[k], accum_init=init)
        if not self.params:
            return
        if self.lists is not None:
            stats = ops.grad_stats_lists_(
                self.lists,
                with_accum=accumulate,
                with_params=want_delta or adaptive,
                with_backups=want_delta,
                accum_weight=self.weights[k] if accumulate else 1.0,
                accum_init=init,
                adaptive_eta=self.spec.adaptive_eta if adaptive else -1.0,
            )
        else:
            stats = ops.grad_stats_(
                grads[:n],
                self.accum if accumulate else [],
                self.params if (want_delta or adaptive) else [],
                self.backups if want_delta else [],
                accum_weight=self.weights[k] if accumulate else 1.0,
                accum_init=init,
                adaptive_eta=self.spec.adaptive_eta if adaptive else -1.0,
            )
        self._stats = self._checked(stats, grads, adaptive, k)

    def _checked(self, stats: Tensor, grads: Sequence[Tensor], adaptive: bool, k: int) -> Tensor:
        """``stats`` completed across shards, checked finite, with the sums of squares of vanishing gradients
        taken in float64 (:func:`exact_tiny_sums`; l2 only: an l-inf step does not divide by a norm). Unsharded,
        the finite check and the smallness test share one host read. Sharded, each rank takes its own shards'
        sums again before the collective, which sums in float64 (a float32 would round sums of squares of
        elements below about 2^-75 to zero)."""
        l2 = self.spec.norm == "l2"
        if self.reduce is not None:
            if l2 and stats.numel():
                rows = tiny_rows(stats[:, 0], "layer")
                stats = self._exact_rows(stats, rows, grads, adaptive) if rows else stats
            stats = self.reduce(stats, "sum")
            check_finite(stats, k)
            return stats
        if stats.numel() == 0:
            return stats
        col = stats[:, 0]
        low = col.sum(dtype=torch.float64) if self.spec.scope == "global" else col.min().to(torch.float64)
        total, low = torch.stack([stats.sum(dtype=torch.float64), low]).tolist()
        if not math.isfinite(total):
            check_finite(stats, k)  # raises, naming the rows (unless float64 values only overflowed their sum)
        rows = _tiny_rows(stats, self.spec.scope, low) if l2 else []
        return self._exact_rows(stats, rows, grads, adaptive) if rows else stats

    def _exact_rows(self, stats: Tensor, rows: list[int], grads: Sequence[Tensor], adaptive: bool) -> Tensor:
        n = len(self.params)
        g = list(grads[:n]) if len(grads) >= n else grads_of(self.params, self.k)
        return exact_tiny_sums(stats, rows, g, self.params, self.spec.adaptive_eta if adaptive else None)

    def _weights_with_clean(self) -> bool:
        """Whether the clean point's two read-only measurements, the weights' norms (relative l2 radii) and
        the stats of g_0, run as one pass over both (``dot_stats``): nothing to accumulate or scale there, and
        (on a handle) tensors large enough on average that a list op's per-tensor cost is below the second
        pass's (the handle's two ops are cheaper per tensor than one list op), or sharded, where it saves a
        collective too."""
        return (
            self.spec.relative
            and self.spec.norm == "l2"
            and self.spec.adaptive_eta is None
            and not self._sums(0)
            and bool(self.params)
            and (
                self.lists is None
                or self.reduce is not None  # sharded: also one collective less
                or self.lists.numel >= ONE_PASS_MIN_MEAN_NUMEL * len(self.lists)
            )
        )

    def _start_in_one_pass(self, grads: Sequence[Tensor]) -> None:
        """:meth:`start` for :meth:`_weights_with_clean`: ``[sum w^2, sum w g, sum g^2]`` per tensor in one pass
        that reads w and g_0 side by side (two read streams in one pass run faster than one stream in each of
        two passes on the CPU hosts measured: 11.6 against 15.3 ms on ResNet-50's list), and one ``reduce``
        for both."""
        n = len(self.params)
        g = list(grads[:n]) if len(grads) >= n else grads_of(self.params, 0)
        rows = ops.dot_stats(self.params, g)
        if self.reduce is not None:
            tiny = tiny_rows(rows[:, 2], "layer")
            if tiny:  # (this rank's shards of a vanishing g_0, as in _checked: the collective sums in float64)
                rows = rows.to(torch.float64)
                rows[:, 2] = exact_tiny_norms(rows[:, 2], tiny, g)
            rows = self.reduce(rows, "sum")
        wn = _scope_sum(rows[:, 0].to(torch.float64), self.spec.scope).sqrt()
        self._radius, self._step = self._radius * wn, self._step * wn
        stats = torch.nn.functional.pad(rows[:, 2:], (0, 2))  # grad_stats_'s row at the clean point: [sum g^2, 0, 0]
        if self.reduce is None:
            stats = self._checked(stats, grads, False, 0)
        else:  # (the rows above are already summed across ranks, vanishing ones taken in float64 first)
            check_finite(stats, 0)
        self._stats = stats

    def start(self, grads: Sequence[Tensor]) -> None:
        """At the clean point: measure g_0 (and store c_0 g_0), fix the absolute radii."""
        if self._weights_with_clean():
            self._start_in_one_pass(grads)
            return
        if self.params:
            self._radius, self._step = absolute_sizes(
                self.spec, self.params, self._radius, self._step, self.reduce, self.lists
            )
        self._measure(grads)

    def ascend(self, grads: Sequence[Tensor], zero_grads: bool = True) -> None:
        """Move the weights one projected ascent step; zeroes ``grads`` for the next pass."""
        n = len(self.params)
        if self.params:
            assert self._stats is not None, "call start() first"
            step, proj = ascent_coefficients(self.spec, self._stats, self._step, self._radius, self.project)
            self._coefs.append(step)
            kw = dict(
                norm=self.spec.norm,
                first=self.k == 0,
                adaptive_eta=self.spec.adaptive_eta if self.spec.adaptive_eta is not None else -1.0,
                zero_grads=zero_grads,
            )
            if self.lists is not None:
                ops.ascent_step_lists_(self.lists, step, proj, **kw)
            else:
                ops.ascent_step_(self.params, grads[:n], self.backups, step, proj, **kw)
            self.perturbed = True
            _weights_moved()
        if zero_grads and self.passive:
            torch._foreach_zero_(list(grads[n:]))
        self.k += 1
        self._stats = None

    def overflow_note(self) -> str:
        """Why a NaN/Inf that appeared after an ascent may be the perturbation's own doing rather than the model's:
        a step coefficient that overflowed float32, which makes the perturbed weights Inf/NaN (a radius of 1e300, or
        a gradient norm too small for the step size), or a perturbation that may exceed the largest finite value of
        the weights' dtype (float16 weights). ``""`` when neither holds, or before any ascent. Reads the coefficients
        and sizes on the host: for the rare path of a non-finite gradient only."""
        if not self._coefs or not self.params:
            return ""
        bad_coef = (~torch.stack([torch.isfinite(c) for c in self._coefs]).all(dim=0)).tolist()
        # After k ascent steps of size eta an element of an l2 or l-inf perturbation is at most k * eta (projected: at
        # most min(k * eta, r)); ASAM's scaled step has no such bound, so only its coefficient says anything.
        reach = len(self._coefs) * self._step
        size = (torch.minimum(reach, self._radius) if self.project else reach).tolist()
        step = self._step.tolist()
        bounded = self.spec.adaptive_eta is None
        f32 = torch.finfo(torch.float32).max
        huge = [e for e, bad in zip(step, bad_coef) if bad and not e <= f32]  # the step size itself overflows
        tiny = [e for e, bad in zip(step, bad_coef) if bad and e <= f32]  # step size / ||g|| overflows
        too_big: dict[torch.dtype, float] = {}  # dtype -> the largest reach beyond its range, coefficient finite
        for p, s, bad in zip(self.params, size, bad_coef):
            if bounded and not bad and not s <= torch.finfo(p.dtype).max:
                too_big[p.dtype] = max(too_big.get(p.dtype, 0.0), s)
        why = []
        if huge:
            why.append(
                f"a step size of up to {max(huge):.3g} in {len(huge)} perturbed tensor(s), beyond float32's range, "
                "made the step coefficient Inf: the perturbed weights were Inf/NaN"
            )
        if tiny:
            why.append(
                f"the step coefficient (step size / gradient norm) overflowed float32 in {len(tiny)} perturbed "
                f"tensor(s), step sizes up to {max(tiny):.3g} over a gradient norm below step size / {f32:.3g}: "
                "the perturbed weights were Inf/NaN"
            )
        for dt, s in too_big.items():
            name = str(dt).removeprefix("torch.")
            why.append(
                f"a perturbation of up to {s:.3g} on {name} weights, beyond {name}'s largest finite value "
                f"{torch.finfo(dt).max:.3g}: the perturbed weights may have overflowed"
            )
        return "; ".join(why) + "; lower the radius (rho) or the step size" if why else ""

    def observe(self, grads: Sequence[Tensor]) -> None:
        """After the pass at the perturbed point: accumulate c_k g_k and measure g_k for the next step."""
        if self.k < self.spec.steps:
            self._measure(grads)

    def finish(self, grads: Sequence[Tensor]) -> None:
        """Leave G = sum_k c_k g_k in ``grads`` (the last pass's gradient is still there)."""
        if not (self.spec.accumulates and self.tensors):
            return
        w = self.weights[self.spec.steps]
        if self.lists is None:
            ops.combine_grads_(grads, self.accum + self.passive_accum, w)
            return
        ops.combine_grads_lists_(self.lists, w)
        if self.passive:
            ops.combine_grads_(grads[len(self.params) :], self.passive_accum, w)

    def restore(self) -> None:
        """Put the pre-cycle weights back, bit for bit (no-op if never perturbed)."""
        if self.perturbed:
            try:
                if self.lists is None:
                    ops.restore_(self.params, self.backups)
                else:
                    try:
                        ops.restore_lists_(self.lists)
                    except (TypeError, ValueError):
                        # The handle refused a tensor that changed since it was built: the list op restores
                        # whatever its own checks accept.
                        ops.restore_(self.params, self.backups)
            except (TypeError, ValueError) as err:
                # A tensor converted since the cycle began (module.to(float64), channels_last between first_step()
                # and second_step()) fits no backup any more: each weight is copied back converted, and the step
                # is refused; the weights must not stay perturbed.
                _copy_back_converted(self.params, self.backups)
                self.perturbed = False
                raise RuntimeError(
                    "the parameters changed dtype, memory layout or storage while perturbed (e.g. module.to() "
                    "between first_step() and second_step()): each weight was put back from its backup, converted "
                    f"to its new dtype and layout, and this step was dropped; convert between steps ({err})"
                ) from None
            self.perturbed = False
            _weights_moved()

    def mark_restored(self) -> None:
        """The caller has overwritten every perturbed tensor from :attr:`backups` itself (a fused
        restore + base step): :meth:`restore` becomes a no-op."""
        self.perturbed = False
        _weights_moved()


def _weights_moved() -> None:
    """After the weights moved in place within a step: autocast caches the low-precision copies of the weights until
    its outermost region exits, so a step run inside one (``with torch.autocast(...): opt.step(closure)``) would
    give the perturbed pass the clean weights' copies (the step became the base optimizer's, silently)."""
    if not torch.compiler.is_compiling():
        torch.clear_autocast_cache()


def _copy_back_converted(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """``p = b`` for each pair of the same shape, converting dtype and layout (``copy_``); a tensor of another shape
    holds data assigned since the cycle began, which was never perturbed."""
    with torch.no_grad():
        for p, b in zip(params, backups):
            if p.shape == b.shape:
                p.copy_(b)


def grads_of(tensors: Sequence[Tensor], pass_index: int) -> list[Tensor]:
    """The ``.grad`` of every tensor, with a clear error if a backward did not reach one."""
    grads = [p.grad for p in tensors]
    if not all(map(operator.is_not, grads, repeat(None))):
        i = next(i for i, g in enumerate(grads) if g is None)
        raise RuntimeError(
            f"tensor {i} taking part in the step (shape {tuple(tensors[i].shape)}) has no .grad after pass "
            f"{pass_index}: the closure must compute the loss and call backward() on it (and not set the "
            "gradients to None without a backward that reaches them)"
        )
    return grads


def run_cycle(
    cycle: Cycle,
    run_pass: Callable[[int], object],
    grads_at: Optional[Callable[[int], Sequence[Tensor]]] = None,
    zero_grads: bool = True,
    restore: bool = True,
) -> list[object]:
    """Run ``cycle``; ``run_pass(k)`` runs the forward/backward at perturbed point k = 1..K
    and returns its loss. Returns the losses of the perturbed passes.

    The gradient g_0 must already be in ``.grad``. On any exception, including
    :class:`NonFiniteGradient`, the weights are restored before it propagates; on
    success they are restored too and G is in ``.grad``. ``grads_at(k)`` gives the
    gradients of ``cycle.tensors`` after pass k (default: their ``.grad``; the local
    shards of the gradients when the cycle runs on shards; an empty sequence when the
    cycle has a handle and no passive tensors, as it then reads each ``.grad`` itself). ``zero_grads=False``: the
    ascent steps leave the gradients as they are and ``run_pass`` clears them (e.g. sets
    ``.grad`` to None, so its backward writes fresh ones instead of adding into zeros).

    ``restore=False`` leaves the weights perturbed on success (only): the caller then owns the
    restore (``cycle.restore()`` on any later exception, or a fused op that restores and updates
    at once, then ``cycle.mark_restored()``).
    """
    if grads_at is None:
        grads_at = lambda k: grads_of(cycle.tensors, k)  # noqa: E731
    losses = []
    try:
        # One look at .grad per pass: the closure may replace the tensors, nothing else does.
        grads = grads_at(0)
        cycle.start(grads)
        for k in range(1, cycle.spec.steps + 1):
            cycle.ascend(grads, zero_grads=zero_grads)
            del grads  # hold no gradient during the pass: one that run_pass releases is freed
            with torch.enable_grad():
                losses.append(run_pass(k))
            grads = grads_at(k)
            cycle.observe(grads)
        cycle.finish(grads)
    except BaseException:
        cycle.restore()
        raise
    if restore:
        cycle.restore()
    return losses
