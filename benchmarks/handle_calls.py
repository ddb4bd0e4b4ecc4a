"""The eager call path of the handle ops: ``python -m benchmarks.handle_calls [--model small1000] [--json FILE]``.

fastperturb calls its handle ops (``*_lists``, the C++ kernels on a :class:`fastperturb.ops.TensorLists`) past two
checks that ``torch.ops`` makes on every call with a class argument (``fastperturb.ops._call_handle_op``). This
times whole cycles (the C++ kernels, the engine as the optimizers run it) both ways, alternating call by call in
one process so a slow phase of the machine moves both: ``fastperturb`` (its own path) and ``torch.ops`` (each
handle op called as ``torch.ops.fastperturb.<op>(...)``, as any caller of a custom op would). The ratio is the
figure; the times move with the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.triton_host import write_records

PRESETS = ("SAM", "APD")


def measure(model: str, rounds: int, warmup: int = 10) -> list[dict]:
    """One record per preset: median and min per cycle of both call paths, and their ratio of medians."""
    import torch

    from benchmarks import fused, shapes
    from benchmarks.suites.common import make_params
    from fastperturb import ops

    own = ops._call_handle_op

    def through_torch_ops(name: str, *args, **kwargs):
        with torch.no_grad():
            return getattr(torch.ops.fastperturb, name)(*args, **kwargs)

    paths = {"fastperturb": own, "torch.ops": through_torch_ops}
    params, pre = make_params(shapes.shapes_for(model), torch.device("cpu"))
    grads = [p.grad for p in params]
    recs = []
    try:
        for name in PRESETS:
            preset = fused.presets(3)[name]
            cycle = fused.FusedCycle(preset, params, "cpp")
            times: dict[str, list[float]] = {k: [] for k in paths}
            for r in range(warmup + rounds):
                for path in list(paths) if r % 2 else list(paths)[::-1]:
                    ops._call_handle_op = paths[path]
                    torch._foreach_copy_(grads, pre[0])  # the same g_0 for every cycle
                    t0 = time.perf_counter()
                    cycle.run()
                    if r >= warmup:
                        times[path].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            recs.append(
                {
                    "model": model,
                    "tensors": len(params),
                    "preset": f"{name}-{preset.spec.steps}" if name == "APD" else name,
                    "rounds": rounds,
                    **{f"{k} median us": round(v, 1) for k, v in med.items()},
                    **{f"{k} min us": round(min(v) * 1e6, 1) for k, v in times.items()},
                    "torch.ops / fastperturb": round(med["torch.ops"] / med["fastperturb"], 3),
                }
            )
    finally:
        ops._call_handle_op = own
    return recs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.handle_calls", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small1000", help="a built-in parameter list (benchmarks/shapes.py)")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the records to this file")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    recs = measure(args.model, args.rounds)
    for r in recs:
        print(
            f"{r['model']} ({r['tensors']} tensors) {r['preset']} cycle, median (min) of {r['rounds']} alternating "
            f"rounds: fastperturb {r['fastperturb median us']:.0f} ({r['fastperturb min us']:.0f}) us, "
            f"torch.ops {r['torch.ops median us']:.0f} ({r['torch.ops min us']:.0f}) us: "
            f"{r['torch.ops / fastperturb']:.2f}x"
        )
    write_records(args.json, recs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
