"""ascent_coefficients (the l2 ascent step's per-tensor coefficients): the native CPU op against the reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastperturb import ops
from fastperturb.engine import PerturbSpec, ascent_coefficients
from fastperturb.ops import dispatch, reference

# grad_stats_ rows as they come: zero, tiny, huge and ordinary squared norms, any sign of <d, g>; NaN and Inf
# never reach the coefficients (the engine refuses them first) but both paths must still agree on them.
gg_values = st.sampled_from([0.0, 1e-38, 1e-30, 0.25, 3.0, 1e30, 3e38])
rows = st.tuples(gg_values, st.floats(-4.0, 4.0, width=32), st.floats(0.0, 4.0, width=32))
etas = st.sampled_from([0.0, 1e-6, 0.01, 0.2, 3.0])


def _inputs(rs, es, radius_scale):
    stats = torch.tensor(rs, dtype=torch.float32).reshape(-1, 3)
    eta = torch.tensor(es, dtype=torch.float64)
    return stats, eta, eta * radius_scale


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(rows, etas), max_size=40),
    st.sampled_from([0.5, 1.0, 1.5]),
    st.booleans(),
    st.booleans(),
)
def test_native_matches_the_reference(native, pairs, radius_scale, glob, project):
    stats, eta, radius = _inputs([r for r, _ in pairs], [e for _, e in pairs], radius_scale)
    got = torch.ops.fastperturb.ascent_coefficients(stats, eta, radius, global_scope=glob, project=project)
    want = reference.ascent_coefficients(stats, eta, radius, global_scope=glob, project=project)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == (len(pairs),)
        if glob:  # a sum over the tensors, in another order
            torch.testing.assert_close(g, w, rtol=1e-6, atol=0)
        else:  # the same IEEE operations in the same order: bit for bit
            assert torch.equal(g, w), (g, w)


@pytest.mark.parametrize("glob", [False, True])
def test_native_matches_the_reference_on_nan_inf_and_float64_stats(native, glob):
    stats = torch.tensor(
        [[math.nan, 0.0, 1.0], [math.inf, 1.0, 0.0], [4.0, math.nan, 1.0], [0.0, 0.0, 0.0], [9.0, -1.0, 2.0]],
        dtype=torch.float64,
    )
    eta = torch.tensor([0.1, 0.1, 0.1, 0.0, 0.3], dtype=torch.float64)
    for project in (False, True):
        got = torch.ops.fastperturb.ascent_coefficients(stats, eta, eta, global_scope=glob, project=project)
        want = reference.ascent_coefficients(stats, eta, eta, global_scope=glob, project=project)
        for g, w in zip(got, want):
            assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.nan_to_num(), w.nan_to_num()), (g, w)


def test_the_engine_takes_the_native_op_on_cpp_and_the_reference_elsewhere(native, monkeypatch):
    stats = torch.tensor([[4.0, 0.5, 0.1], [0.0, 0.0, 0.0]])
    eta = torch.tensor([0.2, 0.2], dtype=torch.float64)
    calls = []
    real = reference.ascent_coefficients
    monkeypatch.setattr(reference, "ascent_coefficients", lambda *a, **k: calls.append(1) or real(*a, **k))
    with dispatch.use_backend("cpp"):
        step, proj = ascent_coefficients(PerturbSpec(scope="layer"), stats, eta, eta, True)
    assert calls == []
    torch.testing.assert_close(step, torch.tensor([0.1, 0.0]))  # eta / ||g||, 0 for a zero gradient
    # ||d + a g||^2 = 0.1 + 2 * 0.1 * 0.5 + 0.1^2 * 4 = 0.24 > 0.2^2: projected back onto the radius
    torch.testing.assert_close(proj, torch.tensor([0.2 / math.sqrt(0.24), 1.0]))
    with dispatch.use_backend("reference"):
        again = ascent_coefficients(PerturbSpec(scope="layer"), stats, eta, eta, True)
    assert calls == [1] and all(map(torch.equal, again, (step, proj)))


_GOOD = {"stats": ((2, 3), torch.float32), "step_size": ((2,), torch.float64), "radius": ((2,), torch.float64)}


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        ({"step_size": ((2,), torch.float32)}, TypeError, "step_size must be torch.float64"),
        ({"step_size": ((3,), torch.float64)}, ValueError, r"step_size must have shape \(2,\)"),
        ({"radius": ((2, 1), torch.float64)}, ValueError, "radius must have shape"),
        ({"stats": ((2, 2), torch.float32)}, ValueError, r"stats must have shape \(n, 3\)"),
        ({"stats": ((2, 3), torch.int32)}, TypeError, "stats must be torch.float32 or torch.float64"),
    ],
)
def test_bad_arguments_are_clear_errors(native, bad, exc, match):
    args = [torch.zeros(shape, dtype=dtype) for shape, dtype in {**_GOOD, **bad}.values()]
    with pytest.raises(exc, match=match):
        torch.ops.fastperturb.ascent_coefficients(*args, global_scope=False, project=True)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_opcheck_and_the_fake_impl(native, n):
    stats = torch.rand(n, 3)
    eta = torch.rand(n, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.fastperturb.ascent_coefficients.default,
        (stats, eta, eta * 2),
        {"global_scope": True, "project": True},
    )
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = mode.from_tensor(stats)
        step, proj = torch.ops.fastperturb.ascent_coefficients(
            fake, mode.from_tensor(eta), mode.from_tensor(eta), global_scope=False, project=False
        )
        assert step.shape == proj.shape == (n,) and step.dtype == proj.dtype == torch.float32


def test_the_facade_runs_the_reference_under_torch_compile(native):
    stats = torch.tensor([[4.0, 0.5, 0.1], [1.0, 0.0, 0.0]])
    eta = torch.tensor([0.2, 0.3], dtype=torch.float64)
    f = torch.compile(lambda s, e: ops.ascent_coefficients(s, e, e, global_scope=True, project=True), fullgraph=True)
    for g, w in zip(f(stats, eta), reference.ascent_coefficients(stats, eta, eta, global_scope=True, project=True)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=0)
