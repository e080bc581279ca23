"""The normative rolling-median definitions, written as plainly as possible

These are the yardsticks every backend is compared with byte for byte. They
sort every window and are therefore slow; use them on small stacks only.
They take frames of any type NumPy sorts (dcbg computes uint8, uint16, int8
and int16); signed values are sorted as numbers.
:func:`window_medians_by_partition` is their twin for chosen windows of large
stacks (``dcbg selftest``): it partially sorts each window, and the tests
prove it equal to :func:`rolling_median_windows_reference`.
"""
from __future__ import annotations

import numpy as np

from .windows import background_window_count, window_count


def rolling_median_reference(stack, kernel_size: int) -> np.ndarray:
    """Rolling median background of a stack, by definition ("Same bytes as dcnum")

    ``image_bg[i] = sorted(x[j:j+k])[k//2]`` per pixel with
    ``j = min(i, N-k-1)`` for ``N > k``; for ``N == k`` every frame gets
    ``sorted(x[0:k])[k//2]``.

    Parameters
    ----------
    stack: array-like, shape (N, ...)
        Image stack (uint8 for files); the first axis enumerates events.
    kernel_size: int
        Number of events in each window.

    Returns
    -------
    image_bg: np.ndarray
        Array of the same shape and dtype as `stack`.
    """
    stack = np.asarray(stack)
    count = background_window_count(len(stack), kernel_size)
    out = np.empty_like(stack)
    for i in range(len(stack)):
        j = min(i, count - 1)
        out[i] = np.sort(stack[j:j + kernel_size], axis=0)[kernel_size // 2]
    return out


def rolling_median_windows_reference(stack, kernel_size: int) -> np.ndarray:
    """Median of every window of a stack, by definition

    Row ``j`` is, per pixel, ``sorted(stack[j:j+k])[k//2]``, for ``j`` from
    0 to ``N-k``.

    Parameters
    ----------
    stack: array-like, shape (N, ...)
        Frames; the first axis enumerates them.
    kernel_size: int
        Number of frames in each window.

    Returns
    -------
    medians: np.ndarray
        Shape ``(N - kernel_size + 1, ...)``, dtype of `stack`.
    """
    stack = np.asarray(stack)
    count = window_count(len(stack), kernel_size)
    return np.stack([np.sort(stack[j:j + kernel_size], axis=0)[kernel_size // 2]
                     for j in range(count)])


def window_medians_by_partition(stack, kernel_size: int, starts) -> np.ndarray:
    """Median of the windows starting at `starts`, by partial sorting

    Row ``i`` is, per pixel, ``sorted(stack[j:j+k])[k//2]`` with
    ``j = starts[i]``, as in :func:`rolling_median_windows_reference`:
    ``np.partition`` puts that element in place without sorting the rest,
    which takes about half the time of a sort and lets a check cover
    windows anywhere in a long stack.

    Parameters
    ----------
    stack: array-like, shape (N, ...)
        Frames; the first axis enumerates them.
    kernel_size: int
        Number of frames in each window.
    starts: sequence of int
        First frame of each window, from 0 to ``N - kernel_size``.

    Returns
    -------
    medians: np.ndarray
        Shape ``(len(starts), ...)``, dtype of `stack`.
    """
    stack = np.asarray(stack)
    count = window_count(len(stack), kernel_size)
    starts = [int(j) for j in starts]
    if any(not 0 <= j < count for j in starts):
        raise ValueError(f"Window starts must be from 0 to {count - 1}, got {starts}.")
    if not starts:
        return np.empty((0, *stack.shape[1:]), stack.dtype)
    middle = kernel_size // 2
    return np.stack([np.partition(stack[j:j + kernel_size], middle, axis=0)[middle]
                     for j in starts])
