"""Hugging Face Accelerate custom loops: gradient accumulation inside the closure.

``accelerator.accumulate()`` skips ``optimizer.step()`` on the micro-batches that do not sync,
so a perturbation step would never see their data (fastperturb refuses that loop). Build the
``Accelerator`` with ``gradient_accumulation_steps=1`` and run the micro-batches inside the
closure instead; these two helpers make that two lines::

    from fastperturb.integrations.accelerate import micro_batch_closure, perturb_step

    model, opt, loader = accelerator.prepare(model, fp.SAM(model.parameters(), torch.optim.SGD, lr=0.1), loader)
    for x, y in loader:
        micro = list(zip(x.chunk(4), y.chunk(4)))
        closure = micro_batch_closure(accelerator, model, micro, lambda mb: F.cross_entropy(model(mb[0]), mb[1]))
        loss = perturb_step(accelerator, opt, closure)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

from torch import Tensor, nn

from ..optim.frameworks import accumulation_in_closure
from ..optim.wrapper import PerturbOptimizer
from . import unwrap_optimizer

__all__ = ["micro_batch_closure", "perturb_step"]


def micro_batch_closure(
    accelerator: Any, model: nn.Module, micro_batches: Sequence[Any], loss_fn: Callable[[Any], Tensor]
) -> Callable[[], Tensor]:
    """A closure that runs ``loss_fn(mb)`` on every micro-batch and back-propagates
    ``loss / len(micro_batches)`` with ``accelerator.backward`` (so the accelerator's loss scaling
    applies), all but the last under ``accelerator.no_sync(model)`` (one gradient all-reduce per
    pass under DDP). For equal-size micro-batches whose ``loss_fn`` returns a mean, every pass
    equals one pass on the whole batch. The closure returns the mean loss (detached)."""
    micro_batches = list(micro_batches)
    n = len(micro_batches)
    if n == 0:
        raise ValueError("micro_batch_closure needs at least one micro-batch")
    if getattr(accelerator, "gradient_accumulation_steps", 1) != 1:
        raise ValueError(
            f"Accelerator(gradient_accumulation_steps={accelerator.gradient_accumulation_steps}) divides every loss "
            "in accelerator.backward by that number; this closure accumulates the micro-batches itself: build the "
            "Accelerator with gradient_accumulation_steps=1"
        )

    def closure() -> Tensor:
        total = None
        for i, mb in enumerate(micro_batches):
            sync = contextlib.nullcontext() if i == n - 1 else accelerator.no_sync(model)
            with sync:
                loss = loss_fn(mb) / n
                accelerator.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        return total

    return closure


def perturb_step(accelerator: Any, optimizer: Any, closure: Callable[[], Any]) -> Any:
    """``optimizer.step(closure)`` for a fastperturb optimizer prepared by ``accelerator``.

    Without a ``GradScaler`` this is the step ``AcceleratedOptimizer.step(closure)`` takes on a
    syncing micro-batch. With one (fp16 on GPU),
    Accelerate would call ``scaler.step(optimizer, closure)``, which unscales the gradients
    *before* the closure has computed them and then steps on scaled gradients; here the scaler
    is handed to fastperturb (which unscales the descent gradient, checks it, clips and steps)
    and updated. Returns what ``step()`` returns (the clean loss, or None if the caller
    computed the clean gradient). Call it outside ``accelerator.accumulate()``.
    """
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, PerturbOptimizer):
        raise TypeError(f"perturb_step needs a fastperturb optimizer, got {type(opt).__name__}")
    if getattr(accelerator, "gradient_accumulation_steps", 1) != 1:  # (whatever closure it is given)
        raise ValueError(
            f"perturb_step under Accelerator(gradient_accumulation_steps={accelerator.gradient_accumulation_steps}): "
            "accelerator.backward divides every loss by that number, so the step's gradients would be that much too "
            "small; build the Accelerator with gradient_accumulation_steps=1 and run the micro-batches inside the "
            "closure (micro_batch_closure). Nothing was changed"
        )
    if not accelerator.gradient_state.sync_gradients:
        raise RuntimeError(
            "perturb_step was called on a micro-batch that does not sync (inside accelerator.accumulate() with "
            "gradient_accumulation_steps > 1); run the micro-batches inside the closure (micro_batch_closure) "
            "with gradient_accumulation_steps=1"
        )
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and not scaler.is_enabled():
        scaler = None
    # The fastperturb optimizer is stepped directly (AcceleratedOptimizer.step(closure) would do the
    # same on a syncing step but drop the returned loss); an LR scheduler built on the wrapper
    # is told that the optimizer stepped.
    with accumulation_in_closure():
        loss = opt.step(closure, scaler=scaler)
    if scaler is not None:
        scaler.update()
    # What accelerator.optimizer_step_was_skipped reads (AcceleratedScheduler then holds the LR): a step skipped for
    # a non-finite gradient counts as skipped with or without a scaler.
    if hasattr(optimizer, "_is_overflow"):
        optimizer._is_overflow = opt.last_step_skipped
    if optimizer is not opt:
        optimizer._opt_called = True
    return loss
