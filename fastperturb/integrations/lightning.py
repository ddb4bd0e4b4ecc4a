"""PyTorch Lightning integration.

Automatic optimization: mix :class:`PerturbMixin` into your ``LightningModule`` and return a
fastperturb optimizer from ``configure_optimizers`` (with or without an LR scheduler dict)::

    class Net(PerturbMixin, pl.LightningModule):
        def configure_optimizers(self):
            opt = fp.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": StepLR(opt, 10), "interval": "step"}}

The mixin

* routes ``Trainer(gradient_clip_val=...)`` (norm clipping) to the optimizer's
  ``max_grad_norm``, so the *final descent gradient* is clipped once per step rather than
  each pass's gradient inside Lightning's closure (see :func:`clip_setting`);
* makes ``precision="16-mixed"`` with a ``GradScaler`` work: Lightning's ``MixedPrecision``
  plugin would run the closure once and call ``scaler.step(optimizer)`` without it, so the
  mixin hands the closure and the scaler to the fastperturb optimizer instead;
* sets :attr:`PerturbMixin.perturb_pass` (0 at the clean weights, k at the k-th perturbed
  point) while ``training_step`` runs inside a step, e.g. to log only the clean loss;
* makes ``accumulate_grad_batches > 1`` exact: Lightning runs the earlier micro-batches of a
  window at the clean weights only, so the mixin remembers them (``on_train_batch_start``:
  an override must call ``super()``) and replays them all at every perturbed point. Without
  the mixin fastperturb refuses that loop.

Manual optimization: :func:`perturb_step` runs given micro-batches at every point (clean and
perturbed)::

    class Net(PerturbMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            micro = list(zip(batch[0].chunk(4), batch[1].chunk(4)))
            return perturb_step(self, self.optimizers(), micro, lambda mb: F.cross_entropy(self(mb[0]), mb[1]))
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..optim.frameworks import accumulation_in_closure
from ..optim.wrapper import PerturbOptimizer
from . import routed_max_grad_norm, unwrap_optimizer

try:
    import pytorch_lightning as pl
    from pytorch_lightning.core.optimizer import LightningOptimizer
except ImportError:  # the unified package
    import lightning.pytorch as pl  # type: ignore[no-redef]
    from lightning.pytorch.core.optimizer import LightningOptimizer  # type: ignore[no-redef]

__all__ = ["PerturbMixin", "PerturbLightningModule", "perturb_step", "clip_setting"]


def grad_scaler(trainer: "pl.Trainer") -> Optional[torch.amp.GradScaler]:
    """The enabled ``GradScaler`` of the trainer's precision plugin (``16-mixed`` with a scaler), or None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled():
        return scaler
    return None


def clip_setting(trainer: "pl.Trainer", optimizer: PerturbOptimizer) -> Optional[float]:
    """The norm ``Trainer(gradient_clip_val=c)`` asks for (None if unset), routed to the
    fastperturb optimizer's ``max_grad_norm`` for each step (:func:`routed_max_grad_norm`).

    Why: Lightning clips inside its closure, after each backward, i.e. once per pass. For the
    single-step presets (SAM, ASAM, AWP with ``steps=1``) and AWP with ``descent="last"`` that
    happens to give the same update (the ascent direction does not depend on the gradient's
    scale, and the descent gradient is the last pass's); for APD and multi-step AWP's default,
    which average several passes, it would clip each pass's gradient instead of their average.
    Clipping the final descent gradient is the definition that holds for every preset. Value
    clipping (``gradient_clip_algorithm="value"``) changes the ascent direction and has no such
    definition: it raises.
    """
    return _norm_clip(trainer.gradient_clip_val, trainer.gradient_clip_algorithm, optimizer, "Trainer")


def _norm_clip(value: Any, algorithm: Any, optimizer: PerturbOptimizer, where: str) -> Optional[float]:
    """A Lightning clipping request (``value``, ``algorithm``) as the norm to clip the descent gradient to (None:
    no clipping); value clipping raises."""
    if not value:
        return None
    algorithm = "norm" if algorithm is None else str(getattr(algorithm, "value", algorithm)).lower()
    if algorithm != "norm":
        raise ValueError(
            f"{where}(gradient_clip_algorithm={algorithm!r}) is not supported with {type(optimizer).__name__}: "
            "fastperturb clips the final descent gradient by its L2 norm; use gradient_clip_algorithm='norm' "
            "(or the optimizer's max_grad_norm)"
        )
    return float(value)


class PerturbMixin:
    """Hooks that make a ``LightningModule`` train right with a fastperturb optimizer.

    Put it before ``LightningModule`` in the bases: ``class Net(PerturbMixin, pl.LightningModule)``.
    Modules whose optimizer is not a fastperturb optimizer behave exactly as without it.
    """

    #: index of the pass being run by the current optimizer step (0: clean weights,
    #: k >= 1: k-th perturbed point), None outside a step.
    perturb_pass: Optional[int] = None

    def _counting(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        # A partial (not a nested function) keeps Lightning's Closure visible to fastperturb's
        # check of the training loop.
        return functools.partial(_counted_call, self, [0], closure)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Optional[int]:
        # With accumulate_grad_batches > 1 the optimizer step replays the window's earlier
        # micro-batches at every perturbed point: remember them (override: call super()).
        n = self.trainer.accumulate_grad_batches  # type: ignore[attr-defined]
        if n > 1 and self.automatic_optimization:  # type: ignore[attr-defined]
            window = self.__dict__.setdefault("_perturb_window", [])
            if batch_idx % n == 0:
                window.clear()
            window.append((batch, batch_idx))
        return super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Optional[Callable[[], Any]] = None
    ) -> None:
        opt = unwrap_optimizer(optimizer)
        if not isinstance(opt, PerturbOptimizer):
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)  # type: ignore[misc]
        window = self.__dict__.pop("_perturb_window", [])
        trainer = self.trainer  # type: ignore[attr-defined]
        accumulating = trainer.accumulate_grad_batches > 1 and optimizer_closure is not None
        if accumulating:
            n = trainer.accumulate_grad_batches
            if not window or window[-1][1] != batch_idx or window[0][1] % n != 0:
                raise RuntimeError(
                    "PerturbMixin did not see this step's micro-batches (accumulate_grad_batches="
                    f"{n}): an on_train_batch_start override must call super().on_train_batch_start(batch, "
                    "batch_idx); the weights were not changed"
                )
            # Lightning has run backward on the window's earlier micro-batches at the clean
            # weights; the last one's closure completes g_0, then every perturbed pass replays
            # them all (fastperturb takes the gradient in .grad as g_0).
            self.perturb_pass = 0
        else:
            closure = self._counting(optimizer_closure) if optimizer_closure is not None else None
        scaler = grad_scaler(trainer)
        self.__dict__["_perturb_clip_routed"] = True
        try:
            with contextlib.ExitStack() as stack:
                if accumulating:
                    stack.enter_context(accumulation_in_closure())
                setting = clip_setting(trainer, opt)
                # A configure_gradient_clipping override decides per step whether to clip (Lightning documents
                # calling self.clip_gradients from it, as its default does): its clip_gradients calls set this
                # step's clipping.
                if type(self).configure_gradient_clipping is not pl.LightningModule.configure_gradient_clipping:
                    setting = None
                stack.enter_context(routed_max_grad_norm(opt, setting, "Trainer(gradient_clip_val)"))
                if accumulating:
                    # The pass Lightning's plugin would run inside optimizer.step, with its hooks after it (the
                    # clipping hook decides this step's clipping; LookSAM's reuse steps run no other pass).
                    optimizer_closure()
                    _after_pass(self, opt, scaler)
                    closure = functools.partial(_replay_window, self, optimizer, window[:-1], optimizer_closure, [1])
                if scaler is None or closure is None:
                    optimizer.step(closure=closure)
                else:
                    # Lightning's GradScaler path runs its hooks after the one closure call it makes; here the
                    # optimizer calls the closure, so the clipping hook runs after each pass instead.
                    _scaled_step(opt, functools.partial(_then_after_pass, self, opt, scaler, closure), scaler)
        finally:
            self.perturb_pass = None
            self.__dict__.pop("_perturb_clip_routed", None)

    def clip_gradients(
        self, optimizer: Any, gradient_clip_val: Optional[float] = None, gradient_clip_algorithm: Optional[str] = None
    ) -> None:
        # Lightning calls configure_gradient_clipping after every pass's backward, and it (Lightning's own, or an
        # override as Lightning documents) calls this. Inside this mixin's optimizer_step the clipping it asks for
        # is this step's, of the final descent gradient (the optimizer's max_grad_norm until the step ends), not of
        # each pass's gradient. An optimizer_step override that steps the optimizer itself bypasses the mixin:
        # then Lightning clips each pass, as without the mixin (the same update for single-step presets).
        opt = unwrap_optimizer(optimizer)
        if not (isinstance(opt, PerturbOptimizer) and self.__dict__.get("_perturb_clip_routed")):
            super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)  # type: ignore[misc]
            return
        trainer = self.trainer  # type: ignore[attr-defined]
        value = _norm_clip(
            trainer.gradient_clip_val if gradient_clip_val is None else gradient_clip_val,
            trainer.gradient_clip_algorithm if gradient_clip_algorithm is None else gradient_clip_algorithm,
            opt,
            "clip_gradients",
        )
        if value is None:
            return
        if opt.max_grad_norm is not None and opt.max_grad_norm != value:
            raise ValueError(
                f"clip_gradients(gradient_clip_val={value!r}) and {type(opt).__name__}(max_grad_norm="
                f"{opt.max_grad_norm!r}) disagree; set only one of them"
            )
        opt.max_grad_norm = value  # (routed_max_grad_norm puts the optimizer's own back after the step)


def _after_pass(module: PerturbMixin, optimizer: PerturbOptimizer, scaler: Optional[torch.amp.GradScaler]) -> None:
    """Lightning's hooks after a pass's backward, as its precision plugin runs them after the closure:
    ``on_before_optimizer_step`` and ``configure_gradient_clipping``. With a GradScaler only the clipping hook
    (which sets this step's max_grad_norm): the gradients are still scaled, and Lightning shows that hook
    unscaled gradients."""
    plugin = module.trainer.precision_plugin  # type: ignore[attr-defined]
    trainer = module.trainer  # type: ignore[attr-defined]
    if scaler is None:
        plugin._after_closure(module, optimizer)
    else:
        plugin._clip_gradients(module, optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)


def _then_after_pass(
    module: PerturbMixin, optimizer: PerturbOptimizer, scaler: torch.amp.GradScaler, closure: Callable[[], Any]
) -> Any:
    out = closure()
    _after_pass(module, optimizer, scaler)
    return out


def _counted_call(module: PerturbMixin, count: list, closure: Callable[[], Any]) -> Any:
    module.perturb_pass = count[0]
    count[0] += 1
    return closure()


def _replay_window(
    module: PerturbMixin, optimizer: Any, earlier: list, last_closure: Callable[[], Any], count: list
) -> Any:
    """One perturbed pass over an accumulation window: the earlier micro-batches through the
    strategy (its precision context, DDP forward, loss scaling; gradient sync blocked), each
    loss divided by ``accumulate_grad_batches`` as Lightning does, then the last micro-batch
    through Lightning's own closure."""
    module.perturb_pass = count[0]
    count[0] += 1
    trainer = module.trainer  # type: ignore[attr-defined]
    n = trainer.accumulate_grad_batches
    raw = unwrap_optimizer(optimizer)
    for batch, idx in earlier:
        sync = (
            optimizer.toggle_model(sync_grad=False)
            if isinstance(optimizer, LightningOptimizer)
            else contextlib.nullcontext()
        )
        with sync:
            previous, module._current_fx_name = module._current_fx_name, "training_step"  # type: ignore[attr-defined]
            try:
                out = trainer.strategy.training_step(batch, idx)
            finally:
                module._current_fx_name = previous  # type: ignore[attr-defined]
            loss = out.get("loss") if isinstance(out, dict) else out
            if loss is None:
                raise RuntimeError("training_step returned no loss for a micro-batch replayed at a perturbed point")
            trainer.strategy.backward(loss / n, raw)
    return last_closure()


class PerturbLightningModule(PerturbMixin, pl.LightningModule):
    """A ``LightningModule`` with :class:`PerturbMixin`'s hooks: subclass it instead of ``LightningModule``."""


def _scaled_step(opt: PerturbOptimizer, closure: Callable[[], Any], scaler: torch.amp.GradScaler) -> Any:
    # Lightning's MixedPrecision plugin scales the loss in backward (pre_backward) but would call
    # scaler.step(optimizer) without the closure; fastperturb unscales, checks and steps itself.
    skipped = opt.skipped_steps
    loss = opt.step(closure, scaler=scaler)
    if not (opt.last_step_skipped and opt.skipped_steps == skipped):  # (a training_step that returned None
        scaler.update()  # skipped the batch before any gradient was checked: nothing for the scaler to update)
    return loss


def perturb_step(
    module: "pl.LightningModule", optimizer: Any, micro_batches: Sequence[Any], loss_fn: Callable[[Any], Tensor]
) -> Tensor:
    """One fastperturb step under manual optimization, with gradient accumulation done exactly.

    Every pass (the clean one and each perturbed one) runs ``loss_fn(mb)`` on every micro-batch
    and back-propagates ``loss / len(micro_batches)`` through ``module.manual_backward`` (so the
    precision plugin's scaling applies), with the DDP gradient sync blocked on all but the last
    micro-batch. For equal-size micro-batches whose ``loss_fn`` returns a mean, the step equals
    one step on the whole batch. Works with ``16-mixed`` + ``GradScaler`` (the scaler is passed to
    the optimizer and updated). Returns the mean loss over the micro-batches at the clean weights.

    Call it from ``training_step`` with ``self.optimizers()``; Lightning's ``gradient_clip_val`` is
    not available under manual optimization: give the optimizer ``max_grad_norm`` instead.
    """
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, PerturbOptimizer):
        raise TypeError(f"perturb_step needs a fastperturb optimizer, got {type(opt).__name__}")
    micro_batches = list(micro_batches)
    n = len(micro_batches)
    if n == 0:
        raise ValueError("perturb_step needs at least one micro-batch")
    lightning_opt = optimizer if isinstance(optimizer, LightningOptimizer) else None

    def closure() -> Tensor:
        total = None
        for i, mb in enumerate(micro_batches):
            last = i == n - 1
            blocked = not last and lightning_opt is not None
            sync = lightning_opt.toggle_model(sync_grad=False) if blocked else contextlib.nullcontext()
            with sync:
                loss = loss_fn(mb) / n
                module.manual_backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        return total

    counted = module._counting(closure) if isinstance(module, PerturbMixin) else closure
    scaler = grad_scaler(module.trainer)
    try:
        if scaler is not None:
            return _scaled_step(opt, counted, scaler)
        return (lightning_opt or opt).step(closure=counted)
    finally:
        if isinstance(module, PerturbMixin):
            module.perturb_pass = None
