"""fastperturb.attacks: PGD (L-inf, L2) and TRADES against plain-PyTorch implementations written here,
the ball and data-range constraints, restarts, and that an attack or an evaluation leaves the model alone."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastperturb.attacks import kl_to_clean, pgd, robust_accuracy, trades_loss, trades_pgd


def _model(dtype=torch.float64, bn=False):
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 10)]
    return nn.Sequential(*layers).to(dtype)


def _data(n=12, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g, dtype=dtype)
    x[:, :, 0] = 0.0  # pixels on the edge of the data range, as in the digits
    x[:, :, -1] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


# --- the plain-PyTorch reference: x_adv kept as the iterate, projections written as in textbooks ---


def _reference_pgd(model, x, y, eps, alpha, steps, norm, gen, loss_fn=None):
    loss_fn = loss_fn or (lambda logits: F.cross_entropy(logits, y, reduction="sum"))
    b = x.shape[0]
    trades_start = norm == "normal"
    if norm == "linf":
        x_adv = x + (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1) * eps
    elif norm == "l2":
        z = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        r = torch.rand(b, generator=gen, dtype=x.dtype)
        x_adv = x + z / z.reshape(b, -1).norm(dim=1).reshape(b, 1, 1, 1) * (r * eps).reshape(b, 1, 1, 1)
    else:  # TRADES' start: its first gradient is taken there, unprojected and unclipped (TRADES-AWP's code)
        x_adv = x + 0.001 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        norm = "linf"
    if not trades_start:
        x_adv = _ref_project(x_adv, x, eps, norm)
    for _ in range(steps):
        x_adv = x_adv.clone().requires_grad_(True)
        grad = torch.autograd.grad(loss_fn(model(x_adv)), x_adv)[0]
        if norm == "linf":
            x_adv = x_adv.detach() + alpha * grad.sign()
        else:
            gn = grad.reshape(b, -1).norm(dim=1).reshape(b, 1, 1, 1)
            x_adv = x_adv.detach() + alpha * grad / gn
        x_adv = _ref_project(x_adv, x, eps, norm)
    return x_adv.detach()


def _ref_project(x_adv, x, eps, norm):
    if norm == "linf":
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    else:
        d = x_adv - x
        n = d.reshape(d.shape[0], -1).norm(dim=1).reshape(-1, 1, 1, 1)
        x_adv = x + torch.where(n > eps, d * eps / n, d)
    return x_adv.clamp(0.0, 1.0)


def _ball_norm(d, norm):
    flat = d.reshape(d.shape[0], -1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 0.2, 0.05), ("l2", 0.8, 0.3)])
def test_pgd_matches_plain_pytorch(norm, eps, alpha):
    model = _model().eval()
    x, y = _data()
    ours = pgd(model, x, y, eps, alpha, 7, norm=norm, generator=torch.Generator().manual_seed(5))
    ref = _reference_pgd(model, x, y, eps, alpha, 7, norm, torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    # the attack did its job: the loss grew well beyond the clean one
    assert F.cross_entropy(model(ours), y) > F.cross_entropy(model(x), y) + 0.05


def test_trades_attack_and_loss_match_plain_pytorch():
    model = _model().eval()
    x, y = _data()
    ours = trades_pgd(model, x, y, 0.2, 0.05, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    kl = lambda logits: (p_clean * (p_clean.log() - F.log_softmax(logits, dim=1))).sum()
    ref = _reference_pgd(model, x, y, 0.2, 0.05, 5, "normal", torch.Generator().manual_seed(3), loss_fn=kl)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)

    per_example = kl_to_clean(model, x)(model(ours), y)
    p_adv_log = F.log_softmax(model(ours), dim=1)
    torch.testing.assert_close(per_example, (p_clean * (p_clean.log() - p_adv_log)).sum(1))

    model.train()
    beta = 6.0
    logits, logits_adv = model(x), model(ours)
    p = F.softmax(logits, dim=1)
    expected = F.cross_entropy(logits, y) + beta * (p * (p.log() - F.log_softmax(logits_adv, 1))).sum() / len(y)
    torch.testing.assert_close(trades_loss(model, x, ours, y, beta=beta), expected)
    # the official TRADES-AWP code's three forwards: the same loss, BatchNorm statistics moved three times
    torch.testing.assert_close(trades_loss(model, x, ours, y, beta=beta, forwards=3), expected)
    with pytest.raises(ValueError, match="forwards must be 2 or 3"):
        trades_loss(model, x, ours, y, forwards=1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("init", ["uniform", "normal", "none"])
@pytest.mark.parametrize("restarts", [1, 2])
def test_examples_stay_in_ball_and_range(norm, init, restarts):
    model = _model(torch.float32)
    x, y = _data(32, torch.float32)
    # a large step overshoots the ball every time: the projection must catch it
    for eps, alpha in ((0.1, 0.5), (0.3, 0.07), (2.0, 1.0)):
        x_adv = pgd(
            model,
            x,
            y,
            eps,
            alpha,
            6,
            norm=norm,
            init=init,
            restarts=restarts,
            generator=torch.Generator().manual_seed(0),
        )
        assert x_adv.shape == x.shape and not x_adv.requires_grad
        assert float(_ball_norm(x_adv - x, norm).max()) <= eps * (1 + 1e-6)
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        # the projection binds: the step overshoots, so some example reaches the sphere or the range's edge
        assert float(_ball_norm(x_adv - x, norm).max()) > 0.5 * min(eps, 1.0)
    # without a data range only the ball binds
    x_adv = pgd(model, x, y, 0.3, 0.5, 3, norm=norm, init=init, data_range=None)
    assert float(_ball_norm(x_adv - x, norm).max()) <= 0.3 * (1 + 1e-6)
    assert float(x_adv.min()) < 0.0 or float(x_adv.max()) > 1.0


def test_restarts_keep_the_strongest_per_example():
    model = _model().eval()
    x, _ = _data(40)
    with torch.no_grad():
        y = model(x).argmax(1)  # every clean example is classified correctly; eps 0.1 flips about 25 of 40
    gen = torch.Generator().manual_seed(11)
    best = pgd(model, x, y, 0.1, 0.03, 3, restarts=3, generator=gen)
    gen = torch.Generator().manual_seed(11)  # the same draws, one restart at a time
    singles = [pgd(model, x, y, 0.1, 0.03, 3, generator=gen) for _ in range(3)]
    with torch.no_grad():
        wrong = torch.stack([model(s).argmax(1) != y for s in singles])
        loss = torch.stack([F.cross_entropy(model(s), y, reduction="none") for s in singles])
        best_wrong = model(best).argmax(1) != y
        best_loss = F.cross_entropy(model(best), y, reduction="none")
    assert torch.equal(best_wrong, wrong.any(0))
    for i in range(len(y)):
        assert any(torch.equal(best[i], s[i]) for s in singles)
        same = wrong[:, i] == best_wrong[i]
        assert best_loss[i] >= loss[same, i].max() - 1e-12
    assert wrong.any(0).sum() > wrong.sum(1).min()  # restarts found examples a single run missed


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_a_trades_start_returned_without_steps_is_in_the_ball_and_range(norm):
    """``trades_pgd(steps=0)`` returns TRADES' Gaussian start: projected and clipped like any result (the jitter
    alone is 0.001 per pixel, 3.4e-3 in L2 on these 16 pixels, outside an eps of 1e-4 and below 0 at the edges)."""
    model = _model()
    x, y = _data(32)
    x_adv = trades_pgd(model, x, y, 1e-4, 1e-4, 0, norm=norm, generator=torch.Generator().manual_seed(0))
    assert float(_ball_norm(x_adv - x, norm).max()) <= 1e-4 * (1 + 1e-9)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_robust_accuracy_scores_a_model_in_training_mode_in_eval_mode():
    """Dropout and BatchNorm in ``.train()``: the scores are the eval-mode ones (accuracy 1.0 and loss 2.00 here,
    against 0.33 and 2.85 with the model's mode kept), and the flags and statistics come back as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.9))
    model.append(nn.Linear(32, 10)).double()
    x, _ = _data(64)
    with torch.no_grad():
        model.eval()
        y = model(x).argmax(1)  # the eval-mode predictions: accuracy 1 in eval mode, far less with dropout on
        want_loss = float(F.cross_entropy(model(x), y))
    model.train()
    stats = [t.clone() for t in model.state_dict().values()]
    acc, loss = robust_accuracy(model, x, y)
    assert acc == 1.0 and loss == pytest.approx(want_loss, rel=1e-12)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(stats, model.state_dict().values()))


class _Table(nn.Module):
    """Fixed class probabilities per input, looked up by the input itself (no dependence on the call order)."""

    def __init__(self, inputs, probs):
        super().__init__()
        self.inputs, self.logp = inputs, torch.tensor(probs, dtype=torch.float64).log()

    def forward(self, z):
        return torch.stack([self.logp[next(k for k, s in enumerate(self.inputs) if torch.equal(r, s))] for r in z])


def test_a_misclassified_restart_wins_over_a_larger_loss_classified_right():
    """Madry's rule, per example: a restart that misclassifies beats any that does not, whatever their losses;
    among those of the same kind, the larger loss. Restart 0 misclassifies with cross-entropy 0.80, restarts 1 and 2
    classify right with 1.08 and 0.92: restart 0 is kept (the largest loss alone picked restart 1, and a
    robust accuracy read from it was too high)."""
    x, y = torch.full((1, 4), 0.5, dtype=torch.float64), torch.tensor([0])
    gen = torch.Generator().manual_seed(0)
    starts = [pgd(nn.Identity(), x, y, 0.1, 0.01, 0, generator=gen)[0] for _ in range(3)]
    table = _Table(starts, [[0.45, 0.46, 0.09], [0.34, 0.33, 0.33], [0.40, 0.30, 0.30]])
    best = pgd(table, x, y, 0.1, 0.01, 0, restarts=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(best[0], starts[0])
    # Without a misclassified one, the largest loss: restart 1.
    table = _Table(starts, [[0.45, 0.44, 0.11], [0.34, 0.33, 0.33], [0.40, 0.30, 0.30]])
    best = pgd(table, x, y, 0.1, 0.01, 0, restarts=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(best[0], starts[1])


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [None if p.grad is None else (p.grad, p.grad.clone()) for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def _assert_untouched(model, snap):
    state, grads, flags = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]) and v.dtype == state[k].dtype, k  # bit for bit (also BN running stats)
    for p, g in zip(model.parameters(), grads):
        if g is None:
            assert p.grad is None
        else:
            assert p.grad is g[0] and torch.equal(p.grad, g[1])
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("train", [True, False])
def test_attack_and_evaluation_leave_the_model_bit_identical(train):
    model = _model(torch.float32, bn=True).train(train)
    x, y = _data(16, torch.float32)
    F.cross_entropy(model(x), y).backward()  # a pending gradient, as between backward and step
    snap = _snapshot(model)
    pgd(model, x, y, 0.2, 0.05, 4, restarts=2)
    trades_pgd(model, x, y, 0.2, 0.05, 2, norm="l2")
    _assert_untouched(model, snap)
    # in train mode BatchNorm moves its running statistics at every forward: they are put back
    pgd(model, x, y, 0.2, 0.05, 3, train_mode=True)
    trades_pgd(model, x, y, 0.2, 0.05, 2, train_mode=True)
    _assert_untouched(model, snap)
    robust_accuracy(model, x, y, batch_size=5, attack=lambda m, a, b: pgd(m, a, b, 0.2, 0.05, 2))
    robust_accuracy(model, x, y)
    _assert_untouched(model, snap)

    def failing(logits, _y):
        raise RuntimeError("objective failed")

    with pytest.raises(RuntimeError, match="objective failed"):
        pgd(model, x, y, 0.2, 0.05, 2, objective=failing)
    _assert_untouched(model, snap)


def test_attack_runs_in_eval_mode_unless_asked():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x

    model = nn.Sequential(Probe(), nn.Flatten(), nn.Linear(16, 10)).double().train()
    x, y = _data(4)
    pgd(model, x, y, 0.1, 0.05, 2)
    assert seen and not any(seen) and model.training
    seen.clear()
    pgd(model, x, y, 0.1, 0.05, 2, train_mode=True)
    assert seen and all(seen)


def test_keep_stats_keeps_what_a_train_mode_attack_moves():
    """The official PGD-AT AWP script (on Rice et al.'s code) attacks in train mode and keeps the BatchNorm
    statistics its forwards move: ``keep_stats=True`` equals the plain attack run in train mode, buffers too."""
    model, ref_model = _model(bn=True).eval(), _model(bn=True).train()
    x, y = _data()
    ours = pgd(model, x, y, 0.2, 0.05, 3, train_mode=True, keep_stats=True, generator=torch.Generator().manual_seed(4))
    ref = _reference_pgd(ref_model, x, y, 0.2, 0.05, 3, "linf", torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    assert not model.training and not model[1].training  # the flags are put back
    for (name, b), c in zip(model.named_buffers(), ref_model.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-15, msg=name)
    assert int(model[1].num_batches_tracked) == 3
    with pytest.raises(ValueError, match="keep_stats=True needs train_mode=True"):
        pgd(model, x, y, 0.2, 0.05, 1, keep_stats=True)
    assert int(model[1].num_batches_tracked) == 3


def _reference_trades_l2(model, x, eps, alpha, steps, gen):
    """TRADES' L2 branch (train_trades_cifar10.py's ``distance == 'l_2'``), written anew: a Gaussian start,
    normalised gradient steps, then clip to [0, 1] *before* shrinking into the ball."""
    b = x.shape[0]
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    delta = 0.001 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        kl = (p_clean * (p_clean.log() - F.log_softmax(model(x + delta), dim=1))).sum()
        grad = torch.autograd.grad(kl, delta)[0]
        delta = delta.detach() + alpha * grad / grad.reshape(b, -1).norm(dim=1).reshape(b, 1, 1, 1)
        delta = (x + delta).clamp(0.0, 1.0) - x
        n = delta.reshape(b, -1).norm(dim=1).reshape(b, 1, 1, 1)
        delta = torch.where(n > eps, delta * eps / n, delta)
    return x + delta


def test_trades_l2_clips_before_the_ball_as_trades_does():
    model = _model().eval()
    x, y = _data()
    eps, alpha = 1.0, 0.6  # both the range and the ball are active
    ours = trades_pgd(model, x, y, eps, alpha, 4, norm="l2", generator=torch.Generator().manual_seed(6))
    ref = _reference_trades_l2(model, x, eps, alpha, 4, torch.Generator().manual_seed(6))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    # pgd's order (the ball first) gives other examples from the same start: the order is what is tested
    other = pgd(
        model,
        x,
        y,
        eps,
        alpha,
        4,
        norm="l2",
        init="normal",
        objective=kl_to_clean(model, x),
        generator=torch.Generator().manual_seed(6),
    )
    assert (other - ours).abs().max() > 1e-3


def test_inputs_outside_the_data_range_are_refused():
    """Normalised inputs with the default data_range=(0, 1) were clipped into it, far out of the eps-ball
    (max |x_adv - x| = 2.0 at eps = 8/255, even with steps=0; found by the attacks review)."""
    model = _model().eval()
    x, y = _data()
    z = (x - 0.5) / 0.25  # mean/std normalised: [-2, 2]
    with pytest.raises(ValueError, match=r"outside data_range=\(0.0, 1.0\).*data_range=None"):
        pgd(model, z, y, 8 / 255, 2 / 255, 2)
    with pytest.raises(ValueError, match="outside data_range"):
        trades_pgd(model, z, y, 8 / 255, 2 / 255, 2)
    zn = z.clone()
    zn[0, 0, 0, 0] = float("nan")  # a NaN does not hide the others from the check
    with pytest.raises(ValueError, match="outside data_range"):
        pgd(model, zn, y, 8 / 255, 2 / 255, 2)
    adv = pgd(model, z, y, 8 / 255, 2 / 255, 2, data_range=None)
    assert float((adv - z).abs().max()) <= 8 / 255 + 1e-12
    adv = pgd(model, z, y, 8 / 255, 2 / 255, 2, data_range=(-2.0, 2.0))
    assert float((adv - z).abs().max()) <= 8 / 255 + 1e-12


def test_kl_to_clean_takes_the_clean_prediction_in_eval_mode_and_leaves_the_buffers():
    """Called in a training loop (model.train()), it ran the clean forward in train mode: BatchNorm's
    statistics moved and the KL target came from batch statistics (57/64 examples off in the review)."""
    model = _model(bn=True).train()
    x, y = _data()
    snap = _snapshot(model)
    objective = kl_to_clean(model, x)
    _assert_untouched(model, snap)
    ours = pgd(
        model,
        x,
        y,
        0.2,
        0.05,
        3,
        init="normal",
        objective=objective,
        generator=torch.Generator().manual_seed(2),
        _clip_first=True,
    )
    ref = trades_pgd(model, x, y, 0.2, 0.05, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    _assert_untouched(model, snap)


@pytest.mark.parametrize("attack", ["pgd", "trades_pgd"])
def test_float16_l2_attack_of_a_zero_gradient_does_not_move_and_is_not_nan(attack):
    """_TINY = 1e-12 is 0 in float16: a zero input gradient gave 0/0 = NaN examples (19/128 NaN on a
    confident float16 model in the review). Norms are now taken in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).half().eval()
    with torch.no_grad():
        model[1].weight.zero_()  # the input gradient is exactly 0
    x, y = _data(8, torch.float16)
    fn = pgd if attack == "pgd" else trades_pgd
    adv = fn(model, x, y, 0.5, 0.2, 3, norm="l2", generator=torch.Generator().manual_seed(0))
    assert adv.dtype == torch.float16 and bool(torch.isfinite(adv).all())
    if attack == "trades_pgd":  # a zero gradient: the example stays at its start, the clipped jitter
        start = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
        torch.testing.assert_close(adv, start.clamp(0, 1), rtol=0, atol=1e-3)


def test_restarts_with_an_objective_keep_its_largest_value():
    """With an objective given, "misclassifies y" need not be the goal (a targeted attack passes the target as
    y): restarts keep the largest objective per example; a batch-mean objective is refused."""
    model = _model().eval()
    x, _ = _data()
    target = torch.full((x.shape[0],), 3)

    def toward(logits, t):  # targeted: raise the target's log-probability
        return -F.cross_entropy(logits, t, reduction="none")

    gen = torch.Generator().manual_seed(9)
    singles = [pgd(model, x, target, 0.3, 0.1, 2, objective=toward, generator=gen) for _ in range(4)]
    best = pgd(model, x, target, 0.3, 0.1, 2, objective=toward, restarts=4, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        each = torch.stack([toward(model(a), target) for a in singles])
        torch.testing.assert_close(toward(model(best), target), each.max(0).values, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"one loss per example.*reduction='none'"):
        pgd(model, x, target, 0.3, 0.1, 2, objective=F.cross_entropy)


def test_one_logit_models_are_refused_by_name():
    """Cross-entropy over one class is 0 with a zero gradient: the attack never moved and robust_accuracy read 1.0."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1)).double()
    x, _ = _data(6)
    y = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"logits \[B, C\] with C >= 2.*binary_cross_entropy_with_logits"):
        pgd(model, x, y, 0.1, 0.05, 2)
    with pytest.raises(ValueError, match=r"robust_accuracy scores logits \[B, C\] with C >= 2"):
        robust_accuracy(model, x, y)
    bce = lambda z, t: F.binary_cross_entropy_with_logits(z.view(-1), t.double(), reduction="none")  # noqa: E731
    adv = pgd(model, x, y, 0.1, 0.05, 2, objective=bce)
    assert float((adv - x).abs().max()) > 0.05  # it moves


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(norm="l1"), "norm must be one of"),
        (dict(init="gauss"), "init must be one of"),
        (dict(eps=-0.1), "eps must be a finite number >= 0"),
        (dict(step_size=float("nan")), "step_size must be a finite number"),
        (dict(steps=-1), "steps must be an integer >= 0"),
        (dict(restarts=0), "restarts must be an integer >= 1"),
        (dict(data_range=(1.0, 0.0)), "data_range must be"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, match):
    model = _model()
    x, y = _data(4)
    args = dict(eps=0.1, step_size=0.05) | kwargs
    with pytest.raises(ValueError, match=match):
        pgd(model, x, y, **args)
    with pytest.raises(ValueError, match="labels"):
        pgd(model, x, y[:3], 0.1, 0.05)
    with pytest.raises(ValueError, match="beta"):
        trades_loss(model, x, x, y, beta=-1.0)
