"""Shared fixtures: the backends every op test runs on, hypothesis settings."""

from __future__ import annotations

import os

import ordering
import pytest
import torch
from hypothesis import HealthCheck, settings

from fastperturb.ops.dispatch import use_backend, why_unavailable

# Every backend that runs the ops on CPU tensors. Adding a backend to the op
# tests is one line here (it is skipped, with the reason, where it cannot run).
CPU_BACKENDS = [
    "reference",
    "cpp",
]

settings.register_profile(
    "default",
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    """A backend name, selected for the duration of the test."""
    reason = why_unavailable(request.param, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend {request.param!r} unavailable: {reason}")
    with use_backend(request.param):
        yield request.param


@pytest.fixture
def compared_backend(backend) -> str:
    """A backend other than the reference, for tests that compare with the reference."""
    if backend == "reference":
        pytest.skip("the reference compared with itself proves nothing")
    return backend


@pytest.fixture
def native():
    """The compiled extension (skips when it did not load)."""
    from fastperturb.ops import native as _native

    if _native.load_error is not None:
        pytest.skip(f"fastperturb._C did not load: {_native.load_error}")
    from fastperturb import _C

    return _C


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread avoids thrashing on a loaded 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def pytest_report_header(config) -> str:
    return f"test order: {os.environ.get(ordering.ENV) or 'file'} ({ordering.ENV})"


def pytest_collection_modifyitems(config, items) -> None:
    """Runs the tests in the order ``FASTPERTURB_TEST_ORDER`` names (see ``tests/ordering.py``)."""
    try:
        items[:] = ordering.reorder(items, os.environ.get(ordering.ENV, ""), lambda item: item.nodeid.split("::")[0])
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from exc
