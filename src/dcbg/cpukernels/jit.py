"""dcbg's CPU kernels compiled by numba: the build used where the C one was not installed

The loops of ``compiled.c``'s histogram kernel (uint8 frames), sorted-window
kernel (uint16 frames), checksum, column gather and comparison, with the same
results as every kernel there. numba compiles them on first use and caches
the machine code; a process pays 0.5–1 s to import numba and load that
cache, which the C build does not.
"""
from __future__ import annotations

import numba
import numpy as np


def rolling_median_columns(frames, out, kernel_size, output_size, start, stop, counts):
    """Rolling median of the pixel columns ``start:stop`` of `frames`

    ``out[t, p]`` becomes the element of rank ``kernel_size // 2`` of
    ``frames[t:t+kernel_size, p]`` for ``t < output_size``. `frames` and
    `out` are both uint8 or both uint16. `counts` is scratch space: for uint8
    frames of shape ``(stop - start, 256)`` whose unsigned type holds
    `kernel_size`, for uint16 frames uint16 of shape ``(stop - start,
    kernel_size)``; the kernel fills it itself.
    """
    if frames.dtype.itemsize == 2:
        _median_of_sorted_windows(frames, out, kernel_size, output_size, start, stop, counts)
    else:
        _median_of_histograms(frames, out, kernel_size, output_size, start, stop, counts)


@numba.njit(nogil=True, cache=True)
def _median_of_histograms(frames, out, kernel_size, output_size, start, stop, counts):
    counts[:, :] = 0
    half = kernel_size // 2
    width = stop - start
    median = np.zeros(width, np.int32)
    below = np.zeros(width, np.int32)  # window elements smaller than median
    for row in range(kernel_size - 1):
        entering = frames[row]
        for j in range(width):
            counts[j, entering[start + j]] += 1
    for t in range(output_size):
        entering = frames[t + kernel_size - 1]
        leaving = frames[t - 1] if t > 0 else entering
        medians = out[t]
        for j in range(width):
            m = median[j]
            b = below[j]
            value = np.int32(entering[start + j])
            counts[j, value] += 1
            b += value < m
            if t > 0:
                value = np.int32(leaving[start + j])
                counts[j, value] -= 1
                b -= value < m
            while b > half and m > 0:  # bounds: as in compiled.c
                m -= 1
                b -= counts[j, m]
            here = np.int32(counts[j, m])
            while b + here <= half and m < 255:
                b += here
                m += 1
                here = counts[j, m]
            median[j] = m
            below[j] = b
            medians[start + j] = m


SORTED_BLOCK = 32
"""Columns whose sorted windows go through all windows together, so that they stay in cache"""


@numba.njit(nogil=True, cache=True)
def _first_not_below(window, begin, end, value):
    """The index of the first of the sorted ``window[begin:end]`` not below `value`"""
    while begin < end:
        middle = (begin + end) // 2
        if window[middle] < value:
            begin = middle + 1
        else:
            end = middle
    return begin


@numba.njit(nogil=True, cache=True)
def _median_of_sorted_windows(frames, out, kernel_size, output_size, start, stop, windows):
    # Each column keeps its window sorted in its row of `windows`: a step finds
    # the leaving value and the entering one's place by binary search and
    # shifts the values between the two by one place.
    half = kernel_size // 2
    width = stop - start
    for j in range(width):
        for row in range(kernel_size - 1):
            windows[j, row] = frames[row, start + j]
        windows[j, :kernel_size - 1].sort()
    for block in range(0, width, SORTED_BLOCK):
        for t in range(output_size):
            entering = frames[t + kernel_size - 1]
            leaving = frames[t - 1] if t > 0 else entering
            for j in range(block, min(width, block + SORTED_BLOCK)):
                window = windows[j]
                value = entering[start + j]
                if t == 0:  # the window 0 grows from kernel_size - 1 values
                    at = _first_not_below(window, 0, kernel_size - 1, value)
                    for i in range(kernel_size - 1, at, -1):
                        window[i] = window[i - 1]
                    window[at] = value
                else:
                    gone = leaving[start + j]
                    # the bound: as in compiled.c
                    at = min(_first_not_below(window, 0, kernel_size, gone), kernel_size - 1)
                    if value > gone:
                        to = _first_not_below(window, at + 1, kernel_size, value)
                        for i in range(at, to - 1):
                            window[i] = window[i + 1]
                        window[to - 1] = value
                    elif value < gone:
                        to = _first_not_below(window, 0, at, value)
                        for i in range(at, to, -1):
                            window[i] = window[i - 1]
                        window[to] = value
                out[t, start + j] = window[half]


FOLD_WORDS = 4096
"""Words summed between two folds of the checksum: keeps the 64-bit sums far from overflow"""


@numba.njit(nogil=True, cache=True)
def _fold(value):
    # Adding the high half to the low half keeps the value modulo 65535 and
    # keeps it non-zero; repeated until it fits into 16 bits.
    while value > 0xFFFF:
        value = (value & 0xFFFF) + (value >> 16)
    return value


@numba.njit(nogil=True, cache=True)
def fletcher32(data):
    """HDF5's Fletcher-32 checksum of a uint8 array (1-D, contiguous)"""
    size = data.shape[0]
    words = size // 2
    sum1 = 0
    sum2 = 0
    start = 0
    while start < words:
        stop = min(words, start + FOLD_WORDS)
        for i in range(start, stop):
            sum1 += (np.int64(data[2 * i]) << 8) | np.int64(data[2 * i + 1])
            sum2 += sum1
        sum1 = _fold(sum1)
        sum2 = _fold(sum2)
        start = stop
    if size % 2:
        sum1 += np.int64(data[size - 1]) << 8
        sum2 += sum1
    return (_fold(sum2) << 16) | _fold(sum1)



def gather_columns(source, columns, out):
    """``out[r, j] = source[r, columns[j]]`` for every row of `out`

    `source` and `out` are C-contiguous 2-D arrays of unsigned integers of 1
    or 2 bytes (both of the same size), `out` with at most as many rows as
    `source` and one column per entry of `columns` (int64, each a column of
    `source`).
    """
    _check_columns(source, columns, "source")
    if (out.ndim != 2 or out.dtype != source.dtype or not out.flags.c_contiguous
            or out.shape[0] > source.shape[0] or out.shape[1] != len(columns)):
        raise ValueError("out must be 2-D of the dtype of source, with at most the rows of "
                         "source and one column per entry of columns")
    _gather_columns(source, columns, out)


def first_difference(actual, columns, expected) -> int:
    """The first place, row by row, where `actual` differs from `expected`, or -1

    Compares ``actual[r, columns[j]]`` (``actual[r, j]`` where `columns` is
    None) with ``expected[r, j]`` for every row of `expected` and returns
    ``r * width + j`` of the first difference, `width` being the columns of
    `expected`. Both are C-contiguous 2-D arrays of unsigned integers of 1 or
    2 bytes (both of the same size), `actual` with at least the rows of
    `expected`.
    """
    if columns is None:
        columns = np.arange(actual.shape[1], dtype=np.int64)
    _check_columns(actual, columns, "actual")
    if (expected.ndim != 2 or expected.dtype != actual.dtype
            or not expected.flags.c_contiguous
            or expected.shape[0] > actual.shape[0] or expected.shape[1] != len(columns)):
        raise ValueError("expected must be 2-D of the dtype of actual, with at most the rows "
                         "of actual and one column per entry of columns (per column of "
                         "actual where columns is None)")
    return int(_first_difference(actual, columns, expected))


COLUMN_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
"""The types of values the column kernels take, as compiled.c takes them"""


def _check_columns(source, columns, name):
    """The checks compiled.c makes before it reads: numba's loops do not check bounds"""
    if columns.ndim != 1 or columns.dtype != np.int64:
        raise ValueError("columns must be a contiguous 1-D array of int64")
    if (source.ndim != 2 or source.dtype not in COLUMN_DTYPES
            or not source.flags.c_contiguous):
        raise ValueError(f"{name} must be a C-contiguous 2-D array of unsigned integers of "
                         f"1 or 2 bytes")
    outside = (columns < 0) | (columns >= source.shape[1])
    if outside.any():
        raise ValueError(f"column {columns[outside.argmax()]} is outside the "
                         f"{source.shape[1]} pixel columns")


@numba.njit(nogil=True, cache=True)
def _gather_columns(source, columns, out):
    for row in range(out.shape[0]):
        original = source[row]
        gathered = out[row]
        for j in range(columns.shape[0]):
            gathered[j] = original[columns[j]]


@numba.njit(nogil=True, cache=True)
def _first_difference(actual, columns, expected):
    width = expected.shape[1]
    for row in range(expected.shape[0]):
        got = actual[row]
        want = expected[row]
        differs = 0
        for j in range(width):  # without a branch; the row is searched only if it differs
            differs |= got[columns[j]] ^ want[j]
        if differs:
            for j in range(width):
                if got[columns[j]] != want[j]:
                    return row * width + j
    return -1
