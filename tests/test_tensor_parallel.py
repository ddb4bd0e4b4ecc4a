"""Tensor parallelism, alone on a 1-D mesh and composed with FSDP2 on a 2-D mesh: four gloo processes on CPU
follow the trajectory of one process on the whole batch, for SAM, AWP, APD (L-infinity: a maximum across shards)
and the SAM family.

The 2-D run is TorchTitan's layout: a ("dp", "tp") mesh of 2 x 2, ``parallelize_module`` on the "tp" dimension
(a column-parallel and a row-parallel ``Linear``) and ``fully_shard`` on "dp". The column-parallel weight is then
sharded over both dimensions (``_StridedShard`` on "dp", ``Shard(0)`` on "tp"), the row-parallel bias over "dp"
only (replicated over "tp") and the modules TP leaves alone (a LayerNorm and the head) live on the 1-D "dp" mesh.
Each tensor's norms and statistics are completed over its own peers (``fastperturb.distributed.MeshReducer``):
a missing or doubled peer changes the weights by more than 1e-4. The 1-D run mixes ``Shard`` DTensors with plain
parameters (the LayerNorm TP does not touch), as users' TP plans do.

Tolerance: float64 models with float32 per-tensor statistics and coefficients (the ops' contract), formed here
from four ranks' partial sums in other groupings than one process's: a coefficient may round to the neighbouring
float32, as in ``test_fsdp.py``. GSAM's projection coefficient magnifies that most: up to 1.2e-7 (2.2e-7
relative) after three steps on the 2-D mesh in the first runs, hence ``atol=3e-7``; a peer left out of the sums
moved the weights by 2e-4 or more (every preset, checked by dropping one).
"""

from __future__ import annotations

import os

import pytest
import torch
from spawned import SPAWN_TIMEOUT_S, needs_gloo, run_ranks
from torch import nn

import fastperturb as fp
from fastperturb.distributed import MeshReducer, ShardReducer, local

pytestmark = needs_gloo

WORLD = 4
STEPS = 3
ATOL = 3e-7

PRESETS = {
    "sam": lambda ps: fp.SAM(ps, torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9),
    "asam": lambda ps: fp.ASAM(ps, torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1),
    "awp": lambda ps: fp.AWP(ps, torch.optim.SGD, gamma=0.05, lr=0.1, momentum=0.9),
    "apd_linf": lambda ps: fp.APD(
        ps, torch.optim.AdamW, eps=0.02, steps=2, norm="linf", scope="layer", relative=True, lr=0.01
    ),
    "gsam": lambda ps: fp.GSAM(ps, torch.optim.SGD, rho_max=0.2, rho_min=0.2, alpha=0.4, lr=0.1, momentum=0.9),
    "wsam": lambda ps: fp.WSAM(ps, torch.optim.SGD, rho=0.2, gamma=0.8, lr=0.1, momentum=0.9),
    "looksam": lambda ps: fp.LookSAM(ps, torch.optim.SGD, rho=0.2, k=2, alpha=0.7, lr=0.1),
    "fsam": lambda ps: fp.FriendlySAM(ps, torch.optim.SGD, rho=0.2, sigma=0.5, lmbda=0.8, lr=0.1, momentum=0.9),
}


class Net(nn.Module):
    """A column-parallel and a row-parallel Linear (``up``, ``down``), then modules TP leaves alone."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(5, 8), nn.Linear(8, 6)
        self.norm, self.head = nn.LayerNorm(6), nn.Linear(6, 1)

    def forward(self, x):
        return self.head(self.norm(self.down(torch.tanh(self.up(x)))))


TP_PLAN = {"up": "colwise", "down": "rowwise"}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return Net().double()


def global_batch(step: int):
    g = torch.Generator().manual_seed(70 + step)
    return torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)


def train(model: nn.Module, opt, batches, dp_rank: int = 0, dp_world: int = 1, on_grads=None) -> list:
    """``opt.step(closure)`` on each step's batch (this data-parallel rank's part of it); each step's skip flag."""
    skipped = []
    for s in batches:
        x, y = (t.chunk(dp_world)[dp_rank] for t in global_batch(s))

        def closure():
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            if on_grads is not None:
                on_grads(s)
            return loss

        opt.step(closure)
        skipped.append(opt.last_step_skipped)
    return skipped


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def single_process(preset: str) -> list:
    model = make_model()
    train(model, PRESETS[preset](list(model.parameters())), range(STEPS))
    return [full(p) for p in model.parameters()]


# ---- the spawned run --------------------------------------------------------------------------------


def _parallel_model(two_d: bool):
    """The model, parallelized: (model, data-parallel rank, data-parallel world)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {name: styles[style]() for name, style in TP_PLAN.items()}
    model = make_model()
    if not two_d:
        parallelize_module(model, init_device_mesh("cpu", (WORLD,)), plan)
        return model, 0, 1
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], plan)
    fully_shard(model, mesh=mesh["dp"])
    return model, mesh["dp"].get_local_rank(), 2


def _reducer_kind(opt) -> str:
    from fastperturb.distributed import reducer_for

    return type(reducer_for(list(opt.param_groups[0]["params"]))).__name__


def _presets(rank: int, two_d: bool) -> dict:
    out = {}
    for name, make in PRESETS.items():
        model, dp_rank, dp_world = _parallel_model(two_d)
        opt = make(list(model.parameters()))
        skipped = train(model, opt, range(STEPS), dp_rank, dp_world)
        out[name] = {"weights": [full(p) for p in model.parameters()], "skipped": skipped}
    out["reducer"] = _reducer_kind(opt)
    out["placements"] = {n: str(getattr(p, "placements", None)) for n, p in model.named_parameters()}
    return out


def _nonfinite(rank: int) -> dict:
    """A NaN in one rank's shard of the column-parallel weight's gradient (rank 3's only): every rank skips that
    step and keeps its shards, then the next step is taken everywhere."""
    model, dp_rank, dp_world = _parallel_model(True)
    opt = PRESETS["sam"](list(model.parameters()))
    before = [local(p).detach().clone() for p in model.parameters()]

    def poison(step: int) -> None:
        if step == 0 and rank == 3:
            with torch.no_grad():
                local(model.up.weight.grad).view(-1)[0] = float("nan")

    with pytest.warns(RuntimeWarning, match="skipped a step"):
        skipped = train(model, opt, range(1), dp_rank, dp_world, on_grads=poison)
    unchanged = all(torch.equal(local(p), b) for p, b in zip(model.parameters(), before))
    skipped += train(model, opt, range(1, 2), dp_rank, dp_world)
    return {"skipped": skipped, "unchanged": unchanged}


def _submeshes(rank: int) -> dict:
    """TP modules on ``mesh["tp"]`` and FSDP2 on the head alone (``mesh["dp"]``): a row of the 2-D mesh and a column
    of it, which span every rank only together. Each rank's own view covers three of the four ranks, which the first
    version of the layout check read as a mesh missing a rank, and refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = make_model()
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    fully_shard(model.head, mesh=mesh["dp"])
    opt = PRESETS["sam"](list(model.parameters()))
    # (the batch is not split over "dp": only the head is data-parallel, and FSDP2 averages its identical gradients)
    skipped = train(model, opt, range(STEPS))
    return {"weights": [full(p) for p in model.parameters()], "skipped": skipped, "reducer": _reducer_kind(opt)}


def _refusals(rank: int) -> dict:
    """Layouts refused on every rank alike, before anything moves (a refusal on some ranks only left the others
    waiting in the next collective): a parameter on a mesh of ranks 0 and 1 beside the 2-D layout, and a column-
    parallel weight with an empty shard, whose gradient torch makes Replicate."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    out = {}
    model, _, _ = _parallel_model(True)
    extra = nn.Parameter(distribute_tensor(torch.ones(4, dtype=torch.float64), DeviceMesh("cpu", [0, 1]), [Shard(0)]))
    try:
        PRESETS["sam"](list(model.parameters()) + [extra])
        out["other_root"] = None
    except ValueError as e:
        out["other_root"] = str(e)

    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)).double()  # out_features 1 over 4 ranks
    parallelize_module(small, init_device_mesh("cpu", (WORLD,)), {"2": ColwiseParallel(output_layouts=Replicate())})
    opt = PRESETS["sam"](list(small.parameters()))
    before = [local(p).detach().clone() for p in small.parameters()]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)

    def closure():
        loss = ((small(x) - y) ** 2).mean()
        loss.backward()
        return loss

    try:
        opt.step(closure)
        out["empty_shard"] = None
    except ValueError as e:
        out["empty_shard"] = str(e)
    out["unchanged"] = all(torch.equal(local(p), b) for p, b in zip(small.parameters(), before))
    return out


def _dcp(rank: int, out_dir: str) -> dict:
    """torch.distributed.checkpoint on the 2-D layout: save model and optimizer state after 2 steps, train 2
    more; a fresh model and optimizer (other weights, other lr) load the checkpoint and train the same 2. SAM
    through the base optimizer; LookSAM (k=3: the resume's first step reuses gv) and FriendlySAM through the
    wrapper, whose state dict for DCP carries gv and m sharded like their parameters (_StridedShard included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    makers = {
        "sam": (lambda ps, lr: fp.SAM(ps, torch.optim.AdamW, rho=0.2, lr=lr), lambda o: o.base_optimizer),
        "looksam": (lambda ps, lr: fp.LookSAM(ps, torch.optim.AdamW, rho=0.2, k=3, lr=lr), lambda o: o),
        "fsam": (lambda ps, lr: fp.FriendlySAM(ps, torch.optim.SGD, rho=0.2, lr=lr, momentum=0.9), lambda o: o),
    }
    out = {}
    for name, (make, target) in makers.items():

        def build(lr: float):
            model, dp_rank, dp_world = _parallel_model(True)
            return model, make(model.parameters(), lr), dp_rank, dp_world

        path = os.path.join(out_dir, f"dcp-{name}")
        model, opt, dp_rank, dp_world = build(0.01)
        train(model, opt, range(2), dp_rank, dp_world)
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, target(opt))},
            checkpoint_id=path,
        )
        train(model, opt, range(2, 4), dp_rank, dp_world)
        continued = [local(p).clone() for p in model.parameters()]

        model2, opt2, _, _ = build(0.5)
        with torch.no_grad():
            for p in model2.parameters():
                local(p).normal_()
        state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, target(opt2))}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model2, state["model"])
        set_optimizer_state_dict(model2, target(opt2), state["optim"])
        lr_loaded = opt2.param_groups[0]["lr"]
        skipped = train(model2, opt2, range(2, 4), dp_rank, dp_world)
        resumed = [local(p).clone() for p in model2.parameters()]
        out[name] = {
            "bit_identical": all(torch.equal(a, b) for a, b in zip(continued, resumed)),
            "lr_loaded": lr_loaded,
            "skipped": skipped,
        }
    return out


def _scenarios(rank: int, out_dir: str, results: dict) -> None:
    """Every scenario, on this rank (``spawned.run_ranks``)."""
    results["tp"] = _presets(rank, two_d=False)
    results["fsdp_tp"] = _presets(rank, two_d=True)
    results["nonfinite"] = _nonfinite(rank)
    results["dcp"] = _dcp(rank, out_dir)
    results["submeshes"] = _submeshes(rank)
    results["refusals"] = _refusals(rank)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's records from one spawned run of every scenario."""
    return run_ranks(_scenarios, WORLD, tmp_path_factory.mktemp("tp"), SPAWN_TIMEOUT_S, "tensor-parallel")


# ---- the tests ------------------------------------------------------------------------------------


def test_the_layouts_are_the_composed_ones(ranks):
    """What the runs exercise: TP alone keeps one mesh dimension (ShardReducer); FSDP2 + TP shards the column-parallel
    weight over both dimensions and puts the untouched modules on the 1-D "dp" mesh (MeshReducer)."""
    assert ranks[0]["tp"]["reducer"] == ShardReducer.__name__
    assert ranks[0]["fsdp_tp"]["reducer"] == MeshReducer.__name__
    placements = ranks[0]["fsdp_tp"]["placements"]
    assert "Shard" in placements["up.weight"] and placements["up.weight"].count("Shard") == 2
    assert "Replicate" in placements["down.bias"]
    assert placements["norm.weight"].count("Shard") == 1 and "Replicate" not in placements["norm.weight"]
    assert ranks[0]["tp"]["placements"]["norm.weight"] == "None"  # a plain parameter beside the DTensors


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp", "fsdp_tp"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_match_one_process(ranks, layout, preset):
    single = single_process(preset)
    start = [full(p) for p in make_model().parameters()]
    for rank in ranks:
        assert "error" not in rank, rank.get("error")
        got = rank[layout][preset]
        assert got["skipped"] == [False] * STEPS
        for a, b, w in zip(got["weights"], single, start):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
            assert not torch.equal(a, w)


def test_a_nonfinite_shard_skips_the_step_on_every_rank(ranks):
    for rank in ranks:
        assert rank["nonfinite"]["skipped"] == [True, False]
        assert rank["nonfinite"]["unchanged"]


def test_dcp_checkpoint_on_the_2d_layout_resumes_bit_identical(ranks):
    for rank in ranks:
        assert sorted(rank["dcp"]) == ["fsam", "looksam", "sam"]
        for name, rec in rank["dcp"].items():
            assert rec["bit_identical"] and rec["skipped"] == [False, False], name
            assert rec["lr_loaded"] == 0.01, name  # the wrapper sees the loaded param_groups


def test_tp_and_fsdp_on_a_row_and_a_column_of_the_mesh_match_one_process(ranks):
    single = single_process("sam")
    for rank in ranks:
        got = rank["submeshes"]
        assert got["reducer"] == MeshReducer.__name__ and got["skipped"] == [False] * STEPS
        for a, b in zip(got["weights"], single):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def test_layouts_that_cannot_be_completed_are_refused_on_every_rank(ranks):
    for rank in ranks:
        rec = rank["refusals"]
        assert rec["other_root"] is not None and "sliced from different device meshes" in rec["other_root"]
        assert rec["empty_shard"] is not None and "placements" in rec["empty_shard"]
        assert rec["unchanged"]
