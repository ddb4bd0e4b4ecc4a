"""The optimizer wrapper's contracts: param groups, errors, non-finite gradients,
exceptions, BatchNorm, clipping, accumulation, AMP, checkpoints, buffers."""

from __future__ import annotations

import copy
import io
import math
import re
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fastperturb as fp
from fastperturb.engine import NonFiniteGradient, PerturbSpec

X = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0, bn: bool = False, momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 10)]
    if bn:
        layers.append(nn.BatchNorm1d(10, momentum=momentum))
    layers += [nn.Tanh(), nn.Linear(10, 3)]
    return nn.Sequential(*layers)


def closure_for(model, opt=None, scale=None, x=X, y=Y, hook=None):
    calls = [0]

    def closure():
        k = calls[0]
        calls[0] += 1
        loss = nn.functional.cross_entropy(model(x), y)
        if hook is not None:
            loss = hook(k, loss)
        (scale(loss) if scale is not None else loss).backward()
        return loss

    closure.calls = calls
    return closure


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_bit_identical(model, snap):
    for p, q in zip(model.parameters(), snap):
        assert torch.equal(p, q) and not p.isnan().any()


PRESETS = {
    "sam": lambda ps, **kw: fp.SAM(ps, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, **kw),
    "asam": lambda ps, **kw: fp.ASAM(ps, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, **kw),
    "awp": lambda ps, **kw: fp.AWP(ps, torch.optim.SGD, gamma=0.01, lr=0.1, momentum=0.9, **kw),
    "apd": lambda ps, **kw: fp.APD(ps, torch.optim.AdamW, eps=0.05, steps=3, lr=0.01, **kw),
}


# ---- param groups shared by identity --------------------------------------------------


def test_param_groups_shared_by_identity_and_scheduler(backend):
    model = make_model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state
    assert opt.defaults["lr"] == 0.1 and opt.defaults["rho"] == 0.05
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(3):
            before = snapshot(model)
            lr = opt.base_optimizer.param_groups[0]["lr"]
            opt.step(closure_for(model))
            sched.step()
            assert opt.base_optimizer.param_groups[0]["lr"] == lr * 0.5
            assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5**3


def test_add_param_group_goes_to_base_with_defaults(backend):
    model = make_model()
    extra = nn.Linear(3, 3)
    opt = fp.AWP(model.parameters(), torch.optim.SGD, gamma=0.02, lr=0.1)
    opt.add_param_group({"params": extra.parameters(), "gamma": 0.05})
    opt.add_param_group({"params": [nn.Parameter(torch.ones(2, 2))]})
    assert len(opt.base_optimizer.param_groups) == 3
    assert opt.param_groups[1]["gamma"] == 0.05 and opt.param_groups[1]["perturb"] is True
    assert opt.param_groups[2]["gamma"] == 0.02 and opt.param_groups[2]["lr"] == 0.1
    with pytest.raises(ValueError, match=r"param_groups\[3\]\['gamma'\]"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "gamma": -1.0})
    assert len(opt.param_groups) == 3

    def closure():
        loss = nn.functional.cross_entropy(extra(model(X)), Y)
        loss.backward()
        return loss

    w = extra.weight.detach().clone()
    opt.step(closure)
    assert not torch.equal(w, extra.weight)
    # two dim>1 weights of the model plus extra.weight are perturbed (the unused 2x2 has no grad)
    assert opt.buffer_count() == (3, 0)


# ---- bad arguments: a clear error naming the argument, nothing applied -----------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: fp.SAM(ps, torch.optim.SGD, rho=-0.1, lr=0.1), "rho"),
        (lambda ps: fp.SAM(ps, torch.optim.SGD, rho=float("nan"), lr=0.1), "rho"),
        (lambda ps: fp.ASAM(ps, torch.optim.SGD, eta=-1.0, lr=0.1), "eta"),
        (lambda ps: fp.AWP(ps, torch.optim.SGD, gamma=-5e-3, lr=0.1), "gamma"),
        (lambda ps: fp.AWP(ps, torch.optim.SGD, steps=0, lr=0.1), "steps"),
        (lambda ps: fp.AWP(ps, torch.optim.SGD, steps=2, descent="final", lr=0.1), "descent"),
        (lambda ps: fp.SAM(ps, torch.optim.SGD, descent="last", lr=0.1), "AWP"),  # AWP's keyword, not SAM's
        (lambda ps: fp.APD(ps, torch.optim.SGD, steps=0, lr=0.1), "steps"),
        (lambda ps: fp.APD(ps, torch.optim.SGD, steps=2.5, lr=0.1), "steps"),
        (lambda ps: fp.APD(ps, torch.optim.SGD, norm="l1", lr=0.1), "norm"),
        (lambda ps: fp.APD(ps, torch.optim.SGD, scope="model", lr=0.1), "scope"),
        (lambda ps: fp.APD(ps, torch.optim.SGD, step_size=float("inf"), lr=0.1), "step_size"),
        (lambda ps: fp.APD(ps, torch.optim.SGD, step_size=float("nan"), lr=0.1), "step_size"),
        (lambda ps: fp.APD(ps, torch.optim.SGD, eps=-1e-3, lr=0.1), "eps"),
        (lambda ps: fp.SAM(ps, torch.optim.SGD(ps, lr=0.1), lr=0.1), "base_optimizer"),
        (lambda ps: fp.SAM(ps, lambda p, **kw: torch.optim.SGD(p, **kw), lr=0.1), "base_optimizer"),
        (lambda ps: fp.SAM(ps, nn.Linear, lr=0.1), "base_optimizer"),
        (lambda ps: fp.SAM(ps, torch.optim.SGD, lr=0.1, max_grad_norm=-1.0), "max_grad_norm"),
        (lambda ps: fp.SAM(ps, torch.optim.SGD, lr=0.1, nonfinite="ignore"), "nonfinite"),
        (
            lambda ps: fp.SAM([{"params": ps[:2]}, {"params": ps[2:], "rho": -1.0}], torch.optim.SGD, lr=0.1),
            r"param_groups\[1\]\['rho'\]",
        ),
    ],
)
def test_bad_arguments(make, match):
    model = make_model()
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        make(list(model.parameters()))
    assert_bit_identical(model, before)


def test_bad_group_setting_at_step_time_touches_nothing(backend):
    model = make_model()
    opt = fp.APD(model.parameters(), torch.optim.SGD, eps=0.05, lr=0.1, momentum=0.9)
    opt.step(closure_for(model))
    state = copy.deepcopy(opt.state_dict())
    before = snapshot(model)
    opt.param_groups[0]["step_size"] = float("inf")
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['step_size'\]"):
        opt.step(closure_for(model))
    opt.param_groups[0]["step_size"] = None
    opt.param_groups[0]["eps"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['eps'\]"):
        opt.step(closure_for(model))
    assert_bit_identical(model, before)
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["momentum_buffer"], state["state"][k]["momentum_buffer"])


PASSES = [("sam", 0), ("sam", 1), ("asam", 1), ("awp", 0), ("awp", 1), ("apd", 0), ("apd", 2), ("apd", 3)]


@pytest.mark.parametrize("preset, bad_pass", PASSES)
def test_closure_returning_none(preset, bad_pass, backend):
    model = make_model()
    opt = PRESETS[preset](model.parameters())
    before = snapshot(model)
    closure = closure_for(model, hook=lambda k, loss: loss)
    inner = closure

    def returns_none_once():
        loss = inner()
        return None if inner.calls[0] - 1 == bad_pass else loss

    with pytest.raises(TypeError, match=f"closure returned None at pass {bad_pass}"):
        opt.step(returns_none_once)
    assert_bit_identical(model, before)


@pytest.mark.parametrize("preset, bad_pass", PASSES)
def test_closure_without_backward(preset, bad_pass, backend):
    model = make_model()
    opt = PRESETS[preset](model.parameters())
    opt.step(closure_for(model))  # grads exist (zeroed, not None) from an earlier step
    before = snapshot(model)
    calls = [0]

    def closure():
        k = calls[0]
        calls[0] += 1
        loss = nn.functional.cross_entropy(model(X), Y)
        if k != bad_pass:
            loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=f"did not call backward.. at pass {bad_pass}"):
        opt.step(closure)
    assert_bit_identical(model, before)


def test_step_without_closure_and_misused_sam_convention():
    model = make_model()
    opt = fp.APD(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    loss = nn.functional.cross_entropy(model(X), Y)
    loss.backward()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"APD.step\(\) takes a closure, .* not a Tensor"):
        opt.step(loss)  # the loss itself (it was "'Tensor' object is not callable" from inside the step)
    assert_bit_identical(model, before)
    with pytest.raises(RuntimeError, match="single-step"):
        opt.first_step()
    sam = fp.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="without first_step"):
        sam.second_step()
    with pytest.raises(TypeError, match="scaler"):
        sam.step(closure_for(model), scaler=object())


def _after_first_step():
    """A SAM optimizer with a first_step() pending: (model, optimizer, the weights before it)."""
    model = make_model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    before = snapshot(model)
    nn.functional.cross_entropy(model(X), Y).backward()
    opt.first_step()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    return model, opt, before


def test_no_backward_between_first_and_second_step_restores(backend):
    model, opt, before = _after_first_step()
    with pytest.raises(RuntimeError, match="no backward"):
        opt.second_step()
    assert_bit_identical(model, before)


def test_a_pending_first_step_is_refused_naming_restore(backend):
    # davda54's loop that `continue`s after first_step() (a skipped batch) leaves the weights perturbed: the next
    # call says so and names the way back
    model, opt, before = _after_first_step()
    nn.functional.cross_entropy(model(X), Y).backward()
    with pytest.raises(RuntimeError, match=r"first_step\(\) was called twice.*still perturbed.*opt\.restore\(\)"):
        opt.first_step()
    with pytest.raises(RuntimeError, match=r"without second_step\(\).*still perturbed.*opt\.restore\(\)"):
        opt.step(closure_for(model))
    opt.restore()
    assert_bit_identical(model, before)
    assert not opt.base_optimizer.state


# ---- exceptions at a perturbed point -----------------------------------------------------


class Boom(Exception):
    pass


@pytest.mark.parametrize("preset", list(PRESETS))
def test_closure_raising_at_perturbed_point_restores(preset, backend):
    model = make_model(bn=True)
    opt = PRESETS[preset](model.parameters(), freeze_bn=model)
    opt.step(closure_for(model))
    for bad in range(1, opt.spec.steps + 1):
        before = snapshot(model)

        def hook(k, loss, bad=bad):
            if k == bad:
                raise Boom(k)
            return loss

        with pytest.raises(Boom):
            opt.step(closure_for(model, hook=hook))
        assert_bit_identical(model, before)
        assert model[1].track_running_stats  # the BatchNorm freeze was undone
    opt.step(closure_for(model))  # and the optimizer is still usable


# ---- non-finite gradients -----------------------------------------------------------------


def nan_at(bad, where="all", model=None):
    def hook(k, loss):
        if k != bad:
            return loss
        if where == "all":
            return loss * float("nan")
        return loss + (model[2].bias * float("inf")).sum()  # inf/nan only in a passive (bias) grad

    return hook


@pytest.mark.parametrize("preset", list(PRESETS))
def test_nonfinite_gradient_skips_with_bit_identical_weights(preset, backend):
    model = make_model()
    opt = PRESETS[preset](model.parameters())
    opt.step(closure_for(model))
    for bad in range(opt.spec.steps + 1):  # g_0 .. g_K (the last one only shows in G)
        before = snapshot(model)
        state = copy.deepcopy(opt.base_optimizer.state_dict()["state"])
        opt.step(closure_for(model, hook=nan_at(bad)))
        assert opt.last_step_skipped
        assert_bit_identical(model, before)
        after = opt.base_optimizer.state_dict()["state"]
        for k in state:
            for name, v in state[k].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(after[k][name])), name
    assert opt.skipped_steps == opt.spec.steps + 1
    opt.step(closure_for(model))
    assert not opt.last_step_skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_only_in_passive_tensor_is_caught(backend):
    model = make_model()
    opt = fp.AWP(model.parameters(), torch.optim.SGD, gamma=0.01, lr=0.1, nonfinite="raise")
    before = snapshot(model)
    with pytest.raises(fp.NonFiniteDescentGradient, match=r"param_groups\[0\]\['params'\]\[3\]"):
        opt.step(closure_for(model, hook=nan_at(1, "passive", model)))
    assert_bit_identical(model, before)


@pytest.mark.parametrize("bad, exc", [(0, NonFiniteGradient), (1, NonFiniteGradient), (3, fp.NonFiniteDescentGradient)])
def test_nonfinite_raise_mode(bad, exc, backend):
    model = make_model()
    opt = fp.APD(model.parameters(), torch.optim.SGD, eps=0.05, lr=0.1, nonfinite="raise")
    before = snapshot(model)
    with pytest.raises(exc, match="non-finite"):
        opt.step(closure_for(model, hook=nan_at(bad)))
    assert_bit_identical(model, before)


def test_nonfinite_in_sam_convention(backend):
    model = make_model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    before = snapshot(model)
    (nn.functional.cross_entropy(model(X), Y) * float("nan")).backward()
    opt.first_step()
    assert_bit_identical(model, before)  # nothing perturbed
    nn.functional.cross_entropy(model(X), Y).backward()
    opt.second_step()
    assert opt.last_step_skipped
    assert_bit_identical(model, before)


@pytest.mark.parametrize(
    "make, dtype, says",
    [
        # a radius beyond float32: the coefficient eta / ||g|| overflows
        (
            lambda ps: fp.SAM(ps, torch.optim.SGD, rho=1e300, lr=0.1, nonfinite="raise"),
            torch.float32,
            r"a step size of up to 1e\+300 in 4 perturbed tensor\(s\), beyond float32's range",
        ),
        # AWP's relative radius gamma * ||w||; APD's eps over several steps
        (
            lambda ps: fp.AWP(ps, torch.optim.SGD, gamma=1e300, lr=0.1, nonfinite="raise"),
            torch.float32,
            "beyond float32",
        ),
        (lambda ps: fp.APD(ps, torch.optim.SGD, eps=1e300, lr=0.1, nonfinite="raise"), torch.float32, "beyond float32"),
        # a coefficient float32 holds, a step float16 weights do not (an element of about 1e6 / sqrt(60))
        (
            lambda ps: fp.SAM(ps, torch.optim.SGD, rho=1e6, lr=0.1, nonfinite="raise"),
            torch.float16,
            r"a perturbation of up to 1e\+06 on float16 weights, beyond float16's largest finite value 6.55e\+04",
        ),
    ],
)
def test_a_radius_the_weights_cannot_hold_is_named_in_the_error(make, dtype, says, backend):
    model = make_model().to(dtype)
    opt = make(model.parameters())
    before = snapshot(model)
    with pytest.raises(NonFiniteGradient, match="perturbed weights") as info:
        opt.step(closure_for(model, x=X.to(dtype)))
    assert re.search(says, str(info.value)) and "lower the radius" in str(info.value)
    assert_bit_identical(model, before)


def test_steps_that_add_up_beyond_the_weights_dtype_are_named_in_the_error(backend):
    # APD's three l-inf steps of 5e4 within a radius of 1e5: the first leaves the float16 weights finite, the second
    # takes them past 65504 (inputs small enough that the forward itself does not overflow first)
    torch.manual_seed(0)
    model = nn.Linear(6, 3).to(torch.float16)
    opt = fp.APD(model.parameters(), torch.optim.SGD, eps=1e5, norm="linf", lr=0.1, nonfinite="raise")
    before = snapshot(model)
    with pytest.raises(NonFiniteGradient, match="at pass 2") as info:
        opt.step(closure_for(model, x=X.to(torch.float16) * 1e-6))
    assert "a perturbation of up to 1e+05 on float16 weights" in str(info.value)
    assert_bit_identical(model, before)


def test_a_coefficient_beyond_float32_is_named_in_the_skip_warning(backend):
    # rho fits float32, rho / ||g|| does not: a gradient of about 1e-12
    model = make_model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=1e30, lr=0.1)
    before = snapshot(model)
    with pytest.warns(
        RuntimeWarning,
        match=r"step coefficient \(step size / gradient norm\) overflowed float32 in 4 perturbed tensor\(s\), "
        r"step sizes up to 1e\+30",
    ):
        opt.step(closure_for(model, hook=lambda k, loss: loss * 1e-12))
    assert opt.last_step_skipped
    assert_bit_identical(model, before)


def test_the_first_and_second_step_convention_names_an_overflowing_radius(backend):
    model = make_model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=1e300, lr=0.1, nonfinite="raise")
    before = snapshot(model)
    nn.functional.cross_entropy(model(X), Y).backward()
    opt.first_step()
    nn.functional.cross_entropy(model(X), Y).backward()
    with pytest.raises(fp.NonFiniteDescentGradient, match="lower the radius"):
        opt.second_step()
    assert_bit_identical(model, before)


@pytest.mark.parametrize("bad", [1, 3])
def test_a_nan_of_the_models_own_is_not_blamed_on_the_radius(bad, backend):
    model = make_model()
    opt = fp.APD(model.parameters(), torch.optim.SGD, eps=0.05, lr=0.1, nonfinite="raise")
    opt.step(closure_for(model))
    with pytest.raises(NonFiniteGradient) as info:
        opt.step(closure_for(model, hook=nan_at(bad)))
    assert "perturbed weights" not in str(info.value)


def test_a_step_that_overflowed_leaves_no_explanation_to_the_next(backend):
    model = make_model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=1e300, lr=0.1)
    with pytest.warns(RuntimeWarning, match="lower the radius"):
        opt.step(closure_for(model))
    # the next skip makes no ascent (g_0 is NaN, through first_step, which keeps no cycle for the note)
    opt.nonfinite = "raise"
    (nn.functional.cross_entropy(model(X), Y) * float("nan")).backward()
    with pytest.raises(NonFiniteGradient) as info:
        opt.first_step()
    assert "perturbed weights" not in str(info.value) and "lower the radius" not in str(info.value)
    # and a copy made mid-step (the cycle held for the note is not part of it)
    seen = []
    opt.nonfinite = "skip"
    for group in opt.param_groups:
        group["rho"] = 0.05

    def closure():
        seen.append(copy.deepcopy(opt))
        return closure_for(model)()

    opt.zero_grad()
    opt.step(closure)
    assert seen and all(o._last_cycle is None for o in seen)


# ---- BatchNorm --------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("preset", ["sam", "apd"])
def test_freeze_bn_keeps_running_stats_to_clean_passes(preset, momentum, backend):
    model = make_model(bn=True, momentum=momentum)
    twin = copy.deepcopy(model)  # sees only the clean passes
    opt = PRESETS[preset](model.parameters(), freeze_bn=model)
    plain = make_model(bn=True, momentum=momentum)
    plain_opt = PRESETS[preset](plain.parameters())
    for s in range(3):
        with torch.no_grad():
            for p, q in zip(twin.parameters(), model.parameters()):
                p.copy_(q)
        twin(X)
        opt.step(closure_for(model))
        plain_opt.step(closure_for(plain))
        bn, tbn = model[1], twin[1]
        assert int(bn.num_batches_tracked) == s + 1
        assert torch.equal(bn.running_mean, tbn.running_mean)
        assert torch.equal(bn.running_var, tbn.running_var)
        assert bn.track_running_stats
    # without the option every pass updates them (a control showing the test can fail)
    assert int(plain[1].num_batches_tracked) == 3 * (opt.spec.steps + 1)


def test_freeze_bn_in_sam_convention_and_context_manager():
    model = make_model(bn=True, momentum=None)
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, freeze_bn=model)
    nn.functional.cross_entropy(model(X), Y).backward()
    stats = model[1].running_mean.clone()
    opt.first_step()
    nn.functional.cross_entropy(model(X), Y).backward()
    assert torch.equal(model[1].running_mean, stats) and int(model[1].num_batches_tracked) == 1
    opt.second_step()
    assert model[1].track_running_stats
    with pytest.raises(Boom):
        with fp.frozen_bn_stats(model):
            model(X)
            raise Boom()
    assert int(model[1].num_batches_tracked) == 1 and model[1].track_running_stats
    model.eval()  # eval mode is left alone: running stats are used, not updated
    with fp.frozen_bn_stats(model):
        assert model[1].track_running_stats


def test_freeze_bn_leaves_a_layer_without_running_stats_as_it_was():
    # a BatchNorm built with track_running_stats=False has no running buffers: switching its flag on at the exit
    # would leave it claiming statistics it has not (its reset_parameters() then fails)
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10, track_running_stats=False), nn.Tanh(), nn.Linear(10, 3))
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, freeze_bn=model)
    opt.step(closure_for(model))
    assert not model[1].track_running_stats and model[1].running_mean is None
    model[1].reset_parameters()


# ---- clipping and accumulation ------------------------------------------------------------


def test_max_grad_norm_clips_the_descent_gradient(backend):
    model = make_model()
    free = copy.deepcopy(model)
    clipped = fp.APD(model.parameters(), torch.optim.SGD, eps=0.05, lr=1.0, max_grad_norm=0.01)
    unclipped = fp.APD(free.parameters(), torch.optim.SGD, eps=0.05, lr=1.0)
    w0 = snapshot(model)
    clipped.step(closure_for(model))
    unclipped.step(closure_for(free))
    G = [w - p.detach() for w, p in zip(w0, free.parameters())]
    Gc = [w - p.detach() for w, p in zip(w0, model.parameters())]
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in G))
    assert norm > 0.1
    for g, gc in zip(G, Gc):
        torch.testing.assert_close(gc, g * (0.01 / (norm + 1e-6)), rtol=1e-4, atol=3e-7)  # w - (w - G) rounding


@pytest.mark.parametrize("preset", list(PRESETS))
def test_gradient_accumulation_over_micro_batches(preset, backend):
    full = make_model()
    micro = copy.deepcopy(full)
    o_full = PRESETS[preset](full.parameters())
    o_micro = PRESETS[preset](micro.parameters())

    def micro_closure():
        total = 0.0
        for xs, ys in zip(X.chunk(4), Y.chunk(4)):
            loss = nn.functional.cross_entropy(micro(xs), ys) / 4
            loss.backward()
            total += loss.detach()
        return total

    for _ in range(3):
        lf = o_full.step(closure_for(full))
        lm = o_micro.step(micro_closure)
        torch.testing.assert_close(lm, lf.detach(), rtol=1e-5, atol=1e-6)
    for p, q in zip(full.parameters(), micro.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# ---- AMP ------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
def test_grad_scaler_matches_unscaled_run(preset, backend):
    a = make_model()
    b = copy.deepcopy(a)
    oa = PRESETS[preset](a.parameters(), max_grad_norm=0.05)  # small: clipping is active
    ob = PRESETS[preset](b.parameters(), max_grad_norm=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    for _ in range(4):
        oa.step(closure_for(a))
        ob.step(closure_for(b, scale=scaler.scale), scaler=scaler)
        scaler.update()
        assert not ob.last_step_skipped
    assert scaler.get_scale() > 2.0**12  # it grew: no step was reported as an overflow
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)  # directions are scale-invariant


@pytest.mark.parametrize("preset", list(PRESETS))
def test_grad_scaler_overflow_skips_and_backs_off(preset, backend):
    model = make_model()
    opt = PRESETS[preset](model.parameters(), nonfinite="raise")  # with a scaler overflow always skips
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38, backoff_factor=1e-34)
    before = snapshot(model)
    opt.step(closure_for(model, scale=scaler.scale), scaler=scaler)
    scaler.update()
    assert opt.last_step_skipped
    assert_bit_identical(model, before)
    assert scaler.get_scale() < 1e5
    opt.step(closure_for(model, scale=scaler.scale), scaler=scaler)
    scaler.update()
    assert not opt.last_step_skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_grad_scaler_overflow_the_radius_made_warns_once_as_backing_off_cannot_help(backend):
    model = make_model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=1e300, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match=r"under a GradScaler: a step size of up to 1e\+300.*keep skipping"):
        opt.step(closure_for(model, scale=scaler.scale), scaler=scaler)
    scaler.update()
    assert opt.last_step_skipped and scaler.get_scale() < 1024.0
    assert_bit_identical(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per optimizer
        opt.step(closure_for(model, scale=scaler.scale), scaler=scaler)
    # an ordinary overflow, a scale the gradients do not fit, stays silent
    quiet = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    big = torch.amp.GradScaler("cpu", init_scale=3e38)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.step(closure_for(model, scale=big.scale), scaler=big)
    assert quiet.last_step_skipped


def test_grad_scaler_overflow_at_perturbed_point(backend):
    model = make_model()
    opt = fp.APD(model.parameters(), torch.optim.SGD, eps=0.05, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = snapshot(model)
    opt.step(closure_for(model, scale=scaler.scale, hook=nan_at(2)), scaler=scaler)
    scaler.update()
    assert opt.last_step_skipped
    assert_bit_identical(model, before)
    assert scaler.get_scale() == 512.0


def test_grad_scaler_with_sam_convention(backend):
    a = make_model()
    b = copy.deepcopy(a)
    oa = fp.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    ob = fp.SAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for _ in range(2):
        oa.step(closure_for(a))
        scaler.scale(nn.functional.cross_entropy(b(X), Y)).backward()
        ob.first_step(scaler=scaler)
        scaler.scale(nn.functional.cross_entropy(b(X), Y)).backward()
        ob.second_step()
        scaler.update()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


_SCALED_PRESETS = {
    "sam": lambda ps: fp.SAM(ps, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9),
    "wsam": lambda ps: fp.WSAM(ps, torch.optim.SGD, rho=0.1, gamma=0.9, lr=0.1, momentum=0.9),
}


def _scaled_backward(model, scaler):
    scaler.scale(nn.functional.cross_entropy(model(X), Y)).backward()


@pytest.mark.parametrize("preset", list(_SCALED_PRESETS))
@pytest.mark.parametrize("where", ["before_first_step", "before_second_step"])
def test_callers_unscale_in_the_sam_convention_is_refused(preset, where, backend):
    # torch's AMP recipe (unscale_, clip, step) applied to the pair: the step unscales G itself, so the gradients
    # were unscaled twice (a step 1/1024 too short), or g_0 and g_1 mixed (WSAM), silently
    model = make_model()
    opt = _SCALED_PRESETS[preset](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = snapshot(model)
    _scaled_backward(model, scaler)
    if where == "before_first_step":
        scaler.unscale_(opt)
        with pytest.raises(RuntimeError, match=r"unscale_\(optimizer\) was called on g_0 before first_step.*max_grad"):
            opt.first_step(scaler=scaler)
    else:
        opt.first_step(scaler=scaler)
        _scaled_backward(model, scaler)
        scaler.unscale_(opt)
        with pytest.raises(RuntimeError, match=r"unscale_\(optimizer\) was called during the step.*max_grad_norm"):
            opt.second_step()  # (the scaler handed to first_step)
    assert_bit_identical(model, before)
    assert not opt.base_optimizer.state  # no base step was taken
    scaler.update()
    opt.zero_grad()
    _scaled_backward(model, scaler)  # the optimizer is usable afterwards
    opt.first_step(scaler=scaler)
    _scaled_backward(model, scaler)
    opt.second_step(scaler=scaler)
    assert not opt.last_step_skipped and opt.base_optimizer.state


@pytest.mark.parametrize("preset", list(_SCALED_PRESETS))
@pytest.mark.parametrize("g0_from_caller", [True, False])
def test_callers_unscale_in_the_closure_is_refused(preset, g0_from_caller, backend):
    model = make_model()
    opt = _SCALED_PRESETS[preset](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def closure():  # the AMP recipe's unscale_ and clip, inside the closure
        loss = nn.functional.cross_entropy(model(X), Y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return loss

    before = snapshot(model)
    if g0_from_caller:
        _scaled_backward(model, scaler)
    with pytest.raises(RuntimeError, match="unscale_.optimizer. was called (during the step|in the closure)"):
        opt.step(closure, scaler=scaler)
    assert_bit_identical(model, before)
    assert not opt.base_optimizer.state


def test_unscale_before_a_step_whose_closure_recomputes_g0_is_the_callers(backend):
    # Trainer's fp16 path: the gradient norm unscales g_0 through the scaler, then PerturbTrainer clears the
    # gradients and the closure computes every pass scaled: the same steps as a run that never unscaled
    a, b = make_model(), make_model()
    oa, ob = (
        fp.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1),
        fp.SAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1),
    )
    sa, sb = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(3):
        oa.step(closure_for(a, scale=sa.scale), scaler=sa)
        sa.update()
        _scaled_backward(b, sb)
        sb.unscale_(ob)
        ob.zero_grad()
        ob.step(closure_for(b, scale=sb.scale), scaler=sb)
        sb.update()
        assert not ob.last_step_skipped
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    # that allowance ends with its step: an unscale_ during the next one is refused again
    before = snapshot(b)
    _scaled_backward(b, sb)
    ob.first_step(scaler=sb)
    _scaled_backward(b, sb)
    sb.unscale_(ob)
    with pytest.raises(RuntimeError, match="during the step"):
        ob.second_step()
    assert_bit_identical(b, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu(dtype, backend):
    model = make_model()
    opt = fp.APD(model.parameters(), torch.optim.SGD, eps=0.05, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=128.0) if dtype == torch.float16 else None

    def closure():
        with torch.autocast("cpu", dtype=dtype):
            loss = nn.functional.cross_entropy(model(X), Y)
        (scaler.scale(loss) if scaler else loss).backward()
        return loss

    first = None
    for _ in range(10):
        loss = opt.step(closure, scaler=scaler)
        if scaler:
            scaler.update()
        first = first if first is not None else loss.item()
    assert loss.item() < first
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


# ---- checkpoints and buffers ----------------------------------------------------------------


def test_state_dict_round_trip_in_process(backend):
    model = make_model()
    opt = fp.APD(
        model.parameters(),
        torch.optim.AdamW,
        eps=0.05,
        steps=2,
        norm="linf",
        lr=0.01,
        max_grad_norm=3.0,
        nonfinite="raise",
    )
    for _ in range(2):
        opt.step(closure_for(model))
    sd = opt.state_dict()
    assert sd["fastperturb"]["spec"]["norm"] == "linf" and sd["fastperturb"]["max_grad_norm"] == 3.0
    assert sd["param_groups"][0]["perturb_eps"] == 0.05
    n_tensors = sum(torch.is_tensor(v) for s in sd["state"].values() for v in s.values())
    assert n_tensors == 3 * len(list(model.parameters()))  # step, exp_avg, exp_avg_sq: no perturbation buffers

    twin = copy.deepcopy(model)
    opt2 = fp.APD(twin.parameters(), torch.optim.AdamW, eps=0.5, steps=5, lr=0.5)
    opt2.load_state_dict(copy.deepcopy(sd))
    assert opt2.spec == opt.spec and opt2.max_grad_norm == 3.0 and opt2.nonfinite == "raise"
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.state is opt2.base_optimizer.state
    assert opt2.param_groups[0]["perturb_eps"] == 0.05 and opt2.param_groups[0]["lr"] == 0.01
    for _ in range(3):
        opt.step(closure_for(model))
        opt2.step(closure_for(twin))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)

    with pytest.raises(ValueError, match="from a APD optimizer, not SAM"):
        fp.SAM(twin.parameters(), torch.optim.AdamW, lr=0.1).load_state_dict(sd)

    # the loaded "raise" is the one that acts: a NaN gradient raises, with the weights as they were
    before = [p.detach().clone() for p in twin.parameters()]
    with pytest.raises(fp.NonFiniteGradient):
        opt2.step(closure_for(twin, hook=lambda k, loss: loss * float("nan") if k == 1 else loss))
    assert all(torch.equal(p, q) for p, q in zip(twin.parameters(), before))


@pytest.mark.parametrize("saved,loading", [("SGD", "AdamW"), ("AdamW", "SGD"), ("Adam", "AdamW")])
def test_a_state_dict_over_another_base_optimizer_is_refused_before_anything_loads(saved, loading):
    """An SGD state loaded into SAM over AdamW failed inside Adam's __setstate__ after taking SGD's groups (lr,
    momentum) and state: half loaded, the next step failed on 'betas'. AdamW's into SAM over SGD loaded silently
    and failed at the step. Both are refused now, with nothing changed (a plain base state dict, without the
    settings, still loads: test_load_plain_base_state_dict)."""
    kw = {"SGD": dict(lr=0.3, momentum=0.9), "AdamW": dict(lr=0.01), "Adam": dict(lr=0.02)}
    model = make_model()
    src = fp.SAM(model.parameters(), getattr(torch.optim, saved), rho=0.05, **kw[saved])
    src.step(closure_for(model))
    sd = src.state_dict()
    twin = copy.deepcopy(model)
    opt = fp.SAM(twin.parameters(), getattr(torch.optim, loading), rho=0.05, **kw[loading])
    opt.step(closure_for(twin))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=f"from SAM over {saved}, not over {loading}; nothing was loaded"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for i, s in before["state"].items():
        assert after["state"][i].keys() == s.keys()
        assert all(torch.equal(after["state"][i][k], v) for k, v in s.items())
    opt.step(closure_for(twin))  # still steps


def test_load_plain_base_state_dict():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    nn.functional.cross_entropy(model(X), Y).backward()
    base.step()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.07, lr=0.1, momentum=0.9)
    opt.load_state_dict(base.state_dict())
    assert opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[0]["rho"] == 0.07
    opt.step(closure_for(model))


def test_buffers_allocated_once_and_reused(backend):
    model = make_model()
    opt = fp.APD(model.parameters(), torch.optim.SGD, eps=0.05, lr=0.1)
    opt.step(closure_for(model))
    ptrs = {id(k): v.data_ptr() for k, v in {**opt._backups, **opt._accums}.items()}
    for _ in range(3):
        opt.step(closure_for(model))
    assert {id(k): v.data_ptr() for k, v in {**opt._backups, **opt._accums}.items()} == ptrs
    n = len(list(model.parameters()))
    assert opt.buffer_count() == (n, n)
    sam = fp.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    sam.step(closure_for(model))
    assert sam.buffer_count() == (n, 0)  # single step, no clean term: no accumulator


def test_closure_that_zeroes_grads_itself(backend):
    """torch.optim's LBFGS-style closures call zero_grad() first: same result."""
    a = make_model()
    b = copy.deepcopy(a)
    oa = fp.APD(a.parameters(), torch.optim.SGD, eps=0.05, lr=0.1, momentum=0.9)
    ob = fp.APD(b.parameters(), torch.optim.SGD, eps=0.05, lr=0.1, momentum=0.9)

    def zeroing_closure():
        ob.zero_grad()
        loss = nn.functional.cross_entropy(b(X), Y)
        loss.backward()
        return loss

    for _ in range(3):
        oa.step(closure_for(a))
        ob.step(zeroing_closure)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_deepcopy_keeps_a_working_optimizer(backend):
    model = make_model()
    opt = fp.AWP(model.parameters(), torch.optim.SGD, gamma=0.02, steps=2, lr=0.1, momentum=0.9)
    opt.step(closure_for(model))
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    assert opt2.buffer_count() == (0, 0)
    for _ in range(2):
        opt.step(closure_for(model))
        opt2.step(closure_for(model2))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_with_an_lr_scheduler_attached_step_themselves(how):
    """An LR scheduler wraps ``step`` on the optimizer instance; a copy (``copy.deepcopy``, ``torch.save`` of the
    objects) is a working optimizer of its own, as torch.optim's are: before, the copy's step() drove the original
    and pickling raised."""
    model = make_model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(closure_for(model))
    sched.step()
    if how == "deepcopy":
        model2, opt2, sched2 = copy.deepcopy((model, opt, sched))
    else:
        buf = io.BytesIO()
        torch.save((model, opt, sched), buf)
        buf.seek(0)
        model2, opt2, sched2 = torch.load(buf, weights_only=False)
    before = snapshot(model)
    for _ in range(2):
        opt2.step(closure_for(model2))
        sched2.step()
    assert_bit_identical(model, before)  # the original did not move
    for _ in range(2):
        opt.step(closure_for(model))
        sched.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.1 * 0.5**3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("preset", ["sam", "awp"])
def test_low_and_high_precision_parameters(preset, dtype, backend):
    model = make_model().to(dtype)
    opt = PRESETS[preset](model.parameters(), max_grad_norm=10.0)
    x = X.to(dtype)

    def closure():
        loss = nn.functional.cross_entropy(model(x).float(), Y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(15):
        loss = opt.step(closure)
    assert loss.item() < first and opt.skipped_steps == 0
    assert opt.buffer_count()[0] > 0 and all(b.dtype == dtype for b in opt._backups.values())
    before = snapshot(model)

    def boom():
        if boom.n == 1:
            raise Boom()
        boom.n += 1
        return closure()

    boom.n = 0
    with pytest.raises(Boom):
        opt.step(boom)
    assert_bit_identical(model, before)


def test_restore_undoes_first_step_and_scheduler_sees_second_step(backend):
    model = make_model(bn=True)
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, freeze_bn=model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = snapshot(model)
    nn.functional.cross_entropy(model(X), Y).backward()
    opt.first_step()
    assert not model[1].track_running_stats
    opt.restore()  # e.g. the forward at the perturbed point raised
    assert_bit_identical(model, before)
    assert model[1].track_running_stats
    opt.restore()  # nothing pending: no-op
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), Y).backward()
        opt.first_step()
        nn.functional.cross_entropy(model(X), Y).backward()
        opt.second_step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.05


@given(
    norm=st.sampled_from(["l2", "linf"]),
    scope=st.sampled_from(["layer", "global"]),
    steps=st.integers(1, 3),
    relative=st.booleans(),
    include_clean=st.booleans(),
    weights_only=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    fault=st.sampled_from(["nan", "inf_passive", "raise"]),
    data=st.data(),
)
def test_any_configuration_any_fault_leaves_weights_bit_identical(
    norm, scope, steps, relative, include_clean, weights_only, dtype, fault, data, backend
):
    model = make_model().to(dtype)
    spec = PerturbSpec(norm=norm, scope=scope, steps=steps, relative=relative, include_clean=include_clean)
    opt = fp.PerturbOptimizer(
        model.parameters(),
        torch.optim.SGD,
        spec,
        0.05,
        lr=0.1,
        momentum=0.9,
        perturb_filter=fp.optim.is_weight_matrix if weights_only else None,
    )
    x = X.to(dtype)
    bad = data.draw(st.integers(0, steps), label="bad pass")

    def closure(k=[0]):  # noqa: B006  (a call counter that lives as long as the closure)
        i = k[0]
        k[0] += 1
        loss = nn.functional.cross_entropy(model(x).float(), Y)
        if i == bad and fault == "raise":
            raise Boom()
        if i == bad and fault == "nan":
            loss = loss * float("nan")
        if i == bad and fault == "inf_passive":
            loss = loss + (model[2].bias.float() * float("inf")).sum()
        loss.backward()
        return loss

    before = snapshot(model)
    if fault == "raise":
        with pytest.raises(Boom):
            opt.step(closure)
    else:
        opt.step(closure)
        assert opt.last_step_skipped == (fault == "nan" or not weights_only or include_clean or bad > 0)
    if fault == "raise" or opt.last_step_skipped:
        assert_bit_identical(model, before)
    else:  # the inf only touched a passive g_0, which has weight c_0 = 0 in G
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_nothing_to_perturb_is_one_plain_pass(backend):
    """AWP warm-up: perturb=False in every group gives the base optimizer's step in one pass."""
    model = make_model()
    twin = copy.deepcopy(model)
    opt = fp.AWP(model.parameters(), torch.optim.SGD, gamma=0.01, steps=2, lr=0.1, momentum=0.9)
    base = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for group in opt.param_groups:
        group["perturb"] = False
    for _ in range(2):
        closure = closure_for(model)
        opt.step(closure)
        assert closure.calls[0] == 1
        base.zero_grad()
        nn.functional.cross_entropy(twin(X), Y).backward()
        base.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    opt.param_groups[0]["perturb"] = True  # warm-up over
    closure = closure_for(model)
    opt.step(closure)
    assert closure.calls[0] == 3


@pytest.mark.parametrize("how", ["view", "twice"])
@pytest.mark.parametrize("make", [fp.SAM, fp.GSAM], ids=["SAM", "GSAM"])
def test_parameters_sharing_memory_are_refused_before_anything_moves(how, make):
    """One tensor listed twice, or a parameter that is a view of another: the perturbation would hit the shared
    elements twice and restore could not be exact. Refused with both named, the weights untouched."""
    w = nn.Parameter(torch.randn(4, 3))
    other = nn.Parameter(w.data[:2]) if how == "view" else w
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"\['params'\]\[0\] and .*\['params'\]\[1\] share memory"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's own warning about a duplicate parameter
            opt = make([w, other], torch.optim.SGD, lr=0.1)

            def closure():
                loss = (w**2).sum() + (other**3).sum()
                loss.backward()
                return loss

            opt.step(closure)
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("spelling", ["tensor", "generator"])
@pytest.mark.parametrize("kind", ["view", "complex"])
def test_add_param_group_refuses_what_the_step_would_refuse_and_adds_nothing(kind, spelling):
    """A group whose tensor is a view of a parameter already there, or complex: refused by add_param_group itself,
    with the optimizer unchanged and still stepping. (Until this round the group was added, and every later step
    raised until it was removed by hand; given as a generator, as ``module.parameters()`` is, it was still added
    before the refusal.)"""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = fp.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    new = nn.Parameter(model.weight.data[:1]) if kind == "view" else nn.Parameter(torch.randn(2, dtype=torch.cfloat))
    with pytest.raises((ValueError, TypeError), match="share memory" if kind == "view" else "complex"):
        opt.add_param_group({"params": new if spelling == "tensor" else (p for p in [new])})
    assert len(opt.param_groups) == len(opt.base_optimizer.param_groups) == 1
    x, y = torch.randn(4, 3), torch.randn(4, 2)

    def closure():
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    before = model.weight.detach().clone()
    opt.step(closure)
    assert not torch.equal(model.weight.detach(), before)


def test_a_parameter_swapped_into_its_group_takes_its_part():
    """torch.optim lets a group's list be edited in place (``group['params'][i] = new``): the new tensor is
    perturbed and cleared between passes like the one it replaced; the steps equal a fresh optimizer's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randn(8, 2)

    def closure_for(m):
        def closure():
            loss = ((m(x) - y) ** 2).mean()
            loss.backward()
            return loss

        return closure

    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    opt.step(closure_for(model))
    opt.zero_grad()
    new = nn.Parameter(torch.randn(4, 3))
    model[0].weight = new
    opt.param_groups[0]["params"][0] = new
    opt.base_optimizer.state.clear()
    twin = copy.deepcopy(model)
    fresh = fp.SAM(twin.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    for _ in range(2):
        opt.step(closure_for(model))
        opt.zero_grad()
        fresh.step(closure_for(twin))
        fresh.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("when", ["after_a_raising_step", "in_the_clean_pass"])
def test_the_selection_held_within_a_step_is_checked_again_after_user_code(when):
    """step() checks the groups' tensors once and holds that selection between closure calls (a tenth of the checks
    it made; about 13% of a SAM step's own time on 1000 tensors). A swap made where user code runs is seen as before:
    after a step whose closure raised (the hold is released on the way out), and inside the closure's clean pass
    (checked again after each closure call). The steps then equal a fresh optimizer's on the swapped model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    new = nn.Parameter(torch.randn(4, 3))
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)

    def swap():
        model[0].weight = new
        opt.param_groups[0]["params"][0] = new

    calls = []

    def closure():
        calls.append(1)
        if when == "after_a_raising_step" and len(calls) == 1:
            raise RuntimeError("boom")
        if when == "in_the_clean_pass" and len(calls) == 1:
            swap()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    if when == "after_a_raising_step":
        with pytest.raises(RuntimeError, match="boom"):
            opt.step(closure)
        assert opt._pinned is None
        swap()
    # the fresh optimizer's model: this one as the step will find it, the swap made
    twin = copy.deepcopy(model)
    twin[0].weight = nn.Parameter(new.detach().clone())
    opt.step(closure)  # (in_the_clean_pass: the swap happens in this step's first closure call)
    assert opt._pinned is None and model[0].weight is new
    fresh = fp.SAM(twin.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)

    def twin_closure():
        loss = ((twin(x) - y) ** 2).mean()
        loss.backward()
        return loss

    fresh.step(twin_closure)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("convert", ["float64", "channels_last"])
def test_module_to_after_steps_keeps_training_like_a_fresh_optimizer(convert):
    """``model.to(torch.float64)`` or ``.to(memory_format=torch.channels_last)`` swaps every parameter's data in
    place: the optimizer's buffers follow (new ones where the old no longer fit), and the steps equal a fresh
    optimizer's on the converted model (its own momentum state carried over)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2))
    x, y = torch.randn(4, 2, 4, 4), torch.randn(4, 2)

    def closure_of(m, dtype):
        def closure():
            loss = ((m(x.to(dtype)) - y.to(dtype)) ** 2).mean()
            loss.backward()
            return loss

        return closure

    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt.step(closure_of(model, torch.float32))
    opt.zero_grad()
    if convert == "float64":
        model.to(torch.float64)
    else:
        model.to(memory_format=torch.channels_last)
    dtype = next(model.parameters()).dtype
    twin = copy.deepcopy(model)
    fresh = fp.SAM(twin.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    for _ in range(2):
        opt.step(closure_of(model, dtype))
        opt.zero_grad()
        fresh.step(closure_of(twin, dtype))
        fresh.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.dtype == dtype and torch.equal(p, q)


@pytest.mark.parametrize("make", [fp.SAM, fp.GSAM, fp.FriendlySAM], ids=["SAM", "GSAM", "FriendlySAM"])
def test_copy_or_checkpoint_between_first_and_second_step_is_refused(make):
    """The weights are perturbed and the backups transient: a copy would be stuck at w + delta, and a load would
    leave the pending step to write its backups over the weights (over freshly loaded ones too) and, for
    FriendlySAM, reset its mean mid-cycle. Refused, and the step then finishes as if nothing had been tried."""
    import pickle

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    twin = copy.deepcopy(model)
    runs = []
    for m, meddle in ((model, True), (twin, False)):
        opt = make(m.parameters(), torch.optim.SGD, lr=0.1)
        ((m(x) - y) ** 2).mean().backward()

        def closure(m=m):
            loss = ((m(x) - y) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)  # (FriendlySAM's mean, then its checkpoint)
        opt.zero_grad()
        saved = copy.deepcopy(opt.state_dict())
        ((m(x) - y) ** 2).mean().backward()
        opt.first_step()
        if meddle:
            for attempt in (
                lambda: copy.deepcopy(opt),
                lambda: pickle.dumps(opt),
                opt.state_dict,
                lambda: opt.load_state_dict(saved),
            ):
                with pytest.raises(RuntimeError, match="between first_step\\(\\) and second_step\\(\\)"):
                    attempt()
        ((m(x) - y) ** 2).mean().backward()
        opt.second_step()
        runs.append(copy.deepcopy(opt.state_dict()))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # (the skipped step says so)
def test_a_skipped_first_step_says_so_when_a_checkpoint_is_refused():
    """A first_step() skipped on a non-finite gradient leaves the weights clean but the step open: a save or load
    is refused saying that (not "the weights are perturbed"), and restore() closes it."""
    model = nn.Linear(2, 2)
    opt = fp.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    sd = opt.state_dict()
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.first_step()
    for attempt in (opt.state_dict, lambda: opt.load_state_dict(sd)):
        with pytest.raises(RuntimeError, match="was skipped \\(non-finite gradient\\), the weights are clean"):
            attempt()
    opt.restore()
    opt.load_state_dict(sd)


@pytest.mark.parametrize("make", [fp.SAM, fp.APD, fp.GSAM, fp.LookSAM, fp.FriendlySAM])
def test_a_sparse_gradient_is_refused_by_name_before_anything_moves(make):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = make(emb.parameters(), torch.optim.SGD, lr=0.1)
    before = emb.weight.detach().clone()

    def closure():
        loss = emb(torch.tensor([1, 2, 3])).sum()
        loss.backward()
        return loss

    with pytest.raises(TypeError, match=r"shape \(10, 3\) has a torch.sparse_coo gradient.*sparse=False"):
        opt.step(closure)
    assert torch.equal(emb.weight.detach(), before)
