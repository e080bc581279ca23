"""CUDA backend: the rolling-median kernel in an overlapped batch pipeline

The kernel source is ``kernels/rollmed.cu`` inside the package; CuPy compiles
it with NVRTC once per device (and caches the binary on disk). A batch flows
through four stages that overlap:

1. a reader thread reads and decompresses batch n+1 into a pinned buffer,
2. the copy stream uploads batch n, the compute stream runs the kernel on it,
3. the copy stream downloads batch n-1 into a pinned buffer while batch n
   is computed,
4. a writer thread compresses and writes batch n-1.

Device buffers are sized from the device's free memory, so a large
`batch_size` is split into smaller device batches instead of failing with
out-of-memory; the result does not depend on the batch size.

CuPy is imported lazily: planning functions work without it, and importing
this module never fails on a machine without CUDA.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import logging
import time

import numpy as np

from .errors import DeviceError, first_line
from .pipeline import Batch, Prefetcher, WriterThread, plan_windows

logger = logging.getLogger(__name__)

KERNEL_FILE = "kernels/rollmed.cu"
"""The kernel source, relative to the package"""

SHARED_BYTES_PER_BLOCK = 32 * 1024
"""Dynamic shared memory per block; below the 48 KiB that needs no opt-in"""

MEMORY_FRACTION = 0.6
"""Share of the device's free memory that the batch buffers may take"""

MIN_SEGMENT_WINDOWS = 4
"""A time segment is at least this many kernel sizes long (warm-up ≤ 25 %)"""


def kernel_source() -> str:
    """The CUDA C++ source of the rolling-median kernel"""
    return importlib.resources.files("dcbg").joinpath(KERNEL_FILE).read_text()


def count_bytes(kernel_size: int) -> int:
    """Bytes per histogram count: the smallest width that holds kernel_size"""
    if kernel_size <= 0xFF:
        return 1
    if kernel_size <= 0xFFFF:
        return 2
    return 4


def kernel_name(kernel_size: int) -> str:
    """Name of the kernel entry point for this kernel size"""
    return f"dcbg_rollmed_count{8 * count_bytes(kernel_size)}"


def block_shape(kernel_size: int) -> tuple[int, int]:
    """Threads per block and its dynamic shared memory in bytes

    Each thread holds a 256-bin histogram, so the count width fixes how
    many threads fit into :data:`SHARED_BYTES_PER_BLOCK`.
    """
    per_thread = 256 * count_bytes(kernel_size)
    block = SHARED_BYTES_PER_BLOCK // per_thread
    return block, block * per_thread


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Grid, block and time segments of one kernel launch"""

    kernel: str
    """entry point in rollmed.cu"""
    block: int
    """threads per block (pixels per block)"""
    grid: tuple[int, int]
    """(pixel blocks, time segments)"""
    segment_length: int
    """windows per time segment"""
    shared_mem: int
    """dynamic shared memory per block in bytes"""


def plan_launch(pixels: int, output_size: int, kernel_size: int,
                resident_threads: int) -> LaunchPlan:
    """Plan a launch that fills the GPU

    One thread per pixel and time segment. A frame of 80×320 pixels gives
    25,600 threads, far fewer than an H100 keeps resident, so the batch is
    split in time until about twice the resident threads exist, as long as
    each segment stays at least ``MIN_SEGMENT_WINDOWS * kernel_size`` long.

    Parameters
    ----------
    pixels: int
        Pixels per frame.
    output_size: int
        Windows in the batch.
    kernel_size: int
        Frames per window.
    resident_threads: int
        Threads the device keeps resident with this shared-memory use.
    """
    block, shared_mem = block_shape(kernel_size)
    blocks = -(-pixels // block)
    wanted_segments = max(1, -(-2 * resident_threads // (blocks * block)))
    shortest = max(1, min(output_size, MIN_SEGMENT_WINDOWS * kernel_size))
    segment_length = max(-(-output_size // wanted_segments), shortest)
    segments = -(-output_size // segment_length)
    return LaunchPlan(kernel_name(kernel_size), block, (blocks, segments), segment_length,
                      shared_mem)


def fit_batch_size(batch_size: int, kernel_size: int, pixels: int, free_bytes: int) -> int:
    """Largest device batch ≤ `batch_size` whose buffers fit in free memory

    The device holds two input buffers of ``batch + kernel_size`` frames
    and two output buffers of ``batch`` frames (double buffering).

    Raises
    ------
    MemoryError
        If not even a batch of one window fits.
    """
    budget = int(free_bytes * MEMORY_FRACTION) // pixels
    fitting = (budget - 2 * kernel_size) // 4
    if fitting < 1:
        raise MemoryError(
            f"The GPU has {free_bytes / 2**20:.0f} MiB free, too little for frames of "
            f"{pixels} pixels with kernel_size={kernel_size}; free GPU memory or use "
            f"--device cpu.")
    return min(batch_size, fitting)


@functools.cache
def load_kernels(device_index: int) -> dict:
    """Compile rollmed.cu for a device, once per process and device

    Returns the three entry points (count widths 8, 16 and 32) as CuPy
    RawKernels. CuPy keeps the compiled binary in its on-disk kernel cache,
    so later processes skip NVRTC.
    """
    import cupy

    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=kernel_source(), options=("--std=c++14",))
        kernels = {name: module.get_function(name)
                   for name in (kernel_name(1), kernel_name(256), kernel_name(65536))}
    return kernels


def resident_threads(device_index: int, plan_block: int, shared_mem: int) -> int:
    """Threads the device keeps resident for blocks of this shape"""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_index)
    per_sm_by_memory = props["sharedMemPerMultiprocessor"] // max(shared_mem, 1)
    per_sm_by_threads = props["maxThreadsPerMultiProcessor"] // plan_block
    return props["multiProcessorCount"] * plan_block * max(
        1, min(per_sm_by_memory, per_sm_by_threads))


class CUDARollingMedian:
    """Rolling-median engine on one CUDA device

    Parameters
    ----------
    image_shape: tuple of int
        Shape of one frame.
    kernel_size: int
        Number of events in each window.
    batch_size: int
        Requested batch size; :attr:`batch_size` may be smaller so that the
        buffers fit into the device's free memory.
    device_index: int
        CUDA device ordinal.
    """

    def __init__(self, image_shape, kernel_size, batch_size, device_index=0):
        import cupy

        self.cupy = cupy
        self.image_shape = tuple(image_shape)
        self.pixels = int(np.prod(self.image_shape))
        self.kernel_size = kernel_size
        self.device_index = device_index
        self.kernels = load_kernels(device_index)
        from .devices import describe_cuda_devices
        for info in describe_cuda_devices():  # pynvml: name, memory, driver for the log
            if info["index"] == device_index:
                logger.info("CUDA device %d: %s, %.1f of %.1f GiB free, driver %s",
                            device_index, info["name"], info["memory_free"] / 2**30,
                            info["memory_total"] / 2**30, info["driver"])
        with cupy.cuda.Device(device_index):
            free, total = cupy.cuda.runtime.memGetInfo()
        self.batch_size = fit_batch_size(batch_size, kernel_size, self.pixels, free)
        """device batch size (windows per launch)"""
        if self.batch_size < batch_size:
            logger.info("Device batch of %d frames (of %d asked for) fits %.0f MiB free",
                        self.batch_size, batch_size, free / 2**20)
        self.resident_threads = resident_threads(device_index, *block_shape(kernel_size))
        """threads the device keeps resident with this kernel's shared memory"""
        self.stage_seconds: dict[str, float] = {}
        """seconds the main thread spent per stage (summed over out-of-memory retries)"""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free_memory()

    def free_memory(self):
        """Give cached device and pinned memory back (buffers live only in a run)"""
        try:
            self.cupy.get_default_memory_pool().free_all_blocks()
            self.cupy.get_default_pinned_memory_pool().free_all_blocks()
        except self.cupy.cuda.runtime.CUDARuntimeError:
            pass  # the context is broken after a kernel fault; the error is raised elsewhere

    def launch(self, frames, medians, output_size: int, stream=None):
        """Run the kernel on device arrays (asynchronously on `stream`)

        Parameters
        ----------
        frames: cupy.ndarray
            ``(rows, pixels)`` uint8 with at least ``output_size +
            kernel_size - 1`` rows.
        medians: cupy.ndarray
            ``(rows, pixels)`` uint8 receiving ``output_size`` rows.
        """
        plan = plan_launch(self.pixels, output_size, self.kernel_size, self.resident_threads)
        kernel = self.kernels[plan.kernel]
        args = (frames, medians, np.int64(self.pixels), np.int32(output_size),
                np.int32(self.kernel_size), np.int32(plan.segment_length))
        stream = stream if stream is not None else self.cupy.cuda.get_current_stream()
        with stream:
            kernel(plan.grid, (plan.block,), args, shared_mem=plan.shared_mem)

    def run(self, read_into, batches: list[Batch], write, on_written=None) -> np.ndarray:
        """Compute all batches with reading, copies, kernel and writing overlapped

        If the device runs out of memory (at the start or in the middle, for
        example because another process took memory), the batch size is
        halved and the run goes on from the first window not yet written;
        the result stays the same.

        Returns the last computed background frame (flattened).

        Raises
        ------
        DeviceError
            If the device or the kernel fails.
        MemoryError
            If not even a batch of one window fits on the device.
        """
        cupy = self.cupy
        written = 0

        def counted_write(frames):
            nonlocal written
            write(frames)
            written += len(frames)

        first = batches[0].start
        stop = batches[-1].start + batches[-1].output_size
        while True:
            try:
                return self._run_batches(read_into, batches, counted_write, on_written)
            except cupy.cuda.memory.OutOfMemoryError as error:
                smaller = self.batch_size // 2
                if smaller < 1:
                    raise MemoryError(
                        f"CUDA device {self.device_index} is out of memory even for one "
                        f"frame ({first_line(error)}); free GPU memory or use --device "
                        f"cpu.") from error
                self.free_memory()
                logger.warning("CUDA device %d ran out of memory with batches of %d frames "
                               "(%s); going on from frame %d with batches of %d",
                               self.device_index, self.batch_size, first_line(error),
                               first + written, smaller)
                self.batch_size = smaller
                batches = plan_windows(first + written, stop, self.kernel_size, smaller)
            except (cupy.cuda.runtime.CUDARuntimeError,
                    cupy.cuda.driver.CUDADriverError) as error:
                raise DeviceError(
                    f"CUDA device {self.device_index} failed while computing the median "
                    f"({first_line(error)}); no output was kept; check the GPU with "
                    f"nvidia-smi, or run with --device cpu.") from error

    def _run_batches(self, read_into, batches, write, on_written) -> np.ndarray:
        cupy = self.cupy
        import cupyx

        rows = max(batch.input_size for batch in batches)
        out_rows = max(batch.output_size for batch in batches)
        with cupy.cuda.Device(self.device_index):
            copy_stream = cupy.cuda.Stream(non_blocking=True)
            compute_stream = cupy.cuda.Stream(non_blocking=True)
            device_in = [cupy.empty((rows, self.pixels), np.uint8) for _ in range(2)]
            device_out = [cupy.empty((out_rows, self.pixels), np.uint8) for _ in range(2)]
            pinned_in = [cupyx.empty_pinned((rows, self.pixels), np.uint8) for _ in range(2)]
            pinned_out = [cupyx.empty_pinned((out_rows, *self.image_shape), np.uint8)
                          for _ in range(2)]
            prefetcher = Prefetcher(read_into, batches, pinned_in)
            writer = WriterThread(write, pinned_out, on_written)
            pending = None
            last = None
            device_seconds = 0.0
            try:
                for batch, frames in prefetcher:
                    t0 = time.perf_counter()
                    slot = batch.index % 2
                    device_in[slot][:batch.input_size].set(frames, stream=copy_stream)
                    uploaded = copy_stream.record()
                    compute_stream.wait_event(uploaded)
                    self.launch(device_in[slot], device_out[slot], batch.output_size,
                                compute_stream)
                    computed = compute_stream.record()
                    uploaded.synchronize()
                    prefetcher.release()
                    if pending is not None:  # download n-1 while n computes
                        last = self._download(*pending, copy_stream, writer)
                    pending = (batch, device_out[slot], computed)
                    device_seconds += time.perf_counter() - t0
                if pending is not None:
                    t0 = time.perf_counter()
                    last = self._download(*pending, copy_stream, writer)
                    device_seconds += time.perf_counter() - t0
            finally:
                prefetcher.close()
                writer.close()
                seconds = self.stage_seconds
                seconds["read"] = seconds.get("read", 0.0) + prefetcher.seconds
                seconds["median (GPU copies and kernel)"] = seconds.get(
                    "median (GPU copies and kernel)", 0.0) + device_seconds
                seconds["write"] = seconds.get("write", 0.0) + writer.seconds
        return last

    @staticmethod
    def _download(batch, medians, computed, copy_stream, writer) -> np.ndarray:
        buffer = writer.acquire()
        target = buffer.reshape(len(buffer), -1)[:batch.output_size]
        copy_stream.wait_event(computed)
        medians[:batch.output_size].get(stream=copy_stream, out=target)
        copy_stream.synchronize()
        writer.submit(buffer, batch.output_size)
        return target[-1].copy()


def split_windows(windows: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous window ranges ``(first, stop)``, as equal as possible"""
    parts = max(1, min(parts, windows))
    bounds = np.linspace(0, windows, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class _Cancelled(Exception):
    """Another range failed; this one stops"""


class SplitRollingMedian:
    """One recording split into contiguous event ranges, one per CUDA device

    Range ``i`` computes windows ``first_i … stop_i-1`` on device
    ``indices[i % len(indices)]``; it reads frames ``first_i …
    stop_i+kernel_size-2``, so neighbouring ranges overlap by
    ``kernel_size-1`` frames and every window sees exactly the frames it
    would see on one device. Each range writes its windows at their own
    position in the output, so the file is in event order and byte-identical
    to a single-device run. With one device, two ranges share it (the same
    code path, checkable on any machine).

    Parameters
    ----------
    image_shape: tuple of int
        Shape of one frame.
    kernel_size, batch_size: int
        As for :class:`CUDARollingMedian` (per device).
    indices: sequence of int
        CUDA device ordinals.
    """

    def __init__(self, image_shape, kernel_size, batch_size, indices):
        self.indices = list(indices)
        self.ranges = max(2, len(self.indices))
        self.engines = [CUDARollingMedian(image_shape, kernel_size, batch_size,
                                          self.indices[i % len(self.indices)])
                        for i in range(self.ranges)]
        self.kernel_size = kernel_size
        self.stage_seconds: dict[str, float] = {}
        """seconds per stage, summed over the ranges (they run at the same time)"""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for engine in self.engines:
            engine.free_memory()

    def run(self, read_into, windows: int, write_at, on_written=None) -> np.ndarray:
        """Compute windows ``0 … windows-1``, all ranges at once

        Parameters
        ----------
        read_into: callable
            As for :meth:`CUDARollingMedian.run` (called from several threads).
        windows: int
            Number of windows of the recording.
        write_at: callable
            ``write_at(offset, frames)`` stores frames at window `offset`.
        on_written: callable, optional
            Progress callback with a frame count (called from several threads).

        Returns the last window's background (flattened).
        """
        import threading

        failed = threading.Event()
        results: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []
        spans = split_windows(windows, self.ranges)

        def work(part, engine, first, stop):
            position = first

            def write(frames):
                nonlocal position
                if failed.is_set():
                    raise _Cancelled()
                write_at(position, frames)
                position += len(frames)
            try:
                batches = plan_windows(first, stop, self.kernel_size, engine.batch_size)
                results[part] = engine.run(read_into, batches, write, on_written)
            except BaseException as error:  # handed to the caller below
                failed.set()
                errors.append(error)

        threads = [threading.Thread(target=work, args=(part, engine, first, stop),
                                    name=f"dcbg-range-{part}", daemon=True)
                   for part, (engine, (first, stop)) in enumerate(
                       zip(self.engines, spans, strict=False))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for engine in self.engines:
            for stage, seconds in engine.stage_seconds.items():
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
        real = [error for error in errors if not isinstance(error, _Cancelled)]
        if real or errors:
            raise (real or errors)[0]
        logger.info("Split %d windows into ranges %s on CUDA devices %s", windows, spans,
                    [engine.device_index for engine in self.engines])
        return results[len(spans) - 1]
