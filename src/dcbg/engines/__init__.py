"""Engines compute rolling medians on a device; all implement :class:`Engine`

- :mod:`~dcbg.engines.cpu`: a histogram median per pixel on CPU threads or
  RawArray worker processes;
- :mod:`~dcbg.engines.cuda`: the same algorithm as a CUDA kernel in an
  overlapped copy/compute pipeline, with the kernel's source, compilation
  and launch plans in :mod:`~dcbg.engines.cudakernel` and its batch sizes
  and page-locked buffers in :mod:`~dcbg.engines.cudamemory`;
- :mod:`~dcbg.engines.split`: one recording split across several GPUs;
- :mod:`~dcbg.engines.verification`: a GPU's results checked against the
  CPU kernel before they are written.

:func:`engine_for` is the one place that turns a chosen device into an
engine. Engines import their kernels (and numba or CuPy) only when they are
built, so that ``import dcbg`` stays quick; :func:`preload` starts loading
them in the background as soon as the device is known.
"""
from __future__ import annotations

import functools
import threading
import typing

import numpy as np

from .base import Engine, count_dtype

if typing.TYPE_CHECKING:
    from ..devices import DeviceChoice


def engine_for(device: DeviceChoice, image_shape, kernel_size: int, batch_size: int,
               num_cpus: int, windows: int, verify: str = "sample",
               dtype=np.uint8) -> Engine:
    """The engine that computes `windows` windows on `device`

    Parameters
    ----------
    device: dcbg.devices.DeviceChoice
        The device chosen by :func:`dcbg.devices.select_device`.
    image_shape: tuple of int
        Shape of one frame.
    kernel_size, batch_size: int
        The method's keywords (`batch_size` bounds the CPU engine's batches).
    num_cpus: int
        CPU workers (used by the CPU engine).
    windows: int
        Number of windows of the run (the CPU engine picks its workers by it; a GPU
        batch may hold them all).
    verify: str
        Which results of a GPU the CPU checks: "sample", "all" or "off"
        (see :func:`dcbg.settings.parse_verify`); the CPU engine ignores it.
    dtype: numpy dtype, optional
        The type of the frames the engine reads and the medians it writes
        (see :class:`Engine`), handed to every engine: uint8 (files, the
        default), or uint16 (arrays; the array functions flip signed frames
        in host memory into unsigned values, see :mod:`dcbg.dtypes`). The
        GPU engines take int8 and int16 too, the CPU engine does not.
    """
    # A GPU batch is sized by device and host memory, never by `batch_size`
    # (which does not change the result): it may take up to all windows.
    if device.split:
        from .split import SplitRollingMedian
        return SplitRollingMedian(image_shape, kernel_size, windows, device.indices,
                                  verify=verify, dtype=dtype)
    if device.kind == "cuda":
        from .cuda import CUDARollingMedian
        return CUDARollingMedian(image_shape, kernel_size, windows, device.index,
                                 verify=verify, dtype=dtype)
    from .cpu import CPURollingMedian
    return CPURollingMedian(image_shape, kernel_size, batch_size, num_cpus, windows, dtype)


def preload(device: DeviceChoice):
    """Start loading what the engine for `device` needs, in the background

    numba's build of the CPU kernel takes a good part of a second to load
    (numba and its cache), and NVRTC about as long to compile the CUDA
    kernel; doing it while the input is opened and its first frames are read
    keeps short runs short. The C build loads at once. Calling it again
    costs nothing.
    """
    if device.kind == "cpu":
        _preload_cpu()
    else:
        from . import cudakernel
        for index in device.indices or (device.index,):
            cudakernel.start_compiling(index)


def ready(device: DeviceChoice):
    """Wait until what :func:`preload` started for `device` is loaded

    Raises
    ------
    DeviceError
        If the CUDA kernel does not compile or load on a device (the error
        of an unusable device, as when it is chosen).
    """
    if device.kind == "cuda":
        from . import cudakernel
        for index in device.indices or (device.index,):
            cudakernel.kernels_or_device_error(index)


@functools.cache
def _preload_cpu() -> threading.Thread:
    def load():
        from .cpu import warm_up_kernel
        warm_up_kernel()
    thread = threading.Thread(target=load, name="dcbg-preload", daemon=True)
    thread.start()
    return thread


__all__ = ["Engine", "count_dtype", "engine_for", "preload", "ready"]
