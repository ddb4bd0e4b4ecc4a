"""Drop-in ``torch.optim``-style optimizers that run weight-perturbation cycles.

``fp.SAM``, ``fp.ASAM``, ``fp.AWP`` and ``fp.APD`` are presets of
:class:`PerturbOptimizer`, which drives the engine in :mod:`fastperturb.perturb`.
"""

from .batchnorm import frozen_bn_stats
from .presets import APD, ASAM, AWP, SAM, is_weight_matrix
from .wrapper import NonFiniteDescentGradient, PerturbOptimizer

__all__ = [
    "PerturbOptimizer", "SAM", "ASAM", "AWP", "APD",
    "frozen_bn_stats", "is_weight_matrix", "NonFiniteDescentGradient",
]
