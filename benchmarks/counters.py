"""What one step costs besides time: operator dispatches, allocations, state.

* :class:`DispatchCounter` is a ``TorchDispatchMode`` that counts every ATen or
  custom operator reaching the dispatcher from Python-visible code (a fused
  fastperturb op is one dispatch; what a C++ kernel does inside it is not
  seen). ``paused()`` stops counting, e.g. inside the benchmark's synthetic
  closure, which is not part of the implementation being measured.
* :func:`measure_allocations` records allocations (on CUDA: the caching
  allocator's counters; on CPU:) at the c10 allocator level
  with the PyTorch profiler (``profile_memory=True``), so allocations inside a
  kernel count too: the gross bytes allocated during the call, the number of
  "parameter-sized" allocations (exactly the byte size of one of the parameter
  tensors of >= 4 KiB: a clone, a delta or a gradient copy of a tensor; small
  vectors of per-tensor scalars, O(number of tensors), do not count even when
  the tensors are small) and the peak of live bytes above the start.
  If that private profiler API is unavailable it falls back to the dispatch
  mode, counting the outputs of ops whose storage is not an input's (which
  misses a kernel's internal scratch), and says which method it used.
* :func:`state_bytes` sums the storages reachable from an optimizer-like object
  (its ``__dict__``, dicts, lists, modules, ``state``) that are neither the
  parameters nor their gradients: the persistent memory of the method.
"""

from __future__ import annotations

import contextlib
import types
from collections import Counter
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastperturb.tools.bench import quiet_fd2


class DispatchCounter(TorchDispatchMode):
    """Counts operator dispatches (total and per op name)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_op: Counter = Counter()
        self._paused = 0
        self.alloc_bytes = 0
        self.alloc_count = 0
        self.track_allocs = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._paused:
            self.total += 1
            self.by_op[str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)] += 1
            if self.track_allocs:
                self._count_new(args, kwargs, out)
        return out

    def _count_new(self, args, kwargs, out) -> None:
        seen = set()
        for t in _tensors((args, kwargs)):
            try:
                seen.add(t.untyped_storage().data_ptr())
            except Exception:
                pass
        for t in _tensors(out):
            try:
                st = t.untyped_storage()
            except Exception:
                continue
            if st.data_ptr() not in seen and st.nbytes() > 0:
                seen.add(st.data_ptr())
                self.alloc_bytes += st.nbytes()
                self.alloc_count += 1


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


# The benchmark's closures consult this to stop counting while they run.
_active: list[DispatchCounter] = []


@contextlib.contextmanager
def not_measured() -> Iterator[None]:
    """Inside: operators and allocations are not attributed to the step being measured."""
    with contextlib.ExitStack() as stack:
        for c in _active:
            stack.enter_context(c.paused())
        yield


_PROFILING = [False]


def _run_counted(fn: Callable[[], object], track_allocs: bool = False) -> "DispatchCounter":
    """Run ``fn`` under a fresh counter (registered as active while it runs)."""
    c = DispatchCounter()
    c.track_allocs = track_allocs
    _active.append(c)
    try:
        with c:
            fn()
    finally:
        _active.remove(c)
    return c


def count_dispatches(fn: Callable[[], object]) -> tuple[int, dict]:
    c = _run_counted(fn)
    return c.total, dict(c.by_op.most_common(8))


def param_sized(param_sizes: Sequence[int]) -> frozenset[int]:
    """The allocation sizes that count as parameter-sized: those of the parameter tensors of >= 4 KiB
    (the largest one if none is that large).

    Not "at least the smallest parameter": with many small tensors (1000 of 32x32, 4 KiB each) the
    optimizer's per-tensor scalars (a float64 coefficient per tensor, 8 KB) would count, although
    they are O(number of tensors), not O(parameters).
    """
    big = frozenset(s for s in param_sizes if s >= 4096)
    return big or frozenset([max(param_sizes, default=1 << 62)])


def measure_allocations(
    fn: Callable[[], object], param_sizes: Sequence[int], device: Optional[torch.device] = None
) -> dict:
    """Gross bytes allocated by ``fn`` and how many allocations were parameter-sized (see module doc)."""
    sizes = param_sized(param_sizes)
    if device is not None and device.type == "cuda":
        return _allocs_cuda(fn, sizes, device)
    try:
        return _allocs_profiler(fn, sizes)
    except Exception as e:  # private profiler API changed: fall back to the dispatch hook
        out = _allocs_dispatch(fn, sizes)
        out["fallback_reason"] = f"{type(e).__name__}: {e}"
        return out


def _allocs_profiler(fn: Callable[[], object], sizes: frozenset[int]) -> dict:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    # The closure's own allocations are excluded by its not_measured() ranges:
    # we mark them with record_function and drop allocations under them.
    _PROFILING[0] = True
    try:
        with quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        _PROFILING[0] = False
    tree = prof.profiler.kineto_results.experimental_event_tree()
    gross = count = big = live = peak = 0

    def walk(evs, excluded):
        nonlocal gross, count, big, live, peak
        for e in evs:
            ex = excluded or (e.tag != _EventType.Allocation and getattr(e, "name", "") == CLOSURE_MARK)
            if e.tag == _EventType.Allocation and not excluded:
                size = e.extra_fields.alloc_size
                live += size
                peak = max(peak, live)
                if size > 0:
                    gross += size
                    count += 1
                    if size in sizes:
                        big += 1
            walk(e.children, ex)

    walk(tree, False)
    return {
        "method": "profiler",
        "alloc_bytes": gross,
        "alloc_count": count,
        "param_sized_allocs": big,
        "peak_live_bytes": peak,
        "param_sized_bytes": sorted(sizes),
    }


def _allocs_cuda(fn: Callable[[], object], sizes: frozenset[int], device: torch.device) -> dict:
    """On CUDA: the caching allocator's counters (includes the closure, which cannot be separated here)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    after = torch.cuda.memory_stats(device)
    key_b, key_n = "allocated_bytes.all.allocated", "allocation.all.allocated"
    return {
        "method": "cuda-allocator",
        "alloc_bytes": after.get(key_b, 0) - before.get(key_b, 0),
        "alloc_count": after.get(key_n, 0) - before.get(key_n, 0),
        "param_sized_allocs": None,
        "peak_live_bytes": torch.cuda.max_memory_allocated(device) - start,
        "param_sized_bytes": sorted(sizes),
    }


def _allocs_dispatch(fn: Callable[[], object], sizes: frozenset[int]) -> dict:
    c = _run_counted(fn, track_allocs=True)
    return {
        "method": "dispatch",
        "alloc_bytes": c.alloc_bytes,
        "alloc_count": c.alloc_count,
        "param_sized_allocs": None,
        "peak_live_bytes": None,
        "param_sized_bytes": sorted(sizes),
    }


CLOSURE_MARK = "fastperturb_bench::closure"


@contextlib.contextmanager
def closure_scope() -> Iterator[None]:
    """Wrap the benchmark's synthetic closure: excluded from dispatch and allocation counts."""
    with not_measured():
        if _PROFILING[0]:
            with torch.profiler.record_function(CLOSURE_MARK):
                yield
        else:
            yield


def state_bytes(obj: object, exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct tensor storages reachable from ``obj``, not counting those of ``exclude``."""
    skip = set()
    for t in exclude:
        for x in (t, getattr(t, "grad", None)):
            if isinstance(x, torch.Tensor):
                skip.add(x.untyped_storage().data_ptr())
    seen_obj: set[int] = set()
    seen_st: set[int] = set()
    total = 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen_obj:
            continue
        seen_obj.add(id(o))
        if isinstance(o, torch.Tensor):
            for x in (o, o.grad if o.is_leaf else None):
                if isinstance(x, torch.Tensor):
                    try:
                        st = x.untyped_storage()
                    except Exception:
                        continue
                    p = st.data_ptr()
                    if p and p not in skip and p not in seen_st:
                        seen_st.add(p)
                        total += st.nbytes()
            continue
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif isinstance(o, (types.FunctionType, types.MethodType, types.ModuleType, type)):
            continue
        elif hasattr(o, "__dict__"):
            stack.append(vars(o))
    return total
