"""The normative rolling-median definition, written as plainly as possible

This is the yardstick every backend is compared with byte for byte. It sorts
every window and is therefore slow; use it on small stacks only.
"""
from __future__ import annotations

import numpy as np

from .errors import InputDataError


def check_stack_length(image_count: int, kernel_size: int) -> None:
    """Raise InputDataError (a ValueError) when a stack is too short for the kernel"""
    if image_count < kernel_size or image_count == 0:
        raise InputDataError(
            f"The input has N={image_count} events, but the rolling median needs "
            f"at least kernel_size={kernel_size}; use a smaller kernel_size or "
            f"a longer recording.")


def computed_frame_count(image_count: int, kernel_size: int) -> int:
    """Number of frames that get their own window

    Frames ``0 … N-k-1`` own a window; the remaining frames repeat the
    background of the last of them. With ``N == k`` there is one window.
    """
    check_stack_length(image_count, kernel_size)
    return max(image_count - kernel_size, 1)


def rolling_median_reference(stack, kernel_size: int) -> np.ndarray:
    """Rolling median background of a uint8 stack, by definition (README, "Same bytes as dcnum")

    ``image_bg[i] = sorted(x[j:j+k])[k//2]`` per pixel with
    ``j = min(i, N-k-1)`` for ``N > k``; for ``N == k`` every frame gets
    ``sorted(x[0:k])[k//2]``.

    Parameters
    ----------
    stack: array-like of uint8, shape (N, ...)
        Image stack; the first axis enumerates events.
    kernel_size: int
        Number of events in each window.

    Returns
    -------
    image_bg: np.ndarray
        Array of the same shape and dtype as `stack`.
    """
    stack = np.asarray(stack)
    count = computed_frame_count(len(stack), kernel_size)
    out = np.empty_like(stack)
    for i in range(len(stack)):
        j = min(i, count - 1)
        out[i] = np.sort(stack[j:j + kernel_size], axis=0)[kernel_size // 2]
    return out
