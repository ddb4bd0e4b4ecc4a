"""The loss change indicators: the evaluator that corrupts, measures and restores, and the public entry points."""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import ops
from .._callers import user_stacklevel
from ..engine import Cycle, NonFiniteGradient, PerturbSpec, absolute_sizes, check_radius
from ..module_state import kept_buffers
from .results import Point, SweepResult

KINDS = ("adversarial", "first_order", "random")

ParamSelection = Union[None, str, Callable[[str, nn.Parameter], bool], Iterable[Tensor]]
AccuracyFn = Union[None, bool, Callable[[Any, Any], Union[int, float, Tensor]]]


# ---------------------------------------------------------------------------
# inputs


def _select_params(model: nn.Module, params: ParamSelection) -> list[Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    if not named:
        raise ValueError(f"the model ({type(model).__name__}) has no parameters: there are no weights to corrupt")
    if params is None or params == "all":
        chosen = [p for _, p in named if p.requires_grad]
        what = "parameters that require grad"
    elif params == "weights":
        chosen = [p for _, p in named if p.requires_grad and p.dim() > 1]
        what = "parameters with dim > 1 that require grad"
    elif isinstance(params, str):
        raise ValueError(
            f"params must be 'all', 'weights', a predicate (name, param) -> bool or a list of tensors, got {params!r}"
        )
    elif callable(params):
        chosen = [p for n, p in named if params(n, p)]
        what = "parameters selected by the predicate"
    else:
        chosen = list(params)
        what = "tensors given"
        for i, p in enumerate(chosen):
            if not isinstance(p, Tensor):
                raise TypeError(f"params[{i}] must be a Tensor, got {type(p).__name__}")
    if not chosen:
        raise ValueError(f"no tensors to corrupt: the model has no {what}")
    seen: set[int] = set()
    out = []
    for i, p in enumerate(chosen):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if not p.requires_grad:
            raise ValueError(
                f"tensor {i} (shape {tuple(p.shape)}) does not require grad: the ascent needs its gradient"
            )
        if not p.is_floating_point():
            raise TypeError(f"tensor {i} has dtype {p.dtype}; only floating-point weights can be corrupted")
        out.append(p)
    return out


def _as_batches(data: Any) -> list[tuple[Any, Any]] | Iterable:
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and isinstance(data[1], Tensor)
    ):
        return [(data[0], data[1])]
    if isinstance(data, Tensor):
        raise TypeError("data must be a pair (inputs, targets) or an iterable of such pairs, not a single tensor")
    if isinstance(data, Iterator):
        raise TypeError("data is an iterator that can be consumed only once; pass a list or a DataLoader")
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a pair (inputs, targets) or an iterable of such pairs, got {type(data).__name__}"
        )
    return data


def _batch_size(y: Any, x: Any) -> int:
    for t in (y, x):
        if isinstance(t, Tensor) and t.dim() > 0:
            return int(t.shape[0])
        if isinstance(t, (tuple, list)) and t and isinstance(t[0], Tensor) and t[0].dim() > 0:
            return int(t[0].shape[0])
    raise TypeError("cannot tell the batch size: the targets (or inputs) must be tensors with a batch dimension")


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x if x.device == device else x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(t, device) for t in x)
    return x


def _auto_correct(out: Any, y: Any) -> Optional[float]:
    if (
        isinstance(out, Tensor)
        and isinstance(y, Tensor)
        and out.dim() == 2
        and out.shape[1] >= 2  # (one column: a binary logit, whose argmax is always 0, not class scores)
        and y.dim() == 1
        and out.shape[0] == y.shape[0]
        and not y.is_floating_point()
        and not y.is_complex()
    ):
        return float((out.argmax(dim=1) == y).sum())
    return None


# ---------------------------------------------------------------------------
# the evaluator


def _check_finite_weights(model: nn.Module, params: Sequence[Tensor]) -> None:
    """A NaN/Inf weight (selected or not) makes every loss NaN: say which, before any pass (not as a non-finite
    gradient later)."""
    every = {id(p): p for p in [*model.parameters(), *params] if p.is_floating_point() or p.is_complex()}
    bad = {i for i, p in every.items() if not bool(torch.isfinite(p.detach()).all())}
    if bad:
        names = [n for n, p in model.named_parameters() if id(p) in bad] or [f"{len(bad)} selected tensor(s)"]
        raise ValueError(
            f"the model's weights hold NaN/Inf in {', '.join(names[:8])}"
            + (" ..." if len(names) > 8 else "")
            + ": robustness cannot be measured at a non-finite point"
        )


class _Evaluator:
    """Holds the buffers of one evaluation session; every method leaves the weights as it found them."""

    def __init__(self, model, loss_fn, data, params, norm, scope, relative, accuracy):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (output, target) -> mean loss, got {type(loss_fn).__name__}")
        if norm not in ("l2", "linf"):
            raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.params = _select_params(model, params)
        _check_finite_weights(model, self.params)
        self.device = self.params[0].device
        self.data = _as_batches(data)
        self.norm, self.scope, self.relative = norm, scope, bool(relative)
        self.accuracy_fn = accuracy
        self.n: Optional[int] = None
        self.backups = [torch.empty_like(p) for p in self.params]
        self._accum: Optional[list[Tensor]] = None
        self._noise: Optional[list[Tensor]] = None
        self.g0: Optional[list[Tensor]] = None
        self._probed: set = set()  # the eps already probed by _check_representable
        self.clean_loss = math.nan
        self.clean_accuracy: Optional[float] = None

    # -- one pass over the data ---------------------------------------------------------------
    def _correct(self, out, y) -> Optional[float]:
        if self.accuracy_fn is False:
            return None
        if self.accuracy_fn is None or self.accuracy_fn is True:
            c = _auto_correct(out, y)
            if c is None and self.accuracy_fn is True:
                raise ValueError(
                    "accuracy=True needs [B, C] class scores (C >= 2) and [B] integer targets; pass a callable "
                    "instead (a binary [B, 1] logit: accuracy=lambda out, y: (out[:, 0] > 0).long() == y)"
                )
            return c
        c = self.accuracy_fn(out, y)
        return float(c.sum()) if isinstance(c, Tensor) else float(c)

    def run(self, backward: bool) -> tuple[float, Optional[float]]:
        """Mean loss (and accuracy) over the data; with ``backward`` adds the gradient of the mean loss to ``.grad``."""
        total = 0.0
        correct: Optional[float] = 0.0
        n = 0
        scale_after = backward and self.n is None
        for batch in self.data:
            try:
                x, y = batch
            except (TypeError, ValueError):
                raise TypeError("each batch must be a pair (inputs, targets)") from None
            x, y = _to(x, self.device), _to(y, self.device)
            b = _batch_size(y, x)
            with torch.set_grad_enabled(backward):
                out = self.model(*x) if isinstance(x, (tuple, list)) else self.model(x)
                loss = self.loss_fn(out, y)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise TypeError("loss_fn must return a scalar tensor (the mean loss of the batch)")
                if backward:
                    (loss * (b if scale_after else b / self.n)).backward()
            total += float(loss.detach().double()) * b
            n += b
            c = self._correct(out.detach() if isinstance(out, Tensor) else out, y)
            correct = None if (c is None or correct is None) else correct + c
        if n == 0:
            raise ValueError("the evaluation data is empty")
        if self.n is None:
            self.n = n
            if scale_after:
                with torch.no_grad():
                    for p in self.params:
                        p.grad.div_(n)
        elif n != self.n:
            raise ValueError(
                f"the data gave {n} examples in one pass and {self.n} in another; it must be the same every time"
            )
        return total / n, (None if correct is None else correct / n)

    def _zero_grads(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()

    def start(self) -> None:
        """The clean loss/accuracy and the clean gradient g_0 (kept for every ascent)."""
        self._zero_grads()
        self.clean_loss, self.clean_accuracy = self.run(backward=True)
        grads = [p.grad for p in self.params]
        self.g0 = [g.detach().clone() for g in grads]
        bad = [i for i, g in enumerate(self.g0) if not bool(torch.isfinite(g).all())]
        if bad or not math.isfinite(self.clean_loss):
            # The weights are finite (checked up front): say what else makes the clean point non-finite.
            buffers = [(n, b) for n, b in self.model.named_buffers() if b.is_floating_point()]
            nan = [n for n, b in buffers if bool(torch.isnan(b).any())]
            inf = [n for n, b in buffers if bool(torch.isinf(b).any())]
            if nan or inf:
                names = nan or inf
                where = f"the model's buffers hold {'NaN' if nan else 'Inf'} in {', '.join(names[:8])}" + (
                    " ..." if len(names) > 8 else ""
                )
                if not nan:  # (an attention mask holds -inf on purpose: then the data or the loss is the cause)
                    where += "; unless that is a mask's -inf on purpose, look at the data and the loss"
            else:
                where = "the weights and buffers are finite: look at the data and the loss"
            what = (
                f"the clean loss is {self.clean_loss}"
                if not math.isfinite(self.clean_loss)
                else "the clean gradient holds NaN/Inf"
            )
            raise ValueError(f"{what} ({where}): robustness cannot be measured at a non-finite point") from (
                NonFiniteGradient(bad, 0) if bad else None
            )

    def _point(self, kind, eps, losses, accs, steps=None, pairs=False) -> Point:
        m = sum(losses) / len(losses)
        changes = [l - self.clean_loss for l in losses]
        std = 0.0
        if len(changes) > 1:
            std = math.sqrt(sum((c - (m - self.clean_loss)) ** 2 for c in changes) / (len(changes) - 1))
        acc = acc_std = drop = None
        if accs and all(a is not None for a in accs):
            acc = sum(accs) / len(accs)
            acc_std = math.sqrt(sum((a - acc) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
            drop = self.clean_accuracy - acc if self.clean_accuracy is not None else None
        # standard error of the mean: over independent units (mirrored pairs when antithetic; trials are even then).
        # One unit gives none: NaN, so the point is not taken for resolved (it was 0, and any positive mean was).
        units = [(losses[i] + losses[i + 1]) / 2 for i in range(0, len(losses), 2)] if pairs else list(losses)
        sem = 0.0 if kind != "random" else math.nan
        if len(units) > 1:
            um = sum(units) / len(units)
            sem = math.sqrt(sum((u - um) ** 2 for u in units) / (len(units) - 1) / len(units))
        return Point(kind, eps, m, m - self.clean_loss, std, acc, acc_std, drop, steps, len(losses), sem)

    @torch.no_grad()
    def _radii(self, eps: float) -> Tensor:
        n = len(self.params)
        spec = PerturbSpec(norm=self.norm, scope=self.scope, relative=self.relative)
        r = torch.full((n,), eps, dtype=torch.float64, device=self.device)
        r, _ = absolute_sizes(spec, self.params, r, r)
        return r

    @torch.no_grad()
    def _check_representable(self, eps: float) -> None:
        """Warn when float16/bfloat16 weights cannot hold a corruption of size ``eps``: the sum w + a is rounded to
        the weights' dtype, which shrinks (or cancels) an ``a`` small against the weights' resolution, so the
        points measured would be at a smaller radius than the one reported. Probed once per eps with a random
        corruption of that size (its own generator: the seeded draws are not disturbed), no forward pass."""
        low = [i for i, p in enumerate(self.params) if p.dtype in (torch.float16, torch.bfloat16)]
        if not low or eps in self._probed:
            return
        self._probed.add(eps)
        whole = self.scope == "global"  # (then one corruption over every tensor has the size: compare totals)
        probed = range(len(self.params)) if whole else low
        ord_ = 2.0 if self.norm == "l2" else math.inf

        def draw(i: int) -> Tensor:  # the same draw whenever asked, one tensor at a time (no copy of the model)
            p = self.params[i]
            return torch.empty_like(p).normal_(generator=torch.Generator(device=p.device).manual_seed(i)).double()

        def total(norms: list[float]) -> float:
            return math.sqrt(sum(x * x for x in norms)) if ord_ == 2.0 else max(norms, default=0.0)

        r = self._radii(eps).tolist()
        whole_norm = total([float(draw(i).norm(ord_)) for i in probed]) if whole else 0.0  # (a first pass)
        wanted, got = [], []
        for i in probed:
            p, z = self.params[i].detach().double(), draw(i)
            zn = whole_norm if whole else float(z.norm(ord_))
            want = (r[i] / zn if zn > 0 else 0.0) * z  # (global: r[i] is the same for every tensor)
            wanted.append(float(want.norm(ord_)))
            got.append(float(((p + want).to(self.params[i].dtype).double() - p).norm(ord_)))
        if whole:
            ratios = [total(got) / total(wanted)] if total(wanted) > 0 else []
        else:
            ratios = [g / w for g, w in zip(got, wanted) if w > 0]
        if ratios and not all(0.98 <= x <= 1.02 for x in ratios):
            dtypes = sorted({str(self.params[i].dtype).replace("torch.", "") for i in low})
            size = (
                f"{ratios[0]:.2f} of its size"
                if whole
                else f"{min(ratios):.2f}-{max(ratios):.2f} of its size per tensor"
            )
            warnings.warn(
                f"at eps={eps:g} a probe corruption changed the model's weights by {size} ({'/'.join(dtypes)} "
                "weights round w + a to their dtype), so the points at this eps are measured at another radius "
                "than reported; measure a float32 copy of the model (model.float(); the command line's "
                "--float64) for points at the stated eps",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )

    # -- the indicators ----------------------------------------------------------------------
    @torch.no_grad()
    def adversarial(self, eps: float, steps: int, step_ratio: Optional[float]) -> Point:
        eps = check_radius("eps", eps)
        self._check_representable(eps)
        ratio = (1.0 if steps == 1 else 1.5 / steps) if step_ratio is None else check_radius("step_ratio", step_ratio)
        spec = PerturbSpec(norm=self.norm, scope=self.scope, steps=steps, relative=self.relative)
        if spec.accumulates and self._accum is None:
            self._accum = [torch.empty_like(p) for p in self.params]
        n = len(self.params)
        cycle = Cycle(spec, self.params, self.backups, [eps] * n, [eps * ratio] * n, self._accum or ())
        losses, accs = [], []
        try:
            for p, g in zip(self.params, self.g0):
                p.grad.copy_(g)
            cycle.start([p.grad for p in self.params])
            for k in range(1, steps + 1):
                cycle.ascend([p.grad for p in self.params])
                last = k == steps
                loss, acc = self.run(backward=not last)
                losses.append(loss)
                accs.append(acc)
                if not last:
                    try:
                        cycle.observe([p.grad for p in self.params])
                    except NonFiniteGradient:
                        break  # the loss here is already recorded; no direction to go on
        finally:
            cycle.restore()
        best = max(range(len(losses)), key=lambda i: losses[i] if math.isfinite(losses[i]) else math.inf)
        return self._point("adversarial", eps, [losses[best]], [accs[best]], steps=steps)

    @torch.no_grad()
    def first_order(self, eps: float) -> Point:
        eps = check_radius("eps", eps)
        r = self._radii(eps)
        if self.norm == "l2":
            gn = ops.norms(self.g0, 2.0)[0].to(torch.float64)
            if self.scope == "global":
                val = float(r[0] * gn.square().sum().sqrt()) if len(gn) else 0.0
            else:
                val = float((r * gn).sum())
        else:
            g1 = torch.stack([g.detach().to(torch.float64).abs().sum() for g in self.g0])
            val = float(r[0] * g1.sum()) if self.scope == "global" else float((r * g1).sum())
        return Point("first_order", eps, self.clean_loss + val, val)

    @torch.no_grad()
    def random(self, eps: float, trials: int, generator: torch.Generator, antithetic: bool) -> Point:
        eps = check_radius("eps", eps)
        self._check_representable(eps)
        if self._noise is None:
            self._noise = [torch.empty_like(p) for p in self.params]
        r = self._radii(eps)
        ord_ = 2.0 if self.norm == "l2" else math.inf
        ones = torch.ones(len(self.params), dtype=torch.float32, device=self.device)
        losses, accs = [], []
        coef = ones
        for i in range(trials):
            if antithetic and i % 2 == 1:
                coef = -coef  # the mirror image -a of the previous corruption
            else:
                for z in self._noise:
                    z.normal_(generator=generator)
                per, total = ops.norms(self._noise, ord_)
                zn = total.to(torch.float64).expand_as(r) if self.scope == "global" else per.to(torch.float64)
                coef = torch.where(zn > 0, r / zn, torch.zeros_like(zn)).float()
            applied = False
            try:
                # w <- w + coef * z (the backups receive w first), the same op the ascent uses
                ops.ascent_step_(self.params, self._noise, self.backups, coef, ones, norm="l2", first=True)
                applied = True
                loss, acc = self.run(backward=False)
            finally:
                if applied:
                    ops.restore_(self.params, self.backups)
            losses.append(loss)
            accs.append(acc)
        return self._point("random", eps, losses, accs, pairs=antithetic)


def _check_trials(trials: Any, antithetic: bool) -> None:
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")
    if antithetic and trials % 2:
        # A draw without its mirror keeps its first-order term <g, a>, which is eps/eps^2 times the second-order
        # signal the mirrored mean measures: it would dominate the mean (21 trials: the wrong sign where 20 agree).
        raise ValueError(
            f"trials must be even with antithetic=True (mirrored pairs), got {trials}; use {trials + 1}, or "
            "antithetic=False"
        )


@contextmanager
def _session(model: nn.Module, train_mode: bool, params: Sequence[Tensor] = ()) -> Iterator[None]:
    """Eval (or train) mode, fresh ``.grad``; flags, grads and buffers are put back on exit, whatever happens.
    ``params``: the selected tensors, whose ``.grad`` the passes use too (they need not be the model's)."""
    modes = [(m, m.training) for m in model.modules()]
    all_params = list({id(p): p for p in [*model.parameters(), *params]}.values())
    grads = [p.grad for p in all_params]
    try:
        with kept_buffers(model):
            for p in all_params:
                p.grad = None
            model.train(train_mode)
            yield
    finally:
        for p, g in zip(all_params, grads):
            p.grad = g
        for m, flag in modes:
            m.training = flag


def _check_eps_grid(eps: Union[float, Sequence[float]]) -> list[float]:
    grid = [eps] if isinstance(eps, (int, float)) else _sequence("eps", eps, "a number or a sequence of numbers")
    if not grid:
        raise ValueError("the eps grid is empty")
    return [check_radius("eps", e) for e in grid]


def _sequence(name: str, value: Any, what: str) -> list:
    """``value`` as a list, where it may be a sequence; a clear error for anything else (a string, a tensor)."""
    if isinstance(value, (str, bytes, Tensor)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return list(value)


def _check_steps(steps: Union[int, Sequence[int]]) -> list[int]:
    ks = [steps] if isinstance(steps, int) else _sequence("steps", steps, "an integer >= 1 or a sequence of them")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"steps must be integers >= 1, got {k!r}")
    if not ks:
        raise ValueError("steps is empty")
    return ks


def sweep(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    eps: Union[float, Sequence[float]],
    *,
    kinds: Sequence[str] = KINDS,
    steps: Union[int, Sequence[int]] = (1, 5),
    step_ratio: Optional[float] = None,
    norm: str = "l2",
    scope: str = "layer",
    relative: bool = True,
    params: ParamSelection = None,
    trials: int = 10,
    seed: int = 0,
    antithetic: bool = True,
    accuracy: AccuracyFn = None,
    train_mode: bool = False,
    progress: Optional[bool] = None,
    desc: str = "robustness",
) -> SweepResult:
    """Loss change and accuracy under corruption over an eps grid; see the module docstring.

    ``kinds``: any of ``"adversarial"`` (once per number of ascent steps in
    ``steps``), ``"first_order"`` and ``"random"`` (``trials`` Gaussian draws
    from ``torch.Generator().manual_seed(seed)``). ``step_ratio``: ascent step
    as a multiple of eps (default 1 for one step, 1.5/K for K steps).
    ``progress``: a tqdm bar (None: only on a terminal).
    Returns a :class:`SweepResult` (rows per series and eps; JSON/CSV/plot).
    """
    grid = _check_eps_grid(eps)
    ks = _check_steps(steps)
    kinds = _sequence("kinds", kinds, f"a sequence of kinds from {KINDS}")
    if not kinds:
        raise ValueError(f"kinds is empty; choose from {KINDS}")
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown kind {k!r}; choose from {KINDS}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    _check_trials(trials, antithetic and "random" in kinds)  # (only random corruption draws trials)
    if step_ratio is not None:
        check_radius("step_ratio", step_ratio)
    ev = _Evaluator(model, loss_fn, data, params, norm, scope, relative, accuracy)
    work: list[tuple[str, Optional[int], float]] = []
    for kind in kinds:
        for k in ks if kind == "adversarial" else [None]:
            work += [(kind, k, e) for e in grid]
    from tqdm.auto import tqdm

    points: list[Point] = []
    gen = torch.Generator(device=ev.device).manual_seed(seed)
    with _session(model, train_mode, ev.params):
        ev.start()
        with tqdm(
            total=len(work),
            desc=desc,
            disable=(False if progress else True) if progress is not None else None,
            leave=False,
            dynamic_ncols=True,
        ) as bar:
            for kind, k, e in work:
                bar.set_postfix_str(f"{kind if k is None else f'adv K={k}'} eps={e:.3g}", refresh=False)
                if kind == "adversarial":
                    points.append(ev.adversarial(e, k, step_ratio))
                elif kind == "first_order":
                    points.append(ev.first_order(e))
                else:
                    # the same directions at every eps (common random numbers): the curve's shape is not noise,
                    # and a point does not depend on the rest of the grid
                    gen.manual_seed(seed)
                    points.append(ev.random(e, trials, gen, antithetic))
                bar.update(1)
    config = {
        "norm": norm,
        "scope": scope,
        "relative": relative,
        "steps": ks,
        "step_ratio": step_ratio,
        "trials": trials,
        "seed": seed,
        "antithetic": antithetic,
        "train_mode": train_mode,
        "eps": grid,
        "kinds": kinds,
        "tensors": len(ev.params),
        "numel": sum(p.numel() for p in ev.params),
        "examples": ev.n,
    }
    return SweepResult(points, ev.clean_loss, ev.clean_accuracy, config)


def _single(kind, model, loss_fn, data, eps, *, norm, scope, relative, params, accuracy, train_mode, **kw) -> Point:
    if kind != "clean":
        eps = check_radius("eps", eps)
    ev = _Evaluator(model, loss_fn, data, params, norm, scope, relative, accuracy)
    with _session(model, train_mode, ev.params):
        ev.start()
        if kind == "adversarial":
            return ev.adversarial(eps, kw["steps"], kw["step_ratio"])
        if kind == "first_order":
            return ev.first_order(eps)
        if kind == "random":
            return ev.random(
                eps, kw["trials"], torch.Generator(device=ev.device).manual_seed(kw["seed"]), kw["antithetic"]
            )
        return Point(
            "clean",
            0.0,
            ev.clean_loss,
            0.0,
            accuracy=ev.clean_accuracy,
            accuracy_drop=0.0 if ev.clean_accuracy is not None else None,
        )


def adversarial(
    model,
    loss_fn,
    data,
    eps: float,
    *,
    steps: int = 1,
    step_ratio: Optional[float] = None,
    norm: str = "l2",
    scope: str = "layer",
    relative: bool = True,
    params: ParamSelection = None,
    accuracy: AccuracyFn = None,
    train_mode: bool = False,
) -> Point:
    """Adversarial loss change at radius ``eps`` by ``steps``-step projected ascent (see the module docstring)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    k = steps
    return _single(
        "adversarial",
        model,
        loss_fn,
        data,
        eps,
        norm=norm,
        scope=scope,
        relative=relative,
        params=params,
        accuracy=accuracy,
        train_mode=train_mode,
        steps=k,
        step_ratio=step_ratio,
    )


def first_order(
    model,
    loss_fn,
    data,
    eps: float,
    *,
    norm: str = "l2",
    scope: str = "layer",
    relative: bool = True,
    params: ParamSelection = None,
    train_mode: bool = False,
) -> Point:
    """First-order estimate ``eps * ||g||_q`` of the adversarial loss change (see the module docstring)."""
    return _single(
        "first_order",
        model,
        loss_fn,
        data,
        eps,
        norm=norm,
        scope=scope,
        relative=relative,
        params=params,
        accuracy=False,
        train_mode=train_mode,
    )


def random_corruption(
    model,
    loss_fn,
    data,
    eps: float,
    *,
    trials: int = 10,
    seed: int = 0,
    antithetic: bool = True,
    norm: str = "l2",
    scope: str = "layer",
    relative: bool = True,
    params: ParamSelection = None,
    accuracy: AccuracyFn = None,
    train_mode: bool = False,
) -> Point:
    """Mean (and std) loss change over ``trials`` Gaussian corruptions of norm ``eps`` (see the module docstring)."""
    _check_trials(trials, antithetic)
    return _single(
        "random",
        model,
        loss_fn,
        data,
        eps,
        norm=norm,
        scope=scope,
        relative=relative,
        params=params,
        accuracy=accuracy,
        train_mode=train_mode,
        trials=trials,
        seed=seed,
        antithetic=antithetic,
    )


def clean(model, loss_fn, data, *, accuracy: AccuracyFn = None, train_mode: bool = False) -> Point:
    """The uncorrupted mean loss and accuracy over the data (``kind="clean"``)."""
    return _single(
        "clean",
        model,
        loss_fn,
        data,
        0.0,
        norm="l2",
        scope="layer",
        relative=True,
        params=None,
        accuracy=accuracy,
        train_mode=train_mode,
    )
