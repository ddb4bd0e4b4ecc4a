"""Instructions per perturb-restore cycle, counted by valgrind: ``python -m benchmarks.cycle_instructions``.

Counts do not move with the machine's load, so they split what a long parameter list costs into executed work
(the handle's per-tensor checks, the plan's per-chunk steps, the kernels' loop heads) and the rest, memory stalls
on many short streams, which only timing shows. The cycle (the engine on the C++ kernels, one thread, as the
optimizers run it) is counted on the list and on one tensor of the same elements. Each count comes from two
processes under ``valgrind --tool=callgrind`` that differ only in the number of cycles run after the warm-up, so
start-up cancels: (count(n) - count(0)) / n per cycle. Needs ``valgrind`` and ``callgrind_annotate`` on PATH; a
run takes a few minutes (callgrind runs the whole interpreter about 50x slower).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_WARMUP = 5
_TOTAL = re.compile(r"Collected\s*:\s*(\d+)")
_ROW = re.compile(r"^\s*([\d,]+)\s+\([^)]*\)\s+(\S.*)$")


def _child(model: str, preset: str, one_tensor: bool, cycles: int) -> None:
    import torch

    from benchmarks import fused, shapes
    from benchmarks.suites.common import make_params

    torch.set_num_threads(1)

    shape_list = shapes.shapes_for(model)
    if one_tensor:
        shape_list = [(sum(torch.Size(s).numel() for s in shape_list),)]
    params, _ = make_params(shape_list, torch.device("cpu"))
    spec = fused.presets()[preset]
    cycle = fused.FusedCycle(spec, fused.select(spec, params))
    for _ in range(_WARMUP + cycles):
        cycle.run()


def _count(args: list[str], out: Path) -> tuple[int, dict[str, int]]:
    """Total instructions of one child under callgrind, and each function's own count."""
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m", __spec__.name]
    env = dict(os.environ, PYTHONHASHSEED="0")  # (dict layouts, and so start-up work, equal across the pair)
    run = subprocess.run(cmd + args, env=env, capture_output=True, text=True, check=True)
    total = int(_TOTAL.search(run.stderr).group(1))
    text = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(out)], capture_output=True, text=True, check=True
    ).stdout
    return total, own_counts(text)


def own_counts(annotated: str) -> dict[str, int]:
    """Each function's own instruction count from ``callgrind_annotate`` output (object file names dropped)."""
    own: dict[str, int] = {}
    for line in annotated.splitlines():
        m = _ROW.match(line)
        if m and "PROGRAM TOTALS" not in m.group(2):
            name = re.sub(r"\s*\[[^]]*\]$", "", m.group(2))
            own[name] = own.get(name, 0) + int(m.group(1).replace(",", ""))
    return own


def measure(model: str, preset: str, cycles: int, top: int) -> list[dict]:
    """Per case (the list, one tensor): instructions per cycle and the functions that execute most of them."""
    recs = []
    with tempfile.TemporaryDirectory() as tmp:
        for one in (False, True):
            base = ["--child", "--model", model, "--preset", preset] + (["--one-tensor"] if one else [])
            t0, own0 = _count(base + ["--cycles", "0"], Path(tmp) / "zero.out")
            t1, own1 = _count(base + ["--cycles", str(cycles)], Path(tmp) / "many.out")
            per = {k: (own1.get(k, 0) - own0.get(k, 0)) / cycles for k in set(own0) | set(own1)}
            rows = sorted(((v, k) for k, v in per.items() if v > 0), reverse=True)[:top]
            recs.append(
                {
                    "model": model,
                    "preset": preset,
                    "case": "one tensor of the same elements" if one else "the list",
                    "cycles": cycles,
                    "instructions_per_cycle": (t1 - t0) / cycles,
                    "top_functions": [{"function": k, "instructions_per_cycle": v} for v, k in rows],
                }
            )
    return recs


def main(argv: list[str] | None = None) -> int:
    from benchmarks import fused, shapes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small1000", help="a benchmarks.shapes list (default small1000)")
    ap.add_argument("--preset", default="SAM", choices=sorted(fused.presets()))
    ap.add_argument("--cycles", type=int, default=20, help="cycles counted after the warm-up (default 20)")
    ap.add_argument("--top", type=int, default=8, help="functions listed per case (default 8)")
    ap.add_argument("--json", help="also write the records to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one-tensor", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(a.model, a.preset, a.one_tensor, a.cycles)
        return 0
    missing = [t for t in ("valgrind", "callgrind_annotate") if shutil.which(t) is None]
    if missing:
        print(f"cycle_instructions: {' and '.join(missing)} not found on PATH (Debian: apt install valgrind)")
        return 2
    if a.cycles < 1:
        ap.error("--cycles must be at least 1")
    recs = measure(a.model, a.preset, a.cycles, a.top)
    for r in recs:
        print(f"{r['model']} {r['preset']} cycle, {r['case']}: {r['instructions_per_cycle']:,.0f} instructions")
        for f in r["top_functions"]:
            print(f"    {f['instructions_per_cycle']:>12,.0f}  {f['function'][:110]}")
    n = len(shapes.shapes_for(a.model))
    extra = recs[0]["instructions_per_cycle"] - recs[1]["instructions_per_cycle"]
    print(f"the list adds {extra:,.0f} instructions per cycle over one tensor: {extra / max(n, 1):,.0f} per tensor")
    if a.json:
        Path(a.json).write_text(json.dumps(recs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
