"""The two gradient conventions of ``step(closure)``.

* clean-pass convention: ``opt.step(closure)`` (gradients stale or zeroed) runs the
  closure at w and at the K perturbed points: K+1 passes, returns the clean loss;
* drop-in convention of the common SAM wrappers: ``loss.backward(); opt.step(closure);
  opt.zero_grad()``: the caller's gradient is g_0, the closure runs K times, returns None
  (as pytorch-optimizer's SAM).

Proven by counted passes, bit equality between the conventions, the equations of
DESIGN.md section 2 in plain PyTorch (tests/test_optim_equations.py), and pytorch-optimizer
4.1.0's SAM on its own documented loops.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fastperturb as fp

from test_optim_equations import BASES, PRESETS, direct_descent_grad, loss_of, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

N_STEPS = 3


class Counting:
    """A closure for step ``s`` that counts its calls."""

    def __init__(self, model, s):
        self.model, self.s, self.calls = model, s, 0

    def __call__(self):
        self.calls += 1
        loss = loss_of(self.model, self.s)
        loss.backward()
        return loss


def _steps_of(opt) -> int:
    return opt.spec.steps


def moved(model) -> float:
    """How far training moved the weights from their initial values (a test that can fail)."""
    return max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), make_model().parameters()))


def run(preset, convention, base="sgd", steps=N_STEPS, **extra):
    """Train a fresh model with ``convention``; returns (model, opt, closure calls per step, returns)."""
    make_opt, _ = PRESETS[preset]
    base_cls, base_kw = BASES[base]
    model = make_model()
    opt = make_opt(model.parameters(), base_cls, dict(base_kw, **extra))
    calls, returned = [], []
    for s in range(steps):
        closure = Counting(model, s)
        if convention == "clean":
            returned.append(opt.step(closure))
        elif convention == "dropin":  # loss.backward(); opt.step(closure); opt.zero_grad()
            loss_of(model, s).backward()
            returned.append(opt.step(closure))
            opt.zero_grad()
        elif convention == "dropin_keep":  # zero_grad(set_to_none=False) before the backward
            opt.zero_grad(set_to_none=False)
            loss_of(model, s).backward()
            returned.append(opt.step(closure))
        elif convention == "zeroed_first":  # opt.zero_grad() right before step(closure): clean pass
            loss_of(model, s).backward()
            opt.zero_grad()
            returned.append(opt.step(closure))
        elif convention == "model_zeroed_in_place":  # the gradients zeroed in place, not through the optimizer
            loss_of(model, s).backward()
            model.zero_grad(set_to_none=False)
            returned.append(opt.step(closure))
        elif convention == "grads_zeroed_by_hand":
            loss_of(model, s).backward()
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.zero_()
            returned.append(opt.step(closure))
        calls.append(closure.calls)
    return model, opt, calls, returned


@pytest.mark.parametrize("preset", list(PRESETS))
def test_passes_counted_and_conventions_bit_identical(preset, backend):
    clean, opt, clean_calls, clean_ret = run(preset, "clean")
    K = _steps_of(opt)
    assert clean_calls == [K + 1] * N_STEPS
    assert all(isinstance(r, torch.Tensor) for r in clean_ret)
    conventions = (
        ("dropin", K),
        ("dropin_keep", K),
        ("zeroed_first", K + 1),
        # zeroed in place: their versions moved as after a backward, but zeros are no g_0: the clean pass runs
        ("model_zeroed_in_place", K + 1),
        ("grads_zeroed_by_hand", K + 1),
    )
    for convention, calls in conventions:
        model, _, got, ret = run(preset, convention)
        assert got == [calls] * N_STEPS, convention
        assert all((r is None) == (calls == K) for r in ret), convention
        for p, q in zip(model.parameters(), clean.parameters()):
            assert torch.equal(p, q), convention


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("preset", ["sam", "asam", "awp_3steps", "apd", "apd_weights_only", "apd_linf_global_noclean"])
def test_dropin_matches_direct_equations(preset, base, backend):
    """The caller's g_0 enters the perturbation and (APD) the average exactly as the clean pass's would."""
    _, make_cfg = PRESETS[preset]
    base_cls, base_kw = BASES[base]
    model, opt, _, _ = run(preset, "dropin", base=base, steps=N_STEPS)
    ref = make_model()
    ref_opt = base_cls(ref.parameters(), **base_kw)
    for s in range(N_STEPS):
        direct_descent_grad(ref, s, make_cfg(ref))
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
    assert moved(model) > 1e-3


@pytest.mark.parametrize("preset", ["sam", "apd_weights_only"])
def test_dropin_with_clipping_and_frozen_batchnorm(preset, backend):
    """max_grad_norm and freeze_bn behave the same under both conventions."""

    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).double()
        return m, PRESETS[preset][0](m.parameters(), torch.optim.SGD, dict(lr=0.1, max_grad_norm=0.05, freeze_bn=m))

    (a, oa), (b, ob) = build(), build()
    for s in range(N_STEPS):
        ca, cb = Counting(a, s), Counting(b, s)
        oa.step(ca)
        loss_of(b, s).backward()
        ob.step(cb)
        ob.zero_grad()
        assert cb.calls == ca.calls - 1
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    # loss_of runs the model twice per pass; only the clean passes counted (the perturbed ones were frozen)
    assert int(a[1].num_batches_tracked) == 2 * N_STEPS


def test_dropin_under_grad_scaler(backend):
    """A caller's g_0 under an enabled GradScaler is scaled like the closure's gradients."""

    def build():
        m = make_model()
        return m, fp.APD(m.parameters(), torch.optim.SGD, eps=0.2, steps=2, lr=0.1)

    def scaled_closure(model, s, scaler):
        def closure():
            loss = loss_of(model, s)
            scaler.scale(loss).backward()
            return loss

        return closure

    (a, oa), (b, ob) = build(), build()
    sa, sb = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    for s in range(N_STEPS):
        oa.step(scaled_closure(a, s, sa), scaler=sa)
        sa.update()
        sb.scale(loss_of(b, s)).backward()
        ob.step(scaled_closure(b, s, sb), scaler=sb)
        sb.update()
        ob.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    # unscaling g_0 yourself first would mix unscaled g_0 with scaled perturbed gradients
    sb.scale(loss_of(b, 0)).backward()
    sb.unscale_(ob)
    before = [p.detach().clone() for p in b.parameters()]
    with pytest.raises(RuntimeError, match="unscale_"):
        ob.step(scaled_closure(b, 0, sb), scaler=sb)
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), before))


def test_dropin_nonfinite_g0_skips_or_raises(backend):
    model = make_model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    closure = Counting(model, 0)
    (loss_of(model, 0) * float("nan")).backward()
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step(closure)
    assert opt.last_step_skipped and opt.skipped_steps == 1 and closure.calls == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.nonfinite = "raise"
    opt.zero_grad()
    (loss_of(model, 0) * float("inf")).backward()
    with pytest.raises(fp.NonFiniteGradient, match=r"pass 0 in param_groups\[0\]\['params'\]\[0\]"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_dropin_exception_in_closure_restores(backend):
    model = make_model()
    opt = fp.AWP(model.parameters(), torch.optim.SGD, gamma=0.1, steps=2, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        raise KeyError("boom")

    loss_of(model, 0).backward()
    with pytest.raises(KeyError):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # the failed step's gradients are stale now: the next step runs its own clean pass
    c = Counting(model, 0)
    opt.step(c)
    assert c.calls == 3


def test_nothing_perturbed_dropin_is_the_base_step(backend):
    """AWP warm-up (perturb=False everywhere) with the caller's gradient: no closure call at all."""
    model = make_model()
    twin = copy.deepcopy(model)
    opt = fp.AWP(model.parameters(), torch.optim.SGD, gamma=0.1, lr=0.1, momentum=0.9)
    base = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for g in opt.param_groups:
        g["perturb"] = False
    for s in range(2):
        c = Counting(model, s)
        loss_of(model, s).backward()
        opt.step(c)
        opt.zero_grad()
        assert c.calls == 0
        loss_of(twin, s).backward()
        base.step()
        base.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


# ---- pytorch-optimizer 4.1.0's SAM on its own documented loops -----------------------------

po = pytest.importorskip("pytorch_optimizer")

# Not bit for bit: the perturbation scale rho/||g|| is rounded differently. pytorch-optimizer
# takes ||g|| from float32 per-tensor norms (SAM_FAMILY.md section 1) and divides by ||g|| + 1e-12;
# fastperturb sums the squares in float32 and hands the fused op a float32 coefficient. Either
# scale is exact only to float32 rounding (2^-24 ~ 6e-8 relative), so with rho = 0.3 the perturbed
# points differ by up to ~2e-8 per element, and after 4 SGD steps (lr 0.1, momentum 0.9) on this
# float64 model the weights by up to 7.7e-9 absolute (measured; relative 4e-6 on an element near
# zero, hence the atol). The tolerance below is 13x that, 1e-5 of how far SAM moves the weights
# (asserted > 1e-2).
PO_TOL = dict(rtol=1e-5, atol=1e-7)


def _po_pair(adaptive=False):
    model = make_model()
    twin = copy.deepcopy(model)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    ours = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.3, adaptive=adaptive, **kw)
    theirs = po.SAM(twin.parameters(), torch.optim.SGD, rho=0.3, adaptive=adaptive, **kw)
    return model, ours, twin, theirs


@pytest.mark.parametrize("adaptive", [False, True])
def test_issue_loop_equals_pytorch_optimizer_sam(adaptive, backend):
    """``loss.backward(); opt.step(closure); opt.zero_grad()``: 2 passes each, same weights."""
    model, ours, twin, theirs = _po_pair(adaptive)
    for s in range(4):
        passes = []
        for m, opt in ((model, ours), (twin, theirs)):
            c = Counting(m, s)
            loss_of(m, s).backward()
            ret = opt.step(c)
            opt.zero_grad()
            passes.append(1 + c.calls)
            assert ret is None
        assert passes == [2, 2]
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **PO_TOL)
    assert moved(model) > 1e-2


def test_pytorch_optimizer_docstring_loop(backend):
    """pytorch-optimizer's own example: zero_grad(); closure() (which zeroes first); step(closure)."""
    model, ours, twin, theirs = _po_pair()
    for s in range(4):
        counts = []
        for m, opt in ((model, ours), (twin, theirs)):

            def closure(m=m, opt=opt):
                closure.calls += 1
                opt.zero_grad()
                loss = loss_of(m, s)
                loss.backward()
                return loss

            closure.calls = 0
            opt.zero_grad()
            closure()
            opt.step(closure)
            counts.append(closure.calls)
        assert counts == [2, 2]
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **PO_TOL)


def test_first_second_step_loop_equals_pytorch_optimizer_sam(backend):
    model, ours, twin, theirs = _po_pair()
    for s in range(4):
        for m, opt in ((model, ours), (twin, theirs)):
            loss_of(m, s).backward()
            opt.first_step(zero_grad=True)
            loss_of(m, s).backward()
            opt.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **PO_TOL)


def test_a_davda54_sam_checkpoint_resumes_without_its_weight_backups(backend):
    """A run migrated mid-way. davda54's SAM saves, per parameter, only ``old_p``, its copy of the weights from
    its last first_step() (never popped), and its groups (which the base optimizer shares). Loaded, that copy went
    into the base optimizer's state and stayed there: a copy of every parameter in memory and in every later
    checkpoint. It is left out now; the run resumes as davda54's SAM resumes (no momentum saved)."""
    model = make_model()
    twin = copy.deepcopy(model)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    group = dict(rho=0.3, adaptive=False, **kw, dampening=0, nesterov=False, maximize=False, foreach=None)
    group.update(differentiable=False, fused=None, lr=0.05)  # (a scheduler had lowered it)
    params = list(model.parameters())
    sd = {"state": {i: {"old_p": p.detach().clone()} for i, p in enumerate(params)}, "param_groups": [group]}
    sd["param_groups"][0]["params"] = list(range(len(params)))
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    ours = fp.SAM(params, torch.optim.SGD, rho=0.3, **kw)
    ours.load_state_dict(torch.load(buf, weights_only=True))
    assert not ours.base_optimizer.state and ours.param_groups[0]["lr"] == 0.05
    fresh = fp.SAM(twin.parameters(), torch.optim.SGD, rho=0.3, **dict(kw, lr=0.05))
    for s in range(3):
        for m, opt in ((model, ours), (twin, fresh)):
            loss_of(m, s).backward()
            opt.step(Counting(m, s))
            opt.zero_grad()
    assert all(set(e) == {"momentum_buffer"} for e in ours.state_dict()["state"].values())
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_a_pytorch_optimizer_sam_checkpoint_resumes_with_its_momentum(backend):
    """pytorch-optimizer's SAM saves the base optimizer's state (its own old_p is popped in the step): all of it
    loads, and the run resumes as pytorch-optimizer's SAM resumes from that checkpoint."""
    model, ours, twin, theirs = _po_pair()
    for s in range(2):
        loss_of(twin, s).backward()
        theirs.step(Counting(twin, s))
        theirs.zero_grad()
    sd = copy.deepcopy(theirs.state_dict())  # (a state dict holds the live buffers: one copy for each loader)
    assert sd["state"] and all("momentum_buffer" in e for e in sd["state"].values())
    model.load_state_dict(twin.state_dict())
    ours.load_state_dict(copy.deepcopy(sd))
    resumed = po.SAM(twin.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, weight_decay=1e-3)
    resumed.load_state_dict(sd)
    for s in range(2, 5):
        for m, opt in ((model, ours), (twin, resumed)):
            loss_of(m, s).backward()
            opt.step(Counting(m, s))
            opt.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **PO_TOL)


class _OwnStateSGD(torch.optim.SGD):
    """A base optimizer outside torch.optim, whose state names fastperturb does not know."""


def test_a_base_outside_torch_optim_keeps_every_state_entry():
    model = make_model()
    opt = fp.SAM(model.parameters(), _OwnStateSGD, rho=0.3, lr=0.1)
    sd = {
        "state": {0: {"old_p": torch.ones(3)}},
        "param_groups": [dict(opt.base_optimizer.state_dict()["param_groups"][0])],
    }
    opt.load_state_dict(sd)
    assert torch.equal(opt.base_optimizer.state[next(model.parameters())]["old_p"], torch.ones(3))


# ---- errors and signals ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 1, 3])
def test_one_exception_type_for_every_pass(bad, backend):
    from test_optim_behaviour import closure_for, nan_at
    from test_optim_behaviour import make_model as behaviour_model

    model = behaviour_model()
    opt = fp.APD(model.parameters(), torch.optim.SGD, eps=0.05, lr=0.1, nonfinite="raise")
    with pytest.raises(fp.NonFiniteGradient) as info:
        opt.step(closure_for(model, hook=nan_at(bad)))
    assert isinstance(info.value, fp.NonFiniteDescentGradient) == (bad == 3)
    assert "param_groups[0]['params']" in str(info.value)
    assert fp.NonFiniteGradient is fp.engine.NonFiniteGradient


def test_skip_warns_once_per_optimizer(backend):
    model = make_model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)

    def nan_closure():
        loss = loss_of(model, 0) * float("nan")
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="skipped_steps"):
        opt.step(nan_closure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(nan_closure)
    assert opt.skipped_steps == 2
    other = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.warns(RuntimeWarning):
        other.step(nan_closure)


def test_step_without_closure_says_what_to_do():
    model = make_model()
    sam = fp.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    apd = fp.APD(model.parameters(), torch.optim.SGD, lr=0.1)
    fixes = r"integrations\.transformers\.PerturbTrainer.*integrations\.lightning.*first_step"
    with pytest.raises(TypeError, match=fixes):
        sam.step()
    with pytest.raises(TypeError) as info:
        apd.step()
    assert "no first_step()" in str(info.value) and "integrations.lightning" in str(info.value)


def test_grad_scaler_step_without_closure_names_the_fix():
    """GradScaler.step(optimizer) (Lightning's 16-mixed path) calls step() with no closure."""
    model = make_model()
    opt = fp.APD(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model, 0)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"GradScaler\.step.*bf16 autocast.*opt\.step\(closure, scaler=scaler\)"):
        scaler.step(opt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("snapshot", ["compiled", "python"])
def test_unknown_gradient_history_runs_the_clean_pass(backend, snapshot, monkeypatch):
    """After a copy (or an added group) the optimizer cannot tell a fresh gradient from a
    stale one, so it runs its own clean pass: one pass more, never a stale g_0. Whether the snapshot of the
    gradients is kept by the extension's GradWatch or, without it (or sharded), as a Python list of versions."""
    if snapshot == "python":
        if backend != "reference":
            pytest.skip("without the extension only the reference runs")
        from fastperturb.optim import wrapper

        monkeypatch.setattr(wrapper.native, "load_error", "simulated: no extension (no GradWatch)")
    model = make_model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    opt.step(Counting(model, 0))  # leaves G in .grad
    model2, opt2 = copy.deepcopy((model, opt))
    c = Counting(model2, 1)
    opt2.step(c)
    assert c.calls == 2
    ref, ref_opt = copy.deepcopy((model, opt))
    ref_opt.zero_grad()
    ref_opt.step(Counting(ref, 1))
    assert all(torch.equal(p, q) for p, q in zip(model2.parameters(), ref.parameters()))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("when", ["before_backward", "after_backward"])
def test_add_param_group_between_steps_keeps_the_callers_g0(when, compiled, backend):
    """Unfreezing a layer with add_param_group between steps (fine-tuning code does it at an epoch's start): the
    next drop-in step still takes the caller's backward as g_0. The new tensors had no snapshot, so g_0 was
    unknown and the clean pass ran again: 3 passes, BatchNorm's statistics moved once more (found by a review
    porting davda54/sam's loop). Bit-identical to the two-call loop, which needs no detection. Also with the step
    compiled (aot_eager), where the new selection cannot be taken inside the traced step: add_param_group takes it."""

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
        model[3].requires_grad_(False)
        return model, fp.SAM(list(model[0].parameters()) + list(model[1].parameters()), torch.optim.SGD, lr=0.1)

    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(4)
    ]

    def unfreeze(model, opt):
        model[3].requires_grad_(True)
        opt.add_param_group({"params": list(model[3].parameters())})

    model, opt = build()
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
    passes = []
    for s, (x, y) in enumerate(data):

        def closure():
            passes[-1] += 1
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        passes.append(0)
        if s == 2 and when == "before_backward":
            unfreeze(model, opt)
        closure()  # the caller's backward: g_0
        if s == 2 and when == "after_backward":
            unfreeze(model, opt)
        step(closure)
        opt.zero_grad()
    assert passes == [2, 2, 2, 2]
    assert int(model[1].num_batches_tracked) == 8

    ref, ref_opt = build()
    for s, (x, y) in enumerate(data):
        if s == 2 and when == "before_backward":
            unfreeze(ref, ref_opt)
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        if s == 2 and when == "after_backward":
            unfreeze(ref, ref_opt)
        ref_opt.first_step(zero_grad=True)
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.second_step(zero_grad=True)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_a_caller_gradient_zero_in_places_is_still_g0(backend):
    """Only a gradient that is zero everywhere counts as zeroed: a caller's g_0 that is zero but for the last element
    the scan for a nonzero one reaches (it starts at the output layer) is still used, and the closure runs K times.
    Checked against SAM's equations with that g_0: w + rho g_0 / ||g_0||, then w - lr G."""
    model = make_model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]
    loss_of(model, 0).backward()
    with torch.no_grad():
        for p in params[1:]:
            p.grad.zero_()
        first = params[0].grad.view(-1)
        first[:-1].zero_()
        first[-1] = 0.5
    g0 = [p.grad.clone() for p in params]
    c = Counting(model, 0)
    assert opt.step(c) is None and c.calls == 1

    ref = make_model()
    with torch.no_grad():
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g0))
        for p, w, g in zip(ref.parameters(), w0, g0):
            p.copy_(w + 0.3 * g / norm)
    loss_of(ref, 0).backward()
    for p, w, q in zip(params, w0, ref.parameters()):
        torch.testing.assert_close(p.detach(), w - 0.1 * q.grad, rtol=0, atol=1e-6)
    assert moved(model) > 1e-3


@pytest.mark.parametrize("kind", ["zeros_past_the_scan_head", "channels_last"])
def test_a_callers_g0_the_zero_scan_reads_further_is_still_used(kind, backend):
    """The scan for a nonzero gradient reads a tensor's first 4096 elements, then the rest; a gradient in another
    memory order is read whole. A caller's g_0 that is zero in its first 5000 elements, or laid out channels_last,
    is g_0: one closure call (SAM's perturbed pass), not a clean pass of the step's own as well."""
    if kind == "channels_last":
        w = torch.nn.Parameter(torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last))
        loss_fn = lambda: (w * torch.arange(1.0, 49.0).view(4, 3, 2, 2)).sum() + (w**2).sum()
    else:
        w = torch.nn.Parameter(torch.randn(6000))
        loss_fn = lambda: (w[5000:] ** 2).sum()
    opt = fp.SAM([w], torch.optim.SGD, rho=0.05, lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        loss = loss_fn()
        loss.backward()
        return loss

    loss_fn().backward()
    if kind == "channels_last":
        assert not w.grad.is_contiguous() and bool(w.grad.any())
    else:
        assert not bool(w.grad[:5000].any()) and bool(w.grad[5000:].any())
    opt.step(closure)
    assert len(calls) == 1


def test_skip_warning_points_at_the_callers_line(backend):
    model = make_model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    (loss_of(model, 0) * float("nan")).backward()
    with pytest.warns(RuntimeWarning) as record:
        opt.first_step()
    assert record[0].filename == __file__


# ---- constructor calls migrated from pytorch-optimizer ---------------------------------------------------------


class _KwargsBase(torch.optim.SGD):
    """A base optimizer that swallows unknown keywords, as many of pytorch-optimizer's do (SGDW, Lion, AdamP)."""

    def __init__(self, params, lr=0.1, **kwargs):
        super().__init__(params, lr=lr)


class _GCBase(torch.optim.SGD):
    """A base optimizer with its own ``use_gc`` setting (as Ranger has)."""

    def __init__(self, params, lr=0.1, use_gc=False):
        super().__init__(params, lr=lr)
        self.defaults["use_gc"] = use_gc


@pytest.mark.parametrize("base", [torch.optim.SGD, _KwargsBase])
@pytest.mark.parametrize(
    "make, key, hint",
    [
        (lambda ps, b, **k: fp.WSAM(ps, b, rho=0.05, **k), "max_norm", "max_grad_norm"),
        (lambda ps, b, **k: fp.SAM(ps, b, rho=0.05, **k), "use_gc", "not offered"),
        (lambda ps, b, **k: fp.LookSAM(ps, b, rho=0.05, **k), "perturb_eps", "not needed"),
        (lambda ps, b, **k: fp.GSAM(ps, b, **k), "model", "freeze_bn=model"),
    ],
)
def test_pytorch_optimizer_wrapper_keywords_are_refused_by_name(base, make, key, hint):
    """Before, a base taking **kwargs swallowed them (WSAM's max_norm: no clipping at all) and torch's SGD refused
    them with an error about itself."""
    with pytest.raises(TypeError, match=f"got {key}=.*{hint}"):
        make(nn.Linear(2, 2).parameters(), base, lr=0.1, **{key: 0.01 if key != "model" else nn.Linear(2, 2)})


@pytest.mark.parametrize("base", [torch.optim.SGD, _KwargsBase])
@pytest.mark.parametrize(
    "make, key, value, takers",
    [
        (fp.AWP, "norm", "linf", "APD takes it"),
        (fp.AWP, "adaptive", True, "FriendlySAM, GSAM, LookSAM, SAM, WSAM take it"),
        (fp.SAM, "eta", 0.5, "ASAM takes it"),
        (fp.APD, "adaptive", True, "SAM"),
        (fp.GSAM, "rho", 0.05, "SAM, WSAM take it; GSAM's radius is 'rho_max'"),
        (fp.LookSAM, "gamma", 0.9, "AWP, WSAM take it"),
    ],
)
def test_another_presets_keyword_is_refused_by_name(base, make, key, value, takers):
    """Another preset's setting, given to one that has none, went on to the base optimizer: torch's SGD refused
    it blaming itself (GSAM's rho: "multiple values for argument 'rho'"), a base taking **kwargs swallowed it
    (AWP(norm="linf") perturbed in L2, SAM(eta=...) was plain SAM)."""
    with pytest.raises(TypeError, match=f"got {key}=.*has no {key!r} setting \\(.*{takers}"):
        make(nn.Linear(2, 2).parameters(), base, lr=0.1, **{key: value})


@pytest.mark.parametrize(
    "make, base, key, near",
    [
        (fp.APD, torch.optim.AdamW, "epsilon", "APD's 'eps'"),  # (APD's radius: the hint says whose)
        (fp.SAM, torch.optim.SGD, "momentun", "SGD's 'momentum'"),
        (fp.AWP, torch.optim.SGD, "max_grad_nrom", "AWP's 'max_grad_norm'"),
        (fp.SAM, torch.optim.SGD, "zzz", None),
    ],
)
def test_a_misspelt_keyword_names_both_keyword_lists(make, base, key, near):
    """A keyword neither the preset nor the base takes reached the base, whose error named only itself ("AdamW got
    an unexpected keyword argument 'epsilon'") when the user meant the preset's."""
    with pytest.raises(TypeError, match=f"got {key}=.*neither .* nor its base optimizer {base.__name__} takes") as e:
        make(nn.Linear(2, 2).parameters(), base, lr=0.1, **{key: 1e-3})
    msg = str(e.value)
    hint = f"did you mean {near}? " if near else ""
    assert f"go to the base optimizer); {hint}{make.__name__}'s keywords: " in msg and msg.count("did you mean") <= 1
    assert "max_grad_norm, " in msg and f"; {base.__name__}'s: " in msg


def test_a_base_optimizers_own_setting_of_a_preset_name_still_reaches_it():
    """Adadelta's rho, Adam's eps: named by the base, so its own (GSAM's rho collided with the family's radius
    argument before)."""
    ps = list(nn.Linear(2, 2).parameters())
    assert fp.GSAM(ps, torch.optim.Adadelta, rho=0.9).base_optimizer.defaults["rho"] == 0.9
    assert fp.SAM(ps, torch.optim.Adam, eps=1e-6).base_optimizer.defaults["eps"] == 1e-6


@pytest.mark.parametrize(
    "make, key",
    [
        (fp.SAM, "adaptive"),
        (fp.APD, "relative"),
        (fp.APD, "include_clean"),
        (fp.WSAM, "decouple"),
        (fp.GSAM, "adaptive"),
    ],
)
@pytest.mark.parametrize("value", ["false", None, 2, 0.5])
def test_an_on_off_setting_must_be_true_or_false(make, key, value):
    """A string "false" (a config file's) was taken as True, None as False, silently."""
    with pytest.raises(TypeError, match=f"{key} must be True or False, got {value!r}"):
        make(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1, **{key: value})
    np = pytest.importorskip("numpy")
    for ok in (True, 0, np.bool_(True), np.int64(1)):
        make(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1, **{key: ok})
    assert fp.APD(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1, relative=1).spec.relative is True


def test_a_groups_perturb_flag_must_be_true_or_false():
    """group["perturb"] = "false" (a config's string) perturbed the group; refused at the next step, weights
    unchanged."""
    model = nn.Linear(2, 2)
    opt = fp.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.param_groups[0]["perturb"] = "false"
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        loss = model(torch.ones(1, 2)).sum()
        loss.backward()
        return loss

    with pytest.raises(TypeError, match="param_groups\\[0\\]\\['perturb'\\] must be True or False, got 'false'"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.param_groups[0]["perturb"] = 0
    opt.step(closure)  # (0/1 are taken: a plain step)


@pytest.mark.parametrize("make", [fp.SAM, fp.ASAM, fp.AWP, fp.GSAM])
def test_a_group_step_size_where_the_step_is_the_radius_is_refused(make):
    """Read only by APD; SAM, ASAM and AWP refused step_size= but ignored a group's, silently."""
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="sets 'step_size', which .* does not read"):
        make([{"params": model.parameters(), "step_size": 0.5}], torch.optim.SGD, lr=0.1)


def test_a_base_that_names_the_keyword_gets_it():
    opt = fp.SAM(nn.Linear(2, 2).parameters(), _GCBase, rho=0.05, lr=0.1, use_gc=True)
    assert opt.base_optimizer.defaults["use_gc"] is True


def test_a_base_that_takes_the_keyword_through_kwargs_and_keeps_it_gets_it():
    """pytorch-optimizer's Lion and AdamP take use_gc through **kwargs and read it from their groups."""
    po = pytest.importorskip("pytorch_optimizer")
    for base in (po.Lion, po.AdamP):
        opt = fp.SAM(nn.Linear(2, 2).parameters(), base, rho=0.05, lr=0.1, use_gc=True)
        assert opt.base_optimizer.defaults["use_gc"] is True
        assert all(g["use_gc"] is True for g in opt.param_groups)


def test_a_parameter_list_is_parameters_not_a_model():
    ps = nn.ParameterList([nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))])
    opt = fp.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1)
    assert len(opt.param_groups[0]["params"]) == 2


def test_pytorch_optimizer_constructor_shapes_are_refused_with_what_differs():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="no model.*freeze_bn=model"):
        fp.GSAM(model.parameters(), base, model, object(), alpha=0.4)  # pytorch-optimizer's GSAM call
    with pytest.raises(TypeError, match="no model.*freeze_bn=model"):
        fp.WSAM(model, model.parameters(), torch.optim.SGD)  # pytorch-optimizer's WSAM argument order
    with pytest.raises(TypeError, match="not an instance") as e:
        fp.GSAM(model.parameters(), base)
    assert str(e.value).endswith("got a SGD instance")  # (one line: not the instance's 10-line repr)

    class ProportionScheduler:  # (pytorch-optimizer's class is matched by name: it need not be installed)
        pass

    with pytest.raises(TypeError, match="ProportionScheduler as rho_max.*rho_max/rho_min"):
        fp.GSAM(model.parameters(), torch.optim.SGD, ProportionScheduler(), lr=0.1)
