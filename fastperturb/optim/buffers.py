"""The optimizers' own parameter-sized buffers (backups, accumulators, scratch copies).

A list's buffers are allocated together: views of one flat block per dtype and device, each view
shaped and strided like the tensor it belongs to and starting on a 64-byte boundary. The fused ops
then read and write one of their streams from consecutive memory instead of from as many separate
allocations as the list has tensors, which measured 5-9% faster SAM and APD cycles on lists of
1000-4000 small tensors (docs/design.md §7), and nothing else changes: the views never overlap,
and each is the only reference the optimizer hands to the ops.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, MutableMapping, Sequence

import torch
from torch import Tensor

from ..ops.validation import is_dense

#: Where each view starts, in bytes from the block's start: a cache line, so every buffer is as aligned as a
#: tensor of its own (the CPU allocator's alignment) and no two buffers share a line.
ALIGN_BYTES = 64


def _fits(buffer: Tensor, like: Tensor) -> bool:
    # (A tensor that is not dense gets a contiguous buffer: the fused ops refuse it anyway, naming it.)
    return (
        buffer.shape == like.shape
        and buffer.dtype == like.dtype
        and buffer.device == like.device
        and (buffer.stride() == like.stride() if is_dense(like) else buffer.is_contiguous())
    )


def buffers_like(likes: Sequence[Tensor]) -> List[Tensor]:
    """Uninitialised buffers with the shape, dtype and device of each of ``likes``, and the strides of each
    dense one.

    Dense tensors get views of one flat block per (dtype, device); anything else (and every tensor while
    torch.compile traces, whose graph should hold plain allocations) gets ``torch.empty_like``.
    """
    out: List[Tensor] = [None] * len(likes)  # type: ignore[list-item]
    groups: Dict[tuple, List[int]] = defaultdict(list)
    flat = not torch.compiler.is_compiling()
    for i, t in enumerate(likes):
        if flat and t.layout == torch.strided and is_dense(t):
            groups[(t.dtype, t.device)].append(i)
        else:
            out[i] = torch.empty_like(t, memory_format=torch.preserve_format)
    for (dtype, device), members in groups.items():
        step = max(1, ALIGN_BYTES // dtype.itemsize)
        offsets, total = [], 0
        for i in members:
            offsets.append(total)
            total += -(-likes[i].numel() // step) * step
        block = torch.empty(total, dtype=dtype, device=device)
        for i, off in zip(members, offsets):
            out[i] = block.as_strided(likes[i].shape, likes[i].stride(), off)
    return out


def buffers_for(store: MutableMapping[Tensor, Tensor], keys: Sequence[Tensor], likes: Sequence[Tensor]) -> List[Tensor]:
    """``store[keys[i]]`` for each i, shaped like ``likes[i]``: the stored buffer while it still fits, else a new
    one (the new ones allocated together by :func:`buffers_like`) that replaces it in ``store``."""
    out = [store.get(k) for k in keys]
    stale = [i for i, (b, t) in enumerate(zip(out, likes)) if b is None or not _fits(b, t)]
    for i, b in zip(stale, buffers_like([likes[i] for i in stale])):
        out[i] = store[keys[i]] = b
    return out  # type: ignore[return-value]


def kept_in_layout(
    store: MutableMapping[Tensor, Tensor], keys: Sequence[Tensor], likes: Sequence[Tensor]
) -> List[Tensor]:
    """``store[keys[i]]`` in the layout of ``likes[i]`` (same shape), values kept: converted, and replaced in
    ``store``, where it differs. For state kept across steps, which :func:`buffers_for` would replace by an
    uninitialised buffer: state loaded or refitted in its parameter's strides, read beside a gradient whose
    strides differ in a size-1 dimension (a 1x1 convolution's under channels_last)."""
    out = []
    for k, t in zip(keys, likes):
        b = store[k]
        if not _fits(b, t):
            b = store[k] = torch.empty_like(t, memory_format=torch.preserve_format).copy_(b)
        out.append(b)
    return out


def refit(store: MutableMapping[Tensor, Tensor], like: Callable[[Tensor], Tensor]) -> bool:
    """State kept across steps brought to its tensors after they changed dtype, layout or shape: each buffer that
    no longer fits ``like(key)`` is converted to it, values kept; one of another shape is dropped. False if one
    was dropped."""
    kept = True
    for key, b in list(store.items()):
        t = like(key)
        if _fits(b, t):
            continue
        if b.shape == t.shape:
            store[key] = torch.empty_like(t, memory_format=torch.preserve_format).copy_(b)
        else:
            del store[key]
            kept = False
    return kept
