"""``fastperturb demo-adversarial``: AWP in its own setting, adversarial training on the bundled digits.

PGD adversarial training (PGD-AT, Madry et al.) with and without AWP (Wu et al.
2020), and optionally TRADES with and without AWP, each over several seeds. Every
preset of a seed trains the same CNN (:class:`fastperturb.tools.demo.DigitsCNN`)
from the same initialisation on the same mini-batch order with the same base
optimizer (SGD, momentum 0.9, weight decay 5e-4, learning rate divided by 10 at 50%
and 75% of the epochs); only the weight perturbation and the loss differ. Each step
makes adversarial examples at the clean weights (L-infinity PGD, radius ``--eps``,
random start, eval mode) and then calls ``opt.step(closure)`` on them
(:func:`fastperturb.adversarial.adversarial_step`). AWP starts after ``--warmup``
epochs (before that ``group["perturb"] = False``).

Reported per preset (mean and standard deviation over seeds):

* clean test accuracy;
* robust test accuracy under a stronger attack than the one trained with
  (``--eval-steps`` steps of size ``2.5 eps / steps`` with ``--eval-restarts`` random
  restarts), at the last epoch;
* over epochs: robust accuracy (the training attack, PGD-``--train-steps``) on the
  test split and on a fixed subset of the training split of the same size; the robust
  generalisation gap (train minus test) at the last epoch, and robust overfitting (best
  minus last robust test accuracy over the epochs);
* flatness of the weight loss landscape: :func:`fastperturb.robustness.sweep`'s
  adversarial indicator (loss change under the worst per-layer relative L2 weight
  corruption found by K ascent steps) on the *adversarial* loss, with the test
  adversarial examples fixed at the trained weights (the strong attack's examples).

The paper's claims are checked seed by seed (paired: the same seed gives the same
initialisation and batch order to both presets) and printed with the table.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _args
from ._args import positive_eps_list

PRESETS = ("pgd", "pgd-awp", "trades", "trades-awp")
DEFAULT_FLAT_EPS = (0.005, 0.01, 0.02, 0.05)


_presets = _args.choice_list(PRESETS)


def _number(kind, minimum: float, strict: bool):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or v < minimum or (strict and v == minimum):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {minimum:g}, got {text!r}")
        return v

    return parse


def _seeds(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds >= 0, got {text!r}")
    return list(dict.fromkeys(vals))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--presets",
        type=_presets,
        default=["pgd", "pgd-awp"],
        help=f"comma-separated, from {','.join(PRESETS)}",
    )
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2, 3, 4], help="comma-separated seeds")
    p.add_argument("--epochs", type=_number(int, 1, False), default=20, help="training epochs")
    p.add_argument(
        "--eps",
        type=_number(float, 0, True),
        default=0.1,
        help="L-infinity input radius, images in [0, 1] (at 0.1 PGD-20 takes a normally trained model from 99%% "
        "to about 60%% test accuracy; see the README for 0.2)",
    )
    p.add_argument("--train-steps", type=_number(int, 1, False), default=5, help="PGD steps while training")
    p.add_argument("--eval-steps", type=_number(int, 1, False), default=20, help="PGD steps of the final attack")
    p.add_argument(
        "--eval-restarts",
        type=_number(int, 1, False),
        default=3,
        help="random restarts of the final attack",
    )
    p.add_argument(
        "--gamma",
        type=_number(float, 0, True),
        default=0.01,
        help="AWP radius for PGD-AT, relative per layer (the paper's value)",
    )
    p.add_argument(
        "--trades-gamma",
        type=_number(float, 0, True),
        default=0.005,
        help="AWP radius for TRADES (the paper's value)",
    )
    p.add_argument("--beta", type=_number(float, 0, False), default=6.0, help="TRADES' beta")
    p.add_argument(
        "--warmup",
        type=_number(int, 0, False),
        default=2,
        help="epochs of plain adversarial training before AWP starts",
    )
    p.add_argument(
        "--flat-eps",
        type=positive_eps_list,
        default=list(DEFAULT_FLAT_EPS),
        help="relative weight-corruption radii of the flatness measure",
    )
    p.add_argument("--flat-steps", type=_number(int, 1, False), default=5, help="ascent steps of the weight corruption")
    p.add_argument(
        "--train-size",
        type=_number(int, 10, False),
        default=None,
        help="train on this many images of the training split (a fixed random subset, the same for every "
        "preset and seed; default all 1438): fewer images make robust overfitting likelier",
    )
    p.add_argument("--batch-size", type=_number(int, 1, False), default=64, help="training mini-batch size")
    p.add_argument("--lr", type=_number(float, 0, True), default=0.05, help="base SGD learning rate")
    p.add_argument("--threads", type=_number(int, 1, False), default=1, help="torch threads")
    p.add_argument("--out", default="fastperturb-demo-adversarial", help="output folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress bars")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress bars")


# ---------------------------------------------------------------------------
# training


def _uses_awp(preset: str) -> bool:
    return preset.endswith("-awp")


def _gamma(preset: str, args) -> float:
    return args.trades_gamma if preset.startswith("trades") else args.gamma


def describe(preset: str, args) -> str:
    loss = f"TRADES beta={args.beta:g}" if preset.startswith("trades") else "PGD-AT"
    if _uses_awp(preset):
        return f"{loss} + AWP gamma={_gamma(preset, args):g} (warm-up {args.warmup} ep)"
    return loss


def train_attack(args):
    from ..attacks import pgd, trades_pgd

    step = 2.5 * args.eps / args.train_steps
    return (
        functools.partial(pgd, eps=args.eps, step_size=step, steps=args.train_steps),
        functools.partial(trades_pgd, eps=args.eps, step_size=step, steps=args.train_steps),
    )


def eval_attack(args, restarts: int, steps: int):
    from ..attacks import pgd

    return functools.partial(pgd, eps=args.eps, step_size=2.5 * args.eps / steps, steps=steps, restarts=restarts)


def train(preset: str, seed: int, data, args, bar) -> tuple[nn.Module, dict]:
    """Train one model; returns it and its per-epoch history."""
    import fastperturb as fp

    from ..adversarial import adversarial_step, set_perturb
    from ..attacks import robust_accuracy
    from .demo import DigitsCNN

    (x, y), (xt, yt), (xs, ys) = data
    torch.manual_seed(seed)
    model = DigitsCNN()
    base = dict(lr=args.lr, momentum=0.9, weight_decay=5e-4)
    if _uses_awp(preset):
        opt = fp.AWP(model.parameters(), torch.optim.SGD, gamma=_gamma(preset, args), **base)
    else:
        opt = torch.optim.SGD(model.parameters(), **base)
    milestones = [args.epochs // 2, (3 * args.epochs) // 4]
    pgd_attack, trades_attack = train_attack(args)
    attack = trades_attack if preset.startswith("trades") else pgd_attack
    beta = args.beta if preset.startswith("trades") else None
    monitor = eval_attack(args, 1, args.train_steps)
    gen = torch.Generator().manual_seed(seed)
    history = {"epoch": [], "train_loss": [], "robust_train": [], "robust_test": [], "clean_test": []}
    for epoch in range(args.epochs):
        lr = args.lr * (0.1 ** sum(epoch >= m for m in milestones))
        for group in opt.param_groups:
            group["lr"] = lr
        if _uses_awp(preset):
            set_perturb(opt, epoch >= args.warmup)
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(y), args.batch_size):
            idx = perm[i : i + args.batch_size]
            step = adversarial_step(opt, model, x[idx], y[idx], attack, trades_beta=beta)
            total += float(step.loss) * len(idx)
            bar.update(1)
        # The monitor attack's random starts come from the global generator, reseeded here per seed and epoch (so
        # the next epoch's training attacks start from that seed too): every run repeats exactly.
        torch.manual_seed(10_000 + seed * 1000 + epoch)
        history["epoch"].append(epoch + 1)
        history["train_loss"].append(total / len(y))
        history["robust_train"].append(robust_accuracy(model, xs, ys, attack=monitor)[0])
        history["robust_test"].append(robust_accuracy(model, xt, yt, attack=monitor)[0])
        history["clean_test"].append(robust_accuracy(model, xt, yt)[0])
        if not math.isfinite(history["train_loss"][-1]):
            raise FloatingPointError(f"{preset} seed {seed}: the training loss became NaN/Inf in epoch {epoch + 1}")
    return model, history


def evaluate(model: nn.Module, data, seed: int, args) -> dict:
    from ..attacks import robust_accuracy
    from ..robustness import sweep

    (_, _), (xt, yt), _ = data
    model.eval()
    torch.manual_seed(20_000 + seed)
    strong = eval_attack(args, args.eval_restarts, args.eval_steps)
    x_adv = strong(model, xt, yt)
    robust, robust_loss = robust_accuracy(model, x_adv, yt)
    clean, clean_loss = robust_accuracy(model, xt, yt)
    # Flatness of the adversarial loss in weight space, with the test adversarial examples fixed at the
    # trained weights; float64 so that small loss changes are not rounding noise.
    model64 = copy.deepcopy(model).double().eval()
    res = sweep(
        model64,
        F.cross_entropy,
        (x_adv.double(), yt),
        args.flat_eps,
        kinds=("adversarial",),
        steps=[args.flat_steps],
        norm="l2",
        scope="layer",
        relative=True,
        progress=False,
    )
    flat = {f"{p.eps:g}": p.loss_change for p in res.select(f"adversarial_k{args.flat_steps}")}
    return {
        "clean_test": clean,
        "clean_loss": clean_loss,
        "robust_test": robust,
        "robust_loss": robust_loss,
        "adv_loss_change": flat,
    }


# ---------------------------------------------------------------------------
# report


def _mean_sd(values) -> str:
    values = list(values)
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _table(headers, rows) -> str:
    from .demo import format_table

    return format_table(headers, rows)


def summarise(runs: dict, args) -> dict:
    """Per preset, per seed: the figures of the table and of the claims."""
    out = {}
    for preset, by_seed in runs.items():
        rows = {}
        for seed, r in by_seed.items():
            h = r["history"]
            rows[seed] = {
                "clean_test": r["final"]["clean_test"],
                "robust_test": r["final"]["robust_test"],
                "gap_last": h["robust_train"][-1] - h["robust_test"][-1],
                "overfit": max(h["robust_test"]) - h["robust_test"][-1],
                "best_robust_monitor": max(h["robust_test"]),
                "adv_loss_change": r["final"]["adv_loss_change"],
            }
        out[preset] = rows
    return out


def claims(summary: dict, args) -> list:
    """The AWP paper's claims, judged on the per-seed differences AWP minus plain (paired: same seed) by
    :mod:`fastperturb.tools.verdicts` (95% Student-t interval of the mean margin)."""
    out = []
    for plain, awp in (("pgd", "pgd-awp"), ("trades", "trades-awp")):
        if plain in summary and awp in summary:
            out += _claims_of_pair(summary[plain], summary[awp], plain, awp, args)
    return out


def _claims_of_pair(plain_runs: dict, awp_runs: dict, plain: str, awp: str, args) -> list:
    from .verdicts import Check, judge_claim

    seeds = [s for s in plain_runs if s in awp_runs]

    def diff(key) -> list[float]:  # in points (percent)
        return [100.0 * (awp_runs[s][key] - plain_runs[s][key]) for s in seeds]

    def log_ratio(eps: float) -> list[float]:
        k = f"{eps:g}"
        return [math.log(awp_runs[s]["adv_loss_change"][k] / plain_runs[s]["adv_loss_change"][k]) for s in seeds]

    def check(label, values, direction, threshold=0.0, unit=" pt"):
        return Check(label, seeds, values, threshold=threshold, direction=direction, unit=unit)

    name, base = awp.upper(), plain.upper()
    flat = [check(f"log(loss change {awp} / {plain}) at eps={e:g}", log_ratio(e), "<", unit="") for e in args.flat_eps]
    return [
        judge_claim(claim, checks)
        for claim, checks in (
            (
                f"{name} raises robust test accuracy "
                f"(PGD-{args.eval_steps}, {args.eval_restarts} restarts) over {base}",
                [check("robust test accuracy difference", diff("robust_test"), ">")],
            ),
            (
                f"{name} narrows the robust train-test gap at the last epoch",
                [check("robust gap difference", diff("gap_last"), "<")],
            ),
            (
                f"{name} reduces robust overfitting (best minus last robust test accuracy)",
                [check("robust overfitting difference", diff("overfit"), "<")],
            ),
            (
                f"{name} keeps clean test accuracy within 1 point of {base}",
                [check("clean test accuracy difference", diff("clean_test"), ">", threshold=-1.0)],
            ),
            (f"{name} has a flatter adversarial weight loss landscape than {base}", flat),
        )
    ]


def report(runs: dict, summary: dict, args) -> str:
    parts = [
        (
            f"Adversarial training on the digits, L-inf eps={args.eps:g}, {args.epochs} epochs, "
            f"seeds {','.join(map(str, args.seeds))} (mean ± sd over seeds):"
        )
    ]
    rows = []
    for preset, by_seed in summary.items():
        vals = list(by_seed.values())
        rows.append(
            [
                preset,
                describe(preset, args),
                _mean_sd(v["clean_test"] for v in vals),
                _mean_sd(v["robust_test"] for v in vals),
                _mean_sd(v["best_robust_monitor"] for v in vals),
                _mean_sd(v["gap_last"] for v in vals),
                _mean_sd(v["overfit"] for v in vals),
            ]
        )
    parts.append(
        _table(
            [
                "preset",
                "training",
                "clean test",
                f"robust test PGD-{args.eval_steps}x{args.eval_restarts}",
                f"best robust test PGD-{args.train_steps}",
                "robust gap (last)",
                "robust overfit",
            ],
            rows,
        )
    )
    parts.append("")
    parts.append(
        "Adversarial loss change under the worst relative per-layer L2 weight corruption "
        f"(K={args.flat_steps}), test adversarial examples fixed at the trained weights (mean over seeds):"
    )
    eps_h = [f"{e:g}" for e in args.flat_eps]
    parts.append(
        _table(
            ["preset", *eps_h],
            [
                [p, *(f"{statistics.mean(v['adv_loss_change'][e] for v in s.values()):.3e}" for e in eps_h)]
                for p, s in summary.items()
            ],
        )
    )
    parts.append("")
    parts.append(f"Robust accuracy over epochs (PGD-{args.train_steps}; train subset / test; mean over seeds):")
    epochs = runs[next(iter(runs))][args.seeds[0]]["history"]["epoch"]
    every = max(1, args.epochs // 5)
    shown = sorted({1, *range(every, args.epochs + 1, every), args.epochs})
    cells = []
    for preset, by_seed in runs.items():
        h = list(by_seed.values())
        mean = lambda key, e: statistics.mean(r["history"][key][e - 1] for r in h)  # noqa: B023
        cells.append([preset, *(f"{mean('robust_train', e):.3f}/{mean('robust_test', e):.3f}" for e in shown)])
    parts.append(_table(["preset", *(f"ep {e}" for e in shown if e <= len(epochs))], cells))
    return "\n".join(parts)


# ---------------------------------------------------------------------------


def run(args, progress: Optional[bool] = None) -> dict:
    from tqdm.auto import tqdm

    from ..data import digits_split

    t_start, cpu_start = time.perf_counter(), time.process_time()
    os.makedirs(args.out, exist_ok=True)
    train_data, test_data = digits_split()
    if args.train_size is not None and args.train_size < len(train_data[1]):
        keep = torch.randperm(len(train_data[1]), generator=torch.Generator().manual_seed(1))[: args.train_size]
        train_data = (train_data[0][keep], train_data[1][keep])
    # a fixed subset of the training split, as large as the test split, for the robust train accuracy
    sub = torch.randperm(len(train_data[1]), generator=torch.Generator().manual_seed(0))[: len(test_data[1])]
    data = (train_data, test_data, (train_data[0][sub], train_data[1][sub]))
    per_epoch = math.ceil(len(train_data[1]) / args.batch_size)
    runs: dict = {p: {} for p in args.presets}
    total = per_epoch * args.epochs * len(args.presets) * len(args.seeds)
    disable = None if progress is None else not progress
    with tqdm(total=total, desc="adversarial training", disable=disable, leave=False, dynamic_ncols=True) as bar:
        for seed in args.seeds:
            for preset in args.presets:
                t0 = time.perf_counter()
                model, history = train(preset, seed, data, args, bar)
                seconds = time.perf_counter() - t0
                final = evaluate(model, data, seed, args)
                runs[preset][seed] = {"history": history, "final": final, "train_seconds": seconds}
    summary = summarise(runs, args)
    verdicts = claims(summary, args)
    doc = {
        "config": {k: v for k, v in vars(args).items() if k != "func"}
        | {
            "model": "DigitsCNN(width=16, hidden=64)",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "attack": "L-inf PGD, uniform random start, eval mode, clipped to [0, 1]",
            "flatness": "robustness.sweep adversarial indicator on CE of the strong attack's test examples, "
            "fixed at the trained weights; float64 copy",
        },
        "runs": {p: {str(s): r for s, r in by_seed.items()} for p, by_seed in runs.items()},
        "claims": [c.to_dict() for c in verdicts],
    }
    doc["table"] = report(runs, summary, args)
    doc["verdicts"] = "\n".join(
        f"  [{v.verdict}] {v.claim}" + "".join(f"\n      {c.describe('.3g')}" for c in v.checks) for v in verdicts
    )
    doc["wall_seconds"] = time.perf_counter() - t_start
    doc["cpu_seconds"] = time.process_time() - cpu_start  # what it costs on an idle machine (1 thread)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=2)
    return doc


def main(args) -> int:
    with _args.torch_threads(args.threads):
        doc = run(args, args.progress)
    print(doc["table"])
    print()
    from .verdicts import RULE

    print(f"AWP paper claims checked by this run ({RULE}):")
    print(doc["verdicts"])
    print()
    print(
        f"wrote {os.path.join(args.out, 'results.json')}  ({doc['wall_seconds']:.0f} s, "
        f"{doc['cpu_seconds']:.0f} s of CPU time)"
    )
    return 0
