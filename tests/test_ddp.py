"""DistributedDataParallel: two gloo processes, each on half of the global batch, follow
the trajectory of one process on the whole batch, and hold bit-identical weights."""

from __future__ import annotations

import datetime
import gc
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from spawned import exit_without_teardown
from torch import nn

import fastperturb as fp
from fastperturb.ops.dispatch import why_unavailable

WORLD = 2
STEPS = 3
BACKENDS = [b for b in ("reference", "cpp") if why_unavailable(b, torch.device("cpu")) is None]

PRESETS = {
    "sam": lambda ps: fp.SAM(ps, torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9),
    "awp": lambda ps: fp.AWP(ps, torch.optim.SGD, gamma=0.05, steps=2, lr=0.1, momentum=0.9),
    "apd": lambda ps: fp.APD(ps, torch.optim.AdamW, eps=0.1, steps=2, lr=0.01, max_grad_norm=1.0),
    "apd_bucket_view": lambda ps: fp.APD(ps, torch.optim.SGD, eps=0.1, steps=2, lr=0.1, momentum=0.9),
    # the SAM family (3 steps: LookSAM k=2 refreshes, reuses, refreshes)
    "gsam": lambda ps: fp.GSAM(ps, torch.optim.SGD, rho_max=0.2, rho_min=0.05, alpha=0.4, lr=0.1, momentum=0.9),
    "wsam": lambda ps: fp.WSAM(ps, torch.optim.AdamW, rho=0.2, gamma=0.8, lr=0.01),
    "looksam": lambda ps: fp.LookSAM(ps, torch.optim.SGD, rho=0.2, k=2, lr=0.1, momentum=0.9),
    "fsam": lambda ps: fp.FriendlySAM(ps, torch.optim.SGD, rho=0.2, sigma=0.5, lr=0.1, momentum=0.9),
}
# The family's float32 coefficients (lincomb_) may round to the neighbouring float32 when the averaged
# gradient differs from the single process's in its last bits: 6e-8 relative of one term.
TOLERANCE = {"gsam": 1e-8, "wsam": 1e-8, "looksam": 1e-8, "fsam": 1e-8}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def global_batch(step: int):
    g = torch.Generator().manual_seed(50 + step)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)


def train(preset: str, model: nn.Module, module: nn.Module, rank: int = 0, world: int = 1) -> list:
    opt = PRESETS[preset](module.parameters())
    for s in range(STEPS):
        x, y = global_batch(s)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]

        def closure():
            loss = ((module(x) - y) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        assert not opt.last_step_skipped
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    ddp = model = None
    failure, done = None, False
    try:
        results = {}
        for backend in BACKENDS:
            with fp.use_backend(backend):
                for preset in PRESETS:
                    model = make_model()
                    # grads as views into DDP's buckets: the in-place zeroing must keep them so
                    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=preset.endswith("view"))
                    results[(backend, preset)] = train(preset, model, ddp, rank, WORLD)
                    # Freed while the group lives (a hang seen once at this process's exit): the last wrapper,
                    # freed after destroy_process_group(), took the group's destructor with it, which joins gloo's
                    # worker thread with the GIL held while that thread needed the GIL to free a tensor of a
                    # finished work. With the wrappers and their buckets gone first, no such tensor is left.
                    ddp = model = None
                    gc.collect()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        done = True
    except Exception:
        # Kept as text and raised once the group is gone: the traceback's frames hold the wrapper (train's locals),
        # which would take the group's destructor with it as above, a hang in place of the failure.
        failure = traceback.format_exc()
    finally:
        ddp = model = None
        gc.collect()
        try:
            if done:
                dist.barrier()
        finally:
            dist.destroy_process_group()
    if failure is not None:
        raise RuntimeError(f"rank {rank} failed:\n{failure}")
    exit_without_teardown()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_two_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for backend in BACKENDS:
            with fp.use_backend(backend):
                for preset in PRESETS:
                    key = (backend, preset)
                    single = train(preset, *(lambda m: (m, m))(make_model()))
                    start = list(make_model().parameters())
                    for a, b in zip(ranks[0][key], ranks[1][key]):
                        assert torch.equal(a, b), key  # every rank perturbs and steps identically
                    for a, b, w in zip(ranks[0][key], single, start):
                        atol = TOLERANCE.get(preset, 1e-12)
                        torch.testing.assert_close(a, b, rtol=1e-10, atol=atol, msg=lambda m: f"{key}: {m}")
                        assert not torch.equal(a, w)
    finally:
        torch.set_num_threads(old)
