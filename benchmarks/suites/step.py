"""The ``step`` suite: whole optimizer steps with a synthetic closure, fastperturb beside the peers."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from fastperturb.ops import dispatch as backends

from .. import counters, fused, peers, shapes, timing
from ..timing import Candidate
from .common import Config, _costs, _finish, _record, _say, _skipped, make_params, timed_backends


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
        #: seconds spent inside the calls so far (so that a step's time can exclude its own closure calls)
        self.spent = 0.0
        #: the next call is the caller's backward (:meth:`callers_backward`)
        self.fresh = False

    def _targets(self, params):
        return params

    def __call__(self):
        t0 = time.perf_counter()
        try:
            return self._call()
        finally:
            self.spent += time.perf_counter() - t0

    def _call(self):
        with counters.closure_scope(), torch.no_grad():
            src = self.pre[self.k % len(self.pre)]
            if self.fresh:
                for p, g in zip(self.params, src):
                    p.grad = g.clone()
            else:
                for p, b in zip(self.params, self.bufs):
                    if p.grad is None:
                        p.grad = b
                grads = [p.grad for p in self.params]
                torch._foreach_copy_(grads, src)
                if counters._active:
                    # Under a TorchDispatchMode, _foreach_copy_ does not bump the version
                    # counters that optimizers use to see that backward ran: bump them.
                    torch.autograd.graph.increment_version(grads)
            self.k += 1
            self.calls += 1
        return torch.zeros(())

    def callers_backward(self):
        """The caller's g_0, as a backward after the loop's ``opt.zero_grad()`` leaves it: fresh gradient tensors
        (timed as a closure call), not the step's own G overwritten in place."""
        self.fresh = True
        try:
            return self()
        finally:
            self.fresh = False

    def for_module(self):
        """A closure on another module's parameters (the proxy AWP's proxy), same gradients."""
        inner = {}

        def proxy_closure(module: nn.Module):
            t0 = time.perf_counter()
            try:
                ps = [p for p in module.parameters()]
                if "c" not in inner:
                    with torch.no_grad():
                        inner["c"] = SyntheticClosure(ps, self.pre)
                inner["c"].params = ps
                self.calls += 1  # one of the step's K+1 passes
                return inner["c"]()
            finally:
                self.spent += time.perf_counter() - t0  # (a closure call of the step, excluded like the others)

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
        if wrapper is not None and b == "cpp":
            # The other way of clearing the gradients before a pass (issue 14): zeroing fused into the
            # ascent. Here the closure reuses its buffers, so releasing costs no allocation;
            # benchmarks/clearing.py times both with a real backward, which does allocate.
            def make_zeroing(make=make):
                step, opt, closure = make()
                opt.grad_clearing = "zero"
                return step, opt, closure

            impls.append((f"fastperturb.{name}[{b}, zeroing]", "fastperturb", make_zeroing))

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
            opt = peers.ForeachAPD(
                params, preset.radius, k, preset.step_size, preset.spec.include_clean, base=base(params)
            )
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
            opt = peers.DeepCopyAPD(
                params, base, eps=preset.radius, steps=k, eta=preset.step_size, include_clean=preset.spec.include_clean
            )
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
            closure.callers_backward()
        _run(opt, closure, backend)

    return step


def _run(opt, closure, backend):
    if backend is None:
        opt.step(closure)
    else:
        with backends.use_backend(backend):
            opt.step(closure)


class OwnStorage:
    """Puts the parameters' own storage back before each timed call (untimed), for every implementation.

    The implementations share one parameter list, and the old_p loop restores by assigning ``.data``: without this,
    every implementation timed after it in a round would run on the loop's clones, and an optimizer that keeps a
    plan on its tensors' storage (fastperturb's handle) would rebuild it in every round, a cost no training loop
    pays (measured on 1000 tensors: a SAM step 4.4 against 2.1 ms)."""

    def __init__(self, params: Sequence[Tensor]):
        self.params = list(params)
        self.own = [p.data for p in self.params]

    def __call__(self) -> None:
        with torch.no_grad():
            for p, own in zip(self.params, self.own):
                if p.data_ptr() != own.data_ptr():
                    own.copy_(p)  # (the values the loop restored)
                    p.data = own


def _suite_step_model(cfg: Config, model: str, out: list) -> None:
    pre_all = fused.presets(cfg.apd_steps)
    shp = shapes.shapes_for(model)
    params, pre = make_params(shp, cfg.device, grad_sets=2)
    own = OwnStorage(params)
    # The closure's own cost (one gradient copy), to report each step without it too.
    probe = SyntheticClosure(params, pre)
    cl_cand = Candidate("closure", probe)
    timing.run_interleaved(
        [cl_cand], cfg.device, warmup=cfg.warmup, reps=cfg.reps, min_reps=cfg.min_reps, budget_s=cfg.budget_s
    )
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
            fn, spent = _closure_timed(fn, closure)
            cands.append(Candidate(impl, fn, own))
            recs.append(_record("step", model, label, impl, kind))
            objs.append(obj)
            closures.append((closure, spent))
        paired = _paired_helpers(cfg, preset, params, pre, own)
        timing.run_interleaved(
            cands + list(paired.values()),
            cfg.device,
            warmup=cfg.warmup,
            reps=cfg.reps,
            min_reps=cfg.min_reps,
            budget_s=cfg.budget_s,
        )
        for c, r, o, (cl, spent) in zip(cands, recs, objs, closures):
            r.update(n_tensors=len(params), n_params=sum(p.numel() for p in params))
            out.append(_finish(cfg, r, c, None))
            if c.error:
                continue
            if closure_s is not None:
                r["closure_s"] = closure_s  # (the closure alone, for reference)
            inside = spent[-len(c.times) :]  # the timed calls are the last ones made
            if len(inside) == len(c.times):
                # each sample minus the seconds that very step spent in its own closure calls: the closure alone,
                # timed apart, moves between repeats by as much as a small list's whole step
                r["optimizer_s"] = statistics.median(t - s for t, s in zip(c.times, inside))
            if paired and r["impl"] == f"fastperturb.{preset.name}[cpp]":
                # (warm-up first; the costs below call again later)
                r.update(_paired_shares(c, paired, preset.spec.steps + 1, inside))
            before = cl.calls
            _costs(cfg, r, c.fn, own, params, state_obj=o)
            if cfg.measure_costs:
                r["closure_calls"] = (cl.calls - before) // 2
        del cands, objs, closures
        _say(cfg, f"step {model} {label}")


def _paired_helpers(cfg: Config, preset: fused.Preset, params, pre, own: OwnStorage) -> dict[str, Candidate]:
    """For SAM and APD on the C++ backend: the closure alone and the engine's cycle alone, timed in the same
    rounds as the steps, so that each step sample has its own round's closure and cycle (:func:`_paired_shares`).
    The cycle is that of the cycle suite (gradient given, no closure), on these tensors."""
    if preset.name not in ("SAM", "APD") or not any(b == "cpp" and not why for b, why in timed_backends(cfg)):
        return {}
    cycle = _PairedCycle(preset, params, pre, own)
    return {
        "closure": Candidate("closure (paired)", SyntheticClosure(params, pre), own),
        "cycle": Candidate("cycle (paired)", cycle.run, cycle.prepare),
    }


class _PairedCycle:
    """The engine's cycle on the step suite's tensors, g_0 given by the closure before each call (untimed)."""

    def __init__(self, preset: fused.Preset, params, pre, own: OwnStorage):
        self.preset, self.params, self.own = preset, list(params), own
        self.closure = SyntheticClosure(params, pre)
        self.cycle = fused.FusedCycle(preset, self.params, "cpp")

    def prepare(self) -> None:
        # The parameters' own storage back first (the old_p loop assigns .data), so the handle built on it stays
        # current: new buffers every round would put 1x the parameter bytes of page faults in the cycle's time
        # (62 against 27 ms on ResNet-50, and step / cycle 0.54).
        self.own()
        self.closure()

    def run(self) -> None:
        self.cycle.run()


def _closure_timed(fn: Callable[[], object], closure: SyntheticClosure) -> tuple[Callable[[], None], list[float]]:
    """``fn`` recording, per call, the seconds spent inside ``closure`` during that call (in the list returned)."""
    spent: list[float] = []

    def run() -> None:
        before = closure.spent
        fn()
        spent.append(closure.spent - before)

    return run, spent


def _paired_shares(
    step: Candidate, paired: dict[str, Candidate], calls: int, inside: Optional[Sequence[float]] = None
) -> dict:
    """The step's own time (its time minus ``calls`` times the closure's) and that over the cycle's, each sample
    against the closure and cycle samples of its own round; medians over the rounds all three have. With
    ``inside`` (per sample, the seconds the step spent in its own closure calls), also the step's time minus
    exactly those (``optimizer_s_own``) and that over its round's cycle (``over_cycle_own``)."""
    by_round = {k: dict(zip(c.rounds, c.times)) for k, c in paired.items() if not c.error}
    if len(by_round) < 2:
        return {}
    if inside is not None and len(inside) != len(step.times):
        inside = None
    own, ratio, own_in, ratio_in = [], [], [], []
    for j, (t, r) in enumerate(zip(step.times, step.rounds)):
        if r in by_round["closure"] and r in by_round["cycle"]:
            own.append(t - calls * by_round["closure"][r])
            ratio.append(own[-1] / by_round["cycle"][r])
            if inside is not None:
                own_in.append(t - inside[j])
                ratio_in.append(own_in[-1] / by_round["cycle"][r])
    if not own:
        return {}
    out = {
        "optimizer_s_paired": statistics.median(own),
        "over_cycle_paired": statistics.median(ratio),
        "cycle_s_paired": statistics.median(paired["cycle"].times),
    }
    if own_in:
        out.update(optimizer_s_own=statistics.median(own_in), over_cycle_own=statistics.median(ratio_in))
    return out


def suite_step(cfg: Config) -> list[dict]:
    """One full optimizer step of each preset with synthetic gradients and a no-op base optimizer.

    Every implementation makes K+1 closure calls per step (the closure copies
    precomputed gradients into ``.grad``), so step times include K+1 gradient
    copies for all alike; ``optimizer_s`` = the median over the samples of each
    step's time minus the seconds it spent in its own closure calls, the optimizer's
    share (``closure_s``: the closure alone, for reference). Also per step: operator
    dispatches and allocations (the closure's own excluded), persistent state bytes.
    """
    out = []
    for model in cfg.models.get("step", []):
        _suite_step_model(cfg, model, out)
    return out
