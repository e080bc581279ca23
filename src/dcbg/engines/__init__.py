"""Engines compute rolling medians on a device; all implement :class:`Engine`

- :mod:`~dcbg.engines.cpu`: the compiled median kernels (see
  :mod:`dcbg.cpukernels`) on CPU threads or RawArray worker processes;
- :mod:`~dcbg.engines.cuda`: a median per pixel and thread as a CUDA kernel in an
  overlapped copy/compute pipeline, with the kernel's source, compilation
  and launch plans in :mod:`~dcbg.engines.cudakernel` and its batch sizes
  and page-locked buffers in :mod:`~dcbg.engines.cudamemory`;
- :mod:`~dcbg.engines.split`: one recording split across several GPUs;
- :mod:`~dcbg.engines.verification`: a GPU's results checked against the
  CPU kernel before they are written.

:func:`engine_for` is the one place that turns a device made ready
(:meth:`dcbg.devices.DeviceChoice.ready`, which loaded its kernels) into an
engine; the engines never compile or wait for a kernel themselves. Engines
import their kernels (and numba or CuPy) only when they are built, so that
``import dcbg`` stays quick.
"""
from __future__ import annotations

import typing

import numpy as np

from .base import Engine, count_dtype

if typing.TYPE_CHECKING:
    from ..devices import ReadyDevice


def engine_for(device: ReadyDevice, image_shape, kernel_size: int, batch_size: int,
               num_cpus: int, windows: int, verify: str = "sample", dtype=np.uint8,
               device_batch_cap: int | None = None) -> Engine:
    """The engine that computes `windows` windows on `device`

    Parameters
    ----------
    device: dcbg.devices.ReadyDevice
        The chosen device, its kernels loaded (:meth:`dcbg.devices.DeviceChoice.ready`).
    image_shape: tuple of int
        Shape of one frame.
    kernel_size, batch_size: int
        The method's keywords (`batch_size` bounds the CPU engine's batches).
    num_cpus: int
        CPU workers (used by the CPU engine), as decided
        (:class:`dcbg.settings.RunSettings`).
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
        GPU engines take int8 and int16 too, the CPU engine does not. A GPU
        engine takes the ready device's kernels of this dtype
        (:meth:`dcbg.devices.ReadyDevice.kernels_for`, which loads them if
        the device was made ready for another dtype).
    device_batch_cap: int, optional
        Most windows of a GPU batch, below what memory allows (the self-test
        overlaps several batches of a short stack); the CPU engine ignores it.
    """
    # A GPU batch is sized by device and host memory, never by `batch_size`
    # (which does not change the result): it may take up to all windows.
    gpu_windows = windows if device_batch_cap is None else min(windows, device_batch_cap)
    if device.choice.split:
        from .split import SplitRollingMedian
        return SplitRollingMedian(image_shape, kernel_size, gpu_windows,
                                  device.kernels_for(dtype), verify=verify, dtype=dtype)
    if device.kind == "cuda":
        from .cuda import CUDARollingMedian
        kernels, = device.kernels_for(dtype)
        return CUDARollingMedian(image_shape, kernel_size, gpu_windows, kernels,
                                 verify=verify, dtype=dtype)
    from .cpu import CPURollingMedian
    return CPURollingMedian(image_shape, kernel_size, batch_size, num_cpus, windows, dtype)


__all__ = ["Engine", "count_dtype", "engine_for"]
