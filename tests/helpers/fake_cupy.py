"""A stand-in for the parts of CuPy (and pynvml) that dcbg uses, running on the CPU

Device arrays are numpy arrays and kernels are the real rollmed.cu compiled
with the host shim. Streams are faithful where it matters: work put on a
stream (copies, launches, waits on events) is deferred until the host waits
for it (an event's or a stream's ``synchronize``, a blocking ``get``), and
then the streams run in a random interleaving that respects only each
stream's order and its ``wait_event`` dependencies, as a GPU may. So a
missing dependency, or a host buffer handed on before its copy finished,
gives wrong bytes here instead of passing by luck. The stand-in records what
it was asked to do, so tests can check launches, copies and frees.
"""
import collections
import random
import threading
import types

import numpy as np

from . import host_kernel as hk


class OutOfMemoryError(MemoryError):
    """Like cupy.cuda.memory.OutOfMemoryError"""


class CUDARuntimeError(RuntimeError):
    """Like cupy.cuda.runtime.CUDARuntimeError"""


class CUDADriverError(RuntimeError):
    """Like cupy.cuda.driver.CUDADriverError"""


class _Wait:
    def __init__(self, event):
        self.event = event


class FakeEvent:
    """Done once its stream has run everything put on it before the event"""

    def __init__(self, stream, position):
        self.stream = stream
        self.position = position

    @property
    def done(self) -> bool:
        return self.stream.completed >= self.position

    def synchronize(self):
        self.stream.state.run_until(lambda: self.done)


class FakeStream:
    def __init__(self, state, name):
        self.state = state
        self.name = name
        self.pending: collections.deque = collections.deque()
        self.submitted = 0
        self.completed = 0
        state.streams.append(self)

    def __enter__(self):
        current_streams(self.state).append(self)
        return self

    def __exit__(self, *exc):
        current_streams(self.state).pop()

    def put(self, work):
        with self.state.lock:
            self.pending.append(work)
            self.submitted += 1

    def record(self):
        with self.state.lock:
            return FakeEvent(self, self.submitted)

    def wait_event(self, event):
        assert isinstance(event, FakeEvent)
        self.put(_Wait(event))

    def synchronize(self):
        target = self.submitted
        self.state.run_until(lambda: self.completed >= target)


def current_streams(state) -> list:
    """The stack of `with stream:` blocks of the calling thread"""
    if not hasattr(state.local, "streams"):
        state.local.streams = []
    return state.local.streams


def current_stream(state):
    streams = current_streams(state)
    return streams[-1] if streams else state.null_stream


class FakeArray:
    def __init__(self, state, array):
        self.state = state
        self.array = array

    def __getitem__(self, item):
        return FakeArray(self.state, self.array[item])

    def set(self, host, stream=None):
        assert stream is not None, "uploads run on an explicit stream"
        self.state.copies.append(("upload", stream.name))
        target = self.array
        stream.put(lambda: target.__setitem__(Ellipsis, host))  # reads `host` when it runs

    def get(self, stream=None, out=None, blocking=True):
        assert stream is not None and out is not None, "downloads go to pinned buffers"
        self.state.copies.append(("download", stream.name))
        source = self.array
        stream.put(lambda: out.__setitem__(Ellipsis, source))
        if blocking:
            stream.synchronize()
        return out


class FakeKernel:
    def __init__(self, state, name):
        self.state = state
        self.name = name
        self.ptr = hash(name) & 0xFFFF

    @property
    def kernel(self):
        return self

    def __call__(self, grid, block, args, shared_mem=0):
        frames, medians, pixels, output_size, kernel_size, segment_length = args
        assert len(current_streams(self.state)) == 1, "launch inside `with stream:`"
        assert shared_mem <= 48 * 1024
        plan = types.SimpleNamespace(kernel=self.name, grid=grid, block=block[0],
                                     segment_length=int(segment_length))
        state = self.state
        with state.lock:
            fault = state.faults.pop(len(state.launches), None)
            if fault is not None:  # injected at this launch number
                state.launches.append(("fault", grid, block, 0))
                raise fault
            state.launches.append((self.name, grid, block, int(output_size)))
            state.launch_devices.append(getattr(state.local, "device", 0))
        source, target = frames.array, medians.array
        current_stream(state).put(lambda: hk.launch(
            state.lib, plan, source, target, int(pixels), int(output_size), int(kernel_size)))


class FakeModule:
    def __init__(self, state, code, options):
        assert "dcbg_rollmed_count8" in code
        self.state = state
        state.compiled += 1
        state.compile_options.append(tuple(options))

    def get_function(self, name):
        return FakeKernel(self.state, name)


class FakeDevice:
    def __init__(self, state, index=0):
        if index >= state.device_count:
            raise CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {index}")
        self.state = state
        self.index = index

    def __enter__(self):
        self.previous = getattr(self.state.local, "device", 0)
        self.state.local.device = self.index
        return self

    def __exit__(self, *exc):
        self.state.local.device = self.previous


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
        self.null_stream = FakeStream(self, "null")
        self.launches: list = []
        self.launch_devices: list[int] = []
        self.copies: list = []
        self.compiled = 0
        self.compile_options: list = []
        self.faults: dict = {}
        self.largest_allocation: int | None = None
        self.largest_pinned: int | None = None
        self.freed_devices: list[int] = []
        self.memory_readings = 0

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


def make_fake_cupy(lib, free_bytes=80 * 2**30, device_count=1, seed=0):
    """Return (cupy, cupyx, pynvml) stand-in modules and their shared state"""
    state = FakeState(lib, free_bytes, device_count, seed)

    def empty(shape, dtype):
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if state.largest_allocation is not None and size > state.largest_allocation:
            raise OutOfMemoryError(f"Out of memory allocating {size:,} bytes")
        return FakeArray(state, np.full(shape, 0xCD, dtype))

    def empty_pinned(shape, dtype):
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if state.largest_pinned is not None and size > state.largest_pinned:
            raise CUDARuntimeError("cudaErrorMemoryAllocation: out of memory")
        return np.full(shape, 0xEF, dtype)

    def mem_get_info():
        state.memory_readings += 1
        return state.free_bytes, 2 * state.free_bytes

    class Pool:
        def free_all_blocks(self):
            state.freed_devices.append(getattr(state.local, "device", 0))

    class PinnedPool:
        def free_all_blocks(self):
            state.freed_devices.append("pinned")

    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: state.device_count,
        runtimeGetVersion=lambda: 13000,
        memGetInfo=mem_get_info,
        getDeviceProperties=lambda index: {"multiProcessorCount": 132,
                                           "sharedMemPerMultiprocessor": 228 * 1024,
                                           "maxThreadsPerMultiProcessor": 2048,
                                           "name": b"Fake H100"},
        deviceGetPCIBusId=lambda index: f"0000:{0x10 + index:02X}:00.0",
        CUDARuntimeError=CUDARuntimeError,
    )

    def occupancy(function, block, shared_mem):
        # an sm_90-like SM: 228 KiB of shared memory, 1 KiB reserved per block
        return min(228 * 1024 // (shared_mem + 1024), 2048 // block, 32)

    driver = types.SimpleNamespace(CUDADriverError=CUDADriverError,
                                   occupancyMaxActiveBlocksPerMultiprocessor=occupancy)
    cuda_ns = types.SimpleNamespace(
        runtime=runtime,
        driver=driver,
        memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
        Device=lambda index=0: FakeDevice(state, index),
        Stream=lambda non_blocking=False: FakeStream(state, f"stream{len(state.streams)}"),
        get_current_stream=lambda: current_stream(state),
        get_elapsed_time=lambda start, end: 0.5,
    )
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "fake"
    cupy.cuda = cuda_ns
    cupy.empty = empty
    cupy.RawModule = lambda code, options=(): FakeModule(state, code, options)
    cupy.get_default_memory_pool = Pool
    cupy.get_default_pinned_memory_pool = PinnedPool
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = empty_pinned
    return cupy, cupyx, make_fake_pynvml(state), state


def make_fake_pynvml(state):
    """pynvml numbering the GPUs in reverse of CUDA's order, as NVML may"""

    def handle(index):
        return types.SimpleNamespace(cuda=state.device_count - 1 - index)

    pynvml = types.ModuleType("pynvml")
    pynvml.nvmlInit = lambda: None
    pynvml.nvmlShutdown = lambda: None
    pynvml.nvmlDeviceGetCount = lambda: state.device_count
    pynvml.nvmlSystemGetDriverVersion = lambda: "580.00"
    pynvml.nvmlDeviceGetHandleByIndex = handle
    pynvml.nvmlDeviceGetName = lambda h: f"Fake GPU of CUDA ordinal {h.cuda}"
    pynvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=2 * state.free_bytes, free=state.free_bytes)
    pynvml.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(
        busId=f"00000000:{0x10 + h.cuda:02X}:00.0".encode())
    return pynvml
