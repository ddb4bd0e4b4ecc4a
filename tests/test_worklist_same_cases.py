"""The CUDA work-list executor on the same hypothesis cases as the CPU kernels
(tests/strategies.py), every op and option of fastperturb.testing.option_grid,
and the version-counter test of the CPU ops on the CUDA ops' host code."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from fastperturb import testing
from fastperturb.ops import dispatch as backends
from fastperturb.ops import native as _native

from harness import worklist_executor
from strategies import layers, seeds

pytestmark = pytest.mark.skipif(_native.load_error is not None, reason="fastperturb._C did not load")
worklist_executor()  # skips (or fails in CI) when the harness is not built


@settings(max_examples=25, deadline=None)
@given(layers(), seeds)
def test_worklist_executor_matches_reference(monkeypatch_session, layer_list, seed):  # noqa: F811
    x = testing.make_inputs(layer_list, seed=seed, grad_special=0.02)
    for op in testing.OPS:
        for opts in testing.option_grid(op):
            testing.check_op(op, "cpp", x, **opts)  # "cpp" routed to the executor below


def test_worklist_ops_bump_version_counters(monkeypatch_session):  # noqa: F811
    # The CUDA ops run this host code (csrc/cuda/worklist_ops.h): the CPU ops' test, unchanged.
    from test_ops import test_in_place_ops_bump_version_counters

    with backends.use_backend("cpp"):  # "cpp" routed to the executor below
        test_in_place_ops_bump_version_counters("cpp")


@pytest.fixture(scope="module")
def monkeypatch_session():
    # Route the "cpp" backend to torch.ops.fastperturb_worklist (the executor that
    # walks the CUDA launcher's work list on CPU); the reference stays the reference.
    real = backends.op
    mp = pytest.MonkeyPatch()
    mp.setattr(
        backends, "op", lambda name, b: getattr(torch.ops.fastperturb_worklist, name) if b == "cpp" else real(name, b)
    )
    yield
    mp.undo()
