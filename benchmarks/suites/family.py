"""The ``family`` suite: GSAM, WSAM, LookSAM and FriendlySAM steps, fastperturb beside pytorch-optimizer 4.1.0.

Each preset's fastperturb class and pytorch-optimizer's class of the same name run side by side (round-robin)
on the same parameter list with the same hyper-parameters (:data:`benchmarks.peers.FAMILY`), the step suite's
synthetic closure (precomputed gradients copied into ``.grad``, no model) and its no-op base optimizer, each on
its own documented loop. LookSAM is timed over windows of k steps (one refresh, k - 1 reuse steps), so every
implementation's figure is the mean step of a whole schedule; pytorch-optimizer's LookSAM is run on its
documented ``step(closure)`` loop (2 passes every step) and on its manual first_step/second_step loop
(1 + 1/k passes).
"""

from __future__ import annotations

from typing import Optional

from fastperturb.ops import dispatch as backends

from .. import peers, shapes, timing
from ..timing import Candidate
from .common import Config, _costs, _finish, _record, _say, _skipped, make_params, timed_backends
from .step import SyntheticClosure, _wrap_step

FAMILY_NAMES = tuple(peers.FAMILY)


def case_name(name: str) -> str:
    return f"LookSAM k={peers.FAMILY['LookSAM']['k']}" if name == "LookSAM" else name


def window(name: str) -> int:
    """Steps per timed call: LookSAM's whole schedule of k steps, one step for the others."""
    return peers.FAMILY["LookSAM"]["k"] if name == "LookSAM" else 1


def fastperturb_kwargs(name: str) -> dict:
    """``fastperturb.<name>(params, base, lr=..., **these)``: the same hyper-parameters as pytorch-optimizer's.

    GSAM's radius follows the LR between ``rho_min`` and ``rho_max`` (pytorch-optimizer: a ProportionScheduler
    between ``min_value`` and ``max_value``); both are set to rho, so it is constant for both.
    """
    hp = dict(peers.FAMILY[name])
    if name == "GSAM":
        rho = hp.pop("rho")
        hp.update(rho_max=rho, rho_min=rho)
    return hp


#: fastperturb configurations timed besides the default one: LookSAM's per-tensor projection and rescale
#: (pytorch-optimizer's form; the default is the paper's global one).
EXTRA_FASTPERTURB = {"LookSAM": [("scope=layer", {"scope": "layer"})]}


def _impls(cfg: Config, name: str, params, pre) -> list:
    """(label, kind, make) with ``make() -> (one_step, optimizer, closure)``, or the reason it is skipped."""
    out = []
    base = peers.NoOpOptimizer
    from .. import fused

    wrapper = fused.wrapper_class(name)
    configs = [("", {}), *EXTRA_FASTPERTURB.get(name, [])]
    for (b, why), (suffix, extra) in ((bw, c) for bw in timed_backends(cfg) for c in configs):
        label = f"fastperturb.{name}[{b}]" + (f" {suffix}" if suffix else "")
        if wrapper is None:
            out.append((label, "fastperturb", f"this fastperturb build has no fastperturb.{name}"))
            continue
        if why:
            out.append((label, "fastperturb", why))
            continue

        def make(b=b, extra=extra):
            closure = SyntheticClosure(params, pre)
            with backends.use_backend(b):
                opt = wrapper(params, base, lr=peers.FAMILY_LR, **fastperturb_kwargs(name), **extra)
            # The implementations share these tensors: give step() g_0 from a caller's pass, as the
            # pytorch-optimizer loops that compute g_0 first do (the step suite's convention).
            opt.closure_calls_self = False
            return _wrap_step(opt, closure, b, 1), opt, closure

        out.append((label, "fastperturb", make))
    why = peers.pytorch_optimizer_family_available(name)
    variants = [(None, False, ""), (True, False, "(foreach)")]
    if name == "LookSAM":
        variants += [(None, True, " manual 1+1/k"), (True, True, "(foreach) manual 1+1/k")]
    for foreach, manual, suffix in variants:
        label = f"pytorch-optimizer {name}{suffix}"
        if why:
            out.append((label, "peer", why))
            continue

        def make(foreach=foreach, manual=manual):
            closure = SyntheticClosure(params, pre)
            step, opt = peers.pytorch_optimizer_family(name, params, base, closure, foreach=foreach, manual=manual)
            return step, opt, closure

        out.append((label, "peer", make))
    return out


def _windowed(step, steps: int):
    if steps == 1:
        return step

    def run():
        for _ in range(steps):
            step()

    return run


def _suite_family_model(cfg: Config, model: str, out: list) -> None:
    params, pre = make_params(shapes.shapes_for(model), cfg.device, grad_sets=2)
    for name in FAMILY_NAMES:
        case, steps = case_name(name), window(name)
        cands, recs, objs, closures = [], [], [], []
        for impl, kind, make in _impls(cfg, name, params, pre):
            if isinstance(make, str):
                out.append(_skipped("family", model, case, impl, kind, make))
                continue
            try:
                fn, obj, closure = make()
            except Exception as e:
                out.append(
                    _record("family", model, case, impl, kind, status="error", reason=f"{type(e).__name__}: {e}")
                )
                continue
            cands.append(Candidate(impl, _windowed(fn, steps)))
            recs.append(_record("family", model, case, impl, kind, steps_per_call=steps))
            objs.append(obj)
            closures.append(closure)
        timing.run_interleaved(
            cands, cfg.device, warmup=cfg.warmup, reps=cfg.reps, min_reps=cfg.min_reps, budget_s=cfg.budget_s
        )
        for c, r, o, cl in zip(cands, recs, objs, closures):
            c.times = [t / steps for t in c.times]  # per step
            r.update(n_tensors=len(params), n_params=sum(p.numel() for p in params))
            out.append(_finish(cfg, r, c, None))
            if c.error:
                continue
            before = cl.calls
            try:
                c.fn()  # one more call, untimed: the passes it makes
            except Exception as e:
                r.update(status="error", reason=f"{type(e).__name__}: {e}")
                continue
            r["passes_per_step"] = (cl.calls - before) / steps
            _costs(cfg, r, c.fn, None, params, state_obj=o)
            if "dispatches" in r:
                r["dispatches"] = r["dispatches"] / steps
            alloc: Optional[dict] = r.get("alloc")
            if alloc:
                r["peak_extra_bytes"] = alloc.get("peak_live_bytes")
        del cands, objs, closures
        _say(cfg, f"family {model} {case}")


def suite_family(cfg: Config) -> list[dict]:
    """One step of GSAM, WSAM, LookSAM (mean over a k-step window) and FriendlySAM, fastperturb beside
    pytorch-optimizer's class of the same name on its documented loop, interleaved.

    Per implementation: median time per step, forward/backward passes per step (closure calls, counted),
    operator dispatches per step, the peak of the bytes it allocated above the step's start (PyTorch profiler at
    the allocator level, the closure excluded; ``peak_extra_bytes``) and its persistent state bytes.
    """
    out: list[dict] = []
    for model in cfg.models.get("family", []):
        _suite_family_model(cfg, model, out)
    return out
