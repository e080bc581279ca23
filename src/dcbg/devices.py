"""Which device computes the median: the one place that decides

``"auto"`` takes CUDA when cupy imports, a device exists and the kernel
compiles there, and the CPU otherwise (the reason is logged). The
environment variable ``DCBG_DEVICE`` overrides ``"auto"``. The device never
changes the result, so it is not part of the PPID.
"""
from __future__ import annotations

import dataclasses
import logging
import os

logger = logging.getLogger(__name__)

DEVICE_ENV = "DCBG_DEVICE"


@dataclasses.dataclass(frozen=True)
class DeviceChoice:
    """The device a computation runs on, and why"""

    kind: str
    """either "cpu" or "cuda"."""
    index: int | None
    """CUDA device ordinal (None for the CPU)"""
    reason: str
    """why this device was chosen"""
    indices: tuple[int, ...] = ()
    """for "cuda:all": every CUDA device the recording is split across"""

    @property
    def split(self) -> bool:
        """Whether one recording is split into event ranges across devices"""
        return bool(self.indices)

    def __str__(self):
        if self.kind == "cpu":
            return "cpu"
        return "cuda:all" if self.split else f"cuda:{self.index}"


ALL_DEVICES = "all"
"""The index part of the device string that splits a recording across all GPUs"""


def parse_device(device: str) -> tuple[str, int | str | None]:
    """Split "cpu", "cuda", "cuda:N", "cuda:all" or "auto" into kind and index"""
    text = str(device).strip().lower()
    if text in ("auto", "cpu"):
        return text, None
    if text == "cuda":
        return "cuda", 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    if text == f"cuda:{ALL_DEVICES}":
        return "cuda", ALL_DEVICES
    raise ValueError(
        f"Unknown device '{device}'; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'cuda:all'.")


def cuda_device_count() -> int:
    """Number of CUDA devices CuPy sees (0 without cupy or driver)"""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - any failure means no usable device
        return 0


def cuda_unavailable_reason(index: int = 0) -> str | None:
    """Why CUDA device `index` cannot run dcbg, or None when it can"""
    try:
        import cupy
    except ImportError:
        return ("cupy is not installed (install dcbg[cuda12] or dcbg[cuda13] "
                "for the GPU backend)")
    except Exception as error:  # a broken CUDA install raises all sorts
        return f"cupy failed to import ({error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        return f"no usable CUDA driver or device ({error})"
    if count == 0:
        return "no CUDA device found"
    if index >= count:
        return f"CUDA device {index} does not exist (found {count})"
    try:
        from .cuda import load_kernels
        load_kernels(index)
    except Exception as error:
        return f"the median kernel failed to compile on CUDA device {index} ({error})"
    return None


def select_device(device: str = "auto") -> DeviceChoice:
    """Resolve a device request to the device that will compute the median

    Parameters
    ----------
    device: str
        "auto", "cpu", "cuda", "cuda:N" or "cuda:all" (one recording split
        into event ranges across every device). With "auto", the environment
        variable ``DCBG_DEVICE`` (same values) takes precedence.

    Raises
    ------
    RuntimeError
        If CUDA was asked for explicitly and cannot be used.
    """
    kind, index = parse_device(device)
    if kind == "auto" and os.environ.get(DEVICE_ENV, "").strip():
        kind, index = parse_device(os.environ[DEVICE_ENV])
        if kind != "auto":
            logger.info("%s=%s selects the device", DEVICE_ENV, os.environ[DEVICE_ENV])
    if kind == "cpu":
        return DeviceChoice("cpu", None, "requested")
    if index == ALL_DEVICES:
        count = cuda_device_count()
        reasons = [cuda_unavailable_reason(i) for i in range(max(count, 1))]
        if count == 0 or any(reasons):
            reason = next(r for r in reasons if r)
            raise RuntimeError(
                f"CUDA devices cannot be used: {reason}; use --device cpu or auto.")
        return DeviceChoice("cuda", 0, f"requested, split across {count} device(s)",
                            tuple(range(count)))
    if kind == "cuda":
        reason = cuda_unavailable_reason(index)
        if reason is not None:
            raise RuntimeError(
                f"CUDA device {index} cannot be used: {reason}; use --device cpu or auto.")
        return DeviceChoice("cuda", index, "requested")
    reason = cuda_unavailable_reason(0)
    if reason is None:
        return DeviceChoice("cuda", 0, "CUDA device 0 is available and the kernel compiles")
    logger.info("Using the CPU backend: %s", reason)
    return DeviceChoice("cpu", None, reason)


def describe_cuda_devices() -> list[dict]:
    """Name, memory and driver of every NVIDIA GPU, via pynvml (nvidia-ml-py)

    Returns an empty list when pynvml or the NVIDIA driver is missing.
    """
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            devices.append({
                "index": index,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_total": int(memory.total),
                "memory_free": int(memory.free),
                "driver": driver.decode() if isinstance(driver, bytes) else driver,
            })
        return devices
    finally:
        pynvml.nvmlShutdown()
