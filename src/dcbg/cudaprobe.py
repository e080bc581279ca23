"""What CUDA offers this process, short of the kernel: whether a device can run dcbg, the GPUs

Everything here answers questions without the median kernel: whether CuPy
imports and is recent enough, how many devices CUDA sees, why a device
cannot be used (with the install advice), where CuPy keeps its kernel cache
and what to do when it cannot write there (CuPy makes the folder when it is
imported), the NVIDIA GPUs as NVML describes them, and the versions a run
log records. Whether the kernel compiles is :mod:`dcbg.engines.cudakernel`'s
question, and the device choice that needs it is :mod:`dcbg.devices`'; this
module imports nothing of either.

NVML is initialised once per process and the GPUs are described once (name,
PCI bus id, total memory, driver); only their free memory is read afresh.
CuPy and pynvml are imported lazily, so this module imports everywhere.
"""
from __future__ import annotations

import atexit
import functools
import os
import pathlib
import re

from .errors import DeviceError, first_line, install_advice, setting_error

MIN_CUPY_MAJOR = 13
"""Oldest CuPy major dcbg runs with (asynchronous downloads need ``get(blocking=False)``)"""

FIX_INSTALL = ("install the extra for your driver's CUDA major (see nvidia-smi), which brings "
               f"CuPy, NVRTC and the CUDA headers: {install_advice('cuda12', 'cuda13')}")
"""What to do when CuPy, NVRTC or the CUDA headers are missing"""

DEFAULT_KERNEL_CACHE = "~/.cupy/kernel_cache"
"""Where CuPy keeps compiled kernels unless ``CUPY_CACHE_DIR`` says otherwise"""


def cupy_version_problem(version: str) -> str | None:
    """Why this CuPy version is too old for dcbg, with what to do; None when it will do

    A version whose major cannot be read (a development build) is accepted.
    """
    match = re.match(r"\s*(\d+)", str(version))
    if match is None or int(match.group(1)) >= MIN_CUPY_MAJOR:
        return None
    return (f"CuPy {version} is too old, dcbg needs CuPy {MIN_CUPY_MAJOR} or newer; "
            f"{FIX_INSTALL}")


def cuda_device_count() -> int:
    """Number of CUDA devices CuPy sees (0 without CuPy or driver)"""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - any failure means no usable device
        return 0


def device_problem(index: int = 0) -> str | None:
    """Why CUDA device `index` cannot run dcbg, short of compiling the kernel; None if it can

    Checks that CuPy imports and is recent enough, that a driver answers and
    that the device exists: what can be known at once. Whether the kernel
    compiles is :func:`dcbg.devices.cuda_unavailable_reason`'s question.
    """
    try:
        import cupy
    except ImportError:
        return f"CuPy is not installed; {FIX_INSTALL}"
    except Exception as error:  # a broken CUDA install raises all sorts
        if in_kernel_cache(error):  # CuPy makes its kernel cache folder when it imports
            return cache_problem(error)
        return f"CuPy failed to import ({first_line(error)}); {FIX_INSTALL}"
    too_old = cupy_version_problem(getattr(cupy, "__version__", ""))
    if too_old is not None:
        return too_old
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001 - no driver, or a driver older than CuPy's CUDA
        return (f"no usable CUDA driver or device ({first_line(error)}); check the GPU with "
                f"nvidia-smi and that the extra's CUDA major matches the driver")
    if count == 0:
        return "no CUDA device found; check the GPU with nvidia-smi"
    if index >= count:
        return f"CUDA device {index} does not exist (found {count}); use cuda:0 … cuda:{count - 1}"
    return None


def unusable_device_error(index: int, reason: str) -> DeviceError:
    """The error for a CUDA device that was asked for and cannot be used"""
    return setting_error(DeviceError, "CUDA device {index} cannot be used: {reason}; or use "
                         "{setting}.", "device", suggested=("cpu", "auto"), index=index,
                         reason=reason)


def kernel_cache_folder() -> pathlib.Path:
    """The folder CuPy keeps compiled kernels in"""
    return pathlib.Path(os.environ.get("CUPY_CACHE_DIR") or DEFAULT_KERNEL_CACHE).expanduser()


def cache_problem(error: BaseException) -> str:
    """What a failure to make or write CuPy's kernel cache folder means, with what to do"""
    return (f"CuPy cannot write its kernel cache in {kernel_cache_folder()} "
            f"({first_line(error)}); set CUPY_CACHE_DIR to a writable folder")


def in_kernel_cache(error: BaseException) -> bool:
    """Whether `error` is a file system error on CuPy's kernel cache folder or above it"""
    name = getattr(error, "filename", None)
    if not isinstance(error, OSError) or not name:
        return False
    path = pathlib.Path(os.fsdecode(name)).expanduser().absolute()
    folder = kernel_cache_folder().absolute()
    return path == folder or path in folder.parents or folder in path.parents


def visible_nvidia_gpus() -> int:
    """NVIDIA GPUs this machine shows, whether or not CUDA can use them

    Counted through NVML where pynvml works, else from the driver's entries
    in /proc. GPUs hidden on purpose with an empty ``CUDA_VISIBLE_DEVICES``
    (or -1) count as none.
    """
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return 0
    nvml = _nvml()
    if nvml is not None:
        try:
            return int(nvml.nvmlDeviceGetCount())
        except Exception:  # noqa: BLE001 - NVML broke since it started: ask the driver
            pass
    folder = pathlib.Path("/proc/driver/nvidia/gpus")
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def describe_cuda_devices() -> list[dict]:
    """Name, memory and driver of every NVIDIA GPU, via pynvml (nvidia-ml-py)

    Each entry has the NVML ``index``, the PCI bus id and, where CuPy sees the
    GPU, its CUDA ordinal ``cuda_index`` (the two numberings differ under
    ``CUDA_VISIBLE_DEVICES``, which job schedulers and dask-cuda set), its
    ``name``, ``memory_total``, ``memory_free`` (read now) and ``driver``.
    Returns an empty list when pynvml or the NVIDIA driver is missing.
    """
    nvml = _nvml()
    devices = []
    for handle, known in _inventory():
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        devices.append({**known, "memory_free": int(memory.free)})
    return devices


def describe_cuda_ordinals(cuda_indices) -> dict[int, dict | None]:
    """:func:`describe_cuda_devices` entries of CUDA ordinals (found by PCI bus id), NVML
    asked once

    None for an ordinal NVML does not know, and for all of them where NVML
    fails: the description only goes into logs, which must not stop a run.
    """
    try:
        devices = describe_cuda_devices()
    except Exception:  # noqa: BLE001 - NVML errors of any kind: no description
        devices = []
    return {index: next((device for device in devices if device["cuda_index"] == index),
                        None) for index in cuda_indices}


def runtime_versions() -> dict:
    """CuPy's version and the CUDA runtime's, for run logs (never raises)"""
    try:
        import cupy
    except Exception as error:  # noqa: BLE001 - a log must not fail a finished run
        return {"cupy": f"unknown ({first_line(error)})"}
    versions = {"cupy": str(getattr(cupy, "__version__", "unknown"))}
    try:
        version = cupy.cuda.runtime.runtimeGetVersion()
        versions["cuda_runtime"] = f"{version // 1000}.{version % 1000 // 10}"
    except Exception as error:  # noqa: BLE001 - a log must not fail a finished run
        versions["cuda_runtime"] = f"unknown ({first_line(error)})"
    return versions


@functools.cache
def _nvml():
    """pynvml, initialised for the rest of the process; None without it or a driver"""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML, no description
        return None
    atexit.register(_shut_down_nvml, pynvml)
    return pynvml


def _shut_down_nvml(pynvml):
    try:
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - the process ends anyway
        pass


@functools.cache
def _inventory() -> tuple[tuple[object, dict], ...]:
    """(NVML handle, what does not change) of every GPU, read once per process"""
    nvml = _nvml()
    if nvml is None:
        return ()
    from .rtdc.hdf5 import as_text as _text  # NVML, like h5py, gives bytes or str

    ordinals = _cuda_ordinals_by_bus_id()
    driver = _text(nvml.nvmlSystemGetDriverVersion())
    inventory = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        bus_id = _normal_bus_id(_text(nvml.nvmlDeviceGetPciInfo(handle).busId))
        inventory.append((handle, {
            "index": index,
            "cuda_index": ordinals.get(bus_id),
            "bus_id": bus_id,
            "name": _text(nvml.nvmlDeviceGetName(handle)),
            "memory_total": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
            "driver": driver,
        }))
    return tuple(inventory)


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
