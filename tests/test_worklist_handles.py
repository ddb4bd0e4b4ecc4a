"""The CUDA kernels' ops on a TensorLists handle, executed on CPU.

``torch.ops.fastperturb_worklist.*_lists`` run the host code of the CUDA handle ops
(csrc/cuda/worklist_list_ops.h: the call's checks, the handle's cached work-list plan, the launches) on the CPU
executor of the work list (see tests/test_worklist.py). Each is compared, bit for bit, with the executor's list
op on the same tensors (the same plan, so the same partial sums), and through it with the reference; the
one-pass ``restore_norms_lists_`` with ``restore_`` followed by ``norms`` of the gradients. The executor's
geometry is varied between calls on one handle, so a cached plan made for other limits would show.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastperturb import ops
from fastperturb.ops import reference as R
from fastperturb.ops.names import HANDLE_OPS

from test_worklist import DTYPES, SETTINGS, W, assert_bitwise, clones, config_spec, configured, make_list, seeds

# One dtype per list: a handle's lists mirror each other (grads, backups and accum share the params' dtype).
handle_spec = st.tuples(
    st.one_of(st.just(0), st.integers(1, 40), st.integers(41, 300)),
    st.integers(0, 9),
    st.booleans(),
)
handle_lists = st.lists(st.tuples(st.sampled_from(DTYPES), handle_spec), min_size=1, max_size=8)


def setup(specs, seed, *, special=None):
    """params (with .grad), backups and accum of the given (dtype, (numel, offset, transposed)) specs, and
    independent clones of each for the list ops."""
    gen = torch.Generator().manual_seed(seed)
    flat = [(d, n, off, tr) for d, (n, off, tr) in specs]
    params, grads = make_list(flat, gen), make_list(flat, gen, shift=1)
    backups, accum = make_list(flat, gen, shift=2), make_list(flat, gen, shift=3)
    if special and grads[-1].numel():
        g = grads[-1]
        g[tuple(s // 2 for s in g.shape)] = math.nan if special == "nan" else math.inf
    for p, g in zip(params, grads):
        p.grad = g
    twins = [clones(x) for x in (params, grads, backups, accum)]
    return ops.TensorLists(params, backups, accum), twins


def assert_same(got, want):
    """Results of a reducing op, bit for bit (NaN where NaN)."""
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_the_executor_has_every_handle_op():
    for name in HANDLE_OPS:
        mine = str(getattr(W, name).default._schema)
        theirs = str(getattr(torch.ops.fastperturb, name).default._schema)
        assert mine.replace("fastperturb_worklist::", "fastperturb::") == theirs


@given(
    specs=handle_lists,
    cfgs=st.lists(config_spec, min_size=2, max_size=2),
    seed=seeds,
    special=st.sampled_from([None, "nan", "inf"]),
)
@SETTINGS
def test_reductions_equal_the_list_ops(specs, cfgs, seed, special):
    # On the handle's own tensors: a sum's lane split follows the alignment of the lists, which clones change.
    lists, _ = setup(specs, seed, special=special)
    h, params, backups, accum, grads = lists.handle, lists.params, lists.backups, lists.accum, lists.grads()
    for cfg in cfgs:  # a second geometry on the same handle: its plan must follow the executor's limits
        with configured(*cfg):
            for ord in (2.0, math.inf):
                assert_same(W.norms_lists(h, ord), W.norms(params, ord))
                assert_same(W.norms_lists(h, ord, of_grads=True), W.norms(grads, ord))
            kw = dict(accum_weight=0.5, adaptive_eta=0.01)
            before = clones(accum)
            got = W.grad_stats_lists_(h, with_accum=True, with_params=True, with_backups=True, **kw)
            after = clones(accum)
            for a, b in zip(accum, before):
                a.copy_(b)
            want = W.grad_stats_(grads, accum, params, backups, **kw)
            assert_same(got, want)
            assert_bitwise(after, accum, any_nan=True)
            got = W.grad_stats_lists_(h, with_accum=False, with_params=False, with_backups=False)
            assert_same(got, W.grad_stats_(grads, [], [], []))


@given(
    specs=handle_lists,
    cfg=config_spec,
    seed=seeds,
    norm=st.sampled_from(["l2", "linf"]),
    first=st.booleans(),
    zero_grads=st.booleans(),
)
@SETTINGS
def test_writing_ops_equal_the_list_ops(specs, cfg, seed, norm, first, zero_grads):
    lists, (params, grads, backups, accum) = setup(specs, seed)
    h, n = lists.handle, len(specs)
    gen = torch.Generator().manual_seed(seed)
    step, proj = torch.rand(n, generator=gen), torch.rand(n, generator=gen) + 0.5
    with configured(*cfg):
        W.ascent_step_lists_(h, step, proj, norm=norm, first=first, zero_grads=zero_grads)
        W.ascent_step_(params, grads, backups, step, proj, norm=norm, first=first, zero_grads=zero_grads)
        assert_bitwise(lists.params, params)
        assert_bitwise(lists.backups, backups)
        assert_bitwise(lists.grads(), grads)
        W.combine_grads_lists_(h, -0.75)
        W.combine_grads_(grads, accum, -0.75)
        assert_bitwise(lists.grads(), grads)
        W.restore_lists_(h)
        W.restore_(params, backups)
        assert_bitwise(lists.params, params)


@given(specs=handle_lists, cfg=config_spec, seed=seeds, special=st.sampled_from([None, "nan", "inf"]))
@SETTINGS
def test_restore_norms_is_restore_then_norms_in_one_pass(specs, cfg, seed, special):
    lists, (params, grads, backups, _) = setup(specs, seed, special=special)
    with configured(*cfg):
        for ord in (2.0, math.inf):
            got = W.restore_norms_lists_(lists.handle, ord)
            W.restore_(params, backups)
            want = W.norms(grads, ord)
            assert_bitwise(lists.params, params)
            # Bit for bit where the vector path is taken alike: every list of a chunk 16-byte aligned, or none.
            # Otherwise the same sum in another lane split: close to the reference.
            rper, rtotal = R.norms(grads, ord)
            for a, b, r in ((got[0], want[0], rper), (got[1], want[1], rtotal)):
                assert torch.equal(a.isnan(), r.isnan())
                ok = ~r.isnan()
                if ord == math.inf:
                    assert torch.equal(a[ok], b[ok])
                else:
                    assert torch.allclose(a[ok].double(), r[ok].double(), rtol=3e-5, atol=1e-30)
    # With aligned buffers (the optimizers' own: fresh allocations) the norms are the list op's, bit for bit.
    aligned = [(d, (n, 0, tr)) for d, (n, _, tr) in specs]
    lists, (params, grads, backups, _) = setup(aligned, seed, special=special)
    for p, g, b in zip(lists.params, lists.grads(), lists.backups):
        p.data, g.data, b.data = p.clone(), g.clone(), b.clone()  # (storage offset 0)
    lists = ops.TensorLists(lists.params, lists.backups, lists.accum)
    with configured(*cfg):
        assert_same(W.restore_norms_lists_(lists.handle, 2.0), W.norms(lists.grads(), 2.0))


def test_new_gradients_each_call_reuse_the_plan():
    """Training replaces every .grad each pass; the handle's plan is kept and the new pointers are read."""
    lists, (params, grads, backups, accum) = setup([(torch.float32, (300, 0, False)), (torch.float16, (7, 1, True))], 3)
    h = lists.handle
    with configured(16, 2, 3, 4, 1):
        for k in range(3):
            fresh = [torch.randn_like(g) * (k + 1) for g in grads]
            for p, g in zip(lists.params, fresh):
                p.grad = g
            assert_same(W.norms_lists(h, 2.0, of_grads=True), W.norms(fresh, 2.0))


def test_errors_match_the_cpu_kernels():
    """The handle ops of the work list check with the CPU kernels' checks (common/list_calls.h)."""
    lists, _ = setup([(torch.float32, (5, 0, False))], 0)
    no_buffers = ops.TensorLists(lists.params)
    for ns in (W, torch.ops.fastperturb):
        with pytest.raises(ValueError, match="ord must be 2 or inf"):
            ns.norms_lists(lists.handle, 1.0)
        with pytest.raises(ValueError, match="has no backups list"):
            ns.restore_norms_lists_(no_buffers.handle, 2.0)
        with pytest.raises(ValueError, match="has no accum list"):
            ns.combine_grads_lists_(no_buffers.handle, 1.0)
        with pytest.raises(ValueError, match="norm must be 'l2' or 'linf'"):
            ns.ascent_step_lists_(lists.handle, torch.ones(1), torch.ones(1), norm="l1")
        with pytest.raises(ValueError, match="backups given without params"):
            ns.grad_stats_lists_(lists.handle, with_accum=False, with_params=False, with_backups=True)


def test_a_refused_call_writes_nothing():
    lists, _ = setup([(torch.float32, (50, 0, False)), (torch.float64, (9, 0, False))], 1)
    before = clones(lists.params)
    lists.params[1].grad = None
    for ns in (W, torch.ops.fastperturb):
        with pytest.raises(TypeError, match=r"params\[1\]\.grad is None"):
            ns.restore_norms_lists_(lists.handle, 2.0)
        assert_bitwise(lists.params, before)
    lists.params[1].grad = torch.zeros(9, dtype=torch.float64)
    lists.params[0].data = torch.zeros(50)  # a new storage behind the handle
    for ns in (W, torch.ops.fastperturb):
        with pytest.raises(ValueError, match=r"params\[0\] changed since its TensorLists handle was built"):
            ns.restore_lists_(lists.handle)


def test_versions_are_bumped_as_the_list_ops_bump_them():
    lists, _ = setup([(torch.float32, (20, 0, False))], 2)
    p, b, g = lists.params[0], lists.backups[0], lists.params[0].grad
    v = (p._version, b._version, g._version)
    W.restore_norms_lists_(lists.handle, 2.0)
    assert (p._version, b._version, g._version) == (v[0] + 1, v[1], v[2])
    W.ascent_step_lists_(lists.handle, torch.ones(1), torch.ones(1), first=True, zero_grads=True)
    assert (p._version, b._version, g._version) == (v[0] + 2, v[1] + 1, v[2] + 1)


def test_empty_handles():
    lists = ops.TensorLists([], [], [])
    per, total = W.norms_lists(lists.handle, 2.0)
    assert per.shape == (0,) and total.item() == 0.0
    per, total = W.restore_norms_lists_(lists.handle, 2.0)
    assert per.shape == (0,) and total.item() == 0.0
    assert W.grad_stats_lists_(lists.handle, with_accum=False, with_params=False, with_backups=False).shape == (0, 3)
    e = [torch.empty(0), torch.empty(0, 3, dtype=torch.float16)]
    for t in e:
        t.grad = torch.empty_like(t)
    lists = ops.TensorLists(e, clones(e), clones(e))
    per, total = W.restore_norms_lists_(lists.handle, math.inf)
    assert per.tolist() == [0.0, 0.0] and total.item() == 0.0


def test_the_host_benchmark_runs():
    # benchmarks/worklist_host.py (the README's figures for the CUDA handle ops' host side): tiny sizes
    from benchmarks import worklist_host

    recs = worklist_host.measure(n=3, numel=2, reps=1, rounds=1)
    assert {(r["op"], r["call"]) for r in recs} == {
        (op, call)
        for op in ("norms of .grad", "restore_", "restore_ + norms of .grad", "grad_stats_ (params, backups)")
        for call in ("lists", "handle")
    }
    assert all(r["min_us"] > 0 for r in recs)
    assert W.configure(0, 0, 0, 0, 0) == [0, 0, 0, 0, 0]  # the executor's geometry is put back
