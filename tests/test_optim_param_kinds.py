"""Parameters torch.optim steps but the perturbation cannot: refused by name before a weight moves (a complex one
at construction; a meta one at the first step), where they failed with an op's words about an internal list
after the closure had run (found by this round's precision review)."""

from __future__ import annotations

import pytest
import torch

import fastperturb as fp


@pytest.mark.parametrize("perturb", [True, False])
def test_a_complex_parameter_is_refused_at_construction_by_name(perturb):
    w = torch.nn.Parameter(torch.randn(3))
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\] is complex \(torch.complex64\)"):
        fp.APD([{"params": [w]}, {"params": [z], "perturb": perturb}], torch.optim.SGD, lr=0.1)


def test_a_meta_parameter_is_refused_by_name_before_anything_moves():
    w = torch.nn.Parameter(torch.randn(3))
    m = torch.nn.Parameter(torch.empty(2, device="meta"))
    opt = fp.SAM([w, m], torch.optim.SGD, lr=0.1)  # construction is allowed (materialised before training)
    w0 = w.detach().clone()

    def closure():
        loss = (w**2).sum()
        loss.backward()
        m.grad = torch.ones_like(m)
        return loss

    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] is on the meta device"):
        opt.step(closure)
    assert torch.equal(w.detach(), w0)


@pytest.mark.parametrize("preset", ["SAM", "APD", "AWP-2"])
def test_a_gradient_in_another_layout_is_refused_in_its_own_name(preset):
    """A contiguous gradient set by hand for a channels_last weight: every preset names ``params[0].grad`` (the
    accumulating ones named ``accum[0]``, a buffer the user never made: it was shaped like the gradient)."""
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8)
    make = {
        "SAM": lambda ps: fp.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1),
        "APD": lambda ps: fp.APD(ps, torch.optim.SGD, eps=0.01, steps=2, lr=0.1),
        "AWP-2": lambda ps: fp.AWP(ps, torch.optim.SGD, gamma=0.01, steps=2, lr=0.1),
    }[preset]
    opt = make(conv.parameters())
    w0 = conv.weight.detach().clone()

    def closure():
        loss = conv(x).square().mean()
        gw, gb = torch.autograd.grad(loss, [conv.weight, conv.bias])
        conv.weight.grad, conv.bias.grad = gw.contiguous(), gb
        return loss

    with pytest.raises(ValueError, match=r"params\[0\]\.grad has strides .* but params\[0\] has strides"):
        opt.step(closure)
    assert torch.equal(conv.weight.detach(), w0)
