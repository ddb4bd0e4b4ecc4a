"""The names of the fused ops: the one Python list of the op set.

Everything in Python that walks the op set (fake impls, the Triton
registration, the reference's exports, the shared test cases, selftest) takes
the names from here. The C++ side declares the same ops, in the same order, in
``csrc/include/fastperturb/schemas.h`` (``schemas::kAll``); a test checks the
two agree. Semantics and schemas: ``docs/design.md`` §3.
"""

from __future__ import annotations

OPS: tuple[str, ...] = (
    "norms",
    "grad_stats_",
    "ascent_step_",
    "restore_",
    "combine_grads_",
    "dot_stats",
    "lincomb_",
    "ema_residual_",
)
