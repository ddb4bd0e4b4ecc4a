"""Persistent handles on a parameter list and its buffers, so repeated op calls skip the per-call costs.

An op call through ``torch.ops`` converts every tensor list argument (about 0.1 us per tensor per list),
re-checks every tensor and re-plans the work: on a thousand small tensors that is most of a SAM cycle's time.
A :class:`TensorLists` is built once per parameter list (params, their backups, optionally accumulators),
validated once with the checks of the list ops, and then passed to the ``*_lists`` ops of
:mod:`fastperturb.ops` in place of the lists. The compiled handle (``torch.classes.fastperturb.TensorLists``,
``csrc/common/tensor_lists.h``) keeps the tensors alive and a fingerprint of each (data pointer, shape, strides,
dtype, device) that every call re-checks in C++; it keeps the CPU work plan and the CUDA kernels' work-list
plans, and the Triton backend keeps its launch plans (device buffers included) on the Python object. Gradients
are the ``.grad`` of the params, read and checked on every call.

:class:`ListsCache` is the generic way to hold one: it returns the same handle while the lists hold the same
tensors (by identity) and builds a new one otherwise.
"""

from __future__ import annotations

import operator
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from . import native
from . import validation as V

#: Roles of the lists in a handle (the order of ``csrc/include/fastperturb/list_schemas.h``).
ROLES = ("params", "backups", "accum")


class TensorLists:
    """Parallel tensor lists held for repeated op calls: ``params``, ``backups`` and ``accum`` (both optional).

    Building it validates the lists like the list ops do (same errors); since every list is written by some op
    on a handle, no tensor of any list may share memory with another. The tensors must then keep their storage
    and shape: an op on a handle whose tensor changed (``p.data = ...``, an in-place resize) raises and asks for a
    new handle. The ``.grad`` of the params are checked on every call as the list ops check them, except that
    whether one shares memory with the handle's own tensors is not checked (the list ops sort every span per
    call for that): a gradient autograd allocates never does, as the handle keeps its tensors alive, but a
    ``.grad`` assigned to a view of a param, backup or accumulator is the caller's error. ``plans`` is free for
    backends to cache per-op launch plans in (the Triton backend does).

    ``private_buffers=True`` says that ``backups`` and ``accum`` are buffers only the caller holds and never
    reshapes or reassigns (as the optimizers' own are): they are then checked when the handle is built, not again
    on every call, which saves about 7 us per list per call on 1000 tensors. The params (and their ``.grad``)
    are re-checked on every call either way.
    """

    __slots__ = (
        "params",
        "backups",
        "accum",
        "private_buffers",
        "device",
        "handle",
        "plans",
        "numel",
        "enter",
        "enter_grads",
        "__weakref__",
    )

    def __init__(
        self,
        params: Sequence[Tensor],
        backups: Sequence[Tensor] = (),
        accum: Sequence[Tensor] = (),
        *,
        private_buffers: bool = False,
    ):
        self.params, self.backups, self.accum = list(params), list(backups), list(accum)
        self.private_buffers = bool(private_buffers)
        self.device = V.first_device(self.params, self.backups, self.accum)
        #: the compiled handle, or None without the extension (the ops then take the lists)
        self.handle: Optional[Any] = None
        if native.load_error is None:
            fixed = sum(1 << ROLES.index(r) for r in ("backups", "accum")) if self.private_buffers else 0
            self.handle = torch.classes.fastperturb.TensorLists(
                [self.params, self.backups, self.accum], list(ROLES), fixed
            )
        else:  # the reference backend: validated alike all the same
            V.check_handle_lists([(r, getattr(self, r)) for r in ROLES])
        self.plans: dict = {}
        #: elements of the params in all (the engine sizes per-call costs against the bytes with it)
        self.numel = sum(p.numel() for p in self.params)
        # the handle's per-call entry points, bound once (a method lookup on a ScriptObject costs about 1 us)
        self.enter = self.handle.enter if self.handle is not None else None
        self.enter_grads = self.handle.enter_grads if self.handle is not None else None

    def __len__(self) -> int:
        return len(self.params)

    def grads(self) -> list[Tensor]:
        """The ``.grad`` of the params (what the ops on this handle read as the gradients)."""
        return [p.grad for p in self.params]

    def holds(self, params: Sequence[Tensor], backups: Sequence[Tensor], accum: Sequence[Tensor]) -> bool:
        """Whether these are the handle's tensors, one by one, in the same order (at once for the handle's own
        lists, which is what a caller keeping the handle passes)."""
        return all(
            mine is theirs or (len(mine) == len(theirs) and all(map(operator.is_, mine, theirs)))
            for mine, theirs in ((self.params, params), (self.backups, backups), (self.accum, accum))
        )


class ListsCache:
    """One :class:`TensorLists` per distinct set of lists, reused while the caller passes the same tensors.

    The key is the identity of every tensor (``id``): the cached handle holds the tensors, so an id cannot be
    reused by a new tensor while its entry lives. A handle whose tensors changed storage or shape since it was
    built is replaced. Keeps the latest ``size`` entries.
    """

    def __init__(self, size: int = 2):
        self.size = size
        self._entries: dict[tuple, TensorLists] = {}

    def get(
        self,
        params: Sequence[Tensor],
        backups: Sequence[Tensor] = (),
        accum: Sequence[Tensor] = (),
        *,
        private_buffers: bool = False,
    ) -> TensorLists:
        """The handle on these lists (:class:`TensorLists`' arguments), built if there is none yet."""
        key = (tuple(map(id, params)), tuple(map(id, backups)), tuple(map(id, accum)), bool(private_buffers))
        hit = self._entries.get(key)
        if hit is not None and hit.handle is not None and not hit.handle.current():
            # Same tensors, but one's storage or shape changed (e.g. `module.to()` assigns `.data`): a new handle.
            del self._entries[key]
            hit = None
        if hit is None:
            hit = TensorLists(params, backups, accum, private_buffers=private_buffers)
            while len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = hit
        return hit

    def clear(self) -> None:
        self._entries.clear()
