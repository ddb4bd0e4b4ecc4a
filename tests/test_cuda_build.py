"""The CUDA build of fastperturb._C: registration, errors without a GPU, and,
where a GPU is present, the CUDA kernels against the reference.

These tests need a CUDA build of torch and an extension built with the CUDA
sources: .ci/cuda_build.sh makes both (no GPU needed) and runs this file with
FASTPERTURB_REQUIRE_CUDA_BUILD=1, which turns the skips below into failures.
Under the CPU torch of the normal test run they skip, saying why.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import fastperturb
from fastperturb import ops
from fastperturb.ops import dispatch as backends
from fastperturb.ops import native as _native
from fastperturb.ops import reference as R
from fastperturb.ops.names import HELPER_OPS, OPS

REQUIRE = os.environ.get("FASTPERTURB_REQUIRE_CUDA_BUILD") == "1"


def _unavailable(reason: str):
    if REQUIRE:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cuda_build():
    if torch.version.cuda is None:
        _unavailable("torch is a CPU build; the CUDA kernels are built and checked by .ci/cuda_build.sh")
    if _native.load_error is not None:
        _unavailable(f"fastperturb._C did not load: {_native.load_error}")
    if not _native.has_cuda_kernels():
        _unavailable("fastperturb._C was built without the CUDA sources (FASTPERTURB_CUDA=0, or no nvcc / CUDA_HOME)")


def test_ops_have_cuda_and_cpu_kernels(cuda_build):
    for name in (*OPS, *HELPER_OPS):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastperturb::{name}", "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastperturb::{name}", "CPU"), name


def test_handle_ops_have_cuda_kernels(cuda_build):
    """The ops on a TensorLists handle route by the handle's device (csrc/common/handle_kernels.h)."""
    assert set(fastperturb._C.handle_devices()) == {"cpu", "cuda"}


def _cuda_kernel(name):
    """The op's CUDA kernel itself, callable with any tensors (dispatch skipped)."""
    op = getattr(torch.ops.fastperturb, name).default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    return lambda *args, **kwargs: op.redispatch(keys, *args, **kwargs)


def test_cuda_kernels_reject_cpu_tensors_cleanly(cuda_build):
    """Reached with CPU tensors, every CUDA kernel checks and raises; nothing runs on a device."""
    a, b, c = [torch.ones(3)], [torch.ones(3)], [torch.ones(3)]
    calls = {
        "norms": lambda k: k(a, 2.0),
        "grad_stats_": lambda k: k(a, [], [], []),
        "ascent_step_": lambda k: k(a, b, c, torch.ones(1), torch.ones(1)),
        "restore_": lambda k: k(a, b),
        "combine_grads_": lambda k: k(a, b, 1.0),
        "dot_stats": lambda k: k(a, b),
        "lincomb_": lambda k: k(a, b, [], torch.ones(1, 3)),
        "ema_residual_": lambda k: k(a, b, [], sigma=1.0, lmbda=0.9, init=False),
        "restore_sgd_step_": lambda k: k(a, b, c, [], lr=0.1),
        "restore_adam_step_": lambda k: k(
            a, b, c, [torch.ones(3)], [torch.ones(3)], [], lr=0.1, beta1=0.9, beta2=0.9, eps=1e-8, step=1.0
        ),
        "ascent_coefficients": lambda k: k(
            torch.ones(1, 3), *[torch.ones(1, dtype=torch.float64)] * 2, global_scope=True, project=True
        ),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"CUDA kernels got .* on cpu; pass CUDA tensors"):
            call(_cuda_kernel(name))
    # the argument checks (shared with the CPU kernels) come first
    with pytest.raises(ValueError, match=r"backups\[0\] has shape"):
        _cuda_kernel("restore_")(a, [torch.ones(4)])
    eta = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"stats must have shape \(n, 3\)"):
        _cuda_kernel("ascent_coefficients")(torch.ones(1, 2), eta, eta, global_scope=False, project=True)
    with pytest.raises(ValueError, match=r"radius must be a dense tensor on stats's device \(cpu\), got meta"):
        _cuda_kernel("ascent_coefficients")(torch.ones(1, 3), eta, eta.to("meta"), global_scope=False, project=True)
    assert a[0].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: test_cuda_ops_match_the_reference runs")
def test_without_a_gpu_the_errors_are_clear(cuda_build):
    with pytest.raises(RuntimeError, match="NVIDIA driver|no CUDA GPUs|CUDA driver"):
        torch.ops.fastperturb.norms([torch.ones(3, device="cuda")], 2.0)
    with backends.use_backend("cuda"):
        with pytest.raises(backends.BackendUnavailable, match="runs on CUDA tensors"):
            ops.norms([torch.ones(3)])


# ---------------------------------------------------------------------------
# With a GPU: the kernels themselves.

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here: the CUDA kernels are only compiled")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def _list(gen, specs, kind="randn"):
    out = []
    for dtype, numel, offset in specs:
        if kind == "bits":
            info = torch.iinfo(BITS[dtype])
            buf = torch.randint(info.min, info.max, (numel + offset,), generator=gen, dtype=BITS[dtype]).view(dtype)
        else:
            buf = torch.randn(numel + offset, generator=gen, dtype=torch.float64).to(dtype)
        out.append(buf.cuda()[offset:])  # sliced on the device: misaligned starts
    return out


def _bits(t):
    return t.contiguous().view(BITS[t.dtype])


def _same(xs, ys):
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(xs, ys))


def _specs():
    # 115 tensors (over every launch's tensor capacity), mixed dtypes, sizes off
    # the vector width, misaligned starts, empty ones, one of 3 chunks
    specs = [(DTYPES[i % 4], (i * 37) % 300, i % 3) for i in range(114)]
    specs.insert(40, (torch.float32, 2 * 65536 + 13, 1))
    return specs


@GPU
def test_cuda_ops_match_the_reference(cuda_build):
    gen = torch.Generator().manual_seed(0)
    specs = _specs()
    ts = _list(gen, specs)
    for ord in (2.0, math.inf):
        per, total = torch.ops.fastperturb.norms(ts, ord)
        rper, rtotal = R.norms(ts, ord)
        torch.testing.assert_close(per, rper, rtol=3e-5, atol=0)
        torch.testing.assert_close(total, rtotal, rtol=3e-5, atol=0)
        again = torch.ops.fastperturb.norms(ts, ord)
        assert _same([per, total], list(again))  # deterministic
    grads, params, backups, accum = (_list(gen, specs) for _ in range(4))
    acc_ref = [a.clone() for a in accum]
    got = torch.ops.fastperturb.grad_stats_(grads, accum, params, backups, accum_weight=0.5, adaptive_eta=0.1)
    want = R.grad_stats_(grads, acc_ref, params, backups, accum_weight=0.5, adaptive_eta=0.1)
    # fp32 accumulation: within 3e-5 of the sum of the terms' magnitudes
    scale = torch.stack(
        [
            torch.stack(
                [
                    ((p.double().abs() + 0.1) * g.double()).square().sum(),
                    ((p.double() - b.double()) * g.double()).abs().sum(),
                    (p.double() - b.double()).square().sum(),
                ]
            )
            for g, p, b in zip(grads, params, backups)
        ]
    )
    assert torch.all((got.double() - want.double()).abs() <= 3e-5 * scale + 1e-30)
    assert _same(accum, acc_ref)
    n = len(specs)
    step, proj = torch.rand(n, device="cuda"), torch.rand(n, device="cuda") + 0.5
    for norm, first in (("l2", True), ("linf", False)):
        p2, g2, b2 = ([t.clone() for t in ls] for ls in (params, grads, backups))
        torch.ops.fastperturb.ascent_step_(
            params, grads, backups, step, proj, norm=norm, first=first, adaptive_eta=0.05
        )
        R.ascent_step_(p2, g2, b2, step, proj, norm=norm, first=first, adaptive_eta=0.05)
        assert _same(params + grads + backups, p2 + g2 + b2)
    g2 = [t.clone() for t in grads]
    torch.ops.fastperturb.combine_grads_(grads, accum, -0.5)
    R.combine_grads_(g2, accum, -0.5)
    assert _same(grads, g2)
    raw = _list(gen, specs, kind="bits")
    torch.ops.fastperturb.restore_(params, raw)
    assert _same(params, raw)


@GPU
@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 3000])
def test_cuda_ascent_coefficients_match_the_cpu_kernel(cuda_build, n):
    """One block: per-tensor results are the CPU kernel's bits (math.h), global sums within reduction order,
    reruns bit-identical; NaN/Inf and zero rows as on the CPU."""
    gen = torch.Generator().manual_seed(n)
    for dtype in (torch.float32, torch.float64):
        stats = (torch.rand(n, 3, generator=gen, dtype=torch.float64) - torch.tensor([0.0, 0.5, 0.0])).to(dtype)
        if n > 3:
            stats[0] = 0.0
            stats[1, 0], stats[2, 1] = math.nan, math.inf
        eta = torch.rand(n, generator=gen, dtype=torch.float64) * 0.1
        radius = eta * 0.9
        for glob in (False, True):
            for project in (False, True):
                args = (stats, eta, radius)
                got = torch.ops.fastperturb.ascent_coefficients(
                    *(t.cuda() for t in args), global_scope=glob, project=project
                )
                want = torch.ops.fastperturb.ascent_coefficients(*args, global_scope=glob, project=project)
                again = torch.ops.fastperturb.ascent_coefficients(
                    *(t.cuda() for t in args), global_scope=glob, project=project
                )
                assert _same(got, again)
                for g, w in zip(got, want):
                    assert g.device.type == "cuda" and g.dtype == torch.float32 and g.shape == (n,)
                    g = g.cpu()
                    if glob:
                        torch.testing.assert_close(g, w, rtol=1e-6, atol=0, equal_nan=True)
                    else:
                        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.nan_to_num(), w.nan_to_num())


@GPU
def test_cuda_matches_the_cpu_executor(cuda_build):
    """The GPU and the CPU executor of the same work list: element-wise ops bit for bit."""
    from harness import worklist_executor

    worklist_executor()
    gen = torch.Generator().manual_seed(1)
    specs = _specs()
    params, grads, backups = (_list(gen, specs) for _ in range(3))
    cpu = [[t.cpu() for t in ls] for ls in (params, grads, backups)]
    step, proj = torch.rand(len(specs)), torch.rand(len(specs))
    torch.ops.fastperturb.ascent_step_(params, grads, backups, step.cuda(), proj.cuda(), norm="linf", first=True)
    torch.ops.fastperturb_worklist.ascent_step_(*cpu, step, proj, norm="linf", first=True)
    assert _same([t.cpu() for t in params + grads + backups], cpu[0] + cpu[1] + cpu[2])
    per, total = torch.ops.fastperturb.norms(params, 2.0)
    cper, ctotal = torch.ops.fastperturb_worklist.norms(cpu[0], 2.0)
    torch.testing.assert_close(per.cpu(), cper, rtol=1e-5, atol=0)
    torch.testing.assert_close(total.cpu(), ctotal, rtol=1e-5, atol=0)


@GPU
def test_cuda_handle_ops_match_the_cuda_list_ops(cuda_build):
    """The handle ops on CUDA tensors (cached work-list plan) against the list ops on the same tensors: bit for
    bit; restore_norms_lists_ is restore_ then norms of the gradients."""

    gen = torch.Generator().manual_seed(2)
    specs = [(d, n, 0) for d, n, _ in _specs()]  # aligned: the one-pass restore + norms sums as norms does
    params, grads, backups, accum = (_list(gen, specs) for _ in range(4))
    for p, g in zip(params, grads):
        p.grad = g
    lists = ops.TensorLists(params, backups, accum, private_buffers=True)
    h = lists.handle
    F = torch.ops.fastperturb
    for ord in (2.0, math.inf):
        for a, b in zip(F.norms_lists(h, ord, of_grads=True), F.norms(grads, ord)):
            assert torch.equal(a, b)
    want = F.grad_stats_(grads, [], params, backups)
    assert torch.equal(F.grad_stats_lists_(h, with_accum=False, with_params=True, with_backups=True), want)
    twins = [[t.clone() for t in ls] for ls in (params, backups)]
    per, total = F.restore_norms_lists_(h, 2.0)
    F.restore_(*twins)
    assert _same(params, twins[0])
    wper, wtotal = F.norms(grads, 2.0)
    assert torch.equal(per, wper) and torch.equal(total, wtotal)


@GPU
def test_cuda_family_ops_match_the_reference(cuda_build):
    """dot_stats, lincomb_ and ema_residual_ on the GPU: written tensors bit for bit (NaN payloads aside),
    statistics within the reduction tolerance, deterministic, c0 == 0 never reading a NaN-filled out."""
    gen = torch.Generator().manual_seed(2)
    specs = _specs()
    n = len(specs)
    x, y = _list(gen, specs), _list(gen, specs)
    got = torch.ops.fastperturb.dot_stats(x, y)
    scale = torch.stack(
        [
            torch.stack([(a.double() ** 2).sum(), (a.double() * b.double()).abs().sum(), (b.double() ** 2).sum()])
            for a, b in zip(x, y)
        ]
    )
    assert torch.all((got.double() - R.dot_stats(x, y).double()).abs() <= 3e-5 * scale + 1e-30)
    assert _same([got], [torch.ops.fastperturb.dot_stats(x, y)])
    coef = torch.rand(n, 3, device="cuda")
    coef[::2, 0] = 0.0
    out = _list(gen, specs)
    for t in out[::2]:
        t.fill_(math.nan)
    ref = [t.clone() for t in out]
    sq = torch.ops.fastperturb.lincomb_(out, x, y, coef)
    R.lincomb_(ref, x, y, coef)
    assert _same(out, ref)
    own = torch.stack([(t.double() ** 2).sum() for t in out])
    assert torch.all((sq.double() - own).abs() <= 3e-5 * own + 1e-30)
    ema = _list(gen, specs)
    g2, e2 = [t.clone() for t in x], [t.clone() for t in ema]
    kw = dict(sigma=0.9, lmbda=0.8, init=False, grad_scale=0.5, adaptive_eta=0.05)
    stat = torch.ops.fastperturb.ema_residual_(x, ema, y, **kw)
    R.ema_residual_(g2, e2, y, **kw)
    assert _same(x + ema, g2 + e2)
    own = torch.stack([(((p.double().abs() + 0.05) * d.double()) ** 2).sum() for p, d in zip(y, x)])
    assert torch.all((stat.double() - own).abs() <= 3e-5 * own + 1e-30)
