"""The optimizer, error and version-counter tests on the Triton backend, run by
the Triton interpreter on CPU tensors.

The tests themselves are those of tests/test_ops.py, tests/test_ops_errors.py and
tests/test_optim_*.py, unchanged: the ones that take the ``backend`` fixture are
imported here, where ``backend`` is overridden to mean ``triton``; the ones
parametrized over a list of backends are called with ``"triton"``. A
representative subset, with the tiny models of those files: each interpreted
program instance costs milliseconds of Python.

Like tests/test_triton.py this needs ``TRITON_INTERPRET=1`` before triton is
first imported, so it runs in the Triton process:

    TRITON_INTERPRET=1 python -m pytest tests/test_triton.py tests/test_triton_optim.py
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest

from fastperturb.ops.dispatch import use_backend

try:
    from fastperturb.ops import triton as T
except ImportError as e:  # no triton, or no compiled extension to take the schemas from
    pytest.skip(f"fastperturb.ops.triton does not import: {e}", allow_module_level=True)

if not T.INTERPRETED:
    pytest.skip(
        "fastperturb.ops.triton was imported in this process before TRITON_INTERPRET=1 was set; run this "
        "file in its own process: TRITON_INTERPRET=1 python -m pytest tests/test_triton_optim.py",
        allow_module_level=True,
    )

import test_optim_behaviour as behaviour
import test_optim_equations as equations
import test_sam_family as family
from test_ops import (  # noqa: F401
    test_in_place_ops_bump_version_counters,
    test_linf_clamp_with_any_radius_follows_the_reference,
    test_strided_and_expanded_coefficients_are_read_by_index,
)
from test_ops_errors import (  # noqa: F401
    test_adam_betas_outside_torchs_range_are_refused,
    test_bad_input_raises_and_writes_nothing,
    test_the_unmodified_inputs_are_valid,
)
from test_optim_behaviour import (  # noqa: F401
    test_bad_group_setting_at_step_time_touches_nothing,
    test_closure_raising_at_perturbed_point_restores,
    test_closure_returning_none,
    test_closure_without_backward,
    test_grad_scaler_overflow_skips_and_backs_off,
    test_low_and_high_precision_parameters,
    test_max_grad_norm_clips_the_descent_gradient,
    test_nonfinite_gradient_skips_with_bit_identical_weights,
    test_nonfinite_in_sam_convention,
    test_restore_undoes_first_step_and_scheduler_sees_second_step,
    test_state_dict_round_trip_in_process,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def backend():
    """Overrides tests/conftest.py's ``backend`` for the tests imported above: Triton only
    (a backend chosen by name never falls back: it raises BackendUnavailable instead)."""
    with use_backend("triton"):
        yield "triton"


def test_the_optimizer_runs_on_the_triton_kernels(backend):
    model = behaviour.make_model()
    opt = behaviour.PRESETS["apd"](model.parameters())
    with T.count_launches() as launches:
        opt.step(behaviour.closure_for(model))
    # (the restore runs in the kernel that reduces G's norms: _norms_kernel with RESTORE)
    assert launches.by_kernel.keys() >= {"_ascent_kernel", "_norms_kernel", "_grad_stats_kernel", "_combine_kernel"}
    assert "_restore_kernel" not in launches.by_kernel


@pytest.mark.parametrize("preset", list(equations.PRESETS))
def test_preset_matches_direct_equations(preset):
    equations.test_preset_matches_direct_equations(preset, "sgd", "triton")


@pytest.mark.parametrize("preset", ["sam", "apd_1step"])
def test_first_second_step_equals_step(preset):
    equations.test_first_second_step_equals_step(preset, "triton")


def test_per_group_radius_and_excluded_group():
    equations.test_per_group_radius_and_excluded_group("triton")


def test_apd_per_group_eps_and_step_size():
    equations.test_apd_per_group_eps_and_step_size("triton")


@pytest.mark.parametrize("name", sorted(family.PRESETS))
def test_sam_family_matches_direct_equations(name):
    family.test_preset_follows_its_equations(name, "sgd", "triton")
