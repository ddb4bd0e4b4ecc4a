"""The optimizers after their tensors change under them between steps: ``module.double()`` and
``module.to(memory_format=torch.channels_last)`` (the same tensors holding other data), a routed tensor whose first
gradient comes at the perturbed point after such a change, and a tensor moved between param groups in place.

Reference: the optimizer's ``state_dict()`` taken before the change and loaded into a fresh optimizer on a copy of
the changed model (the state is then brought to the new tensors by ``load_state_dict``). Both then take the same
steps. LookSAM's stored ``||gv||^2`` is taken again from the converted gv after a change, where the loaded twin keeps
the saved value (float32 sums against float64 ones): rtol 1e-5 / atol 1e-7 covers that; everything else agrees to
float rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastperturb as fp
from fastperturb.ops import native

pytestmark = pytest.mark.skipif(native.load_error is not None, reason="fastperturb._C did not load")

PRESETS = {
    "SAM": lambda m: fp.SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "AWP2": lambda m: fp.AWP(m.parameters(), torch.optim.SGD, gamma=1e-2, steps=2, lr=0.1),
    "APD_filter": lambda m: fp.APD(
        m.parameters(), torch.optim.SGD, eps=1e-2, steps=2, lr=0.1, perturb_filter=lambda p: p.dim() > 1
    ),
    "APD_passive_group": lambda m: fp.APD(
        [{"params": list(m[0].parameters())}, {"params": list(m[-1].parameters()), "perturb": False}],
        torch.optim.SGD,
        eps=1e-2,
        steps=2,
        lr=0.1,
    ),
    "GSAM": lambda m: fp.GSAM(m.parameters(), torch.optim.SGD, rho_max=0.05, alpha=0.1, lr=0.1, freeze_bn=m),
    "WSAM": lambda m: fp.WSAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, freeze_bn=m),
    "LookSAM": lambda m: fp.LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=2, alpha=0.7, lr=0.1),
    "FriendlySAM": lambda m: fp.FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1),
}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))


def _closure(m, x, y):
    def closure():
        p = next(m.parameters())
        loss = ((m(x.to(p.dtype)) - y.to(p.dtype)) ** 2).mean()
        loss.backward()
        return loss

    return closure


def _convert(m, how):
    if how == "double":
        m.double()
    else:
        m.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("how", ["double", "channels_last"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_steps_after_a_conversion_equal_a_fresh_optimizer_given_the_state(name, how):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 2, 6, 6, generator=g), torch.randn(8, 3, generator=g)
    m = _model()
    opt = PRESETS[name](m)
    for _ in range(3):  # (LookSAM, k = 2: the last is a refresh, the next a reuse of gv)
        opt.step(_closure(m, x, y))
        opt.zero_grad()
    state = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(m)
    _convert(m, how)
    _convert(twin, how)
    twin_opt = PRESETS[name](twin)
    twin_opt.load_state_dict(state)
    for _ in range(3):
        for o, model in ((opt, m), (twin_opt, twin)):
            o.step(_closure(model, x, y))
            o.zero_grad()
    assert opt.skipped_steps == 0 == twin_opt.skipped_steps
    for p, q in zip(m.parameters(), twin.parameters()):
        assert p.dtype == q.dtype and p.stride() == q.stride()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("how", ["double", "widen"])
def test_a_routed_step_after_the_tensors_changed_reads_no_stale_handle(how):
    """The last step on every tensor cached its plan and handle; after the change a tensor first gets its gradient
    at the perturbed point, so this step's plan is another one, and G's check must not use the old handle (it
    raised, every step, naming a shape or dtype equal to the tensor's own)."""
    torch.manual_seed(0)
    a, b, extra = nn.Linear(4, 4), nn.Linear(4, 1), nn.Linear(4, 1)
    mods = nn.ModuleList([a, b, extra])
    params = list(mods.parameters())
    x = torch.randn(8, 4)
    calls = [0]

    def routed():  # `extra` only on the perturbed pass
        calls[0] += 1
        h = torch.tanh(a(x.to(a.weight.dtype)))
        out = b(h) + (extra(h) if calls[0] % 2 == 0 else 0)
        loss = (out**2).mean()
        loss.backward()
        return loss

    def dense():
        h = torch.tanh(a(x.to(a.weight.dtype)))
        loss = ((b(h) + extra(h)) ** 2).mean()
        loss.backward()
        return loss

    opt = fp.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1)
    opt.step(dense)
    if how == "double":
        mods.double()
    else:
        with torch.no_grad():
            a.weight.data = torch.cat([a.weight, torch.zeros(2, 4)])
            a.bias.data = torch.cat([a.bias, torch.zeros(2)])
            b.weight.data = torch.cat([b.weight, torch.zeros(1, 2)], 1)
            extra.weight.data = torch.cat([extra.weight, torch.zeros(1, 2)], 1)
    for _ in range(2):
        calls[0] = 0
        before = [p.detach().clone() for p in params]
        opt.step(routed)
        assert not opt.last_step_skipped
        assert any(not torch.equal(p, q) for p, q in zip(params, before))


def test_wsam_follows_a_tensor_moved_between_groups_in_place():
    """Moved from the end of group 0's list to the front of group 1's, in place: the order of the tensors and the
    lists' identities are as before, the group (and its lr in WSAM's decoupled update) is not."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randn(16, 3)

    def closure_of(model):
        def closure():
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        return closure

    ps = list(m.parameters())
    opt = fp.WSAM([{"params": ps[:2], "lr": 0.1}, {"params": ps[2:], "lr": 0.001}], torch.optim.SGD)
    opt.step(closure_of(m))
    opt.param_groups[0]["params"].pop()
    opt.param_groups[1]["params"].insert(0, ps[1])
    f = copy.deepcopy(m)
    fps = list(f.parameters())
    fresh = fp.WSAM([{"params": fps[:1], "lr": 0.1}, {"params": fps[1:], "lr": 0.001}], torch.optim.SGD)
    opt.step(closure_of(m))
    fresh.step(closure_of(f))
    for p, q in zip(m.parameters(), f.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "base, kw, how",
    [
        (torch.optim.SGD, dict(momentum=0.9), "double"),
        (torch.optim.SGD, dict(momentum=0.9), "channels_last"),
        (torch.optim.AdamW, dict(weight_decay=0.01), "channels_last"),
    ],
)
def test_the_fused_step_after_a_conversion_falls_back_like_the_unfused_one(base, kw, how):
    """The fused step's record of checked state tensors is by identity; a conversion keeps the params' objects and
    changes their dtype or strides, so the record is dropped: the next steps check the state again and fall back
    to torch (whose state keeps the old dtype or layout). Until then they raised in the fused op."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 2, 6, 6, generator=g), torch.randn(8, 3, generator=g)
    models = [_model(), _model()]
    opts = [fp.SAM(m.parameters(), base, rho=0.05, lr=0.01, fused_step=f, **kw) for m, f in zip(models, (True, False))]
    for step in range(5):
        if step == 3:
            for m in models:
                _convert(m, how)
        for o, m in zip(opts, models):
            o.step(_closure(m, x, y))
            o.zero_grad()
        assert (opts[0].fused_step_fallback is None) == (step < 3)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_conversion_between_first_step_and_second_step_restores_and_refuses():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 2, 6, 6, generator=g), torch.randn(8, 3, generator=g)
    m = _model()
    opt = fp.SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    _closure(m, x, y)()
    opt.first_step()
    w0 = [b.detach().double().clone() for b in opt._pending.cycle.backups]
    m.double()
    _closure(m, x, y)()
    with pytest.raises(RuntimeError, match="changed dtype, memory layout or storage while perturbed"):
        opt.second_step()
    for p, w in zip(m.parameters(), w0):
        assert p.dtype == torch.float64 and torch.equal(p, w)  # the weights before first_step(), converted
    opt.zero_grad()
    opt.step(_closure(m, x, y))  # and training goes on
    assert not opt.last_step_skipped
