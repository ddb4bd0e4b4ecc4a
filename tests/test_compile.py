"""torch.compile under inductor (CPU): the fused ops compile inside the graph, with no
graph break, and give the eager results."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from fastperturb import ops

# CI keeps inductor's caches in the checkout's build/ folder (read when inductor compiles).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[1] / "build" / "inductor-cache"))

pytestmark = pytest.mark.usefixtures("native")

SHAPES = [(7,), (3, 4), (2, 3, 2)]


def _tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def every_op(params, grads, backups, accum, step_coef, proj):
    """Each fused op once, with and without the optional lists (the calls the engine makes)."""
    per, total = ops.norms(params, 2.0)
    with_accum = ops.grad_stats_(grads, accum, params, [], accum_weight=0.5, accum_init=True, adaptive_eta=0.01)
    ops.ascent_step_(params, grads, backups, step_coef, proj, norm="l2", first=True, zero_grads=False)
    no_accum = ops.grad_stats_(grads, [], params, backups)
    ops.ascent_step_(params, grads, backups, step_coef, proj, norm="linf", zero_grads=True)
    ops.grad_stats_(grads, accum, accum_weight=0.25)
    ops.restore_(params, backups)
    ops.combine_grads_(grads, accum, 0.5)
    empty_stats = ops.grad_stats_([], [], [], [])
    empty_norms, _ = ops.norms([], 2.0)
    return per, total, with_accum, no_accum, empty_stats, empty_norms


def _every_op_inputs():
    params, grads = _tensors(0), _tensors(1)
    backups = [torch.empty_like(p) for p in params]
    accum = [torch.empty_like(p) for p in params]
    coefs = torch.tensor([0.05, 0.1, 0.2]), torch.tensor([1.0, 0.5, 0.02])
    return params, grads, backups, accum, *coefs


def test_every_fused_op_compiles_under_inductor_inside_one_graph():
    """fullgraph=True: no graph break; the generated code calls the fused ops (they are
    in the graph, not around it); outputs and every mutated list equal eager bit for bit."""
    torch._dynamo.reset()
    compiled = torch.compile(every_op, backend="inductor", fullgraph=True)
    eager_args, compiled_args = _every_op_inputs(), _every_op_inputs()
    want = every_op(*eager_args)
    got, code = run_and_get_code(compiled, *compiled_args)
    code = "\n".join(code)
    for name in ("norms", "grad_stats_", "grad_stats", "ascent_step_", "restore_", "combine_grads_"):
        assert f"torch.ops.fastperturb.{name}.default" in code, name
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for got_list, want_list in zip(compiled_args[:4], eager_args[:4]):
        for a, b in zip(got_list, want_list):
            assert torch.equal(a, b)


def test_pure_grad_stats_twin_matches_the_mutating_op_schema_and_passes_opcheck():
    """grad_stats (what the facade calls under compile when nothing is accumulated) is
    grad_stats_ without its accumulator arguments, and a well-formed custom op."""
    twin = torch.ops.fastperturb.grad_stats.default._schema
    mutating = torch.ops.fastperturb.grad_stats_.default._schema
    assert not twin.is_mutable
    dropped = {"accum", "accum_weight", "accum_init"}
    assert [(a.name, str(a.type), a.kwarg_only) for a in twin.arguments] == [
        (a.name, str(a.type), a.kwarg_only) for a in mutating.arguments if a.name not in dropped
    ]
    assert [str(r.type) for r in twin.returns] == [str(r.type) for r in mutating.returns]
    params, grads = _tensors(0), _tensors(1)
    backups = [p + 0.1 for p in params]
    for args, kwargs in [((grads, [], []), {}), ((grads, params, backups), {}), ((grads, params, []), {"adaptive_eta": 0.1}),
                         (([], [], []), {})]:
        torch.library.opcheck(torch.ops.fastperturb.grad_stats.default, args, kwargs)
        assert torch.equal(torch.ops.fastperturb.grad_stats(*args, **kwargs),
                           torch.ops.fastperturb.grad_stats_(args[0], [], *args[1:], **kwargs))
