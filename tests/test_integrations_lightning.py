"""fastperturb under the real PyTorch Lightning Trainer (automatic and manual optimization).

Every training result is compared with a hand-written loop that drives the same optimizer
with ``step(closure)``: the Trainer adds nothing but sequencing, so the weights must agree
bit for bit where the arithmetic is the same (fp32, bf16 autocast), and to float tolerance
where the gradient is summed in a different order (micro-batches against one big batch).
"""

from __future__ import annotations

import logging
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

import fastperturb as fp  # noqa: E402
from fastperturb.integrations.lightning import PerturbLightningModule, perturb_step  # noqa: E402

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")

N, DIM, CLASSES, BATCH = 32, 8, 3, 8

PRESETS = {
    "SAM": lambda p: fp.SAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "ASAM": lambda p: fp.ASAM(p, torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1),
    "AWP": lambda p: fp.AWP(p, torch.optim.SGD, gamma=1e-2, lr=0.1),
    "APD": lambda p: fp.APD(p, torch.optim.AdamW, eps=1e-2, steps=2, lr=1e-2),
    # The fused restore + base step, with the scheduler moving the learning rate it reads every step.
    "SAM-fused": lambda p: fp.SAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, fused_step=True),
    "APD-fused": lambda p: fp.APD(p, torch.optim.AdamW, eps=1e-2, steps=2, lr=1e-2, fused_step=True),
}


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, DIM, generator=g), torch.randint(0, CLASSES, (N,), generator=g)


def loader():
    x, y = data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def make_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, CLASSES))


def make_sched(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


class Net(PerturbLightningModule):
    def __init__(self, preset: str, sched: bool = True):
        super().__init__()
        self.net = make_net()
        self.preset, self.sched = preset, sched
        self.passes = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.passes.append(self.perturb_pass)
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = PRESETS[self.preset](self.parameters())
        if not self.sched:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": make_sched(opt), "interval": "step"}}


def trainer(tmp_path, **kw):
    kw.setdefault("max_epochs", 1)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def hand_loop(preset: str, epochs: int = 1, autocast=None, max_grad_norm=None, scaler=None):
    """The reference: the same optimizer driven by step(closure), batch by batch."""
    net = make_net()
    opt = PRESETS[preset](net.parameters())
    opt.max_grad_norm = max_grad_norm
    sched = make_sched(opt)
    for _ in range(epochs):
        for x, y in loader():

            def closure():
                opt.zero_grad()
                ctx = torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None)
                with ctx:
                    loss = F.cross_entropy(net(x), y)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                return loss

            if scaler is not None:
                opt.step(closure, scaler=scaler)
                scaler.update()
            else:
                opt.step(closure)
            sched.step()
    return net, opt


def assert_same(net_a, net_b):
    for a, b in zip(net_a.state_dict().values(), net_b.state_dict().values()):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_trains_like_the_hand_written_loop(preset, tmp_path):
    model = Net(preset)
    trainer(tmp_path).fit(model, loader())
    ref, _ = hand_loop(preset)
    assert_same(model.net, ref)
    # every step ran the clean pass then the perturbed ones, in order
    steps = PRESETS[preset](make_net().parameters()).spec.steps
    assert model.passes == list(range(steps + 1)) * (N // BATCH)
    assert model.perturb_pass is None
    if preset.endswith("-fused"):  # and the fused path ran under the Trainer (no per-step fallback)
        opt = model.trainer.optimizers[0]
        assert opt.fused_step and opt.fused_step_fallback is None, opt.fused_step_fallback


def test_bf16_mixed_equals_hand_loop_under_bf16_autocast(tmp_path):
    model = Net("SAM")
    trainer(tmp_path, precision="bf16-mixed").fit(model, loader())
    ref, _ = hand_loop("SAM", autocast=torch.bfloat16)
    assert_same(model.net, ref)


@pytest.mark.parametrize("preset", ["SAM", "APD"])
def test_gradient_clip_val_clips_the_descent_gradient(preset, tmp_path):
    model = Net(preset)
    trainer(tmp_path, gradient_clip_val=0.05).fit(model, loader())
    ref, _ = hand_loop(preset, max_grad_norm=0.05)
    assert_same(model.net, ref)
    unclipped, _ = hand_loop(preset)
    assert any(not torch.equal(a, b) for a, b in zip(ref.parameters(), unclipped.parameters())), "clip too loose"
    # the routing is per step: the optimizer's own setting is left as it was
    assert model.trainer.optimizers[0].max_grad_norm is None


def test_gradient_clip_by_value_is_refused(tmp_path):
    with pytest.raises(ValueError, match="gradient_clip_algorithm='norm'"):
        trainer(tmp_path, gradient_clip_val=0.5, gradient_clip_algorithm="value").fit(Net("SAM"), loader())


@pytest.mark.parametrize("preset", ["SAM", "APD"])
def test_checkpoint_resume_is_bit_identical(preset, tmp_path):
    full = Net(preset)
    trainer(tmp_path / "full", max_epochs=2).fit(full, loader())

    first = Net(preset)
    t1 = trainer(tmp_path / "a", max_epochs=1)
    t1.fit(first, loader())
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)

    resumed = Net(preset)
    t2 = trainer(tmp_path / "b", max_epochs=2)
    t2.fit(resumed, loader(), ckpt_path=ckpt)
    assert_same(resumed.net, full.net)
    sd_full, sd_res = t2.optimizers[0].state_dict(), full.trainer.optimizers[0].state_dict()
    for k, v in sd_full["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(sd_res["state"][k][name])), (k, name)
    assert sd_full["param_groups"][0]["lr"] == sd_res["param_groups"][0]["lr"]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_16_mixed_with_a_grad_scaler_steps_through_the_mixin(accumulate, tmp_path):
    from pytorch_lightning.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model = Net("SAM")
    trainer(
        tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], accumulate_grad_batches=accumulate
    ).fit(model, loader())
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    ref = micro_loop("SAM", chunks=accumulate, autocast=torch.float16, scaler=ref_scaler)
    assert_same(model.net, ref)
    assert scaler.get_scale() == ref_scaler.get_scale()
    if accumulate == 1:
        assert model.passes == [0, 1] * (N // BATCH)


class _Plain(pl.LightningModule):
    """No mixin: Lightning's own loop around a fastperturb optimizer."""

    def __init__(self, preset="SAM"):
        super().__init__()
        self.net = make_net()
        self.preset = preset

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return PRESETS[self.preset](self.parameters())


class _OwnOptimizerStep(Net):
    """The mixin with an optimizer_step override that steps the optimizer itself (Lightning's LR warm-up recipe)."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)


def test_clipping_still_applies_when_an_override_bypasses_the_mixins_step(tmp_path):
    """The routing to max_grad_norm lives in the mixin's optimizer_step; an override that skips it gets Lightning's
    per-pass clipping, as without the mixin (for SAM the same update as clipping the descent gradient)."""
    model = _OwnOptimizerStep("SAM", sched=False)
    trainer(tmp_path, gradient_clip_val=0.05).fit(model, loader())
    ref = make_net()
    opt = PRESETS["SAM"](ref.parameters())
    opt.max_grad_norm = 0.05
    unclipped = make_net()
    plain = PRESETS["SAM"](unclipped.parameters())
    for x, y in loader():
        for net, o in ((ref, opt), (unclipped, plain)):

            def closure(net=net, o=o):
                o.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                return loss

            o.step(closure)
    for a, b in zip(model.net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert max(float((a - b).abs().max()) for a, b in zip(ref.parameters(), unclipped.parameters())) > 1e-3


@pytest.mark.parametrize("module", [_Plain, _OwnOptimizerStep])
def test_gradient_clip_by_value_is_refused_on_every_path(module, tmp_path):
    """Without the mixin (or past its optimizer_step) Lightning would clip each pass's gradient by value, g_0
    included: refused at the first step, nothing changed."""
    model = module("SAM")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(fp.UnsupportedTrainingLoop, match="gradient_clip_algorithm='value'"):
        trainer(tmp_path, gradient_clip_val=0.5, gradient_clip_algorithm="value").fit(model, loader())
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("mixin", [False, True])
@pytest.mark.parametrize("skip_pass", [0, 1])
def test_training_step_returning_none_skips_the_batch(mixin, skip_pass, tmp_path):
    """Lightning's "return None to skip this batch", at the clean pass or at the perturbed one: that batch leaves
    the weights as they were (restored bit for bit), the others train as the hand loop on them alone."""
    skip_batch = 1
    base = Net if mixin else _Plain

    class Skipping(base):
        def __init__(self):
            super().__init__("SAM", sched=False) if mixin else super().__init__("SAM")
            self.calls = {}

        def training_step(self, batch, batch_idx):
            k = self.calls[batch_idx] = self.calls.get(batch_idx, -1) + 1
            if batch_idx == skip_batch and k == skip_pass:
                return None
            return F.cross_entropy(self.net(batch[0]), batch[1])

    model = Skipping()
    trainer(tmp_path).fit(model, loader())
    ref = make_net()
    opt = PRESETS["SAM"](ref.parameters())
    for i, (x, y) in enumerate(loader()):
        if i == skip_batch:
            continue

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    assert_same(model.net, ref)
    assert model.trainer.optimizers[0].skipped_steps == 0


def test_training_step_returning_none_under_16_mixed_leaves_the_scale(tmp_path):
    """The skipped batch checked no gradient: the scaler is not updated for it (GradScaler.update() would fail with
    no inf check recorded) and its scale stays where the other batches put it."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    class Skipping(Net):
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model = Skipping("SAM", sched=False)
    trainer(tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(model, loader())
    assert scaler.get_scale() == 2.0**8
    assert model.trainer.optimizers[0].skipped_steps == 0


PER_PASS_DIFFERENT = {
    "APD": PRESETS["APD"],
    "GSAM": lambda p: fp.GSAM(p, torch.optim.SGD, rho_max=0.05, rho_min=0.05, alpha=0.4, lr=0.1),
    "WSAM": lambda p: fp.WSAM(p, torch.optim.SGD, rho=0.05, gamma=0.8, lr=0.1),
    "LookSAM": lambda p: fp.LookSAM(p, torch.optim.SGD, rho=0.05, k=2, lr=0.1),
    "FriendlySAM": lambda p: fp.FriendlySAM(p, torch.optim.SGD, rho=0.05, lr=0.1),
}


class _PlainAny(_Plain):
    def configure_optimizers(self):
        return PER_PASS_DIFFERENT[self.preset](self.parameters())


class _OwnOptimizerStepAny(_OwnOptimizerStep):
    def configure_optimizers(self):
        return PER_PASS_DIFFERENT[self.preset](self.parameters())


@pytest.mark.parametrize("module", [_PlainAny, _OwnOptimizerStepAny])
@pytest.mark.parametrize("preset", sorted(PER_PASS_DIFFERENT))
def test_per_pass_norm_clipping_is_refused_where_it_changes_the_step(module, preset, tmp_path):
    """Lightning's gradient_clip_val outside the mixin's routing clips each pass's gradient: for APD (several
    passes averaged) and the SAM family (rules that use g_0's length) that is another step than clipping the descent
    gradient (WSAM 1.5e-2 after 4 steps in the review): refused at the first step, nothing changed, naming the fix
    for the path taken."""
    model = module(preset) if module is _PlainAny else module(preset, sched=False)
    before = [p.detach().clone() for p in model.parameters()]
    fix = re.escape("call super().optimizer_step" if module is _OwnOptimizerStepAny else "Mix fastperturb.integrations")
    with pytest.raises(fp.UnsupportedTrainingLoop, match=f"gradient_clip_val=0.05.*{fix}"):
        trainer(tmp_path, gradient_clip_val=0.05).fit(model, loader())
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


class _GatedClip(Net):
    """Lightning's documented customisation: configure_gradient_clipping calling self.clip_gradients on some steps."""

    def configure_optimizers(self):
        return PER_PASS_DIFFERENT["WSAM"](self.parameters())

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.global_step >= 2:
            self.clip_gradients(
                optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
            )


def test_a_configure_gradient_clipping_override_clips_the_descent_gradient_of_the_steps_it_chooses(tmp_path):
    """Inside the mixin's step, clip_gradients sets that step's max_grad_norm instead of clipping each pass (before:
    each pass's gradient was clipped, and the routed clipping on top of it, on every step: WSAM 6.9e-3 off)."""
    model = _GatedClip("WSAM", sched=False)
    trainer(tmp_path, gradient_clip_val=0.05).fit(model, loader())
    ref = make_net()
    opt = PER_PASS_DIFFERENT["WSAM"](ref.parameters())
    for i, (x, y) in enumerate(loader()):

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss

        opt.max_grad_norm = 0.05 if i >= 2 else None
        opt.step(closure)
    for a, b in zip(model.net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert i >= 3


def test_an_optimizer_step_override_with_accumulation_is_told_to_call_super(tmp_path):
    model = _OwnOptimizerStep("SAM", sched=False)
    with pytest.raises(
        fp.UnsupportedTrainingLoop, match="override steps the optimizer itself.*super\\(\\).optimizer_step"
    ):
        trainer(tmp_path, accumulate_grad_batches=2).fit(model, loader())


def test_automatic_accumulation_without_the_mixin_is_refused(tmp_path):
    """Lightning alone runs the earlier micro-batches at the clean weights only: refused at the
    first step, before any weight changes, naming the integration."""

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return PRESETS["SAM"](self.parameters())

    model = Plain()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(fp.UnsupportedTrainingLoop, match="fastperturb.integrations.lightning"):
        trainer(tmp_path, accumulate_grad_batches=2).fit(model, loader())
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_automatic_accumulation_needs_the_mixins_batch_hook(tmp_path):
    class Overrides(Net):
        def on_train_batch_start(self, batch, batch_idx):  # forgets super()
            return None

    model = Overrides("SAM")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="must call super"):
        trainer(tmp_path, accumulate_grad_batches=2).fit(model, loader())
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


class ManualAccum(PerturbLightningModule):
    """The accumulation recipe: manual optimization, every micro-batch inside every pass."""

    def __init__(self, preset: str, chunks: int):
        super().__init__()
        self.automatic_optimization = False
        self.net = make_net()
        self.preset, self.chunks = preset, chunks
        self.passes = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.passes.append(self.perturb_pass)
        micro = list(zip(batch[0].chunk(self.chunks), batch[1].chunk(self.chunks)))
        loss = perturb_step(self, self.optimizers(), micro, self.micro_loss)
        self.lr_schedulers().step()
        return loss

    def micro_loss(self, mb):
        x, y = mb
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = PRESETS[self.preset](self.parameters())
        return {"optimizer": opt, "lr_scheduler": make_sched(opt)}


@pytest.mark.parametrize("preset", ["SAM", "AWP", "APD"])
def test_manual_accumulation_recipe_equals_one_big_batch_step(preset, tmp_path):
    model = ManualAccum(preset, chunks=4)
    trainer(tmp_path).fit(model, loader())
    # each training_step starts outside any pass: perturb_step put perturb_pass back to None after its passes
    assert model.passes == [None] * (N // BATCH) and model.perturb_pass is None
    ref, _ = hand_loop(preset)
    # Same batches and equations; the gradient is summed over 4 micro-batches instead of
    # reduced in one matmul, so fp32 rounding differs at the 1e-7 relative level per step.
    for a, b in zip(model.net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_manual_accumulation_blocks_the_sync_on_every_micro_batch_but_the_last(tmp_path, monkeypatch):
    """Under DDP, ``toggle_model(sync_grad=False)`` on micro-batches 0..n-2 and the sync on the last give every rank
    the same summed gradient once per pass (a sync on another micro-batch left the ranks' gradients different,
    which one process cannot see in the weights). Recorded at every micro-batch of every pass."""
    import contextlib

    from pytorch_lightning.core.optimizer import LightningOptimizer

    blocked, seen = [], []
    real = LightningOptimizer.toggle_model

    @contextlib.contextmanager
    def toggle_model(self, sync_grad=True):
        blocked.append(not sync_grad)
        try:
            with real(self, sync_grad=sync_grad):
                yield
        finally:
            blocked.pop()

    monkeypatch.setattr(LightningOptimizer, "toggle_model", toggle_model)

    class Recorded(ManualAccum):
        def micro_loss(self, mb):
            seen.append(any(blocked))
            return super().micro_loss(mb)

    model = Recorded("APD", chunks=4)
    trainer(tmp_path, max_steps=2).fit(model, loader())
    assert seen == ([True] * 3 + [False]) * 3 * 2  # APD: a clean pass and two perturbed passes per step


def micro_loop(preset, chunks, epochs=1, autocast=None, scaler=None):
    """The reference for accumulation: each optimizer step's closure runs ``chunks`` consecutive
    loader batches, each loss divided by ``chunks`` (Lightning's normalisation)."""
    net = make_net()
    opt = PRESETS[preset](net.parameters())
    sched = make_sched(opt)
    batches = list(loader())
    for _ in range(epochs):
        for s in range(0, len(batches), chunks):
            window = batches[s : s + chunks]

            def closure():
                for x, y in window:
                    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                        loss = F.cross_entropy(net(x), y) / chunks
                    (loss if scaler is None else scaler.scale(loss)).backward()
                return torch.zeros(())

            if scaler is None:
                opt.step(closure)
            else:
                opt.step(closure, scaler=scaler)
                scaler.update()
            sched.step()
    return net


@pytest.mark.parametrize("preset", ["SAM", "APD"])
def test_automatic_accumulation_is_exact_with_the_mixin(preset, tmp_path):
    model = Net(preset)
    trainer(tmp_path, accumulate_grad_batches=2).fit(model, loader())
    ref = micro_loop(preset, chunks=2)
    assert_same(model.net, ref)
    steps = PRESETS[preset](make_net().parameters()).spec.steps
    # per step: micro-batch 1 (clean, by Lightning), micro-batch 2 (clean), then both at each perturbed point
    assert model.passes == ([None, 0] + [p for k in range(1, steps + 1) for p in (k, k)]) * (N // BATCH // 2)


class TwoCall(pl.LightningModule):
    """The common Lightning SAM recipe: manual optimization, ``self.optimizers()`` (a ``LightningOptimizer``),
    ``first_step`` / ``second_step``, the scheduler stepped by hand. Batch ``nan_batch`` gets a NaN loss at the
    perturbed point, so that step is skipped."""

    def __init__(self, make, nan_batch=None):
        super().__init__()
        self.automatic_optimization = False
        self.net, self.make, self.nan_batch = make_net(), make, nan_batch

    def training_step(self, batch, batch_idx):
        opt, sched = self.optimizers(), self.lr_schedulers()
        x, y = batch
        self.manual_backward(F.cross_entropy(self.net(x), y))
        opt.first_step(zero_grad=True)
        loss = F.cross_entropy(self.net(x), y)
        self.manual_backward(loss * float("nan") if batch_idx == self.nan_batch else loss)
        opt.second_step(zero_grad=True)
        sched.step()

    def configure_optimizers(self):
        opt = self.make(self.net.parameters())
        return {"optimizer": opt, "lr_scheduler": make_sched(opt)}


TWO_CALL = {
    "SAM": PRESETS["SAM"],
    "FriendlySAM": lambda p: fp.FriendlySAM(p, torch.optim.SGD, rho=0.05, sigma=0.5, lmbda=0.8, lr=0.1),
}


@pytest.mark.parametrize("preset", list(TWO_CALL))
def test_the_two_calls_through_self_optimizers_act_on_the_optimizer(preset, tmp_path):
    """``self.optimizers()`` is a proxy that subclasses the optimizer's class and keeps what is written to it: the
    two calls ran with the proxy as ``self``, so the skip counts, ``_opt_called`` (the LR scheduler warned "called
    before optimizer.step()") and the rest stayed on the proxy. They now land on the optimizer: the proxy keeps
    only Lightning's own attributes, the scheduler does not warn, and the skip is counted where
    ``trainer.optimizers`` and checkpoints see it. Each ``second_step`` advances ``global_step`` (else
    ``max_steps`` never stops the run). The weights equal the same calls made on the optimizer."""
    model = TwoCall(TWO_CALL[preset], nan_batch=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path).fit(model, loader())
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]
    assert len([w for w in caught if "skipped" in str(w.message)]) == 1
    real = model.trainer.optimizers[0]
    proxy = model.optimizers()
    assert proxy is not real and proxy._optimizer is real
    assert set(vars(proxy)) <= {"_optimizer", "_strategy", "_on_before_step", "_on_after_step"}, vars(proxy).keys()
    assert real.skipped_steps == 1 and proxy.skipped_steps == 1
    assert real._opt_called
    assert model.trainer.global_step == N // BATCH  # each second_step counted as Lightning counts a step()

    net = make_net()
    opt = TWO_CALL[preset](net.parameters())
    sched = make_sched(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (x, y) in enumerate(loader()):
            F.cross_entropy(net(x), y).backward()
            opt.first_step(zero_grad=True)
            loss = F.cross_entropy(net(x), y)
            (loss * float("nan") if i == 1 else loss).backward()
            opt.second_step(zero_grad=True)
            sched.step()
    assert_same(model.net, net)
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("preset", list(TWO_CALL))
def test_the_two_calls_under_16_mixed_take_the_plugins_scaler(preset, tmp_path):
    """Under ``precision="16-mixed"`` ``manual_backward`` scales the loss; ``opt.step()`` would unscale through the
    plugin's GradScaler, but the two calls bypass the plugin. They take its scaler now, and ``second_step`` updates
    it, as the plugin does after a step: the same steps as the calls given the scaler by hand (until this round
    the base step took the scaled gradients, a step 1024x too long here, silently). Batch 1's NaN is an overflow:
    the step is skipped and the scale backs off."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)

    model = TwoCall(TWO_CALL[preset], nan_batch=1)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler())
    trainer(tmp_path, plugins=[plugin]).fit(model, loader())

    net = make_net()
    opt = TWO_CALL[preset](net.parameters())
    sched, ref = make_sched(opt), scaler()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (x, y) in enumerate(loader()):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(net(x), y)
            ref.scale(loss).backward()
            opt.first_step(zero_grad=True, scaler=ref)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(net(x), y)
            ref.scale(loss * float("nan") if i == 1 else loss).backward()
            opt.second_step(zero_grad=True)
            ref.update()
            sched.step()
    assert_same(model.net, net)
    assert model.trainer.optimizers[0].skipped_steps == 1
    assert plugin.scaler.get_scale() == ref.get_scale() != 2.0**10


def test_max_steps_stops_the_two_call_recipe(tmp_path):
    """``Trainer(max_steps=3)`` over 4 batches: three two-call steps, then the run stops (it ran every batch)."""
    model = TwoCall(TWO_CALL["SAM"])
    trainer(tmp_path, max_steps=3).fit(model, loader())
    assert model.trainer.global_step == 3
    assert model.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 3


def test_an_undecorated_override_of_a_users_subclass_runs_once_through_the_proxy():
    """A user's subclass overriding ``second_step`` / ``load_state_dict`` (calling super()) reached through
    ``self.optimizers()``: its body runs once, on the proxy, and the preset's own body on the optimizer; the step
    hooks run once. (Redirecting by name ran the override's body a second time, and a load that pops its own key
    failed the second time round.)"""
    from pytorch_lightning.core.optimizer import LightningOptimizer

    calls = []

    class MySAM(fp.SAM):
        def second_step(self, zero_grad=True, scaler=None):
            calls.append("second_step")
            super().second_step(zero_grad, scaler)

        def state_dict(self):
            return {**super().state_dict(), "extra": 1}

        def load_state_dict(self, state_dict):
            sd = dict(state_dict)
            sd.pop("extra")
            super().load_state_dict(sd)

    net = make_net()
    x, y = data()
    opt = MySAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    proxy = LightningOptimizer(opt)
    hooks = []
    proxy._on_before_step, proxy._on_after_step = (lambda: hooks.append("before")), (lambda: hooks.append("after"))
    F.cross_entropy(net(x), y).backward()
    proxy.first_step(zero_grad=True)
    F.cross_entropy(net(x), y).backward()
    proxy.second_step(zero_grad=True)
    assert calls == ["second_step"] and hooks == ["before", "after"]
    proxy.load_state_dict(proxy.state_dict())
    assert set(vars(proxy)) <= {"_optimizer", "_strategy", "_on_before_step", "_on_after_step"}, vars(proxy).keys()


class _ClipHooks(Net):
    """A preset of PER_PASS_DIFFERENT, no scheduler; records (global_step, perturb_pass) at each
    on_before_optimizer_step, and its configure_gradient_clipping override either wraps Lightning's own
    (``gate=None``: calls super(), as an override that only logs does) or clips from step ``gate`` on."""

    def __init__(self, preset, gate=None):
        super().__init__(preset, sched=False)
        self.gate, self.hook_calls = gate, []

    def configure_optimizers(self):
        return PER_PASS_DIFFERENT[self.preset](self.parameters())

    def on_before_optimizer_step(self, optimizer):
        self.hook_calls.append((self.global_step, self.perturb_pass))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.gate is None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif self.global_step >= self.gate:
            self.clip_gradients(
                optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
            )


def clip_loop(preset, chunks, epochs, clip_from, clip=0.05, scaler=None):
    """The reference for _ClipHooks: micro_loop's steps over PER_PASS_DIFFERENT's preset, the descent gradient
    clipped to ``clip`` from step ``clip_from`` on (None: never)."""
    net = make_net()
    opt = PER_PASS_DIFFERENT[preset](net.parameters())
    batches = list(loader())
    step = 0
    for _ in range(epochs):
        for s in range(0, len(batches), chunks):
            window = batches[s : s + chunks]

            def closure():
                for x, y in window:
                    with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
                        loss = F.cross_entropy(net(x), y) / chunks
                    (loss if scaler is None else scaler.scale(loss)).backward()
                return torch.zeros(())

            opt.max_grad_norm = clip if clip_from is not None and step >= clip_from else None
            if scaler is None:
                opt.step(closure)
            else:
                opt.step(closure, scaler=scaler)
                scaler.update()
            step += 1
    return net


@pytest.mark.parametrize("preset", ["WSAM", "LookSAM"])
def test_a_configure_gradient_clipping_override_calling_super_clips_as_without_it(preset, tmp_path):
    """An override that wraps Lightning's default (logging, say) and calls super() clips every step's descent
    gradient to gradient_clip_val, as the mixin alone does (before: the mixin's own configure_gradient_clipping
    returned without clipping, so nothing was clipped, silently: WSAM 0.32 off after 4 steps in the review)."""
    model = _ClipHooks(preset)
    trainer(tmp_path, gradient_clip_val=0.05).fit(model, loader())
    assert_same(model.net, clip_loop(preset, chunks=1, epochs=1, clip_from=0))
    unclipped = clip_loop(preset, chunks=1, epochs=1, clip_from=None)
    assert not all(torch.equal(a, b) for a, b in zip(model.net.parameters(), unclipped.parameters()))


def test_the_hooks_after_a_pass_run_at_the_clean_pass_under_accumulation(tmp_path):
    """With accumulate_grad_batches, the clean pass that completes g_0 runs Lightning's hooks after it, as every pass
    does without accumulation: LookSAM's reuse steps run no other pass, so a configure_gradient_clipping override
    that clips from step 1 on clipped none of them before (0.56 off after 6 steps in the review), and
    on_before_optimizer_step missed the clean pass of every step."""
    model = _ClipHooks("LookSAM", gate=1)
    trainer(tmp_path, gradient_clip_val=0.05, accumulate_grad_batches=2, max_epochs=3).fit(model, loader())
    assert_same(model.net, clip_loop("LookSAM", chunks=2, epochs=3, clip_from=1))
    # LookSAM, k = 2: refresh steps (clean pass, perturbed pass) and reuse steps (clean pass only) alternate
    assert model.hook_calls == [(s, p) for s in range(6) for p in ((0, 1) if s % 2 == 0 else (0,))]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_configure_gradient_clipping_override_clips_under_16_mixed(accumulate, tmp_path):
    """On the GradScaler path the optimizer calls the closure, so the clipping hook runs after each pass there
    (before: it never ran, and an override's clipping was silently dropped)."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model = _ClipHooks("WSAM", gate=1)
    trainer(
        tmp_path,
        gradient_clip_val=0.05,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        accumulate_grad_batches=accumulate,
        max_epochs=2,
    ).fit(model, loader())
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    assert_same(model.net, clip_loop("WSAM", chunks=accumulate, epochs=2, clip_from=1, scaler=ref_scaler))
    assert scaler.get_scale() == ref_scaler.get_scale()
    assert model.hook_calls == []  # (Lightning shows that hook unscaled gradients; these are scaled)
