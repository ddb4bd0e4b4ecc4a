"""The ``ops`` suite: each fused op on each backend, beside its ``torch._foreach_*`` equivalent."""

from __future__ import annotations

import math

import torch

from fastperturb import ops
from fastperturb.ops import dispatch as backends

from .. import peers, shapes
from ..timing import Candidate
from .common import (
    Config,
    _costs,
    _finish,
    _param_bytes,
    _record,
    _say,
    _skipped,
    make_params,
    run_bounded,
    timed_backends,
)


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

    def fe_ascent_proj():  # w = b + 0.9 (w + 0.01 g - b): 6 passes
        torch._foreach_add_(pw, grads, alpha=0.01)
        torch._foreach_lerp_(pw, backups, 0.1)

    def fe_combine():
        torch._foreach_mul_(grads, 0.25)
        torch._foreach_add_(grads, accum)

    cases = [
        ("norms(l2)", 1, lambda: ops.norms(grads, 2.0), None, lambda: peers._global_norm(grads)),
        ("norms(inf)", 1, lambda: ops.norms(grads, math.inf), None, fe_norms_linf),
        ("grad_stats_", 1, lambda: ops.grad_stats_(grads), None, lambda: torch._foreach_norm(grads)),
        (
            "grad_stats_+accum",
            3,
            lambda: ops.grad_stats_(grads, accum, accum_weight=0.5),
            reset_a,
            lambda: (torch._foreach_norm(grads), torch._foreach_add_(accum, grads, alpha=0.5)),
        ),
        (
            "grad_stats_+delta+accum",
            5,
            lambda: ops.grad_stats_(grads, accum, pw, backups, accum_weight=0.5),
            reset_a,
            None,
        ),
        (
            "ascent_step_(first)",
            4,
            lambda: ops.ascent_step_(pw, grads, backups, coef, proj, first=True),
            reset_w,
            lambda: (torch._foreach_copy_(backups, pw), torch._foreach_add_(pw, grads, alpha=0.01)),
        ),
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
            recs.append(
                _record(
                    "ops",
                    model,
                    case,
                    f"fastperturb[{b}]",
                    "reference" if b == "reference" else "fastperturb",
                    passes=passes,
                )
            )
        if fe_fn is not None:

            def run_fe(fe_fn=fe_fn):
                with torch.no_grad():
                    fe_fn()

            cands.append(Candidate("foreach", run_fe, prep))
            recs.append(_record("ops", model, case, "foreach", "foreach", passes=passes))
        else:
            out.append(
                _skipped("ops", model, case, "foreach", "foreach", "no single foreach equivalent (needs temporaries)")
            )
        probe = run_bounded(cfg, cands)
        reset_all()
        for c, r in zip(cands, recs):
            r.update(n_tensors=n, n_params=sum(p.numel() for p in params))
            out.append(_finish(cfg, r, c, nbytes, probe))
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
