"""``fastperturb selftest``: verdicts, and that a wrong backend is caught."""

from __future__ import annotations

import torch

from fastperturb.ops import dispatch as backends
from fastperturb.ops import reference
from fastperturb.tools import selftest


def test_selftest_passes_on_cpu_backends():
    verdicts = selftest.run(["cpp", "cuda", "reference"], quick=True, report=lambda s: None)
    by = {v.backend: v for v in verdicts}
    assert by["cpp"].status == "PASS" and by["cpp"].checked > 100
    assert by["reference"].status == "PASS"
    # no GPU here: the CUDA kernels are either compiled-but-not-run or not built
    assert by["cuda"].status in ("compiled, not run here", "SKIP")
    table = selftest.format_table(verdicts)
    assert "cpp" in table and "PASS" in table


def test_selftest_reports_a_wrong_backend(monkeypatch):
    real = backends.op

    def broken(name, backend):
        if backend == "reference" or name != "restore_":
            return real(name, backend)

        def bad_restore(params, backups):  # off by one ulp somewhere
            reference.restore_(params, backups)
            for p in params:
                if p.numel():
                    p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(float("inf"), dtype=p.dtype))
                    break

        return bad_restore

    monkeypatch.setattr(backends, "op", broken)
    (v,) = selftest.run(["cpp"], quick=True, report=lambda s: None)
    assert v.status == "FAIL" and "restore_" in v.detail


def test_selftest_reports_any_exception_as_fail(monkeypatch):
    """A backend that crashes (a compile error or failed launch on real hardware) is a FAIL
    with the exception's type and message, and the next backend is still checked."""
    real = backends.op

    def crashing(name, backend):
        if backend == "cpp" and name == "norms":

            def launch_failure(*args, **kwargs):
                raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

            return launch_failure
        return real(name, backend)

    monkeypatch.setattr(backends, "op", crashing)
    cpp, ref = selftest.run(["cpp", "reference"], quick=True, report=lambda s: None)
    assert cpp.status == "FAIL"
    assert cpp.detail == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert ref.status == "PASS"
    assert selftest.main(type("Args", (), {"backends": "cpp", "quick": True})()) == 1


def test_selftest_cli_rejects_unknown_backend(capsys):
    from fastperturb.cli import main

    assert main(["selftest", "--backends", "cpp,tpu"]) == 2
    err = capsys.readouterr().err
    assert "tpu" in err and "reference" in err and err.count("\n") == 1
    assert main(["selftest", "--backends", " , "]) == 2  # an empty list was an empty table and exit 0
    assert "no backend given" in capsys.readouterr().err


def test_selftest_checks_triton_under_the_interpreter_in_a_child_process():
    """``import fastperturb`` imports triton (through torch._dynamo) before the command could choose the
    interpreter, so on a CPU-only machine the Triton check was always skipped ("set TRITON_INTERPRET=1 ..."); it
    now runs in a child process that sets it first."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        import pytest

        pytest.skip("needs triton installed and no GPU")
    assert os.environ.get("TRITON_INTERPRET") != "1", "the case this test is about"
    lines = []
    (v,) = selftest.run(["triton"], quick=True, report=lines.append)
    assert (v.backend, v.device, v.status) == ("triton", "cpu (interpreted)", "PASS"), v
    assert v.checked > 100 and any("child process" in line for line in lines)
