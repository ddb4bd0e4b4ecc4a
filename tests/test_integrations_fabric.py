"""Lightning Fabric (``fabric.setup``'s optimizer proxy) with fastperturb's optimizers, against the real library.

The proxy subclasses the optimizer's class and forwards what it lacks, as Lightning's ``LightningOptimizer`` does:
``first_step`` / ``second_step`` run on the optimizer itself. Under 16-mixed the proxy's ``step()`` unscales
through the precision plugin's GradScaler; ``first_step`` / ``second_step`` bypass the plugin, so they take its
scaler themselves (until this round the base step took the scaled gradients: a step 1024x too long here, silently).
The proxy's ``step(closure)`` is refused there by torch's GradScaler; ``perturb_step`` takes that step.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

lightning_fabric = pytest.importorskip("lightning_fabric")

import fastperturb as fp  # noqa: E402
from fastperturb.integrations.fabric import perturb_step  # noqa: E402

warnings.filterwarnings("ignore", ".*GPU available but not used.*")

N, DIM, CLASSES, BATCH = 32, 8, 3, 8

PRESETS = {
    "SAM": lambda p: fp.SAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "WSAM": lambda p: fp.WSAM(p, torch.optim.SGD, rho=0.05, gamma=0.9, lr=0.1),
    "APD": lambda p: fp.APD(p, torch.optim.AdamW, eps=1e-2, steps=2, lr=1e-2),
}


def batches():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, DIM, generator=g), torch.randint(0, CLASSES, (N,), generator=g)
    return list(zip(x.split(BATCH), y.split(BATCH)))


def make_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, CLASSES))


def fabric(precision: str):
    """A CPU Fabric; "16-mixed" with a CPU GradScaler (Fabric itself falls back to bf16 on CPU)."""
    if precision != "16-mixed":
        return lightning_fabric.Fabric(accelerator="cpu", devices=1, precision=precision)
    from lightning_fabric.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    return lightning_fabric.Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])


def scaler_of(fab):
    return getattr(fab.strategy.precision, "scaler", None)


def assert_same(a: nn.Module, b: nn.Module):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def setups(preset: str, precision: str):
    """Two identical runs: one through Fabric's proxy (``fo``), one on the optimizer itself (``opt``, its module
    set up by a Fabric of its own, so both forwards run in the same precision)."""
    fa, fb = fabric(precision), fabric(precision)
    net_a, net_b = make_net(), make_net()
    mod_a, proxy = fa.setup(net_a, PRESETS[preset](net_a.parameters()))
    mod_b = fb.setup_module(net_b)
    return (fa, net_a, mod_a, proxy), (fb, net_b, mod_b, PRESETS[preset](net_b.parameters()))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("preset", ["SAM", "WSAM"])
def test_the_two_calls_through_the_proxy_take_the_plugins_scaler(preset, precision):
    """Batch 2's perturbed loss is NaN: that step is skipped (an overflow under the scaler, which backs off)."""
    (fa, net_a, mod_a, proxy), (fb, net_b, mod_b, opt) = setups(preset, precision)
    sb = scaler_of(fb)
    for i, (x, y) in enumerate(batches()):
        for fab, mod, o, scaler in ((fa, mod_a, proxy, None), (fb, mod_b, opt, sb)):
            fab.backward(F.cross_entropy(mod(x), y))
            o.first_step(zero_grad=True, scaler=scaler)
            loss = F.cross_entropy(mod(x), y)
            fab.backward(loss * float("nan") if i == 2 else loss)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                o.second_step(zero_grad=True)
        if sb is not None:
            sb.update()  # (the reference updates its scaler itself; the proxy's second_step updated fa's)
    assert_same(net_a, net_b)
    assert proxy.optimizer.skipped_steps == 1 and set(vars(proxy)) <= {"_optimizer", "_strategy", "_callbacks"}
    if precision == "16-mixed":
        # growth after each clean step, one back-off (the NaN): the same scale, and not the initial one
        assert scaler_of(fa).get_scale() == sb.get_scale() != 2.0**10


def _two_call_setup(callbacks=()):
    from lightning_fabric.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    fab = lightning_fabric.Fabric(
        accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)], callbacks=list(callbacks)
    )
    net = make_net()
    mod, proxy = fab.setup(net, PRESETS["SAM"](net.parameters()))
    return fab, net, mod, proxy, scaler


def test_an_unscale_on_the_proxy_during_the_two_calls_is_refused():
    """torch's AMP recipe (unscale_, clip) applied to the object Fabric hands out: the gradients are unscaled under
    the proxy's id, which the optimizer did not see; its own unscale made the step 1/1024 too short, silently."""
    fab, net, mod, proxy, scaler = _two_call_setup()
    (x, y), before = batches()[0], copy.deepcopy(net.state_dict())
    fab.backward(F.cross_entropy(mod(x), y))
    proxy.first_step()
    fab.backward(F.cross_entropy(mod(x), y))
    scaler.unscale_(proxy)
    with pytest.raises(RuntimeError, match=r"unscale_\(optimizer\) was called during the step"):
        proxy.second_step()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not proxy.optimizer.base_optimizer.state


def test_a_scaler_handed_to_first_step_is_the_callers_to_update():
    """The caller hands the plugin's scaler to first_step and updates it: second_step neither takes nor updates it
    again (it did, and the caller's own update() then failed: "No inf checks were recorded")."""
    fab, net, mod, proxy, scaler = _two_call_setup()
    ref_fab, ref_net, ref_mod, ref_proxy, ref_scaler = _two_call_setup()
    ref = ref_proxy.optimizer  # (the same calls on the optimizer itself)
    for x, y in batches():
        fab.backward(F.cross_entropy(mod(x), y))
        proxy.first_step(scaler=scaler)
        fab.backward(F.cross_entropy(mod(x), y))
        proxy.second_step()
        scaler.update()
        ref_fab.backward(F.cross_entropy(ref_mod(x), y))
        ref.first_step(scaler=ref_scaler)
        ref_fab.backward(F.cross_entropy(ref_mod(x), y))
        ref.second_step()
        ref_scaler.update()
    assert_same(net, ref_net)
    assert scaler.get_scale() == ref_scaler.get_scale()


def test_a_restored_first_step_leaves_no_claim_on_the_next_steps_scaler():
    """A first_step that took the plugin's scaler, then restore(); the next first_step, on the optimizer itself, is
    handed that scaler by the caller, who updates it: second_step (through the proxy) must not update it too (the
    caller's update() then failed: "No inf checks were recorded")."""
    fab, net, mod, proxy, scaler = _two_call_setup()
    x, y = batches()[0]
    fab.backward(F.cross_entropy(mod(x), y))
    proxy.first_step()
    proxy.restore()
    proxy.zero_grad()
    fab.backward(F.cross_entropy(mod(x), y))
    proxy.optimizer.first_step(scaler=scaler)
    fab.backward(F.cross_entropy(mod(x), y))
    proxy.second_step()
    scaler.update()
    assert not proxy.optimizer.last_step_skipped and scaler.get_scale() == 2.0**10


def test_the_two_calls_run_fabrics_after_step_callbacks():
    seen = []

    class Callback:
        def on_after_optimizer_step(self, strategy, optimizer):
            seen.append(optimizer)

    fab, net, mod, proxy, scaler = _two_call_setup([Callback()])
    x, y = batches()[0]
    fab.backward(F.cross_entropy(mod(x), y))
    proxy.first_step()
    assert seen == []
    fab.backward(F.cross_entropy(mod(x), y))
    proxy.second_step()
    assert seen == [proxy.optimizer]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_perturb_step_is_the_closure_step_under_every_precision(preset, precision):
    (fa, net_a, mod_a, proxy), (fb, net_b, mod_b, opt) = setups(preset, precision)
    sb = scaler_of(fb)
    calls = [0, 0]
    for x, y in batches():

        def closure_a():
            calls[0] += 1
            loss = F.cross_entropy(mod_a(x), y)
            fa.backward(loss)
            return loss

        def closure_b():
            calls[1] += 1
            loss = F.cross_entropy(mod_b(x), y)
            fb.backward(loss)
            return loss

        la = perturb_step(proxy, closure_a)
        lb = opt.step(closure_b, scaler=sb)
        if sb is not None:
            sb.update()
        assert torch.equal(la, lb)
    assert calls[0] == calls[1] == len(batches()) * (opt.spec.steps + 1)
    assert_same(net_a, net_b)
    if precision == "16-mixed":
        assert scaler_of(fa).get_scale() == sb.get_scale() > 2.0**10
        with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
            proxy.step(closure_a)  # (torch's GradScaler.step: what perturb_step is for)
    else:
        x, y = batches()[0]
        before = copy.deepcopy(net_a.state_dict())
        fa.backward(F.cross_entropy(mod_a(x), y))  # the common loop: the caller's g_0, then the closure step
        proxy.step(closure_a)
        assert any(not torch.equal(before[k], v) for k, v in net_a.state_dict().items())


def test_perturb_step_runs_fabrics_after_step_callbacks():
    seen = []

    class Callback:
        def on_after_optimizer_step(self, strategy, optimizer):
            seen.append(optimizer)

    from lightning_fabric.plugins.precision import MixedPrecision

    fab = lightning_fabric.Fabric(
        accelerator="cpu",
        devices=1,
        plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))],
        callbacks=[Callback()],
    )
    net = make_net()
    mod, proxy = fab.setup(net, PRESETS["SAM"](net.parameters()))
    x, y = batches()[0]

    def closure():
        loss = F.cross_entropy(mod(x), y)
        fab.backward(loss)
        return loss

    perturb_step(proxy, closure)
    assert seen == [proxy.optimizer]
    with pytest.raises(TypeError, match="needs a fastperturb optimizer"):
        perturb_step(fab.setup_optimizers(torch.optim.SGD(make_net().parameters(), lr=0.1)), closure)
