"""The optimizers' own buffers (fastperturb.optim.buffers): views of one block per dtype and device, each
laid out exactly like its tensor, cache-line aligned and disjoint; and the optimizers allocate them so."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

import fastperturb as fp
from fastperturb.optim.buffers import ALIGN_BYTES, buffers_for, buffers_like

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _like(kind: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    t = torch.randn(shape).to(dtype)
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(0, 1)  # dense, not contiguous
    if kind == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "sliced" and t.dim() >= 1 and t.shape[-1] >= 2:
        return t[..., ::2]  # not dense: gets a buffer of its own
    return t


def _span(t: torch.Tensor) -> tuple:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _check(likes, bufs, dense) -> None:
    assert len(bufs) == len(likes)
    for t, b, d in zip(likes, bufs, dense):
        assert (b.shape, b.dtype, b.device) == (t.shape, t.dtype, t.device)
        assert b.stride() == t.stride() if d else b.is_contiguous()
        assert not b.requires_grad
    spans = sorted(_span(b) for b in bufs if b.numel())
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, "two buffers overlap"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["contiguous", "transposed", "channels_last", "sliced"]),
            st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple),
            st.sampled_from(DTYPES),
        ),
        min_size=0,
        max_size=12,
    )
)
def test_buffers_like_lays_out_each_buffer_like_its_tensor(specs):
    likes = [_like(*s) for s in specs]
    bufs = buffers_like(likes)
    # (a slice along a dimension of size 1 or less is still dense; then the test does not know, and skips it)
    dense = [kind != "sliced" or t.numel() <= 1 or t.is_contiguous() for (kind, _, _), t in zip(specs, likes)]
    _check(likes, bufs, dense)
    blocks: dict = {}
    for (kind, _, _), t, b in zip(specs, likes, bufs):
        if kind != "sliced" and t.numel():
            # dense: a view of its dtype's block, cache-line aligned
            assert b.data_ptr() % ALIGN_BYTES == 0
            blocks.setdefault(t.dtype, set()).add(b.untyped_storage().data_ptr())
    for dtype, storages in blocks.items():
        assert len(storages) == 1, f"{dtype} buffers come from {len(storages)} blocks"


def test_buffers_like_writes_stay_in_their_own_buffer():
    likes = [
        torch.randn(3),
        torch.randn(2, 5).t(),
        torch.randn(()),
        torch.randn(1, 3, 2, 2).to(memory_format=torch.channels_last),
    ]
    bufs = buffers_like(likes)
    for b in bufs:
        b.zero_()
    for i, (t, b) in enumerate(zip(likes, bufs)):
        b.copy_(t)
        for other, o in zip(likes[: i + 1], bufs[: i + 1]):
            assert torch.equal(o, other)  # earlier buffers untouched by later writes
    assert all(torch.equal(b, torch.zeros_like(b)) for b in bufs[i + 1 :])


def test_buffers_for_keeps_fitting_buffers_and_replaces_stale_ones():
    keys = [torch.zeros(1) for _ in range(3)]
    store: dict = {}
    first = buffers_for(store, keys, [torch.randn(4), torch.randn(2, 2), torch.randn(7)])
    again = buffers_for(store, keys, [torch.randn(4), torch.randn(2, 2), torch.randn(7)])
    assert all(a is b for a, b in zip(first, again))
    changed = buffers_for(store, keys, [torch.randn(4), torch.randn(3, 3), torch.randn(7).double()])
    assert changed[0] is first[0]
    assert changed[1] is not first[1] and changed[1].shape == (3, 3)
    assert changed[2].dtype == torch.float64
    assert all(store[k] is b for k, b in zip(keys, changed))


def _wide_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(6, 6) for _ in range(8)])


def _closure(model):
    x, y = torch.randn(16, 6), torch.randn(16, 6)

    def closure():
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    return closure


def _one_block(buffers) -> bool:
    return len({b.untyped_storage().data_ptr() for b in buffers}) == 1 and all(
        b.data_ptr() % ALIGN_BYTES == 0 for b in buffers
    )


@pytest.mark.parametrize("preset", ["SAM", "AWP", "APD"])
def test_the_optimizers_allocate_their_buffers_as_one_block(preset):
    model = _wide_model()
    make = getattr(fp, preset)
    opt = make(model.parameters(), torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(model))
    assert opt._backups and _one_block(opt._backups.values())
    if opt._accums:
        assert _one_block(opt._accums.values())
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_a_family_optimizer_allocates_its_scratch_as_one_block():
    model = _wide_model()
    opt = fp.GSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.step(_closure(model))
    assert opt._scratch and _one_block(opt._scratch.values())
