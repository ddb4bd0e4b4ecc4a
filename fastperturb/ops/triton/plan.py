"""The host side of a Triton op call: the launch plan, one int64 buffer holding
per (dtype, vector width) group a pointer table and a work list of
(row, chunk) pairs, so every op runs in O(1) launches whatever the number of
tensors (``docs/design.md`` §5.2)."""

from __future__ import annotations

import itertools
import struct
from typing import Sequence

import torch
import triton.language as tl
from torch import Tensor

from .runtime import Tuning

TYPES = {
    # torch dtype: (element type, load/store type, integer type of the same width, compute type)
    torch.float16: (tl.float16, tl.float16, tl.int16, tl.float32),
    torch.bfloat16: (tl.bfloat16, tl.int16, tl.int16, tl.float32),
    torch.float32: (tl.float32, tl.float32, tl.int32, tl.float32),
    torch.float64: (tl.float64, tl.float64, tl.int64, tl.float64),
}
INT_OF_SIZE = {2: tl.int16, 4: tl.int32, 8: tl.int64}
VECTOR_BYTES = 16


def f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def refuse_capture(device: torch.device) -> None:
    """Raise when the current CUDA stream is capturing a graph. A plan is filled on the host and uploaded from
    pinned host memory: a handle's cached plan is rewritten in place by later calls, so a replay would upload
    another call's pointers and scalars; a plan made during the capture would replay its capture-time contents,
    right only while every tensor keeps its address, which nothing here checks. Nothing has been written when this
    raises."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "fastperturb's Triton ops cannot be captured in a CUDA graph: each call uploads its launch plan "
            "(the tensors' pointers and the scalars) from host memory, which a replay would not rewrite. Capture "
            "the forward and backward passes and run the optimizer step outside the graph; under "
            "torch.compile(mode='reduce-overhead') the ops are tagged torch.Tag.cudagraph_unsafe, so Inductor "
            "keeps them out of its CUDA graphs"
        )


def order_after(last: object, current: object) -> object:
    """``current`` (a stream) after making it wait for ``last``, the stream a cached plan was last used on, when
    they differ; returns ``current``, the plan's stream from now on.

    A cached plan's device buffer and scratch buffers are rewritten by the call that reuses it (upload, partials)
    while the kernels of its last call may still read them; on one stream the order is the queue's, across two
    it must be asked for (``wait_stream`` waits for everything queued on ``last`` so far)."""
    if last is not None and last != current:
        current.wait_stream(last)
    return current


class Group:
    __slots__ = ("key", "vec", "meta", "work", "programs")

    def __init__(self, key, vec: int, meta: Tensor, work: Tensor, programs: int) -> None:
        self.key, self.vec, self.meta, self.work, self.programs = key, vec, meta, work, programs


class Plan:
    """The launch plan of one op call, in one int64 buffer on the device.

    ``pbase``: first partial slot of each tensor (n + 1 entries; tensor i owns
    slots ``pbase[i] .. pbase[i+1]-1``, one per chunk). ``scal``: float64
    scalars stored as bits. ``groups``: one per (key, vec) present among the
    non-empty tensors, where key is what the kernel is specialised on (the
    dtype) and vec is 16 bytes of elements when all the tensor's pointers are
    16-byte aligned and its numel a multiple of that (else 1): a pointer table
    (rows of ``ptr columns + [numel, first slot, index]``) and the work list of
    (row, chunk) pairs. So at most two launches per key, whatever the number
    of tensors.

    A plan cached for a :class:`~fastperturb.ops.TensorLists` handle is
    reused call after call: only its scalars (:meth:`set_scalars`) and, when
    built with ``grads_column``, that column's gradient pointers (written in
    ``host`` by the handle, in C++) change, and the host copy is uploaded to
    the device buffer when they did.
    """

    def __init__(
        self,
        device: torch.device,
        lists: Sequence[Sequence[Tensor]],
        keys: Sequence[object],
        scalars: Sequence[float] = (),
        grads_column: int = -1,
    ) -> None:
        refuse_capture(device)  # before anything is allocated or pinned
        chunk = Tuning.chunk_size
        ref = lists[0]
        n = len(ref)
        numels = [t.numel() for t in ref]
        nchunks = [-(-k // chunk) for k in numels]
        pbase = [0] * (n + 1)
        for i, k in enumerate(nchunks):
            pbase[i + 1] = pbase[i] + k
        self.n = n
        self.slots = pbase[n]
        self.chunk, self.block = chunk, Tuning.block_size

        members: dict[tuple, list[int]] = {}
        rows_of: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            if not nchunks[i]:
                continue
            row = [ts[i].data_ptr() if len(ts) else 0 for ts in lists]
            vec = VECTOR_BYTES // ref[i].element_size()
            if numels[i] % vec or any(ptr % VECTOR_BYTES for ptr in row):  # (0 for an absent list)
                vec = 1
            members.setdefault((k, vec), []).append(i)
            rows_of[i] = row

        head = pbase + [f64_bits(s) for s in scalars]
        ints = list(head)
        layout = []  # (key, vec, meta offset, meta length, work offset, work length, programs)
        codes = [-1] * n  # where each tensor's pointer of column grads_column is, and whether it must be aligned
        for (key, vec), idx in members.items():
            meta_at = len(ints)
            for i in idx:
                codes[i] = (len(ints) + grads_column) << 1 | (vec > 1)
                ints += rows_of[i]
                ints += (numels[i], pbase[i], i)
            work_at = len(ints)
            for r, i in enumerate(idx):
                k = nchunks[i]
                ints += itertools.chain.from_iterable(zip(itertools.repeat(r, k), range(k)))
            layout.append(
                (key, vec, meta_at, work_at - meta_at, work_at, len(ints) - work_at, (len(ints) - work_at) // 2)
            )
        host = torch.tensor(ints, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
        #: the buffer as the host writes it: ``buf`` itself on the CPU, else its (pinned) copy, uploaded after
        #: every rewrite (:meth:`upload`)
        self.host = host
        self.uploaded: object = None  # the event of the last upload, waited for before the host copy changes
        self.buf = buf = host if device.type == "cpu" else torch.empty_like(host, device=device)
        self.stream: object = None  # the CUDA stream of the plan's last use (follow_stream)
        self.follow_stream(checked=True)
        self.upload()
        #: per tensor, for the handle's ``enter_grads``: ``position << 1 | aligned`` of its pointer of column
        #: ``grads_column`` in the buffer (-1: no row), so that new gradients only rewrite their pointers
        self.grad_codes = torch.tensor(codes, dtype=torch.int64) if grads_column >= 0 else None
        self.pbase = buf[: n + 1]
        self.scal = buf[n + 1 : len(head)]
        self.groups = [
            Group(key, vec, buf[mo : mo + ml], buf[wo : wo + wl], programs)
            for key, vec, mo, ml, wo, wl, programs in layout
        ]
        self.scalars = tuple(float(x) for x in scalars)
        #: scratch buffers of a cached plan (e.g. the reduction partials), reused by the next call
        self.scratch: dict[str, Tensor] = {}

    def follow_stream(self, checked: bool = False) -> None:
        """Order the call about to use this plan after its last use, when that was on another CUDA stream
        (:func:`order_after`); first thing in every call on a plan, before anything is uploaded or launched. A
        call inside CUDA graph capture is refused (:func:`refuse_capture`; ``checked``: it was, just now).
        Nothing else to do off CUDA."""
        if not checked:
            refuse_capture(self.buf.device)
        if self.buf.device.type != "cuda":
            return
        current = torch.cuda.current_stream(self.buf.device)
        if self.stream is not None and self.stream != current:
            # The caching allocator frees a tensor for reuse on the stream it was allocated on: mark these as used
            # on this one too, so that dropping the plan cannot hand them out while this stream's kernels run.
            for t in (self.buf, *self.scratch.values()):
                t.record_stream(current)
        self.stream = order_after(self.stream, current)

    def upload(self) -> None:
        """Copy the host buffer to the device buffer (after the host copy changed; nothing to do on the CPU)."""
        if self.buf is self.host:
            return
        self.buf.copy_(self.host, non_blocking=True)
        if self.buf.device.type == "cuda":
            self.uploaded = torch.cuda.Event()
            self.uploaded.record()

    def host_writable(self) -> None:
        """Wait until the last upload has read the host buffer (pinned memory is copied asynchronously)."""
        if self.uploaded is not None:
            self.uploaded.synchronize()
            self.uploaded = None

    def write_scalars(self, scalars: tuple) -> bool:
        """Write the scalars into the host copy, which must be writable (:meth:`host_writable`); whether they
        changed, when the caller uploads next. No scalars given: nothing to write."""
        scalars = tuple(float(x) for x in scalars)
        if not scalars or scalars == self.scalars:
            return False
        self.host[self.n + 1 : self.n + 1 + len(scalars)] = torch.tensor(
            [f64_bits(x) for x in scalars], dtype=torch.int64
        )
        self.scalars = scalars
        return True

    def set_scalars(self, scalars: tuple) -> None:
        """Rewrite the scalars in place (a cached plan reused with other scalars: one tiny copy, no re-plan)."""
        if scalars and tuple(float(x) for x in scalars) != self.scalars:
            self.host_writable()
            self.write_scalars(scalars)
            self.upload()
