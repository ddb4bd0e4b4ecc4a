"""Adam's step counts advanced in C++ (csrc/step_counts.cpp, used by fastperturb/optim/fused_step.py) against
torch's own ``_foreach_add_(state_steps, 1)``: the same values in the same dtype, the same version counters, and the
fused step reading every count as it is now."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastperturb as fp
from fastperturb.ops import native

pytestmark = pytest.mark.skipif(native.load_error is not None, reason="fastperturb._C did not load")


def _counts(values, dtype=torch.float32):
    return [torch.tensor(float(v), dtype=dtype) for v in values]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("values", [[0.0] * 5, [3.0], [2.0**24 - 1] * 3, [2.0**24] * 2, [1.0, 1.0, 4.0], [7.0, 2.0]])
def test_advance_is_torchs_add(values, dtype):
    ours, theirs = _counts(values, dtype), _counts(values, dtype)
    counter = torch.classes.fastperturb.StepCounts(ours)
    assert counter.size() == len(values)
    for _ in range(3):
        versions = [t._version for t in ours]
        common = counter.advance()
        torch._foreach_add_(theirs, 1)
        for a, b, v in zip(ours, theirs, versions):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.item() == b.item()  # float32 at 2**24 stays there, as torch's add leaves it
            assert a._version == b._version == v + 1
        after = {t.item() for t in theirs}
        if len(after) == 1:
            assert common == after.pop()
        else:
            assert math.isnan(common)


def test_advance_reads_counts_changed_in_place_and_takes_torchs_path_for_other_tensors():
    plain = _counts([5.0, 5.0])
    others = [
        torch.tensor(5, dtype=torch.int64),  # another dtype
        torch.tensor([5.0]),  # one element, one dimension
        torch.tensor(5.0, requires_grad=True),  # a leaf that requires grad (the step runs under no_grad)
    ]
    counter = torch.classes.fastperturb.StepCounts(plain + others)
    with torch.no_grad():
        assert counter.advance() == 6.0
        assert [t.item() for t in plain + others] == [6.0] * 5
        assert all(t._version == 1 for t in plain + others)
        plain[1].fill_(0.0)  # a count reset in place: read as it is now
        assert math.isnan(counter.advance())
        assert [t.item() for t in plain + others] == [7.0, 1.0, 7.0, 7.0, 7.0]
    assert others[0].dtype == torch.int64


def test_edge_cases():
    assert math.isnan(torch.classes.fastperturb.StepCounts([]).advance())
    with torch.inference_mode():
        inference = torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        torch.classes.fastperturb.StepCounts([inference]).advance()  # torch's add_ refuses it the same way
    with pytest.raises(ValueError, match="CPU tensor of one element"):
        torch.classes.fastperturb.StepCounts([torch.zeros(2)])
    with pytest.raises(ValueError, match="CPU tensor of one element"):
        torch.classes.fastperturb.StepCounts([torch.zeros((), device="meta")])


def _pair(base=torch.optim.AdamW):
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    m2 = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    m2.load_state_dict(m1.state_dict())
    o1 = fp.SAM(m1.parameters(), base, rho=0.05, lr=1e-2, fused_step=True)
    o2 = fp.SAM(m2.parameters(), base, rho=0.05, lr=1e-2)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    return (o1, m1), (o2, m2), (x, y)


def _step(opt, m, x, y):
    def closure():
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    opt.zero_grad()


def _assert_same(o1, m1, o2, m2):
    assert o1.fused_step_fallback is None
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        s1, s2 = o1.base_optimizer.state[p]["step"], o2.base_optimizer.state[q]["step"]
        assert s1.dtype == s2.dtype and s1.item() == s2.item() and s1._version == s2._version


def test_the_fused_step_advances_the_counts_in_one_call(monkeypatch):
    """From the second step on (the states exist), the fused step does not dispatch an add_ per count, and its
    counts, versions and weights agree with torch's step on the unfused twin."""
    (o1, m1), (o2, m2), (x, y) = _pair()
    _step(o1, m1, x, y)
    _step(o2, m2, x, y)
    calls = []
    real = torch._foreach_add_
    for _ in range(4):
        monkeypatch.setattr(torch, "_foreach_add_", lambda *a, **k: calls.append(1) or real(*a, **k))
        _step(o1, m1, x, y)
        monkeypatch.setattr(torch, "_foreach_add_", real)
        _step(o2, m2, x, y)
        _assert_same(o1, m1, o2, m2)
    assert calls == []


def test_counts_replaced_or_reset_are_the_ones_advanced():
    """A state loaded anew (new count tensors) is advanced, not the counts of the previous state; a count reset in
    place for one tensor gives that tensor its own bias correction, as torch's step does."""
    (o1, m1), (o2, m2), (x, y) = _pair(torch.optim.Adam)
    for _ in range(3):
        _step(o1, m1, x, y)
        _step(o2, m2, x, y)
    old = [o1.base_optimizer.state[p]["step"] for p in m1.parameters()]
    for opt in (o1, o2):
        sd = opt.base_optimizer.state_dict()
        for st in sd["state"].values():
            st["step"] = torch.tensor(10.0)
        opt.base_optimizer.load_state_dict(sd)
    _step(o1, m1, x, y)
    _step(o2, m2, x, y)
    _assert_same(o1, m1, o2, m2)
    assert [t.item() for t in old] == [3.0] * len(old)
    assert all(o1.base_optimizer.state[p]["step"].item() == 11.0 for p in m1.parameters())
    for m, opt in ((m1, o1), (m2, o2)):
        opt.base_optimizer.state[next(iter(m.parameters()))]["step"].fill_(0.0)
    for _ in range(2):
        _step(o1, m1, x, y)
        _step(o2, m2, x, y)
    _assert_same(o1, m1, o2, m2)
    assert o1.base_optimizer.state[next(iter(m1.parameters()))]["step"].item() == 2.0


def test_tensors_on_several_devices_take_one_call_per_device(monkeypatch):
    """With one shared count the per-device bucketing still sees every tensor's count (it raised KeyError on
    the second device's tensors once the counts came from StepCounts; a meta tensor stands in for a GPU here,
    the fused op is recorded, not run)."""
    from fastperturb.optim import fused_step

    a = nn.Parameter(torch.randn(3))
    b = nn.Parameter(torch.randn(3, device="meta"))
    a.grad, b.grad = torch.randn(3), torch.randn(3, device="meta")
    base = torch.optim.Adam([a, b], lr=0.1)
    for p in (a, b):  # the state torch makes: the count on the CPU, the moments on the tensor's device
        base.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    calls = []
    monkeypatch.setattr(
        fused_step.ops,
        "restore_adam_step_",
        lambda ps, *a, step, **k: calls.append(([p.device.type for p in ps], step)),
    )
    for want in (4.0, 5.0):  # the second step takes the counts from the record's StepCounts
        calls.clear()
        assert fused_step.fused_base_step(base, [], []) is None
        assert sorted(calls) == [(["cpu"], want), (["meta"], want)]
        assert [base.state[p]["step"].item() for p in (a, b)] == [want, want]
