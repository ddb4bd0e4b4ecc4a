"""Training-framework integrations: import the submodule of the framework you use.

* :mod:`fastperturb.integrations.lightning` -- PyTorch Lightning (``PerturbMixin``,
  ``perturb_step`` for gradient accumulation under manual optimization);
* :mod:`fastperturb.integrations.transformers` -- Hugging Face ``Trainer`` (``PerturbTrainer``);
* :mod:`fastperturb.integrations.accelerate` -- Hugging Face Accelerate custom loops
  (``micro_batch_closure``, ``perturb_step``).
* :mod:`fastperturb.integrations.fabric` -- Lightning Fabric (``perturb_step`` under 16-mixed precision).

Each submodule imports its framework; this package imports none of them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

__all__ = ["unwrap_optimizer", "routed_max_grad_norm"]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer under a framework's wrappers (Lightning's ``LightningOptimizer``, Fabric's
    ``_FabricOptimizer``, Accelerate's ``AcceleratedOptimizer``): follows ``.optimizer`` down to an object without one.

    (A ``LightningOptimizer`` is an instance of a dynamic subclass of the wrapped optimizer's
    class that forwards the attributes it lacks: ``isinstance`` is true for it, but settings
    written to it stay on it. The optimizer's own methods called on it run on the optimizer,
    ``fastperturb.optim.frameworks.on_the_optimizer``.)"""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


@contextlib.contextmanager
def routed_max_grad_norm(
    optimizer: Any, value: Optional[float], setting: str, off: str = "0 or None"
) -> Iterator[None]:
    """For the duration of one step, clip the descent gradient to ``value``, a framework's
    clipping setting (named ``setting`` in errors; None or <= 0: not set, the optimizer's own
    ``max_grad_norm`` applies; ``off``: the values of it that the framework accepts for "no
    clipping", named in the error). Both set to different values is an error. The optimizer's own
    setting is put back after, so the routed one is neither saved in checkpoints nor compared
    on resume."""
    saved = optimizer.max_grad_norm
    if value is None or float(value) <= 0:
        value = saved
    elif saved is not None and saved != float(value):
        raise ValueError(
            f"{setting}={value!r} and {type(optimizer).__name__}(max_grad_norm={saved!r}) disagree; "
            f"set only one of them ({setting}={off} disables the framework's)"
        )
    optimizer.max_grad_norm = None if value is None else float(value)
    try:
        yield
    finally:
        optimizer.max_grad_norm = saved
