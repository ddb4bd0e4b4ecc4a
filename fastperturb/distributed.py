"""Sharded parameters: running the engine on FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter is a DTensor sharded on one mesh dimension (``Shard(0)`` by
default) and its gradient is a DTensor with the same layout. The fused ops run on the
local shards (``to_local()``), which is exact for everything elementwise: the ascent step,
the restore and the gradient accumulation. What spans a whole tensor (its norm, the
statistics of its gradient) or the global scope is a sum or a maximum over the shards, so
each rank computes it on its shard and :class:`ShardReducer` completes it across the ranks
that hold the other shards, for the whole list of tensors in one collective.

Because every rank receives the same gathered values and reduces them in the same (rank)
order, every rank computes bit-identical coefficients and takes the same decisions: the same
ascent step, the same clipping factor, the same non-finite skip. A non-finite value on one
rank's shard makes the completed statistic non-finite on every rank.

Other sharding engines are refused rather than run on partial tensors: FSDP1
(``FullyShardedDataParallel``, whose flat parameters mix the shards of several tensors, so
per-tensor norms cannot be recovered) and DeepSpeed ZeRO (partitioned ``ds_*`` parameters).
DDP needs nothing here: its parameters and reduced gradients are complete on every rank.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .engine import Reduce

__all__ = [
    "Reduce",
    "ShardReducer",
    "check_engine",
    "is_sharded",
    "local",
    "local_list",
    "note_recovery",
    "reducer_for",
]

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch built without distributed support: nothing can be sharded
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter or gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The shard this rank holds (``t`` itself for a plain tensor). Writes to it reach the
    DTensor: FSDP2 all-gathers the shards for the next forward."""
    if is_sharded(t):
        with torch.no_grad():  # to_local() under no_grad returns the local tensor itself
            return t.to_local()
    return t


def local_list(tensors: Sequence[Tensor]) -> List[Tensor]:
    """:func:`local` of each tensor. A DTensor with a ``Partial`` placement is refused: its local tensor is one
    rank's share of a sum, not a shard (a gradient left unreduced, as tensor parallelism's ``SequenceParallel``
    leaves LayerNorm's), and norms and steps taken from it would differ on every rank, silently."""
    if DTensor is None:
        return list(tensors)
    out = []
    with torch.no_grad():
        for t in tensors:
            if isinstance(t, DTensor):
                if any(pl.is_partial() for pl in t.placements):
                    raise ValueError(
                        f"a DTensor gradient (or tensor) of shape {tuple(t.shape)} has the placements {t.placements}: "
                        "a Partial placement holds an unreduced sum on each rank (tensor parallelism's "
                        "SequenceParallel leaves the LayerNorm gradients so), which the perturbation cannot use; "
                        "fastperturb supports FSDP2 shards and tensor-parallel plans whose gradients have their "
                        "parameters' Shard/Replicate placements. The weights were left (or restored) as they were"
                    )
                t = t.to_local()
            out.append(t)
    return out


def _fsdp1_flattened(p: Tensor) -> bool:
    # FSDP1 marks its FlatParameters and, with use_orig_params=True, the original
    # parameters it turned into views of them.
    if getattr(p, "_fsdp_flattened", False):
        return True
    try:
        from torch.distributed.fsdp._flat_param import FlatParameter
    except ImportError:
        return False
    return isinstance(p, FlatParameter)


def check_engine(params: Sequence[Tensor]) -> bool:
    """Check that ``params`` come from a supported engine; return whether any is sharded.

    Raises a ``NotImplementedError`` naming the engine and the supported alternative for
    FSDP1 and DeepSpeed ZeRO parameters, and a ``ValueError`` for DTensor layouts other
    than FSDP2's (one sharded mesh dimension, the others replicated, one mesh)."""
    sharded = False
    mesh = None
    for i, p in enumerate(params):
        if _fsdp1_flattened(p):
            raise NotImplementedError(
                f"parameter {i} (shape {tuple(p.shape)}) belongs to FSDP1 (FullyShardedDataParallel): its flat "
                "parameters mix the shards of several tensors, so per-layer and global norms cannot be computed "
                "correctly. Shard the model with FSDP2 (torch.distributed.fsdp.fully_shard) instead, or use DDP"
            )
        if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
            raise NotImplementedError(
                f"parameter {i} (shape {tuple(p.shape)}) is partitioned by DeepSpeed ZeRO, which fastperturb does "
                "not support (the optimizer would see partial tensors). Use FSDP2 "
                "(torch.distributed.fsdp.fully_shard) or DDP"
            )
        if not is_sharded(p):
            continue
        sharded = True
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError(
                f"parameter {i} is a DTensor on another device mesh ({p.device_mesh}) than the first sharded one "
                f"({mesh}): put every parameter of one optimizer on one mesh"
            )
        _shard_dim(p, i)
    return sharded


def _shard_dim(p: Tensor, i: int) -> Optional[int]:
    """The mesh dimension ``p`` is sharded over (None if replicated on every dimension)."""
    dims = [d for d, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    others = [pl for pl in p.placements if not isinstance(pl, (Shard, Replicate))]
    if others or len(dims) > 1:
        raise ValueError(
            f"parameter {i} (shape {tuple(p.shape)}) is a DTensor with placements {p.placements}: fastperturb "
            "supports FSDP2's layouts (sharded over one mesh dimension, replicated over the others, e.g. HSDP), "
            "not tensor parallelism or partial placements"
        )
    return dims[0] if dims else None


class ShardReducer:
    """Completes per-tensor statistics of local shards across the ranks of the shard group.

    One ``all_gather`` per call brings every rank's ``[n, ...]`` rows to every rank; rows of
    sharded tensors are then summed (``"sum"``) or maxed (``"max"``) over ranks in rank
    order, rows of plain (replicated) tensors keep this rank's values. An entry that is
    non-finite on any rank becomes NaN on every rank, so the non-finite checks agree.
    Results are float64.
    """

    def __init__(self, group: "torch.distributed.ProcessGroup", sharded: Sequence[bool]):
        self.group = group
        self.world = torch.distributed.get_world_size(group)
        self._mask = torch.tensor(list(sharded), dtype=torch.bool)
        self._masks: dict = {}  # the mask on each device it was used on

    def __call__(self, stats: Tensor, kind: str) -> Tensor:
        if kind not in ("sum", "max"):
            raise ValueError(f"kind must be 'sum' or 'max', got {kind!r}")
        mine = stats.detach().to(torch.float64).contiguous()
        if mine.shape[0] != self._mask.numel():
            raise ValueError(f"{mine.shape[0]} rows of statistics for {self._mask.numel()} tensors")
        gathered = mine.new_empty((self.world * mine.shape[0],) + tuple(mine.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, mine, group=self.group)
        gathered = gathered.view((self.world,) + tuple(mine.shape))
        total = gathered.sum(0) if kind == "sum" else gathered.amax(0)
        mask = self._masks.get(mine.device)
        if mask is None:
            mask = self._masks[mine.device] = self._mask.to(mine.device)
        mask = mask.view((-1,) + (1,) * (mine.dim() - 1))
        out = torch.where(mask, total, mine)
        return torch.where(torch.isfinite(gathered).all(0), out, torch.full_like(out, float("nan")))


def reducer_for(tensors: Sequence[Tensor]) -> Optional[ShardReducer]:
    """A :class:`ShardReducer` for statistics of ``tensors`` (one row each), or None when
    none is sharded (plain or DDP parameters: their statistics are already complete)."""
    group = where = None
    flags = []
    for i, t in enumerate(tensors):
        dim = _shard_dim(t, i) if is_sharded(t) else None
        flags.append(dim is not None)
        if dim is None:
            continue
        if where is None:
            where, group = (t.device_mesh, dim), t.device_mesh.get_group(dim)
        elif (t.device_mesh, dim) != where:
            raise ValueError(
                f"tensor {i} is sharded over mesh dimension {dim} of {t.device_mesh}, the first sharded one over "
                f"dimension {where[1]} of {where[0]}: one optimizer's tensors must share one shard group"
            )
    return None if group is None else ShardReducer(group, flags)


RECOVERY_NOTE = (
    "fastperturb restored the parameter shards bit for bit. FSDP2 may still hold the perturbed weights it "
    "all-gathered for the failed pass: call reset_iter_state() on the root fully_shard module before the next "
    "forward (FSDP2's recovery after an exception in a forward or backward)"
)


def note_recovery(err: BaseException) -> None:
    """Add FSDP2's recovery step to an exception raised by a closure during a sharded step."""
    if hasattr(err, "add_note") and RECOVERY_NOTE not in getattr(err, "__notes__", ()):
        err.add_note(RECOVERY_NOTE)
