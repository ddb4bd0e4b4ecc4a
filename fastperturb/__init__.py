"""fastperturb: fused multi-tensor weight perturbations for SAM, ASAM, AWP and APD."""

from . import ops, reference
from .backends import BackendUnavailable, get_backend, set_backend, use_backend

__all__ = ["ops", "reference", "set_backend", "get_backend", "use_backend", "BackendUnavailable"]
__version__ = "0.1.0"
