"""The types of frames whose medians dcbg computes, and how signed frames reach the kernels

The kernels, on the CPU and the GPU, order unsigned integers of 8 or 16
bits. Signed frames are ordered as numbers by flipping their sign bit:
``x ^ 0x80`` maps int8's -128 … 127 onto 0 … 255 in the same order (``0x8000``
does it for int16), so the median of the flipped values, flipped back, is
the median of the signed ones. The array functions flip a batch after
reading it and the medians before writing them; the kernels see unsigned
values only.

Files (.rtdc) hold uint8 frames (RT-DC's format); the other types are for
arrays (:func:`dcbg.rolling_median`).
"""
from __future__ import annotations

import numpy as np

FRAME_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.int8, np.int16))
"""The types of frames the array functions take"""


def describe_frame_dtypes() -> str:
    """The supported types in words: "uint8, uint16, int8 or int16" """
    names = [dtype.name for dtype in FRAME_DTYPES]
    return ", ".join(names[:-1]) + " or " + names[-1]


def check_frame_dtype(dtype) -> np.dtype:
    """`dtype` in this machine's byte order if frames of it are supported

    Parameters
    ----------
    dtype: numpy dtype or anything numpy turns into one

    Returns
    -------
    dtype: numpy.dtype
        The type in native byte order (a big-endian uint16 gives uint16).

    Raises
    ------
    TypeError
        If it is none of :data:`FRAME_DTYPES` (floats, bool, 32- and 64-bit
        integers, …), naming the supported ones.
    """
    dtype = np.dtype(dtype)
    native = dtype.newbyteorder("=")
    if native not in FRAME_DTYPES:
        raise TypeError(
            f"frames must be {describe_frame_dtypes()}, got {dtype}; convert them first, "
            f"e.g. with frames.astype('uint16') after scaling them to 0…65535.")
    return native


def kernel_dtype(dtype) -> np.dtype:
    """The unsigned type of the same width, which the kernels compute on"""
    return np.dtype(f"u{np.dtype(dtype).itemsize}")


def sign_bit(dtype) -> int:
    """The bit that :func:`flip_sign_bit` flips for frames of `dtype`: 0 for unsigned types"""
    dtype = np.dtype(dtype)
    return 1 << (8 * dtype.itemsize - 1) if dtype.kind == "i" else 0


def flip_sign_bit(values: np.ndarray, bit: int):
    """Flip `bit` of every element of the unsigned array `values`, in place (0: nothing)

    Signed values turn into unsigned ones of the same order, and back.
    """
    if bit:
        np.bitwise_xor(values, values.dtype.type(bit), out=values)


__all__ = ["FRAME_DTYPES", "check_frame_dtype", "describe_frame_dtypes", "flip_sign_bit",
           "kernel_dtype", "sign_bit"]
