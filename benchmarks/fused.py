"""fastperturb's side of the comparison: the presets as engine configurations.

``PRESETS`` holds the hyper-parameters every implementation in a comparison
uses, so all of them compute the same perturbation. :class:`FusedCycle` runs
one perturb-restore cycle with the engine (:class:`fastperturb.engine.Cycle`)
on a chosen backend, exactly the op sequence the optimizer wrappers issue.
:class:`EngineStep` is a full optimizer step built directly on the engine; the
step suite uses the real wrappers (``fastperturb.SAM`` ...) when they are
importable and this otherwise (it is labelled ``fastperturb-engine``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from fastperturb.engine import Cycle, PerturbSpec, run_cycle
from fastperturb.ops import TensorLists
from fastperturb.ops import dispatch as backends
from fastperturb.optim.buffers import buffers_like


@dataclass(frozen=True)
class Preset:
    name: str
    spec: PerturbSpec
    radius: float
    step_size: float
    weights_only: bool  # perturb only tensors with dim > 1 (AWP)
    kwargs: dict  # for fastperturb.<NAME>(params, base, **kwargs)


def presets(apd_steps: int = 3) -> dict[str, Preset]:
    eps = 1e-3
    return {
        "SAM": Preset("SAM", PerturbSpec(norm="l2", scope="global", steps=1), 0.05, 0.05, False, {"rho": 0.05}),
        "ASAM": Preset(
            "ASAM",
            PerturbSpec(norm="l2", scope="global", steps=1, adaptive_eta=0.01),
            0.5,
            0.5,
            False,
            {"rho": 0.5, "eta": 0.01},
        ),
        "AWP": Preset(
            "AWP",
            PerturbSpec(norm="l2", scope="layer", steps=1, relative=True),
            5e-3,
            5e-3,
            True,
            {"gamma": 5e-3, "steps": 1},
        ),
        "APD": Preset(
            "APD",
            PerturbSpec(norm="l2", scope="global", steps=apd_steps, include_clean=True),
            eps,
            1.5 * eps / apd_steps,
            False,
            {"eps": eps, "steps": apd_steps, "norm": "l2", "scope": "global", "include_clean": True},
        ),
    }


def select(preset: Preset, params: Sequence[Tensor]) -> list[Tensor]:
    return [p for p in params if p.dim() > 1] if preset.weights_only else list(params)


# Byte models: the minimum number of passes over the perturbed tensors' bytes
# (one pass = reading or writing every element of one parameter-shaped list).
#   SAM / ASAM cycle: grad_stats_ reads g (1); ascent_step_(first) reads w, g and
#     writes backup, w (4); restore_ reads backup, writes w (2): 7 passes.
#     (ASAM's stats also read w: 8.)
#   AWP cycle (relative, per layer): norms(w) reads w (1), grad_stats_ reads g (1),
#     ascent 4, restore 2: 8 passes.
#   APD-K cycle (global l2, clean term included): stats + accum init reads g, writes
#     accum (2); first ascent (4); then per extra step: stats with delta + accum
#     reads g, w, backup, accum, writes accum (5) and a projected ascent reads w,
#     backup, g, writes w (4); combine_grads_ reads accum, g, writes g (3);
#     restore (2): 11 + 9 (K - 1) passes.
def cycle_passes(preset: Preset) -> int:
    if preset.name == "SAM":
        return 7
    if preset.name == "ASAM":
        return 8
    if preset.name == "AWP":
        return 8
    if preset.name == "APD":
        return 11 + 9 * (preset.spec.steps - 1)
    raise ValueError(preset.name)


@contextlib.contextmanager
def _backend(name: Optional[str]):
    if name is None:
        yield
    else:
        with backends.use_backend(name):
            yield


class FusedCycle:
    """One perturb-restore cycle with the engine, on ``backend`` (None = the current choice).

    ``run(closure)`` takes the gradient already in ``.grad`` as g_0; ``closure``
    (if given) runs at each perturbed point. Without a closure the gradients are
    not zeroed between passes (the cycle suite's byte model has no zeroing).
    """

    def __init__(self, preset: Preset, params: Sequence[Tensor], backend: Optional[str] = None):
        self.preset = preset
        self.params = list(params)
        self.backend = backend
        # Allocated as the optimizer wrappers allocate them (one block per dtype and device).
        self.backups = buffers_like(self.params)
        self.accum = buffers_like(self.params) if preset.spec.accumulates else []
        n = len(self.params)
        dev = self.params[0].device if n else torch.device("cpu")
        self.radius = torch.full((n,), preset.radius, dtype=torch.float64, device=dev)
        self.step_size = torch.full((n,), preset.step_size, dtype=torch.float64, device=dev)
        # The handle the optimizer wrappers keep per parameter list (one per wrapper, reused every step).
        self.lists = TensorLists(self.params, self.backups, self.accum) if n else None

    def cycle(self) -> Cycle:
        if self.lists is None:
            return Cycle(self.preset.spec, self.params, self.backups, self.radius, self.step_size, self.accum)
        # As the optimizer wrappers do: the handle's own lists, so the cycle sees at once that they are its tensors.
        h = self.lists
        return Cycle(self.preset.spec, h.params, h.backups, self.radius, self.step_size, h.accum, lists=h)

    def run(self, closure: Optional[Callable[[], object]] = None) -> None:
        with _backend(self.backend), torch.no_grad():
            c = self.cycle()
            if closure is not None:
                run_cycle(c, closure)
                return
            # With a handle the cycle reads each .grad itself (as in the wrappers); without one it takes the list.
            grads = () if c.lists is not None else [p.grad for p in self.params]
            try:
                c.start(grads)
                for _ in range(self.preset.spec.steps):
                    c.ascend(grads, zero_grads=False)
                    c.observe(grads)
                c.finish(grads)
            finally:
                c.restore()


class EngineStep:
    """A full optimizer step on the engine: g_0 from the closure, the cycle, then the base step."""

    closure_calls_self = True  # calls the closure K+1 times itself

    def __init__(
        self, params: Sequence[Tensor], base: torch.optim.Optimizer, preset: Preset, backend: Optional[str] = None
    ):
        self.params = list(params)
        self.base = base
        self.fused = FusedCycle(preset, select(preset, self.params), backend)

    def step(self, closure: Callable[[], object]):
        with torch.no_grad():  # the closure accumulates: zero the gradients (kept allocated) first
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)
        with torch.enable_grad():
            loss = closure()
        with torch.no_grad():
            with _backend(self.fused.backend):
                run_cycle(self.fused.cycle(), closure)
            self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)


def wrapper_class(name: str):
    """``fastperturb.<name>`` if the optimizer wrappers are importable, else None."""
    try:
        import fastperturb

        cls = getattr(fastperturb, name, None)
        if cls is None:
            import importlib

            mod = importlib.import_module("fastperturb.optim")
            cls = getattr(mod, name, None)
        return cls
    except Exception:
        return None
