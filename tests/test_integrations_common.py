"""What the framework integrations share: routing a framework's clipping setting to the optimizer."""

from __future__ import annotations

import pytest
import torch

import fastperturb as fp
from fastperturb.integrations import routed_max_grad_norm


def _opt(max_grad_norm=None):
    p = torch.nn.Parameter(torch.ones(3))
    return fp.SAM([p], torch.optim.SGD, rho=0.05, lr=0.1, max_grad_norm=max_grad_norm)


@pytest.mark.parametrize("unset", [None, 0, 0.0, -1.0])
def test_an_unset_framework_setting_keeps_the_optimizers_own(unset):
    opt = _opt(max_grad_norm=2.0)
    with routed_max_grad_norm(opt, unset, "X(clip)"):
        assert opt.max_grad_norm == 2.0
    assert opt.max_grad_norm == 2.0


def test_the_framework_setting_applies_for_the_step_only():
    opt = _opt()
    with routed_max_grad_norm(opt, 1, "X(clip)"):
        assert opt.max_grad_norm == 1.0
    assert opt.max_grad_norm is None
    with pytest.raises(RuntimeError, match="boom"), routed_max_grad_norm(opt, 1.5, "X(clip)"):
        raise RuntimeError("boom")
    assert opt.max_grad_norm is None  # put back after an exception too


def test_both_set_and_different_is_an_error_naming_both():
    opt = _opt(max_grad_norm=2.0)
    with pytest.raises(ValueError, match=r"X\(clip\)=1.0 and SAM\(max_grad_norm=2.0\) disagree"):
        with routed_max_grad_norm(opt, 1.0, "X(clip)"):
            pass
    assert opt.max_grad_norm == 2.0
    with routed_max_grad_norm(opt, 2.0, "X(clip)"):  # the same value twice is fine
        assert opt.max_grad_norm == 2.0
