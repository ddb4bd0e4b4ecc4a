"""Training converges with every preset: three interleaved spirals (generated here) and
the bundled UCI digits with a small BatchNorm CNN."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastperturb as fp

pytestmark = pytest.mark.usefixtures("one_thread")


def spirals(n: int = 120, classes: int = 3, seed: int = 0):
    """``classes`` interleaved noisy spiral arms in 2-D: not linearly separable."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(classes):
        t = torch.linspace(0.1, 1.0, n)
        a = 3.5 * t + 2 * math.pi * c / classes + 0.15 * torch.randn(n, generator=g)
        xs.append(torch.stack([t * torch.cos(a), t * torch.sin(a)], 1))
        ys.append(torch.full((n,), c))
    return torch.cat(xs), torch.cat(ys)


SGD = (torch.optim.SGD, dict(lr=0.3, momentum=0.9))
ADAMW = (torch.optim.AdamW, dict(lr=0.01, weight_decay=1e-4))

PRESETS = {
    "sam": lambda ps, base, kw, **o: fp.SAM(ps, base, rho=0.05, **kw, **o),
    "asam": lambda ps, base, kw, **o: fp.ASAM(ps, base, rho=0.5, eta=0.01, **kw, **o),
    "awp": lambda ps, base, kw, **o: fp.AWP(ps, base, gamma=5e-3, **kw, **o),
    "apd": lambda ps, base, kw, **o: fp.APD(ps, base, eps=0.02, steps=3, **kw, **o),
}


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_spirals_converge(preset, base, backend):
    x, y = spirals(seed=0)
    xt, yt = spirals(seed=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    base_cls, kw = SGD if base == "sgd" else ADAMW
    opt = PRESETS[preset](model.parameters(), base_cls, kw)
    assert accuracy(model, xt, yt) < 0.6

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(250):
        loss = opt.step(closure)
    assert loss.item() < 0.1 * first
    assert accuracy(model, xt, yt) > 0.95


@pytest.mark.parametrize("preset", list(PRESETS))
def test_digits_cnn_with_batchnorm_converges(preset):
    data = pytest.importorskip("fastperturb.data")
    (x, y), (xt, yt) = data.digits_split()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)
    )
    if preset == "apd":
        opt = PRESETS[preset](model.parameters(), torch.optim.AdamW, dict(lr=3e-3), freeze_bn=model)
    else:
        opt = PRESETS[preset](model.parameters(), torch.optim.SGD, dict(lr=0.05, momentum=0.9), freeze_bn=model)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(x), (64,), generator=g)

        def closure(xb=x[idx], yb=y[idx]):
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
    assert int(model[1].num_batches_tracked) == 150  # only the clean passes updated BN
    model.eval()
    assert accuracy(model, xt, yt) > 0.95
