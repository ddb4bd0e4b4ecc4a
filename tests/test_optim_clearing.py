"""How a step clears the gradients before a pass: released (``.grad = None``, the default) or
zeroed in place (fused into the ascent step). Both must give the same steps; releasing must
not keep the old gradients alive while the pass runs; a tensor the pass's backward does not
reach gets a zero gradient either way."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import nn

import fastperturb as fp

X = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))

pytestmark = pytest.mark.usefixtures("one_thread")

PRESETS = {
    "sam": lambda ps: fp.SAM(ps, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9),
    "asam": lambda ps: fp.ASAM(ps, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9),
    "awp": lambda ps: fp.AWP(ps, torch.optim.SGD, gamma=0.01, lr=0.1, momentum=0.9),
    "apd": lambda ps: fp.APD(ps, torch.optim.AdamW, eps=0.05, steps=2, lr=0.01),
}


class Branchy(nn.Module):
    """A model whose ``side`` layer takes part only while ``use_side`` is set."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 10)
        self.side = nn.Linear(10, 10)
        self.head = nn.Linear(10, 3)
        self.use_side = True

    def forward(self, x):
        h = torch.tanh(self.body(x))
        if self.use_side:
            h = h + self.side(h)
        return self.head(h)


def closure_for(model, on_call=None):
    calls = [0]

    def closure():
        if on_call is not None:
            on_call(calls[0])
        calls[0] += 1
        loss = nn.functional.cross_entropy(model(X), Y)
        loss.backward()
        return loss

    return closure


def run(model, opt, convention: str, steps: int = 3) -> None:
    for _ in range(steps):
        closure = closure_for(model)
        if convention == "dropin":  # the caller's backward gives g_0
            closure()
            opt.step(closure)
            opt.zero_grad()
        else:  # step(closure) alone: the optimizer clears the gradients and runs the clean pass
            opt.step(closure)


@pytest.mark.parametrize("convention", ["dropin", "clean"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_release_and_zero_give_identical_steps(preset, convention, backend):
    a = Branchy()
    b = copy.deepcopy(a)
    oa, ob = PRESETS[preset](a.parameters()), PRESETS[preset](b.parameters())
    assert oa.grad_clearing == "release"  # the default
    ob.grad_clearing = "zero"
    run(a, oa, convention)
    run(b, ob, convention)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    if convention == "clean":  # G is left in .grad by both (the drop-in loop clears it after the step)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("how", ["requires_grad", "branch"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_tensor_the_clean_pass_does_not_reach_takes_no_base_step_in_either_mode(preset, how, backend):
    """A layer frozen mid-training (``requires_grad_(False)``) or skipped by the forward keeps its gradient from the
    steps before. Zeroed in place (zero mode, and every compiled step) it was kept, so the base optimizer moved the
    layer with a zero gradient (momentum, weight decay, Adam's moments): 10% of a frozen weight's norm after 4
    AdamW steps in a review. Both modes now leave it without a gradient after the clean pass: it stays put, and
    the steps are the same, bit for bit."""
    models = []
    for clearing in ("release", "zero"):
        model = Branchy()
        opt = PRESETS[preset](model.parameters())
        opt.grad_clearing = clearing
        for i in range(5):
            if i == 2:
                if how == "requires_grad":
                    model.side.requires_grad_(False)
                else:
                    model.use_side = False
                frozen = [t.detach().clone() for t in model.side.parameters()]
            opt.step(closure_for(model))
        assert all(torch.equal(t, f) for t, f in zip(model.side.parameters(), frozen)), clearing
        assert all(t.grad is None for t in model.side.parameters()), clearing
        models.append(model)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("clearing", ["release", "zero"])
def test_each_pass_starts_from_cleared_gradients(clearing, backend):
    model = Branchy()
    opt = PRESETS["apd"](model.parameters())
    opt.grad_clearing = clearing
    seen = []

    def look(k):
        seen.append([None if p.grad is None else bool(p.grad.eq(0).all()) for p in model.parameters()])

    closure_for(model)()  # stale gradients from an earlier backward ...
    opt.zero_grad(set_to_none=False)  # ... zeroed in place: no g_0 from the caller, so a clean pass
    closure_for(model)()
    opt.step(closure_for(model, look))  # the caller's g_0: passes 1 and 2 only
    opt.step(closure_for(model, look))  # a backward since? No: clean pass, then passes 1 and 2
    n = len(list(model.parameters()))
    want = [None] * n if clearing == "release" else [True] * n
    assert seen == [want] * 5


def test_zero_mode_fuses_the_zeroing_into_the_ascent(backend):
    """In zero mode the gradient tensors are kept (zeroed in place); in release mode they are new."""
    for clearing, kept in (("zero", True), ("release", False)):
        model = Branchy()
        opt = PRESETS["sam"](model.parameters())
        opt.grad_clearing = clearing
        closure_for(model)()
        ids = [id(p.grad) for p in model.parameters()]
        holders = [p.grad for p in model.parameters()]
        opt.step(closure_for(model))
        assert ([id(p.grad) for p in model.parameters()] == ids) is kept
        del holders


@pytest.mark.parametrize("convention", ["dropin", "clean"])
@pytest.mark.parametrize("preset", ["sam", "apd"])
def test_released_gradients_are_freed_during_the_pass(preset, convention, backend):
    """Releasing must not hold the old gradients while the pass's backward allocates new ones
    (that would be one extra gradient-sized set at the peak)."""
    model = Branchy()
    opt = PRESETS[preset](model.parameters())
    opt.grad_clearing = "release"
    run(model, opt, "clean", steps=1)
    if convention == "dropin":
        opt.zero_grad()
        closure_for(model)()
    old = [weakref.ref(p.grad) for p in model.parameters()]
    alive = []

    def look(k):
        alive.append(sum(r() is not None for r in old))

    opt.step(closure_for(model, look))
    assert alive and all(a == 0 for a in alive), alive


@pytest.mark.parametrize("clearing", ["release", "zero"])
@pytest.mark.parametrize("preset", ["sam", "apd"])
def test_tensor_unreached_at_a_perturbed_point_gets_a_zero_gradient(preset, clearing, backend):
    """A layer used at w but not at the perturbed point: its gradient there is zero (not an error)."""
    model = Branchy()
    opt = PRESETS[preset](model.parameters())
    opt.grad_clearing = clearing
    before = copy.deepcopy(model)

    def toggle(k):
        model.use_side = k == 0

    opt.step(closure_for(model, toggle))
    # Reference: the same step with the side layer's gradient written as zeros at every perturbed point.
    ref = copy.deepcopy(before)
    ropt = PRESETS[preset](ref.parameters())
    ropt.grad_clearing = "zero"

    def toggle_ref(k):
        ref.use_side = k == 0

    ropt.step(closure_for(ref, toggle_ref))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    if preset == "sam":  # G = the gradient at the perturbed point: zero, so SGD leaves the layer as it was
        assert torch.equal(model.side.weight.grad, torch.zeros_like(model.side.weight))
        assert torch.equal(model.side.weight, before.side.weight)
    else:  # APD's G includes the clean-point gradient: the layer took part and moved
        assert not torch.equal(model.side.weight, before.side.weight)


def test_closure_without_backward_is_still_caught_after_release(backend):
    model = Branchy()
    opt = PRESETS["sam"](model.parameters())
    opt.grad_clearing = "release"
    run(model, opt, "clean", steps=1)
    calls = [0]

    def closure():
        calls[0] += 1
        loss = nn.functional.cross_entropy(model(X), Y)
        if calls[0] == 1:
            loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="did not call backward.. at pass 1"):
        opt.step(closure)


def test_unknown_grad_clearing_is_refused():
    model = Branchy()
    opt = PRESETS["sam"](model.parameters())
    opt.grad_clearing = "free"
    with pytest.raises(ValueError, match="grad_clearing must be one of"):
        opt.step(closure_for(model))
