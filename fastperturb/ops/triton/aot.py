"""Ahead-of-time compilation of every Triton kernel specialisation the ops can
launch, for a GPU target, without a GPU (the tests lower them to PTX and cubin
and inspect the code)."""

from __future__ import annotations

import itertools

import torch
import triton

from .coefficient_impls import BLOCK as COEFFICIENT_BLOCK
from .coefficient_kernels import _coefficients_kernel
from .kernels import (
    FINALIZE_LANES,
    _ascent_kernel,
    _combine_kernel,
    _dot_kernel,
    _ema_kernel,
    _finalize_kernel,
    _grad_stats_kernel,
    _lincomb_kernel,
    _norms_kernel,
    _restore_kernel,
)
from .plan import INT_OF_SIZE, TYPES, VECTOR_BYTES
from .runtime import COMPILE_OPTIONS, DEFAULTS, INTERPRETED
from .step_kernels import _adam_step_kernel, _sgd_step_kernel


def specializations(
    chunk_size: int = DEFAULTS[False][0], block_size: int = DEFAULTS[False][1], exhaustive: bool = True
):
    """The (kernel, signature, constexprs) the ops can launch with these sizes:
    all of them, or (``exhaustive=False``) a subset in which every static branch
    of every kernel is taken both ways, for every dtype, with the vector hints
    (VEC > 1), and once more without them (float32)."""
    flags = (False, True)
    table = {"meta": "*i64", "work": "*i64"}
    scal = dict(table, scal="*i64")
    all4 = list(itertools.product(flags, repeat=4))
    # (HAS_ACC, ACC_INIT, ADAPTIVE, HAS_DELTA) and (LINF, FIRST, ADAPTIVE, ZERO_GRADS)
    stats_flags = (
        [f for f in all4 if f[0] or not f[1]]
        if exhaustive
        else [(True, False, True, True), (True, True, False, True), (False, False, False, False)]
    )
    ascent_flags = (
        all4 if exhaustive else [(False, False, False, False), (True, True, True, True), (True, False, True, False)]
    )
    # (MOMENTUM, INIT, NESTEROV, MAXIMIZE, DECAY): INIT only with a buffer; (AMSGRAD, MAXIMIZE, L2, DECOUPLED):
    # one kind of weight decay at most
    sgd_flags = (
        [f for f in itertools.product(flags, repeat=5) if f[0] or not f[1]]
        if exhaustive
        else [(False, False, False, False, False), (True, True, True, True, True), (True, False, False, False, True)]
    )
    adam_flags = (
        [f for f in all4 if not (f[2] and f[3])]
        if exhaustive
        else [(False, False, False, False), (True, True, True, False), (False, False, False, True)]
    )
    for dtype, (elem, st, itype, ct) in TYPES.items():
        vecs = (1, VECTOR_BYTES // dtype.itemsize)
        if not exhaustive and dtype != torch.float32:
            vecs = vecs[1:]
        for vec in vecs:
            base = dict(CHUNK=chunk_size, BLOCK=block_size, VEC=vec, ELEM=elem, ST=st, CT=ct)
            for linf, restore in itertools.product(flags, repeat=2):
                yield _norms_kernel, dict(table, partials="*fp64"), dict(base, LINF=linf, RESTORE=restore, ITYPE=itype)
            for has_acc, acc_init, adaptive, has_delta in stats_flags:
                yield (
                    _grad_stats_kernel,
                    dict(scal, partials="*fp64"),
                    dict(base, HAS_ACC=has_acc, ACC_INIT=acc_init, ADAPTIVE=adaptive, HAS_DELTA=has_delta),
                )
            for linf, first, adaptive, zero_grads in ascent_flags:
                yield (
                    _ascent_kernel,
                    dict(scal, step_coef="*fp32", proj="*fp32"),
                    dict(base, ITYPE=itype, LINF=linf, FIRST=first, ADAPTIVE=adaptive, ZERO_GRADS=zero_grads),
                )
            yield _combine_kernel, scal, base
            yield _dot_kernel, dict(table, partials="*fp64"), base
            for has_y in flags:
                yield _lincomb_kernel, dict(table, coef="*fp32", partials="*fp64"), dict(base, HAS_Y=has_y)
            for init, adaptive in itertools.product(flags, repeat=2):
                if exhaustive or init == adaptive:
                    yield _ema_kernel, dict(scal, partials="*fp64"), dict(base, INIT=init, ADAPTIVE=adaptive)
            for momentum, init, nesterov, maximize, decay in sgd_flags:
                yield (
                    _sgd_step_kernel,
                    scal,
                    dict(base, MOMENTUM=momentum, INIT=init, NESTEROV=nesterov, MAXIMIZE=maximize, DECAY=decay),
                )
            for amsgrad, maximize, l2, decoupled in adam_flags:
                yield (
                    _adam_step_kernel,
                    scal,
                    dict(base, AMSGRAD=amsgrad, MAXIMIZE=maximize, L2=l2, DECOUPLED=decoupled),
                )
    for size, itype in INT_OF_SIZE.items():
        for vec in (1, VECTOR_BYTES // size):
            yield _restore_kernel, table, dict(CHUNK=chunk_size, BLOCK=block_size, VEC=vec, ITYPE=itype)
    for stats, glob, project in itertools.product(("*fp32", "*fp64"), flags, flags):
        if exhaustive or glob == project:
            yield (
                _coefficients_kernel,
                dict(stats=stats, eta="*fp64", radius="*fp64", step_out="*fp32", proj_out="*fp32", n="i32"),
                dict(GLOBAL=glob, PROJECT=project, BLOCK=COEFFICIENT_BLOCK),
            )
    for ncol, mode in ((1, 0), (1, 1), (3, 2), (1, 2)):
        yield (
            _finalize_kernel,
            {"partials": "*fp64", "pbase": "*i64", "out": "*fp32", "total": "*fp32", "n": "i32"},
            dict(NCOL=ncol, MODE=mode, TB=FINALIZE_LANES),
        )


def compile_all(
    target, chunk_size: int = DEFAULTS[False][0], block_size: int = DEFAULTS[False][1], exhaustive: bool = True
) -> list:
    """Compile the kernel specialisations (see :func:`specializations`) for ``target`` (a
    ``triton.backends.compiler.GPUTarget``, e.g. ``GPUTarget("cuda", 80, 32)``) down to
    machine code, without a GPU. Returns ``(kernel name, constexprs, compiled kernel)``
    triples (``compiled.asm`` holds the ptx, cubin, ...). Needs a process where the
    kernels were not defined under the interpreter."""
    if INTERPRETED:
        raise RuntimeError("compile_all needs the compiled kernels: run it without TRITON_INTERPRET=1")
    from triton.compiler import ASTSource

    out = []
    for kernel, signature, constexprs in specializations(chunk_size, block_size, exhaustive):
        signature = dict(signature, **{k: "constexpr" for k in constexprs})
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target, options=COMPILE_OPTIONS)
        out.append((kernel.fn.__name__, constexprs, compiled))
    return out
