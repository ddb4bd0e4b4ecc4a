"""One spawned run of gloo processes on CPU per test module (``test_fsdp.py``, ``test_tensor_parallel.py``).

Each rank runs the module's scenarios once and saves what it saw (also what it saw before an exception, with the
traceback under ``"error"``); the module's fixture loads every rank's record and its tests check them against
single-process runs made in the test process.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, NoReturn

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: The modules' mark: their runs need torch.distributed with gloo.
needs_gloo = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)
#: How long a module's whole spawned run may take.
SPAWN_TIMEOUT_S = 600

#: A module's scenarios: ``run(rank, out_dir, results)`` fills ``results`` as it goes.
Scenarios = Callable[[int, str, Dict[str, object]], None]


def _rank_main(rank: int, world: int, port: int, out_dir: str, run: Scenarios) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    results: Dict[str, object] = {}
    try:
        run(rank, out_dir, results)
    except BaseException:
        results["error"] = traceback.format_exc()
        raise
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    exit_without_teardown()  # (a failure above raises instead, for mp.spawn to report)


def exit_without_teardown() -> NoReturn:
    """End a gloo rank whose record is saved and whose group is destroyed, skipping the interpreter's teardown:
    there gloo's threads can abort the process ("terminate called without an active exception", seen in the
    benchmark's FSDP2 child and in this suite's ranks)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(run: Scenarios, world: int, out_dir: Path, timeout_s: float, what: str) -> List[dict]:
    """Spawn ``world`` ranks running ``run`` (a module-level function: the ranks import it by name) and return each
    rank's record; the test fails, naming ``what``, if they have not finished in ``timeout_s``."""
    ctx = mp.spawn(_rank_main, args=(world, _free_port(), str(out_dir), run), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {what} run did not finish in {timeout_s} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
