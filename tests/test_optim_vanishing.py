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


# ---------------------------------------------------------------------------------------------------------------
# The SAM family: every rule is equivariant in the gradient's scale. The ascent is g/||g|| (scale-free); GSAM's
# and LookSAM's projections, LookSAM's reuse and WSAM's sharpness term are linear in it; so a loss scaled by 2^-k
# and an lr scaled by 2^k take the same steps (powers of two: the scaled gradients are exact). Before this round
# the family's sums of squares and inner products were float32 only, and the ascent overshot or vanished below
# about 1e-19 per element, GSAM's projection coefficient went to 0 and LookSAM's stored direction was dropped.

FAMILY = {
    "GSAM": lambda ps, lr: fp.GSAM(ps, torch.optim.SGD, rho_max=0.05, rho_min=0.05, alpha=0.3, lr=lr),
    "WSAM": lambda ps, lr: fp.WSAM(ps, torch.optim.SGD, rho=0.05, gamma=0.8, lr=lr),
    "WSAM-coupled": lambda ps, lr: fp.WSAM(ps, torch.optim.SGD, rho=0.05, gamma=0.8, decouple=False, lr=lr),
    "LookSAM": lambda ps, lr: fp.LookSAM(ps, torch.optim.SGD, rho=0.05, k=2, alpha=0.7, lr=lr),
    "FriendlySAM": lambda ps, lr: fp.FriendlySAM(ps, torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.6, lr=lr),
    "FriendlySAM-adaptive": lambda ps, lr: fp.FriendlySAM(
        ps, torch.optim.SGD, rho=0.5, sigma=1.0, lmbda=0.6, adaptive=True, lr=lr
    ),
}


def _family_run(name: str, log2_scale: int, steps: int = 4) -> list:
    gen = torch.Generator().manual_seed(5)
    shapes = [(16, 8), (8,), (4, 3, 3)]
    w0 = [torch.randn(s, generator=gen) for s in shapes]
    curv = [torch.rand(s, generator=gen) + 0.5 for s in shapes]
    shift = [torch.randn(s, generator=gen) for s in shapes]
    params = [torch.nn.Parameter(t.clone()) for t in w0]
    scale = 2.0**log2_scale
    opt = FAMILY[name](params, 0.05 / scale)

    def closure():  # loss = scale * sum(0.5 c (w - s)^2 + 0.05 (w - s)^4): a contraction at this lr, so rounding
        # differences (float32 sums at scale 1, float64 ones below) stay at rounding size
        loss = sum((0.5 * c * (p - s) ** 2 + 0.05 * (p - s) ** 4).sum() for p, c, s in zip(params, curv, shift))
        (loss * scale).backward()
        return loss

    for _ in range(steps):
        opt.zero_grad()
        closure()
        opt.step(closure)
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("log2_scale", [-70, -85, -100])
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_the_sam_family_takes_the_same_steps_at_any_gradient_scale(name, log2_scale):
    want = _family_run(name, 0)
    got = _family_run(name, log2_scale)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_float64_statistics_do_not_depend_on_the_thread_count():
    """The family's float64 re-read of tiny dot statistics (engine.exact_tiny_dots) sums in a fixed order:
    ``Tensor.dot`` went to BLAS, whose last bits differ at 1, 2 and 3 threads past a few ten thousand elements
    (DESIGN: bit-identical whatever the number of threads)."""
    import math

    from fastperturb.engine import exact_tiny_dots, fixed_order_sum

    g = torch.Generator().manual_seed(0)
    a = [torch.randn(n, generator=g) * 1e-21 for n in (100_003, 7, 0, 65_536)]
    b = [torch.randn(n, generator=g) * 1e-21 for n in (100_003, 7, 0, 65_536)]
    stats = torch.zeros(len(a), 3)
    old = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(exact_tiny_dots(stats, list(range(len(a))), a, b))
    finally:
        torch.set_num_threads(old)
    for r in runs[1:]:
        assert torch.equal(r, runs[0])
    for i, (x, y) in enumerate(zip(a, b)):  # and they are the sums: within a few ulps of the exact ones
        x, y = x.double(), y.double()
        want = [math.fsum((x * x).tolist()), math.fsum((x * y).tolist()), math.fsum((y * y).tolist())]
        torch.testing.assert_close(runs[0][i], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    assert fixed_order_sum(torch.zeros(0, dtype=torch.float64)).item() == 0.0
    a64, b64 = [t.double() for t in a], [t.double() for t in b]
    kept = [t.clone() for t in a64 + b64]
    exact_tiny_dots(stats, list(range(len(a))), a64, b64)  # float64 inputs: read, never written
    assert all(torch.equal(t, k) for t, k in zip(a64 + b64, kept))
