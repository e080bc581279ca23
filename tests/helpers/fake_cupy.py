"""A stand-in for the parts of CuPy (and pynvml) that dcbg uses, running on the CPU

Device arrays are numpy arrays and kernels are the real rollmed.cu compiled
with the host shim. Streams are faithful where it matters: work put on a
stream (copies, launches, waits on events) is deferred until the host waits
for it (an event's or a stream's ``synchronize``, a blocking ``get``), and
then the streams run in a random interleaving that respects only each
stream's order and its ``wait_event`` dependencies, as a GPU may. So a
missing dependency, or a host buffer handed on before its copy finished,
gives wrong bytes here instead of passing by luck. The stand-in records what
it was asked to do, so tests can check launches, copies and frees, the order
of uploads, launches and downloads, page-locked allocations (exact sizes
through ``cuda.PinnedMemory``), whether the host waited on blocking-sync
events in the event's device, on which device kernel handles and occupancy
were taken, and how often NVML started and described a GPU. Tests inject
faults: a launch that raises (``faults``), a bit flipped in one median of
a launch (``flips``), an upload that copies nothing (``skipped_uploads``)
and a download that brings back the previous download's bytes
(``stale_downloads``); each passes the checks below, as the real fault
would.

It is as strict as CuPy and CUDA where dcbg could go wrong unseen: each
thread has a current device (0 until it sets one) and a context only once it
set a device or made a call that needs one, and setting a device creates
that device's context, as since CUDA 12 (:attr:`FakeState.contexts`), so
leaving ``with Device(n)`` in a thread that never set a device makes a
context on device 0, as CuPy's does. The occupancy calculator fails in a
thread without a context. Work queued on a stream of another device than
the one it runs on fails; uploads and downloads check shape, dtype and
contiguity as ``ndarray.set``/``get`` do; kernels take grids and blocks as
tuples only, arrays of the current device only (of elements of the size the
kernel reads), and scalars of the types the kernel's parameters have in the
source as the compile's options select it.
"""
import collections
import dataclasses
import functools
import random
import re
import subprocess
import threading
import types
import weakref

import numpy as np

from . import host_kernel as hk


class OutOfMemoryError(MemoryError):
    """Like cupy.cuda.memory.OutOfMemoryError"""


class CUDARuntimeError(RuntimeError):
    """Like cupy.cuda.runtime.CUDARuntimeError"""


class CUDADriverError(RuntimeError):
    """Like cupy.cuda.driver.CUDADriverError"""


class NVMLError(Exception):
    """Like pynvml.NVMLError"""


class _Wait:
    def __init__(self, event):
        self.event = event


class FakeEvent:
    """Done once its stream has run everything put on it before the event

    Like a CUDA event, one never recorded is done. Each host wait records
    whether the event was a blocking-sync one (``Event(block=True)``).
    """

    def __init__(self, state, block=False):
        ensure_context(state)
        self.device = current_device(state)
        self.block = block
        self.stream = None
        self.position = 0

    @property
    def done(self) -> bool:
        return self.stream is None or self.stream.completed >= self.position

    def synchronize(self):
        if self.stream is not None:
            state = self.stream.state
            state.host_waits.append(self.block)
            if current_device(state) != self.stream.device:
                state.foreign_waits.append((current_device(state), self.stream.device))
            state.run_until(lambda: self.done)


class FakeStream:
    def __init__(self, state, name, device=None):
        self.state = state
        self.name = name
        self.pending: collections.deque = collections.deque()
        self.submitted = 0
        self.completed = 0
        if device is None:  # a stream CuPy creates: on the current device, in its context
            ensure_context(state)
            device = current_device(state)
        self.device = device
        state.streams.append(self)

    def __enter__(self):
        check_stream_device(self.state, self, "with stream:")
        current_streams(self.state, self.device).append(self)
        return self

    def __exit__(self, *exc):
        current_streams(self.state, self.device).pop()

    def put(self, work):
        with self.state.lock:
            self.pending.append(work)
            self.submitted += 1

    def record(self, event=None):
        event = event if event is not None else FakeEvent(self.state)
        if event.device != self.device:
            raise CUDARuntimeError(
                f"cudaErrorInvalidResourceHandle: an event of device {event.device} "
                f"recorded on a stream of device {self.device}")
        with self.state.lock:
            event.stream, event.position = self, self.submitted
            return event

    def wait_event(self, event):
        assert isinstance(event, FakeEvent)
        self.put(_Wait(event))

    def synchronize(self):
        target = self.submitted
        self.state.run_until(lambda: self.completed >= target)


def current_streams(state, device=None) -> list:
    """The stack of `with stream:` blocks of the calling thread on a device (the current one)"""
    if not hasattr(state.local, "streams"):
        state.local.streams = {}
    device = current_device(state) if device is None else device
    return state.local.streams.setdefault(device, [])


def current_stream(state):
    """The calling thread's current stream of its current device, as CuPy keeps one per device"""
    streams = current_streams(state)
    return streams[-1] if streams else state.null_stream_of(current_device(state))


def check_stream_device(state, stream, what: str, device=None, error=RuntimeError):
    """Refuse work for `device` (the current one) on a stream of another device, as CUDA does"""
    device = current_device(state) if device is None else device
    if stream.device != device:
        raise error(
            f"{what}: the device that the stream is created on ({stream.device}) does not "
            f"match with the current device ({device})")


class FakeArray:
    """A device array: numpy memory that only stream work reads and writes"""

    def __init__(self, state, array, device=None):
        self.state = state
        self.array = array
        self.device = types.SimpleNamespace(
            id=current_device(state) if device is None else device)

    def __getitem__(self, item):
        return FakeArray(self.state, self.array[item], self.device.id)

    def __setitem__(self, item, value):
        """A device-to-device copy on the current stream (reads `value` when it runs)"""
        check_current_device(self.state, self, *([value] if isinstance(value, FakeArray) else []))
        target = self.array
        source = value.array if isinstance(value, FakeArray) else value
        self.state.calls.append(("device copy", target[item].shape))
        current_stream(self.state).put(lambda: target.__setitem__(item, source))

    shape = property(lambda self: self.array.shape)
    dtype = property(lambda self: self.array.dtype)
    ndim = property(lambda self: self.array.ndim)
    flags = property(lambda self: self.array.flags)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "version": 3,
                "data": (self.array.ctypes.data, False), "strides": None}

    def reshape(self, *shape):
        assert self.array.flags.c_contiguous, "reshape of a non-contiguous device array copies"
        return FakeArray(self.state, self.array.reshape(*shape), self.device.id)

    def set(self, host, stream=None):
        """An upload on `stream`, checked as CuPy's ``ndarray.set`` checks it"""
        assert stream is not None, "uploads run on an explicit stream"
        if not isinstance(host, np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != host.dtype:
            raise TypeError(f"{host.dtype} array cannot be set to {self.dtype} array")
        if self.shape != host.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {host.shape}")
        if not (self.flags.c_contiguous or self.flags.f_contiguous):
            raise RuntimeError("Cannot set to non-contiguous array")
        if not host.flags.c_contiguous:
            host = np.ascontiguousarray(host)  # CuPy copies it now, pageable
        with copying_on(self.state, self.device.id):
            check_stream_device(self.state, stream, "upload", error=CUDARuntimeError)
            self.state.copies.append(("upload", stream.name))
            self.state.calls.append(("upload", len(host)))
            target = self.array
            if self.state.copy_number("upload") in self.state.skipped_uploads:
                stream.put(lambda: None)  # the device buffer keeps what it held
                return
            stream.put(lambda: target.__setitem__(Ellipsis, host))  # reads `host` when it runs

    def get(self, stream=None, out=None, blocking=True):
        """A download on `stream`, checked as CuPy's ``ndarray.get`` checks it"""
        assert stream is not None and out is not None, "downloads go to pinned buffers"
        if not isinstance(out, np.ndarray):
            raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
        if self.dtype != out.dtype:
            raise TypeError(f"{out.dtype} array cannot be obtained from {self.dtype} array")
        if self.shape != out.shape:
            raise ValueError(
                f"Shape mismatch. Expected shape: {self.shape}, actual shape: {out.shape}")
        if not (out.flags.c_contiguous or out.flags.f_contiguous):
            raise RuntimeError("`out` cannot be specified when copying to non-contiguous "
                               "ndarray")
        with copying_on(self.state, self.device.id):
            check_stream_device(self.state, stream, "download", error=CUDARuntimeError)
            self.state.copies.append(("download", stream.name))
            self.state.calls.append(("download", len(out)))
            source = self.array
            stale = self.state.copy_number("download") in self.state.stale_downloads
            stream.put(lambda: self.state.download(source, out, stale))
            if blocking:
                stream.synchronize()
        return out


class FakeKernel:
    def __init__(self, state, name, parameters):
        self.state = state
        self.name = name
        self.parameters = parameters
        self.loaded: set[int] = set()

    @property
    def kernel(self):
        """The function loaded on the current device, as CuPy hands it out

        Loading it the first time on a device needs a context; later it
        comes from CuPy's cache, without a CUDA call.
        """
        device = current_device(self.state)
        if device not in self.loaded:
            ensure_context(self.state)
            self.loaded.add(device)
        self.state.function_devices.append(device)
        return types.SimpleNamespace(ptr=(hash(self.name) & 0xFFFF) + (device << 16))

    def __call__(self, grid, block, args, shared_mem=0):
        # CuPy's Function.__call__ takes `tuple grid, tuple block` (Cython checks the type)
        for what, value in (("grid", grid), ("block", block)):
            if not isinstance(value, tuple):
                raise TypeError(f"Argument '{what}' has incorrect type (expected tuple, got "
                                f"{type(value).__name__})")
        check_arguments(self.state, self.name, self.parameters, args)
        # the window kernels (8- and 16-bit values) also take value_xor
        frames, medians, pixels, output_size, kernel_size, segment_length, *value_xor = args
        assert current_streams(self.state), "launch inside `with stream:`"
        assert shared_mem <= 48 * 1024
        ensure_context(self.state)
        plan = types.SimpleNamespace(kernel=self.name, grid=grid, block=block[0],
                                     segment_length=int(segment_length), shared_mem=shared_mem)
        state = self.state
        with state.lock:
            fault = state.faults.pop(len(state.launches), None)
            if fault is not None:  # injected at this launch number
                state.launches.append(("fault", grid, block, 0))
                raise fault
            flip = state.flips.pop(len(state.launches), None)
            state.launches.append((self.name, grid, block, int(output_size)))
            state.launch_devices.append(current_device(state))
            state.calls.append(("kernel", int(output_size)))
        source, target = frames.array, medians.array
        extra = {"value_xor": int(value_xor[0])} if value_xor else {}

        def run():
            hk.launch(state.lib, plan, source, target, int(pixels), int(output_size),
                      int(kernel_size), **extra)
            if flip is not None:  # one median goes wrong, as in memory without ECC
                window, pixel, *bits = flip
                value = target[window:window + 1, pixel].view(f"u{target.itemsize}")
                value ^= bits[0] if bits else 0x01  # of the value's bytes, signed or not

        current_stream(state).put(run)


class FakeModule:
    def __init__(self, state, code, options):
        self.state = state
        if state.compile_error is not None:
            raise state.compile_error
        state.compiled += 1
        state.compile_options.append(tuple(options))
        self.parameters = kernel_parameters(code, tuple(options))

    def get_function(self, name):
        if name not in self.parameters:  # as the module load fails in CuPy
            raise CUDADriverError(f"CUDA_ERROR_NOT_FOUND: named symbol not found ({name} is "
                                  f"not an entry point of this module)")
        return FakeKernel(self.state, name, self.parameters[name])


C_TYPES = {"long long": np.int64, "int": np.int32, "unsigned int": np.uint32,
           "unsigned short": np.uint16, "unsigned char": np.uint8}
"""numpy types of the C types of a kernel's parameters (by value) and array elements"""


@dataclasses.dataclass(frozen=True)
class ArrayParameter:
    """A pointer parameter of a kernel: a device array of elements of this size"""

    element: type


@functools.cache
def kernel_parameters(code: str, options: tuple) -> dict:
    """The parameters of each entry point in the compiled source, by name

    The host compiler's preprocessor expands the source with the compile's
    ``-D`` options, as NVRTC does, so that only the entry points the options
    select are there, each with its parameters' types: an
    :class:`ArrayParameter` or the numpy type of a parameter taken by value.
    """
    defines = [option for option in options if option.startswith("-D")]
    expanded = subprocess.run([hk.compiler(), "-E", "-P", "-x", "c++", *defines, "-"],
                              input=code, capture_output=True, text=True, check=True).stdout
    entries = {}
    for name, declarations in re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)',
                                         expanded):
        parameters = []
        for declaration in declarations.split(","):
            words = [word for word in declaration.replace("*", " * ").split()
                     if word not in ("const", "__restrict__")]
            if "*" in words:
                parameters.append(ArrayParameter(C_TYPES[" ".join(words[:words.index("*")])]))
            else:
                parameters.append(C_TYPES[" ".join(words[:-1])])
        entries[name] = parameters
    assert entries, "no entry point in the kernel source"
    return entries


def check_arguments(state, name: str, parameters: list, args: tuple):
    """Refuse what CUDA would misread: scalars of another size, arrays of another device
    or of elements of another size

    CuPy passes a numpy scalar by value at its own size, whatever the
    kernel's parameter is, so a mismatch reads garbage on a GPU; an array
    passes as a bare pointer, read as the parameter's element type.
    """
    if len(args) != len(parameters):
        raise TypeError(f"{name} takes {len(parameters)} arguments, got {len(args)}")
    for position, (parameter, argument) in enumerate(zip(parameters, args, strict=True)):
        if isinstance(parameter, ArrayParameter):
            if not isinstance(argument, FakeArray):
                raise TypeError(f"{name}: argument {position} must be a device array")
            if argument.dtype.itemsize != np.dtype(parameter.element).itemsize:
                raise TypeError(f"{name}: argument {position} must hold elements of "
                                f"{np.dtype(parameter.element).itemsize} bytes, as the "
                                f"kernel's parameter, got {argument.dtype}")
            check_current_device(state, argument)
        elif type(argument) is not parameter:
            raise TypeError(f"{name}: argument {position} must be {parameter.__name__}, as "
                            f"the kernel's parameter, got {type(argument).__name__}")


def check_current_device(state, *arrays):
    """Refuse device arrays of another device than the current one"""
    device = current_device(state)
    for array in arrays:
        if array.device.id != device:
            raise ValueError(f"The device where the array resides ({array.device.id}) is "
                             f"different from the current device ({device}).")


class FakeDevice:
    """cupy.cuda.Device: entering reads the current device and sets its own if it
    differs, leaving sets the one read (CuPy's own steps, which in a thread that
    never set a device set device 0 and so create its context)"""

    def __init__(self, state, index=0):
        if index >= state.device_count:
            raise CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {index}")
        self.state = state
        self.id = index
        self.index = index

    def __enter__(self):
        previous = current_device(self.state)
        device_stack(self.state).append(previous)
        if previous != self.index:
            set_device(self.state, self.index)
        return self

    def __exit__(self, *exc):
        set_device(self.state, device_stack(self.state).pop())

    def use(self):
        set_device(self.state, self.index)
        return self


class FakeState:
    """What the stand-in was asked to do, and the knobs of a test"""

    def __init__(self, lib, free_bytes, device_count, seed):
        self.lib = lib
        self.free_bytes = free_bytes
        self.device_count = device_count
        self.random = random.Random(seed)
        self.lock = threading.RLock()
        self.local = threading.local()
        self.streams: list[FakeStream] = []
        self.null_streams: dict[int, FakeStream] = {}
        self.null_stream = self.null_stream_of(0)
        self.contexts: set[int] = set()
        """devices on which this process made a CUDA context (each costs GPU memory)"""
        self.allocations: list[tuple[int, weakref.ref]] = []
        """(device, allocation) of every device array, to tell which are still referenced"""
        self.held_at_release: list[int] = []
        """bytes of device arrays still referenced whenever the pool freed its blocks"""
        self.nvml_error: BaseException | None = None
        """raised by NVML's memory reading, as a GPU that fell off the bus does"""
        self.launches: list = []
        self.launch_devices: list[int] = []
        self.copies: list = []
        self.compiled = 0
        self.compile_options: list = []
        self.faults: dict = {}
        self.largest_allocation: int | None = None
        self.largest_pinned: int | None = None
        self.pinned_allocations: list[int] = []
        self.pool_free_bytes = 0
        self.freed_devices: list[int] = []
        self.memory_readings = 0
        self.calls: list[tuple[str, int]] = []
        """uploads, launches and downloads in the order they were put on streams"""
        self.host_waits: list[bool] = []
        """for each time the host waited on an event: whether it was a blocking-sync one"""
        self.foreign_waits: list[tuple[int, int]] = []
        """(thread's device, event's device) of host waits outside the event's device"""
        self.function_devices: list[int] = []
        """the current device whenever a kernel's function handle was fetched"""
        self.occupancy_devices: list[int] = []
        """the current device whenever the occupancy calculator was asked"""
        self.compile_error: BaseException | None = None
        self.nvml_inits = 0
        self.nvml_descriptions = 0
        self.nvml_memory_readings = 0
        """NVML's readings of a GPU's memory (its total once, its free memory per description)"""
        self.empty_shapes: list[tuple] = []
        """the shape of every array cupy.empty made"""
        self.flips: dict[int, tuple[int, ...]] = {}
        """launch number → (window, pixel) of the median that launch gets one bit wrong, the
        lowest, or (window, pixel, bits) with the bits it flips"""
        self.skipped_uploads: set[int] = set()
        """numbers of the uploads that copy nothing"""
        self.stale_downloads: set[int] = set()
        """numbers of the downloads that bring back the previous download's bytes"""
        self.previous_download: np.ndarray | None = None

    def copy_number(self, kind: str) -> int:
        """The number of the last upload or download asked for (counted from 0)"""
        return sum(1 for copy, _ in self.copies if copy == kind) - 1

    def download(self, source: np.ndarray, out: np.ndarray, stale: bool):
        """Run a download into `out`; a stale one brings the previous download's bytes"""
        previous = self.previous_download
        self.previous_download = source.copy()
        if not stale:
            out[...] = source
        elif previous is not None:
            rows = min(len(out), len(previous))
            out[:rows] = previous[:rows]

    def null_stream_of(self, device: int) -> FakeStream:
        """The null stream of a device"""
        with self.lock:
            if device not in self.null_streams:
                self.null_streams[device] = FakeStream(self, f"null{device or ''}", device)
            return self.null_streams[device]

    def held_bytes(self, device: int) -> int:
        """Bytes of the device's arrays that something still references"""
        return sum(array.nbytes for where, ref in self.allocations
                   if where == device and (array := ref()) is not None)

    def run_until(self, condition):
        """Run queued stream work in a random legal order until `condition()` holds"""
        with self.lock:
            while not condition():
                ready = [s for s in self.streams if s.pending
                         and (not isinstance(s.pending[0], _Wait) or s.pending[0].event.done)]
                if not ready:
                    raise AssertionError("stream deadlock: waiting for work that can never run")
                stream = self.random.choice(ready)
                work = stream.pending.popleft()
                if not isinstance(work, _Wait):
                    work()
                stream.completed += 1


def current_device(state) -> int:
    """The calling thread's current device (0 where it never set one, as cudaGetDevice)"""
    return getattr(state.local, "device", 0)


def set_device(state, index: int):
    """cudaSetDevice: since CUDA 12 it creates the device's context and makes it current"""
    state.local.device = index
    ensure_context(state)


def ensure_context(state):
    """What a CUDA call that needs a context does: make the current device's one"""
    with state.lock:
        state.contexts.add(current_device(state))
    state.local.context = True


def has_context(state) -> bool:
    """Whether a context is current in the calling thread"""
    return getattr(state.local, "context", False)


def device_stack(state) -> list:
    """The devices that the calling thread's `with Device(...)` blocks go back to"""
    if not hasattr(state.local, "device_stack"):
        state.local.device_stack = []
    return state.local.device_stack


class copying_on:
    """A copy's steps in CuPy's ndarray.set and get: the array's device set for the copy,
    then the device read before it set again"""

    def __init__(self, state, device: int):
        self.state = state
        self.device = device

    def __enter__(self):
        self.previous = current_device(self.state)
        set_device(self.state, self.device)

    def __exit__(self, *exc):
        set_device(self.state, self.previous)


class FakePinnedMemory:
    """Page-locked host memory of exactly `size` bytes, as cupy.cuda.PinnedMemory"""

    def __init__(self, state, size, flags=0):
        ensure_context(state)
        if state.largest_pinned is not None and size > state.largest_pinned:
            raise CUDARuntimeError("cudaErrorMemoryAllocation: out of memory")
        state.pinned_allocations.append(size)
        self.size = size
        self.buffer = bytearray(b"\xef" * size)  # garbage, as fresh memory may hold


def make_fake_cupy(lib, free_bytes=80 * 2**30, device_count=1, seed=0, version="14.2.0"):
    """Return (cupy, cupyx, pynvml) stand-in modules and their shared state"""
    state = FakeState(lib, free_bytes, device_count, seed)

    def empty(shape, dtype):
        ensure_context(state)
        state.empty_shapes.append(tuple(shape))
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if state.largest_allocation is not None and size > state.largest_allocation:
            raise OutOfMemoryError(f"Out of memory allocating {size:,} bytes")
        return allocate(state, garbage(shape, dtype, 0xCD))

    def empty_pinned(shape, dtype):
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if state.largest_pinned is not None and size > state.largest_pinned:
            raise CUDARuntimeError("cudaErrorMemoryAllocation: out of memory")
        return garbage(shape, dtype, 0xEF)

    def mem_get_info():
        ensure_context(state)
        state.memory_readings += 1
        return state.free_bytes, 2 * state.free_bytes

    class Pool:
        def free_all_blocks(self):
            # Blocks of arrays still referenced stay allocated, as in CuPy's pool
            device = current_device(state)
            state.freed_devices.append(device)
            state.held_at_release.append(state.held_bytes(device))

        def free_bytes(self):
            return state.pool_free_bytes

    class PinnedPool:
        def free_all_blocks(self):
            state.freed_devices.append("pinned")

    def set_device_checked(index):
        FakeDevice(state, index).use()

    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: state.device_count,
        getDevice=lambda: current_device(state),
        setDevice=set_device_checked,
        runtimeGetVersion=lambda: 13000,
        memGetInfo=mem_get_info,
        getDeviceProperties=lambda index: {"multiProcessorCount": 132,
                                           "sharedMemPerMultiprocessor": 228 * 1024,
                                           "maxThreadsPerMultiProcessor": 2048,
                                           "name": b"Fake H100"},
        deviceGetPCIBusId=lambda index: f"0000:{0x10 + index:02X}:00.0",
        CUDARuntimeError=CUDARuntimeError,
        hostAllocPortable=1,
    )

    def occupancy(function, block, shared_mem):
        # A driver call: it needs a current context, which CuPy does not make for it
        if not has_context(state):
            raise CUDADriverError("CUDA_ERROR_INVALID_CONTEXT: invalid device context")
        if function >> 16 != current_device(state):
            raise CUDADriverError("CUDA_ERROR_INVALID_HANDLE: invalid resource handle")
        state.occupancy_devices.append(current_device(state))
        # an sm_90-like SM: 228 KiB of shared memory, 1 KiB reserved per block
        return min(228 * 1024 // (shared_mem + 1024), 2048 // block, 32)

    driver = types.SimpleNamespace(
        CUDADriverError=CUDADriverError,
        occupancyMaxActiveBlocksPerMultiprocessor=occupancy,
        ctxGetCurrent=lambda: 0x7000 + current_device(state) if has_context(state) else 0)
    cuda_ns = types.SimpleNamespace(
        runtime=runtime,
        driver=driver,
        memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
        Device=lambda index=0: FakeDevice(state, index),
        Stream=lambda non_blocking=False: FakeStream(state, f"stream{len(state.streams)}"),
        Event=lambda block=False, disable_timing=False, interprocess=False: FakeEvent(
            state, block),
        PinnedMemory=lambda size, flags=0: FakePinnedMemory(state, size, flags),
        PinnedMemoryPointer=lambda memory, offset: memoryview(memory.buffer)[offset:],
        get_current_stream=lambda: current_stream(state),
        get_elapsed_time=lambda start, end: 0.5,
        set_allocator=lambda allocator=None: None,  # arrays here are never pooled
    )
    cupy = types.ModuleType("cupy")
    cupy.__version__ = version
    cupy.cuda = cuda_ns
    cupy.empty = empty
    cupy.asarray = lambda data: asarray(state, data)
    cupy.asnumpy = lambda array: asnumpy(state, array)
    cupy.ascontiguousarray = lambda array: ascontiguousarray(state, array)
    cupy.take = lambda array, indices, axis=None, out=None: take(state, array, indices,
                                                                 axis, out)
    cupy.may_share_memory = lambda a, b, max_work=None: np.may_share_memory(a.array, b.array)
    cupy.from_dlpack = lambda data: data.device_array  # the test doubles of torch tensors
    cupy.ndarray = FakeArray
    for name in ("uint8", "int8", "uint16", "int16"):
        setattr(cupy, name, getattr(np, name))
    cupy.RawModule = lambda code, options=(): FakeModule(state, code, options)
    cupy.get_default_memory_pool = Pool
    cupy.get_default_pinned_memory_pool = PinnedPool
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = empty_pinned
    cupyx.scipy = types.ModuleType("cupyx.scipy")
    cupyx.scipy.ndimage = types.ModuleType("cupyx.scipy.ndimage")
    cupyx.scipy.ndimage.median_filter = lambda array, size, **kwargs: median_filter(
        state, array, size, **kwargs)
    return cupy, cupyx, make_fake_pynvml(state), state


def asnumpy(state, array: FakeArray) -> np.ndarray:
    """Like cupy.asnumpy: waits for the current stream's work, then copies to the host"""
    state.calls.append(("device to host", array.shape))
    current_stream(state).synchronize()
    return array.array.copy()


def garbage(shape, dtype, byte: int) -> np.ndarray:
    """Memory that was never written: every byte `byte`, whatever the dtype"""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64))
    return np.full(size * dtype.itemsize, byte, np.uint8).view(dtype).reshape(shape)


def asarray(state, data) -> FakeArray:
    """Like cupy.asarray: device arrays as they are, host data copied to the device at once"""
    if isinstance(data, FakeArray):
        return data
    inner = getattr(data, "device_array", None)  # a CUDA array of another library
    if inner is not None and hasattr(data, "__cuda_array_interface__"):
        return inner
    state.calls.append(("host to device", np.shape(data)))
    return allocate(state, np.array(data))


def allocate(state, memory: np.ndarray) -> FakeArray:
    """A new device array on the current device holding `memory`"""
    ensure_context(state)
    state.allocations.append((current_device(state), weakref.ref(memory)))
    return FakeArray(state, memory)


def ascontiguousarray(state, array: FakeArray) -> FakeArray:
    """Like cupy.ascontiguousarray: the array itself, or a copy queued on the current stream"""
    if array.array.flags.c_contiguous:
        return array
    copy = allocate(state, np.empty(array.shape, array.dtype))
    copy[...] = array
    return copy


def take(state, array: FakeArray, indices, axis, out=None) -> FakeArray:
    """Like cupy.take along an axis: a gather queued on the current stream, of arrays of
    the current device, into an `out` of the result's shape and dtype"""
    assert axis is not None, "dcbg takes along an axis"
    source = array.array
    index = indices.array if isinstance(indices, FakeArray) else np.asarray(indices)
    shape = source.shape[:axis] + index.shape + source.shape[axis + 1:]
    check_current_device(state, array, *(a for a in (indices, out) if isinstance(a, FakeArray)))
    if out is None:
        out = allocate(state, np.empty(shape, source.dtype))
    elif out.shape != shape or out.dtype != source.dtype:
        raise ValueError(f"Output shape or dtype mismatch: {out.shape} {out.dtype}, expected "
                         f"{shape} {source.dtype}")
    target = out.array
    current_stream(state).put(lambda: np.take(source, index, axis=axis, out=target))
    return out


def median_filter(state, array: FakeArray, size, **kwargs) -> FakeArray:
    """Like cupyx.scipy.ndimage.median_filter: SciPy's, queued on the current stream"""
    from scipy import ndimage
    source = array.array
    result = allocate(state, np.empty_like(source))
    current_stream(state).put(lambda: result.array.__setitem__(
        Ellipsis, ndimage.median_filter(source, size=size, **kwargs)))
    return result


def make_fake_pynvml(state):
    """pynvml numbering the GPUs in reverse of CUDA's order, as NVML may"""

    def handle(index):
        return types.SimpleNamespace(cuda=state.device_count - 1 - index)

    def init():
        state.nvml_inits += 1

    def name(h):
        state.nvml_descriptions += 1
        return f"Fake GPU of CUDA ordinal {h.cuda}"

    pynvml = types.ModuleType("pynvml")
    pynvml.nvmlInit = init
    pynvml.nvmlShutdown = lambda: None
    pynvml.nvmlDeviceGetCount = lambda: state.device_count
    pynvml.nvmlSystemGetDriverVersion = lambda: "580.00"
    pynvml.nvmlDeviceGetHandleByIndex = handle
    pynvml.nvmlDeviceGetName = name
    def memory_info(h):
        state.nvml_memory_readings += 1
        if state.nvml_error is not None:
            raise state.nvml_error
        return types.SimpleNamespace(total=2 * state.free_bytes, free=state.free_bytes)

    pynvml.NVMLError = NVMLError
    pynvml.nvmlDeviceGetMemoryInfo = memory_info
    pynvml.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(
        busId=f"00000000:{0x10 + h.cuda:02X}:00.0".encode())
    return pynvml
