"""Trustworthy timing: warm-up, repetitions, interleaving, bandwidth, environment.

* Each implementation is warmed up, then the implementations being compared run
  **round-robin** (one call of each per round, in a fresh seeded random order
  each round), so drift in machine load hits all of them alike.
* Reported: median and min-max of the repetitions. Slow implementations get
  fewer repetitions (at least ``min_reps``) so one slow peer cannot blow the
  time budget; the number taken is recorded.
* On CUDA each call is timed with CUDA events after a synchronize; on CPU with
  ``time.perf_counter``.
* :func:`measure_bandwidth` times a large in-place triad ``a += s*b`` with the
  run's thread count, repeated until its best samples agree: the memory
  bandwidth the byte models are divided by (none if it never became stable).
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch


@dataclass
class Candidate:
    """One implementation to time: ``fn`` is timed; ``prepare`` (untimed) runs before each call."""

    name: str
    fn: Callable[[], object]
    prepare: Optional[Callable[[], object]] = None
    times: list[float] = field(default_factory=list)
    error: Optional[str] = None
    #: the round of each of ``times`` (run_interleaved), to pair it with the probe's sample of that round
    rounds: list[int] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds taken by one call of ``fn`` (device-synchronised)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_interleaved(
    cands: Sequence[Candidate],
    device: torch.device,
    *,
    warmup: int = 2,
    reps: int = 10,
    min_reps: int = 3,
    budget_s: float = 5.0,
    tick: Optional[Callable[[], None]] = None,
    probe: Optional[Candidate] = None,
) -> None:
    """Fill ``c.times`` for every candidate; a candidate that raises gets ``c.error`` and is dropped.

    ``probe`` (see :func:`triad_probe`): timed once in every round, in its place among the candidates (a new
    random order each round), so each candidate sample has a bandwidth sample taken under the same conditions
    (:func:`paired_ratios`). It takes no part in the warm-up estimates or the repetition targets.
    """
    est: dict[str, float] = {}
    for c in [*cands, *([probe] if probe else [])]:  # warm-up, also round-robin
        c.times, c.rounds = [], []
    for w in range(max(warmup, 1)):
        for c in [*cands, *([probe] if probe and w == 0 else [])]:
            if c.error:
                continue
            if w >= 2 and est.get(c.name, 0.0) > budget_s / 3:
                # A slow implementation needs two warm-up calls, not several: the first pays the first touch of
                # new buffers (a BERT-base cycle 0.16 s cold, 0.064 s warm), and the repetitions are counted from
                # the last (from the first, 3 samples were taken where 10 fit the budget)
                continue
            try:
                if c.prepare:
                    c.prepare()
                est[c.name] = time_call(c.fn, device)
            except Exception as e:  # reported, not fatal: the other candidates still run
                c.error = f"{type(e).__name__}: {e}"
    target = {c.name: max(min_reps, min(reps, int(budget_s / max(est.get(c.name, 1e-9), 1e-9)))) for c in cands}
    rounds = max(target.values(), default=0)
    live = [c for c in cands if not c.error]
    if probe is not None and not probe.error and live:
        live.append(probe)
        target[probe.name] = rounds
    # A fresh order every round (seeded: runs are repeatable): a fixed rotation put the same implementation right
    # after the probe, which flushes the caches, and another right after it on the same tensors, most rounds.
    shuffle = random.Random(0x5EED)
    for r in range(rounds):
        order = shuffle.sample(live, len(live))
        for c in order:
            if len(c.times) >= target[c.name] or c.error:
                continue
            try:
                if c.prepare:
                    c.prepare()
                c.times.append(time_call(c.fn, device))
                c.rounds.append(r)
            except Exception as e:
                c.error = f"{type(e).__name__}: {e}"
        if tick:
            tick()


def triad_probe(device: torch.device, numel: int) -> tuple[Candidate, int]:
    """A bandwidth probe for :func:`run_interleaved`: the in-place triad of :func:`measure_bandwidth` on
    ``numel`` float32 each, and the bytes one call moves."""
    a = torch.ones(numel, device=device)
    b = torch.full((numel,), 1e-7, device=device)
    return Candidate("triad probe", lambda: a.add_(b, alpha=0.5)), 3 * numel * a.element_size()


def paired_ratios(cand: Candidate, probe: Candidate, probe_bytes: int, nbytes: float) -> list[float]:
    """Each sample of ``cand`` over the bound computed from the probe's sample of the same round: time
    x (bytes the probe moved per second in that round) / ``nbytes``. Rounds the probe missed are skipped."""
    by_round = dict(zip(probe.rounds, probe.times))
    return [t * (probe_bytes / by_round[r]) / nbytes for t, r in zip(cand.times, cand.rounds) if r in by_round]


def summary(times: Sequence[float]) -> dict:
    if not times:
        return {}
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "reps": len(times),
    }


def bandwidth_verdict(samples: Sequence[float], tolerance: float = 0.10, agree: int = 3) -> Optional[str]:
    """None if the best ``agree`` samples lie within ``tolerance`` of the best one, else why not.

    The best sample is the bound the cycle times are divided by; it is trusted only when it was reached
    repeatedly: one lucky sample (a cache hit, a quiet moment) or a probe swamped by other processes
    would make every "x bound" figure of the run noise.
    """
    if len(samples) < agree:
        return f"only {len(samples)} samples"
    top = sorted(samples, reverse=True)[:agree]
    if top[-1] < (1 - tolerance) * top[0]:
        return (
            f"the best {agree} of {len(samples)} triad samples spread {top[-1]:.1f}-{top[0]:.1f} GB/s "
            f"(all: {min(samples):.1f}-{max(samples):.1f}), more than {100 * tolerance:.0f}% apart"
        )
    return None


def measure_bandwidth(
    device: torch.device, numel: int = 1 << 25, reps: int = 7, max_rounds: int = 4, tolerance: float = 0.10
) -> dict:
    """In-place triad ``a += s*b`` (reads a and b, writes a) and a copy, on ``numel`` float32 each.

    Repeats rounds of ``reps`` samples until the best samples agree (:func:`bandwidth_verdict`), at most
    ``max_rounds``. Returns the best and median GB/s (1 GB = 1e9 bytes); ``triad_gbps`` (the bound the
    cycle times are compared with: what this machine's memory system delivered to a simple streaming
    kernel in this very run) is None when the probe never became stable, with the reason in
    ``unstable``: then no bound is printed rather than a noisy one.
    """
    a = torch.ones(numel, device=device)
    b = torch.full((numel,), 1e-7, device=device)
    c = torch.empty_like(a)
    nbytes = a.numel() * a.element_size()
    triad: list[float] = []
    copy: list[float] = []
    time_call(lambda: (a.add_(b, alpha=0.5), c.copy_(a)), device)  # warm-up: page faults
    why: Optional[str] = "not measured"
    rounds = 0
    while rounds < max_rounds and why is not None:
        rounds += 1
        for _ in range(reps):
            t = time_call(lambda: a.add_(b, alpha=0.5), device)
            u = time_call(lambda: c.copy_(a), device)
            triad.append(3 * nbytes / t / 1e9)
            copy.append(2 * nbytes / u / 1e9)
        why = bandwidth_verdict(triad, tolerance)
    return {
        "triad_gbps": max(triad) if why is None else None,
        "triad_gbps_best_seen": max(triad),
        "triad_gbps_median": statistics.median(triad),
        "copy_gbps": max(copy),
        "copy_gbps_median": statistics.median(copy),
        "samples": len(triad),
        "rounds": rounds,
        "unstable": why,
        "numel": numel,
        "threads": torch.get_num_threads(),
        "note": "in-place triad a.add_(b, alpha=s): 3 x 4 bytes per element; copy: 2 x 4",
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> Optional[str]:
    try:
        from importlib import metadata

        return metadata.version(mod)
    except Exception:
        return None


def _git_commit() -> Optional[dict]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except Exception:
        return None


def load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device) -> dict:
    import fastperturb
    from fastperturb.ops import dispatch as backends

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "fastperturb": fastperturb.__version__,
        "git": _git_commit(),
        "packages": {
            m: _version(m)
            for m in ("numpy", "triton", "pytorch_optimizer", "matplotlib", "tqdm", "torchvision", "timm")
        },
        "backends": {
            b: (why_unavailable_safe(backends, b, device) or "available")
            for b in ("cpp", "cuda", "triton", "reference")
        },
        "load_average_start": load_average(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return env


def why_unavailable_safe(backends, name: str, device: torch.device) -> Optional[str]:
    try:
        return backends.why_unavailable(name, device)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
