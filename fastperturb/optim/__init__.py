"""Drop-in ``torch.optim``-style optimizers that run weight-perturbation cycles.

``fp.SAM``, ``fp.ASAM``, ``fp.AWP`` and ``fp.APD`` are presets of
:class:`PerturbOptimizer`, which drives the engine in :mod:`fastperturb.engine`::

    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                 freeze_bn=model, max_grad_norm=1.0)

    def closure():                     # loss + backward + return; no zero_grad needed
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)           # K+1 passes; returns the loss at the clean weights

    # or the common SAM wrappers' loop: your backward is g_0, the closure runs K times
    loss_fn(model(x), y).backward(); opt.step(closure); opt.zero_grad()

SAM convention (single-step presets)::

    loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
    loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)

AMP with float16: scale inside the closure, pass the scaler, update it afterwards::

    scaler = torch.amp.GradScaler()
    def closure():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        return loss
    opt.step(closure, scaler=scaler)   # unscales, checks inf/NaN, clips, skips or steps
    scaler.update()

bfloat16 autocast needs no scaler. Gradient accumulation: loop over micro-batches
inside the closure, calling ``backward()`` on each. Checkpoints: ``opt.state_dict()``
/ ``opt.load_state_dict()`` (base optimizer state + settings; no perturbation buffers).
"""

from .batchnorm import frozen_bn_stats
from .family import GSAM, WSAM, FriendlySAM, LookSAM
from .frameworks import UnsupportedTrainingLoop
from .presets import APD, ASAM, AWP, SAM, is_weight_matrix
from .wrapper import NonFiniteDescentGradient, NonFiniteGradient, PerturbOptimizer

__all__ = [
    "PerturbOptimizer",
    "SAM",
    "ASAM",
    "AWP",
    "APD",
    "GSAM",
    "WSAM",
    "LookSAM",
    "FriendlySAM",
    "frozen_bn_stats",
    "is_weight_matrix",
    "NonFiniteGradient",
    "NonFiniteDescentGradient",
    "UnsupportedTrainingLoop",
]
