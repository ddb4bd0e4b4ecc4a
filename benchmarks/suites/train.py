"""The ``train`` suite: a real training step of a small CNN, and the perturbation's share of it."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as Fn
from torch import nn

from .. import fused, peers, shapes, timing
from ..timing import Candidate
from .common import Config, _finish, _record, _say, _skipped


def small_cnn(num_classes: int = 10) -> nn.Module:
    """The train suite's model: a small CNN for 3x32x32 inputs (about 100k parameters)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
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
                fe = peers.ForeachAPD(
                    ps, preset.radius, k, preset.step_size, preset.spec.include_clean, base=torch.optim.SGD(ps, lr=0.01)
                )
                entries.append(("foreach.APD", "foreach", label, k, _train_step(fe, c, k)))
                m = copy.deepcopy(base_model)
                c = closure_for(m)
                dc = peers.DeepCopyAPD(
                    list(m.parameters()),
                    torch.optim.SGD,
                    eps=preset.radius,
                    steps=k,
                    eta=preset.step_size,
                    include_clean=preset.spec.include_clean,
                    lr=0.01,
                )
                entries.append(("deep-copy APD", "peer", label, k, _train_step(dc, c, k)))
        cands = [Candidate(f"{case}:{impl}", fn) for impl, kind, case, k, fn in entries]
        timing.run_interleaved(
            cands, cfg.device, warmup=cfg.warmup, reps=cfg.reps, min_reps=cfg.min_reps, budget_s=cfg.budget_s
        )
        med = {c.name: (statistics_median(c.times) if c.times else None) for c in cands}
        t_fb = med["plain:forward/backward"]
        t_plain = med["plain:SGD (no perturbation)"]
        nparams = sum(p.numel() for p in base_model.parameters())
        for (impl, kind, case, k, _fn), c in zip(entries, cands):
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
    raise shapes.UnknownModel(
        f"unknown train model {name!r}: use 'cnn' or pkg.module:factory (3x32x32 input, 10 classes)"
    )


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
