"""``fastperturb robustness``: loss change indicators of a saved model under weight corruption.

Example, on a model the demo trained::

    fastperturb robustness --model fastperturb.tools.demo:DigitsCNN \\
        --weights fastperturb-demo/models/sgd.pt --data digits --out robustness-sgd

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
import importlib
import os
import zipfile

import torch
import torch.nn.functional as F
from torch import nn

from ._args import int_list, nonnegative_eps_list

LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss, "nll": F.nll_loss}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="package.module:factory, or a file with a pickled nn.Module / TorchScript")
    p.add_argument("--weights", help="a state_dict file to load into the model")
    p.add_argument("--data", required=True, help="digits[:test|train|all], or a .pt / .npz file with inputs and targets")
    p.add_argument("--loss", choices=sorted(LOSSES), default="cross_entropy", help="loss (mean over the batch); default cross_entropy")
    p.add_argument("--eps", type=nonnegative_eps_list, default=[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1],
                   help="comma-separated radii (relative to the weights' norm unless --absolute)")
    p.add_argument("--steps", type=int_list, default=[1, 5], help="adversarial ascent steps, comma-separated (default 1,5)")
    p.add_argument("--step-ratio", type=float, default=None, help="ascent step / eps (default 1 for K=1, 1.5/K otherwise)")
    p.add_argument("--norm", choices=("l2", "linf"), default="l2")
    p.add_argument("--scope", choices=("layer", "global"), default="layer")
    p.add_argument("--absolute", action="store_true", help="eps is an absolute radius (default: relative to ||w||)")
    p.add_argument("--params", choices=("all", "weights"), default="all", help="corrupt all parameters or only dim>1 tensors")
    p.add_argument("--kinds", default="adversarial,first_order,random", help="comma-separated indicators")
    p.add_argument("--trials", type=int, default=10, help="random corruptions per eps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=0, help="evaluate in mini-batches of this size (0: one batch)")
    p.add_argument("--float64", action="store_true", help="evaluate a float64 copy (resolves tiny loss changes)")
    p.add_argument("--train-mode", action="store_true", help="evaluate in train mode (default eval; buffers are restored)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--out", help="folder for results.json, results.csv and loss_change.png")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None)
    g.add_argument("--no-progress", dest="progress", action="store_false")


def load_model(spec: str, weights: str | None) -> nn.Module:
    if ":" in spec and not os.path.exists(spec):
        mod_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise SystemExit(f"--model {spec}: cannot import {attr!r} from {mod_name!r} ({e})")
        model = factory()
    elif os.path.exists(spec):
        is_script = False
        if zipfile.is_zipfile(spec):
            with zipfile.ZipFile(spec) as z:
                is_script = any(n.endswith("constants.pkl") for n in z.namelist())
        model = torch.jit.load(spec, map_location="cpu") if is_script else torch.load(spec, map_location="cpu", weights_only=False)
    else:
        raise SystemExit(f"--model {spec}: no such file, and not of the form package.module:factory")
    if not isinstance(model, nn.Module):
        raise SystemExit(f"--model {spec} gave a {type(model).__name__}, not an nn.Module")
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model


def load_data(spec: str):
    if spec.split(":")[0] == "digits":
        from ..data import digits_split, load_digits

        part = spec.partition(":")[2] or "test"
        if part == "all":
            return load_digits()
        if part not in ("train", "test"):
            raise SystemExit(f"--data {spec}: use digits, digits:test, digits:train or digits:all")
        train, test = digits_split()
        return train if part == "train" else test
    if not os.path.exists(spec):
        raise SystemExit(f"--data {spec}: no such file")
    if spec.endswith(".npz"):
        import numpy as np

        with np.load(spec) as f:
            keys = ("inputs", "targets") if "inputs" in f else ("x", "y")
            if keys[0] not in f or keys[1] not in f:
                raise SystemExit(f"--data {spec}: needs arrays 'inputs' and 'targets' (or 'x' and 'y'), has {list(f.keys())}")
            return torch.from_numpy(f[keys[0]]), torch.from_numpy(f[keys[1]])
    obj = torch.load(spec, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        obj = (obj.get("inputs"), obj.get("targets"))
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)):
        raise SystemExit(f"--data {spec}: expected (inputs, targets) tensors or a dict with 'inputs' and 'targets'")
    return obj[0], obj[1]


def main(args) -> int:
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    from ..robustness import sweep

    model = load_model(args.model, args.weights)
    x, y = load_data(args.data)
    if args.float64:
        model = model.double()
        x = x.double()
    elif x.is_floating_point():
        x = x.to(next(model.parameters()).dtype) if any(True for _ in model.parameters()) else x
    if len(y) == 0:
        raise SystemExit(f"--data {args.data}: the data is empty")
    data = (x, y) if args.batch_size <= 0 else [(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, len(y), args.batch_size)]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    try:
        res = sweep(model, LOSSES[args.loss], data, args.eps, kinds=kinds, steps=args.steps, step_ratio=args.step_ratio,
                    norm=args.norm, scope=args.scope, relative=not args.absolute, params=args.params, trials=args.trials,
                    seed=args.seed, train_mode=args.train_mode, progress=args.progress)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"fastperturb robustness: {e}")
    print(res.table())
    print("fitted log-log slopes (small-eps half of the grid): "
          + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in res.slopes().items()))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        res.to_json(os.path.join(args.out, "results.json"))
        res.to_csv(os.path.join(args.out, "results.csv"))
        res.plot(os.path.join(args.out, "loss_change.png"), title=os.path.basename(args.model))
        print(f"wrote results.json, results.csv and loss_change.png in {args.out}")
    return 0
