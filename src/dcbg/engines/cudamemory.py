"""Memory of the CUDA engine: how large a device batch may be, and page-locked host buffers

A device batch is sized from the device's free memory **and** the host's
available memory, and capped at :data:`DEVICE_BATCH_LIMIT` windows (or, for
large kernels, the windows whose time segments fill the device) and
:data:`BUFFER_BYTES_LIMIT` bytes per output buffer: a GPU is busy with a few
thousand 80×320 frames per launch, and larger batches only pin more host
memory. The method's ``batch_size`` plays no part; the result never depends
on the batch.

Page-locked (pinned) host buffers are slow to allocate, so they are kept
for the whole process in :data:`pinned_buffers`, by device and bytes per
frame, and handed to one run after the other, whatever the dtype of its
frames. Batches are sized in bytes too: a frame of 16-bit values takes
twice the memory of one of 8-bit values. Each is allocated at its exact size
(CuPy's pinned pool would round it up to a power of two). They are released
when memory runs out (before the run retries with a smaller batch) and at
exit.
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import pathlib
import threading

import numpy as np

from ..errors import first_line, setting_error
from .cudacontext import on_device

logger = logging.getLogger(__name__)

DEVICE_MEMORY_FRACTION = 0.6
"""Share of the device's free memory that the batch buffers may take"""

HOST_MEMORY_FRACTION = 0.5
"""Share of the host's available memory that page-locked buffers may take"""

DEVICE_BATCH_LIMIT = 4096
"""Most windows in one device batch, unless more are needed to fill the device"""

BUFFER_BYTES_LIMIT = 256 * 2**20
"""Most bytes in one output buffer of a device batch"""

DEVICE_BUFFERS = (2, 2)
"""Device buffers of a run: (input, output), double buffered; the CUDA engine's pipeline
rotates as many"""

PINNED_BUFFERS = (2, 3)
"""Page-locked host buffers of a run: (input, output); the writer holds one more"""

MEMINFO = pathlib.Path("/proc/meminfo")
"""Where Linux reports the memory available to new allocations"""


class PinnedMemoryError(MemoryError):
    """Page-locked host memory for the batch buffers could not be allocated"""


def device_batch_size(windows: int, kernel_size: int, pixels: int, free_device_bytes: int,
                      host_bytes: int | None, device_share: float = 1.0,
                      host_share: float = 1.0, fill_windows: int = 0,
                      itemsize: int = 1) -> int:
    """Largest device batch whose buffers fit on the device and in the host's memory

    The device holds :data:`DEVICE_BUFFERS` input buffers of ``batch +
    kernel_size`` frames and output buffers of ``batch`` frames, the host pins
    :data:`PINNED_BUFFERS` of the same sizes. The batch is at most
    :data:`DEVICE_BATCH_LIMIT` windows or `fill_windows`, whichever is more.

    Parameters
    ----------
    windows: int
        Windows of the run (a longer batch is of no use).
    kernel_size, pixels: int
        Frames per window, pixels per frame.
    free_device_bytes: int
        Free memory of the device.
    host_bytes: int or None
        Page-locked memory this process may take (:func:`pinned_memory_budget`);
        None for no limit.
    device_share, host_share: float
        This engine's part of the device and of the host, when several
        engines run at once.
    fill_windows: int
        Windows a batch needs to fill the device with time segments
        (:meth:`~dcbg.engines.cudakernel.Launcher.windows_to_fill`): with a
        large kernel, :data:`DEVICE_BATCH_LIMIT` windows make too few
        segments to keep every SM busy.
    itemsize: int
        Bytes per pixel value (1 for uint8 and int8 frames, 2 for uint16 and
        int16 ones).

    Raises
    ------
    MemoryError
        If not even a batch of one window fits.
    """
    frame_bytes = pixels * itemsize
    inputs, outputs = DEVICE_BUFFERS
    rows = int(free_device_bytes * DEVICE_MEMORY_FRACTION * device_share) // frame_bytes
    batch = (rows - inputs * kernel_size) // (inputs + outputs)
    if batch < 1:
        raise setting_error(
            MemoryError, "The GPU has {free:.0f} MiB free, too little for frames of {pixels} "
            "pixels with kernel_size={kernel_size}; free GPU memory or use {setting}.",
            "device", suggested=("cpu",), free=free_device_bytes / 2**20, pixels=pixels,
            kernel_size=kernel_size)
    if host_bytes is not None:
        inputs, outputs = PINNED_BUFFERS
        rows = int(host_bytes * host_share) // frame_bytes
        fitting = (rows - inputs * kernel_size) // (inputs + outputs)
        if fitting < 1:
            raise setting_error(
                MemoryError, "Only {share:.0f} MiB of host memory may be page-locked (a share "
                "of the available memory), too little for frames of {pixels} pixels with "
                "kernel_size={kernel_size}; close other programs or use {setting}.", "device",
                suggested=("cpu",), share=host_bytes * host_share / 2**20, pixels=pixels,
                kernel_size=kernel_size)
        batch = min(batch, fitting)
    return max(1, min(batch, windows, max(DEVICE_BATCH_LIMIT, fill_windows),
                      BUFFER_BYTES_LIMIT // frame_bytes))


def available_host_memory(meminfo: pathlib.Path = MEMINFO) -> int | None:
    """Bytes of host memory available to new allocations (MemAvailable); None if unknown"""
    try:
        for line in meminfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "MemAvailable":
                number, _, unit = value.strip().partition(" ")
                return int(number) * (1024 if unit.strip().lower() == "kb" else 1)
    except (OSError, ValueError):
        pass
    try:  # other Unixes: free pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def pinned_memory_budget(meminfo: pathlib.Path = MEMINFO) -> int | None:
    """Page-locked memory the engines of this process may hold now; None if unknown

    A share of the available memory, counting the buffers this process
    keeps already (they are not available to others, but are to it).
    """
    available = available_host_memory(meminfo)
    if available is None:
        return None
    return int((available + pinned_buffers.held_bytes()) * HOST_MEMORY_FRACTION)


def free_device_memory(device_index: int) -> int:
    """Free bytes on a CUDA device now, counting what CuPy's pool keeps for reuse"""
    import cupy

    with on_device(device_index):
        free, _total = cupy.cuda.runtime.memGetInfo()
        kept = cupy.get_default_memory_pool().free_bytes()
    return int(free) + int(kept)


def release_device_memory(device_index: int):
    """Give the device memory that CuPy's pool keeps back to the driver"""
    import cupy

    with on_device(device_index):
        cupy.get_default_memory_pool().free_all_blocks()


def allocate_pinned(device_index: int, rows: int, row_bytes: int) -> np.ndarray:
    """A ``(rows, row_bytes)`` uint8 array in page-locked memory of exactly that size

    Raises
    ------
    PinnedMemoryError
        If the host cannot page-lock that much memory.
    """
    import cupy

    nbytes = rows * row_bytes
    try:
        with on_device(device_index):  # no context on another device for it
            memory = cupy.cuda.PinnedMemory(nbytes, cupy.cuda.runtime.hostAllocPortable)
    except cupy.cuda.runtime.CUDARuntimeError as error:
        if "alloc" in str(error).lower():
            raise PinnedMemoryError(
                f"cannot page-lock {nbytes / 2**20:.0f} MiB of host memory "
                f"({first_line(error)})") from error
        raise
    _release_at_exit()
    pointer = cupy.cuda.PinnedMemoryPointer(memory, 0)
    return np.frombuffer(pointer, np.uint8, nbytes).reshape(rows, row_bytes)


class PinnedBuffers:
    """Page-locked host buffers kept for the process, by device and bytes per frame

    A run takes the buffers it needs and gives them back when it ends, so
    runs on one device may follow each other (or run side by side) without
    allocating again. Buffers larger than asked for serve too, and so do
    those of frames of another dtype with as many bytes. Kept buffers of
    another frame size on the device are released when a run takes buffers,
    and so are those too small when a run needs more than fit.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._free: dict[tuple[int, int], list[np.ndarray]] = {}

    def take(self, device_index: int, rows: int, pixels: int, count: int,
             dtype=np.uint8) -> list[np.ndarray]:
        """`count` buffers of at least ``(rows, pixels)`` of `dtype`, kept ones first

        Raises
        ------
        PinnedMemoryError
            If the host cannot page-lock the missing ones.
        """
        row_bytes = pixels * np.dtype(dtype).itemsize
        with self._lock:
            for key in [key for key in self._free if key[0] == device_index
                        and key[1] != row_bytes]:
                del self._free[key]
            free = self._free.setdefault((device_index, row_bytes), [])
            free.sort(key=len)
            fitting = [buffer for buffer in free if len(buffer) >= rows][:count]
            # Runs of this size need more: the smaller kept buffers are of no use any more.
            free[:] = [buffer for buffer in free
                       if not any(buffer is taken for taken in fitting)
                       and (len(fitting) == count or len(buffer) >= rows)]
        try:
            while len(fitting) < count:
                fitting.append(allocate_pinned(device_index, rows, row_bytes))
        except BaseException:
            self.give_back(device_index, fitting)
            raise
        return [buffer.view(dtype) for buffer in fitting]

    def give_back(self, device_index: int, buffers: list[np.ndarray]):
        """Keep `buffers` (of any dtype, as :meth:`take` gave them) for the next run on the
        device"""
        with self._lock:
            for buffer in buffers:
                raw = buffer.view(np.uint8)  # kept by bytes per frame
                self._free.setdefault((device_index, raw.shape[1]), []).append(raw)

    def release(self, device_index: int | None = None):
        """Free the kept buffers of one device, or of all"""
        with self._lock:
            for key in [key for key in self._free
                        if device_index is None or key[0] == device_index]:
                del self._free[key]

    def held_bytes(self) -> int:
        """Bytes of page-locked memory kept for the next run"""
        with self._lock:
            return sum(buffer.nbytes for free in self._free.values() for buffer in free)


pinned_buffers = PinnedBuffers()
"""The page-locked buffers of this process"""


@functools.cache
def _release_at_exit():
    # Registered after CuPy's own exit handlers, so it runs before them,
    # while CuPy can still unpin.
    atexit.register(lambda: pinned_buffers.release())
