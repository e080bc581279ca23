"""The CUDA median kernel: its source, its compilation and its problems, and how to launch it

The source is ``kernels/rollmed.cu`` beside this module. It holds two
kernel families, compiled as modules of their own (:data:`MODULE_MACROS`):
the uint8 kernel and the window kernels of int8, uint16 and int16 frames,
which take NVRTC longer than the uint8 kernel and which a run on uint8
frames never needs. CuPy compiles each module with NVRTC once per process
and device, in a background thread (:func:`start_compiling`): the uint8
kernel's as soon as the device is known, so that the compile overlaps
opening the input, the window kernels' when frames of their dtypes first
come. CuPy keeps the binaries in its on-disk kernel cache
(``CUPY_CACHE_DIR``), so later processes skip NVRTC. A compile that fails is
told in one sentence with what to do (:func:`compile_problem`), and raised
as the :class:`~dcbg.errors.DeviceError` of a device that cannot be used
(:func:`kernels_or_device_error`).

:func:`plan_launch` turns a batch into a grid of pixel blocks and time
segments from CUDA's occupancy calculator. The calculator is a driver call
that needs the device's context in the calling thread, which CuPy does not
make for it; so the compile thread, which works in that context, asks it for
every entry point of its module and block size the planner considers and
keeps the answers with the kernels (:class:`CompiledKernels`). CuPy is imported
lazily: the planning functions work without it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.resources
import threading
import typing

import numpy as np

from .. import cudaprobe
from ..dtypes import check_frame_dtype, sign_bit
from ..errors import first_line, setting_error
from .base import count_dtype
from .cudacontext import on_device, use_device

KERNEL_FILE = "kernels/rollmed.cu"
"""The kernel source, relative to this package"""

COMPILE_OPTIONS = ("--std=c++14",)
"""NVRTC options of every module (CuPy adds the architecture and include paths)"""

MODULE_MACROS = {"histogram": "DCBG_HISTOGRAM_KERNELS", "window": "DCBG_WINDOW_KERNELS"}
"""The modules of rollmed.cu, each compiled on its own, and the macro that selects its
entry points: the uint8 kernel's 256-bin histograms, the window kernels' counts"""

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


WINDOW_BYTES = 128
"""Shared memory of each thread of the window kernels (DCBG_WINDOW_BYTES in rollmed.cu):
the counts of 128, 64 or 32 levels for kernel sizes up to 255, up to 65,535 and beyond"""


@dataclasses.dataclass(frozen=True)
class KernelFamily:
    """The entry points of rollmed.cu for frames of one dtype"""

    prefix: str
    """names of the entry points without their ``_count8/16/32``"""
    histogram: bool
    """whether each thread counts all 256 levels (the uint8 kernel) instead of a window of
    levels in :data:`WINDOW_BYTES`"""
    warm_up_steps: float
    """cost of each frame of a time segment's first window, in steps"""
    value_xor: int | None
    """bits flipped on load and store to order the values as unsigned ones; None for the
    uint8 kernel, which takes no such argument"""

    @property
    def module(self) -> str:
        """The module of rollmed.cu that holds these entry points (:data:`MODULE_MACROS`)"""
        return "histogram" if self.histogram else "window"


KERNEL_FAMILIES = {
    np.dtype(np.uint8): KernelFamily("dcbg_rollmed", True, 1, None),
    # The window kernels' first window takes a radix select and a pass that
    # counts its levels: 3 passes for 16-bit values, 2 for 8-bit ones, each
    # about half a step per frame (one load and one count where a step has
    # two).
    **{np.dtype(dtype): KernelFamily(prefix, False, steps, sign_bit(dtype))
       for dtype, prefix, steps in ((np.int8, "dcbg_rollmed_window8", 1),
                                    (np.uint16, "dcbg_rollmed_window16", 1.5),
                                    (np.int16, "dcbg_rollmed_window16", 1.5))},
}
"""The kernel family of each dtype dcbg computes medians of
(:data:`dcbg.dtypes.FRAME_DTYPES`)"""


def kernel_family(dtype) -> KernelFamily:
    """The entry points for frames of `dtype`

    Raises
    ------
    TypeError
        If dcbg computes no frames of `dtype` (:func:`dcbg.dtypes.check_frame_dtype`).
    """
    return KERNEL_FAMILIES[check_frame_dtype(dtype)]


def kernel_name(kernel_size: int, dtype=np.uint8) -> str:
    """Name of the kernel entry point for this kernel size (its count width) and dtype"""
    return f"{kernel_family(dtype).prefix}_count{8 * count_dtype(kernel_size).itemsize}"


THREAD_SHARED_BYTES = {
    kernel_name(size, dtype): (256 * count_dtype(size).itemsize
                               if KERNEL_FAMILIES[dtype].histogram else WINDOW_BYTES)
    for dtype in KERNEL_FAMILIES for size in (1, 256, 65536)}
"""Dynamic shared memory of each thread of every entry point of rollmed.cu, by name: a
count of each of the 256 levels in the uint8 kernel, :data:`WINDOW_BYTES` of counts in the
window kernels whatever the count width"""

KERNEL_NAMES = tuple(THREAD_SHARED_BYTES)
"""Every entry point of rollmed.cu (per kernel family, count widths 8, 16 and 32 bits)"""

MODULE_KERNEL_NAMES = {
    module: tuple(dict.fromkeys(kernel_name(size, dtype)
                                for dtype, family in KERNEL_FAMILIES.items()
                                if family.module == module for size in (1, 256, 65536)))
    for module in MODULE_MACROS}
"""The entry points of each module of rollmed.cu"""


def module_options(module: str) -> tuple:
    """NVRTC options of a module of rollmed.cu: its macro selects its entry points"""
    return (*COMPILE_OPTIONS, f"-D{MODULE_MACROS[module]}")


def block_sizes(name: str) -> list[tuple[int, int]]:
    """(threads, shared bytes) of each block the planner considers for an entry point"""
    return [(block, block * THREAD_SHARED_BYTES[name]) for block in BLOCK_SIZES
            if block * THREAD_SHARED_BYTES[name] <= SHARED_BYTES_LIMIT]


@dataclasses.dataclass(frozen=True)
class CompiledKernels:
    """The entry points of a module of rollmed.cu loaded on one device, and their
    occupancy there"""

    device_index: int
    """the CUDA device they are loaded on"""
    module: str
    """the module of rollmed.cu they are (:data:`MODULE_MACROS`), which the frames' dtype
    chooses (:attr:`KernelFamily.module`)"""
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
                sm_count: int, dtype=np.uint8) -> LaunchPlan:
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
    dtype: numpy.dtype, optional
        Of the frames, which chooses the kernel family.

    Raises
    ------
    ValueError
        If the kernel's int parameters cannot hold the kernel size or the
        windows of a segment.
    """
    name = kernel_name(kernel_size, dtype)
    warm_up = kernel_family(dtype).warm_up_steps * (kernel_size - 1)
    if kernel_size > INT_MAX:
        raise setting_error(ValueError, "kernel_size={kernel_size} is more than a GPU kernel "
                            "takes ({limit}); use {setting}.", "device", suggested=("cpu",),
                            kernel_size=kernel_size, limit=INT_MAX)
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
            cost = waves * resident * block * (length + warm_up)
            key = (cost, -resident * block, used)
            if best is None or key < best[0]:
                best = (key, LaunchPlan(name, block, (pixel_blocks, used), length, shared,
                                        waves))
    if best is None:
        raise ValueError(f"No block of {BLOCK_SIZES} threads fits {SHARED_BYTES_LIMIT} bytes "
                         f"of shared memory for kernel_size={kernel_size}; this is a bug in "
                         f"dcbg, please report it.")
    return best[1]


_compile_lock = threading.Lock()
_compiles: dict[tuple[int, str], concurrent.futures.Future] = {}
"""The compile of each (device, module), started once per process"""


def start_compiling(device_index: int, dtype=np.uint8) -> concurrent.futures.Future:
    """Start compiling the kernels of `dtype` for a device in the background, once per process

    The module of rollmed.cu that holds them is compiled, so the dtypes of
    one module share its compile. Returns the future of
    :func:`load_kernels`' result; calling it again returns the same future,
    also after the compile failed.
    """
    module = kernel_family(dtype).module
    with _compile_lock:
        future = _compiles.get((device_index, module))
        if future is None:
            future = concurrent.futures.Future()
            _compiles[device_index, module] = future
            suffix = "" if module == "histogram" else f"-{module}"
            threading.Thread(target=_compile_into, args=(future, device_index, module),
                             name=f"dcbg-compile-cuda{device_index}{suffix}",
                             daemon=True).start()
    return future


def load_kernels(device_index: int, dtype=np.uint8) -> CompiledKernels:
    """The entry points for frames of `dtype` on a device, with their occupancy there

    Waits for the compile that :func:`start_compiling` started, or starts
    it. Raises what CuPy raised when the compile failed.
    """
    return start_compiling(device_index, dtype).result()


def kernels_or_device_error(device_index: int, dtype=np.uint8) -> CompiledKernels:
    """:func:`load_kernels`, raising a failed compile as the DeviceError of an unusable device"""
    try:
        return load_kernels(device_index, dtype)
    except Exception as error:  # noqa: BLE001 - NVRTC, headers, the cache, the context
        raise cudaprobe.unusable_device_error(device_index, compile_problem(error)) from error


def compile_problem(error: BaseException) -> str:
    """What a failure to compile or load the kernel means, with what to do"""
    text = first_line(error)
    kind = type(error).__name__
    lowered = f"{kind} {text}".lower()
    if "nvrtc" in lowered:
        return (f"CuPy cannot load NVRTC, the CUDA kernel compiler ({text}); "
                f"{cudaprobe.FIX_INSTALL}")
    if "cuda headers" in lowered or (".h" in lowered and (
            "include" in lowered or "header" in lowered or "cannot open" in lowered
            or "not found" in lowered)):
        return f"CuPy cannot find the CUDA headers ({text}); {cudaprobe.FIX_INSTALL}"
    if isinstance(error, OSError):
        # CuPy writes every compiled kernel to its cache folder first
        return cudaprobe.cache_problem(error)
    if "ptx" in lowered:
        return (f"the driver cannot load the compiled kernel ({text}), it is older than the "
                f"CUDA of CuPy's NVRTC; update the driver or {cudaprobe.FIX_INSTALL}")
    if kind in ("CUDARuntimeError", "CUDADriverError"):
        return (f"CUDA could not set up the device ({text}); check with nvidia-smi that the "
                f"GPU is healthy and not held by another process in exclusive mode")
    return (f"the median kernel failed to compile ({text}); run 'dcbg info' and report it "
            f"with its output")


def _compile_into(future: concurrent.futures.Future, device_index: int, module: str):
    try:
        kernels = _compile(device_index, module)
    except BaseException as error:  # handed to whoever waits for the kernels
        future.set_exception(error)
    else:
        future.set_result(kernels)


def _compile(device_index: int, module: str) -> CompiledKernels:
    import cupy

    use_device(device_index)  # this thread's only device: its context is current here
    compiled = cupy.RawModule(code=kernel_source(), options=module_options(module))
    functions = {name: compiled.get_function(name) for name in MODULE_KERNEL_NAMES[module]}
    occupancy = {}
    for name, kernel in functions.items():
        # CuPy loads a kernel per device and hands out the current device's copy;
        # fetching it compiles and loads it now
        handle = kernel.kernel.ptr
        for block, shared in block_sizes(name):
            occupancy[name, block] = int(
                cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                    handle, block, shared))
    return CompiledKernels(device_index, module, functions, occupancy)


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
        The compiled entry points of the dtype (:func:`load_kernels`);
        compiled or waited for by default, a failure raised as a
        DeviceError.
    dtype: numpy.dtype, optional
        Of the frames and medians: uint8 (default), int8, uint16 or int16.
    """

    def __init__(self, device_index: int, pixels: int, kernel_size: int,
                 kernels: CompiledKernels | None = None, dtype=np.uint8):
        self.device_index = device_index
        self.pixels = pixels
        self.kernel_size = kernel_size
        self.dtype = np.dtype(dtype)
        self.family = kernel_family(self.dtype)  # a dtype they do not take: TypeError
        if kernels is not None and kernels.module != self.family.module:
            raise ValueError(f"{self.dtype} frames need the {self.family.module} kernels, not "
                             f"the {kernels.module} kernels; take them from "
                             f"ReadyDevice.kernels_for({self.dtype}).")
        self.kernels = (kernels_or_device_error(device_index, self.dtype) if kernels is None
                        else kernels)
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
        name = kernel_name(self.kernel_size, self.dtype)
        resident = max(self.blocks_per_sm(name, block, shared) * block
                       for block, shared in block_sizes(name)) * self.sm_count
        segments = -(-resident // self.pixels)
        return segments * MIN_SEGMENT_WINDOWS * self.kernel_size

    def plan(self, output_size: int) -> LaunchPlan:
        """The launch plan of `output_size` windows (planned once per length)"""
        plan = self._plans.get(output_size)
        if plan is None:
            plan = plan_launch(self.pixels, output_size, self.kernel_size, self.blocks_per_sm,
                               self.sm_count, self.dtype)
            self._plans[output_size] = plan
        return plan

    def launch(self, frames, medians, output_size: int, stream=None):
        """Run the kernel on device arrays, asynchronously on `stream`

        Parameters
        ----------
        frames: cupy.ndarray
            C-contiguous ``(rows, pixels)`` of the launcher's dtype with at
            least ``output_size + kernel_size - 1`` rows, on this device.
        medians: cupy.ndarray
            C-contiguous ``(rows, pixels)`` of the launcher's dtype
            receiving ``output_size`` rows.
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
        type, so a scalar of another type would be misread on the GPU. The
        window kernels also take the bits that order signed values.
        """
        arguments = (frames, medians, np.int64(self.pixels), np.int64(output_size),
                     np.int32(self.kernel_size), np.int32(plan.segment_length))
        if self.family.value_xor is None:
            return arguments
        return (*arguments, np.uint32(self.family.value_xor))


_launchers: dict[tuple[int, int, int, str], Launcher] = {}
"""Launchers of this process by (device, pixels, kernel size, dtype), for arrays on a GPU"""


def launcher_for(device_index: int, pixels: int, kernel_size: int,
                 dtype=np.uint8) -> Launcher:
    """The process's launcher for one device, frame size, kernel size and dtype"""
    key = (device_index, pixels, kernel_size, np.dtype(dtype).str)
    with _compile_lock:
        launcher = _launchers.get(key)
    if launcher is None:
        launcher = Launcher(device_index, pixels, kernel_size, dtype=dtype)
        with _compile_lock:
            launcher = _launchers.setdefault(key, launcher)
    return launcher
