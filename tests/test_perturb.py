"""The perturbation engine against a direct implementation of docs/design.md §2."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastperturb.engine import Cycle, NonFiniteGradient, PerturbSpec, ascent_coefficients, nonfinite_rows, run_cycle

X = torch.randn(24, 5, generator=torch.Generator().manual_seed(0))
Y = torch.randn(24, 3, generator=torch.Generator().manual_seed(1))


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def loss_of(model: torch.nn.Module) -> torch.Tensor:
    return ((model(X) - Y) ** 2).mean()


def _norm(ts, p):
    if p == "l2":
        return torch.sqrt(sum((t.double() ** 2).sum() for t in ts))
    return max(t.double().abs().max() for t in ts)


def direct_descent_grad(model, spec: PerturbSpec, radius: float, step: float):
    """docs/design.md §2 written out with plain tensor ops: returns G."""
    ps = list(model.parameters())
    w0 = [p.detach().clone() for p in ps]

    def grad_at(delta):
        with torch.no_grad():
            for p, w, d in zip(ps, w0, delta):
                p.copy_(w + d)
        for p in ps:
            p.grad = None
        loss_of(model).backward()
        return [p.grad.detach().clone() for p in ps]

    def groups(ts):  # the sets over which norms are taken
        return [[t] for t in ts] if spec.scope == "layer" else [list(ts)]

    def split(vals, like):
        return vals if spec.scope == "layer" else [vals[0]] * len(like)

    # absolute per-tensor radius / step
    if spec.relative:
        wn = split([_norm(g, spec.norm) for g in groups(w0)], w0)
        r = [radius * float(n) for n in wn]
        eta = [step * float(n) for n in wn]
    else:
        r = [radius] * len(ps)
        eta = [step] * len(ps)

    delta = [torch.zeros_like(w) for w in w0]
    g = grad_at(delta)
    gs = [g]
    for _ in range(spec.steps):
        if spec.adaptive_eta is not None:
            t = [w.abs() + spec.adaptive_eta for w in w0]
            n = _norm([ti * gi for ti, gi in zip(t, g)], "l2")
            d = [ti * ti * gi / n for ti, gi in zip(t, g)]
        elif spec.norm == "l2":
            n = split([_norm(grp, "l2") for grp in groups(g)], g)
            d = [gi / ni if ni > 0 else torch.zeros_like(gi) for gi, ni in zip(g, n)]
        else:
            d = [gi.sign() for gi in g]
        u = [dl + e * di for dl, e, di in zip(delta, eta, d)]
        if spec.steps > 1:
            if spec.norm == "l2":
                un = split([_norm(grp, "l2") for grp in groups(u)], u)
                u = [ui * min(1.0, ri / float(ni)) if ni > 0 else ui for ui, ri, ni in zip(u, r, un)]
            else:
                u = [ui.clamp(-ri, ri) for ui, ri in zip(u, r)]
        delta = u
        g = grad_at(delta)
        gs.append(g)
    c = spec.pass_weights()
    G = [sum(ck * gk[j] for ck, gk in zip(c, gs)) for j in range(len(ps))]
    with torch.no_grad():
        for p, w in zip(ps, w0):
            p.copy_(w)
    return G


def engine_descent_grad(model, spec: PerturbSpec, radius: float, step: float):
    ps = list(model.parameters())
    w0 = [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = None
    loss_of(model).backward()
    accum = [torch.empty_like(p) for p in ps] if spec.accumulates else []
    cyc = Cycle(spec, ps, [torch.empty_like(p) for p in ps], [radius] * len(ps), [step] * len(ps), accum)
    losses = run_cycle(cyc, lambda k: loss_of(model).backward())
    assert len(losses) == spec.steps
    for p, w in zip(ps, w0):
        assert torch.equal(p, w), "weights must be restored bit for bit"
    return [p.grad for p in ps]


CASES = [
    PerturbSpec(norm="l2", scope="global", steps=1),  # SAM
    PerturbSpec(norm="l2", scope="global", steps=1, adaptive_eta=0.01),  # ASAM
    PerturbSpec(norm="l2", scope="layer", steps=1, relative=True),  # AWP
    PerturbSpec(norm="l2", scope="layer", steps=2, relative=True),  # multi-step AWP
    PerturbSpec(norm="l2", scope="global", steps=3, include_clean=True),  # APD l2
    PerturbSpec(norm="linf", scope="layer", steps=3, include_clean=True),  # APD linf
    PerturbSpec(norm="linf", scope="global", steps=2, relative=True),
    PerturbSpec(norm="l2", scope="layer", steps=1, include_clean=True),
]


@pytest.mark.parametrize(
    "spec",
    CASES,
    ids=lambda s: f"{s.norm}-{s.scope}-K{s.steps}-rel{int(s.relative)}-ad{s.adaptive_eta}-c{int(s.include_clean)}",
)
def test_engine_matches_direct_equations(spec):
    radius, step = (0.05, 0.03) if not spec.relative else (0.02, 0.015)
    if spec.adaptive_eta is not None:
        radius = step = 0.5
    if spec.steps == 1:
        step = radius
    want = direct_descent_grad(make_model(), spec, radius, step)
    got = engine_descent_grad(make_model(), spec, radius, step)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    steps=st.integers(1, 4),
    norm=st.sampled_from(["l2", "linf"]),
    scope=st.sampled_from(["layer", "global"]),
    clean=st.booleans(),
    radius=st.floats(1e-3, 0.3),
    frac=st.floats(0.1, 1.5),
)
def test_engine_matches_direct_equations_property(steps, norm, scope, clean, radius, frac):
    spec = PerturbSpec(norm=norm, scope=scope, steps=steps, include_clean=clean)
    step = radius if steps == 1 else radius * frac
    want = direct_descent_grad(make_model(3), spec, radius, step)
    got = engine_descent_grad(make_model(3), spec, radius, step)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-6)


def test_perturbation_stays_in_ball():
    model = make_model()
    ps = list(model.parameters())
    w0 = [p.detach().clone() for p in ps]
    loss_of(model).backward()
    spec = PerturbSpec(norm="l2", scope="global", steps=4)
    eps = 0.05
    cyc = Cycle(spec, ps, [torch.empty_like(p) for p in ps], [eps] * 4, [0.04] * 4, [torch.empty_like(p) for p in ps])
    cyc.start([p.grad for p in ps])
    for _ in range(4):
        cyc.ascend([p.grad for p in ps])
        delta = [p.detach() - w for p, w in zip(ps, w0)]
        assert float(_norm(delta, "l2")) <= eps * (1 + 1e-5)
        loss_of(model).backward()
        cyc.observe([p.grad for p in ps])
    cyc.restore()
    assert all(torch.equal(p, w) for p, w in zip(ps, w0))


def test_zero_gradient_gives_no_nan():
    w = torch.randn(4, 3)
    w0 = w.clone()
    g = torch.zeros(4, 3)
    for spec in (PerturbSpec(scope="global"), PerturbSpec(scope="layer", relative=True), PerturbSpec(steps=3)):
        cyc = Cycle(spec, [w], [torch.empty_like(w)], [0.1], [0.1], [torch.empty_like(w)])
        cyc.start([g])
        cyc.ascend([g], zero_grads=False)
        assert torch.equal(w, w0)  # zero gradient: no move, and no 0/0
        cyc.restore()


def _direct_coefficients(stats, step_size, radius, scope, project):
    """ascent_coefficients for l2 written out per tensor in Python floats (docs/design.md §2)."""
    rows = [[float(v) for v in r] for r in stats]
    gg = [r[0] for r in rows]
    gsum = sum(gg)
    step = []
    for i, eta in enumerate(step_size):
        gn = math.sqrt(gsum if scope == "global" else gg[i])
        step.append(eta / gn if gn > 0 else 0.0)
    if not project:
        return step, [1.0] * len(step)
    uu = [r[2] + 2 * a * r[1] + a * a * r[0] for r, a in zip(rows, step)]
    # global: the ellipsoid sum_i ||u_i||^2 / r_i^2 <= 1 of per-tensor radii, every tensor scaled alike; a tensor of
    # radius 0 is projected on its own (to 0 when it moved)
    inside = math.sqrt(max(sum(v / r**2 for v, r in zip(uu, radius) if r > 0), 0.0))
    proj = []
    for i, r in enumerate(radius):
        if scope == "global" and r > 0:
            proj.append(1.0 / inside if inside > 1 else 1.0)
        else:
            u = math.sqrt(max(uu[i], 0.0))
            proj.append(r / u if u > r else 1.0)
    return step, proj


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0.0, 1e-30, 0.5, 3.0, 1e30]),
            st.floats(-2.0, 2.0, width=32),
            st.floats(0.0, 4.0, width=32),
            st.sampled_from([0.0, 0.01, 0.2]),
        ),
        min_size=0,
        max_size=7,
    ),
    st.sampled_from(["layer", "global"]),
    st.booleans(),
)
def test_ascent_coefficients_match_the_direct_formula(rows, scope, project):
    """Zero gradients (eta / 0 and 0 / 0) give a zero step, never NaN; tiny and huge norms stay exact."""
    stats = torch.tensor([[gg, dg, dd] for gg, dg, dd, _ in rows], dtype=torch.float32).reshape(-1, 3)
    eta = torch.tensor([e for *_, e in rows], dtype=torch.float64)
    radius = eta * 1.5
    step, proj = ascent_coefficients(PerturbSpec(scope=scope), stats, eta, radius, project)
    assert step.dtype == proj.dtype == torch.float32 and step.shape == proj.shape == (len(rows),)
    want_step, want_proj = _direct_coefficients(stats, eta.tolist(), radius.tolist(), scope, project)
    torch.testing.assert_close(step, torch.tensor(want_step, dtype=torch.float32), rtol=1e-6, atol=0)
    torch.testing.assert_close(proj, torch.tensor(want_proj, dtype=torch.float32), rtol=1e-6, atol=0)


def test_ascent_coefficients_leave_their_inputs_alone_and_return_tensors_they_own():
    stats = torch.tensor([[4.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    eta = torch.tensor([0.1, 0.2], dtype=torch.float64)
    radius = eta.clone()
    before = (stats.clone(), eta.clone(), radius.clone())
    step, proj = ascent_coefficients(PerturbSpec(), stats, eta, radius, True)
    assert all(torch.equal(a, b) for a, b in zip((stats, eta, radius), before))
    step.add_(1.0), proj.add_(1.0)  # the ops' own buffers: writing them touches nothing of the caller's
    assert all(torch.equal(a, b) for a, b in zip((stats, eta, radius), before))


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from([0.0, -1.5, 2.0, 3e38, -3e38, math.nan, math.inf, -math.inf]), min_size=3, max_size=3),
        max_size=6,
    ),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_nonfinite_rows_names_exactly_the_rows_with_nan_or_inf(rows, dtype):
    stats = torch.tensor(rows, dtype=torch.float64).reshape(-1, 3).to(dtype)
    want = [i for i, r in enumerate(stats.double().tolist()) if not all(map(math.isfinite, r))]
    assert nonfinite_rows(stats) == want
    assert nonfinite_rows(stats[:, 0]) == [i for i, r in enumerate(stats.double().tolist()) if not math.isfinite(r[0])]


def test_nonfinite_rows_is_not_fooled_by_finite_values_whose_sum_overflows():
    big = torch.full((4, 3), 1.7e308, dtype=torch.float64)  # every value finite, their float64 sum is not
    assert nonfinite_rows(big) == []
    big[2, 1] = math.nan
    assert nonfinite_rows(big) == [2]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("at_pass", [0, 1, 2])
def test_nonfinite_gradient_restores_and_raises(bad, at_pass):
    model = make_model()
    ps = list(model.parameters())
    w0 = [p.detach().clone() for p in ps]
    loss_of(model).backward()
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        loss = loss_of(model)
        loss.backward()
        if calls["n"] == at_pass:
            ps[1].grad[0] = bad
        return loss

    if at_pass == 0:
        ps[1].grad[0] = bad
    spec = PerturbSpec(steps=3, include_clean=True)
    cyc = Cycle(spec, ps, [torch.empty_like(p) for p in ps], [0.1] * 4, [0.05] * 4, [torch.empty_like(p) for p in ps])
    with pytest.raises(NonFiniteGradient) as info:
        run_cycle(cyc, lambda k: closure())
    assert info.value.tensor_indices == [1]
    assert info.value.pass_index == at_pass
    for p, w in zip(ps, w0):
        assert torch.equal(p, w)
        assert torch.isfinite(p).all()


def test_closure_exception_at_perturbed_point_restores():
    model = make_model()
    ps = list(model.parameters())
    w0 = [p.detach().clone() for p in ps]
    loss_of(model).backward()

    def closure():
        raise KeyboardInterrupt

    cyc = Cycle(
        PerturbSpec(steps=2),
        ps,
        [torch.empty_like(p) for p in ps],
        [0.1] * 4,
        [0.05] * 4,
        [torch.empty_like(p) for p in ps],
    )
    with pytest.raises(KeyboardInterrupt):
        run_cycle(cyc, lambda k: closure())
    assert all(torch.equal(p, w) for p, w in zip(ps, w0))


def test_closure_without_backward_is_a_clear_error():
    model = make_model()
    ps = list(model.parameters())
    w0 = [p.detach().clone() for p in ps]
    loss_of(model).backward()

    def closure():
        for p in ps:
            p.grad = None
        return loss_of(model)  # forgot backward()

    cyc = Cycle(PerturbSpec(), ps, [torch.empty_like(p) for p in ps], [0.1] * 4, [0.1] * 4)
    with pytest.raises(RuntimeError, match="backward"):
        run_cycle(cyc, lambda k: closure())
    assert all(torch.equal(p, w) for p, w in zip(ps, w0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(norm="l3"), "norm"),
        (dict(scope="net"), "scope"),
        (dict(steps=0), "steps"),
        (dict(steps=1.5), "steps"),
        (dict(adaptive_eta=-0.1), "eta"),
        (dict(adaptive_eta=0.1, steps=2), "adaptive"),
        (dict(adaptive_eta=0.1, norm="linf"), "adaptive"),
    ],
)
def test_bad_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PerturbSpec(**kwargs)


def test_cycle_checks_buffer_counts():
    w = torch.randn(3)
    with pytest.raises(ValueError, match="accumulator"):
        Cycle(PerturbSpec(steps=2), [w], [torch.empty_like(w)], [0.1], [0.1])
    with pytest.raises(ValueError, match="radius"):
        Cycle(PerturbSpec(), [w], [torch.empty_like(w)], [0.1, 0.2], [0.1])


def test_pass_weights():
    assert PerturbSpec(steps=1).pass_weights() == [0.0, 1.0]
    assert PerturbSpec(steps=3, include_clean=True).pass_weights() == [0.25] * 4
    assert PerturbSpec(steps=2).pass_weights() == [0.0, 0.5, 0.5]


def test_ops_are_outside_autograd():
    from fastperturb import ops

    w = [torch.nn.Parameter(torch.randn(3, 4))]
    per, total = ops.norms(w)
    stats = ops.grad_stats_([torch.randn(3, 4)], [], w, [])
    assert not per.requires_grad and not total.requires_grad and not stats.requires_grad
    ops.ascent_step_(w, [torch.randn(3, 4)], [torch.empty(3, 4)], torch.tensor([0.1]), torch.tensor([1.0]), first=True)
    assert w[0].grad_fn is None
