"""What every suite shares: the run's configuration, parameter lists with gradients, the backends to time,
and the result records (see :mod:`benchmarks.report` for their fields)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from fastperturb.ops import dispatch as backends

from .. import counters, timing
from ..timing import Candidate


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
    #: the triad probe timed in every round of the bounded suites (:func:`bound_probe`), built once
    probe: Optional[tuple[Candidate, int]] = None


def _say(cfg: Config, msg: str) -> None:
    if cfg.progress:
        cfg.progress(msg)


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
            why = (
                "Triton on CPU runs in the interpreter (a correctness tool, ~ms per program); "
                "pass --backends triton to time it anyway"
            )
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


#: The paired probe's arrays: 3 x 64 MiB of traffic, twice the L3 cache of the machines measured here, so it
#: streams from memory as the run-level probe does, in about 4 ms a round.
PROBE_NUMEL = 1 << 24


def bound_probe(cfg: Config) -> Optional[tuple[Candidate, int]]:
    """The triad probe to interleave with a bounded comparison, and its bytes per call; None when the run's
    bandwidth was not measured reliably (then no bound is printed at all)."""
    if not (cfg.bandwidth or {}).get("triad_gbps"):
        return None
    if cfg.probe is None:
        cfg.probe = timing.triad_probe(cfg.device, min(PROBE_NUMEL, cfg.bandwidth.get("numel", PROBE_NUMEL)))
    return cfg.probe


def run_bounded(cfg: Config, cands: list[Candidate]) -> Optional[tuple[Candidate, int]]:
    """:func:`timing.run_interleaved` over ``cands`` with the triad probe in every round (:func:`bound_probe`);
    returns the probe, for :func:`_finish`."""
    probe = bound_probe(cfg)
    timing.run_interleaved(
        cands,
        cfg.device,
        warmup=cfg.warmup,
        reps=cfg.reps,
        min_reps=cfg.min_reps,
        budget_s=cfg.budget_s,
        probe=probe[0] if probe else None,
    )
    return probe


def _bound(cfg: Config, nbytes: float) -> Optional[float]:
    bw = (cfg.bandwidth or {}).get("triad_gbps")
    return nbytes / (bw * 1e9) if bw else None


def _record(suite, model, case, impl, kind, **kw) -> dict:
    rec = {"suite": suite, "model": model, "case": case, "impl": impl, "kind": kind, "status": "ok", "reason": None}
    rec.update(kw)
    return rec


def _finish(
    cfg: Config, rec: dict, cand: Candidate, nbytes: Optional[float], probe: Optional[tuple[Candidate, int]] = None
) -> dict:
    """The record's timing fields; ``probe``: the triad probe that ran in the same rounds (``x_bound_paired``)."""
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
        if probe is not None and not probe[0].error:
            ratios = timing.paired_ratios(cand, probe[0], probe[1], nbytes)
            if ratios:
                rec["x_bound_paired"] = statistics.median(ratios)
                rec["probe_gbps_median"] = statistics.median(probe[1] / t / 1e9 for t in probe[0].times)
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
