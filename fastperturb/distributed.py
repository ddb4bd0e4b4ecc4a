"""Sharded parameters: running the engine on FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter is a DTensor sharded on one mesh dimension (``Shard(0)`` by
default) and its gradient is a DTensor with the same layout; composed with tensor parallelism
(FSDP2 + TP on a 2-D mesh) a parameter may be sharded over both dimensions, and the parameters
TP leaves alone live on the FSDP dimension's 1-D mesh. The fused ops run on the
local shards (``to_local()``), which is exact for everything elementwise: the ascent step,
the restore and the gradient accumulation. What spans a whole tensor (its norm, the
statistics of its gradient) or the global scope is a sum or a maximum over the shards, so
each rank computes it on its shard and :class:`ShardReducer` completes it across the ranks
that hold the other shards, for the whole list of tensors in one collective (:class:`MeshReducer`
when the tensors are sharded over more than one mesh dimension: one collective over every rank,
each tensor's rows summed over its own peers).

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

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .engine import Reduce

__all__ = [
    "MeshReducer",
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
try:  # FSDP2's placement on the data-parallel dimension of a tensor-parallel parameter (private in torch 2.13)
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:
    _StridedShard = None  # type: ignore[assignment,misc]


def _is_shard(placement: object) -> bool:
    # (_StridedShard is no Shard subclass and its is_shard() is False, yet its local tensor is a disjoint part of the
    # elements too: a shard for every sum and maximum taken here)
    return isinstance(placement, Shard) or (_StridedShard is not None and isinstance(placement, _StridedShard))


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


def like_param(t: Tensor, param: Tensor) -> Tensor:
    """``t`` (a local tensor shaped like ``param``'s shard) laid out as ``param``: a DTensor with its mesh,
    placements, shape and stride when ``param`` is one (no copy), else ``t`` itself. For state a distributed
    checkpoint saves and reshards as it does the base optimizer's."""
    if not is_sharded(param):
        return t
    return DTensor.from_local(
        t, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def local_list(tensors: Sequence[Tensor], params: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
    """:func:`local` of each tensor. A DTensor with a ``Partial`` placement is refused: its local tensor is one
    rank's share of a sum, not a shard (a gradient left unreduced, as tensor parallelism's ``SequenceParallel``
    leaves LayerNorm's), and norms and steps taken from it would differ on every rank, silently. ``params``: the
    parameters of these gradients; a gradient whose placements differ from its parameter's is refused too (torch
    gives a column-parallel weight with an empty shard a Replicate gradient): its local tensor is not the shard the
    rank holds. Both are refused on every rank alike (placements are the same on every rank)."""
    if DTensor is None:
        return list(tensors)
    out = []
    with torch.no_grad():
        for i, t in enumerate(tensors):
            p = params[i] if params is not None else None
            if isinstance(p, DTensor) and isinstance(t, DTensor) and tuple(t.placements) != tuple(p.placements):
                raise ValueError(
                    f"the gradient of a DTensor parameter of shape {tuple(p.shape)} has the placements "
                    f"{t.placements}, its parameter {p.placements}: its local tensor is not the shard this rank "
                    "holds (torch gives a tensor-parallel weight with an empty shard on some rank such a gradient; "
                    "use a parallel plan that leaves every rank a non-empty shard). The weights were left (or "
                    "restored) as they were"
                )
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
    FSDP1 and DeepSpeed ZeRO parameters, and a ``ValueError`` for DTensor layouts the
    reducers cannot complete (placements other than ``Shard`` / ``Replicate``; tensors sharded
    over different mesh dimensions whose meshes do not together span every rank)."""
    sharded = []
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
        if is_sharded(p):
            sharded.append(p)
    if sharded:
        reducer_for(sharded)  # (its layout checks; building one makes no collective)
    return bool(sharded)


def _shard_dims(p: Tensor, i: int) -> List[int]:
    """The mesh dimensions ``p`` is sharded over (empty if replicated on every dimension), ``_StridedShard`` (FSDP2's
    placement on top of a tensor-parallel ``Shard``) included."""
    dims = [d for d, pl in enumerate(p.placements) if _is_shard(pl)]
    others = [pl for pl in p.placements if not (_is_shard(pl) or isinstance(pl, Replicate))]
    if others:
        raise ValueError(
            f"tensor {i} (shape {tuple(p.shape)}) is a DTensor with placements {p.placements}: fastperturb "
            "supports Shard and Replicate placements (FSDP2, HSDP, tensor parallelism and their compositions), "
            "not partial ones"
        )
    return dims


def _peers(t: Tensor, dims: Sequence[int]) -> Tuple[int, ...]:
    """The global ranks holding the shards of ``t`` that complete this rank's: those that share this rank's
    coordinate on every mesh dimension ``t`` is replicated over, in rank order."""
    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:
        raise ValueError(f"this rank is not in the device mesh {mesh} of a parameter it holds")
    index = tuple(slice(None) if d in dims else coord[d] for d in range(mesh.ndim))
    return tuple(sorted(mesh.mesh[index].flatten().tolist()))


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

    def _gather(self, stats: Tensor, kind: str) -> Tuple[Tensor, Tensor]:
        """This rank's rows in float64 and every rank's, ``[world, n, ...]``, in rank order."""
        if kind not in ("sum", "max"):
            raise ValueError(f"kind must be 'sum' or 'max', got {kind!r}")
        mine = stats.detach().to(torch.float64).contiguous()
        if mine.shape[0] != self._mask.numel():
            raise ValueError(f"{mine.shape[0]} rows of statistics for {self._mask.numel()} tensors")
        gathered = mine.new_empty((self.world * mine.shape[0],) + tuple(mine.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, mine, group=self.group)
        return mine, gathered.view((self.world,) + tuple(mine.shape))

    def __call__(self, stats: Tensor, kind: str) -> Tensor:
        mine, gathered = self._gather(stats, kind)
        total = gathered.sum(0) if kind == "sum" else gathered.amax(0)
        mask = self._masks.get(mine.device)
        if mask is None:
            mask = self._masks[mine.device] = self._mask.to(mine.device)
        mask = mask.view((-1,) + (1,) * (mine.dim() - 1))
        out = torch.where(mask, total, mine)
        return torch.where(torch.isfinite(gathered).all(0), out, torch.full_like(out, float("nan")))


class MeshReducer(ShardReducer):
    """A :class:`ShardReducer` for tensors sharded over different mesh dimensions (FSDP2 + TP on a 2-D mesh: a
    column-parallel weight sharded over both dimensions, a LayerNorm over the FSDP one only). One ``all_gather``
    over every rank; each tensor's rows are summed (maxed) over its own peers (:func:`_peers`), in rank order, so
    the peers of a tensor compute bit-identical values. A non-finite entry on any rank is NaN on every rank, as in
    :class:`ShardReducer`, so every rank takes the same skip."""

    def __init__(self, peers: Sequence[Optional[Tuple[int, ...]]]):
        super().__init__(torch.distributed.group.WORLD, [p is not None for p in peers])
        rows: Dict[Tuple[int, ...], List[int]] = {}
        for i, ranks in enumerate(peers):
            if ranks is not None and len(ranks) > 1:
                rows.setdefault(ranks, []).append(i)
        self._parts = [(torch.tensor(r), torch.tensor(i)) for r, i in rows.items()]
        self._parts_on: dict = {}  # the index tensors on each device they were used on (no copy per reduction)

    def __call__(self, stats: Tensor, kind: str) -> Tensor:
        mine, gathered = self._gather(stats, kind)
        out = mine.clone()
        parts = self._parts_on.get(mine.device)
        if parts is None:
            parts = self._parts_on[mine.device] = [(r.to(mine.device), i.to(mine.device)) for r, i in self._parts]
        for ranks, rows in parts:
            part = gathered.index_select(0, ranks).index_select(1, rows)
            out[rows] = part.sum(0) if kind == "sum" else part.amax(0)
        return torch.where(torch.isfinite(gathered).all(0), out, torch.full_like(out, float("nan")))


def reducer_for(tensors: Sequence[Tensor]) -> Optional[ShardReducer]:
    """A reducer for statistics of ``tensors`` (one row each), or None when none is sharded (plain or DDP
    parameters: their statistics are already complete). Tensors sharded over one mesh dimension of one mesh (FSDP2,
    HSDP) get a :class:`ShardReducer` on that dimension's group; tensors sharded over several dimensions or meshes
    (FSDP2 + TP) a :class:`MeshReducer` over every rank, which their meshes must span together."""
    layouts: List[Optional[tuple]] = []
    for i, t in enumerate(tensors):
        dims = _shard_dims(t, i) if is_sharded(t) else []
        layouts.append((t.device_mesh, tuple(dims)) if dims else None)
    present = [lay for lay in layouts if lay is not None]
    if not present:
        return None
    first = present[0]
    if len(first[1]) == 1 and all(lay[0] == first[0] and lay[1] == first[1] for lay in present):
        return ShardReducer(first[0].get_group(first[1][0]), [lay is not None for lay in layouts])
    # The checks below read what every rank sees alike (the root mesh the sub-meshes were sliced from, not this
    # rank's own row or column of it), so every rank refuses or every rank gathers: never some of them.
    roots = []
    for lay in present:
        root = _root_mesh(lay[0])
        if not any(root == r for r in roots):
            roots.append(root)
    world = torch.distributed.get_world_size()
    ranks = sorted(roots[0].mesh.flatten().tolist())
    if len(roots) > 1 or ranks != list(range(world)):
        where = "meshes sliced from different device meshes" if len(roots) > 1 else f"a device mesh of ranks {ranks}"
        raise ValueError(
            f"the tensors are sharded over several mesh dimensions of {where}: fastperturb completes such layouts "
            f"(FSDP2 + tensor parallelism) with one collective over every rank, so their meshes must be sliced from "
            f"one device mesh over all {world} ranks of the default process group"
        )
    return MeshReducer([_peers(t, lay[1]) if lay is not None else None for t, lay in zip(tensors, layouts)])


def _root_mesh(mesh: "torch.distributed.device_mesh.DeviceMesh") -> "torch.distributed.device_mesh.DeviceMesh":
    """The device mesh ``mesh`` was sliced from (``mesh["dp"]`` of a 2-D mesh: the 2-D mesh), or ``mesh``."""
    get = getattr(mesh, "_get_root_mesh", None)  # (private in torch 2.13: without it, every mesh is its own root)
    return get() if callable(get) else mesh


RECOVERY_NOTE = (
    "fastperturb restored the parameter shards bit for bit. FSDP2 may still hold the perturbed weights it "
    "all-gathered for the failed pass: call reset_iter_state() on the root fully_shard module before the next "
    "forward (FSDP2's recovery after an exception in a forward or backward)"
)


def note_recovery(err: BaseException) -> None:
    """Add FSDP2's recovery step to an exception raised by a closure during a sharded step."""
    if hasattr(err, "add_note") and RECOVERY_NOTE not in getattr(err, "__notes__", ()):
        err.add_note(RECOVERY_NOTE)
