"""The Accelerate recipe (micro-batches inside the closure) with a real ``Accelerator`` on CPU.

Reference: one step on the whole batch with the same optimizer and no Accelerate. The
micro-batch gradient is a sum of four partial means where the reference reduces the whole
batch in one matmul: equal in exact arithmetic, fp32 rounding differs at ~1e-7 relative per
gradient, so weights are compared to 1e-5 relative / 1e-6 absolute after three steps. Under
bf16 autocast the reference runs the same micro-batches under ``torch.autocast`` (bit for bit:
the same bf16 rounding), and is close to the fp32 big-batch step only to bf16 precision.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

accelerate = pytest.importorskip("accelerate")

import fastperturb as fp  # noqa: E402
from fastperturb.integrations.accelerate import micro_batch_closure, perturb_step  # noqa: E402

STEPS, BATCH, CHUNKS = 3, 16, 4
PRESETS = {
    "SAM": lambda p: fp.SAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "AWP": lambda p: fp.AWP(p, torch.optim.SGD, gamma=1e-2, lr=0.1),
    "APD": lambda p: fp.APD(p, torch.optim.AdamW, eps=1e-2, steps=2, lr=1e-2),
}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate's state is process-wide: each test builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 8, generator=g), torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(STEPS)]


def big_batch_reference(preset):
    net = make_net()
    opt = PRESETS[preset](net.parameters())
    for x, y in batches():

        def closure():
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return net


def micro_reference_autocast(preset, dtype):
    net = make_net()
    opt = PRESETS[preset](net.parameters())
    for x, y in batches():

        def closure():
            for xm, ym in zip(x.chunk(CHUNKS), y.chunk(CHUNKS)):
                with torch.autocast("cpu", dtype=dtype):
                    out = net(xm)
                (F.cross_entropy(out.float(), ym) / CHUNKS).backward()
            return torch.zeros(())

        opt.step(closure)
    return net


def train_with_accelerate(preset, mixed_precision, scaler=None):
    acc = accelerate.Accelerator(mixed_precision=mixed_precision, cpu=True)
    if scaler is not None:  # what Accelerate builds for fp16 on a GPU, made on CPU
        acc.scaler = scaler
    net = make_net()
    model, opt = acc.prepare(net, PRESETS[preset](net.parameters()))
    losses = []
    for x, y in batches():
        micro = list(zip(x.chunk(CHUNKS), y.chunk(CHUNKS)))
        closure = micro_batch_closure(acc, model, micro, lambda mb: F.cross_entropy(model(mb[0]).float(), mb[1]))
        losses.append(perturb_step(acc, opt, closure))
    return net, opt, losses


@pytest.mark.parametrize("preset", list(PRESETS))
def test_micro_batches_in_the_closure_equal_one_big_batch_step(preset):
    net, opt, losses = train_with_accelerate(preset, "no")
    ref = big_batch_reference(preset)
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(loss is not None and torch.isfinite(loss) for loss in losses)  # the clean loss is returned


def test_bf16_autocast_through_the_accelerator():
    net, _, _ = train_with_accelerate("SAM", "bf16")
    ref = micro_reference_autocast("SAM", torch.bfloat16)
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    fp32 = big_batch_reference("SAM")
    for a, b in zip(net.parameters(), fp32.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2)  # bf16 has 8 bits of mantissa


def test_grad_scaler_is_handed_to_the_optimizer():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    net, opt, _ = train_with_accelerate("SAM", "no", scaler=scaler)
    ref = big_batch_reference("SAM")
    # scaled backward, unscaled descent gradient: the same step up to the scaling's rounding
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.optimizer.skipped_steps == 0 and scaler.get_scale() == 2.0**10


def _two_call_steps(model, opt, acc, x, y):
    acc.backward(F.cross_entropy(model(x), y))
    opt.optimizer.first_step(zero_grad=True)
    acc.backward(F.cross_entropy(model(x), y))
    opt.optimizer.second_step(zero_grad=True)


@pytest.mark.parametrize("how", ["built_unnoted", "stepped_before_prepare", "prepared_again"])
def test_the_two_calls_find_a_wrapper_built_without_device_placement(how, monkeypatch):
    """Without device placement Accelerate's wrapper loads no state, so nothing tells the optimizer about it: every
    wrapper around a fastperturb optimizer is noted as it is built (Accelerate's constructor wrapped once), and one
    built before that is found among the optimizer's referrers at the first of the two calls given no scaler. A
    review found the wrapper missed (the base step took the scaled gradients, weights off by 262) when a two-call
    step ran before ``prepare``, or when the optimizer was prepared again by a new ``Accelerator``."""
    from accelerate.optimizer import AcceleratedOptimizer

    net = make_net()
    inner = PRESETS["SAM"](net.parameters())
    data = batches()
    if how == "built_unnoted":  # a wrapper built before its constructor was wrapped (Accelerate imported later)
        monkeypatch.setattr(AcceleratedOptimizer, "__init__", AcceleratedOptimizer.__init__.__wrapped__)
    if how == "stepped_before_prepare":
        x, y = data[0]
        F.cross_entropy(net(x), y).backward()
        inner.first_step(zero_grad=True)
        F.cross_entropy(net(x), y).backward()
        inner.second_step(zero_grad=True)
        data = data[1:]
    if how == "prepared_again":
        first = accelerate.Accelerator(mixed_precision="no", cpu=True, device_placement=False)
        first.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        model, opt = first.prepare(net, inner)
        x, y = data[0]
        _two_call_steps(model, opt, first, x, y)
        data = data[1:]
        del first, model, opt
    acc = accelerate.Accelerator(mixed_precision="no", cpu=True, device_placement=False)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)  # as Accelerate's for fp16
    model, opt = acc.prepare(net, inner)
    monkeypatch.undo()  # (the constructor wrapped again for later tests)
    for x, y in data:
        _two_call_steps(model, opt, acc, x, y)
    ref = big_batch_reference("SAM")
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert acc.scaler.get_scale() == 2.0 ** (10 + len(data))  # one update a step, by the two calls


@pytest.mark.parametrize("placement", [True, False])
@pytest.mark.parametrize("given", [True, False])
def test_the_two_calls_on_the_inner_optimizer_take_the_accelerators_scaler(given, placement):
    """The two-call recipe under a GradScaler: ``accelerator.backward`` scales the loss, and the calls go to the inner
    optimizer (``AcceleratedOptimizer`` does not forward them). Without a scaler they take the wrapper's, which
    the optimizer saw when the wrapper was built, and ``second_step`` updates it (before this round the base step
    took the scaled gradients, silently); a scaler passed to ``first_step`` is the caller's to update. Either way:
    the unscaled run's steps, up to the scaling's rounding. Without device placement the wrapper's constructor loads
    no state, so the optimizer finds it among the objects referring to it (before, the wrapper went unseen)."""
    acc = accelerate.Accelerator(mixed_precision="no", cpu=True, device_placement=placement)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)  # as Accelerate's for fp16
    net = make_net()
    model, opt = acc.prepare(net, PRESETS["SAM"](net.parameters()))
    for x, y in batches():
        acc.backward(F.cross_entropy(model(x), y))
        opt.optimizer.first_step(zero_grad=True, **({"scaler": acc.scaler} if given else {}))
        acc.backward(F.cross_entropy(model(x), y))
        opt.optimizer.second_step(zero_grad=True)
        if given:
            acc.scaler.update()
    ref = big_batch_reference("SAM")
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert acc.scaler.get_scale() == 2.0 ** (10 + STEPS) and not opt.optimizer.skipped_steps  # one update a step


def test_an_unscale_on_the_accelerated_optimizer_during_the_two_calls_is_refused():
    acc = accelerate.Accelerator(mixed_precision="no", cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    net = make_net()
    model, opt = acc.prepare(net, PRESETS["SAM"](net.parameters()))
    (x, y), before = batches()[0], [p.detach().clone() for p in net.parameters()]
    acc.backward(F.cross_entropy(model(x), y))
    opt.optimizer.first_step()
    acc.backward(F.cross_entropy(model(x), y))
    acc.scaler.unscale_(opt)  # torch's AMP recipe, on the object accelerator.prepare returned
    with pytest.raises(RuntimeError, match=r"unscale_\(optimizer\) was called during the step"):
        opt.optimizer.second_step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_an_accumulating_accelerator_is_refused_with_the_fix():
    acc = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    net = make_net()
    model, opt = acc.prepare(net, PRESETS["SAM"](net.parameters()))
    x, y = batches()[0]
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        micro_batch_closure(acc, model, [(x, y)], lambda mb: F.cross_entropy(model(mb[0]), mb[1]))

    def own_closure():  # a hand-written closure: accelerator.backward would halve its gradients
        loss = F.cross_entropy(model(x), y)
        acc.backward(loss)
        return loss

    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        perturb_step(acc, opt, own_closure)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(TypeError, match="fastperturb optimizer"):
        perturb_step(acc, acc.prepare(torch.optim.SGD(net.parameters(), lr=0.1)), lambda: None)


def _drop_in_closure(model, x, y, backward):
    def closure():
        loss = F.cross_entropy(model(x), y)
        backward(loss)
        return loss

    return closure


def test_a_step_through_grad_scaler_step_is_refused_before_anything_changes():
    """GradScaler.step(optimizer, closure), plain or through AcceleratedOptimizer.step under fp16, unscales g_0 and
    then lets the closure leave the perturbed pass's gradient scaled for the base step (a step 1024x too large,
    silently, until this was refused): the step is refused, the weights are as they were."""
    x, y = batches()[0]
    net = make_net()
    opt = PRESETS["SAM"](net.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in net.parameters()]
    scaler.scale(F.cross_entropy(net(x), y)).backward()
    with pytest.raises(fp.UnsupportedTrainingLoop, match="scaler=scaler"):
        scaler.step(opt, _drop_in_closure(net, x, y, lambda loss: scaler.scale(loss).backward()))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))

    acc = accelerate.Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # what Accelerate builds for fp16 on a GPU
    net = make_net()
    model, aopt = acc.prepare(net, PRESETS["SAM"](net.parameters()))
    before = [p.detach().clone() for p in net.parameters()]
    acc.backward(F.cross_entropy(model(x), y))
    with pytest.raises(fp.UnsupportedTrainingLoop, match="perturb_step"):
        aopt.step(_drop_in_closure(model, x, y, acc.backward))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.filterwarnings("ignore:SAM skipped a step")
def test_a_skipped_step_is_reported_to_accelerate_without_a_scaler():
    """A step skipped for a non-finite gradient holds an AcceleratedScheduler's LR as an overflow would."""
    acc = accelerate.Accelerator(cpu=True)
    net = make_net()
    opt0 = PRESETS["SAM"](net.parameters())
    sched0 = torch.optim.lr_scheduler.StepLR(opt0, step_size=1, gamma=0.5)
    model, opt, sched = acc.prepare(net, opt0, sched0)
    x, y = batches()[0]
    bad = x.clone()
    bad[0, 0] = float("nan")
    lrs, skipped = [], []
    for inputs in (x, bad, x):
        closure = micro_batch_closure(acc, model, [(inputs, y)], lambda mb: F.cross_entropy(model(mb[0]), mb[1]))
        perturb_step(acc, opt, closure)
        skipped.append((opt.optimizer.last_step_skipped, opt.step_was_skipped, acc.optimizer_step_was_skipped))
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert skipped == [(False, False, False), (True, True, True), (False, False, False)]
    assert lrs == [0.05, 0.05, 0.025]


def test_a_disabled_grad_scaler_step_is_the_plain_step():
    """A disabled scaler's step(optimizer, closure) is the optimizer's own step (Accelerate keeps one for fp16 with
    GradScalerKwargs(enabled=False)): not refused, and equal to opt.step(closure)."""
    x, y = batches()[0]
    nets = [make_net(), make_net()]
    opts = [PRESETS["SAM"](n.parameters()) for n in nets]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    scaler.step(opts[0], _drop_in_closure(nets[0], x, y, lambda loss: loss.backward()))
    opts[1].step(_drop_in_closure(nets[1], x, y, lambda loss: loss.backward()))
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))

    acc = accelerate.Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", enabled=False)
    net = make_net()
    model, aopt = acc.prepare(net, PRESETS["SAM"](net.parameters()))
    aopt.step(_drop_in_closure(model, x, y, acc.backward))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), nets[1].parameters()))


def test_every_micro_batch_but_the_last_skips_the_gradient_sync():
    """Under DDP, ``no_sync`` on micro-batches 0..n-2 and the sync on the last one give every rank the same summed
    gradient once per pass; the other way round (a sync on the first) left the ranks' gradients different, which one
    process cannot see in the weights. Recorded here at every micro-batch of every pass."""
    acc = accelerate.Accelerator(cpu=True)
    net = make_net()
    model, opt = acc.prepare(net, PRESETS["APD"](net.parameters()))
    real, blocked, seen = acc.no_sync, [], []

    @contextlib.contextmanager
    def no_sync(m):
        assert m is model
        blocked.append(True)
        try:
            with real(m):
                yield
        finally:
            blocked.pop()

    acc.no_sync = no_sync
    x, y = next(iter(batches()))
    micro = list(zip(x.chunk(CHUNKS), y.chunk(CHUNKS)))

    def loss_fn(mb):
        seen.append(bool(blocked))
        return F.cross_entropy(model(mb[0]), mb[1])

    perturb_step(acc, opt, micro_batch_closure(acc, model, micro, loss_fn))
    passes = 1 + 2  # APD's clean pass and its two perturbed passes
    assert seen == ([True] * (CHUNKS - 1) + [False]) * passes
