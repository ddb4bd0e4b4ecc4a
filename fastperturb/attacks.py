"""Input attacks for adversarial training: projected gradient descent (PGD) in an L-infinity or L2 ball, and TRADES.

These perturb the *inputs*; fastperturb's optimizers perturb the *weights*. AWP's
setting (Wu et al. 2020) uses both: adversarial examples are made at the clean
weights with :func:`pgd` (or :func:`trades_pgd`), then ``opt.step(closure)``
computes the weight perturbation from the adversarial loss on those examples and
descends on the same examples at the perturbed weights (see
:mod:`fastperturb.adversarial` for the recipe).

Contracts:

* The model's weights, their ``.grad`` and its buffers are untouched: gradients are
  taken with respect to the input only (``torch.autograd.grad``), never accumulated
  into the parameters. The one exception is asked for: ``train_mode=True, keep_stats=True``
  keeps what the attack's forwards did to the buffers (BatchNorm's running statistics).
* The attack runs in eval mode by default (as the official TRADES-AWP code does; the
  official PGD-AT AWP script, built on Rice et al.'s code, attacks in train mode and
  keeps the statistics its forwards move: ``train_mode=True, keep_stats=True``); the
  model's train/eval flags are put back afterwards, also if the attack raises.
* Every returned example lies in the ball of radius ``eps`` around its clean input
  (per example: ``max |x_adv - x| <= eps`` for ``"linf"``, ``||x_adv - x||_2 <= eps``
  for ``"l2"``, up to the rounding of the inputs' dtype: a few per cent of ``eps`` in
  bfloat16) and inside ``data_range``; inputs outside ``data_range`` are refused
  (normalised inputs: pass their own range, or ``None``).
* L2 steps are ``g / ||g||`` per example however small ``||g||`` is (0 for a zero
  gradient): Rice et al.'s and torchattacks' ``g / (||g|| + 1e-10)`` of a batch-mean
  loss barely move an example whose gradient is below about ``1e-10 * B``, so on
  confident models their L2 robust accuracy reads higher than this attack's.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .module_state import kept_buffers

__all__ = ["pgd", "trades_pgd", "trades_loss", "kl_to_clean", "robust_accuracy", "NORMS", "INITS"]

NORMS = ("linf", "l2")
INITS = ("uniform", "normal", "none")
# A per-example L2 norm below this is treated as zero when normalising a gradient step
# (an example whose input gradient vanishes does not move instead of becoming NaN).
_TINY = 1e-12

# objective(logits_adv, y) -> per-example loss [B] (the attack ascends its sum)
Objective = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def _mode(model: nn.Module, train: bool, keep_stats: bool = False) -> Iterator[None]:
    """Set every submodule's train flag, and put each one back afterwards; in train mode the forward may move
    buffers (BatchNorm statistics), which are put back too unless ``keep_stats``."""
    if keep_stats and not train:
        raise ValueError("keep_stats=True needs train_mode=True (in eval mode the forwards move no statistics)")
    flags = [(m, m.training) for m in model.modules()]
    with kept_buffers(model) if train and not keep_stats else contextlib.nullcontext():
        model.train(train)
        try:
            yield
        finally:
            for m, flag in flags:
                m.training = flag


def _check(
    eps: float, step_size: float, steps: int, norm: str, init: str, restarts: int, data_range: Optional[Sequence[float]]
) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    for name, v in (("eps", eps), ("step_size", step_size)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    for name, v in (("steps", steps), ("restarts", restarts)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "steps" else 1):
            raise ValueError(f"{name} must be an integer >= {0 if name == 'steps' else 1}, got {v!r}")
    if data_range is not None:
        lo, hi = data_range
        if not lo < hi:
            raise ValueError(f"data_range must be (low, high) with low < high, got {tuple(data_range)!r}")


def _flat_norm(t: Tensor) -> Tensor:
    """Per-example L2 norm, shaped to broadcast against ``t``; at least float32 (``_TINY`` is 0 in float16)."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    return t.flatten(1).to(dtype).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def _unit(t: Tensor) -> Tensor:
    """``t / ||t||`` per example, in ``t``'s dtype; 0 where ``t`` is 0."""
    return (t / _flat_norm(t).clamp_min(_TINY)).to(t.dtype)


def _project(
    delta: Tensor, x: Tensor, eps: float, norm: str, data_range: Optional[Sequence[float]], clip_first: bool = False
) -> Tensor:
    """Project ``delta`` onto the ball, then clip ``x + delta`` to the data range (``clip_first``: the other
    order, TRADES' for L2; for L-infinity both orders give the same point).

    Either order keeps both constraints: clipping to the range only moves coordinates
    towards ``x`` (which is inside the range), so no ``|delta_i|`` grows; shrinking
    ``delta`` towards 0 keeps ``x + delta`` between two points of the range.
    """
    if clip_first and data_range is not None and norm != "linf":
        delta = (x + delta).clamp(data_range[0], data_range[1]) - x
        data_range = None
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        scale = (eps / _flat_norm(delta).clamp_min(_TINY)).clamp(max=1.0)
        delta = (delta * scale).to(delta.dtype)
    if data_range is not None:
        delta = (x + delta).clamp(data_range[0], data_range[1]) - x
    return delta


def _start(x: Tensor, eps: float, norm: str, init: str, generator: Optional[torch.Generator]) -> Tensor:
    if init == "none" or eps == 0:
        return torch.zeros_like(x)
    if init == "normal":  # TRADES' start: a small Gaussian jitter, 0.001 * N(0, 1)
        return 1e-3 * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if norm == "linf":  # uniform in the cube
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return (2 * u - 1) * eps
    # l2: a uniform direction, radius uniform in [0, eps]
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, dtype=x.dtype, device=x.device)
    return _unit(z) * (r * eps)


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    if logits.dim() != 2 or logits.shape[1] < 2:
        # (one logit: the cross-entropy over one class is 0, its gradient too, and the attack never moved)
        raise ValueError(
            f"the default objective, cross-entropy, needs logits [B, C] with C >= 2, got {tuple(logits.shape)}; for "
            "a one-logit binary model pass objective=lambda z, y: F.binary_cross_entropy_with_logits(z.view(-1), "
            "y.float(), reduction='none')"
        )
    return F.cross_entropy(logits, y, reduction="none")


def _per_example(objective: Objective, logits: Tensor, y: Tensor) -> Tensor:
    loss = objective(logits, y)
    if not isinstance(loss, Tensor) or tuple(loss.shape) != (y.shape[0],):
        got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"objective must return one loss per example, shape ({y.shape[0]},), got {got} (use reduction='none')"
        )
    return loss


def _ascend(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    delta: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    norm: str,
    data_range: Optional[Sequence[float]],
    objective: Objective,
    clip_first: bool,
) -> Tensor:
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = _per_example(objective, model(x + delta), y).sum()
            (grad,) = torch.autograd.grad(loss, [delta])
        with torch.no_grad():
            if norm == "linf":
                step = grad.sign()
            else:
                step = _unit(grad)
            delta = _project(delta.detach() + step_size * step, x, eps, norm, data_range, clip_first)
    return delta.detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int = 10,
    *,
    norm: str = "linf",
    init: str = "uniform",
    restarts: int = 1,
    data_range: Optional[Sequence[float]] = (0.0, 1.0),
    objective: Optional[Objective] = None,
    train_mode: bool = False,
    keep_stats: bool = False,
    generator: Optional[torch.Generator] = None,
    _clip_first: bool = False,
) -> Tensor:
    """Projected gradient ascent on the inputs (Madry et al.): returns detached adversarial examples.

    Each step moves ``delta`` by ``step_size * sign(g)`` (``norm="linf"``) or
    ``step_size * g / ||g||_2`` per example (``"l2"``), projects it onto the ball of
    radius ``eps`` and clips ``x + delta`` to ``data_range`` (``None``: no clipping).

    Args:
        model: the classifier; its weights and ``.grad`` are not touched.
        x, y: a batch of inputs ``[B, ...]`` and labels ``[B]``.
        eps: radius of the ball (in input units, e.g. 0.1 for images in [0, 1]).
        step_size: length of one step in the ball's norm.
        steps: ascent steps (0 returns the clipped random start).
        norm: ``"linf"`` or ``"l2"``.
        init: ``"uniform"`` (uniform in the cube for L-infinity; uniform direction and
            radius for L2), ``"normal"`` (TRADES' ``0.001 * N(0, 1)``, its first gradient taken
            at the start as drawn, unclipped, as TRADES' code does) or ``"none"``.
        restarts: independent random starts; per example the result of the restart that
            misclassifies it (if any) and otherwise has the largest objective is kept (with an
            ``objective`` given: the largest objective alone, since a targeted or other
            objective need not mean misclassifying ``y``).
        objective: ``f(logits_adv, y) -> per-example loss [B]`` to ascend; default
            cross-entropy. :func:`kl_to_clean` gives TRADES' objective.
        train_mode: run the model in train mode during the attack (default eval, as the
            official TRADES-AWP code does); the flags are restored afterwards, and so are the
            buffers its forwards moved (BatchNorm's running statistics) unless ``keep_stats``.
        keep_stats: with ``train_mode=True``, keep the running statistics the attack's
            forwards move, as the official PGD-AT AWP script (built on Rice et al.'s
            robust-overfitting code) does: its attack runs in train mode. (Its attack also
            runs one more forward after the last step to pick among restarts, even with one.)
        generator: source of the random starts (default: torch's global generator).
    """
    _check(eps, step_size, steps, norm, init, restarts, data_range)
    if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected inputs [B, ...] and labels [B], got {tuple(x.shape)} and {tuple(y.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"inputs must be floating point, got {x.dtype}")
    if data_range is not None and x.numel():
        # (a NaN would hide the others from min/max)
        lo = float(torch.nan_to_num(x, nan=data_range[0]).min())
        hi = float(torch.nan_to_num(x, nan=data_range[1]).max())
        if lo < data_range[0] or hi > data_range[1]:
            # (clipping them into the range would move them far out of the ball, silently)
            raise ValueError(
                f"the inputs lie in [{lo:.4g}, {hi:.4g}], outside data_range={tuple(data_range)}: for normalised "
                "inputs pass their own range, or data_range=None (no clipping)"
            )
    by_misclassification = objective is None
    objective = _ce if objective is None else objective
    x = x.detach()
    best, best_wrong, best_loss = None, None, None
    with _mode(model, train_mode, keep_stats):
        for _ in range(restarts):
            delta = _start(x, eps, norm, init, generator)
            # TRADES' code takes its first gradient at the jittered start as drawn (a pixel at 0 or 1 jittered
            # out of the range stays out until the first step's clipping); the uniform start is projected and
            # clipped first, as Madry's and Rice's code do. A start returned as the result is clipped either way.
            if init != "normal" or steps == 0:
                delta = _project(delta, x, eps, norm, data_range, _clip_first)
            delta = _ascend(model, x, y, delta, eps, step_size, steps, norm, data_range, objective, _clip_first)
            if restarts == 1:
                return (x + delta).detach()
            with torch.no_grad():
                logits = model(x + delta)
                loss = _per_example(objective, logits, y).detach()
                wrong = logits.argmax(1) != y if by_misclassification else torch.zeros_like(y, dtype=torch.bool)
            if best is None:
                best, best_wrong, best_loss = delta, wrong, loss
                continue
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), delta, best)
            best_wrong = best_wrong | wrong
            best_loss = torch.where(better, loss, best_loss)
    return (x + best).detach()


def kl_to_clean(model: nn.Module, x: Tensor, *, train_mode: bool = False, keep_stats: bool = False) -> Objective:
    """TRADES' attack objective: per example ``KL(softmax(model(x)) || softmax(logits_adv))``,
    with the clean prediction computed once (it is a constant for the input gradient), in eval
    mode as TRADES does (``train_mode``, ``keep_stats``: as :func:`pgd`'s; the flags and the
    buffers are put back). Until this round it ran in the model's current mode, so in a training
    loop it moved BatchNorm's statistics and took its target from batch statistics."""
    with _mode(model, train_mode, keep_stats), torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)

    def objective(logits_adv: Tensor, _y: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(logits_adv, dim=1), p_clean, reduction="none").sum(1)

    return objective


def trades_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int = 10,
    *,
    norm: str = "linf",
    train_mode: bool = False,
    keep_stats: bool = False,
    generator: Optional[torch.Generator] = None,
    data_range: Optional[Sequence[float]] = (0.0, 1.0),
) -> Tensor:
    """TRADES' inner maximisation (Zhang et al. 2019): :func:`pgd` ascending :func:`kl_to_clean`
    from TRADES' Gaussian start (``init="normal"``). The clean prediction is taken in the same
    mode as the attack. With ``norm="l2"`` each step clips to the data range before shrinking
    into the ball, in TRADES' order (``pgd`` shrinks first, as Rice et al.'s L2 attack does). The step is
    ``step_size`` for both norms; the official TRADES-AWP script's L2 attack ignores its ``--step-size`` and steps
    by ``2 * eps / steps``: pass that to port it."""
    objective = kl_to_clean(model, x.detach(), train_mode=train_mode, keep_stats=keep_stats)
    return pgd(
        model,
        x,
        y,
        eps,
        step_size,
        steps,
        norm=norm,
        init="normal",
        objective=objective,
        train_mode=train_mode,
        keep_stats=keep_stats,
        generator=generator,
        data_range=data_range,
        _clip_first=True,
    )


def trades_loss(
    model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, beta: float = 6.0, *, forwards: int = 2
) -> Tensor:
    """TRADES' training loss: ``CE(model(x), y) + beta * KL(softmax(model(x)) || softmax(model(x_adv)))``
    (KL averaged over the batch). Both terms depend on the weights, so under a weight
    perturbation both are taken at the perturbed weights (as official TRADES-AWP does).

    ``forwards=2`` (default) takes one clean forward for both terms. ``forwards=3`` runs the three forwards of
    the official TRADES-AWP code in its order (``x_adv``, then ``x`` for the KL target, then ``x`` for the
    cross-entropy): the same loss and gradient, and a BatchNorm's running statistics updated as there (three
    times, in that order, instead of twice)."""
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if forwards not in (2, 3):
        raise ValueError(f"forwards must be 2 or 3, got {forwards!r}")
    if forwards == 3:
        logits_adv = model(x_adv)
        target = F.softmax(model(x), dim=1)
        logits = model(x)
    else:
        logits = model(x)
        logits_adv = model(x_adv)
        target = F.softmax(logits, dim=1)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), target, reduction="batchmean")
    return F.cross_entropy(logits, y) + beta * robust


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 512,
    attack: Optional[Callable[[nn.Module, Tensor, Tensor], Tensor]] = None,
) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` in eval mode on ``attack(model, x, y)``
    (``None``: the clean inputs), in batches, for logits ``[B, C]`` with ``C >= 2``. The model's
    flags and weights are unchanged."""
    correct, total_loss = 0, 0.0
    with _mode(model, False):
        for i in range(0, len(y), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            if attack is not None:
                xb = attack(model, xb, yb)
            with torch.no_grad():
                logits = model(xb)
            if logits.dim() != 2 or logits.shape[1] < 2:  # (argmax over one logit is always right for label 0)
                raise ValueError(f"robust_accuracy scores logits [B, C] with C >= 2, got {tuple(logits.shape)}")
            correct += int((logits.argmax(1) == yb).sum())
            total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    return correct / len(y), total_loss / len(y)
