"""Framework loops with the real libraries: what trains right, what is refused before any change.

Lightning automatic optimization without accumulation trains SAM and APD exactly as a hand
loop does; with ``accumulate_grad_batches > 1`` or the ``16-mixed`` GradScaler path it stops
at the first step with an error naming the fix. An Accelerate ``accumulate()`` loop with
``gradient_accumulation_steps > 1`` is refused too; the README's recipe (micro-batches inside
the closure) trains and equals a plain loop over the whole batch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastperturb as fp

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(48, 6, generator=torch.Generator().manual_seed(0))
Y = torch.randn(48, 2, generator=torch.Generator().manual_seed(1))
BATCH = 8


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


OPTS = {
    "sam": lambda ps: fp.SAM(ps, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9),
    "apd": lambda ps: fp.APD(ps, torch.optim.SGD, eps=0.05, steps=2, lr=0.1, momentum=0.9),
}


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


# ---- Lightning -------------------------------------------------------------------------

pl = pytest.importorskip("pytorch_lightning")


class Module(pl.LightningModule):
    def __init__(self, opt_name: str):
        super().__init__()
        self.net = make_net()
        self.opt_name = opt_name
        self.closure_calls = 0

    def training_step(self, batch, batch_idx):
        self.closure_calls += 1
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return OPTS[self.opt_name](self.parameters())


def trainer(**kw):
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    args = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=4,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    args.update(kw)
    return pl.Trainer(**args)


def loader():
    return DataLoader(TensorDataset(X, Y), batch_size=BATCH, shuffle=False)


@pytest.mark.parametrize("opt_name", list(OPTS))
def test_lightning_automatic_optimization_equals_hand_loop(opt_name):
    module = Module(opt_name)
    hand = copy.deepcopy(module.net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about dataloader workers
        trainer().fit(module, loader())
    opt = OPTS[opt_name](hand.parameters())
    for i, (x, y) in enumerate(loader()):
        if i == 4:
            break

        def closure(x=x, y=y):
            loss = nn.functional.mse_loss(hand(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    K = opt.spec.steps
    assert module.closure_calls == 4 * (K + 1)
    for p, q in zip(module.net.parameters(), hand.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(hand.parameters(), make_net().parameters()))


@pytest.mark.parametrize("opt_name", list(OPTS))
def test_lightning_accumulate_grad_batches_is_refused_before_any_change(opt_name):
    module = Module(opt_name)
    before = snapshot(module.net)
    with warnings.catch_warnings(), pytest.raises(fp.UnsupportedTrainingLoop) as info:
        warnings.simplefilter("ignore")
        trainer(accumulate_grad_batches=2).fit(module, loader())
    msg = str(info.value)
    assert "accumulate_grad_batches=2" in msg and "fastperturb.integrations.lightning" in msg
    assert module.closure_calls == 1  # Lightning ran micro-batch 0 itself; step() refused micro-batch 1
    assert all(torch.equal(p, q) for p, q in zip(module.net.parameters(), before))


def test_lightning_16_mixed_grad_scaler_path_names_the_fix():
    """precision='16-mixed' with a GradScaler: the plugin runs the closure, then
    scaler.step(optimizer) calls step() without one."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    module = Module("apd")
    before = snapshot(module.net)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with warnings.catch_warnings(), pytest.raises(TypeError) as info:
        warnings.simplefilter("ignore")
        trainer(plugins=[plugin]).fit(module, loader())
    msg = str(info.value)
    # (the one-line fix for automatic optimization: the mixin, which steps with the closure and the scaler)
    assert "GradScaler.step" in msg and "bf16-mixed" in msg and "lightning.PerturbMixin" in msg
    assert all(torch.equal(p, q) for p, q in zip(module.net.parameters(), before))


# ---- Accelerate ------------------------------------------------------------------------

accelerate = pytest.importorskip("accelerate")


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_accelerate_accumulate_loop_is_refused(fresh_accelerate_state):
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = make_net()
    net, opt, dl = acc.prepare(net, OPTS["sam"](net.parameters()), loader())
    before = snapshot(net)
    calls = []
    with pytest.raises(fp.UnsupportedTrainingLoop, match="gradient_accumulation_steps=2.*no_sync"):
        for x, y in dl:
            with acc.accumulate(net):

                def closure(x=x, y=y):
                    calls.append(1)
                    loss = nn.functional.mse_loss(net(x), y)
                    acc.backward(loss)
                    return loss

                opt.step(closure)
                opt.zero_grad()
    assert calls == []  # micro-batch 0 was skipped by Accelerate, micro-batch 1 refused by fastperturb
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_accelerate_recipe_micro_batches_inside_the_closure(fresh_accelerate_state):
    """The README recipe: accumulation steps 1, every micro-batch inside the closure. Equals
    the same optimizer on the whole batch (the mean loss over two equal halves)."""
    acc = accelerate.Accelerator(cpu=True)
    net = make_net()
    plain = copy.deepcopy(net)
    net, opt = acc.prepare(net, OPTS["apd"](net.parameters()))
    ref_opt = OPTS["apd"](plain.parameters())
    for start in range(0, 32, 2 * BATCH):
        xb, yb = X[start : start + 2 * BATCH], Y[start : start + 2 * BATCH]
        micro = [(xb[:BATCH], yb[:BATCH]), (xb[BATCH:], yb[BATCH:])]

        def closure(micro=micro):
            total = 0.0
            for i, (x, y) in enumerate(micro):
                ctx = acc.no_sync(net) if i < len(micro) - 1 else contextlib.nullcontext()
                with ctx:
                    loss = nn.functional.mse_loss(net(x), y) / len(micro)
                    acc.backward(loss)
                total += loss.detach()
            return total

        opt.step(closure)
        opt.zero_grad()

        def whole(xb=xb, yb=yb):
            loss = nn.functional.mse_loss(plain(xb), yb)
            loss.backward()
            return loss

        ref_opt.step(whole)
    for p, q in zip(net.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)  # two half-batch sums vs one: float rounding


def test_accumulation_in_closure_lets_an_integration_through(fresh_accelerate_state):
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = make_net()
    net, opt = acc.prepare(net, OPTS["sam"](net.parameters()))

    def closure():
        loss = nn.functional.mse_loss(net(X), Y)
        acc.backward(loss)
        return loss

    with fp.optim.frameworks.accumulation_in_closure():
        opt.step(closure)
    with pytest.raises(fp.UnsupportedTrainingLoop):
        opt.step(closure)


def test_accelerate_state_left_behind_does_not_refuse_a_plain_loop(fresh_accelerate_state):
    """Accelerate's accumulation setting is process-wide and outlives its Accelerator: only a step
    that comes through Accelerate's optimizer wrapper is refused, not a plain loop run later."""
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = make_net()
    _, prepared = acc.prepare(net, OPTS["sam"](net.parameters()))
    with pytest.raises(fp.UnsupportedTrainingLoop):
        prepared.step(lambda: _mse_backward(net))
    plain = make_net()
    opt = OPTS["sam"](plain.parameters())
    before = [p.detach().clone() for p in plain.parameters()]
    opt.step(lambda: _mse_backward(plain))  # the same process, no Accelerate in the call
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), before))


def _mse_backward(net):
    loss = nn.functional.mse_loss(net(X), Y)
    loss.backward()
    return loss


# ---- Hugging Face Trainer ----------------------------------------------------------------

transformers = pytest.importorskip("transformers")


class _TinyRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_net()

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class _Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return len(X)

    def __getitem__(self, i):
        return {"x": X[i], "labels": Y[i]}


def test_plain_hf_trainer_is_told_to_use_the_integration(tmp_path, fresh_accelerate_state):
    """transformers' Trainer calls optimizer.step() with no closure: the error names PerturbTrainer."""
    model = _TinyRegressor()
    before = snapshot(model)
    opt = OPTS["apd"](model.parameters())
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Pairs(), optimizers=(opt, None))
    with pytest.raises(
        TypeError,
        match=r"Hugging Face Trainer: use fastperturb\.integrations\.transformers\."
        r"PerturbTrainer.*no first_step",
    ):
        trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def _dcp_problem(make):
    """``build(lr) -> (model, make(params, lr))`` (same weights every call) and ``train(model, opt, n)`` (n steps
    on one fixed batch), for the checkpoint tests."""
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), torch.randn(16, 2)

    def build(lr):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        return m, make(m.parameters(), lr)

    def train(m, opt, n):
        for _ in range(n):

            def closure():
                loss = ((m(x) - y) ** 2).mean()
                loss.backward()
                return loss

            opt.step(closure)

    return build, train


@pytest.mark.filterwarnings("ignore::UserWarning")  # (DCP without a process group says so)
@pytest.mark.parametrize(
    "make",
    [
        lambda ps, lr: fp.SAM(ps, torch.optim.AdamW, rho=0.05, lr=lr),
        lambda ps, lr: fp.APD(ps, torch.optim.SGD, eps=0.01, steps=2, lr=lr, momentum=0.9),
        lambda ps, lr: fp.GSAM(ps, torch.optim.SGD, lr=lr, momentum=0.9),
    ],
)
def test_dcp_takes_the_wrapper_itself_and_resumes_bit_identical(tmp_path, make):
    """get/set_optimizer_state_dict(model, opt), as Lightning's ModelParallelStrategy and TorchTitan-style code
    call them: on a fresh optimizer DCP creates the state by step() without a closure, zero gradients, every lr
    at 0. That was refused (only opt.base_optimizer worked); it is taken as the base step, which moves nothing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    build, train = _dcp_problem(make)

    model, opt = build(0.01)
    train(model, opt, 2)
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path
    )
    train(model, opt, 2)

    model2, opt2 = build(0.5)
    with torch.no_grad():
        for p in model2.parameters():
            p.normal_()
    before = [p.detach().clone() for p in model2.parameters()]
    state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    assert all(torch.equal(a, b) for a, b in zip(before, model2.parameters()))  # its state created, nothing moved
    assert opt2.param_groups[0]["lr"] == 0.5
    dcp.load(state, checkpoint_id=tmp_path)
    set_model_state_dict(model2, state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"])
    assert opt2.param_groups[0]["lr"] == 0.01
    train(model2, opt2, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@pytest.mark.filterwarnings("ignore::UserWarning")  # (DCP without a process group says so)
@pytest.mark.parametrize("target", ["wrapper", "base"])
def test_dcp_between_first_and_second_step_is_refused_before_anything_changes(target):
    """A save or load through DCP while a first_step() is pending is refused, as the wrapper's own are, and the
    cycle then finishes as if nothing had been tried: DCP's state-creating step(None) on a fresh optimizer used to
    run the base step first (Adam's first step, at lr 0, so the real one counted 2), and a load handed
    opt.base_optimizer went through (FriendlySAM's mean reset mid-cycle). DCP creates state only when there is
    none; handed the base, whose steps the wrapper does not see, the test starts after one full step."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    build, train = _dcp_problem(lambda ps, lr: fp.SAM(ps, torch.optim.Adam, rho=0.05, lr=lr))
    runs = []
    for meddle in (True, False):
        model, opt = build(0.01)
        if target == "base":
            train(model, opt, 1)
        saved = copy.deepcopy(opt.state_dict())
        x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.randn(16, 2)
        ((model(x) - y) ** 2).mean().backward()
        opt.first_step()
        before = copy.deepcopy(opt.base_optimizer.state_dict())
        if meddle:
            handed = opt if target == "wrapper" else opt.base_optimizer
            if target == "wrapper":
                with pytest.raises(RuntimeError, match="cannot be saved between first_step\\(\\) and second_step"):
                    get_optimizer_state_dict(model, handed)
            with pytest.raises(RuntimeError, match="cannot be loaded between first_step\\(\\) and second_step"):
                set_optimizer_state_dict(model, handed, saved)
            with pytest.raises(RuntimeError, match="cannot be loaded between"):
                opt.base_optimizer.load_state_dict(before)
            assert opt.param_groups[0]["lr"] == 0.01
            assert str(opt.base_optimizer.state_dict()) == str(before)  # nothing created, nothing loaded
        ((model(x) - y) ** 2).mean().backward()
        opt.second_step()
        runs.append([p.detach().clone() for p in model.parameters()])
        steps = 2 if target == "base" else 1
        assert all(float(st["step"]) == steps for st in opt.base_optimizer.state.values())
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.filterwarnings("ignore::UserWarning")  # (DCP without a process group says so)
@pytest.mark.parametrize("saved_after", [0, 2])
@pytest.mark.parametrize("form", ["nested", "flattened", "full, through torch.save"])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps, lr: fp.LookSAM(ps, torch.optim.SGD, rho=0.1, k=3, lr=lr, momentum=0.9),
        lambda ps, lr: fp.LookSAM(ps, torch.optim.AdamW, rho=0.1, k=3, scope="layer", lr=lr),
        lambda ps, lr: fp.FriendlySAM(ps, torch.optim.SGD, rho=0.1, lr=lr),
        lambda ps, lr: fp.FriendlySAM(ps, torch.optim.AdamW, rho=0.1, sigma=0.5, lr=lr),
    ],
    ids=["looksam", "looksam-layer-adamw", "fsam-sgd-no-base-state", "fsam-adamw"],
)
def test_dcp_carries_the_family_state(tmp_path, make, form, saved_after):
    """LookSAM's gv (with its norms and counter) and FriendlySAM's m go into a distributed checkpoint as
    per-parameter entries, so a resume is bit-identical in each of DCP's forms: nested, flattened (unflattened by
    the live state's names, TorchTitan's form) and a full state dict saved with torch.save. Saved after 2 steps
    with k=3 the resume's first step reuses gv; after 0 there is none yet. Until this round DCP dropped them
    (a refresh and a new running mean, 0.02-0.17 apart after 3 steps)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = {
        "nested": StateDictOptions(),
        "flattened": StateDictOptions(flatten_optimizer_state_dict=True),
        "full, through torch.save": StateDictOptions(full_state_dict=True),
    }[form]
    build, train = _dcp_problem(make)

    def save(state):
        if form.startswith("full"):
            torch.save(state, tmp_path / "full.pt")
        else:
            dcp.save(state, checkpoint_id=tmp_path)

    model, opt = build(0.01)
    train(model, opt, saved_after)
    save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=options)})
    train(model, opt, 3)

    model2, opt2 = build(0.5)
    with torch.no_grad():
        for p in model2.parameters():
            p.normal_()
    if form.startswith("full"):
        state = torch.load(tmp_path / "full.pt", weights_only=True)
    else:
        state = {
            "model": get_model_state_dict(model2),
            "optim": get_optimizer_state_dict(model2, opt2, options=options),
        }
        dcp.load(state, checkpoint_id=tmp_path)
    set_model_state_dict(model2, state["model"], options=options)
    set_optimizer_state_dict(model2, opt2, state["optim"], options=options)
    assert opt2.param_groups[0]["lr"] == 0.01
    assert not any(k in s for s in opt2.base_optimizer.state.values() for k in opt2.dcp_keys)  # the base's stays its
    train(model2, opt2, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("name", ["LookSAM", "FriendlySAM"])
def test_family_entries_only_for_dcp(name):
    """The per-parameter entries are made for DCP only: opt.state_dict() keeps the family state under
    "fastperturb" and the base's entries as they are, and opt.state is the base optimizer's own dict."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    m = nn.Linear(3, 2)
    opt = getattr(fp, name)(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x = torch.randn(4, 3)

    def closure():
        loss = m(x).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    plain = opt.state_dict()
    assert not any(k in s for s in plain["state"].values() for k in opt.dcp_keys)
    assert opt.state is opt.base_optimizer.state
    dcp_sd = get_optimizer_state_dict(m, opt)
    assert all(set(opt.dcp_keys) <= set(s) for s in dcp_sd["state"].values())
    assert not any(k in s for s in opt.base_optimizer.state.values() for k in opt.dcp_keys)  # nothing left live
    torch._dynamo.reset()  # opt.state read in compiled code (fullgraph): the DCP check does not walk frames there
    assert torch.equal(torch.compile(lambda t: t * len(opt.state), fullgraph=True, backend="eager")(x), x * 2)


def test_step_without_a_closure_outside_dcp_is_still_refused():
    m = nn.Linear(3, 2)
    opt = fp.SAM(m.parameters(), torch.optim.SGD, lr=0.0)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
