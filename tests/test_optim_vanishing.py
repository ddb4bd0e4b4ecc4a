"""Vanishing gradients: the ascent step keeps its length when a gradient's float32 squares underflow.

A float32 (or bfloat16) gradient whose elements are all below about 1e-19 squares to subnormals or zeros, so its
float32 sum of squares comes out short (0 below about 1e-23): the step ``eta / ||g||`` overshot the radius (2.7x at
1e-23, found by this round's precision review) or vanished. The engine takes those sums again in float64
(``fastperturb.engine.exact_tiny_sums``). Every case is checked against the equations in float64."""

from __future__ import annotations

import pytest
import torch

import fastperturb as fp
from fastperturb.ops.dispatch import use_backend, why_unavailable

SCALES = [1.0, 1e-21, 1e-23, 1e-26, 1e-30, 1e-37]


def _preset(name: str, params):
    kw = dict(lr=0.0)
    if name == "SAM":
        return fp.SAM(params, torch.optim.SGD, rho=0.05, **kw)
    if name == "ASAM":
        return fp.ASAM(params, torch.optim.SGD, rho=0.5, eta=0.01, **kw)
    if name == "AWP":
        return fp.AWP(params, torch.optim.SGD, gamma=5e-3, **kw)
    if name == "APD-global":
        return fp.APD(params, torch.optim.SGD, eps=1e-3, steps=2, step_size=2e-3, **kw)
    return fp.APD(params, torch.optim.SGD, eps=1e-3, steps=2, step_size=2e-3, scope="layer", **kw)


def _first_delta(name: str, w0: list, g: list) -> list:
    """delta_1 from the equations, in float64 (one step from w0 with gradient g)."""
    w0 = [t.double() for t in w0]
    g = [t.double() for t in g]
    if name == "SAM":
        n = torch.sqrt(sum((t * t).sum() for t in g))
        return [0.05 * t / n for t in g]
    if name == "ASAM":
        T = [w.abs() + 0.01 for w in w0]
        n = torch.sqrt(sum(((a * t) ** 2).sum() for a, t in zip(T, g)))
        return [0.5 * a * a * t / n for a, t in zip(T, g)]
    if name == "AWP":  # per layer, dim > 1 only: gamma ||w_l|| g_l / ||g_l||
        return [5e-3 * w.norm() * t / t.norm() if w.dim() > 1 else torch.zeros_like(w) for w, t in zip(w0, g)]
    if name == "APD-global":  # eta = 2e-3 then projected to eps = 1e-3: eps g/||g||
        n = torch.sqrt(sum((t * t).sum() for t in g))
        return [1e-3 * t / n for t in g]
    return [1e-3 * t / t.norm() for t in g]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("name", ["SAM", "ASAM", "AWP", "APD-global", "APD-layer"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_ascent_step_follows_the_equations_at_any_gradient_scale(backend, name, scale, dtype):
    reason = why_unavailable(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(3)
    shapes = [(16, 8), (8,), (4, 3, 3)]
    w0 = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    # the last tensor's gradient stays ordinary-sized: a layer-scope step must scale each layer on its own
    g = [(torch.randn(s, generator=gen) * (scale if i < 2 else 1.0)).to(dtype) for i, s in enumerate(shapes)]
    params = [torch.nn.Parameter(t.clone()) for t in w0]
    seen = []

    def closure():
        seen.append([(p.detach().double() - w.double()) for p, w in zip(params, w0)])
        for p, t in zip(params, g):
            p.grad = t.clone()
        return torch.zeros(())

    with use_backend(backend):
        _preset(name, params).step(closure)
    want = _first_delta(name, w0, g)
    got = seen[1]
    for i, (a, b) in enumerate(zip(got, want)):
        # the weights are rounded to dtype: compare the step to the rounding of w0 + delta
        tol = (w0[i].double().abs() + b.abs()) * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-23) + 1e-45
        assert torch.all((a - b).abs() <= tol), (name, scale, i, (a - b).abs().max().item(), b.abs().max().item())
    for p, w in zip(params, w0):  # restored
        assert torch.equal(p.detach(), w)


def test_a_zero_gradient_is_still_no_step():
    """Taking the sums again changes nothing for a tensor whose gradient is exactly zero: no direction, no step."""
    w = torch.nn.Parameter(torch.randn(5, 4))
    opt = fp.AWP([w], torch.optim.SGD, gamma=5e-3, lr=0.0)
    w0 = w.detach().clone()
    seen = []

    def closure():
        seen.append(torch.equal(w.detach(), w0))
        w.grad = torch.zeros(5, 4)
        return torch.zeros(())

    opt.step(closure)
    assert seen == [True, True]
