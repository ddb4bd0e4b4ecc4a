"""The memory suite's sharded rows: peak RSS per rank under FSDP2 (gloo, CPU) against one process.

    python -m benchmarks.sharded_memory --model bert-base --preset SAM --world 2 --steps 3

The parameter list (a :mod:`benchmarks.shapes` name) becomes about ``--units`` modules of
consecutive tensors (like transformer blocks); with ``--world 2`` each is a ``fully_shard`` unit,
so every rank holds half of each tensor. The loss is a real forward/backward through them
(``sum(p * p) / 2`` per tensor: FSDP all-gathers each unit in the forward and reduce-scatters its
gradient in the backward). Each process first warms the code paths up on a tiny model, then builds
the model, runs two forward/backward passes, resets its peak-RSS mark and records the baseline (the
parameters, their gradients and FSDP's own buffers), builds the optimizer (base: a no-op) and runs
``--steps`` steps whose closure runs the same forward/backward. Overhead = peak - baseline: the
optimizer's buffers and whatever the perturbed passes keep. ``--world 1`` runs the same model
without FSDP. The result is one JSON line: a list with one record per rank.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

PRESETS = ("SAM", "AWP", "APD")  # buffers: <= 1x the local parameter bytes (SAM, AWP), <= 2x (APD)


class _Unit(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.ps = nn.ParameterList(nn.Parameter(torch.full(s, 0.01)) for s in shapes)

    def forward(self) -> torch.Tensor:
        return sum((p * p).sum() for p in self.ps) * 0.5


class _Model(nn.Module):
    def __init__(self, shapes, units: int):
        super().__init__()
        total = sum(_numel(s) for s in shapes)
        groups, cur, size = [], [], 0
        for s in shapes:  # consecutive tensors, about total / units elements per group
            cur.append(s)
            size += _numel(s)
            if size >= total / units:
                groups.append(cur)
                cur, size = [], 0
        if cur:
            groups.append(cur)
        self.units = nn.ModuleList(_Unit(g) for g in groups)

    def forward(self) -> torch.Tensor:
        return sum(u() for u in self.units)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _build(shapes, units: int, world: int) -> nn.Module:
    model = _Model(shapes, units)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for u in model.units:
            fully_shard(u)
        fully_shard(model)
    return model


class _PassesOnly:
    """No optimizer: the closure's forward/backward ``passes`` times per step (what FSDP itself costs)."""

    def __init__(self, model: nn.Module, passes: int):
        self.model, self.passes = model, passes

    def step(self, closure):
        for _ in range(self.passes):
            self.model.zero_grad(set_to_none=False)
            closure()


def _optimizer(model: nn.Module, preset: str, apd_steps: int):
    from . import fused, peers

    if preset.startswith("passes"):
        return _PassesOnly(model, int(preset[len("passes") :]))

    spec = fused.presets(apd_steps)[preset]
    return fused.wrapper_class(preset)(model.parameters(), peers.NoOpOptimizer, **spec.kwargs)


def _steps(model: nn.Module, opt, n: int, mark=None) -> list:
    def closure():
        loss = model()
        loss.backward()
        return loss

    marks = []
    for _ in range(n):
        opt.step(closure)
        if mark is not None:
            marks.append(mark())
    return marks


def _rank(rank: int, world: int, a: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(1)
    if world == 1:
        _measure(rank, world, a, out_dir)
        return
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(a.port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        _measure(rank, world, a, out_dir)  # (its FSDP2 model and optimizer are freed when it returns)
        gc.collect()
        # Neither rank tears gloo down while the other still has collectives in flight (FSDP2's last
        # reduce-scatter): that aborted a rank with "terminate called without an active exception".
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    # The record is written and the group is gone: skip the interpreter's teardown, where gloo's threads still
    # aborted a rank now and then ("terminate called without an active exception", once in a CI run). A failure
    # above raises instead, for mp.spawn to report.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _measure(rank: int, world: int, a: argparse.Namespace, out_dir: str) -> None:
    """One rank's run: warm-up, the measured steps, its record written to ``out_dir``."""
    from fastperturb.distributed import local

    from . import shapes
    from .memchild import peak_bytes, reset_peak, rss_bytes

    # Warm-up on a tiny model: the first calls load code and allocate caches unrelated to the step.
    tiny = _build(shapes.shapes_for("tiny"), 2, world)
    _steps(tiny, _optimizer(tiny, a.preset, a.apd_steps), 2)
    del tiny
    gc.collect()

    model = _build(shapes.shapes_for(a.model), a.units, world)
    for _ in range(2):  # the first backward creates the gradients, the second accumulates into them
        model.zero_grad(set_to_none=False)
        model().backward()
    gc.collect()
    reset_ok = reset_peak()
    baseline = rss_bytes()
    opt = _optimizer(model, a.preset, a.apd_steps)
    t0 = time.perf_counter()
    marks = _steps(model, opt, a.steps, lambda: peak_bytes(reset_ok) - baseline)
    step_s = (time.perf_counter() - t0) / a.steps
    peak = peak_bytes(reset_ok)
    params = list(model.parameters())
    pbytes = sum(p.numel() * p.element_size() for p in params)  # the whole model
    lbytes = sum(local(p).numel() * p.element_size() for p in params)  # this rank's shards
    over = max(peak - baseline, 0)
    # The optimizer's persistent buffers (backups, accumulators): exact, where the RSS is noisy.
    buffers = sum(
        b.numel() * b.element_size() for store in ("_backups", "_accums") for b in getattr(opt, store, {}).values()
    )
    rec = {
        "rank": rank,
        "world": world,
        "steps": a.steps,
        "step_s": step_s,
        "units": len(model.units),
        "param_bytes": pbytes,
        "local_param_bytes": lbytes,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "peak_method": "VmHWM after clear_refs" if reset_ok else "ru_maxrss (lifetime)",
        "overhead_bytes": over,
        "overhead_x_params": over / pbytes,
        "overhead_x_local": over / lbytes,
        "retained_x_params": max(rss_bytes() - baseline, 0) / pbytes,
        "peak_overhead_by_step": marks,
        "buffer_bytes": buffers,
        "buffer_x_local": buffers / lbytes,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rec, f)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base")
    ap.add_argument(
        "--preset",
        default="SAM",
        help=f"{', '.join(PRESETS)}, or passesN: N forward/backward passes "
        "per step without an optimizer (what the harness itself costs)",
    )
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--apd-steps", type=int, default=3)
    ap.add_argument("--units", type=int, default=12)
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args(argv)
    if a.preset not in PRESETS and not (a.preset.startswith("passes") and a.preset[len("passes") :].isdigit()):
        ap.error(f"--preset must be one of {', '.join(PRESETS)} or passesN, got {a.preset!r}")
    if a.world < 1 or a.steps < 1 or a.units < 1:
        ap.error("--world, --steps and --units must be >= 1")
    a.port = a.port or _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        if a.world == 1:
            _rank(0, 1, a, out_dir)
        else:
            import torch.multiprocessing as mp

            mp.spawn(_rank, args=(a.world, a, out_dir), nprocs=a.world, join=True)
        recs = []
        for r in range(a.world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                recs.append(json.load(f))
    print(json.dumps(recs))
    return 0


MODEL = "resnet50"  # gloo on CPU moves every parameter byte through sockets twice per pass: keep it modest


def rows(cfg, model: str = MODEL, world: int = 2, preset: str = "SAM") -> list[dict]:
    """The memory suite's sharded rows on ``model``: ``preset`` on ``world`` FSDP2 ranks (one record
    per rank) and in one process, each beside the same harness running the same passes without an
    optimizer (``passesN``), which is what FSDP and the forward/backward cost by themselves: the
    optimizer's share is the difference. Skipped (no records) when the run names its memory
    implementations, or without gloo."""
    if not row_count(cfg):
        return []
    from . import fused

    passes = f"passes{fused.presets(getattr(cfg, 'apd_steps', 3))[preset].spec.steps + 1}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = []
    for what, w in _runs(preset, passes, world):
        who = f"fastperturb.{preset}" if what == preset else f"{what[len('passes') :]} passes, no optimizer"
        impl = f"{who}, FSDP2" if w > 1 else f"{who}, 1 process"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.sharded_memory",
            "--model",
            model,
            "--preset",
            what,
            "--world",
            str(w),
            "--steps",
            str(min(3, getattr(cfg, "mem_steps", 3))),
            "--apd-steps",
            str(getattr(cfg, "apd_steps", 3)),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        base = {
            "suite": "memory",
            "model": model,
            "case": f"{preset} sharded",
            "kind": "fastperturb",
            "reason": None,
        }
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["?"])[-1]
            out.append(dict(base, impl=impl, status="error", reason=reason))
        else:
            for rec in json.loads(proc.stdout.strip().splitlines()[-1]):
                name = f"{impl} rank {rec['rank']}/{w}" if w > 1 else impl
                out.append(dict(base, impl=name, status="ok", wall_s=round(time.perf_counter() - t0, 1), **rec))
        if getattr(cfg, "progress", None):
            cfg.progress(f"memory {model} {impl}")
    return out


def _runs(preset: str, passes: str, world: int) -> list[tuple[str, int]]:
    """(what, ranks) of each run :func:`rows` makes: the preset and the passes alone, each sharded and in one
    process."""
    return [(what, w) for what in (preset, passes) for w in (world, 1)]


def row_count(cfg) -> int:
    """How many runs :func:`rows` makes (its progress units); none when the run names its memory implementations,
    or without gloo."""
    if getattr(cfg, "memory_impls", ()):
        return 0
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return 0
    return len(_runs("preset", "passes", 2))


if __name__ == "__main__":
    sys.exit(main())
