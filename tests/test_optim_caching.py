"""The wrapper caches its group selection and buffer lists between steps: changes
to the groups made between steps must still take effect."""

from __future__ import annotations

import pytest
import torch

import fastperturb as fp


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


X, Y = torch.randn(16, 4), torch.randn(16, 2)


def _closure(model):
    def closure():
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        return loss

    return closure


def _plain_sgd_step(model, lr):
    """What one SGD step without perturbation gives (on a copy)."""
    import copy

    m = copy.deepcopy(model)
    for p in m.parameters():
        p.grad = None
    ((m(X) - Y) ** 2).mean().backward()
    with torch.no_grad():
        return [p - lr * p.grad for p in m.parameters()]


def test_toggling_perturb_between_steps_takes_effect():
    model = _model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    opt.step(_closure(model))  # warm the caches
    opt.param_groups[0]["perturb"] = False
    want = _plain_sgd_step(model, 0.1)
    opt.step(_closure(model))
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.detach(), w)
    opt.param_groups[0]["perturb"] = True
    before = [p.detach().clone() for p in model.parameters()]
    plain = _plain_sgd_step(model, 0.1)
    opt.step(_closure(model))
    assert any(not torch.allclose(p, w) for p, w in zip(model.parameters(), plain)), "perturbation is back on"
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_add_param_group_after_steps_is_perturbed_and_buffered():
    model = _model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = fp.SAM(first, torch.optim.SGD, rho=0.05, lr=0.1)
    opt.step(_closure(model))
    assert opt.buffer_count() == (2, 0)
    opt.add_param_group({"params": second})
    opt.step(_closure(model))
    assert opt.buffer_count() == (4, 0)
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_parameters_without_grad_leave_and_rejoin_the_plan():
    model = _model()
    opt = fp.APD(model.parameters(), torch.optim.SGD, eps=0.05, steps=2, lr=0.1)
    opt.step(_closure(model))
    model[0].weight.requires_grad_(False)
    model[0].weight.grad = None
    w0 = model[0].weight.detach().clone()
    opt.step(_closure(model))
    assert torch.equal(model[0].weight, w0), "a tensor without grad is neither perturbed nor stepped"
    model[0].weight.requires_grad_(True)
    opt.step(_closure(model))
    assert not torch.equal(model[0].weight, w0)


def test_group_toggled_passive_gets_the_same_descent_gradient_as_a_fresh_optimizer():
    # Group 0 turned passive after warm-up must receive sum_k c_k g_k like in an
    # optimizer configured that way from the start (no stale selection).
    def build(model, perturb0):
        groups = [{"params": list(model[0].parameters()), "perturb": perturb0}, {"params": list(model[2].parameters())}]
        return fp.APD(groups, torch.optim.SGD, eps=0.05, steps=2, lr=0.1)

    warm_model = _model()
    warm = build(warm_model, True)
    warm.step(_closure(warm_model))
    warm.param_groups[0]["perturb"] = False
    fresh_model = _model()
    with torch.no_grad():
        for a, b in zip(fresh_model.parameters(), warm_model.parameters()):
            a.copy_(b)
    fresh = build(fresh_model, False)
    warm.step(_closure(warm_model))
    fresh.step(_closure(fresh_model))
    for a, b in zip(warm_model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)


# ---- the step's cached plan and its compiled gradient watch (issue 14: per-step Python on many tensors) ------------


def _twin(model):
    import copy

    return copy.deepcopy(model)


def _assert_same_weights(a, b):
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def _python_watch(opt):
    """Make ``opt`` look at the gradients in Python (the path without the extension / under compile)."""
    sel = opt._selected_groups()
    sel.watch, sel.watch_built = None, True


def test_radius_changed_between_steps_takes_effect_like_a_fresh_optimizer():
    model = _model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt.step(_closure(model))  # caches the plan with rho = 0.05
    fresh_model = _twin(model)
    opt.param_groups[0]["rho"] = 0.3
    opt.step(_closure(model))
    fresh = fp.SAM(fresh_model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    fresh.step(_closure(fresh_model))
    _assert_same_weights(model, fresh_model)


def test_data_reassigned_between_steps_uses_the_new_tensors():
    model = _model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt.step(_closure(model))
    with torch.no_grad():
        model[0].weight.data = model[0].weight.detach().clone() * 0.5  # new storage: the cached handle is stale
    fresh_model = _twin(model)
    opt.step(_closure(model))
    fresh = fp.SAM(fresh_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    fresh.step(_closure(fresh_model))
    _assert_same_weights(model, fresh_model)


class _Counted:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self):
        self.calls += 1
        return _closure(self.model)()


def _run_loops(model, opt):
    """Every way of driving a step, in sequence: returns the closure calls of each."""
    calls = []
    for loop in ("closure", "backward-then-closure", "first-second", "closure", "backward-then-closure"):
        c = _Counted(model)
        if loop == "closure":
            opt.step(c)
        elif loop == "backward-then-closure":
            _closure(model)()
            opt.step(c)
            opt.zero_grad()
        else:
            _closure(model)()
            opt.first_step(zero_grad=True)
            c()
            opt.second_step(zero_grad=True)
        calls.append(c.calls)
    return calls


@pytest.mark.parametrize("clearing", ["release", "zero"])
@pytest.mark.parametrize("preset", ["SAM", "APD"])
def test_compiled_gradient_watch_equals_the_python_path(clearing, preset):
    def build(model):
        if preset == "SAM":
            opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        else:
            opt = fp.APD(model.parameters(), torch.optim.SGD, eps=0.05, steps=1, lr=0.1, momentum=0.9)
        opt.grad_clearing = clearing
        return opt

    model = _model()
    twin = _twin(model)
    fast, slow = build(model), build(twin)
    _python_watch(slow)
    assert fast._watch() is not None, "the extension's GradWatch is in use"
    got, want = _run_loops(model, fast), _run_loops(twin, slow)
    assert got == want == [2, 1, 1, 2, 1]
    _assert_same_weights(model, twin)


@pytest.mark.parametrize("watch", ["compiled", "python"])
def test_dropping_the_gradients_between_steps_frees_them_and_g0_is_still_seen(watch):
    """Hugging Face's Trainer calls model.zero_grad() after each step: the step's snapshot of the gradients (which
    tells whether a backward ran before the next step) must not keep them alive, and the backward that follows is
    still the caller's g_0 (one closure call per SAM step, not two)."""
    import gc
    import weakref

    model = _model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    if watch == "python":
        _python_watch(opt)
        opt.zero_grad()  # its first snapshot, in Python (the constructor took it with the GradWatch)
    else:
        assert opt._watch() is not None
    for _ in range(3):
        _closure(model)()
        c = _Counted(model)
        opt.step(c)
        assert c.calls == 1, "the caller's backward is g_0"
        refs = [weakref.ref(p.grad) for p in model.parameters()]
        model.zero_grad()
        gc.collect()
        assert all(r() is None for r in refs), "the optimizer holds no gradient the caller dropped"
    c = _Counted(model)
    opt.step(c)  # no backward since the last step: the step computes g_0 itself
    assert c.calls == 2


@pytest.mark.parametrize("watch", ["compiled", "python"])
def test_a_closure_that_drops_the_gradients_gets_their_memory_back(watch):
    """With ``grad_clearing="zero"`` the step snapshots the gradients before each pass to see the closure's
    backward; a closure that drops them first (model.zero_grad(set_to_none=True)) must find them freed."""
    import gc
    import weakref

    model = _model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt.grad_clearing = "zero"
    if watch == "python":
        _python_watch(opt)
    alive = []

    def closure():
        refs = [weakref.ref(p.grad) for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        return _closure(model)()

    for _ in range(2):
        opt.step(closure)
    assert len(alive) == 4 and alive == [0, 0, 0, 0]


def test_plan_cache_follows_a_tensor_losing_and_regaining_its_gradient():
    model = _model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt.step(_closure(model))
    dense = opt._plan()
    assert opt._plan() is dense, "every tensor has a gradient: the plan is reused"
    model[2].bias.grad = None
    sparse = opt._plan()
    assert all(p is not model[2].bias for p in sparse.params) and len(sparse.params) == len(dense.params) - 1
    model[2].bias.grad = torch.zeros_like(model[2].bias)
    assert opt._plan() is not sparse and len(opt._plan().params) == len(dense.params)


def test_grad_watch_semantics():
    import gc
    import weakref

    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    w = torch.classes.fastperturb.GradWatch(ps)
    assert w.size() == 4 and w.count_defined() == 0 and not w.changed(0) and not w.has_snapshot(0)
    w.snapshot(0)
    assert w.has_snapshot(0) and not w.changed(0)
    ps[1].grad = torch.ones(3)  # None -> a tensor
    assert w.changed(0) and w.count_defined() == 1
    w.snapshot(0)
    w.snapshot(1)
    ps[1].grad.add_(1)  # accumulated in place: the version moves
    assert w.changed(0) and w.changed(1)
    w.snapshot(0)
    assert not w.changed(0) and w.changed(1), "slot 1 still remembers the version before the add"
    ps[1].grad = None  # a tensor -> None is not a backward
    assert not w.changed(0) and not w.changed(1)
    for p in ps:
        p.grad = torch.zeros(3)
    assert w.count_defined() == 4
    w.snapshot(0)
    ref = weakref.ref(ps[2].grad)
    w.release()
    assert w.count_defined() == 0 and all(p.grad is None for p in ps)
    gc.collect()
    assert ref() is None, "a snapshot keeps no gradient alive (model.zero_grad() between steps frees them)"
    assert not w.changed(0), "no gradient now: nothing a backward wrote"
    for p in ps:  # new tensors, where the allocator may reuse the memory of those just freed
        p.grad = torch.zeros(3)
    assert w.changed(0), "a gradient now is another tensor than the one remembered"
    w.snapshot(0)
    assert not w.changed(0)
    w.forget(0)
    assert not w.changed(0) and not w.has_snapshot(0)
    with pytest.raises(ValueError, match="slot 2 out of range"):
        w.snapshot(2)


def test_grad_watch_release_unchanged_drops_only_the_gradients_no_backward_wrote():
    """``release_unchanged(slot)``: after zeroing in place and a pass, the gradients the pass's backward did not
    write (same tensor, same version) become None; one written in place, one replaced and one new stay."""
    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(50)]  # (longer than the walks' look-ahead)
    for p in ps[:-1]:
        p.grad = torch.zeros(3)
    w = torch.classes.fastperturb.GradWatch(ps)
    assert w.release_unchanged(0) == 0, "no snapshot: nothing is known unchanged"
    w.snapshot(1)
    ps[3].grad.add_(1)  # accumulated in place
    ps[7].grad = torch.ones(3)  # replaced
    ps[-1].grad = torch.ones(3)  # None -> a tensor
    kept = {3, 7, len(ps) - 1}
    assert w.release_unchanged(1) == len(ps) - 1 - 2
    assert [i for i, p in enumerate(ps) if p.grad is not None] == sorted(kept)
    assert w.release_unchanged(1) == 0


def test_grad_watch_on_many_parameters_some_without_autograd_metadata():
    # Longer than the walks' look-ahead (csrc/common/impl_prefetch.h), with tensors that never had autograd
    # metadata (plain tensors) among parameters, gradients on some, and the change on the last one.
    ps = [torch.nn.Parameter(torch.randn(2)) if i % 3 else torch.randn(2) for i in range(50)]
    for i, p in enumerate(ps):
        if i % 3 == 2:
            p.grad = torch.ones(2)
    w = torch.classes.fastperturb.GradWatch(ps)
    with_grad = sum(1 for p in ps if p.grad is not None)
    assert w.count_defined() == with_grad == 16
    w.snapshot(0)
    assert not w.changed(0)
    ps[-1].grad = torch.zeros(2)  # None -> a tensor, at the end
    assert w.changed(0) and w.count_defined() == 17
    w.snapshot(0)
    ps[-3].grad.mul_(2)  # in place, near the end
    assert w.changed(0)
    w.release()
    assert w.count_defined() == 0 and all(p.grad is None for p in ps)
