"""A tensor whose first gradient comes at a perturbed point gets its share of G = sum_k c_k g_k (g_0 = 0).

Top-k routing that changes with the weights, or a branch taken only at w + delta, gives a tensor no gradient at
the clean point and one at the perturbed points. It is outside the step's plan, and its gradient used to add up
over the perturbed passes (APD steps=3: 3x; found by this round's optimizer-semantics review)."""

from __future__ import annotations

import pytest
import torch

import fastperturb as fp

PRESETS = {
    "APD-2-clean": (lambda ps, **kw: fp.APD(ps, torch.optim.SGD, eps=0.01, steps=2, lr=1.0, **kw), [1 / 3] * 3),
    "APD-3": (
        lambda ps, **kw: fp.APD(ps, torch.optim.SGD, eps=0.01, steps=3, include_clean=False, lr=1.0, **kw),
        [0.0] + [1 / 3] * 3,
    ),
    "APD-1-clean": (lambda ps, **kw: fp.APD(ps, torch.optim.SGD, eps=0.01, steps=1, lr=1.0, **kw), [0.5, 0.5]),
    "AWP-3": (
        lambda ps, **kw: fp.AWP(ps, torch.optim.SGD, gamma=0.01, steps=3, perturb_filter=None, lr=1.0, **kw),
        [0.0] + [1 / 3] * 3,
    ),
    "AWP-2-last": (  # Algorithm 1: the last pass's gradient alone
        lambda ps, **kw: fp.AWP(
            ps, torch.optim.SGD, gamma=0.01, steps=2, descent="last", perturb_filter=None, lr=1.0, **kw
        ),
        [0.0, 0.0, 1.0],
    ),
    "SAM": (lambda ps, **kw: fp.SAM(ps, torch.optim.SGD, rho=0.05, lr=1.0, **kw), [0.0, 1.0]),
}


def _setup():
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64, generator=gen))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64, generator=gen))
    x = torch.randn(3, dtype=torch.float64, generator=gen)
    calls = [0]

    def closure():
        k = calls[0]
        calls[0] += 1
        loss = ((w * x).sum() - 1) ** 2
        if k > 0:  # b only at the perturbed points, with a gradient that differs per pass: (k + 1) x
            loss = loss + (k + 1) * (b * x).sum()
        loss.backward()
        return loss

    return w, b, x, calls, closure


def _expected(b0, x, weights):
    g = sum(c * (k + 1) * x for k, c in enumerate(weights) if k > 0)
    return b0 - g  # SGD, lr 1


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("how", ["closure", "dropin", "zero", "fused"])
def test_a_tensor_first_reached_at_a_perturbed_point_descends_with_its_share(name, how):
    make, weights = PRESETS[name]
    w, b, x, calls, closure = _setup()
    b0 = b.detach().clone()
    opt = make([w, b], **({"fused_step": True} if how == "fused" else {}))
    if how == "zero":
        opt.grad_clearing = "zero"
    if how == "dropin":
        closure()  # the caller's own clean pass (b gets no gradient there)
    opt.step(closure)
    assert calls[0] == len(weights)  # no extra pass
    torch.testing.assert_close(b.detach(), _expected(b0, x, weights), rtol=1e-12, atol=1e-12)


def test_first_step_second_step_weights_a_late_tensor_too():
    make, weights = PRESETS["APD-1-clean"]
    w, b, x, calls, closure = _setup()
    b0 = b.detach().clone()
    opt = make([w, b])
    closure()
    opt.first_step()
    closure()
    opt.second_step()
    torch.testing.assert_close(b.detach(), _expected(b0, x, weights), rtol=1e-12, atol=1e-12)


def test_a_tensor_no_pass_reaches_is_not_stepped():
    make, _ = PRESETS["APD-3"]
    w, b, x, calls, _closure = _setup()
    c = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = make([w, b, c])

    def closure():
        loss = ((w * x).sum() - 1) ** 2
        loss.backward()
        return loss

    opt.step(closure)
    assert b.grad is None and c.grad is None
    assert torch.equal(c.detach(), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_both_clearing_modes_give_a_late_tensor_the_same_steps(name):
    """Zeroed in place, a late tensor's gradient from the step before was kept through the next clean pass (which
    does not reach it): it had g_0 = 0 and, with several ascent steps, was perturbed from the second on (APD-2 and
    APD-3 moved w differently). Now the clean pass leaves it None in both modes, and three steps are equal."""
    out = []
    for clearing in ("release", "zero"):
        make, _ = PRESETS[name]
        w, b, x, calls, closure = _setup()
        opt = make([w, b])
        opt.grad_clearing = clearing
        for _ in range(3):
            calls[0] = 0
            opt.step(closure)
        out.append([w.detach().clone(), b.detach().clone()])
    assert all(torch.equal(p, q) for p, q in zip(*out))
