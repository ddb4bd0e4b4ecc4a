"""The benchmark runner: suites on tiny settings, JSON, --compare, counters, and fair peers.

No timing assertions: only that every suite runs, reports what it should, and
that the peers compute the same perturbation as fastperturb.
"""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from torch import nn

from benchmarks import cli, counters, fused, peers, report, shapes, suites, timing


def _tiny_cfg(suite_names, **kw) -> suites.Config:
    models = {s: (["cnn"] if s == "train" else ["tiny"]) for s in suite_names}
    cfg = suites.Config(models=models, warmup=1, reps=2, min_reps=1, budget_s=0.05, mem_steps=1, train_batch=4)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


# ----------------------------------------------------------------------------- parameter lists


def test_builtin_lists_match_the_architectures():
    for name, n_tensors, n_params in (
        ("resnet50", 161, 25_557_032),
        ("bert-base", 199, 109_482_240),
        ("vit-b16", 152, 86_567_656),
        ("small1000", 1000, 1_024_000),
    ):
        s = shapes.shapes_for(name)
        assert (len(s), shapes.numel(s)) == (n_tensors, n_params), name


def test_user_model_factory_and_unknown_model():
    s = shapes.shapes_for("benchmarks.suites:small_cnn")
    assert s == [tuple(p.shape) for p in suites.small_cnn().parameters()]
    with pytest.raises(shapes.UnknownModel, match="built-in lists"):
        shapes.shapes_for("no-such-model")
    with pytest.raises(shapes.UnknownModel, match="cannot import"):
        shapes.shapes_for("no_such_pkg.mod:f")


# ----------------------------------------------------------------------------- counters


def test_dispatch_counter_counts_a_known_sequence():
    a, b = torch.ones(4), torch.ones(4)
    with counters.DispatchCounter() as c:
        a.add_(b)  # 1
        _ = a * 2  # 2
        torch._foreach_add_([a, b], 1.0)  # 3: one foreach op for the whole list
        with c.paused():
            a.sub_(b)  # not counted
        torch.linalg.vector_norm(a)  # 4
    assert c.total == 4
    assert c.by_op["add_"] == 1 and c.by_op["mul"] == 1 and c.by_op["_foreach_add_"] == 1
    assert "sub_" not in c.by_op


def test_allocation_measurement_sees_clones_not_in_place_ops():
    x = torch.randn(256, 256)
    sizes = [x.numel() * 4]
    got = counters.measure_allocations(lambda: x.clone(), sizes)
    assert got["alloc_bytes"] >= x.numel() * 4
    assert got["param_sized_allocs"] in (1, None)
    got = counters.measure_allocations(lambda: x.mul_(1.0), sizes)
    assert got["alloc_bytes"] < 1024  # at most a wrapped scalar
    assert got["param_sized_allocs"] in (0, None)


def test_per_tensor_scalars_are_not_parameter_sized():
    """1000 tensors of 4 KiB: a float64 coefficient per tensor (8 KB) is not a parameter-sized allocation,
    a clone of one tensor is (the miscount behind "8, 13, 54 parameter-sized allocations" on small lists)."""
    ps = [torch.randn(32, 32) for _ in range(1000)]
    sizes = [p.numel() * 4 for p in ps]
    assert counters.param_sized(sizes) == {4096}
    got = counters.measure_allocations(lambda: torch.stack(torch._foreach_norm(ps)).double(), sizes)
    assert got["alloc_bytes"] >= 8000 and got["param_sized_allocs"] in (0, None)
    got = counters.measure_allocations(lambda: [p.clone() for p in ps[:7]], sizes)
    assert got["param_sized_allocs"] in (7, None)


def test_state_bytes_counts_buffers_not_parameters():
    ps = [nn.Parameter(torch.randn(8, 8)) for _ in range(3)]  # (whole cache lines: the block has no padding)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = peers.ForeachSAM(ps, 0.05)
    assert counters.state_bytes(opt, ps) == 3 * 64 * 4


# ----------------------------------------------------------------------------- fair peers


class RecordingClosure:
    """Writes gradient set k at the k-th call of a step and records the weights it sees."""

    def __init__(self, params, grads):
        self.params, self.grads = params, grads
        self.seen: list[list[torch.Tensor]] = []

    def __call__(self):
        with torch.no_grad():
            k = len(self.seen)
            self.seen.append([p.detach().clone() for p in self.params])
            for p, g in zip(self.params, self.grads[k]):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
        return torch.zeros(())

    def for_module(self):
        def proxy_closure(module):
            ps = list(module.parameters())
            with torch.no_grad():
                self.seen.append([p.detach().clone() for p in ps])
                for p, g in zip(ps, self.grads[0]):
                    p.grad = g.clone()

        return proxy_closure


def _setup(seed=0, passes=4):
    gen = torch.Generator().manual_seed(seed)
    shp = shapes.tiny()
    w = [torch.randn(s, generator=gen, dtype=torch.float64).float() * 0.1 for s in shp]
    gs = [[torch.randn(s, generator=gen) * 1e-2 for s in shp] for _ in range(passes)]
    return w, gs


def _run_impl(make, preset_name, w, gs):
    params = [nn.Parameter(x.clone()) for x in w]
    for p, g in zip(params, gs[0]):
        p.grad = g.clone()
    clo = RecordingClosure(params, gs)
    opt, calls_self = make(params)
    if isinstance(opt, peers.ProxyAWP):
        opt.step(clo, clo.for_module())
    else:
        if not calls_self:
            clo()
        opt.step(clo)
    return params, clo.seen


def _fastperturb_make(preset):
    wrapper = fused.wrapper_class(preset.name)
    if wrapper is not None:
        return lambda ps: (wrapper(ps, peers.NoOpOptimizer, **preset.kwargs), True)
    return lambda ps: (fused.EngineStep(ps, peers.NoOpOptimizer(ps), preset), True)


def _peer_makes(preset):
    name, k = preset.name, preset.spec.steps
    out = {}
    if name == "SAM":
        out["foreach"] = lambda ps: (peers.ForeachSAM(ps, preset.radius, base=peers.NoOpOptimizer(ps)), False)
        out["loop"] = lambda ps: (peers.LoopSAM(ps, peers.NoOpOptimizer, rho=preset.radius), False)
        if peers.pytorch_optimizer_available() is None:
            out["pytorch-optimizer"] = lambda ps: (
                peers.pytorch_optimizer_sam(ps, peers.NoOpOptimizer, rho=preset.radius),
                False,
            )
            out["pytorch-optimizer(foreach)"] = lambda ps: (
                peers.pytorch_optimizer_sam(ps, peers.NoOpOptimizer, rho=preset.radius, foreach=True),
                False,
            )
    elif name == "ASAM":
        eta = preset.spec.adaptive_eta
        out["foreach"] = lambda ps: (peers.ForeachSAM(ps, preset.radius, eta, base=peers.NoOpOptimizer(ps)), False)
        out["loop"] = lambda ps: (peers.LoopSAM(ps, peers.NoOpOptimizer, rho=preset.radius, adaptive_eta=eta), False)
    elif name == "AWP":
        out["foreach"] = lambda ps: (
            peers.ForeachAWP([p for p in ps if p.dim() > 1], preset.radius, base=peers.NoOpOptimizer(ps)),
            False,
        )
        out["proxy"] = lambda ps: (
            peers.ProxyAWP(peers.ParamModule(ps), peers.NoOpOptimizer(ps), gamma=preset.radius),
            True,
        )
    else:
        out["foreach"] = lambda ps: (
            peers.ForeachAPD(ps, preset.radius, k, preset.step_size, True, base=peers.NoOpOptimizer(ps)),
            False,
        )
        out["deep-copy"] = lambda ps: (
            peers.DeepCopyAPD(ps, peers.NoOpOptimizer, eps=preset.radius, steps=k, eta=preset.step_size),
            False,
        )
    return out


@pytest.mark.parametrize("preset_name", ["SAM", "ASAM", "AWP", "APD"])
def test_peers_compute_the_same_perturbation_as_fastperturb(preset_name):
    preset = fused.presets(apd_steps=3)[preset_name]
    w, gs = _setup()
    ref_params, ref_seen = _run_impl(_fastperturb_make(preset), preset_name, w, gs)
    k = preset.spec.steps
    assert len(ref_seen) == k + 1
    # the perturbation really moved the weights
    assert any(not torch.equal(a, b) for a, b in zip(ref_seen[1], w))
    for label, make in _peer_makes(preset).items():
        params, seen = _run_impl(make, preset_name, w, gs)
        assert len(seen) == k + 1, label
        for kk in range(1, k + 1):  # the weights at every perturbed pass
            for a, b in zip(seen[kk], ref_seen[kk]):
                torch.testing.assert_close(a - torch.as_tensor(0.0), b, rtol=1e-5, atol=1e-7, msg=f"{label} pass {kk}")
        for p, q in zip(params, ref_params):  # restored weights and the descent gradient
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=f"{label} restore")
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=f"{label} descent gradient")


def test_foreach_cycles_restore_and_match_the_engine():
    pre = fused.presets(apd_steps=2)
    for name in suites.CYCLES:
        w, gs = _setup(seed=1)
        outs = []
        for use_foreach in (False, True):
            ps = [nn.Parameter(x.clone()) for x in w]
            for p, g in zip(ps, gs[0]):
                p.grad = g.clone()
            if use_foreach:
                suites._foreach_cycle(pre[name], ps).cycle()
            else:
                fused.FusedCycle(pre[name], ps).run()
            outs.append(ps)
        for p, q, x in zip(*outs, w):
            assert torch.equal(p.detach(), x) and torch.equal(q.detach(), x)
        if name == "APD":  # the descent gradient left in .grad
            for p, q in zip(*outs):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- runner


def _check_record(r):
    for key in ("suite", "model", "case", "impl", "kind", "status", "reason"):
        assert key in r
    assert r["status"] in ("ok", "skipped", "error")
    assert r["kind"] in ("fastperturb", "reference", "foreach", "peer", "baseline")


@pytest.mark.parametrize("suite", ["ops", "cycle", "step", "train"])
def test_each_suite_runs_on_tiny_settings(suite):
    cfg = _tiny_cfg([suite])
    data = cli.run(cfg, bw_numel=1 << 16)
    data = json.loads(json.dumps(data, default=str))  # JSON-serialisable
    assert data["schema"] == report.SCHEMA
    for key in ("torch", "cpu_model", "torch_threads", "packages", "git", "backends"):
        assert key in data["env"]
    bw = data["bandwidth"]
    assert bw["triad_gbps_best_seen"] > 0
    assert (bw["triad_gbps"] is None) == (bw["unstable"] is not None)  # a bound only when the probe was stable
    res = [r for r in data["results"] if r["suite"] == suite]
    assert res
    for r in res:
        _check_record(r)
        assert r["status"] != "error", r
    ok = [r for r in res if r["status"] == "ok"]
    assert any(r["kind"] == "fastperturb" for r in ok)
    for r in ok:
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["reps"] >= 1
    if suite in ("ops", "cycle"):
        assert all(("bound_s" in r and "x_bound" in r) == (bw["triad_gbps"] is not None) for r in ok)
        assert all(r["passes"] >= 1 for r in ok)
    if suite == "cycle":
        fp = [r for r in ok if r["impl"].startswith("fastperturb[") and r["kind"] == "fastperturb"]
        for r in fp:  # O(1) dispatches: no more than a few dozen for 5 tensors, none parameter-sized allocs
            assert r["alloc"]["param_sized_allocs"] in (0, None)
    if suite == "step":
        cases = {r["case"] for r in res}
        assert cases == {"SAM", "ASAM", "AWP", "APD-3"}
        for r in ok:
            assert r["closure_calls"] == (4 if r["case"] == "APD-3" else 2), r["impl"]
            assert "dispatches" in r and "alloc" in r and "state_bytes" in r
            # each sample minus its own closure calls (not the closure timed alone)
            assert 0 < r["optimizer_s"] < r["median_s"] and r["closure_s"] > 0
    if suite == "train":
        assert any("overhead_share" in r for r in ok)
    out = io.StringIO()
    report.print_tables(data, out)
    assert f"== {suite} ==" in out.getvalue()


def test_memory_suite_runs_a_child_process():
    cfg = _tiny_cfg(["memory"], memory_impls=["fastperturb.SAM", "proxy-AWP"])
    data = cli.run(cfg, bw_numel=1 << 16)
    res = [r for r in data["results"] if r["suite"] == "memory"]
    assert [r["impl"] for r in res] == ["fastperturb.SAM", "proxy-AWP"]
    for r in res:
        assert r["status"] == "ok", r
        assert r["peak_rss"] >= r["baseline_rss"] > 0 and r["param_bytes"] == shapes.numel(shapes.tiny()) * 4


def test_missing_peer_is_reported_as_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # import fails as if not installed
    assert peers.pytorch_optimizer_available() is not None
    cfg = _tiny_cfg(["step"], measure_costs=False)
    res = suites.suite_step(cfg)
    po = [r for r in res if r["impl"].startswith("pytorch-optimizer")]
    assert po and all(r["status"] == "skipped" and "not installed" in r["reason"] for r in po)
    assert any(r["status"] == "ok" and r["kind"] == "fastperturb" for r in res)


def _fake_result(median, lo, hi, impl="fastperturb[cpp]"):
    return {
        "suite": "cycle",
        "model": "m",
        "case": "SAM",
        "impl": impl,
        "kind": "fastperturb",
        "status": "ok",
        "reason": None,
        "median_s": median,
        "min_s": lo,
        "max_s": hi,
        "reps": 3,
    }


def test_spread_gives_each_paired_ratio_over_the_runs(tmp_path, capsys):
    def run(*paired, triad=40.0):
        results = []
        for impl, kind, x in zip(
            ("fastperturb[cpp]", "one tensor", "foreach"), ("fastperturb", "baseline", "foreach"), paired
        ):
            if x is not None:
                results.append(dict(_fake_result(1.0, 0.9, 1.1, impl), kind=kind, x_bound_paired=x))
        return {"schema": report.SCHEMA, "env": {}, "bandwidth": {"triad_gbps_best_seen": triad}, "results": results}

    runs = [("a", run(1.3, 1.1, 2.0)), ("b", run(1.1, None, 2.0)), ("c", run(1.2, 1.2, 2.0, triad=30.0))]
    out = io.StringIO()
    assert report.spread(runs, out) == 2  # fastperturb and its baseline; not the peers
    lines = out.getvalue().splitlines()
    ours = " ".join(next(line for line in lines if "fastperturb[cpp]" in line).split())
    assert ours.endswith("3/3 1.20x 1.10-1.30 1.30 1.10 1.20")  # runs, median, range, each run in order
    base = " ".join(next(line for line in lines if "one tensor" in line).split())
    assert base.endswith("2/3 1.15x 1.10-1.20 1.10 - 1.20")  # a run that did not measure it: counted, shown
    assert "foreach" not in out.getvalue()
    assert lines[-1] == "triad GB/s (best seen) per run: a 40.0, b 40.0, c 30.0"
    paths = []
    for name, data in runs:
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        paths.append(str(tmp_path / f"{name}.json"))
    assert cli.entry(["--spread", *paths]) == 0
    assert "1.10-1.30" in capsys.readouterr().out
    (tmp_path / "peers.json").write_text(json.dumps(run(None, None, 2.0)))
    assert cli.entry(["--spread", str(tmp_path / "peers.json")]) == 2  # nothing of fastperturb's: says so
    assert cli.entry(["--spread", str(tmp_path / "missing.json")]) == 2


def test_compare_flags_regressions_beyond_noise(tmp_path):
    old = {
        "schema": report.SCHEMA,
        "env": {},
        "results": [_fake_result(1.0, 0.95, 1.05), _fake_result(1.0, 0.9, 1.1, "foreach")],
    }
    new = {
        "schema": report.SCHEMA,
        "env": {},
        "results": [_fake_result(1.5, 1.4, 1.6), _fake_result(1.15, 1.0, 1.3, "foreach")],
    }
    out = io.StringIO()
    assert report.compare(old, new, 0.10, out) == 1  # the second overlaps: noise, not a regression
    assert "REGRESSION" in out.getvalue() and "fastperturb[cpp]" in out.getvalue()
    assert report.compare(old, old, 0.10, io.StringIO()) == 0
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(old))
    b.write_text(json.dumps(new))
    assert cli.entry(["--compare", str(a), str(b)]) == 1
    assert cli.entry(["--compare", str(a), str(a)]) == 0
    (tmp_path / "bad.json").write_text("{}")
    assert cli.entry(["--compare", str(a), str(tmp_path / "bad.json")]) == 2


def test_clear_errors_for_unknown_suite_model_backend(capsys):
    assert cli.entry(["--suites", "cycle,nope"]) == 2
    assert "unknown suite" in capsys.readouterr().err
    assert cli.entry(["--suites", "cycle", "--models", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert cli.entry(["--suites", "cycle", "--models", "tiny", "--backends", "gpu9"]) == 2
    assert "unknown backend" in capsys.readouterr().err
    assert cli.entry(["--suites", "train", "--train-model", "resnet9000"]) == 2
    assert "train-model" in capsys.readouterr().err


def test_a_run_without_a_compiled_backend_is_refused(monkeypatch, capsys):
    """Without --backends, a run where only the reference would run (a build that did not load) stops with the
    reason instead of timing the spec as fastperturb's kernels."""
    real = timing.why_unavailable_safe
    monkeypatch.setattr(
        timing,
        "why_unavailable_safe",
        lambda bk, b, dev: "the extension did not load" if b == "cpp" else real(bk, b, dev),
    )
    assert cli.entry(["--quick", "--suites", "cycle", "--models", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "no compiled fastperturb backend" in err and "cpp: the extension did not load" in err
    assert "--backends reference" in err


def test_bench_cli_writes_json_and_chart(tmp_path, capsys):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = cli.entry(["--quick", "--quiet", "--suites", "cycle", "--json", str(js), "--chart", str(png)])
    assert rc == 0
    data = report.load_json(str(js))
    assert {r["suite"] for r in data["results"]} == {"cycle"}
    assert "targets" in data
    text = capsys.readouterr().out
    assert "== cycle ==" in text
    pytest.importorskip("matplotlib")
    assert png.stat().st_size > 1000


@pytest.mark.slow
def test_train_loop_suite_counts_the_documented_loop_passes():
    """The common SAM wrappers' loop costs fastperturb and pytorch-optimizer the same 2 passes."""
    pytest.importorskip("pytorch_optimizer")
    from benchmarks import train_loop

    recs = train_loop.run_suite(torch.device("cpu"), batch=2, warmup=1, reps=1, min_reps=1, models=["mlp"])
    assert {(r["impl"], r["convention"]) for r in recs} == {
        ("fastperturb.SAM", "documented loop"),
        ("pytorch-optimizer SAM", "documented loop"),
        ("fastperturb.SAM", "step(closure) alone"),
    }
    assert all(r["status"] == "ok" and r["passes_per_step"] == 2.0 and r["median_s"] > 0 for r in recs)


@pytest.mark.slow
def test_sharded_memory_child_reports_each_rank(capsys):
    """The memory suite's sharded rows: a 2-rank FSDP2 run reports one record per rank, each holding
    half of the tiny list's bytes (the other records of the suite are tested above)."""
    from benchmarks import sharded_memory

    assert sharded_memory.rows(_tiny_cfg(["memory"], memory_impls=["fastperturb.SAM"])) == []  # a filtered run
    assert sharded_memory.main(["--model", "tiny", "--world", "2", "--steps", "1", "--preset", "APD"]) == 0
    recs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["rank"] for r in recs] == [0, 1]
    total = shapes.numel(shapes.tiny()) * 4
    assert all(r["param_bytes"] == total and r["peak_rss"] >= r["baseline_rss"] > 0 for r in recs)
    assert sum(r["local_param_bytes"] for r in recs) == total and all(r["local_param_bytes"] < total for r in recs)


# ----------------------------------------------------------------------------- what the output leaves out


def test_bandwidth_is_trusted_only_when_the_best_samples_agree():
    assert timing.bandwidth_verdict([40.0, 39.0, 38.5, 12.0, 20.0]) is None
    why = timing.bandwidth_verdict([1.6, 250.0, 40.0, 35.0])
    assert why is not None and "1.6-250.0" in why
    assert timing.bandwidth_verdict([40.0, 41.0]) is not None  # too few to tell


def test_paired_bound_divides_each_sample_by_its_own_rounds_probe():
    # A machine that halves its bandwidth for the second half of the run: the candidate's time doubles with it,
    # so the paired ratio stays put where the run-level ratio (best triad) would double.
    cand = timing.Candidate("c", lambda: None, times=[1.0, 1.0, 2.0, 2.0], rounds=[0, 1, 2, 3])
    probe = timing.Candidate("p", lambda: None, times=[0.5, 0.5, 1.0, 1.0], rounds=[0, 1, 2, 3])
    assert timing.paired_ratios(cand, probe, probe_bytes=100, nbytes=100) == [2.0, 2.0, 2.0, 2.0]
    # A sample whose round has no probe sample (the probe raised) is left out, not paired with another round.
    probe.times, probe.rounds = [0.5, 1.0], [0, 3]
    assert timing.paired_ratios(cand, probe, probe_bytes=100, nbytes=100) == [2.0, 2.0]


def test_the_probe_runs_once_in_every_round_of_the_interleaving():
    calls: list[str] = []
    fast = timing.Candidate("fast", lambda: calls.append("fast"))
    slow = timing.Candidate("slow", lambda: (calls.append("slow"), __import__("time").sleep(0.02)))
    probe = timing.Candidate("probe", lambda: calls.append("probe"))
    timing.run_interleaved([fast, slow], torch.device("cpu"), warmup=1, reps=6, min_reps=2, budget_s=0.05, probe=probe)
    assert len(fast.times) == 6 and 2 <= len(slow.times) < 6  # the slow one got fewer repetitions
    assert probe.rounds == list(range(6)) and len(probe.times) == 6
    assert fast.rounds == list(range(6)) and set(slow.rounds) <= set(range(6))
    assert calls.count("probe") == 7  # one warm-up call, then one per round


def test_every_candidate_follows_the_probe_in_some_round_not_always_the_same_one():
    calls: list[str] = []
    cands = [timing.Candidate(name, lambda name=name: calls.append(name)) for name in "abc"]
    probe = timing.Candidate("probe", lambda: calls.append("probe"))
    timing.run_interleaved(cands, torch.device("cpu"), warmup=1, reps=40, min_reps=40, budget_s=10.0, probe=probe)
    timed = calls[4:]  # after the warm-up calls (one each)
    after_probe = {timed[i + 1] for i, c in enumerate(timed[:-1]) if c == "probe"}
    assert after_probe - {"probe"} == {"a", "b", "c"}  # (a fixed rotation: "a" after it in every round)
    calls.clear()
    timing.run_interleaved(cands, torch.device("cpu"), warmup=1, reps=40, min_reps=40, budget_s=10.0, probe=probe)
    again = calls[4:]
    assert again == timed  # seeded: a run's order is repeatable


def test_foreach_asam_allocates_no_parameter_sized_tensor_per_cycle():
    ps = [nn.Parameter(torch.randn(64, 64)) for _ in range(3)]
    for p in ps:
        p.grad = torch.randn_like(p)
    fe = peers.ForeachSAM(ps, 0.05, adaptive_eta=0.01)
    fe.cycle()  # (warm)
    got = counters.measure_allocations(fe.cycle, [p.numel() * 4 for p in ps])
    assert got["param_sized_allocs"] in (0, None) and got["alloc_bytes"] < 64 * 64 * 4


def test_cycle_records_carry_the_paired_bound_when_the_run_has_a_bandwidth():
    cfg = _tiny_cfg(["cycle"], backends=["cpp"])
    cfg.bandwidth = {"triad_gbps": 10.0, "numel": 1 << 12}
    recs = [r for r in suites.RUNNERS["cycle"](cfg) if r["status"] == "ok"]
    assert recs and all(r["x_bound_paired"] > 0 and r["probe_gbps_median"] > 0 for r in recs)
    cfg = _tiny_cfg(["cycle"], backends=["cpp"])  # no reliable bandwidth: no bound of either kind
    cfg.bandwidth = {"triad_gbps": None, "unstable": "spread"}
    recs = [r for r in suites.RUNNERS["cycle"](cfg) if r["status"] == "ok"]
    assert recs and not any("x_bound_paired" in r or "x_bound" in r for r in recs)


def test_tables_say_when_there_is_no_bound_and_what_they_left_out():
    rec = _fake_result(1.0, 0.9, 1.1)
    skipped = dict(_fake_result(1.0, 0.9, 1.1, "pytorch-optimizer SAM"), status="skipped", reason="not installed")
    data = {
        "env": {},
        "bandwidth": {"triad_gbps": None, "unstable": "the best 3 spread 1.6-250 GB/s"},
        "results": [rec, skipped],
    }
    out = io.StringIO()
    report.print_tables(data, out)
    text = out.getvalue()
    assert "not measured reliably (the best 3 spread 1.6-250 GB/s)" in text
    assert "not in the table (1)" in text and "pytorch-optimizer SAM: skipped: not installed" in text


def test_compare_with_nothing_in_common_says_so(tmp_path, capsys):
    old = {"schema": report.SCHEMA, "env": {}, "results": [_fake_result(1.0, 0.9, 1.1)]}
    other = dict(_fake_result(1.0, 0.9, 1.1), model="another")
    new = {"schema": report.SCHEMA, "env": {}, "results": [other]}
    out = io.StringIO()
    assert report.compare(old, new, 0.10, out) == 0
    assert "nothing compared" in out.getvalue() and "0 result(s) in common" in out.getvalue()
    assert "significant" not in out.getvalue()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(old))
    b.write_text(json.dumps(new))
    assert cli.entry(["--compare", str(a), str(b)]) == 2
    assert "no measured result in common" in capsys.readouterr().err


@pytest.mark.parametrize(
    "start, end, warned",
    [
        (0.6, 1.8, False),  # a quiet 2-core machine at the end of a 2-thread run: the load is the run's own
        (1.6, 1.8, True),  # busy before the run started
        (0.6, 3.6, True),  # more than its own threads at the end
        (0.6, 2.9, True),  # another process on most of a core
        (0.2, 0.4, False),
    ],
)
def test_the_load_warning_does_not_count_the_runs_own_threads(start, end, warned):
    env = {"cpu_count": 2, "torch_threads": 2, "load_average_start": [start, 0, 0], "load_average_end": [end, 0, 0]}
    out = io.StringIO()
    report.print_tables({"schema": report.SCHEMA, "env": env, "results": []}, out)
    assert ("timings are not representative" in out.getvalue()) is warned
    assert bool(report.competing_load(env)) is warned


def test_chart_notes_what_it_left_out(tmp_path):
    pytest.importorskip("matplotlib")
    skipped = dict(_fake_result(1.0, 0.9, 1.1, "pytorch-optimizer SAM"), status="skipped", reason="not installed")
    data = {"env": {}, "bandwidth": {"triad_gbps": None}, "results": [_fake_result(1.0, 0.9, 1.1), skipped]}
    import matplotlib.figure

    texts = []
    orig = matplotlib.figure.Figure.text

    def spy(self, x, y, s, *args, **kwargs):
        texts.append(s)
        return orig(self, x, y, s, *args, **kwargs)

    matplotlib.figure.Figure.text = spy
    try:
        assert report.chart(data, str(tmp_path / "c.png")) is None
    finally:
        matplotlib.figure.Figure.text = orig
    note = " ".join(texts)
    assert "left out: 1 skipped or failed" in note and "pytorch-optimizer SAM" in note
    assert "no bandwidth bound" in note


# ----------------------------------------------------------------------------- fastperturb bench (the user's model)

USER_MODEL = """
import torch.nn as nn

def net():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
"""


def test_fastperturb_bench_measures_the_users_model(tmp_path, monkeypatch, capsys):
    from fastperturb import cli as fp_cli

    mod = f"benchuser_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{mod}.py").write_text(USER_MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        rc = fp_cli.main(
            [
                "bench",
                "--model",
                f"{mod}:net",
                "--input-shape",
                "6",
                "--batch-size",
                "8",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--apd-steps",
                "2",
                "--threads",
                "1",
                "--json",
                "r.json",
            ]
        )
    finally:
        sys.modules.pop(mod, None)
    assert rc == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "r.json").read_text())
    rows = {r["config"].split()[0]: r for r in data["rows"]}
    assert list(rows) == ["SGD", "SAM", "ASAM", "AWP", "APD"]
    # forward/backward passes per step: 1 plain, 2 for one ascent step, K+1 for APD
    assert [rows[k]["passes"] for k in rows] == [1, 2, 2, 2, 3]
    n_params = 6 * 16 + 16 + 16 * 4 + 4
    assert data["env"]["n_params"] == n_params and data["env"]["param_bytes"] == 4 * n_params
    # persistent state: SGD's momentum (1x the parameters); a preset adds its backup (AWP: the weight matrices
    # only), APD with the clean term also its gradient accumulator
    assert rows["SGD"]["state_bytes"] == 4 * n_params
    assert rows["SAM"]["state_bytes"] >= 2 * 4 * n_params
    assert 4 * n_params + 4 * (6 * 16 + 16 * 4) <= rows["AWP"]["state_bytes"] < 2 * 4 * n_params
    assert rows["APD"]["state_bytes"] >= 3 * 4 * n_params
    for r in rows.values():
        assert r["steps"] == 2 and 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["peak_step_bytes"] is None or r["peak_step_bytes"] > 0
    out = capsys.readouterr().out
    assert "SGD (plain step)" in out and "passes" in out and "wrote r.json" in out


def test_step_over_cycle_targets_read_the_default_step_and_the_cpp_cycle():
    """Issue 14's 'step at most 1.05x the cycle': the default fastperturb step (not the zeroing
    variant) over the C++ cycle of the same model and case; 'not measured' when one is missing."""

    def rec(suite, impl, **kw):
        return dict(suite=suite, model="resnet50", case="SAM", impl=impl, kind="fastperturb", status="ok", **kw)

    results = [
        rec("cycle", "fastperturb[cpp]", median_s=0.020),
        rec("step", "fastperturb.SAM[cpp, zeroing]", median_s=0.2, optimizer_s=0.030),
        rec("step", "fastperturb.SAM[cpp]", median_s=0.2, optimizer_s=0.022),
    ]
    got = {t["name"]: t for t in report.targets(results)}
    sam = got["SAM step on resnet50 (C++, closure excluded) / its cycle"]
    assert sam["value"] == pytest.approx(1.1) and sam["met"] is False
    apd = got["APD-3 step on resnet50 (C++, closure excluded) / its cycle"]
    assert apd["value"] is None and apd["met"] is None


def test_cycle_suite_times_a_long_list_beside_one_tensor_of_the_same_bytes(monkeypatch):
    from benchmarks.suites import cycle

    monkeypatch.setattr(cycle, "ONE_TENSOR_MIN_TENSORS", 3)  # the tiny list qualifies
    recs = suites.RUNNERS["cycle"](_tiny_cfg(["cycle"], backends=["cpp"]))
    one = [r for r in recs if r["impl"] == cycle.ONE_TENSOR]
    assert [r["case"] for r in one] == ["SAM"] and one[0]["status"] == "ok" and one[0]["kind"] == "baseline"
    lst = next(r for r in recs if r["case"] == "SAM" and r["impl"] == "fastperturb[cpp]")
    assert one[0]["n_tensors"] == 1 < lst["n_tensors"] and one[0]["n_params"] == lst["n_params"]
    assert one[0]["bytes"] == lst["bytes"] and one[0]["median_s"] > 0
    # its state is its own backup (and a few per-tensor scalars): not the list's buffers, nor its tensor and gradient
    assert 4 * lst["n_params"] <= one[0]["state_bytes"] <= lst["state_bytes"]
    # not a peer: the speedup columns compare fastperturb with foreach and the peers only
    assert report._speedups([one[0]]) == (None, None)
    # a short list gets no such row
    monkeypatch.setattr(cycle, "ONE_TENSOR_MIN_TENSORS", 10_000)
    recs = suites.RUNNERS["cycle"](_tiny_cfg(["cycle"], backends=["cpp"], measure_costs=False))
    assert not any(r["impl"] == cycle.ONE_TENSOR for r in recs)


def test_paired_step_share_subtracts_each_rounds_own_closure_and_divides_by_its_cycle():
    from benchmarks.suites import step as step_suite

    # Round 1 is slow for everything (the machine), round 2 has no cycle sample: the pairs are per round.
    step = timing.Candidate("s", lambda: None, times=[0.030, 0.060, 0.031], rounds=[0, 1, 2])
    closure = timing.Candidate("c", lambda: None, times=[0.005, 0.010, 0.005], rounds=[0, 1, 2])
    cycle = timing.Candidate("y", lambda: None, times=[0.020, 0.040], rounds=[0, 1])
    got = step_suite._paired_shares(step, {"closure": closure, "cycle": cycle}, calls=2)
    assert got["optimizer_s_paired"] == pytest.approx(0.030) and got["over_cycle_paired"] == pytest.approx(1.0)
    assert "over_cycle_own" not in got
    # With the seconds each step sample spent in its own closure calls: those, not the closure alone's.
    got = step_suite._paired_shares(step, {"closure": closure, "cycle": cycle}, calls=2, inside=[0.012, 0.030, 0.0])
    assert got["optimizer_s_own"] == pytest.approx(0.024) and got["over_cycle_own"] == pytest.approx(0.825)
    # misaligned (a sample without its closure time): left out rather than paired wrongly
    assert "over_cycle_own" not in step_suite._paired_shares(step, {"closure": closure, "cycle": cycle}, 2, [0.01])


def test_the_paired_cycle_keeps_its_buffers_when_a_peer_reassigns_the_parameters_data():
    from benchmarks.suites import step as step_suite

    torch.manual_seed(0)
    params = [torch.randn(5, 4, requires_grad=True), torch.randn(7, requires_grad=True)]
    pre = [[torch.randn_like(p) for p in params]]
    sam = fused.presets(2)["SAM"]
    paired = step_suite._PairedCycle(sam, params, pre, step_suite.OwnStorage(params))
    paired.prepare()
    paired.run()
    before = [b.data_ptr() for b in paired.cycle.backups]
    with torch.no_grad():  # the old_p loop's restore: new storage under the same parameters
        for p in params:
            p.data = p.data.clone()
    paired.prepare()
    paired.run()
    # the same buffers (no allocation timed with the cycle), on a handle still current (its own storage back)
    assert [b.data_ptr() for b in paired.cycle.backups] == before
    assert paired.cycle.lists.handle.current()
    # and the cycle still restores the parameters exactly
    want = [p.detach().clone() for p in params]
    paired.prepare()
    paired.run()
    assert all(torch.equal(p, w) for p, w in zip(params, want))


def test_every_step_implementation_runs_on_the_parameters_own_storage_after_the_old_p_loop():
    import fastperturb
    from benchmarks.suites import step as step_suite

    torch.manual_seed(0)
    params = [torch.randn(5, 4, requires_grad=True), torch.randn(7, requires_grad=True)]
    pre = [[torch.randn_like(p) for p in params]]
    own = step_suite.OwnStorage(params)
    ptrs = [p.data_ptr() for p in params]
    opt = fastperturb.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1)
    closure = step_suite.SyntheticClosure(params, pre)
    closure()
    opt.step(closure)
    handle = opt._plan().cycle_parts[4].handle
    loop = peers.LoopSAM(params, torch.optim.SGD, rho=0.05, lr=0.1)
    closure()
    loop.step(closure)  # restores by assigning .data: the loop's clones under the same parameters
    assert [p.data_ptr() for p in params] != ptrs
    after_loop = [p.detach().clone() for p in params]
    own()
    # the parameters' own storage again, holding the values the loop left, so fastperturb's plan is still current
    assert [p.data_ptr() for p in params] == ptrs
    assert all(torch.equal(p, w) for p, w in zip(params, after_loop))
    assert handle.current()
    own()  # (nothing swapped: nothing to do)
    assert [p.data_ptr() for p in params] == ptrs


def test_the_synthetic_closure_times_itself_and_a_step_its_own_calls():
    from benchmarks.suites import step as step_suite

    params = [torch.zeros(3, requires_grad=True)]
    closure = step_suite.SyntheticClosure(params, [[torch.ones(3)]])
    fn, spent = step_suite._closure_timed(lambda: (closure(), closure()), closure)
    fn()
    fn()
    assert len(spent) == 2 and all(s > 0 for s in spent) and sum(spent) == pytest.approx(closure.spent)
    assert torch.equal(params[0].grad, torch.ones(3)) and closure.calls == 4


def test_step_suite_times_the_closure_and_the_cycle_beside_the_cpp_step():
    cfg = _tiny_cfg(["step"], backends=["cpp"], reps=3, min_reps=3)
    recs = suites.RUNNERS["step"](cfg)
    sam = next(r for r in recs if r["case"] == "SAM" and r["impl"] == "fastperturb.SAM[cpp]")
    assert sam["optimizer_s_paired"] < sam["median_s"] and sam["over_cycle_paired"] > 0
    assert 0 < sam["optimizer_s_own"] < sam["median_s"] and sam["over_cycle_own"] > 0
    assert not any("paired" in r["impl"] for r in recs)  # helpers, not rows of the table
    targets = {t["name"]: t for t in report.targets([dict(r, model="resnet50") for r in recs])}
    paired = targets["SAM step on resnet50 (C++, closure excluded) / its cycle, paired per round"]
    assert paired["value"] == pytest.approx(sam["over_cycle_paired"])
    own = targets["SAM step on resnet50 (C++, its own closure calls excluded) / its cycle, paired per round"]
    assert own["value"] == pytest.approx(sam["over_cycle_own"])


# ----------------------------------------------------------------------------- the SAM family suite (issue 11)


def test_family_suite_runs_in_quick_mode(tmp_path, capsys):
    """``python -m benchmarks --quick --suites family``: every preset, pytorch-optimizer's class on its documented
    loop (and LookSAM's manual loop), and fastperturb's class when this build has it, passes per step counted."""
    pytest.importorskip("pytorch_optimizer")
    js = tmp_path / "family.json"
    assert cli.entry(["--quick", "--quiet", "--suites", "family", "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "== family ==" in printed and "pytorch-optimizer LookSAM manual 1+1/k" in printed
    data = json.loads(js.read_text())
    assert data["config"]["models"] == {"family": ["tiny"]}
    res = [r for r in data["results"] if r["suite"] == "family"]
    assert {r["case"] for r in res} == {"GSAM", "WSAM", "LookSAM k=10", "FriendlySAM"}
    for r in res:
        _check_record(r)
        assert r["status"] != "error", r
    po = {(r["case"], r["impl"]): r for r in res if r["kind"] == "peer"}
    assert len(po) == 2 + 2 + 4 + 2  # default and foreach configurations; LookSAM's manual loop too
    for (case, impl), r in po.items():
        assert r["status"] == "ok" and r["median_s"] > 0
        # pytorch-optimizer's documented loops make 2 passes every step, LookSAM's too; the manual one 1 + 1/k
        assert r["passes_per_step"] == (1.1 if "manual" in impl else 2.0), impl
        assert r["steps_per_call"] == (10 if case.startswith("LookSAM") else 1)
        assert "dispatches" in r and "state_bytes" in r and "peak_extra_bytes" in r
    import fastperturb

    for r in (r for r in res if r["kind"] == "fastperturb"):
        name = r["impl"].split("[")[0].removeprefix("fastperturb.")
        if not hasattr(fastperturb, name):
            assert r["status"] == "skipped" and r["reason"] == f"this fastperturb build has no fastperturb.{name}"
            continue
        assert r["status"] == "ok" and r["passes_per_step"] == (1.1 if name == "LookSAM" else 2.0), r


class _QuadraticClosure:
    """Gradients of 0.5 * sum(a * w**2) at the current weights (a differs per element): a real closure."""

    def __init__(self, params):
        self.params = params
        gen = torch.Generator().manual_seed(5)
        self.a = [torch.rand(p.shape, generator=gen) + 0.5 for p in params]
        self.calls = 0

    def __call__(self):
        self.calls += 1
        with torch.no_grad():
            for p, a in zip(self.params, self.a):
                p.grad = a * p
        return torch.zeros(())


def _family_params(seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes.tiny()]


def test_pytorch_optimizer_looksam_manual_loop_is_its_step_with_fewer_passes():
    """SAM_FAMILY.md §5.3: with a deterministic closure the manual loop gives step()'s weights with 1 + 1/k passes."""
    pytest.importorskip("pytorch_optimizer")
    runs = []
    for manual in (False, True):
        ps = _family_params()
        closure = _QuadraticClosure(ps)
        step, _ = peers.pytorch_optimizer_family("LookSAM", ps, torch.optim.SGD, closure, manual=manual)
        for _ in range(25):
            step()
        runs.append((ps, closure.calls))
    (documented, calls_doc), (manual, calls_manual) = runs
    assert calls_doc == 50 and calls_manual == 25 + 3  # refreshes at steps 0, 10 and 20
    for p, q, w in zip(documented, manual, _family_params()):
        assert not torch.equal(p.detach(), w)  # it trained
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["GSAM", "WSAM", "FriendlySAM"])
def test_family_suite_computes_the_same_steps_as_pytorch_optimizer(name):
    """Where pytorch-optimizer follows the paper (SAM_FAMILY.md: GSAM, WSAM decoupled, FriendlySAM), the
    suite's fastperturb and pytorch-optimizer configurations take the same steps (SGD base, several steps)."""
    pytest.importorskip("pytorch_optimizer")
    import fastperturb
    from benchmarks.suites import family

    if not hasattr(fastperturb, name):
        pytest.skip(f"this fastperturb build has no fastperturb.{name}")
    ps_po, ps_fp = _family_params(), _family_params()
    step, _ = peers.pytorch_optimizer_family(name, ps_po, torch.optim.SGD, _QuadraticClosure(ps_po))
    closure = _QuadraticClosure(ps_fp)
    opt = getattr(fastperturb, name)(ps_fp, torch.optim.SGD, lr=peers.FAMILY_LR, **family.fastperturb_kwargs(name))
    for _ in range(4):
        step()
        opt.zero_grad()
        opt.step(closure)
    for p, q, w in zip(ps_fp, ps_po, _family_params()):
        assert not torch.equal(p.detach(), w)
        # pytorch-optimizer keeps the global norm as a float32 scalar: rtol 1e-5 (SAM_FAMILY.md §1)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)


def test_fused_base_step_runner_subtracts_each_steps_own_closure_calls(monkeypatch):
    from benchmarks import fused_base_step
    from benchmarks.suites import step as step_suite

    # a closure whose calls inside a step take 5 ms more than alone: only a per-step subtraction removes them
    slow = {"on": False}
    call = step_suite.SyntheticClosure._call

    def timed_call(self):
        if slow["on"]:
            __import__("time").sleep(0.005)
        return call(self)

    monkeypatch.setattr(step_suite.SyntheticClosure, "_call", timed_call)
    make = fused_base_step._step_candidates

    def candidates(params, pre):
        slow["on"] = True
        return make(params, pre)

    monkeypatch.setattr(fused_base_step, "_step_candidates", candidates)
    r = fused_base_step.run("tiny", reps=3, budget_s=0.2)
    for name, s in r["steps"].items():
        # two closure calls of >= 5 ms each were inside every step: none of them is left in the optimizer's share
        assert 0 < s["min_optimizer_s"] <= s["optimizer_s"] < s["median_s"] - 0.009, name


def test_handle_calls_benchmark_times_both_call_paths_and_puts_fastperturbs_back(monkeypatch):
    # benchmarks/handle_calls.py (the README's figures for the handle ops' eager call path): tiny sizes
    from benchmarks import handle_calls
    from fastperturb import ops

    walks = []
    real = torch._ops._must_dispatch_in_python
    monkeypatch.setattr(torch._ops, "_must_dispatch_in_python", lambda *a: walks.append(1) or real(*a))
    own = ops._call_handle_op
    recs = handle_calls.measure("tiny", rounds=2, warmup=1)
    assert len(walks) >= 2 * 3 * 3  # the torch.ops path went through torch.ops: 3 rounds, 2 presets, 3+ ops
    assert [r["preset"] for r in recs] == ["SAM", "APD-3"]
    for r in recs:
        assert r["tensors"] == 5 and r["rounds"] == 2
        assert r["fastperturb median us"] > 0 and r["torch.ops median us"] > 0 and r["torch.ops / fastperturb"] > 0
    assert ops._call_handle_op is own


def test_cycle_instructions_parses_callgrind_and_says_when_valgrind_is_missing(monkeypatch, capsys):
    """The instruction-count tool (benchmarks.cycle_instructions): its parser of callgrind_annotate's rows, its
    child workload, and a clear exit when valgrind is not installed (running it under valgrind takes minutes)."""
    from benchmarks import cycle_instructions as ci

    text = (
        "Ir\n--------\n10,482,194,567 (100.0%)  PROGRAM TOTALS\n"
        "1,347,000 ( 1.2%)  ???:void fastperturb::cpu::isa_avx2::ascent_t<float>(Args const&, long) [/x/_C.so]\n"
        "    471,684 ( 0.1%)  ???:fastperturb::TensorLists::first_changed(unsigned long) const [/x/_C.so]\n"
        "    100 ( 0.0%)  ???:fastperturb::TensorLists::first_changed(unsigned long) const [/y/_C_testing.so]\n"
    )
    assert ci.own_counts(text) == {
        "???:void fastperturb::cpu::isa_avx2::ascent_t<float>(Args const&, long)": 1347000,
        "???:fastperturb::TensorLists::first_changed(unsigned long) const": 471784,
    }
    threads = torch.get_num_threads()
    try:
        ci._child("tiny", "SAM", one_tensor=True, cycles=1)
        ci._child("tiny", "APD", one_tensor=False, cycles=1)
    finally:
        torch.set_num_threads(threads)  # (the child sets one thread, as under valgrind)
    monkeypatch.setattr(ci.shutil, "which", lambda name: None)
    assert ci.main(["--model", "tiny"]) == 2
    assert "valgrind and callgrind_annotate not found" in capsys.readouterr().out


def test_peak_step_bytes_on_cpu_sees_the_release_of_gradients_made_before_the_step():
    """``fastperturb bench``'s peak on CPU: the profiler sees no free of a block allocated before it started, so a
    step that releases the last step's gradients and makes new ones counted the new ones only (about one gradient's
    size too many for every preset, in the review). Measured over a second step now: a step that swaps a released
    buffer for a new one of the same size adds nothing; one that keeps the old one adds its size."""
    from fastperturb.tools.bench import peak_step_bytes

    held = {"grad": torch.zeros(1 << 16)}

    def release_and_make():
        held["grad"] = None
        held["grad"] = torch.ones(1 << 16)

    def make_and_keep():
        held.setdefault("kept", []).append(torch.ones(1 << 16))

    cpu = torch.device("cpu")
    swap, why = peak_step_bytes(release_and_make, cpu)
    assert why is None and swap is not None and swap <= 1024, swap
    grow, _ = peak_step_bytes(make_and_keep, cpu)
    assert grow == 4 << 16


def test_the_triton_host_command_runs_as_documented_without_the_interpreter_set(tmp_path):
    """``python -m benchmarks.triton_host`` (README, benchmarks/README.md) chooses Triton's interpreter itself: the
    package's own imports load triton before ``main`` runs, so the child must be started whatever is imported."""
    pytest.importorskip("triton")
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "host.json"
    args = ["--tensors", "3", "--numel", "5", "--reps", "1", "--rounds", "1", "--json", str(out)]
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.triton_host", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Triton host side per op call" in run.stdout
    assert {r["call"] for r in json.loads(out.read_text())["records"]} >= {"lists", "handle", "new .grad"}


def test_a_benchmark_module_runs_as_main_without_being_imported_first():
    """``python -m benchmarks.<module>``: the package no longer imports its runner (and through it the suites and
    that module) on import, so runpy does not warn that the module was already in sys.modules."""
    import subprocess

    run = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "benchmarks.sharded_memory", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and "usage:" in run.stdout, run.stderr[-2000:]
    import benchmarks

    assert benchmarks.run is cli.run
