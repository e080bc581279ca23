"""Which device computes the median: the one place that decides, and makes it ready

The walk from a device request to the kernel:

1. :func:`parse_device` reads the request once (``--device`` is parsed by it
   as the command line reads its arguments) into a :class:`DeviceRequest`;
2. :func:`select_device` turns it into a :class:`DeviceChoice`, once per
   command (``dcbg compute`` of a folder chooses once for every file) or per
   :class:`dcbg.Background` given a device name; a choice made before is
   handed on as it is;
3. :meth:`DeviceChoice.preload` starts loading the engine's kernel in the
   background while the input is opened (the CPU kernel, or the compile of
   the CUDA kernels of the frames' dtype in :mod:`dcbg.engines.cudakernel`);
4. :meth:`DeviceChoice.ready` waits for it before any output is written and
   returns a :class:`ReadyDevice`: the kernels of the frames' dtype loaded on
   each GPU, and each GPU described once (NVML) for the log and the run log;
5. :func:`dcbg.engines.engine_for` builds the engine on the ready device
   (:meth:`ReadyDevice.kernels_for` hands it the kernels of its dtype), and
   the engine launches the kernels it was handed.

``"auto"`` takes CUDA device 0 when CuPy imports, a device exists and the
kernel compiles there (:func:`cuda_unavailable_reason`), and the CPU
otherwise. When a GPU is visible but cannot be used (CuPy, NVRTC or the CUDA
headers missing, a compile error), ``"auto"`` says so in one warning with the
fix instead of falling back silently. The environment variable
``DCBG_DEVICE`` overrides ``"auto"``. The device never changes the result,
so it is not part of the PPID.

An explicit ``"cuda"``, ``"cuda:N"`` or ``"cuda:all"`` is checked at once
for everything but the kernel's compile, which then runs in the background
(:meth:`DeviceChoice.preload`); a compile that fails raises the same error
before any output is written (:meth:`DeviceChoice.ready`). ``"auto"`` has to
compile to decide.

A GPU that ``"auto"`` chose and that fails during a run, with a CUDA error
or a result that differs from the CPU's (see
:mod:`dcbg.engines.verification`), leaves the work to the CPU, which
computes it again (:func:`fall_back_to_cpu`); an explicit CUDA device fails
with the error.

What CUDA offers short of the kernel is asked of :mod:`dcbg.cudaprobe`;
whether and why the kernel compiles, of :mod:`dcbg.engines.cudakernel`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import typing

from . import cudaprobe
from .errors import DeviceError, first_line, setting_error

if typing.TYPE_CHECKING:
    from .engines.cudakernel import CompiledKernels

logger = logging.getLogger(__name__)

DEVICE_ENV = "DCBG_DEVICE"
"""Environment variable that overrides device="auto" (same values)"""

ALL_DEVICES = "all"
"""The index part of the device string that splits a recording across all GPUs"""


@dataclasses.dataclass(frozen=True)
class DeviceRequest:
    """A device as asked for, read once: "auto", "cpu", "cuda", "cuda:N" or "cuda:all\""""

    kind: str
    """"auto", "cpu" or "cuda\""""
    index: int | str | None
    """the CUDA ordinal, :data:`ALL_DEVICES`, or None ("auto", "cpu")"""
    text: str
    """the request as it was written"""

    def __str__(self):
        return self.text


def parse_device(device) -> DeviceRequest:
    """Read "cpu", "cuda", "cuda:N", "cuda:all" or "auto" (any letter case) as a request

    A request read before is returned as it is.

    Raises
    ------
    ValueError
        If `device` is none of them.
    """
    if isinstance(device, DeviceRequest):
        return device
    text = str(device).strip().lower()
    if text in ("auto", "cpu"):
        return DeviceRequest(text, None, device)
    if text == "cuda":
        return DeviceRequest("cuda", 0, device)
    if text.startswith("cuda:") and text[5:].isascii() and text[5:].isdigit():
        return DeviceRequest("cuda", int(text[5:]), device)
    if text == f"cuda:{ALL_DEVICES}":
        return DeviceRequest("cuda", ALL_DEVICES, device)
    raise ValueError(
        f"Unknown device '{device}'; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'cuda:all'.")


@dataclasses.dataclass(frozen=True)
class DeviceChoice:
    """The device a computation runs on, and why; it knows how to get itself ready"""

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

    @property
    def cuda_indices(self) -> tuple[int, ...]:
        """The CUDA ordinals that compute (none for the CPU)"""
        if self.kind != "cuda":
            return ()
        return self.indices or (self.index,)

    def __str__(self):
        if self.kind == "cpu":
            return "cpu"
        return "cuda:all" if self.split else f"cuda:{self.index}"

    def preload(self, dtype="uint8"):
        """Start loading what this device's engine needs, in the background

        numba's build of the CPU kernel takes a good part of a second to load
        (numba and its cache), and NVRTC about as long to compile the CUDA
        kernels; doing it while the input is opened and its first frames are
        read keeps short runs short. The C build loads at once. A GPU
        compiles the module of kernels that computes frames of `dtype` (a
        numpy dtype or its name; files hold uint8 frames). Calling it again
        costs nothing.
        """
        if self.kind == "cpu":
            _load_cpu_kernel_in_background()
            return
        from .engines import cudakernel
        for index in self.cuda_indices:
            cudakernel.start_compiling(index, dtype)

    def ready(self, dtype="uint8") -> ReadyDevice:
        """This device with its kernels for frames of `dtype` loaded (waiting for
        :meth:`preload`'s work)

        Each GPU is described once (NVML) and logged; the run log takes the
        description from the returned device.

        Raises
        ------
        DeviceError
            If the CUDA kernels do not compile or load on a device (the error
            of an unusable device, as when it is chosen).
        TypeError
            If the GPU kernels take no frames of `dtype`.
        """
        if self.kind == "cpu":
            return ReadyDevice(self)
        ready = ReadyDevice(self)
        ready.kernels_for(dtype)
        ready.descriptions.update(cudaprobe.describe_cuda_ordinals(self.cuda_indices))
        for index, info in ready.descriptions.items():
            if info is not None:
                logger.info("CUDA device %d: %s (PCI %s), %.1f of %.1f GiB free, driver %s",
                            index, info["name"], info["bus_id"],
                            info["memory_free"] / 2**30, info["memory_total"] / 2**30,
                            info["driver"])
        return ready


@dataclasses.dataclass(frozen=True)
class ReadyDevice:
    """A chosen device ready for one run: what :func:`dcbg.engines.engine_for` builds on

    Made by :meth:`DeviceChoice.ready`, which loads the kernels of the run's
    frames. A GPU's kernels come in two modules (the uint8 kernel, and the
    window kernels of int8, uint16 and int16 frames, see
    :mod:`dcbg.engines.cudakernel`); :meth:`kernels_for` hands out those of a
    dtype, and loads a module the device was not made ready for when it is
    first asked for.
    """

    choice: DeviceChoice
    """the device chosen"""
    kernels: dict[str, tuple[CompiledKernels, ...]] = dataclasses.field(default_factory=dict)
    """the modules of kernels loaded so far, by module name ("histogram", "window"), each
    as loaded on every GPU in the order of :attr:`DeviceChoice.cuda_indices` (none for
    the CPU)"""
    descriptions: dict[int, dict | None] = dataclasses.field(default_factory=dict)
    """NVML's description of each GPU by CUDA ordinal (None where NVML has none), asked
    once per run"""

    @property
    def kind(self) -> str:
        """"cpu" or "cuda\""""
        return self.choice.kind

    @property
    def description(self) -> dict | None:
        """NVML's description of the (first) GPU; None for the CPU or without NVML"""
        return self.descriptions.get(self.choice.index)

    def kernels_for(self, dtype) -> tuple[CompiledKernels, ...]:
        """The kernels that compute frames of `dtype`, on every GPU of the device

        Loaded once per module: the module the device was made ready for is
        handed out as it is, another one is compiled (or waited for) now.
        None on the CPU: an empty tuple.

        Raises
        ------
        DeviceError
            If the module does not compile or load on a device.
        TypeError
            If the GPU kernels take no frames of `dtype`.
        """
        if self.kind != "cuda":
            return ()
        from .engines import cudakernel
        module = cudakernel.kernel_family(dtype).module
        loaded = self.kernels.get(module)
        if loaded is None:
            loaded = tuple(cudakernel.kernels_or_device_error(index, dtype)
                           for index in self.choice.cuda_indices)
            self.kernels[module] = loaded
        return loaded

    def __str__(self):
        return str(self.choice)


def cuda_unavailable_reason(index: int = 0) -> str | None:
    """Why CUDA device `index` cannot run dcbg, with what to do; None when it can

    Compiles the kernel for the device (once per process) if everything
    else is in place (:func:`dcbg.cudaprobe.device_problem`), since only a
    compile shows that NVRTC and the CUDA headers work.
    """
    problem = cudaprobe.device_problem(index)
    if problem is not None:
        return problem
    from .engines import cudakernel
    try:
        cudakernel.load_kernels(index)
    except Exception as error:  # noqa: BLE001 - NVRTC, headers, the cache, the context
        return cudakernel.compile_problem(error)
    return None


def auto_choice() -> tuple[DeviceChoice, str | None]:
    """What "auto" picks, and the warning to give when a visible GPU is unusable"""
    reason = cuda_unavailable_reason(0)
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


def select_device(device: str | DeviceRequest | DeviceChoice = "auto") -> DeviceChoice:
    """Resolve a device request to the device that will compute the median

    Parameters
    ----------
    device: str, DeviceRequest or DeviceChoice
        "auto", "cpu", "cuda", "cuda:N" or "cuda:all" (one recording split
        into event ranges across every device), as text or read already
        (:func:`parse_device`). With "auto", the environment variable
        ``DCBG_DEVICE`` (same values) takes precedence. A device chosen
        before (a :class:`DeviceChoice`) is returned as it is, so that a
        command that runs many files chooses once.

    Raises
    ------
    ValueError
        If `device` is none of the above.
    DeviceError
        If CUDA was asked for explicitly and cannot be used (whether the
        kernel compiles is known later, see :meth:`DeviceChoice.ready`).
    """
    if isinstance(device, DeviceChoice):
        return device  # chosen already: decided once, handed on
    request = parse_device(device)
    if request.kind == "auto" and os.environ.get(DEVICE_ENV, "").strip():
        try:
            request = parse_device(os.environ[DEVICE_ENV])
        except ValueError as error:
            raise ValueError(f"{DEVICE_ENV}: {error}") from None
        if request.kind != "auto":
            logger.info("%s=%s selects the device", DEVICE_ENV, os.environ[DEVICE_ENV])
    kind, index = request.kind, request.index
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


@functools.cache
def _load_cpu_kernel_in_background() -> threading.Thread:
    def load():
        from .engines.cpu import warm_up_kernel
        warm_up_kernel()
    thread = threading.Thread(target=load, name="dcbg-preload", daemon=True)
    thread.start()
    return thread
