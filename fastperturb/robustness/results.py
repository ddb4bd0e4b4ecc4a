"""Results of a robustness evaluation: points, sweeps, slopes, JSON/CSV/table export."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

# ---------------------------------------------------------------------------
# results


@dataclass
class Point:
    """The outcome of one corruption setting: mean/std loss change and accuracy."""

    kind: str
    eps: float
    loss: float
    loss_change: float
    loss_change_std: float = 0.0
    accuracy: Optional[float] = None
    accuracy_std: Optional[float] = None
    accuracy_drop: Optional[float] = None
    steps: Optional[int] = None
    trials: int = 1
    # standard error of the mean loss change (random: from the mirrored pairs; NaN from one pair or one draw)
    loss_change_sem: float = 0.0

    @property
    def series(self) -> str:
        return f"adversarial_k{self.steps}" if self.kind == "adversarial" else self.kind

    @property
    def resolved(self) -> bool:
        """The loss change is positive by more than twice its standard error (so it has a place on a log axis); not
        when that error is unknown (NaN: one random draw, or one mirrored pair)."""
        return (
            math.isfinite(self.loss_change)
            and math.isfinite(self.loss_change_sem)
            and self.loss_change > 2 * self.loss_change_sem
            and self.loss_change > 0
        )

    def as_row(self) -> dict:
        return {
            "series": self.series,
            "kind": self.kind,
            "steps": self.steps,
            "eps": self.eps,
            "loss": self.loss,
            "loss_change": self.loss_change,
            "loss_change_std": self.loss_change_std,
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "accuracy_drop": self.accuracy_drop,
            "trials": self.trials,
            "loss_change_sem": self.loss_change_sem,
        }


def fit_slope(eps: Sequence[float], values: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log(value) against log(eps) over the points with value > 0 (None if < 2)."""
    pts = [
        (math.log(e), math.log(v))
        for e, v in zip(eps, values)
        if e > 0 and v is not None and v > 0 and math.isfinite(v)
    ]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


ROW_FIELDS = [
    "series",
    "kind",
    "steps",
    "eps",
    "loss",
    "loss_change",
    "loss_change_std",
    "accuracy",
    "accuracy_std",
    "accuracy_drop",
    "trials",
    "loss_change_sem",
]


@dataclass
class SweepResult:
    """A tidy table: one row per (series, eps), plus the clean loss/accuracy and the settings."""

    points: list[Point]
    clean_loss: float
    clean_accuracy: Optional[float]
    config: dict = field(default_factory=dict)

    @property
    def rows(self) -> list[dict]:
        return [p.as_row() for p in self.points]

    @property
    def series(self) -> list[str]:
        out: list[str] = []
        for p in self.points:
            if p.series not in out:
                out.append(p.series)
        return out

    def select(self, series: str) -> list[Point]:
        """The points of one series (``"adversarial_k1"``, ``"random"``, ...), by increasing eps."""
        pts = sorted((p for p in self.points if p.series == series), key=lambda p: p.eps)
        if not pts:
            raise KeyError(f"no series {series!r}; have {self.series}")
        return pts

    def slopes(self, max_eps: Optional[float] = None) -> dict[str, Optional[float]]:
        """Fitted log-log slope of the loss change against eps, per series.

        The fit uses the points with ``eps <= max_eps`` whose loss change is
        resolved as positive (:attr:`Point.resolved`: more than twice its standard error);
        by default ``max_eps`` is the median of the eps grid (the small-eps half,
        where the second-order picture of docs/design.md §2.4 holds); ``math.inf`` fits the
        whole grid. None where fewer than two points qualify.
        """
        if max_eps is None:
            max_eps = self.small_eps_bound()
        out = {}
        for s in self.series:
            pts = [p for p in self.select(s) if p.eps <= max_eps and p.resolved]
            out[s] = fit_slope([p.eps for p in pts], [p.loss_change for p in pts])
        return out

    def small_eps_bound(self) -> float:
        """The largest eps of the grid's small-eps half (its median), where :meth:`slopes` fits by default."""
        grid = sorted({p.eps for p in self.points})
        return grid[(len(grid) - 1) // 2] if grid else 0.0

    def slope_gaps(self) -> dict[str, str]:
        """Why :meth:`slopes` has no slope for a series (series -> reason), for the series that have none."""
        bound = self.small_eps_bound()
        out = {}
        for s, slope in self.slopes().items():
            if slope is not None:
                continue
            small = [p for p in self.select(s) if 0 < p.eps <= bound]
            eps, up = {p.eps for p in small}, {p.eps for p in small if p.resolved}
            out[s] = (
                f"its loss change is resolved above zero (by more than 2 s.e.) at {len(up)} of the {len(eps)} "
                f"eps in (0, {bound:g}], and a slope needs two"
            )
        return out

    def to_dict(self) -> dict:
        return {
            "clean_loss": self.clean_loss,
            "clean_accuracy": self.clean_accuracy,
            "config": self.config,
            "slopes": self.slopes(),
            "rows": self.rows,
        }

    def to_json(self, path: Optional[str] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, allow_nan=True)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def to_csv(self, path: Optional[str] = None) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=ROW_FIELDS, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        text = buf.getvalue()
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def table(self) -> str:
        """A plain-text table of the rows."""
        head = f"{'series':<16}{'eps':>10}{'loss change':>14}{'± std':>11}{'accuracy':>10}{'acc drop':>10}"
        lines = [
            f"clean loss {self.clean_loss:.5g}"
            + (f", clean accuracy {self.clean_accuracy:.4f}" if self.clean_accuracy is not None else ""),
            head,
        ]
        for p in sorted(self.points, key=lambda p: (self.series.index(p.series), p.eps)):
            acc = "" if p.accuracy is None else f"{p.accuracy:.4f}"
            # (a mean of equal accuracies can come out 1e-17 off the clean one: no "-0.0000" for it)
            drop = "" if p.accuracy_drop is None else f"{round(p.accuracy_drop, 12) + 0.0:+.4f}"
            lines.append(
                f"{p.series:<16}{p.eps:>10.4g}{p.loss_change:>14.4e}{p.loss_change_std:>11.2e}{acc:>10}{drop:>10}"
            )
        return "\n".join(lines)

    def plot(self, path: Optional[str] = None, title: Optional[str] = None, ax=None):
        """Loss change against eps, log-log, one line per series (returns the matplotlib Figure)."""
        from .plot import plot_sweeps

        return plot_sweeps({"": self}, path=path, title=title, ax=ax)
