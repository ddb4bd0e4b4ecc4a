"""The ``memory`` suite: peak RSS of a separate process per implementation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from .. import peers, sharded_memory
from .common import Config, _record, _say, _skipped

MEMORY_IMPLS = (
    "fastperturb.SAM",
    "foreach.SAM",
    "loop-SAM",
    "pytorch-optimizer-SAM",
    "fastperturb.AWP",
    "foreach.AWP",
    "proxy-AWP",
    "fastperturb.APD",
    "foreach.APD",
    "deep-copy-APD",
)


def suite_memory(cfg: Config) -> list[dict]:
    """Peak resident memory of a separate process running ``mem_steps`` steps of each implementation.

    The child (``python -m benchmarks.memchild``) builds the parameters,
    their gradients and one precomputed gradient set (3 parameter-sized sets in
    all, the baseline), measures its RSS, runs the steps and reports the peak
    RSS. A child stops early after ``mem_max_s`` seconds (at least 3 steps): the
    peak is reached in the first steps, which ``peak_overhead_by_step`` shows.
    Overhead = peak - baseline, also as a multiple of the
    parameter bytes (issue #3: fastperturb's AWP <= 1x, the proxy approach ~3x).
    """
    out = []
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for model in cfg.models.get("memory", []):
        jobs = []
        for impl in cfg.memory_impls or MEMORY_IMPLS:
            if impl not in MEMORY_IMPLS:
                raise ValueError(f"unknown memory implementation {impl!r}; choose from {', '.join(MEMORY_IMPLS)}")
            case = impl.split(".")[-1].split("-")[-1]
            kind = (
                "fastperturb"
                if impl.startswith("fastperturb")
                else ("foreach" if impl.startswith("foreach") else "peer")
            )
            if impl == "pytorch-optimizer-SAM" and peers.pytorch_optimizer_available():
                out.append(_skipped("memory", model, case, impl, kind, peers.pytorch_optimizer_available()))
                continue
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.memchild",
                "--model",
                model,
                "--impl",
                impl,
                "--steps",
                str(cfg.mem_steps),
                "--apd-steps",
                str(cfg.apd_steps),
                "--max-seconds",
                str(cfg.mem_max_s),
                "--min-steps",
                str(min(3, cfg.mem_steps)),
            ]
            jobs.append((impl, case, kind, cmd))
        # Peak RSS is per process, so the children may run side by side (mem_jobs at a time).
        running: list = []
        results: dict = {}
        pending = list(jobs)
        while pending or running:
            while pending and len(running) < max(cfg.mem_jobs, 1):
                impl, case, kind, cmd = pending.pop(0)
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                running.append((impl, case, kind, proc, time.perf_counter()))
            impl, case, kind, proc, t0 = running.pop(0)
            stdout, stderr = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                results[impl] = _record(
                    "memory", model, case, impl, kind, status="error", reason=(stderr.strip().splitlines() or ["?"])[-1]
                )
            else:
                data = json.loads(stdout.strip().splitlines()[-1])
                data["wall_s"] = round(time.perf_counter() - t0, 1)
                results[impl] = _record("memory", model, case, impl, kind, **data)
            _say(cfg, f"memory {model} {impl}")
        out.extend(results[impl] for impl, *_ in jobs)
    out.extend(sharded_memory.rows(cfg))  # FSDP2: peak RSS per rank against one process
    return out
