"""Every preset against docs/design.md §2 written out directly in plain PyTorch.

The direct implementation below uses no fastperturb code: it perturbs a copy of the
model with tensor arithmetic, collects the gradients of the passes, forms
G = sum_k c_k g_k and hands it to a fresh base optimizer. The fastperturb optimizer
must follow the same trajectory over one and several steps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fastperturb as fp
from fastperturb.engine import PerturbSpec
from fastperturb.ops.dispatch import why_unavailable

BACKENDS = [b for b in ("reference", "cpp") if why_unavailable(b, torch.device("cpu")) is None]

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01)),
}


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randn(16, 3, generator=g, dtype=torch.float64)
    return x, y


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def loss_of(model, step):
    x, y = batch(step)
    return ((model(x) - y) ** 2).mean() + 0.1 * model(x).pow(3).mean()


# ---- the direct implementation --------------------------------------------------------


def _norm(ts, norm):
    if not ts:
        return torch.zeros((), dtype=torch.float64)
    if norm == "l2":
        return torch.sqrt(sum((t**2).sum() for t in ts))
    return max(t.abs().max() for t in ts)


def direct_descent_grad(model, step_idx, cfg):
    """Leave G of docs/design.md §2 in model's .grad at the original weights.

    cfg: norm, scope, steps, relative, adaptive_eta (None or float), include_clean,
    radius / step (lists per parameter), selected (list of bool per parameter).
    """
    ps = list(model.parameters())
    w0 = [p.detach().clone() for p in ps]
    sel = [i for i, s in enumerate(cfg["selected"]) if s]

    def grad_at(delta):
        with torch.no_grad():
            for p, w, d in zip(ps, w0, delta):
                p.copy_(w + d)
        for p in ps:
            p.grad = None
        loss_of(model, step_idx).backward()
        return [p.grad.detach().clone() for p in ps]

    def norm_over(ts, i):  # the norm relevant to tensor i (its layer, or all selected)
        if cfg["scope"] == "layer":
            return _norm([ts[i]], cfg["norm"])
        return _norm([ts[j] for j in sel], cfg["norm"])

    r = list(cfg["radius"])
    eta = list(cfg["step"])
    if cfg["relative"]:
        for i in sel:
            r[i] = r[i] * float(norm_over(w0, i))
            eta[i] = eta[i] * float(norm_over(w0, i))

    K = cfg["steps"]
    delta = [torch.zeros_like(w) for w in w0]
    g = grad_at(delta)
    gs = [g]
    for _ in range(K):
        new = [d.clone() for d in delta]
        if cfg["adaptive_eta"] is not None:
            T = [w.abs() + cfg["adaptive_eta"] for w in w0]
            tg = [T[i] * g[i] for i in range(len(ps))]
            for i in sel:
                new[i] = r[i] * T[i] ** 2 * g[i] / norm_over(tg, i)
        else:
            for i in sel:
                D = g[i] / norm_over(g, i) if cfg["norm"] == "l2" else torch.sign(g[i])
                new[i] = delta[i] + eta[i] * D
            # projection onto the ball: per layer, or for the global scope onto the ellipsoid
            # sum_i ||delta_i||^2 / r_i^2 <= 1 of the per-group radii (one radius: the plain ball; a single
            # step of eta_i <= r_i then stays inside, as SAM's rho_group * g / ||g||); a radius 0 allows no move
            if cfg["norm"] == "l2" and cfg["scope"] == "layer":
                ns = {i: float(norm_over(new, i)) for i in sel}
                for i in sel:
                    if ns[i] > r[i]:
                        new[i] = new[i] * (r[i] / ns[i])
            elif cfg["norm"] == "l2":
                inside = math.sqrt(sum(float((new[i] ** 2).sum()) / r[i] ** 2 for i in sel if r[i] > 0))
                for i in sel:
                    if r[i] == 0:
                        new[i] = torch.zeros_like(new[i])
                    elif inside > 1:
                        new[i] = new[i] / inside
            if cfg["norm"] == "linf":
                for i in sel:
                    new[i] = new[i].clamp(-r[i], r[i])
        delta = new
        g = grad_at(delta)
        gs.append(g)
    if cfg["descent"] == "last":  # AWP's Algorithm 1: the gradient at the end of the ascent
        c = [0.0] * K + [1.0]
    else:
        c = [1.0 / (K + 1)] * (K + 1) if cfg["include_clean"] else [0.0] + [1.0 / K] * K
    with torch.no_grad():
        for p, w in zip(ps, w0):
            p.copy_(w)
        for i, p in enumerate(ps):
            p.grad = sum(c[k] * gs[k][i] for k in range(K + 1))


# ---- presets and their direct configuration ----------------------------------------


def _cfg(
    model,
    norm="l2",
    scope="global",
    steps=1,
    relative=False,
    adaptive_eta=None,
    include_clean=False,
    radius=0.0,
    step=None,
    selected=None,
    descent="mean",
):
    ps = list(model.parameters())
    return dict(
        descent=descent,
        norm=norm,
        scope=scope,
        steps=steps,
        relative=relative,
        adaptive_eta=adaptive_eta,
        include_clean=include_clean,
        radius=[radius] * len(ps),
        step=[radius if step is None else step] * len(ps),
        selected=selected if selected is not None else [True] * len(ps),
    )


PRESETS = {
    "sam": (lambda ps, b, kw: fp.SAM(ps, b, rho=0.3, **kw), lambda m: _cfg(m, radius=0.3)),
    "sam_adaptive": (
        lambda ps, b, kw: fp.SAM(ps, b, rho=0.4, adaptive=True, **kw),
        lambda m: _cfg(m, radius=0.4, adaptive_eta=0.0),
    ),
    "asam": (
        lambda ps, b, kw: fp.ASAM(ps, b, rho=0.5, eta=0.01, **kw),
        lambda m: _cfg(m, radius=0.5, adaptive_eta=0.01),
    ),
    "awp": (
        lambda ps, b, kw: fp.AWP(ps, b, gamma=0.1, **kw),
        lambda m: _cfg(m, scope="layer", relative=True, radius=0.1, selected=[p.dim() > 1 for p in m.parameters()]),
    ),
    "awp_3steps": (
        lambda ps, b, kw: fp.AWP(ps, b, gamma=0.1, steps=3, **kw),
        lambda m: _cfg(
            m, scope="layer", relative=True, radius=0.1, steps=3, selected=[p.dim() > 1 for p in m.parameters()]
        ),
    ),
    "awp_last": (  # one step: the same as the mean
        lambda ps, b, kw: fp.AWP(ps, b, gamma=0.1, descent="last", **kw),
        lambda m: _cfg(m, scope="layer", relative=True, radius=0.1, selected=[p.dim() > 1 for p in m.parameters()]),
    ),
    "awp_3steps_last": (
        lambda ps, b, kw: fp.AWP(ps, b, gamma=0.1, steps=3, descent="last", **kw),
        lambda m: _cfg(
            m,
            scope="layer",
            relative=True,
            radius=0.1,
            steps=3,
            selected=[p.dim() > 1 for p in m.parameters()],
            descent="last",
        ),
    ),
    "apd": (
        lambda ps, b, kw: fp.APD(ps, b, eps=0.2, **kw),
        lambda m: _cfg(m, steps=3, radius=0.2, step=1.5 * 0.2 / 3, include_clean=True),
    ),
    "apd_1step": (
        lambda ps, b, kw: fp.APD(ps, b, eps=0.2, steps=1, **kw),  # eta = 1.5 eps > eps: projected
        lambda m: _cfg(m, steps=1, radius=0.2, step=0.3, include_clean=True),
    ),
    "apd_linf_layer_relative": (
        lambda ps, b, kw: fp.APD(ps, b, eps=0.05, steps=2, norm="linf", scope="layer", relative=True, **kw),
        lambda m: _cfg(
            m, norm="linf", scope="layer", relative=True, steps=2, radius=0.05, step=1.5 * 0.05 / 2, include_clean=True
        ),
    ),
    "apd_linf_global_noclean": (
        lambda ps, b, kw: fp.APD(ps, b, eps=0.03, steps=2, norm="linf", step_size=0.02, include_clean=False, **kw),
        lambda m: _cfg(m, norm="linf", steps=2, radius=0.03, step=0.02),
    ),
    "apd_l2_layer_relative": (
        lambda ps, b, kw: fp.APD(ps, b, eps=0.1, steps=2, scope="layer", relative=True, **kw),
        lambda m: _cfg(m, scope="layer", relative=True, steps=2, radius=0.1, step=0.075, include_clean=True),
    ),
    # relative to the norm of all the weights together (not the sum of the tensors' norms)
    "apd_l2_global_relative": (
        lambda ps, b, kw: fp.APD(ps, b, eps=0.05, steps=2, scope="global", relative=True, **kw),
        lambda m: _cfg(m, relative=True, steps=2, radius=0.05, step=0.0375, include_clean=True),
    ),
    # passive tensors (biases) still get sum_k c_k g_k, accumulated across the passes
    "apd_weights_only": (
        lambda ps, b, kw: fp.APD(ps, b, eps=0.2, steps=2, perturb_filter=lambda p: p.dim() > 1, **kw),
        lambda m: _cfg(
            m, steps=2, radius=0.2, step=0.15, include_clean=True, selected=[p.dim() > 1 for p in m.parameters()]
        ),
    ),
    "apd_1step_weights_only": (
        lambda ps, b, kw: fp.APD(ps, b, eps=0.2, steps=1, perturb_filter=lambda p: p.dim() > 1, **kw),
        lambda m: _cfg(
            m, steps=1, radius=0.2, step=0.3, include_clean=True, selected=[p.dim() > 1 for p in m.parameters()]
        ),
    ),
    # the engine-driven base class with a spec of one's own
    "generic_linf_layer": (
        lambda ps, b, kw: fp.PerturbOptimizer(
            ps, b, PerturbSpec(norm="linf", scope="layer", steps=2), 0.02, 0.015, **kw
        ),
        lambda m: _cfg(m, norm="linf", scope="layer", steps=2, radius=0.02, step=0.015),
    ),
    "generic_l2_global_relative": (  # no clean term: the route that measures the weights with g_0
        lambda ps, b, kw: fp.PerturbOptimizer(
            ps, b, PerturbSpec(norm="l2", scope="global", steps=2, relative=True), 0.05, 0.04, **kw
        ),
        lambda m: _cfg(m, relative=True, steps=2, radius=0.05, step=0.04),
    ),
}

N_STEPS = 4


def _run_pair(preset, base, backend, first_second=False):
    make_opt, make_cfg = PRESETS[preset]
    base_cls, base_kw = BASES[base]
    model = make_model()
    ref_model = copy.deepcopy(model)
    plain_model = copy.deepcopy(model)
    opt = make_opt(model.parameters(), base_cls, dict(base_kw))
    ref_opt = base_cls(ref_model.parameters(), **base_kw)
    plain_opt = base_cls(plain_model.parameters(), **base_kw)
    traj = []
    with fp.use_backend(backend):
        for s in range(N_STEPS):
            if first_second:
                opt.zero_grad()
                loss_of(model, s).backward()
                opt.first_step(zero_grad=True)
                loss_of(model, s).backward()
                opt.second_step(zero_grad=True)
            else:

                def closure():
                    loss = loss_of(model, s)
                    loss.backward()
                    return loss

                loss = opt.step(closure)
                assert math.isclose(loss.item(), loss_of(ref_model, s).item(), rel_tol=1e-9)
            direct_descent_grad(ref_model, s, make_cfg(ref_model))
            ref_opt.step()
            plain_opt.zero_grad()
            loss_of(plain_model, s).backward()
            plain_opt.step()
            traj.append(
                [
                    (p.detach().clone(), q.detach().clone(), u.detach().clone())
                    for p, q, u in zip(model.parameters(), ref_model.parameters(), plain_model.parameters())
                ]
            )
    return traj


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_matches_direct_equations(preset, base, backend):
    traj = _run_pair(preset, base, backend)
    for s, params in enumerate(traj):  # one step, then several
        for p, q, _ in params:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8, msg=lambda m: f"step {s}: {m}")
    # the perturbation really changed the trajectory: a test that can fail
    moved = max(float((p - u).abs().max()) for p, _, u in traj[-1])
    assert moved > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "preset", ["awp", "awp_3steps", "awp_3steps_last", "apd_l2_layer_relative", "generic_l2_global_relative"]
)
@pytest.mark.parametrize("one_pass", [True, False])
def test_relative_l2_radii_measured_with_g0_follow_the_equations(preset, backend, one_pass, monkeypatch):
    """The clean point of a relative l2 cycle measures the weights and g_0 in one pass (``dot_stats``) where the
    tensors are large enough on average (``engine.ONE_PASS_MIN_MEAN_NUMEL``), else in two (``norms``, then
    ``grad_stats_``); both follow the equations, the global scope's too. APD sums g_0 (its clean term): always two
    passes."""
    from fastperturb import engine, ops

    monkeypatch.setattr(engine, "ONE_PASS_MIN_MEAN_NUMEL", 0 if one_pass else 1 << 40)
    calls = []
    dot_stats = ops.dot_stats
    monkeypatch.setattr(ops, "dot_stats", lambda x, y: calls.append(len(x)) or dot_stats(x, y))
    traj = _run_pair(preset, "sgd", backend)
    for s, params in enumerate(traj):
        for p, q, _ in params:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8, msg=lambda m: f"step {s}: {m}")
    assert max(float((p - u).abs().max()) for p, _, u in traj[-1]) > 1e-4
    assert len(calls) == (N_STEPS if one_pass and not preset.startswith("apd") else 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_awp_descent_last_is_algorithm_1_and_keeps_no_accumulator(backend):
    """AWP's ``descent="last"`` (the paper's Algorithm 1 for K > 1: the base step takes the gradient at the end of the
    ascent) differs from the default mean over the perturbed passes, needs no accumulator, is the mean's step bit
    for bit with one step, and survives a state-dict round trip; PerturbSpec refuses it with the clean term."""
    last = _run_pair("awp_3steps_last", "sgd", backend)
    mean = _run_pair("awp_3steps", "sgd", backend)
    assert max(float((p - q).abs().max()) for (p, _, _), (q, _, _) in zip(last[-1], mean[-1])) > 1e-5
    model = make_model()
    opt = fp.AWP(model.parameters(), torch.optim.SGD, gamma=0.1, steps=3, descent="last", lr=0.1)

    def closure():
        loss = loss_of(model, 0)
        loss.backward()
        return loss

    with fp.use_backend(backend):
        opt.step(closure)
    assert opt.buffer_count()[1] == 0 and not opt.spec.accumulates
    again = fp.AWP(model.parameters(), torch.optim.SGD, gamma=0.1, steps=3, lr=0.1)
    with fp.use_backend(backend):
        again.step(closure)  # (the mean keeps accumulators)
    assert again.buffer_count()[1] > 0
    again.load_state_dict(opt.state_dict())
    assert again.spec.descent == "last"
    with fp.use_backend(backend):
        again.step(closure)
    assert again.buffer_count()[1] == 0  # a loaded spec that sums no passes keeps none alive
    for (p, _, _), (q, _, _) in zip(_run_pair("awp", "sgd", backend)[-1], _run_pair("awp_last", "sgd", backend)[-1]):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="cannot include the clean one"):
        PerturbSpec(steps=2, include_clean=True, descent="last")


@pytest.mark.parametrize("descent", ["last", "mean"])
def test_per_pass_clipping_is_exact_where_the_optimizer_says_so(descent):
    """Clipping each pass's gradient (a framework's closure: Lightning without the mixin) takes the step that clipping
    the descent gradient takes when the ascent ignores the gradient's length and G is the last pass's gradient: AWP
    with ``descent="last"``, several steps. The mean of the passes is not, and says so (Lightning refuses it)."""
    runs = []
    for per_pass in (True, False):
        model = make_model()
        ps = list(model.parameters())
        kw = {} if per_pass else {"max_grad_norm": 0.01}
        opt = fp.AWP(ps, torch.optim.SGD, gamma=0.5, steps=3, descent=descent, lr=0.1, **kw)
        for s in range(3):

            def closure():
                loss = loss_of(model, s)
                loss.backward()
                if per_pass:
                    torch.nn.utils.clip_grad_norm_(ps, 0.01)
                return loss

            opt.step(closure)
            opt.zero_grad()
        runs.append(torch.cat([p.detach().flatten() for p in ps]))
    assert opt.per_pass_clipping_is_exact() == (descent == "last")
    gap = float((runs[0] - runs[1]).abs().max())
    assert gap < 1e-8 if descent == "last" else gap > 1e-6, gap


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", ["sam", "asam", "awp", "apd_1step", "apd_1step_weights_only"])
def test_first_second_step_equals_step(preset, backend):
    a = _run_pair(preset, "sgd", backend, first_second=False)
    b = _run_pair(preset, "sgd", backend, first_second=True)
    for pa, pb in zip(a, b):
        for (p, _, _), (q, _, _) in zip(pa, pb):
            assert torch.equal(p, q)


def follow_direct(opt, model, ref_opt, ref, cfg, backend: str, steps: int = 3) -> None:
    """``steps`` steps of ``opt`` on ``model`` beside the direct equations (``cfg``) and ``ref_opt`` on ``ref``."""
    with fp.use_backend(backend):
        for s in range(steps):

            def closure():
                loss = loss_of(model, s)
                loss.backward()
                return loss

            opt.step(closure)
            direct_descent_grad(ref, s, cfg)
            ref_opt.step()
            for p, q in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_group_radius_and_excluded_group(backend):
    """Groups with their own rho, and a perturb=False group: its tensors are not moved but
    still descend with the gradient at the perturbed point."""
    model = make_model()
    ref = copy.deepcopy(model)
    l1, l2 = model[0], model[2]
    opt = fp.SAM(
        [
            {"params": [l1.weight], "rho": 0.5},
            {"params": [l1.bias]},
            {"params": list(l2.parameters()), "perturb": False},
        ],
        torch.optim.SGD,
        rho=0.2,
        lr=0.1,
        momentum=0.9,
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    cfg = _cfg(ref, radius=0.0)
    cfg["radius"] = cfg["step"] = [0.5, 0.2, 0.0, 0.0]
    cfg["selected"] = [True, True, False, False]
    follow_direct(opt, model, ref_opt, ref, cfg, backend)
    assert opt.buffer_count() == (2, 0)  # one backup per perturbed tensor, no accumulator for SAM


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("step_sizes", [(None, None), (0.01, 0.05), (0.02, 0.01)])
def test_apd_global_scope_with_per_group_radii(backend, steps, step_sizes):
    """A global l2 ball with a radius per group is the ellipsoid sum_i ||delta_i||^2 / eps_i^2 <= 1 (SAM's per-group
    rho in the same scope: rho_group * g / ||g|| lies on its boundary). Until this round each tensor was projected
    by its own radius over the norm of the whole perturbation: the small group was shrunk by the others'
    perturbation and the large one left outside its radius, and the point depended on the number of steps."""
    model = make_model()
    ref = copy.deepcopy(model)
    a, b = step_sizes
    opt = fp.APD(
        [
            {"params": list(model[0].parameters()), "eps": 0.01, **({} if a is None else {"step_size": a})},
            {"params": [model[2].weight], "eps": 0.05, **({} if b is None else {"step_size": b})},
            {"params": [model[2].bias], "eps": 0.0},  # (a radius 0: never moved, still descends)
        ],
        torch.optim.SGD,
        eps=0.02,
        steps=steps,
        lr=0.1,
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    cfg = _cfg(ref, steps=steps, include_clean=True)
    cfg["radius"] = [0.01, 0.01, 0.05, 0.0]
    cfg["step"] = [1.5 * e / steps if x is None else x for e, x in ((0.01, a), (0.01, a), (0.05, b), (0.0, None))]
    follow_direct(opt, model, ref_opt, ref, cfg, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_apd_global_per_group_radii_on_a_linear_loss_closed_form(backend, steps):
    """On a linear loss every ascent step points along the same g: the k-th of K default steps (1.5 eps_i / K each)
    reaches delta_i = min(1.5 k / K, 1) * eps_i * g_i / ||g||, on the ellipsoid's boundary from 1.5 k >= K on."""
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([3.0, -1.0], dtype=torch.float64))
    ca, cb = torch.tensor([3.0, 32.0], dtype=torch.float64), torch.tensor([6.0, -1.0], dtype=torch.float64)
    a0, b0 = a.detach().clone(), b.detach().clone()
    seen = []

    def closure():
        seen.append((a.detach() - a0, b.detach() - b0))
        loss = (ca * a).sum() + (cb * b).sum()
        loss.backward()
        return loss

    opt = fp.APD([{"params": [a], "eps": 0.01}, {"params": [b], "eps": 0.05}], torch.optim.SGD, steps=steps, lr=0.1)
    with fp.use_backend(backend):
        opt.step(closure)
    gnorm = torch.cat([ca, cb]).norm()
    assert len(seen) == steps + 1  # (seen[0]: the clean pass)
    for k, (da, db) in enumerate(seen[1:], start=1):
        reach = min(1.5 * k / steps, 1.0)
        torch.testing.assert_close(da, reach * 0.01 * ca / gnorm, rtol=1e-6, atol=0)
        torch.testing.assert_close(db, reach * 0.05 * cb / gnorm, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apd_per_group_eps_and_step_size(backend):
    model = make_model()
    ref = copy.deepcopy(model)
    opt = fp.APD(
        [
            # AdamW has its own eps, so APD's per-group radius is "perturb_eps" here
            {"params": list(model[0].parameters()), "perturb_eps": 0.3, "step_size": 0.1},
            {"params": list(model[2].parameters())},
        ],
        torch.optim.AdamW,
        eps=0.05,
        steps=2,
        scope="layer",
        lr=0.01,
    )
    assert opt.radius_key == "perturb_eps" and opt.param_groups[0]["eps"] == 1e-8
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01)
    cfg = _cfg(ref, scope="layer", steps=2, include_clean=True)
    cfg["radius"] = [0.3, 0.3, 0.05, 0.05]
    cfg["step"] = [0.1, 0.1, 1.5 * 0.05 / 2, 1.5 * 0.05 / 2]
    follow_direct(opt, model, ref_opt, ref, cfg, backend)
    # one backup per perturbed tensor, one accumulator per tensor with a gradient
    assert opt.buffer_count() == (4, 4)
