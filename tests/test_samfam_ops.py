"""The SAM-family ops (dot_stats, lincomb_, ema_residual_) against their equations, written here in plain
PyTorch (float64), on every CPU backend (the `backend` fixture, the reference included): the contract of
docs/design.md §3 that GSAM, WSAM, LookSAM and FriendlySAM are built on. The comparison of each backend
with the reference over the shared cases is in tests/test_ops.py (fastperturb.testing)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastperturb import ops, testing
from fastperturb.testing import Layer, assert_bitwise_equal, check_op, make_inputs

from strategies import finite_coefs, layers, seeds

F16, BF16, F32, F64 = testing.FLOAT_DTYPES
MIXED = [Layer((3, 4), F16), Layer((5,), BF16), Layer((2, 3, 4, 5), F32, True), Layer((7,), F64), Layer((), F32)]


def compute(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == F64 else torch.float32


def tol(dtype):
    return testing.ELEMENT_TOL[dtype]


# --- dot_stats -------------------------------------------------------------------------


def test_dot_stats_equations(backend):
    x = make_inputs(MIXED, seed=1)
    got = ops.dot_stats(x.grads, x.accum)
    assert got.dtype == F32 and got.shape == (len(MIXED), 3)
    for i, (a, b) in enumerate(zip(x.grads, x.accum)):
        a, b = a.double(), b.double()
        want = torch.stack([(a * a).sum(), (a * b).sum(), (b * b).sum()]).float()
        torch.testing.assert_close(got[i], want, rtol=2e-5, atol=1e-6 * float((a.abs() * b.abs()).sum()))


def test_dot_stats_propagates_nan_and_inf(backend):
    x = [torch.tensor([1.0, math.nan, 2.0]), torch.tensor([math.inf, 1.0])]
    y = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0])]
    got = ops.dot_stats(x, y)
    assert got[0, :2].isnan().all() and got[0, 2] == 3.0
    assert got[1, 0] == math.inf and got[1, 1] == math.inf and got[1, 2] == 2.0


def test_dot_stats_empty(backend):
    assert ops.dot_stats([], []).shape == (0, 3)
    got = ops.dot_stats([torch.zeros(0), torch.ones(2)], [torch.zeros(0), torch.ones(2)])
    assert got.tolist() == [[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]


# --- lincomb_ --------------------------------------------------------------------------


def lincomb_equation(out, x, y, coef):
    """The new values of ``out`` (in ``out``'s dtype) from the op's equation."""
    want = []
    for i, o in enumerate(out):
        cd = compute(o)
        c0, c1, c2 = (float(c) for c in coef[i])
        v = c1 * x[i].to(cd) if c0 == 0 else c0 * o.to(cd) + c1 * x[i].to(cd)
        if y:
            v = v + c2 * y[i].to(cd)
        want.append(v.to(o.dtype))
    return want


@pytest.mark.parametrize("with_y", [True, False])
def test_lincomb_equations(backend, with_y):
    x = make_inputs(MIXED, seed=2)
    coef = torch.tensor([[0.5, -1.25, 2.0], [0.0, 0.7, -0.3], [1.0, 0.25, 3.0], [-2.0, 1.0, 0.5], [0.0, 1.0, 0.0]])
    y = x.backups if with_y else []
    want = lincomb_equation(x.accum, x.grads, y, coef)
    sq = ops.lincomb_(x.accum, x.grads, y, coef)
    assert sq.dtype == F32 and sq.shape == (len(MIXED),)
    for o, w in zip(x.accum, want):
        torch.testing.assert_close(o, w, **tol(w.dtype))
    own = torch.stack([o.double().square().sum() for o in x.accum]).float()
    torch.testing.assert_close(sq, own, rtol=2e-5, atol=0.0)


@pytest.mark.parametrize("dtype", testing.FLOAT_DTYPES)
def test_lincomb_c0_zero_never_reads_out(backend, dtype):
    """c0 == 0: a NaN-filled (or uninitialised) out buffer does not leak into the result."""
    x = [torch.randn(5, 7).to(dtype), torch.randn(3000).to(dtype)]
    y = [torch.randn(5, 7).to(dtype), torch.randn(3000).to(dtype)]
    out = [torch.full_like(t, math.nan) for t in x]
    coef = torch.tensor([[0.0, 2.0, -1.0], [0.0, 0.5, 0.25]])
    want = lincomb_equation(out, x, y, coef)
    sq = ops.lincomb_(out, x, y, coef)
    assert not any(o.isnan().any() for o in out) and sq.isfinite().all()
    for o, w in zip(out, want):
        torch.testing.assert_close(o, w, **tol(dtype))


@pytest.mark.parametrize("dtype", testing.FLOAT_DTYPES)
def test_lincomb_copy_is_exact(backend, dtype):
    """out = 0*out + 1*x is x bit for bit: signed zeros, denormals, infinities, NaN in x."""
    x = [testing.make_tensor(Layer((2, 3, 4, 5), dtype, True), torch.Generator().manual_seed(3), special=0.3)]
    out = [torch.full_like(x[0], math.nan)]
    sq = ops.lincomb_(out, x, [], torch.tensor([[0.0, 1.0, 0.0]]))
    x0 = x[0]
    # NaN payloads aside (as everywhere in the ops), the bits of x
    assert torch.equal(out[0].isnan(), x0.isnan())
    keep = ~x0.isnan()
    assert_bitwise_equal(out[0][keep], x0[keep], "copy")
    assert out[0].stride() == x0.stride()
    assert sq.isnan().item()  # NaN in x: the statistic says so


def test_lincomb_nonfinite_coefficient_and_inputs_propagate(backend):
    out = [torch.ones(4)]
    x = [torch.tensor([1.0, math.inf, 0.0, 1.0])]
    sq = ops.lincomb_(out, x, [], torch.tensor([[1.0, 1.0, 0.0]]))
    assert out[0].tolist() == [2.0, math.inf, 1.0, 2.0] and sq.item() == math.inf
    sq = ops.lincomb_(out, x, [], torch.tensor([[math.nan, 1.0, 0.0]]))  # c0 NaN is not 0: out is read
    assert out[0].isnan().all() and sq.isnan().item()


def test_lincomb_empty(backend):
    assert ops.lincomb_([], [], [], torch.zeros(0, 3)).shape == (0,)
    out = [torch.zeros(0), torch.empty(())]
    sq = ops.lincomb_(out, [torch.zeros(0), torch.tensor(3.0)], [], torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]]))
    assert out[1].item() == 6.0 and sq.tolist() == [0.0, 36.0]


# --- ema_residual_ ---------------------------------------------------------------------


def ema_equation(g_in, m_in, w, sigma, lmbda, init, grad_scale, eta):
    """(grads, ema, statistic) of one sweep, from the op's equations, per tensor."""
    cd = compute(g_in)
    g = torch.tensor(grad_scale, dtype=cd) * g_in.to(cd)
    if init:
        d, m = g, torch.where(g.isfinite(), g, 0.0)
    else:
        mc = m_in.to(cd)
        d = g - torch.tensor(sigma, dtype=cd) * mc
        m = torch.where(g.isfinite(), torch.tensor(lmbda, dtype=cd) * mc + torch.tensor(1 - lmbda, dtype=cd) * g, mc)
    d = d.to(g_in.dtype)
    t = (w.double().abs() + eta) if eta >= 0 else 1.0
    return d, m.to(m_in.dtype), (t * d.double()).square().sum()


@pytest.mark.parametrize("eta", [-1.0, 0.01])
def test_ema_residual_equations_over_steps(backend, eta):
    """Three sweeps (init, then two updates) against the equations, the EMA carried across steps."""
    x = make_inputs(MIXED, seed=4)
    ema = [torch.full_like(g, math.nan) for g in x.grads]  # init must not read it
    want_m = ema
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        grads = [testing.make_tensor(Layer(tuple(g.shape), g.dtype), gen) for g in x.grads]
        grads = [g.contiguous(memory_format=torch.channels_last) if g.dim() == 4 else g for g in grads]
        kw = dict(sigma=0.9, lmbda=0.8, init=step == 0, grad_scale=0.5 if step == 1 else 1.0, adaptive_eta=eta)
        want = [
            ema_equation(g, m, w, kw["sigma"], kw["lmbda"], kw["init"], kw["grad_scale"], eta)
            for g, m, w in zip(grads, want_m, x.params)
        ]
        stat = ops.ema_residual_(grads, ema, x.params if eta >= 0 else [], **kw)
        assert stat.dtype == F32 and stat.shape == (len(MIXED),)
        for i, (d, m, s) in enumerate(want):
            torch.testing.assert_close(grads[i], d, **tol(d.dtype))
            torch.testing.assert_close(ema[i], m, **tol(m.dtype))
            assert grads[i].stride() == d.stride() or d.numel() <= 1
            torch.testing.assert_close(stat[i].double(), s, rtol=2e-5, atol=0.0)
        want_m = [m for _, m, _ in want]


def test_ema_residual_nonfinite_gradient_leaves_ema(backend):
    g = [torch.tensor([1.0, math.nan, math.inf, -2.0])]
    m = [torch.tensor([0.5, 0.25, -1.0, 4.0])]
    stat = ops.ema_residual_(g, m, sigma=1.0, lmbda=0.5, init=False)
    assert m[0].tolist() == [0.75, 0.25, -1.0, 1.0]  # unchanged where g is not finite
    assert g[0][0].item() == 0.5 and g[0][1].isnan() and g[0][2] == math.inf and g[0][3] == -6.0
    assert stat.isnan().item()  # the engine sees the bad step
    g = [torch.tensor([math.nan, 3.0])]
    m = [torch.tensor([math.nan, math.nan])]
    ops.ema_residual_(g, m, sigma=1.0, lmbda=0.5, init=True)
    assert m[0].tolist() == [0.0, 3.0]  # init: a non-finite gradient starts the mean at 0, never NaN


def test_ema_residual_grad_scale_keeps_ema_unscaled(backend):
    """Under a GradScaler the grads arrive scaled by S; grad_scale = 1/S keeps the EMA in true units."""
    true = torch.tensor([1.0, -2.0, 4.0])
    m = [torch.zeros(3)]
    ops.ema_residual_([true * 1024], m, sigma=1.0, lmbda=0.9, init=True, grad_scale=1 / 1024)
    assert torch.equal(m[0], true)
    g = [true * 2 * 1024]
    ops.ema_residual_(g, m, sigma=1.0, lmbda=0.5, init=False, grad_scale=1 / 1024)
    assert torch.equal(m[0], 1.5 * true) and torch.equal(g[0], true)


def test_ema_residual_empty(backend):
    assert ops.ema_residual_([], [], sigma=1.0, lmbda=0.9, init=True).shape == (0,)
    g, m = [torch.zeros(0), torch.tensor(2.0)], [torch.zeros(0), torch.tensor(1.0)]
    stat = ops.ema_residual_(g, m, sigma=1.0, lmbda=0.5, init=False)
    assert g[1].item() == 1.0 and m[1].item() == 1.5 and stat.tolist() == [0.0, 1.0]


# --- every backend against the reference (hypothesis) ------------------------------------


@given(layers(), seeds, st.booleans())
def test_dot_stats_matches_reference(compared_backend, ls, seed, same):
    check_op("dot_stats", compared_backend, make_inputs(ls, seed, grad_special=0.05), same=same)


@given(layers(), seeds, st.booleans(), st.data())
def test_lincomb_matches_reference(compared_backend, ls, seed, with_y, data):
    n = len(ls)
    coef = data.draw(
        st.lists(
            st.tuples(st.sampled_from([0.0, 1.0]) | finite_coefs, finite_coefs, finite_coefs), min_size=n, max_size=n
        )
    )
    check_op("lincomb_", compared_backend, make_inputs(ls, seed, grad_special=0.05), coef=coef, with_y=with_y)


@given(layers(), seeds, st.booleans(), st.sampled_from([-1.0, 0.0, 0.01]), st.floats(0.0, 1.0), finite_coefs)
def test_ema_residual_matches_reference(compared_backend, ls, seed, init, eta, lmbda, sigma):
    x = make_inputs(ls, seed, grad_special=0.05)
    check_op(
        "ema_residual_", compared_backend, x, sigma=sigma, lmbda=lmbda, init=init, adaptive_eta=eta, grad_scale=0.25
    )


# --- in place and no autograd -------------------------------------------------------------


def test_written_tensors_bump_version_counters(backend):
    x = make_inputs([Layer((3,)), Layer((2, 2))], seed=6)
    before = [t._version for t in x.accum]
    ops.lincomb_(x.accum, x.grads, [], torch.tensor([[0.0, 1.0, 0.0]] * 2))
    assert all(t._version > v for t, v in zip(x.accum, before))
    before = [t._version for t in (*x.grads, *x.accum)]
    ops.ema_residual_(x.grads, x.accum, sigma=1.0, lmbda=0.5, init=False)
    assert all(t._version > v for t, v in zip((*x.grads, *x.accum), before))
    before = [t._version for t in (*x.grads, *x.accum)]
    ops.dot_stats(x.grads, x.accum)
    assert [t._version for t in (*x.grads, *x.accum)] == before  # read-only


def test_ops_work_on_leaf_parameters(backend):
    """The facade runs outside autograd: leaves that require grad are written in place, results need no grad."""
    w = [torch.nn.Parameter(torch.randn(4))]
    sq = ops.lincomb_(w, [torch.ones(4)], [], torch.tensor([[1.0, -0.5, 0.0]]))
    assert not sq.requires_grad
