"""Keeping BatchNorm running statistics out of the perturbed passes."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers of ``module`` in training mode normalise with the
    batch statistics as usual but do not update ``running_mean``/``running_var`` or
    ``num_batches_tracked`` (so cumulative averaging with ``momentum=None`` is unaffected too).

    Works by clearing ``track_running_stats`` on those layers for the duration of the
    block (covers BatchNorm1d/2d/3d, their lazy forms and SyncBatchNorm); restored on exit,
    also on an exception.
    """
    changed = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True
