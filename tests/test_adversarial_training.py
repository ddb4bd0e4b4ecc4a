"""The adversarial-training recipe (fastperturb.adversarial) against the official AWP algorithm written out
in plain PyTorch here: a proxy model takes one gradient-ascent step on the adversarial loss, its per-layer
difference to the model, rescaled to gamma * ||w_l||, is added to the weights, the base optimizer descends
on the same adversarial examples at the perturbed weights, and the difference is subtracted again."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastperturb as fp
from fastperturb import cli
from fastperturb.adversarial import adversarial_step, set_perturb
from fastperturb.attacks import pgd, trades_pgd

GAMMA = 0.01
EPS, ALPHA, STEPS = 0.2, 0.08, 3
# fastperturb computes its per-layer coefficients (norms, gamma * ||w|| / ||g||) in float32 by design
# (ops/reference.py), so delta carries a relative error of about 1e-7 even for float64 weights; an algorithmic
# difference (another radius, norm, layer selection or order of operations) moves the results by 1e-4 or more.
TOL = dict(rtol=1e-6, atol=1e-9)


def _model(batchnorm=False):
    torch.manual_seed(0)
    norm = [nn.BatchNorm2d(4)] if batchnorm else []
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), *norm, nn.ReLU(), nn.Flatten(), nn.Linear(64, 10)).double()


def _batches(n_steps, batch=16):
    g = torch.Generator().manual_seed(2)
    return [
        (torch.rand(batch, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(n_steps)
    ]


def _attack(seed, trades=False):
    fn = trades_pgd if trades else pgd
    return lambda m, x, y: fn(m, x, y, EPS, ALPHA, STEPS, generator=torch.Generator().manual_seed(seed))


class OfficialAWP:
    """The official AWP step, from the paper's code (written anew): proxy model + proxy SGD, diff, perturb,
    descent with the base optimizer at the perturbed weights, restore."""

    def __init__(self, model, optimizer, gamma, trades_beta=None):
        self.model, self.opt, self.gamma, self.beta = model, optimizer, gamma, trades_beta
        self.proxy = copy.deepcopy(model)
        self.proxy_opt = torch.optim.SGD(self.proxy.parameters(), lr=0.01)  # its lr cancels in the rescaling

    def _loss(self, net, x, x_adv, y):
        if self.beta is None:
            return F.cross_entropy(net(x_adv), y)
        logits_adv = net(x_adv)  # the official train(): three forwards, in this order
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(net(x), dim=1), reduction="batchmean")
        return F.cross_entropy(net(x), y) + self.beta * kl

    def step(self, x, x_adv, y, perturb=True):
        diff = {}
        if perturb:
            self.proxy.load_state_dict(self.model.state_dict())
            self.proxy.train()
            self.proxy_opt.zero_grad()
            (-self._loss(self.proxy, x, x_adv, y)).backward()
            self.proxy_opt.step()
            for (name, w), pw in zip(self.model.named_parameters(), self.proxy.parameters()):
                if w.dim() > 1:  # conv/linear weights only
                    d = pw.detach() - w.detach()
                    diff[name] = self.gamma * w.detach().norm() / (d.norm() + 1e-20) * d
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, d in diff.items():
                params[name].add_(d)
        self.opt.zero_grad()
        self._loss(self.model, x, x_adv, y).backward()
        self.opt.step()
        with torch.no_grad():
            for name, d in diff.items():
                params[name].sub_(d)
        return diff


@pytest.mark.parametrize("n_steps", [1, 4])
@pytest.mark.parametrize("trades_beta", [None, 6.0])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_recipe_equals_official_awp(n_steps, trades_beta, batchnorm):
    """With BatchNorm the running statistics move once per step, at w + delta, as the official code's one
    forward of the trained model (the eval-mode attack of the next step reads them, so the weights show it)."""
    ours, theirs = _model(batchnorm), _model(batchnorm)
    sgd = dict(lr=0.1, momentum=0.9)  # no weight decay: see test_weight_decay_difference_to_official
    opt = fp.AWP(ours.parameters(), torch.optim.SGD, gamma=GAMMA, **sgd)
    official = OfficialAWP(theirs, torch.optim.SGD(theirs.parameters(), **sgd), GAMMA, trades_beta)
    for i, (x, y) in enumerate(_batches(n_steps)):
        perturb = i != 1  # one warm-up-like plain step in the middle of the multi-step run
        set_perturb(opt, perturb)
        step = adversarial_step(opt, ours, x, y, _attack(i, trades_beta is not None), trades_beta=trades_beta)
        x_adv = _attack(i, trades_beta is not None)(theirs, x, y)
        torch.testing.assert_close(step.x_adv, x_adv, rtol=0, atol=1e-12)  # made at the clean weights
        diff = official.step(x, x_adv, y, perturb=perturb)
        assert bool(diff) == perturb
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            # the descent gradient G (left in .grad at the restored weights) is the official gradient at w + delta
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=f"grad {name} step {i}")
            torch.testing.assert_close(p, q, **TOL, msg=f"weight {name} step {i}")
        for (name, b), c in zip(ours.named_buffers(), theirs.buffers()):
            torch.testing.assert_close(b, c, **TOL, msg=f"buffer {name} step {i}")
    assert not torch.equal(ours[0].weight, _model()[0].weight)  # it trained
    if batchnorm:  # one forward per step (TRADES-AWP: three, adversarial, natural, natural)
        assert int(ours[1].num_batches_tracked) == n_steps * (1 if trades_beta is None else 3)


def _official_train_mode_pgd(model, x, y, seed):
    """The PGD-AT AWP script's attack (Rice et al.'s ``attack_pgd``, written anew): the model stays in train
    mode, so every forward moves BatchNorm's statistics, and after the last step one more forward scores the
    restart (one here) before it is kept."""
    gen = torch.Generator().manual_seed(seed)
    delta = (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1) * EPS
    delta = torch.min(torch.max(delta, -x), 1 - x)
    for _ in range(STEPS):
        delta.requires_grad_(True)
        grad = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)[0]
        d = (delta.detach() + ALPHA * grad.sign()).clamp(-EPS, EPS)
        delta = torch.min(torch.max(d, -x), 1 - x)
    F.cross_entropy(model(x + delta), y, reduction="none")  # the restart's score: one more train-mode forward
    return (x + delta).detach()


def test_recipe_with_a_train_mode_attack_equals_the_official_pgd_at_awp_loop():
    """The official PGD-AT AWP loop: ``model.train()`` per epoch, the attack in train mode (its forwards move
    the running statistics), AWP, and a logging forward on the clean batch. Ported as the README says:
    ``pgd(..., train_mode=True, keep_stats=True)``, one forward of ``x_adv`` for the restart's score, and the
    loop's logging forward. Weights and statistics equal; the default eval-mode attack drifts from it."""
    sgd = dict(lr=0.1, momentum=0.9)
    theirs = _model(batchnorm=True).train()
    official = OfficialAWP(theirs, torch.optim.SGD(theirs.parameters(), **sgd), GAMMA)
    ported, default = _model(batchnorm=True).train(), _model(batchnorm=True).train()
    opts = [fp.AWP(m.parameters(), torch.optim.SGD, gamma=GAMMA, **sgd) for m in (ported, default)]

    def train_mode_attack(seed):
        def attack(m, x, y):
            x_adv = pgd(
                m,
                x,
                y,
                EPS,
                ALPHA,
                STEPS,
                train_mode=True,
                keep_stats=True,
                generator=torch.Generator().manual_seed(seed),
            )
            with torch.no_grad():
                m(x_adv)  # the official attack's score of its restart
            return x_adv

        return attack

    steps = _batches(3)
    for i, (x, y) in enumerate(steps):
        x_adv = _official_train_mode_pgd(theirs, x, y, i)
        official.step(x, x_adv, y)
        theirs(x)  # the loop's logging forward
        step = adversarial_step(opts[0], ported, x, y, train_mode_attack(i))
        torch.testing.assert_close(step.x_adv, x_adv, rtol=0, atol=1e-12)
        with torch.no_grad():
            ported(x)
        adversarial_step(opts[1], default, x, y, _attack(i))
        with torch.no_grad():
            default(x)
        for (name, p), q in zip(ported.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, **TOL, msg=f"weight {name} step {i}")
        for (name, b), c in zip(ported.named_buffers(), theirs.buffers()):
            torch.testing.assert_close(b, c, **TOL, msg=f"buffer {name} step {i}")
    assert int(ported[1].num_batches_tracked) == len(steps) * (STEPS + 3)
    drift = max((p - q).abs().max().item() for p, q in zip(default.parameters(), theirs.parameters()))
    assert drift > 1e-4, drift


def test_freeze_bn_keeps_the_clean_pass_statistics():
    """A preset's freeze_bn (the SAM convention) wins: the statistics move once, in the clean pass at w."""
    model, ref = _model(True), _model(True)
    opt = fp.AWP(model.parameters(), torch.optim.SGD, gamma=GAMMA, lr=0.1, freeze_bn=model)
    ((x, y),) = _batches(1)
    step = adversarial_step(opt, model, x, y, _attack(0))
    ref(step.x_adv)  # train mode, the clean weights: one update
    for b, c in zip(model.buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, rtol=0, atol=0)
    assert int(model[1].num_batches_tracked) == 1


def test_weight_decay_difference_to_official():
    """The official code steps at w + delta and then subtracts delta, so its weight decay acts on w + delta:
    after one SGD step it differs from fastperturb's (which steps from w) by exactly -lr * wd * delta."""
    lr, wd = 0.1, 5e-3
    ours, theirs = _model(), _model()
    opt = fp.AWP(ours.parameters(), torch.optim.SGD, gamma=GAMMA, lr=lr, momentum=0.9, weight_decay=wd)
    official = OfficialAWP(theirs, torch.optim.SGD(theirs.parameters(), lr=lr, momentum=0.9, weight_decay=wd), GAMMA)
    ((x, y),) = _batches(1)
    adversarial_step(opt, ours, x, y, _attack(0))
    diff = official.step(x, _attack(0)(theirs, x, y), y)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        expected = q - (-lr * wd * diff[name] if name in diff else 0)
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-10, msg=name)
    # the difference is far above that tolerance (and above float32 coefficient noise, about 1e-11 here)
    assert max(float(d.abs().max()) for d in diff.values()) * lr * wd > 1e-7


def test_recipe_with_sam_equals_sam_on_adversarial_examples():
    """SAM-AT: the same closure under fp.SAM; reference: delta = rho * g / ||g|| over all parameters."""
    rho, lr = 0.05, 0.1
    ours, ref = _model(), _model()
    opt = fp.SAM(ours.parameters(), torch.optim.SGD, rho=rho, lr=lr)
    ((x, y),) = _batches(1)
    adversarial_step(opt, ours, x, y, _attack(0))
    x_adv = _attack(0)(ref, x, y)
    params = list(ref.parameters())
    g = torch.autograd.grad(F.cross_entropy(ref(x_adv), y), params)
    norm = torch.cat([t.flatten() for t in g]).norm()
    with torch.no_grad():
        for p, t in zip(params, g):
            p.add_(rho * t / norm)
    g2 = torch.autograd.grad(F.cross_entropy(ref(x_adv), y), params)
    with torch.no_grad():
        for p, t, s in zip(params, g, g2):
            p.sub_(rho * t / norm).sub_(lr * s)
    for p, q in zip(ours.parameters(), params):
        torch.testing.assert_close(p, q, **TOL)


def test_attack_in_eval_mode_weight_passes_in_train_mode():
    """As the official code: the attack runs in eval mode, both AWP passes in train mode (where it stays)."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x

    model = nn.Sequential(Probe(), _model()).train()
    opt = fp.AWP(model.parameters(), torch.optim.SGD, gamma=GAMMA, lr=0.1)
    ((x, y),) = _batches(1)
    adversarial_step(opt, model, x, y, _attack(0))
    # 1 + STEPS attack passes in eval mode, then the clean and the perturbed pass in train mode
    assert seen == [False] * STEPS + [True, True] and model.training


def test_plain_optimizer_and_set_perturb_errors():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ((x, y),) = _batches(1)
    before = [p.clone() for p in model.parameters()]
    step = adversarial_step(opt, model, x, y, _attack(0))  # plain PGD-AT with any torch optimizer
    assert step.loss.ndim == 0 and all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(TypeError, match="needs a fastperturb optimizer"):
        set_perturb(opt, False)


def test_demo_evaluation_leaves_the_trained_model_bit_identical():
    from fastperturb.data import digits_split
    from fastperturb.tools import demo_adversarial as D
    from fastperturb.tools.demo import DigitsCNN

    train_data, (xt, yt) = digits_split()
    data = (train_data, (xt[:40], yt[:40]), None)
    args = cli.build_parser(["demo-adversarial"]).parse_args(
        ["demo-adversarial", "--eval-steps", "2", "--eval-restarts", "2", "--flat-eps", "0.01", "--flat-steps", "2"]
    )
    model = DigitsCNN().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = D.evaluate(model, data, 0, args)
    assert set(out["adv_loss_change"]) == {"0.01"} and out["adv_loss_change"]["0.01"] > 0
    assert 0 <= out["robust_test"] <= out["clean_test"] <= 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.slow
def test_demo_adversarial_end_to_end(tmp_path, capsys):
    out = tmp_path / "adv"
    rc = cli.main(
        [
            "demo-adversarial",
            "--epochs",
            "2",
            "--warmup",
            "1",
            "--seeds",
            "0,1",
            "--presets",
            "pgd,pgd-awp,trades-awp",
            "--train-size",
            "300",
            "--train-steps",
            "1",
            "--eval-steps",
            "2",
            "--eval-restarts",
            "1",
            "--flat-eps",
            "0.01",
            "--flat-steps",
            "1",
            "--batch-size",
            "256",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "robust test PGD-2x1" in printed and "AWP paper claims checked by this run" in printed
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["runs"]) == {"pgd", "pgd-awp", "trades-awp"}
    for by_seed in doc["runs"].values():
        assert set(by_seed) == {"0", "1"}
        for r in by_seed.values():
            assert len(r["history"]["robust_test"]) == 2
            assert r["history"]["robust_train"][0] in {k / 300 for k in range(301)}  # measured on the 300 kept
            assert 0 <= r["final"]["robust_test"] <= 1 and r["final"]["adv_loss_change"]["0.01"] > 0
    # pgd vs pgd-awp are paired; trades-awp has no plain TRADES to compare with
    claims = [c["claim"] for c in doc["claims"]]
    assert claims and all("PGD-AWP" in c and "TRADES" not in c for c in claims)
    # the first (warm-up) epoch is identical with and without AWP: same init, batches and attack draws
    plain, awp = (doc["runs"][p]["0"]["history"]["train_loss"] for p in ("pgd", "pgd-awp"))
    assert plain[0] == awp[0] and plain[1] != awp[1]


def test_bad_demo_arguments():
    parser = cli.build_parser(["demo-adversarial"])
    for bad in (["--presets", "pgd,fgsm"], ["--seeds", "-1"], ["--eps", "0"], ["--epochs", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["demo-adversarial", *bad])
