"""GSAM, WSAM, LookSAM and FriendlySAM against their equations written in plain PyTorch.

The direct implementation below uses no fastperturb code: it evaluates gradients at the weights
and at ``w + e`` on its own copy of the model, forms each method's descent gradient with tensor
arithmetic (global vectors as the papers define them) and hands it to its own base optimizer.
The presets must follow the same trajectory over several steps, with SGD-momentum and AdamW
bases. The fused ops take float32 coefficients, so float64 runs agree to about 1e-7 relative
(stated per assertion). Also: the worked example of SAM_FAMILY.md §8 and the passes LookSAM runs.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch

import fastperturb as fp
from fastperturb.ops.dispatch import why_unavailable

BACKENDS = [b for b in ("reference", "cpp") if why_unavailable(b, torch.device("cpu")) is None]

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01)),
}

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL, ATOL = 2e-6, 1e-7  # float32 coefficients (lincomb_) on float64 tensors; AdamW amplifies near-0 grads


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randn(16, 3, generator=g, dtype=torch.float64)
    return x, y


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def loss_of(model, step):
    x, y = batch(step)
    return ((model(x) - y) ** 2).mean() + 0.1 * model(x).pow(3).mean()


# ---- the direct implementation --------------------------------------------------------------


def grad_at(model, step, shift=None):
    """The gradient at ``w + shift`` (weights put back by copy)."""
    ps = list(model.parameters())
    saved = [p.detach().clone() for p in ps]
    with torch.no_grad():
        if shift is not None:
            for p, e in zip(ps, shift):
                p.add_(e)
    model.zero_grad()
    loss_of(model, step).backward()
    g = [p.grad.detach().clone() for p in ps]
    with torch.no_grad():
        for p, s in zip(ps, saved):
            p.copy_(s)
    return g


def dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def sam_shift(v, rho):
    n = dot(v, v).sqrt()
    return [rho * x / n for x in v]


class Direct:
    """One preset's update rule written out (global vectors unless ``layer``)."""

    def __init__(self, preset, model, base, base_kw, **hp):
        self.preset, self.model, self.hp = preset, model, hp
        self.opt = base(model.parameters(), **base_kw)
        self.t, self.gv, self.m = 0, None, None

    def step(self, step):
        hp, model = self.hp, self.model
        g = grad_at(model, step)
        post = None
        if self.preset == "gsam":
            lr = self.opt.param_groups[0]["lr"]
            lr_max, lr_min = hp["lr_max"], hp.get("lr_min", 0.0)
            rho = hp["rho_min"] + (hp["rho_max"] - hp["rho_min"]) * (lr - lr_min) / (lr_max - lr_min)
            g1 = grad_at(model, step, sam_shift(g, rho))
            c = dot(g, g1) / dot(g1, g1)
            G = [(1 + hp["alpha"] * c) * b - hp["alpha"] * a for a, b in zip(g, g1)]
        elif self.preset == "wsam":
            g1 = grad_at(model, step, sam_shift(g, hp["rho"]))
            a = hp["gamma"] / (1 - hp["gamma"])
            if hp["decouple"]:
                G = g
                post = [a * (y - x) for x, y in zip(g, g1)]
            else:
                G = [a * y + (1 - a) * x for x, y in zip(g, g1)]
        elif self.preset == "looksam":
            if self.t % hp["k"] == 0:
                g1 = grad_at(model, step, sam_shift(g, hp["rho"]))
                if hp.get("layer"):
                    self.gv = [y - ((x * y).sum() / (x * x).sum()) * x for x, y in zip(g, g1)]
                else:
                    beta = dot(g, g1) / dot(g, g)
                    self.gv = [y - beta * x for x, y in zip(g, g1)]
                G = g1
            elif hp.get("layer"):
                G = [x + hp["alpha"] * x.norm() / (v.norm() + 1e-8) * v for x, v in zip(g, self.gv)]
            else:
                f = hp["alpha"] * dot(g, g).sqrt() / dot(self.gv, self.gv).sqrt()
                G = [x + f * v for x, v in zip(g, self.gv)]
            self.t += 1
        elif self.preset == "fsam":
            if self.m is None:
                self.m, d = [x.clone() for x in g], g
            else:
                d = [x - hp["sigma"] * m for x, m in zip(g, self.m)]
                self.m = [hp["lmbda"] * m + (1 - hp["lmbda"]) * x for x, m in zip(g, self.m)]
            G = grad_at(model, step, sam_shift(d, hp["rho"]))
        for p, x in zip(model.parameters(), G):
            p.grad = x.clone()
        self.opt.step()
        if post is not None:
            with torch.no_grad():
                for p, h in zip(model.parameters(), post):
                    p.sub_(self.opt.param_groups[0]["lr"] * h)


PRESETS = {
    "gsam": (fp.GSAM, dict(rho_max=0.08, rho_min=0.02, alpha=0.4, lr_min=0.0)),
    "gsam-alpha1": (fp.GSAM, dict(rho_max=0.05, rho_min=0.05, alpha=1.0)),
    "wsam": (fp.WSAM, dict(rho=0.05, gamma=0.9, decouple=True)),
    "wsam-coupled": (fp.WSAM, dict(rho=0.05, gamma=0.8, decouple=False)),
    "looksam": (fp.LookSAM, dict(rho=0.05, k=3, alpha=0.7)),
    "looksam-layer": (fp.LookSAM, dict(rho=0.05, k=2, alpha=0.5, scope="layer")),
    "fsam": (fp.FriendlySAM, dict(rho=0.05, sigma=1.0, lmbda=0.9)),
    "fsam-sigma": (fp.FriendlySAM, dict(rho=0.05, sigma=0.5, lmbda=0.8)),
}


def direct_for(name, model, base, base_kw):
    cls, kw = PRESETS[name]
    kind = name.split("-")[0]
    hp = dict(kw)
    if kind == "gsam":
        hp.setdefault("lr_max", base_kw["lr"])
        hp.setdefault("lr_min", 0.0)
    if kind == "wsam":
        hp.setdefault("decouple", True)
    if name == "looksam-layer":
        hp["layer"] = True
    return Direct(kind, model, base, base_kw, **hp)


def fp_closure(model, step):
    def closure():
        loss = loss_of(model, step)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_follows_its_equations(name, base, backend_name):
    base_cls, base_kw = BASES[base]
    cls, kw = PRESETS[name]
    m_fp, m_ref = make_model(), make_model()
    ref = direct_for(name, m_ref, base_cls, base_kw)
    with fp.use_backend(backend_name):
        opt = cls(m_fp.parameters(), base_cls, **kw, **base_kw)
        for step in range(5):
            opt.step(fp_closure(m_fp, step))
            ref.step(step)
    # scope="layer" rescales each gv_i to alpha*||g_i||: a nearly parallel g1_i leaves a short gv_i whose
    # direction carries the float32 coefficient's rounding, magnified (the tiny output bias shows it).
    rtol, atol = (1e-5, 1e-6) if name == "looksam-layer" else (RTOL, ATOL)
    for a, b in zip(m_fp.parameters(), m_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_gsam_rho_follows_the_lr_schedule(tensor_lr):
    """rho_t = rho_min + (rho_max - rho_min)(lr_t - lr_min)/(lr_max - lr_min), read at each step; lr_max
    defaulted from the lr when built. torch's schedulers write a Tensor lr in place: lr_max is its value then,
    not the tensor (which made lr_max follow lr and kept rho_t at rho_max)."""
    base_cls, base_kw = torch.optim.SGD, dict(lr=0.1, momentum=0.9)
    m_fp, m_ref = make_model(), make_model()
    kw = dict(rho_max=0.1, rho_min=0.01, alpha=0.3, lr_min=0.001)
    lr = torch.tensor(0.1, dtype=torch.float64) if tensor_lr else 0.1
    opt = fp.GSAM(m_fp.parameters(), base_cls, **kw, **dict(base_kw, lr=lr))
    assert type(opt.param_groups[0]["lr_max"]) is float
    ref = Direct("gsam", m_ref, base_cls, base_kw, lr_max=0.1, **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.001)
    sched_ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref.opt, T_max=4, eta_min=0.001)
    seen = []
    for step in range(5):
        seen.append(opt._group_sizes(0, opt.param_groups[0])[0])
        opt.step(fp_closure(m_fp, step))
        ref.step(step)
        sched.step()
        sched_ref.step()
    assert seen[0] == pytest.approx(0.1) and seen[-1] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(seen, seen[1:]))
    for a, b in zip(m_fp.parameters(), m_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("lr, rho", [(0.05, 0.1), (0.002, 0.01)])
def test_gsam_rho_is_clamped_to_its_interval_outside_the_lr_range(lr, rho):
    """An lr above lr_max (OneCycleLR's peak past the lr GSAM was built with) or below lr_min (a warm-up from a
    smaller lr) keeps rho_t in [rho_min, rho_max] (the README's clamp): the step equals GSAM's with that constant
    radius. Unclamped, rho_t was 0.82 at lr 0.05 and -0.044 at 0.002, where the ascent turns into a descent."""
    kw = dict(alpha=0.3, lr_min=0.005)
    m_sched, m_const = make_model(), make_model()
    sched = fp.GSAM(m_sched.parameters(), torch.optim.SGD, rho_max=0.1, rho_min=0.01, **kw, lr=0.01)
    const = fp.GSAM(m_const.parameters(), torch.optim.SGD, rho_max=rho, rho_min=rho, **kw, lr=0.01)
    for opt in (sched, const):
        opt.param_groups[0]["lr"] = lr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (the lr above lr_max is said once; tested above)
        assert sched._group_sizes(0, sched.param_groups[0])[0] == pytest.approx(rho)
        for step in range(2):
            sched.step(fp_closure(m_sched, step))
            const.step(fp_closure(m_const, step))
    for a, b in zip(m_sched.parameters(), m_const.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["sam", "wsam", "gsam"])
def test_a_tensor_the_perturbed_pass_does_not_reach_descends_by_the_equations(name):
    """Its gradient at w + e is zero (the README's rule): SAM's descent leaves it still, WSAM's (1 - a) g + a g1
    moves it by -(1 - a) lr g (uphill for a > 1), GSAM's g1 - alpha (g - c g1) by +alpha lr g."""
    lr, gamma, alpha = 0.1, 0.9, 0.4
    make = {
        "sam": lambda ps: fp.SAM(ps, torch.optim.SGD, rho=0.05, lr=lr),
        "wsam": lambda ps: fp.WSAM(ps, torch.optim.SGD, rho=0.05, gamma=gamma, lr=lr),
        "gsam": lambda ps: fp.GSAM(ps, torch.optim.SGD, alpha=alpha, lr=lr),
    }[name]
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    opt = make([a, b])
    calls = []

    def closure():
        calls.append(1)
        loss = (a**2).sum() + ((b**2).sum() if len(calls) == 1 else 0.0)  # b left out at w + e
        loss.backward()
        return loss

    b0 = b.detach().clone()
    opt.step(closure)
    g = 2 * b0
    factor = {"sam": 0.0, "wsam": -(1 - gamma / (1 - gamma)), "gsam": alpha}[name]
    torch.testing.assert_close(b.detach() - b0, factor * lr * g, rtol=1e-6, atol=1e-12)


def lr_max_warnings(model, opt, sched, steps: int) -> list:
    """The warnings about lr_max over ``steps`` scheduled steps."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            opt.step(fp_closure(model, step))
            sched.step()
    return [w for w in caught if "lr_max" in str(w.message)]


def test_gsam_lr_max_of_an_earlier_state_dict_that_held_the_lr_tensor():
    """A state dict saved before lr_max took the value held the lr tensor itself as lr_max (one object through
    torch.save): loaded, lr_max is the lr the scheduler recorded when built, and rho_t follows the schedule again.
    A float32 Tensor lr's warm-up ending some ulps above lr_max is not said."""
    m = make_model()
    lr = torch.tensor(0.1)  # float32: LinearLR's warm-up ends a few ulps off 0.1
    opt = fp.GSAM(m.parameters(), torch.optim.SGD, rho_max=0.1, rho_min=0.01, lr=lr)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2)
    assert not lr_max_warnings(m, opt, sched, 3)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr_max"] = sd["param_groups"][0]["lr"]  # what the earlier code saved
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert sd["param_groups"][0]["lr_max"] is sd["param_groups"][0]["lr"]
    opt.load_state_dict(sd)
    opt.param_groups[0]["lr"].fill_(0.055)  # a scheduler's in-place write
    assert opt._group_sizes(0, opt.param_groups[0])[0] == pytest.approx(0.01 + 0.09 * 0.055 / 0.1, rel=1e-6)
    assert type(opt.param_groups[0]["lr_max"]) is float


def test_gsam_says_when_the_lr_rises_above_lr_max():
    """A schedule that peaks above the lr the optimizer was built with (OneCycleLR with lr_max left to its
    default) pins rho_t at rho_max while it is above: said once, with what to pass; nothing said when lr_max is
    the peak."""
    for lr_max, said in ((None, True), (0.1, False)):
        m = make_model()
        opt = fp.GSAM(m.parameters(), torch.optim.SGD, rho_max=0.1, rho_min=0.01, lr_max=lr_max, lr=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=6)
        ours = lr_max_warnings(m, opt, sched, 6)
        assert len(ours) == int(said), [str(w.message) for w in ours]
        if said:
            assert "above its 'lr_max' 0.01" in str(ours[0].message) and "OneCycleLR's max_lr" in str(ours[0].message)
            assert ours[0].filename == __file__  # at the user's line


# ---- SAM_FAMILY.md §8: the worked example ------------------------------------------------------

CURV = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)


def quadratic(steps, cls, base=torch.optim.SGD, base_kw=None, **kw):
    A = torch.nn.Parameter(torch.tensor([2.0, -0.5], dtype=torch.float64))
    B = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    opt = cls([A, B], base, **kw, **(base_kw or dict(lr=0.1)))

    def closure():
        w = torch.cat([A, B])
        loss = 0.5 * (CURV * w * w).sum()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return torch.cat([A, B]).detach()


WORKED = [
    ("gsam", 1, fp.GSAM, dict(rho_max=0.3, rho_min=0.3, alpha=0.4), None, (1.7901983003, -0.3819263456, 0.2111614731)),
    ("wsam", 1, fp.WSAM, dict(rho=0.3, gamma=0.9), None, (1.62, -0.22, -0.42)),
    ("wsam-coupled", 1, fp.WSAM, dict(rho=0.3, gamma=0.9, decouple=False), None, (1.62, -0.22, -0.42)),
    ("wsam-adam", 1, fp.WSAM, dict(rho=0.3, gamma=0.9), "adam", (1.72, -0.22, -0.32)),
    ("wsam-adam-coupled", 1, fp.WSAM, dict(rho=0.3, gamma=0.9, decouple=False), "adam", (1.90, -0.40, 0.40)),
    ("looksam-t0", 1, fp.LookSAM, dict(rho=0.3, k=2, alpha=0.7), None, (1.78, -0.38, 0.22)),
    (
        "looksam-layer",
        2,
        fp.LookSAM,
        dict(rho=0.3, k=2, alpha=0.7, scope="layer"),
        None,
        (1.6625894312, -0.1828211375, 0.132),
    ),
    ("looksam-global", 2, fp.LookSAM, dict(rho=0.3, k=2, alpha=0.7), None, (1.7027202146, -0.3194954176, 0.0235320766)),
    (
        "fsam-1",
        2,
        fp.FriendlySAM,
        dict(rho=0.3, sigma=1.0, lmbda=0.9),
        None,
        (1.6076586212, -0.3163460827, 0.2472301049),
    ),
    (
        "fsam-0.5",
        2,
        fp.FriendlySAM,
        dict(rho=0.3, sigma=0.5, lmbda=0.9),
        None,
        (1.5738378721, -0.2852252481, 0.1493305402),
    ),
]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", WORKED, ids=[c[0] for c in WORKED])
def test_worked_example(case, backend_name):
    """The exact float64 values of SAM_FAMILY.md §8 (printed to 10 digits). Tolerance 1e-7: the float32
    coefficients of lincomb_, magnified by the cancellation in LookSAM's w3 = 0.22 - 0.1*(0.88 + f*gv3)."""
    _, steps, cls, kw, base, expected = case
    base_cls, base_kw = (torch.optim.Adam, dict(lr=0.1)) if base == "adam" else (torch.optim.SGD, dict(lr=0.1))
    with fp.use_backend(backend_name):
        got = quadratic(steps, cls, base_cls, base_kw, **kw)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)


# ---- passes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("caller_g0", [False, True])
def test_looksam_runs_one_plus_one_over_k_passes(caller_g0):
    """Over T steps the closure runs T + ceil(T/k) times (ceil(T/k) when the caller's backward is g_0)."""
    model = make_model()
    opt = fp.LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=3, lr=0.1)
    calls = 0
    T = 7
    for step in range(T):

        def closure(step=step):
            nonlocal calls
            calls += 1
            loss = loss_of(model, step)
            loss.backward()
            return loss

        if caller_g0:
            loss_of(model, step).backward()
        opt.step(closure)
        opt.zero_grad()
    assert opt.looksam_step == T
    assert calls == (0 if caller_g0 else T) + math.ceil(T / 3)


def test_caller_g0_gives_the_same_steps():
    """The drop-in rule: loss.backward(); opt.step(closure) equals step(closure) alone."""
    for cls, kw in PRESETS.values():
        a, b = make_model(), make_model()
        oa = cls(a.parameters(), torch.optim.SGD, **kw, lr=0.1, momentum=0.9)
        ob = cls(b.parameters(), torch.optim.SGD, **kw, lr=0.1, momentum=0.9)
        for step in range(4):
            oa.step(fp_closure(a, step))
            loss_of(b, step).backward()
            ob.step(fp_closure(b, step))
            ob.zero_grad()
        for x, y in zip(a.parameters(), b.parameters()):
            assert torch.equal(x, y), cls.__name__


def test_gradients_zeroed_in_place_are_no_g0():
    """``model.zero_grad(set_to_none=False)`` before step(closure) leaves zeros whose versions moved as after a
    backward: they are no g_0, and the steps equal those after the optimizer's own zero_grad (clean pass run)."""
    for name, (cls, kw) in PRESETS.items():
        a, b = make_model(), make_model()
        oa = cls(a.parameters(), torch.optim.SGD, **kw, lr=0.1, momentum=0.9)
        ob = cls(b.parameters(), torch.optim.SGD, **kw, lr=0.1, momentum=0.9)
        calls = {id(oa): 0, id(ob): 0}
        for step in range(4):
            for m, o, zero in ((a, oa, o_zero), (b, ob, m_zero)):
                loss_of(m, step).backward()
                zero(m, o)

                def closure(m=m, o=o, step=step):
                    calls[id(o)] += 1
                    return fp_closure(m, step)()

                o.step(closure)
        assert calls[id(oa)] == calls[id(ob)], name
        for x, y in zip(a.parameters(), b.parameters()):
            assert torch.equal(x, y), name


def o_zero(model, opt):
    opt.zero_grad(set_to_none=False)


def m_zero(model, opt):
    model.zero_grad(set_to_none=False)


def test_first_second_step_where_supported():
    for name in ("gsam", "wsam", "wsam-coupled", "fsam"):
        cls, kw = PRESETS[name]
        a, b = make_model(), make_model()
        oa = cls(a.parameters(), torch.optim.SGD, **kw, lr=0.1, momentum=0.9)
        ob = cls(b.parameters(), torch.optim.SGD, **kw, lr=0.1, momentum=0.9)
        for step in range(3):
            oa.step(fp_closure(a, step))
            loss_of(b, step).backward()
            ob.first_step(zero_grad=True)
            loss_of(b, step).backward()
            ob.second_step(zero_grad=True)
        for x, y in zip(a.parameters(), b.parameters()):
            assert torch.equal(x, y), name
    model = make_model()
    opt = fp.LookSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(model, 0).backward()
    with pytest.raises(RuntimeError, match="LookSAM does not support first_step"):
        opt.first_step()


def test_max_grad_norm_clips_the_final_descent_gradient():
    """GSAM with max_grad_norm: the base step sees G scaled to the given norm."""
    m_fp, m_ref = make_model(), make_model()
    kw = dict(rho_max=0.05, rho_min=0.05, alpha=0.5)
    opt = fp.GSAM(m_fp.parameters(), torch.optim.SGD, **kw, lr=0.1, max_grad_norm=1e-3)
    opt.step(fp_closure(m_fp, 0))
    g = grad_at(m_ref, 0)
    g1 = grad_at(m_ref, 0, sam_shift(g, 0.05))
    c = dot(g, g1) / dot(g1, g1)
    G = [(1 + 0.5 * c) * b - 0.5 * a for a, b in zip(g, g1)]
    n = dot(G, G).sqrt()
    assert n > 1e-3
    with torch.no_grad():
        for p, x in zip(m_ref.parameters(), G):
            p.sub_(0.1 * x * (1e-3 / (n + 1e-6)))
    for a, b in zip(m_fp.parameters(), m_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_bad_hyperparameters_are_refused():
    params = make_model().parameters
    with pytest.raises(ValueError, match="alpha"):
        fp.GSAM(params(), torch.optim.SGD, alpha=1.5, lr=0.1)
    with pytest.raises(ValueError, match="gamma"):
        fp.WSAM(params(), torch.optim.SGD, gamma=1.0, lr=0.1)
    with pytest.raises(ValueError, match="k .*integer"):
        fp.LookSAM(params(), torch.optim.SGD, k=0, lr=0.1)
    with pytest.raises(ValueError, match="scope"):
        fp.LookSAM(params(), torch.optim.SGD, scope="tensor", lr=0.1)
    with pytest.raises(ValueError, match="lmbda"):
        fp.FriendlySAM(params(), torch.optim.SGD, lmbda=2.0, lr=0.1)
    with pytest.raises(ValueError, match="sigma"):
        fp.FriendlySAM(params(), torch.optim.SGD, sigma=math.nan, lr=0.1)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        fp.FriendlySAM(params(), torch.optim.SGD, sigma=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="rho_max"):
        fp.GSAM(params(), torch.optim.SGD, rho_max=-1.0, lr=0.1)
    for cls, kw in PRESETS.values():  # their descent rules run around an unfused base step
        with pytest.raises(ValueError, match="fused_step"):
            cls(params(), torch.optim.SGD, **kw, lr=0.1, fused_step=True)


def test_deepcopy_keeps_working():
    """copy.deepcopy of a stepped optimizer (e.g. by a framework) steps on without error."""
    for cls, kw in PRESETS.values():
        model = make_model()
        opt = cls(model.parameters(), torch.optim.SGD, **kw, lr=0.1)
        opt.step(fp_closure(model, 0))
        model2 = copy.deepcopy(model)
        opt2 = cls(model2.parameters(), torch.optim.SGD, **kw, lr=0.1)
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
        opt2.step(fp_closure(model2, 1))


@pytest.mark.parametrize("name", ["gsam", "wsam", "looksam", "fsam"])
def test_freeze_bn_leaves_the_perturbed_passes_out(name):
    """freeze_bn: BatchNorm counts the clean pass of each step only (LookSAM's reuse steps have no
    other); without it the perturbed passes count too (the control)."""
    cls, kw = PRESETS[name]
    counts = {}
    for freeze in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3)).double()
        opt = cls(model.parameters(), torch.optim.SGD, **kw, lr=0.1, freeze_bn=model if freeze else None)
        for step in range(4):
            x, y = batch(step)

            def closure():
                loss = ((model(x) - y) ** 2).mean()
                loss.backward()
                return loss

            opt.step(closure)
        counts[freeze] = int(model[0].num_batches_tracked)
    refreshes = 2 if name == "looksam" else 4  # k=3 over 4 steps: t = 0 and 3
    assert counts == {True: 4, False: 4 + refreshes}


def test_step_without_closure_names_the_fix():
    model = make_model()
    with pytest.raises(TypeError, match="LookSAM has no first_step"):
        fp.LookSAM(model.parameters(), torch.optim.SGD, lr=0.1).step()
    with pytest.raises(TypeError, match="two-call convention"):
        fp.GSAM(model.parameters(), torch.optim.SGD, lr=0.1).step()


def adaptive_shift(v, ws, rho):
    """The ASAM form the presets use with adaptive=True: rho * w^2 v / || |w| v ||."""
    n = sum(((w.abs() * x) ** 2).sum() for w, x in zip(ws, v)).sqrt()
    return [rho * w * w * x / n for w, x in zip(ws, v)]


@pytest.mark.parametrize("name", ["gsam", "wsam-coupled", "looksam", "fsam"])
def test_adaptive_form(name):
    """adaptive=True perturbs with rho*w^2 v/|| |w| v || (v = g, or FriendlySAM's d); the rest as without."""
    cls, kw = PRESETS[name]
    m_fp, m_ref = make_model(), make_model()
    opt = cls(m_fp.parameters(), torch.optim.SGD, **kw, adaptive=True, lr=0.1, momentum=0.9)
    ref = direct_for(name, m_ref, torch.optim.SGD, dict(lr=0.1, momentum=0.9))
    global sam_shift
    plain = sam_shift
    try:
        sam_shift = lambda v, rho: adaptive_shift(v, [p.detach() for p in m_ref.parameters()], rho)  # noqa: E731
        for step in range(4):
            opt.step(fp_closure(m_fp, step))
            ref.step(step)
    finally:
        sam_shift = plain
    # LookSAM: the w^2-weighted perturbation leaves g1 close to g, so gv = g1 - beta*g is a short difference
    # and the float32 beta's rounding is magnified by ||g||/||gv|| in the rescale (measured 1.5e-7).
    atol = 5e-7 if name == "looksam" else ATOL
    for a, b in zip(m_fp.parameters(), m_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=atol)
    assert not all(torch.equal(a, b) for a, b in zip(m_fp.parameters(), make_model().parameters()))


@pytest.mark.parametrize("name", ["gsam", "looksam"])
def test_unperturbed_group_takes_the_last_pass_gradient(name):
    """A perturb=False group takes no part in the rule's vectors (nor the perturbation) and descends with
    the gradient of the step's last pass: g1 on two-pass steps, g on LookSAM's reuse steps."""
    m_fp, m_ref = make_model(), make_model()
    first = list(m_fp[0].parameters())
    groups = [{"params": first}, {"params": list(m_fp[2].parameters()), "perturb": False}]
    cls, kw = PRESETS[name]
    opt = cls(groups, torch.optim.SGD, **kw, lr=0.1)
    on = [True, True, False, False]
    t = 0
    gv = None
    for step in range(4):
        opt.step(fp_closure(m_fp, step))
        g = grad_at(m_ref, step)
        gp = [x for x, o in zip(g, on) if o]
        refresh = name == "gsam" or t % kw["k"] == 0
        if refresh:
            e = sam_shift(gp, kw.get("rho", kw.get("rho_max")))
            g1 = grad_at(m_ref, step, e + [torch.zeros_like(x) for x in g[2:]])
            g1p = g1[:2]
            if name == "gsam":
                c = dot(gp, g1p) / dot(g1p, g1p)
                G = [(1 + kw["alpha"] * c) * b - kw["alpha"] * a for a, b in zip(gp, g1p)] + g1[2:]
            else:
                beta = dot(gp, g1p) / dot(gp, gp)
                gv = [y - beta * x for x, y in zip(gp, g1p)]
                G = g1
        else:
            f = kw["alpha"] * dot(gp, gp).sqrt() / dot(gv, gv).sqrt()
            G = [x + f * v for x, v in zip(gp, gv)] + g[2:]
        t += 1
        with torch.no_grad():
            for p, x in zip(m_ref.parameters(), G):
                p.sub_(0.1 * x)
    for a, b in zip(m_fp.parameters(), m_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_wsam_decoupled_uses_each_groups_lr():
    """w <- Base(w, g) - lr_group * a * (g1 - g), with plain SGD and two groups of different lr."""
    m_fp, m_ref = make_model(), make_model()
    lrs = [0.1, 0.02]
    groups = [
        {"params": list(m_fp[0].parameters()), "lr": lrs[0]},
        {"params": list(m_fp[2].parameters()), "lr": lrs[1]},
    ]
    opt = fp.WSAM(groups, torch.optim.SGD, rho=0.05, gamma=0.75, lr=0.5)
    a = 0.75 / 0.25
    for step in range(3):
        opt.step(fp_closure(m_fp, step))
        g = grad_at(m_ref, step)
        g1 = grad_at(m_ref, step, sam_shift(g, 0.05))
        with torch.no_grad():
            for i, (p, x, y) in enumerate(zip(m_ref.parameters(), g, g1)):
                lr = lrs[i // 2]
                p.sub_(lr * x)
                p.sub_(lr * a * (y - x))
    for p, q in zip(m_fp.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)
