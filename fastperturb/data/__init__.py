"""Small data bundled with fastperturb (see ``README.md`` in this folder for sources and licences)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["DIGITS_PATH", "load_digits", "digits_split"]

DIGITS_PATH = Path(__file__).with_name("digits.npz")


def load_digits() -> tuple[Tensor, Tensor]:
    """The UCI 8x8 handwritten digits: ``images`` float32 ``[1797, 1, 8, 8]`` in [0, 1], ``labels`` int64."""
    with np.load(DIGITS_PATH) as f:
        images = f["images"].astype(np.float32) / 16.0
        labels = f["labels"].astype(np.int64)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)


def digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A stratified train/test split of the digits: ``((x_train, y_train), (x_test, y_test))``.

    Each class contributes ``round(test_fraction * count)`` images to the test set,
    chosen by a permutation from ``seed`` (the split depends on nothing else).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = load_digits()
    g = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        test_idx.append(idx[: round(test_fraction * idx.numel())])
    test = torch.cat(test_idx).sort().values
    mask = torch.ones(y.numel(), dtype=torch.bool)
    mask[test] = False
    return (x[mask], y[mask]), (x[test], y[test])
