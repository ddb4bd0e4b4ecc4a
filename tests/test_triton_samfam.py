"""The SAM-family ops' equation tests (tests/test_samfam_ops.py) on the Triton backend, in the Triton test
process (TRITON_INTERPRET=1; see .ci/run). The comparison with the reference over the shared cases, bit for
bit, and the ops' opcheck are in tests/test_triton.py, which walks every op of the op set."""

from __future__ import annotations

import pytest
import torch

from fastperturb.ops.dispatch import use_backend, why_unavailable

from test_samfam_ops import (  # noqa: F401  (collected here with the backend below)
    test_deterministic_across_thread_counts,
    test_dot_stats_empty,
    test_dot_stats_equations,
    test_dot_stats_matches_reference,
    test_dot_stats_propagates_nan_and_inf,
    test_ema_residual_empty,
    test_ema_residual_equations_over_steps,
    test_ema_residual_grad_scale_keeps_ema_unscaled,
    test_ema_residual_matches_reference,
    test_ema_residual_nonfinite_gradient_leaves_ema,
    test_lincomb_c0_zero_never_reads_out,
    test_lincomb_copy_is_exact,
    test_lincomb_empty,
    test_lincomb_equations,
    test_lincomb_matches_reference,
    test_lincomb_nonfinite_coefficient_and_inputs_propagate,
    test_ops_work_on_leaf_parameters,
    test_per_tensor_results_do_not_depend_on_the_rest_of_the_list,
    test_written_tensors_bump_version_counters,
    test_zero_gradients,
)


@pytest.fixture
def backend() -> str:
    reason = why_unavailable("triton", torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"the Triton backend is unavailable: {reason}")
    with use_backend("triton"):
        yield "triton"
