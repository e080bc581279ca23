"""dcbg.reference: the definitions every engine is held to, checked against plain Python"""
import itertools

import numpy as np
import pytest

from dcbg.errors import InputDataError
from dcbg.reference import rolling_median_reference, rolling_median_windows_reference


def python_median(values: list, kernel_size: int):
    """Element k // 2 of the sorted window: the upper middle for even k, no averaging"""
    return sorted(values)[kernel_size // 2]


def python_windows(stack: np.ndarray, kernel_size: int) -> list:
    """Every window's median, pixel by pixel, in plain Python"""
    count, pixels = len(stack), stack[0].size
    flat = [list(frame.reshape(-1)) for frame in stack]
    return [[python_median([flat[t][p] for t in range(start, start + kernel_size)],
                           kernel_size) for p in range(pixels)]
            for start in range(count - kernel_size + 1)]


CASES = [(count, kernel_size)
         for count, kernel_size in itertools.product((1, 2, 5, 9), (1, 2, 3, 4))
         if count >= kernel_size]


@pytest.mark.parametrize("count, kernel_size", CASES)
def test_window_medians_are_the_sorted_windows_middle_elements(count, kernel_size):
    stack = np.random.default_rng(count * 10 + kernel_size).integers(
        0, 256, (count, 2, 3), dtype=np.uint8)
    medians = rolling_median_windows_reference(stack, kernel_size)
    assert medians.dtype == np.uint8 and medians.shape == (count - kernel_size + 1, 2, 3)
    assert medians.reshape(len(medians), -1).tolist() == python_windows(stack, kernel_size)


@pytest.mark.parametrize("count, kernel_size", CASES)
def test_the_background_repeats_the_last_own_window(count, kernel_size):
    stack = np.random.default_rng(count * 7 + kernel_size).integers(
        0, 256, (count, 4), dtype=np.uint8)
    windows = python_windows(stack, kernel_size)
    own = max(count - kernel_size, 1)  # frames 0 ... N-k-1 own a window, at least one
    expected = [windows[min(i, own - 1)] for i in range(count)]
    background = rolling_median_reference(stack, kernel_size)
    assert background.shape == stack.shape and background.dtype == stack.dtype
    assert background.tolist() == expected


def test_even_windows_take_the_upper_middle_element_without_averaging():
    stack = np.array([[10], [20], [30], [41]], np.uint8)
    assert rolling_median_windows_reference(stack, 4).tolist() == [[30]]
    assert rolling_median_windows_reference(stack, 2).tolist() == [[20], [30], [41]]


def test_with_as_many_frames_as_the_kernel_every_frame_gets_the_median_of_all():
    stack = np.array([[3], [1], [2], [9]], np.uint8)
    assert rolling_median_reference(stack, 4).tolist() == [[3]] * 4


@pytest.mark.parametrize("definition", [rolling_median_reference,
                                        rolling_median_windows_reference])
def test_stacks_shorter_than_the_kernel_are_refused(definition):
    with pytest.raises(InputDataError, match="N=3"):
        definition(np.zeros((3, 2), np.uint8), 4)
