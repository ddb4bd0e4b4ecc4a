"""Zeroing the gradients in place against releasing them, on real models with a real backward.

Before each pass that must start from cleared gradients, ``PerturbOptimizer`` either zeroes
them (``grad_clearing="zero"``: fused into the ascent step, one write over the gradient bytes,
and the backward then adds into them) or releases them (``"release"``: ``.grad = None``, the
backward stores its fresh gradient). Which is faster depends on what allocating a fresh
gradient costs, so it is timed here with the models of :mod:`benchmarks.train_loop`, forward
and backward included, both settings on copies of one model interleaved round-robin, in the
drop-in loop (``loss.backward(); opt.step(closure); opt.zero_grad()``) and the clean-pass
convention (``opt.step(closure)`` alone). Both settings must end with the same weights
(checked, printed). Besides the median time, the minor page faults per step are counted
(``getrusage``; a fresh allocation the C allocator maps from the OS faults once per page): unlike
times, they do not depend on what else the machine runs.

Run: ``python -m benchmarks.clearing [--reps N] [--threads T] [--models mlp,resnet]``.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import torch
import torch.nn.functional as Fn

import fastperturb as fp

from . import train_loop

MODES = ("zero", "release")


def _stepper(model, opt, x, y, convention: str):
    def closure():
        loss = Fn.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def step():
        if convention == "dropin":
            closure()
            opt.step(closure)
            opt.zero_grad()
        else:
            opt.step(closure)

    return step


def measure(model_name: str, convention: str, reps: int, batch: int = 64) -> dict:
    """Median seconds per SAM step (SGD base) for each clearing mode, and whether the weights agree."""
    torch.manual_seed(0)
    base = {"mlp": train_loop.mlp, "resnet": train_loop.resnet_cnn}[model_name]()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    runs = {}
    for mode in MODES:
        model = copy.deepcopy(base)
        opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01)
        opt.grad_clearing = mode
        runs[mode] = (model, _stepper(model, opt, x, y, convention), [], [])
    for _ in range(2):  # warm-up (allocator, first-step state)
        for _, step, _, _ in runs.values():
            step()
    order = list(runs.values())
    for r in range(reps):
        for _, step, times, faults in order[r % 2 :] + order[: r % 2]:  # the starting one alternates
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    a, b = (runs[m][0] for m in MODES)
    same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    out = {m: statistics.median(runs[m][2]) for m in MODES}
    out.update({f"{m}_faults": statistics.median(runs[m][3]) for m in MODES})
    out["same_weights"] = same
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="mlp,resnet")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as f:
        print(f"load average at start: {f.read().split()[:3]}, threads {args.threads}")
    for name in args.models.split(","):
        for convention in ("dropin", "clean"):
            r = measure(name, convention, args.reps)
            print(
                f"{name:7s} {convention:7s} zero {r['zero'] * 1e3:8.2f} ms  release {r['release'] * 1e3:8.2f} ms  "
                f"release/zero {r['release'] / r['zero']:.3f}  page faults per step: zero {r['zero_faults']:.0f}, "
                f"release {r['release_faults']:.0f}  same weights: {r['same_weights']}"
            )


if __name__ == "__main__":
    main()
