"""The CUDA median kernel: its source, its compilation, and how to launch it

The source is ``kernels/rollmed.cu`` beside this module. CuPy compiles it
with NVRTC once per process and device, in a background thread that starts
as soon as the device is known (:func:`start_compiling`), so that the
compile overlaps opening the input; CuPy keeps the binary in its on-disk
kernel cache (``CUPY_CACHE_DIR``), so later processes skip NVRTC.

:func:`plan_launch` turns a batch into a grid of pixel blocks and time
segments from CUDA's occupancy calculator. The calculator is a driver call
that needs the device's context in the calling thread, which CuPy does not
make for it; so the compile thread, which works in that context, asks it for
every entry point and block size the planner considers and keeps the
answers with the kernels (:class:`CompiledKernels`). CuPy is imported
lazily: the planning functions work without it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.resources
import threading
import typing

from .. import cudaprobe
from .base import count_dtype
from .cudacontext import on_device, use_device

KERNEL_FILE = "kernels/rollmed.cu"
"""The kernel source, relative to this package"""

COMPILE_OPTIONS = ("--std=c++14",)
"""NVRTC options of the kernel (CuPy adds the architecture and include paths)"""

SHARED_BYTES_LIMIT = 48 * 1024
"""Dynamic shared memory a block may use without opting in"""

BLOCK_SIZES = (32, 64, 96, 128)
"""Threads per block the launch planner considers (whole warps)"""

MIN_SEGMENT_WINDOWS = 4
"""A time segment is at least this many kernel sizes long (warm-up ≤ 25 %)"""

MAX_GRID_Y = 65535
"""Largest second grid dimension CUDA launches"""

WAVE_CANDIDATES = 64
"""Wave counts (from the fewest possible on) whose fullest segmentation the planner models"""

GEOMETRIC_STEP = 1.25
"""Ratio between neighbouring segment counts of the planner's geometric series"""

INT_MAX = 2**31 - 1
"""Largest value of the kernel's ``int`` parameters (the window and segment lengths)"""


def kernel_source() -> str:
    """The CUDA C++ source of the rolling-median kernel"""
    return importlib.resources.files(__package__).joinpath(KERNEL_FILE).read_text()


def kernel_name(kernel_size: int) -> str:
    """Name of the kernel entry point for this kernel size (its count width)"""
    return f"dcbg_rollmed_count{8 * count_dtype(kernel_size).itemsize}"


COUNT_BYTES = {kernel_name(size): count_dtype(size).itemsize for size in (1, 256, 65536)}
"""Bytes of a histogram count of every entry point of rollmed.cu, by name"""

KERNEL_NAMES = tuple(COUNT_BYTES)
"""Every entry point of rollmed.cu (count widths 8, 16 and 32 bits)"""


def block_sizes(name: str) -> list[tuple[int, int]]:
    """(threads, shared bytes) of each block the planner considers for an entry point

    A block's dynamic shared memory is a 256-bin histogram per thread.
    """
    return [(block, block * 256 * COUNT_BYTES[name]) for block in BLOCK_SIZES
            if block * 256 * COUNT_BYTES[name] <= SHARED_BYTES_LIMIT]


@dataclasses.dataclass(frozen=True)
class CompiledKernels:
    """The entry points of rollmed.cu loaded on one device, and their occupancy there"""

    functions: dict
    """CuPy RawKernels by entry point name"""
    occupancy: dict
    """resident blocks per SM by (entry point, threads per block), for every block of
    :func:`block_sizes`, from CUDA's occupancy calculator on the device"""


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


def segment_candidates(pixel_blocks: int, resident: int, longest: int) -> list[int]:
    """The segment counts worth modelling, a few hundred at most whatever the batch

    The modelled cost of a launch grows with its waves and, for a given
    number of waves, falls as more segments share it. So the candidates
    are, for each of the first :data:`WAVE_CANDIDATES` wave counts, the
    most segments that fit in it, plus a geometric series up to `longest`
    (which covers batches so long that more waves than that pay off).

    Parameters
    ----------
    pixel_blocks: int
        Blocks that one segment needs (pixels per frame / block size).
    resident: int
        Blocks the device keeps resident at once.
    longest: int
        Most segments allowed.
    """
    longest = max(1, longest)
    found = {1, longest}
    fewest_waves = -(-pixel_blocks // resident)
    for waves in range(fewest_waves, fewest_waves + WAVE_CANDIDATES):
        segments = waves * resident // pixel_blocks
        if segments >= longest:
            break
        found.add(max(1, segments))
    value = 1
    while value < longest:
        found.add(value)
        value = max(value + 1, int(value * GEOMETRIC_STEP))
    return sorted(found)


def plan_launch(pixels: int, output_size: int, kernel_size: int,
                blocks_per_sm: typing.Callable[[str, int, int], int],
                sm_count: int) -> LaunchPlan:
    """Plan a launch that keeps every SM busy until the end

    One thread per pixel and time segment. An 80×320 frame gives 25,600
    threads, far fewer than a GPU keeps resident, so the batch is split in
    time, each segment at least ``MIN_SEGMENT_WINDOWS * kernel_size`` long
    and at most :data:`MAX_GRID_Y` segments. For each block size the number
    of resident blocks per SM comes from the occupancy calculator; the plan
    minimizes the modelled time, whole waves of resident blocks times the
    steps of each block (its windows plus the warm-up), so that no last,
    half-empty wave wastes the device.

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

    Raises
    ------
    ValueError
        If the kernel's int parameters cannot hold the kernel size or the
        windows of a segment.
    """
    name = kernel_name(kernel_size)
    if kernel_size > INT_MAX:
        raise ValueError(f"kernel_size={kernel_size} is more than a GPU kernel takes "
                         f"({INT_MAX}); use device=\"cpu\".")
    # A segment's windows are counted in the kernel's int.
    fewest = -(-output_size // INT_MAX)
    longest = max(fewest, min(MAX_GRID_Y, output_size // max(1, MIN_SEGMENT_WINDOWS
                                                               * kernel_size)))
    if fewest > MAX_GRID_Y:
        raise ValueError(f"{output_size} windows are more than one GPU launch computes "
                         f"({MAX_GRID_Y * INT_MAX}); compute them in parts.")
    best = None
    for block, shared in block_sizes(name):
        resident = max(1, blocks_per_sm(name, block, shared)) * sm_count
        pixel_blocks = -(-pixels // block)
        candidates = segment_candidates(pixel_blocks, resident, longest)
        for segments in sorted({fewest, *(count for count in candidates if count >= fewest)}):
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


_compile_lock = threading.Lock()
_compiles: dict[int, concurrent.futures.Future] = {}
"""The compile of each device, started once per process"""


def start_compiling(device_index: int) -> concurrent.futures.Future:
    """Start compiling rollmed.cu for a device in the background, once per process

    Returns the future of :func:`load_kernels`' result; calling it again
    returns the same future, also after the compile failed.
    """
    with _compile_lock:
        future = _compiles.get(device_index)
        if future is None:
            future = concurrent.futures.Future()
            _compiles[device_index] = future
            threading.Thread(target=_compile_into, args=(future, device_index),
                             name=f"dcbg-compile-cuda{device_index}", daemon=True).start()
    return future


def load_kernels(device_index: int) -> CompiledKernels:
    """The entry points of rollmed.cu on a device, with their occupancy there

    Waits for the compile that :func:`start_compiling` started, or starts
    it. Raises what CuPy raised when the compile failed.
    """
    return start_compiling(device_index).result()


def kernels_or_device_error(device_index: int) -> CompiledKernels:
    """:func:`load_kernels`, raising a failed compile as the DeviceError of an unusable device"""
    try:
        return load_kernels(device_index)
    except Exception as error:  # noqa: BLE001 - NVRTC, headers, the cache, the context
        raise cudaprobe.unusable_device_error(
            device_index, cudaprobe.compile_problem(error)) from error


def _compile_into(future: concurrent.futures.Future, device_index: int):
    try:
        kernels = _compile(device_index)
    except BaseException as error:  # handed to whoever waits for the kernels
        future.set_exception(error)
    else:
        future.set_result(kernels)


def _compile(device_index: int) -> CompiledKernels:
    import cupy

    use_device(device_index)  # this thread's only device: its context is current here
    module = cupy.RawModule(code=kernel_source(), options=COMPILE_OPTIONS)
    functions = {name: module.get_function(name) for name in KERNEL_NAMES}
    occupancy = {}
    for name, kernel in functions.items():
        # CuPy loads a kernel per device and hands out the current device's copy;
        # fetching it compiles and loads it now
        handle = kernel.kernel.ptr
        for block, shared in block_sizes(name):
            occupancy[name, block] = int(
                cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                    handle, block, shared))
    return CompiledKernels(functions, occupancy)


def multiprocessor_count(device_index: int) -> int:
    """Streaming multiprocessors of a device"""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_index)
    return int(props["multiProcessorCount"])


class Launcher:
    """Launches of the kernel for one device, frame size and kernel size, planned once each

    The occupancy of each block size and the plan of each batch length are
    asked once and kept, so that a launch costs only the launch itself.

    Parameters
    ----------
    device_index: int
        CUDA device ordinal.
    pixels: int
        Pixels per frame.
    kernel_size: int
        Frames per window.
    kernels: CompiledKernels, optional
        The compiled entry points (:func:`load_kernels`); compiled or
        waited for by default, a failure raised as a DeviceError.
    """

    def __init__(self, device_index: int, pixels: int, kernel_size: int,
                 kernels: CompiledKernels | None = None):
        self.device_index = device_index
        self.pixels = pixels
        self.kernel_size = kernel_size
        self.kernels = kernels_or_device_error(device_index) if kernels is None else kernels
        self.sm_count = multiprocessor_count(device_index)
        """streaming multiprocessors of the device"""
        self._plans: dict[int, LaunchPlan] = {}

    def blocks_per_sm(self, name: str, block: int, shared_mem: int) -> int:
        """Resident blocks per SM from CUDA's occupancy calculator (asked at compile time)"""
        return self.kernels.occupancy[name, block]

    def windows_to_fill(self) -> int:
        """Windows a batch needs so that its time segments fill every SM of the device

        One thread per pixel and segment: a frame with fewer pixels than the
        device keeps threads resident needs that many segments, each
        ``MIN_SEGMENT_WINDOWS * kernel_size`` windows long.
        """
        name = kernel_name(self.kernel_size)
        resident = max(self.blocks_per_sm(name, block, shared) * block
                       for block, shared in block_sizes(name)) * self.sm_count
        segments = -(-resident // self.pixels)
        return segments * MIN_SEGMENT_WINDOWS * self.kernel_size

    def plan(self, output_size: int) -> LaunchPlan:
        """The launch plan of `output_size` windows (planned once per length)"""
        plan = self._plans.get(output_size)
        if plan is None:
            plan = plan_launch(self.pixels, output_size, self.kernel_size, self.blocks_per_sm,
                               self.sm_count)
            self._plans[output_size] = plan
        return plan

    def launch(self, frames, medians, output_size: int, stream=None):
        """Run the kernel on device arrays, asynchronously on `stream`

        Parameters
        ----------
        frames: cupy.ndarray
            C-contiguous ``(rows, pixels)`` uint8 with at least ``output_size
            + kernel_size - 1`` rows, on this device.
        medians: cupy.ndarray
            C-contiguous ``(rows, pixels)`` uint8 receiving ``output_size``
            rows.
        output_size: int
            Windows to compute.
        stream: cupy.cuda.Stream, optional
            Where the kernel runs; the device's current stream by default.
        """
        import cupy

        plan = self.plan(output_size)
        kernel = self.kernels.functions[plan.kernel]
        args = self.arguments(frames, medians, output_size, plan)
        with on_device(self.device_index):
            stream = stream if stream is not None else cupy.cuda.get_current_stream()
            with stream:
                kernel(plan.grid, (plan.block,), args, shared_mem=plan.shared_mem)

    def arguments(self, frames, medians, output_size: int, plan: LaunchPlan) -> tuple:
        """The kernel's arguments, each of its parameter's C type

        CuPy passes a numpy scalar at its own size, whatever the parameter's
        type, so a scalar of another type would be misread on the GPU.
        """
        import numpy as np

        return (frames, medians, np.int64(self.pixels), np.int64(output_size),
                np.int32(self.kernel_size), np.int32(plan.segment_length))


_launchers: dict[tuple[int, int, int], Launcher] = {}
"""Launchers of this process by (device, pixels, kernel size), for arrays already on a GPU"""


def launcher_for(device_index: int, pixels: int, kernel_size: int) -> Launcher:
    """The process's launcher for one device, frame size and kernel size"""
    key = (device_index, pixels, kernel_size)
    with _compile_lock:
        launcher = _launchers.get(key)
    if launcher is None:
        launcher = Launcher(device_index, pixels, kernel_size)
        with _compile_lock:
            launcher = _launchers.setdefault(key, launcher)
    return launcher
