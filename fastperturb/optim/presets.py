"""The presets of docs/design.md §2.3: configurations of :class:`PerturbOptimizer`.

Each preset's defaults are written once, in its signature; everything else it fixes
(scope, norm, relative radius, which tensors) is in its ``PerturbSpec`` below.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ..engine import PerturbSpec, check_flag, check_radius
from .wrapper import Params, PerturbOptimizer

__all__ = ["SAM", "ASAM", "AWP", "APD", "is_weight_matrix"]


def is_weight_matrix(p: Tensor) -> bool:
    """AWP's default selection: tensors with ``dim() > 1`` (conv/linear weights, not biases
    or normalisation parameters)."""
    return p.dim() > 1


class SAM(PerturbOptimizer):
    """Sharpness-Aware Minimization (Foret et al.): one ascent step of length ``rho`` along
    the global gradient direction, ``delta = rho * g / ||g||``; descent with g(w + delta).

    ``adaptive=True`` scales the step elementwise by ``T = |w|`` (ASAM with eta = 0).
    A group may set its own ``rho``. Other keywords: see :class:`PerturbOptimizer`,
    then the base optimizer's.
    """

    radius_key = "rho"
    step_key = None

    def __init__(
        self, params: Params, base_optimizer: type, rho: float = 0.05, adaptive: bool = False, **kwargs: Any
    ) -> None:
        adaptive_eta = 0.0 if check_flag("adaptive", adaptive) else None
        spec = PerturbSpec(norm="l2", scope="global", steps=1, adaptive_eta=adaptive_eta)
        super().__init__(params, base_optimizer, spec, rho, **kwargs)


class ASAM(PerturbOptimizer):
    """Adaptive SAM (Kwon et al.): ``delta = rho * T^2 g / ||T g||`` with ``T = |w| + eta``.

    A group may set its own ``rho``. Other keywords: see :class:`PerturbOptimizer`,
    then the base optimizer's.
    """

    radius_key = "rho"
    step_key = None

    def __init__(
        self, params: Params, base_optimizer: type, rho: float = 0.5, eta: float = 0.01, **kwargs: Any
    ) -> None:
        spec = PerturbSpec(norm="l2", scope="global", steps=1, adaptive_eta=check_radius("eta", eta))
        super().__init__(params, base_optimizer, spec, rho, **kwargs)


class AWP(PerturbOptimizer):
    """Adversarial Weight Perturbation (Wu et al.): per layer, relative radius
    ``gamma * ||w_l||`` and step ``gamma * ||w_l||`` along ``g_l / ||g_l||`` (``steps``
    projected steps); descent with the gradient at the perturbed point.

    ``gamma``'s default 5e-3 is the official TRADES-AWP setting; the official PGD-AT one is 1e-2.
    With ``steps > 1`` the descent gradient is the mean of the perturbed passes' gradients
    (``descent="mean"``, the engine's average risk) or, with ``descent="last"``, the gradient at
    the end of the ascent alone, as in the paper's Algorithm 1 (no accumulator then). With one
    step the two are the same.

    By default only tensors with ``dim() > 1`` are perturbed (``perturb_filter=None``
    perturbs all); a tensor without a gradient at ``w`` (frozen) is never perturbed. A group may
    set its own ``gamma``. For AWP's warm-up epochs set ``group["perturb"] = False`` in every
    group: a step is then one plain pass. Other keywords: see :class:`PerturbOptimizer`, then the
    base optimizer's.
    """

    radius_key = "gamma"
    step_key = None
    spec_group_keys = ("steps", "descent")

    def __init__(
        self,
        params: Params,
        base_optimizer: type,
        gamma: float = 5e-3,
        steps: int = 1,
        descent: str = "mean",
        **kwargs: Any,
    ) -> None:
        spec = PerturbSpec(norm="l2", scope="layer", steps=steps, relative=True, descent=descent)
        kwargs.setdefault("perturb_filter", is_weight_matrix)
        super().__init__(params, base_optimizer, spec, gamma, **kwargs)


class APD(PerturbOptimizer):
    """Adversarial Parameter Defense (Zhang et al.): ``steps`` projected ascent steps in the
    ``norm`` ball of radius ``eps`` (per layer or global ``scope``; a multiple of the
    weights' norm if ``relative``) with step ``step_size`` (``None``: ``1.5 * eps / steps``),
    descending on the average risk over the trajectory (including the clean point if
    ``include_clean``).

    A group may set its own ``eps`` and ``step_size``. Other keywords: see
    :class:`PerturbOptimizer`, then the base optimizer's.
    """

    radius_key = "eps"
    step_key = "step_size"
    spec_group_keys = ("steps", "norm", "scope", "relative", "include_clean")

    def __init__(
        self,
        params: Params,
        base_optimizer: type,
        eps: float = 1e-3,
        steps: int = 3,
        norm: str = "l2",
        scope: str = "global",
        relative: bool = False,
        step_size: Optional[float] = None,
        include_clean: bool = True,
        **kwargs: Any,
    ) -> None:
        spec = PerturbSpec(norm=norm, scope=scope, steps=steps, relative=relative, include_clean=include_clean)
        super().__init__(params, base_optimizer, spec, eps, step_size, **kwargs)

    def default_step_size(self, radius: float) -> float:
        """PGD-style step: ``1.5 * eps / steps``."""
        return 1.5 * radius / self.spec.steps
