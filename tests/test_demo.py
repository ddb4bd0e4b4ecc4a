"""`fastperturb demo` end to end in a tiny setting, and the `robustness` tool on what it saved."""

import json
import math
import subprocess
import sys

import pytest
import torch

from fastperturb import cli
from fastperturb.data import digits_split, load_digits
from fastperturb.tools import verdicts


def test_bundled_digits():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    (xtr, ytr), (xte, yte) = digits_split()
    assert len(ytr) + len(yte) == 1797 and len(yte) == 359
    assert all(abs(c - 36) <= 1 for c in torch.bincount(yte).tolist())  # stratified
    (xtr2, _), _ = digits_split()
    assert torch.equal(xtr, xtr2)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--epochs", "1", "--eps", "0.01,0.1", "--trials", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    for preset in ("sgd", "sam", "awp", "apd"):
        assert preset in printed
        assert (out / "models" / f"{preset}.pt").exists()
    assert "Paper claims checked by this run" in printed
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["results"]) == {"sgd", "sam", "awp", "apd"}
    for preset, res in doc["results"].items():
        assert 0.0 <= doc["summary"][preset]["clean_accuracy"] <= 1.0
        assert doc["summary"][preset]["clean_accuracy"] == res["clean_accuracy"]
        series = {r["series"] for r in res["rows"]}
        assert series == {"adversarial_k1", "adversarial_k5", "first_order", "random"}
        assert [r["eps"] for r in res["rows"] if r["series"] == "random"] == [0.01, 0.1]
    assert doc["summary"]["sgd"]["clean_accuracy"] > 0.2  # plain SGD beats chance (0.1) after one epoch
    assert doc["findings"] and all({"claim", "measured", "holds"} <= set(f) for f in doc["findings"])
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("preset,series,kind") and len(csv_lines) == 1 + 4 * 4 * 2
    for png in ("loss_change.png", "adversarial_vs_random.png", "accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # the robustness tool evaluates a model the demo saved like the demo did (up to the last bits: thread count)
    rout = tmp_path / "rob"
    rc = cli.main(["robustness", "--model", "fastperturb.tools.demo:DigitsCNN", "--weights", str(out / "models" / "sgd.pt"),
                   "--data", "digits", "--float64", "--eps", "0.01,0.1", "--trials", "2", "--out", str(rout), "--no-progress",
                   "--threads", "1"])
    assert rc == 0
    capsys.readouterr()
    rdoc = json.loads((rout / "results.json").read_text())
    assert len(rdoc["rows"]) == len(doc["results"]["sgd"]["rows"])
    for a, b in zip(rdoc["rows"], doc["results"]["sgd"]["rows"]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == (pytest.approx(b[k], rel=1e-6, abs=1e-12) if isinstance(b[k], float) else b[k]), k


def test_demo_bad_arguments(capsys):
    for bad in (["--eps", "-0.1"], ["--eps", ""], ["--epochs", "0"], ["--presets", "sgd,adam"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["demo", *bad])
        assert e.value.code == 2
        assert "error" in capsys.readouterr().err


def test_robustness_tool_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["robustness", "--model", str(tmp_path / "missing.pt"), "--data", "digits"])
    with pytest.raises(SystemExit, match="no parameters"):
        torch.save(torch.nn.ReLU(), tmp_path / "relu.pt")
        cli.main(["robustness", "--model", str(tmp_path / "relu.pt"), "--data", "digits", "--no-progress"])
    with pytest.raises(SystemExit) as e:
        cli.main(["robustness", "--model", "fastperturb.tools.demo:DigitsCNN", "--data", "digits", "--eps", "-1"])
    assert e.value.code == 2


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastperturb", "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--epochs" in r.stdout and "--presets" in r.stdout


# ---------------------------------------------------------------------------
# the verdict rule on synthetic per-seed numbers


def _t_interval(values, threshold):
    """The rule written out in plain Python: 95% t interval of (value - threshold)."""
    import statistics

    m = [v - threshold for v in values]
    half = verdicts.t_quantile(len(m) - 1) * statistics.stdev(m) / math.sqrt(len(m))
    return statistics.fmean(m) - half, statistics.fmean(m) + half


def test_t_quantile_matches_table_and_expansion():
    assert verdicts.t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert verdicts.t_quantile(4) == pytest.approx(2.776, abs=1e-3)
    assert verdicts.t_quantile(30) == pytest.approx(2.042, abs=1e-3)
    assert verdicts.t_quantile(60) == pytest.approx(2.000, abs=2e-3)  # published value 2.000
    assert verdicts.t_quantile(120) == pytest.approx(1.980, abs=2e-3)
    with pytest.raises(ValueError):
        verdicts.t_quantile(0)


def test_stats_over_seeds():
    s = verdicts.Stats.of([1.0, 2.0, 3.0, float("nan"), None])
    assert (s.n, s.mean, s.sd) == (3, 2.0, 1.0) and s.sem == pytest.approx(1 / math.sqrt(3))
    one = verdicts.Stats.of([5.0])
    assert one.n == 1 and one.mean == 5.0 and math.isnan(one.sd)
    assert verdicts.Stats.of([]).n == 0


def test_check_holds_fails_undecided():
    seeds = [0, 1, 2, 3, 4]
    up = verdicts.Check("slope", seeds, [1.10, 1.15, 1.05, 1.12, 1.08], threshold=0.7)
    assert up.verdict == verdicts.HOLDS and up.per_seed == [True] * 5
    assert up.interval == pytest.approx(_t_interval(up.values, 0.7))
    down = verdicts.Check("slope", seeds, [1.10, 1.15, 1.05, 1.12, 1.08], threshold=1.4, direction=">")
    assert down.verdict == verdicts.FAILS and down.per_seed == [False] * 5
    # "<": the same numbers are below 1.4
    assert verdicts.Check("slope", seeds, down.values, threshold=1.4, direction="<").verdict == verdicts.HOLDS
    # positive on 4 of 5 seeds but one large negative: the interval contains 0
    mixed = verdicts.Check("d", seeds, [0.01, 0.02, 0.01, 0.015, -0.08])
    lo, hi = _t_interval(mixed.values, 0.0)
    assert lo < 0 < hi and mixed.verdict == verdicts.UNDECIDED and sum(mixed.per_seed) == 4
    # positive on every seed but only by a hair next to the spread still holds when the interval clears 0
    assert verdicts.Check("d", seeds, [0.001, 0.002, 0.0015, 0.001, 0.002]).verdict == verdicts.HOLDS
    # zero spread exactly at the threshold: not above it
    assert verdicts.Check("d", seeds, [0.0] * 5).verdict == verdicts.UNDECIDED


def test_check_needs_two_measured_seeds():
    assert verdicts.Check("x", [0], [3.0]).verdict == verdicts.UNDECIDED
    c = verdicts.Check("x", [0, 1, 2], [3.0, None, 2.9])
    assert c.verdict == verdicts.UNDECIDED and "seed 1" in c.reason and c.per_seed == [True, None, True]
    with pytest.raises(ValueError):
        verdicts.Check("x", [0, 1], [1.0])
    with pytest.raises(ValueError):
        verdicts.Check("x", [0], [1.0], direction=">=")


def test_claim_combines_checks_and_runs_compare():
    seeds = [0, 1, 2]
    good = verdicts.Check("a", seeds, [2.0, 2.1, 1.9], threshold=1.0)
    bad = verdicts.Check("b", seeds, [0.0, 0.1, -0.1], threshold=1.0)
    unsure = verdicts.Check("c", seeds, [1.5, 0.5, 1.2], threshold=1.0)
    assert verdicts.judge_claim("all good", [good, good]).verdict == verdicts.HOLDS
    assert verdicts.judge_claim("one bad", [good, bad, unsure]).verdict == verdicts.FAILS
    assert verdicts.judge_claim("one unsure", [good, unsure]).verdict == verdicts.UNDECIDED
    assert verdicts.judge_claim("no checks", []).verdict == verdicts.UNDECIDED
    d = verdicts.judge_claim("all good", [good]).to_dict()
    assert json.loads(json.dumps(d))["checks"][0]["values"] == [2.0, 2.1, 1.9] and d["holds"] is True
    # a claim that holds from one starting seed and not from another flips: not reproduced
    first = [verdicts.judge_claim("p", [good]).to_dict(), verdicts.judge_claim("q", [bad]).to_dict()]
    second = [verdicts.judge_claim("p", [unsure]).to_dict(), verdicts.judge_claim("q", [bad]).to_dict(),
              verdicts.judge_claim("r", [good]).to_dict()]
    rows = {r["claim"]: r for r in verdicts.compare(first, second)}
    assert rows["p"] == {"claim": "p", "first": "holds", "second": "undecided", "reproduced": False}
    assert rows["q"]["reproduced"] is True and rows["r"]["first"] is None and not rows["r"]["reproduced"]
