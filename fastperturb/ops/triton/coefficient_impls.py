"""``ascent_coefficients`` on the Triton kernel (:mod:`.coefficient_kernels`): validation, the device guard,
the two float32 outputs and one launch of one program."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import validation as V
from .coefficient_kernels import _coefficients_kernel
from .runtime import launch

#: Rows per loop iteration of the single program.
BLOCK = 256


def ascent_coefficients(
    stats: Tensor, step_size: Tensor, radius: Tensor, *, global_scope: bool, project: bool
) -> tuple[Tensor, Tensor]:
    V.check_ascent_coefficients(stats, step_size, radius)
    from .impls import _device_guard  # (impls imports this module)

    n = stats.shape[0]
    step = torch.empty(n, dtype=torch.float32, device=stats.device)
    proj = torch.empty(n, dtype=torch.float32, device=stats.device)
    if n == 0:
        return step, proj
    with _device_guard("ascent_coefficients", stats.device):
        launch(
            _coefficients_kernel,
            1,
            stats.contiguous(),
            step_size.contiguous(),
            radius.contiguous(),
            step,
            proj,
            n,
            GLOBAL=bool(global_scope),
            PROJECT=bool(project),
            BLOCK=BLOCK,
        )
    return step, proj
