"""``fastperturb demo``: train a small CNN on the bundled digits with SGD, SAM, AWP and APD, then corrupt its weights.

Every preset trains the same CNN from the same initialisation, on the same
mini-batch order, with the same base optimizer (SGD, momentum 0.9, weight
decay 5e-4, cosine learning-rate schedule) for the same number of epochs; only
the weight perturbation differs. Each trained model is then evaluated on the
held-out test split (:func:`fastperturb.data.digits_split`): clean accuracy,
and the loss change and accuracy under adversarial (1 and K ascent steps, and
the first-order estimate) and random corruption of all its parameters over
an eps grid (:func:`fastperturb.robustness.sweep`).

Radii are *relative* by default: a corruption of radius eps moves each
parameter tensor by at most ``eps * ||w_l||_2`` (per-layer L2 ball). AWP and
APD are trained with the same kind of radius (``gamma``/``eps`` relative, per
layer), so the training radius can be read off the eps axis; SAM's rho is
absolute and global, as in its paper.

The evaluation runs on a float64 copy of each trained model: the loss change
of random corruption at the smallest eps is around 1e-8, below float32's
rounding noise on a loss of 1e-2.

Writes ``results.json`` (everything), ``results.csv`` (one tidy row per
preset, series and eps), ``loss_change.png`` (adversarial loss change vs eps
per preset), ``adversarial_vs_random.png`` (one panel per preset),
``accuracy.png`` (test accuracy under adversarial corruption), and each
trained model's ``state_dict`` under ``models/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._args import int_list, positive_eps_list

PRESETS = ("sgd", "sam", "awp", "apd")
DEFAULT_EPS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and two linear layers for 1x8x8 inputs (about 38k parameters)."""

    def __init__(self, width: int = 16, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def _presets(text: str) -> list[str]:
    vals = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in PRESETS]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"presets must be a comma-separated subset of {','.join(PRESETS)}, got {text!r}")
    return list(dict.fromkeys(vals))


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=_positive(int), default=20, help="training epochs per preset (default 20)")
    p.add_argument("--presets", type=_presets, default=list(PRESETS), help="comma-separated, from sgd,sam,awp,apd (default all)")
    p.add_argument("--eps", type=positive_eps_list, default=list(DEFAULT_EPS),
                   help="comma-separated corruption radii, relative to each tensor's norm (default %(default)s)")
    p.add_argument("--steps", type=int_list, default=[1, 5], help="ascent steps of the adversarial corruption (default 1,5)")
    p.add_argument("--trials", type=_positive(int), default=20,
                   help="random corruptions per eps, in mirrored pairs a, -a (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batch order and random corruptions")
    p.add_argument("--out", default="fastperturb-demo", help="output folder (default ./fastperturb-demo)")
    p.add_argument("--batch-size", type=_positive(int), default=32)
    p.add_argument("--lr", type=_positive(float), default=0.05, help="base SGD learning rate (default 0.05)")
    p.add_argument("--rho", type=_positive(float), default=0.05, help="SAM radius (absolute, global L2; default 0.05)")
    p.add_argument("--gamma", type=_positive(float), default=0.02, help="AWP radius, relative per layer (default 0.02)")
    p.add_argument("--apd-eps", type=_positive(float), default=0.02, help="APD radius, relative per layer L2 (default 0.02)")
    p.add_argument("--apd-steps", type=_positive(int), default=3, help="APD ascent steps (default 3)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress bars")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress bars")
    p.add_argument("--threads", type=_positive(int), default=1,
                   help="torch threads (default 1: the CNN is too small to gain from more, and on a shared "
                        "machine several spinning threads per process slow everything down many times)")
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
    if preset == "awp":
        return fp.AWP(model.parameters(), torch.optim.SGD, gamma=args.gamma, steps=1, **base)
    if preset == "apd":
        return fp.APD(model.parameters(), torch.optim.SGD, eps=args.apd_eps, steps=args.apd_steps, norm="l2",
                      scope="layer", relative=True, include_clean=True, **base)
    raise ValueError(f"unknown preset {preset!r}")


def describe(preset: str, args) -> str:
    return {
        "sgd": "SGD",
        "sam": f"SAM rho={args.rho:g} (abs, global L2)",
        "awp": f"AWP gamma={args.gamma:g} (rel, layer, dim>1)",
        "apd": f"APD eps={args.apd_eps:g} K={args.apd_steps} (rel, layer L2)",
    }[preset]


def train(preset: str, train_data, args, progress: Optional[bool]) -> tuple[nn.Module, float, float]:
    """Train one model; returns (model, seconds, mean loss of the last epoch)."""
    from tqdm.auto import tqdm

    x, y = train_data
    torch.manual_seed(args.seed)
    model = DigitsCNN()
    opt = make_optimizer(preset, model, args)
    per_epoch = math.ceil(len(y) / args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, per_epoch * args.epochs) / (per_epoch * args.epochs)))
    )
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    last = math.nan
    disable = None if progress is None else not progress
    with tqdm(total=args.epochs * per_epoch, desc=f"train {preset}", disable=disable, leave=False, dynamic_ncols=True) as bar:
        for epoch in range(args.epochs):
            perm = torch.randperm(len(y), generator=gen)
            total, seen = 0.0, 0
            for i in range(0, len(y), args.batch_size):
                idx = perm[i:i + args.batch_size]
                xb, yb = x[idx], y[idx]

                def closure():
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
                total += float(loss.detach()) * len(yb)
                seen += len(yb)
                bar.update(1)
            last = total / seen
            bar.set_postfix_str(f"epoch {epoch + 1} loss {last:.4f}", refresh=False)
            if not math.isfinite(last):
                raise FloatingPointError(f"{preset}: the training loss became {last} in epoch {epoch + 1}; lower --lr or the radius")
    return model, time.perf_counter() - t0, last


# ---------------------------------------------------------------------------
# report


def _fmt(v, spec=".2e") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _at(res, series: str, eps: float):
    for p in res.select(series):
        if math.isclose(p.eps, eps, rel_tol=1e-9):
            return p
    return None


def _nearest(grid: Sequence[float], value: float) -> float:
    return min(grid, key=lambda e: abs(math.log(e / value)))


def kinds_of(results: dict) -> set:
    return set.intersection(*(set(r.series) for r in results.values())) if results else set()


def findings(results: dict, summary: dict, args) -> list[dict]:
    """The paper claims the demo checks, each with what this run measured and whether it held."""
    out = []
    grid = sorted(args.eps)
    kmax = max(args.steps)
    adv = f"adversarial_k{kmax}"
    # 1. adversarial >> random at the same norm (random's mean may be too small to resolve: then compare to 2 s.e.)
    ratios, notes = {}, []
    for name, res in results.items():
        if "random" in res.series and adv in res.series:
            a, r = _at(res, adv, grid[0]), _at(res, "random", grid[0])
            bound = r.loss_change if r.resolved else 2 * r.loss_change_sem
            ratios[name] = a.loss_change / bound if bound > 0 else math.inf
            if not r.resolved:
                notes.append(f"{name}: random mean {r.loss_change:.1e} not resolved, compared with 2 s.e. = {bound:.1e}")
    if ratios:
        out.append({
            "claim": f"adversarial corruption raises the loss far more than random corruption of the same norm (eps={grid[0]:g})",
            "measured": ", ".join(f"{n}: x{v:.3g}" for n, v in ratios.items()) + "".join(f"; {t}" for t in notes),
            "holds": all(v >= 10 for v in ratios.values()),
        })
    # 2. slopes: adversarial on the small-eps half; random on the whole grid where its mean is positive
    sl = {n: res.slopes() for n, res in results.items()}
    sl_all = {n: res.slopes(math.inf) for n, res in results.items()}
    a_sl = [s.get("adversarial_k1") for s in sl.values()]
    r_sl = [s.get("random") for s in sl_all.values()]
    nonpos = {n: [p.eps for p in res.select("random") if not p.resolved] for n, res in results.items() if "random" in res.series}
    if "random" in kinds_of(results) and "adversarial_k1" in kinds_of(results):
        out.append({
            "claim": "log-log slope: about 1 for adversarial (small eps), about 2 for random",
            "measured": "; ".join(f"{n}: adv {_fmt(sl[n].get('adversarial_k1'), '.2f')}, random {_fmt(sl_all[n].get('random'), '.2f')} "
                                  f"(small eps {_fmt(sl[n].get('random'), '.2f')})" for n in results)
            + "".join(f"; {n}: random mean not resolved as > 0 (<= 2 s.e.) at eps {', '.join(f'{e:g}' for e in v)}" for n, v in nonpos.items() if v),
            "holds": all(v is not None and 0.7 <= v <= 1.4 for v in a_sl) and all(v is not None and 1.6 <= v <= 2.4 for v in r_sl),
        })
    # 3. multi-step at least as strong as one step
    if len(args.steps) > 1:
        k1 = min(args.steps)
        worse = [(n, p.eps) for n, res in results.items() for p in res.select(adv)
                 if p.loss_change < _at(res, f"adversarial_k{k1}", p.eps).loss_change * (1 - 1e-6)]
        out.append({
            "claim": f"{kmax}-step corruption is at least as strong as {k1}-step",
            "measured": "at every preset and eps" if not worse else "weaker at " + ", ".join(f"{n} eps={e:g}" for n, e in worse),
            "holds": not worse,
        })
    # 4. AWP/APD lose less than SGD around their training radius, clean accuracy no worse
    if "sgd" in results:
        for name, radius in (("awp", args.gamma), ("apd", args.apd_eps)):
            if name not in results:
                continue
            near = [e for e in grid if radius / 2.5 <= e <= radius * 2.5] or [_nearest(grid, radius)]
            ratio = {e: _at(results[name], adv, e).loss_change / _at(results["sgd"], adv, e).loss_change for e in near}
            dacc = summary[name]["clean_accuracy"] - summary["sgd"]["clean_accuracy"]
            out.append({
                "claim": f"{name.upper()} (radius {radius:g}) loses less than SGD under adversarial corruption around its radius, clean accuracy no worse",
                "measured": "loss change vs SGD " + ", ".join(f"eps={e:g}: x{v:.2f}" for e, v in ratio.items())
                + f"; clean accuracy {summary[name]['clean_accuracy']:.4f} vs {summary['sgd']['clean_accuracy']:.4f}",
                "holds": all(v < 1 for v in ratio.values()) and dacc >= 0,
            })
    return out


def report(results: dict, summary: dict, args) -> str:
    grid = sorted(args.eps)
    kmax = max(args.steps)
    names = list(results)
    parts = []
    rows = []
    for n in names:
        s, sl, sl_all = summary[n], results[n].slopes(), results[n].slopes(math.inf)
        rows.append([n, summary[n]["optimizer"], f"{s['clean_accuracy']:.4f}", f"{s['clean_loss']:.4f}", f"{s['train_seconds']:.1f}",
                     *(_fmt(sl.get(k), ".2f") for k in (*(f"adversarial_k{k}" for k in args.steps), "random")),
                     _fmt(sl_all.get("random"), ".2f")])
    parts.append("Clean test accuracy/loss, training time, and fitted log-log slopes of the loss change (small eps: eps <= "
                 f"{sorted(grid)[(len(grid) - 1) // 2]:g}; all: the whole grid; only points whose mean change exceeds twice its standard error):")
    parts.append(format_table(["preset", "optimizer", "test acc", "test loss", "train s",
                               *(f"slope adv K={k}" for k in args.steps), "slope random", "slope random (all)"], rows))
    eps_h = [f"{e:g}" for e in grid]
    for title, series, field, spec in (
        (f"Loss change under adversarial corruption (K={kmax}), relative eps:", f"adversarial_k{kmax}", "loss_change", ".2e"),
        ("Loss change under adversarial corruption (K=1):", "adversarial_k1", "loss_change", ".2e"),
        ("First-order estimate eps*||g||:", "first_order", "loss_change", ".2e"),
        (f"Loss change under random corruption (mean of {args.trials} in mirrored pairs; its standard error):", "random", "loss_change", ".2e"),
        (f"Test accuracy under adversarial corruption (K={kmax}):", f"adversarial_k{kmax}", "accuracy", ".4f"),
        ("Test accuracy under random corruption:", "random", "accuracy", ".4f"),
    ):
        if not all(series in results[n].series for n in names):
            continue
        parts.append("")
        parts.append(title)
        cell = lambda p: _fmt(getattr(p, field), spec) + (f" ({p.loss_change_sem:.0e})" if series == "random" and field == "loss_change" else "")
        parts.append(format_table(["preset", *eps_h], [[n, *(cell(_at(results[n], series, e)) for e in grid)] for n in names]))
    return "\n".join(parts)


def write_plots(results: dict, summary: dict, args, out: str) -> list[str]:
    from matplotlib.figure import Figure

    from ..robustness import plot_sweeps

    kmax = max(args.steps)
    files = []
    path = os.path.join(out, "loss_change.png")
    fig = plot_sweeps({n: r for n, r in results.items()}, series=[f"adversarial_k{kmax}"],
                      title=f"Adversarial corruption (K={kmax}): loss change vs relative radius")
    ax = fig.axes[0]
    for name, radius, style in (("awp", args.gamma, ":"), ("apd", args.apd_eps, "-.")):
        if name in results:
            ax.axvline(radius, color="grey", ls=style, lw=0.8, label=f"{name.upper()} training radius")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    files.append(path)

    n = len(results)
    cols = min(n, 2)
    rows_ = math.ceil(n / cols)
    fig = Figure(figsize=(6.0 * cols, 4.6 * rows_))
    for i, (name, res) in enumerate(results.items()):
        ax = fig.add_subplot(rows_, cols, i + 1)
        plot_sweeps({"": res}, ax=ax, title=f"{name}: adversarial vs random")
    fig.tight_layout()
    path = os.path.join(out, "adversarial_vs_random.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    files.append(path)

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    for name, res in results.items():
        pts = res.select(f"adversarial_k{kmax}")
        line = ax.plot([p.eps for p in pts], [p.accuracy for p in pts], "-o", ms=3, label=f"{name} adversarial K={kmax}")[0]
        if "random" in res.series:
            rp = res.select("random")
            ax.plot([p.eps for p in rp], [p.accuracy for p in rp], "--", color=line.get_color(), label=f"{name} random")
    ax.set_xscale("log")
    ax.set_xlabel("corruption radius ε (relative)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("Test accuracy under weight corruption")
    path = os.path.join(out, "accuracy.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    files.append(path)
    return files


# ---------------------------------------------------------------------------


def run(args) -> dict:
    from ..data import digits_split
    from ..robustness import sweep

    t_start = time.perf_counter()
    os.makedirs(os.path.join(args.out, "models"), exist_ok=True)
    train_data, test_data = digits_split()
    test64 = (test_data[0].double(), test_data[1])
    results, summary = {}, {}
    for preset in args.presets:
        model, seconds, train_loss = train(preset, train_data, args, args.progress)
        torch.save(model.state_dict(), os.path.join(args.out, "models", f"{preset}.pt"))
        model64 = copy.deepcopy(model).double().eval()
        t0 = time.perf_counter()
        res = sweep(model64, F.cross_entropy, test64, args.eps, steps=args.steps, trials=args.trials, seed=args.seed,
                    norm="l2", scope="layer", relative=True, progress=args.progress, desc=f"corrupt {preset}")
        results[preset] = res
        summary[preset] = {
            "optimizer": describe(preset, args),
            "clean_accuracy": res.clean_accuracy,
            "clean_loss": res.clean_loss,
            "train_loss_last_epoch": train_loss,
            "train_seconds": seconds,
            "eval_seconds": time.perf_counter() - t0,
        }
    found = findings(results, summary, args)
    config = {k: v for k, v in vars(args).items() if k not in ("func",)}
    config.update({
        "model": "DigitsCNN(width=16, hidden=64)",
        "data": "UCI optdigits 8x8 (bundled), stratified split test_fraction=0.2 split seed 0: "
                f"{len(train_data[1])} train / {len(test_data[1])} test",
        "base_optimizer": "SGD(momentum=0.9, weight_decay=5e-4), cosine schedule to 0 over all steps",
        "evaluation": "float64 copy of the trained model, eval mode, test split full batch; relative per-layer L2 radius, all parameters",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    })
    doc = {
        "config": config,
        "summary": summary,
        "findings": found,
        "results": {n: r.to_dict() for n, r in results.items()},
        "wall_seconds": time.perf_counter() - t_start,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=2)
    with open(os.path.join(args.out, "results.csv"), "w") as f:
        first = True
        for n, r in results.items():
            text = r.to_csv()
            lines = text.splitlines()
            if first:
                f.write("preset," + lines[0] + "\n")
                first = False
            for line in lines[1:]:
                f.write(f"{n},{line}\n")
    doc["plots"] = [] if args.no_plots else write_plots(results, summary, args, args.out)
    doc["table"] = report(results, summary, args)
    doc["wall_seconds"] = time.perf_counter() - t_start
    return doc


def main(args) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        doc = run(args)
    finally:
        torch.set_num_threads(threads)
    print(doc["table"])
    print()
    print("Paper claims checked by this run:")
    for f in doc["findings"]:
        print(f"  [{'holds' if f['holds'] else 'DOES NOT HOLD'}] {f['claim']}\n      {f['measured']}")
    print()
    print(f"wrote {os.path.join(args.out, 'results.json')}, results.csv" + (", " + ", ".join(os.path.basename(p) for p in doc["plots"]) if doc["plots"] else "")
          + f" and models/ in {args.out}  ({doc['wall_seconds']:.0f} s)")
    return 0
