"""Command line of the benchmark runner: ``python -m benchmarks`` from the repository root.

Errors the user can cause (unknown suites, models or backends, bad counts, an unwritable ``--json`` or
``--chart``, result files that cannot be compared) are one line and exit code 2, before anything runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import torch

from fastperturb.tools._args import (
    OneLineParser,
    UsageError,
    check_writable_file,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    write_all,
)

from . import report, shapes, sharded_memory, suites, timing

DEFAULT_MODELS = {
    "ops": ["resnet50"],
    # issue 14's targets are cycle ratios on ResNet-50 and BERT-base
    "cycle": ["resnet50", "bert-base", "small1000"],
    "step": ["resnet50", "small1000"],
    "train": ["cnn"],
    "memory": ["bert-base"],
    "train_loop": list(suites._TRAIN_LOOP_MODELS),
    "family": ["resnet50", "small1000"],
}
QUICK_MODELS = {
    "ops": ["tiny"],
    "cycle": ["tiny"],
    "step": ["tiny"],
    "train": ["cnn"],
    "memory": ["tiny"],
    "train_loop": ["mlp"],
    "family": ["tiny"],
}
UNITS = {
    "ops": 9,
    "cycle": 3,
    "step": 4,
    "train": 1,
    "memory": len(suites.MEMORY_IMPLS),
    "train_loop": 1,
    "family": len(suites.FAMILY_NAMES),
}


def _default_models_help() -> str:
    return "; ".join(f"{s}: {','.join(DEFAULT_MODELS[s])}" for s in ("ops", "cycle", "step", "family"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--suites",
        default=",".join(suites.SUITES),
        help=f"comma-separated suites to run, from {', '.join(suites.SUITES)} (default: all)",
    )
    p.add_argument(
        "--models",
        "--model",
        dest="models",
        default=None,
        help="comma-separated parameter lists for ops/cycle/step/family: built-in "
        f"({', '.join(shapes.BUILTIN)}), pkg.module:factory, or a torchvision/timm model name "
        f"(default: {_default_models_help()})",
    )
    p.add_argument(
        "--train-model",
        default=None,
        help="train suite model: 'cnn' (default) or pkg.module:factory (3x32x32 in, 10 classes)",
    )
    p.add_argument("--memory-model", default=None, help="memory suite parameter list (default: bert-base)")
    p.add_argument(
        "--backends",
        default=None,
        help="comma-separated fastperturb backends to time (cpp, cuda, triton, reference; default: every one "
        "available)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--warmup", type=nonnegative_int, default=2)
    p.add_argument("--reps", type=positive_int, default=10, help="maximum timed repetitions per implementation")
    p.add_argument(
        "--min-reps",
        type=positive_int,
        default=None,
        help="minimum repetitions even for slow implementations (default: 3, or --reps if fewer)",
    )
    p.add_argument(
        "--budget", type=positive_float, default=1.0, help="seconds of timed calls per implementation per case"
    )
    p.add_argument("--apd-steps", type=positive_int, default=3, help="K of the APD cycle/step")
    p.add_argument("--mem-steps", type=positive_int, default=20, help="steps per memory-suite process")
    p.add_argument(
        "--mem-max-seconds",
        type=nonnegative_float,
        default=10.0,
        help="a memory-suite process stops after this long, having run at least 3 steps (0: always --mem-steps)",
    )
    p.add_argument(
        "--mem-jobs",
        type=positive_int,
        default=2,
        help="memory-suite processes run side by side (peak RSS is per process)",
    )
    p.add_argument(
        "--memory-impls",
        default=None,
        help=f"comma-separated memory-suite implementations (default: all of {', '.join(suites.MEMORY_IMPLS)})",
    )
    p.add_argument("--train-batch", type=positive_int, default=64)
    p.add_argument("--no-costs", action="store_true", help="skip dispatch counts, allocation and state measurement")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings for a smoke test (tiny lists, 1 warm-up, 3 reps, 2 memory steps)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write results (with environment metadata) here")
    p.add_argument("--chart", default=None, metavar="PATH", help="write a PNG chart here (needs matplotlib)")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("OLD", "NEW"),
        default=None,
        help="compare two result files and print regressions (exit 1 if any); runs nothing",
    )
    p.add_argument(
        "--threshold", type=positive_float, default=0.10, help="--compare: relative change that counts (default 0.10)"
    )
    p.add_argument(
        "--spread",
        nargs="+",
        metavar="RUN",
        default=None,
        help="the median and range of fastperturb's paired ratios over several result files; runs nothing",
    )
    p.add_argument("--quiet", action="store_true", help="no progress display")


class _Progress:
    def __init__(self, total: int, quiet: bool):
        self.t0 = time.perf_counter()
        self.quiet = quiet
        self.bar = None
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="case", leave=False)
            except Exception:
                self.bar = None
        self.done, self.total = 0, total

    def __call__(self, msg: str) -> None:
        self.done += 1
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(msg)
            self.bar.update(1)
        else:
            print(
                f"[{time.perf_counter() - self.t0:7.1f}s {self.done}/{self.total}] {msg}", file=sys.stderr, flush=True
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fail(msg: str) -> int:
    raise UsageError(msg)


def _load_result(path: str, flag: str = "--compare") -> dict:
    try:
        return report.load_json(path)
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise UsageError(f"{flag} {path}: not a benchmark result file ({str(e).splitlines()[0]})") from None


def main(args: argparse.Namespace) -> int:
    if args.spread:
        runs = [(p, _load_result(p, "--spread")) for p in args.spread]
        if report.spread(runs, sys.stdout) == 0:
            raise UsageError(f"--spread {' '.join(args.spread)}: no fastperturb record with a paired ratio in them")
        return 0
    if args.compare:
        old, new = (_load_result(p) for p in args.compare)
        regressions = report.compare(old, new, args.threshold, sys.stdout)
        if report.comparable(old, new) == 0:
            raise UsageError(
                f"--compare {' '.join(args.compare)}: the files have no measured result in common, "
                "so nothing was compared"
            )
        return 1 if regressions else 0
    for flag, path in (("--json", args.json), ("--chart", args.chart)):
        if path is not None:
            check_writable_file(path, flag)  # now, not after a run of several minutes
    if args.min_reps is None:
        args.min_reps = min(3, args.reps)
    elif args.min_reps > args.reps:
        raise UsageError(f"--min-reps {args.min_reps} is more than --reps {args.reps}")

    wanted = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in suites.SUITES]
    if unknown or not wanted:
        return _fail(
            f"--suites {args.suites}: unknown suite(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(suites.SUITES)}"
        )
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            return _fail(f"--device {args.device}: not a device ({e})")
        if device.type == "cuda" and not torch.cuda.is_available():
            return _fail(f"--device {args.device}: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {k: list(v) for k, v in (QUICK_MODELS if args.quick else DEFAULT_MODELS).items()}
    if args.models:
        for s in ("ops", "cycle", "step", "family"):
            models[s] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.train_model:
        models["train"] = [args.train_model]
    if args.memory_model:
        models["memory"] = [args.memory_model]
    for s in wanted:
        if s == "train_loop":
            continue  # its models are built in benchmarks/train_loop.py, which checks the names
        if s == "train":
            for m in models["train"]:
                if m != "cnn":
                    try:
                        suites._train_model(m)
                    except Exception as e:
                        return _fail(f"--train-model {m}: {e}")
            continue
        for m in models[s]:
            try:
                shapes.shapes_for(m)
            except shapes.UnknownModel as e:
                return _fail(f"--models {m}: {e}")
    backends_list = [b.strip() for b in args.backends.split(",")] if args.backends else None
    cfg = suites.Config(
        device=device,
        models={s: models[s] for s in wanted},
        backends=backends_list,
        warmup=args.warmup,
        reps=args.reps,
        min_reps=args.min_reps,
        budget_s=args.budget,
        apd_steps=args.apd_steps,
        mem_steps=args.mem_steps,
        measure_costs=not args.no_costs,
        train_batch=args.train_batch,
        mem_jobs=args.mem_jobs,
        mem_max_s=args.mem_max_seconds,
        memory_impls=[m.strip() for m in args.memory_impls.split(",")] if args.memory_impls else (),
    )
    bad = [m for m in cfg.memory_impls if m not in suites.MEMORY_IMPLS]
    if bad:
        return _fail(
            f"--memory-impls: unknown implementation(s) {', '.join(bad)}; choose from {', '.join(suites.MEMORY_IMPLS)}"
        )
    if args.quick:
        cfg.warmup, cfg.reps, cfg.min_reps, cfg.budget_s = 1, 3, 2, 0.2
        cfg.mem_steps, cfg.train_batch = 2, 8
    try:
        chosen = suites.fastperturb_backends(cfg)
    except ValueError as e:
        return _fail(f"--backends {args.backends}: {e}")
    # Without --backends a run is about the compiled kernels: one that could time only the reference (a build
    # that did not load) would report the spec's speed as fastperturb's, with every target "not measured".
    if not backends_list and not any(why is None for b, why in chosen if b != "reference"):
        whys = "; ".join(f"{b}: {why}" for b, why in chosen if b != "reference" and why)
        return _fail(
            f"no compiled fastperturb backend runs on {device} ({whys}); pass --backends reference to time the "
            "pure-PyTorch reference alone"
        )

    data = run(cfg, quiet=args.quiet, bw_numel=(1 << 20) if args.quick else (1 << 25))
    report.print_tables(data, sys.stdout)
    if args.json:
        _write(args.json, "--json", lambda path: report.write_json(data, path))
        print(f"\nwrote {args.json}")
    if args.chart:

        def draw(path: str) -> None:
            err = report.chart(data, path)
            if err:
                raise _NoChart(err)

        try:
            _write(args.chart, "--chart", draw)
            print(f"wrote {args.chart}")
        except _NoChart as e:
            print(e)
    return 0


class _NoChart(Exception):
    """The run has nothing to chart, or matplotlib is missing: said, and no file is written."""


def _write(path: str, flag: str, write) -> None:
    """Write one output file all or nothing (a temporary name, renamed when complete)."""
    folder, name = os.path.split(os.path.abspath(path))
    write_all(folder, {name: write}, flag)


def run(cfg: suites.Config, quiet: bool = True, bw_numel: int = 1 << 25) -> dict:
    """Run the configured suites; returns the JSON-ready result (see :mod:`.report`)."""
    t0 = time.perf_counter()
    env = timing.environment(cfg.device)
    cfg.bandwidth = timing.measure_bandwidth(cfg.device, numel=bw_numel)
    units = dict(UNITS, memory=len(cfg.memory_impls or suites.MEMORY_IMPLS))
    total = sum(units[s] * len(cfg.models[s]) for s in cfg.models)
    if "memory" in cfg.models:  # (its sharded rows run once, on their own model)
        total += sharded_memory.row_count(cfg)
    prog = _Progress(total, quiet)
    cfg.progress = prog
    results, suite_wall = [], {}
    try:
        for s in cfg.models:
            t = time.perf_counter()
            results.extend(suites.RUNNERS[s](cfg))
            suite_wall[s] = round(time.perf_counter() - t, 1)
    finally:
        prog.close()
    env["load_average_end"] = timing.load_average()
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    env["suite_wall_s"] = suite_wall
    config = {k: v for k, v in vars(cfg).items() if k not in ("progress", "bandwidth", "device")}
    config["device"] = str(cfg.device)
    return {
        "schema": report.SCHEMA,
        "env": env,
        "config": config,
        "bandwidth": cfg.bandwidth,
        "results": results,
        "targets": report.targets(results),
    }


def entry(argv: Optional[list[str]] = None, prog: str = "python -m benchmarks") -> int:
    """Parse ``argv`` and run; a usage error is printed as one line and gives exit code 2."""
    p = OneLineParser(prog=prog, description="fastperturb microbenchmarks: fastperturb beside the peers")
    add_arguments(p)
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument (already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    try:
        return main(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
