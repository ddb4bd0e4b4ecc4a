"""``grad_stats``: ``grad_stats_`` without the accumulator, a schema that mutates nothing.

Why it exists: torch.compile functionalizes a mutating custom op into
``auto_functionalized_v2`` and inductor later decomposes that back into the op.
When the op returns one tensor and its only mutable argument is an *empty*
list (``grad_stats_(grads, [], ...)``, the common call), the decomposition
returns a 1-tuple that inductor's pattern replacer takes for a single node, and
lowering fails with ``<built-in function getitem> is not an OpOverload``
(torch 2.13; a three-line custom op reproduces it, so it is not fastperturb's
schema). An op that mutates nothing is never auto-functionalized, so the facade
calls this twin under torch.compile when there is nothing to accumulate; it runs
the same kernel (``grad_stats_`` with ``accum=[]``), so eager and compiled results
are bit-identical.

It is registered in every namespace that carries the op set (``fastperturb``
and ``fastperturb_triton``) and dispatches to that namespace's ``grad_stats_``.
"""

from __future__ import annotations

import torch

from . import validation as V

# grad_stats_'s schema (csrc/include/fastperturb/schemas.h) minus accum,
# accum_weight and accum_init; tests/test_compile.py checks that they agree.
NAME = "grad_stats"
SCHEMA = "grad_stats(Tensor[] grads, Tensor[] params, Tensor[] backups, *, float adaptive_eta=-1.0) -> Tensor"

_LIBS: list[torch.library.Library] = []  # keeps the registrations alive


def _fake(grads, params, backups, *, adaptive_eta=-1.0):
    V.check_grad_stats(grads, [], params, backups, 1.0, adaptive_eta)
    return torch.empty(len(grads), 3, dtype=torch.float32, device=V.first_device(grads))


def register(namespace: str) -> None:
    """Define ``namespace::grad_stats`` on top of ``namespace::grad_stats_`` (idempotent)."""
    if hasattr(getattr(torch.ops, namespace), NAME):
        return
    mutating = getattr(torch.ops, namespace).grad_stats_

    def impl(grads, params, backups, *, adaptive_eta=-1.0):
        return mutating(grads, [], params, backups, adaptive_eta=adaptive_eta)

    lib = torch.library.Library(namespace, "FRAGMENT")
    # The same kernels, so the same CUDA graph tag (the Triton ops carry it: triton/registration.py).
    lib.define(SCHEMA, tags=tuple(t for t in mutating.default.tags if t == torch.Tag.cudagraph_unsafe))
    # CompositeExplicitAutograd: one kernel for every device, which redispatches to the
    # device's grad_stats_ (and is not decomposed by tracing, so the op stays in the graph).
    lib.impl(NAME, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{namespace}::{NAME}", _fake, lib=lib)
    _LIBS.append(lib)
