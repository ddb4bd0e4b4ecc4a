"""Training loops of other frameworks that would give a silently wrong step, caught at ``step()`` entry.

A perturbation step needs the gradient of the *whole* batch at every perturbed point, so
the closure must run every micro-batch. Two framework loops accumulate micro-batches
outside the closure and hand ``step()`` only the last one:

* Lightning's automatic optimization with ``accumulate_grad_batches > 1`` runs the earlier
  micro-batches' closures itself and passes ``optimizer.step()`` the closure of the last one;
* an Accelerate ``accelerator.accumulate()`` loop with ``gradient_accumulation_steps > 1``
  skips ``optimizer.step()`` on the micro-batches that do not sync.

Both are refused here, before any weight or gradient is touched, with the fix in the
message. Neither library is imported: they are consulted only if already loaded.
This module also words the error of ``step()`` called without a closure, and sends the
optimizer's own methods called on Lightning's ``LightningOptimizer`` or Fabric's ``_FabricOptimizer`` to the
optimizer, with the precision plugin's GradScaler (:func:`on_the_optimizer`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gc
import sys
import weakref
from typing import Any, Iterator, Optional

import torch

__all__ = [
    "on_the_optimizer",
    "on_the_optimizer_step",
    "plugin_scaler",
    "update_scaler",
    "after_proxy_step",
    "UnsupportedTrainingLoop",
    "TrainingStepSkipped",
    "check_step",
    "accumulation_in_closure",
    "no_closure_message",
    "skips_on_none",
]


def on_the_optimizer(method: Any, completes_step: bool = False, takes_scaler: bool = False) -> Any:
    """Run ``method`` on the optimizer itself when it is called on a proxy whose class subclasses the optimizer's.

    Lightning's ``LightningOptimizer`` (what ``self.optimizers()`` returns under manual optimization) and Fabric's
    ``_FabricOptimizer`` (what ``fabric.setup`` returns) are such proxies: they override ``step`` and forward the
    attributes they lack to the optimizer, so ``first_step()``, ``second_step()``, ``zero_grad()`` and the rest ran
    with the proxy as ``self``, and every attribute they set (the pending first step, the skip counts, the
    gradients seen, ``_opt_called`` that LR schedulers read) stayed on the proxy: the optimizer's own ``step()``,
    ``state_dict()`` and the schedulers never saw them.
    ``completes_step``: the method ends an optimizer step (``second_step``), so the proxy's own step hooks run
    around it as around its ``step()``; Lightning counts ``global_step`` in them (without them ``max_steps`` and
    step-based checkpoints never came).
    ``takes_scaler``: the method takes ``scaler`` (``first_step``, ``second_step``). The proxy's ``step()`` hands
    the gradients to its precision plugin, which unscales them through its GradScaler (16-mixed) and updates it;
    these methods bypass the plugin, so when neither they nor the pending ``first_step`` were given a scaler they
    take the plugin's, and the ``second_step`` of a step that took it updates it, as the plugin would. Without
    that the base step took the scaled gradients, a step ``scale`` times too long (65536x at torch's default),
    silently. A scaler the caller passes is the caller's to update. During the call the optimizer knows the
    proxy (``_proxy_id``), so an ``unscale_`` the caller made on the proxy is refused like one on the optimizer;
    Fabric's callbacks' ``on_after_optimizer_step`` run after ``second_step`` as after the proxy's ``step()``.
    """

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        given_none = takes_scaler and (args[1] if len(args) >= 2 else kwargs.get("scaler")) is None
        inner = self.__dict__.get("_optimizer")
        if inner is None or inner is self or not isinstance(self, type(inner)):
            # Called on the optimizer itself: under Accelerate, whose wrapper forwards neither call, the two
            # calls are made on the inner optimizer; the wrapper seen when it was built holds the scaler.
            ref = self.__dict__.get("_accelerated") if takes_scaler else None
            wrapper = ref() if ref is not None else None
            if wrapper is None and given_none:
                ref = find_accelerate_wrapper(self)
                wrapper = ref() if ref is not None else None
            if wrapper is None:
                return method(self, *args, **kwargs)
            inner, self = self, wrapper
        plugin = None  # the plugin's scaler, when this call hands it to the method
        if given_none:
            pending = inner.__dict__.get("_pending")
            given = getattr(pending, "scaler", None)  # (second_step: the scaler first_step was given)
            if not (completes_step and given is not None):
                plugin = plugin_scaler(self)
                if plugin is not None:
                    kwargs = {**kwargs, "scaler": plugin}
            elif given is getattr(pending, "plugin_scaler", None):
                plugin = given  # first_step took the plugin's: this step updates it
        before, after = (self.__dict__.get(h) for h in ("_on_before_step", "_on_after_step"))
        if completes_step and callable(before):
            before()
        # This body, on the optimizer: not getattr(inner, name), which would run again an undecorated override of a
        # user's subclass that has already run on the proxy and reached this one through super().
        outer = inner.__dict__.get("_proxy_id")
        inner.__dict__["_proxy_id"] = id(self)
        try:
            out = method(inner, *args, **kwargs)
        finally:
            inner.__dict__["_proxy_id"] = outer
        pending = inner.__dict__.get("_pending")
        if takes_scaler and not completes_step and plugin is not None and pending is not None:
            pending.plugin_scaler = plugin  # (on the step: a restore() drops it with the step)
        if completes_step and plugin is not None:
            update_scaler(plugin)
        if completes_step:
            after_proxy_step(self, inner)
        if completes_step and callable(after):
            after()
        return out

    return call


def on_the_optimizer_step(method: Any, takes_scaler: bool = False) -> Any:
    """:func:`on_the_optimizer` for a method that ends an optimizer step."""
    return on_the_optimizer(method, completes_step=True, takes_scaler=takes_scaler)


def plugin_scaler(proxy: Any) -> Optional[torch.amp.GradScaler]:
    """The enabled GradScaler of the precision plugin behind an optimizer proxy (Lightning's strategy holds it as
    ``precision_plugin``, Fabric's as ``precision``; Accelerate's wrapper holds it itself), or None."""
    strategy = proxy.__dict__.get("_strategy")
    held = [getattr(getattr(strategy, name, None), "scaler", None) for name in ("precision_plugin", "precision")]
    for scaler in (*held, proxy.__dict__.get("scaler")):
        if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled():
            return scaler
    return None


def note_accelerate_wrapper(optimizer: Any) -> None:
    """Remember (weakly) the Accelerate ``AcceleratedOptimizer`` being built around ``optimizer``: called from the
    optimizer's ``load_state_dict``, which the wrapper's constructor calls to place the state on its device. The
    two calls (``first_step``, ``second_step``) then take its GradScaler as they take Lightning's and Fabric's."""
    note_new_accelerate_wrappers()
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return
        if frame.f_globals.get("__name__") == "accelerate.optimizer" and frame.f_code.co_name == "__init__":
            wrapper = frame.f_locals.get("self")
            if getattr(wrapper, "optimizer", None) is optimizer:
                optimizer.__dict__["_accelerated"] = weakref.ref(wrapper)
            return
        frame = frame.f_back


def note_new_accelerate_wrappers() -> None:
    """From now on every Accelerate ``AcceleratedOptimizer`` built around a fastperturb optimizer is noted on it as it
    is built, whatever its device placement (its constructor then loads no state, so :func:`note_accelerate_wrapper`
    does not see it): Accelerate's constructor is wrapped once, when its module is loaded. A wrapper built before
    that is found by :func:`find_accelerate_wrapper`."""
    kind = getattr(sys.modules.get("accelerate.optimizer"), "AcceleratedOptimizer", None)
    if not isinstance(kind, type) or getattr(kind.__init__, "_fastperturb_notes", False):
        return
    original = kind.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        inner = self.__dict__.get("optimizer")
        if hasattr(type(inner), "_accelerate_searched"):  # a fastperturb optimizer
            inner.__dict__["_accelerated"] = weakref.ref(self)

    __init__._fastperturb_notes = True  # type: ignore[attr-defined]
    kind.__init__ = __init__


def find_accelerate_wrapper(optimizer: Any) -> Optional[weakref.ref]:
    """The Accelerate wrapper around ``optimizer`` built before :func:`note_new_accelerate_wrappers` could note it
    (Accelerate imported after the optimizer was made, and the wrapper built without device placement), as a weak
    reference, noted like the others. Looked for once per optimizer, at its first ``first_step``/``second_step``
    given no scaler while no live wrapper is noted, among the objects that refer to it, and only when Accelerate's
    optimizer module is loaded: a scan of every object (0.03-0.08 s in a process of 300k). Without it the two
    calls took the scaled gradients under fp16, silently (a step 65536x too long)."""
    module = sys.modules.get("accelerate.optimizer")
    if module is None or optimizer.__dict__.get("_accelerate_searched"):
        return None
    optimizer.__dict__["_accelerate_searched"] = True
    note_new_accelerate_wrappers()  # (the wrappers built from now on)
    kind = getattr(module, "AcceleratedOptimizer", None)
    if not isinstance(kind, type):
        return None
    for ref in gc.get_referrers(optimizer):
        # The wrapper itself refers to it, or, once its __dict__ was materialised, that dict does.
        owners = [ref] if isinstance(ref, kind) else []
        if isinstance(ref, dict) and ref.get("optimizer") is optimizer and "device_placement" in ref:
            owners = [o for o in gc.get_referrers(ref) if isinstance(o, kind)]
        for wrapper in owners:
            if wrapper.__dict__.get("optimizer") is optimizer:
                optimizer.__dict__["_accelerated"] = weakref.ref(wrapper)
                return optimizer.__dict__["_accelerated"]
    return None


def update_scaler(scaler: torch.amp.GradScaler) -> None:
    """``scaler.update()`` after a step, if the scaler checked gradients for inf/NaN since its last update (it
    refuses to run otherwise): not when the step raised before its gradients were unscaled."""
    states = getattr(scaler, "_per_optimizer_states", {})
    if any(state.get("found_inf_per_device") for state in states.values()):
        scaler.update()


def after_proxy_step(proxy: Any, optimizer: Any) -> None:
    """What a framework proxy's own ``step()`` runs after the optimizer's: Fabric's callbacks'
    ``on_after_optimizer_step`` (Lightning's proxy has step hooks instead, run by :func:`on_the_optimizer`)."""
    strategy = proxy.__dict__.get("_strategy")
    for callback in proxy.__dict__.get("_callbacks", ()):
        hook = getattr(callback, "on_after_optimizer_step", None)
        if callable(hook):
            hook(strategy=strategy, optimizer=optimizer)


LIGHTNING_RECIPE = "fastperturb.integrations.lightning"
TRAINER_RECIPE = "fastperturb.integrations.transformers.PerturbTrainer"
ACCELERATE_RECIPE = "fastperturb.integrations.accelerate"
_LIGHTNING_PACKAGES = ("pytorch_lightning", "lightning.pytorch")

_accumulation_in_closure: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fastperturb_accumulation_in_closure", default=False
)


class UnsupportedTrainingLoop(RuntimeError):
    """A framework's training loop would make the step silently wrong; nothing was changed."""


class TrainingStepSkipped(Exception):
    """Lightning's ``training_step`` returned None in a pass of a step (Lightning's "skip this batch"): the
    optimizer skips the step, weights restored (raised by the closure check, caught by ``step()``)."""


def skips_on_none(closure: Any) -> bool:
    """Whether a None from ``closure`` means "skip this batch": Lightning's automatic-optimization closure, whose
    ``training_step`` may return None to skip."""
    return _lightning_trainer(closure) is not None


@contextlib.contextmanager
def accumulation_in_closure() -> Iterator[None]:
    """Declare that the closures passed to ``step()`` inside this block run every
    micro-batch themselves, so a framework's accumulation setting (Accelerate's
    ``gradient_accumulation_steps``) does not split the batch. For integrations
    that build such closures."""
    token = _accumulation_in_closure.set(True)
    try:
        yield
    finally:
        _accumulation_in_closure.reset(token)


def check_step(optimizer: Any, closure: Any) -> None:
    """Raise :class:`UnsupportedTrainingLoop` if ``step(closure)`` is driven by a loop
    that accumulates micro-batches outside the closure."""
    # accumulation_in_closure() is consulted only when a loop would be refused: reading a
    # ContextVar is a graph break under torch.compile, and the common step needs none.
    name = type(optimizer).__name__
    trainer = _lightning_trainer(closure)
    if trainer is not None:
        clip = getattr(trainer, "gradient_clip_val", None)
        algorithm = getattr(trainer, "gradient_clip_algorithm", None)
        algorithm = str(getattr(algorithm, "value", algorithm)).lower() if algorithm is not None else "norm"
        if clip and algorithm != "norm":
            raise UnsupportedTrainingLoop(
                f"{name} under Lightning with Trainer(gradient_clip_algorithm={algorithm!r}): Lightning clips every "
                "pass's gradient inside the closure, so value clipping would change g_0, the ascent direction (a "
                "silently different step). Use gradient_clip_algorithm='norm' (with "
                f"{LIGHTNING_RECIPE}.PerturbMixin it clips the final descent gradient) or the optimizer's "
                "max_grad_norm. Nothing was changed."
            )
        module = getattr(trainer, "lightning_module", None)
        mixed_in = module is not None and any(c.__name__ == "PerturbMixin" for c in type(module).__mro__)
        bypassed = (
            f"{type(module).__name__} mixes in PerturbMixin but its optimizer_step override steps the optimizer "
            "itself: call super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure) from it instead"
            if mixed_in
            else f"Mix {LIGHTNING_RECIPE}.PerturbMixin into the LightningModule"
        )
        routed = module is not None and bool(module.__dict__.get("_perturb_clip_routed"))
        exact = getattr(optimizer, "per_pass_clipping_is_exact", lambda: True)()
        if clip and not routed and not exact:
            raise UnsupportedTrainingLoop(
                f"{name} under Lightning with Trainer(gradient_clip_val={clip!r}): Lightning clips every pass's "
                f"gradient inside the closure, and {name}'s step uses the clean gradient's length or several "
                f"passes, so that is a silently different step from clipping the descent gradient. {bypassed} "
                "(it routes gradient_clip_val to the optimizer's max_grad_norm), or set gradient_clip_val=None and "
                "pass max_grad_norm to the optimizer. Nothing was changed."
            )
        n = getattr(trainer, "accumulate_grad_batches", 1)
        strategy = getattr(trainer, "strategy", None)
        if (
            n > 1
            and not getattr(strategy, "handles_gradient_accumulation", False)
            and not _accumulation_in_closure.get()
        ):
            raise UnsupportedTrainingLoop(
                f"{name} under Lightning automatic optimization with accumulate_grad_batches={n}: Lightning "
                "runs the earlier micro-batches itself and passes step() the closure of the last one only, so "
                f"the perturbed passes would see one micro-batch (a silently wrong step). {bypassed} (it replays "
                f"the whole window at every perturbed point: exact), or use manual optimization with "
                f"{LIGHTNING_RECIPE}.perturb_step and accumulate_grad_batches=1. Nothing was changed."
            )
    if not torch.compiler.is_compiling() and _called_by_grad_scaler():
        raise UnsupportedTrainingLoop(
            f"{name}.step(closure) was called by GradScaler.step(optimizer, closure) (Accelerate's "
            "AcceleratedOptimizer.step does this under fp16): the scaler unscales the gradients before the closure "
            "runs, then the closure's backward leaves the perturbed passes' gradients scaled, and the base step "
            "would use them as they are (a step the scale factor times too large, silently). Hand the scaler to the "
            "optimizer instead: opt.step(closure, scaler=scaler); scaler.update() (Accelerate: "
            f"{ACCELERATE_RECIPE}.perturb_step(accelerator, optimizer, closure)). Nothing was changed."
        )
    steps = _accelerate_accumulation_steps()
    # Accelerate's accumulation state is process-wide and outlives the Accelerator that set it:
    # refuse only a step that comes through its optimizer wrapper, the path that skips micro-batches.
    if steps > 1 and not _accumulation_in_closure.get() and _called_by_accelerate_optimizer():
        raise UnsupportedTrainingLoop(
            f"{name} in an Accelerate loop with gradient_accumulation_steps={steps}: accelerator.accumulate() "
            "skips optimizer.step() on the micro-batches that do not sync, so their data never reaches the "
            "perturbed passes (a silently wrong step). Build the Accelerator with gradient_accumulation_steps=1 "
            "and loop over the micro-batches inside the closure, all but the last under "
            "accelerator.no_sync(model) (see the README, 'Gradient accumulation'). Nothing was changed."
        )


def _lightning_trainer(closure: Any) -> Optional[Any]:
    """The Trainer behind a Lightning automatic-optimization closure, or None.

    Lightning's precision plugin passes ``functools.partial(plugin._wrap_closure, model,
    optimizer, closure)`` where ``closure`` is a ``Closure`` whose step function is a
    partial of the automatic-optimization loop's bound ``_training_step``."""
    closure_types = tuple(
        t
        for t in (
            getattr(sys.modules.get(p + ".loops.optimization.automatic"), "Closure", None) for p in _LIGHTNING_PACKAGES
        )
        if isinstance(t, type)
    )
    if not closure_types:
        return None
    todo, seen = [closure], 0
    while todo and seen < 16:
        c = todo.pop()
        seen += 1
        if isinstance(c, functools.partial):
            todo.extend(c.args)
            todo.extend(c.keywords.values())
        elif isinstance(c, closure_types):
            step_fn = getattr(c, "_step_fn", None)
            loop = getattr(getattr(step_fn, "func", step_fn), "__self__", None)
            return getattr(loop, "trainer", None)
    return None


def _accelerate_accumulation_steps() -> int:
    """Accelerate's configured accumulation steps if an Accelerator exists in this process, else 1."""
    state = sys.modules.get("accelerate.state")
    gradient_state = getattr(state, "GradientState", None)
    if gradient_state is None or gradient_state._shared_state == {}:  # never initialised: no Accelerator
        return 1
    try:
        return int(gradient_state().num_steps)
    except Exception:  # a changed Accelerate internal must not break plain training
        return 1


def _is_grad_scaler_module(name: str) -> bool:
    return name.startswith(("torch.amp.grad_scaler", "torch.cuda.amp"))


def _called_by_grad_scaler() -> bool:
    """Whether this step() was reached through an enabled ``GradScaler``'s ``step`` (its ``_maybe_opt_step`` calls
    it, through torch.optim's profiling wrapper: a few frames up)."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return False
        if _is_grad_scaler_module(frame.f_globals.get("__name__", "")):
            # a disabled scaler's step() is the optimizer's own step on unscaled gradients
            scaler = frame.f_locals.get("self")
            return not (isinstance(scaler, torch.amp.GradScaler) and not scaler.is_enabled())
        frame = frame.f_back
    return False


def _called_by_accelerate_optimizer() -> bool:
    """Whether this step() was reached through Accelerate's ``AcceleratedOptimizer.step``."""
    return any(m == "accelerate.optimizer" for m in _caller_modules())


def no_closure_message(optimizer: Any) -> str:
    """What ``step()`` without a closure should tell the user, given who called it."""
    name = type(optimizer).__name__
    callers = _caller_modules()
    msg = (
        f"{name}.step() needs a closure that computes the loss, calls backward() on it and returns it: "
        "opt.step(closure) runs the clean and perturbed passes itself"
    )
    if any(map(_is_grad_scaler_module, callers)):
        if any(m.split(".")[0] in ("pytorch_lightning", "lightning") for m in callers):
            msg += (
                ". It was called by GradScaler.step(optimizer), which passes no closure: Lightning's "
                f"precision='16-mixed' does this. Mix {LIGHTNING_RECIPE}.PerturbMixin into the LightningModule "
                "(it steps with the closure and the scaler, in automatic optimization), or use "
                "precision='bf16-mixed', which needs no scaler"
            )
        else:
            msg += (
                ". It was called by GradScaler.step(optimizer), which passes no closure: use bf16 autocast, which "
                "needs no scaler, or keep float16 and call opt.step(closure, scaler=scaler) yourself"
            )
    elif any(map(_is_dcp, callers)):
        msg += (
            ". It was called by torch.distributed.checkpoint, which steps an optimizer without state to create it "
            "(with every lr at 0, which is taken as the base optimizer's step; here some group's lr is not 0): "
            "give get_optimizer_state_dict / set_optimizer_state_dict the base optimizer (opt.base_optimizer), "
            "which shares param_groups and state with it (README, 'Distributed training')"
        )
    elif any(m.split(".")[0] in ("pytorch_lightning", "lightning") for m in callers):
        msg += f". Lightning: use {LIGHTNING_RECIPE}"
    elif any(m.split(".")[0] == "transformers" for m in callers):
        msg += f". Hugging Face Trainer: use {TRAINER_RECIPE}"
    else:
        msg += f". Hugging Face Trainer: use {TRAINER_RECIPE}; Lightning: use {LIGHTNING_RECIPE}"
    if not getattr(optimizer, "two_call", True):  # LookSAM: its reuse steps have no second pass
        msg += f" ({name} has no first_step()/second_step(): its steps between refreshes take no second pass)"
    elif getattr(getattr(optimizer, "spec", None), "steps", None) == 1:
        msg += (
            "; or the two-call convention: loss.backward(); opt.first_step(); "
            "loss_at_perturbed_point.backward(); opt.second_step()"
        )
    else:
        msg += f" ({name} here takes several ascent steps, so it has no first_step()/second_step())"
    return msg


def dcp_initialising_state(depth: int = 40) -> bool:
    """Whether torch.distributed.checkpoint's ``_init_optim_state`` made this call: it creates a fresh optimizer's
    state (to load into it) by a ``step()`` without a closure, with zero gradients and every ``lr`` at 0."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name == "_init_optim_state" and _is_dcp(frame.f_globals.get("__name__", "")):
            return True
        frame = frame.f_back
    return False


def _is_dcp(module: str) -> bool:
    return module.startswith("torch.distributed.checkpoint")


def called_by_dcp() -> bool:
    """Whether torch.distributed.checkpoint is among the callers (``get_optimizer_state_dict`` and friends)."""
    return any(map(_is_dcp, _caller_modules()))


def dcp_reads_directly() -> bool:
    """Whether the caller's caller is torch.distributed.checkpoint's own code (a property read by it): one frame
    looked at, cheap enough for an attribute read."""
    frame = sys._getframe(2)
    return frame is not None and _is_dcp(frame.f_globals.get("__name__", ""))


def _caller_modules(depth: int = 40) -> list:
    """Module names of the frames that led to the current call (innermost first)."""
    names = []
    frame = sys._getframe(1)
    while frame is not None and len(names) < depth:
        names.append(frame.f_globals.get("__name__", ""))
        frame = frame.f_back
    return names
