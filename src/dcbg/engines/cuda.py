"""CUDA engine: the rolling-median kernel in an overlapped pipeline, and every CuPy/NVML call

The kernel source is ``kernels/rollmed.cu`` beside this module; CuPy compiles
it with NVRTC once per device (and keeps the binary in its on-disk cache).
A batch flows through five stages that overlap:

1. a reader thread reads and decodes batch n+2 into a pinned buffer,
2. the upload stream copies batch n+1 to the device,
3. the compute stream runs the kernel on batch n,
4. the download stream copies batch n-1 back into a pinned buffer,
5. a writer thread encodes and writes batch n-2.

Events order the streams: an upload waits until the kernel that read its
device buffer before is done, a kernel waits for its upload and for the
download of the output buffer it reuses, a download waits for its kernel;
the host waits only where it hands a pinned buffer back to a thread.

Device buffers are sized from the device's free memory (shared between the
engines of one device), so a large `batch_size` is split into smaller device
batches instead of failing with out-of-memory; if memory runs out anyway, the
batch is halved and the run goes on. The result never depends on the batch
size.

CuPy and pynvml are imported lazily: the planning functions work without
them, and importing this module never fails on a machine without CUDA.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import logging
import os
import pathlib
import typing

import numpy as np

from ..errors import DeviceError, first_line
from ..pipeline import Prefetcher, WriterThread, plan_windows
from .base import Engine, count_dtype

logger = logging.getLogger(__name__)

KERNEL_FILE = "kernels/rollmed.cu"
"""The kernel source, relative to this package"""

COMPILE_OPTIONS = ("--std=c++14",)
"""NVRTC options of the kernel (CuPy adds the architecture and include paths)"""

SHARED_BYTES_LIMIT = 48 * 1024
"""Dynamic shared memory a block may use without opting in"""

BLOCK_SIZES = (32, 64, 96, 128)
"""Threads per block the launch planner considers (whole warps)"""

MEMORY_FRACTION = 0.6
"""Share of the device's free memory that the batch buffers may take"""

MIN_SEGMENT_WINDOWS = 4
"""A time segment is at least this many kernel sizes long (warm-up ≤ 25 %)"""

FIX_INSTALL = ("install the extra for your driver's CUDA major (see nvidia-smi): "
               "pip install \"dcbg[cuda12]\" or \"dcbg[cuda13]\", which brings CuPy, NVRTC "
               "and the CUDA headers")
"""What to do when CuPy, NVRTC or the CUDA headers are missing"""


def kernel_source() -> str:
    """The CUDA C++ source of the rolling-median kernel"""
    return importlib.resources.files(__package__).joinpath(KERNEL_FILE).read_text()


def kernel_files() -> list[pathlib.Path]:
    """Every CUDA source file of the package (for build checks)"""
    folder = pathlib.Path(__file__).with_name("kernels")
    return sorted(folder.glob("*.cu"))


def kernel_name(kernel_size: int) -> str:
    """Name of the kernel entry point for this kernel size (its count width)"""
    return f"dcbg_rollmed_count{8 * count_dtype(kernel_size).itemsize}"


def shared_bytes(block: int, kernel_size: int) -> int:
    """Dynamic shared memory of a block: a 256-bin histogram per thread"""
    return block * 256 * count_dtype(kernel_size).itemsize


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
    waves: int = 1
    """rounds of resident blocks the grid takes"""


def plan_launch(pixels: int, output_size: int, kernel_size: int,
                blocks_per_sm: typing.Callable[[str, int, int], int],
                sm_count: int) -> LaunchPlan:
    """Plan a launch that keeps every SM busy until the end

    One thread per pixel and time segment. An 80×320 frame gives 25,600
    threads, far fewer than a GPU keeps resident, so the batch is split in
    time, each segment at least ``MIN_SEGMENT_WINDOWS * kernel_size`` long.
    For each block size the number of resident blocks per SM comes from
    the occupancy calculator; the plan minimizes the modelled time, whole
    waves of resident blocks times the steps of each block (its windows
    plus the warm-up), so that no last, half-empty wave wastes the device.

    Parameters
    ----------
    pixels: int
        Pixels per frame.
    output_size: int
        Windows in the batch.
    kernel_size: int
        Frames per window.
    blocks_per_sm: callable
        ``blocks_per_sm(kernel, block, shared_mem)``: resident blocks per SM
        (CUDA's occupancy calculator, which includes the shared memory the
        device reserves per block).
    sm_count: int
        Streaming multiprocessors of the device.
    """
    name = kernel_name(kernel_size)
    longest = max(1, output_size // max(1, MIN_SEGMENT_WINDOWS * kernel_size))
    best = None
    for block in BLOCK_SIZES:
        shared = shared_bytes(block, kernel_size)
        if shared > SHARED_BYTES_LIMIT:
            continue
        resident = max(1, blocks_per_sm(name, block, shared)) * sm_count
        pixel_blocks = -(-pixels // block)
        for segments in range(1, longest + 1):
            length = -(-output_size // segments)
            used = -(-output_size // length)
            waves = -(-pixel_blocks * used // resident)
            # Every wave holds all resident thread slots for the steps of
            # one block (its windows plus the warm-up), used or not.
            cost = waves * resident * block * (length + kernel_size - 1)
            key = (cost, -resident * block, used)
            if best is None or key < best[0]:
                best = (key, LaunchPlan(name, block, (pixel_blocks, used), length, shared,
                                        waves))
    if best is None:
        raise ValueError(f"No block of {BLOCK_SIZES} threads fits {SHARED_BYTES_LIMIT} bytes "
                         f"of shared memory for kernel_size={kernel_size}")
    return best[1]


def fit_batch_size(batch_size: int, kernel_size: int, pixels: int, free_bytes: int,
                   share: float = 1.0) -> int:
    """Largest device batch ≤ `batch_size` whose buffers fit in free memory

    The device holds two input buffers of ``batch + kernel_size`` frames
    and two output buffers of ``batch`` frames (double buffering). `share`
    is this engine's part of the device when several engines use it.

    Raises
    ------
    MemoryError
        If not even a batch of one window fits.
    """
    budget = int(free_bytes * MEMORY_FRACTION * share) // pixels
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
        module = cupy.RawModule(code=kernel_source(), options=COMPILE_OPTIONS)
        kernels = {name: module.get_function(name)
                   for name in (kernel_name(1), kernel_name(256), kernel_name(65536))}
        for kernel in kernels.values():
            _ = kernel.kernel  # compiles and loads now, not at the first launch
    return kernels


def cuda_device_count() -> int:
    """Number of CUDA devices CuPy sees (0 without CuPy or driver)"""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - any failure means no usable device
        return 0


def visible_nvidia_gpus() -> int:
    """NVIDIA GPUs this machine shows, whether or not CUDA can use them

    Counted through NVML where pynvml works, else from the driver's entries
    in /proc. GPUs hidden on purpose with an empty ``CUDA_VISIBLE_DEVICES``
    (or -1) count as none.
    """
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return 0
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML: look at the driver itself
        folder = pathlib.Path("/proc/driver/nvidia/gpus")
        return len(list(folder.iterdir())) if folder.is_dir() else 0


def _compile_problem(error: BaseException) -> str:
    text = first_line(error)
    lowered = f"{type(error).__name__} {text}".lower()
    if "nvrtc" in lowered:
        return f"CuPy cannot load NVRTC, the CUDA kernel compiler ({text}); {FIX_INSTALL}"
    if ".h" in lowered and ("include" in lowered or "header" in lowered
                            or "cannot open" in lowered or "not found" in lowered):
        return f"CuPy cannot find the CUDA headers ({text}); {FIX_INSTALL}"
    return (f"the median kernel failed to compile ({text}); run 'dcbg info' and report it "
            f"with its output")


def cuda_unavailable_reason(index: int = 0) -> str | None:
    """Why CUDA device `index` cannot run dcbg, with what to do; None when it can"""
    try:
        import cupy
    except ImportError:
        return f"CuPy is not installed; {FIX_INSTALL}"
    except Exception as error:  # a broken CUDA install raises all sorts
        return f"CuPy failed to import ({first_line(error)}); {FIX_INSTALL}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001 - no driver, or a driver older than CuPy's CUDA
        return (f"no usable CUDA driver or device ({first_line(error)}); check the GPU with "
                f"nvidia-smi and that the extra's CUDA major matches the driver")
    if count == 0:
        return "no CUDA device found; check the GPU with nvidia-smi"
    if index >= count:
        return f"CUDA device {index} does not exist (found {count}); use cuda:0 … cuda:{count - 1}"
    try:
        load_kernels(index)
    except Exception as error:  # noqa: BLE001 - NVRTC, headers or the source
        return _compile_problem(error)
    return None


def describe_cuda_devices() -> list[dict]:
    """Name, memory and driver of every NVIDIA GPU, via pynvml (nvidia-ml-py)

    Each entry has the NVML ``index``, the PCI bus id and, where CuPy sees the
    GPU, its CUDA ordinal ``cuda_index`` (the two numberings differ under
    ``CUDA_VISIBLE_DEVICES``, which job schedulers and dask-cuda set).
    Returns an empty list when pynvml or the NVIDIA driver is missing.
    """
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML, no description
        return []
    try:
        ordinals = _cuda_ordinals_by_bus_id()
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            bus_id = _normal_bus_id(_text(pynvml.nvmlDeviceGetPciInfo(handle).busId))
            devices.append({
                "index": index,
                "cuda_index": ordinals.get(bus_id),
                "bus_id": bus_id,
                "name": _text(pynvml.nvmlDeviceGetName(handle)),
                "memory_total": int(memory.total),
                "memory_free": int(memory.free),
                "driver": driver,
            })
        return devices
    finally:
        pynvml.nvmlShutdown()


def describe_cuda_device(cuda_index: int) -> dict | None:
    """:func:`describe_cuda_devices` entry of a CUDA ordinal (found by PCI bus id)"""
    return next((device for device in describe_cuda_devices()
                 if device["cuda_index"] == cuda_index), None)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _normal_bus_id(bus_id: str) -> str:
    # NVML writes an 8-digit PCI domain, CUDA a 4-digit one
    domain, _, rest = bus_id.strip().upper().partition(":")
    return f"{int(domain, 16):04X}:{rest}" if rest else bus_id.upper()


def _cuda_ordinals_by_bus_id() -> dict[str, int]:
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
        return {_normal_bus_id(cupy.cuda.runtime.deviceGetPCIBusId(i)): i
                for i in range(count)}
    except Exception:  # noqa: BLE001 - CuPy cannot see the GPUs
        return {}


def free_device_memory(device_index: int) -> int:
    """Free bytes on a CUDA device now"""
    import cupy
    with cupy.cuda.Device(device_index):
        free, _total = cupy.cuda.runtime.memGetInfo()
    return int(free)


class _PinnedMemoryError(MemoryError):
    """Page-locked host memory for the batch buffers could not be allocated"""


class CUDARollingMedian(Engine):
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
    memory_share: float
        Part of the device's free memory this engine may plan with (engines
        that share a device split it).
    free_bytes: int, optional
        The device's free memory, when the caller read it once for several
        engines; read now by default.
    """

    def __init__(self, image_shape, kernel_size, batch_size, device_index=0,
                 memory_share: float = 1.0, free_bytes: int | None = None):
        import cupy

        super().__init__(image_shape, kernel_size, batch_size)
        self.cupy = cupy
        self.device_index = device_index
        self.kernels = load_kernels(device_index)
        info = describe_cuda_device(device_index)
        if info is not None:
            logger.info("CUDA device %d: %s (PCI %s), %.1f of %.1f GiB free, driver %s",
                        device_index, info["name"], info["bus_id"],
                        info["memory_free"] / 2**30, info["memory_total"] / 2**30,
                        info["driver"])
        free = free_device_memory(device_index) if free_bytes is None else free_bytes
        self.batch_size = fit_batch_size(batch_size, kernel_size, self.pixels, free,
                                         memory_share)
        if self.batch_size < batch_size:
            logger.info("Device batch of %d frames (of %d asked for) fits %.0f MiB free "
                        "(share %.2f)", self.batch_size, batch_size, free / 2**20,
                        memory_share)
        props = cupy.cuda.runtime.getDeviceProperties(device_index)
        self.sm_count = int(props["multiProcessorCount"])
        """streaming multiprocessors of the device"""

    def close(self):
        """Give cached device and pinned memory back (buffers live only in a run)"""
        try:
            with self.cupy.cuda.Device(self.device_index):
                self.cupy.get_default_memory_pool().free_all_blocks()
            self.cupy.get_default_pinned_memory_pool().free_all_blocks()
        except self.cupy.cuda.runtime.CUDARuntimeError:
            pass  # the context is broken after a kernel fault; the error is raised elsewhere

    def blocks_per_sm(self, name: str, block: int, shared_mem: int) -> int:
        """Resident blocks per SM from CUDA's occupancy calculator"""
        return self._occupancy(name, block, shared_mem)

    @functools.lru_cache(maxsize=32)  # noqa: B019 - one engine, a handful of shapes
    def _occupancy(self, name: str, block: int, shared_mem: int) -> int:
        function = self.kernels[name].kernel
        with self.cupy.cuda.Device(self.device_index):
            return int(self.cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                function.ptr, block, shared_mem))

    def plan(self, output_size: int) -> LaunchPlan:
        """The launch plan of a batch of `output_size` windows on this device"""
        return plan_launch(self.pixels, output_size, self.kernel_size, self.blocks_per_sm,
                           self.sm_count)

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
        plan = self.plan(output_size)
        kernel = self.kernels[plan.kernel]
        args = (frames, medians, np.int64(self.pixels), np.int32(output_size),
                np.int32(self.kernel_size), np.int32(plan.segment_length))
        stream = stream if stream is not None else self.cupy.cuda.get_current_stream()
        with stream:
            kernel(plan.grid, (plan.block,), args, shared_mem=plan.shared_mem)

    def run(self, read_into, first, stop, write_at, on_written=None) -> np.ndarray:
        """Compute windows ``first … stop-1`` with every stage overlapped

        If the device or the host runs out of (page-locked) memory, at the
        start or in the middle (another process took memory), the batch
        size is halved and the run goes on from the first window not yet
        written; the result stays the same.

        Raises
        ------
        DeviceError
            If the device or the kernel fails.
        MemoryError
            If not even a batch of one window fits.
        """
        cupy = self.cupy
        written = 0

        def counted_write(offset, frames):
            nonlocal written
            write_at(offset, frames)
            written += len(frames)

        self.stage_seconds = {}
        while True:
            batches = plan_windows(first + written, stop, self.kernel_size, self.batch_size)
            try:
                return self._run_batches(read_into, batches, counted_write, on_written)
            except (cupy.cuda.memory.OutOfMemoryError, _PinnedMemoryError) as error:
                smaller = self.batch_size // 2
                if smaller < 1:
                    raise MemoryError(
                        f"CUDA device {self.device_index} is out of memory even for one "
                        f"frame ({first_line(error)}); free GPU memory or use --device "
                        f"cpu.") from error
                self.close()
                logger.warning("CUDA device %d ran out of memory with batches of %d frames "
                               "(%s); going on from frame %d with batches of %d",
                               self.device_index, self.batch_size, first_line(error),
                               first + written, smaller)
                self.batch_size = smaller
            except (cupy.cuda.runtime.CUDARuntimeError,
                    cupy.cuda.driver.CUDADriverError) as error:
                raise DeviceError(
                    f"CUDA device {self.device_index} failed while computing the median "
                    f"({first_line(error)}); no output was kept; check the GPU with "
                    f"nvidia-smi, or run with --device cpu.") from error

    def _pinned(self, count: int, shape) -> list[np.ndarray]:
        import cupyx
        try:
            return [cupyx.empty_pinned(shape, np.uint8) for _ in range(count)]
        except self.cupy.cuda.runtime.CUDARuntimeError as error:
            if "alloc" in str(error).lower():
                raise _PinnedMemoryError(str(error)) from error
            raise

    def _run_batches(self, read_into, batches, write_at, on_written) -> np.ndarray:
        cupy = self.cupy
        rows = max(batch.input_size for batch in batches)
        out_rows = max(batch.output_size for batch in batches)
        with cupy.cuda.Device(self.device_index):
            upload = cupy.cuda.Stream(non_blocking=True)
            compute = cupy.cuda.Stream(non_blocking=True)
            download = cupy.cuda.Stream(non_blocking=True)
            device_in = [cupy.empty((rows, self.pixels), np.uint8) for _ in range(2)]
            device_out = [cupy.empty((out_rows, self.pixels), np.uint8) for _ in range(2)]
            pinned_in = self._pinned(2, (rows, self.pixels))
            pinned_out = self._pinned(3, (out_rows, self.pixels))
            prefetcher = Prefetcher(read_into, batches, pinned_in)
            writer = WriterThread(write_at, pinned_out, on_written)
            kernel_done: list = [None, None]  # per input slot: the kernel that read it
            downloaded: list = [None, None]  # per output slot: the download that read it
            timings: list[tuple[str, object, object]] = []
            in_flight = None  # the previous batch's download, finished one step later
            pending = None  # the previous batch: computed, not yet downloaded
            last = None
            try:
                for batch, frames in prefetcher:
                    slot = batch.index % 2
                    if kernel_done[slot] is not None:
                        upload.wait_event(kernel_done[slot])
                    start = upload.record()
                    device_in[slot][:batch.input_size].set(frames, stream=upload)
                    uploaded = upload.record()
                    timings.append(("upload", start, uploaded))
                    compute.wait_event(uploaded)
                    if downloaded[slot] is not None:
                        compute.wait_event(downloaded[slot])
                    start = compute.record()
                    self.launch(device_in[slot], device_out[slot], batch.output_size, compute)
                    kernel_done[slot] = compute.record()
                    timings.append(("kernel", start, kernel_done[slot]))
                    if pending is not None:
                        finished, in_flight = in_flight, self._download(
                            *pending, download, writer, downloaded, timings)
                        if finished is not None:
                            last = self._hand_over(finished, writer)
                    pending = (batch, slot, device_out[slot], kernel_done[slot])
                    uploaded.synchronize()  # the reader may refill this pinned buffer now
                    prefetcher.release()
                if pending is not None:
                    finished, in_flight = in_flight, self._download(
                        *pending, download, writer, downloaded, timings)
                    if finished is not None:
                        last = self._hand_over(finished, writer)
                if in_flight is not None:
                    last = self._hand_over(in_flight, writer)
                    in_flight = None
            finally:
                prefetcher.close()
                writer.close()
                self._add_seconds("read", prefetcher.seconds)
                self._add_seconds("write", writer.seconds)
            for stage, start, end in timings:  # all device work is done by now
                self._add_seconds(stage, cupy.cuda.get_elapsed_time(start, end) / 1e3)
        return last

    def _add_seconds(self, stage: str, seconds: float):
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def _download(self, batch, slot, medians, computed, stream, writer, downloaded, timings):
        buffer = writer.acquire()
        target = buffer[:batch.output_size]
        stream.wait_event(computed)
        start = stream.record()
        medians[:batch.output_size].get(stream=stream, out=target, blocking=False)
        done = stream.record()
        downloaded[slot] = done
        timings.append(("download", start, done))
        return batch, buffer, done

    @staticmethod
    def _hand_over(download, writer) -> np.ndarray:
        batch, buffer, done = download
        done.synchronize()
        last = buffer[batch.output_size - 1].copy()
        writer.submit(batch.start, buffer, batch.output_size)
        return last


def runtime_versions() -> dict:
    """CuPy's version and the CUDA runtime's, for run logs (never raises)"""
    import cupy

    versions = {"cupy": cupy.__version__}
    try:
        version = cupy.cuda.runtime.runtimeGetVersion()
        versions["cuda_runtime"] = f"{version // 1000}.{version % 1000 // 10}"
    except Exception as error:  # noqa: BLE001 - a log must not fail a finished run
        versions["cuda_runtime"] = f"unknown ({first_line(error)})"
    return versions
