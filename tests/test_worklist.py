"""The CUDA ops' work list, executed on CPU.

``torch.ops.fastperturb_worklist.*`` are the fused ops run by the CPU
executor of csrc/testing/worklist_executor.cpp (in the test module
fastperturb._C_testing, built with FASTPERTURB_BUILD_TESTING=1): the host code of the CUDA launcher
(plan, kernel arguments, finalize launches) and the per-block loop and element
functors of the kernels (csrc/include/fastperturb/worklist/), walked launch by
launch, block by block, lane by lane. Only the kernels' thread indexing and the
CUB block reduction are not run here.

The tests force tiny launch capacities and chunk sizes (``configure``) so that
tensors are split across launches, lists exceed one launch, chunks end off the
vector width, and buffers are misaligned, and compare every op with
fastperturb.ops.reference.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastperturb.ops import native as _native
from fastperturb.ops import reference as R
from fastperturb.ops.names import OPS

from harness import worklist_executor

assert _native.load_error is None, f"fastperturb._C did not load: {_native.load_error}"
W = worklist_executor()

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}

# capacity(depth) -> [max_tensors, max_blocks, chunk_size, threads, finalize_tensors,
#                     finalize_threads, vector bytes, sizeof(LaunchArgs), sizeof(FinalizeArgs)]
CAP = {d: W.capacity(d) for d in (1, 2, 3, 4)}
CHUNK = CAP[1][2]
MAX_BLOCKS = CAP[1][1]


@contextlib.contextmanager
def configured(chunk_size=0, max_tensors=0, max_blocks=0, lanes=0, finalize_tensors=0):
    old = W.configure(chunk_size, max_tensors, max_blocks, lanes, finalize_tensors)
    try:
        yield
    finally:
        W.configure(*old)


# ---------------------------------------------------------------------------
# Tensors: (dtype, numel, offset, transposed) -> a dense tensor whose data
# starts `offset` elements into its buffer (misaligned unless offset is a
# multiple of the vector width), transposed = dense but not contiguous.


def make(spec, gen, kind="randn", shift=0):
    dtype, numel, offset, transposed = spec
    offset += shift  # lists of one call with different alignments
    if kind == "bits":  # arbitrary bit patterns: NaN payloads, infinities, subnormals
        info = torch.iinfo(BITS[dtype])
        buf = torch.randint(info.min, info.max, (numel + offset,), generator=gen, dtype=BITS[dtype]).view(dtype)
    else:
        buf = torch.randn(numel + offset, generator=gen, dtype=torch.float64).to(dtype)
    flat = buf[offset:]
    if transposed and numel >= 4 and numel % 2 == 0:
        return flat.view(2, numel // 2).t()  # shape (numel/2, 2), strides (1, numel/2)
    return flat


def make_list(specs, gen, kind="randn", shift=0):
    return [make(s, gen, kind, shift) for s in specs]


def clones(ts):
    return [t.clone(memory_format=torch.preserve_format) for t in ts]


def bits(t):
    return t.contiguous().view(BITS[t.dtype])


def assert_bitwise(got, want, any_nan=False):
    """Bit for bit; with any_nan, a NaN where the reference has one may be any NaN."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        if any_nan:
            nan = b.isnan()
            assert torch.equal(a.isnan(), nan), f"tensor {i}: NaNs differ"
            a, b = a.masked_fill(nan, 0), b.masked_fill(nan, 0)
        assert torch.equal(bits(a), bits(b)), f"tensor {i} ({a.dtype}, {a.numel()} elements) differs"


tensor_spec = st.tuples(
    st.sampled_from(DTYPES),
    st.one_of(st.just(0), st.integers(1, 40), st.integers(41, 300)),
    st.integers(0, 9),
    st.booleans(),
)
# (chunk_size (0: the CUDA 65536), max_tensors, max_blocks, lanes, finalize_tensors)
config_spec = st.tuples(
    st.sampled_from([1, 2, 3, 5, 8, 13, 16, 64, 0]),
    st.integers(1, 4),
    st.integers(1, 6),
    st.sampled_from([1, 2, 3, 7, 32, 0]),
    st.integers(1, 3),
)
lists = st.lists(tensor_spec, min_size=1, max_size=10)
seeds = st.integers(0, 2**31 - 1)
# at least 60 examples (the executor is fast); more under a thorough profile
SETTINGS = settings(
    max_examples=max(60, settings.default.max_examples), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ---------------------------------------------------------------------------
# The planner.


def check_plan(numels, groups, chunk, max_tensors, max_blocks, depth):
    tensors, blocks = W.plan(numels, groups, chunk, max_tensors, max_blocks, depth)
    tensors, blocks = tensors.tolist(), blocks.tolist()
    keys = groups if groups else [0] * len(numels)
    order = []  # walk order: groups by first appearance, list order inside a group
    for k in dict.fromkeys(keys):
        order += [i for i in range(len(numels)) if keys[i] == k]
    chunks = [-(-n // chunk) for n in numels]
    expected = [(i, c) for i in order for c in range(chunks[i])]
    # every chunk of every tensor exactly once, in walk order, slots 0, 1, 2, ...
    assert [(b[2], b[3]) for b in blocks] == expected
    assert [b[4] for b in blocks] == list(range(len(expected)))
    for _launch, _entry, i, c, _slot, begin, end in blocks:
        assert begin == c * chunk and end == min(begin + chunk, numels[i])
    n_launches = max([b[0] for b in blocks], default=-1) + 1
    assert sorted({t[0] for t in tensors}) == list(range(n_launches))
    for launch in range(n_launches):
        table = [t for t in tensors if t[0] == launch]
        lb = [b for b in blocks if b[0] == launch]
        assert 1 <= len(lb) <= max_blocks and 1 <= len(table) <= max_tensors
        assert len({t[1] for t in table}) == 1  # the table's rows name one group
        assert len({keys[b[2]] for b in lb}) == 1  # one dtype group per launch
        for b in lb:
            assert table[b[1]][2] == b[2]  # the block's entry names its tensor
        assert {t[2] for t in table} == {b[2] for b in lb}  # no entry without blocks
        assert len({t[2] for t in table}) == len(table)  # no tensor twice in a table
        if launch + 1 < n_launches:
            nxt = [b for b in blocks if b[0] == launch + 1]
            same_group = keys[nxt[0][2]] == keys[lb[0][2]]
            # a launch closes only when full or at the end of its group
            assert (not same_group) or len(lb) == max_blocks or len(table) == max_tensors
    if max_tensors >= 2:  # the bound csrc/cuda/README.md states, per group
        for k in dict.fromkeys(keys):
            members = [i for i in range(len(numels)) if keys[i] == k]
            c = sum(chunks[i] for i in members)
            nonempty = sum(1 for i in members if chunks[i])
            launches = {b[0] for b in blocks if keys[b[2]] == k}
            assert len(launches) <= c // max_blocks + nonempty // (max_tensors - 1) + 1
    return tensors, blocks


@given(
    numels=st.lists(st.one_of(st.just(0), st.integers(1, 60)), max_size=25),
    ngroups=st.integers(0, 3),
    chunk=st.integers(1, 17),
    max_tensors=st.integers(1, 6),
    max_blocks=st.integers(1, 9),
    depth=st.integers(1, 4),
    data=st.data(),
)
@settings(max_examples=max(200, settings.default.max_examples), deadline=None)
def test_plan_covers_every_chunk_once(numels, ngroups, chunk, max_tensors, max_blocks, depth, data):
    groups = (
        data.draw(st.lists(st.integers(0, ngroups - 1), min_size=len(numels), max_size=len(numels))) if ngroups else []
    )
    check_plan(numels, groups, chunk, max_tensors, max_blocks, depth)


def test_plan_splits_a_tensor_across_launches():
    tensors, blocks = check_plan([5, 23, 2], [], 2, 3, 4, 1)
    launches_of_1 = sorted({b[0] for b in blocks if b[2] == 1})
    assert len(launches_of_1) >= 3  # 12 chunks, 4 blocks a launch
    for launch in launches_of_1:  # the tensor's entry is repeated in each launch that continues it
        assert [t[2] for t in tensors if t[0] == launch].count(1) == 1


def test_plan_more_tensors_than_one_launch_holds():
    numels = [3] * 10
    tensors, blocks = check_plan(numels, [], 8, 4, 320, 2)
    assert max(t[0] for t in tensors) == 2  # 4 + 4 + 2 tensors


def test_plan_default_geometry():
    """The CUDA geometry: 65536-element chunks, 320 blocks, 110/80/60/48 tensors by depth."""
    assert CHUNK == 65536 and MAX_BLOCKS == 320
    assert [CAP[d][0] for d in (1, 2, 3, 4)] == [110, 80, 60, 48]
    for d in (1, 2, 3, 4):
        assert CAP[d][7] <= 3900 and CAP[d][8] <= 3900  # kernel arguments within the 4 KiB limit
    # one tensor of 321 chunks is continued in a second launch; 111 one-chunk tensors overflow depth 1
    tensors, blocks = W.plan([321 * CHUNK - 7], [], CHUNK, CAP[1][0], MAX_BLOCKS, 1)
    assert blocks[:, 0].tolist() == [0] * 320 + [1] and tensors.tolist() == [[0, 0, 0], [1, 0, 0]]
    tensors, blocks = W.plan([1] * 111, [], CHUNK, CAP[1][0], MAX_BLOCKS, 1)
    assert blocks[:, 0].tolist() == [0] * 110 + [1]


def test_plan_rejects_bad_limits():
    with pytest.raises(ValueError):
        W.plan([4], [], 0, 1, 1, 1)
    with pytest.raises(ValueError):
        W.plan([4], [], 4, 61, 1, 3)  # depth 3 holds 60 tensors
    with pytest.raises(ValueError):
        W.plan([4], [], 4, 1, MAX_BLOCKS + 1, 1)
    with pytest.raises(ValueError):
        W.configure(0, 0, MAX_BLOCKS + 1, 0, 0)


def test_schemas_are_the_op_sets():
    for name in OPS:
        mine = str(getattr(W, name).default._schema)
        theirs = str(getattr(torch.ops.fastperturb, name).default._schema)
        assert mine.replace("fastperturb_worklist::", "fastperturb::") == theirs


# ---------------------------------------------------------------------------
# The ops against the reference.


def close_reduction(got, want, scale, rtol=3e-5):
    """|got - want| <= rtol * scale elementwise (scale: the sum of magnitudes), NaN == NaN."""
    got, want, scale = got.double(), want.double(), scale.double()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    inf = want.isinf()
    assert torch.equal(got[inf], want[inf])
    ok = ~nan & ~inf
    assert torch.all((got[ok] - want[ok]).abs() <= rtol * scale[ok] + 1e-30), (got, want)


@given(specs=lists, cfg=config_spec, seed=seeds, special=st.sampled_from([None, "nan", "inf"]))
@SETTINGS
def test_norms(specs, cfg, seed, special):
    gen = torch.Generator().manual_seed(seed)
    ts = make_list(specs, gen)
    if special and ts[-1].numel():
        t = ts[-1]
        t[tuple(s // 2 for s in t.shape)] = math.nan if special == "nan" else -math.inf
    for ord in (2.0, math.inf):
        with configured(*cfg):
            per, total = W.norms(ts, ord)
        rper, rtotal = R.norms(ts, ord)
        assert per.dtype == torch.float32 and per.shape == (len(ts),) and total.shape == ()
        if ord == math.inf:  # a max: exact
            assert torch.equal(per.isnan(), rper.isnan()) and torch.equal(per.nan_to_num(), rper.nan_to_num())
            assert torch.equal(total.isnan(), rtotal.isnan()) and torch.equal(total.nan_to_num(), rtotal.nan_to_num())
        else:
            close_reduction(per, rper, rper)
            close_reduction(total, rtotal, rtotal)


@given(
    specs=lists,
    cfg=config_spec,
    seed=seeds,
    with_accum=st.booleans(),
    accum_init=st.booleans(),
    lists_given=st.sampled_from(["none", "params", "both"]),
    adaptive=st.booleans(),
    weight=st.sampled_from([1.0, 0.5, -0.25]),
)
@SETTINGS
def test_grad_stats(specs, cfg, seed, with_accum, accum_init, lists_given, adaptive, weight):
    if adaptive and lists_given == "none":
        adaptive = False
    eta = 0.1 if adaptive else -1.0
    gen = torch.Generator().manual_seed(seed)
    grads = make_list(specs, gen)
    params = make_list(specs, gen, shift=1) if lists_given != "none" else []
    backups = make_list(specs, gen, shift=2 * (seed % 3)) if lists_given == "both" else []
    accum = make_list(specs, gen, shift=seed % 5) if with_accum else []
    accum_ref = clones(accum)
    with configured(*cfg):
        got = W.grad_stats_(grads, accum, params, backups, accum_weight=weight, accum_init=accum_init, adaptive_eta=eta)
    want = R.grad_stats_(
        grads, accum_ref, params, backups, accum_weight=weight, accum_init=accum_init, adaptive_eta=eta
    )
    assert got.dtype == torch.float32 and got.shape == (len(grads), 3)
    # scale of each column: the same sums over magnitudes
    scale = torch.zeros(len(grads), 3, dtype=torch.float64)
    for i, g in enumerate(grads):
        g64 = g.double()
        tg = (params[i].double().abs() + eta) * g64 if adaptive else g64
        scale[i, 0] = tg.square().sum()
        if backups:
            d = params[i].double() - backups[i].double()
            scale[i, 1] = (d * g64).abs().sum()
            scale[i, 2] = d.square().sum()
    close_reduction(got, want, scale)
    assert_bitwise(accum, accum_ref)  # the accumulation is elementwise: bit for bit


@given(
    specs=lists,
    cfg=config_spec,
    seed=seeds,
    norm=st.sampled_from(["l2", "linf"]),
    first=st.booleans(),
    adaptive=st.booleans(),
    zero_grads=st.booleans(),
    nan_grad=st.booleans(),
)
@SETTINGS
def test_ascent_step(specs, cfg, seed, norm, first, adaptive, zero_grads, nan_grad):
    gen = torch.Generator().manual_seed(seed)
    params, grads, backups = make_list(specs, gen), make_list(specs, gen, shift=seed % 3), make_list(specs, gen)
    if nan_grad and grads[0].numel():  # sign(NaN) is NaN: the weight must become NaN, not stay
        grads[0][tuple(s // 2 for s in grads[0].shape)] = math.nan
    n = len(specs)
    step = torch.rand(2 * n, generator=gen)[::2]  # a strided coefficient tensor
    proj = torch.rand(n, generator=gen) + 0.5
    p2, g2, b2 = clones(params), clones(grads), clones(backups)
    kw = dict(norm=norm, first=first, adaptive_eta=0.05 if adaptive else -1.0, zero_grads=zero_grads)
    with configured(*cfg):
        W.ascent_step_(params, grads, backups, step, proj, **kw)
    R.ascent_step_(p2, g2, b2, step, proj, **kw)
    assert_bitwise(params, p2, any_nan=nan_grad)
    assert_bitwise(grads, g2, any_nan=nan_grad)
    assert_bitwise(backups, b2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("first", [True, False])
def test_ascent_step_off_eta_that_rounds_to_zero_stays_off(dtype, first):
    """Any adaptive_eta < 0 is off, as in the reference: -1e-300 is -0.0 in float32, which the element's eta >= 0
    test would take as ASAM's direction (|w| + eta)^2 g if the off value were rounded before it was decided."""
    gen = torch.Generator().manual_seed(0)
    make_ts = lambda: [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in (5000, 37)]  # noqa: E731
    params, grads, backups = make_ts(), make_ts(), make_ts()
    p2, g2, b2 = clones(params), clones(grads), clones(backups)
    step, proj = torch.tensor([0.3, 0.7]), torch.tensor([0.9, 1.1])
    kw = dict(norm="l2", first=first, adaptive_eta=-1e-300, zero_grads=False)
    W.ascent_step_(params, grads, backups, step, proj, **kw)
    R.ascent_step_(p2, g2, b2, step, proj, **kw)
    assert_bitwise(params, p2)
    assert_bitwise(backups, b2)


@given(specs=lists, cfg=config_spec, seed=seeds)
@SETTINGS
def test_restore_is_bitwise(specs, cfg, seed):
    gen = torch.Generator().manual_seed(seed)
    params = make_list(specs, gen)
    backups = make_list(specs, gen, kind="bits", shift=seed % 2)  # NaN payloads must survive
    with configured(*cfg):
        W.restore_(params, backups)
    assert_bitwise(params, backups)


@given(specs=lists, cfg=config_spec, seed=seeds, weight=st.sampled_from([1.0, 0.5, -3.0]))
@SETTINGS
def test_combine_grads(specs, cfg, seed, weight):
    gen = torch.Generator().manual_seed(seed)
    grads, accum = make_list(specs, gen), make_list(specs, gen, shift=seed % 3)
    g2 = clones(grads)
    with configured(*cfg):
        W.combine_grads_(grads, accum, weight)
    R.combine_grads_(g2, accum, weight)
    assert_bitwise(grads, g2)


# ---------------------------------------------------------------------------
# The CUDA geometry itself (default configuration) on an over-capacity list.


def test_default_geometry_over_capacity():
    gen = torch.Generator().manual_seed(0)
    # 115 tensors (> 110 a launch at depth 1, > 48 at depth 4), one of 3 chunks,
    # sizes off the vector width, a misaligned one, mixed dtypes
    specs = [(DTYPES[i % 4], 1 + (i * 37) % 300, i % 3, False) for i in range(114)]
    specs.insert(50, (torch.float32, 2 * CHUNK + 13, 1, False))
    ts = make_list(specs, gen)
    with configured():
        per, total = W.norms(ts, 2.0)
        stats = W.grad_stats_(ts, [], ts, [], adaptive_eta=0.5)
    rper, rtotal = R.norms(ts, 2.0)
    close_reduction(per, rper, rper)
    close_reduction(total, rtotal, rtotal)
    rstats = R.grad_stats_(ts, [], ts, [], adaptive_eta=0.5)
    close_reduction(stats[:, 0], rstats[:, 0], rstats[:, 0])
    assert torch.equal(stats[:, 1:], rstats[:, 1:])
    params, grads, backups = ts, make_list(specs, gen), make_list(specs, gen)
    p2, g2, b2 = clones(params), clones(grads), clones(backups)
    step, proj = torch.rand(len(ts), generator=gen), torch.rand(len(ts), generator=gen)
    with configured():
        W.ascent_step_(params, grads, backups, step, proj, norm="l2", first=True)
    R.ascent_step_(p2, g2, b2, step, proj, norm="l2", first=True)
    assert_bitwise(params + backups, p2 + b2)


def test_reductions_are_deterministic():
    gen = torch.Generator().manual_seed(1)
    specs = [(DTYPES[i % 4], 50 + 17 * i, i % 5, i % 2 == 0) for i in range(9)]
    ts = make_list(specs, gen)
    with configured(7, 2, 3, 5, 2):
        a = [W.norms(ts, 2.0)[0], W.grad_stats_(ts, [], ts, ts)]
        b = [W.norms(ts, 2.0)[0], W.grad_stats_(ts, [], ts, ts)]
    assert all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_finite_values_do_not_overflow_the_block_reduction(dtype):
    """Float32/bfloat16 values whose squares are finite but whose chunk sum exceeds float's range: each lane sums
    runs of 64 elements in float, then double (as the CPU kernels' lanes), and a block's 512 lanes combine in
    double. They combined in float (and a lane summed its 128 elements in float): an inf L2 norm on a GPU where
    the CPU op and the reference give 2.6e20 (found by this round's CUDA review; the sums of squares that other ops
    return are float32 and overflow in the reference too). On the default geometry (one 65536-element chunk a
    block, 512 lanes), one chunk and three."""
    for numel in (CHUNK, 3 * CHUNK - 5):
        x = torch.full((numel,), 1e18, dtype=torch.float32).to(dtype)
        with configured():
            per, total = W.norms([x, x[:7]], 2.0)
        rper, rtotal = R.norms([x, x[:7]], 2.0)
        assert torch.isfinite(rtotal)  # (the case itself)
        torch.testing.assert_close(per, rper, rtol=1e-6, atol=0)
        torch.testing.assert_close(total, rtotal, rtol=1e-6, atol=0)


def test_empty_lists_and_empty_tensors():
    per, total = W.norms([], 2.0)
    assert per.shape == (0,) and total.item() == 0.0
    assert W.grad_stats_([], [], [], []).shape == (0, 3)
    e = [torch.empty(0), torch.empty(0, 3, dtype=torch.float16)]
    per, total = W.norms(e, math.inf)
    assert per.tolist() == [0.0, 0.0] and total.item() == 0.0
    W.restore_(e, clones(e))
    W.ascent_step_(e, clones(e), clones(e), torch.ones(2), torch.ones(2))


def test_errors_match_the_cpu_ops():
    """The executor (and so the CUDA ops) check arguments with the CPU kernels' checks."""
    a, b = [torch.zeros(3)], [torch.zeros(4)]
    for ns in (W, torch.ops.fastperturb):
        with pytest.raises(ValueError, match=r"backups\[0\] has shape"):
            ns.restore_(a, b)
        with pytest.raises(ValueError, match="ord must be 2 or inf"):
            ns.norms(a, 1.0)
        with pytest.raises(ValueError, match="norm must be 'l2' or 'linf'"):
            ns.ascent_step_(a, a, a, torch.ones(1), torch.ones(1), norm="l1")
        with pytest.raises(TypeError, match="dtype"):
            ns.combine_grads_([torch.zeros(3, dtype=torch.int32)], [torch.zeros(3, dtype=torch.int32)], 1.0)


def test_ops_respect_their_schemas():
    """opcheck's schema test: only the (a!) arguments are written, outputs alias nothing."""
    gen = torch.Generator().manual_seed(2)
    specs = [(torch.float32, 37, 1, False), (torch.float64, 12, 0, True), (torch.float16, 0, 0, False)]

    def fresh():
        return make_list(specs, gen)

    one = torch.ones(len(specs))
    cases = [
        (W.norms, (fresh(), 2.0), {}),
        (W.grad_stats_, (fresh(), fresh(), fresh(), fresh()), {"accum_weight": 0.5, "adaptive_eta": 0.1}),
        (W.ascent_step_, (fresh(), fresh(), fresh(), one, one), {"first": True, "zero_grads": True}),
        (W.ascent_step_, (fresh(), fresh(), fresh(), one, one), {"norm": "linf"}),
        (W.restore_, (fresh(), fresh()), {}),
        (W.combine_grads_, (fresh(), fresh(), 2.0), {}),
    ]
    for op, args, kwargs in cases:
        result = torch.library.opcheck(op.default, args, kwargs, test_utils=("test_schema",))
        assert result == {"test_schema": "SUCCESS"}, (op, result)


# ---------------------------------------------------------------------------
# The SAM-family ops (dot_stats, lincomb_, ema_residual_) through the work list.


def own_sums(ts, weights=None):
    """float64 sum of squares of each tensor (times its weights): what the op's statistic must be."""
    weights = weights or [None] * len(ts)
    return torch.stack([((t.double() if w is None else w * t.double()) ** 2).sum() for t, w in zip(ts, weights)])


@given(specs=lists, cfg=config_spec, seed=seeds, special=st.sampled_from([None, "nan", "inf"]))
@SETTINGS
def test_dot_stats(specs, cfg, seed, special):
    gen = torch.Generator().manual_seed(seed)
    x, y = make_list(specs, gen), make_list(specs, gen, shift=seed % 3)
    if special and x[-1].numel():
        x[-1][tuple(s // 2 for s in x[-1].shape)] = math.nan if special == "nan" else -math.inf
    with configured(*cfg):
        got = W.dot_stats(x, y)
    want = R.dot_stats(x, y)
    assert got.dtype == torch.float32 and got.shape == (len(x), 3)
    scale = torch.stack(
        [
            torch.stack([(a.double() ** 2).sum(), (a.double() * b.double()).abs().sum(), (b.double() ** 2).sum()])
            for a, b in zip(x, y)
        ]
    )
    close_reduction(got, want, scale)


@given(
    specs=lists,
    cfg=config_spec,
    seed=seeds,
    with_y=st.booleans(),
    c0=st.sampled_from([0.0, 1.0, -0.5]),
    nan_out=st.booleans(),
)
@SETTINGS
def test_lincomb(specs, cfg, seed, with_y, c0, nan_out):
    gen = torch.Generator().manual_seed(seed)
    out, x = make_list(specs, gen), make_list(specs, gen, shift=seed % 3)
    y = make_list(specs, gen, shift=1) if with_y else []
    if nan_out and c0 == 0.0:  # c0 == 0: out is never read, whatever it holds
        for t in out:
            t.fill_(math.nan)
    n = len(specs)
    coef = torch.stack([torch.full((n,), c0), torch.rand(n, generator=gen) - 0.5, torch.rand(n, generator=gen)], 1)
    out_ref = clones(out)
    with configured(*cfg):
        got = W.lincomb_(out, x, y, coef)
    R.lincomb_(out_ref, x, y, coef)
    assert_bitwise(out, out_ref)  # elementwise: bit for bit
    assert got.dtype == torch.float32 and got.shape == (n,)
    close_reduction(got, own_sums(out), own_sums(out))


@given(
    specs=lists,
    cfg=config_spec,
    seed=seeds,
    init=st.booleans(),
    adaptive=st.booleans(),
    nan_grad=st.booleans(),
)
@SETTINGS
def test_ema_residual(specs, cfg, seed, init, adaptive, nan_grad):
    gen = torch.Generator().manual_seed(seed)
    grads, ema = make_list(specs, gen), make_list(specs, gen, shift=seed % 3)
    params = make_list(specs, gen, shift=1) if adaptive else []
    if nan_grad and grads[0].numel():  # the EMA keeps its value there; the residual is NaN
        grads[0][tuple(s // 2 for s in grads[0].shape)] = math.nan
    g2, e2 = clones(grads), clones(ema)
    kw = dict(sigma=0.9, lmbda=0.7, init=init, grad_scale=0.5, adaptive_eta=0.05 if adaptive else -1.0)
    with configured(*cfg):
        got = W.ema_residual_(grads, ema, params, **kw)
    R.ema_residual_(g2, e2, params, **kw)
    assert_bitwise(grads, g2, any_nan=nan_grad)
    assert_bitwise(ema, e2)
    weights = [p.double().abs() + 0.05 for p in params] if adaptive else None
    want = own_sums(grads, weights)
    close_reduction(got, want.float(), want)


def test_family_ops_default_geometry_over_capacity():
    """Over one launch's capacity (60 tensors at depth 3), a tensor of three chunks, misaligned ones."""
    gen = torch.Generator().manual_seed(3)
    specs = [(DTYPES[i % 4], 1 + (i * 37) % 300, i % 3, False) for i in range(70)]
    specs.insert(30, (torch.float32, 2 * CHUNK + 13, 1, False))
    x, y, out = make_list(specs, gen), make_list(specs, gen), make_list(specs, gen)
    coef = torch.rand(len(specs), 3, generator=gen)
    out_ref, x_ref = clones(out), clones(x)
    ema, ema_ref = make_list(specs, gen), None
    ema_ref = clones(ema)
    with configured():
        stats = W.dot_stats(x, y)
        sq = W.lincomb_(out, x, y, coef)
        stat = W.ema_residual_(x, ema, [], sigma=1.0, lmbda=0.9, init=False)
    close_reduction(stats, R.dot_stats(x_ref, y), R.dot_stats([t.abs() for t in x_ref], [t.abs() for t in y]))
    R.lincomb_(out_ref, x_ref, y, coef)
    assert_bitwise(out, out_ref)
    close_reduction(sq, own_sums(out).float(), own_sums(out))
    R.ema_residual_(x_ref, ema_ref, [], sigma=1.0, lmbda=0.9, init=False)
    assert_bitwise(x + ema, x_ref + ema_ref)
    close_reduction(stat, own_sums(x).float(), own_sums(x))


def test_family_ops_respect_their_schemas():
    gen = torch.Generator().manual_seed(4)
    specs = [(torch.float32, 37, 1, False), (torch.float64, 12, 0, True), (torch.float16, 0, 0, False)]

    def fresh():
        return make_list(specs, gen)

    coef = torch.rand(len(specs), 3, generator=gen)
    cases = [
        (W.dot_stats, (fresh(), fresh()), {}),
        (W.lincomb_, (fresh(), fresh(), fresh(), coef), {}),
        (W.lincomb_, (fresh(), fresh(), [], coef), {}),
        (W.ema_residual_, (fresh(), fresh(), fresh()), dict(sigma=1.0, lmbda=0.5, init=False, adaptive_eta=0.1)),
        (W.ema_residual_, (fresh(), fresh(), []), dict(sigma=1.0, lmbda=0.5, init=True)),
    ]
    for op, args, kwargs in cases:
        result = torch.library.opcheck(op.default, args, kwargs, test_utils=("test_schema",))
        assert result == {"test_schema": "SUCCESS"}, (op, result)
