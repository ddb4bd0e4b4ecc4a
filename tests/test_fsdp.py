"""FSDP2 (``torch.distributed.fsdp.fully_shard``): two gloo processes on CPU, each holding a shard of
every parameter and half of the global batch, follow the trajectory of one process on the whole batch.

One spawned run (a module fixture) goes through every scenario and saves what each rank saw; the
tests below check those records against single-process runs made here. The model has awkward
shards: a weight of 7 rows over 2 ranks (4 + 3), 1-D biases, a weight and a bias with one row (rank
1 holds empty shards), and a plain (unsharded) scalar parameter whose gradient the closure averages
itself, as users do for parameters outside FSDP.

Tolerance of the comparisons with one process (float64 models): ``atol=1e-8``. The fused ops return
their per-tensor statistics in float32 (the op contract) and the step coefficients derived from
them (r/||g||, the projection scale, relative radii) are float32. Two ranks form those statistics
from per-shard partial sums, one process from per-tensor sums, so a coefficient may round to the
neighbouring float32 (2**-24 relative): the perturbation then moves by at most ~6e-8 of its length
(<= 0.05 * ||w|| here), i.e. ~6e-9, and after three steps the weights differ by a few 1e-9 (measured
at most 2.2e-9). Everything else is float64. A missing cross-rank reduction (a shard's norm taken
for the tensor's) changes the weights by more than 1e-4.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from spawned import SPAWN_TIMEOUT_S, needs_gloo, run_ranks
from torch import nn

import fastperturb as fp
from fastperturb.distributed import local
from fastperturb.ops.dispatch import why_unavailable

pytestmark = needs_gloo

WORLD = 2
STEPS = 3
ATOL = 1e-8
BACKENDS = [b for b in ("reference", "cpp") if why_unavailable(b, torch.device("cpu")) is None]

PRESETS = {
    # SAM: one step along the global gradient direction (scope "global")
    "sam": lambda ps: fp.SAM(ps, torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9),
    # AWP: per-layer relative radius gamma * ||w_l||, only tensors with dim() > 1 (biases, scale passive)
    "awp": lambda ps: fp.AWP(ps, torch.optim.SGD, gamma=0.05, lr=0.1, momentum=0.9),
    # APD, L2: two projected steps in the global ball, clean term, clipped descent gradient
    "apd_l2": lambda ps: fp.APD(ps, torch.optim.SGD, eps=0.1, steps=2, lr=0.1, momentum=0.9, max_grad_norm=0.05),
    # APD, L-infinity: three steps, per-layer boxes relative to max|w_l| (a max across shards), AdamW
    "apd_linf": lambda ps: fp.APD(
        ps, torch.optim.AdamW, eps=0.02, steps=3, norm="linf", scope="layer", relative=True, lr=0.01
    ),
}
# SAM driven by the common loop (g_0 from the caller's backward) and by first_step()/second_step()
VARIANTS = [(p, "closure") for p in PRESETS] + [("sam", "loop"), ("sam", "two_step"), ("sam", "zeroed")]
# Presets whose relative radius costs a collective of its own: AWP (l2) measures the weights with g_0 in
# one pass (dot_stats) and one all_gather; APD-linf's max |w| is a separate reduction.
RELATIVE = {"sam": False, "awp": False, "apd_l2": False, "apd_linf": True}
ASCENTS = {"sam": 1, "awp": 1, "apd_l2": 2, "apd_linf": 3}

# The SAM family (fastperturb/optim/family.py): their statistics (dot products, the norms of formed
# vectors) are per-tensor shard sums completed by the cycle's reducer. 4 steps: LookSAM (k=2) takes
# refresh, reuse, refresh, reuse. Collectives per step outside the closure, as designed: one per
# statistic (pass 0; GSAM's and LookSAM's <g,g1>; WSAM's ||g1-g||; LookSAM's ||gv||) plus the descent
# gradient's norm.
FAMILY = {
    "gsam": lambda ps: fp.GSAM(ps, torch.optim.SGD, rho_max=0.2, rho_min=0.2, alpha=0.4, lr=0.1, momentum=0.9),
    "wsam": lambda ps: fp.WSAM(ps, torch.optim.SGD, rho=0.2, gamma=0.8, lr=0.1, momentum=0.9),
    "looksam": lambda ps: fp.LookSAM(ps, torch.optim.AdamW, rho=0.2, k=2, alpha=0.7, lr=0.01),
    "looksam_layer": lambda ps: fp.LookSAM(ps, torch.optim.SGD, rho=0.2, k=2, scope="layer", lr=0.1, momentum=0.9),
    "fsam": lambda ps: fp.FriendlySAM(ps, torch.optim.SGD, rho=0.2, sigma=0.5, lmbda=0.8, lr=0.1, momentum=0.9),
}
FAMILY_STEPS = 4
# Vanishing gradients on shards (float32): a loss scaled by 2^-85 and an lr scaled by 2^85 take the steps of the
# unscaled run (SAM and AWP through the engine's own checks, the family through its descent rules): the rules are
# equivariant in the gradient's scale, and powers of two keep the scaled gradients exact. That needs the sums of
# squares and inner products of each rank's shards taken again in float64 before the collective (their float32
# squares are subnormal or zero) and a collective that keeps them.
VANISHING_LOG2 = -85
VANISHING = {
    "sam": lambda ps, lr: fp.SAM(ps, torch.optim.SGD, rho=0.2, lr=lr),
    "awp": lambda ps, lr: fp.AWP(ps, torch.optim.SGD, gamma=0.05, lr=lr),  # (one pass over w and g_0)
    "gsam": lambda ps, lr: fp.GSAM(ps, torch.optim.SGD, rho_max=0.2, rho_min=0.2, alpha=0.4, lr=lr),
    "looksam": lambda ps, lr: fp.LookSAM(ps, torch.optim.SGD, rho=0.2, k=2, alpha=0.7, lr=lr),
    "fsam": lambda ps, lr: fp.FriendlySAM(ps, torch.optim.SGD, rho=0.2, sigma=0.5, lmbda=0.8, lr=lr),
}
FAMILY_COLLECTIVES = {
    "gsam": [3] * 4,
    "wsam": [3] * 4,
    "looksam": [4, 2, 4, 2],
    "looksam_layer": [4, 2, 4, 2],
    "fsam": [2] * 4,
}


# ---- the model, the data, one training run (shared by the ranks and the single process) --------------


def make_model(dtype=torch.float64, batchnorm: bool = False):
    """Shards over 2 ranks: 0.weight [7, 5] -> 4 + 3 rows, 0.bias [7] -> 4 + 3, 2.weight [1, 7] and
    2.bias [1] -> 1 + 0 rows; ``scale`` stays a plain tensor (not sharded)."""
    torch.manual_seed(0)
    layers = [nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)]
    model = nn.Sequential(*([nn.BatchNorm1d(5)] if batchnorm else []), *layers).to(dtype)
    scale = nn.Parameter(torch.full((1,), 1.5, dtype=dtype))
    return model, scale


def shard(model: nn.Module, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if any(True for _ in m.parameters(recurse=False)):
            fully_shard(m, **kwargs)
    fully_shard(model, **kwargs)
    return model


def global_batch(step: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(50 + step)
    return torch.randn(16, 5, generator=g, dtype=dtype), torch.randn(16, 1, generator=g, dtype=dtype)


def local_batch(step: int, rank: int, world: int, dtype=torch.float64):
    x, y = global_batch(step, dtype)
    return x.chunk(world)[rank], y.chunk(world)[rank]


def loss_backward(model, scale, x, y, world: int):
    """Forward, backward, and the plain parameter's gradient averaged over ranks (FSDP reduces only
    the parameters it shards)."""
    loss = ((model(x).to(x.dtype) * scale - y) ** 2).mean()  # (bf16 compute returns bf16)
    loss.backward()
    if world > 1 and scale.grad is not None:
        dist.all_reduce(scale.grad)
        scale.grad /= world
    return loss


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def run_steps(opt, model, scale, batches, rank=0, world=1, variant="closure", dtype=torch.float64, on_closure=None):
    """Train on ``batches`` (step indices of the global data) the way ``variant`` says."""
    for s in batches:
        x, y = local_batch(s, rank, world, dtype)

        def closure():
            if on_closure is not None:
                on_closure(+1)
            try:
                return loss_backward(model, scale, x, y, world)
            finally:
                if on_closure is not None:
                    on_closure(-1)

        if variant == "closure":
            opt.step(closure)
        elif variant == "loop":  # the common SAM wrappers' loop: the caller's backward gives g_0
            closure()
            opt.step(closure)
            opt.zero_grad()
        elif variant == "zeroed":  # gradients zeroed in place after a backward: no g_0, the ranks agree on it
            closure()
            model.zero_grad(set_to_none=False)
            scale.grad.zero_()
            opt.step(closure)
        else:  # first_step() / second_step()
            closure()
            opt.first_step()
            closure()
            opt.second_step()
        assert not opt.last_step_skipped, (variant, s)


def vanishing_run(name: str, log2_scale: int, rank: int = 0, world: int = 1) -> list:
    """FAMILY_STEPS steps of ``VANISHING[name]`` on the float32 model, loss scaled by 2^log2_scale."""
    model, scale = make_model(torch.float32)
    if world > 1:
        shard(model)
    params = list(model.parameters()) + [scale]
    opt = VANISHING[name](params, 0.05 * 2.0**-log2_scale)
    for s in range(FAMILY_STEPS):
        x, y = local_batch(s, rank, world, torch.float32)

        def closure():
            loss = ((model(x) * scale - y) ** 2).mean() * 2.0**log2_scale
            loss.backward()
            if world > 1 and scale.grad is not None:
                dist.all_reduce(scale.grad)
                scale.grad /= world
            return loss

        opt.step(closure)
        assert not opt.last_step_skipped, (name, s)
    return [full(p) for p in params]


def single_process(preset: str, variant: str = "closure", batches=range(STEPS), dtype=torch.float64, make=None):
    model, scale = make_model(dtype)
    opt = (make or PRESETS[preset])(list(model.parameters()) + [scale])
    run_steps(opt, model, scale, batches, variant=variant, dtype=dtype)
    return [full(p) for p in list(model.parameters()) + [scale]]


# ---- the spawned run --------------------------------------------------------------------------------


class _CollectiveCounter:
    """Counts the collectives a step issues outside its closure (those are fastperturb's)."""

    NAMES = ("all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "reduce_scatter_tensor")

    def __init__(self):
        self.total = 0
        self.in_closure = 0
        self._depth = 0
        self._saved = {}

    def __enter__(self):
        for name in self.NAMES:
            fn = self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._counting(fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _counting(self, fn):
        def wrapper(*args, **kwargs):
            self.total += 1
            self.in_closure += self._depth > 0
            return fn(*args, **kwargs)

        return wrapper

    def closure_depth(self, delta: int) -> None:
        self._depth += delta

    def outside(self) -> int:
        return self.total - self.in_closure


def _presets(rank: int) -> dict:
    out = {}
    for backend in BACKENDS:
        with fp.use_backend(backend):
            for preset, variant in VARIANTS:
                model, scale = make_model()
                shard(model)
                params = list(model.parameters()) + [scale]
                seen = []
                if preset == "awp":  # record what the filter sees: the DTensor, with its global shape
                    opt = fp.AWP(
                        params,
                        torch.optim.SGD,
                        gamma=0.05,
                        lr=0.1,
                        momentum=0.9,
                        perturb_filter=lambda p: (
                            seen.append((type(p).__name__, tuple(p.shape))) or fp.optim.is_weight_matrix(p)
                        ),
                    )
                else:
                    opt = PRESETS[preset](params)
                calls = []
                for s in range(STEPS):
                    with _CollectiveCounter() as counter:
                        run_steps(opt, model, scale, [s], rank, WORLD, variant, on_closure=counter.closure_depth)
                    calls.append(counter.outside())
                local_bytes = sum(local(p).numel() * p.element_size() for p in params)
                out[(backend, preset, variant)] = {
                    "weights": [full(p) for p in params],
                    "collectives": calls,
                    "filter_saw": seen,
                    "backup_bytes": sum(b.numel() * b.element_size() for b in opt._backups.values()),
                    "accum_bytes": sum(b.numel() * b.element_size() for b in opt._accums.values()),
                    "local_bytes": local_bytes,
                    "buffers_are_shards": all(b.shape == local(p).shape for p, b in opt._backups.items()),
                }
    return out


def _family(rank: int) -> dict:
    out = {}
    for backend in BACKENDS:
        with fp.use_backend(backend):
            for name, make in FAMILY.items():
                model, scale = make_model()
                shard(model)
                params = list(model.parameters()) + [scale]
                opt = make(params)
                calls = []
                for s in range(FAMILY_STEPS):
                    with _CollectiveCounter() as counter:
                        run_steps(opt, model, scale, [s], rank, WORLD, on_closure=counter.closure_depth)
                    calls.append(counter.outside())
                kept = list(getattr(opt, "_gv", {}).items()) + list(getattr(opt, "_ema", {}).items())
                out[(backend, name)] = {
                    "weights": [full(p) for p in params],
                    "collectives": calls,
                    "state_is_shards": bool(kept) == (name != "gsam" and name != "wsam")
                    and all(b.shape == local(p).shape for p, b in kept),
                }
    return out


def _family_vanishing(rank: int) -> dict:
    with fp.use_backend("cpp" if "cpp" in BACKENDS else "reference"):
        return {name: vanishing_run(name, VANISHING_LOG2, rank, WORLD) for name in VANISHING}


def _family_nonfinite(rank: int) -> dict:
    """A NaN in rank 1's shard at step 1 (LookSAM k=2: a reuse step, pass 0; FriendlySAM: pass 1): every
    rank skips, the persistent state (gv and counter, the running mean) stays, training continues."""
    out = {}
    for name, poison_pass in (("looksam", 0), ("fsam", 1)):
        model, scale = make_model()
        shard(model)
        params = list(model.parameters()) + [scale]
        opt = FAMILY[name](params)
        skipped = []
        for s in range(3):
            x, y = local_batch(s, rank, WORLD)
            passes = [0]

            def closure():
                loss = loss_backward(model, scale, x, y, WORLD)
                if rank == 1 and s == 1 and passes[0] == poison_pass:
                    local(model[0].weight.grad).view(-1)[-1] = math.nan
                passes[0] += 1
                return loss

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step(closure)
            skipped.append(opt.last_step_skipped)
        out[name] = {"skipped": skipped, "weights": [full(p) for p in params]}
    return out


def _nonfinite(rank: int) -> dict:
    """NaN written into rank 1's shard only (rows 4..6 of 0.weight): at pass 0 of step 1 (the
    engine's statistics) and at pass 1 of step 2 (the descent gradient's check)."""
    model, scale = make_model()
    shard(model)
    params = list(model.parameters()) + [scale]
    opt = PRESETS["sam"](params)
    poison_at = {1: 0, 2: 1}
    record = {"skipped": [], "unchanged": []}
    for s in range(4):
        x, y = local_batch(s, rank, WORLD)
        before = [local(p).clone() for p in params]
        passes = [0]

        def closure():
            loss = loss_backward(model, scale, x, y, WORLD)
            if rank == 1 and poison_at.get(s) == passes[0]:
                local(model[0].weight.grad).view(-1)[0] = math.nan
            passes[0] += 1
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the once-per-optimizer skip warning
            opt.step(closure)
        record["skipped"].append(opt.last_step_skipped)
        record["unchanged"].append(all(torch.equal(b, local(p)) for b, p in zip(before, params)))
    record["skipped_steps"] = opt.skipped_steps
    record["weights"] = [full(p) for p in params]

    # nonfinite="raise": every rank raises, the weights restored
    model, scale = make_model()
    shard(model)
    params = list(model.parameters()) + [scale]
    opt = fp.SAM(params, torch.optim.SGD, rho=0.2, lr=0.1, nonfinite="raise")
    x, y = local_batch(0, rank, WORLD)
    before = [local(p).clone() for p in params]

    def poisoned():
        loss = loss_backward(model, scale, x, y, WORLD)
        if rank == 1:
            local(model[0].weight.grad).view(-1)[0] = math.inf
        return loss

    try:
        opt.step(poisoned)
        record["raised"] = None
    except FloatingPointError as err:
        record["raised"] = type(err).__name__
    record["raise_unchanged"] = all(torch.equal(b, local(p)) for b, p in zip(before, params))
    return record


def _exception(rank: int) -> dict:
    """APD (2 ascent steps): the closure raises at pass 2 on every rank, after its forward and
    before its backward, the worst moment for FSDP (its modules are left unsharded). The shards
    must be restored bit for bit; after FSDP2's documented recovery (``reset_iter_state()`` on the
    root module) training continues as if the failed step had not happened."""
    model, scale = make_model()
    shard(model)
    params = list(model.parameters()) + [scale]
    opt = PRESETS["apd_l2"](params)
    record = {}
    for s in range(3):
        x, y = local_batch(s, rank, WORLD)
        calls = [0]

        def closure():
            calls[0] += 1
            out = model(x)
            if s == 1 and calls[0] == 3:
                raise KeyError("closure failed")
            loss = ((out * scale - y) ** 2).mean()
            loss.backward()
            dist.all_reduce(scale.grad)
            scale.grad /= WORLD
            return loss

        if s == 1:
            before = [local(p).clone() for p in params]
            try:
                opt.step(closure)
                record["raised"] = False
            except KeyError as err:
                record["raised"] = True
                record["notes"] = list(getattr(err, "__notes__", []))
            record["restored"] = all(torch.equal(b, local(p)) for b, p in zip(before, params))
            model.reset_iter_state()
            opt.zero_grad()
        else:
            opt.step(closure)
    record["weights"] = [full(p) for p in params]
    return record


def _batchnorm(rank: int) -> dict:
    """freeze_bn: the perturbed pass does not move the running statistics (BatchNorm first, so the
    statistics of the clean pass are those of the rank's input batch)."""
    record = {}
    for freeze in (True, False):
        model, scale = make_model(batchnorm=True)
        shard(model)
        params = list(model.parameters()) + [scale]
        opt = fp.SAM(params, torch.optim.SGD, rho=0.2, lr=0.1, freeze_bn=model if freeze else None)
        x, y = local_batch(0, rank, WORLD)
        opt.step(lambda: loss_backward(model, scale, x, y, WORLD))
        bn = model[0]
        expected = nn.BatchNorm1d(5).double()
        expected(x)  # one update with the clean pass's batch
        record[freeze] = {
            "mean_equal": torch.equal(bn.running_mean, expected.running_mean),
            "var_equal": torch.equal(bn.running_var, expected.running_var),
            "batches": int(bn.num_batches_tracked),
        }
    return record


def _dcp(rank: int, out_dir: str) -> dict:
    """torch.distributed.checkpoint with sharded optimizer state: save after 2 steps, train 2 more;
    a fresh model and optimizer (other weights, other lr) load the checkpoint and train the same 2.
    APD through the base optimizer and the wrapper; LookSAM (k=3: the resume's first step reuses gv) and
    FriendlySAM through the wrapper, whose DCP state dict carries their gv and m, nested and flattened."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    makers = {
        "apd": lambda ps, lr: fp.APD(
            ps, torch.optim.AdamW, eps=0.02, steps=3, norm="linf", scope="layer", relative=True, lr=lr
        ),
        "looksam": lambda ps, lr: fp.LookSAM(ps, torch.optim.AdamW, rho=0.2, k=3, alpha=0.7, lr=lr),
        "fsam": lambda ps, lr: fp.FriendlySAM(ps, torch.optim.SGD, rho=0.2, sigma=0.5, lmbda=0.8, lr=lr, momentum=0.9),
    }

    def build(preset, lr):
        model, scale = make_model()
        shard(model)
        scale.requires_grad_(False)  # a constant here: the checkpoint holds the model's sharded state
        return model, scale, makers[preset](model.parameters(), lr)

    record = {}
    # Either the base optimizer (it shares param_groups and state with the wrapper) or the wrapper itself, as
    # Lightning's ModelParallelStrategy passes it (DCP creates a fresh optimizer's state by a step at lr 0).
    cases = [
        ("apd", "base", lambda o: o.base_optimizer, StateDictOptions()),
        ("apd", "wrapper", lambda o: o, StateDictOptions()),
        ("looksam", "wrapper", lambda o: o, StateDictOptions()),
        ("looksam", "flattened", lambda o: o, StateDictOptions(flatten_optimizer_state_dict=True)),
        ("fsam", "wrapper", lambda o: o, StateDictOptions()),
        ("fsam", "flattened", lambda o: o, StateDictOptions(flatten_optimizer_state_dict=True)),
    ]
    for preset, which, target, options in cases:
        path = os.path.join(out_dir, f"dcp-{preset}-{which}")
        model, scale, opt = build(preset, 0.01)
        run_steps(opt, model, scale, range(2), rank, WORLD)
        dcp.save(
            {
                "model": get_model_state_dict(model),
                "optim": get_optimizer_state_dict(model, target(opt), options=options),
            },
            checkpoint_id=path,
        )
        run_steps(opt, model, scale, range(2, 4), rank, WORLD)
        continued = [local(p).clone() for p in model.parameters()]

        model2, scale2, opt2 = build(preset, 0.5)
        with torch.no_grad():
            for p in model2.parameters():
                local(p).normal_()
        state = {
            "model": get_model_state_dict(model2),
            "optim": get_optimizer_state_dict(model2, target(opt2), options=options),
        }
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model2, state["model"])
        set_optimizer_state_dict(model2, target(opt2), state["optim"], options=options)
        lr_loaded = opt2.param_groups[0]["lr"]
        run_steps(opt2, model2, scale2, range(2, 4), rank, WORLD)
        resumed = [local(p).clone() for p in model2.parameters()]
        sharded_keys = ("exp_avg", "exp_avg_sq", "momentum_buffer", "looksam_gv", "fsam_m")
        record[f"{preset}/{which}"] = {
            "bit_identical": all(torch.equal(a, b) for a, b in zip(continued, resumed)),
            "lr_loaded": lr_loaded,
            "state_sharded": all(
                type(v).__name__ == "DTensor"
                for s in state["optim"]["state"].values()
                for k, v in s.items()
                if k in sharded_keys
            )
            if "state" in state["optim"]
            else all(
                type(v).__name__ == "DTensor"
                for k, v in state["optim"].items()
                if k.startswith("state.") and k.rsplit(".", 1)[1] in sharded_keys
            ),
        }
    return record


def _bf16(rank: int) -> dict:
    """FSDP2's MixedPrecisionPolicy: bf16 compute (all-gathered parameters) and bf16 gradient
    reductions over float32 shards. The perturbation is written to the float32 shards; the next
    forward must all-gather it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    out = {}
    for preset in ("sam", "sgd"):
        model, scale = make_model(torch.float32)
        shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16))
        params = list(model.parameters()) + [scale]
        opt = PRESETS["sam"](params) if preset == "sam" else torch.optim.SGD(params, lr=0.1, momentum=0.9)
        for s in range(STEPS):
            x, y = local_batch(s, rank, WORLD, torch.float32)
            closure = lambda: loss_backward(model, scale, x, y, WORLD)  # noqa: E731
            if preset == "sam":
                opt.step(closure)
            else:
                opt.zero_grad()
                closure()
                opt.step()
        out[preset] = {
            "weights": [full(p) for p in params],
            "dtypes": sorted({str(local(p).dtype) for p in params}),
        }
    return out


def _fsdp1(rank: int) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel

    out = {}
    for use_orig_params in (False, True):
        model = FullyShardedDataParallel(
            make_model()[0], device_id=torch.device("cpu"), use_orig_params=use_orig_params
        )
        try:
            fp.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
            out[use_orig_params] = None
        except NotImplementedError as err:
            out[use_orig_params] = str(err)
    return out


def _sequence_parallel(rank: int) -> dict:
    """Tensor parallelism with SequenceParallel on a 1-D mesh: LayerNorm's Replicate() parameters get Partial(sum)
    gradients. The step is refused at g_0 (it used each rank's partial sum as the gradient, silently)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.w1, self.w2 = nn.LayerNorm(4), nn.Linear(4, 6), nn.Linear(6, 4)

        def forward(self, x):
            return self.w2(torch.tanh(self.w1(self.norm(x))))

    torch.manual_seed(0)
    model = Block().double()
    plan = {
        "norm": SequenceParallel(),
        "w1": ColwiseParallel(input_layouts=Shard(1)),
        "w2": RowwiseParallel(output_layouts=Shard(1)),
    }
    parallelize_module(model, init_device_mesh("cpu", (WORLD,)), plan)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, generator=g, dtype=torch.float64).chunk(WORLD, dim=1)[rank]
    opt = fp.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    before = [local(p).detach().clone() for p in model.parameters()]

    def closure():
        loss = (model(x) ** 2).mean()
        loss.backward()
        return loss

    try:
        opt.step(closure)
        err = None
    except ValueError as e:
        err = str(e)
    return {"error": err, "unchanged": all(torch.equal(local(p), b) for p, b in zip(model.parameters(), before))}


def _zero_on_one_rank(rank: int) -> dict:
    """The caller's backward, then rank 1 alone zeroes its gradients in place (its shards of g_0 zero, say): the
    whole gradient is not zero, so every rank takes it as g_0 and runs SAM's one pass (the zero scan's agreement is
    a MIN over the ranks; a MAX would make every rank run a clean pass of its own)."""
    model, scale = make_model()
    shard(model)
    opt = PRESETS["sam"](list(model.parameters()) + [scale])
    x, y = local_batch(0, rank, WORLD)
    calls = []

    def closure():
        calls.append(1)
        return loss_backward(model, scale, x, y, WORLD)

    closure()
    if rank == 1:
        model.zero_grad(set_to_none=False)
        scale.grad.zero_()
    calls.clear()
    opt.step(closure)
    return {"calls": len(calls), "skipped": opt.last_step_skipped}


def _scenarios(rank: int, out_dir: str, results: dict) -> None:
    """Every scenario, on this rank (``spawned.run_ranks``)."""
    for name, run in (
        ("presets", _presets),
        ("family", _family),
        ("family_nonfinite", _family_nonfinite),
        ("family_vanishing", _family_vanishing),
        ("nonfinite", _nonfinite),
        ("exception", _exception),
        ("batchnorm", _batchnorm),
        ("bf16", _bf16),
        ("fsdp1", _fsdp1),
        ("sequence_parallel", _sequence_parallel),
        ("zero_on_one_rank", _zero_on_one_rank),
    ):
        results[name] = run(rank)
    results["dcp"] = _dcp(rank, out_dir)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's records from one spawned run of every scenario."""
    return run_ranks(_scenarios, WORLD, tmp_path_factory.mktemp("fsdp"), SPAWN_TIMEOUT_S, "FSDP2")


@pytest.fixture
def single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---- the tests ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset,variant", VARIANTS)
def test_presets_on_shards_match_one_process(ranks, single_thread, backend, preset, variant):
    with fp.use_backend(backend):  # (zeroed gradients are no g_0: the steps of step(closure) alone)
        single = single_process(preset, "closure" if variant == "zeroed" else variant)
    start = [full(p) for p in list(make_model()[0].parameters()) + [make_model()[1]]]
    for rank in ranks:
        got = rank["presets"][(backend, preset, variant)]["weights"]
        for a, b, w in zip(got, single, start):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
            assert not torch.equal(a, w)


def test_a_gradient_zero_on_one_rank_only_is_the_callers_g0_on_every_rank(ranks):
    assert [r["zero_on_one_rank"] for r in ranks] == [{"calls": 1, "skipped": False}] * WORLD


def test_clipping_is_active_in_the_clipped_case(single_thread):
    """apd_l2 clips its descent gradient to 0.05: without max_grad_norm the trajectory differs, so the
    comparison above checks that the sharded step clips by the norm of the whole gradient."""
    clipped = single_process("apd_l2")
    plain = single_process(
        "apd_l2", make=lambda ps: fp.APD(ps, torch.optim.SGD, eps=0.1, steps=2, lr=0.1, momentum=0.9)
    )
    assert max(float((a - b).abs().max()) for a, b in zip(clipped, plain)) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_one_collective_per_pass(ranks, preset):
    """Outside the closure a step issues one all_gather per pass (the statistics of the gradient
    read after passes 0..K-1, then the descent gradient's norm), plus one for the weights' norms
    when the radius is relative and they are not measured with g_0 (l2 without accumulation)."""
    expected = ASCENTS[preset] + 1 + RELATIVE[preset]
    for rank in ranks:
        for backend in BACKENDS:
            assert rank["presets"][(backend, preset, "closure")]["collectives"] == [expected] * STEPS


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_buffers_are_shards(ranks, preset):
    """Backups and accumulators hold this rank's shards: at most 1x (single step, no clean term)
    or 2x (multi-step) the local parameter bytes."""
    for rank in ranks:
        rec = rank["presets"][(BACKENDS[-1], preset, "closure")]
        assert rec["buffers_are_shards"]
        assert 0 < rec["backup_bytes"] <= rec["local_bytes"]
        if preset in ("sam", "awp"):
            assert rec["accum_bytes"] == 0
        else:
            assert 0 < rec["accum_bytes"] <= rec["local_bytes"]


@pytest.mark.slow
def test_filter_sees_whole_tensors(ranks):
    """AWP's dim() > 1 rule (any perturb_filter) is evaluated on the DTensor, with its global shape."""
    model, scale = make_model()
    shapes = sorted(tuple(p.shape) for p in list(model.parameters()) + [scale])
    for rank in ranks:
        seen = rank["presets"][(BACKENDS[-1], "awp", "closure")]["filter_saw"]
        assert sorted(s for _, s in seen) == shapes
        assert sorted(t for t, _ in seen) == ["DTensor"] * 4 + ["Parameter"]


@pytest.mark.slow
def test_nonfinite_skip_agrees_across_ranks(ranks, single_thread):
    """A NaN in one rank's shard skips the step on every rank (at pass 0 and in the descent
    gradient), the weights unchanged; training continues; raise mode raises on every rank."""
    for rank in ranks:
        rec = rank["nonfinite"]
        assert rec["skipped"] == [False, True, True, False]
        assert rec["unchanged"][1:3] == [True, True]
        assert rec["skipped_steps"] == 2
        assert rec["raised"] == "NonFiniteGradient" and rec["raise_unchanged"]
    single = single_process("sam", batches=[0, 3])
    for a, b in zip(ranks[0]["nonfinite"]["weights"], single):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_exception_restores_shards(ranks, single_thread):
    for rank in ranks:
        assert rank["exception"]["raised"] and rank["exception"]["restored"]
        assert any("reset_iter_state()" in n for n in rank["exception"]["notes"])  # how to recover FSDP2
    single = single_process("apd_l2", batches=[0, 2])
    for a, b in zip(ranks[0]["exception"]["weights"], single):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_freeze_bn_on_shards(ranks):
    for rank in ranks:
        frozen, moving = rank["batchnorm"][True], rank["batchnorm"][False]
        assert frozen == {"mean_equal": True, "var_equal": True, "batches": 1}
        assert moving["batches"] == 2 and not moving["mean_equal"]  # the control: unfrozen, both passes count


@pytest.mark.slow
def test_dcp_checkpoint_resumes_bit_identical(ranks):
    for rank in ranks:
        assert len(rank["dcp"]) == 6
        for which, rec in rank["dcp"].items():
            assert rec["bit_identical"], which
            assert rec["lr_loaded"] == 0.01, which  # the wrapper sees the loaded param_groups
            assert rec["state_sharded"], which


@pytest.mark.slow
def test_bf16_mixed_precision(ranks, single_thread):
    """bf16 compute and reductions: the SAM update matches one float32 process to bf16 precision,
    while SAM's update differs from plain SGD's by much more than that (so the perturbation
    reached the bf16 all-gathered weights)."""
    start = [full(p) for p in list(make_model(torch.float32)[0].parameters()) + [make_model(torch.float32)[1]]]
    ref = single_process("sam", dtype=torch.float32)
    sam, sgd = ranks[0]["bf16"]["sam"], ranks[0]["bf16"]["sgd"]
    assert sam["dtypes"] == ["torch.float32"]  # the shards (and the perturbation) stay float32

    def dist_of(a, b):
        return math.sqrt(sum(float((x - y).square().sum()) for x, y in zip(a, b)))

    update = dist_of(ref, start)
    err = dist_of(sam["weights"], ref)
    sam_vs_sgd = dist_of(sgd["weights"], ref)
    assert err <= 0.02 * update, (err, update)
    assert sam_vs_sgd > 5 * err, (sam_vs_sgd, err)


@pytest.mark.slow
def test_partial_gradients_of_sequence_parallel_refused(ranks):
    for rank in ranks:
        out = rank["sequence_parallel"]
        assert out["error"] is not None and "Partial" in out["error"], out
        assert out["unchanged"]


@pytest.mark.slow
def test_fsdp1_refused(ranks):
    for rank in ranks:
        for use_orig_params, msg in rank["fsdp1"].items():
            assert msg is not None and "FSDP1" in msg and "fully_shard" in msg, use_orig_params


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FAMILY))
def test_family_on_shards_match_one_process(ranks, single_thread, backend, name):
    """Tolerance 1e-7 over 4 steps (ATOL's reasoning, with more float32 coefficients per step: GSAM's
    1 + alpha*c, LookSAM's projection and rescale); 1e-6 for LookSAM's per-tensor scope, whose rescale
    to alpha*||g_i|| magnifies the rounding in a short gv_i (measured 1.1e-7 on the 7-element bias)."""
    with fp.use_backend(backend):
        single = single_process(name, batches=range(FAMILY_STEPS), make=FAMILY[name])
    atol = 1e-6 if name == "looksam_layer" else 1e-7
    for rank in ranks:
        rec = rank["family"][(backend, name)]
        for a, b in zip(rec["weights"], single):
            torch.testing.assert_close(a, b, rtol=0, atol=atol)
        assert rec["collectives"] == FAMILY_COLLECTIVES[name]
        assert rec["state_is_shards"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VANISHING))
def test_vanishing_gradients_on_shards_take_the_unscaled_steps(ranks, single_thread, name):
    with fp.use_backend("cpp" if "cpp" in BACKENDS else "reference"):
        want = vanishing_run(name, 0)
    for rank in ranks:
        for a, b in zip(rank["family_vanishing"][name], want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["looksam", "fsam"])
def test_family_skip_agrees_across_ranks(ranks, single_thread, name):
    """The skipped step left no trace: the run equals one process trained on steps 0 and 2 only."""
    single = single_process(name, batches=[0, 2], make=FAMILY[name])
    for rank in ranks:
        rec = rank["family_nonfinite"][name]
        assert rec["skipped"] == [False, True, False]
        for a, b in zip(rec["weights"], single):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
