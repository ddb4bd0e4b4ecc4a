"""The recipe for adversarial training with input and weight perturbations (AWP's setting, Wu et al. 2020).

One training step, the official AWP code's algorithm (less the BatchNorm bookkeeping below)::

    x_adv = fp.attacks.pgd(model, x, y, eps=0.2, step_size=0.1, steps=5)   # at the clean weights
    def closure():
        loss = F.cross_entropy(model(x_adv), y)   # the adversarial loss on the fixed examples
        loss.backward()
        return loss
    opt.step(closure)   # fp.AWP: weight perturbation from this loss, descent on the same x_adv

:func:`adversarial_step` is those lines (with TRADES' loss if ``trades_beta`` is
given), plus the running statistics' reset described below, which a loop written out as above lacks (it moves
them at both passes). The attack above runs in eval mode, as TRADES-AWP's does; the official PGD-AT script attacks
in train mode (``pgd(train_mode=True, keep_stats=True)``). With ``fp.AWP`` the closure runs at ``w`` (the
gradient that sets the weight perturbation ``delta_l = gamma ||w_l|| g_l / ||g_l||``) and at ``w + delta`` (the
descent gradient); the base optimizer then steps from the restored ``w``. With
``fp.SAM``/``fp.APD`` the same closure gives SAM/APD adversarial training, and with
a plain ``torch.optim`` optimizer it is ordinary PGD (or TRADES) adversarial training.

The weight perturbation's passes move BatchNorm's running statistics once per step, from the last pass (at
``w + delta``), as in the official code, whose ascent runs on a proxy model: each closure call after the first
starts the layers that will update them from their values at the start of the step. The attack adds its own
forwards' moves only when asked (``pgd(train_mode=True, keep_stats=True)``, the official PGD-AT script's mode;
TRADES-AWP's attack runs in eval mode, the default). A
preset's ``freeze_bn`` (statistics from the clean pass, the common SAM convention) is kept: its frozen
passes leave them alone.

One deliberate difference from the official code: it takes the base optimizer step
at ``w + delta`` and subtracts ``delta`` afterwards, so its weight decay acts on
``w + delta``; fastperturb steps from ``w``, so weight decay acts on ``w``. Without
weight decay the two updates are the same (``tests/test_adversarial_training.py``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .attacks import trades_loss

__all__ = ["adversarial_step", "set_perturb", "AdversarialStep"]

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


class AdversarialStep(NamedTuple):
    """What :func:`adversarial_step` did: the training loss at the clean weights and the examples used."""

    loss: Tensor
    x_adv: Tensor


def adversarial_step(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: Attack,
    *,
    trades_beta: Optional[float] = None,
) -> AdversarialStep:
    """One step of adversarial training: ``x_adv = attack(model, x, y)`` at the current (clean)
    weights, then ``optimizer.step(closure)`` with the adversarial loss on ``x_adv``.

    The loss is ``CE(model(x_adv), y)`` (PGD-AT), or TRADES' ``CE(model(x), y) + beta *
    KL(model(x) || model(x_adv))`` when ``trades_beta`` is given. ``attack`` is any
    ``(model, x, y) -> x_adv``, e.g. ``functools.partial(fp.attacks.pgd, eps=0.2,
    step_size=0.05, steps=10)``; it must leave the weights alone (fastperturb's attacks do).
    The model is left in the mode it was given in (train mode for training).
    """
    x_adv = attack(model, x, y).detach()
    if trades_beta is None:

        def compute() -> Tensor:
            return F.cross_entropy(model(x_adv), y)
    else:

        def compute() -> Tensor:
            # the official TRADES-AWP forwards, so that BatchNorm's running statistics move as there
            return trades_loss(model, x, x_adv, y, beta=trades_beta, forwards=3)

    stats = _running_stats(model)
    start: list = []

    def closure() -> Tensor:
        if stats:
            if not start:
                start.extend(s.clone() for s in stats)
            else:
                with torch.no_grad():
                    for s, s0 in zip(stats, start):
                        if s.updates():  # this pass moves them: from where the step started
                            s.load(s0)
        loss = compute()
        loss.backward()
        return loss

    optimizer.zero_grad()
    loss = optimizer.step(closure)
    return AdversarialStep(loss.detach(), x_adv)


class _Stats:
    """A BatchNorm layer's running statistics (or a copy of them)."""

    def __init__(self, module: Optional[_BatchNorm], buffers: list):
        self.module, self.buffers = module, buffers

    def clone(self) -> "_Stats":
        return _Stats(None, [b.clone() for b in self.buffers])

    def updates(self) -> bool:
        """Whether the layer's next forward updates them (training, and not frozen by the optimizer's freeze_bn)."""
        m = self.module
        return m is not None and m.training and m.track_running_stats

    def load(self, saved: "_Stats") -> None:
        for b, v in zip(self.buffers, saved.buffers):
            b.copy_(v)


def _running_stats(model: nn.Module) -> list:
    out = []
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None:
            bufs = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
            out.append(_Stats(m, bufs))
    return out


def set_perturb(optimizer: torch.optim.Optimizer, enabled: bool) -> None:
    """Turn the weight perturbation of a fastperturb optimizer on or off in every group
    (off: a step is one plain pass, e.g. during AWP's warm-up epochs)."""
    for group in optimizer.param_groups:
        if "perturb" not in group:
            raise TypeError(
                f"{type(optimizer).__name__} has no 'perturb' setting: set_perturb needs a fastperturb optimizer"
            )
        group["perturb"] = bool(enabled)
