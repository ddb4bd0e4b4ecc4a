"""ascent_coefficients (the l2 ascent step's per-tensor coefficients): the kernels against the reference.

Here on the C++ CPU kernel; tests/test_triton_coefficients.py runs the same tests on the Triton kernel under the
interpreter (its ``kernel_backend`` fixture overrides the one below). The CUDA kernel shares the CPU kernel's
arithmetic (math.h) and checks; tests/test_cuda_build.py covers its registration and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastperturb import ops
from fastperturb.engine import PerturbSpec, ascent_coefficients
from fastperturb.ops import dispatch, reference


@pytest.fixture
def kernel_backend(native):
    """The backend whose ascent_coefficients kernel is tested, selected for the test."""
    with dispatch.use_backend("cpp"):
        yield "cpp"


def _kernel(backend: str):
    return dispatch.op("ascent_coefficients", backend)


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
def test_kernel_matches_the_reference(kernel_backend, pairs, radius_scale, glob, project):
    stats, eta, radius = _inputs([r for r, _ in pairs], [e for _, e in pairs], radius_scale)
    got = _kernel(kernel_backend)(stats, eta, radius, global_scope=glob, project=project)
    want = reference.ascent_coefficients(stats, eta, radius, global_scope=glob, project=project)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == (len(pairs),)
        if glob:  # a sum over the tensors, in another order
            torch.testing.assert_close(g, w, rtol=1e-6, atol=0)
        else:  # the same IEEE operations in the same order: bit for bit
            assert torch.equal(g, w), (g, w)


@pytest.mark.parametrize("glob", [False, True])
def test_kernel_matches_the_reference_on_nan_inf_and_float64_stats(kernel_backend, glob):
    stats = torch.tensor(
        [[math.nan, 0.0, 1.0], [math.inf, 1.0, 0.0], [4.0, math.nan, 1.0], [0.0, 0.0, 0.0], [9.0, -1.0, 2.0]],
        dtype=torch.float64,
    )
    eta = torch.tensor([0.1, 0.1, 0.1, 0.0, 0.3], dtype=torch.float64)
    for project in (False, True):
        got = _kernel(kernel_backend)(stats, eta, eta, global_scope=glob, project=project)
        want = reference.ascent_coefficients(stats, eta, eta, global_scope=glob, project=project)
        for g, w in zip(got, want):
            assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.nan_to_num(), w.nan_to_num()), (g, w)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("glob", [False, True])
def test_kernel_matches_the_reference_on_a_nan_or_inf_radius(kernel_backend, glob, bad):
    """A NaN radius (relative to a weight that is NaN) made the reference's largest radius NaN, so nothing is
    projected, while the kernels' max dropped it and projected the others (found by this round's CUDA review)."""
    stats = torch.tensor([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0], [9.0, 1.0, 2.0]])
    eta = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    radius = torch.tensor([bad, 0.1, 0.3], dtype=torch.float64)
    got = _kernel(kernel_backend)(stats, eta, radius, global_scope=glob, project=True)
    want = reference.ascent_coefficients(stats, eta, radius, global_scope=glob, project=True)
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.nan_to_num(), w.nan_to_num()), (g, w)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 1000])
def test_kernel_on_list_lengths_around_its_block(kernel_backend, n):
    """Empty, one row, and around the 256 rows a Triton program or a CUDA thread block takes per iteration."""
    g = torch.Generator().manual_seed(n)
    stats = torch.rand(n, 3, generator=g) * torch.tensor([1.0, 2.0, 1.0]) - torch.tensor([0.0, 1.0, 0.0])
    eta = torch.rand(n, dtype=torch.float64, generator=g) * 0.1
    radius = eta * 0.9
    for glob in (False, True):
        got = _kernel(kernel_backend)(stats, eta, radius, global_scope=glob, project=True)
        want = reference.ascent_coefficients(stats, eta, radius, global_scope=glob, project=True)
        for k, w in zip(got, want):
            assert k.shape == (n,) and k.dtype == torch.float32
            torch.testing.assert_close(k, w, rtol=0 if not glob else 1e-6, atol=0)
        if n:  # the projection is active somewhere (radius < step), so the test sees it
            assert (got[1] < 1).any()


def test_the_engine_takes_the_kernel_and_the_reference_only_when_asked(kernel_backend, monkeypatch):
    stats = torch.tensor([[4.0, 0.5, 0.1], [0.0, 0.0, 0.0]])
    eta = torch.tensor([0.2, 0.2], dtype=torch.float64)
    calls = []
    real = reference.ascent_coefficients
    monkeypatch.setattr(reference, "ascent_coefficients", lambda *a, **k: calls.append(1) or real(*a, **k))
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
def test_bad_arguments_are_clear_errors(kernel_backend, bad, exc, match):
    args = [torch.zeros(shape, dtype=dtype) for shape, dtype in {**_GOOD, **bad}.values()]
    with pytest.raises(exc, match=match):
        _kernel(kernel_backend)(*args, global_scope=False, project=True)
    with pytest.raises(exc, match=match):  # the fake impl says the same under torch.compile
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            _kernel(kernel_backend)(*map(mode.from_tensor, args), global_scope=False, project=True)


def test_a_vector_on_another_device_is_refused(kernel_backend):
    stats = torch.zeros(2, 3)
    eta = torch.zeros(2, dtype=torch.float64)
    on_meta = torch.zeros(2, dtype=torch.float64, device="meta")
    op = _kernel(kernel_backend).default
    kernel = lambda *a: op.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *a, global_scope=False, project=True
    )  # noqa: E731
    for args in ((stats, on_meta, eta), (stats, eta, on_meta)):
        with pytest.raises(ValueError, match=r"must be a dense tensor on stats's device \(cpu\), got meta"):
            kernel(*args)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_opcheck_and_the_fake_impl(kernel_backend, n):
    stats = torch.rand(n, 3)
    eta = torch.rand(n, dtype=torch.float64)
    torch.library.opcheck(
        _kernel(kernel_backend).default,
        (stats, eta, eta * 2),
        {"global_scope": True, "project": True},
    )
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = mode.from_tensor(stats)
        step, proj = _kernel(kernel_backend)(
            fake, mode.from_tensor(eta), mode.from_tensor(eta), global_scope=False, project=False
        )
        assert step.shape == proj.shape == (n,) and step.dtype == proj.dtype == torch.float32


def test_the_facade_runs_the_reference_under_torch_compile(kernel_backend):
    stats = torch.tensor([[4.0, 0.5, 0.1], [1.0, 0.0, 0.0]])
    eta = torch.tensor([0.2, 0.3], dtype=torch.float64)
    f = torch.compile(lambda s, e: ops.ascent_coefficients(s, e, e, global_scope=True, project=True), fullgraph=True)
    for g, w in zip(f(stats, eta), reference.ascent_coefficients(stats, eta, eta, global_scope=True, project=True)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=0)
