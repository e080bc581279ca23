"""Which device computes the median: the one place that decides

``"auto"`` takes CUDA device 0 when CuPy imports, a device exists and the
kernel compiles there, and the CPU otherwise. When a GPU is visible but
cannot be used (CuPy, NVRTC or the CUDA headers missing, a compile error),
``"auto"`` says so in one warning with the fix instead of falling back
silently. The environment variable ``DCBG_DEVICE`` overrides ``"auto"``.
The device never changes the result, so it is not part of the PPID.

An explicit ``"cuda"``, ``"cuda:N"`` or ``"cuda:all"`` is checked at once
for everything but the kernel's compile, which then runs in the background
while the input is opened (:func:`dcbg.engines.preload`); a compile that
fails raises the same error before any output is written
(:func:`dcbg.engines.ready`). ``"auto"`` has to compile to decide.

A GPU that ``"auto"`` chose and that fails during a run, with a CUDA error
or a result that differs from the CPU's (see
:mod:`dcbg.engines.verification`), leaves the work to the CPU, which
computes it again (:func:`fall_back_to_cpu`); an explicit CUDA device fails
with the error.

This module only parses and chooses; what CUDA can do is asked of
:mod:`dcbg.cudaprobe`.
"""
from __future__ import annotations

import dataclasses
import logging
import os

from . import cudaprobe
from .errors import DeviceError, first_line, setting_error

logger = logging.getLogger(__name__)

DEVICE_ENV = "DCBG_DEVICE"
"""Environment variable that overrides device="auto" (same values)"""

ALL_DEVICES = "all"
"""The index part of the device string that splits a recording across all GPUs"""

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
    automatic: bool = False
    """whether "auto" chose it (a GPU that fails during a run then leaves the work to
    the CPU, see :func:`fall_back_to_cpu`)"""

    @property
    def split(self) -> bool:
        """Whether one recording is split into event ranges across devices"""
        return bool(self.indices)

    def __str__(self):
        if self.kind == "cpu":
            return "cpu"
        return "cuda:all" if self.split else f"cuda:{self.index}"


def parse_device(device: str) -> tuple[str, int | str | None]:
    """Split "cpu", "cuda", "cuda:N", "cuda:all" or "auto" into kind and index"""
    text = str(device).strip().lower()
    if text in ("auto", "cpu"):
        return text, None
    if text == "cuda":
        return "cuda", 0
    if text.startswith("cuda:") and text[5:].isascii() and text[5:].isdigit():
        return "cuda", int(text[5:])
    if text == f"cuda:{ALL_DEVICES}":
        return "cuda", ALL_DEVICES
    raise ValueError(
        f"Unknown device '{device}'; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'cuda:all'.")


def auto_choice() -> tuple[DeviceChoice, str | None]:
    """What "auto" picks, and the warning to give when a visible GPU is unusable"""
    reason = cudaprobe.cuda_unavailable_reason(0)
    if reason is None:
        return DeviceChoice("cuda", 0, "CUDA device 0 is available and the kernel "
                                       "compiles", automatic=True), None
    warning = None
    if cudaprobe.visible_nvidia_gpus() > 0:
        warning = (f"A GPU is visible, but dcbg cannot use it: {reason}; computing on "
                   f"the CPU meanwhile.")
    return DeviceChoice("cpu", None, reason, automatic=True), warning


def fall_back_to_cpu(device: DeviceChoice, error: BaseException,
                     work: str = "the background") -> DeviceChoice | None:
    """The CPU, when a GPU that "auto" chose failed during a run; None when the error stands

    The failures that fall back are :class:`~dcbg.errors.DeviceError`: a
    CUDA runtime or driver error, or a median that differs from the CPU's
    (:class:`~dcbg.errors.GPUResultError`). Running out of memory is none
    of them (the engine goes on with smaller batches). An explicit device
    fails with the error. The fall-back is logged as one warning (naming
    `work`, what the CPU computes again), which the run log keeps.
    """
    if not (device.automatic and device.kind == "cuda" and isinstance(error, DeviceError)):
        return None
    logger.warning("%s failed, so the CPU computes %s again (device=\"auto\"): %s",
                   device, work, first_line(error))
    return DeviceChoice("cpu", None, f"{device} failed: {first_line(error)}", automatic=True)


def select_device(device: str = "auto") -> DeviceChoice:
    """Resolve a device request to the device that will compute the median

    Parameters
    ----------
    device: str or DeviceChoice
        "auto", "cpu", "cuda", "cuda:N" or "cuda:all" (one recording split
        into event ranges across every device). With "auto", the environment
        variable ``DCBG_DEVICE`` (same values) takes precedence. A device
        chosen before (a :class:`DeviceChoice`) is returned as it is, so that
        a command that runs many files chooses once.

    Raises
    ------
    ValueError
        If `device` is none of the above.
    DeviceError
        If CUDA was asked for explicitly and cannot be used (whether the
        kernel compiles is known later, see :func:`dcbg.engines.ready`).
    """
    if isinstance(device, DeviceChoice):
        return device  # chosen already: decided once, handed on
    kind, index = parse_device(device)
    if kind == "auto" and os.environ.get(DEVICE_ENV, "").strip():
        try:
            kind, index = parse_device(os.environ[DEVICE_ENV])
        except ValueError as error:
            raise ValueError(f"{DEVICE_ENV}: {error}") from None
        if kind != "auto":
            logger.info("%s=%s selects the device", DEVICE_ENV, os.environ[DEVICE_ENV])
    if kind == "cpu":
        return DeviceChoice("cpu", None, "requested")
    if index == ALL_DEVICES:
        count = cudaprobe.cuda_device_count()
        reasons = [cudaprobe.device_problem(i) for i in range(max(count, 1))]
        if count == 0 or any(reasons):
            reason = next(r for r in reasons if r)
            raise setting_error(DeviceError, "CUDA devices cannot be used: {reason}; or use "
                                "{setting}.", "device", suggested=("cpu", "auto"), reason=reason)
        return DeviceChoice("cuda", 0, f"requested, split across {count} device(s)",
                            tuple(range(count)))
    if kind == "cuda":
        reason = cudaprobe.device_problem(index)
        if reason is not None:
            raise cudaprobe.unusable_device_error(index, reason)
        return DeviceChoice("cuda", index, "requested")
    choice, warning = auto_choice()
    if warning is not None:
        logger.warning(warning)
    else:
        logger.info("Using the %s backend: %s", choice.kind.upper(), choice.reason)
    return choice
