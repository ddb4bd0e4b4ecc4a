"""`fastperturb demo` end to end in a tiny setting, and the `robustness` tool on what it saved."""

import argparse
import json
import math
import random
import re
import subprocess
import sys

import pytest
import torch

from fastperturb import cli
from fastperturb.data import digits_split, load_digits
from fastperturb.robustness.results import Point, SweepResult
from fastperturb.tools import demo, verdicts


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


TINY = [
    "--presets",
    "sgd,awp",
    "--epochs",
    "1",
    "--seeds",
    "2",
    "--seed",
    "3",
    "--eps",
    "0.005,0.02,0.1",
    "--steps",
    "1,2",
    "--trials",
    "4",
    "--no-progress",
]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", *TINY, "--out", str(out), "--jobs", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Mean (standard deviation) over 2 seeds 3, 4" in printed
    assert printed.rstrip().endswith(" s)") and " side by side" not in printed  # one worker: no such note
    assert "Paper claims, judged over the seeds (rule: " + verdicts.RULE in printed
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["seeds_run"] == [3, 4] and set(doc["per_seed"]) == {"3", "4"}
    for seed, run in doc["per_seed"].items():
        assert set(run["results"]) == {"sgd", "awp"}
        for preset, res in run["results"].items():
            assert (out / "models" / f"seed{seed}" / f"{preset}.pt").exists()
            assert run["summary"][preset]["clean_accuracy"] == res["clean_accuracy"]
            series = {r["series"] for r in res["rows"]}
            assert series == {"adversarial_k1", "adversarial_k2", "first_order", "random"}
    assert doc["per_seed"]["3"]["summary"]["sgd"]["clean_accuracy"] > 0.2  # SGD beats chance (0.1) after one epoch
    # the mean over seeds is the mean of the seeds' rows
    for i, row in enumerate(doc["results"]["sgd"]["rows"]):
        per = [doc["per_seed"][s]["results"]["sgd"]["rows"][i]["loss_change"] for s in ("3", "4")]
        assert row["loss_change"] == pytest.approx(sum(per) / 2, rel=1e-12)
    # every claim judged: adversarial >> random, slopes, K=2 >= K=1, AWP vs SGD; with each check's per-seed values
    assert len(doc["claims"]) == 4
    for c in doc["claims"]:
        assert c["verdict"] in (verdicts.HOLDS, verdicts.FAILS, verdicts.UNDECIDED)
        assert c["verdict"] == verdicts.combine(ch["verdict"] for ch in c["checks"])
        for ch in c["checks"]:
            assert ch["seeds"] == [3, 4] and len(ch["values"]) == 2
            assert f"[{c['verdict'].upper() if c['verdict'] != 'holds' else 'holds'}] {c['claim']}" in printed
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("seed,preset,series,kind") and len(csv_lines) == 1 + 2 * 2 * 4 * 3
    for png in ("loss_change.png", "adversarial_vs_random.png", "accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # the same seeds again, compared with the first run: every verdict reproduced
    rc = cli.main(["demo", *TINY, "--out", str(tmp_path / "again"), "--no-plots", "--against", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "4 of 4 verdicts reproduced" in printed and "NOT REPRODUCED" not in printed
    assert printed.rstrip().endswith("s in its worker, 2 side by side)")  # a seed's time, not the run's share
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    # the second run used the default --jobs 2 (spawned workers): the same numbers
    assert all(again["per_seed"][s]["results"] == doc["per_seed"][s]["results"] for s in ("3", "4"))

    # the robustness tool evaluates a model the demo saved like the demo did (up to the last bits: thread count)
    rout = tmp_path / "rob"
    rc = cli.main(
        [
            "robustness",
            "--model",
            "fastperturb.tools.demo:DigitsCNN",
            "--weights",
            str(out / "models" / "seed3" / "sgd.pt"),
            "--data",
            "digits",
            "--float64",
            "--eps",
            "0.005,0.02,0.1",
            "--steps",
            "1,2",
            "--trials",
            "4",
            "--seed",
            "3",
            "--out",
            str(rout),
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    capsys.readouterr()
    rdoc = json.loads((rout / "results.json").read_text())
    rows = doc["per_seed"]["3"]["results"]["sgd"]["rows"]
    assert len(rdoc["rows"]) == len(rows)
    for a, b in zip(rdoc["rows"], rows):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == (pytest.approx(b[k], rel=1e-6, abs=1e-12) if isinstance(b[k], float) else b[k]), k


def _cli_error(capsys, argv):
    """Run the CLI expecting a usage error: exit code 2 and one line on stderr naming the problem."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, argv
    return err[-1]


def test_demo_bad_arguments(tmp_path, capsys):
    out = tmp_path / "never"
    for bad in (
        ["--eps", "-0.1"],
        ["--eps", ""],
        ["--epochs", "0"],
        ["--presets", "sgd,adam"],
        ["--steps", "0"],
        ["--seeds", "0"],
        ["--seeds", "two"],
        ["--seed", "-1"],
        ["--trials", "3"],
        ["--trials", "2"],
        ["--jobs", "0"],
        ["--batch-size", "0"],
        ["--lr", "nan"],
        ["--threads", "0"],
        ["--seed", str(2**32 - 1)],
    ):
        line = _cli_error(capsys, ["demo", *bad, "--out", str(out)])
        assert bad[0] in line and "error" in line, (bad, line)
    assert not out.exists()  # nothing written for a usage error


def test_demo_unwritable_out_and_bad_against(tmp_path, capsys):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    fast = [
        "--presets",
        "sgd",
        "--epochs",
        "1",
        "--seeds",
        "2",
        "--eps",
        "0.01",
        "--trials",
        "4",
        "--no-progress",
        "--no-plots",
    ]
    line = _cli_error(capsys, ["demo", *fast, "--out", str(afile)])
    assert line.endswith(f"--out {afile}: exists and is not a folder")
    line = _cli_error(capsys, ["demo", *fast, "--out", str(afile / "sub")])
    assert f"--out {afile / 'sub'}: cannot write there" in line
    out = tmp_path / "new" / "deeper"
    line = _cli_error(capsys, ["demo", *fast, "--out", str(out), "--against", str(tmp_path / "missing.json")])
    assert "--against" in line and "no such file" in line
    line = _cli_error(capsys, ["demo", *fast, "--out", str(out), "--against", str(afile)])
    assert "--against" in line and "not JSON" in line
    (tmp_path / "old.json").write_text(json.dumps({"results": {}}))
    line = _cli_error(capsys, ["demo", *fast, "--out", str(out), "--against", str(tmp_path / "old.json")])
    assert "--against" in line and "no 'claims'" in line
    assert not (tmp_path / "new").exists()


def test_demo_diverging_training_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "a" / "b"
    line = _cli_error(
        capsys,
        [
            "demo",
            "--presets",
            "sgd",
            "--epochs",
            "1",
            "--seeds",
            "2",
            "--jobs",
            "1",
            "--eps",
            "0.01",
            "--trials",
            "4",
            "--lr",
            "1e6",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert re.fullmatch(
        r"fastperturb demo: error: --lr 1e\+06: sgd's training loss became (nan|inf) in epoch 1 "
        r"\(seed 0\); lower --lr",
        line,
    ), line
    assert not (tmp_path / "a").exists()  # the folders it created for --out are gone again


def test_robustness_tool_bad_arguments(tmp_path, capsys):
    # the user's mistakes are one line and exit code 2 (tests/test_cli_errors.py has the full list)
    assert cli.main(["robustness", "--model", str(tmp_path / "missing.pt"), "--data", "digits"]) == 2
    assert "no such file" in capsys.readouterr().err
    torch.save(torch.nn.ReLU(), tmp_path / "relu.pt")
    assert cli.main(["robustness", "--model", str(tmp_path / "relu.pt"), "--data", "digits", "--no-progress"]) == 2
    assert "no parameters" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["robustness", "--model", "fastperturb.tools.demo:DigitsCNN", "--data", "digits", "--eps", "-1"])
    assert e.value.code == 2


def test_python_dash_m_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "fastperturb", "demo", "--help"], capture_output=True, text=True, timeout=120
    )
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
    second = [
        verdicts.judge_claim("p", [unsure]).to_dict(),
        verdicts.judge_claim("q", [bad]).to_dict(),
        verdicts.judge_claim("r", [good]).to_dict(),
    ]
    rows = {r["claim"]: r for r in verdicts.compare(first, second)}
    assert rows["p"] == {"claim": "p", "first": "holds", "second": "undecided", "reproduced": False}
    assert rows["q"]["reproduced"] is True and rows["r"]["first"] is None and not rows["r"]["reproduced"]


# ---------------------------------------------------------------------------
# the demo's claims on synthetic sweeps (no training): each claim is a statistic over seeds


GRID = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]


def _sweep(rng, adv=1.0, rand=1e-3, rand_slope=2.0, acc=0.99, noise=0.05, acc_noise=0.0005):
    """A sweep with adversarial loss change adv*eps (slope 1), random rand*eps**rand_slope, K=5 10% above K=1."""
    jitter = lambda: math.exp(rng.gauss(0.0, noise))
    pts = []
    for e in GRID:
        a = adv * e * jitter()
        r = rand * e**rand_slope
        pts += [
            Point("adversarial", e, 0.0, a, steps=1, accuracy=acc),
            Point("adversarial", e, 0.0, 1.1 * a, steps=5, accuracy=acc),
            Point("first_order", e, 0.0, a),
            Point("random", e, 0.0, r * jitter(), trials=20, loss_change_sem=1e-3 * r, accuracy=acc),
        ]
    return SweepResult(pts, 0.01, acc + rng.gauss(0.0, acc_noise))


def _args(**kw):
    return argparse.Namespace(**{"eps": GRID, "steps": [1, 5], "gamma": 0.02, "apd_eps": 0.02, **kw})


def _verdicts(per_preset):
    per_seed = {
        s: {"results": {n: make(random.Random(1000 * s + i)) for i, (n, make) in enumerate(per_preset.items())}}
        for s in range(5)
    }
    return {c.claim.split(" ")[0]: c for c in demo.judge(per_seed, _args(), n_test=359)}


def test_demo_claims_hold_on_synthetic_sweeps():
    got = _verdicts(
        {"sgd": lambda r: _sweep(r), "awp": lambda r: _sweep(r, adv=0.5), "apd": lambda r: _sweep(r, adv=0.4)}
    )
    assert [c.verdict for c in got.values()] == ["holds"] * 5, {k: c.verdict for k, c in got.items()}
    slope = got["log-log"].checks[0]
    assert slope.label == "sgd: |slope adversarial K=1 - 1|" and slope.stats.mean == pytest.approx(0.0, abs=0.1)


def test_demo_claims_fail_or_stay_undecided_on_synthetic_sweeps():
    got = _verdicts(
        {
            "sgd": lambda r: _sweep(r),
            "awp": lambda r: _sweep(r, adv=1.5),  # loses more than SGD
            "apd": lambda r: _sweep(r, adv=0.4, rand_slope=3.0, acc=0.97),  # random slope 3; 7 images less accurate
        }
    )
    assert got["adversarial"].verdict == "holds"
    assert got["log-log"].verdict == "fails"
    assert [c.verdict for c in got["log-log"].checks if c.label.startswith("apd: |slope random")] == ["fails"]
    assert got["AWP"].verdict == "fails" and [c.verdict for c in got["AWP"].checks] == ["fails", "holds"]
    assert got["APD"].verdict == "fails" and [c.verdict for c in got["APD"].checks] == ["holds", "fails"]
    # a difference within the seed-to-seed noise: undecided, not "holds"
    got = _verdicts({"sgd": lambda r: _sweep(r, noise=0.3), "awp": lambda r: _sweep(r, adv=0.95, noise=0.3)})
    assert got["AWP"].checks[0].verdict == "undecided"


def test_mean_sweep_is_the_mean_over_seeds():
    rng = random.Random(0)
    runs = [_sweep(rng) for _ in range(4)]
    mean = demo.mean_sweep(runs)
    for i, p in enumerate(mean.points):
        vals = [r.points[i].loss_change for r in runs]
        m = sum(vals) / 4
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / 3)
        assert (p.series, p.eps) == (runs[0].points[i].series, runs[0].points[i].eps)
        assert p.loss_change == pytest.approx(m) and p.loss_change_std == pytest.approx(sd)
        assert p.loss_change_sem == pytest.approx(sd / 2) and p.trials == 4 * runs[0].points[i].trials
    assert mean.clean_accuracy == pytest.approx(sum(r.clean_accuracy for r in runs) / 4)
    one = demo.mean_sweep(runs[:1])  # one seed: its own standard error
    assert [p.loss_change_sem for p in one.points] == [p.loss_change_sem for p in runs[0].points]


def test_plots_say_what_they_leave_out(tmp_path):
    from fastperturb.robustness.plot import omitted, omitted_note, plot_sweeps

    pts = []
    for e in (0.001, 0.01, 0.1):
        pts += [
            Point("adversarial", e, 0.0, e, steps=1),
            Point("random", e, 0.0, -1e-8 if e < 0.1 else e * e, loss_change_sem=1e-9, trials=4),
            Point("first_order", e, 0.0, -1.0),
        ]
    res = SweepResult(pts, 0.1, 0.9, {"relative": True})
    assert omitted({"sgd": res}) == ["sgd random at eps 0.001, 0.01", "sgd first_order (no point > 2 s.e.)"]
    assert (
        omitted({"sgd": res}, series=["adversarial_k1"]) == [] and omitted_note({"sgd": res}, ["adversarial_k1"]) == ""
    )
    fig = plot_sweeps({"sgd": res}, path=str(tmp_path / "p.png"))
    texts = [t.get_text().replace("\n", " ") for t in fig.axes[0].texts]
    assert texts == [omitted_note({"sgd": res})] and "sgd random at eps 0.001, 0.01" in texts[0]
    assert {line.get_label() for line in fig.axes[0].lines} == {"sgd adversarial_k1 (slope 1.00)", "sgd random"}


# ---------------------------------------------------------------------------
# LookSAM beside SAM: the trade, judged


def _trade_per_seed(look_seconds, look_adv, look_acc=0.99, seeds=5):
    """Per seed: SGD, SAM and LookSAM sweeps with SAM's training taking 10 s and LookSAM's ``look_seconds``."""
    per_seed = {}
    for s in range(seeds):
        rng = random.Random(7 * s)
        results = {
            "sgd": _sweep(rng, adv=1.0),
            "sam": _sweep(rng, adv=0.8),
            "looksam": _sweep(rng, adv=look_adv, acc=look_acc),
        }
        jitter = 1 + 0.02 * rng.uniform(-1, 1)
        summary = {
            "sgd": {"train_seconds": 5.0 * jitter, "passes_per_step": 1.0},
            "sam": {"train_seconds": 10.0 * jitter, "passes_per_step": 2.0},
            "looksam": {"train_seconds": look_seconds * jitter, "passes_per_step": 1.2},
        }
        per_seed[s] = {"results": results, "summary": summary}
    return per_seed


def _trade_claims(per_seed):
    claims = demo.judge(per_seed, _args(looksam_k=5), n_test=359)
    return [c for c in claims if c.claim.startswith("LookSAM")]


def test_looksam_trade_holds_when_cheaper_and_as_good():
    per_seed = _trade_per_seed(look_seconds=6.0, look_adv=0.82)
    cost, kept = _trade_claims(per_seed)
    assert cost.claim == "LookSAM (k=5) trains in less wall time than SAM" and cost.verdict == "holds"
    # the per-seed number is the paired log ratio of the two training times, written out here
    want = [
        math.log10(per_seed[s]["summary"]["looksam"]["train_seconds"] / per_seed[s]["summary"]["sam"]["train_seconds"])
        for s in range(5)
    ]
    assert cost.checks[0].values == pytest.approx(want) and cost.checks[0].stats.mean == pytest.approx(math.log10(0.6))
    assert "LookSAM 1.200, SAM 2.000" in cost.note and "(k+1)/k = 1.200" in cost.note
    assert kept.verdict == "holds", [c.describe() for c in kept.checks]
    labels = [c.label for c in kept.checks]
    assert labels == [
        "looksam: clean accuracy - SAM's",
        "looksam: mean log10(loss change / SAM's), K=5",
        "looksam: mean log10(loss change / SGD's), K=5",
    ]
    # the robustness number: per seed, the mean over the grid of log10(LookSAM's / SAM's) adversarial K=5 change
    s0 = per_seed[0]["results"]
    ratio0 = sum(
        math.log10(
            demo._at(s0["looksam"], "adversarial_k5", e).loss_change
            / demo._at(s0["sam"], "adversarial_k5", e).loss_change
        )
        for e in GRID
    ) / len(GRID)
    assert kept.checks[1].values[0] == pytest.approx(ratio0)


def test_looksam_trade_fails_when_slower_or_less_robust():
    cost, kept = _trade_claims(_trade_per_seed(look_seconds=14.0, look_adv=1.3))
    assert cost.verdict == "fails"
    assert kept.verdict == "fails" and [c.verdict for c in kept.checks][1:] == ["fails", "fails"]
    # less accurate than SAM by 7 test images on every seed: the accuracy check fails too
    _, kept = _trade_claims(_trade_per_seed(look_seconds=6.0, look_adv=0.8, look_acc=0.97))
    assert kept.checks[0].verdict == "fails"
    # without SAM in the run there is nothing to judge the trade against
    per_seed = _trade_per_seed(6.0, 0.8)
    for run in per_seed.values():
        del run["results"]["sam"], run["summary"]["sam"]
    assert _trade_claims(per_seed) == []


@pytest.mark.slow
def test_demo_looksam_beside_sam(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--presets", "sgd,sam,looksam", "--epochs", "1", "--seeds", "2", "--eps", "0.005,0.05"]
    argv += ["--steps", "1,2", "--trials", "4", "--looksam-k", "4", "--no-progress", "--no-plots", "--jobs", "1"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    steps = math.ceil(1437 / 32)  # one epoch of the training split in batches of 32
    for run in doc["per_seed"].values():
        passes = {n: run["summary"][n]["passes_per_step"] for n in ("sgd", "sam", "looksam")}
        # counted: 1 per SGD step, 2 per SAM step; LookSAM 2 on steps 0, k, 2k, ... and 1 in between
        assert passes == {"sgd": 1.0, "sam": 2.0, "looksam": (steps + math.ceil(steps / 4)) / steps}
    assert doc["summary"]["looksam"]["optimizer"] == "LookSAM rho=0.05 k=4 alpha=0.7"
    assert "passes/step" in printed and "LookSAM rho=0.05 k=4 alpha=0.7" in printed
    trade = [c for c in doc["claims"] if c["claim"].startswith("LookSAM")]
    assert [c["claim"][:40] for c in trade] == [
        "LookSAM (k=4) trains in less wall time t",
        "LookSAM keeps SAM's clean accuracy and r",
    ]
    for c in trade:
        assert c["verdict"] in (verdicts.HOLDS, verdicts.FAILS, verdicts.UNDECIDED)
        assert f"{c['claim']}" in printed


def test_demo_looksam_arguments(tmp_path, capsys):
    out = tmp_path / "never"
    for bad in (
        ["--looksam-k", "0"],
        ["--looksam-alpha", "1.5"],
        ["--looksam-alpha", "-0.1"],
        ["--looksam-alpha", "nan"],
    ):
        line = _cli_error(capsys, ["demo", *bad, "--out", str(out)])
        assert bad[0] in line and "error" in line, (bad, line)
    assert not out.exists()
    from fastperturb.tools import demo

    assert [demo._unit_interval(t) for t in ("0", "1", "0.7")] == [0.0, 1.0, 0.7]  # fp.LookSAM's range
