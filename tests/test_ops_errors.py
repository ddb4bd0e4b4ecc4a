"""Bad inputs: every backend raises the same exception type, naming the
argument (and index), and leaves every tensor bit-for-bit untouched.

The bad tensor is usually late in its list, so a backend that checked lazily
(tensor by tensor, while writing) would have modified the earlier ones."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from fastperturb import ops
from fastperturb.ops.dispatch import BackendUnavailable, use_backend
from fastperturb.testing import bits

F16, F32, F64 = torch.float16, torch.float32, torch.float64
SHAPES = [(3, 4), (5,), (2, 3, 4, 5), (6,)]
N = len(SHAPES)


def fresh(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mk = lambda: [torch.randn(s, generator=g) for s in SHAPES]  # noqa: E731
    return dict(
        params=mk(), grads=mk(), backups=mk(), accum=mk(), step=torch.full((N,), 0.1), proj=torch.full((N,), 0.5)
    )


def replace(lst, i, t):
    lst = list(lst)
    lst[i] = t
    return lst


def sparse(shape):
    return torch.randn(shape).to_sparse()


def non_dense(shape):
    return torch.randn(*shape[:-1], shape[-1] * 2)[..., ::2]


def meta(shape):
    return torch.empty(shape, device="meta")


# (id, op, build(x) -> (args, kwargs), exception type, regex the message must match)
Case = tuple[str, str, Callable[[dict], tuple[tuple, dict]], type, str]


def norms_case(name, tensors_fn, exc, pattern, ord=2.0) -> Case:
    return (name, "norms", lambda x: ((tensors_fn(x), ord), {}), exc, pattern)


def stats(grads=None, accum=None, params=None, backups=None, **kw):
    def build(x):
        return (
            (
                grads(x) if grads else x["grads"],
                accum(x) if accum else x["accum"],
                params(x) if params else x["params"],
                backups(x) if backups else x["backups"],
            ),
            dict(dict(accum_weight=0.5, adaptive_eta=0.1), **kw),
        )

    return build


def ascent(params=None, grads=None, backups=None, step=None, proj=None, **kw):
    def build(x):
        return (
            (
                params(x) if params else x["params"],
                grads(x) if grads else x["grads"],
                backups(x) if backups else x["backups"],
                step(x) if step else x["step"],
                proj(x) if proj else x["proj"],
            ),
            dict(dict(norm="l2", first=True, zero_grads=True), **kw),
        )

    return build


CASES: list[Case] = [
    # norms
    norms_case("norms-ord", lambda x: x["grads"], ValueError, r"ord must be 2 or inf", ord=1.0),
    norms_case(
        "norms-int",
        lambda x: replace(x["grads"], 2, torch.ones(2, 3, dtype=torch.int64)),
        TypeError,
        r"tensors\[2\] has dtype torch\.int64",
    ),
    norms_case(
        "norms-bool",
        lambda x: replace(x["grads"], 3, torch.ones(6, dtype=torch.bool)),
        TypeError,
        r"tensors\[3\] has dtype torch\.bool",
    ),
    norms_case(
        "norms-complex",
        lambda x: replace(x["grads"], 2, torch.ones(3, dtype=torch.complex64)),
        TypeError,
        r"tensors\[2\] is complex",
    ),
    norms_case(
        "norms-sparse",
        lambda x: replace(x["grads"], 3, sparse((6,))),
        TypeError,
        r"tensors\[3\] is a torch\.sparse_coo tensor",
    ),
    norms_case(
        "norms-non-dense",
        lambda x: replace(x["grads"], 2, non_dense((2, 3))),
        ValueError,
        r"tensors\[2\] must be dense",
    ),
    norms_case(
        "norms-device",
        lambda x: replace(x["grads"], 2, meta((2, 3))),
        ValueError,
        r"tensors\[2\] is on meta but tensors\[0\] is on cpu",
    ),
    # grad_stats_
    (
        "stats-accum-length",
        "grad_stats_",
        stats(accum=lambda x: x["accum"][:3]),
        ValueError,
        r"accum has 3 tensors but grads has 4",
    ),
    (
        "stats-accum-longer",
        "grad_stats_",
        stats(accum=lambda x: [*x["accum"], torch.randn(2)]),
        ValueError,
        r"accum has 5 tensors but grads has 4",
    ),
    (
        "stats-params-shape",
        "grad_stats_",
        stats(params=lambda x: replace(x["params"], 3, torch.randn(3, 2))),
        ValueError,
        r"params\[3\] has shape \(3, 2\) but grads\[3\] has shape \(6,\)",
    ),
    (
        "stats-backups-dtype",
        "grad_stats_",
        stats(backups=lambda x: replace(x["backups"], 1, torch.randn(5, dtype=F64))),
        TypeError,
        r"backups\[1\] has dtype torch\.float64 but grads\[1\] has dtype torch\.float32",
    ),
    (
        "stats-accum-strides",
        "grad_stats_",
        stats(
            accum=lambda x: replace(
                x["accum"], 2, torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
            )
        ),
        ValueError,
        r"accum\[2\] has strides .* but grads\[2\] has strides",
    ),
    (
        "stats-backups-without-params",
        "grad_stats_",
        stats(params=lambda x: []),
        ValueError,
        r"backups given without params",
    ),
    (
        "stats-adaptive-without-params",
        "grad_stats_",
        stats(params=lambda x: [], backups=lambda x: []),
        ValueError,
        r"adaptive_eta >= 0 needs params",
    ),
    (
        # adaptive_eta = 0 is adaptive too (the scale is |params|): it needs params like any eta >= 0
        "stats-adaptive-0-without-params",
        "grad_stats_",
        stats(params=lambda x: [], backups=lambda x: [], adaptive_eta=0.0),
        ValueError,
        r"adaptive_eta >= 0 needs params",
    ),
    ("stats-weight-nan", "grad_stats_", stats(accum_weight=math.nan), ValueError, r"accum_weight must be finite"),
    ("stats-eta-inf", "grad_stats_", stats(adaptive_eta=math.inf), ValueError, r"adaptive_eta must be finite"),
    (
        "stats-grads-sparse",
        "grad_stats_",
        stats(grads=lambda x: replace(x["grads"], 3, sparse((6,)))),
        TypeError,
        r"grads\[3\] is a torch\.sparse_coo tensor",
    ),
    (
        "stats-device",
        "grad_stats_",
        stats(backups=lambda x: replace(x["backups"], 3, meta((6,)))),
        ValueError,
        r"backups\[3\] is on meta",
    ),
    # ascent_step_
    (
        "ascent-grads-length",
        "ascent_step_",
        ascent(grads=lambda x: x["grads"][:3]),
        ValueError,
        r"grads has 3 tensors but params has 4",
    ),
    (
        "ascent-grads-shape",
        "ascent_step_",
        ascent(grads=lambda x: replace(x["grads"], 0, torch.randn(4, 3))),
        ValueError,
        r"grads\[0\] has shape \(4, 3\) but params\[0\] has shape \(3, 4\)",
    ),
    (
        "ascent-grads-dtype",
        "ascent_step_",
        ascent(grads=lambda x: replace(x["grads"], 3, torch.randn(6, dtype=F16))),
        TypeError,
        r"grads\[3\] has dtype torch\.float16 but params\[3\] has dtype torch\.float32",
    ),
    (
        "ascent-backups-device",
        "ascent_step_",
        ascent(backups=lambda x: replace(x["backups"], 3, meta((6,)))),
        ValueError,
        r"backups\[3\] is on meta but params\[0\] is on cpu",
    ),
    (
        "ascent-grads-non-dense",
        "ascent_step_",
        ascent(grads=lambda x: replace(x["grads"], 3, non_dense((6,)))),
        ValueError,
        r"grads\[3\] must be dense",
    ),
    (
        "ascent-params-complex",
        "ascent_step_",
        ascent(params=lambda x: replace(x["params"], 3, torch.ones(6, dtype=torch.complex64))),
        TypeError,
        r"params\[3\] is complex",
    ),
    (
        "ascent-params-int",
        "ascent_step_",
        ascent(params=lambda x: replace(x["params"], 3, torch.ones(6, dtype=torch.int32))),
        TypeError,
        r"params\[3\] has dtype torch\.int32",
    ),
    (
        "ascent-step-shape",
        "ascent_step_",
        ascent(step=lambda x: torch.zeros(N + 1)),
        ValueError,
        r"step_coef must be a float32 tensor of shape \[4\]",
    ),
    (
        "ascent-step-2d",
        "ascent_step_",
        ascent(step=lambda x: torch.zeros(N, 1)),
        ValueError,
        r"step_coef must be a float32 tensor of shape \[4\]",
    ),
    (
        "ascent-proj-dtype",
        "ascent_step_",
        ascent(proj=lambda x: torch.zeros(N, dtype=F64)),
        ValueError,
        r"proj must be a float32 tensor of shape \[4\]",
    ),
    (
        "ascent-proj-device",
        "ascent_step_",
        ascent(proj=lambda x: meta((N,))),
        ValueError,
        r"proj is on meta but the tensors are on cpu",
    ),
    ("ascent-norm", "ascent_step_", ascent(norm="l3"), ValueError, r"norm must be 'l2' or 'linf'"),
    ("ascent-eta-nan", "ascent_step_", ascent(adaptive_eta=math.nan), ValueError, r"adaptive_eta must be finite"),
    # restore_
    (
        "restore-length",
        "restore_",
        lambda x: ((x["params"], x["backups"][:3]), {}),
        ValueError,
        r"backups has 3 tensors but params has 4",
    ),
    (
        # a parallel list longer than the reference list is refused too, not cut short by a zip
        "restore-backups-longer",
        "restore_",
        lambda x: ((x["params"][:2], x["backups"][:3]), {}),
        ValueError,
        r"backups has 3 tensors but params has 2",
    ),
    (
        # a meta backup among CPU params runs the fake impl (Meta wins): it must refuse as the kernels do
        "restore-device",
        "restore_",
        lambda x: ((x["params"], replace(x["backups"], 3, meta((6,)))), {}),
        ValueError,
        r"backups\[3\] is on meta but params\[0\] is on cpu",
    ),
    (
        "restore-shape",
        "restore_",
        lambda x: ((x["params"], replace(x["backups"], 3, torch.randn(2, 3))), {}),
        ValueError,
        r"backups\[3\] has shape \(2, 3\) but params\[3\] has shape \(6,\)",
    ),
    (
        "restore-dtype",
        "restore_",
        lambda x: ((x["params"], replace(x["backups"], 3, torch.randn(6, dtype=F64))), {}),
        TypeError,
        r"backups\[3\] has dtype torch\.float64",
    ),
    (
        "restore-params-sparse",
        "restore_",
        lambda x: ((replace(x["params"], 3, sparse((6,))), x["backups"]), {}),
        TypeError,
        r"params\[3\] is a torch\.sparse_coo tensor",
    ),
    (
        "restore-strides",
        "restore_",
        lambda x: (
            (x["params"], replace(x["backups"], 2, x["backups"][2].contiguous(memory_format=torch.channels_last))),
            {},
        ),
        ValueError,
        r"backups\[2\] has strides",
    ),
    # combine_grads_
    (
        "combine-weight-inf",
        "combine_grads_",
        lambda x: ((x["grads"], x["accum"], math.inf), {}),
        ValueError,
        r"weight must be finite",
    ),
    (
        "combine-length",
        "combine_grads_",
        lambda x: ((x["grads"], x["accum"][:2], 1.0), {}),
        ValueError,
        r"accum has 2 tensors but grads has 4",
    ),
    (
        "combine-dtype",
        "combine_grads_",
        lambda x: ((x["grads"], replace(x["accum"], 3, torch.randn(6, dtype=F16)), 1.0), {}),
        TypeError,
        r"accum\[3\] has dtype torch\.float16 but grads\[3\] has dtype torch\.float32",
    ),
    (
        "combine-device",
        "combine_grads_",
        lambda x: ((x["grads"], replace(x["accum"], 1, meta((5,))), 1.0), {}),
        ValueError,
        r"accum\[1\] is on meta",
    ),
]


# The SAM-family ops: x = grads, y = accum; lincomb_ writes accum from grads (+ backups); ema_residual_
# writes grads and ema = accum (+ params).
def lincomb(out=None, x=None, y=None, coef=None):
    def build(d):
        return (
            (
                out(d) if out else d["accum"],
                x(d) if x else d["grads"],
                y(d) if y else d["backups"],
                coef(d) if coef else torch.tensor([[0.5, 1.0, -1.0]] * N),
            ),
            {},
        )

    return build


def ema(grads=None, ema=None, params=None, **kw):
    def build(d):
        return (
            (grads(d) if grads else d["grads"], ema(d) if ema else d["accum"], params(d) if params else d["params"]),
            dict(dict(sigma=1.0, lmbda=0.9, init=False, adaptive_eta=0.1), **kw),
        )

    return build


def dots(x=None, y=None):
    return lambda d: ((x(d) if x else d["grads"], y(d) if y else d["accum"]), {})


CASES += [
    # dot_stats
    ("dot-length", "dot_stats", dots(y=lambda d: d["accum"][:3]), ValueError, r"y has 3 tensors but x has 4"),
    (
        "dot-shape",
        "dot_stats",
        dots(y=lambda d: replace(d["accum"], 3, torch.randn(2, 3))),
        ValueError,
        r"y\[3\] has shape \(2, 3\) but x\[3\] has shape \(6,\)",
    ),
    (
        "dot-dtype",
        "dot_stats",
        dots(y=lambda d: replace(d["accum"], 1, torch.randn(5, dtype=F16))),
        TypeError,
        r"y\[1\] has dtype torch\.float16 but x\[1\] has dtype torch\.float32",
    ),
    ("dot-device", "dot_stats", dots(y=lambda d: replace(d["accum"], 3, meta((6,)))), ValueError, r"y\[3\] is on meta"),
    (
        "dot-int",
        "dot_stats",
        dots(x=lambda d: replace(d["grads"], 3, torch.ones(6, dtype=torch.int32))),
        TypeError,
        r"x\[3\] has dtype torch\.int32",
    ),
    # lincomb_
    ("lincomb-x-length", "lincomb_", lincomb(x=lambda d: d["grads"][:2]), ValueError, r"x has 2 tensors but out has 4"),
    (
        "lincomb-y-shape",
        "lincomb_",
        lincomb(y=lambda d: replace(d["backups"], 3, torch.randn(3, 2))),
        ValueError,
        r"y\[3\] has shape \(3, 2\) but out\[3\] has shape \(6,\)",
    ),
    (
        "lincomb-x-strides",
        "lincomb_",
        lincomb(
            x=lambda d: replace(d["grads"], 2, torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last))
        ),
        ValueError,
        r"x\[2\] has strides .* but out\[2\] has strides",
    ),
    (
        "lincomb-out-non-dense",
        "lincomb_",
        lincomb(out=lambda d: replace(d["accum"], 3, non_dense((6,)))),
        ValueError,
        r"out\[3\] must be dense",
    ),
    (
        "lincomb-y-device",
        "lincomb_",
        lincomb(y=lambda d: replace(d["backups"], 3, meta((6,)))),
        ValueError,
        r"y\[3\] is on meta but out\[0\] is on cpu",
    ),
    (
        "lincomb-coef-shape",
        "lincomb_",
        lincomb(coef=lambda d: torch.zeros(N, 2)),
        ValueError,
        r"coef must be a float32 tensor of shape \[4, 3\]",
    ),
    (
        "lincomb-coef-flat",
        "lincomb_",
        lincomb(coef=lambda d: torch.zeros(3 * N)),
        ValueError,
        r"coef must be a float32 tensor of shape \[4, 3\]",
    ),
    (
        "lincomb-coef-dtype",
        "lincomb_",
        lincomb(coef=lambda d: torch.zeros(N, 3, dtype=F64)),
        ValueError,
        r"coef must be a float32 tensor of shape \[4, 3\]",
    ),
    (
        "lincomb-coef-device",
        "lincomb_",
        lincomb(coef=lambda d: meta((N, 3))),
        ValueError,
        r"coef is on meta but the tensors are on cpu",
    ),
    (
        "lincomb-out-is-x",
        "lincomb_",
        lincomb(x=lambda d: replace(d["grads"], 3, d["accum"][3])),
        ValueError,
        r"out\[3\] shares memory with x\[3\]",
    ),
    (
        "lincomb-out-views-y",
        "lincomb_",
        lincomb(out=lambda d: replace(d["accum"], 1, d["backups"][0].view(-1)[5:10])),
        ValueError,
        r"out\[1\] shares memory with y\[0\]",
    ),
    (
        "lincomb-out-twice",
        "lincomb_",
        lincomb(out=lambda d: replace(d["accum"], 3, d["accum"][2].view(-1)[:6])),
        ValueError,
        r"out\[(2|3)\] shares memory with out\[(2|3)\]",
    ),
    # ema_residual_
    (
        "ema-length",
        "ema_residual_",
        ema(ema=lambda d: d["accum"][:3]),
        ValueError,
        r"ema has 3 tensors but grads has 4",
    ),
    (
        "ema-dtype",
        "ema_residual_",
        ema(ema=lambda d: replace(d["accum"], 3, torch.randn(6, dtype=F64))),
        TypeError,
        r"ema\[3\] has dtype torch\.float64 but grads\[3\] has dtype torch\.float32",
    ),
    (
        "ema-params-shape",
        "ema_residual_",
        ema(params=lambda d: replace(d["params"], 3, torch.randn(6, 1))),
        ValueError,
        r"params\[3\] has shape \(6, 1\) but grads\[3\] has shape \(6,\)",
    ),
    (
        "ema-adaptive-without-params",
        "ema_residual_",
        ema(params=lambda d: []),
        ValueError,
        r"adaptive_eta >= 0 needs params",
    ),
    (
        "ema-adaptive-0-without-params",
        "ema_residual_",
        ema(params=lambda d: [], adaptive_eta=0.0),
        ValueError,
        r"adaptive_eta >= 0 needs params",
    ),
    ("ema-sigma-nan", "ema_residual_", ema(sigma=math.nan), ValueError, r"sigma must be finite"),
    ("ema-lmbda-inf", "ema_residual_", ema(lmbda=math.inf), ValueError, r"lmbda must be finite"),
    ("ema-scale-inf", "ema_residual_", ema(grad_scale=-math.inf), ValueError, r"grad_scale must be finite"),
    ("ema-eta-nan", "ema_residual_", ema(adaptive_eta=math.nan), ValueError, r"adaptive_eta must be finite"),
    (
        "ema-device",
        "ema_residual_",
        ema(params=lambda d: replace(d["params"], 2, meta((2, 3, 4, 5)))),
        ValueError,
        r"params\[2\] is on meta",
    ),
    (
        "ema-grads-sparse",
        "ema_residual_",
        ema(grads=lambda d: replace(d["grads"], 3, sparse((6,)))),
        TypeError,
        r"grads\[3\] is a torch\.sparse_coo tensor",
    ),
    (
        "ema-is-grads",
        "ema_residual_",
        ema(ema=lambda d: replace(d["accum"], 2, d["grads"][2])),
        ValueError,
        r"(grads\[2\] shares memory with ema\[2\]|ema\[2\] shares memory with grads\[2\])",
    ),
    (
        "ema-grads-is-params",
        "ema_residual_",
        ema(params=lambda d: replace(d["params"], 0, d["grads"][0])),
        ValueError,
        r"grads\[0\] shares memory with params\[0\]",
    ),
]


# Overlapping memory: a list an op writes may share no memory with any other tensor of the call, on every
# backend (the reference's torch ops would otherwise raise some overlaps and silently compute others).
def sgd(params=None, backups=None, grads=None, bufs=None, **kw):
    def build(d):
        return (
            (
                params(d) if params else d["params"],
                backups(d) if backups else d["backups"],
                grads(d) if grads else d["grads"],
                bufs(d) if bufs else d["accum"],
            ),
            dict(dict(lr=0.1, momentum=0.9), **kw),
        )

    return build


def adam(params=None, backups=None, grads=None, avgs=None, sqs=None, **kw):
    def build(d):
        return (
            (
                params(d) if params else d["params"],
                backups(d) if backups else d["backups"],
                grads(d) if grads else d["grads"],
                avgs(d) if avgs else d["accum"],
                sqs(d) if sqs else [t.abs() for t in d["accum"]],
            ),
            dict(dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, step=1.0), **kw),
        )

    return build


def shifted_twin(d):
    """params[2] and backups[2] in one buffer, ten elements apart: the same index, but not the same memory."""
    buf = torch.randn(130)
    d = dict(d, params=replace(d["params"], 2, buf[:120].view(2, 3, 4, 5)))
    d["backups"] = replace(d["backups"], 2, buf[10:].view(2, 3, 4, 5))
    return sgd()(d)


CASES += [
    (
        "stats-accum-is-grads",
        "grad_stats_",
        stats(accum=lambda d: replace(d["accum"], 2, d["grads"][2])),
        ValueError,
        r"accum\[2\] shares memory with grads\[2\]",
    ),
    (
        "stats-accum-views-params",
        "grad_stats_",
        stats(accum=lambda d: replace(d["accum"], 1, d["params"][2].view(-1)[7:12])),
        ValueError,
        r"accum\[1\] shares memory with params\[2\]",
    ),
    (
        "ascent-backups-is-params",
        "ascent_step_",
        ascent(backups=lambda d: replace(d["backups"], 3, d["params"][3])),
        ValueError,
        r"(params\[3\] shares memory with backups\[3\]|backups\[3\] shares memory with params\[3\])",
    ),
    (
        "ascent-zeroed-grads-view-backups",
        "ascent_step_",
        ascent(grads=lambda d: replace(d["grads"], 1, d["backups"][2].view(-1)[:5]), first=False),
        ValueError,
        r"grads\[1\] shares memory with backups\[2\]",
    ),
    (
        "ascent-read-grads-view-params",
        "ascent_step_",
        ascent(grads=lambda d: replace(d["grads"], 3, d["params"][2].view(-1)[10:16]), zero_grads=False),
        ValueError,
        r"params\[2\] shares memory with grads\[3\]",
    ),
    (
        "restore-params-is-backups",
        "restore_",
        lambda d: ((d["params"], replace(d["backups"], 3, d["params"][3])), {}),
        ValueError,
        r"params\[3\] shares memory with backups\[3\]",
    ),
    (
        "restore-params-twice",
        "restore_",
        lambda d: ((replace(d["params"], 3, d["params"][2].view(-1)[:6]), d["backups"]), {}),
        ValueError,
        r"params\[(2|3)\] shares memory with params\[(2|3)\]",
    ),
    (
        "combine-grads-is-accum",
        "combine_grads_",
        lambda d: ((d["grads"], replace(d["accum"], 0, d["grads"][0]), 1.0), {}),
        ValueError,
        r"grads\[0\] shares memory with accum\[0\]",
    ),
    (
        "sgd-buffer-is-grad",
        "restore_sgd_step_",
        sgd(bufs=lambda d: replace(d["accum"], 2, d["grads"][2])),
        ValueError,
        r"momentum_buffers\[2\] shares memory with grads\[2\]",
    ),
    (
        "sgd-backup-is-another-param",
        "restore_sgd_step_",
        sgd(backups=lambda d: replace(d["backups"], 3, d["params"][2].view(-1)[:6])),
        ValueError,
        r"params\[2\] shares memory with backups\[3\]",
    ),
    (
        "sgd-backup-views-its-param",
        "restore_sgd_step_",
        shifted_twin,
        ValueError,
        r"params\[2\] shares memory with backups\[2\]",
    ),
    (
        "adam-avg-is-sq",
        "restore_adam_step_",
        adam(sqs=lambda d: replace([t.abs() for t in d["accum"]], 1, d["accum"][1])),
        ValueError,
        r"exp_avg(_sq)?s\[1\] shares memory with exp_avg(_sq)?s\[1\]",
    ),
    (
        # a count before its increment: the bias corrections would divide by 1 - beta^0 = 0
        "adam-step-0",
        "restore_adam_step_",
        adam(step=0.0),
        ValueError,
        r"step must be a finite count >= 1",
    ),
    (
        "adam-param-twice",
        "restore_adam_step_",
        adam(params=lambda d: replace(d["params"], 1, d["params"][2].view(-1)[:5])),
        ValueError,
        r"params\[(1|2)\] shares memory with params\[(1|2)\]",
    ),
]


def test_adam_betas_outside_torchs_range_are_refused(backend):
    """torch.optim.Adam takes betas in [0, 1): a negative one made the reference raise ZeroDivisionError or a
    complex-number TypeError while the C++ op wrote inf/NaN (found by this round's ops review)."""
    x = fresh()
    sqs = [t.abs() for t in x["accum"]]
    for b1, b2, step in ((-1.0, 0.99, 2.0), (-0.5, 0.99, 2.5), (0.9, -0.5, 3.0)):
        before = [t.clone() for t in x["params"]]
        with pytest.raises(ValueError, match=r"beta1 and beta2 must be in \[0, 1\)"):
            ops.restore_adam_step_(
                x["params"], x["backups"], x["grads"], x["accum"], sqs, lr=0.1, beta1=b1, beta2=b2, eps=1e-8, step=step
            )
        assert all(torch.equal(a, b) for a, b in zip(x["params"], before))
    ops.restore_adam_step_(
        x["params"], x["backups"], x["grads"], x["accum"], sqs, lr=0.1, beta1=0.0, beta2=0.0, eps=1e-8, step=2.0
    )


def test_a_passive_tensor_is_its_own_backup_in_the_fused_steps(backend):
    """The fused steps take ``backups[i] is params[i]`` for a tensor that was not perturbed: the one overlap allowed."""
    x = fresh()
    w = [t.clone() for t in x["params"]]
    backups = replace(x["backups"], 1, w[1])
    ops.restore_sgd_step_(w, backups, x["grads"], [], lr=0.5)
    assert torch.equal(w[1], x["params"][1] - 0.5 * x["grads"][1])
    assert torch.equal(w[0], x["backups"][0] - 0.5 * x["grads"][0])
    sqs = [t.abs() for t in x["accum"]]
    backups = replace(x["backups"], 3, w[3])
    ops.restore_adam_step_(w, backups, x["grads"], x["accum"], sqs, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, step=1.0)
    # the passive tensor's twin in a third list is still refused
    with pytest.raises(ValueError, match=r"momentum_buffers\[1\] shares memory with (params|backups)\[1\]"):
        ops.restore_sgd_step_(
            w, replace(x["backups"], 1, w[1]), x["grads"], replace(x["accum"], 1, w[1]), lr=0.1, momentum=0.9
        )


def test_read_only_lists_may_share_memory(backend):
    """Only written lists are compared: an ascent step that neither fills backups nor clears grads may read one
    gradient tensor twice, and ``grad_stats_`` may read params and backups that are one."""
    x = fresh()
    grads = replace(x["grads"], 1, x["grads"][0].view(-1)[:5])
    ops.ascent_step_(x["params"], grads, x["backups"], x["step"], x["proj"], norm="l2")
    ops.grad_stats_(x["grads"], x["accum"], x["params"], x["params"], accum_weight=1.0, adaptive_eta=-1.0)


def _tensors(args) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, list):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def _snapshot(t: torch.Tensor):
    if t.device.type == "meta":
        return None
    if t.layout != torch.strided:
        return bits(t.to_dense())
    if t.is_complex():
        return bits(torch.view_as_real(t))
    return bits(t).clone()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_and_writes_nothing(backend, case):
    _, op, build, exc, pattern = case
    args, kwargs = build(fresh())
    tensors = _tensors(args)
    before = [_snapshot(t) for t in tensors]
    with pytest.raises(exc, match=pattern):
        getattr(ops, op)(*args, **kwargs)
    for t, b in zip(tensors, before):
        if b is not None:
            assert torch.equal(_snapshot(t), b), "a tensor was modified by a call that raised"


def test_the_unmodified_inputs_are_valid(backend):
    """The baseline every case above changes in one place runs on every op."""
    x = fresh()
    ops.norms(x["grads"], 2.0)
    ops.grad_stats_(x["grads"], x["accum"], x["params"], x["backups"], accum_weight=0.5, adaptive_eta=0.1)
    ops.ascent_step_(
        x["params"], x["grads"], x["backups"], x["step"], x["proj"], norm="l2", first=True, zero_grads=True
    )
    ops.restore_(x["params"], x["backups"])
    ops.combine_grads_(x["grads"], x["accum"], 1.0)
    ops.dot_stats(x["grads"], x["accum"])
    ops.lincomb_(x["accum"], x["grads"], x["backups"], torch.tensor([[0.5, 1.0, -1.0]] * N))
    ops.ema_residual_(x["grads"], x["accum"], x["params"], sigma=1.0, lmbda=0.9, init=False, adaptive_eta=0.1)


def _untouched(tensors, before) -> None:
    for t, b in zip(tensors, before):
        assert torch.equal(bits(t), b), "a tensor was modified by a call that raised"


def test_the_allowed_twin_must_be_at_the_same_index(backend):
    """``backups[i] is params[i]`` is the one overlap the fused steps allow: ``backups[1] is params[0]`` is not."""
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    params, backups, grads = [a, b], [a.clone(), a], [torch.randn(4, 3), torch.randn(4, 3)]
    avgs, sqs = [torch.zeros(4, 3), torch.zeros(4, 3)], [torch.rand(4, 3), torch.rand(4, 3)]
    before = [bits(t).clone() for t in params]
    with pytest.raises(ValueError, match=r"params\[0\] shares memory with backups\[1\]"):
        ops.restore_sgd_step_(params, backups, grads, [], lr=0.1)
    with pytest.raises(ValueError, match=r"params\[0\] shares memory with backups\[1\]"):
        ops.restore_adam_step_(params, backups, grads, avgs, sqs, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, step=1.0)
    _untouched(params, before)


def test_a_written_tensor_inside_an_earlier_longer_read_tensor_is_refused(backend):
    """The overlap check keeps the furthest-reaching earlier span, not the latest: ``accum[1]`` inside ``grads[0]``
    is found although the shorter ``grads[1]`` starts between them."""
    blk = torch.randn(100)
    grads = [blk, blk[10:20]]  # read-only lists may overlap each other
    accum = [torch.zeros(100), blk[50:60]]
    before = [bits(blk).clone(), bits(accum[0]).clone()]
    with pytest.raises(ValueError, match=r"accum\[1\] shares memory with grads\[0\]"):
        ops.grad_stats_(grads, accum, accum_weight=1.0)
    _untouched([blk, accum[0]], before)


def _halves(*shape, seed):
    """Small multiples of 1/2: every sum of their products is exact, in any order."""
    return torch.randint(-6, 7, shape, generator=torch.Generator().manual_seed(seed)).float() / 2


def test_an_unused_stride_of_a_size_1_dim_is_accepted_as_dense(backend):
    """A transposed-dense tensor whose size-1 dimension has a stride matching no dense order is dense (the C++
    checks ignore size-1 dims): every backend accepts it and computes what it does on a contiguous copy."""

    def odd(t):  # t's values, laid out (4, 1, 3) with strides (1, 7, 4)
        return t.transpose(0, 2).contiguous().as_strided((4, 1, 3), (1, 7, 4))

    g, p, w = _halves(4, 1, 3, seed=1), _halves(4, 1, 3, seed=2), _halves(4, 1, 3, seed=3)
    og, op_, ow = odd(g), odd(p), odd(w)
    assert not og.is_contiguous() and torch.equal(og, g)
    for a, b in zip(ops.norms([og], 2.0), ops.norms([g], 2.0)):
        assert torch.equal(a, b)
    assert torch.equal(ops.grad_stats_([og], [], [op_], [ow]), ops.grad_stats_([g], [], [p], [w]))
    ops.restore_([op_], [ow])
    assert torch.equal(op_, w)


def test_a_grad_laid_out_differently_only_in_a_size_1_dim_is_accepted(backend):
    """A gradient whose strides differ from its parameter's only in a size-1 dimension (autograd hands these back,
    e.g. 1x1 convolutions in channels_last) has the same memory order: every backend accepts it and computes what
    it does on a gradient with the parameter's strides."""
    p, w = _halves(4, 1, 3, seed=4), _halves(4, 1, 3, seed=5)  # strides (3, 3, 1)
    g = _halves(4, 3, seed=6).as_strided((4, 1, 3), (3, 1, 1))
    assert g.stride() != p.stride()
    acc, acc_c = [torch.ones(4, 1, 3)], [torch.ones(4, 1, 3)]
    s = ops.grad_stats_([g], acc, [p], [w], accum_weight=0.5, adaptive_eta=0.5)
    s_c = ops.grad_stats_([g.contiguous()], acc_c, [p], [w], accum_weight=0.5, adaptive_eta=0.5)
    assert torch.equal(s, s_c) and torch.equal(acc[0], acc_c[0])
    coef = torch.full((1,), 0.5)
    p1, p2 = p.clone(), p.clone()
    ops.ascent_step_([p1], [g], [torch.empty(4, 1, 3)], coef, coef, first=True)
    ops.ascent_step_([p2], [g.contiguous()], [torch.empty(4, 1, 3)], coef, coef, first=True)
    assert torch.equal(p1, p2)


def test_a_named_backend_that_cannot_run_raises_backend_unavailable():
    """A backend chosen by name never falls back: ``cuda`` on CPU tensors (on any build) raises, writing nothing."""
    params, backups = [torch.zeros(3)], [torch.ones(3)]
    with use_backend("cuda"):
        with pytest.raises(BackendUnavailable, match=r"backend 'cuda' is unavailable"):
            ops.norms(params, 2.0)
        with pytest.raises(BackendUnavailable, match=r"backend 'cuda' is unavailable"):
            ops.restore_(params, backups)
    assert torch.equal(params[0], torch.zeros(3))


FAKE_CASES = [c for c in CASES if "shares memory" not in c[4]]  # tracing cannot see aliasing: the real call checks


@pytest.mark.parametrize("case", FAKE_CASES, ids=[c[0] for c in FAKE_CASES])
def test_fake_impl_refuses_what_the_op_refuses(native, case):
    """Under FakeTensorMode (torch.compile's tracing) each op's fake impl raises the real op's error."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, op, build, exc, pattern = case
    args, kwargs = build(fresh())
    if op == "restore_adam_step_" and len(args) == 5:
        args = (*args, [])  # max_exp_avg_sqs: a default of the Python wrapper, not of the schema
    with FakeTensorMode() as mode:

        def to_fake(a):
            if isinstance(a, torch.Tensor):
                return mode.from_tensor(a)
            return [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in a] if isinstance(a, list) else a

        fake_args = [to_fake(a) for a in args]
        with pytest.raises(exc, match=pattern):
            getattr(torch.ops.fastperturb, op)(*fake_args, **kwargs)
