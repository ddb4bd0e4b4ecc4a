"""The native test harnesses: ``fastperturb._C_testing``, a separate extension
module built only when ``FASTPERTURB_BUILD_TESTING=1`` is set at build time
(CI and development builds), never in the wheel users install.

Tests that need it skip with the reason when it is not built, except under
``FASTPERTURB_REQUIRE_NATIVE=1`` or ``FASTPERTURB_REQUIRE_CUDA_BUILD=1`` (CI),
where a missing harness is a failure.
"""

from __future__ import annotations

import os

import pytest
import torch

REQUIRED = any(os.environ.get(v) == "1" for v in ("FASTPERTURB_REQUIRE_NATIVE", "FASTPERTURB_REQUIRE_CUDA_BUILD"))


def worklist_executor():
    """``torch.ops.fastperturb_worklist``: the CPU executor of the CUDA work list
    (csrc/testing/worklist_executor.cpp). Call at module level or in a test."""
    try:
        import fastperturb._C_testing  # noqa: F401  (registers torch.ops.fastperturb_worklist.*)
    except ImportError as e:
        reason = (
            "fastperturb._C_testing (the CPU executor of the CUDA work list) is not built; "
            f"rebuild with FASTPERTURB_BUILD_TESTING=1 ({e})"
        )
        if REQUIRED:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason, allow_module_level=True)
    return torch.ops.fastperturb_worklist


def cpu_plan():
    """``torch.ops.fastperturb_worklist.cpu_plan(numels) -> (chunks, tasks, parallel)``: the CPU kernels'
    chunk plan over tensors of those sizes (csrc/testing/cpu_plan.cpp)."""
    return worklist_executor().cpu_plan
