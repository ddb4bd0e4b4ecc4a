"""``fastperturb selftest``: every available backend against the reference.

On a machine with a GPU this is the one command that verifies the CUDA and
Triton kernels on real hardware: any exception a backend raises (a mismatch,
a compile error, a failed launch) is reported as FAIL with its message, and
the other backends are still checked. Without a GPU it checks the C++ CPU kernels,
the Triton kernels under the interpreter (CPU tensors; in a child process that
chooses the interpreter before importing triton) and reports the CUDA kernels as
compiled but not run. The cases are those of the test suite
(:mod:`fastperturb.testing`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..ops import dispatch
from ._args import UsageError


@dataclass
class Verdict:
    backend: str
    device: str
    status: str  # PASS, FAIL, SKIP, or "compiled, not run here"
    checked: int = 0
    cycle_ms: float | None = None
    detail: str = ""


BACKENDS = tuple(b for b in dispatch.BACKENDS if b != "auto")
DEFAULT_BACKENDS = ("cpp", "cuda", "triton")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help=f"comma-separated backends to verify, of {', '.join(BACKENDS)} (default: {','.join(DEFAULT_BACKENDS)}; "
        "reference runs the pure-PyTorch reference through the same checks)",
    )
    p.add_argument("--quick", action="store_true", help="fewer cases (the large ones are skipped)")


def _triton_in_a_child(quick: bool, report: Callable[[str], None]) -> list[Verdict]:
    """The Triton check on CPU, in a child process with ``TRITON_INTERPRET=1``: the interpreter must be chosen
    before triton is imported, and ``import fastperturb`` has already imported it here (through torch._dynamo)."""
    import fastperturb

    report("checking triton on cpu (interpreted), in a child process with TRITON_INTERPRET=1 ...")
    code = (
        "import dataclasses, json, sys\n"
        "from fastperturb.tools import selftest\n"
        f"vs = selftest.run(['triton'], quick={bool(quick)}, report=lambda s: print(s, file=sys.stderr, flush=True))\n"
        "print(json.dumps([dataclasses.asdict(v) for v in vs]))\n"
    )
    root = str(Path(fastperturb.__file__).resolve().parents[1])  # (the child imports the same fastperturb)
    path = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return [Verdict("triton", "cpu (interpreted)", "FAIL", detail=f"the child process failed: {last}"[:200])]
    return [Verdict(**d) for d in json.loads(lines[-1])]


def _cases(interpreted: bool, quick: bool):
    from fastperturb import testing

    cases = testing.standard_cases()
    if interpreted:
        # Each interpreted program instance costs milliseconds of Python.
        del cases["multi_chunk"], cases["many_small"]
        cases["many_small"] = [testing.Layer((i % 5 + 1,), testing.FLOAT_DTYPES[i % 3]) for i in range(40)]
    elif quick:
        del cases["many_small"]
    return cases


def _to(x, device: torch.device):
    from fastperturb import testing

    return testing.Inputs(*[[t.to(device) for t in lst] for lst in (x.params, x.grads, x.backups, x.accum)])


def _check_backend(backend: str, device: torch.device, cases, report: Callable[[str], None]) -> int:
    from fastperturb import testing

    checked = 0
    for name, layers in cases.items():
        x = _to(testing.make_inputs(layers, seed=len(name)), device)
        for op in testing.OPS:
            for opts in testing.option_grid(op):
                testing.check_op(op, backend, x, **opts)
                checked += 1
        report(f"  {backend} on {device.type}: {name} ok")
    return checked


def _time_cycle(backend: str, device: torch.device, interpreted: bool) -> float:
    """Median ms of one SAM cycle (norms -> ascent_step_ -> restore_)."""
    from fastperturb import ops
    from fastperturb.ops.dispatch import use_backend

    n, size = (8, 4096) if interpreted else (64, 65536)
    g = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.randn(size, generator=g).to(device) for _ in range(n)]
    grads = [torch.randn(size, generator=g).to(device) for _ in range(n)]
    backups = [torch.empty_like(p) for p in params]
    proj = torch.ones(n, device=device)

    def cycle():
        per, total = ops.norms(grads, 2.0)
        ops.ascent_step_(params, grads, backups, (0.05 / total).expand(n).contiguous(), proj, first=True)
        ops.restore_(params, backups)
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    with use_backend(backend):
        cycle()
        for _ in range(3 if interpreted else 10):
            t0 = time.perf_counter()
            cycle()
            times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def _failure(e: Exception) -> str:
    """One line saying what went wrong: the mismatch of a failed check, else the exception and its message."""
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    if not isinstance(e, AssertionError):
        first = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return first[:200]


def run(backends: list[str], quick: bool = False, report: Callable[[str], None] = print) -> list[Verdict]:
    from fastperturb.ops import native as _native
    from fastperturb.ops.dispatch import why_unavailable

    has_gpu = torch.cuda.is_available()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    targets = {
        "cpp": [cpu],
        "cuda": [cuda],
        "triton": [cuda if has_gpu else cpu],
        "reference": [cpu] + ([cuda] if has_gpu else []),
    }
    verdicts = []
    for backend in backends:
        if backend == "cuda" and not has_gpu:
            if _native.has_cuda_kernels():
                verdicts.append(Verdict(backend, "cuda", "compiled, not run here", detail="no GPU on this machine"))
            else:
                verdicts.append(Verdict(backend, "cuda", "SKIP", detail=why_unavailable("cuda", cuda)))
            continue
        if backend == "triton" and not has_gpu and _interpreter_not_chosen():
            verdicts += _triton_in_a_child(quick, report)
            continue
        for device in targets[backend]:
            interpreted = backend == "triton" and device.type == "cpu"
            label = device.type + (" (interpreted)" if interpreted else "")
            reason = why_unavailable(backend, device)
            if reason is not None:
                verdicts.append(Verdict(backend, label, "SKIP", detail=reason))
                continue
            report(f"checking {backend} on {label} ...")
            try:
                checked = _check_backend(backend, device, _cases(interpreted, quick), report)
                ms = _time_cycle(backend, device, interpreted)
                verdicts.append(Verdict(backend, label, "PASS", checked, ms))
            except Exception as e:  # a mismatch, or a compile / launch failure on real hardware
                verdicts.append(Verdict(backend, label, "FAIL", detail=_failure(e)))
    return verdicts


def _interpreter_not_chosen() -> bool:
    """Triton is installed, and this process did not choose its interpreter before importing it."""
    return importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") != "1"


def format_table(verdicts: list[Verdict]) -> str:
    rows = [("backend", "device", "verdict", "op checks", "SAM cycle", "detail")]
    for v in verdicts:
        rows.append(
            (
                v.backend,
                v.device,
                v.status,
                str(v.checked) if v.checked else "",
                f"{v.cycle_ms:.2f} ms" if v.cycle_ms is not None else "",
                v.detail,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown or not wanted:
        what = f"unknown backend(s) {', '.join(unknown)}" if unknown else "no backend given"
        raise UsageError(f"--backends {args.backends}: {what}; choose from {', '.join(BACKENDS)}")
    verdicts = run(wanted, quick=args.quick)
    print()
    print(format_table(verdicts))
    print("\nSAM cycle: norms -> ascent_step_ -> restore_ on a small list (timing is indicative only)")
    failed = [v for v in verdicts if v.status == "FAIL"]
    return 1 if failed else 0
