"""The synthetic 16-bit microscopy stacks: seeded, the same in any block size, camera-like"""
import numpy as np

from dcbg.synthetic import BLOCK, synthetic_block16, synthetic_stack16


def test_stack16_is_seeded_and_the_same_whatever_blocks_it_is_made_in():
    stack = synthetic_stack16(BLOCK + 20, (32, 48), seed=3)
    assert stack.dtype == np.uint16 and stack.shape == (BLOCK + 20, 32, 48)
    assert np.array_equal(stack, synthetic_stack16(BLOCK + 20, (32, 48), seed=3))
    assert np.array_equal(stack[:10], synthetic_stack16(10, (32, 48), seed=3))
    assert np.array_equal(stack[BLOCK:], synthetic_block16(1, 20, (32, 48), seed=3))
    assert not np.array_equal(stack, synthetic_stack16(BLOCK + 20, (32, 48), seed=4))


def test_stack16_looks_like_a_16_bit_camera():
    """Offsets of a few hundred to a few thousand counts, shot noise, particles that saturate"""
    stack = synthetic_stack16(100, seed=1)
    median = np.median(stack, axis=0)
    assert 250 < median.min() and median.max() < 3000
    # shot noise: the spread of a pixel in time is about the square root of its counts
    quiet = np.percentile(stack, 75, axis=0) - np.percentile(stack, 25, axis=0)
    ratio = quiet / (1.349 * np.sqrt(median))
    assert 0.9 < np.median(ratio) < 1.1
    # bright particles drift through: far above the background, some up to saturation
    assert (stack > median + 2000).mean() > 1e-3
    assert (stack == 65535).any()
