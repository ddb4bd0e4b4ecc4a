"""Hypothesis strategies for the op tests, built on fastperturb.testing."""

from __future__ import annotations

from hypothesis import strategies as st

from fastperturb.testing import FLOAT_DTYPES, Layer

dtypes = st.sampled_from(FLOAT_DTYPES)

# Mostly tiny shapes (0-dim, empty, odd sizes around the 16 lanes), sometimes
# one crossing the CPU kernels' block (1024) or chunk (65536) size.
small_shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
odd_sizes = st.sampled_from([1, 15, 16, 17, 1023, 1024, 1025, 3000, 65537]).map(lambda n: (n,))
shapes = st.one_of(small_shapes, small_shapes, small_shapes, odd_sizes)


@st.composite
def layers(draw, *, max_len: int = 6, dtype=None) -> list[Layer]:
    """A list of layers: 0..max_len tensors, one dtype or mixed, some channels_last."""
    n = draw(st.integers(0, max_len))
    one = draw(st.one_of(st.none(), dtypes)) if dtype is None else dtype
    out = []
    for _ in range(n):
        shape = draw(shapes)
        cl = False
        if draw(st.integers(0, 4)) == 0:
            shape = tuple(draw(st.lists(st.integers(1, 4), min_size=4, max_size=4)))
            cl = draw(st.booleans())
        out.append(Layer(shape, one if one is not None else draw(dtypes), cl))
    return out


seeds = st.integers(0, 2**31 - 1)
finite_coefs = st.floats(-2.0, 2.0, allow_nan=False, width=32)
