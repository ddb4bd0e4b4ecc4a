"""``fastperturb bench``: your model's training step with fastperturb's presets, against the plain step.

Example::

    fastperturb bench --model mypkg.models:build_net --input-shape 3,32,32 --batch-size 64

Builds the model from ``--model package.module:factory`` (imported from the current directory too), feeds
it a random batch of ``--input-shape`` samples (Gaussian floats, or token ids below ``--vocab``) and times,
interleaved round-robin so load drift hits all alike, one training step of each configuration: the plain
base optimizer step (forward, backward, ``step()``) and each preset's ``step(closure)``. Reported per
configuration: median time per step (min-max), forward/backward passes per step, time relative to the
plain step, the peak of memory allocated during a step above what was allocated before it, and the
optimizer's persistent state. The comparison with other projects' implementations of SAM, AWP and APD
is the repository's benchmark runner (``python -m benchmarks``), not this tool.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
import types
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _args
from ._args import UsageError, build_model, check_writable_file, nonnegative_int, positive_int, shape, write_all

PRESETS = ("SAM", "ASAM", "AWP", "APD")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="package.module:factory returning your nn.Module")
    p.add_argument("--input-shape", required=True, type=shape, help="one sample's shape, e.g. 3,32,32")
    p.add_argument("--batch-size", type=positive_int, default=32, help="samples per timed step")
    p.add_argument(
        "--vocab",
        type=positive_int,
        default=None,
        help="inputs are token ids below this (int64) instead of Gaussian floats",
    )
    p.add_argument(
        "--loss",
        choices=("cross_entropy", "mse"),
        default="cross_entropy",
        help="cross_entropy against random classes of the output's last dimension, or mse against "
        "random targets of the output's shape",
    )
    p.add_argument("--base", choices=("sgd", "adamw"), default="sgd", help="base optimizer (with momentum 0.9 for sgd)")
    p.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated, from {', '.join(PRESETS)}")
    p.add_argument("--apd-steps", type=positive_int, default=3, help="K of APD")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps per configuration first")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation and the random inputs")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")


def _presets(names: list[str], apd_steps: int) -> dict[str, tuple[str, dict]]:
    """name -> (label, keyword arguments of fastperturb.<name>)."""
    table = {
        "SAM": ("SAM rho=0.05", {"rho": 0.05}),
        "ASAM": ("ASAM rho=0.5 eta=0.01", {"rho": 0.5, "eta": 0.01}),
        "AWP": ("AWP gamma=5e-3", {"gamma": 5e-3}),
        "APD": (f"APD eps=1e-3 K={apd_steps}", {"eps": 1e-3, "steps": apd_steps}),
    }
    return {n: table[n] for n in names}


def _device(text: Optional[str]) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text}: not a device; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {text}: use cpu or cuda")
    return dev


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def quiet_fd2() -> Iterator[None]:
    """The profiler's C++ side logs a line to fd 2 at each start and stop: send them to /dev/null
    (no-op where fd 2 cannot be duplicated). The benchmark runner's allocation counter uses it too."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_step_bytes(fn: Callable[[], object], device: torch.device) -> tuple[Optional[int], Optional[str]]:
    """Peak bytes allocated during ``fn()`` above what was allocated before it, or (None, why not). On CPU ``fn``
    runs twice (the first call unmeasured)."""
    if device.type == "cuda":
        _sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - start, None
    try:  # CPU: the profiler's allocation events (a private API; may change between torch releases)
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile, record_function

        # The profiler sees no free of a block allocated before it started: a step that frees the last step's
        # gradients (releasing them) would count the new ones and not the old ones' release. So one step runs
        # under the profiler first, and the peak is read over the second, whose frees are all of blocks seen.
        with quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
            with record_function(_MEASURED):
                fn()
        events, window = [], None
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            if e.tag == _EventType.Allocation:
                events.append((e.start_time_ns, e.extra_fields.alloc_size))
            elif e.name == _MEASURED:
                window = (e.start_time_ns, e.end_time_ns)
            stack.extend(e.children)
        if window is None:
            raise LookupError(_MEASURED)
    except Exception as e:
        return None, f"the profiler's allocation events are unavailable ({type(e).__name__})"
    live = peak = 0
    for t, size in sorted(events):
        if window[0] <= t <= window[1]:
            live += size
            peak = max(peak, live)
    return peak, None


_MEASURED = "fastperturb.bench: the measured step"


def state_bytes(opt: torch.optim.Optimizer, model: nn.Module) -> int:
    """Bytes of the tensors the optimizer keeps between steps (not the parameters or their gradients)."""
    skip = set()
    for p in model.parameters():
        skip.add(p.untyped_storage().data_ptr())
        if p.grad is not None:
            skip.add(p.grad.untyped_storage().data_ptr())
    seen_obj, seen_st, total = set(), set(), 0
    stack: list = [opt]
    while stack:
        o = stack.pop()
        if id(o) in seen_obj or isinstance(
            o, (nn.Module, type, types.ModuleType, types.FunctionType, types.MethodType)
        ):
            continue
        seen_obj.add(id(o))
        if isinstance(o, Tensor):
            ptr = o.untyped_storage().data_ptr()
            if ptr and ptr not in skip and ptr not in seen_st:
                seen_st.add(ptr)
                total += o.untyped_storage().nbytes()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set)):
            stack.extend(o)
        elif hasattr(o, "__dict__"):
            stack.append(vars(o))
    return total


class _Config:
    """One configuration to time: its own copy of the model, its optimizer and its step."""

    def __init__(self, label: str, model: nn.Module, make_opt, x: Tensor, y: Tensor, loss_fn, perturbs: bool):
        self.label, self.model, self.x, self.y, self.loss_fn = label, model, x, y, loss_fn
        self.opt = make_opt(list(model.parameters()))
        self.passes = 0
        self.passes_per_step: Optional[int] = None  # counted at the first step, warm-up or timed
        self.perturbs = perturbs
        self.times: list[float] = []

    def closure(self) -> Tensor:
        self.passes += 1
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        return loss

    def step(self) -> None:
        if self.passes_per_step is not None:
            self._step()
            return
        before = self.passes
        try:
            self._step()
        except (TypeError, ValueError) as e:  # the library refuses the model (a sparse gradient, say)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"{self.label} cannot step this model: {msg}") from None
        self.passes_per_step = self.passes - before

    def _step(self) -> None:
        if self.perturbs:
            self.opt.step(self.closure)  # zeroes the gradients before each pass itself
        else:
            self.opt.zero_grad(set_to_none=False)
            self.closure()
            self.opt.step()


def _batch(model: nn.Module, args, device: torch.device) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    size = (args.batch_size, *args.input_shape)
    if args.vocab:
        x = torch.randint(0, args.vocab, size, generator=gen).to(device)
    else:  # in the model's own precision: a float64 or bf16 model gets a float64 or bf16 batch
        dtype = next((t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
        x = torch.randn(size, generator=gen).to(device=device, dtype=dtype)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(
            f"--input-shape {','.join(map(str, args.input_shape))}: the model's forward fails on a "
            f"batch of {tuple(x.shape)} ({type(e).__name__}: {msg})"
        ) from None
    if not isinstance(out, Tensor) or not out.is_floating_point():
        raise UsageError(
            f"--model {args.model}: the forward returns {type(out).__name__}, not a float tensor "
            "(wrap the model so it returns the output the loss uses)"
        )
    if args.loss == "cross_entropy":
        if out.dim() != 2:
            raise UsageError(
                f"--loss cross_entropy: the model's output is {tuple(out.shape)}, not (batch, classes); use --loss mse"
            )
        y = torch.randint(0, out.shape[1], (out.shape[0],), generator=gen).to(device)
    else:
        y = torch.randn(out.shape, generator=gen).to(device=device, dtype=out.dtype)
    return x, y


def main(args) -> int:
    with _args.torch_threads(args.threads):
        return _run(args)


def _run(args) -> int:
    import fastperturb as fp

    names = [n.strip().upper() for n in args.presets.split(",") if n.strip()]
    bad = [n for n in names if n not in PRESETS]
    if bad or not names:
        raise UsageError(
            f"--presets {args.presets}: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(PRESETS)}"
        )
    if args.json is not None:
        check_writable_file(args.json, "--json")
    device = _device(args.device)
    torch.manual_seed(args.seed)
    base_model = build_model(args.model).to(device)
    params = [p for p in base_model.parameters() if p.requires_grad]
    if not params:
        raise UsageError(f"--model {args.model}: the model has no trainable parameters")
    x, y = _batch(base_model, args, device)
    loss_fn = F.cross_entropy if args.loss == "cross_entropy" else F.mse_loss
    base_cls = torch.optim.SGD if args.base == "sgd" else torch.optim.AdamW
    base_kw = {"lr": 1e-3, "momentum": 0.9} if args.base == "sgd" else {"lr": 1e-3}

    configs = [
        _Config(
            f"{base_cls.__name__} (plain step)",
            copy.deepcopy(base_model),
            lambda ps: base_cls(ps, **base_kw),
            x,
            y,
            loss_fn,
            perturbs=False,
        )
    ]
    for name, (label, kw) in _presets(names, args.apd_steps).items():
        cls = getattr(fp, name)
        configs.append(
            _Config(
                label,
                copy.deepcopy(base_model),
                lambda ps, cls=cls, kw=kw: cls(ps, base_cls, **kw, **base_kw),
                x,
                y,
                loss_fn,
                True,
            )
        )
    del base_model

    for c in configs:  # warm-up; the first step also counts the passes and refuses what cannot step
        for _ in range(args.warmup):
            c.step()
    for r in range(args.steps):  # round-robin, the starting configuration rotating
        for c in configs[r % len(configs) :] + configs[: r % len(configs)]:
            _sync(device)
            t0 = time.perf_counter()
            c.step()
            _sync(device)
            c.times.append(time.perf_counter() - t0)

    n_params = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    plain = statistics.median(configs[0].times)
    rows = []
    for c in configs:
        peak, why = peak_step_bytes(c.step, device)
        med = statistics.median(c.times)
        rows.append(
            {
                "config": c.label,
                "passes": c.passes_per_step,
                "median_s": med,
                "min_s": min(c.times),
                "max_s": max(c.times),
                "steps": len(c.times),
                "x_plain": med / plain,
                "peak_step_bytes": peak,
                "peak_note": why,
                "state_bytes": state_bytes(c.opt, c.model),
            }
        )
    env = {
        "model": args.model,
        "n_params": n_params,
        "n_tensors": len(params),
        "param_bytes": param_bytes,
        "batch": [args.batch_size, *args.input_shape],
        "base": base_cls.__name__,
        "loss": args.loss,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "backend": fp.get_backend(),
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpus": os.cpu_count(),
    }
    _print(env, rows)
    if args.json is not None:
        folder, name = os.path.split(os.path.abspath(args.json))
        write_all(folder, {name: lambda path: _write_json(path, {"env": env, "rows": rows})}, "--json")
        print(f"wrote {args.json}")
    return 0


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def _print(env: dict, rows: list[dict]) -> None:
    print(
        f"fastperturb bench: {env['model']}, {env['n_params']:,} parameters in {env['n_tensors']} tensors, "
        f"batch {tuple(env['batch'])}, {env['base']} base, {env['loss']}, {env['device']}, torch {env['torch']}, "
        f"{env['threads']} threads"
    )

    def mb(b):
        return "-" if b is None else f"{b / 1e6:.3g}"

    header = [
        "configuration",
        "passes",
        "median ms",
        "min-max ms",
        "x plain",
        "peak step MB",
        "state MB",
        "state x params",
    ]
    table = [
        [
            r["config"],
            str(r["passes"]),
            f"{r['median_s'] * 1e3:.2f}",
            f"{r['min_s'] * 1e3:.2f}-{r['max_s'] * 1e3:.2f}",
            f"{r['x_plain']:.2f}x",
            mb(r["peak_step_bytes"]),
            mb(r["state_bytes"]),
            f"{r['state_bytes'] / env['param_bytes']:.2f}x",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for t in table:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(t, widths))))
    print(
        f"{rows[0]['steps']} timed steps each after warm-up, interleaved; passes = forward/backward passes per step; "
        "peak step MB = most memory allocated during one step above what was allocated before it "
        "(activations, gradients, temporaries); state = tensors the optimizer keeps between steps."
    )
    notes = {r["peak_note"] for r in rows if r["peak_note"]}
    for n in notes:
        print(f"peak step MB not measured: {n}")
    noisy = noisy_rows(rows)
    if noisy:
        # (a newcomer read 0.16x off a run whose plain step spread from 16 to 345 ms on a busy machine)
        load = f" (load average {env['load']:.1f} on {env['cpus']} CPUs)" if env.get("load") is not None else ""
        print(
            f"note: the times of {', '.join(noisy)} spread over more than {NOISY_SPREAD:g}x from min to max: the "
            f"machine was busy{load}, so the ratios are not to be read; run again with more --steps on a quiet "
            "machine"
        )


#: max/min of a configuration's step times beyond which the run is called noisy
NOISY_SPREAD = 2.0


def noisy_rows(rows: list[dict]) -> list[str]:
    """The configurations whose step times spread over more than :data:`NOISY_SPREAD` (max / min)."""
    return [r["config"] for r in rows if r["min_s"] > 0 and r["max_s"] / r["min_s"] > NOISY_SPREAD]
