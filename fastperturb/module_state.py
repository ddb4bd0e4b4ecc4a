"""Putting a module's buffers back after code that runs its forward (attacks, robustness measurements)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["kept_buffers"]


@contextlib.contextmanager
def kept_buffers(model: nn.Module) -> Iterator[None]:
    """Inside the block the forward may move ``model``'s buffers (BatchNorm statistics in train mode, a counter,
    an EMA); on exit, also on an exception, every buffer is the tensor it was before, holding the values it held.

    By module and name, not by tensor: a forward that rebinds a buffer (``self.calls = self.calls + 1``, an
    out-of-place EMA) leaves the module holding a new tensor, which copying into the old one would miss."""
    saved = [
        (module, name, buf, buf.detach().clone())
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buf, value in saved:
                buf.copy_(value)
                module._buffers[name] = buf
