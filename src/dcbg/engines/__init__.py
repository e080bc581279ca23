"""Engines compute rolling medians on a device; all implement :class:`Engine`

- :mod:`~dcbg.engines.cpu`: a histogram median per pixel on CPU threads or
  RawArray worker processes;
- :mod:`~dcbg.engines.cuda`: the same algorithm as a CUDA kernel
  (``kernels/rollmed.cu``) in an overlapped copy/compute pipeline, and
  every CuPy and NVML call of dcbg;
- :mod:`~dcbg.engines.split`: one recording split across several GPUs.

:func:`engine_for` is the one place that turns a chosen device into an
engine. Engines import their kernels (and numba or CuPy) only when they are
built, so that ``import dcbg`` stays quick.
"""
from __future__ import annotations

import functools
import threading
import typing

from .base import Engine, count_dtype

if typing.TYPE_CHECKING:
    from ..devices import DeviceChoice


def engine_for(device: DeviceChoice, image_shape, kernel_size: int, batch_size: int,
               num_cpus: int, windows: int) -> Engine:
    """The engine that computes `windows` windows on `device`

    Parameters
    ----------
    device: dcbg.devices.DeviceChoice
        The device chosen by :func:`dcbg.devices.select_device`.
    image_shape: tuple of int
        Shape of one frame.
    kernel_size, batch_size: int
        The method's keywords.
    num_cpus: int
        CPU workers (used by the CPU engine).
    windows: int
        Number of windows of the run (the CPU engine picks its workers by it).
    """
    if device.split:
        from .split import SplitRollingMedian
        return SplitRollingMedian(image_shape, kernel_size, batch_size, device.indices)
    if device.kind == "cuda":
        from .cuda import CUDARollingMedian
        return CUDARollingMedian(image_shape, kernel_size, batch_size, device.index)
    from .cpu import CPURollingMedian
    return CPURollingMedian(image_shape, kernel_size, batch_size, num_cpus, windows)


def preload(device: DeviceChoice):
    """Start loading what the engine for `device` needs, in the background

    numba's build of the CPU kernel takes a good part of a second to load
    (numba and its cache); loading it while the input is opened and its
    first frames are read keeps short runs short. The C build loads at once.
    Calling it again costs nothing. CUDA kernels are compiled when the device
    is chosen.
    """
    if device.kind == "cpu":
        _preload_cpu()


@functools.cache
def _preload_cpu() -> threading.Thread:
    def load():
        from .cpu import warm_up_kernel
        warm_up_kernel()
    thread = threading.Thread(target=load, name="dcbg-preload", daemon=True)
    thread.start()
    return thread


__all__ = ["Engine", "count_dtype", "engine_for", "preload"]
