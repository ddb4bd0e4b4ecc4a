"""The host side of the CUDA kernels' ops: ``python -m benchmarks.worklist_host [--tensors 1000] [--json FILE]``.

On a GPU the CUDA work list's kernels of a SAM cycle take microseconds; the host work before the launches
(lists marshalled through ``torch.ops``, the checks, the plan, the kernel arguments) decides the op time for a
long list of small tensors. There is no GPU here, so this runs that host code on the test build's CPU executor
of the work list (``fastperturb._C_testing``, ``torch.ops.fastperturb_worklist``) with one emulated lane per block
and ``--numel`` elements per tensor, where each "launch" costs about what walking its blocks' tables costs: the
figures are the host code's plus that walk, an upper bound on the host side of a GPU call. Each op is timed
called with tensor lists (the ``.grad`` list built per call, as the facade does; the plan made per call) and on
a :class:`fastperturb.ops.TensorLists` handle (the plan cached, the gradients read from ``.grad`` in C++). Needs
a test build (``FASTPERTURB_BUILD_TESTING=1``).
"""

from __future__ import annotations

import os
import sys

from benchmarks.triton_host import _best_us, host_arguments, write_records


def measure(n: int, numel: int, reps: int, rounds: int) -> list[dict]:
    """One record per op and way of calling it."""
    import torch

    import fastperturb._C_testing  # noqa: F401  (registers torch.ops.fastperturb_worklist)
    from fastperturb import ops

    W = torch.ops.fastperturb_worklist
    params = [torch.randn(numel) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(numel)
    backups = [p.clone() for p in params]
    h = ops.TensorLists(params, backups, [p.clone() for p in params], private_buffers=True).handle

    def grads():
        return [p.grad for p in params]

    rows = {
        "norms of .grad": (lambda: W.norms(grads(), 2.0), lambda: W.norms_lists(h, 2.0, of_grads=True)),
        "restore_": (lambda: W.restore_(params, backups), lambda: W.restore_lists_(h)),
        "restore_ + norms of .grad": (
            lambda: (W.restore_(params, backups), W.norms(grads(), 2.0)),
            lambda: W.restore_norms_lists_(h, 2.0),
        ),
        "grad_stats_ (params, backups)": (
            lambda: W.grad_stats_(grads(), [], params, backups),
            lambda: W.grad_stats_lists_(h, with_accum=False, with_params=True, with_backups=True),
        ),
    }
    old = W.configure(0, 0, 0, 1, 0)  # one lane per block: the executor's walk of a block costs next to nothing
    try:
        out = []
        for name, (lists_call, handle_call) in rows.items():
            for call, fn in (("lists", lists_call), ("handle", handle_call)):
                lo, med = _best_us(fn, reps, rounds)
                out.append({"op": name, "call": call, "min_us": lo, "median_us": med})
        return out
    finally:
        W.configure(*old)


def main(argv: list[str] | None = None) -> int:
    args = host_arguments("worklist_host", __doc__, numel=1).parse_args(argv)
    import torch

    torch.set_num_threads(1)
    recs = measure(args.tensors, args.numel, args.reps, args.rounds)
    print(
        f"CUDA work list host side per op call, on the CPU executor (1 lane per block); {args.tensors} tensors of "
        f"{args.numel} element(s); load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'op':30s} {'call':7s} {'min us':>9s} {'median us':>10s}")
    for r in recs:
        print(f"{r['op']:30s} {r['call']:7s} {r['min_us']:9.1f} {r['median_us']:10.1f}")
    write_records(args.json, recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
