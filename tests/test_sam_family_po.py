"""The SAM family against pytorch-optimizer 4.1.0's classes, each on its documented loop, where the two
agree (SAM_FAMILY.md §3-6): GSAM (constant and scheduled rho, alpha < 1), WSAM (decoupled and coupled),
LookSAM (``scope="layer"``, pytorch-optimizer's per-tensor form) and FriendlySAM.

Tolerance rtol 1e-5: pytorch-optimizer takes the perturbation's norm as a float32 scalar even for float64
weights, and fastperturb's lincomb_ takes float32 coefficients (both about 1e-7 relative per step).
pytorch-optimizer is a test extra: the module is skipped without it.
"""

from __future__ import annotations

import pytest
import torch

import fastperturb as fp

po = pytest.importorskip("pytorch_optimizer")

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL, ATOL = 1e-5, 1e-7
STEPS = 6
BASE = dict(lr=0.05, momentum=0.9)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)


def loss_fn(out, y):
    return ((out - y) ** 2).mean() + 0.1 * out.pow(3).mean()


def fp_run(cls, **kw):
    model = make_model()
    opt = cls(model.parameters(), torch.optim.SGD, **kw, **BASE)
    for s in range(STEPS):
        x, y = batch(s)

        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return model


def assert_same(a, b, rtol=RTOL, atol=ATOL):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


def po_backward_then_step(model, opt):
    """The loop pytorch-optimizer documents for LookSAM and FriendlySAM: the caller's backward gives g,
    ``step(closure)`` recomputes the loss at the perturbed point."""
    for s in range(STEPS):
        x, y = batch(s)

        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss_fn(model(x), y).backward()
        opt.step(closure)
        opt.zero_grad()


@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_friendlysam_matches_pytorch_optimizer(sigma):
    ref = make_model()
    opt = po.FriendlySAM(ref.parameters(), torch.optim.SGD, rho=0.05, sigma=sigma, lmbda=0.9, **BASE)
    po_backward_then_step(ref, opt)
    assert_same(fp_run(fp.FriendlySAM, rho=0.05, sigma=sigma, lmbda=0.9), ref)


def test_looksam_layer_scope_matches_pytorch_optimizer():
    ref = make_model()
    opt = po.LookSAM(ref.parameters(), torch.optim.SGD, rho=0.05, k=3, alpha=0.7, **BASE)
    po_backward_then_step(ref, opt)
    # atol 1e-6: the per-tensor rescale to alpha*||g_i|| magnifies the rounding in a short gv_i (the
    # 3-element output bias), on both sides; see test_sam_family.py.
    assert_same(fp_run(fp.LookSAM, rho=0.05, k=3, alpha=0.7, scope="layer"), ref, atol=1e-6)


@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_matches_pytorch_optimizer(decouple):
    ref = make_model()
    opt = po.WSAM(ref, ref.parameters(), torch.optim.SGD, rho=0.05, gamma=0.9, decouple=decouple, **BASE)
    for s in range(STEPS):  # WSAM's loop: step(closure) runs the closure at both points
        x, y = batch(s)

        def closure():
            opt.zero_grad()
            loss = loss_fn(ref(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    assert_same(fp_run(fp.WSAM, rho=0.05, gamma=0.9, decouple=decouple), ref)


@pytest.mark.parametrize("scheduled", [False, True])
def test_gsam_matches_pytorch_optimizer(scheduled):
    """GSAM's loop: set_closure(loss_fn, x, y); step(); lr_scheduler.step(); update_rho_t(). With a
    schedule, ProportionScheduler maps lr in [lr_min, lr_max] linearly to rho in [rho_min, rho_max],
    as fp.GSAM does from the group's lr."""
    rho_max, rho_min = (0.1, 0.02) if scheduled else (0.05, 0.05)
    ref = make_model()
    base = torch.optim.SGD(ref.parameters(), **BASE)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=STEPS, eta_min=0.005)
    rho_sched = po.ProportionScheduler(sched, max_lr=BASE["lr"], min_lr=0.005, max_value=rho_max, min_value=rho_min)
    opt = po.GSAM(ref.parameters(), base, ref, rho_sched, alpha=0.4)
    for s in range(STEPS):
        x, y = batch(s)
        opt.set_closure(loss_fn, x, y)
        opt.step()
        sched.step()
        opt.update_rho_t()

    model = make_model()
    mine = fp.GSAM(
        model.parameters(), torch.optim.SGD, rho_max=rho_max, rho_min=rho_min, alpha=0.4, lr_min=0.005, **BASE
    )
    my_sched = torch.optim.lr_scheduler.CosineAnnealingLR(mine, T_max=STEPS, eta_min=0.005)
    for s in range(STEPS):
        x, y = batch(s)

        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        mine.step(closure)
        my_sched.step()
    assert_same(model, ref)


def test_gsam_alpha_one_is_accepted_unlike_pytorch_optimizer():
    """The paper uses alpha = 1.0 (ViT-S/16); pytorch-optimizer's range check rejects it."""
    model = make_model()
    with pytest.raises(ValueError):
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(base, lambda _: 1.0)
        po.GSAM(model.parameters(), base, model, po.ProportionScheduler(sched, max_lr=0.1), alpha=1.0)
    fp.GSAM(model.parameters(), torch.optim.SGD, alpha=1.0, lr=0.1)


def test_looksam_closure_calls_compared():
    """pytorch-optimizer's step(closure) runs the closure on every step; fastperturb's only on refreshes."""
    counts = {}
    for name, make in {
        "po": lambda m: po.LookSAM(m.parameters(), torch.optim.SGD, rho=0.05, k=4, **BASE),
        "fp": lambda m: fp.LookSAM(m.parameters(), torch.optim.SGD, rho=0.05, k=4, **BASE),
    }.items():
        model = make_model()
        opt = make(model)
        calls = 0
        for s in range(8):
            x, y = batch(s)

            def closure():
                nonlocal calls
                calls += 1
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            loss_fn(model(x), y).backward()
            opt.step(closure)
            opt.zero_grad()
        counts[name] = calls
    assert counts == {"po": 8, "fp": 2}
