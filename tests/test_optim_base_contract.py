"""What the wrapper takes from torch.optim's contract beyond step(): hooks, and the base optimizers and settings it
refuses because it cannot honour them (found by this round's optimizer-semantics review)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastperturb as fp


def _w():
    return torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(0)))


def _closure(w):
    def closure():
        loss = (w**2).sum() + w.sum()
        loss.backward()
        return loss

    return closure


PRESETS = {
    "SAM": lambda ps, **kw: fp.SAM(ps, torch.optim.SGD, lr=0.1, **kw),
    "APD": lambda ps, **kw: fp.APD(ps, torch.optim.SGD, steps=1, lr=0.1, **kw),
    "GSAM": lambda ps, **kw: fp.GSAM(ps, torch.optim.SGD, lr=0.1, **kw),
    "FriendlySAM": lambda ps, **kw: fp.FriendlySAM(ps, torch.optim.SGD, lr=0.1, **kw),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_max_grad_norm_zero_is_refused_built_or_loaded(name):
    """0 would scale every descent gradient to zero (a run that trains nothing, only weight decay and momentum):
    refused at construction and in a loaded state dict, which then changes nothing."""
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        PRESETS[name]([_w()], max_grad_norm=0.0)
    w = _w()
    opt = PRESETS[name]([w], max_grad_norm=1.0)
    opt.step(_closure(w))
    sd = opt.state_dict()
    sd["fastperturb"]["max_grad_norm"] = 0.0
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        opt.load_state_dict(sd)
    assert opt.max_grad_norm == 1.0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_state_dict_hooks_on_the_wrapper_run(name):
    w = _w()
    opt = PRESETS[name]([w])
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 7})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    opt.step(_closure(w))
    sd = opt.state_dict()
    assert sd["extra"] == 7 and calls == ["save-pre"]
    opt.load_state_dict(sd)  # the pre hook drops "extra" (the base optimizer would refuse it otherwise)
    assert calls == ["save-pre", "load-post"]


@pytest.mark.parametrize("name", ["SAM", "APD", "GSAM"])
def test_step_hooks_run_around_the_two_calls_as_around_step(name):
    """An EMA or a logger registered as a step hook runs in the two-call convention too, once per step: the pre-hook
    when first_step() starts, at the clean weights, where step() runs it; the post-hook after second_step()."""
    w = _w()
    opt = PRESETS[name]([w])
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", w.detach().clone())))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", w.detach().clone())))
    _closure(w)()
    w0 = w.detach().clone()
    opt.first_step()
    assert [s for s, _ in seen] == ["pre"] and torch.equal(seen[0][1], w0)
    _closure(w)()
    opt.second_step()
    assert [s for s, _ in seen] == ["pre", "post"]
    assert not torch.equal(seen[1][1], w0)  # after the base step
    assert torch.equal(seen[1][1], w.detach())


@pytest.mark.parametrize("name", ["SAM", "GSAM", "FriendlySAM"])
def test_a_pre_hook_that_changes_the_weights_takes_effect_in_both_conventions(name):
    """A step pre-hook that shrinks the weights (a constraint applied before the step): in step() it runs at the
    clean weights and the step starts from what it wrote. In the two-call convention it ran in second_step(), at
    the perturbed weights, and the restore overwrote what it wrote (0.13 off after 4 steps in the review); now
    both conventions take the same steps, bit for bit."""
    make = {**PRESETS, "FriendlySAM": lambda ps, **kw: fp.FriendlySAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, **kw)}
    runs = []
    for two_calls in (False, True):
        w = _w()
        opt = make[name]([w])

        def shrink(o, args, kwargs, w=w):
            w.data.mul_(0.9)

        opt.register_step_pre_hook(shrink)
        for _ in range(4):
            _closure(w)()  # g_0, by the caller in both conventions
            if two_calls:
                opt.first_step()
                _closure(w)()
                opt.second_step()
            else:
                opt.step(_closure(w))
            opt.zero_grad()
        runs.append(w.detach().clone())
    assert torch.equal(*runs)


def test_a_base_optimizer_that_needs_a_closure_is_refused_at_construction():
    with pytest.raises(TypeError, match=r"LBFGS.step\(\) needs a closure"):
        fp.SAM([_w()], torch.optim.LBFGS, lr=0.1)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_maximize_is_refused_before_anything_moves(name):
    w = _w()
    with pytest.raises(ValueError, match=r"param_groups\[0\] has maximize=True"):
        PRESETS[name]([w], maximize=True)
    opt = PRESETS[name]([w])
    opt.param_groups[0]["maximize"] = True  # set later, as a schedule or a user may
    w0 = w.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\] has maximize=True"):
        opt.step(_closure(w))
    assert torch.equal(w.detach(), w0)


def test_per_group_adaptive_and_eta_are_refused_unless_they_match():
    """davda54's and pytorch-optimizer's SAM read ``adaptive`` per group; here it is the optimizer's (so is ASAM's
    eta). A group that sets it otherwise was silently ignored: now refused, at construction or at the step,
    before any weight moves; a group that repeats the optimizer's value is fine."""
    p = torch.nn.Parameter(torch.randn(3))

    def closure():
        loss = (p**2).sum()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="takes adaptive for the whole optimizer"):
        fp.SAM([{"params": [p], "adaptive": True}], torch.optim.SGD, lr=0.1)
    opt = fp.SAM([{"params": [p], "adaptive": True}], torch.optim.SGD, lr=0.1, adaptive=True)
    opt.step(closure)
    opt.param_groups[0]["adaptive"] = False
    before = p.detach().clone()
    with pytest.raises(ValueError, match="takes adaptive for the whole optimizer"):
        opt.step(closure)
    assert torch.equal(p, before)
    asam = fp.ASAM([p], torch.optim.SGD, lr=0.1, eta=0.01)
    asam.param_groups[0]["eta"] = 0.1
    with pytest.raises(ValueError, match="takes eta for the whole optimizer"):
        asam.step(closure)
    assert torch.equal(p, before)


@pytest.mark.parametrize(
    "make, key, other",
    [
        (lambda g: fp.APD(g, torch.optim.SGD, lr=0.1, steps=3), "steps", 5),
        (lambda g: fp.APD(g, torch.optim.SGD, lr=0.1), "norm", "linf"),
        (lambda g: fp.APD(g, torch.optim.SGD, lr=0.1), "scope", "layer"),
        (lambda g: fp.APD(g, torch.optim.SGD, lr=0.1), "relative", True),
        (lambda g: fp.APD(g, torch.optim.SGD, lr=0.1), "include_clean", False),
        (lambda g: fp.AWP(g, torch.optim.SGD, lr=0.1), "steps", 2),
        (lambda g: fp.AWP(g, torch.optim.SGD, lr=0.1, steps=2), "descent", "last"),
    ],
)
def test_a_group_setting_of_the_trajectory_is_refused(make, key, other):
    """APD's and AWP's trajectory (steps, norm, scope, ...) is the optimizer's: a group setting it otherwise was
    silently ignored (found by the presets review); refused now, and a group repeating the value is fine."""
    w = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match=f"takes {key} for the whole optimizer"):
        make([{"params": [w], key: other}])
    opt = make([{"params": [w]}])
    make([{"params": [torch.nn.Parameter(torch.randn(3, 2))], key: getattr(opt.spec, key)}])


def test_sparse_adam_is_refused_at_construction():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="SparseAdam steps only on sparse gradients"):
        fp.SAM([p], torch.optim.SparseAdam, lr=0.1)


@pytest.mark.parametrize("two_call", [False, True])
def test_a_step_inside_an_autocast_region_perturbs_the_pass(two_call):
    """autocast caches the bf16 copies of the weights until its outermost region exits: a step taken inside one
    gave the perturbed pass the clean weights' copies, so the step was the base optimizer's. Inside or outside an
    outer region, the same step now."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    results = []
    for outer in (False, True):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        opt = fp.SAM(m.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)

        def loss_fn():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(x)
            return ((out.float() - y) ** 2).mean()

        def closure():
            loss = loss_fn()
            loss.backward()
            return loss

        region = torch.autocast("cpu", dtype=torch.bfloat16) if outer else contextlib.nullcontext()
        for _ in range(2):
            with region:
                if two_call:
                    loss_fn().backward()
                    opt.first_step(zero_grad=True)
                    loss_fn().backward()
                    opt.second_step(zero_grad=True)
                else:
                    opt.step(closure)
                    opt.zero_grad()
        results.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_add_param_group_fills_a_new_group_from_opt_defaults_as_torch_does():
    """torch.optim fills a new group's missing settings from ``self.defaults``; an edit of ``opt.defaults`` (its own
    dict: the base optimizer's defaults and the perturbation's) was ignored, the group took the constructor's."""
    w, head = _w(), torch.nn.Parameter(torch.ones(2))
    opt = PRESETS["SAM"]([w], rho=0.05, momentum=0.9)
    plain = torch.optim.SGD([_w()], lr=0.1, momentum=0.9)
    for o in (opt, plain):
        o.defaults["lr"] = 0.5
    opt.defaults["rho"] = 0.2
    opt.add_param_group({"params": [head]})
    plain.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    assert opt.param_groups[1]["lr"] == plain.param_groups[1]["lr"] == 0.5
    assert opt.param_groups[1]["rho"] == 0.2 and opt.param_groups[1]["momentum"] == 0.9
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["rho"] == 0.05
    opt.base_optimizer.defaults["momentum"] = 0.5  # an edit of the base's, where opt.defaults kept its own
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))]})
    assert opt.param_groups[2]["momentum"] == 0.5 and opt.param_groups[2]["lr"] == 0.5


@pytest.mark.parametrize("name", ["GSAM", "FriendlySAM", "WSAM", "LookSAM"])
def test_step_hooks_run_once_per_step_after_the_base_class_was_instantiated(name):
    """torch wraps a class's ``step`` with its hook runner when the first instance of that class is made. The family
    presets' ``step`` called ``PerturbOptimizer.step``, so once a ``PerturbOptimizer`` itself had been built in the
    process (any earlier test, a user's generic optimizer), every step ran its pre- and post-hooks twice (a pre-hook
    that shrinks the weights shrank them twice: 0.22 off after 4 steps). Each hook runs once per step now."""
    from fastperturb.engine import PerturbSpec

    fp.PerturbOptimizer([_w()], torch.optim.SGD, PerturbSpec(), 0.05, lr=0.1)  # patches PerturbOptimizer.step
    w = _w()
    opt = getattr(fp, name)([w], torch.optim.SGD, lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    for _ in range(2):
        opt.step(_closure(w))
    assert calls == ["pre", "post"] * 2
