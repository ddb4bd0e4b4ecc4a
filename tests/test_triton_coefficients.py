"""ascent_coefficients on the Triton kernel, under the interpreter (TRITON_INTERPRET=1, the Triton test process
of .ci/run): the tests of tests/test_coefficients.py with ``kernel_backend`` overridden to ``triton``, and the
kernel's launch count."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest
import torch

from fastperturb.engine import PerturbSpec, ascent_coefficients
from fastperturb.ops.dispatch import use_backend, why_unavailable

from test_coefficients import (  # noqa: F401  (collected here with the backend below)
    test_a_vector_on_another_device_is_refused,
    test_bad_arguments_are_clear_errors,
    test_kernel_matches_the_reference,
    test_kernel_matches_the_reference_on_a_nan_or_inf_radius,
    test_kernel_matches_the_reference_on_nan_inf_and_float64_stats,
    test_kernel_on_list_lengths_around_its_block,
    test_opcheck_and_the_fake_impl,
    test_the_engine_takes_the_kernel_and_the_reference_only_when_asked,
)

# The interpreter computes with NumPy, which warns where the kernel divides by a zero norm (eta / 0, the
# zero-gradient case whose step is then set to 0) and in masked-off lanes; a GPU computes the same IEEE values
# silently.
pytestmark = pytest.mark.filterwarnings("ignore:(divide by zero|invalid value) encountered:RuntimeWarning")


@pytest.fixture
def kernel_backend():
    reason = why_unavailable("triton", torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"the Triton backend is unavailable: {reason}")
    with use_backend("triton"):
        yield "triton"


def test_one_launch_whatever_the_number_of_tensors(kernel_backend):
    from fastperturb.ops import triton as T

    for n in (3, 700):
        stats = torch.rand(n, 3)
        eta = torch.full((n,), 0.05, dtype=torch.float64)
        for scope in ("layer", "global"):
            with T.count_launches() as launches:
                ascent_coefficients(PerturbSpec(scope=scope), stats, eta, eta, True)
            assert launches.by_kernel == {"_coefficients_kernel": 1}
