"""`fastperturb demo` end to end in a tiny setting, and the `robustness` tool on what it saved."""

import json
import subprocess
import sys

import pytest
import torch

from fastperturb import cli
from fastperturb.data import digits_split, load_digits


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
    rc = cli.main(
        [
            "robustness",
            "--model",
            "fastperturb.tools.demo:DigitsCNN",
            "--weights",
            str(out / "models" / "sgd.pt"),
            "--data",
            "digits",
            "--float64",
            "--eps",
            "0.01,0.1",
            "--trials",
            "2",
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
