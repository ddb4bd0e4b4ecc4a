"""``fastperturb demo``: train a small CNN on the bundled digits with SGD, SAM, LookSAM, AWP and APD, then corrupt it.

Every preset trains the same CNN from the same initialisation, on the same
mini-batch order, with the same base optimizer (SGD, momentum 0.9, weight
decay 5e-4, cosine learning-rate schedule) for the same number of epochs; only
the weight perturbation differs. Each trained model is then evaluated on the
held-out test split (:func:`fastperturb.data.digits_split`): clean accuracy,
and the loss change and accuracy under adversarial (1 and K ascent steps, and
the first-order estimate) and random corruption of all its parameters over
an eps grid (:func:`fastperturb.robustness.sweep`).

All of this runs once per seed (``--seeds`` seeds from ``--seed``; a seed sets
the initialisation, the batch order and the random corruptions), and the paper
claims are judged over the seeds by :mod:`fastperturb.tools.verdicts`: each
claim is a few per-seed quantities (paired between presets, which share a
seed's initialisation and batch order), their mean and spread, and a verdict
holds / fails / undecided from a 95% t-interval. ``--against`` compares the
verdicts with another run's (e.g. from another ``--seed``): a claim whose
verdict differs is not reproduced.

Radii are *relative* by default: a corruption of radius eps moves each
parameter tensor by at most ``eps * ||w_l||_2`` (per-layer L2 ball). AWP and
APD are trained with the same kind of radius (``gamma``/``eps`` relative, per
layer), so the training radius can be read off the eps axis; SAM's rho is
absolute and global, as in its paper. LookSAM uses SAM's rho: it takes SAM's
two passes every ``--looksam-k`` steps and one pass in between, so the demo
shows the trade (passes per step and wall time against accuracy and
robustness) as two claims judged like the others.

The evaluation runs on a float64 copy of each trained model: the loss change
of random corruption at the smallest eps is around 1e-8, below float32's
rounding noise on a loss of 1e-2.

Writes, only once everything is computed: ``results.json`` (per seed, the mean
over seeds, the claims with their per-seed values), ``results.csv`` (one tidy
row per seed, preset, series and eps), ``loss_change.png``,
``adversarial_vs_random.png`` and ``accuracy.png`` (means over seeds; each
notes the points a log axis cannot show), and each trained model's
``state_dict`` under ``models/seed<N>/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..robustness.results import SweepResult
from . import _args
from ._args import UsageError, int_list, positive_eps_list
from .verdicts import HOLDS, RULE, Check, ClaimVerdict, Stats, compare, judge_claim

PRESETS = ("sgd", "sam", "looksam", "awp", "apd")
DEFAULT_SEEDS = 5
MAX_SEED = 2**32
DEFAULT_EPS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and two linear layers for 1x8x8 inputs (about 38k parameters)."""

    def __init__(self, width: int = 16, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


_presets = _args.choice_list(PRESETS)


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        return v

    return parse


def _unit_interval(text: str) -> float:
    """A number in [0, 1] (LookSAM's alpha: fp.LookSAM takes both ends)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= v < MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=_positive(int), default=20, help="training epochs per preset")
    p.add_argument(
        "--presets",
        type=_presets,
        default=list(PRESETS),
        help=f"comma-separated, from {','.join(PRESETS)} (default: all)",
    )
    p.add_argument(
        "--eps",
        type=positive_eps_list,
        default=list(DEFAULT_EPS),
        help="comma-separated corruption radii, relative to each tensor's norm",
    )
    p.add_argument("--steps", type=int_list, default=[1, 5], help="ascent steps of the adversarial corruption")
    p.add_argument(
        "--trials",
        type=_args.trials,
        default=20,
        help="random corruptions per eps, in mirrored pairs a, -a; even, >= 4",
    )
    p.add_argument(
        "--seeds",
        type=_positive(int),
        default=DEFAULT_SEEDS,
        help=f"independent runs (seeds --seed, --seed+1, ...) the claims are judged over (default {DEFAULT_SEEDS})",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="first seed: each seed sets the initialisation, batch order and random corruptions",
    )
    p.add_argument(
        "--against",
        metavar="RESULTS",
        help="a previous run's results.json (or its folder), e.g. from another --seed: "
        "report which claims' verdicts are reproduced",
    )
    p.add_argument("--out", default="fastperturb-demo", help="output folder")
    p.add_argument("--batch-size", type=_positive(int), default=32, help="training mini-batch size")
    p.add_argument("--lr", type=_positive(float), default=0.05, help="base SGD learning rate")
    p.add_argument("--rho", type=_positive(float), default=0.05, help="SAM radius (absolute, global L2)")
    p.add_argument(
        "--looksam-k",
        type=_positive(int),
        default=5,
        help="LookSAM: a full SAM step (2 passes) every k steps, 1 pass in between",
    )
    p.add_argument(
        "--looksam-alpha",
        type=_unit_interval,
        default=0.7,
        help="LookSAM: weight of the reused orthogonal component, in [0, 1]",
    )
    p.add_argument("--gamma", type=_positive(float), default=0.02, help="AWP radius, relative per layer")
    p.add_argument("--apd-eps", type=_positive(float), default=0.02, help="APD radius, relative per layer L2")
    p.add_argument("--apd-steps", type=_positive(int), default=3, help="APD ascent steps")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress bars")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress bars")
    p.add_argument(
        "--threads",
        type=_positive(int),
        default=1,
        help="torch threads (default 1: the CNN is too small to gain from more, and on a shared "
        "machine several spinning threads per process slow everything down many times)",
    )
    p.add_argument(
        "--jobs",
        type=_positive(int),
        default=min(2, os.cpu_count() or 1),
        help="seeds trained at once, each in its own process with --threads threads (default: 2 on a "
        "machine with 2 or more cores); the results do not depend on it",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


# ---------------------------------------------------------------------------
# training


def make_optimizer(preset: str, model: nn.Module, args) -> torch.optim.Optimizer:
    base = dict(lr=args.lr, momentum=0.9, weight_decay=5e-4)
    if preset == "sgd":
        return torch.optim.SGD(model.parameters(), **base)
    import fastperturb as fp

    if preset == "sam":
        return fp.SAM(model.parameters(), torch.optim.SGD, rho=args.rho, **base)
    if preset == "looksam":
        return fp.LookSAM(
            model.parameters(), torch.optim.SGD, rho=args.rho, k=args.looksam_k, alpha=args.looksam_alpha, **base
        )
    if preset == "awp":
        return fp.AWP(model.parameters(), torch.optim.SGD, gamma=args.gamma, steps=1, **base)
    if preset == "apd":
        return fp.APD(
            model.parameters(),
            torch.optim.SGD,
            eps=args.apd_eps,
            steps=args.apd_steps,
            norm="l2",
            scope="layer",
            relative=True,
            include_clean=True,
            **base,
        )
    raise ValueError(f"unknown preset {preset!r}")


def describe(preset: str, args) -> str:
    return {
        "sgd": "SGD",
        "sam": f"SAM rho={args.rho:g} (abs, global L2)",
        "looksam": f"LookSAM rho={args.rho:g} k={args.looksam_k} alpha={args.looksam_alpha:g}",
        "awp": f"AWP gamma={args.gamma:g} (rel, layer, dim>1)",
        "apd": f"APD eps={args.apd_eps:g} K={args.apd_steps} (rel, layer L2)",
    }[preset]


def train(preset: str, seed: int, train_data, args, progress: Optional[bool]) -> tuple[nn.Module, float, float, float]:
    """Train one model from ``seed`` (initialisation and batch order).

    Returns (model, seconds, last epoch's mean loss, forward/backward passes per step): the passes are the
    closure's calls, counted, so LookSAM's reuse steps show as 1 and its refresh steps as 2."""
    from tqdm.auto import tqdm

    x, y = train_data
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = make_optimizer(preset, model, args)
    per_epoch = math.ceil(len(y) / args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, per_epoch * args.epochs) / (per_epoch * args.epochs)))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    last = math.nan
    passes = steps = 0
    disable = None if progress is None else not progress
    with tqdm(
        total=args.epochs * per_epoch,
        desc=f"seed {seed} train {preset}",
        disable=disable,
        leave=False,
        dynamic_ncols=True,
    ) as bar:
        for epoch in range(args.epochs):
            perm = torch.randperm(len(y), generator=gen)
            total, seen = 0.0, 0
            for i in range(0, len(y), args.batch_size):
                idx = perm[i : i + args.batch_size]
                xb, yb = x[idx], y[idx]

                def closure():
                    nonlocal passes
                    passes += 1
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    return loss

                opt.zero_grad()
                if preset == "sgd":
                    loss = closure()
                    opt.step()
                else:
                    loss = opt.step(closure)
                sched.step()
                steps += 1
                total += float(loss.detach()) * len(yb)
                seen += len(yb)
                bar.update(1)
            last = total / seen
            bar.set_postfix_str(f"epoch {epoch + 1} loss {last:.4f}", refresh=False)
            if not math.isfinite(last):  # the settings the user chose diverge: a usage error, not a crash
                radius = {"sam": " or --rho", "looksam": " or --rho", "awp": " or --gamma", "apd": " or --apd-eps"}.get(
                    preset, ""
                )
                raise UsageError(
                    f"--lr {args.lr:g}: {preset}'s training loss became {last} in epoch {epoch + 1} "
                    f"(seed {seed}); lower --lr{radius}"
                )
    return model, time.perf_counter() - t0, last, passes / steps


# ---------------------------------------------------------------------------
# one seed, and the mean over seeds


def run_seed(seed: int, args, train_data, test64) -> dict:
    """Train every preset from ``seed`` and sweep it: ``{"results", "summary", "models"}`` keyed by preset."""
    from ..robustness import sweep

    results, summary, models = {}, {}, {}
    for preset in args.presets:
        model, seconds, train_loss, passes = train(preset, seed, train_data, args, args.progress)
        models[preset] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model64 = copy.deepcopy(model).double().eval()
        t0 = time.perf_counter()
        res = sweep(
            model64,
            F.cross_entropy,
            test64,
            args.eps,
            steps=args.steps,
            trials=args.trials,
            seed=seed,
            norm="l2",
            scope="layer",
            relative=True,
            progress=args.progress,
            desc=f"seed {seed} corrupt {preset}",
        )
        results[preset] = res
        summary[preset] = {
            "optimizer": describe(preset, args),
            "clean_accuracy": res.clean_accuracy,
            "clean_loss": res.clean_loss,
            "train_loss_last_epoch": train_loss,
            "train_seconds": seconds,
            "passes_per_step": passes,
            "eval_seconds": time.perf_counter() - t0,
        }
    return {"results": results, "summary": summary, "models": models}


def _timed_seed(seed: int, args) -> tuple[dict, float]:
    """:func:`run_seed` on the bundled digits with ``args.threads`` threads, and its wall time (also a worker's job)."""
    from ..data import digits_split

    torch.set_num_threads(args.threads)
    train_data, test_data = digits_split()
    t0 = time.perf_counter()
    out = run_seed(seed, args, train_data, (test_data[0].double(), test_data[1]))
    return out, time.perf_counter() - t0


def _mean(values) -> float:
    return Stats.of(values).mean


def mean_sweep(runs: Sequence[SweepResult]) -> SweepResult:
    """Per point, the mean over seeds. ``loss_change_std``/``accuracy_std`` are the standard deviations over seeds
    and ``loss_change_sem`` the standard error of the mean over seeds (one seed: that seed's own)."""
    from ..robustness.results import Point

    first = runs[0]
    points = []
    for p in first.points:
        same = [_at(r, p.series, p.eps) for r in runs]
        lc = Stats.of(q.loss_change for q in same)
        has_acc = all(q.accuracy is not None for q in same)
        acc = Stats.of(q.accuracy for q in same) if has_acc else None
        points.append(
            Point(
                p.kind,
                p.eps,
                _mean(q.loss for q in same),
                lc.mean,
                lc.sd if lc.n > 1 else p.loss_change_std,
                acc.mean if acc else None,
                (acc.sd if acc.n > 1 else 0.0) if acc else None,
                _mean(q.accuracy_drop for q in same) if has_acc and p.accuracy_drop is not None else None,
                p.steps,
                sum(q.trials for q in same),
                lc.sem if lc.n > 1 else p.loss_change_sem,
            )
        )
    clean_acc = None if first.clean_accuracy is None else _mean(r.clean_accuracy for r in runs)
    return SweepResult(points, _mean(r.clean_loss for r in runs), clean_acc, dict(first.config, seeds=len(runs)))


# ---------------------------------------------------------------------------
# the claims, judged over seeds


def _at(res, series: str, eps: float):
    for p in res.select(series):
        if math.isclose(p.eps, eps, rel_tol=1e-9):
            return p
    return None


def _log10(x: float) -> Optional[float]:
    return math.log10(x) if x > 0 and math.isfinite(x) else None


def near_radius(grid: Sequence[float], radius: float) -> list[float]:
    """The grid points within a factor 2.5 of a training radius (the nearest one if none is)."""
    near = [e for e in grid if radius / 2.5 <= e <= radius * 2.5]
    return near or [min(grid, key=lambda e: abs(math.log(e / radius)))]


SLOPE_TOLERANCE = 0.4  # "slope about 1 / about 2": within 0.4 of it


def judge(per_seed: dict, args, n_test: int) -> list[ClaimVerdict]:
    """The paper claims the demo checks, each judged over the seeds by :data:`verdicts.RULE`.

    ``per_seed``: seed -> :func:`run_seed`'s output. Each check is a quantity measured once per seed (paired
    between presets: every preset starts from the same initialisation and batch order of that seed).
    """
    seeds = list(per_seed)
    presets = list(per_seed[seeds[0]]["results"])
    runs = {n: [per_seed[s]["results"][n] for s in seeds] for n in presets}
    grid = sorted(args.eps)
    kmin, kmax = min(args.steps), max(args.steps)
    adv, adv1 = f"adversarial_k{kmax}", f"adversarial_k{kmin}"
    have = lambda n, *series: all(s in runs[n][0].series for s in series)
    out = []

    # 1. adversarial >> random at the same norm, at the smallest eps (log10 of the ratio > 1: at least 10x)
    checks, stand_in = [], []
    for n in presets:
        if not have(n, adv, "random"):
            continue
        vals = []
        for s, r in zip(seeds, runs[n]):
            a, q = _at(r, adv, grid[0]), _at(r, "random", grid[0])
            bound = q.loss_change if q.resolved else 2 * q.loss_change_sem
            if not q.resolved:
                stand_in.append(f"{n} seed {s}")
            vals.append(_log10(a.loss_change / bound) if bound > 0 else None)
        checks.append(Check(f"{n}: log10(adversarial K={kmax} / random)", seeds, vals, threshold=1.0))
    if checks:
        out.append(
            judge_claim(
                f"adversarial corruption raises the loss far more (>= 10x) than random corruption of the same norm "
                f"(eps={grid[0]:g})",
                checks,
                note=(
                    "random's mean not resolved (<= 2 s.e.), so 2 s.e. stands in for it (the ratio is a lower bound): "
                    + ", ".join(stand_in)
                )
                if stand_in
                else "",
            )
        )

    # 2. log-log slopes: adversarial K=kmin over the small-eps half, random over the whole grid
    checks = []
    for n in presets:
        if not have(n, adv1, "random"):
            continue
        a_sl = [r.slopes().get(adv1) for r in runs[n]]
        r_sl = [r.slopes(math.inf).get("random") for r in runs[n]]
        checks.append(
            Check(
                f"{n}: |slope adversarial K={kmin} - 1|",
                seeds,
                [None if v is None else abs(v - 1) for v in a_sl],
                SLOPE_TOLERANCE,
                "<",
            )
        )
        checks.append(
            Check(
                f"{n}: |slope random (all eps) - 2|",
                seeds,
                [None if v is None else abs(v - 2) for v in r_sl],
                SLOPE_TOLERANCE,
                "<",
            )
        )
    if checks:
        out.append(
            judge_claim(
                f"log-log slope of the loss change: about 1 for adversarial (small eps), about 2 for random "
                f"(within {SLOPE_TOLERANCE:g})",
                checks,
                note="a slope is fitted on a seed's points whose mean change exceeds 2 s.e.; fewer than 2 such points: "
                "not measured on that seed",
            )
        )

    # 3. more ascent steps find at least as large a loss change, at every eps
    if kmax > kmin:
        checks = []
        for n in presets:
            vals = [
                min(_log10(_at(r, adv, e).loss_change / _at(r, adv1, e).loss_change) or -math.inf for e in grid)
                for r in runs[n]
            ]
            checks.append(
                Check(
                    f"{n}: min over eps of log10(K={kmax} / K={kmin})",
                    seeds,
                    [v if math.isfinite(v) else None for v in vals],
                    0.0,
                )
            )
        out.append(judge_claim(f"{kmax}-step corruption is at least as strong as {kmin}-step", checks))

    # 4. AWP/APD lose less than SGD around their training radius, with clean accuracy no worse
    if "sgd" in runs:
        sgd_acc = Stats.of(r.clean_accuracy for r in runs["sgd"])
        tol = max(1.0 / n_test, sgd_acc.sd if sgd_acc.n > 1 else 0.0)
        for n, radius in (("awp", args.gamma), ("apd", args.apd_eps)):
            if n not in runs:
                continue
            near = near_radius(grid, radius)
            ratio = [
                _mean(_log10(_at(r, adv, e).loss_change / _at(b, adv, e).loss_change) for e in near)
                for r, b in zip(runs[n], runs["sgd"])
            ]
            dacc = [r.clean_accuracy - b.clean_accuracy for r, b in zip(runs[n], runs["sgd"])]
            out.append(
                judge_claim(
                    f"{n.upper()} (radius {radius:g}) loses less than SGD under adversarial corruption "
                    "around its radius "
                    f"(eps {', '.join(f'{e:g}' for e in near)}), clean accuracy no worse",
                    [
                        Check(
                            f"{n}: mean log10(loss change / SGD's), K={kmax}",
                            seeds,
                            [v if math.isfinite(v) else None for v in ratio],
                            0.0,
                            "<",
                        ),
                        Check(f"{n}: clean accuracy - SGD's", seeds, dacc, -tol),
                    ],
                    note=f"'no worse' allows {tol:.4f}: the larger of one test image (1/{n_test}) and the standard "
                    f"deviation of SGD's clean accuracy over seeds",
                )
            )

    # 5-6. LookSAM against SAM (same rho, seed, batches): the cost it saves, and what it keeps
    if "looksam" in runs and "sam" in runs:
        out.extend(_looksam_claims(per_seed, seeds, runs, args, grid, adv, n_test))
    return out


LOOKSAM_ROBUSTNESS_TOLERANCE = 0.05  # log10: "as robust as SAM" allows LookSAM's loss change up to 1.12x SAM's


def _looksam_claims(per_seed, seeds, runs, args, grid, adv, n_test) -> list[ClaimVerdict]:
    """LookSAM's trade, judged: less wall time than SAM, and accuracy and robustness kept (against SAM and SGD)."""
    summ = lambda n: [per_seed[s]["summary"][n] for s in seeds]
    look, sam = summ("looksam"), summ("sam")
    passes = Stats.of(s.get("passes_per_step") for s in look).mean
    sam_passes = Stats.of(s.get("passes_per_step") for s in sam).mean
    k = getattr(args, "looksam_k", None)
    wall = [_log10(a["train_seconds"] / b["train_seconds"]) for a, b in zip(look, sam)]
    out = [
        judge_claim(
            f"LookSAM (k={k}) trains in less wall time than SAM",
            [Check("looksam: log10(training seconds / SAM's)", seeds, wall, 0.0, "<")],
            note=f"passes per step counted: LookSAM {passes:.3f}, SAM {sam_passes:.3f} (the algorithm: "
            f"(k+1)/k = {(k + 1) / k:.3f} and 2); wall time includes everything else a step does, and the "
            "seeds' presets ran one after another in the same process, on a machine that may be shared"
            if k
            else "",
        )
    ]
    sam_acc = Stats.of(r.clean_accuracy for r in runs["sam"])
    tol = max(1.0 / n_test, sam_acc.sd if sam_acc.n > 1 else 0.0)
    ratio = lambda other: [
        _mean(_log10(_at(r, adv, e).loss_change / _at(b, adv, e).loss_change) for e in grid)
        for r, b in zip(runs["looksam"], runs[other])
    ]
    finite = lambda vals: [v if math.isfinite(v) else None for v in vals]
    checks = [
        Check(
            "looksam: clean accuracy - SAM's",
            seeds,
            [r.clean_accuracy - b.clean_accuracy for r, b in zip(runs["looksam"], runs["sam"])],
            -tol,
        ),
        Check(
            f"looksam: mean log10(loss change / SAM's), K={max(args.steps)}",
            seeds,
            finite(ratio("sam")),
            LOOKSAM_ROBUSTNESS_TOLERANCE,
            "<",
        ),
    ]
    if "sgd" in runs:
        checks.append(
            Check(
                f"looksam: mean log10(loss change / SGD's), K={max(args.steps)}", seeds, finite(ratio("sgd")), 0.0, "<"
            )
        )
    out.append(
        judge_claim(
            "LookSAM keeps SAM's clean accuracy and robustness: accuracy no worse, adversarial loss change at most "
            f"{10**LOOKSAM_ROBUSTNESS_TOLERANCE:.2f}x SAM's"
            + (" and below SGD's" if "sgd" in runs else "")
            + " (mean over the eps grid)",
            checks,
            note=f"'no worse' allows {tol:.4f}: the larger of one test image (1/{n_test}) and the standard deviation "
            "of SAM's clean accuracy over seeds",
        )
    )
    return out


def reproduction(claims: Sequence[dict], against: dict) -> dict:
    """Compare this run's verdicts with a previous run's (:func:`verdicts.compare`) and the settings that differ."""
    ignore = {"seed", "out", "against", "progress", "no_plots", "threads", "jobs", "func", "command", "seeds_run"}
    mine, theirs = against["_mine_config"], against.get("config", {})
    differ = sorted(k for k in set(mine) | set(theirs) if k not in ignore and mine.get(k) != theirs.get(k))
    return {
        "file": against["_path"],
        "seed": theirs.get("seed"),
        "config_differs": differ,
        "claims": compare(claims, against.get("claims", [])),
    }


# ---------------------------------------------------------------------------
# report


def _fmt(v, spec=".2e") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def _ms(values, spec: str, sd_spec: Optional[str] = None) -> str:
    """``mean (sd)`` over the seeds with a value; ``[k/N]`` when only k of N seeds have one; ``-`` when none."""
    vals = list(values)
    st = Stats.of(vals)
    if st.n == 0:
        return "-"
    text = format(st.mean, spec) + (f" ({format(st.sd, sd_spec or spec)})" if st.n > 1 else "")
    return text + (f" [{st.n}/{len(vals)}]" if st.n < len(vals) else "")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(
        str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def report(per_seed: dict, args) -> str:
    """The tables: mean (standard deviation) over seeds of every figure."""
    seeds = list(per_seed)
    grid = sorted(args.eps)
    kmax = max(args.steps)
    names = list(per_seed[seeds[0]]["results"])
    runs = {n: [per_seed[s]["results"][n] for s in seeds] for n in names}
    summ = {n: [per_seed[s]["summary"][n] for s in seeds] for n in names}
    slope_cols = [*(f"adversarial_k{k}" for k in args.steps), "random"]
    parts = [
        f"Mean (standard deviation) over {len(seeds)} seed{'s' * (len(seeds) > 1)} "
        f"{', '.join(map(str, seeds))}; [k/N]: a figure measured on k of the N seeds only; -: on none.",
        "",
    ]
    rows = []
    for n in names:
        rows.append(
            [
                n,
                summ[n][0]["optimizer"],
                _ms((s["clean_accuracy"] for s in summ[n]), ".4f"),
                _ms((s["clean_loss"] for s in summ[n]), ".4f"),
                _ms((s["train_seconds"] for s in summ[n]), ".1f"),
                _ms((s.get("passes_per_step") for s in summ[n]), ".2f"),
                *(_ms((r.slopes().get(k) for r in runs[n]), ".2f") for k in slope_cols if k in runs[n][0].series),
                _ms((r.slopes(math.inf).get("random") for r in runs[n]), ".2f")
                if "random" in runs[n][0].series
                else "-",
            ]
        )
    parts.append(
        "Clean test accuracy/loss, training time, forward/backward passes per training step (counted), and fitted "
        "log-log slopes of the loss change (small eps: "
        f"eps <= {grid[(len(grid) - 1) // 2]:g}; all: the whole grid; fitted on a seed's points whose mean "
        "change exceeds twice its standard error, so points at or below that are left out of the fit):"
    )
    parts.append(
        format_table(
            [
                "preset",
                "optimizer",
                "test acc",
                "test loss",
                "train s",
                "passes/step",
                *(f"slope adv K={k}" for k in args.steps),
                "slope random",
                "slope random (all)",
            ],
            rows,
        )
    )
    eps_h = [f"{e:g}" for e in grid]
    for title, series, field, spec, sd_spec in (
        (
            f"Loss change under adversarial corruption (K={kmax}), relative eps:",
            f"adversarial_k{kmax}",
            "loss_change",
            ".2e",
            ".0e",
        ),
        ("Loss change under adversarial corruption (K=1):", "adversarial_k1", "loss_change", ".2e", ".0e"),
        ("First-order estimate eps*||g||:", "first_order", "loss_change", ".2e", ".0e"),
        (
            f"Loss change under random corruption (per seed the mean of {args.trials} in mirrored pairs):",
            "random",
            "loss_change",
            ".2e",
            ".0e",
        ),
        (f"Test accuracy under adversarial corruption (K={kmax}):", f"adversarial_k{kmax}", "accuracy", ".4f", ".4f"),
        ("Test accuracy under random corruption:", "random", "accuracy", ".4f", ".4f"),
    ):
        if not all(series in runs[n][0].series for n in names):
            continue
        parts.append("")
        parts.append(title)
        cell = lambda n, e: _ms((getattr(_at(r, series, e), field) for r in runs[n]), spec, sd_spec)
        parts.append(format_table(["preset", *eps_h], [[n, *(cell(n, e) for e in grid)] for n in names]))
    return "\n".join(parts)


def format_claims(claims: Sequence[ClaimVerdict], repro: Optional[dict]) -> str:
    lines = [f"Paper claims, judged over the seeds (rule: {RULE}):"]
    flips = {r["claim"]: r for r in repro["claims"]} if repro else {}
    for c in claims:
        lines.append(f"  [{c.verdict.upper() if c.verdict != HOLDS else c.verdict}] {c.claim}")
        for ch in c.checks:
            lines.append(f"      {ch.describe()}")
            values = ", ".join(f"{s}: {_fmt(v, '.3g')}" for s, v in zip(ch.seeds, ch.values))
            lines.append(f"        per seed: {values}")
        if c.note:
            lines.append(f"      note: {c.note}")
        r = flips.get(c.claim)
        if r is not None and not r["reproduced"]:
            lines.append(
                f"      NOT REPRODUCED: {r['second'] or 'not checked'} in {repro['file']} "
                f"(first seed {repro['seed']}), {r['first']} here"
            )
    if repro:
        same = sum(r["reproduced"] for r in repro["claims"])
        lines.append(
            f"Against {repro['file']} (first seed {repro['seed']}): {same} of {len(repro['claims'])} verdicts "
            "reproduced"
            + (f"; the runs also differ in {', '.join(repro['config_differs'])}" if repro["config_differs"] else "")
        )
    return "\n".join(lines)


def write_plots(mean: dict, args, out: str) -> tuple[list[str], list[str]]:
    """The PNGs of the mean over seeds; returns (files, one note per plot on what it left out)."""
    from matplotlib.figure import Figure

    from ..robustness import plot_sweeps
    from ..robustness.plot import omitted_note

    kmax = max(args.steps)
    n_seeds = args.seeds
    files, notes = [], []
    path = os.path.join(out, "loss_change.png")
    series = [f"adversarial_k{kmax}"]
    fig = plot_sweeps(
        mean,
        series=series,
        title=f"Adversarial corruption (K={kmax}), mean over {n_seeds} seeds: loss change vs relative radius",
    )
    ax = fig.axes[0]
    for name, radius, style in (("awp", args.gamma, ":"), ("apd", args.apd_eps, "-.")):
        if name in mean:
            ax.axvline(radius, color="grey", ls=style, lw=0.8, label=f"{name.upper()} training radius")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    files.append(path)
    if omitted_note(mean, series):
        notes.append(f"loss_change.png: {omitted_note(mean, series)}")

    n = len(mean)
    cols = min(n, 2)
    rows_ = math.ceil(n / cols)
    fig = Figure(figsize=(6.0 * cols, 4.9 * rows_))
    for i, (name, res) in enumerate(mean.items()):
        ax = fig.add_subplot(rows_, cols, i + 1)
        plot_sweeps({"": res}, ax=ax, title=f"{name}: adversarial vs random (mean of {n_seeds} seeds)")
        if omitted_note({name: res}):
            notes.append(f"adversarial_vs_random.png: {omitted_note({name: res})}")
    fig.tight_layout()
    path = os.path.join(out, "adversarial_vs_random.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    files.append(path)

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    for name, res in mean.items():
        pts = res.select(f"adversarial_k{kmax}")
        line = ax.errorbar(
            [p.eps for p in pts],
            [p.accuracy for p in pts],
            yerr=[p.accuracy_std for p in pts],
            fmt="-o",
            ms=3,
            capsize=2,
            label=f"{name} adversarial K={kmax}",
        )[0]
        if "random" in res.series:
            rp = res.select("random")
            ax.plot([p.eps for p in rp], [p.accuracy for p in rp], "--", color=line.get_color(), label=f"{name} random")
    ax.set_xscale("log")
    ax.set_xlabel("corruption radius ε (relative)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"Test accuracy under weight corruption (mean ± sd over {n_seeds} seeds)")
    path = os.path.join(out, "accuracy.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    files.append(path)
    return files, notes


# ---------------------------------------------------------------------------
# the output folder and --against: checked before any work, nothing written unless the run succeeds


def prepare_out(path: str) -> list[str]:
    """Make sure ``--out`` is a folder this process can write; returns the folders it had to create
    (removed again by :func:`_remove_created` if the run fails)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path}: exists and is not a folder")
    created, p = [], os.path.abspath(path)
    while p and not os.path.exists(p):
        created.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".fastperturb-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        _remove_created(created)
        raise UsageError(f"--out {path}: cannot write there ({e.strerror or e})") from None
    return created


def _remove_created(created: Sequence[str]) -> None:
    for d in created:  # deepest first; only folders that are still empty
        try:
            os.rmdir(d)
        except OSError:
            pass


def load_against(path: str) -> dict:
    """Read ``--against``: a demo's results.json, or the folder holding it."""
    file = os.path.join(path, "results.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--against {path}: no such file (expected a demo's results.json or its folder)") from None
    except OSError as e:
        raise UsageError(f"--against {path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--against {path}: not JSON ({e})") from None
    claims = doc.get("claims") if isinstance(doc, dict) else None
    if not (isinstance(claims, list) and all(isinstance(c, dict) and {"claim", "verdict"} <= set(c) for c in claims)):
        raise UsageError(f"--against {path}: not a multi-seed demo's results.json (no 'claims' with verdicts)")
    doc["_path"] = file
    return doc


def _config(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func",)}


# ---------------------------------------------------------------------------


def run(args) -> dict:
    """Everything the demo computes, then writes: per seed, the mean over seeds, the judged claims."""
    if args.seed + args.seeds > MAX_SEED:
        raise UsageError(f"--seed {args.seed} --seeds {args.seeds}: the seeds run past 2**32 - 1")
    against = load_against(args.against) if args.against else None
    created = prepare_out(args.out)
    try:
        return _run(args, against)
    except BaseException:
        _remove_created(created)
        raise


def _run(args, against: Optional[dict]) -> dict:
    from ..data import digits_split

    t_start = time.perf_counter()
    train_data, test_data = digits_split()
    seeds = list(range(args.seed, args.seed + args.seeds))
    jobs = min(args.jobs, len(seeds))
    if jobs == 1:
        done = [_timed_seed(seed, args) for seed in seeds]
    else:  # spawned workers, one thread each (--threads): the same arithmetic as in this process
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        quiet = argparse.Namespace(**dict(vars(args), progress=False))  # bars from several processes would interleave
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_timed_seed, seeds, [quiet] * len(seeds)))
    per_seed = {seed: out for seed, (out, _) in zip(seeds, done)}
    seed_seconds = {seed: sec for seed, (_, sec) in zip(seeds, done)}
    claims = judge(per_seed, args, n_test=len(test_data[1]))
    claim_dicts = [c.to_dict() for c in claims]
    mean = {n: mean_sweep([per_seed[s]["results"][n] for s in seeds]) for n in args.presets}
    config = _config(args)
    config.update(
        {
            "seeds_run": seeds,
            "model": "DigitsCNN(width=16, hidden=64)",
            "data": "UCI optdigits 8x8 (bundled), stratified split test_fraction=0.2 split seed 0: "
            f"{len(train_data[1])} train / {len(test_data[1])} test",
            "base_optimizer": "SGD(momentum=0.9, weight_decay=5e-4), cosine schedule to 0 over all steps",
            "evaluation": "float64 copy of the trained model, eval mode, test split full batch; "
            "relative per-layer L2 radius, all parameters",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
    )
    repro = None
    if against is not None:
        against["_mine_config"] = config
        repro = reproduction(claim_dicts, against)
        del against["_mine_config"]
    doc = {
        "config": config,
        "rule": RULE,
        "claims": claim_dicts,
        "reproduction": repro,
        "summary": {
            n: {
                k: Stats.of(per_seed[s]["summary"][n][k] for s in seeds).to_dict()
                for k in ("clean_accuracy", "clean_loss", "train_seconds", "passes_per_step", "eval_seconds")
            }
            | {"optimizer": describe(n, args)}
            for n in args.presets
        },
        "results": {n: r.to_dict() for n, r in mean.items()},
        "per_seed": {
            str(s): {
                "summary": per_seed[s]["summary"],
                "seconds": seed_seconds[s],
                "results": {n: r.to_dict() for n, r in per_seed[s]["results"].items()},
            }
            for s in seeds
        },
        "wall_seconds": time.perf_counter() - t_start,
    }
    doc["table"] = report(per_seed, args)
    doc["claims_text"] = format_claims(claims, repro)
    # everything is computed: now write
    for s in seeds:
        os.makedirs(os.path.join(args.out, "models", f"seed{s}"), exist_ok=True)
        for n, sd in per_seed[s]["models"].items():
            torch.save(sd, os.path.join(args.out, "models", f"seed{s}", f"{n}.pt"))
    with open(os.path.join(args.out, "results.csv"), "w") as f:
        first = True
        for s in seeds:
            for n, r in per_seed[s]["results"].items():
                lines = r.to_csv().splitlines()
                if first:
                    f.write("seed,preset," + lines[0] + "\n")
                    first = False
                f.writelines(f"{s},{n},{line}\n" for line in lines[1:])
    doc["plots"], doc["plot_notes"] = ([], []) if args.no_plots else write_plots(mean, args, args.out)
    doc["wall_seconds"] = time.perf_counter() - t_start
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({k: v for k, v in doc.items() if k not in ("table", "claims_text")}, f, indent=2)
    return doc


def main(args) -> int:
    with _args.torch_threads(args.threads):
        doc = run(args)
    print(doc["table"])
    print()
    print(doc["claims_text"])
    for note in doc["plot_notes"]:
        print(note)
    print()
    per = [v["seconds"] for v in doc["per_seed"].values()]
    print(
        f"wrote {os.path.join(args.out, 'results.json')}, results.csv"
        + (", " + ", ".join(os.path.basename(p) for p in doc["plots"]) if doc["plots"] else "")
        + f" and models/ in {args.out}  ({doc['wall_seconds']:.0f} s; a seed took {Stats.of(per).mean:.0f} s"
        + (f" in its worker, {jobs} side by side)" if (jobs := min(args.jobs, len(per))) > 1 else ")")
    )
    return 0
