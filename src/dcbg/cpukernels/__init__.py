"""dcbg's CPU kernels, compiled, and the one place that picks their build

- ``rolling_median_columns``: the rolling median of a range of pixel columns
  of uint8 or uint16 frames, with scratch space from :func:`scratch`.
  uint8: a 256-bin histogram per pixel and a pointer to its median bin (see
  :mod:`dcbg.engines.cpu`); the C build's fastest kernel keeps, per pixel,
  only the counts of a few grey levels around the median and steps 16 or 32
  pixels at once with SIMD instructions (see :func:`median_implementation`).
  uint16: a histogram of 65,536 levels per pixel would fit no cache, so each
  pixel keeps its window sorted (numba's build, and the C build where it
  has no SIMD kernel), a step being two binary searches and a shift. The C
  build's SIMD kernels step 8 to 32 pixels at once: up to 56 frames, each
  pixel's window sorted across vectors (a min and a max per frame of the
  window); for longer windows, the 8-bit window kernel on values relative to
  a window of 12 to 32 levels per pixel. Shot noise spreads a pixel's values
  over tens of levels, but the median of a long window wanders only a few
  around their mean, so it leaves those levels in a fraction of a percent of
  the steps; then the kernel reads the pixel's window in a copy it keeps in
  consecutive memory. On sCMOS-like frames of a few hundred to a few
  thousand counts this costs 1 to 3.5 times the uint8 kernel per pixel and
  window; columns whose medians leave their levels often (brighter or
  noisier ones) continue on the sorted lanes or windows. State per pixel:
  its window's values (2 bytes a frame) and, in the window kernel, up to 35
  bytes of level and counts.
- ``fletcher32``: HDF5's Fletcher-32 chunk checksum (see
  :mod:`dcbg.rtdc.chunks`). HDF5 reads the data as big-endian 16-bit words
  (an odd last byte is the high byte of a last word), keeps two running sums
  folded into 16 bits modulo 65535, where a non-zero sum that is a multiple
  of 65535 stays 0xFFFF, and stores ``(sum2 << 16) | sum1`` little-endian
  after the data. numcodecs has the same checksum but computes it while
  holding the GIL, which would serialize the chunk codec threads.
- ``gather_columns`` and ``first_difference``: the check of a GPU's medians
  against the CPU (see :mod:`dcbg.engines.verification`) copies a sample
  of pixel columns out of a batch's frames, and compares the GPU's medians
  at those columns with the CPU's, without copying them first; values of 1
  or 2 bytes (signed ones as their unsigned views: only equality counts).
  Both prefetch the next row while they read one, which a copy by numpy
  does not.

The kernels release the GIL and exist in two builds with the same results:

- ``"C"``: the extension module ``_compiled`` (source ``compiled.c``), which
  pip compiles when it installs dcbg where a C compiler and the Python
  headers are present. It loads in a millisecond.
- ``"numba"``: :mod:`dcbg.cpukernels.jit`, compiled by numba on first use and
  cached. A process pays 0.5–1 s to import numba and load its cache. An
  install without a compiler still works, on this build.

:func:`cpu_kernels` uses the C build where it is installed; ``dcbg info``
and every run log say which build ran.
"""
from __future__ import annotations

import functools
import typing

import numpy as np

BUILDS = ("C", "numba")
"""The builds of the kernels, preferred first"""


class CPUKernels(typing.NamedTuple):
    """The kernels of one build"""

    build: str
    """which build: C or numba"""
    rolling_median_columns: typing.Callable
    """``(frames, out, kernel_size, output_size, start, stop, counts) -> None``;
    `counts`: see :func:`scratch`"""
    fletcher32: typing.Callable
    """``(uint8 array) -> int``"""
    gather_columns: typing.Callable
    """``(source, columns, out) -> None``: ``out[r, j] = source[r, columns[j]]``"""
    first_difference: typing.Callable
    """``(actual, columns or None, expected) -> int``: the flat index in `expected` of the
    first ``actual[r, columns[j]] != expected[r, j]``, or -1"""


MEDIAN_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
"""The types of frames ``rolling_median_columns`` takes"""


def scratch(dtype, width: int, kernel_size: int) -> np.ndarray:
    """The scratch space ``rolling_median_columns`` needs for `width` columns of `dtype` frames

    For uint8 frames a histogram of 256 counts per column, in the narrowest
    unsigned type that holds `kernel_size`; for uint16 frames `kernel_size`
    values per column (the sorted windows, or the copies of the windows that
    the window kernels read when a median leaves their levels). The kernels
    fill it themselves, so it is not initialised: pages the kernel never
    touches cost no memory.

    Parameters
    ----------
    dtype: numpy dtype
        The frames' type, uint8 or uint16 (signed frames are passed to the
        kernels as their unsigned views with the sign bit flipped).
    width: int
        Number of pixel columns (``stop - start``).
    kernel_size: int
        Number of frames in each window.
    """
    dtype = np.dtype(dtype)
    if dtype == np.uint16:
        return np.empty((width, kernel_size), np.uint16)
    if dtype == np.uint8:
        from ..engines.base import count_dtype
        return np.empty((width, 256), count_dtype(kernel_size))
    raise TypeError(f"The CPU kernels take {' or '.join(map(str, MEDIAN_DTYPES))} frames, not "
                    f"{dtype}; convert the frames to one of these types.")


def load_build(build: str) -> CPUKernels:
    """The kernels of `build` ("C" or "numba"); ImportError if it is not installed"""
    if build == "C":
        from . import _compiled as module
    elif build == "numba":
        from . import jit as module
    else:
        raise ValueError(f"Unknown CPU kernel build '{build}'; use one of {BUILDS}.")
    return CPUKernels(build, module.rolling_median_columns, module.fletcher32,
                      module.gather_columns, module.first_difference)


@functools.cache
def cpu_kernels() -> CPUKernels:
    """The kernels this process runs: the C build where installed, numba's otherwise"""
    try:
        return load_build("C")
    except ImportError:
        return load_build("numba")


def median_implementation() -> str:
    """Which implementation of the median the kernels of this process run

    For the C build the fastest of those ``_compiled.median_implementations()``
    lists for this CPU: ``"avx2"`` (32-byte vectors, on CPUs with AVX2),
    ``"simd128"`` (16-byte vectors, any x86-64 or ARM64 CPU) or ``"scalar"``
    (the histogram kernel for uint8 frames and the sorted windows for uint16,
    where the compiler had no vector extensions). All give the same bytes.
    For numba's build: ``"numba"``.
    """
    if cpu_kernels().build != "C":
        return "numba"
    from . import _compiled
    return _compiled.median_implementations()[0]


def describe_build() -> str:
    """Which build this process runs, and for numba's, how to get the C one"""
    if cpu_kernels().build == "C":
        return f"C (compiled when dcbg was installed; median: {median_implementation()})"
    return ("numba (the C build is missing: reinstall dcbg where a C compiler and the "
            "Python headers are present, and each run starts 0.5-1 s sooner)")


__all__ = ["BUILDS", "CPUKernels", "MEDIAN_DTYPES", "cpu_kernels", "describe_build",
           "load_build", "median_implementation", "scratch"]
