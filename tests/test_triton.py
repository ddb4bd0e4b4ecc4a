"""The Triton backend (fastperturb.ops.triton), run by the Triton interpreter on CPU tensors.

The interpreter must be on before the kernels are defined, i.e. before
triton / fastperturb.ops.triton are first imported in the process. This module
sets ``TRITON_INTERPRET=1`` first thing, which is enough when pytest imports it
before anything imports triton (conftest.py does not). If some earlier module
of the same session already imported the kernels compiled-mode, every test
here is skipped with that reason; run this file in its own process, as the CI
does:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_triton.py

The interpreter runs each program instance in Python (milliseconds each), so
shapes are small and the chunk/block sizes are shrunk (``T.tuning``)
wherever a test wants tensors split over many chunks. The optimizer, error and
version-counter tests on this backend are in tests/test_triton_optim.py (same process). Cases and the reference
checker come from fastperturb.testing (shared with the other backends' tests).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import math  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastperturb import testing as FT  # noqa: E402
from fastperturb.ops import dispatch as backends  # noqa: E402
from fastperturb.ops import reference  # noqa: E402
from fastperturb.testing import Layer  # noqa: E402

try:
    from fastperturb.ops import triton as T
except ImportError as e:  # no triton, or no compiled extension to take the schemas from
    pytest.skip(f"fastperturb.ops.triton does not import: {e}", allow_module_level=True)

if not T.INTERPRETED:
    pytest.skip(
        "fastperturb.ops.triton was imported in this process before TRITON_INTERPRET=1 was set, so its "
        "kernels are compiled-mode and cannot run on CPU tensors; run this file in its own process: "
        "TRITON_INTERPRET=1 python -m pytest tests/test_triton.py",
        allow_module_level=True,
    )

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = torch.ops.fastperturb_triton
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# Small chunks so a few dozen elements already span several chunks and blocks.
SMALL = dict(chunk_size=32, block_size=8)

# Sizes around the small chunk (32) and block (8): every tail shape.
AWKWARD = [
    Layer((100,), F32),
    Layer((3, 5), F32),
    Layer((), F32),
    Layer((0,), F32),
    Layer((33,), BF16),
    Layer((65,), F16),
    Layer((17,), F64),
    Layer((2, 3, 2, 2), F32, True),
]


def check(op: str, x: FT.Inputs, **opts) -> None:
    FT.check_op(op, "triton", x, **opts)


def check_all_options(x: FT.Inputs, every: bool = True) -> None:
    for op in FT.OPS:
        grid = list(FT.option_grid(op))
        for opts in grid if every else [grid[0], grid[-1]]:
            check(op, x, **opts)


def assert_exact(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    # Bit for bit (signed zeros and denormals included), except inside a NaN: it must be
    # NaN on both sides, but its payload and sign come from torch's arithmetic in the
    # reference and from the kernels' own in Triton.
    for i, (a, e) in enumerate(zip(actual, expected)):
        nan = e.isnan()
        assert torch.equal(a.isnan(), nan), f"{what}[{i}]: NaN in different places"
        FT.assert_bitwise_equal(a.masked_fill(nan, 0), e.masked_fill(nan, 0), f"{what}[{i}]")


# ---------------------------------------------------------------------------
# Where it runs


def test_available_here_only_on_cpu():
    assert T.why_unavailable("cpu") is None
    assert backends.why_unavailable("triton", torch.device("cpu")) is None
    assert "TRITON_INTERPRET" in T.why_unavailable("cuda")
    assert "not mps" in T.why_unavailable("mps")


def test_tuning_rejects_bad_sizes():
    with pytest.raises(ValueError, match="power of two"):
        with T.tuning(chunk_size=48):
            pass
    with pytest.raises(ValueError, match="must not exceed"):
        with T.tuning(chunk_size=16, block_size=32):
            pass
    # a lane sums at most 64 elements in float before float64 (a lane of 256 overflowed a norm of 2e18s to inf)
    with pytest.raises(ValueError, match=r"chunk_size / block_size \(16384 / 64\) must not exceed 64"):
        with T.tuning(chunk_size=1 << 14, block_size=1 << 6):
            pass
    assert (T._Tuning.chunk_size, T._Tuning.block_size) == (1 << 14, 1 << 14)
    from fastperturb.ops.triton import runtime

    assert all(chunk // block <= runtime.LANE_RUN for chunk, block in runtime.DEFAULTS.values())


# ---------------------------------------------------------------------------
# Against the reference: the shared cases, every option of every op


CASES = {k: v for k, v in FT.standard_cases().items() if k != "many_small"}  # many tensors: see below


@pytest.mark.parametrize("case", sorted(CASES))
def test_standard_cases(case):
    # multi_chunk (~200k elements) is dominated by the reference's time: two options per op
    check_all_options(FT.make_inputs(CASES[case], seed=len(case)), every=case != "multi_chunk")


def test_awkward_sizes_over_many_chunks():
    with T.tuning(**SMALL):
        check_all_options(FT.make_inputs(AWKWARD, seed=1))


def test_special_values_over_many_chunks():
    # NaN, +-Inf, +-0, denormals in params and grads, away from the first chunk too
    with T.tuning(**SMALL):
        check_all_options(FT.make_inputs(AWKWARD, seed=2, grad_special=0.2, param_special=0.2))


def test_zero_grads():
    with T.tuning(**SMALL):
        check_all_options(FT.make_inputs(AWKWARD, seed=3, zero_grads=True))


@pytest.mark.parametrize("op", FT.OPS)
def test_element_results_bit_identical_to_reference(op):
    # Same formulas in the same order, one rounding per operation: the written
    # tensors match the reference bit for bit (NaN payloads aside), not just within ulps.
    x = FT.make_inputs(AWKWARD, seed=4, grad_special=0.05)
    for opts in FT.option_grid(op):
        args, kwargs = FT.op_args(op, x, **opts)
        with T.tuning(**SMALL):
            _, got = FT.run_op(op, "triton", args, kwargs)
        _, want = FT.run_op(op, "reference", args, kwargs)
        for k, (g, w) in enumerate(zip(got, want)):
            if isinstance(g, list):
                assert_exact(g, w, f"{op}({opts}) arg {k}")


# ---------------------------------------------------------------------------
# NaN / Inf


def test_linf_sign_of_nan_gradient():
    # sign() keeps NaN (torch.sign maps it to 0): a NaN gradient must not look like "no move".
    w, g = [torch.tensor([1.0, 2.0, 3.0])], [torch.tensor([math.nan, -1.0, 0.0])]
    b = [torch.empty(3)]
    OPS.ascent_step_(w, g, b, torch.tensor([0.1]), torch.tensor([1.0]), norm="linf", first=True)
    assert w[0][0].isnan() and w[0][1].item() == pytest.approx(1.9) and w[0][2].item() == 3.0
    assert torch.equal(b[0], torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("ord", [2.0, math.inf])
def test_norms_propagate_nan_and_inf(ord):
    ts = [torch.arange(100, dtype=torch.float32) / 7, torch.ones(40, dtype=F16), torch.full((5,), -3.0)]
    ts[0][77] = math.nan  # in the 3rd chunk of 32
    ts[1][35] = -math.inf  # in the 2nd chunk
    with T.tuning(**SMALL):
        per, total = OPS.norms(ts, ord)
        with_nan = OPS.norms(ts[:1], ord)[1]
        without_nan = OPS.norms(ts[1:], ord)[1]
    assert per[0].isnan() and per[1].isinf() and per[1] > 0
    want = 3.0 * math.sqrt(5.0) if ord == 2.0 else 3.0
    assert per[2].item() == pytest.approx(want, rel=1e-6)
    assert total.isnan() and with_nan.isnan()
    assert without_nan.isinf() and without_nan > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_finite_values_do_not_overflow_a_programs_lanes(dtype):
    """A program's lanes sum in float and were combined in float: a chunk of values near 1e18, whose squares are
    finite, overflowed to an inf norm where the reference's is 2.6e20 (found by this round's CUDA review; the CUDA
    blocks had the same flaw). Now combined in float64, as the CPU kernels' lanes. At the default tuning."""
    x = torch.full((1 << 16,), 1e18, dtype=torch.float32).to(dtype)
    per, total = OPS.norms([x, x[:9]], 2.0)
    rper, rtotal = reference.norms([x, x[:9]], 2.0)
    assert torch.isfinite(rtotal)  # (the case itself)
    torch.testing.assert_close(per, rper, rtol=1e-6, atol=0)
    torch.testing.assert_close(total, rtotal, rtol=1e-6, atol=0)


def test_grad_stats_propagates_nan_and_inf():
    g = [torch.ones(50), torch.ones(10)]
    g[0][45] = math.inf
    g[1][3] = math.nan
    w = [torch.ones(50), torch.ones(10)]
    with T.tuning(**SMALL):
        out = OPS.grad_stats_(g, [], w, [t.clone() for t in w])
    assert out[0, 0].isinf() and out[1, 0].isnan() and out[1, 1].isnan()
    assert out[0, 2] == 0 and out[1, 2] == 0


# ---------------------------------------------------------------------------
# Exact restore, determinism


def test_restore_is_bit_exact_after_a_cycle():
    x = FT.make_inputs(AWKWARD, seed=5, param_special=0.2, grad_special=0.1)
    original = [p.clone() for p in x.params]
    n = len(x.params)
    coef = torch.full((n,), 0.3)
    with T.tuning(**SMALL):
        OPS.ascent_step_(x.params, x.grads, x.backups, coef, coef, norm="l2", first=True)
        OPS.ascent_step_(x.params, x.grads, x.backups, coef, coef, norm="linf", first=False, adaptive_eta=0.1)
        OPS.restore_(x.params, x.backups)
    for p, o in zip(x.params, original):
        FT.assert_bitwise_equal(p, o, "restored")


def test_restore_copies_nan_payloads_and_signed_zeros():
    raw = torch.tensor([0x7FC00001, 0xFFA00000, 0x80000000, 0x00000001, 0x7F800000], dtype=torch.int64)
    b32 = raw.to(torch.int32).view(torch.float32)
    b16 = torch.tensor([0x7E01, -0x8000, 0x0001, 0x7C00], dtype=torch.int16)
    backups = [b32, b16.view(F16), b16.view(BF16), b32.double()]
    params = [torch.zeros_like(b) for b in backups]
    OPS.restore_(params, backups)
    for p, b in zip(params, backups):
        FT.assert_bitwise_equal(p, b, "restore_")


def test_reductions_are_deterministic_and_independent_of_the_rest_of_the_list():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(300, generator=gen) * 1e3
    others = [torch.randn(70, generator=gen), torch.randn(5, dtype=F16, generator=gen)]
    with T.tuning(**SMALL):
        alone = OPS.norms([a], 2.0)[0]
        among = OPS.norms([others[0], a, others[1]], 2.0)[0]
        again = OPS.norms([others[0], a, others[1]], 2.0)[0]
        s_alone = OPS.grad_stats_([a], [], [], [])
        s_among = OPS.grad_stats_([others[0], a, others[1]], [], [], [])
    assert torch.equal(alone[0], among[1]) and torch.equal(among, again)
    assert torch.equal(s_alone[0], s_among[1])


# ---------------------------------------------------------------------------
# O(1) launches


def _launches_per_op(layers):
    x = FT.make_inputs(layers, seed=7)
    counts = {}
    for op, opts in (
        ("norms", dict(ord=2.0)),
        ("grad_stats_", dict(accum="add", delta=True)),
        ("ascent_step_", dict(first=True, zero_grads=True)),
        ("restore_", {}),
        ("combine_grads_", dict(weight=0.5)),
    ):
        with T.count_launches() as c:
            check(op, x, **opts)  # also checks the results
        counts[op] = c.total
    return counts


def test_launches_do_not_grow_with_the_number_of_tensors():
    # numel a multiple of 8 and fresh (aligned) allocations: one vector-hinted group per dtype
    def mixed(n):
        return [Layer((i % 5 + 1, 8), (F32, BF16, F16)[i % 3]) for i in range(n)]

    few, many = _launches_per_op(mixed(3)), _launches_per_op(mixed(300))
    assert few == many
    # one launch per dtype present (3 here; restore_: per element size, 2 here), plus
    # the fixed-order reduction of the partials for norms / grad_stats_
    assert many == {"norms": 4, "grad_stats_": 4, "ascent_step_": 3, "restore_": 2, "combine_grads_": 3}


def test_at_most_two_launches_per_dtype():
    # Tensors whose pointers are not 16-byte aligned, or whose numel is not a
    # multiple of 16 bytes of elements, go to a second launch without the vector hints.
    x = FT.make_inputs([Layer((8,), F32), Layer((3,), F32), Layer((16,), F32)] * 20, seed=8)
    base = torch.zeros(1 + 8)
    x.params[0], x.grads[0], x.backups[0] = base[1:], torch.zeros(9)[1:], torch.zeros(9)[1:]  # misaligned views
    with T.count_launches() as c:
        check("ascent_step_", x, first=True)
        check("norms", x, ord=2.0)
    assert c.by_kernel == {"_ascent_kernel": 2, "_norms_kernel": 2, "_finalize_kernel": 1}


def test_one_dtype_one_launch():
    x = FT.make_inputs([Layer((8,), F32)] * 4, seed=8)
    with T.count_launches() as c:
        OPS.ascent_step_(x.params, x.grads, x.backups, torch.ones(4), torch.ones(4))
    assert c.total == 1 and c.by_kernel == {"_ascent_kernel": 1}


# ---------------------------------------------------------------------------
# Argument checks, empty calls, opcheck


def test_bad_arguments_raise_before_anything_is_written():
    x = FT.make_inputs([Layer((4,), F32), Layer((3,), F32)], seed=9)
    before = [p.clone() for p in x.params]
    with pytest.raises(ValueError, match="shape"):
        OPS.ascent_step_(x.params, x.grads, [x.backups[0], torch.zeros(5)], torch.ones(2), torch.ones(2))
    with pytest.raises(TypeError, match="dtype"):
        OPS.restore_(x.params, [x.backups[0], x.backups[1].double()])
    with pytest.raises(TypeError, match="supported"):
        OPS.norms([torch.ones(3, dtype=torch.int32)], 2.0)
    with pytest.raises(ValueError, match="step_coef"):
        OPS.ascent_step_(x.params, x.grads, x.backups, torch.ones(3), torch.ones(2))
    with pytest.raises(TypeError, match="dense"):  # dispatches to the CompositeExplicitAutograd impl
        OPS.norms([torch.eye(3).to_sparse()], 2.0)
    with pytest.raises(ValueError, match="one device"):  # a meta tensor: the shared fake impl checks too
        OPS.norms([torch.ones(2), torch.ones(2, device="meta")], 2.0)
    for p, b in zip(x.params, before):
        FT.assert_bitwise_equal(p, b, "untouched")


def test_calls_with_only_empty_lists():
    per, total = OPS.norms([], 2.0)
    assert per.shape == (0,) and total.item() == 0.0
    assert OPS.grad_stats_([], [], [], []).shape == (0, 3)
    OPS.restore_([], [])
    OPS.combine_grads_([], [], 1.0)
    OPS.ascent_step_([], [], [], torch.zeros(0), torch.zeros(0))


def _opcheck_args(op):
    x = FT.make_inputs([Layer((3, 4), F32), Layer((5,), F16), Layer((), BF16)], seed=10)
    opts = {
        "grad_stats_": dict(accum="add", delta=True, adaptive_eta=0.1),
        "ascent_step_": dict(first=False, adaptive_eta=0.1, zero_grads=True),
    }.get(op, {})
    return FT.op_args(op, x, **opts)


@pytest.mark.parametrize("op", FT.OPS)
def test_opcheck(op):
    args, kwargs = _opcheck_args(op)
    torch.library.opcheck(getattr(OPS, op).default, args, kwargs)


# ---------------------------------------------------------------------------
# The optimizer presets on this backend


def _train(make_opt, backend):
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = make_opt(model.parameters())

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with backends.use_backend(backend):
        for _ in range(2):
            opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("preset", ["SAM", "ASAM", "AWP", "APD-linf", "APD-l2-layer-relative"])
def test_presets_match_the_reference_backend(preset):
    import fastperturb.optim as O

    sgd = dict(lr=0.1, momentum=0.9)
    make = {
        "SAM": lambda ps: O.SAM(ps, torch.optim.SGD, rho=0.05, **sgd),
        "ASAM": lambda ps: O.ASAM(ps, torch.optim.SGD, rho=0.5, **sgd),
        "AWP": lambda ps: O.AWP(ps, torch.optim.SGD, gamma=1e-2, **sgd),
        "APD-linf": lambda ps: O.APD(ps, torch.optim.SGD, eps=1e-2, steps=2, norm="linf", **sgd),
        "APD-l2-layer-relative": lambda ps: O.APD(
            ps, torch.optim.SGD, eps=1e-2, steps=2, scope="layer", relative=True, **sgd
        ),
    }[preset]
    with T.count_launches() as c:
        got = _train(make, "triton")
    assert c.total > 0  # the Triton kernels did the work
    want = _train(make, "reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Properties


@st.composite
def small_layers(draw):
    n = draw(st.integers(1, 4))
    out = []
    for _ in range(n):
        shape = tuple(draw(st.lists(st.integers(0, 9), max_size=2)))
        out.append(Layer(shape, draw(st.sampled_from(FT.FLOAT_DTYPES))))
    return out


PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TUNINGS = st.sampled_from([dict(chunk_size=8, block_size=4), dict(chunk_size=16, block_size=16), SMALL])


@PROPERTY
@given(
    layers=small_layers(),
    tune=TUNINGS,
    seed=st.integers(0, 2**31 - 1),
    special=st.sampled_from([0.0, 0.1]),
    op=st.sampled_from(FT.OPS),
    pick=st.integers(0, 100),
)
def test_property_matches_reference(layers, tune, seed, special, op, pick):
    grid = list(FT.option_grid(op))
    x = FT.make_inputs(layers, seed=seed, grad_special=special)
    with T.tuning(**tune):
        check(op, x, **grid[pick % len(grid)])


@PROPERTY
@given(
    layers=small_layers(),
    tune=TUNINGS,
    seed=st.integers(0, 2**31 - 1),
    norm=st.sampled_from(["l2", "linf"]),
    eta=st.sampled_from([-1.0, 0.0, 0.5]),
    steps=st.integers(1, 3),
)
def test_property_cycle_restores_exactly(layers, tune, seed, norm, eta, steps):
    x = FT.make_inputs(layers, seed=seed, grad_special=0.1, param_special=0.1)
    original = [p.clone() for p in x.params]
    n = len(layers)
    step, proj = torch.rand(n) * 0.1, torch.rand(n) + 0.5
    with T.tuning(**tune):
        for k in range(steps):
            OPS.ascent_step_(x.params, x.grads, x.backups, step, proj, norm=norm, first=k == 0, adaptive_eta=eta)
        OPS.restore_(x.params, x.backups)
    for p, o in zip(x.params, original):
        FT.assert_bitwise_equal(p, o, "restored")


# ---------------------------------------------------------------------------
# The same kernels compiled for a GPU (no GPU needed to compile)


def _nvidia_toolchain() -> str | None:
    import triton

    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return None if ptxas.exists() else f"triton's nvidia backend has no ptxas at {ptxas}"


COMPILE_CHECK = """
import re
from triton.backends.compiler import GPUTarget
import fastperturb.ops.triton as T
assert "TRITON_INTERPRET" in T.why_unavailable("cpu")
assert T.why_unavailable("cuda") is not None  # no GPU on the machines that run this
done = T.compile_all(GPUTarget("cuda", 80, 32), exhaustive=False)
for name, constexprs, k in done:
    ptx = k.asm["ptx"]
    assert k.asm["cubin"], name
    assert k.metadata.num_warps == T.NUM_WARPS, (name, k.metadata.num_warps)  # pinned: it sets the reduction order
    # enable_fp_fusion=False: no mul+add contracted into an FMA (rounding as math.h / the interpreter)
    assert not re.search(r"\\bfma\\.", ptx), (name, constexprs)
    # the vector hints give 128-bit loads
    if constexprs.get("VEC", 1) > 1:
        assert re.search(r"ld\\.global\\.v[24]\\.", ptx), (name, constexprs)
    # Adam's step: division and square root IEEE-rounded (div_rn / sqrt_rn in float32), as torch's and math.h's
    if name == "_adam_step_kernel":
        assert ".approx." not in ptx and "div.full" not in ptx, constexprs
        assert re.search(r"div\\.rn\\.f(32|64)", ptx) and re.search(r"sqrt\\.rn\\.f(32|64)", ptx), constexprs
    # ascent_coefficients: float64 division and square root IEEE-rounded, results rounded to nearest into float32
    # (math.h's operations, the reference's)
    if name == "_coefficients_kernel":
        assert "div.rn.f64" in ptx and "sqrt.rn.f64" in ptx and ".approx." not in ptx, constexprs
        assert "cvt.rn.f32.f64" in ptx and not re.search(r"cvt\\.r[zmp]\\.f32\\.f64", ptx), constexprs
print(len(done))
"""


def test_kernels_compile_for_sm80_with_vector_loads_and_no_fma():
    # Every static branch of every kernel, lowered to PTX and cubin by triton's
    # bundled ptxas (no GPU needed), in a process without the interpreter.
    reason = _nvidia_toolchain()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", COMPILE_CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert int(run.stdout.split()[-1]) == sum(1 for _ in T.specializations(exhaustive=False))


def test_reference_is_the_spec_used_here():
    # guard against testing the backend against itself
    assert FT.reference is reference


# The same hypothesis cases as the CPU kernels (tests/strategies.py), every op and
# option, with the interpreter's default (large) chunks: a few examples, as each
# interpreted program instance costs milliseconds.
from strategies import layers as cpu_layers  # noqa: E402
from strategies import seeds as cpu_seeds


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cpu_layers(max_len=4), cpu_seeds)
@example(  # a lone subnormal gradient in a 0-dim tensor: its float32 square underflows (check_op's bound)
    layer_list=[Layer((1023,), F32), Layer((16,), F32), Layer((3, 5, 2), F32), Layer((), F32)], seed=63990
)
def test_same_cases_as_cpu_kernels(layer_list, seed):
    x = FT.make_inputs(layer_list, seed=seed, grad_special=0.02)
    for op in FT.OPS:
        for opts in FT.option_grid(op):
            FT.check_op(op, "triton", x, **opts)


# ---- the ops on a TensorLists handle (fastperturb/ops/lists.py): cached plans ------------------------------


def _handle_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes, dtypes = [(40,), (3, 5), (1,), (0,), (70,)], [F32, BF16, F64, F32, F16]
    params = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    backups = [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]
    accum = [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]
    return params, backups, accum


def _twins():
    a = _handle_case()
    b = tuple([t.clone() for t in ts] for ts in a)
    for x, y in zip(a[0], b[0]):
        y.grad = x.grad.clone()
    return a, b


def _twins_stepping(seed: int):
    """:func:`_twins`, the ascent's per-tensor coefficients and a generator for new gradients."""
    a, b = _twins()
    n = len(a[0])
    return a, b, torch.linspace(0.01, 0.1, n), torch.linspace(0.5, 1.0, n), torch.Generator().manual_seed(seed)


def _same_bits(xs, ys):
    return all(torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)) for x, y in zip(xs, ys))


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("private", [False, True])
def test_handle_ops_equal_list_ops_bit_for_bit(norm, private):
    from fastperturb import ops

    (p1, b1, a1), (p2, b2, a2) = _twins()
    n = len(p1)
    step, proj = torch.linspace(0.01, 0.1, n), torch.linspace(0.5, 1.0, n)
    with backends.use_backend("triton"), T.tuning(**SMALL):
        lists = ops.TensorLists(p2, b2, a2, private_buffers=private)
        versions = [a._version for a in a2]
        for first in (True, False):
            s1 = ops.grad_stats_([p.grad for p in p1], a1, p1, b1, accum_weight=0.5)
            s2 = ops.grad_stats_lists_(lists, with_accum=True, with_params=True, with_backups=True, accum_weight=0.5)
            assert torch.equal(s1, s2) and _same_bits(a1, a2)
            # what the op writes is bumped, private or not
            assert all(a._version > v for a, v in zip(a2, versions))
            versions = [a._version for a in a2]
            ops.ascent_step_(p1, [p.grad for p in p1], b1, step, proj, norm=norm, first=first)
            ops.ascent_step_lists_(lists, step, proj, norm=norm, first=first)
            assert _same_bits(p1, p2) and _same_bits(b1, b2)
        for o in (2.0, math.inf):
            for x, y in zip(ops.norms(p1, o), ops.norms_lists(lists, o)):
                assert torch.equal(x, y)
            for x, y in zip(ops.norms([p.grad for p in p1], o), ops.norms_lists(lists, o, of_grads=True)):
                assert torch.equal(x, y)
        for p in p2:  # new gradient tensors: the plan's pointers follow them
            p.grad = p.grad.clone() * 2
        for x, y in zip(ops.norms([p.grad for p in p2], 2.0), ops.norms_lists(lists, 2.0, of_grads=True)):
            assert torch.equal(x, y)
        for p in p2:
            p.grad = p.grad / 2
        # the restore in the pass that reads G: restore_ and the gradients' norms, bit for bit, twice (the
        # second on the cached plan)
        perturbed = [p.clone() for p in p2]
        for o in (2.0, math.inf):
            want = ops.norms([p.grad for p in p2], o)
            got = ops.restore_norms_lists_(lists, o)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert _same_bits(p2, b2)
            torch._foreach_copy_(p2, perturbed)
        held, p2[1].grad = p2[1].grad, None  # refused before the launch: nothing restored
        with pytest.raises(TypeError, match=r"restore_norms_lists_: params\[1\]\.grad is None"):
            ops.restore_norms_lists_(lists)
        assert _same_bits(p2, perturbed)
        p2[1].grad = held
        ops.combine_grads_([p.grad for p in p1], a1, 0.25)
        ops.combine_grads_lists_(lists, 0.25)
        assert _same_bits([p.grad for p in p1], [p.grad for p in p2])
        ops.restore_(p1, b1)
        ops.restore_lists_(lists)
        assert _same_bits(p1, p2) and _same_bits(p2, b2)


def test_handle_plan_is_built_once_and_only_the_scalars_change():
    from fastperturb import ops

    (p1, b1, a1), (p2, b2, a2) = _twins()
    with backends.use_backend("triton"), T.tuning(**SMALL):
        lists = ops.TensorLists(p2, b2, a2)
        ops.grad_stats_lists_(lists, with_accum=True, accum_weight=1.0, accum_init=True)
        (key,) = lists.plans
        plan = lists.plans[key]
        buf = plan.buf
        ops.grad_stats_([p.grad for p in p1], a1, accum_weight=1.0, accum_init=True)
        for w in (0.5, -2.0):  # new scalars, same plan and buffer
            s1 = ops.grad_stats_([p.grad for p in p1], a1, accum_weight=w)
            s2 = ops.grad_stats_lists_(lists, with_accum=True, accum_weight=w)
            assert torch.equal(s1, s2) and _same_bits(a1, a2)
            assert lists.plans[key] is plan and plan.buf is buf
        with T.tuning(chunk_size=16, block_size=8):  # other sizes: another plan
            ops.grad_stats_lists_(lists, with_accum=True, accum_weight=0.5)
        assert len(lists.plans) == 2


def test_handle_plan_follows_gradients_that_moved():
    from fastperturb import ops

    (p1, b1, a1), (p2, b2, a2), step, proj, g = _twins_stepping(seed=7)
    with backends.use_backend("triton"), T.tuning(**SMALL):
        lists = ops.TensorLists(p2, b2, a2)
        ops.grad_stats_lists_(lists)
        ops.ascent_step_lists_(lists, step, proj, first=True)
        ops.restore_lists_(lists)
        plans = dict(lists.plans)
        for x, y in zip(p1, p2):
            y.data.copy_(x)
        for _ in range(2):
            for x, y in zip(p1, p2):  # zero_grad(set_to_none=True), then a backward: new gradient tensors
                x.grad = torch.randn(x.shape, generator=g).to(x.dtype)
                y.grad = x.grad.clone()
            # the same plans, their gradient pointers rewritten
            got = ops.grad_stats_lists_(lists)
            assert torch.equal(got, ops.grad_stats_([p.grad for p in p1]))
            ops.ascent_step_(p1, [p.grad for p in p1], b1, step, proj, first=True)
            ops.ascent_step_lists_(lists, step, proj, first=True)
            assert _same_bits(p1, p2) and _same_bits(b1, b2)
            ops.combine_grads_([p.grad for p in p1], a1, 0.5)
            ops.combine_grads_lists_(lists, 0.5)
            assert _same_bits([p.grad for p in p1], [p.grad for p in p2])
            ops.restore_(p1, b1)
            ops.restore_lists_(lists)
            assert all(lists.plans[k] is plan for k, plan in plans.items())


def test_handle_call_uploads_new_gradients_and_new_scalars_together(monkeypatch):
    """On a GPU an upload is an asynchronous copy from pinned memory, and writing the host copy again waits for it
    (host_writable), behind everything the stream holds (a backward pass). A call with new gradient tensors and
    new scalars writes both, then uploads once: one wait (for an earlier call's upload), before any write."""
    from fastperturb import ops
    from fastperturb.ops.triton import plan as P

    events = []
    upload, wait = P.Plan.upload, P.Plan.host_writable
    monkeypatch.setattr(P.Plan, "upload", lambda self: (events.append("upload"), upload(self))[1])
    monkeypatch.setattr(P.Plan, "host_writable", lambda self: (events.append("wait"), wait(self))[1])
    (p1, b1, a1), (p2, b2, a2), step, proj, g = _twins_stepping(seed=3)
    with backends.use_backend("triton"), T.tuning(**SMALL):
        lists = ops.TensorLists(p2, b2, a2)
        ops.grad_stats_lists_(lists, with_accum=True, accum_weight=1.0, accum_init=True)
        ops.ascent_step_lists_(lists, step, proj, first=True, adaptive_eta=0.1)
        ops.combine_grads_lists_(lists, 0.5)
        ops.grad_stats_([p.grad for p in p1], a1, accum_weight=1.0, accum_init=True)
        ops.ascent_step_(p1, [p.grad for p in p1], b1, step, proj, first=True, adaptive_eta=0.1)
        ops.combine_grads_([p.grad for p in p1], a1, 0.5)

        def new_grads():
            for x, y in zip(p1, p2):
                x.grad = torch.randn(x.shape, generator=g).to(x.dtype)
                y.grad = x.grad.clone()

        new_grads()
        events.clear()
        got = ops.grad_stats_lists_(lists, with_accum=True, accum_weight=0.25)
        assert events == ["wait", "upload"]
        assert torch.equal(got, ops.grad_stats_([p.grad for p in p1], a1, accum_weight=0.25)) and _same_bits(a1, a2)
        new_grads()
        events.clear()
        ops.ascent_step_lists_(lists, step, proj, first=True, adaptive_eta=0.2)
        assert events == ["wait", "upload"]
        ops.ascent_step_(p1, [p.grad for p in p1], b1, step, proj, first=True, adaptive_eta=0.2)
        assert _same_bits(p1, p2) and _same_bits(b1, b2)
        new_grads()
        events.clear()
        ops.combine_grads_lists_(lists, 0.75)
        assert events == ["wait", "upload"]
        ops.combine_grads_([p.grad for p in p1], a1, 0.75)
        assert _same_bits([p.grad for p in p1], [p.grad for p in p2])


def test_handle_plan_rebuilt_when_a_new_gradient_is_misaligned():
    from fastperturb import ops

    shapes = [(40,), (64,), (3,)]
    params = [torch.randn(s) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape)
    with backends.use_backend("triton"), T.tuning(**SMALL):
        lists = ops.TensorLists(params)
        ops.grad_stats_lists_(lists)
        (key,) = lists.plans
        plan = lists.plans[key]
        assert plan.grad_codes[1].item() & 1  # 64 float32: aligned, 16-byte loads assumed
        # a gradient 4 bytes off 16-byte alignment (a view at offset 1): the plan cannot keep its row
        params[1].grad = torch.randn(65)[1:]
        got = ops.grad_stats_lists_(lists)
        assert lists.plans[key] is not plan and not lists.plans[key].grad_codes[1].item() & 1
        assert torch.equal(got, ops.grad_stats_([p.grad for p in params]))


@pytest.mark.parametrize(
    "change",
    [
        lambda p: setattr(p, "data", p.data.view(torch.int32)),  # same pointer and shape, other dtype
        lambda p: p.as_strided_((36,), (1,), 4),  # other offset
        lambda p: p.untyped_storage().resize_(4 * 400),  # same StorageImpl, new memory
        lambda p: p.resize_(20),  # same pointer, smaller
    ],
)
def test_handle_refuses_a_tensor_changed_in_place_before_launching(change):
    from fastperturb import ops

    params, backups, _ = _handle_case()
    with backends.use_backend("triton"), T.tuning(**SMALL):
        lists = ops.TensorLists(params, backups)
        step, proj = torch.ones(5), torch.ones(5)
        ops.ascent_step_lists_(lists, step, proj, first=True)
        ops.restore_lists_(lists)
        change(params[0])  # float32, shape (40,)
        versions = [p._version for p in params]
        for call in (lambda: ops.restore_lists_(lists), lambda: ops.ascent_step_lists_(lists, step, proj)):
            with T.count_launches() as c, pytest.raises(ValueError, match=r"params\[0\] changed since"):
                call()
            assert c.total == 0 and [p._version for p in params] == versions


def test_handle_refuses_a_changed_gradient_before_launching():
    from fastperturb import ops

    params, backups, _ = _handle_case()
    with backends.use_backend("triton"), T.tuning(**SMALL):
        lists = ops.TensorLists(params, backups)
        ops.ascent_step_lists_(lists, torch.ones(5), torch.ones(5), first=True)
        versions = [p._version for p in params] + [b._version for b in backups]
        pointers = lists.plans[next(iter(lists.plans))].host.clone()
        p = params[4]  # float16, shape (70,)
        p.grad_dtype = None  # (torch refuses a gradient of another dtype unless told)

        def set_grad(g):
            p.grad = None
            p.grad = g

        cases = [  # (torch refuses to assign a gradient of another shape, not to resize one)
            (lambda: set_grad(None), TypeError, r"params\[4\]\.grad is None"),
            (lambda: set_grad(torch.zeros(70, dtype=F16)) or p.grad.resize_(71), ValueError, r"\]\.grad has shape"),
            (lambda: set_grad(torch.zeros(70, dtype=F32)), TypeError, r"params\[4\]\.grad has dtype"),
            (lambda: set_grad(torch.zeros(140, dtype=F16)[::2]), ValueError, r"params\[4\]\.grad has strides"),
            (lambda: set_grad(torch.zeros(70, dtype=F16).to_sparse()), TypeError, r"params\[4\]\.grad is a"),
        ]
        for change, error, message in cases:
            change()
            with T.count_launches() as c, pytest.raises(error, match=message):
                ops.ascent_step_lists_(lists, torch.ones(5), torch.ones(5), first=True)
            assert c.total == 0
            # nothing bumped, and the plan's pointers untouched (the new ones are written only once all passed)
            assert [p._version for p in params] + [b._version for b in backups] == versions
            assert torch.equal(lists.plans[next(iter(lists.plans))].host, pointers)


def test_handle_refuses_a_tensor_that_changed_before_launching():
    from fastperturb import ops

    params, backups, _ = _handle_case()
    with backends.use_backend("triton"), T.tuning(**SMALL):
        lists = ops.TensorLists(params, backups)
        ops.restore_lists_(lists)
        params[0].data = torch.zeros(40)
        with T.count_launches() as c, pytest.raises(ValueError, match=r"params\[0\] changed since"):
            ops.restore_lists_(lists)
        assert c.total == 0 and torch.equal(params[0], torch.zeros(40))


def test_the_host_benchmark_times_every_op_and_leaves_the_launches_real():
    # benchmarks/triton_host.py (the README's Triton host figures): tiny sizes, every record present
    from benchmarks import triton_host
    from fastperturb.ops.triton import coefficient_impls, impls, runtime

    recs = triton_host.measure(n=3, numel=5, reps=1, rounds=1)
    ops_seen = {r["op"] for r in recs}
    assert {"restore_", "grad_stats_", "ascent_step_", "norms", "ascent_coefficients (proj)"} <= ops_seen
    assert all(r["min_us"] > 0 and r["launches_per_call"] >= 1 for r in recs), recs
    assert {r["call"] for r in recs if r["op"] == "norms"} == {"lists", "handle", "checked", "new .grad"}
    assert [r["launches_per_call"] for r in recs if r["op"].startswith("ascent_coefficients")] == [1, 1]
    assert impls.launch is runtime.launch and coefficient_impls.launch is runtime.launch


def test_a_cached_plan_used_on_another_stream_waits_for_its_last_one(monkeypatch):
    """A cached plan's device buffer and partials are rewritten by the call that reuses it, while its last call's
    kernels may still read them. On a GPU that is safe on one stream and a race across two unless the new stream
    waits for the old one (plan.order_after). Its logic, with stand-in streams (no GPU here), and every call on a
    cached plan following its stream before it writes or uploads anything."""
    from fastperturb import ops
    from fastperturb.ops.triton import plan as P

    class Stream:
        def __init__(self, name):
            self.name, self.waited = name, []

        def wait_stream(self, other):
            self.waited.append(other.name)

    a, b = Stream("a"), Stream("b")
    assert P.order_after(None, a) is a and a.waited == []
    assert P.order_after(a, a) is a and a.waited == []
    assert P.order_after(a, b) is b and b.waited == ["a"] and a.waited == []
    assert P.order_after(b, a) is a and a.waited == ["b"]

    events = []
    for name in ("follow_stream", "upload", "host_writable"):
        real = getattr(P.Plan, name)
        monkeypatch.setattr(
            P.Plan, name, lambda self, *a, real=real, name=name, **k: (events.append(name), real(self, *a, **k))[1]
        )
    (p1, b1, a1), (p2, b2, a2), step, proj, g = _twins_stepping(seed=4)
    with backends.use_backend("triton"), T.tuning(**SMALL):
        lists = ops.TensorLists(p2, b2, a2)
        calls = [
            lambda: ops.grad_stats_lists_(lists, with_accum=True, accum_weight=1.0, accum_init=True),
            lambda: ops.ascent_step_lists_(lists, step, proj, first=True, adaptive_eta=0.1),
            lambda: ops.combine_grads_lists_(lists, 0.5),
            lambda: ops.restore_lists_(lists),
            lambda: ops.norms_lists(lists),
        ]
        for call in calls:
            call()  # builds the plan (its first upload follows the stream too)
            assert events[0] == "follow_stream", events
            for x in p2:
                x.grad = torch.randn(x.shape, generator=g).to(x.dtype)  # a moved gradient: the reuse uploads
            events.clear()
            call()
            assert events and events[0] == "follow_stream", events
            events.clear()


def test_ops_on_a_launch_plan_refuse_cuda_graph_capture_and_are_tagged_for_inductor(monkeypatch):
    """A launch plan is uploaded from pinned host memory at every call: a CUDA graph replaying that copy would read
    another call's plan. The ops refuse to be captured (no GPU here: the check with torch's capture flag forced),
    before anything is written, and are tagged cudagraph_unsafe so that torch.compile(mode="reduce-overhead")
    runs them outside its graphs. ascent_coefficients has no plan and stays capturable."""
    from fastperturb.ops import pure
    from fastperturb.ops.names import HELPER_OPS, OPS
    from fastperturb.ops.triton import plan as P

    ns = getattr(torch.ops, T.NAMESPACE)
    for name in (*OPS, pure.NAME):  # (grad_stats: the non-mutating twin torch.compile calls, on the same plans)
        assert torch.Tag.cudagraph_unsafe in getattr(ns, name).default.tags, name
    for name in HELPER_OPS:
        assert torch.Tag.cudagraph_unsafe not in getattr(ns, name).default.tags, name

    capturing = {"now": False}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["now"])
    P.refuse_capture(torch.device("cuda"))
    P.refuse_capture(torch.device("cpu"))
    capturing["now"] = True
    P.refuse_capture(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph.*outside the graph"):
        P.refuse_capture(torch.device("cuda"))

    from fastperturb import ops

    seen = []
    monkeypatch.setattr(P, "refuse_capture", lambda device: seen.append(device.type))
    params = [torch.randn(5), torch.randn(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    with backends.use_backend("triton"):
        ops.restore_(params, [p.clone() for p in params])
        assert seen == ["cpu"]  # a list op's plan asks as it is made
        lists = ops.TensorLists(params, [p.clone() for p in params], [])
        ops.restore_lists_(lists)
        ops.restore_lists_(lists)
        ops.norms_lists(lists, of_grads=True)
        ops.norms_lists(lists, of_grads=True)
        assert seen == ["cpu"] * 5  # a handle's plans ask as they are made and at every reuse


def test_gradients_laid_out_differently_only_in_size_one_dimensions_are_taken():
    """A ``.grad`` whose strides differ from its tensor's only where a dimension has size 1 (autograd makes them: a
    depthwise conv's weight under channels_last input) walks its memory in the same order: the list ops and the
    handle ops take it and compute what they compute on the same values laid out like the tensor."""
    from fastperturb import ops

    g_p = torch.randn(4, 3, 3, 1).permute(0, 3, 1, 2)  # strides (9, 1, 3, 1) against the tensor's (9, 9, 3, 1)
    g_q = torch.randn(1, 5).t()  # strides (1, 5) against (1, 1)
    out = []
    for relayout in (False, True):
        torch.manual_seed(0)
        params = [torch.randn(4, 1, 3, 3), torch.randn(5, 1)]
        for t, g in zip(params, (g_p, g_q)):
            t.grad = torch.empty_like(t).copy_(g) if relayout else g
        backups = [torch.zeros_like(t) for t in params]
        with backends.use_backend("triton"), T.tuning(**SMALL):
            listed = ops.grad_stats_([t.grad for t in params], [], params, [])
            lists = ops.TensorLists(params, backups)
            handled = ops.grad_stats_lists_(lists, with_params=True)
            ops.ascent_step_lists_(lists, torch.full((2,), 0.1), torch.ones(2), first=True)
        out.append((listed, handled, params))
    (l1, h1, p1), (l2, h2, p2) = out
    assert torch.equal(l1, l2) and torch.equal(h1, h2) and _same_bits(p1, p2)
