"""Checkpoint/resume: stopping, saving, and resuming in a fresh process follows the
bit-identical trajectory of a run that never stopped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import fastperturb as fp

REPO = Path(__file__).resolve().parents[1]
TOTAL, STOP = 6, 3

PRESETS = {
    "sam_sgd": lambda ps: fp.SAM(ps, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "apd_adamw": lambda ps: fp.APD(ps, torch.optim.AdamW, eps=0.05, steps=2, lr=0.01, max_grad_norm=1.0),
    "awp_sgd_nesterov": lambda ps: fp.AWP(
        ps, torch.optim.SGD, gamma=0.01, steps=2, lr=0.1, momentum=0.9, nesterov=True
    ),
}


def build(preset: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3))
    opt = PRESETS[preset](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def train(preset: str, stop: int, ckpt_in: str | None = None, ckpt_out: str | None = None) -> list:
    """Run steps up to ``stop`` (resuming from ``ckpt_in``), optionally save a checkpoint."""
    torch.set_num_threads(1)
    model, opt, sched = build(preset)
    start = 0
    if ckpt_in:
        ck = torch.load(ckpt_in, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start = ck["step"]
    for s in range(start, stop):
        g = torch.Generator().manual_seed(1000 + s)
        x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)

        def closure():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        sched.step()
    if ckpt_out:
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": stop}, ckpt_out
        )
    return [t.detach().clone() for t in model.state_dict().values()]


def resume_all(tests_dir: str, ckpt_dir: str) -> None:
    """Child process: resume every preset from its checkpoint and save the end weights."""
    for preset in PRESETS:
        out = train(preset, TOTAL, ckpt_in=os.path.join(ckpt_dir, f"{preset}.pt"))
        torch.save(out, os.path.join(ckpt_dir, f"{preset}.resumed.pt"))


def test_resume_in_fresh_process_is_bit_identical(backend, tmp_path):
    old = torch.get_num_threads()
    full, halfway = {}, {}
    try:
        for preset in PRESETS:
            full[preset] = train(preset, TOTAL)
            halfway[preset] = train(preset, STOP, ckpt_out=str(tmp_path / f"{preset}.pt"))
    finally:
        torch.set_num_threads(old)
    code = "import sys; sys.path.insert(0, sys.argv[1]); import test_optim_resume as t; t.resume_all(*sys.argv[1:])"
    env = dict(os.environ, FASTPERTURB_BACKEND=backend, PYTHONPATH=str(REPO))
    subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path)],
        cwd=REPO,
        env=env,
        check=True,
        timeout=300,
    )
    for preset in PRESETS:
        resumed = torch.load(tmp_path / f"{preset}.resumed.pt", weights_only=True)
        assert len(resumed) == len(full[preset])
        for a, b in zip(full[preset], resumed):
            assert torch.equal(a, b), preset
        # control: the checkpoint is not the end point (the resumed process did real steps)
        assert any(not torch.equal(a, b) for a, b in zip(full[preset], halfway[preset]))


def test_wrapper_follows_the_base_optimizers_loaded_groups():
    """Loading through the base optimizer (as torch.distributed.checkpoint's set_optimizer_state_dict does
    when given opt.base_optimizer) replaces its param_groups list: the wrapper and an LR scheduler on the
    wrapper must see the loaded groups, not the old ones."""
    model = torch.nn.Linear(3, 2)
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    sd = opt.base_optimizer.state_dict()
    sd["param_groups"][0]["lr"] = 0.05
    sd["param_groups"][0]["rho"] = 0.3
    opt.base_optimizer.load_state_dict(sd)
    assert opt.param_groups is opt.base_optimizer.param_groups and opt.state is opt.base_optimizer.state
    assert opt.param_groups[0]["rho"] == 0.3
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(4, 3)

    def closure():
        loss = model(x).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.025
