"""One recording split into event ranges, one per CUDA device ("cuda:all")"""
from __future__ import annotations

import collections
import logging
import threading

import numpy as np

from . import cudamemory
from .base import Engine
from .batches import partition
from .cuda import CUDARollingMedian

logger = logging.getLogger(__name__)


class _Cancelled(Exception):
    """Another range failed; this one stops"""


class SplitRollingMedian(Engine):
    """Contiguous ranges of windows, each on its own CUDA engine, all at once

    Range ``i`` computes windows ``first_i … stop_i-1`` on device
    ``i % len(kernels)``; it reads frames ``first_i …
    stop_i+kernel_size-2``, so neighbouring ranges overlap by
    ``kernel_size-1`` frames and every window sees exactly the frames it
    would see on one device. Each range writes its windows at their own
    position, so the file is byte-identical to a single-device run. With
    one device, two ranges share it (the same code path, checkable on any
    machine); engines that share a device share its free memory, and all
    ranges share the page-locked host memory.

    Parameters
    ----------
    image_shape: tuple of int
        Shape of one frame.
    kernel_size, windows: int
        As for :class:`~dcbg.engines.cuda.CUDARollingMedian` (per device).
    kernels: sequence of dcbg.engines.cudakernel.CompiledKernels
        The kernels of `dtype` loaded on each CUDA device, as the ready device
        holds them (:meth:`dcbg.devices.ReadyDevice.kernels_for`).
    verify: str
        Which results the CPU checks (see :class:`~dcbg.engines.cuda.CUDARollingMedian`).
    dtype: numpy.dtype, optional
        Of the frames and medians: uint8 (default), int8, uint16 or int16.
    """

    def __init__(self, image_shape, kernel_size, windows, kernels, verify: str = "sample",
                 dtype=np.uint8):
        super().__init__(image_shape, kernel_size, windows, dtype)
        kernels = list(kernels)
        ranges = max(2, len(kernels))
        devices = [kernels[i % len(kernels)] for i in range(ranges)]
        sharing = collections.Counter(loaded.device_index for loaded in devices)
        free = {index: cudamemory.free_device_memory(index) for index in sharing}
        host = cudamemory.pinned_memory_budget()
        self.engines = [CUDARollingMedian(image_shape, kernel_size, windows, loaded,
                                          memory_share=1 / sharing[loaded.device_index],
                                          free_bytes=free[loaded.device_index],
                                          host_share=1 / ranges, host_bytes=host,
                                          verify=verify, dtype=self.dtype)
                        for loaded in devices]

    def facts(self) -> dict:
        """The ranges that ran at once, the device batch of each, the pixel-outputs checked"""
        return {"ranges": len(self.engines),
                "batch_windows": [engine.batch_windows for engine in self.engines],
                "verified_pixel_outputs": sum(engine.result_check.pixel_outputs
                                              for engine in self.engines)}

    def close(self):
        for engine in self.engines:
            engine.close()

    def run(self, read_into, first, stop, write_at, on_written=None) -> np.ndarray:
        """Compute windows ``first … stop-1``, all ranges at once"""
        failed = threading.Event()
        results: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []
        spans = [(first + a, first + b) for a, b in partition(stop - first, len(self.engines))]

        def work(part, engine, range_first, range_stop):
            def checked_write(offset, frames):
                if failed.is_set():
                    raise _Cancelled()
                write_at(offset, frames)
            try:
                results[part] = engine.run(read_into, range_first, range_stop,
                                           checked_write, on_written)
            except BaseException as error:  # handed to the caller below
                failed.set()
                errors.append(error)

        threads = [threading.Thread(target=work, args=(part, engine, a, b),
                                    name=f"dcbg-range-{part}", daemon=True)
                   for part, (engine, (a, b)) in enumerate(zip(self.engines, spans,
                                                                strict=False))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # The ranges ran at the same time: a stage took as long as its longest range.
        self.stage_seconds = {}
        for engine in self.engines:
            for stage, seconds in engine.stage_seconds.items():
                self.stage_seconds[stage] = max(self.stage_seconds.get(stage, 0.0), seconds)
        real = [error for error in errors if not isinstance(error, _Cancelled)]
        if errors:
            raise (real or errors)[0]
        logger.info("Split windows %d to %d into ranges %s on CUDA devices %s", first,
                    stop - 1, spans, [engine.device_index for engine in self.engines])
        return results[len(spans) - 1]
