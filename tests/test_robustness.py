"""Loss change indicators (fastperturb.robustness) against closed forms and direct computations.

The per-tensor step coefficients are float32 by the op contract, so results agree with
the float64 closed forms to ~1e-7 relative (tolerance 1e-6).
"""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastperturb.robustness as R

D = 6


def quad_problem(batches=1, dtype=torch.float64):
    """Linear(D, 1) on inputs e_1..e_D with targets y: L(w) = ||w - y||^2 / (2D)."""
    torch.manual_seed(0)
    model = nn.Linear(D, 1, bias=False).to(dtype)
    x = torch.eye(D, dtype=dtype)
    y = torch.randn(D, 1, dtype=dtype)
    loss_fn = lambda out, t: 0.5 * (out - t).square().mean()
    if batches == 1:
        data = (x, y)
    else:
        data = [(xc, yc) for xc, yc in zip(x.chunk(batches), y.chunk(batches))]
    return model, loss_fn, data, y.flatten()


def bits(model):
    return [
        p.detach().clone().view(torch.int64 if p.dtype == torch.float64 else torch.int32) for p in model.parameters()
    ]


def same_bits(model, saved):
    return all(torch.equal(a, b) for a, b in zip(bits(model), saved))


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("batches", [1, 3])
def test_l2_worst_case_closed_form(steps, batches):
    # max over ||a||_2 <= eps of ||w + a - y||^2/(2D) - ||w - y||^2/(2D) = (eps ||w - y|| + eps^2 / 2) / D,
    # reached at a = eps (w - y)/||w - y||: the gradient direction, so ascent finds it exactly.
    model, loss_fn, data, y = quad_problem(batches)
    w = model.weight.detach().flatten()
    for eps in (1e-3, 0.1, 0.7):
        p = R.adversarial(model, loss_fn, data, eps, steps=steps, scope="global", relative=False, accuracy=False)
        expected = (eps * (w - y).norm().item() + 0.5 * eps**2) / D
        assert p.loss_change == pytest.approx(expected, rel=1e-6)
        fo = R.first_order(model, loss_fn, data, eps, scope="global", relative=False)
        assert fo.loss_change == pytest.approx(eps * (w - y).norm().item() / D, rel=1e-6)


def test_linf_worst_case_closed_form():
    # box: each coordinate independently, a_i = eps sign(w_i - y_i): dL = (eps ||w - y||_1 + D eps^2 / 2) / D
    model, loss_fn, data, y = quad_problem()
    w = model.weight.detach().flatten()
    eps = 0.05
    p = R.adversarial(model, loss_fn, data, eps, norm="linf", scope="global", relative=False, accuracy=False)
    assert p.loss_change == pytest.approx((eps * (w - y).abs().sum().item() + D * eps**2 / 2) / D, rel=1e-6)
    fo = R.first_order(model, loss_fn, data, eps, norm="linf", scope="global", relative=False)
    assert fo.loss_change == pytest.approx(eps * (w - y).abs().sum().item() / D, rel=1e-6)


def test_relative_radius_is_a_fraction_of_the_weight_norm():
    model, loss_fn, data, y = quad_problem()
    w = model.weight.detach().flatten()
    r = 0.1 * w.norm().item()
    p = R.adversarial(model, loss_fn, data, 0.1, scope="layer", relative=True, accuracy=False)
    assert p.loss_change == pytest.approx((r * (w - y).norm().item() + 0.5 * r**2) / D, rel=1e-6)


def linear_loss_problem():
    """L = mean(W x + b), linear in (W, b): (model, loss_fn, data, g_W, g_b), the gradients constant."""
    torch.manual_seed(1)
    model = nn.Linear(4, 3).double()
    x = torch.randn(20, 4, dtype=torch.float64)
    gw = x.mean(0).expand(3, 4) / 3
    gb = torch.full((3,), 1 / 3, dtype=torch.float64)
    return model, lambda out, t: out.mean(), (x, torch.zeros(20)), gw, gb


def test_layer_scope_on_a_loss_linear_in_the_weights():
    # L = mean(W x + b) is linear in (W, b): the max over per-tensor balls is sum_l r_l ||g_l||, exactly,
    # the first-order estimate is exact, and every random pair a, -a cancels.
    model, loss_fn, data, gw, gb = linear_loss_problem()
    eps = 0.2
    expected = eps * (model.weight.norm() * gw.norm() + model.bias.norm() * gb.norm()).item()
    p = R.adversarial(model, loss_fn, data, eps, scope="layer", accuracy=False)
    assert p.loss_change == pytest.approx(expected, rel=1e-6)
    assert R.first_order(model, loss_fn, data, eps).loss_change == pytest.approx(expected, rel=1e-6)
    rnd = R.random_corruption(model, loss_fn, data, eps, trials=6, accuracy=False)
    assert abs(rnd.loss_change) < 1e-12 * expected
    assert rnd.loss_change_std > 0.01 * expected  # the single draws do move the loss


@pytest.mark.parametrize("relative", [False, True])
def test_global_scope_on_a_loss_linear_in_the_weights(relative):
    """The global ball over (W, b): the max of a linear loss is r ||(g_W, g_b)||, with r = eps (or eps ||(W, b)||
    when relative), the norm of all the gradients together, not the sum of the tensors' norms; the first-order
    estimate is exact there."""
    model, loss_fn, data, gw, gb = linear_loss_problem()
    eps = 0.2
    r = eps * (math.hypot(model.weight.norm().item(), model.bias.norm().item()) if relative else 1.0)
    expected = r * math.hypot(gw.norm().item(), gb.norm().item())
    kw = dict(scope="global", relative=relative)
    assert R.adversarial(model, loss_fn, data, eps, accuracy=False, **kw).loss_change == pytest.approx(expected, 1e-6)
    assert R.first_order(model, loss_fn, data, eps, **kw).loss_change == pytest.approx(expected, rel=1e-6)


def test_multi_step_reports_the_worst_point_of_the_trajectory_not_the_last():
    """A step that overshoots the peak: L(w) = -cos(4w) from w = 0.3, eps 0.6, steps of 0.3 (step_ratio 0.5) visit
    w = 0.6, 0.9 (past the peak at pi/4), 0.6. The indicator is the largest loss seen, the second one."""
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.3)
    data = (torch.ones(1, 1, dtype=torch.float64), torch.zeros(1))
    loss_fn = lambda out, t: -torch.cos(4 * out).mean()
    visited = [0.6, 0.9, 0.6]
    losses = [-math.cos(4 * w) for w in visited]
    assert max(losses) != losses[-1]
    p = R.adversarial(
        model, loss_fn, data, 0.6, steps=3, step_ratio=0.5, scope="global", relative=False, accuracy=False
    )
    assert p.loss_change == pytest.approx(max(losses) + math.cos(4 * 0.3), rel=1e-6)  # (float32 step coefficients)
    assert model.weight.item() == 0.3


def test_random_indicator_is_second_order():
    # At the minimum (w = y) every corruption of norm eps gives dL = eps^2 / (2D) exactly.
    model, loss_fn, data, y = quad_problem()
    with torch.no_grad():
        model.weight.copy_(y.reshape(1, -1))
    for eps in (1e-3, 1e-2, 0.3):
        p = R.random_corruption(model, loss_fn, data, eps, trials=6, relative=False, scope="global", accuracy=False)
        assert p.loss_change == pytest.approx(eps**2 / (2 * D), rel=1e-7)
        assert p.trials == 6
    # Away from the minimum, with the same draws (same seed): mirrored pairs cancel the first-order term,
    # so the mean grows exactly like eps^2.
    model, loss_fn, data, y = quad_problem()
    a = R.random_corruption(model, loss_fn, data, 0.01, trials=4, seed=3, relative=False, accuracy=False)
    b = R.random_corruption(model, loss_fn, data, 0.02, trials=4, seed=3, relative=False, accuracy=False)
    assert b.loss_change / a.loss_change == pytest.approx(4.0, rel=1e-6)
    adv = R.adversarial(model, loss_fn, data, 0.01, relative=False, accuracy=False)
    assert adv.loss_change > 50 * a.loss_change


def mlp_problem():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    return model, x, y


def test_one_step_ascent_matches_direct_computation_on_an_mlp():
    model, x, y = mlp_problem()
    params = dict(model.named_parameters())
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    eps = 0.05
    moved = {n: p.detach() + eps * p.detach().norm() * g / g.norm() for (n, p), g in zip(params.items(), grads)}
    with torch.no_grad():
        out = functional_call(model, moved, (x,))
    direct = F.cross_entropy(out, y).item() - loss.item()
    direct_acc = (out.argmax(1) == y).double().mean().item()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 40, 16)]  # gradient accumulated over mini-batches
    p = R.adversarial(model, F.cross_entropy, batches, eps)
    assert p.loss_change == pytest.approx(direct, rel=1e-6)
    assert p.accuracy == pytest.approx(direct_acc)
    clean_acc = (model(x).argmax(1) == y).double().mean().item()
    assert p.accuracy_drop == pytest.approx(clean_acc - direct_acc)


def test_multi_step_matches_direct_projected_ascent():
    model, x, y = mlp_problem()
    names = [n for n, _ in model.named_parameters()]
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    eps, K = 0.1, 3
    r = {n: eps * t.norm() for n, t in w0.items()}
    eta = {n: 1.5 * v / K for n, v in r.items()}
    delta = {n: torch.zeros_like(t) for n, t in w0.items()}
    losses = []
    for _ in range(K):
        cur = {n: (w0[n] + delta[n]).requires_grad_() for n in names}
        grads = torch.autograd.grad(F.cross_entropy(functional_call(model, cur, (x,)), y), [cur[n] for n in names])
        for n, g in zip(names, grads):
            u = delta[n] + eta[n] * g / g.norm()
            delta[n] = u * min(1.0, (r[n] / u.norm()).item())
        with torch.no_grad():
            losses.append(F.cross_entropy(functional_call(model, {n: w0[n] + delta[n] for n in names}, (x,)), y).item())
    clean = F.cross_entropy(model(x), y).item()
    p = R.adversarial(model, F.cross_entropy, (x, y), eps, steps=K)
    assert p.loss_change == pytest.approx(max(losses) - clean, rel=1e-6)
    assert p.steps == K


def test_random_matches_direct_computation():
    model, x, y = mlp_problem()
    params = list(model.parameters())
    eps, trials, seed = 0.02, 4, 7
    g = torch.Generator().manual_seed(seed)
    clean = F.cross_entropy(model(x), y).item()
    changes = []
    names = [n for n, _ in model.named_parameters()]
    for _ in range(trials // 2):
        zs = [torch.empty_like(p).normal_(generator=g) for p in params]
        for sign in (1, -1):
            moved = {
                n: p.detach() + sign * eps * p.detach().norm() * z / z.norm() for n, p, z in zip(names, params, zs)
            }
            with torch.no_grad():
                changes.append(F.cross_entropy(functional_call(model, moved, (x,)), y).item() - clean)
    p = R.random_corruption(model, F.cross_entropy, (x, y), eps, trials=trials, seed=seed)
    assert p.loss_change == pytest.approx(sum(changes) / trials, rel=1e-6, abs=1e-15)
    mean = sum(changes) / trials
    assert p.loss_change_std == pytest.approx(math.sqrt(sum((c - mean) ** 2 for c in changes) / (trials - 1)), rel=1e-6)
    pair = [(changes[i] + changes[i + 1]) / 2 for i in range(0, trials, 2)]
    pm = sum(pair) / len(pair)
    sem = math.sqrt(sum((u - pm) ** 2 for u in pair) / (len(pair) - 1) / len(pair))
    assert p.loss_change_sem == pytest.approx(sem, rel=1e-5)


def test_weight_selection():
    model, x, y = mlp_problem()
    eps = 0.05
    only_w = R.adversarial(model, F.cross_entropy, (x, y), eps, params="weights")
    by_pred = R.adversarial(model, F.cross_entropy, (x, y), eps, params=lambda n, p: n.endswith("weight"))
    by_list = R.adversarial(model, F.cross_entropy, (x, y), eps, params=[model[0].weight, model[2].weight])
    assert only_w.loss_change == by_pred.loss_change == by_list.loss_change
    assert only_w.loss_change != R.adversarial(model, F.cross_entropy, (x, y), eps).loss_change


# ---------------------------------------------------------------------------
# contracts: bit-identical weights, untouched state


class Boom(Exception):
    pass


def failing_loss(after_calls, exc):
    count = {"n": 0}

    def loss_fn(out, t):
        count["n"] += 1
        if count["n"] > after_calls:
            raise exc
        return F.cross_entropy(out, t)

    return loss_fn, count


@pytest.mark.parametrize("exc", [Boom("closure failed"), KeyboardInterrupt()])
@pytest.mark.parametrize("kind", ["adversarial", "random"])
def test_weights_bit_identical_after_interrupt(kind, exc):
    model, x, y = mlp_problem()
    model = model.float()
    x = x.float()
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    grads = [torch.full_like(p, 0.25) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    saved = bits(model)
    # 2 calls for the clean pass, then fail in the middle of a corrupted pass (after the weights moved)
    loss_fn, count = failing_loss(3 if kind == "adversarial" else 5, exc)
    with pytest.raises(type(exc)):
        if kind == "adversarial":
            R.adversarial(model, loss_fn, batches, 0.3, steps=3)
        else:
            R.random_corruption(model, loss_fn, batches, 0.3, trials=4)
    assert count["n"] > 2
    assert same_bits(model, saved)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(g, torch.full_like(g, 0.25)) for g in grads)


def test_sweep_leaves_weights_grads_modes_and_batchnorm_untouched():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3), nn.Dropout(0.5)
    )
    x = torch.randn(30, 1, 8, 8)
    y = torch.randint(0, 3, (30,))
    model.train()
    model(x)  # non-trivial running statistics
    model[5].eval()  # a mixed state that must come back as it was
    saved = bits(model)
    buffers = [b.clone() for b in model.buffers()]
    modes = [m.training for m in model.modules()]
    res = R.sweep(model, F.cross_entropy, (x, y), [0.01, 0.1], steps=(1, 2), trials=2, progress=False)
    assert same_bits(model, saved)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    # eval mode by default: the clean loss is the eval-mode loss
    model.eval()
    with torch.no_grad():
        assert res.clean_loss == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)
    model.train()
    model[5].eval()
    # train mode (batch statistics) is allowed, and the running statistics still come back
    R.sweep(model, F.cross_entropy, (x, y), [0.1], kinds=("adversarial",), steps=1, train_mode=True, progress=False)
    assert same_bits(model, saved)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    assert [m.training for m in model.modules()] == modes


class _Rebinding(nn.Module):
    """A forward that rebinds its buffers (a call counter, an out-of-place EMA of its input's mean)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x):
        self.calls = self.calls + 1
        self.ema = 0.9 * self.ema + 0.1 * x.detach().mean(0)
        return self.lin(x)


@pytest.mark.parametrize("train_mode", [False, True])
def test_sweep_puts_back_buffers_the_forward_rebinds(train_mode):
    torch.manual_seed(0)
    model = _Rebinding()
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    before = {name: (b, b.clone()) for name, b in model.named_buffers()}
    R.sweep(model, F.cross_entropy, (x, y), [0.1], steps=1, trials=2, train_mode=train_mode, progress=False)
    assert model.calls.item() == 0
    for name, b in model.named_buffers():
        assert b is before[name][0] and torch.equal(b, before[name][1]), name


# ---------------------------------------------------------------------------
# the sweep result


def test_sweep_result_export_and_slopes(tmp_path):
    model, loss_fn, data, y = quad_problem()
    grid = [1e-4, 1e-3, 1e-2, 1e-1]
    res = R.sweep(
        model,
        loss_fn,
        data,
        grid,
        steps=(1, 3),
        trials=4,
        relative=False,
        scope="global",
        accuracy=False,
        progress=False,
    )
    assert res.series == ["adversarial_k1", "adversarial_k3", "first_order", "random"]
    assert len(res.rows) == 4 * len(grid)
    sl = res.slopes()
    assert sl["first_order"] == pytest.approx(1.0)
    assert sl["adversarial_k1"] == pytest.approx(1.0, abs=0.01)
    assert sl["random"] == pytest.approx(2.0, abs=1e-4)  # first order cancels in the mirrored pairs
    doc = json.loads(res.to_json(str(tmp_path / "r.json")))
    assert doc["rows"] == json.loads((tmp_path / "r.json").read_text())["rows"]
    assert doc["config"]["eps"] == grid and doc["config"]["examples"] == D
    text = res.to_csv(str(tmp_path / "r.csv"))
    lines = text.strip().splitlines()
    assert lines[0].split(",") == R.ROW_FIELDS and len(lines) == 1 + 4 * len(grid)
    assert "adversarial_k3" in res.table()
    adv = R.adversarial(model, loss_fn, data, 1e-1, steps=3, relative=False, scope="global", accuracy=False)
    assert res.select("adversarial_k3")[3].loss_change == adv.loss_change
    res.plot(str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_points_equal_the_single_indicators():
    # random: the same draws at every eps, so a point does not depend on the rest of the grid
    model, x, y = mlp_problem()
    res = R.sweep(
        model,
        F.cross_entropy,
        (x, y),
        [0.01, 0.03],
        kinds=("random", "adversarial"),
        steps=2,
        trials=4,
        seed=5,
        progress=False,
    )
    for p in res.select("random"):
        q = R.random_corruption(model, F.cross_entropy, (x, y), p.eps, trials=4, seed=5)
        assert (p.loss_change, p.accuracy, p.loss_change_sem) == (q.loss_change, q.accuracy, q.loss_change_sem)
    for p in res.select("adversarial_k2"):
        assert p.loss_change == R.adversarial(model, F.cross_entropy, (x, y), p.eps, steps=2).loss_change


def test_fit_slope():
    assert R.fit_slope([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)
    assert R.fit_slope([1, 2], [1, -1]) is None  # one usable point


# ---------------------------------------------------------------------------
# bad input


def test_bad_arguments_give_clear_errors():
    model, x, y = mlp_problem()
    data = (x, y)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        R.adversarial(model, F.cross_entropy, data, -0.1)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        R.sweep(model, F.cross_entropy, data, [0.1, float("nan")], progress=False)
    with pytest.raises(ValueError, match="eps grid is empty"):
        R.sweep(model, F.cross_entropy, data, [], progress=False)
    with pytest.raises(ValueError, match="evaluation data is empty"):
        R.adversarial(model, F.cross_entropy, [], 0.1)
    with pytest.raises(ValueError, match="no parameters"):
        R.adversarial(nn.ReLU(), F.cross_entropy, data, 0.1)
    with pytest.raises(ValueError, match="no tensors to corrupt"):
        R.adversarial(model, F.cross_entropy, data, 0.1, params=lambda n, p: False)
    with pytest.raises(ValueError, match="steps must be"):
        R.adversarial(model, F.cross_entropy, data, 0.1, steps=0)
    with pytest.raises(ValueError, match="trials must be"):
        R.random_corruption(model, F.cross_entropy, data, 0.1, trials=0)
    with pytest.raises(ValueError, match="unknown kind"):
        R.sweep(model, F.cross_entropy, data, [0.1], kinds=("adverserial",), progress=False)
    with pytest.raises(ValueError, match="norm must be"):
        R.adversarial(model, F.cross_entropy, data, 0.1, norm="l1")
    for kw, match in (
        (dict(steps=1.5), "steps must be an integer >= 1 or a sequence"),
        (dict(eps=torch.tensor(0.1)), "eps must be a number or a sequence"),
        (dict(kinds="random"), "kinds must be a sequence of kinds"),
        (dict(kinds=[]), "kinds is empty"),
        (dict(seed=None), "seed must be an integer"),
    ):
        with pytest.raises(ValueError, match=match):
            R.sweep(model, F.cross_entropy, data, **{"eps": [0.1], **kw}, progress=False)
    with pytest.raises(TypeError, match="iterator"):
        R.adversarial(model, F.cross_entropy, iter([data]), 0.1)
    with pytest.raises(TypeError, match="nn.Module"):
        R.adversarial(lambda t: t, F.cross_entropy, data, 0.1)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="require grad"):
        R.adversarial(frozen, F.cross_entropy, (torch.randn(3, 2), torch.zeros(3, dtype=torch.long)), 0.1)
    saved = bits(model)
    with torch.no_grad():
        bad = list(model.parameters())[-1]
        bad.view(-1)[0] = float("nan")
    name = [n for n, p in model.named_parameters() if p is bad][0]
    for only in (None, lambda n, p: p is not bad):  # a NaN outside the selection spoils every loss too
        with pytest.raises(ValueError, match=rf"weights hold NaN/Inf in {re.escape(name)}"):
            R.sweep(model, F.cross_entropy, data, [0.1], params=only, progress=False)
    saved = bits(model)
    assert same_bits(model, saved)


def test_one_output_column_gets_no_argmax_accuracy():
    """A binary classifier's [B, 1] logit with {0, 1} targets: the argmax of one column is always 0, so the automatic
    accuracy was the share of label 0 (0.53 for a classifier that is always right, in the review), at every eps.
    Now no automatic accuracy there; accuracy=True says what to pass; a callable gives the real one."""
    torch.manual_seed(0)
    x = torch.randn(40, 3)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[5.0, 0.0, 0.0]]))
        model.bias.zero_()
    loss_fn = lambda out, t: F.binary_cross_entropy_with_logits(out[:, 0], t.float())
    assert R.adversarial(model, loss_fn, (x, y), 0.01).accuracy is None
    with pytest.raises(ValueError, match=r"C >= 2.*out\[:, 0\] > 0"):
        R.adversarial(model, loss_fn, (x, y), 0.01, accuracy=True)
    p = R.adversarial(model, loss_fn, (x, y), 0.01, accuracy=lambda out, t: (out[:, 0] > 0).long() == t)
    assert p.accuracy == 1.0
    two = nn.Linear(3, 2)  # two columns: the argmax accuracy as before
    assert R.adversarial(two, F.cross_entropy, (x, y), 0.01).accuracy is not None


class _Scaled(nn.Module):
    """A forward that uses a leaf tensor the module does not register (selected through ``params=``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)
        self.scale = torch.randn(3, requires_grad=True)

    def forward(self, x):
        return self.fc(x) * self.scale


@pytest.mark.parametrize("call", ["sweep", "adversarial", "first_order", "random_corruption"])
def test_the_grad_of_a_selected_tensor_the_model_does_not_register_is_put_back(call):
    """``.grad`` was saved and put back only for ``model.parameters()``: a selected tensor the model does not
    register kept the tool's gradient (0.14 off after a sweep in the review)."""
    model = _Scaled()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    F.cross_entropy(model(x), y).backward()
    grads = [model.scale.grad.clone(), model.fc.weight.grad.clone()]
    params = [model.scale, model.fc.weight]
    fn = getattr(R, call)
    if call == "sweep":
        fn(model, F.cross_entropy, (x, y), [0.01, 0.1], steps=(1, 3), trials=2, params=params, progress=False)
    else:
        fn(model, F.cross_entropy, (x, y), 0.05, params=params)
    assert torch.equal(model.scale.grad, grads[0]) and torch.equal(model.fc.weight.grad, grads[1])


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_non_finite_buffer_is_named_instead_of_a_non_finite_gradient(bad):
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
    model[0].running_mean[1] = float(bad)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    before = bits(model)
    held = {"nan": "NaN in 0.running_mean\\)", "inf": "Inf in 0.running_mean; unless that is a mask's -inf"}[bad]
    with pytest.raises(ValueError, match=rf"\(the model's buffers hold {held}"):
        R.adversarial(model, F.cross_entropy, (x, y), 0.01)
    assert same_bits(model, before)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_weights_that_cannot_hold_the_corruption_are_warned_about(dtype, scope, recwarn):
    """w + a is rounded to the weights' dtype: in bfloat16 a relative corruption of 1e-3 came out 0-0.97 of its
    size per tensor (the last bias not at all), silently reported at eps = 1e-3. Now a warning per such eps, with
    the probed range; none where the dtype holds it (float32, or a large enough eps)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)
    x, y = torch.randn(20, 16, dtype=dtype), torch.randint(0, 4, (20,))
    R.sweep(model, F.cross_entropy, (x, y), [1e-3, 0.5], steps=1, trials=2, scope=scope, progress=False)
    hits = [w for w in recwarn.list if "probe corruption" in str(w.message)]
    if dtype == torch.float32:
        assert not hits
    else:
        # one (each eps is probed once per call), at the small eps only, pointing at this file
        assert len(hits) == 1, [str(w.message) for w in hits]
        assert "eps=0.001" in str(hits[0].message) and hits[0].filename == __file__


def test_random_trials_come_in_pairs_and_one_unit_has_no_standard_error():
    """Mirrored pairs need an even number of trials: an odd one left a draw without its mirror, whose first-order
    term dominated the mean (21 trials gave the wrong sign where 20 agree with 4000). One pair (or one draw
    without mirroring) gives no standard error: NaN, and the point is not resolved (it was 0, so any positive
    mean was "resolved" and entered the slopes)."""
    model, x, y = mlp_problem()
    for trials in (1, 3, 21):
        with pytest.raises(ValueError, match=rf"trials must be even with antithetic=True .*got {trials}"):
            R.random_corruption(model, F.cross_entropy, (x, y), 0.01, trials=trials)
        with pytest.raises(ValueError, match="trials must be even"):
            R.sweep(model, F.cross_entropy, (x, y), [0.01], kinds=("random",), trials=trials, progress=False)
    R.sweep(model, F.cross_entropy, (x, y), [0.01], kinds=("first_order",), trials=1, progress=False)  # not drawn
    for trials, antithetic in ((2, True), (1, False)):
        p = R.random_corruption(model, F.cross_entropy, (x, y), 0.05, trials=trials, antithetic=antithetic)
        assert math.isnan(p.loss_change_sem) and not p.resolved
    p = R.random_corruption(model, F.cross_entropy, (x, y), 0.05, trials=3, antithetic=False)
    assert math.isfinite(p.loss_change_sem) and p.loss_change_sem > 0
    q = R.random_corruption(model, F.cross_entropy, (x, y), 0.05, trials=4)
    assert math.isfinite(q.loss_change_sem) and q.loss_change_sem > 0
    assert R.adversarial(model, F.cross_entropy, (x, y), 0.05).loss_change_sem == 0.0  # deterministic: exact


def test_table_shows_no_negative_zero_accuracy_drop():
    """A mean of accuracies equal to the clean one can come out 1e-17 above it: the table printed "-0.0000"."""
    from fastperturb.robustness.results import Point, SweepResult

    p = Point("random", 0.01, 1.0, 0.0, accuracy=0.9, accuracy_drop=-5.551115123125783e-17, trials=4)
    q = Point("random", 0.02, 1.0, 0.0, accuracy=0.8, accuracy_drop=0.1, trials=4)
    table = SweepResult([p, q], 1.0, 0.9).table()
    assert "-0.0000" not in table and "+0.0000" in table and "+0.1000" in table


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_loss_on_the_ascent_is_reported_not_ranked_below_the_finite_ones(bad):
    """The worst point of the trajectory ranks a non-finite loss above every finite one, so a corruption that
    blows the loss up is reported as an inf (NaN) loss change; ranked -inf, the finite loss of an earlier step
    was reported instead and the blow-up hidden. Here the loss is non-finite only past 0.9 eps from the weights:
    two steps of 0.75 eps along the constant gradient direction reach it at the last step only."""
    model, _, data, y = quad_problem()
    w0 = model.weight.detach().clone()
    eps = 0.1

    def loss_fn(out, t):
        loss = 0.5 * (out - t).square().mean()
        return loss * bad if (model.weight.detach() - w0).norm() > 0.9 * eps else loss

    p = R.adversarial(model, loss_fn, data, eps, steps=2, scope="global", relative=False, accuracy=False)
    if math.isnan(bad):
        assert math.isnan(p.loss_change) and math.isnan(p.loss)
    else:
        assert p.loss_change == math.inf and p.loss == math.inf
    assert torch.equal(model.weight, w0)


def test_data_that_gives_another_number_of_examples_in_another_pass_is_refused():
    """Every pass must see the same examples: an iterable that yields one more batch each time it is iterated was
    measured silently, each corrupted loss against a clean loss of other examples."""
    model, x, y = mlp_problem()

    class Growing:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            for i in range(self.passes):
                yield x[10 * i : 10 * i + 10], y[10 * i : 10 * i + 10]

    msg = "the data gave 20 examples in one pass and 10 in another; it must be the same every time"
    with pytest.raises(ValueError, match=re.escape(msg)):
        R.adversarial(model, F.cross_entropy, Growing(), 0.05, steps=2)
    with pytest.raises(ValueError, match=re.escape(msg)):
        R.random_corruption(model, F.cross_entropy, Growing(), 0.05, trials=2)


def test_a_point_is_resolved_only_beyond_two_standard_errors_and_only_resolved_points_enter_the_slope():
    """``resolved`` is ``loss_change > 2 * sem`` (strict): 1.5 and exactly 2 standard errors are not resolved,
    2.5 are; the fitted slope uses the resolved points only (a point 1.5 standard errors above 0 moved the slope
    printed and saved in results.json)."""
    from fastperturb.robustness.results import Point, SweepResult

    s = 2.0**-12
    cases = [(1.5, False), (2.0, False), (2.5, True)]
    for k, expected in cases:
        assert Point("random", 0.01, 1.0, k * s, loss_change_sem=s, trials=10).resolved is expected, k
    eps = [0.01, 0.02, 0.04, 0.08]
    chg = [1e-4, 4e-4, 3e-4, 1e-2]
    sem = [1e-7, 1e-7, 2e-4, 4e-3]  # the last two: 1.5 and 2.5 standard errors
    pts = [Point("random", e, 1.0 + c, c, loss_change_sem=se, trials=10) for e, c, se in zip(eps, chg, sem)]
    assert [p.resolved for p in pts] == [True, True, False, True]
    slope = SweepResult(pts, 1.0, None).slopes(max_eps=math.inf)["random"]
    assert slope == R.fit_slope([0.01, 0.02, 0.08], [1e-4, 4e-4, 1e-2])
    assert abs(slope - R.fit_slope(eps, chg)) > 0.1  # (the 1.5 s.e. point would change it)


def test_default_slope_range_of_an_even_grid_ends_at_the_lower_median():
    """``slopes()`` fits ``eps <= max_eps`` with max_eps the median of the grid; on an even grid the lower one
    (grid[1] of 4 points: the small-eps half, two points). The upper one took a third point, past where the loss
    change bends, and changed the slope printed and saved in results.json."""
    from fastperturb.robustness.results import Point, SweepResult

    grid = [0.01, 0.02, 0.04, 0.08]
    chg = [1e-4, 4e-4, 3.2e-3, 1e-2]  # quadratic up to 0.02, then steeper
    res = SweepResult(
        [Point("random", e, 1 + c, c, loss_change_sem=1e-7, trials=10) for e, c in zip(grid, chg)], 1, None
    )
    assert res.slopes() == res.slopes(max_eps=grid[1])
    assert res.slopes()["random"] == pytest.approx(2.0)
    assert res.slopes(max_eps=grid[2])["random"] == pytest.approx(2.5)  # (the upper median)


def test_a_series_without_a_slope_says_why():
    """Where ``slopes()`` has None (printed ``random -``), ``slope_gaps()`` says how many of the small-eps half's
    eps resolved a loss change above zero; the series with a slope are not named."""
    from fastperturb.robustness.results import Point, SweepResult

    grid = [0.0, 0.01, 0.02, 0.04, 0.08]
    pts = [Point("adversarial", e, 1 + e, e, steps=1) for e in grid]
    sems = [1e-3, 1e-7, 1e-3, 1e-7, 1e-7]  # random: resolved at 0.01 only, of (0, 0.02]; 0.0 not counted
    pts += [Point("random", e, 1 + 1e-4, 1e-4, loss_change_sem=s, trials=10) for e, s in zip(grid, sems)]
    res = SweepResult(pts, 1.0, None)
    assert res.slopes()["random"] is None and res.slopes()["adversarial_k1"] is not None
    gaps = res.slope_gaps()
    assert list(gaps) == ["random"]
    assert "at 1 of the 2 eps in (0, 0.02]" in gaps["random"]
