"""Every mistake a user can make at the command line is one line naming the argument, exit code 2, and
leaves nothing half-written: ``fastperturb robustness``, ``fastperturb bench``, ``python -m benchmarks``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastperturb.robustness as R
from fastperturb import cli
from fastperturb.tools import _args

ROOT = Path(__file__).resolve().parent.parent

MODEL_SRC = textwrap.dedent("""
    import torch.nn as nn

    def lin():
        return nn.Linear(4, 3)

    def wider():
        return nn.Linear(5, 3)

    def broken():
        raise RuntimeError("no GPU here")

    def normed():
        return nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))

    def lin64():
        return nn.Linear(4, 3).double()

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 3)

        def forward(self, x):
            return self.out(self.emb(x).mean(1))

    def sparse():
        return Bag()
""")


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with a model module (not on sys.path: imported from the current directory), weights and data."""
    mod = f"usermodels_{os.getpid()}_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{mod}.py").write_text(MODEL_SRC)
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    torch.save(model, tmp_path / "module.pt")
    x, y = torch.randn(12, 4, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    torch.save((x, y), tmp_path / "d.pt")
    torch.save((torch.randn(12, 7, generator=gen), y), tmp_path / "wide.pt")
    torch.save((x, y[:5]), tmp_path / "short.pt")
    torch.save((x[:0], y[:0]), tmp_path / "empty.pt")
    xn = x.clone()
    xn[3, 1] = float("nan")
    torch.save((xn, y), tmp_path / "nan.pt")
    np.savez(tmp_path / "nan.npz", inputs=xn.numpy(), targets=y.numpy())
    (tmp_path / "text.pt").write_bytes(b"not a pickle at all\n" * 8)
    (tmp_path / "a-file").write_text("x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path, mod
    sys.modules.pop(mod, None)


def _robustness(mod, *extra):
    return [
        "robustness",
        "--model",
        f"{mod}:lin",
        "--eps",
        "0.01",
        "--steps",
        "1",
        "--trials",
        "4",
        "--kinds",
        "adversarial,random",
        "--no-progress",
        *extra,
    ]


def _main(argv) -> int:
    """``fastperturb.cli.main``'s exit code: returned for usage errors, SystemExit(2) for argparse's."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def _one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


# ----------------------------------------------------------------------------- robustness


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--data", "d.pt", "--weights", "missing.pt"], ["--weights missing.pt", "no such file"]),
        (["--data", "d.pt", "--weights", "module.pt"], ["--weights module.pt", "pickled", "state_dict"]),
        (["--data", "d.pt", "--weights", "text.pt"], ["--weights text.pt", "torch.save"]),
        (["--data", "text.pt"], ["--data text.pt", "torch.save nor an .npz"]),
        (["--data", "missing.npz"], ["--data missing.npz", "no such file"]),
        (["--data", "wide.pt"], ["--data wide.pt", "do not fit", "(12, 7)"]),
        (["--data", "short.pt"], ["--data short.pt", "one target per input"]),
        # (not the sweep's "the evaluation data is empty", which names no argument)
        (["--data", "empty.pt"], ["--data empty.pt: the data is empty"]),
        (["--data", "nan.pt"], ["--data nan.pt", "1 NaN/Inf"]),
        (["--data", "nan.npz"], ["--data nan.npz", "NaN/Inf"]),
        (["--data", "digits:nope"], ["--data digits:nope"]),
        (["--data", "d.pt", "--out", "a-file/results"], ["--out a-file/results", "not a folder"]),
        (["--data", "d.pt", "--out", "a-file"], ["--out a-file", "not a folder"]),
        (["--data", "d.pt", "--trials", "0"], ["--trials", ">= 1"]),
        (["--data", "d.pt", "--trials", "5"], ["--trials", "even number >= 4"]),
        (["--data", "d.pt", "--trials", "2"], ["--trials", "even number >= 4"]),
        (["--data", "d.pt", "--steps", "0"], ["--steps"]),
        (["--data", "d.pt", "--batch-size", "-1"], ["--batch-size"]),
        (["--data", "d.pt", "--step-ratio", "nan"], ["--step-ratio"]),
        (["--data", "d.pt", "--eps", "0.01,inf"], ["--eps", "finite number >= 0", "inf"]),
        (["--data", "d.pt", "--eps", "0.01,-0.1"], ["--eps", "finite number >= 0", "-0.1"]),
        (["--data", "d.pt", "--kinds", "adversarial,bogus"], ["--kinds", "bogus"]),
    ],
)
def test_robustness_errors_are_one_line(work, capsys, extra, needles):
    tmp, mod = work
    _one_line_error(capsys, _main(_robustness(mod, *extra)), *needles)


def test_robustness_a_nan_buffer_in_the_weights_file_is_named(work, capsys):
    """A NaN in a buffer (BatchNorm's running_var) made every loss NaN and ended in a traceback blaming "perturbed
    tensor 0"'s gradient; now one line naming the buffer."""
    tmp, mod = work
    net = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
    net[0].running_var[2] = float("nan")
    torch.save(net.state_dict(), tmp / "nanbuf.pt")
    args = _robustness(mod, "--data", "d.pt", "--weights", "nanbuf.pt")
    args[args.index(f"{mod}:lin")] = f"{mod}:normed"
    _one_line_error(capsys, _main(args), "buffers hold NaN in 0.running_var", "clean loss is nan")


def test_robustness_weights_that_do_not_match_the_model(work, capsys):
    tmp, mod = work
    args = _robustness(mod, "--data", "d.pt", "--weights", "w.pt")
    args[args.index(f"{mod}:lin")] = f"{mod}:wider"
    _one_line_error(capsys, _main(args), "--weights w.pt does not match the model", "file (3, 4), model (3, 5)")


def test_robustness_bad_model_specs(work, capsys):
    tmp, mod = work
    for spec, needle in (
        (f"{mod}:nope", "has no 'nope'"),
        ("no_such_module_xyz:f", "cannot import"),
        (f"{mod}:broken", "calling the factory failed"),
        ("a-file", "not a pickled nn.Module"),
        ("nothing-here", "no such file"),
        ("w.pt", "holds a state_dict, not an nn.Module; pass the model's factory as --model and the file as --weights"),
    ):
        args = _robustness(mod, "--data", "d.pt")
        args[args.index(f"{mod}:lin")] = spec
        _one_line_error(capsys, _main(args), f"--model {spec}", needle)


def test_a_failed_run_writes_nothing(work, capsys):
    tmp, mod = work
    _one_line_error(capsys, _main(_robustness(mod, "--data", "nan.pt", "--out", "out-nan")), "NaN")
    assert not (tmp / "out-nan").exists()
    _one_line_error(capsys, _main(_robustness(mod, "--data", "wide.pt", "--out", "out-wide")), "do not fit")
    assert not (tmp / "out-wide").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (a folder nobody can write in, even root)")
def test_robustness_unwritable_out_fails_before_the_work(work, capsys):
    tmp, mod = work
    _one_line_error(
        capsys,
        _main(_robustness(mod, "--data", "d.pt", "--out", "/proc/fastperturb-out")),
        "--out /proc/fastperturb-out",
        "cannot write",
    )


def test_robustness_runs_with_a_model_from_the_current_directory(work, capsys):
    tmp, mod = work
    assert cli.main(_robustness(mod, "--data", "d.pt", "--weights", "w.pt", "--out", "out")) == 0
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["loss_change.png", "results.csv", "results.json"]


def test_console_script_imports_the_model_from_the_current_directory(work):
    """Like the installed ``fastperturb`` script: sys.path[0] is the script's folder, not the current one."""
    tmp, mod = work
    runner = tmp / "bin" / "fastperturb_script.py"
    runner.parent.mkdir()
    runner.write_text("import sys\nfrom fastperturb.cli import main\nsys.exit(main())\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    bad = subprocess.run(
        [sys.executable, str(runner), *_robustness(mod, "--data", "nan.pt")],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "NaN" in bad.stderr, bad.stderr
    ok = subprocess.run(
        [sys.executable, str(runner), *_robustness(mod, "--data", "d.pt")],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "fitted log-log slopes" in ok.stdout


def _api_model_and_data(tmp):
    """The ``lin`` model with seeded weights far from norm 1 (saved as ``big.pt``, so relative and absolute radii
    differ a lot) and ``d.pt``: what the command line measures with ``--weights big.pt --data d.pt``."""
    gen = torch.Generator().manual_seed(1)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(3 * torch.randn(3, 4, generator=gen))
        model.bias.copy_(3 * torch.randn(3, generator=gen))
    torch.save(model.state_dict(), tmp / "big.pt")
    x, y = torch.load(tmp / "d.pt")
    return model, (x, y)


def _cli_points(monkeypatch, mod, series, *extra):
    """The points of one series the command line printed (the SweepResult its sweep returned, taken on the way)."""
    from fastperturb.robustness.indicators import sweep  # (R.sweep is the wrapper from a second call on)

    results = []
    monkeypatch.setattr(R, "sweep", lambda *a, **k: (results.append(sweep(*a, **k)), results[-1])[1])
    assert _main(_robustness(mod, "--data", "d.pt", "--weights", "big.pt", *extra)) == 0
    (res,) = results
    return res.select(series)


def test_robustness_absolute_makes_eps_an_absolute_radius(work, monkeypatch):
    """``--absolute`` reaches the sweep: the first_order point is the API's with relative=False, not the relative
    one (dropped, every run measured relative radii)."""
    tmp, mod = work
    model, data = _api_model_and_data(tmp)
    (p,) = _cli_points(monkeypatch, mod, "first_order", "--kinds", "first_order", "--absolute")
    absolute = R.first_order(model, F.cross_entropy, data, 0.01, relative=False)
    relative = R.first_order(model, F.cross_entropy, data, 0.01, relative=True)
    assert p.loss_change == absolute.loss_change
    assert relative.loss_change > 2 * absolute.loss_change  # (||w|| of each tensor > 2)


def test_robustness_seed_draws_the_random_corruptions(work, monkeypatch):
    """``--seed`` reaches the sweep: each seed's random point is the API's random corruption with that seed, and
    two seeds give different points (dropped, every seed drew seed 0's corruptions)."""
    tmp, mod = work
    model, data = _api_model_and_data(tmp)
    got = []
    for seed in (1, 2):
        (p,) = _cli_points(monkeypatch, mod, "random", "--kinds", "random", "--seed", str(seed))
        q = R.random_corruption(model, F.cross_entropy, data, 0.01, trials=4, seed=seed)
        assert (p.loss_change, p.loss_change_sem, p.accuracy) == (q.loss_change, q.loss_change_sem, q.accuracy)
        got.append(p.loss_change)
    assert got[0] != got[1]


def test_robustness_says_why_a_series_has_no_slope(work, capsys):
    """A slope printed as ``-`` comes with its reason (one eps: no series can have two points)."""
    tmp, mod = work
    assert _main(_robustness(mod, "--data", "d.pt")) == 0
    out = capsys.readouterr().out
    assert "adversarial_k1 -, random -" in out
    for series in ("adversarial_k1", "random"):
        assert f"  {series} -: its loss change is resolved above zero" in out
        assert "of the 1 eps in (0, 0.01], and a slope needs two" in out


# ----------------------------------------------------------------------------- fastperturb bench


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--input-shape", "7"], ["--input-shape 7", "forward fails"]),
        (["--input-shape", "0,4"], ["--input-shape", "positive"]),
        (["--input-shape", "4", "--steps", "0"], ["--steps", ">= 1"]),
        (["--input-shape", "4", "--batch-size", "0"], ["--batch-size"]),
        (["--input-shape", "4", "--warmup", "-1"], ["--warmup"]),
        (["--input-shape", "4", "--presets", "SAM,XYZ"], ["--presets", "XYZ"]),
        (["--input-shape", "4", "--json", "a-file/r.json"], ["--json a-file/r.json"]),
        (["--input-shape", "4", "--json", "no-folder/r.json"], ["--json no-folder/r.json", "does not exist"]),
        (["--input-shape", "4", "--json", ""], ["--json", "empty file name"]),
        (["--input-shape", "4", "--device", "tpu9"], ["--device tpu9"]),
    ],
)
def test_bench_errors_are_one_line(work, capsys, extra, needles):
    tmp, mod = work
    _one_line_error(capsys, _main(["bench", "--model", f"{mod}:lin", *extra]), *needles)


def test_bench_model_errors(work, capsys):
    tmp, mod = work
    _one_line_error(
        capsys,
        _main(["bench", "--model", f"{mod}:broken", "--input-shape", "4"]),
        f"--model {mod}:broken",
        "calling the factory failed",
    )
    _one_line_error(capsys, _main(["bench", "--model", "nomodule_xyz:f", "--input-shape", "4"]), "cannot import")
    _one_line_error(  # refused by the library at the first step: one line naming the configuration
        capsys,
        _main(["bench", "--model", f"{mod}:sparse", "--input-shape", "5", "--vocab", "10", "--steps", "1"]),
        "SAM rho=0.05 cannot step this model",
        "sparse",
    )


def test_bench_steps_a_float64_model_and_warmup_zero_times_every_step(work, capsys, monkeypatch):
    """The random batch takes the model's precision (a float64 model's forward failed on a float32 batch, and
    the error blamed --input-shape); ``--warmup 0`` runs no untimed step but still counts the passes."""
    from fastperturb.tools import bench

    tmp, mod = work
    steps = []
    real = bench._Config._step
    monkeypatch.setattr(bench._Config, "_step", lambda self: (steps.append(self.label), real(self))[1])
    monkeypatch.setattr(bench, "peak_step_bytes", lambda step, device: (0, "not measured in this test"))
    rc = _main(
        [
            "bench",
            "--model",
            f"{mod}:lin64",
            "--input-shape",
            "4",
            "--loss",
            "mse",
            "--steps",
            "3",
            "--warmup",
            "0",
            "--presets",
            "SAM,APD",
            "--apd-steps",
            "2",
            "--json",
            "r.json",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert len(steps) == 3 * 3 and len(set(steps)) == 3  # plain, SAM, APD: three timed steps each, no warm-up
    import json

    rows = {r["config"]: r["passes"] for r in json.loads((tmp / "r.json").read_text())["rows"]}
    assert sorted(rows.values()) == [1, 2, 3], rows


def test_bench_says_when_its_times_spread_too_wide_to_read_the_ratios(capsys):
    """A newcomer read SAM at 0.16x the plain step off a run whose plain step spread from 16 to 345 ms: such a
    run says so, naming the configurations and the load; a steady one prints no note."""
    from fastperturb.tools import bench

    env = dict(model="m:f", n_params=10, n_tensors=2, param_bytes=40, batch=[4, 3], base="SGD", loss="ce")
    env.update(device="cpu", torch="2", threads=2, load=3.5, cpus=2)

    def row(config, lo, hi):
        return dict(config=config, passes=1, median_s=(lo + hi) / 2, min_s=lo, max_s=hi, steps=5, x_plain=1.0)

    extra = dict(peak_step_bytes=None, peak_note=None, state_bytes=0)
    bench._print(env, [{**row("plain", 0.016, 0.345), **extra}, {**row("SAM", 0.030, 0.040), **extra}])
    out = capsys.readouterr().out
    assert "note: the times of plain spread over more than 2x from min to max" in out
    assert "load average 3.5 on 2 CPUs" in out and "SAM spread" not in out
    bench._print(env, [{**row("plain", 0.016, 0.030), **extra}, {**row("SAM", 0.030, 0.040), **extra}])
    assert "note:" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- python -m benchmarks


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--reps", "0"], ["--reps"]),
        (["--json", ""], ["--json", "empty file name"]),
        (["--warmup", "-1"], ["--warmup"]),
        (["--budget", "0"], ["--budget"]),
        (["--mem-jobs", "0"], ["--mem-jobs"]),
        (["--apd-steps", "0"], ["--apd-steps"]),
        (["--threshold", "-0.1"], ["--threshold"]),
        (["--reps", "2", "--min-reps", "5"], ["--min-reps 5"]),
        (["--suites", "cycle,nope"], ["--suites", "unknown suite"]),
        (["--suites", "cycle", "--models", "nope"], ["--models nope", "unknown model"]),
        (["--suites", "cycle", "--json", "a-file/r.json"], ["--json a-file/r.json"]),
        (["--suites", "cycle", "--chart", "no-folder/c.png"], ["--chart no-folder/c.png"]),
        (["--compare", "missing.json", "missing.json"], ["--compare missing.json", "no such file"]),
        (["--compare", "d.pt", "d.pt"], ["--compare d.pt", "not a benchmark result"]),
    ],
)
def test_benchmarks_errors_are_one_line(work, capsys, args, needles):
    from benchmarks import cli as bench_cli

    err = _one_line_error(capsys, bench_cli.entry(args), *needles)
    assert err.startswith("python -m benchmarks: error:")


def test_python_m_benchmarks_error_in_a_subprocess(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--reps", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "python -m benchmarks: error: argument --reps: expected an integer >= 1, got 0 "
        "(see python -m benchmarks --help)"
    )


# ----------------------------------------------------------------------------- the helpers


def test_write_all_is_all_or_nothing(tmp_path):
    out = tmp_path / "new"

    def fails(path):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        _args.write_all(str(out), {"a.json": lambda p: Path(p).write_text("{}"), "b.png": fails})
    assert not out.exists()  # the folder it made is gone with the partial files
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        _args.write_all(str(out), {"a.json": lambda p: Path(p).write_text("{}"), "b.png": fails})
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    _args.write_all(str(out), {"a.json": lambda p: Path(p).write_text("{}")})
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "keep.txt"]


def test_state_dict_in_a_checkpoint_dict_is_accepted(tmp_path):
    m = nn.Linear(2, 2)
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    other = nn.Linear(2, 2)
    _args.load_weights_into(other, str(tmp_path / "ckpt.pt"))
    assert torch.equal(other.weight, m.weight)


def _tool_parsers():
    import argparse

    for name in cli.TOOLS:
        parser = cli.build_parser([name])
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        yield name, sub.choices[name]


@pytest.mark.parametrize("name", list(cli.TOOLS))
def test_help_states_every_option_and_its_default(name):
    """``--help`` lists every option with a description and the default the parser really uses (argparse prints
    no line for an option without help, so neither its meaning nor its default was visible)."""
    parser = dict(_tool_parsers())[name]
    text = " ".join(parser.format_help().split())  # (the help's line wrapping undone)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{name} {action.option_strings[0]} has no help text"
        entry = " ".join(formatter._expand_help(action).split())  # this option's own line(s) of the help
        assert entry in text, f"{name} {action.option_strings[0]}: its help is not shown"
        if action.nargs == 0 or action.default is None:
            continue
        d = action.default
        shown = ",".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
        described = "default" in action.help.lower()  # a default that is not a literal, said in words
        assert described or entry.endswith(f"(default: {shown})"), f"{name} {action.option_strings[0]}: {entry}"


def test_help_default_is_read_from_the_parser():
    parser = dict(_tool_parsers())["robustness"]
    parser.set_defaults(trials=12)
    text = " ".join(parser.format_help().split())
    assert "(default: 12)" in text and "(default: 10)" not in text
