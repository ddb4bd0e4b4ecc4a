"""Output of a benchmark run: readable tables, JSON, a PNG chart, and ``--compare``.

JSON layout (``schema`` = ``fastperturb-bench/1``)::

    {"schema": ..., "env": {torch, cpu_model, torch_threads, packages, git, load averages, ...},
     "config": {...}, "bandwidth": {"triad_gbps", "copy_gbps", ...},
     "results": [record, ...], "targets": [{"name", "value", "goal", "met"}, ...]}

A record has ``suite, model, case, impl, kind`` (fastperturb | reference |
foreach | peer | baseline), ``status`` (ok | skipped | error) and ``reason``;
timed records add ``median_s, min_s, max_s, reps, times_s``; cycle and op
records add the byte model (``passes, bytes``) and ``gbps, bound_s,
pct_of_bound, x_bound`` and, when the bound's triad probe ran in the same rounds,
``x_bound_paired, probe_gbps_median``; cost measurements add ``dispatches, top_ops, alloc
{method, alloc_bytes, alloc_count, param_sized_allocs, ...}, state_bytes``;
train records add ``overhead_share``; memory records add ``param_bytes,
baseline_rss, peak_rss, overhead_bytes, overhead_x_params``; family records
(times per step) add ``steps_per_call, passes_per_step, peak_extra_bytes``.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Iterable, Optional, TextIO

SCHEMA = "fastperturb-bench/1"
PEER_KINDS = ("peer", "foreach")


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    ms = x * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _mb(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 1e6:.1f}"


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _table(rows: list[list[str]], header: list[str], out: TextIO) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out.write(line + "\n" + "-" * len(line) + "\n")
    for r in rows:
        out.write("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + "\n")


def _groups(results: Iterable[dict], suite: str):
    g = defaultdict(list)
    for r in results:
        if r["suite"] == suite:
            g[(r["model"], r["case"])].append(r)
    return g


def _speedups(group: list[dict]) -> tuple[Optional[float], Optional[float]]:
    ok = [r for r in group if r["status"] == "ok" and "median_s" in r]
    peers = [r["median_s"] for r in ok if r["kind"] in PEER_KINDS]
    fe = [r["median_s"] for r in ok if r["kind"] == "foreach"]
    return (min(peers) if peers else None), (min(fe) if fe else None)


def _alloc(r: dict) -> str:
    a = r.get("alloc")
    if not a:
        return "-"
    n = a.get("param_sized_allocs")
    return f"{_mb(a['alloc_bytes'])}MB/{'-' if n is None else n}"


def competing_load(env: dict) -> str:
    """What the run's load averages say of other processes, or "" if nothing: the one-minute figure at the start
    counts only them; the one at the end also counts the run's own torch threads, busy up to its last second, so
    only what exceeds them (by more than half a core) is another process's."""
    cores = env.get("cpu_count") or 1
    start, end = (env.get("load_average_start") or [0.0])[0], (env.get("load_average_end") or [0.0])[0]
    own = min(env.get("torch_threads") or cores, cores)
    if start <= 0.75 * cores and end <= own + 0.5:
        return ""
    return f"load average {start} at start, {end} at end (its own {own} threads included) on {cores} cores"


def print_tables(data: dict, out: TextIO) -> None:
    env, bw = data.get("env", {}), data.get("bandwidth") or {}
    out.write(
        f"fastperturb benchmarks  torch {env.get('torch')}  {env.get('cpu_model')}  threads={env.get('torch_threads')}"
        f"  load avg start={env.get('load_average_start')} end={env.get('load_average_end')}\n"
    )
    if busy := competing_load(env):
        out.write(
            f"WARNING: {busy}: other processes competed for the CPU and memory bus; timings are not representative\n"
        )
    if bw.get("triad_gbps"):
        out.write(
            f"memory bandwidth (this run): triad {bw['triad_gbps']:.1f} GB/s (median {bw['triad_gbps_median']:.1f}),"
            f" copy {bw['copy_gbps']:.1f} GB/s; bounds use the best triad\n"
            "x paired (ops, cycle): the median over rounds of time / bound, the bound from a triad probe timed in"
            " the same round as the sample (so a machine that slows for a while moves both)\n"
        )
    elif bw:
        out.write(
            f"memory bandwidth: not measured reliably ({bw.get('unstable')}); no bandwidth bounds are printed"
            " (bound ms, x bound, %bound show '-'); rerun on a quieter machine\n"
        )
    results = data.get("results", [])
    for suite in ("ops", "cycle", "step"):
        groups = _groups(results, suite)
        if not groups:
            continue
        out.write(
            f"\n== {suite} ==  (speedup = other's median / this median; >1 means this is faster;"
            " allocs = MB allocated per call, in steady state / of those, allocations the size of a parameter"
            " tensor of >= 4 KiB)\n"
        )
        rows, notes = [], []
        for (model, case), grp in groups.items():
            best_peer, best_fe = _speedups(grp)
            for r in grp:
                if r["status"] != "ok":
                    notes.append(f"  {model} {case} {r['impl']}: {r['status']}: {r['reason']}")
                    continue
                med = r["median_s"]
                rows.append(
                    [
                        model,
                        case,
                        r["impl"],
                        _ms(med),
                        f"{_ms(r['min_s'])}-{_ms(r['max_s'])}",
                        str(r["reps"]),
                        f"{r['gbps']:.1f}" if "gbps" in r else "-",
                        _ms(r.get("optimizer_s")) if suite == "step" else _ms(r.get("bound_s")),
                        _ratio(r.get("x_bound")),
                        _ratio(r.get("x_bound_paired")),
                        f"{r['pct_of_bound']:.0f}%" if "pct_of_bound" in r else "-",
                        _ratio(best_fe / med) if best_fe else "-",
                        _ratio(best_peer / med) if best_peer else "-",
                        str(r.get("dispatches", "-")),
                        _alloc(r),
                        _mb(r.get("state_bytes")) if "state_bytes" in r else "-",
                    ]
                )
        _table(
            rows,
            [
                "model",
                "case",
                "impl",
                "median ms",
                "min-max",
                "reps",
                "GB/s",
                "excl.closure ms" if suite == "step" else "bound ms",
                "x bound",
                "x paired",
                "%bound",
                "vs foreach",
                "vs best peer",
                "dispatch",
                "allocs",
                "state MB",
            ],
            out,
        )
        if notes:
            out.write(f"not in the table ({len(dict.fromkeys(notes))}):\n")
        for n in dict.fromkeys(notes):
            out.write(n + "\n")
    groups = _groups(results, "train")
    if groups:
        out.write("\n== train ==  (overhead = (step - (K+1) x fwd/bwd - SGD update) / step)\n")
        rows = []
        for (model, case), grp in groups.items():
            for r in grp:
                if r["status"] != "ok":
                    rows.append([model, case, r["impl"], f"{r['status']}: {r['reason']}"[:70], "", ""])
                    continue
                ov = r.get("overhead_share")
                rows.append(
                    [
                        model,
                        case,
                        r["impl"],
                        _ms(r["median_s"]),
                        f"{_ms(r['min_s'])}-{_ms(r['max_s'])}",
                        "-" if ov is None else f"{100 * ov:.1f}%",
                    ]
                )
        _table(rows, ["model", "case", "impl", "median ms", "min-max", "overhead"], out)
    _family_table(results, out)
    from .train_loop import print_table as print_train_loop  # its own table

    print_train_loop(results, out)
    groups = _groups(results, "memory")
    if groups:
        out.write("\n== memory ==  (separate process per implementation; overhead = peak RSS - baseline)\n")
        rows = []
        for (model, case), grp in groups.items():
            for r in grp:
                if r["status"] != "ok":
                    rows.append([model, case, r["impl"], f"{r['status']}: {r['reason']}"[:70], "", ""])
                    continue
                rows.append(
                    [
                        model,
                        case,
                        r["impl"],
                        _mb(r["overhead_bytes"]),
                        f"{r['overhead_x_params']:.2f}x",
                        f"{r['retained_x_params']:.2f}x",
                    ]
                )
        _table(rows, ["model", "case", "impl", "peak overhead MB", "x params", "retained x params"], out)
    if data.get("targets"):
        out.write("\n== targets (reported, not asserted) ==\n")
        for t in data["targets"]:
            val = "n/a" if t["value"] is None else f"{t['value']:.2f}"
            met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            out.write(f"  {t['name']}: {val} (goal {t['goal']}) -> {met}\n")


def _family_table(results: list[dict], out: TextIO) -> None:
    """The ``family`` suite: each preset's step, fastperturb beside pytorch-optimizer's class of the same name."""
    groups = _groups(results, "family")
    if not groups:
        return
    out.write(
        "\n== family ==  (per step; LookSAM: the mean step of a k-step window; passes = closure calls per step;"
        " vs p-o = pytorch-optimizer's fastest configuration's ms / this ms, >1 means this is faster;"
        " peak MB = peak of the bytes the step allocated above its start, closure excluded)\n"
    )
    rows, notes = [], []
    for (model, case), grp in groups.items():
        po = [r["median_s"] for r in grp if r["status"] == "ok" and "median_s" in r and r["kind"] in PEER_KINDS]
        best_po = min(po) if po else None
        for r in grp:
            if r["status"] != "ok":
                notes.append(f"  {model} {case} {r['impl']}: {r['status']}: {r['reason']}")
                continue
            med = r["median_s"]
            passes = r.get("passes_per_step")
            dispatches = r.get("dispatches")
            rows.append(
                [
                    model,
                    case,
                    r["impl"],
                    _ms(med),
                    f"{_ms(r['min_s'])}-{_ms(r['max_s'])}",
                    str(r["reps"]),
                    "-" if passes is None else f"{passes:.2f}",
                    _ratio(best_po / med) if best_po else "-",
                    "-" if dispatches is None else f"{dispatches:.0f}",
                    _mb(r.get("peak_extra_bytes")),
                    _mb(r.get("state_bytes")),
                ]
            )
    header = ["model", "case", "impl", "ms/step", "min-max", "reps", "passes", "vs p-o", "dispatch", "peak MB"]
    _table(rows, [*header, "state MB"], out)
    if notes:
        out.write(f"not in the table ({len(dict.fromkeys(notes))}):\n")
    for n in dict.fromkeys(notes):
        out.write(n + "\n")


def _find(results, suite, model, case, pred) -> Optional[dict]:
    for r in results:
        if r["suite"] == suite and r["model"] == model and r["case"] == case and r["status"] == "ok" and pred(r):
            return r
    return None


def targets(results: list[dict]) -> list[dict]:
    """The goals of issues #2/#3/#5, evaluated on whatever this run measured."""
    out = []

    def add(name, value, goal, ok):
        out.append({"name": name, "value": value, "goal": goal, "met": None if value is None else ok(value)})

    cpp = lambda r: r["impl"] == "fastperturb[cpp]"  # noqa: E731
    fe = lambda r: r["kind"] == "foreach"  # noqa: E731
    c = _find(results, "cycle", "resnet50", "SAM", cpp)
    add(
        "C++ SAM cycle on ResNet-50, time / bandwidth bound",
        c.get("x_bound") if c else None,
        "<= 1.5",
        lambda v: v <= 1.5,
    )
    f = _find(results, "cycle", "resnet50", "SAM", fe)
    add(
        "C++ SAM cycle on ResNet-50, speedup vs foreach",
        f["median_s"] / c["median_s"] if c and f else None,
        ">= 2",
        lambda v: v >= 2,
    )
    c = _find(results, "cycle", "small1000", "SAM", cpp)
    f = _find(results, "cycle", "small1000", "SAM", fe)
    add(
        "C++ SAM cycle on 1000 small tensors, speedup vs foreach",
        f["median_s"] / c["median_s"] if c and f else None,
        ">= 5",
        lambda v: v >= 5,
    )
    for model, goal in (("resnet50", 4), ("small1000", 10)):
        mine = _find(
            results, "step", model, "SAM", lambda r: r["kind"] == "fastperturb" and r["impl"].endswith("[cpp]")
        )
        po = [
            r
            for r in results
            if r["suite"] == "step"
            and r["model"] == model
            and r["case"] == "SAM"
            and r["status"] == "ok"
            and r["impl"].startswith("pytorch-optimizer")
        ]
        for key, what in (("median_s", "whole step"), ("optimizer_s", "excluding the closure's gradient copies")):
            best = min((r[key] for r in po if r.get(key)), default=None)
            add(
                f"SAM step on {model}, speedup vs pytorch-optimizer SAM (its faster configuration), {what}",
                best / mine[key] if mine and best and mine.get(key) else None,
                f">= {goal}",
                lambda v, g=goal: v >= g,
            )
    for model in ("bert-base",):
        mine = _find(results, "memory", model, "AWP", lambda r: r["impl"] == "fastperturb.AWP")
        proxy = _find(results, "memory", model, "AWP", lambda r: r["impl"] == "proxy-AWP")
        add(
            f"AWP peak memory overhead on {model}, x parameter bytes",
            mine["overhead_x_params"] if mine else None,
            "<= 1 (one buffer per perturbed tensor)",
            lambda v: v <= 1.1,
        )
        add(
            f"proxy-model AWP peak memory overhead on {model}, x parameter bytes (for comparison)",
            proxy["overhead_x_params"] if proxy else None,
            "~3 (issue #3)",
            lambda v: v >= 2,
        )
    # Issue 14: SAM and AWP cycles within 1.3x the bound on the big lists, 1000 small tensors within 2x; on the
    # paired bound (the triad probe of the sample's own round), the run-level one is in the tables beside it.
    for model, case, goal in (
        ("resnet50", "SAM", 1.3),
        ("resnet50", "AWP", 1.3),
        ("bert-base", "SAM", 1.3),
        ("bert-base", "AWP", 1.3),
        ("small1000", "SAM", 2.0),
    ):
        c = _find(results, "cycle", model, case, cpp)
        add(
            f"C++ {case} cycle on {model}, time / bound (paired probe)",
            c.get("x_bound_paired") if c else None,
            f"<= {goal}",
            lambda v, g=goal: v <= g,
        )
    # Issue 14: the whole step (no-op base optimizer, closure excluded) against the cycle alone, same run.
    # SAM and APD only: the step suite's AWP perturbs the dim > 1 tensors, its cycle every tensor.
    for model in ("resnet50", "small1000"):
        for case in (
            "SAM",
            next((r["case"] for r in results if r["suite"] == "cycle" and r["case"][:4] == "APD-"), "APD-3"),
        ):
            step = _find(
                results, "step", model, case, lambda r: r["kind"] == "fastperturb" and r["impl"].endswith("[cpp]")
            )
            cyc = _find(results, "cycle", model, case, cpp)
            add(
                f"{case} step on {model} (C++, closure excluded) / its cycle",
                step["optimizer_s"] / cyc["median_s"] if step and cyc and step.get("optimizer_s") else None,
                "<= 1.05",
                lambda v: v <= 1.05,
            )
            add(  # the same, each step sample against the closure and the cycle timed in its own round
                f"{case} step on {model} (C++, closure excluded) / its cycle, paired per round",
                step.get("over_cycle_paired") if step else None,
                "<= 1.05",
                lambda v: v <= 1.05,
            )
            add(  # each step sample minus the time it spent in its own closure calls, over its round's cycle
                f"{case} step on {model} (C++, its own closure calls excluded) / its cycle, paired per round",
                step.get("over_cycle_own") if step else None,
                "<= 1.05",
                lambda v: v <= 1.05,
            )
    from .train_loop import targets as train_loop_targets

    out.extend(train_loop_targets(results))
    return out


def write_json(data: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)


def load_json(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if data.get("schema") != SCHEMA:
        raise ValueError(
            f"{path}: not a fastperturb benchmark result (schema {data.get('schema')!r}, expected {SCHEMA!r})"
        )
    return data


def _key(r: dict) -> tuple:
    return (r["suite"], r["model"], r["case"], r["impl"])


def _metric(r: dict) -> Optional[tuple[float, float, float]]:
    """(value, low, high) of the record's main metric (time, or peak memory overhead)."""
    if r.get("status") != "ok":
        return None
    if "median_s" in r:
        return r["median_s"], r["min_s"], r["max_s"]
    if "overhead_bytes" in r:
        v = float(r["overhead_bytes"])
        return v, v, v
    return None


def in_common(old: dict, new: dict) -> int:
    """How many results (suite, model, case, implementation) both runs have."""
    return len({_key(r) for r in old.get("results", [])} & {_key(r) for r in new.get("results", [])})


def comparable(old: dict, new: dict) -> int:
    """How many results both runs have *and* measured (status ok in both)."""
    old_by = {_key(r): r for r in old.get("results", [])}
    return sum(
        1
        for r in new.get("results", [])
        if _key(r) in old_by and _metric(r) is not None and _metric(old_by[_key(r)]) is not None
    )


def compare(old: dict, new: dict, threshold: float, out: TextIO) -> int:
    """Print changes of matching records; returns the number of regressions.

    A regression: the new median is worse than the old by more than ``threshold``
    (a fraction) *and* the ranges do not overlap (new min above old max), so a
    noisy run does not cry wolf. Improvements are listed the same way.
    """
    old_by = {_key(r): r for r in old.get("results", [])}
    rows, regressions, improvements, compared, not_ok = [], 0, 0, 0, 0
    for r in new.get("results", []):
        o = old_by.get(_key(r))
        if o is None:
            continue
        a, b = _metric(o), _metric(r)
        if a is None or b is None or a[0] <= 0:
            not_ok += 1
            continue
        compared += 1
        change = b[0] / a[0] - 1
        verdict = ""
        if change > threshold and b[1] > a[2]:
            verdict, regressions = "REGRESSION", regressions + 1
        elif change < -threshold and b[2] < a[1]:
            verdict, improvements = "improved", improvements + 1
        if verdict:
            unit = _ms if "median_s" in r else _mb
            rows.append(
                [
                    r["suite"],
                    r["model"],
                    f"{r['case']} / {r['impl']}",
                    unit(a[0]),
                    unit(b[0]),
                    f"{100 * change:+.1f}%",
                    verdict,
                ]
            )
    common = in_common(old, new)
    only_old = len(old_by) - common
    only_new = len({_key(r) for r in new.get("results", [])}) - common
    if compared == 0:
        out.write(
            f"compare: nothing compared: the files have {common} result(s) in common"
            f"{' and none of them was measured in both' if common else ''} ({only_old} only in the old file,"
            f" {only_new} only in the new one; a result is suite, model, case and implementation)\n"
        )
        return 0
    out.write(
        f"compare: {compared} result(s) compared; {len(rows)} significant change(s) beyond {100 * threshold:.0f}%"
        f" with non-overlapping ranges ({regressions} regression(s), {improvements} improvement(s))\n"
    )
    if only_old or only_new or not_ok:
        out.write(
            f"  not compared: {only_old} result(s) only in the old file, {only_new} only in the new one,"
            f" {not_ok} skipped or failed in either\n"
        )
    eo, en = old.get("env", {}), new.get("env", {})
    for k in ("torch", "cpu_model", "torch_threads"):
        if eo.get(k) != en.get(k):
            out.write(f"  note: {k} differs: {eo.get(k)} -> {en.get(k)}\n")
    if rows:
        _table(rows, ["suite", "model", "case / impl", "old", "new", "change", ""], out)
    return regressions


def spread(runs: list[tuple[str, dict]], out: TextIO) -> int:
    """Print, for every record of fastperturb (and of its one-tensor baseline) with a paired ratio
    (``x_bound_paired``) in any of ``runs`` ((name, result) pairs), the median and range of that ratio over the
    runs that measured it, and each run's value in the order given; then each run's triad. Returns the number of
    records printed.

    One run's figure near a target says little on a host whose speed moves between runs; the same figure over
    several runs gives its median and spread."""
    values: dict[tuple, list[Optional[float]]] = {}
    for i, (_, data) in enumerate(runs):
        for r in data.get("results", []):
            if (
                r.get("kind") not in ("fastperturb", "baseline")
                or r.get("status") != "ok"
                or r.get("x_bound_paired") is None
            ):
                continue
            values.setdefault(_key(r), [None] * len(runs))[i] = r["x_bound_paired"]
    rows = []
    for key, vals in values.items():
        got = sorted(v for v in vals if v is not None)
        rows.append(
            [
                key[0],
                key[1],
                f"{key[2]} / {key[3]}",
                f"{len(got)}/{len(runs)}",
                _ratio(statistics.median(got)),
                f"{got[0]:.2f}-{got[-1]:.2f}",
                " ".join("-" if v is None else f"{v:.2f}" for v in vals),
            ]
        )
    _table(rows, ["suite", "model", "case / impl", "runs", "median x paired", "min-max", "each run"], out)
    triads = [(name, data.get("bandwidth", {}).get("triad_gbps_best_seen")) for name, data in runs]
    out.write(
        "triad GB/s (best seen) per run: " + ", ".join(f"{n} {'-' if g is None else f'{g:.1f}'}" for n, g in triads)
    )
    out.write("\n")
    return len(rows)


def chart_unavailable() -> Optional[str]:
    """Why no chart can be drawn here (matplotlib missing), or None."""
    try:
        import matplotlib  # noqa: F401
    except Exception as e:
        return f"no chart: matplotlib is not installed ({type(e).__name__})"
    return None


def chart(data: dict, path: str) -> Optional[str]:
    """A PNG of the cycle and step times (log scale, bound marked); returns an error message or None."""
    err = chart_unavailable()
    if err:
        return err
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "fastperturb": "#1f77b4",
        "reference": "#9ecae1",
        "foreach": "#ff7f0e",
        "peer": "#d62728",
        "baseline": "#7f7f7f",
    }
    panels = [
        s for s in ("cycle", "step", "ops") if any(r["suite"] == s and r["status"] == "ok" for r in data["results"])
    ]
    if not panels:
        return "no chart: no timed cycle/step/ops results"
    heights = []
    for s in panels:
        heights.append(sum(1 for r in data["results"] if r["suite"] == s and r["status"] == "ok"))
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(10, 0.22 * sum(heights) + 1.2 * len(panels)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, suite in zip(axes[:, 0], panels):
        recs = [r for r in data["results"] if r["suite"] == suite and r["status"] == "ok"]
        labels = [f"{r['model']} {r['case']} {r['impl']}" for r in recs]
        ys = list(range(len(recs)))[::-1]
        ax.barh(
            ys,
            [r["median_s"] * 1e3 for r in recs],
            color=[colors.get(r["kind"], "gray") for r in recs],
            xerr=[
                [(r["median_s"] - r["min_s"]) * 1e3 for r in recs],
                [(r["max_s"] - r["median_s"]) * 1e3 for r in recs],
            ],
            error_kw={"elinewidth": 0.6, "capsize": 1.5},
        )
        for y, r in zip(ys, recs):
            if r.get("bound_s"):
                ax.plot([r["bound_s"] * 1e3] * 2, [y - 0.4, y + 0.4], color="black", lw=1.2)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("ms per call (median, min-max; black tick: bandwidth bound)")
        ax.set_title(f"{suite}", fontsize=9)
    from matplotlib.patches import Patch

    kinds = [k for k in colors if any(r["kind"] == k for r in data["results"] if r["status"] == "ok")]
    axes[0, 0].legend(handles=[Patch(color=colors[k], label=k) for k in kinds], fontsize=7, loc="lower right")
    left_out = [r for r in data["results"] if r["suite"] in ("cycle", "step", "ops") and r["status"] != "ok"]
    notes = []
    if left_out:
        notes.append(
            f"left out: {len(left_out)} skipped or failed implementation(s) "
            f"({', '.join(sorted({r['impl'] for r in left_out}))}); reasons in the table"
        )
    other = sorted({r["suite"] for r in data["results"]} - {"cycle", "step", "ops"})
    if other:
        notes.append(f"not charted: the {', '.join(other)} suite(s) (see the table)")
    if not (data.get("bandwidth") or {}).get("triad_gbps"):
        notes.append("no bandwidth bound ticks: the bandwidth probe was not stable in this run")
    if notes:
        fig.text(0.01, 0.002, "; ".join(notes), fontsize=6, ha="left", va="bottom", wrap=True)
    env = data.get("env", {})
    fig.suptitle(
        f"fastperturb benchmarks, torch {env.get('torch')}, {env.get('cpu_model')}, {env.get('torch_threads')} threads",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.03 if notes else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
