"""Lightning Fabric loops: the closure step under 16-mixed precision.

``fabric.setup(model, optimizer)`` returns a proxy whose ``step(closure)`` hands the step to Fabric's precision
plugin. With a GradScaler (``precision="16-mixed"``) the plugin calls ``scaler.step(optimizer, closure=closure)``,
which torch refuses ("Closure use is not currently supported if GradScaler is enabled"). :func:`perturb_step`
takes that step::

    from fastperturb.integrations.fabric import perturb_step

    model, opt = fabric.setup(model, fp.SAM(model.parameters(), torch.optim.SGD, lr=0.1))
    for x, y in loader:

        def closure():
            loss = F.cross_entropy(model(x), y)
            fabric.backward(loss)
            return loss

        loss = perturb_step(opt, closure)

Under the other precisions it is the proxy's own ``step(closure)``. ``first_step()`` / ``second_step()`` called on
the proxy need no helper: they take the plugin's scaler themselves, and ``second_step()`` updates it
(``fastperturb.optim.frameworks.on_the_optimizer``).
"""

from __future__ import annotations

from typing import Any, Callable

from ..optim.frameworks import after_proxy_step, plugin_scaler, update_scaler
from ..optim.wrapper import PerturbOptimizer
from . import unwrap_optimizer

__all__ = ["perturb_step"]


def perturb_step(optimizer: Any, closure: Callable[[], Any]) -> Any:
    """``optimizer.step(closure)`` for a fastperturb optimizer set up by Fabric (the proxy ``fabric.setup``
    returned), under any precision.

    With the plugin's GradScaler enabled (16-mixed) the closure and the scaler go to the fastperturb optimizer,
    which unscales the descent gradient, checks it, clips and steps (an overflow skips the step); the scaler is
    then updated and the callbacks' ``on_after_optimizer_step`` run, as after the proxy's ``step()``. Otherwise
    this is the proxy's ``step(closure)``. Returns what ``step()`` returns (the clean loss, or None if the caller
    computed the clean gradient)."""
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, PerturbOptimizer):
        raise TypeError(f"perturb_step needs a fastperturb optimizer, got {type(opt).__name__}")
    scaler = plugin_scaler(optimizer)
    if scaler is None:
        return optimizer.step(closure)
    loss = opt.step(closure, scaler=scaler)
    update_scaler(scaler)
    after_proxy_step(optimizer, opt)
    return loss
