"""Hypothesis strategies the tests share"""
import numpy as np
from hypothesis import strategies as st

VALUE_KINDS = ("any", "band", "levels", "walk", "jumps")


@st.composite
def sixteen_bit_values(draw, shape: tuple) -> np.ndarray:
    """Values from 0 to 65535 of a shape, in a pattern that stresses a 16-bit median

    Uniform noise over the whole range, a narrow band at any level, a few
    repeated levels, a random walk over the frames, or frames that jump
    between the bottom and the top of the range (int64; the caller casts).
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(VALUE_KINDS))
    if kind == "any":
        return rng.integers(0, 65536, shape)
    if kind == "band":
        width = draw(st.integers(1, 300))
        return draw(st.integers(0, 65535 - width)) + rng.integers(0, width + 1, shape)
    if kind == "levels":
        levels = draw(st.lists(st.integers(0, 65535), min_size=1, max_size=4))
        return rng.choice(levels, shape)
    if kind == "walk":
        start = draw(st.integers(0, 65535))
        return np.clip(start + np.cumsum(rng.integers(-40, 41, shape), axis=0), 0, 65535)
    return np.where(rng.random(shape) < 0.5, rng.integers(0, 300, shape),
                    rng.integers(65236, 65536, shape))
