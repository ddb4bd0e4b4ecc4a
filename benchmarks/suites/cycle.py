"""The ``cycle`` suite: one perturb-restore cycle per preset, every backend beside the ``foreach`` peer."""

from __future__ import annotations

import torch

from .. import fused, peers, shapes
from ..timing import Candidate
from .common import (
    Config,
    _costs,
    _finish,
    _param_bytes,
    _record,
    _say,
    _skipped,
    fastperturb_backends,
    make_params,
    run_bounded,
)


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

#: The row of the C++ SAM cycle on one tensor holding as many elements as a list of many tensors: the same
#: bytes in one stream, timed in the same rounds, so the share of a list's time due to its tensor count shows.
ONE_TENSOR = "fastperturb[cpp], the same bytes as one tensor"
#: Lists of at least this many tensors get that row.
ONE_TENSOR_MIN_TENSORS = 100


class _OneTensorCycle:
    """The engine's cycle (C++) on one float32 tensor of ``numel`` elements, its gradient set before each call."""

    def __init__(self, preset: fused.Preset, numel: int, device):
        (self.param,), (pre,) = make_params([(numel,)], device)
        self.grad, self.pre = self.param.grad, pre[0]
        self.cycle = fused.FusedCycle(preset, [self.param], "cpp")
        self.run = self.cycle.run

    def refresh(self) -> None:
        self.grad.copy_(self.pre)


def _one_tensor_cycle(cfg: Config, preset: fused.Preset, params) -> "_OneTensorCycle | None":
    if len(params) < ONE_TENSOR_MIN_TENSORS or not any(b == "cpp" and not why for b, why in fastperturb_backends(cfg)):
        return None
    return _OneTensorCycle(preset, sum(p.numel() for p in params), cfg.device)


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
            recs.append(
                _record(
                    "cycle",
                    model,
                    label,
                    f"fastperturb[{b}]",
                    "reference" if b == "reference" else "fastperturb",
                    passes=fused.cycle_passes(preset),
                )
            )
            objs.append(fc)
        fe = _foreach_cycle(preset, params)
        cands.append(Candidate("foreach", fe.cycle, refresh))
        recs.append(_record("cycle", model, label, "foreach", "foreach", passes=fused.cycle_passes(preset)))
        objs.append(fe)
        one = _one_tensor_cycle(cfg, preset, params) if cname == "SAM" else None
        if one is not None:
            cands.append(Candidate(ONE_TENSOR, one.run, one.refresh))
            recs.append(_record("cycle", model, label, ONE_TENSOR, "baseline", passes=fused.cycle_passes(preset)))
            objs.append(one)
        probe = run_bounded(cfg, cands)
        for c, r, o in zip(cands, recs, objs):
            r.update(n_tensors=1 if o is one else len(params), n_params=sum(p.numel() for p in params))
            out.append(_finish(cfg, r, c, nbytes, probe))
            if r["kind"] != "reference":  # the slow spec: its costs are not the point, its time is
                if o is one:  # its own tensor and buffers
                    _costs(cfg, r, c.fn, one.refresh, [one.param], state_obj=one.cycle)
                else:
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
