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
    "restore_sgd_step_",
    "restore_adam_step_",
)

#: The same ops on a TensorLists handle (fastperturb/ops/lists.py), in the order of
#: ``csrc/include/fastperturb/list_schemas.h`` ``kAllLists``: a call path for eager code, not a second op set
#: (torch.compile, the fake impls and the work-list executor know only :data:`OPS`).
HANDLE_OPS: tuple[str, ...] = (
    "norms_lists",
    "grad_stats_lists_",
    "ascent_step_lists_",
    "restore_lists_",
    "restore_norms_lists_",
    "combine_grads_lists_",
)

#: Ops on per-tensor statistics rather than tensor lists (``schemas.h``, outside ``kAll``): the engine's eager
#: CPU path (fastperturb/ops/__init__.py says when it calls them); the reference computes them everywhere else.
HELPER_OPS: tuple[str, ...] = ("ascent_coefficients",)
