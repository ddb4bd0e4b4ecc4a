"""Multi-seed statistics and the verdict rule for the claims a demo checks.

A claim is judged on a set of *checks*. A check is one quantity measured once per
seed (a slope, a log ratio, an accuracy difference of two models trained from the
same seed) together with a threshold and a direction: the claim says the quantity
is above (``">"``) or below (``"<"``) the threshold. Its per-seed *margin* is the
signed distance to the threshold, positive when the claim holds on that seed.

The rule (:data:`RULE`) is a two-sided 95% Student-t interval on the mean margin
over seeds: a check *holds* when the whole interval is above zero, *fails* when
it is below zero, and is *undecided* otherwise (also with fewer than two seeds,
or when the quantity could not be measured on some seed). A claim holds when all
its checks hold, fails when any fails, and is undecided otherwise. Two runs of
the same claims (say from different starting seeds) *reproduce* a claim when its
verdict is the same in both (:func:`compare`).

Usage::

    from fastperturb.tools.verdicts import Check, judge_claim
    c = Check("slope", seeds=[0, 1, 2], values=[1.1, 1.2, 1.05], threshold=0.7, direction=">")
    v = judge_claim("the slope is above 0.7", [c])
    v.verdict          # "holds"
    v.to_dict()        # JSON-ready, with per-seed values and the statistics
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

HOLDS, FAILS, UNDECIDED = "holds", "fails", "undecided"

RULE = (
    "a check holds when the two-sided 95% Student-t interval of its mean margin over seeds "
    "(mean +- t(0.975, n-1) * sd / sqrt(n)) lies entirely above zero, fails when it lies entirely below, "
    "and is undecided otherwise or with fewer than 2 seeds; a claim holds when all its checks hold, "
    "fails when any fails; a claim whose verdict differs between two starting seeds is not reproduced"
)

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (the 95% two-sided interval's factor)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion around the normal quantile; within 1e-3 for df > 30
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Stats:
    """Mean, sample standard deviation and standard error of the finite values (``n`` counts them)."""

    n: int
    mean: float
    sd: float
    sem: float

    @classmethod
    def of(cls, values: Iterable[float]) -> "Stats":
        vals = [float(v) for v in values if v is not None and math.isfinite(v)]
        n = len(vals)
        if n == 0:
            return cls(0, math.nan, math.nan, math.nan)
        mean = sum(vals) / n
        if n == 1:
            return cls(1, mean, math.nan, math.nan)
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        return cls(n, mean, sd, sd / math.sqrt(n))

    def to_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "sd": self.sd, "sem": self.sem}


def _finite(v: Optional[float]) -> bool:
    return v is not None and math.isfinite(v)


@dataclass
class Check:
    """One quantity measured per seed, which the claim says is ``direction`` (``">"`` or ``"<"``) ``threshold``.

    ``values[i]`` belongs to ``seeds[i]``; None or NaN means it could not be measured on that seed.
    """

    label: str
    seeds: Sequence[int]
    values: Sequence[Optional[float]]
    threshold: float = 0.0
    direction: str = ">"
    unit: str = ""
    stats: Stats = field(init=False)
    margin: Stats = field(init=False)
    interval: tuple[float, float] = field(init=False)
    verdict: str = field(init=False)
    reason: str = field(init=False)

    def __post_init__(self):
        if self.direction not in (">", "<"):
            raise ValueError(f"direction must be '>' or '<', got {self.direction!r}")
        if len(self.seeds) != len(self.values):
            raise ValueError(f"{self.label}: {len(self.values)} values for {len(self.seeds)} seeds")
        self.seeds = [int(s) for s in self.seeds]
        self.values = [None if v is None else float(v) for v in self.values]
        self.stats = Stats.of(self.values)
        self.margin = Stats.of(self.margins)
        self.verdict, self.reason, self.interval = self._judge()

    @property
    def margins(self) -> list[float]:
        """Per seed: how far the value is on the claimed side of the threshold (NaN where not measured)."""
        sign = 1.0 if self.direction == ">" else -1.0
        return [sign * (v - self.threshold) if _finite(v) else math.nan for v in self.values]

    @property
    def per_seed(self) -> list[Optional[bool]]:
        """Whether the claim holds on each seed taken alone (None: not measured)."""
        return [None if math.isnan(m) else m > 0 for m in self.margins]

    def _judge(self) -> tuple[str, str, tuple[float, float]]:
        missing = [s for s, ok in zip(self.seeds, self.per_seed) if ok is None]
        if missing:
            return UNDECIDED, f"not measured on seed {', '.join(map(str, missing))}", (math.nan, math.nan)
        if self.margin.n < 2:
            return UNDECIDED, "needs at least 2 seeds for a spread", (math.nan, math.nan)
        half = t_quantile(self.margin.n - 1) * self.margin.sem
        lo, hi = self.margin.mean - half, self.margin.mean + half
        if lo > 0:
            return HOLDS, "95% interval of the margin above 0", (lo, hi)
        if hi < 0:
            return FAILS, "95% interval of the margin below 0", (lo, hi)
        return UNDECIDED, "95% interval of the margin contains 0", (lo, hi)

    def describe(self, spec: str = ".3g") -> str:
        """One line: mean +- sd (s.e.) against the threshold, per-seed count, verdict."""
        s = self.stats
        ok = sum(1 for p in self.per_seed if p)
        spread = "" if s.n < 2 else f" ± {format(s.sd, spec)} sd (s.e. {format(s.sem, spec)})"
        mean = format(s.mean, spec) if s.n else "-"
        return (
            f"{self.label}: {mean}{self.unit}{spread} {self.direction} {format(self.threshold, spec)}{self.unit} "
            f"on {ok}/{len(self.seeds)} seeds -> {self.verdict} ({self.reason})"
        )

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "threshold": self.threshold,
            "direction": self.direction,
            "unit": self.unit,
            "seeds": list(self.seeds),
            "values": list(self.values),
            "per_seed": self.per_seed,
            "stats": self.stats.to_dict(),
            "margin": self.margin.to_dict(),
            "interval": list(self.interval),
            "verdict": self.verdict,
            "reason": self.reason,
        }


def combine(verdicts: Iterable[str]) -> str:
    """All hold -> holds; any fails -> fails; otherwise undecided (and undecided for no verdicts at all)."""
    vs = list(verdicts)
    if not vs:
        return UNDECIDED
    if any(v == FAILS for v in vs):
        return FAILS
    return HOLDS if all(v == HOLDS for v in vs) else UNDECIDED


@dataclass
class ClaimVerdict:
    """A claim, its checks and the combined verdict."""

    claim: str
    checks: list[Check]
    note: str = ""

    @property
    def verdict(self) -> str:
        return combine(c.verdict for c in self.checks)

    @property
    def holds(self) -> bool:
        return self.verdict == HOLDS

    def to_dict(self) -> dict:
        return {
            "claim": self.claim,
            "verdict": self.verdict,
            "holds": self.holds,
            "note": self.note,
            "checks": [c.to_dict() for c in self.checks],
        }


def judge_claim(claim: str, checks: Sequence[Check], note: str = "") -> ClaimVerdict:
    """Judge ``claim`` on its ``checks`` (see :data:`RULE`)."""
    return ClaimVerdict(claim, list(checks), note)


def compare(first: Sequence[Mapping], second: Sequence[Mapping]) -> list[dict]:
    """Match two runs' claims (``ClaimVerdict.to_dict()`` lists, e.g. from two starting seeds) by their text.

    Returns one row per claim in either run: ``{"claim", "first", "second", "reproduced"}``; a claim
    missing from one run has None there and is not reproduced.
    """
    a = {c["claim"]: c["verdict"] for c in first}
    b = {c["claim"]: c["verdict"] for c in second}
    rows = []
    for k in dict.fromkeys([*a, *b]):
        rows.append(
            {
                "claim": k,
                "first": a.get(k),
                "second": b.get(k),
                "reproduced": a.get(k) is not None and a.get(k) == b.get(k),
            }
        )
    return rows
