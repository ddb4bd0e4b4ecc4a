"""The benchmark suites: ``ops``, ``cycle``, ``step``, ``train`` and ``memory``.

Each suite returns a list of result records (dicts, see :mod:`.report` for the
fields). Records of implementations that cannot run here are kept with
``status="skipped"`` and the reason, so a missing peer never crashes a run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from fastperturb import ops
from fastperturb.ops import dispatch as backends
from . import counters, fused, peers, shapes, timing
from .timing import Candidate

SUITES = ("ops", "cycle", "step", "train", "memory", "train_loop")


@dataclass
class Config:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    models: dict = field(default_factory=dict)  # suite -> list of model names
    backends: Optional[list[str]] = None  # None: every available one (not triton-on-CPU)
    warmup: int = 2
    reps: int = 10
    min_reps: int = 3
    budget_s: float = 1.0  # per implementation per case
    apd_steps: int = 3
    mem_steps: int = 20
    memory_impls: Sequence[str] = ()  # empty: all of MEMORY_IMPLS
    mem_jobs: int = 2  # memory-suite child processes at a time
    mem_max_s: float = 10.0  # a memory child stops after this long (at least 3 steps); 0 = no cap
    measure_costs: bool = True  # dispatch counts, allocations, state bytes
    train_batch: int = 64
    bandwidth: Optional[dict] = None
    progress: Optional[Callable[[str], None]] = None


def _say(cfg: Config, msg: str) -> None:
    if cfg.progress:
        cfg.progress(msg)


# ----------------------------------------------------------------------------- helpers

def make_params(shape_list, device, seed: int = 0, grad_sets: int = 1, cheap: bool = False):
    """Parameters (small random weights) with ``.grad`` set, plus ``grad_sets`` precomputed gradients.

    ``cheap``: constant fills instead of random numbers (the memory suite, where
    only sizes matter and a 109M-parameter random init would dominate the run).
    """
    gen = torch.Generator().manual_seed(seed)

    def init(s, std):
        if cheap:
            return torch.full(s, std, device=device)
        return torch.empty(s).normal_(0, std, generator=gen).to(device)

    params = [nn.Parameter(init(s, 0.05)) for s in shape_list]
    pre = [[init(s, 1e-3) for s in shape_list] for _ in range(grad_sets)]
    for p, g in zip(params, pre[0]):
        p.grad = g.clone()
    return params, pre


def fastperturb_backends(cfg: Config) -> list[tuple[str, Optional[str]]]:
    """(backend, reason-if-unavailable) for the backends to time on this device."""
    names = cfg.backends or ["cpp", "cuda", "triton", "reference"]
    out = []
    for b in names:
        if b not in backends.BACKENDS or b == "auto":
            raise ValueError(f"unknown backend {b!r}; choose from cpp, cuda, triton, reference")
        why = timing.why_unavailable_safe(backends, b, cfg.device)
        if why is None and b == "triton" and cfg.device.type == "cpu" and cfg.backends is None:
            why = "Triton on CPU runs in the interpreter (a correctness tool, ~ms per program); pass --backends triton to time it anyway"
        if why is not None and cfg.backends is None and b in ("cuda", "triton") and cfg.device.type == "cpu":
            continue  # GPU backends are not expected on a CPU run unless asked for
        out.append((b, why))
    return out


def timed_backends(cfg: Config) -> list[tuple[str, Optional[str]]]:
    """Backends for the ops and step suites: the reference only when asked for or when nothing else runs."""
    bks = fastperturb_backends(cfg)
    if cfg.backends or not any(why is None for b, why in bks if b != "reference"):
        return bks
    return [(b, why) for b, why in bks if b != "reference"]


def _bound(cfg: Config, nbytes: float) -> Optional[float]:
    bw = (cfg.bandwidth or {}).get("triad_gbps")
    return nbytes / (bw * 1e9) if bw else None


def _record(suite, model, case, impl, kind, **kw) -> dict:
    rec = {"suite": suite, "model": model, "case": case, "impl": impl, "kind": kind, "status": "ok", "reason": None}
    rec.update(kw)
    return rec


def _finish(cfg: Config, rec: dict, cand: Candidate, nbytes: Optional[float]) -> dict:
    if cand.error:
        rec.update(status="error", reason=cand.error)
        return rec
    rec.update(timing.summary(cand.times))
    rec["times_s"] = [round(t, 7) for t in cand.times]
    if nbytes:
        rec["bytes"] = int(nbytes)
        bound = _bound(cfg, nbytes)
        med = rec["median_s"]
        rec["gbps"] = nbytes / med / 1e9
        if bound:
            rec["bound_s"] = bound
            rec["pct_of_bound"] = 100.0 * bound / med
            rec["x_bound"] = med / bound
    return rec


def _costs(cfg: Config, rec: dict, fn: Callable[[], object], prepare, params: Sequence[Tensor], state_obj=None) -> None:
    """Dispatch count, allocations and persistent state of one call (untimed)."""
    if not cfg.measure_costs:
        return
    try:
        if prepare:
            prepare()
        rec["dispatches"], rec["top_ops"] = counters.count_dispatches(fn)
        if prepare:
            prepare()
        rec["alloc"] = counters.measure_allocations(fn, [p.numel() * p.element_size() for p in params], cfg.device)
        if state_obj is not None:
            rec["state_bytes"] = counters.state_bytes(state_obj, params)
    except Exception as e:
        rec["costs_error"] = f"{type(e).__name__}: {e}"


def _skipped(suite, model, case, impl, kind, reason) -> dict:
    return _record(suite, model, case, impl, kind, status="skipped", reason=reason)


def _param_bytes(params: Sequence[Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


# ----------------------------------------------------------------------------- ops

def _suite_ops_model(cfg: Config, model: str, out: list) -> None:
    shp = shapes.shapes_for(model)
    params, pre = make_params(shp, cfg.device)
    grads = [p.grad for p in params]
    w0 = [p.detach().clone() for p in params]
    g0 = [g.clone() for g in pre[0]]
    backups = [w + 1e-4 for w in w0]
    accum = [g * 0.5 for g in g0]
    a0 = [a.clone() for a in accum]
    n = len(params)
    coef = torch.full((n,), 0.01, device=cfg.device)
    proj = torch.full((n,), 0.9, device=cfg.device)
    P = _param_bytes(params)
    pw = [p.data for p in params]

    def reset_w():
        torch._foreach_copy_(pw, w0)

    def reset_g():
        torch._foreach_copy_(grads, g0)

    def reset_a():
        torch._foreach_copy_(accum, a0)

    def reset_all():
        reset_w(), reset_g(), reset_a()

    def fe_norms_linf():
        torch.stack(torch._foreach_norm(grads, math.inf)).max()

    def fe_ascent_proj():
        torch._foreach_sub_(pw, backups)
        torch._foreach_add_(pw, grads, alpha=0.01)
        torch._foreach_mul_(pw, 0.9)
        torch._foreach_add_(pw, backups)

    def fe_combine():
        torch._foreach_mul_(grads, 0.25)
        torch._foreach_add_(grads, accum)

    cases = [
        ("norms(l2)", 1, lambda: ops.norms(grads, 2.0), None, lambda: peers._global_norm(grads)),
        ("norms(inf)", 1, lambda: ops.norms(grads, math.inf), None, fe_norms_linf),
        ("grad_stats_", 1, lambda: ops.grad_stats_(grads), None, lambda: torch._foreach_norm(grads)),
        ("grad_stats_+accum", 3, lambda: ops.grad_stats_(grads, accum, accum_weight=0.5), reset_a,
         lambda: (torch._foreach_norm(grads), torch._foreach_add_(accum, grads, alpha=0.5))),
        ("grad_stats_+delta+accum", 5, lambda: ops.grad_stats_(grads, accum, pw, backups, accum_weight=0.5),
         reset_a, None),
        ("ascent_step_(first)", 4,
         lambda: ops.ascent_step_(pw, grads, backups, coef, proj, first=True), reset_w,
         lambda: (torch._foreach_copy_(backups, pw), torch._foreach_add_(pw, grads, alpha=0.01))),
        ("ascent_step_(proj)", 4, lambda: ops.ascent_step_(pw, grads, backups, coef, proj), reset_w, fe_ascent_proj),
        ("restore_", 2, lambda: ops.restore_(pw, backups), reset_w, lambda: torch._foreach_copy_(pw, backups)),
        ("combine_grads_", 3, lambda: ops.combine_grads_(grads, accum, 0.25), reset_g, fe_combine),
    ]
    # The reference backend is timed in the cycle suite; per op only when asked for.
    bks = timed_backends(cfg)
    for case, passes, fp_fn, prep, fe_fn in cases:
        nbytes = passes * P
        cands, recs = [], []
        for b, why in bks:
            if why:
                out.append(_skipped("ops", model, case, f"fastperturb[{b}]", "fastperturb", why))
                continue

            def run(fp_fn=fp_fn, b=b):
                with backends.use_backend(b), torch.no_grad():
                    fp_fn()
            cands.append(Candidate(f"fastperturb[{b}]", run, prep))
            recs.append(_record("ops", model, case, f"fastperturb[{b}]", "reference" if b == "reference" else "fastperturb", passes=passes))
        if fe_fn is not None:
            def run_fe(fe_fn=fe_fn):
                with torch.no_grad():
                    fe_fn()
            cands.append(Candidate("foreach", run_fe, prep))
            recs.append(_record("ops", model, case, "foreach", "foreach", passes=passes))
        else:
            out.append(_skipped("ops", model, case, "foreach", "foreach", "no single foreach equivalent (needs temporaries)"))
        timing.run_interleaved(cands, cfg.device, warmup=cfg.warmup, reps=cfg.reps, min_reps=cfg.min_reps, budget_s=cfg.budget_s)
        reset_all()
        for c, r in zip(cands, recs):
            r.update(n_tensors=n, n_params=sum(p.numel() for p in params))
            out.append(_finish(cfg, r, c, nbytes))
            _costs(cfg, r, c.fn, prep, params)
        reset_all()
        _say(cfg, f"ops {model} {case}")


def suite_ops(cfg: Config) -> list[dict]:
    """Each fused op on each backend, beside the ``torch._foreach_*`` equivalent where there is one.

    Byte models (passes over the list's bytes): norms 1 (read); grad_stats_ 1 (read g),
    with accumulation 3 (read g, accum; write accum), with delta + accumulation 5;
    ascent_step_ first 4 (read w, g; write backup, w), projected 4 (read w, backup, g;
    write w); restore_ 2; combine_grads_ 3 (read accum, g; write g).
    """
    out = []
    for model in cfg.models.get("ops", []):
        _suite_ops_model(cfg, model, out)
    return out


# ----------------------------------------------------------------------------- cycle

def _foreach_cycle(preset: fused.Preset, params):
    if preset.name == "SAM":
        return peers.ForeachSAM(params, preset.radius)
    if preset.name == "ASAM":
        return peers.ForeachSAM(params, preset.radius, adaptive_eta=preset.spec.adaptive_eta)
    if preset.name == "AWP":
        return peers.ForeachAWP(params, preset.radius)
    if preset.name == "APD":
        return peers.ForeachAPD(params, preset.radius, preset.spec.steps, preset.step_size, preset.spec.include_clean)
    raise ValueError(preset.name)


CYCLES = ("SAM", "AWP", "APD")


def _suite_cycle_model(cfg: Config, model: str, out: list) -> None:
    pre_all = fused.presets(cfg.apd_steps)
    shp = shapes.shapes_for(model)
    params, pre = make_params(shp, cfg.device)
    grads = [p.grad for p in params]
    P = _param_bytes(params)

    def refresh():
        torch._foreach_copy_(grads, pre[0])

    for cname in CYCLES:
        preset = pre_all[cname]
        label = f"{cname}-{preset.spec.steps}" if cname == "APD" else cname
        nbytes = fused.cycle_passes(preset) * P
        cands, recs, objs = [], [], []
        for b, why in fastperturb_backends(cfg):
            if why:
                out.append(_skipped("cycle", model, label, f"fastperturb[{b}]", "fastperturb", why))
                continue
            fc = fused.FusedCycle(preset, params, b)
            cands.append(Candidate(f"fastperturb[{b}]", fc.run, refresh))
            recs.append(_record("cycle", model, label, f"fastperturb[{b}]", "reference" if b == "reference" else "fastperturb",
                                passes=fused.cycle_passes(preset)))
            objs.append(fc)
        fe = _foreach_cycle(preset, params)
        cands.append(Candidate("foreach", fe.cycle, refresh))
        recs.append(_record("cycle", model, label, "foreach", "foreach", passes=fused.cycle_passes(preset)))
        objs.append(fe)
        timing.run_interleaved(cands, cfg.device, warmup=cfg.warmup, reps=cfg.reps, min_reps=cfg.min_reps, budget_s=cfg.budget_s)
        for c, r, o in zip(cands, recs, objs):
            r.update(n_tensors=len(params), n_params=sum(p.numel() for p in params))
            out.append(_finish(cfg, r, c, nbytes))
            if r["kind"] != "reference":  # the slow spec: its costs are not the point, its time is
                _costs(cfg, r, c.fn, refresh, params, state_obj=o)
        refresh()
        del objs, cands
        _say(cfg, f"cycle {model} {label}")


def suite_cycle(cfg: Config) -> list[dict]:
    """One perturb-restore cycle per preset (gradient already in ``.grad``, no closure).

    fastperturb runs the engine (the exact op sequence of the optimizer wrappers) on
    each backend; ``foreach`` is the best pure-PyTorch version. Byte models: see
    :func:`benchmarks.fused.cycle_passes`. The AWP cycle here perturbs every
    tensor of the list (per layer, relative); the step suite uses AWP's dim > 1 rule.
    """
    out = []
    for model in cfg.models.get("cycle", []):
        _suite_cycle_model(cfg, model, out)
    return out


# ----------------------------------------------------------------------------- step

class SyntheticClosure:
    """Writes precomputed gradients into ``.grad`` (no model): the same cost for every implementation.

    Each call copies the next gradient set into the parameters' gradient buffers
    (reusing the harness's buffers when an implementation set ``.grad`` to None),
    so no implementation pays for allocation inside the closure. Its operators and
    allocations are excluded from the step's counts.
    """

    def __init__(self, params: Sequence[Tensor], pre: list[list[Tensor]]):
        self.params = list(params)
        self.pre = pre
        self.bufs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.k = 0
        self.calls = 0

    def _targets(self, params):
        return params

    def __call__(self):
        with counters.closure_scope(), torch.no_grad():
            for p, b in zip(self.params, self.bufs):
                if p.grad is None:
                    p.grad = b
            grads = [p.grad for p in self.params]
            torch._foreach_copy_(grads, self.pre[self.k % len(self.pre)])
            if counters._active:
                # Under a TorchDispatchMode, _foreach_copy_ does not bump the version
                # counters that optimizers use to see that backward ran: bump them.
                torch.autograd.graph.increment_version(grads)
            self.k += 1
            self.calls += 1
        return torch.zeros(())

    def for_module(self):
        """A closure on another module's parameters (the proxy AWP's proxy), same gradients."""
        inner = {}

        def proxy_closure(module: nn.Module):
            ps = [p for p in module.parameters()]
            if "c" not in inner:
                with torch.no_grad():
                    inner["c"] = SyntheticClosure(ps, self.pre)
                inner["c"].params = ps
            self.calls += 1  # one of the step's K+1 passes
            return inner["c"]()

        return proxy_closure


def _step_impls(cfg: Config, preset: fused.Preset, params, pre):
    """(name, kind, make) for every implementation; ``make() -> (step_fn, optimizer, closure)``,
    or a string (the reason it is skipped) in place of ``make``."""
    base = peers.NoOpOptimizer
    name = preset.name
    k = preset.spec.steps
    impls = []
    wrapper = fused.wrapper_class(name)
    bks = timed_backends(cfg)
    for b, why in bks:
        label = f"fastperturb.{name}[{b}]" if wrapper is not None else f"fastperturb-engine.{name}[{b}]"
        if why:
            impls.append((label, "fastperturb", f"skipped: {why}"))
            continue
        if wrapper is not None:
            def make(b=b):
                closure = SyntheticClosure(params, pre)
                with backends.use_backend(b):
                    opt = wrapper(params, base, **preset.kwargs)
                # The implementations share these tensors, so another one's gradient writes would look
                # like a caller's g_0 to step(): give it g_0 explicitly, as the peers get it (K+1 calls).
                opt.closure_calls_self = False
                return _wrap_step(opt, closure, b, k), opt, closure
        else:
            def make(b=b):
                closure = SyntheticClosure(params, pre)
                opt = fused.EngineStep(params, base(params), preset, b)
                return _wrap_step(opt, closure, None, k), opt, closure
        impls.append((label, "fastperturb", make))

    sel = fused.select(preset, params)

    def foreach_make():
        closure = SyntheticClosure(params, pre)
        if name == "SAM":
            opt = peers.ForeachSAM(params, preset.radius, base=base(params))
        elif name == "ASAM":
            opt = peers.ForeachSAM(params, preset.radius, preset.spec.adaptive_eta, base=base(params))
        elif name == "AWP":
            opt = peers.ForeachAWP(sel, preset.radius, base=base(params))
        else:
            opt = peers.ForeachAPD(params, preset.radius, k, preset.step_size,
                                   preset.spec.include_clean, base=base(params))
        return _wrap_step(opt, closure, None, k), opt, closure
    impls.append((f"foreach.{name}", "foreach", foreach_make))

    if name in ("SAM", "ASAM"):
        eta = preset.spec.adaptive_eta

        def loop_make():
            closure = SyntheticClosure(params, pre)
            opt = peers.LoopSAM(params, base, rho=preset.radius, adaptive_eta=eta)
            return _wrap_step(opt, closure, None, 1), opt, closure
        impls.append((f"loop-{name} (old_p clones)", "peer", loop_make))
    if name == "SAM":
        why = peers.pytorch_optimizer_available()
        for fe_flag, label in ((None, "pytorch-optimizer SAM"), (True, "pytorch-optimizer SAM(foreach)")):
            if why:
                impls.append((label, "peer", f"skipped: {why}"))
                continue

            def po_make(fe_flag=fe_flag):
                closure = SyntheticClosure(params, pre)
                opt = peers.pytorch_optimizer_sam(params, base, rho=preset.radius, foreach=fe_flag)
                return _wrap_step(opt, closure, None, 1), opt, closure
            impls.append((label, "peer", po_make))
    if name == "AWP":
        def proxy_make():
            closure = SyntheticClosure(params, pre)
            opt = peers.ProxyAWP(peers.ParamModule(params), base(params), gamma=preset.radius)
            proxy_closure = closure.for_module()

            def step():
                opt.step(closure, proxy_closure)
            return step, opt, closure
        impls.append(("proxy-model AWP", "peer", proxy_make))
    if name == "APD":
        def dc_make():
            closure = SyntheticClosure(params, pre)
            opt = peers.DeepCopyAPD(params, base, eps=preset.radius, steps=k,
                                    eta=preset.step_size, include_clean=preset.spec.include_clean)
            return _wrap_step(opt, closure, None, k), opt, closure
        impls.append(("deep-copy APD", "peer", dc_make))
    return impls


def _wrap_step(opt, closure: "SyntheticClosure", backend: Optional[str], k: int):
    """A step making K+1 closure calls in all: g_0's call is made here if ``opt.step`` does not make it.

    Whether it does is read from ``opt.closure_calls_self`` or, for an optimizer
    that does not say, observed on the first call (K+1 calls: it does).
    """
    mode = {"self": getattr(opt, "closure_calls_self", None)}

    def step():
        if mode["self"] is None:
            before = closure.calls
            _run(opt, closure, backend)
            mode["self"] = closure.calls - before >= k + 1
            return
        if not mode["self"]:
            closure()
        _run(opt, closure, backend)
    return step


def _run(opt, closure, backend):
    if backend is None:
        opt.step(closure)
    else:
        with backends.use_backend(backend):
            opt.step(closure)


def _suite_step_model(cfg: Config, model: str, out: list) -> None:
    pre_all = fused.presets(cfg.apd_steps)
    shp = shapes.shapes_for(model)
    params, pre = make_params(shp, cfg.device, grad_sets=2)
    # The closure's own cost (one gradient copy), to report each step without it too.
    probe = SyntheticClosure(params, pre)
    cl_cand = Candidate("closure", probe)
    timing.run_interleaved([cl_cand], cfg.device, warmup=cfg.warmup, reps=cfg.reps, min_reps=cfg.min_reps,
                           budget_s=cfg.budget_s)
    closure_s = timing.summary(cl_cand.times).get("median_s")
    for pname in ("SAM", "ASAM", "AWP", "APD"):
        preset = pre_all[pname]
        label = f"APD-{preset.spec.steps}" if pname == "APD" else pname
        cands, recs, objs, closures = [], [], [], []
        for impl, kind, make in _step_impls(cfg, preset, params, pre):
            if isinstance(make, str):
                out.append(_skipped("step", model, label, impl, kind, make.removeprefix("skipped: ")))
                continue
            try:
                fn, obj, closure = make()
            except Exception as e:
                out.append(_record("step", model, label, impl, kind, status="error", reason=f"{type(e).__name__}: {e}"))
                continue
            cands.append(Candidate(impl, fn))
            recs.append(_record("step", model, label, impl, kind))
            objs.append(obj)
            closures.append(closure)
        timing.run_interleaved(cands, cfg.device, warmup=cfg.warmup, reps=cfg.reps, min_reps=cfg.min_reps, budget_s=cfg.budget_s)
        for c, r, o, cl in zip(cands, recs, objs, closures):
            r.update(n_tensors=len(params), n_params=sum(p.numel() for p in params))
            out.append(_finish(cfg, r, c, None))
            if c.error:
                continue
            if closure_s is not None:
                r["closure_s"] = closure_s
                r["optimizer_s"] = r["median_s"] - (preset.spec.steps + 1) * closure_s
            before = cl.calls
            _costs(cfg, r, c.fn, None, params, state_obj=o)
            if cfg.measure_costs:
                r["closure_calls"] = (cl.calls - before) // 2
        del cands, objs, closures
        _say(cfg, f"step {model} {label}")


def suite_step(cfg: Config) -> list[dict]:
    """One full optimizer step of each preset with synthetic gradients and a no-op base optimizer.

    Every implementation makes K+1 closure calls per step (the closure copies
    precomputed gradients into ``.grad``), so step times include K+1 gradient
    copies for all alike; ``optimizer_s`` = median - (K+1) x the closure's own
    median time (measured alone), the optimizer's share. Also per step: operator
    dispatches and allocations (the closure's own excluded), persistent state bytes.
    """
    out = []
    for model in cfg.models.get("step", []):
        _suite_step_model(cfg, model, out)
    return out


# ----------------------------------------------------------------------------- train

def small_cnn(num_classes: int = 10) -> nn.Module:
    """The train suite's model: a small CNN for 3x32x32 inputs (about 100k parameters)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )


def suite_train(cfg: Config) -> list[dict]:
    """A real training step (forward/backward of a small CNN, SGD base) per implementation.

    Perturbation overhead share = (step - K x fwd/bwd - plain step) / step, where
    ``plain step`` is one forward/backward plus the SGD update (what training
    without perturbation costs) and ``fwd/bwd`` is one forward/backward alone:
    i.e. (step - (K+1) x fwd/bwd - SGD update) / step, all measured interleaved.
    """
    out = []
    for model_name in cfg.models.get("train", []):
        if model_name != "cnn":
            base_model = _train_model(model_name)
        else:
            base_model = small_cnn()
        base_model = base_model.to(cfg.device)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(cfg.train_batch, 3, 32, 32, generator=gen).to(cfg.device)
        y = torch.randint(0, 10, (cfg.train_batch,), generator=gen).to(cfg.device)
        pre_all = fused.presets(cfg.apd_steps)

        def closure_for(model, zero: bool = True):
            # fastperturb's optimizers zero the gradients before each pass themselves
            # (and ask closures not to); the peers' convention is a closure that zeroes.
            def closure():
                if zero:
                    model.zero_grad(set_to_none=True)
                loss = Fn.cross_entropy(model(x), y)
                loss.backward()
                return loss
            return closure

        def proxy_closure(proxy):
            proxy.zero_grad(set_to_none=True)
            loss = Fn.cross_entropy(proxy(x), y)
            loss.backward()
            return loss

        entries = []  # (impl, kind, case, K, fn)
        m0 = copy.deepcopy(base_model)
        fb_closure = closure_for(m0)
        entries.append(("forward/backward", "baseline", "plain", 0, fb_closure))
        m1 = copy.deepcopy(base_model)
        sgd = torch.optim.SGD(m1.parameters(), lr=0.01)
        c1 = closure_for(m1)

        def plain_step():
            c1()
            sgd.step()
        entries.append(("SGD (no perturbation)", "baseline", "plain", 0, plain_step))
        for pname in ("SAM", "AWP", "APD"):
            preset = pre_all[pname]
            k = preset.spec.steps
            label = f"APD-{k}" if pname == "APD" else pname
            wrapper = fused.wrapper_class(pname)
            m = copy.deepcopy(base_model)
            c = closure_for(m, zero=False)
            if wrapper is not None:
                opt = wrapper(list(m.parameters()), torch.optim.SGD, lr=0.01, **preset.kwargs)
                entries.append((f"fastperturb.{pname}", "fastperturb", label, k, _train_step(opt, c, k)))
            else:
                opt = fused.EngineStep(list(m.parameters()), torch.optim.SGD(m.parameters(), lr=0.01), preset)
                entries.append((f"fastperturb-engine.{pname}", "fastperturb", label, k, _train_step(opt, c, k)))
            m = copy.deepcopy(base_model)
            c = closure_for(m)
            ps = list(m.parameters())
            if pname == "SAM":
                fe = peers.ForeachSAM(ps, preset.radius, base=torch.optim.SGD(ps, lr=0.01))
                entries.append(("foreach.SAM", "foreach", label, k, _train_step(fe, c, k)))
                m = copy.deepcopy(base_model)
                c = closure_for(m)
                lp = peers.LoopSAM(list(m.parameters()), torch.optim.SGD, rho=preset.radius, lr=0.01)
                entries.append(("loop-SAM (old_p clones)", "peer", label, k, _train_step(lp, c, k)))
                why = peers.pytorch_optimizer_available()
                if why:
                    out.append(_skipped("train", model_name, label, "pytorch-optimizer SAM", "peer", why))
                else:
                    m = copy.deepcopy(base_model)
                    c = closure_for(m)
                    po = peers.pytorch_optimizer_sam(m.parameters(), torch.optim.SGD, rho=preset.radius, lr=0.01)
                    entries.append(("pytorch-optimizer SAM", "peer", label, k, _train_step(po, c, k)))
            elif pname == "AWP":
                fe = peers.ForeachAWP([p for p in ps if p.dim() > 1], preset.radius, base=torch.optim.SGD(ps, lr=0.01))
                entries.append(("foreach.AWP", "foreach", label, k, _train_step(fe, c, k)))
                m = copy.deepcopy(base_model)
                c = closure_for(m)
                pa = peers.ProxyAWP(m, torch.optim.SGD(m.parameters(), lr=0.01), gamma=preset.radius)
                entries.append(("proxy-model AWP", "peer", label, k, lambda pa=pa, c=c: pa.step(c, proxy_closure)))
            else:
                fe = peers.ForeachAPD(ps, preset.radius, k, preset.step_size, preset.spec.include_clean,
                                      base=torch.optim.SGD(ps, lr=0.01))
                entries.append(("foreach.APD", "foreach", label, k, _train_step(fe, c, k)))
                m = copy.deepcopy(base_model)
                c = closure_for(m)
                dc = peers.DeepCopyAPD(list(m.parameters()), torch.optim.SGD, eps=preset.radius, steps=k,
                                       eta=preset.step_size, include_clean=preset.spec.include_clean, lr=0.01)
                entries.append(("deep-copy APD", "peer", label, k, _train_step(dc, c, k)))
        cands = [Candidate(f"{case}:{impl}", fn) for impl, kind, case, k, fn in entries]
        timing.run_interleaved(cands, cfg.device, warmup=cfg.warmup, reps=cfg.reps, min_reps=cfg.min_reps,
                               budget_s=cfg.budget_s)
        med = {c.name: (statistics_median(c.times) if c.times else None) for c in cands}
        t_fb = med["plain:forward/backward"]
        t_plain = med["plain:SGD (no perturbation)"]
        nparams = sum(p.numel() for p in base_model.parameters())
        for (impl, kind, case, k, fn), c in zip(entries, cands):
            r = _finish(cfg, _record("train", model_name, case, impl, kind, K=k, n_params=nparams), c, None)
            if r["status"] == "ok" and t_fb and t_plain and k:
                r["fwd_bwd_s"] = t_fb
                r["plain_step_s"] = t_plain
                r["overhead_share"] = (r["median_s"] - k * t_fb - t_plain) / r["median_s"]
            out.append(r)
        _say(cfg, f"train {model_name}")
    return out


def statistics_median(xs):
    import statistics

    return statistics.median(xs)


def _train_model(name: str) -> nn.Module:
    if ":" in name:
        import importlib

        mod, _, attr = name.partition(":")
        return getattr(importlib.import_module(mod), attr)()
    raise shapes.UnknownModel(f"unknown train model {name!r}: use 'cnn' or pkg.module:factory (3x32x32 input, 10 classes)")


def _train_step(opt, closure, k: int):
    mode = {"self": getattr(opt, "closure_calls_self", None), "calls": 0}

    def counted():
        mode["calls"] += 1
        return closure()

    def step():
        if mode["self"] is None:
            before = mode["calls"]
            opt.step(counted)
            mode["self"] = mode["calls"] - before >= k + 1
            return
        if not mode["self"]:
            counted()
        opt.step(counted)
    return step


# ----------------------------------------------------------------------------- memory

MEMORY_IMPLS = (
    "fastperturb.SAM", "foreach.SAM", "loop-SAM", "pytorch-optimizer-SAM",
    "fastperturb.AWP", "foreach.AWP", "proxy-AWP",
    "fastperturb.APD", "foreach.APD", "deep-copy-APD",
)


def suite_memory(cfg: Config) -> list[dict]:
    """Peak resident memory of a separate process running ``mem_steps`` steps of each implementation.

    The child (``python -m benchmarks.memchild``) builds the parameters,
    their gradients and one precomputed gradient set (3 parameter-sized sets in
    all, the baseline), measures its RSS, runs the steps and reports the peak
    RSS. A child stops early after ``mem_max_s`` seconds (at least 3 steps): the
    peak is reached in the first steps, which ``peak_overhead_by_step`` shows.
    Overhead = peak - baseline, also as a multiple of the
    parameter bytes (issue #3: fastperturb's AWP <= 1x, the proxy approach ~3x).
    """
    out = []
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for model in cfg.models.get("memory", []):
        jobs = []
        for impl in cfg.memory_impls or MEMORY_IMPLS:
            if impl not in MEMORY_IMPLS:
                raise ValueError(f"unknown memory implementation {impl!r}; choose from {', '.join(MEMORY_IMPLS)}")
            case = impl.split(".")[-1].split("-")[-1]
            kind = "fastperturb" if impl.startswith("fastperturb") else ("foreach" if impl.startswith("foreach") else "peer")
            if impl == "pytorch-optimizer-SAM" and peers.pytorch_optimizer_available():
                out.append(_skipped("memory", model, case, impl, kind, peers.pytorch_optimizer_available()))
                continue
            cmd = [sys.executable, "-m", "benchmarks.memchild", "--model", model, "--impl", impl,
                   "--steps", str(cfg.mem_steps), "--apd-steps", str(cfg.apd_steps),
                   "--max-seconds", str(cfg.mem_max_s), "--min-steps", str(min(3, cfg.mem_steps))]
            jobs.append((impl, case, kind, cmd))
        # Peak RSS is per process, so the children may run side by side (mem_jobs at a time).
        running: list = []
        results: dict = {}
        pending = list(jobs)
        while pending or running:
            while pending and len(running) < max(cfg.mem_jobs, 1):
                impl, case, kind, cmd = pending.pop(0)
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                running.append((impl, case, kind, proc, time.perf_counter()))
            impl, case, kind, proc, t0 = running.pop(0)
            stdout, stderr = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                results[impl] = _record("memory", model, case, impl, kind, status="error",
                                        reason=(stderr.strip().splitlines() or ["?"])[-1])
            else:
                data = json.loads(stdout.strip().splitlines()[-1])
                data["wall_s"] = round(time.perf_counter() - t0, 1)
                results[impl] = _record("memory", model, case, impl, kind, **data)
            _say(cfg, f"memory {model} {impl}")
        out.extend(results[impl] for impl, *_ in jobs)
    return out


RUNNERS = {"ops": suite_ops, "cycle": suite_cycle, "step": suite_step, "train": suite_train, "memory": suite_memory}

from .train_loop import MODELS as _TRAIN_LOOP_MODELS, suite_train_loop  # noqa: E402  (it imports nothing from here)

RUNNERS["train_loop"] = suite_train_loop
