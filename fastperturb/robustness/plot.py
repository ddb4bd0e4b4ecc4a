"""Plots of loss change against eps (matplotlib, imported only when plotting)."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from .results import SweepResult

_STYLE = {"random": "--", "first_order": ":"}


def omitted(results: Mapping[str, SweepResult], series: Optional[Sequence[str]] = None) -> list[str]:
    """What a log-log plot of ``results`` leaves out, one phrase per series: the series with no point
    resolved as positive (mean change > 2 standard errors) and the eps of the unresolved points of the others."""
    out = []
    for name, res in results.items():
        for s in res.series if series is None else [s for s in series if s in res.series]:
            pts = res.select(s)
            bad = [p.eps for p in pts if not p.resolved]
            label = f"{name} {s}".strip()
            if len(bad) == len(pts):
                out.append(f"{label} (no point > 2 s.e.)")
            elif bad:
                out.append(f"{label} at eps {', '.join(f'{e:g}' for e in bad)}")
    return out


def omitted_note(results: Mapping[str, SweepResult], series: Optional[Sequence[str]] = None) -> str:
    """One sentence for a plot or table: what was left out and why ("" when nothing was)."""
    left = omitted(results, series)
    if not left:
        return ""
    return "not shown (mean loss change <= 2 s.e., e.g. negative): " + "; ".join(left)


def plot_sweeps(
    results: Mapping[str, SweepResult],
    path: Optional[str] = None,
    series: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    ax=None,
    slopes: bool = True,
    note: bool = True,
):
    """Plot loss change vs eps (log-log) for several results (e.g. one per optimizer).

    Each line is labelled ``"<name> <series>"`` with its fitted small-eps slope
    (or, if fewer than two points are resolved there, the slope over all resolved points).
    Points whose mean change is not resolved as positive (``<= 2`` standard
    errors, e.g. a random corruption that lowered the loss on average) have no
    place on a log axis: the line is broken there, a series with no such point
    is left out, and (with ``note``) a line under the axes says which
    (:func:`omitted`). Returns the Figure; saves it if ``path``.
    """
    from matplotlib.figure import Figure

    fig = None
    if ax is None:
        fig = Figure(figsize=(6.4, 4.8))
        ax = fig.add_subplot(1, 1, 1)
    colors = {}
    for name, res in results.items():
        sl, sl_all = res.slopes(), res.slopes(math.inf)
        for s in res.series if series is None else [s for s in series if s in res.series]:
            pts = res.select(s)
            if not any(p.resolved for p in pts):
                continue
            label = f"{name} {s}".strip()
            if slopes and sl.get(s) is not None:
                label += f" (slope {sl[s]:.2f})"
            elif slopes and sl_all.get(s) is not None:  # nothing resolved at small eps: fit what is
                label += f" (slope {sl_all[s]:.2f}, resolved points)"
            key = name if len(results) > 1 else s
            # unresolved points (mean change <= 2 standard errors, e.g. <= 0) break the line
            line = ax.plot(
                [p.eps for p in pts],
                [p.loss_change if p.resolved else math.nan for p in pts],
                _STYLE.get(s, "-"),
                marker="o",
                ms=3,
                label=label,
                color=colors.get(key),
            )[0]
            colors.setdefault(key, line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(
        "corruption radius ε" + (" (relative)" if any(r.config.get("relative") for r in results.values()) else "")
    )
    ax.set_ylabel("loss change ΔL")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    text = omitted_note(results, series) if note else ""
    if text:
        import textwrap

        ax.text(
            0.0, -0.14, textwrap.fill(text, 90), transform=ax.transAxes, fontsize="x-small", va="top", color="dimgrey"
        )
    fig = fig or ax.figure
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig
