"""fastperturb.integrations.transformers.PerturbTrainer under the real Hugging Face Trainer.

A tiny GPT-2 built from a config (no download, token ids made directly) is trained through
``PerturbTrainer`` and, as the reference, by a hand-written loop with the same optimizer:
every step's closure runs all micro-batches with ``loss / gradient_accumulation_steps``.

Tolerance: Trainer computes the causal-LM loss as ``sum / num_items_in_batch`` over the whole
accumulated batch (the model accepts loss kwargs) where the reference takes each micro-batch's
mean divided by the number of micro-batches (equal-length rows, no padding): equal in exact
arithmetic, and measured bit-identical here (fp32 and bf16 autocast, SGD and fused AdamW);
the comparisons allow 1e-6 relative / 1e-7 absolute for a platform where the two
normalisations round differently. Resume is compared with an uninterrupted PerturbTrainer
run, bit for bit.

(A model that ignores ``num_items_in_batch`` although it accepts ``**kwargs``, such as
``BertForSequenceClassification``, is not divided by the accumulation steps by Trainer; the
replayed passes go through the same ``training_step`` and inherit that scaling unchanged.)
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import fastperturb as fp  # noqa: E402
from fastperturb.integrations.transformers import PerturbTrainer  # noqa: E402

transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Trainer builds an Accelerator, whose state is process-wide: reset it after each test."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


VOCAB, SEQ, N, BATCH, LR, WD = 50, 8, 16, 4, 1e-2, 0.01
CONFIG = dict(
    vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)
PRESETS = {
    "SAM": (fp.SAM, {"rho": 0.05}),
    "AWP": (fp.AWP, {"gamma": 1e-2}),
    "APD": (fp.APD, {"eps": 1e-2, "steps": 2}),
    # The fused restore + base step under Trainer's default optim (torch's AdamW with fused=True).
    "SAM-fused": (fp.SAM, {"rho": 0.05, "fused_step": True}),
}


def make_model():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))


def dataset():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (N, SEQ), generator=g)
    # Position 0 is never a target of a causal LM; marking it -100 makes Trainer's token count
    # (num_items_in_batch) and the model's own mean agree on SEQ - 1 targets per row.
    labels = ids.clone()
    labels[:, 0] = -100
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(N)]


def args(tmp_path, accum: int, steps: int, **kw):
    kw.setdefault("save_strategy", "no")
    kw.setdefault("weight_decay", WD)
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=LR,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        **kw,
    )


def run_trainer(tmp_path, preset, accum, steps, **kw):
    cls, pkw = PRESETS[preset]
    model = make_model()
    trainer = PerturbTrainer(
        model=model, args=args(tmp_path, accum, steps, **kw), train_dataset=dataset(), perturb=cls, perturb_kwargs=pkw
    )
    trainer.train()
    return model, trainer


def hand_loop(preset, accum, steps, base, max_grad_norm=1.0, autocast=None, scaler=None, extra=None):
    """The same optimizer, param groups and linear LR schedule, driven by step(closure);
    ``base`` is the ``optim`` given to Trainer: ``"sgd"`` or its default, ``"adamw_torch_fused"``;
    ``max_grad_norm`` defaults to TrainingArguments' 1.0; ``extra(model)``: a term added to each micro-batch's loss."""
    cls, pkw = PRESETS[preset]
    model = make_model()
    model.train()
    norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    named = list(model.named_parameters())
    no_decay = [p for n, p in named if "bias" in n or id(p) in norms]
    decay = [p for n, p in named if not ("bias" in n or id(p) in norms)]
    groups = [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]
    if base == "sgd":
        opt = cls(groups, torch.optim.SGD, lr=LR, max_grad_norm=max_grad_norm, **pkw)
    elif cls is fp.APD:  # APD's eps is the radius: AdamW's eps goes into the groups
        for g in groups:
            g["eps"] = 1e-8
        opt = cls(groups, torch.optim.AdamW, lr=LR, betas=(0.9, 0.999), fused=True, max_grad_norm=max_grad_norm, **pkw)
    else:
        opt = cls(
            groups,
            torch.optim.AdamW,
            lr=LR,
            betas=(0.9, 0.999),
            eps=1e-8,
            fused=True,
            max_grad_norm=max_grad_norm,
            **pkw,
        )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))
    data = dataset()
    per_step = BATCH * accum
    for s in range(steps):
        rows = data[(s * per_step) % N : (s * per_step) % N + per_step]
        micro = [rows[i : i + BATCH] for i in range(0, per_step, BATCH)]

        def closure():
            total = torch.zeros(())
            for mb in micro:
                ids = torch.stack([r["input_ids"] for r in mb])
                labels = torch.stack([r["labels"] for r in mb])
                assert int(labels.ne(-100).sum()) == BATCH * (SEQ - 1)
                ctx = torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None)
                with ctx:
                    loss = model(input_ids=ids, labels=labels).loss.float()
                term = loss / accum if extra is None else loss / accum + extra(model)
                (term if scaler is None else scaler.scale(term)).backward()
                total += loss.detach() / accum
            return total

        if scaler is None:
            opt.step(closure)
        else:
            opt.step(closure, scaler=scaler)
            scaler.update()
        sched.step()
    return model, opt


def assert_close_models(a, b, rtol=1e-6, atol=1e-7):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


DEFAULT_OPTIM = "adamw_torch_fused"  # TrainingArguments' default here


@pytest.mark.parametrize(
    "preset,accum,optim",
    [
        ("SAM", 1, DEFAULT_OPTIM),
        ("SAM-fused", 2, DEFAULT_OPTIM),
        ("SAM", 2, "sgd"),
        ("AWP", 2, "sgd"),
        pytest.param("APD", 2, DEFAULT_OPTIM, marks=pytest.mark.slow),
    ],
)
def test_trainer_equals_hand_written_loop(preset, accum, optim, tmp_path):
    model, trainer = run_trainer(tmp_path, preset, accum, steps=2, optim=optim)
    ref, ref_opt = hand_loop(preset, accum, steps=2, base=optim)
    opt = trainer.optimizer.optimizer
    assert type(opt) is PRESETS[preset][0]
    assert type(opt.base_optimizer) is type(ref_opt.base_optimizer)
    assert_close_models(model, ref)
    moved = max((x - y).abs().max() for x, y in zip(model.parameters(), make_model().parameters()))
    assert moved > 1e-3  # it trained
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)
    if opt.fused_step:  # the fused path ran under Trainer (no per-step fallback)
        assert opt.fused_step_fallback is None, opt.fused_step_fallback


def test_micro_batches_left_by_an_interrupted_run_are_not_replayed(tmp_path):
    """A train() that raised between a micro-batch and its step leaves that micro-batch recorded; the next train()
    starts without it, so its first step replays its own micro-batches only (the same weights as a fresh run)."""
    ref, _ = run_trainer(tmp_path / "ref", "SAM", accum=2, steps=2, optim="sgd")
    cls, pkw = PRESETS["SAM"]
    model = make_model()
    trainer = PerturbTrainer(
        model=model, args=args(tmp_path, 2, 2, optim="sgd"), train_dataset=dataset(), perturb=cls, perturb_kwargs=pkw
    )
    left = {k: v.unsqueeze(0) for k, v in dataset()[-1].items()}
    trainer._micro_batches = [(model, left, None)]  # what the interrupted run left
    trainer.train()
    assert_close_models(model, ref, rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["SAM", pytest.param("APD", marks=pytest.mark.slow)])
def test_max_grad_norm_clips_the_descent_gradient(preset, tmp_path):
    model, trainer = run_trainer(tmp_path, preset, accum=2, steps=2, max_grad_norm=0.05, optim="sgd")
    ref, _ = hand_loop(preset, accum=2, steps=2, base="sgd", max_grad_norm=0.05)
    assert_close_models(model, ref)
    unclipped, _ = hand_loop(preset, accum=2, steps=2, base="sgd", max_grad_norm=None)
    assert any(not torch.equal(a, b) for a, b in zip(ref.parameters(), unclipped.parameters())), "clip too loose"
    assert trainer.optimizer.optimizer.max_grad_norm is None  # routed per step, not saved


def test_bf16_mixed_precision_through_accelerate(tmp_path):
    model, trainer = run_trainer(tmp_path, "SAM", accum=2, steps=2, bf16=True, optim="sgd")
    assert trainer.accelerator.mixed_precision == "bf16"
    ref, _ = hand_loop("SAM", accum=2, steps=2, base="sgd", autocast=torch.bfloat16)
    assert_close_models(model, ref)


@pytest.mark.slow
def test_grad_scaler_is_handed_to_the_optimizer(tmp_path):
    """fp16 on a GPU gives Trainer's Accelerator a GradScaler; on CPU Accelerate makes none, so
    the test gives the Accelerator a CPU GradScaler before Trainer prepares the optimizer."""
    cls, pkw = PRESETS["SAM"]
    model = make_model()
    trainer = PerturbTrainer(
        model=model, args=args(tmp_path, 2, 2, optim="sgd"), train_dataset=dataset(), perturb=cls, perturb_kwargs=pkw
    )
    scaler = trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.train()
    assert trainer.optimizer.scaler is scaler  # Accelerate's own fp16 path would be taken without PerturbTrainer
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ref, _ = hand_loop("SAM", accum=2, steps=2, base="sgd", scaler=ref_scaler)
    assert_close_models(model, ref)
    assert scaler.get_scale() == ref_scaler.get_scale()
    assert not trainer.accelerator.optimizer_step_was_skipped


@pytest.mark.slow
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    full, _ = run_trainer(tmp_path / "full", "SAM", accum=2, steps=4)
    run_trainer(tmp_path / "part", "SAM", accum=2, steps=4, save_strategy="steps", save_steps=2)
    ckpt = tmp_path / "part" / "checkpoint-2"
    assert (ckpt / "optimizer.pt").exists()
    model = make_model()
    cls, pkw = PRESETS["SAM"]
    trainer = PerturbTrainer(
        model=model, args=args(tmp_path / "resumed", 2, 4), train_dataset=dataset(), perturb=cls, perturb_kwargs=pkw
    )
    trainer.train(resume_from_checkpoint=str(ckpt))
    for x, y in zip(model.parameters(), full.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("preset,accum", [("SAM", 2), pytest.param("APD", 2, marks=pytest.mark.slow)])
def test_passes_per_step(preset, accum, tmp_path):
    """Trainer's own forward/backward gives g_0 over all micro-batches; the optimizer then runs
    only the K perturbed passes, each over every micro-batch: (K + 1) * accum forwards a step."""
    cls, pkw = PRESETS[preset]
    model = make_model()
    forwards = []
    model.register_forward_pre_hook(lambda m, a, kw: forwards.append(kw["input_ids"][:, 1].clone()), with_kwargs=True)
    trainer = PerturbTrainer(
        model=model,
        args=args(tmp_path, accum, 2, optim="sgd"),
        train_dataset=dataset(),
        perturb=cls,
        perturb_kwargs=pkw,
    )
    trainer.train()
    k = trainer.optimizer.optimizer.spec.steps
    assert len(forwards) == 2 * (k + 1) * accum
    # within a step: the micro-batches in order, then the same micro-batches at each perturbed point
    first_step = forwards[: (k + 1) * accum]
    for i in range(accum, len(first_step)):
        assert torch.equal(first_step[i], first_step[i % accum])


def test_the_gradients_trainer_drops_are_freed(tmp_path):
    """Trainer calls model.zero_grad() after each optimizer step: the optimizer keeps no reference that holds
    those gradients through the next step's forward and backward (a second set of gradients in memory)."""
    import gc
    import weakref

    model = make_model()
    freed = []

    class Watch(transformers.TrainerCallback):
        refs: list = []

        def on_optimizer_step(self, args, state, control, **kw):  # after optimizer.step()
            self.refs = [weakref.ref(p.grad) for p in model.parameters() if p.grad is not None]

        def on_step_end(self, args, state, control, **kw):  # after model.zero_grad()
            gc.collect()
            freed.append((len(self.refs), sum(r() is None for r in self.refs)))

    trainer = PerturbTrainer(
        model=model,
        args=args(tmp_path, 1, 3, optim="sgd"),
        train_dataset=dataset(),
        perturb=fp.SAM,
        perturb_kwargs={"rho": 0.05},
        callbacks=[Watch()],
    )
    trainer.train()
    assert len(freed) == 3 and all(n > 0 and dead == n for n, dead in freed), freed


def test_an_optimizer_instance_and_clear_errors(tmp_path):
    model = make_model()
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    trainer = PerturbTrainer(model=model, args=args(tmp_path, 1, 1), train_dataset=dataset(), optimizers=(opt, None))
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert trainer.optimizer.optimizer is opt
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    with pytest.raises(TypeError, match="fastperturb optimizer"):
        PerturbTrainer(
            model=model,
            args=args(tmp_path, 1, 1),
            train_dataset=dataset(),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )
    with pytest.raises(TypeError, match="perturb="):
        PerturbTrainer(model=model, args=args(tmp_path, 1, 1), train_dataset=dataset())
    with pytest.raises(TypeError, match="fastperturb optimizer class"):
        PerturbTrainer(model=model, args=args(tmp_path, 1, 1), train_dataset=dataset(), perturb=torch.optim.SGD)


@pytest.mark.filterwarnings("ignore:SAM skipped a step")
def test_a_skipped_step_holds_the_lr_schedule(tmp_path):
    """A step skipped for a non-finite gradient is reported to Trainer as an overflow would be
    (accelerator.optimizer_step_was_skipped), so the LR schedule does not advance on it."""
    cls, pkw = PRESETS["SAM"]
    model = make_model()
    forwards = []

    def poison(module, inputs, output):  # the clean pass of the second step gives a NaN loss
        forwards.append(1)
        if len(forwards) == 3:
            output.loss = output.loss * float("nan")
        return output

    model.register_forward_hook(poison)
    trainer = PerturbTrainer(
        model=model, args=args(tmp_path, 1, 3, optim="sgd"), train_dataset=dataset(), perturb=cls, perturb_kwargs=pkw
    )
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert opt.skipped_steps == 1 and len(forwards) == 5  # the skipped step stops after its clean pass
    assert trainer.lr_scheduler.last_epoch == 2  # three steps, one skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _l2(model):
    return 0.05 * sum(p.pow(2).sum() for p in model.parameters())


class _RegularisedStep(PerturbTrainer):
    """Hugging Face's documented customisation: a training_step override that calls super() and adds a term."""

    calls = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        type(self).calls += 1
        loss = super().training_step(model, inputs, num_items_in_batch)
        reg = _l2(model)
        self.accelerator.backward(reg)
        return loss + reg.detach()


def test_a_training_step_override_runs_at_every_pass(tmp_path):
    """The replay ran Trainer.training_step directly, past a subclass's override: its term was in the clean
    gradient and missing from the perturbed one (0.058 off after 5 steps in the review, matching neither loop).
    Now the override runs at every pass, and the run equals the hand loop with the term in every pass."""
    cls, pkw = PRESETS["SAM"]
    model = make_model()
    _RegularisedStep.calls = 0
    trainer = _RegularisedStep(
        model=model, args=args(tmp_path, 1, 3, optim="sgd"), train_dataset=dataset(), perturb=cls, perturb_kwargs=pkw
    )
    trainer.train()
    assert _RegularisedStep.calls == 3 * 2
    ref, _ = hand_loop("SAM", 1, 3, "sgd", extra=_l2)
    assert_close_models(model, ref)


def test_a_clipping_disagreement_names_the_value_that_turns_trainers_off(tmp_path):
    """TrainingArguments.max_grad_norm (1.0 by default) and the optimizer's own differ: refused at the first step,
    weights unchanged, naming what turns Trainer's off. The message said "=0 or None", and None crashes Trainer
    (it compares max_grad_norm > 0); found by this round's frameworks review."""
    cls, pkw = PRESETS["SAM"]
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = PerturbTrainer(
        model=model,
        args=args(tmp_path, 1, 1),
        train_dataset=dataset(),
        perturb=cls,
        perturb_kwargs=dict(pkw, max_grad_norm=2.0),
    )
    with pytest.raises(ValueError, match=r"TrainingArguments\(max_grad_norm\)=0 disables the framework's\)"):
        trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
