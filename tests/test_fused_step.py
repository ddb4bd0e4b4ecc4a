"""The fused restore + base step (fastperturb/optim/fused_step.py, ops restore_sgd_step_ and
restore_adam_step_) against torch.optim's own SGD, Adam and AdamW.

Tolerance: the fused ops compute each element in float32 (float64 for float64 tensors) with the
operations of torch's single-tensor implementation in the same order, so one step agrees with torch to
within a couple of ulps (torch's CPU kernels may vectorise a few operations differently); over the
few steps here we allow rtol 1e-5 / atol 1e-6 in float32 and rtol 1e-12 / atol 1e-14 in float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fastperturb as fp
from fastperturb.ops import native
from fastperturb.optim import fused_step

pytestmark = pytest.mark.skipif(native.load_error is not None, reason="fastperturb._C did not load")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}

CONFIGS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1)),
    "sgd_momentum_wd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3)),
    "sgd_dampening_maximize": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, maximize=True)),
    # non-zero, so torch keeps a buffer, but 0 in float32: the buffer is g, then (1 - dampening) g
    "sgd_momentum_below_float32": (torch.optim.SGD, dict(lr=0.1, momentum=1e-46, dampening=0.5)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adam_l2": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01, betas=(0.8, 0.99))),
    "adam_amsgrad_maximize": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, maximize=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, amsgrad=True, betas=(0.3, 0.9))),
    "adam_foreach": (torch.optim.Adam, dict(lr=1e-2, foreach=True)),
    # a group's own eps (large, so that one taken from the default would show)
    "adam_eps": (torch.optim.Adam, dict(lr=1e-2, eps=0.1)),
    "adamw_eps_amsgrad": (torch.optim.AdamW, dict(lr=1e-2, eps=1e-3, amsgrad=True, weight_decay=0.01)),
}


def _tensors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 2, 2, 2), (1,), (70_001,)]  # crosses the CPU chunk size
    ps = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    ps[2] = ps[2].contiguous(memory_format=torch.channels_last)
    return [nn.Parameter(p) for p in ps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_fused_base_step_matches_torch_after_plain_restore(config, dtype):
    """Each step: weights perturbed, the same gradient; fused (restore + step in one op) against
    a plain restore followed by torch's own step(). Four steps, so state created lazily and reused."""
    cls, kwargs = CONFIGS[config]
    ours, theirs = _tensors(dtype), _tensors(dtype)
    opt_ours, opt_theirs = cls(ours, **kwargs), cls(theirs, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        # gradients in their parameter's memory format, as autograd makes them
        grads = [torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64)) for p in ours]
        backups = []
        for p, q, gr in zip(ours, theirs, grads):
            backups.append(p.detach().clone(memory_format=torch.preserve_format))
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))  # the perturbation
            p.grad = gr.clone(memory_format=torch.preserve_format)
            q.grad = gr.clone(memory_format=torch.preserve_format)
        # the last tensor is not perturbed: it is read from itself
        with torch.no_grad():
            ours[-1].copy_(backups[-1])
        assert fused_step.why_not_fused(opt_ours) is None
        fused_step.fused_base_step(opt_ours, ours[:-1], backups[:-1])
        opt_theirs.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), **TOL[dtype])
            assert p.stride() == q.stride()
    sd_ours, sd_theirs = opt_ours.state_dict(), opt_theirs.state_dict()
    assert sd_ours["param_groups"] == sd_theirs["param_groups"]
    assert sd_ours["state"].keys() == sd_theirs["state"].keys()
    for i, st in sd_theirs["state"].items():
        assert st.keys() == sd_ours["state"][i].keys()
        for k, v in st.items():
            mine = sd_ours["state"][i][k]
            assert mine.dtype == v.dtype and mine.device == v.device and mine.shape == v.shape, k
            torch.testing.assert_close(mine, v, **TOL[dtype])


@pytest.mark.parametrize(
    "cls, kwargs",
    [(torch.optim.Adam, dict(lr=1e-2)), (torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)), (torch.optim.SGD, {})],
)
@pytest.mark.parametrize("shapes", [[(5,)], [(5,), (3,), (4, 2)]], ids=["one_tensor", "three"])
def test_tensors_of_one_group_that_start_at_different_steps(cls, kwargs, shapes):
    """A tensor without a gradient at some steps (a branch or an expert not taken) is skipped by torch: its Adam step
    count, which bias-corrects its update, lags the others'. The fused step keeps each tensor's count (one group
    holding tensors at steps 4, 3 and 2), as it does for a group of one tensor (its first step included)."""
    kwargs = dict(kwargs, momentum=0.9) if cls is torch.optim.SGD else kwargs
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ours, theirs = [nn.Parameter(t.clone()) for t in start], [nn.Parameter(t.clone()) for t in start]
    opt_ours, opt_theirs = cls(ours, **kwargs), cls(theirs, **kwargs)
    for step in range(4):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            if step < i:  # tensor i's first gradient at step i
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad, q.grad = g.clone(), g.clone()
        fused_step.fused_base_step(opt_ours, [], [])
        opt_theirs.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float64])
    if cls is not torch.optim.SGD:
        counts = [float(opt_ours.state[p]["step"]) for p in ours]
        assert counts == [float(opt_theirs.state[q]["step"]) for q in theirs] == [4.0, 3.0, 2.0][: len(ours)]


# ---------------------------------------------------------------------------
# Through fp.SAM: the whole step, fused against unfused.


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return torch.randn(32, 6, generator=g, dtype=dtype), torch.randint(0, 3, (32,), generator=g)


def _closure(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _run(opt, model, steps, x, y):
    closure = _closure(model, x, y)
    losses = []
    for _ in range(steps):
        losses.append(opt.step(closure))
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", ["sgd_nesterov", "sgd_momentum_wd", "adam_l2", "adamw", "adamw_amsgrad"])
def test_sam_fused_step_equals_unfused(config, dtype):
    cls, kwargs = CONFIGS[config]
    x, y = _data(dtype)
    m1, m2 = _model(dtype=dtype), _model(dtype=dtype)
    o1 = fp.SAM(m1.parameters(), cls, rho=0.05, fused_step=True, **kwargs)
    o2 = fp.SAM(m2.parameters(), cls, rho=0.05, **kwargs)
    l1, l2 = _run(o1, m1, 4, x, y), _run(o2, m2, 4, x, y)
    assert o1.fused_step_fallback is None
    for a, b in zip(l1, l2):
        torch.testing.assert_close(a, b, **TOL[dtype])
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, **TOL[dtype])


def test_awp_fused_with_passive_groups_and_clipping():
    """Multi-step AWP with a perturb=False group (read from itself), a parameter without gradient
    (left alone, as torch does) and max_grad_norm clipping (applied to G before the fused op)."""
    x, y = _data()
    nets = [_model(), _model()]
    for net in nets:
        torch.manual_seed(1)
        net.append(nn.Linear(3, 3))  # never reached by the loss: no gradient
    opts = []
    for fused in (True, False):
        net = nets[len(opts)]
        groups = [
            {"params": list(net[0].parameters())},
            {"params": list(net[2].parameters()), "perturb": False, "lr": 5e-3},
            {"params": list(net[3].parameters())},
        ]
        opts.append(
            fp.AWP(groups, torch.optim.AdamW, gamma=0.05, steps=2, lr=1e-2, max_grad_norm=0.05, fused_step=fused)
        )
    before = [p.detach().clone() for p in nets[0][3].parameters()]

    def closure_of(net):
        def closure():
            loss = nn.functional.cross_entropy(net[2](torch.tanh(net[0](x))), y)
            loss.backward()
            return loss

        return closure

    for _ in range(3):
        for opt, net in zip(opts, nets):
            opt.step(closure_of(net))
            opt.zero_grad()
    assert opts[0].fused_step_fallback is None
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    for p, b in zip(nets[0][3].parameters(), before):
        assert torch.equal(p, b) and p not in opts[0].state


def test_switching_fused_unfused_and_plain_torch_mid_training():
    """state_dict() is torch's: 2 fused steps, 2 unfused, then the state loaded into a plain
    torch.optim.AdamW stepping on G from an unfused SAM... equals 6 unfused steps throughout."""
    x, y = _data()
    m1, m2 = _model(), _model()
    o1 = fp.SAM(m1.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=0.1, fused_step=True)
    o2 = fp.SAM(m2.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=0.1)
    _run(o1, m1, 2, x, y)
    o1.fused_step = False
    _run(o1, m1, 2, x, y)
    _run(o2, m2, 4, x, y)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    # the checkpoint goes into a new optimizer (fused again) and into plain torch AdamW
    sd = copy.deepcopy(o1.state_dict())
    step_t = next(iter(sd["state"].values()))["step"]
    assert step_t.dtype == torch.float32 and step_t.device.type == "cpu" and float(step_t) == 4.0
    m3 = copy.deepcopy(m1)
    o3 = fp.SAM(m3.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=0.1, fused_step=True)
    o3.load_state_dict(copy.deepcopy(sd))  # (torch loads the 'step' tensors without copying them)
    _run(o3, m3, 2, x, y)
    _run(o2, m2, 2, x, y)
    for p, q in zip(m3.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    plain = torch.optim.AdamW(m1.parameters(), lr=1e-2, weight_decay=0.1)
    sd.pop("fastperturb")
    plain.load_state_dict(sd)
    closure = _closure(m1, x, y)
    closure()
    plain.step()  # a plain torch step continues from the fused path's state without complaint
    assert all(float(s["step"]) == 5.0 for s in plain.state.values())


def test_lr_scheduler_and_tensor_lr_are_read_each_step():
    x, y = _data()
    m1, m2 = _model(), _model()
    o1 = fp.SAM(m1.parameters(), torch.optim.SGD, lr=torch.tensor(0.1), momentum=0.9, fused_step=True)
    o2 = fp.SAM(m2.parameters(), torch.optim.SGD, lr=torch.tensor(0.1), momentum=0.9)
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=1, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=1, gamma=0.5)
    for _ in range(3):
        _run(o1, m1, 1, x, y)
        _run(o2, m2, 1, x, y)
        s1.step()
        s2.step()
    assert o1.fused_step_fallback is None
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])


# ---------------------------------------------------------------------------
# Safety: bad gradients, exceptions, fallbacks.


def test_nonfinite_descent_gradient_skips_before_the_fused_update():
    """A NaN in G: the step is skipped, weights bit-identical, state untouched (never created)."""
    x, y = _data()
    m = _model()
    opt = fp.SAM(m.parameters(), torch.optim.Adam, rho=0.05, lr=1e-2, fused_step=True)
    before = [p.detach().clone() for p in m.parameters()]
    calls = []

    def closure():
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        calls.append(1)
        if len(calls) == 2:  # the perturbed pass: G is NaN
            m[0].weight.grad[0, 0] = math.nan
        return loss

    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step(closure)
    assert opt.last_step_skipped and opt.fused_step_fallback is None
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p, b)
    assert len(opt.state) == 0
    with pytest.raises(fp.NonFiniteGradient):
        opt.nonfinite = "raise"
        calls.clear()
        opt.step(closure)
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p, b)


def test_exception_in_perturbed_pass_restores_exactly():
    x, y = _data()
    m = _model()
    opt = fp.SAM(m.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, fused_step=True)
    before = [p.detach().clone() for p in m.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom")
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return loss

    with pytest.raises(KeyError):
        opt.step(closure)
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p, b)


def test_exception_in_fused_step_restores_exactly(monkeypatch):
    x, y = _data()
    m = _model()
    opt = fp.SAM(m.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, fused_step=True)
    before = [p.detach().clone() for p in m.parameters()]

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(fused_step, "fused_base_step", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step(_closure(m, x, y))
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize(
    "base, kw, bad",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(lr=math.nan)),
        (torch.optim.Adam, dict(lr=1e-2), dict(betas=(1.0, 0.999))),
        (torch.optim.AdamW, dict(lr=1e-2), dict(lr=math.inf)),
    ],
)
@pytest.mark.parametrize("warm", [False, True])
def test_a_refused_group_leaves_every_groups_state_as_it_was(base, kw, bad, warm):
    """A second group's setting the fused op refuses (a NaN lr from a schedule, betas[0] = 1) is found before any
    state is created or advanced: no momentum buffer allocated and left unfilled, no Adam step count moved in the
    first group; the next step, with the setting fixed, equals that of a twin that never saw the failed call."""
    x, y = _data()
    m = _model()
    ws = list(m.parameters())
    opt = fp.SAM([{"params": ws[:2]}, {"params": ws[2:]}], base, rho=0.5, fused_step=True, **kw)
    if warm:  # state already there: the refused call must not advance it either
        _run(opt, m, 1, x, y)
    twin_m, twin = copy.deepcopy((m, opt))
    weights = [p.detach().clone() for p in ws]
    state = copy.deepcopy(opt.base_optimizer.state_dict())
    good = {k: opt.param_groups[1][k] for k in bad}
    opt.param_groups[1].update(bad)
    with pytest.raises(ValueError, match=r"param_groups\[1\].*nothing was stepped"):
        opt.step(_closure(m, x, y))
    assert all(torch.equal(p, w) for p, w in zip(ws, weights))
    after = opt.base_optimizer.state_dict()
    assert after["state"].keys() == state["state"].keys()
    for i, entry in state["state"].items():
        for k, v in entry.items():
            assert torch.equal(torch.as_tensor(after["state"][i][k]), torch.as_tensor(v)), (i, k)
    opt.param_groups[1].update(good)
    opt.zero_grad()
    _run(opt, m, 1, x, y)
    _run(twin, twin_m, 1, x, y)
    for p, q in zip(m.parameters(), twin_m.parameters()):
        assert torch.equal(p, q)


def test_unsupported_base_optimizers_and_flags_raise_at_construction():
    m = _model()
    with pytest.raises(TypeError, match="fused_step=True needs one of torch.optim.SGD"):
        fp.SAM(m.parameters(), torch.optim.RMSprop, lr=0.1, fused_step=True)
    with pytest.raises(ValueError, match="capturable=True"):
        fp.SAM(m.parameters(), torch.optim.AdamW, lr=0.1, capturable=True, fused_step=True)
    with pytest.raises(TypeError, match="True or False"):
        fp.SAM(m.parameters(), torch.optim.AdamW, lr=0.1, fused_step="yes")


def _fallback_case(setup):
    x, y = _data()
    m1, m2 = _model(), _model()
    o1 = fp.SAM(m1.parameters(), torch.optim.Adam, rho=0.05, lr=1e-2, fused_step=True)
    o2 = fp.SAM(m2.parameters(), torch.optim.Adam, rho=0.05, lr=1e-2)
    kwargs = setup(o1, o2)
    for opt, m in ((o1, m1), (o2, m2)):
        opt.step(_closure(m, x, y), **kwargs)
        opt.zero_grad()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)  # the fallback is exactly the unfused path
    return o1


def test_fallback_with_step_hooks():
    seen = []

    def setup(o1, o2):
        o1.base_optimizer.register_step_post_hook(lambda *a: seen.append(1))
        return {}

    o1 = _fallback_case(setup)
    assert "hooks" in o1.fused_step_fallback and seen == [1]


def test_fallback_with_an_enabled_grad_scaler():
    def setup(o1, o2):
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
        scaler.scale(torch.ones(()))  # the closure's scaler.scale(loss), at scale 1: the same gradients
        return {"scaler": scaler}

    o1 = _fallback_case(setup)
    assert "GradScaler" in o1.fused_step_fallback


def test_fallback_when_a_group_turns_on_a_flag():
    def setup(o1, o2):
        for o in (o1, o2):
            o.param_groups[0]["differentiable"] = True
        return {}

    o1 = _fallback_case(setup)
    assert "differentiable" in o1.fused_step_fallback


def test_ops_reject_bad_state_before_writing():
    w = [torch.ones(4)]
    b = [torch.zeros(4)]
    g = [torch.ones(4)]
    with pytest.raises(ValueError, match="momentum_buffers has 0 tensors"):
        fp.ops.restore_sgd_step_(w, b, g, [], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum_buffers must be empty"):
        fp.ops.restore_sgd_step_(w, b, g, [torch.zeros(4)], lr=0.1)
    with pytest.raises(TypeError, match="exp_avgs\\[0\\] has dtype torch.float64"):
        fp.ops.restore_adam_step_(
            w,
            b,
            g,
            [torch.zeros(4, dtype=torch.float64)],
            [torch.zeros(4)],
            lr=0.1,
            beta1=0.9,
            beta2=0.9,
            eps=1e-8,
            step=1.0,
        )
    with pytest.raises(ValueError, match="step must be a finite count >= 1"):
        fp.ops.restore_adam_step_(
            w, b, g, [torch.zeros(4)], [torch.zeros(4)], lr=0.1, beta1=0.9, beta2=0.9, eps=1e-8, step=0.0
        )
    assert torch.equal(w[0], torch.ones(4))


def test_first_step_second_step_fused_equals_unfused():
    """The two-call SAM convention is fused too (second_step restores through the fused op)."""
    x, y = _data()
    m1, m2 = _model(), _model()
    o1 = fp.SAM(m1.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, nesterov=True, fused_step=True)
    o2 = fp.SAM(m2.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, nesterov=True)
    for _ in range(3):
        for opt, m in ((o1, m1), (o2, m2)):
            nn.functional.cross_entropy(m(x), y).backward()
            opt.first_step()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.second_step()
    assert o1.fused_step_fallback is None
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])


def test_second_step_nonfinite_keeps_weights_and_state():
    x, y = _data()
    m = _model()
    opt = fp.SAM(m.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, fused_step=True, nonfinite="raise")
    nn.functional.cross_entropy(m(x), y).backward()
    opt.first_step()
    nn.functional.cross_entropy(m(x), y).backward()
    before = [p.detach().clone() for p in m.parameters()]  # perturbed: compare after the restore below
    m[0].bias.grad[0] = math.inf
    with pytest.raises(fp.NonFiniteGradient):
        opt.second_step()
    assert len(opt.state) == 0
    assert any(not torch.equal(p, b) for p, b in zip(m.parameters(), before))  # no longer perturbed
    m2 = _model()
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)  # exactly the initial weights


def test_a_base_with_torchs_fused_flag_is_fused_and_matches_it():
    """``fused=True`` on the base (the Hugging Face Trainer's default ``adamw_torch_fused``) only picks torch's kernel:
    the step is fused all the same, and agrees with SAM over torch's fused AdamW."""
    x, y = _data()
    m1, m2 = _model(), _model()
    o1 = fp.SAM(m1.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=0.1, fused=True, fused_step=True)
    o2 = fp.SAM(m2.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(3):
        for opt, m in ((o1, m1), (o2, m2)):
            opt.step(_closure(m, x, y))
            opt.zero_grad()
        assert o1.fused_step_fallback is None
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def _warm_pair(base=torch.optim.Adam, steps=2, **kw):
    """A fused and an unfused SAM on twin models, after ``steps`` identical steps."""
    x, y = _data()
    m1, m2 = _model(), _model()
    o1 = fp.SAM(m1.parameters(), base, rho=0.05, lr=1e-2, fused_step=True, **kw)
    o2 = fp.SAM(m2.parameters(), base, rho=0.05, lr=1e-2, **kw)
    for _ in range(steps):
        for opt, m in ((o1, m1), (o2, m2)):
            opt.step(_closure(m, x, y))
            opt.zero_grad()
    assert o1.fused_step_fallback is None
    return (o1, m1), (o2, m2), (x, y)


def _step_both(pairs, data):
    for opt, m in pairs:
        opt.step(_closure(m, *data))
        opt.zero_grad()


@pytest.mark.parametrize(
    "base, key",
    [(torch.optim.Adam, "exp_avg"), (torch.optim.AdamW, "max_exp_avg_sq"), (torch.optim.SGD, "momentum_buffer")],
)
def test_a_state_replaced_by_one_of_another_layout_falls_back_after_cached_steps(base, key):
    """The fused step records the state tensors it checked and skips the checks while they are the same objects;
    a state tensor replaced by one with other strides is checked again and the step falls back (the weights agree
    with the unfused twin's within the tolerance of the fused warm-up steps)."""
    kw = dict(momentum=0.9) if base is torch.optim.SGD else dict(amsgrad=key == "max_exp_avg_sq")
    (o1, m1), (o2, m2), data = _warm_pair(base, **kw)
    for opt, m in ((o1, m1), (o2, m2)):
        w = m[0].weight
        st = opt.base_optimizer.state[w]
        st[key] = st[key].t().contiguous().t()  # same values, transposed strides
    _step_both(((o1, m1), (o2, m2)), data)
    assert "does not match" in o1.fused_step_fallback
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    # Back to a fitting layout: fused again, and equal to torch within the file's tolerance.
    for opt, m in ((o1, m1), (o2, m2)):
        st = opt.base_optimizer.state[m[0].weight]
        st[key] = st[key].contiguous()
    _step_both(((o1, m1), (o2, m2)), data)
    assert o1.fused_step_fallback is None
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])


def test_a_gradient_of_another_dtype_falls_back_with_nothing_written():
    """torch accepts a float64 gradient on a float32 parameter once ``grad_dtype`` is None; the fused op takes one
    dtype, so the step falls back (its reason names the gradient) and writes nothing."""
    p = nn.Parameter(torch.randn(5))
    p.grad_dtype = None
    p.grad = torch.randn(5, dtype=torch.float64)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    before = p.detach().clone()
    reason = fused_step.fused_base_step(opt, [], [])
    assert reason is not None and "dtype" in reason and fused_step.why_not_fused(opt) == reason
    assert torch.equal(p.detach(), before) and not opt.state[p]


def test_an_lr_scheduler_on_the_base_optimizer_sees_the_fused_step():
    """The fused op replaces the base optimizer's step(), which an LR scheduler bound to the base optimizer watches:
    the scheduler's "lr_scheduler.step() before optimizer.step()" warning must not fire after a fused step."""
    import warnings

    (o1, m1), _, (x, y) = _warm_pair(steps=0)
    sched = torch.optim.lr_scheduler.StepLR(o1.base_optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o1.step(_closure(m1, x, y))
        assert o1.fused_step_fallback is None
        sched.step()
    assert o1.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_a_reset_state_is_used_by_the_next_fused_step():
    """Moments reset by assignment (as when a layer is re-initialised) are read by the next fused step."""
    (o1, m1), (o2, m2), data = _warm_pair(torch.optim.AdamW)
    for opt, m in ((o1, m1), (o2, m2)):
        for p in m.parameters():
            st = opt.base_optimizer.state[p]
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            st["step"] = torch.tensor(0.0)
    _step_both(((o1, m1), (o2, m2)), data)
    assert o1.fused_step_fallback is None
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    for p in m1.parameters():
        assert float(o1.base_optimizer.state[p]["step"]) == 1.0


def test_state_checks_are_skipped_while_the_state_is_unchanged(monkeypatch):
    calls = []
    real = fused_step._state_reason
    monkeypatch.setattr(fused_step, "_state_reason", lambda *a: calls.append(1) or real(*a))
    (o1, m1), _, data = _warm_pair(torch.optim.Adam)
    n = sum(1 for _ in m1.parameters())
    calls.clear()
    _step_both(((o1, m1),), data)
    assert calls == [] and o1.fused_step_fallback is None
    o1.base_optimizer.load_state_dict(o1.base_optimizer.state_dict())  # new state tensors: checked again
    _step_both(((o1, m1),), data)
    assert len(calls) == n and o1.fused_step_fallback is None


def test_a_descent_gradient_of_another_layout_falls_back():
    """Without a handle on every parameter (one has no gradient) G's layout is checked by the fused step itself:
    a transposed gradient in the perturbed pass makes that step fall back (before: checked on g_0 only, and the
    fused op refused G's strides with an error under perturbed weights)."""
    x, y = _data()
    models, opts = [], []
    for fused in (True, False):
        m = _model()
        unused = nn.Parameter(torch.ones(2, 2))  # its gradient stays None
        models.append(m)
        opts.append(fp.SAM([*m.parameters(), unused], torch.optim.Adam, rho=0.05, lr=1e-2, fused_step=fused))
    for step in range(3):
        for opt, m in zip(opts, models):
            calls = []

            def closure(m=m, calls=calls):
                loss = nn.functional.cross_entropy(m(x), y)
                loss.backward()
                calls.append(1)
                if step == 1 and len(calls) == 2:  # the perturbed pass's gradient, on the step in the middle
                    w = m[2].weight
                    w.grad = w.grad.t().contiguous().t()
                return loss

            opt.step(closure)
            opt.zero_grad()
        if step == 1:
            assert "memory layout" in opts[0].fused_step_fallback
        else:
            assert opts[0].fused_step_fallback is None
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])


def test_a_momentum_buffer_torch_made_from_a_size_one_strided_gradient_is_fused():
    """torch's SGD clones its first momentum buffer from the gradient, so a depthwise conv's weight under
    channels_last input (strides (9, 9, 3, 1)) gets a buffer laid out like its gradient ((9, 1, 3, 1)): the same
    memory order. Resumed into fused_step=True, that buffer was refused by the fused step's state check and every
    step fell back; now it is fused, and the steps equal the unfused run's."""
    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)

    def make(fused):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(4, 4, 3, groups=4)
        return conv, fp.SAM(conv.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, fused_step=fused)

    def closure_for(conv):
        def closure():
            loss = conv(x).square().mean()
            loss.backward()
            return loss

        return closure

    conv, opt = make(False)
    opt.step(closure_for(conv))
    buf = opt.state[conv.weight]["momentum_buffer"]
    assert buf.stride() != conv.weight.stride(), "the case this test is about"
    saved = (copy.deepcopy(conv.state_dict()), copy.deepcopy(opt.state_dict()))
    runs = []
    for fused in (False, True):
        conv2, opt2 = make(fused)
        conv2.load_state_dict(saved[0])
        opt2.load_state_dict(copy.deepcopy(saved[1]))  # (torch loads a buffer of the right dtype as it is)
        for _ in range(3):
            opt2.step(closure_for(conv2))
            if fused:
                assert opt2.fused_step_fallback is None, opt2.fused_step_fallback
        runs.append([p.detach().clone() for p in conv2.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
