"""The wrapper caches its group selection and buffer lists between steps: changes
to the groups made between steps must still take effect."""

from __future__ import annotations

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
