"""Argument checks of the fused ops, for the backends written in Python.

The C++ ops check the same rules themselves (``csrc/common/checks.h``) with the
same exception types, so a bad call fails the same way on every backend, and
always *before* any tensor is written. Messages name the argument and index.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ORDS = (2.0, math.inf)
NORMS = ("l2", "linf")


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one block of memory in some order."""
    if t.is_contiguous():
        return True
    expected = 1
    dims = sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1)
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def check_list(name: str, tensors: object) -> Sequence[Tensor]:
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name}[{i}] is a {t.layout} tensor; only dense (strided) tensors are supported")
        if t.is_complex():
            raise TypeError(f"{name}[{i}] is complex ({t.dtype}); only real floating tensors are supported")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
        if not is_dense(t):
            raise ValueError(f"{name}[{i}] must be dense and non-overlapping (e.g. contiguous)")
    return tensors


def check_same_device(named: Sequence[tuple[str, Sequence[Tensor]]]) -> None:
    device = None
    first = ""
    for name, ts in named:
        for i, t in enumerate(ts):
            if device is None:
                device, first = t.device, f"{name}[{i}]"
            elif t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device} but {first} is on {device}; move them to one device")


def same_memory_order(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` (one shape) lay their elements out in the same order: equal strides wherever a
    dimension's size is not 1 (a size-1 dimension's stride is never used, and autograd hands such gradients back
    as they come), any strides with at most one element (``csrc/common/checks.h`` says the same)."""
    return a.numel() <= 1 or all(n == 1 or x == y for n, x, y in zip(a.shape, a.stride(), b.stride()))


def check_parallel(
    ref_name: str, ref: Sequence[Tensor], name: str, other: Sequence[Tensor], optional: bool = False
) -> None:
    """``other`` must mirror ``ref`` tensor by tensor (or be empty if optional)."""
    if optional and len(other) == 0:
        return
    if len(other) != len(ref):
        raise ValueError(f"{name} has {len(other)} tensors but {ref_name} has {len(ref)}; the lists must be parallel")
    for i, (a, b) in enumerate(zip(ref, other)):
        if b.shape != a.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(b.shape)} but {ref_name}[{i}] has shape {tuple(a.shape)}")
        if b.dtype != a.dtype:
            raise TypeError(f"{name}[{i}] has dtype {b.dtype} but {ref_name}[{i}] has dtype {a.dtype}")
        if not same_memory_order(a, b):
            raise ValueError(
                f"{name}[{i}] has strides {b.stride()} but {ref_name}[{i}] has strides {a.stride()}; "
                "use the same memory format"
            )


def check_coef(name: str, coef: object, n: int, device: torch.device | None) -> None:
    if not isinstance(coef, Tensor):
        raise TypeError(f"{name} must be a float32 tensor of shape [{n}], got {type(coef).__name__}")
    if coef.dtype != torch.float32 or coef.dim() != 1 or coef.numel() != n:
        raise ValueError(f"{name} must be a float32 tensor of shape [{n}], got {coef.dtype} {tuple(coef.shape)}")
    if device is not None and coef.device != device:
        raise ValueError(f"{name} is on {coef.device} but the tensors are on {device}")


def check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def first_device(*lists: Sequence[Tensor], default: torch.device | None = torch.device("cpu")) -> torch.device | None:
    """The device of the first tensor in ``lists`` (``default`` when all are empty)."""
    for ts in lists:
        if len(ts):
            return ts[0].device
    return default


def _bytes(t: Tensor) -> tuple[int, int] | None:
    """The bytes a real dense tensor occupies, or None if it has none (empty, or meta: data pointer 0)."""
    if t.numel() == 0:
        return None
    try:
        start = t.data_ptr()
    except (RuntimeError, NotImplementedError):  # a subclass without storage of its own
        return None
    return (start, start + t.numel() * t.element_size()) if start else None


def _span(t: Tensor) -> tuple[int, int] | None:
    """:func:`_bytes`, and None for a fake tensor (tracing), whose aliasing is the real call's to check (asked
    first: reading a fake tensor's data pointer warns)."""
    return None if is_fake(t) else _bytes(t)


def check_no_overlap(
    written: Sequence[tuple[str, Sequence[Tensor]]],
    read: Sequence[tuple[str, Sequence[Tensor]]],
    alias_ok: tuple[str, str] | None = None,
):
    """No tensor of a ``written`` list shares memory with any other tensor of the call (read or written).

    ``alias_ok`` names a (written, read) pair of lists whose tensors at the same index may be the very same
    memory (the fused steps' ``backups[i]`` is ``params[i]`` where a tensor was not perturbed). The tensors are
    on one device (``check_same_device`` runs first). This runs on every call of a plain op, so the spans are
    plain tuples and a label is built only for the message."""
    lists = [(name, ts, True) for name, ts in written] + [(name, ts, False) for name, ts in read]
    first = next((ts[0] for _, ts, _ in lists if len(ts)), None)
    if first is None or is_fake(first):  # tracing: every tensor of the call is fake, its aliasing the real call's
        return
    spans = []
    for k, (_, ts, _) in enumerate(lists):
        for i, t in enumerate(ts):
            b = _bytes(t)
            if b is not None:
                spans.append((b[0], k, i, b[1]))
    if not spans:
        return
    spans.sort()  # by start, then written lists before read ones (their order in `lists`), then index
    names = [name for name, _, _ in lists]
    twins = {names.index(n) for n in alias_ok} if alias_ok is not None else None

    def label(s: tuple) -> str:
        return f"{names[s[1]]}[{s[2]}]"

    # Sorted by start, a span overlaps an earlier one iff that one ends after it starts: keep the
    # furthest-reaching earlier span overall (for written spans) and among the written (for read spans). A span
    # skipped as the allowed twin has the same bytes as its partner, so a third span overlapping it overlaps the
    # partner too and is found there.
    reach_any = reach_written = None
    for s in spans:
        start, k, i, end = s
        is_written = lists[k][2]
        other = reach_any if is_written else reach_written
        if other is not None and other[3] > start:
            twin = (
                twins is not None and {k, other[1]} == twins and i == other[2] and start == other[0] and end == other[3]
            )
            if not twin:
                w, r = (label(s), label(other)) if is_written else (label(other), label(s))
                raise ValueError(
                    f"{w} shares memory with {r}; {w.split('[')[0]} is written in place, "
                    "so pass tensors that do not overlap (e.g. a clone)"
                )
        if reach_any is None or end > reach_any[3]:
            reach_any = s
        if is_written and (reach_written is None or end > reach_written[3]):
            reach_written = s


# One check per op, mirroring the schemas in csrc/include/fastperturb/schemas.h.


def check_norms(tensors, ord) -> None:
    check_list("tensors", tensors)
    check_same_device([("tensors", tensors)])
    if float(ord) not in ORDS:
        raise ValueError(f"ord must be 2 or inf, got {ord}")


def check_handle_lists(named: Sequence[tuple[str, Sequence[Tensor]]]) -> None:
    """The lists of a :class:`~fastperturb.ops.TensorLists` handle (the first is the reference; the others empty
    or parallel to it), as ``csrc/common/tensor_lists.h`` checks them: every list is written by some op on a
    handle, so no tensor may share memory with another."""
    ref_name, ref = named[0]
    for name, ts in named:
        check_list(name, ts)
    for name, ts in named[1:]:
        check_parallel(ref_name, ref, name, ts, optional=True)
    check_same_device(named)
    check_no_overlap(named, [])


def check_grad_stats(grads, accum, params, backups, accum_weight, adaptive_eta) -> None:
    for name, ts in (("grads", grads), ("accum", accum), ("params", params), ("backups", backups)):
        check_list(name, ts)
    check_parallel("grads", grads, "accum", accum, optional=True)
    check_parallel("grads", grads, "params", params, optional=True)
    check_parallel("grads", grads, "backups", backups, optional=True)
    # (an empty list of grads needs nothing: there is no layer to scale or perturb)
    if len(backups) and not len(params):
        raise ValueError("backups given without params: the perturbation d = params - backups needs both")
    if adaptive_eta >= 0 and len(grads) and not len(params):
        raise ValueError("adaptive_eta >= 0 needs params (the adaptive scale is |params| + eta)")
    check_same_device([("grads", grads), ("accum", accum), ("params", params), ("backups", backups)])
    check_finite("accum_weight", accum_weight)
    check_finite("adaptive_eta", adaptive_eta)
    check_no_overlap([("accum", accum)], [("grads", grads), ("params", params), ("backups", backups)])


def check_ascent_step(
    params, grads, backups, step_coef, proj, norm, adaptive_eta, first: bool = False, zero_grads: bool = False
) -> None:
    for name, ts in (("params", params), ("grads", grads), ("backups", backups)):
        check_list(name, ts)
    check_parallel("params", params, "grads", grads)
    check_parallel("params", params, "backups", backups)
    check_same_device([("params", params), ("grads", grads), ("backups", backups)])
    dev = first_device(params, default=None)
    check_coef("step_coef", step_coef, len(params), dev)
    check_coef("proj", proj, len(params), dev)
    if norm not in NORMS:
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    check_finite("adaptive_eta", adaptive_eta)
    # backups is written by the first step (the old weights) and read after; grads is cleared by zero_grads.
    named = (("params", params, True), ("grads", grads, zero_grads), ("backups", backups, first))
    check_no_overlap([(n, ts) for n, ts, w in named if w], [(n, ts) for n, ts, w in named if not w])


def check_restore(params, backups) -> None:
    check_list("params", params)
    check_list("backups", backups)
    check_parallel("params", params, "backups", backups)
    check_same_device([("params", params), ("backups", backups)])
    check_no_overlap([("params", params)], [("backups", backups)])


def check_combine_grads(grads, accum, weight) -> None:
    check_list("grads", grads)
    check_list("accum", accum)
    check_parallel("grads", grads, "accum", accum)
    check_same_device([("grads", grads), ("accum", accum)])
    check_finite("weight", weight)
    check_no_overlap([("grads", grads)], [("accum", accum)])


# The SAM-family ops (dot_stats, lincomb_, ema_residual_).


def check_coef_rows(name: str, coef: object, n: int, cols: int, device: torch.device | None) -> None:
    if not isinstance(coef, Tensor):
        raise TypeError(f"{name} must be a float32 tensor of shape [{n}, {cols}], got {type(coef).__name__}")
    if coef.layout != torch.strided or coef.dtype != torch.float32 or tuple(coef.shape) != (n, cols):
        raise ValueError(
            f"{name} must be a float32 tensor of shape [{n}, {cols}], got {coef.dtype} {tuple(coef.shape)}"
        )
    if device is not None and coef.device != device:
        raise ValueError(f"{name} is on {coef.device} but the tensors are on {device}")


def check_dot_stats(x, y) -> None:
    check_list("x", x)
    check_list("y", y)
    check_parallel("x", x, "y", y)
    check_same_device([("x", x), ("y", y)])


def check_lincomb(out, x, y, coef) -> None:
    for name, ts in (("out", out), ("x", x), ("y", y)):
        check_list(name, ts)
    check_parallel("out", out, "x", x)
    check_parallel("out", out, "y", y, optional=True)
    check_same_device([("out", out), ("x", x), ("y", y)])
    check_coef_rows("coef", coef, len(out), 3, first_device(out, default=None))
    check_no_overlap([("out", out)], [("x", x), ("y", y)])


def check_ema_residual(grads, ema, params, sigma, lmbda, grad_scale, adaptive_eta) -> None:
    for name, ts in (("grads", grads), ("ema", ema), ("params", params)):
        check_list(name, ts)
    check_parallel("grads", grads, "ema", ema)
    check_parallel("grads", grads, "params", params, optional=True)
    if adaptive_eta >= 0 and len(grads) and not len(params):
        raise ValueError("adaptive_eta >= 0 needs params (the adaptive scale is |params| + eta)")
    check_same_device([("grads", grads), ("ema", ema), ("params", params)])
    check_finite("sigma", sigma)
    check_finite("lmbda", lmbda)
    check_finite("grad_scale", grad_scale)
    check_finite("adaptive_eta", adaptive_eta)
    check_no_overlap([("grads", grads), ("ema", ema)], [("params", params)])


def _check_step_lists(params, backups, grads) -> None:
    for name, ts in (("params", params), ("backups", backups), ("grads", grads)):
        check_list(name, ts)
    check_parallel("params", params, "backups", backups)
    check_parallel("params", params, "grads", grads)


def check_restore_sgd_step(params, backups, grads, momentum_buffers, lr, weight_decay, momentum, dampening) -> None:
    _check_step_lists(params, backups, grads)
    check_list("momentum_buffers", momentum_buffers)
    if momentum != 0:
        check_parallel("params", params, "momentum_buffers", momentum_buffers)
    elif len(momentum_buffers):
        raise ValueError(f"momentum_buffers must be empty when momentum is 0, got {len(momentum_buffers)} tensors")
    check_same_device(
        [("params", params), ("backups", backups), ("grads", grads), ("momentum_buffers", momentum_buffers)]
    )
    for name, v in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum), ("dampening", dampening)):
        check_finite(name, v)
    check_no_overlap(
        [("params", params), ("momentum_buffers", momentum_buffers)],
        [("backups", backups), ("grads", grads)],
        alias_ok=("params", "backups"),
    )


def check_restore_adam_step(
    params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps, step, weight_decay
) -> None:
    _check_step_lists(params, backups, grads)
    for name, ts in (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("max_exp_avg_sqs", max_exp_avg_sqs)):
        check_list(name, ts)
    check_parallel("params", params, "exp_avgs", exp_avgs)
    check_parallel("params", params, "exp_avg_sqs", exp_avg_sqs)
    check_parallel("params", params, "max_exp_avg_sqs", max_exp_avg_sqs, optional=True)
    check_same_device(
        [
            ("params", params),
            ("backups", backups),
            ("grads", grads),
            ("exp_avgs", exp_avgs),
            ("exp_avg_sqs", exp_avg_sqs),
            ("max_exp_avg_sqs", max_exp_avg_sqs),
        ]
    )
    for name, v in (("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps), ("weight_decay", weight_decay)):
        check_finite(name, v)
    if not (math.isfinite(step) and step >= 1.0):
        raise ValueError(f"step must be a finite count >= 1 (after its increment), got {step}")
    # torch.optim.Adam's range: 1 - beta^step of a negative beta is 0 or a root of a negative number at some steps
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(
            f"beta1 and beta2 must be in [0, 1) (the bias corrections divide by 1 - beta^step), got {beta1} and {beta2}"
        )
    check_no_overlap(
        [
            ("params", params),
            ("exp_avgs", exp_avgs),
            ("exp_avg_sqs", exp_avg_sqs),
            ("max_exp_avg_sqs", max_exp_avg_sqs),
        ],
        [("backups", backups), ("grads", grads)],
        alias_ok=("params", "backups"),
    )


def check_ascent_coefficients(stats, step_size, radius) -> None:
    """Not a list op (schemas.h): ``stats`` float32/float64 ``[n, 3]``, ``step_size`` and ``radius`` float64
    ``[n]``, dense and on ``stats``'s device."""
    if stats.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"ascent_coefficients: stats must be torch.float32 or torch.float64, got {stats.dtype}")
    if stats.dim() != 2 or stats.shape[1] != 3:
        raise ValueError(
            f"ascent_coefficients: stats must have shape (n, 3) (grad_stats_'s rows), got {tuple(stats.shape)}"
        )
    if stats.layout != torch.strided:
        raise ValueError("ascent_coefficients: stats must be a dense tensor")
    n = stats.shape[0]
    for name, t in (("step_size", step_size), ("radius", radius)):
        if t.dtype != torch.float64:
            raise TypeError(f"ascent_coefficients: {name} must be torch.float64, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(
                f"ascent_coefficients: {name} must have shape ({n},) (one value per row of stats), got {tuple(t.shape)}"
            )
        if t.layout != torch.strided or t.device != stats.device:
            raise ValueError(
                f"ascent_coefficients: {name} must be a dense tensor on stats's device ({stats.device}), got {t.device}"
            )
