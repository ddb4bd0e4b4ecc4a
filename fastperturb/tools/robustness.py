"""``fastperturb robustness``: loss change indicators of a saved model under weight corruption.

Example, on a model the demo trained::

    fastperturb robustness --model fastperturb.tools.demo:DigitsCNN \\
        --weights fastperturb-demo/models/seed0/sgd.pt --data digits --out robustness-sgd

``--model`` is ``package.module:factory`` (called without arguments, then
``--weights`` loads a ``state_dict``), or a file holding a whole pickled
``nn.Module`` or a TorchScript module (a pickle can run code: load only files
you trust). ``--data`` is ``digits`` / ``digits:train`` / ``digits:all`` (the
bundled digits), a ``.pt`` file with ``(inputs, targets)`` or
``{"inputs": ..., "targets": ...}``, or a ``.npz`` with arrays ``inputs`` and
``targets`` (or ``x`` and ``y``). See :mod:`fastperturb.robustness` for the
indicators.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import _args
from ._args import (
    UsageError,
    build_model,
    check_finite,
    check_writable_dir,
    int_list,
    load_module_file,
    load_weights_into,
    nonnegative_eps_list,
    nonnegative_int,
    positive_float,
    write_all,
)

LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss, "nll": F.nll_loss}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="package.module:factory, or a file with a pickled nn.Module / TorchScript"
    )
    p.add_argument("--weights", help="a state_dict file to load into the model")
    p.add_argument(
        "--data", required=True, help="digits[:test|train|all], or a .pt / .npz file with inputs and targets"
    )
    p.add_argument(
        "--loss",
        choices=sorted(LOSSES),
        default="cross_entropy",
        help="loss (mean over the batch)",
    )
    p.add_argument(
        "--eps",
        type=nonnegative_eps_list,
        default=[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1],
        help="comma-separated radii (relative to the weights' norm unless --absolute)",
    )
    p.add_argument("--steps", type=int_list, default=[1, 5], help="adversarial ascent steps, comma-separated")
    p.add_argument(
        "--step-ratio", type=positive_float, default=None, help="ascent step / eps (default 1 for K=1, 1.5/K otherwise)"
    )
    p.add_argument("--norm", choices=("l2", "linf"), default="l2", help="norm the radius is measured in")
    p.add_argument(
        "--scope",
        choices=("layer", "global"),
        default="layer",
        help="a radius per tensor, or one over all corrupted tensors together",
    )
    p.add_argument("--absolute", action="store_true", help="eps is an absolute radius (default: relative to ||w||)")
    p.add_argument(
        "--params", choices=("all", "weights"), default="all", help="corrupt all parameters or only dim>1 tensors"
    )
    p.add_argument("--kinds", default="adversarial,first_order,random", help="comma-separated indicators")
    p.add_argument(
        "--trials", type=_args.trials, default=10, help="random corruptions per eps, in mirrored pairs (even, >= 4)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random corruptions")
    p.add_argument(
        "--batch-size", type=nonnegative_int, default=0, help="evaluate in mini-batches of this size (0: one batch)"
    )
    p.add_argument("--float64", action="store_true", help="evaluate a float64 copy (resolves tiny loss changes)")
    p.add_argument(
        "--train-mode", action="store_true", help="evaluate in train mode (default eval; buffers are restored)"
    )
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--out", help="folder for results.json, results.csv and loss_change.png")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress bars")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress bars")


def load_model(spec: str, weights: str | None) -> nn.Module:
    """``--model`` (a factory, imported from the current directory too, or a module file) plus ``--weights``."""
    if os.path.exists(spec):
        model = load_module_file(spec)
    elif ":" in spec:
        model = build_model(spec)
    else:
        raise UsageError(f"--model {spec}: no such file, and not of the form package.module:factory")
    if weights:
        load_weights_into(model, weights)
    return model


def _read_data_file(spec: str):
    if spec.endswith(".npz"):
        import numpy as np

        try:
            with np.load(spec) as f:
                keys = ("inputs", "targets") if "inputs" in f else ("x", "y")
                if keys[0] not in f or keys[1] not in f:
                    raise UsageError(
                        f"--data {spec}: needs arrays 'inputs' and 'targets' (or 'x' and 'y'), has {list(f.keys())}"
                    )
                return torch.from_numpy(f[keys[0]]), torch.from_numpy(f[keys[1]])
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"--data {spec}: not a readable .npz file ({type(e).__name__}: {e})") from None
    try:
        obj = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(
            f"--data {spec}: not a file written by torch.save nor an .npz "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if isinstance(obj, dict):
        obj = (obj.get("inputs"), obj.get("targets"))
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)):
        raise UsageError(f"--data {spec}: expected (inputs, targets) tensors or a dict with 'inputs' and 'targets'")
    return obj[0], obj[1]


def load_data(spec: str):
    """``--data``: the bundled digits or a file; checked for matching lengths, emptiness and NaN/Inf."""
    if spec.split(":")[0] == "digits":
        from ..data import digits_split, load_digits

        part = spec.partition(":")[2] or "test"
        if part not in ("train", "test", "all"):
            raise UsageError(f"--data {spec}: use digits, digits:test, digits:train or digits:all")
        if part == "all":
            x, y = load_digits()
        else:
            train, test = digits_split()
            x, y = train if part == "train" else test
    elif not os.path.isfile(spec):
        raise UsageError(f"--data {spec}: no such file")
    else:
        x, y = _read_data_file(spec)
    if x.dim() == 0 or y.dim() == 0 or len(x) != len(y):
        raise UsageError(
            f"--data {spec}: {tuple(x.shape)} inputs and {tuple(y.shape)} targets: "
            "expected one target per input along the first dimension"
        )
    if len(y) == 0:
        raise UsageError(f"--data {spec}: the data is empty")
    check_finite(x, "inputs", "--data", spec)
    check_finite(y, "targets", "--data", spec)
    return x, y


def check_fits(model: nn.Module, loss_fn, x, y, spec: str) -> None:
    """One forward and loss on two samples, so a shape or dtype that does not fit fails here, in one line."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            loss = loss_fn(model(x[:2]), y[:2])
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise UsageError(f"--loss: gave {type(loss).__name__} of shape {getattr(loss, 'shape', '?')}, not a scalar")
    except UsageError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"--data {spec}: inputs {tuple(x.shape)} / targets {tuple(y.shape)} {y.dtype} do not fit "
            f"the model and loss ({type(e).__name__}: {msg})"
        ) from None
    finally:
        model.train(was_training)


def main(args) -> int:
    with _args.torch_threads(args.threads):
        return _run(args)


def _run(args) -> int:
    from ..robustness import KINDS, sweep

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise UsageError(
            f"--kinds {args.kinds}: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(KINDS)}"
        )
    if args.out:
        check_writable_dir(args.out)  # before the work, not after it
    model = load_model(args.model, args.weights)
    x, y = load_data(args.data)
    if not any(True for _ in model.parameters()):
        raise UsageError(f"--model {args.model}: the model has no parameters to corrupt")
    if args.float64:
        model = model.double()
        x = x.double() if x.is_floating_point() else x
    elif x.is_floating_point():
        x = x.to(next(model.parameters()).dtype)
    loss_fn = LOSSES[args.loss]
    check_fits(model, loss_fn, x, y, args.data)
    b = args.batch_size
    data = (x, y) if b <= 0 else [(x[i : i + b], y[i : i + b]) for i in range(0, len(y), b)]
    try:
        res = sweep(
            model,
            loss_fn,
            data,
            args.eps,
            kinds=kinds,
            steps=args.steps,
            step_ratio=args.step_ratio,
            norm=args.norm,
            scope=args.scope,
            relative=not args.absolute,
            params=args.params,
            trials=args.trials,
            seed=args.seed,
            train_mode=args.train_mode,
            progress=args.progress,
        )
    except (ValueError, TypeError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    print(res.table())
    print(
        "fitted log-log slopes (small-eps half of the grid): "
        + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in res.slopes().items())
    )
    for series, why in res.slope_gaps().items():
        print(f"  {series} -: {why}; --float64, more --trials (random) or larger eps resolve smaller changes")
    if args.out:
        write_all(
            args.out,
            {
                "results.json": res.to_json,
                "results.csv": res.to_csv,
                "loss_change.png": lambda path: res.plot(path, title=os.path.basename(args.model)),
            },
        )
        print(f"wrote results.json, results.csv and loss_change.png in {args.out}")
    return 0
