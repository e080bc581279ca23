"""HDF5's Fletcher-32 chunk checksum, compiled so that it runs without the GIL

HDF5 appends a Fletcher-32 checksum to every chunk of a dataset created
with ``fletcher32=True`` and verifies it on reading. Its variant reads the
data as big-endian 16-bit words (an odd last byte is the high byte of a last
word), keeps two running sums folded into 16 bits modulo 65535, where a
non-zero sum that is a multiple of 65535 stays 0xFFFF, and stores
``(sum2 << 16) | sum1`` little-endian after the data. numcodecs has the same
checksum but computes it while holding the GIL, which would serialize the
chunk codec threads.
"""
from __future__ import annotations

import numba
import numpy as np

FOLD_WORDS = 4096
"""Words summed between two folds: keeps the 64-bit sums far from overflow"""


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

