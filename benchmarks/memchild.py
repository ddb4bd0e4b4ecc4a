"""Child process of the memory suite: N steps of one implementation, then its peak RSS as JSON.

    python -m benchmarks.memchild --model bert-base --impl proxy-AWP --steps 20

Baseline = RSS after building the parameters, their gradients and one
precomputed gradient set (3 parameter-sized sets), before the optimizer is
constructed; peak = the kernel's peak-RSS mark (VmHWM, reset via
``/proc/self/clear_refs`` at the baseline; ``ru_maxrss`` where that is not
allowed) after the steps. The synthetic closure copies
the precomputed gradient into ``.grad`` (reusing the harness's buffers).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the import's transient peak does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make(a, params, pre):
    """The step function of implementation ``a.impl`` on ``params`` (with ``.label``), or None."""
    from . import fused, peers, suites

    presets = fused.presets(a.apd_steps)
    family = a.impl.split(".")[-1].split("-")[-1]
    preset = presets[family]
    k = preset.spec.steps
    closure = suites.SyntheticClosure(params, pre)
    base = peers.NoOpOptimizer
    extra = None
    if a.impl.startswith("fastperturb."):
        wrapper = fused.wrapper_class(family)
        opt = wrapper(params, base, **preset.kwargs) if wrapper else fused.EngineStep(params, base(params), preset)
        label = "wrapper" if wrapper else "engine"
    elif a.impl == "foreach.SAM":
        opt, label = peers.ForeachSAM(params, preset.radius, base=base(params)), "foreach"
    elif a.impl == "foreach.AWP":
        opt, label = peers.ForeachAWP(fused.select(preset, params), preset.radius, base=base(params)), "foreach"
    elif a.impl == "foreach.APD":
        opt = peers.ForeachAPD(params, preset.radius, k, preset.step_size, preset.spec.include_clean, base=base(params))
        label = "foreach"
    elif a.impl == "loop-SAM":
        opt, label = peers.LoopSAM(params, base, rho=preset.radius), "peer"
    elif a.impl == "pytorch-optimizer-SAM":
        opt, label = peers.pytorch_optimizer_sam(params, base, rho=preset.radius), "peer"
    elif a.impl == "proxy-AWP":
        opt = peers.ProxyAWP(peers.ParamModule(params), base(params), gamma=preset.radius)
        extra, label = closure.for_module(), "peer"
    elif a.impl == "deep-copy-APD":
        opt = peers.DeepCopyAPD(
            params, base, eps=preset.radius, steps=k, eta=preset.step_size, include_clean=preset.spec.include_clean
        )
        label = "peer"
    else:
        print(f"unknown --impl {a.impl!r}", file=sys.stderr)
        return None
    step = (lambda: opt.step(closure, extra)) if extra else suites._wrap_step(opt, closure, None, k)
    step.label = label
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--impl", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--apd-steps", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=0.0, help="stop after this long (0: run all steps)")
    ap.add_argument("--min-steps", type=int, default=3)
    a = ap.parse_args(argv)

    from . import shapes, suites

    def build(model: str):
        shp = shapes.shapes_for(model)
        params, pre = suites.make_params(shp, torch.device("cpu"), grad_sets=1, cheap=True)
        return params, pre

    # Warm the runtime up first with the same implementation on a tiny list: the
    # first calls of many ops load code and allocate caches (~100+ MB of RSS)
    # that have nothing to do with the implementation's memory.
    wparams, wpre = build("tiny")
    wstep = make(a, wparams, wpre)
    if wstep is None:
        return 2
    for _ in range(2):
        wstep()
    del wstep, wparams, wpre
    gc.collect()

    params, pre = build(a.model)
    pbytes = sum(p.numel() * p.element_size() for p in params)
    gc.collect()
    reset_ok = reset_peak()
    baseline = rss_bytes()  # before the optimizer exists: its construction-time buffers count
    step = make(a, params, pre)
    label = step.label
    # The peak is reached within the first steps (buffers are allocated lazily,
    # then reused); the per-step marks show it. --max-seconds caps the slow peers
    # (after at least --min-steps) so a default run stays short.
    t0 = time.perf_counter()
    marks = []
    done = 0
    for _ in range(a.steps):
        step()
        done += 1
        marks.append(peak_bytes(reset_ok) - baseline)
        if done >= a.min_steps and a.max_seconds and time.perf_counter() - t0 > a.max_seconds:
            break
    peak = peak_bytes(reset_ok)
    gc.collect()
    end = rss_bytes()
    over = max(peak - baseline, 0)
    print(
        json.dumps(
            {
                "impl_kind": label,
                "steps": done,
                "steps_asked": a.steps,
                "step_s": (time.perf_counter() - t0) / max(done, 1),
                "peak_overhead_by_step": marks,
                "param_bytes": pbytes,
                "baseline_rss": baseline,
                "peak_rss": peak,
                "peak_method": "VmHWM after clear_refs" if reset_ok else "ru_maxrss (lifetime)",
                "end_rss": end,
                "overhead_bytes": over,
                "overhead_x_params": over / pbytes,
                "retained_x_params": max(end - baseline, 0) / pbytes,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
