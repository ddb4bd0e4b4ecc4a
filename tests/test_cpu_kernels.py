"""The CPU kernels' own code paths, at the sizes and alignments where they switch.

The C++ loops (csrc/cpu/loops.h) write a chunk's write-only outputs (the backup of
``ascent_step_(first=True)``, zeroed gradients, an initialised accumulator, ``restore_``'s
copy) with streaming stores from 64 KB per chunk on, through an aligned body and
memcpy'd head and tail; accumulators are updated per block of 1024 elements after
the block's reduction; tensors are cut into chunks of 65536 elements. These tests
run lengths on both sides of each of those sizes, in every dtype, on tensors whose
data starts off the 16-byte alignment, inside larger buffers whose neighbouring
elements must stay untouched; every result is compared with the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastperturb import ops, testing
from fastperturb.ops.dispatch import use_backend
from fastperturb.testing import assert_bitwise_equal

from harness import cpu_plan

STREAM_MIN_BYTES = 64 * 1024  # kStreamMinBytes in csrc/cpu/kernels.h
BLOCK = 1024  # kBlock in csrc/cpu/loops.h
CHUNK = 65536  # kChunk in csrc/cpu/plan.h
PAD = 5  # sentinel elements on each side of every tensor
SENTINEL = 7.0


def _lengths(dtype: torch.dtype) -> list[int]:
    stream = STREAM_MIN_BYTES // torch.empty((), dtype=dtype).element_size()
    return sorted({7, BLOCK + 1, stream - 1, stream + BLOCK + 3, CHUNK + 9})


def _embedded(x: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of x at element ``offset`` of a sentinel-filled buffer: (the buffer, the view)."""
    buf = torch.full((x.numel() + 2 * PAD,), SENTINEL, dtype=x.dtype)
    view = buf[offset : offset + x.numel()]
    view.copy_(x)
    return buf, view


def _assert_sentinels(buf: torch.Tensor, offset: int, n: int, what: str) -> None:
    outside = torch.cat([buf[:offset], buf[offset + n :]])
    assert bool((outside == SENTINEL).all()), f"{what}: wrote outside the tensor"


def _case(dtype: torch.dtype, n: int, offset: int) -> None:
    x = testing.make_inputs([testing.Layer((n,), dtype)], seed=n + offset, grad_special=0.01, param_special=0.01)
    tol = testing.ELEMENT_TOL[dtype]
    names = ("params", "grads", "backups", "accum")
    src = {k: getattr(x, k)[0] for k in names}
    tag = f"{dtype} n={n} offset={offset}"

    # ascent_step_(first=True, zero_grads=True): backup = old params bit for bit, grads = +0
    bufs, views = {}, {}
    for k in names:
        bufs[k], views[k] = _embedded(src[k], offset)
    coef, proj = torch.tensor([0.05]), torch.tensor([0.9])
    with use_backend("cpp"):
        ops.ascent_step_(
            [views["params"]], [views["grads"]], [views["backups"]], coef, proj, first=True, zero_grads=True
        )
    want_p, want_g, want_b = src["params"].clone(), src["grads"].clone(), torch.empty_like(src["params"])
    with use_backend("reference"):
        ops.ascent_step_([want_p], [want_g], [want_b], coef, proj, first=True, zero_grads=True)
    assert_bitwise_equal(views["backups"], src["params"], f"{tag} backup")
    assert_bitwise_equal(views["grads"], torch.zeros_like(src["grads"]), f"{tag} zeroed grads")
    torch.testing.assert_close(views["params"], want_p, equal_nan=True, **tol)
    for k in names:
        _assert_sentinels(bufs[k], offset, n, f"{tag} ascent_step_ {k}")

    # restore_: the params come back bit for bit
    with use_backend("cpp"):
        ops.restore_([views["params"]], [views["backups"]])
    assert_bitwise_equal(views["params"], src["params"], f"{tag} restore_")
    _assert_sentinels(bufs["params"], offset, n, f"{tag} restore_")

    # grad_stats_ with an accumulator, initialised and added to, with and without delta statistics
    for init in (True, False):
        for delta in (False, True):
            gbuf, g = _embedded(src["grads"], offset)
            abuf, acc = _embedded(src["accum"], offset)
            want_acc = src["accum"].clone()
            extra = ([src["params"]], [src["backups"]]) if delta else ([], [])
            kw = dict(accum_weight=0.3, accum_init=init)
            with use_backend("cpp"):
                got = ops.grad_stats_([g], [acc], *extra, **kw)
            with use_backend("reference"):
                want = ops.grad_stats_([src["grads"].clone()], [want_acc], *extra, **kw)
            what = f"{tag} grad_stats_(init={init}, delta={delta})"
            torch.testing.assert_close(acc, want_acc, equal_nan=True, **tol, msg=lambda m: f"{what} accum: {m}")
            assert got.shape == want.shape and bool(torch.equal(got.isnan(), want.isnan())), what
            assert_bitwise_equal(g, src["grads"], f"{what} grads untouched")
            _assert_sentinels(abuf, offset, n, f"{what} accum")
            _assert_sentinels(gbuf, offset, n, f"{what} grads")


@pytest.mark.parametrize("dtype", testing.FLOAT_DTYPES, ids=str)
def test_kernels_around_stream_block_and_chunk_sizes(native, dtype):
    for n in _lengths(dtype):
        _case(dtype, n, PAD - 1)  # element 4 of a 64-byte-aligned buffer is never 16-byte aligned
    _case(dtype, CHUNK + 9, PAD)


@pytest.mark.slow
def test_portable_variant_streams_too(native):
    """The streaming paths on the portable kernel variant (the AVX2 one runs in-process when the CPU has it):
    per dtype, a length past the streaming threshold with a partial block, off the 16-byte alignment; and the
    fused-step kernels' streamed weights."""
    if native.cpu_isa == "default":
        pytest.skip("the in-process tests already ran the portable variant")
    script = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from fastperturb import _C, testing\n"
        "import test_cpu_kernels as t\n"
        "assert _C.cpu_isa == 'default', _C.cpu_isa\n"
        "for dt in testing.FLOAT_DTYPES:\n"
        "    t._case(dt, t._lengths(dt)[-2], t.PAD - 1)\n"
        "    for cfg in t.STEP_CONFIGS:\n"
        "        t.test_fused_step_kernels_stream_the_weights_bit_for_bit(_C, dt, cfg)\n"
    )
    env = dict(os.environ, FASTPERTURB_CPU_ISA="default")
    subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], check=True, env=env, timeout=600)


def _on_one_and_two_threads(run):
    """``run()`` on the C++ backend with 1, then 2 torch threads: both results."""
    old = torch.get_num_threads()
    try:
        with use_backend("cpp"):
            torch.set_num_threads(1)
            one = run()
            torch.set_num_threads(2)
            return one, run()
    finally:
        torch.set_num_threads(old)


def test_accumulating_stats_are_thread_count_independent(native):
    """Accumulator writes and statistics with the per-block update: 1 vs 2 threads bit-identical."""
    x = testing.make_inputs([testing.Layer((5 * CHUNK + 17,)), testing.Layer((3, 1000), torch.bfloat16)] * 4, seed=3)

    def run():
        acc = [a.clone() for a in x.accum]
        out = [ops.grad_stats_(x.grads, acc, x.params, x.backups, accum_weight=0.7)]
        fresh = [torch.empty_like(a) for a in x.accum]
        out.append(ops.grad_stats_(x.grads, fresh, accum_weight=0.2, accum_init=True))
        return out + acc + fresh

    one, two = _on_one_and_two_threads(run)
    for a, b in zip(one, two):
        assert_bitwise_equal(a, b, "1 vs 2 threads")


MIN_PARALLEL_ELEMENTS = 4 * CHUNK  # kMinParallelElements in csrc/cpu/plan.h


@pytest.mark.parametrize(
    "numels,parallel",
    [
        ([51200] * 10, True),  # 5 tasks: on one thread while the switch counted 16 tasks
        ([51200] * 20, True),
        ([1024000], True),
        ([MIN_PARALLEL_ELEMENTS], True),
        ([MIN_PARALLEL_ELEMENTS - 1], False),
        ([100] * 1000, False),  # 100K elements: the busy-host case plan.h names stays on one thread
        ([1000] * 300, True),
        ([], False),
    ],
)
def test_a_list_runs_on_two_threads_by_its_element_count(numels, parallel):
    """csrc/cpu/plan.h: a list of kMinParallelElements elements or more runs in a parallel region, however its
    chunks pack into tasks; the chunking itself does not depend on it."""
    chunks, tasks, runs_parallel = cpu_plan()(numels)
    assert runs_parallel is parallel
    assert chunks == sum(-(-n // CHUNK) for n in numels)
    if parallel:
        assert tasks >= 2


@pytest.mark.parametrize("count,numel", [(10, 51200), (8, MIN_PARALLEL_ELEMENTS // 8), (300, 1000)])
def test_lists_at_the_parallel_threshold_are_thread_count_independent(native, count, numel):
    """Lists of 256K-512K elements, which run on two threads since the threshold counts elements (before: 16 tasks,
    which 10 tensors of 51200 elements never made): every op 1 vs 2 threads bit-identical."""
    assert count * numel >= MIN_PARALLEL_ELEMENTS
    x = testing.make_inputs([testing.Layer((numel,))] * count, seed=count, grad_special=1e-3)
    step = torch.rand(count, generator=torch.Generator().manual_seed(1)) * 1e-2
    proj = torch.full((count,), 0.9)

    def run():
        params, backups = [p.clone() for p in x.params], [torch.empty_like(p) for p in x.params]
        grads, acc = [g.clone() for g in x.grads], [a.clone() for a in x.accum]
        out = list(ops.norms(grads, 2.0)) + list(ops.norms(grads, float("inf")))
        out.append(ops.grad_stats_(grads, acc, x.params, x.backups, accum_weight=0.3))
        ops.ascent_step_(params, grads, backups, step, proj, first=True)
        out += params + backups + acc
        ops.restore_(params, backups)
        return out + params

    one, two = _on_one_and_two_threads(run)
    for a, b in zip(one, two):
        assert_bitwise_equal(a, b, "1 vs 2 threads")
    assert_bitwise_equal(torch.stack(one[-count:]), torch.stack(x.params), "restored")


# ---- the fused restore + base-step kernels (csrc/cpu/step_loops.h) ----------------------------------------------
# Their weights are write-only where read from the backup, so a chunk of 64 KB or more computes them a block of 1 KB
# at a time on the stack and streams each block out. The same elements taken as 1024-element tensors (never
# streamed) must give the same bits, and nothing outside a tensor may be written.

STEP_CONFIGS = {
    "sgd-momentum": lambda k: k.sgd(lr=0.1, momentum=0.9, weight_decay=1e-2, dampening=0.1),
    "sgd-nesterov-first": lambda k: k.sgd(lr=0.1, momentum=0.9, nesterov=True, init_momentum=True),
    "sgd-plain-maximize": lambda k: k.sgd(lr=0.1, maximize=True),
    "adamw": lambda k: k.adam(lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True),
    "adam-l2-amsgrad": lambda k: k.adam(lr=1e-3, weight_decay=1e-2, amsgrad=True),
}


class _StepCase:
    """One fused-step call on lists of tensors (params, backups, grads and the base optimizer's state)."""

    def __init__(self, tensors: dict):
        self.t = tensors

    def sgd(self, *, init_momentum=False, **kw):
        momentum = kw.get("momentum", 0.0)
        bufs = self.t["m"] if momentum else []
        ops.restore_sgd_step_(self.t["w"], self.t["b"], self.t["g"], bufs, init_momentum=init_momentum, **kw)

    def adam(self, *, amsgrad=False, **kw):
        vmax = self.t["vmax"] if amsgrad else []
        ops.restore_adam_step_(
            self.t["w"],
            self.t["b"],
            self.t["g"],
            self.t["m"],
            self.t["v"],
            vmax,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            step=3.0,
            **kw,
        )


def _step_inputs(dtype: torch.dtype, n: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def r(scale, positive=False):
        x = torch.randn(n, generator=gen, dtype=torch.float64) * scale
        return (x.abs() if positive else x).to(dtype)

    return {"w": r(1.0), "b": r(1.0), "g": r(0.1), "m": r(0.01), "v": r(1e-3, True), "vmax": r(2e-3, True)}


@pytest.mark.parametrize("config", sorted(STEP_CONFIGS))
@pytest.mark.parametrize("dtype", testing.FLOAT_DTYPES, ids=str)
def test_fused_step_kernels_stream_the_weights_bit_for_bit(native, dtype, config):
    for n in _lengths(dtype):
        src = _step_inputs(dtype, n, seed=n)
        # One tensor of n elements, off the 16-byte alignment inside a sentinel-filled buffer ...
        bufs, whole = {}, {}
        for k, x in src.items():
            bufs[k], view = _embedded(x, PAD - 1)
            whole[k] = [view]
        # ... against the same elements as tensors of 1024 (each below the streaming threshold).
        pieces = {k: list(x.clone().split(BLOCK)) for k, x in src.items()}
        with use_backend("cpp"):
            STEP_CONFIGS[config](_StepCase(whole))
            STEP_CONFIGS[config](_StepCase(pieces))
        for k in src:
            tag = f"{config} {dtype} n={n} {k}"
            assert_bitwise_equal(whole[k][0], torch.cat(pieces[k]), tag)
            _assert_sentinels(bufs[k], PAD - 1, n, tag)
        # and the reference computes the same within the element tolerance
        ref = {k: [x.clone()] for k, x in src.items()}
        with use_backend("reference"):
            STEP_CONFIGS[config](_StepCase(ref))
        torch.testing.assert_close(whole["w"][0], ref["w"][0], **testing.ELEMENT_TOL[dtype])
