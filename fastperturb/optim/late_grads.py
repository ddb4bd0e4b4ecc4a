"""Tensors whose first gradient comes at a perturbed point.

A tensor with no gradient at the clean point is outside the step's plan: it is not perturbed, and the cycle
neither accumulates nor clears its gradient. When a perturbed pass reaches it (top-k routing that changes
with the weights, a branch taken only at ``w + delta``), a multi-pass step must still hand the base optimizer
its share of ``G = sum_k c_k g_k`` with ``g_0 = 0``. Left alone, its ``.grad`` summed every perturbed pass
(3x its gradient with APD ``steps=3``). This gathers those gradients between passes, weighted, in the
gradients' own memory (a tensor's first one is scaled in place and kept; no parameter-sized buffer is made).
"""

from __future__ import annotations

from typing import Dict, Sequence

from torch import Tensor


class LateGrads:
    """``c_k g_k`` of the tensors with no clean-point gradient, gathered pass by pass."""

    def __init__(self, tensors: Sequence[Tensor], weights: Sequence[float]) -> None:
        self.tensors = list(tensors)
        self.weights = list(weights)
        self._sums: Dict[int, Tensor] = {}

    @staticmethod
    def needed(weights: Sequence[float]) -> bool:
        """Whether the plain rule (the last pass's gradient, as is) differs from ``sum_k c_k g_k`` for them: more
        than one perturbed pass, or a last weight other than 1."""
        return len(weights) > 2 or weights[-1] != 1.0

    def collect(self, k: int) -> None:
        """Before pass ``k + 1``: take pass ``k``'s gradients (weighted by ``c_k``) off the tensors."""
        c = self.weights[k]
        for p in self.tensors:
            g = p.grad
            if g is None:
                continue
            p.grad = None
            if c == 0.0:
                continue
            total = self._sums.get(id(p))
            if total is None:
                self._sums[id(p)] = g.mul_(c)
            else:
                total.add_(g, alpha=c)

    def finish(self) -> None:
        """After the last pass: ``.grad = sum_k c_k g_k`` (untouched where no pass reached the tensor)."""
        c = self.weights[-1]
        for p in self.tensors:
            g, total = p.grad, self._sums.pop(id(p), None)
            if total is None:
                if g is not None and c != 1.0:
                    g.mul_(c)
            elif g is None:
                p.grad = total
            else:
                p.grad = total.add_(g, alpha=c)
