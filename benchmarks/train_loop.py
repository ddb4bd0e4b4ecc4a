"""The ``train_loop`` suite: a real model driven by the common SAM wrappers' documented loop.

    loss_fn(model(x), y).backward()
    opt.step(closure)          # closure: loss, backward, return loss
    opt.zero_grad()

fastperturb's SAM and pytorch-optimizer's SAM run this same loop on copies of one real
model built here (an MLP and a small ResNet-style CNN; forward and backward included),
interleaved round-robin in one run.
Reported per implementation: forward/backward passes per step (counted by a forward
hook on the model, so the caller's pass and the closure's are both seen) and time per
step (median). Target: the same number of passes, and not slower. For reference, the
same fastperturb optimizer is also timed with its clean-pass convention
(``opt.step(closure)`` alone: K+1 = 2 closure calls, no caller pass).

Run: ``python -m benchmarks --suites train_loop --threads 1`` (``--train-batch``, ``--reps``;
``--quick`` for a smoke run on the MLP).
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, TextIO

import torch
import torch.nn.functional as Fn
from torch import nn

import fastperturb as fp

from . import peers, timing
from .timing import Candidate

SUITE = "train_loop"
MODELS = ("mlp", "resnet")
RHO = 0.05
LR = 0.01


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        out = Fn.relu(self.bn1(self.conv1(x)))
        return Fn.relu(self.bn2(self.conv2(out)) + self.skip(x))


def resnet_cnn(num_classes: int = 10, width: int = 32) -> nn.Module:
    """A small ResNet for 3x32x32 inputs: 3 stages of 2 residual blocks (0.70M
    parameters, 2.8 MB in float32 at width 32)."""
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, 1, 1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        _Block(w, w, 1),
        _Block(w, w, 1),
        _Block(w, 2 * w, 2),
        _Block(2 * w, 2 * w, 1),
        _Block(2 * w, 4 * w, 2),
        _Block(4 * w, 4 * w, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )


def mlp(num_classes: int = 10, width: int = 1024) -> nn.Module:
    """An MLP on flattened 3x32x32 inputs with GELU and LayerNorm (4.2M parameters,
    17 MB in float32): forward/backward is cheap next to the CNN, so the optimizer's own
    work is a larger share of the step."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 32 * 32, width),
        nn.GELU(),
        nn.LayerNorm(width),
        nn.Linear(width, width),
        nn.GELU(),
        nn.LayerNorm(width),
        nn.Linear(width, num_classes),
    )


BUILDERS = {"mlp": mlp, "resnet": resnet_cnn}


class _PassCounter:
    """Counts the forward passes of a model (a forward pre-hook on the root module) and the
    calls of a step function."""

    def __init__(self, model: nn.Module, step: Callable[[], None]):
        self.passes = self.steps = 0
        self._step = step
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.passes += 1

    def __call__(self) -> None:
        self.steps += 1
        self._step()


def _loops(model: nn.Module, opt, x, y, convention: str) -> Callable[[], None]:
    def closure():
        loss = Fn.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if convention == "documented":  # loss.backward(); opt.step(closure); opt.zero_grad()

        def step():
            Fn.cross_entropy(model(x), y).backward()
            opt.step(closure)
            opt.zero_grad()
    else:  # fastperturb's clean-pass convention: step(closure) alone

        def step():
            opt.step(closure)

    return step


def _impls(base: nn.Module, x, y) -> list:
    """(impl, kind, convention, model, step function)."""
    out = []
    m = copy.deepcopy(base)
    opt = fp.SAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    out.append(("fastperturb.SAM", "fastperturb", "documented loop", m, _loops(m, opt, x, y, "documented")))
    if peers.pytorch_optimizer_available() is None:
        m = copy.deepcopy(base)
        opt = peers.pytorch_optimizer_sam(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
        out.append(("pytorch-optimizer SAM", "peer", "documented loop", m, _loops(m, opt, x, y, "documented")))
    m = copy.deepcopy(base)
    opt = fp.SAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    out.append(("fastperturb.SAM", "fastperturb", "step(closure) alone", m, _loops(m, opt, x, y, "clean")))
    return out


def run_suite(
    device: torch.device,
    batch: int = 32,
    warmup: int = 2,
    reps: int = 10,
    min_reps: int = 3,
    budget_s: float = 10.0,
    models=MODELS,
    progress: Optional[Callable[[str], None]] = None,
) -> list:
    """Records (see :mod:`.report`) with ``passes_per_step`` added."""
    out = []
    for model_name in models:
        if model_name not in BUILDERS:
            raise ValueError(f"unknown {SUITE} model {model_name!r}: use one of {', '.join(BUILDERS)}")
        torch.manual_seed(0)
        base = BUILDERS[model_name]().to(device)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        impls = _impls(base, x, y)
        counters = [_PassCounter(m, fn) for _, _, _, m, fn in impls]
        cands = [Candidate(f"{conv}:{impl}", cnt) for (impl, _, conv, _, _), cnt in zip(impls, counters)]
        timing.run_interleaved(cands, device, warmup=warmup, reps=reps, min_reps=min_reps, budget_s=budget_s)
        nparams = sum(p.numel() for p in base.parameters())
        if peers.pytorch_optimizer_available() is not None:
            out.append(
                dict(
                    suite=SUITE,
                    model=model_name,
                    case="SAM",
                    impl="pytorch-optimizer SAM",
                    kind="peer",
                    status="skipped",
                    reason=peers.pytorch_optimizer_available(),
                )
            )
        for (impl, kind, conv, _, _), cand, cnt in zip(impls, cands, counters):
            rec = dict(
                suite=SUITE,
                model=model_name,
                case="SAM",
                impl=impl,
                kind=kind,
                convention=conv,
                n_params=nparams,
                batch=batch,
                status="ok",
                reason=None,
            )
            if cand.error:
                rec.update(status="error", reason=cand.error)
            else:
                rec.update(timing.summary(cand.times))
                rec["times_s"] = [round(t, 6) for t in cand.times]
                rec["passes_per_step"] = cnt.passes / cnt.steps
            out.append(rec)
        if progress:
            progress(f"{SUITE} {model_name}")
    return out


def suite_train_loop(cfg) -> list:
    """The runner's entry (``cfg`` is :class:`benchmarks.suites.Config`)."""
    return run_suite(
        cfg.device,
        batch=cfg.train_batch,
        warmup=cfg.warmup,
        reps=cfg.reps,
        min_reps=cfg.min_reps,
        budget_s=max(cfg.budget_s, 60.0),
        models=cfg.models.get(SUITE, MODELS),
        progress=cfg.progress,
    )


def targets(results: list) -> list:
    """The issue's goals for this suite: the same passes as pytorch-optimizer's SAM, not slower."""
    out = []
    for model in dict.fromkeys(r["model"] for r in results if r["suite"] == SUITE):
        ok = {
            r["impl"]: r
            for r in results
            if r["suite"] == SUITE
            and r["model"] == model
            and r["status"] == "ok"
            and r.get("convention") == "documented loop"
        }
        mine, peer = ok.get("fastperturb.SAM"), ok.get("pytorch-optimizer SAM")
        both = mine is not None and peer is not None
        out.append(
            {
                "name": f"documented SAM loop on {model}: passes per step, fastperturb minus pytorch-optimizer",
                "value": mine["passes_per_step"] - peer["passes_per_step"] if both else None,
                "goal": "0",
                "met": (mine["passes_per_step"] == peer["passes_per_step"]) if both else None,
            }
        )
        ratio = peer["median_s"] / mine["median_s"] if both else None
        out.append(
            {
                "name": f"documented SAM loop on {model}: speedup vs pytorch-optimizer SAM (whole step)",
                "value": ratio,
                "goal": ">= 1 (not slower)",
                "met": None if ratio is None else ratio >= 1.0,
            }
        )
    return out


def print_table(results: list, out: TextIO) -> None:
    rows = [r for r in results if r["suite"] == SUITE]
    if not rows:
        return
    out.write(
        f"\n== {SUITE} ==  (the common SAM wrappers' loop on a real model, interleaved; "
        "passes = forward/backward per step, counted)\n"
    )
    peers_by_model = {r["model"]: r for r in rows if r["status"] == "ok" and r["kind"] == "peer"}
    header = ["model", "impl", "loop", "passes", "median ms", "min-max ms", "reps", "speedup vs pytorch-optimizer"]
    table = []
    for r in rows:
        if r["status"] != "ok":
            out.write(f"  {r['model']} {r['impl']}: {r['status']}: {r['reason']}\n")
            continue
        peer = peers_by_model.get(r["model"])
        ratio = f"{peer['median_s'] / r['median_s']:.2f}x" if peer and r is not peer else "-"
        table.append(
            [
                r["model"],
                r["impl"],
                r.get("convention", ""),
                f"{r['passes_per_step']:.2f}",
                f"{r['median_s'] * 1e3:.1f}",
                f"{r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}",
                str(r["reps"]),
                ratio,
            ]
        )
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(header)]
    out.write("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "\n")
    for t in table:
        out.write("  ".join(c.ljust(w) for c, w in zip(t, widths)) + "\n")
