"""The suite's run order (``tests/ordering.py``): what CI's shuffled main stage relies on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ordering
import pytest

ITEMS = [f"m{m}.py::t{t}" for m in range(6) for t in range(5)]


def module(item: str) -> str:
    return item.split("::")[0]


def test_file_and_unset_keep_pytest_order():
    assert ordering.reorder(ITEMS, "", module) == ITEMS
    assert ordering.reorder(ITEMS, "file", module) == ITEMS


def test_reverse():
    assert ordering.reorder(ITEMS, "reverse", module) == ITEMS[::-1]


def test_shuffle_is_a_seeded_permutation_with_modules_kept_together():
    a = ordering.reorder(ITEMS, "shuffle:3", module)
    assert sorted(a) == sorted(ITEMS) and a != ITEMS
    assert a == ordering.reorder(ITEMS, "shuffle:3", module)
    assert a != ordering.reorder(ITEMS, "shuffle:4", module)
    # One run of each module: a module-scoped fixture is set up once.
    runs = [module(x) for i, x in enumerate(a) if i == 0 or module(a[i - 1]) != module(x)]
    assert len(runs) == len(set(runs)) == 6
    # The modules move, and so do the tests inside them.
    assert runs != sorted(runs)
    assert any([x for x in a if module(x) == m] != [x for x in ITEMS if module(x) == m] for m in set(runs))


@pytest.mark.parametrize("bad", ["shuffle", "shuffle:x", "random:3", "rev"])
def test_bad_values_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=ordering.ENV):
        ordering.parse(bad)


def test_pytest_runs_the_named_order(tmp_path: Path):
    """Through pytest itself: the conftest hook applies the order, and a bad value is a usage error."""
    tests = Path(__file__).parent
    (tmp_path / "conftest.py").write_text((tests / "conftest.py").read_text())
    (tmp_path / "ordering.py").write_text((tests / "ordering.py").read_text())
    for m in "abc":
        body = "".join(f"def test_{m}{t}():\n    pass\n\n" for t in range(4))
        (tmp_path / f"test_{m}.py").write_text(body)

    def run(order: str) -> subprocess.CompletedProcess:
        # The copied conftest imports fastperturb: the checkout's, as in the test process.
        path = os.pathsep.join(filter(None, [str(tests.parent), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path, **{ordering.ENV: order})
        env.pop("PYTEST_ADDOPTS", None)  # (a developer's -v would change the listing read below)
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", str(tmp_path)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def ids(proc: subprocess.CompletedProcess) -> list:
        return [line.split("::")[-1] for line in proc.stdout.splitlines() if "::" in line]

    plain = [f"test_{m}{t}" for m in "abc" for t in range(4)]
    shuffled = ids(run("shuffle:5"))
    assert sorted(shuffled) == plain and shuffled != plain
    assert shuffled == [
        x.split("::")[-1] for x in ordering.reorder([f"test_{t[5]}.py::{t}" for t in plain], "shuffle:5", module)
    ]
    bad = run("sideways")
    assert bad.returncode != 0 and ordering.ENV in bad.stderr + bad.stdout
