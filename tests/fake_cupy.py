"""A stand-in for the parts of CuPy that dcbg.cuda uses, running on the CPU

Device arrays are numpy arrays, streams run work immediately (a legal
schedule of the real ordering), and RawModule kernels are the real
rollmed.cu compiled with the host shim. It lets CI run the CUDA backend's
Python pipeline (device selection, memory fitting, double buffering,
batch plan) end to end without a GPU. It records what it was asked to do so
tests can check the launches and copies.
"""
import threading
import types

import numpy as np

import host_kernel as hk


class FakeArray:
    def __init__(self, array):
        self.array = array

    def __getitem__(self, item):
        return FakeArray(self.array[item])

    def set(self, host, stream=None):
        assert stream is not None, "uploads must run on the copy stream"
        self.array[...] = host

    def get(self, stream=None, out=None):
        assert stream is not None, "downloads must run on the copy stream"
        out[...] = self.array
        return out


class FakeEvent:
    def synchronize(self):
        pass


class FakeStream:
    def __init__(self, state, non_blocking=False):
        self.state = state

    def __enter__(self):
        current_streams(self.state).append(self)
        return self

    def __exit__(self, *exc):
        current_streams(self.state).pop()

    def record(self):
        return FakeEvent()

    def wait_event(self, event):
        assert isinstance(event, FakeEvent)

    def synchronize(self):
        pass


def current_streams(state) -> list:
    """The stack of `with stream:` blocks of the calling thread"""
    if not hasattr(state.local, "streams"):
        state.local.streams = []
    return state.local.streams


class OutOfMemoryError(MemoryError):
    """Like cupy.cuda.memory.OutOfMemoryError"""


class CUDARuntimeError(RuntimeError):
    """Like cupy.cuda.runtime.CUDARuntimeError"""


class CUDADriverError(RuntimeError):
    """Like cupy.cuda.driver.CUDADriverError"""


class FakeKernel:
    def __init__(self, state, name):
        self.state = state
        self.name = name

    def __call__(self, grid, block, args, shared_mem=0):
        frames, medians, pixels, output_size, kernel_size, segment_length = args
        assert len(current_streams(self.state)) == 1, "launch inside `with stream:`"
        assert shared_mem <= 48 * 1024
        plan = types.SimpleNamespace(kernel=self.name, grid=grid, block=block[0],
                                     segment_length=int(segment_length))
        # The host shim keeps the CUDA built-ins in globals: one launch at a time.
        with self.state.lock:
            fault = self.state.faults.pop(len(self.state.launches), None)
            if fault is not None:  # injected at this launch number
                self.state.launches.append(("fault", grid, block, 0))
                raise fault
            self.state.launches.append((self.name, grid, block, int(output_size)))
            self.state.launch_devices.append(getattr(self.state.local, "device", 0))
            hk.launch(self.state.lib, plan, frames.array, medians.array, int(pixels),
                      int(output_size), int(kernel_size))


class FakeModule:
    def __init__(self, state, code, options):
        assert "dcbg_rollmed_count8" in code
        self.state = state
        state.compiled += 1

    def get_function(self, name):
        return FakeKernel(self.state, name)


class FakeDevice:
    def __init__(self, state, index=0):
        if index >= state.device_count:
            raise RuntimeError(f"invalid device ordinal {index}")
        self.state = state
        self.index = index

    def __enter__(self):
        self.previous = getattr(self.state.local, "device", 0)
        self.state.local.device = self.index
        return self

    def __exit__(self, *exc):
        self.state.local.device = self.previous


class FakePool:
    def free_all_blocks(self):
        pass


def make_fake_cupy(lib, free_bytes=80 * 2**30, device_count=1):
    """Return (cupy, cupyx) stand-in modules and their shared state"""
    state = types.SimpleNamespace(lib=lib, launches=[], compiled=0, local=threading.local(),
                                  device_count=device_count, free_bytes=free_bytes,
                                  allocated=0, largest_allocation=None, faults={},
                                  lock=threading.Lock(), launch_devices=[])

    def empty(shape, dtype):
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if state.largest_allocation is not None and size > state.largest_allocation:
            raise OutOfMemoryError(f"Out of memory allocating {size:,} bytes")
        state.allocated += size
        return FakeArray(np.full(shape, 0xCD, dtype))

    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: state.device_count,
        runtimeGetVersion=lambda: 13000,
        memGetInfo=lambda: (state.free_bytes, 2 * state.free_bytes),
        getDeviceProperties=lambda index: {"multiProcessorCount": 132,
                                           "sharedMemPerMultiprocessor": 228 * 1024,
                                           "maxThreadsPerMultiProcessor": 2048,
                                           "name": b"Fake H100"},
    )
    runtime.CUDARuntimeError = CUDARuntimeError
    cuda_ns = types.SimpleNamespace(
        runtime=runtime,
        memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
        driver=types.SimpleNamespace(CUDADriverError=CUDADriverError),
        Device=lambda index=0: FakeDevice(state, index),
        Stream=lambda non_blocking=False: FakeStream(state, non_blocking),
        get_current_stream=lambda: FakeStream(state),
    )
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "fake"
    cupy.cuda = cuda_ns
    cupy.empty = empty
    cupy.RawModule = lambda code, options=(): FakeModule(state, code, options)
    cupy.get_default_memory_pool = FakePool
    cupy.get_default_pinned_memory_pool = FakePool
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = lambda shape, dtype: np.empty(shape, dtype)
    return cupy, cupyx, state
