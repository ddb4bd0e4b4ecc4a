"""fastperturb: fused multi-tensor weight perturbations for SAM, ASAM, AWP and APD."""

from . import ops
from .ops import reference
from .ops.dispatch import BackendUnavailable, get_backend, set_backend, use_backend
from .optim import (
    APD,
    ASAM,
    AWP,
    GSAM,
    SAM,
    WSAM,
    FriendlySAM,
    LookSAM,
    NonFiniteDescentGradient,
    NonFiniteGradient,
    PerturbOptimizer,
    UnsupportedTrainingLoop,
    frozen_bn_stats,
)

__all__ = [
    "ops",
    "reference",
    "set_backend",
    "get_backend",
    "use_backend",
    "BackendUnavailable",
    "SAM",
    "ASAM",
    "AWP",
    "APD",
    "GSAM",
    "WSAM",
    "LookSAM",
    "FriendlySAM",
    "PerturbOptimizer",
    "frozen_bn_stats",
    "NonFiniteGradient",
    "NonFiniteDescentGradient",
    "UnsupportedTrainingLoop",
]
__version__ = "0.1.0"
