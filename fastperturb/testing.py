"""Reusable test cases for the fused ops: input generators, tolerances and a
checker that runs one op on a backend and compares it with the reference.

Used by the test suite (tests/, for every backend) and by ``fastperturb
selftest``, so it depends on torch only (no pytest, no hypothesis).

A *case* is a list of :class:`Layer` specs (shape, dtype, memory format);
:func:`make_inputs` turns it into parallel ``params``/``grads``/``backups``/
``accum`` lists, and :func:`check_op` runs one op with given options on a
backend and on :mod:`fastperturb.ops.reference` and compares everything the op
returns or writes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from . import ops
from .ops import reference  # noqa: F401  (the spec every check compares against)
from .ops.dispatch import use_backend
from .ops.names import OPS

__all__ = [
    "OPS",
    "FLOAT_DTYPES",
    "Layer",
    "Inputs",
    "make_tensor",
    "make_inputs",
    "standard_cases",
    "op_args",
    "run_op",
    "check_op",
    "bits",
    "assert_bitwise_equal",
    "ELEMENT_TOL",
    "REDUCTION_RTOL",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Element-wise results are computed in float (double for float64) and rounded
# once, like the reference; allow about two units in the last place.
ELEMENT_TOL = {
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float32: dict(rtol=3e-7, atol=1e-12),
    torch.float64: dict(rtol=1e-15, atol=1e-300),
}
# Reductions return float32 and accumulate in at least float32 (the reference in
# float64): relative to the sum of the magnitudes of the terms.
REDUCTION_RTOL = 2e-5


@dataclasses.dataclass(frozen=True)
class Layer:
    """One tensor of a list: its shape, dtype and memory format."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass
class Inputs:
    params: list[Tensor]
    grads: list[Tensor]
    backups: list[Tensor]  # params minus a small perturbation (the pre-step weights)
    accum: list[Tensor]


SPECIAL_VALUES = (0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, -1e-310, 65504.0)


def make_tensor(layer: Layer, gen: torch.Generator, *, scale: float = 1.0, special: float = 0.0) -> Tensor:
    """Normal(0, scale) values in ``layer``'s dtype and format; a fraction
    ``special`` of the elements replaced by zeros, infinities, NaNs and
    denormals (of float32/float64; they flush or round in the smaller dtypes)."""
    x = torch.randn(layer.shape, generator=gen, dtype=torch.float64) * scale
    if special > 0 and x.numel():
        flat = x.view(-1)
        pick = torch.rand(flat.shape, generator=gen, dtype=torch.float64) < special
        which = torch.randint(len(SPECIAL_VALUES), flat.shape, generator=gen)
        vals = torch.tensor(SPECIAL_VALUES, dtype=torch.float64)[which]
        flat[pick] = vals[pick]
    x = x.to(layer.dtype)
    if layer.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def make_inputs(
    layers: Sequence[Layer],
    seed: int = 0,
    *,
    grad_special: float = 0.0,
    param_special: float = 0.0,
    zero_grads: bool = False,
) -> Inputs:
    """Parallel lists for ``layers``: params ~ N(0, 1), grads ~ N(0, 1) (or
    zeros), backups = params - N(0, 0.01), accum ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    params = [make_tensor(l, gen, special=param_special) for l in layers]
    grads = [make_tensor(l, gen, special=grad_special) for l in layers]
    if zero_grads:
        grads = [torch.zeros_like(g) for g in grads]
    backups = []
    for l, p in zip(layers, params):
        d = make_tensor(l, gen, scale=0.01)
        b = (p.to(torch.float64) - d.to(torch.float64)).to(l.dtype)
        fmt = torch.channels_last if l.channels_last and b.dim() == 4 else torch.contiguous_format
        backups.append(b.contiguous(memory_format=fmt))
    accum = [make_tensor(l, gen) for l in layers]
    return Inputs(params, grads, backups, accum)


def _many_small(n: int = 1000) -> list[Layer]:
    return [Layer((i % 7 + 1, i % 3 + 1), FLOAT_DTYPES[i % 4]) for i in range(n)]


def standard_cases() -> dict[str, list[Layer]]:
    """Named cases covering the layouts every backend must handle."""
    f16, bf16, f32, f64 = FLOAT_DTYPES
    return {
        "empty_list": [],
        "scalar": [Layer((), f32)],
        "empty_tensors": [Layer((0,), f32), Layer((3, 0, 2), f16), Layer((4,), f32)],
        "mixed_dtypes": [Layer((3, 4), f16), Layer((5,), bf16), Layer((2, 3, 4), f32), Layer((7,), f64)],
        "channels_last": [Layer((2, 3, 4, 5), f32, True), Layer((3, 2, 2, 2), f16, True), Layer((6,), f32)],
        # crosses the CPU kernels' chunk size (65536) and their block size (1024)
        "multi_chunk": [Layer((70001,), f32), Layer((3,), f16), Layer((2, 66000), bf16), Layer((1025,), f64)],
        "many_small": _many_small(),
    }


# ---------------------------------------------------------------------------
# Running an op and comparing it with the reference.


def _device(x: Inputs) -> torch.device:
    return x.params[0].device if x.params else torch.device("cpu")


def op_args(op: str, x: Inputs, **options: Any) -> tuple[tuple, dict]:
    """Positional and keyword arguments of ``op`` on ``x``. Options:

    * norms: ``ord``;
    * grad_stats_: ``accum`` (None, "init" or "add"), ``delta`` (bool),
      ``adaptive_eta``, ``accum_weight``, ``with_params`` (bool);
    * ascent_step_: ``norm``, ``first``, ``adaptive_eta``, ``zero_grads``,
      ``step`` and ``proj`` (floats or per-tensor sequences);
    * combine_grads_: ``weight``;
    * dot_stats (x = grads, y = accum): ``same`` (y = x);
    * lincomb_ (out = accum, x = grads, y = backups): ``coef`` (one ``(c0, c1, c2)`` or one per tensor),
      ``with_y`` (bool);
    * ema_residual_ (grads, ema = accum): ``sigma``, ``lmbda``, ``init``, ``grad_scale``, ``adaptive_eta``,
      ``with_params`` (bool).
    * restore_sgd_step_, restore_adam_step_: the op's keywords (Adam: plus ``amsgrad``); the state
      lists are made from ``accum`` (and ``backups`` for amsgrad's max).
    """
    n = len(x.params)
    if op == "norms":
        return (x.grads, options.get("ord", 2.0)), {}
    if op == "grad_stats_":
        mode = options.get("accum")
        delta = options.get("delta", False)
        eta = options.get("adaptive_eta", -1.0)
        with_params = options.get("with_params", delta or eta >= 0)
        return (
            x.grads,
            x.accum if mode else [],
            x.params if with_params else [],
            x.backups if delta else [],
        ), dict(accum_weight=options.get("accum_weight", 1.0), accum_init=mode == "init", adaptive_eta=eta)
    if op == "ascent_step_":

        def coef(v):  # on the tensors' device, as the ops require (selftest runs the cases on CUDA)
            if isinstance(v, (int, float)):
                return torch.full((n,), float(v), dtype=torch.float32, device=_device(x))
            return torch.tensor(list(v), dtype=torch.float32, device=_device(x)).reshape(n)

        return (x.params, x.grads, x.backups, coef(options.get("step", 0.05)), coef(options.get("proj", 1.0))), dict(
            norm=options.get("norm", "l2"),
            first=options.get("first", False),
            adaptive_eta=options.get("adaptive_eta", -1.0),
            zero_grads=options.get("zero_grads", False),
        )
    if op == "restore_":
        return (x.params, x.backups), {}
    if op == "combine_grads_":
        return (x.grads, x.accum, options.get("weight", 0.5)), {}
    if op == "dot_stats":
        return (x.grads, x.grads if options.get("same", False) else x.accum), {}
    if op == "lincomb_":
        c = options.get("coef", (0.5, -1.25, 2.0))
        one = len(c) == 3 and all(isinstance(v, (int, float)) for v in c)
        rows = [list(c)] * n if one else [list(r) for r in c]
        coef = torch.tensor(rows, dtype=torch.float32, device=_device(x)).reshape(n, 3)
        return (x.accum, x.grads, x.backups if options.get("with_y", True) else [], coef), {}
    if op == "ema_residual_":
        eta = options.get("adaptive_eta", -1.0)
        with_params = options.get("with_params", eta >= 0)
        return (x.grads, x.accum, x.params if with_params else []), dict(
            sigma=options.get("sigma", 1.0),
            lmbda=options.get("lmbda", 0.9),
            init=options.get("init", False),
            grad_scale=options.get("grad_scale", 1.0),
            adaptive_eta=eta,
        )
    if op == "restore_sgd_step_":
        kwargs = {"lr": 0.1, **options}
        buffers = x.accum if kwargs.get("momentum", 0.0) != 0 else []
        return (x.params, x.backups, x.grads, buffers), kwargs
    if op == "restore_adam_step_":
        kwargs = {**dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=1.0), **options}
        amsgrad = kwargs.pop("amsgrad", False)
        # second moments are non-negative; the max is below or above them elementwise
        exp_avg_sqs = [a * a for a in x.accum]
        max_sqs = [b * b for b in x.backups] if amsgrad else []
        return (x.params, x.backups, x.grads, x.accum, exp_avg_sqs, max_sqs), kwargs
    raise ValueError(f"unknown op {op!r}")


def _clone(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.clone(memory_format=torch.preserve_format)
    if isinstance(v, list):
        return [_clone(t) for t in v]
    return v


def run_op(op: str, backend: str, args: tuple, kwargs: dict) -> tuple[Any, tuple]:
    """Runs ``op`` on copies of ``args`` with ``backend``; returns (result, the copies after the call)."""
    args = tuple(_clone(a) for a in args)
    with use_backend(backend):
        result = getattr(ops, op)(*args, **kwargs)
    return result, args


def bits(t: Tensor) -> Tensor:
    """The raw bits of ``t`` (so NaN payloads, -0.0 and denormals compare exactly)."""
    itype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(itype)


def assert_bitwise_equal(actual: Tensor, expected: Tensor, what: str = "") -> None:
    if (
        actual.shape != expected.shape
        or actual.dtype != expected.dtype
        or not torch.equal(bits(actual), bits(expected))
    ):
        raise AssertionError(f"{what}: not bit-identical\nactual:   {actual}\nexpected: {expected}")


def _assert_close(actual: Tensor, expected: Tensor, what: str, **tol: float) -> None:
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(
            f"{what}: got {actual.dtype} {tuple(actual.shape)}, expected {expected.dtype} {tuple(expected.shape)}"
        )
    torch.testing.assert_close(actual, expected, equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)


def _reduction_scale(op: str, args: tuple, kwargs: dict) -> Tensor:
    """Per element of grad_stats_'s output, the sum of |terms| (float64), for the tolerance."""
    grads, _, params, backups = args
    eta = kwargs["adaptive_eta"]
    rows = []
    for i, g in enumerate(grads):
        g64 = g.double()
        tg = (params[i].double().abs() + eta) * g64 if eta >= 0 else g64
        s0 = tg.square().sum()
        if backups:
            d = params[i].double() - backups[i].double()
            rows.append(torch.stack([s0, (d * g64).abs().sum(), d.square().sum()]))
        else:
            rows.append(torch.stack([s0, s0 * 0, s0 * 0]))
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)


def _doubles(x: Sequence[Tensor], y: Sequence[Tensor]) -> Iterable[tuple[Tensor, Tensor]]:
    return ((a.double(), b.double()) for a, b in zip(x, y))


def _check_reduction(got: Tensor, want: Tensor, scale: Tensor, tag: str) -> None:
    """float32 ``got`` within ``REDUCTION_RTOL * scale`` of ``want`` (NaN where ``want`` is NaN)."""
    if got.shape != want.shape or got.dtype != torch.float32:
        raise AssertionError(f"{tag}: got {got.dtype} {tuple(got.shape)}, expected float32 {tuple(want.shape)}")
    err = (got.double() - want.double()).abs()
    ok = (err <= REDUCTION_RTOL * scale.double() + 1e-30) | (got.isnan() & want.isnan()) | (got == want)
    if not ok.all():
        bad = ~ok
        raise AssertionError(f"{tag}: mismatch at {bad.nonzero().tolist()[:5]}\ngot  {got[bad]}\nwant {want[bad]}")


def check_op(op: str, backend: str, x: Inputs, **options: Any) -> None:
    """Runs ``op`` with ``options`` on ``backend`` and on the reference and
    compares the results and every tensor the op may write. Raises
    AssertionError on a mismatch."""
    args, kwargs = op_args(op, x, **options)
    got, got_args = run_op(op, backend, args, kwargs)
    want, want_args = run_op(op, "reference", args, kwargs)
    tag = f"{op}[{backend}]({options})"
    if op == "norms":
        # Sums (or maxima) of non-negative terms: a relative error bound holds, except where the squares
        # underflow. The kernels square in float32 (the compute type of every dtype but float64), the reference in
        # float64: a square below float32's normal range (|x| < ~1e-19) is subnormal or 0, off by at most
        # 2**-150, so an L2 norm over n elements is off by at most sqrt(n * 2**-149) beyond the relative bound.
        n = sum(t.numel() for t in args[0])
        atol = math.sqrt(n * 2.0**-149) if args[1] == 2.0 else 0.0
        _assert_close(got[0], want[0], f"{tag} per-tensor norms", rtol=REDUCTION_RTOL, atol=atol)
        _assert_close(got[1], want[1], f"{tag} global norm", rtol=REDUCTION_RTOL, atol=atol)
    elif op == "grad_stats_":
        scale = _reduction_scale(op, args, kwargs).float()
        if got.shape != want.shape or got.dtype != torch.float32:
            raise AssertionError(f"{tag}: got {got.dtype} {tuple(got.shape)}, expected float32 {tuple(want.shape)}")
        err = (got - want).abs()
        bad = ~((err <= REDUCTION_RTOL * scale + 1e-30) | (got.isnan() & want.isnan()) | (got == want))
        if bad.any():
            raise AssertionError(f"{tag}: mismatch at {bad.nonzero().tolist()[:5]}\ngot  {got[bad]}\nwant {want[bad]}")
    elif op == "dot_stats":
        rows = [torch.stack([a.square().sum(), (a * b).abs().sum(), b.square().sum()]) for a, b in _doubles(*args)]
        _check_reduction(got, want, torch.stack(rows).float() if rows else want.new_zeros(0, 3), tag)
    elif op in ("lincomb_", "ema_residual_"):
        # Sums of squares of what the op wrote (checked element-wise below): compared with the backend's
        # own written values, so one rounding difference in an element cannot hide a wrong statistic.
        written, weights = got_args[0], [None] * len(got_args[0])
        if op == "ema_residual_" and kwargs["adaptive_eta"] >= 0:
            weights = [p.double().abs() + kwargs["adaptive_eta"] for p in args[2]]
        own = [(t.double() if w is None else w * t.double()).square().sum() for t, w in zip(written, weights)]
        own = torch.stack(own).float() if own else got.new_zeros(0)
        _check_reduction(got, own, own, tag)
        _check_reduction(want, own, own, f"{tag} (reference)")
    elif got is not None or want is not None:
        raise AssertionError(f"{tag}: returned {got!r}, the reference {want!r}")
    # Everything the op may write, element-wise.
    for k, (ga, wa) in enumerate(zip(got_args, want_args)):
        if not isinstance(ga, list):
            continue
        for i, (gt, wt) in enumerate(zip(ga, wa)):
            if op == "restore_":
                assert_bitwise_equal(gt, wt, f"{tag} arg {k}[{i}]")
            else:
                _assert_close(gt, wt, f"{tag} arg {k}[{i}]", **ELEMENT_TOL[wt.dtype])
            if gt.numel() > 1 and gt.stride() != wt.stride():
                raise AssertionError(f"{tag} arg {k}[{i}]: strides changed")


def option_grid(op: str) -> Iterable[dict]:
    """A small grid of options per op, covering every code path."""
    if op == "norms":
        yield from (dict(ord=2.0), dict(ord=math.inf))
    elif op == "grad_stats_":
        for accum in (None, "init", "add"):
            for delta in (False, True):
                for eta in (-1.0, 0.01):
                    yield dict(accum=accum, delta=delta, adaptive_eta=eta, accum_weight=0.25)
    elif op == "ascent_step_":
        for norm in ("l2", "linf"):
            for first in (True, False):
                for eta in (-1.0, 0.01):
                    yield dict(
                        norm=norm,
                        first=first,
                        adaptive_eta=eta,
                        zero_grads=first,
                        step=0.05,
                        proj=0.5 if norm == "l2" else 0.02,
                    )
        # off, though -0.0 in float32: decided before it is rounded
        yield dict(norm="l2", first=False, adaptive_eta=-1e-300, zero_grads=False, step=0.05, proj=0.5)
    elif op == "restore_":
        yield {}
    elif op == "combine_grads_":
        yield from (dict(weight=0.5), dict(weight=-2.0))
    elif op == "dot_stats":
        yield from (dict(), dict(same=True))
    elif op == "lincomb_":
        yield dict(coef=(0.5, -1.25, 2.0))
        yield dict(coef=(0.0, 1.0, 0.0), with_y=False)  # an exact copy; out not read
        yield dict(coef=(0.0, 0.7, -0.3))
        yield dict(coef=(1.0, 0.25, 0.0), with_y=False)
    elif op == "ema_residual_":
        for init in (True, False):
            for eta in (-1.0, 0.01):
                yield dict(sigma=1.0, lmbda=0.9, init=init, adaptive_eta=eta, grad_scale=1.0 if init else 0.5)
        yield dict(sigma=0.5, lmbda=0.0, init=False, with_params=True)
    elif op == "restore_sgd_step_":
        yield from (
            dict(lr=0.1),
            dict(lr=0.1, momentum=0.9, weight_decay=0.01, init_momentum=True),
            dict(lr=0.05, momentum=0.9, dampening=0.1, maximize=True),
            dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.01),
            # non-zero (torch keeps a buffer) but 0 in float32: decided in double, as torch decides it
            dict(lr=0.1, momentum=1e-46, dampening=0.5, init_momentum=True),
            dict(lr=0.1, momentum=1e-46, dampening=0.5),
        )
    elif op == "restore_adam_step_":
        adam = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
        yield from (
            dict(adam, step=1.0),
            dict(adam, step=3.0, weight_decay=0.01),
            dict(adam, step=5.0, weight_decay=0.01, decoupled_weight_decay=True, amsgrad=True),
            dict(adam, step=2.0, beta1=0.3, maximize=True, amsgrad=True),  # lerp's other branch (weight >= 0.5)
        )
    else:
        raise ValueError(f"unknown op {op!r}")


def check_all(
    backend: str, *, cases: dict[str, list[Layer]] | None = None, report: Callable[[str], None] = lambda s: None
) -> None:
    """Every op over every option of :func:`option_grid` on every case (default
    :func:`standard_cases`) against the reference. Raises on the first mismatch."""
    cases = standard_cases() if cases is None else cases
    for name, layers in cases.items():
        x = make_inputs(layers, seed=len(name))
        for op in OPS:
            for opts in option_grid(op):
                check_op(op, backend, x, **opts)
        report(f"{backend}: {name} ok")
