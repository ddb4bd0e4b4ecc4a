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


PRESETS = {
    "SAM": lambda ps: fp.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "APD": lambda ps: fp.APD(ps, torch.optim.SGD, eps=0.01, steps=2, lr=0.1),
    "AWP-2": lambda ps: fp.AWP(ps, torch.optim.SGD, gamma=0.01, steps=2, lr=0.1),
    "FriendlySAM": lambda ps: fp.FriendlySAM(ps, torch.optim.SGD, rho=0.05, lr=0.1),
    "SAM-fused-Adam": lambda ps: fp.SAM(ps, torch.optim.Adam, rho=0.05, lr=1e-2, fused_step=True),
}


class _DepthwiseAndColumn(torch.nn.Module):
    """Two parameters whose autograd gradients differ from them in the stride of a size-1 dimension only: a
    depthwise conv's (4, 1, 3, 3) weight under channels_last input (MobileNet-style on CPU: strides (9, 9, 3, 1),
    its gradient (9, 1, 3, 1)) and a (5, 1) column used transposed (strides (1, 1), its gradient (1, 5))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.dw = torch.nn.Conv2d(4, 4, 3, groups=4)
        self.col = torch.nn.Parameter(torch.randn(5, 1))

    def forward(self, x):
        return (self.dw(x).mean(dim=(2, 3)) @ torch.ones(4, 5) + self.col.t()).sin()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_gradient_whose_strides_differ_only_in_size_one_dimensions_is_stepped(preset, backend):
    """Such a gradient walks its memory in the parameter's order, so it is accepted (it was refused at every step
    with "use the same memory format", which the user cannot act on: autograd chose the layout), and the step equals
    the one from the same gradient values laid out with the parameter's own strides."""
    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    runs = []
    for relayout in (False, True):
        model = _DepthwiseAndColumn()
        opt = PRESETS[preset](model.parameters())

        def closure():
            loss = model(x).square().sum()
            grads = torch.autograd.grad(loss, list(model.parameters()))
            for p, g in zip(model.parameters(), grads):
                p.grad = torch.empty_like(p).copy_(g) if relayout else g
            return loss

        closure()
        if not relayout:
            assert model.dw.weight.grad.stride() != model.dw.weight.stride(), "the case this test is about"
            assert model.col.grad.stride() != model.col.stride()
        for p in model.parameters():
            p.grad = None
        with fp.use_backend(backend):
            for _ in range(3):
                opt.step(closure)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
