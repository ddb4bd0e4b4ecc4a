"""Argument types shared by the command-line tools."""

from __future__ import annotations

import argparse
import math


class UsageError(Exception):
    """A problem the user caused at the command line (a missing file, a bad shape, an unwritable
    folder): :func:`fastperturb.cli.main` prints it as one line naming the argument and exits 2."""


def eps_list(text: str, *, allow_zero: bool = False) -> list[float]:
    """Comma-separated finite radii, > 0 (or >= 0 with ``allow_zero``)."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one eps")
    for v in vals:
        if not (math.isfinite(v) and (v >= 0 if allow_zero else v > 0)):
            raise argparse.ArgumentTypeError(f"every eps must be a finite number {'>=' if allow_zero else '>'} 0, got {v}")
    return vals


def positive_eps_list(text: str) -> list[float]:
    return eps_list(text, allow_zero=False)


def nonnegative_eps_list(text: str) -> list[float]:
    return eps_list(text, allow_zero=True)


def int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals
