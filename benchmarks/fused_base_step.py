"""The fused base step (issue 14): SAM + AdamW, fused restore + update against fastperturb's SAM with
``torch.optim.AdamW(fused=True)`` and ``(foreach=True)``, side by side in one run.

``python -m benchmarks.fused_base_step [--model bert-base] [--reps 10] [--out benchmarks/results]``
from the repository root. Each implementation takes whole ``step(closure)`` calls with the synthetic
closure of the ``step`` suite (it copies precomputed gradients, no model); the time each step spent in its
own two closure calls (g_0 and the perturbed pass) is subtracted from that step's time, as the ``step``
suite's ``optimizer_s`` does (the closure alone is timed too, for reference). The implementations run
round-robin (``timing.run_interleaved``), with the triad bandwidth measured in the same run.

Also timed alone, per kernel: the fused ``restore_adam_step_``, ``restore_`` and torch's AdamW
step (fused and foreach), each with its byte count (passes over the parameter bytes) and the
bandwidth it reached, so a missed target can be traced to the kernel that holds it back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Callable

import torch

import fastperturb as fp
from fastperturb import ops

from . import shapes, timing
from .suites.common import make_params
from .suites.step import SyntheticClosure, _closure_timed

LR, WD, RHO = 1e-4, 0.01, 0.05

# Passes over the parameter bytes (float32) of each piece, counted from what it reads and writes.
PASSES = {
    "restore_adam_step_ (fused)": 7,  # reads backup, G, exp_avg, exp_avg_sq; writes w, exp_avg, exp_avg_sq
    "restore_": 2,  # reads backup, writes w
    "AdamW(fused=True).step": 7,  # reads w, G, exp_avg, exp_avg_sq; writes w, exp_avg, exp_avg_sq
    "AdamW(foreach=True).step": 7,  # the same data (several passes in fact: one per foreach op)
}


def _sam(params, **kwargs):
    return fp.SAM(params, torch.optim.AdamW, rho=RHO, lr=LR, weight_decay=WD, **kwargs)


def _step_candidates(params, pre):
    impls = {
        "SAM + AdamW, fused_step=True": lambda: _sam(params, fused_step=True),
        "SAM + AdamW(fused=True)": lambda: _sam(params, fused=True),
        "SAM + AdamW(foreach=True)": lambda: _sam(params, foreach=True),
    }
    cands, opts, spent = [], {}, {}
    for name, make in impls.items():
        opt = make()
        closure = SyntheticClosure(params, pre)

        def step(opt=opt, closure=closure):
            closure.callers_backward()  # g_0 by the caller, as in the usual SAM loop
            opt.step(closure)

        step, spent[name] = _closure_timed(step, closure)
        cands.append(timing.Candidate(name, step))
        opts[name] = opt
    return cands, opts, spent


def _kernel_candidates(params, pre):
    """Each piece alone, on its own copies (the parameters are not touched)."""
    ws = [p.detach().clone() for p in params]
    backups = [p.detach().clone() for p in params]
    grads = [g.clone() for g in pre[0]]
    m = [torch.zeros_like(p) for p in ws]
    v = [torch.zeros_like(p) for p in ws]
    state = {"step": 0.0}

    def fused_op():
        state["step"] += 1
        ops.restore_adam_step_(
            ws,
            backups,
            grads,
            m,
            v,
            [],
            lr=LR,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            step=state["step"],
            weight_decay=WD,
            decoupled_weight_decay=True,
        )

    def torch_step(**flags) -> Callable[[], None]:
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, g in zip(ps, grads):
            p.grad = g
        opt = torch.optim.AdamW(ps, lr=LR, weight_decay=WD, **flags)
        return opt.step

    return [
        timing.Candidate("restore_adam_step_ (fused)", fused_op),
        timing.Candidate("restore_", lambda: ops.restore_(ws, backups)),
        timing.Candidate("AdamW(fused=True).step", torch_step(fused=True)),
        timing.Candidate("AdamW(foreach=True).step", torch_step(foreach=True)),
    ]


def run(model: str, reps: int, budget_s: float) -> dict:
    device = torch.device("cpu")
    shp = shapes.shapes_for(model)
    params, pre = make_params(shp, device, grad_sets=2)
    nbytes = sum(p.numel() for p in params) * 4
    bw = timing.measure_bandwidth(device)
    triad = bw["triad_gbps"] or bw["triad_gbps_best_seen"]

    probe = timing.Candidate("closure", SyntheticClosure(params, pre))
    timing.run_interleaved([probe], device, reps=reps, budget_s=budget_s)
    closure_s = statistics.median(probe.times)

    cands, opts, spent = _step_candidates(params, pre)
    timing.run_interleaved(cands, device, reps=reps, budget_s=budget_s)
    steps = {}
    for c in cands:
        if c.error:
            steps[c.name] = {"error": c.error}
            continue
        # each sample minus its own two closure calls (the timed calls are the last ones made)
        own = [t - s for t, s in zip(c.times, spent[c.name][-len(c.times) :])]
        steps[c.name] = {
            "median_s": statistics.median(c.times),
            "optimizer_s": statistics.median(own),
            "min_optimizer_s": min(own),
            "reps": len(c.times),
        }
    fused_name = "SAM + AdamW, fused_step=True"
    assert opts[fused_name].fused_step_fallback is None, opts[fused_name].fused_step_fallback
    del cands, opts

    kcands = _kernel_candidates(params, pre)
    timing.run_interleaved(kcands, device, reps=reps, budget_s=budget_s)
    kernels = {}
    for c in kcands:
        if c.error:
            kernels[c.name] = {"error": c.error}
            continue
        med = statistics.median(c.times)
        passes = PASSES[c.name]
        kernels[c.name] = {
            "median_s": med,
            "min_s": min(c.times),
            "passes": passes,
            "gbps": passes * nbytes / med / 1e9,
            "x_bound": med / (passes * nbytes / (triad * 1e9)),
        }
    return {
        "model": model,
        "n_tensors": len(params),
        "n_params": nbytes // 4,
        "threads": torch.get_num_threads(),
        "load_average": timing.load_average(),
        "bandwidth": bw,
        "closure_s": closure_s,
        "steps": steps,
        "kernels": kernels,
    }


def report(r: dict) -> str:
    bw = r["bandwidth"]
    lines = [
        f"fused base step, {r['model']} ({r['n_tensors']} tensors, {r['n_params']:,} parameters, float32), "
        f"{r['threads']} threads, load average {r['load_average']}",
        f"triad {bw['triad_gbps_best_seen']:.1f} GB/s (stable: {bw['unstable'] is None}), "
        f"closure (one gradient copy) {1e3 * r['closure_s']:.1f} ms alone; each step's own two calls subtracted",
        "",
        "Passes over the parameter bytes per SAM step (closure excluded; the gradients are released, not"
        " zeroed, before the perturbed pass): unfused 15 = g_0 statistics 1 + ascent 4 + restore 2 + the check"
        " of G 1 + AdamW 7; fused 13 (restore folded into the AdamW pass): at the bandwidth bound the fused"
        " path can be at most 15/13 = 1.15x faster.",
        "",
        "| SAM + AdamW step (closure excluded) | median ms | speed-up | best ms | speed-up (best) |",
        "|---|---|---|---|---|",
    ]
    steps = r["steps"]
    fused = steps["SAM + AdamW, fused_step=True"].get("optimizer_s")
    for name, s in steps.items():
        if "error" in s:
            lines.append(f"| {name} | error: {s['error']} | |")
            continue
        ratio = f"{s['optimizer_s'] / fused:.2f}x" if fused else ""
        best = steps["SAM + AdamW, fused_step=True"].get("min_optimizer_s")
        bratio = f"{s['min_optimizer_s'] / best:.2f}x" if best else ""
        lines.append(
            f"| {name} | {1e3 * s['optimizer_s']:.1f} | {ratio} | {1e3 * s['min_optimizer_s']:.1f} | {bratio} |"
        )
    lines += [
        "",
        "| kernel alone | median ms | best ms | passes | GB/s (median) | x triad bound |",
        "|---|---|---|---|---|---|",
    ]
    for name, k in r["kernels"].items():
        if "error" in k:
            lines.append(f"| {name} | error: {k['error']} | | | |")
            continue
        lines.append(
            f"| {name} | {1e3 * k['median_s']:.1f} | {1e3 * k['min_s']:.1f} | {k['passes']} | {k['gbps']:.1f} "
            f"| {k['x_bound']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.fused_base_step", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per comparison (caps the reps)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="directory for fused-base-step-<model>.{json,txt}")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args.model, args.reps, args.budget)
    text = report(r)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, f"fused-base-step-{args.model}")
        with open(base + ".json", "w") as f:
            json.dump(r, f, indent=1)
        with open(base + ".txt", "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
