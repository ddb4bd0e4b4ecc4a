"""The order the suite runs in: pytest's own, reversed, or a seeded shuffle (``FASTPERTURB_TEST_ORDER``).

A test that passes only after (or only before) another one hides a bug: a hook torch installs on a class's first
instance, a global left set, a cache warmed by an earlier test. Alphabetical order hid one such bug for several
rounds, so CI runs both test stages shuffled with a fixed seed (``.ci/run``), and anyone can rerun another order:

    FASTPERTURB_TEST_ORDER=shuffle:7 pytest tests        # or reverse; unset or "file" = pytest's order

The shuffle keeps each test module's tests together (the modules in a shuffled order, the tests inside each module
shuffled too), so a module-scoped fixture, such as the spawned distributed runs, still runs once per module (a
parametrized one would run again at each change of its parameter; the suite has none).
"""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Sequence, TypeVar

T = TypeVar("T")

ENV = "FASTPERTURB_TEST_ORDER"


def parse(value: str) -> tuple[str, int | None]:
    """``""``/``"file"`` -> ("file", None); ``"reverse"`` -> ("reverse", None); ``"shuffle:N"`` -> ("shuffle", N)."""
    value = value.strip()
    if value in ("", "file"):
        return "file", None
    if value == "reverse":
        return "reverse", None
    kind, _, seed = value.partition(":")
    if kind == "shuffle" and seed.strip().lstrip("-").isdigit():
        return "shuffle", int(seed)
    raise ValueError(f"{ENV}={value!r}: expected 'file', 'reverse' or 'shuffle:<integer seed>'")


def reorder(items: Sequence[T], value: str, module_of: Callable[[T], str]) -> List[T]:
    """``items`` in the order ``value`` names; ``module_of`` says which module (group) an item belongs to."""
    kind, seed = parse(value)
    if kind == "file":
        return list(items)
    if kind == "reverse":
        return list(reversed(items))
    groups: Dict[str, List[T]] = {}
    for item in items:
        groups.setdefault(module_of(item), []).append(item)
    rng = random.Random(seed)
    names = list(groups)
    rng.shuffle(names)
    ordered: List[T] = []
    for name in names:
        members = groups[name]
        rng.shuffle(members)
        ordered.extend(members)
    return ordered
