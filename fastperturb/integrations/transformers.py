"""Hugging Face ``Trainer`` integration: :class:`PerturbTrainer`.

``Trainer`` calls ``optimizer.step()`` without a closure, after it has run forward/backward on
every micro-batch of the step. :class:`PerturbTrainer` records the micro-batches its
``training_step`` sees and, when ``Trainer`` steps the optimizer, hands the fastperturb optimizer
a closure that runs every recorded micro-batch again through ``Trainer.training_step`` (the
same loss scaling for gradient accumulation, the same autocast and ``accelerator.backward``,
DDP sync only on the last micro-batch). So every perturbed point sees the gradient over all
micro-batches, exactly as the clean point does::

    trainer = PerturbTrainer(model=model, args=TrainingArguments(..., gradient_accumulation_steps=4,
                             max_grad_norm=1.0, bf16=True), train_dataset=ds,
                             perturb=fp.SAM, perturb_kwargs={"rho": 0.05})
    trainer.train()

``perturb`` is a preset class (``fp.SAM``, ``fp.ASAM``, ``fp.AWP``, ``fp.APD``, ``fp.GSAM``, ``fp.WSAM``,
``fp.LookSAM``, ``fp.FriendlySAM``) built on the base optimizer and parameter groups ``Trainer`` would create
from its arguments (``optim``, ``learning_rate``, ``weight_decay``, ``adam_*``); or pass a ready optimizer with
``optimizers=(fp.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3), None)``.

``max_grad_norm`` clips the final descent gradient (the optimizer's ``max_grad_norm``), not the
clean gradient that ``Trainer`` would clip before ``step()``; the logged ``grad_norm`` is the clean
gradient's norm.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers import Trainer

from ..optim.frameworks import accumulation_in_closure
from ..optim.wrapper import PerturbOptimizer
from . import routed_max_grad_norm, unwrap_optimizer

__all__ = ["PerturbTrainer"]


class PerturbTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a fastperturb optimizer (any preset, the SAM family included).

    Args:
        perturb: a :class:`~fastperturb.PerturbOptimizer` subclass (e.g. ``fastperturb.SAM``),
            built in :meth:`create_optimizer` with ``Trainer``'s base optimizer class and
            parameter groups; or None when ``optimizers=(opt, scheduler)`` gives a fastperturb optimizer.
        perturb_kwargs: the preset's own keywords (``rho``, ``gamma``, ``eps``, ``steps``, ...).
        *args, **kwargs: ``Trainer``'s.
    """

    def __init__(
        self, *args: Any, perturb: Optional[type] = None, perturb_kwargs: Optional[Dict[str, Any]] = None, **kwargs: Any
    ) -> None:
        if perturb is not None and not (isinstance(perturb, type) and issubclass(perturb, PerturbOptimizer)):
            raise TypeError(f"perturb must be a fastperturb optimizer class such as fastperturb.SAM, got {perturb!r}")
        self.perturb = perturb
        self.perturb_kwargs = dict(perturb_kwargs or {})
        self._micro_batches: List[Tuple[nn.Module, Any, Any]] = []
        self._replaying = False
        super().__init__(*args, **kwargs)
        given = self.optimizer
        if given is not None and perturb is not None:
            raise ValueError("pass either perturb=... or optimizers=(fastperturb optimizer, scheduler), not both")
        if given is not None and not isinstance(unwrap_optimizer(given), PerturbOptimizer):
            raise TypeError(
                f"PerturbTrainer needs a fastperturb optimizer; optimizers=({type(given).__name__}, ...) is not one. "
                "Pass perturb=fastperturb.SAM (or any other preset: ASAM, AWP, APD, GSAM, WSAM, LookSAM, FriendlySAM) "
                "or a fastperturb optimizer instance"
            )
        if given is None and perturb is None:
            raise TypeError(
                "PerturbTrainer needs perturb=fastperturb.SAM (or any other preset: ASAM, AWP, APD, GSAM, WSAM, "
                "LookSAM, FriendlySAM) or optimizers=(fastperturb optimizer, scheduler)"
            )

    # ---- the optimizer -----------------------------------------------------------------

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """Build ``perturb`` on the base optimizer and parameter groups ``Trainer`` would use."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            base_cls, base_kwargs = (
                self.optimizer_cls_and_kwargs
                if self.optimizer_cls_and_kwargs is not None
                else self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            )
            if not (isinstance(base_cls, type) and issubclass(base_cls, torch.optim.Optimizer)):
                raise TypeError(f"optim={self.args.optim!r} does not give an optimizer class that fastperturb can wrap")
            base_kwargs = dict(base_kwargs)
            if {"params", "model", "optimizer_dict"} & set(base_kwargs):
                raise TypeError(f"optim={self.args.optim!r} builds its own parameter list; fastperturb cannot wrap it")
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            # A base setting whose name the preset's signature takes (Adam's eps under APD) goes
            # into the groups, where the base optimizer reads it.
            taken = set(inspect.signature(self.perturb).parameters)
            for key in [k for k in base_kwargs if k in taken]:
                value = base_kwargs.pop(key)
                for g in groups:
                    g[key] = value
            self.optimizer = self.perturb(groups, base_cls, **self.perturb_kwargs, **base_kwargs)
        return self.optimizer

    def _perturb_optimizer(self) -> PerturbOptimizer:
        opt = unwrap_optimizer(self.optimizer)
        if not isinstance(opt, PerturbOptimizer):
            raise TypeError(f"PerturbTrainer's optimizer is a {type(opt).__name__}, not a fastperturb optimizer")
        return opt

    # ---- recording micro-batches and stepping with them --------------------------------

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._micro_batches = []  # nothing left over from an interrupted run
        return super().train(*args, **kwargs)

    def training_step(self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self._replaying:
            return super().training_step(model, inputs, num_items_in_batch)
        self._install_step()
        self._micro_batches.append((model, inputs, num_items_in_batch))
        return super().training_step(model, inputs, num_items_in_batch)

    def _install_step(self) -> None:
        """Make ``Trainer``'s ``self.optimizer.step()`` (the accelerate wrapper's) run the
        perturbed step with the replay closure. Installed on the wrapper instance, above the
        LR scheduler's own step counter."""
        outer = self.optimizer
        if getattr(outer.step, "_fastperturb_replay", False):
            return
        opt = self._perturb_optimizer()
        counted_step = outer.step  # the scheduler's counting wrapper (or the plain bound method)

        def step(closure: Any = None) -> Any:
            if closure is not None:
                return counted_step(closure)
            # the replay closure runs every micro-batch; max_grad_norm clips the descent gradient
            with (
                accumulation_in_closure(),
                routed_max_grad_norm(opt, self.args.max_grad_norm, "TrainingArguments(max_grad_norm)", off="0"),
            ):
                return self._step_with_replay(outer, counted_step, opt)

        step._fastperturb_replay = True  # type: ignore[attr-defined]
        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # the scheduler still counts (below)
        outer.step = step

    def _step_with_replay(self, outer: Any, counted_step: Any, opt: PerturbOptimizer) -> Any:
        micro = self._micro_batches
        self._micro_batches = []
        if not micro:
            raise RuntimeError(
                "PerturbTrainer: optimizer.step() was called before any training_step reached PerturbTrainer's (a "
                "training_step override must call super().training_step(...))"
            )
        closure = self._replay_closure(micro)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            # AcceleratedOptimizer.step(closure) -> opt.step(closure), with the LR scheduler's counter; a step
            # skipped for a non-finite gradient is reported as Accelerate reports an overflow
            loss = counted_step(closure)
            outer._is_overflow = opt.last_step_skipped
            return loss
        # fp16 with a GradScaler: accelerate's path would call scaler.step(opt, closure), which
        # unscales before the closure runs; fastperturb takes the scaler and unscales G itself.
        # The clean gradient in .grad may have been unscaled already (Trainer's grad norm), so the
        # clean pass is run again by the closure: zero the gradients first.
        opt.zero_grad(set_to_none=True)
        loss = opt.step(closure, scaler=scaler)
        scaler.update()
        outer._opt_called = True
        outer._is_overflow = opt.last_step_skipped  # accelerator.optimizer_step_was_skipped
        return loss

    def _replay_closure(self, micro: List[Tuple[nn.Module, Any, Any]]) -> Any:
        def closure() -> torch.Tensor:
            total = None
            self._replaying = True
            try:
                for i, (model, inputs, num_items) in enumerate(micro):
                    last = i == len(micro) - 1
                    sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                    with sync:
                        # Through self, so that a subclass's training_step override (which calls super()) runs at
                        # every pass, as it did at the clean one; with _replaying set, ours forwards to Trainer's.
                        loss = self.training_step(model, inputs, num_items)
                    total = loss if total is None else total + loss
            finally:
                self._replaying = False
            return total

        return closure

    # ---- clipping: the descent gradient, not the clean one ---------------------------------

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """``Trainer`` clips the clean gradient before ``step()``; here ``max_grad_norm`` clips the
        final descent gradient instead (routed to the optimizer for each step). Returns the clean
        gradient's norm, unclipped, for the log."""
        return self._get_grad_norm(model)
