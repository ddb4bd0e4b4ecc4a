"""The fused op set, as called by the rest of fastperturb.

Each function picks the backend for the tensors' device
(:mod:`fastperturb.ops.dispatch`) and runs it. The semantics are those of
:mod:`fastperturb.ops.reference`; the schemas are in
``csrc/include/fastperturb/schemas.h`` (``docs/design.md`` §3).
"""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from torch import Tensor

from . import dispatch, fake, native, pure
from . import validation as V

if native.load_error is None:
    fake.register("fastperturb")
    pure.register("fastperturb")

# The C++, CUDA and Triton ops validate their own arguments (they follow raw
# pointers and may be called directly through torch.ops); the reference is
# checked here so every backend rejects bad input alike.
_PY_BACKENDS = ("reference",)


def _non_differentiable(fn):
    """The ops are not differentiable: run them outside autograd so no backend's
    outputs require grad and in-place writes to leaf parameters are allowed."""

    def wrapper(*args, **kwargs):
        # A fresh context manager per call: torch.compile traces one created inside the
        # compiled region but graph-breaks on a shared instance created outside it.
        with torch.no_grad():
            return fn(*args, **kwargs)

    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    wrapper.__wrapped__ = fn
    return wrapper


@_non_differentiable
def norms(tensors: Sequence[Tensor], ord: float = 2.0) -> tuple[Tensor, Tensor]:
    """Per-tensor norms (float32 ``[n]``) and the global norm (float32 scalar); ``ord`` is 2 or inf."""
    tensors = list(tensors)
    backend = dispatch.resolve(V.first_device(tensors))
    if backend in _PY_BACKENDS:
        V.check_norms(tensors, ord)
    return dispatch.op("norms", backend)(tensors, float(ord))


@_non_differentiable
def grad_stats_(
    grads: Sequence[Tensor],
    accum: Sequence[Tensor] = (),
    params: Sequence[Tensor] = (),
    backups: Sequence[Tensor] = (),
    *,
    accum_weight: float = 1.0,
    accum_init: bool = False,
    adaptive_eta: float = -1.0,
) -> Tensor:
    """float32 ``[n, 3]`` of ``[sum (t g)^2, sum d g, sum d^2]``; optionally ``accum (+)= w g``."""
    grads, accum, params, backups = list(grads), list(accum), list(params), list(backups)
    backend = dispatch.resolve(V.first_device(grads, params))
    if backend in _PY_BACKENDS:
        V.check_grad_stats(grads, accum, params, backups, accum_weight, adaptive_eta)
    elif not accum and torch.compiler.is_compiling():
        # Nothing to accumulate: the non-mutating twin, which inductor can lower (see ops/pure.py).
        return dispatch.op("grad_stats", backend)(grads, params, backups, adaptive_eta=float(adaptive_eta))
    return dispatch.op("grad_stats_", backend)(
        grads,
        accum,
        params,
        backups,
        accum_weight=float(accum_weight),
        accum_init=bool(accum_init),
        adaptive_eta=float(adaptive_eta),
    )


def _nothing_to_write(tensors: List[Tensor]) -> Tensor:
    """The float32 ``[0]`` result of a mutating op called on empty lists, without the op: under torch.compile such
    a call is the case ops/pure.py describes (one returned tensor, only empty mutable lists), which inductor
    cannot lower; every backend returns this."""
    return torch.zeros(0, dtype=torch.float32, device=V.first_device(tensors))


@_non_differentiable
def ascent_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    step_coef: Tensor,
    proj: Tensor,
    *,
    norm: str = "l2",
    first: bool = False,
    adaptive_eta: float = -1.0,
    zero_grads: bool = False,
) -> None:
    """One projected ascent step on ``params`` in place (``first`` also fills ``backups``)."""
    params, grads, backups = list(params), list(grads), list(backups)
    backend = dispatch.resolve(V.first_device(params))
    if backend in _PY_BACKENDS:
        V.check_ascent_step(params, grads, backups, step_coef, proj, norm, adaptive_eta, first, zero_grads)
    dispatch.op("ascent_step_", backend)(
        params,
        grads,
        backups,
        step_coef,
        proj,
        norm=norm,
        first=bool(first),
        adaptive_eta=float(adaptive_eta),
        zero_grads=bool(zero_grads),
    )


@_non_differentiable
def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """``params = backups``, bit for bit."""
    params, backups = list(params), list(backups)
    backend = dispatch.resolve(V.first_device(params))
    if backend in _PY_BACKENDS:
        V.check_restore(params, backups)
    dispatch.op("restore_", backend)(params, backups)


@_non_differentiable
def combine_grads_(grads: Sequence[Tensor], accum: Sequence[Tensor], weight: float) -> None:
    """``grads = accum + weight * grads``."""
    grads, accum = list(grads), list(accum)
    backend = dispatch.resolve(V.first_device(grads))
    if backend in _PY_BACKENDS:
        V.check_combine_grads(grads, accum, weight)
    dispatch.op("combine_grads_", backend)(grads, accum, float(weight))


@_non_differentiable
def dot_stats(x: Sequence[Tensor], y: Sequence[Tensor]) -> Tensor:
    """float32 ``[n, 3]`` of ``[sum x*x, sum x*y, sum y*y]`` per tensor pair (read-only)."""
    x, y = list(x), list(y)
    backend = dispatch.resolve(V.first_device(x))
    if backend in _PY_BACKENDS:
        V.check_dot_stats(x, y)
    return dispatch.op("dot_stats", backend)(x, y)


@_non_differentiable
def lincomb_(out: Sequence[Tensor], x: Sequence[Tensor], y: Sequence[Tensor], coef: Tensor) -> Tensor:
    """``out = c0*out + c1*x + c2*y`` per tensor (``coef`` float32 ``[n, 3]``; ``out`` not read where ``c0 == 0``;
    ``y`` may be empty). Returns float32 ``[n]``: ``sum out**2`` of the new values."""
    out, x, y = list(out), list(x), list(y)
    backend = dispatch.resolve(V.first_device(out))
    if backend in _PY_BACKENDS or (not out and torch.compiler.is_compiling()):
        V.check_lincomb(out, x, y, coef)
        if not out:  # (see _nothing_to_write)
            return _nothing_to_write(out)
    return dispatch.op("lincomb_", backend)(out, x, y, coef)


@_non_differentiable
def ema_residual_(
    grads: Sequence[Tensor],
    ema: Sequence[Tensor],
    params: Sequence[Tensor] = (),
    *,
    sigma: float,
    lmbda: float,
    init: bool,
    grad_scale: float = 1.0,
    adaptive_eta: float = -1.0,
) -> Tensor:
    """FriendlySAM: ``grads = g - sigma*ema`` and ``ema = lmbda*ema + (1-lmbda)*g`` (``g = grad_scale*grads``;
    ``init``: ``ema = grads = g``); ``ema`` keeps its value where ``g`` is not finite. Returns float32 ``[n]``:
    ``sum (t*grads)**2`` (``t = |params| + adaptive_eta`` if ``adaptive_eta >= 0``, else 1)."""
    grads, ema, params = list(grads), list(ema), list(params)
    backend = dispatch.resolve(V.first_device(grads, params))
    if backend in _PY_BACKENDS or (not grads and torch.compiler.is_compiling()):
        V.check_ema_residual(grads, ema, params, sigma, lmbda, grad_scale, adaptive_eta)
        if not grads:
            return _nothing_to_write(grads)
    return dispatch.op("ema_residual_", backend)(
        grads,
        ema,
        params,
        sigma=float(sigma),
        lmbda=float(lmbda),
        init=bool(init),
        grad_scale=float(grad_scale),
        adaptive_eta=float(adaptive_eta),
    )


# ---- the same ops on a TensorLists handle (fastperturb/ops/lists.py) ------------------------------------------
# The handle's lists by role: params, backups, accum; the gradients are the params' .grad. The compiled backends
# (CPU kernels, CUDA work list) and the Triton backend take the handle (no list marshalling, checks and plan
# cached); under torch.compile and on the reference the list ops run on the handle's lists.


def ascent_coefficients(
    stats: Tensor, step_size: Tensor, radius: Tensor, *, global_scope: bool, project: bool
) -> tuple[Tensor, Tensor]:
    """The l2 ascent step's per-tensor ``(step_coef, proj)`` from ``grad_stats_``'s rows and the float64 eta and r:
    one kernel call on the cpp, cuda and triton backends (eager), else the torch ops of
    :func:`fastperturb.ops.reference.ascent_coefficients` (which torch.compile traces and fuses)."""
    backend = "reference" if torch.compiler.is_compiling() else dispatch.resolve(stats.device)
    return dispatch.op("ascent_coefficients", backend)(
        stats, step_size, radius, global_scope=bool(global_scope), project=bool(project)
    )


from .lists import ListsCache as ListsCache  # noqa: E402
from .lists import TensorLists as TensorLists  # noqa: E402


def _lists_backend(lists: TensorLists) -> str:
    """How the handle ops run: ``"native"`` (the compiled handle ops: the CPU kernels or the CUDA work list, by
    the handle's device), ``"triton"``, or ``"lists"`` (the list ops on the handle's lists)."""
    if lists.handle is None or torch.compiler.is_compiling():
        return "lists"
    backend = dispatch.resolve(lists.device)
    if backend in ("cpp", "cuda"):
        return "native"
    return "triton" if backend == "triton" else "lists"


_handle_ops: dict[str, tuple[Callable[..., object], Callable[..., object]]] = {}


def _call_handle_op(name: str, *args, **kwargs):
    """``torch.ops.fastperturb.<name>.default(*args, **kwargs)`` in eager mode, at a fraction of its usual cost.

    Two checks of the usual call path cost more than the kernels of a small list (perf and cProfile, ``grad_stats``
    of a list of one 1024-element tensor: 34 us a call from Python before, 13 us with both skipped):

    * the C++ call checks each argument for ``__torch_function__``; on a ``torch.ScriptObject`` (the handle) the
      lookup misses by raising a C++ exception inside torch. With subclass dispatch off the check stops before the
      lookup. The engine passes no tensor subclass (a handle holds plain tensors; the coefficients are its own);
      a subclass given as ``step_coef`` or ``proj`` by a direct caller is taken as a plain tensor, its
      ``__torch_function__`` not called. Torch function modes still see every call.
    * ``OpOverload.__call__`` of an op that takes a class walks the arguments for a ``FakeScriptObject`` (fake
      tracing), in Python. A real handle skips it; anything else (a fake one, where a tracer reaches this path)
      takes the overload's own call.
    """
    calls = _handle_ops.get(name)
    if calls is None:
        overload = getattr(torch.ops.fastperturb, name).default
        calls = _handle_ops[name] = (overload, getattr(overload, "_op", overload))
    if type(args[0]) is not torch.ScriptObject:
        with torch.no_grad():
            return calls[0](*args, **kwargs)
    with torch.no_grad(), torch._C.DisableTorchFunctionSubclass():
        return calls[1](*args, **kwargs)


_triton_impls_module = None


def _triton_impls():
    global _triton_impls_module
    if _triton_impls_module is None:
        from .triton import impls

        _triton_impls_module = impls
    return _triton_impls_module


def norms_lists(lists: TensorLists, ord: float = 2.0, *, of_grads: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`norms` of ``lists.params``, or of their ``.grad`` with ``of_grads``."""
    how = _lists_backend(lists)
    if how == "native":
        return _call_handle_op("norms_lists", lists.handle, float(ord), of_grads=bool(of_grads))
    if how == "triton":
        return _triton_impls().norms_lists(lists, float(ord), bool(of_grads))
    return norms(lists.grads() if of_grads else lists.params, ord)


def grad_stats_lists_(
    lists: TensorLists,
    *,
    with_accum: bool = False,
    with_params: bool = False,
    with_backups: bool = False,
    accum_weight: float = 1.0,
    accum_init: bool = False,
    adaptive_eta: float = -1.0,
) -> Tensor:
    """:func:`grad_stats_` of the params' ``.grad``, with the handle's accum, params and backups where asked."""
    how = _lists_backend(lists)
    kw = dict(
        with_accum=bool(with_accum),
        with_params=bool(with_params),
        with_backups=bool(with_backups),
        accum_weight=float(accum_weight),
        accum_init=bool(accum_init),
        adaptive_eta=float(adaptive_eta),
    )
    if how == "native":
        return _call_handle_op("grad_stats_lists_", lists.handle, **kw)
    if how == "triton":
        return _triton_impls().grad_stats_lists_(lists, **kw)
    return grad_stats_(
        lists.grads(),
        lists.accum if with_accum else [],
        lists.params if with_params else [],
        lists.backups if with_backups else [],
        accum_weight=accum_weight,
        accum_init=accum_init,
        adaptive_eta=adaptive_eta,
    )


def ascent_step_lists_(
    lists: TensorLists,
    step_coef: Tensor,
    proj: Tensor,
    *,
    norm: str = "l2",
    first: bool = False,
    adaptive_eta: float = -1.0,
    zero_grads: bool = False,
) -> None:
    """:func:`ascent_step_` on the handle's params, their ``.grad`` and backups."""
    how = _lists_backend(lists)
    kw = dict(norm=norm, first=bool(first), adaptive_eta=float(adaptive_eta), zero_grads=bool(zero_grads))
    if how == "native":
        _call_handle_op("ascent_step_lists_", lists.handle, step_coef, proj, **kw)
    elif how == "triton":
        _triton_impls().ascent_step_lists_(lists, step_coef, proj, **kw)
    else:
        ascent_step_(lists.params, lists.grads(), lists.backups, step_coef, proj, **kw)


def restore_lists_(lists: TensorLists) -> None:
    """:func:`restore_` of the handle's params from its backups."""
    how = _lists_backend(lists)
    if how == "native":
        _call_handle_op("restore_lists_", lists.handle)
    elif how == "triton":
        _triton_impls().restore_lists_(lists)
    else:
        restore_(lists.params, lists.backups)


def restore_norms_lists_(lists: TensorLists, ord: float = 2.0) -> tuple[Tensor, Tensor]:
    """:func:`restore_lists_` and ``norms_lists(lists, ord, of_grads=True)`` in one pass over the memory (the
    restore before the check of the descent gradient); the same results, bit for bit, except on CUDA where a
    chunk's params, backups and gradients do not all start 16-byte aligned (a parameter that is an unaligned view of
    a flat buffer; the optimizers' own backups are aligned): there the l2 norms are the same sum in another lane
    order, a few ulps apart. Every gradient is checked before a weight is written: a call refused for its
    gradients restores nothing."""
    how = _lists_backend(lists)
    if how == "native":
        return _call_handle_op("restore_norms_lists_", lists.handle, float(ord))
    if how == "triton":
        return _triton_impls().restore_norms_lists_(lists, float(ord))
    if not lists.backups and lists.params:
        raise ValueError("restore_norms_lists_: the TensorLists handle has no backups list; build it with one")
    grads = lists.grads()  # checked here, before the restore, as the fused paths check them
    missing = next((i for i, g in enumerate(grads) if g is None), None)
    if missing is not None:
        raise TypeError(f"restore_norms_lists_: params[{missing}].grad is None; run backward first")
    V.check_norms(grads, ord)
    restore_(lists.params, lists.backups)
    return norms(grads, ord)


def combine_grads_lists_(lists: TensorLists, weight: float) -> None:
    """:func:`combine_grads_` of the params' ``.grad`` with the handle's accum."""
    how = _lists_backend(lists)
    if how == "native":
        _call_handle_op("combine_grads_lists_", lists.handle, float(weight))
    elif how == "triton":
        _triton_impls().combine_grads_lists_(lists, float(weight))
    else:
        combine_grads_(lists.grads(), lists.accum, weight)


def restore_sgd_step_(
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    init_momentum: bool = False,
) -> None:
    """torch.optim.SGD's step taken from ``backups`` into ``params`` in one pass (restore + update)."""
    params, backups, grads, momentum_buffers = list(params), list(backups), list(grads), list(momentum_buffers)
    backend = dispatch.resolve(V.first_device(params))
    if backend in _PY_BACKENDS:
        V.check_restore_sgd_step(params, backups, grads, momentum_buffers, lr, weight_decay, momentum, dampening)
    dispatch.op("restore_sgd_step_", backend)(
        params,
        backups,
        grads,
        momentum_buffers,
        lr=float(lr),
        weight_decay=float(weight_decay),
        momentum=float(momentum),
        dampening=float(dampening),
        nesterov=bool(nesterov),
        maximize=bool(maximize),
        init_momentum=bool(init_momentum),
    )


@_non_differentiable
def restore_adam_step_(
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] = (),
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> None:
    """torch.optim.Adam's (AdamW's) step taken from ``backups`` into ``params`` in one pass (restore + update)."""
    lists = [list(x) for x in (params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)]
    backend = dispatch.resolve(V.first_device(lists[0]))
    if backend in _PY_BACKENDS:
        V.check_restore_adam_step(*lists, lr, beta1, beta2, eps, step, weight_decay)
    dispatch.op("restore_adam_step_", backend)(
        *lists,
        lr=float(lr),
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(eps),
        step=float(step),
        weight_decay=float(weight_decay),
        decoupled_weight_decay=bool(decoupled_weight_decay),
        maximize=bool(maximize),
    )
