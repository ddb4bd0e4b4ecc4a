"""The host side of the Triton ops: ``python -m benchmarks.triton_host [--tensors 1000] [--json FILE]``.

On a GPU the Triton kernels of a SAM cycle take microseconds; what decides the op time there is the work the
host does before each launch (validation, the launch plan, its device buffer). This times that work alone: the
kernel launches are stubbed out (counted, not run), so it runs anywhere Triton imports, under the interpreter
on CPU tensors (the process re-runs itself with ``TRITON_INTERPRET=1`` when needed). Every op is timed called
with tensor lists (the plan rebuilt on every call) and on a :class:`fastperturb.ops.TensorLists` handle (the
plan and its buffer cached, only the scalars rewritten), after a first call, on ``--tensors`` tensors of
``--numel`` float32 elements each. The tensors' size does not matter to the host side.

The handle calls are timed on the handle the optimizers build, whose backups and accumulators are their own
buffers (``private_buffers=True``: fingerprinted once, the params on every call), twice: on unchanged gradients
(``handle``), and with every ``.grad`` replaced by another tensor before each call (``new .grad``, as in
training, where the gradients are released before each backward; two sets of gradient tensors alternate, so
every pointer changes; the replacing is not timed). ``checked`` is a handle on buffers the caller may change, whose
fingerprints are re-checked on every call too (on unchanged gradients). ``ascent_coefficients`` (the engine's
per-tensor coefficients, between the passes) takes ``[n]``-vectors, not lists: one row, ``vectors``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Callable


def _best_us(fn: Callable[[], object], reps: int, rounds: int) -> tuple[float, float]:
    """(min, median) over ``rounds`` of the mean time of ``reps`` calls, in microseconds."""
    fn()
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        per.append((time.perf_counter() - t0) / reps * 1e6)
    per.sort()
    return per[0], per[len(per) // 2]


def _per_call_us(fn: Callable[[], object], before: Callable[[], object], calls: int) -> tuple[float, float]:
    """(min, median) of the time of one call of ``fn``, ``before()`` run (untimed) before each, in microseconds."""
    before()
    fn()
    per = []
    for _ in range(calls):
        before()
        t0 = time.perf_counter()
        fn()
        per.append((time.perf_counter() - t0) * 1e6)
    per.sort()
    return per[0], per[len(per) // 2]


def measure(n: int, numel: int, reps: int, rounds: int) -> list[dict]:
    """The records (one per op and way of calling it), with the kernel launches stubbed out meanwhile."""
    from fastperturb.ops.triton import coefficient_impls, impls

    launches = []
    real = impls.launch, coefficient_impls.launch
    stub = lambda kernel, grid, *a, **k: launches.append(grid)  # noqa: E731  (the host work only)
    impls.launch = coefficient_impls.launch = stub
    try:
        return _measure(n, numel, reps, rounds, launches)
    finally:
        impls.launch, coefficient_impls.launch = real


def _measure(n: int, numel: int, reps: int, rounds: int, launches: list) -> list[dict]:
    import torch

    from fastperturb import ops
    from fastperturb.ops import dispatch

    torch.manual_seed(0)
    params = [torch.randn(numel) for _ in range(n)]
    for p in params:
        p.grad = torch.randn_like(p)
    backups = [torch.empty_like(p) for p in params]
    accum = [torch.zeros_like(p) for p in params]
    grads = [p.grad for p in params]
    spare = [g.clone() for g in grads]
    private = ops.TensorLists(params, backups, accum, private_buffers=True)
    checked = ops.TensorLists(params, backups, accum)
    swaps = [0]

    def new_grads() -> None:  # every .grad replaced by another tensor (alternating between two sets)
        swaps[0] += 1
        for p, g in zip(params, spare if swaps[0] % 2 else grads):
            p.grad = g

    step = torch.full((n,), 1e-3)
    proj = torch.ones(n)
    cases = {
        "restore_": (lambda: ops.restore_(params, backups), lambda lists: ops.restore_lists_(lists)),
        "grad_stats_": (lambda: ops.grad_stats_(grads), lambda lists: ops.grad_stats_lists_(lists)),
        "grad_stats_ (accum, delta)": (
            lambda: ops.grad_stats_(grads, accum, params, backups, accum_weight=0.5),
            lambda lists: ops.grad_stats_lists_(
                lists, with_accum=True, with_params=True, with_backups=True, accum_weight=0.5
            ),
        ),
        "ascent_step_": (
            lambda: ops.ascent_step_(params, grads, backups, step, proj, first=True),
            lambda lists: ops.ascent_step_lists_(lists, step, proj, first=True),
        ),
        "combine_grads_": (
            lambda: ops.combine_grads_(grads, accum, 0.5),
            lambda lists: ops.combine_grads_lists_(lists, 0.5),
        ),
        "norms": (lambda: ops.norms(params), lambda lists: ops.norms_lists(lists)),
        # the restore before the check of G: two list ops, one handle op
        "restore_ + norms of .grad": (
            lambda: (ops.restore_(params, backups), ops.norms(grads)),
            lambda lists: ops.restore_norms_lists_(lists),
        ),
    }
    out = []

    def record(name: str, how: str, lo: float, med: float, per_call: int) -> None:
        out.append(
            {
                "op": name,
                "call": how,
                "tensors": n,
                "min_us": round(lo, 1),
                "median_us": round(med, 1),
                "launches_per_call": per_call,
            }
        )

    with dispatch.use_backend("triton"):
        for name, (with_lists, on_handle) in cases.items():
            for how, fn in (
                ("lists", with_lists),
                ("handle", lambda: on_handle(private)),
                ("checked", lambda: on_handle(checked)),
            ):
                launches.clear()
                fn()
                per_call = len(launches)
                record(name, how, *_best_us(fn, reps, rounds), per_call)
            lo, med = _per_call_us(lambda: on_handle(private), new_grads, reps * rounds)
            record(name, "new .grad", lo, med, per_call)
            for p, g in zip(params, grads):
                p.grad = g
        # the engine's per-tensor ascent coefficients between the passes: one call on [n]-vectors, no plan
        stats = torch.rand(n, 3)
        eta = torch.full((n,), 1e-3, dtype=torch.float64)
        for project in (False, True):
            fn = lambda: ops.ascent_coefficients(stats, eta, eta, global_scope=False, project=project)  # noqa: E731
            launches.clear()
            fn()
            per_call = len(launches)
            name = "ascent_coefficients" + (" (proj)" if project else "")
            record(name, "vectors", *_best_us(fn, reps, rounds), per_call)
    return out


def host_arguments(module: str, doc: str, numel: int) -> argparse.ArgumentParser:
    """The options of a host-side benchmark (this one, ``worklist_host``)."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc.split("\n")[0])
    p.add_argument("--tensors", type=int, default=1000)
    p.add_argument("--numel", type=int, default=numel)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", default=None, help="also write the records to this file")
    return p


def write_records(path: str | None, recs: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"loadavg": os.getloadavg(), "records": recs}, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    args = host_arguments("triton_host", __doc__, numel=16).parse_args(argv)
    if importlib.util.find_spec("triton") is None:
        print("benchmarks.triton_host: needs Triton (pip install 'triton>=3.8')", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be chosen before triton is imported, and importing this package already imports
        # it (fastperturb imports torch._dynamo, which probes for triton): run again in a child that has it.
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "benchmarks.triton_host", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.call(cmd, env=env)
    import torch

    recs = measure(args.tensors, args.numel, args.reps, args.rounds)
    print(
        f"Triton host side per op call, launches stubbed; {args.tensors} tensors; torch threads "
        f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'op':28s} {'call':9s} {'min us':>9s} {'median us':>10s} {'launches':>9s}")
    for r in recs:
        print(f"{r['op']:28s} {r['call']:9s} {r['min_us']:9.1f} {r['median_us']:10.1f} {r['launches_per_call']:9d}")
    write_records(args.json, recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
