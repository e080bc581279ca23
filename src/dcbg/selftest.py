"""``dcbg selftest``: whether a device computes dcbg's medians exactly, and how fast

On each chosen device the self-test

1. loads the median kernel and times it: on the CPU the C (or numba) build,
   on a GPU importing CuPy, compiling the CUDA kernel (or loading it from
   CuPy's cache) and a first launch;
2. computes synthetic stacks for kernel sizes that use every width of the
   kernels' counts (8, 16 and 32 bits), of uint8 frames (the histogram
   kernel) and of uint16 frames (on a GPU the window kernels, which int16
   and int8 frames share): realistic 80×320 RT-DC frames at k = 10, 100
   and 300, realistic 256×256 16-bit microscopy frames at k = 100 and 300,
   and k = 70,000 on tiny frames of both types, where one value can fill a
   window of more than 65,535 frames;
3. compares every window byte for byte with the CPU engine, and some
   windows with the definition (a partial sort of each, so it checks few):
   the first ones, whose medians follow one another, and some spread to the
   stack's end; fewer at large k, where each costs more; a GPU's runs also
   check every pixel of every batch themselves (``verify="all"``, see
   :mod:`dcbg.engines.verification`), so the check that guards every run is
   tested on every count width;
4. measures pixel-outputs per second of the median alone (on a GPU the
   kernel on device memory, timed with CUDA events), and events per second
   file to file: a synthetic recording, zstd-compressed, in a temporary
   folder, computed to a zstd-5 output as ``dcbg compute`` does.

:func:`run_selftest` returns the results as :class:`SelftestRow` objects;
:func:`table_header` and :func:`table_line` format them as one table, and
the command line prints it and exits with 1 when any result differs. Before
each step that takes a while, `on_step` is told what is being done (the
command line shows it on a terminal).

numpy and the engines load when the self-test runs, not with this module,
whose defaults the command line reads before it has read its arguments.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import tempfile
import time
import typing

from .devices import ALL_DEVICES, DeviceChoice, DeviceRequest, parse_device, select_device
from .errors import GPUResultError, first_line, setting_error
from .settings import num_cpus_setting
from .windows import background_window_count

if typing.TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_EVENTS = 4096
"""Windows per 80×320 stack: enough to fill a GPU's SMs with threads"""

SHAPE8 = (80, 320)
"""Frame shape of the realistic uint8 stacks (RT-DC's)"""

SHAPE16 = (256, 256)
"""Frame shape of the realistic uint16 stacks (a microscopy camera's region)"""

DEFAULT_FILE_EVENTS = 10_000
"""Events of the synthetic recording that is computed file to file"""

DEFINITION_WINDOWS = (8, 40)
"""Fewest and most windows of a stack compared with the definition"""

DEFINITION_FRAME_PIXELS = 1 << 25
"""Frames × pixels the definition partially sorts per stack (about 0.3 s on one CPU),
within :data:`DEFINITION_WINDOWS`: 13 windows at k=100 on 80×320 frames, the fewest at
k=300, the most at k=10"""

STACK_PERIOD = 1024
"""Distinct synthetic frames of a stack and of the file-to-file recording; longer ones
repeat them (generating a realistic frame takes about a millisecond)"""

STACK_PERIOD16 = 512
"""Distinct synthetic frames of a 16-bit stack (each takes a few milliseconds), more than
its largest realistic kernel size"""

KERNEL_REPEATS = 10
"""Back-to-back kernel launches timed together on a GPU (after one warm-up)"""

FILE_KERNEL_SIZE = 100
"""kernel_size of the file-to-file run (a typical recording's)"""

VERIFY = "all"
"""How the self-test's GPU runs check their results against the CPU: every pixel"""


@dataclasses.dataclass(frozen=True)
class StackCase:
    """One stack the self-test computes on every device"""

    kernel_size: int
    """frames per window"""
    shape: tuple[int, int]
    """frame shape"""
    windows: int
    """windows computed (the stack has `kernel_size` frames more)"""
    realistic: bool = True
    """synthetic instrument frames; False: seeded random values with one saturated
    pixel, for frames too small to look like anything"""
    dtype: str = "uint8"
    """of the frames: "uint8" (RT-DC frames) or "uint16" (microscopy frames)"""

    @property
    def frames(self) -> int:
        """frames of the stack"""
        return self.windows + self.kernel_size

    @property
    def count_bits(self) -> int:
        """width of the kernel's histogram counts at this kernel size"""
        from .engines.base import count_dtype
        return 8 * count_dtype(self.kernel_size).itemsize


def default_cases(events: int = DEFAULT_EVENTS) -> list[StackCase]:
    """The uint8 and uint16 stacks of the self-test

    uint8: 80×320 stacks of `events` windows at k = 10, 100 and 300, and
    k = 70,000 on 2×3 frames. uint16: 256×256 stacks at k = 100 and 300 of
    as many pixel-outputs (fewer windows of larger frames), and k = 70,000
    on 2×3 frames.
    """
    if events < 1:
        raise setting_error(ValueError, "The self-test needs at least one window per stack, "
                            "got {events}; set {setting} to 1 or more.", "events",
                            events=events)
    cases = [StackCase(k, SHAPE8, events) for k in (10, 100, 300)]
    cases.append(StackCase(70_000, (2, 3), 200, realistic=False))
    windows16 = max(1, events * (SHAPE8[0] * SHAPE8[1]) // (SHAPE16[0] * SHAPE16[1]))
    cases += [StackCase(k, SHAPE16, windows16, dtype="uint16") for k in (100, 300)]
    cases.append(StackCase(70_000, (2, 3), 200, realistic=False, dtype="uint16"))
    return cases


@dataclasses.dataclass
class SelftestRow:
    """One result of the self-test"""

    device: str
    """the device, as --device names it ("cpu", "cuda:0", "cuda:all")"""
    check: str
    """"load kernel", "median" or "file to file\""""
    seconds: float
    """wall time of the check"""
    kernel_size: int | None = None
    frames: int | None = None
    shape: tuple[int, int] | None = None
    count_bits: int | None = None
    dtype: str | None = None
    """of the frames ("uint8", "uint16"); None for the rows of no stack"""
    same_as_cpu: bool | None = None
    """whether every window equals the CPU engine's (None: not compared)"""
    same_as_definition: bool | None = None
    """whether the compared windows equal the definition's (None: not compared)"""
    definition_windows: int = 0
    """windows compared with the definition"""
    pixel_outputs_per_s: float | None = None
    """median alone: windows × pixels per second"""
    events_per_s: float | None = None
    """file to file: events per second"""
    note: str = ""
    """what ran (the device's name, the kernel build) or what differs"""
    error: str | None = None
    """the error that stopped this check"""

    @property
    def passed(self) -> bool:
        """no error, and nothing compared differs"""
        return (self.error is None and self.same_as_cpu is not False
                and self.same_as_definition is not False)

    def as_dict(self) -> dict:
        """The row as JSON-ready values"""
        values = dataclasses.asdict(self)
        values["passed"] = self.passed
        return values


def case_stack(case: StackCase, seed: int = 42, base: np.ndarray | None = None
               ) -> np.ndarray:
    """The frames of `case`, shape ``(frames, *shape)``, of its dtype

    A realistic stack repeats `base`, by default :func:`realistic_base`.
    """
    import numpy as np

    dtype = np.dtype(case.dtype)
    if not case.realistic:
        rng = np.random.default_rng([seed, case.kernel_size])
        top = np.iinfo(dtype).max
        stack = rng.integers(0, top + 1, (case.frames, *case.shape)).astype(dtype)
        stack[:, 0, 0] = top  # one value fills the whole window: counts beyond 16 bits
        return stack
    if base is None:
        base = realistic_base(case, seed)
    return base[np.arange(case.frames) % len(base)]


def realistic_period(case: StackCase) -> int:
    """Distinct frames of a realistic stack of `case`'s dtype, which longer ones repeat"""
    return STACK_PERIOD16 if case.dtype == "uint16" else STACK_PERIOD


def realistic_base(case: StackCase, seed: int = 42) -> np.ndarray:
    """The frames a realistic stack of `case` repeats: the first :func:`realistic_period`
    frames of :func:`dcbg.synthetic.synthetic_stack` (uint8) or
    :func:`dcbg.synthetic.synthetic_stack16` (uint16)"""
    from .synthetic import synthetic_stack, synthetic_stack16
    make = synthetic_stack16 if case.dtype == "uint16" else synthetic_stack
    return make(realistic_period(case), case.shape, seed)


def definition_starts(case: StackCase) -> np.ndarray:
    """The windows of `case` compared with the definition (their first frames)

    Half of them are the first windows, each a step from the one before;
    the others are spread evenly up to the last window, over the batches of
    the engines. How many depends on the cost of a window
    (:data:`DEFINITION_FRAME_PIXELS`).
    """
    import numpy as np

    fewest, most = DEFINITION_WINDOWS
    pixels = case.shape[0] * case.shape[1]
    count = min(case.windows, max(fewest, min(most, DEFINITION_FRAME_PIXELS
                                                // (case.kernel_size * pixels))))
    first = count // 2
    spread = np.linspace(first, case.windows - 1, count - first).round().astype(np.int64)
    return np.unique(np.concatenate([np.arange(first), spread]))


def difference(actual: np.ndarray, expected: np.ndarray,
               windows: np.ndarray | None = None) -> str | None:
    """None when both are equal, else where they differ, in words

    `windows` gives the window of each row where the rows are not all
    windows in order.
    """
    import numpy as np

    if actual.shape != expected.shape:
        return f"shape {actual.shape} instead of {expected.shape}"
    wrong = np.argwhere(actual != expected)
    if not len(wrong):
        return None
    first = [int(i) for i in wrong[0]]
    if windows is not None:
        first[0] = int(windows[first[0]])
    where = ", ".join(map(str, first))
    return (f"{len(wrong)} of {expected.size} pixel-outputs differ, the first at "
            f"(window, pixel) ({where})")


def engine_medians(device: DeviceChoice, frames: np.ndarray, shape, kernel_size: int,
                   num_cpus: int, verify: str = "off") -> tuple[np.ndarray, float, dict]:
    """Every window of `frames` through the engine of `device`, as a run computes them

    Returns the medians (one row per window), the wall seconds of the run
    and the engine's seconds per stage. The batches are at most a third of
    the windows, so the pipeline overlaps several of them. `verify` is the
    GPU engine's own check of its results (by default none: callers compare
    every window themselves).
    """
    import numpy as np

    from .engines import engine_for
    windows = background_window_count(len(frames), kernel_size)
    medians = np.empty((windows, frames.shape[1]), frames.dtype)

    def read_into(start, stop, out):
        out[:stop - start] = frames[start:stop]

    def write_at(offset, rows):
        medians[offset:offset + len(rows)] = rows

    batch_size = max(1, -(-windows // 3))
    # a run's GPU batch is sized by memory alone; this one is capped to a third too
    engine = engine_for(device.ready(frames.dtype), shape, kernel_size, batch_size, num_cpus,
                        windows, verify, frames.dtype, device_batch_cap=batch_size)
    with engine:
        t0 = time.perf_counter()
        engine.run(read_into, 0, windows, write_at)
        seconds = time.perf_counter() - t0
        stages = dict(engine.stage_seconds)
    return medians, seconds, stages


def cuda_kernel_medians(index: int, frames: np.ndarray, shape, kernel_size: int,
                        windows: int, repeats: int = KERNEL_REPEATS
                        ) -> tuple[np.ndarray, float]:
    """The CUDA kernel alone on device memory: its medians and seconds per launch

    One launch loads the launch plan and gives the medians; then `repeats`
    launches run back to back between two CUDA events.
    """
    import cupy

    from .engines.cudacontext import on_device
    from .engines.cudakernel import launcher_for
    launcher = launcher_for(index, frames.shape[1], kernel_size, frames.dtype)
    with on_device(index):
        device_frames = cupy.asarray(frames)
        device_medians = cupy.empty((windows, frames.shape[1]), frames.dtype)
        launcher.launch(device_frames, device_medians, windows)
        medians = cupy.asnumpy(device_medians)
        stream = cupy.cuda.get_current_stream()
        start = stream.record(cupy.cuda.Event(block=True))
        for _ in range(repeats):
            launcher.launch(device_frames, device_medians, windows, stream)
        end = stream.record(cupy.cuda.Event(block=True))
        end.synchronize()
        seconds = cupy.cuda.get_elapsed_time(start, end) / 1e3 / repeats
    return medians, seconds


class _Results:
    """What the devices are compared with, computed once per case

    `say` is called with what is being done before each step that takes a
    while.
    """

    def __init__(self, num_cpus: int, say: typing.Callable[[str], None]):
        self.num_cpus = num_cpus
        self.say = say
        self.cpu = select_device("cpu")
        self._stacks: dict[StackCase, np.ndarray] = {}
        self._bases: dict[tuple[tuple[int, int], str], np.ndarray] = {}
        """realistic frames by shape and dtype, which the stacks of every kernel size
        repeat"""
        self._cpu: dict[StackCase, tuple[np.ndarray, float, dict]] = {}
        self._definition: dict[StackCase, tuple[np.ndarray, np.ndarray]] = {}
        self._background: np.ndarray | None = None

    def frames(self, case: StackCase) -> np.ndarray:
        """The case's stack, flattened to one row per frame"""
        if case not in self._stacks:
            base = None
            if case.realistic:
                key = (case.shape, case.dtype)
                if key not in self._bases:
                    self.say(f"synthesizing {realistic_period(case)} frames of "
                             f"{case.shape[0]}x{case.shape[1]}{dtype_words(case)}")
                    self._bases[key] = realistic_base(case)
                base = self._bases[key]
            self._stacks[case] = case_stack(case, base=base).reshape(case.frames, -1)
        return self._stacks[case]

    def cpu_engine(self, case: StackCase) -> tuple[np.ndarray, float, dict]:
        """The CPU engine's medians of the case, its seconds and its stages"""
        if case not in self._cpu:
            frames = self.frames(case)
            self.say(f"k={case.kernel_size}: computing {describe_stack(case)} on cpu")
            self._cpu[case] = engine_medians(self.cpu, frames, case.shape,
                                             case.kernel_size, self.num_cpus)
        return self._cpu[case]

    def background(self, recording: pathlib.Path) -> np.ndarray:
        """The recording's image_bg from the CPU engine on its frames read into memory"""
        if self._background is None:
            self.say("file to file: computing the recording's background on cpu, in memory")
            import h5py
            import hdf5plugin  # noqa: F401 - registers the recording's zstd filter
            import numpy as np

            from .rtdc.writer import StackWriter

            with h5py.File(recording) as h5:
                stack = h5["events/image"][:]
            count, *shape = stack.shape
            frames = stack.reshape(count, -1)
            windows, _, _ = engine_medians(self.cpu, frames, shape, FILE_KERNEL_SIZE,
                                           self.num_cpus)
            background = StackWriter(np.empty_like(frames))
            background.write_at(0, windows)
            background.write_repeated(len(windows), windows[-1], count - len(windows))
            self._background = background.stack.reshape(stack.shape)
        return self._background

    def definition(self, case: StackCase) -> tuple[np.ndarray, np.ndarray]:
        """The windows of the case compared with the definition, and their medians"""
        if case not in self._definition:
            starts = definition_starts(case)
            frames = self.frames(case)
            self.say(f"k={case.kernel_size}{dtype_words(case)}: comparing {len(starts)} "
                     f"windows with the definition")
            from .reference import window_medians_by_partition
            self._definition[case] = starts, window_medians_by_partition(
                frames, case.kernel_size, starts)
        return self._definition[case]


def describe_stack(case: StackCase) -> str:
    """The size of a stack in words, e.g. "4396 frames of 80x320" or "1700 frames of
    256x256 uint16"."""
    return f"{case.frames} frames of {case.shape[0]}x{case.shape[1]}{dtype_words(case)}"


def dtype_words(case: StackCase) -> str:
    """" uint16" for a stack of uint16 frames, nothing for RT-DC's uint8 frames"""
    return "" if case.dtype == "uint8" else f" {case.dtype}"


def load_kernel_row(device: str | DeviceRequest, dtypes: typing.Sequence[str] = ("uint8",)
                    ) -> tuple[SelftestRow, DeviceChoice]:
    """Choose `device` and load its kernels for frames of `dtypes`: the "load kernel" row
    and the choice"""
    import numpy as np

    t0 = time.perf_counter()
    choice = select_device(device)
    dtypes = list(dict.fromkeys(np.dtype(dtype) for dtype in dtypes))
    if choice.kind == "cpu":
        from . import cpukernels
        from .engines.cpu import warm_up_kernel
        for dtype in dtypes:
            warm_up_kernel(dtype)
        note = f"{cpukernels.cpu_kernels().build} build of the CPU kernels"
    else:
        for dtype in dtypes:  # as a run does: the compiles start in the background, …
            choice.preload(dtype)
        ready = choice.ready(dtypes[0])  # … a kernel that does not compile raises here …
        for dtype in dtypes:
            ready.kernels_for(dtype)  # … the other modules' too
            frames = (np.arange(3 * 64) * 997).astype(dtype).reshape(3, 64)
            cuda_kernel_medians(choice.index, frames, (1, 64), 2, 1, repeats=1)
        note = _gpu_name(choice.index)
    seconds = time.perf_counter() - t0
    return SelftestRow(str(choice), "load kernel", seconds, note=note), choice


def _gpu_name(index: int) -> str:
    from .cudaprobe import describe_cuda_devices
    for device in describe_cuda_devices():
        if device["cuda_index"] == index:
            return f"{device['name']}, {device['memory_total'] / 2**30:.0f} GiB"
    return f"CUDA device {index}"


def median_row(device: DeviceChoice, case: StackCase, results: _Results) -> SelftestRow:
    """Compute `case` on `device`, compare it, and measure the median alone"""
    row = SelftestRow(str(device), "median", 0.0, case.kernel_size, case.frames, case.shape,
                      case.count_bits, case.dtype)
    frames = results.frames(case)
    expected, cpu_seconds, cpu_stages = results.cpu_engine(case)
    pixel_outputs = case.windows * frames.shape[1]
    problems = []
    if device.kind == "cpu":
        medians, row.seconds = expected, cpu_seconds
        median_seconds = cpu_stages.get("median", cpu_seconds)
    else:
        results.say(f"k={case.kernel_size}: computing {describe_stack(case)} on {device}")
        t0 = time.perf_counter()
        try:
            medians, row.seconds, _ = engine_medians(device, frames, case.shape,
                                                     case.kernel_size, results.num_cpus,
                                                     VERIFY)
        except GPUResultError as error:  # the run's own check: the kernel alone shows more
            medians, row.seconds = None, time.perf_counter() - t0
            problems.append(f"the engine's check: {first_line(error)}")
        kernel, median_seconds = cuda_kernel_medians(device.index, frames, case.shape,
                                                     case.kernel_size, case.windows)
        for label, actual in (("the engine", medians), ("the kernel alone", kernel)):
            problem = None if actual is None else difference(actual, expected)
            if problem:
                problems.append(f"{label} differs from the CPU engine: {problem}")
        row.same_as_cpu = not problems
        medians = kernel if medians is None else medians
    starts, definition = results.definition(case)
    row.definition_windows = len(starts)
    problem = difference(medians[starts], definition, starts)
    row.same_as_definition = problem is None
    if problem:
        problems.append(f"differs from the definition: {problem}")
    if case.realistic and median_seconds > 0:
        row.pixel_outputs_per_s = pixel_outputs / median_seconds
    row.note = "; ".join(problems) or ("" if case.realistic else
                                       f"{case.shape[0]}x{case.shape[1]} frames: counts "
                                       f"beyond 16 bits, not a speed test")
    return row


def file_row(device: str, recording: pathlib.Path, expected: np.ndarray, num_cpus: int,
             folder: pathlib.Path) -> SelftestRow:
    """Compute the recording file to file on `device` and compare its image_bg"""
    import h5py

    from .engines.base import count_dtype
    from .rollmed import BackgroundRollMed
    output = folder / f"background-{device.replace(':', '-')}.rtdc"
    count, *shape = expected.shape
    t0 = time.perf_counter()
    with BackgroundRollMed(recording, output, kernel_size=FILE_KERNEL_SIZE,
                           batch_size=10_000, compress=True, num_cpus=num_cpus,
                           device=device, verify=VERIFY) as background:
        background.process()
    seconds = time.perf_counter() - t0
    with h5py.File(output) as h5:
        image_bg = h5["events/image_bg"][:]
    output.unlink()
    problem = difference(image_bg.reshape(count, -1), expected.reshape(count, -1))
    note = "zstd in, zstd-5 out"
    if background.device.kind == "cuda":  # slower than a run's sampled check
        note += f", verify={VERIFY}"
    return SelftestRow(device, "file to file", seconds, FILE_KERNEL_SIZE, count,
                       tuple(shape), 8 * count_dtype(FILE_KERNEL_SIZE).itemsize, "uint8",
                       same_as_cpu=problem is None, events_per_s=count / seconds,
                       note=f"{note}; {problem}" if problem else note)


def device_requests(device: str | DeviceRequest
                    ) -> tuple[list[str | DeviceRequest], str | None]:
    """The single devices to test for a --device value, and the split one, if any

    "cuda:all" tests each GPU on its own, then one recording split across
    all of them. Each device is chosen (and its kernel compiled) in its own
    "load kernel" check, which times it.
    """
    request = parse_device(device)
    if request.index != ALL_DEVICES:
        return [request], None
    from .cudaprobe import cuda_device_count
    count = cuda_device_count()
    if count == 0:
        select_device(request)  # raises the error that says why
    return [f"cuda:{index}" for index in range(count)], str(request)


def run_selftest(device: str | DeviceRequest = "auto", events: int = DEFAULT_EVENTS,
                 file_events: int = DEFAULT_FILE_EVENTS, num_cpus: int | None = None,
                 cases: typing.Sequence[StackCase] | None = None,
                 on_row: typing.Callable[[SelftestRow], None] | None = None,
                 on_step: typing.Callable[[str], None] | None = None
                 ) -> list[SelftestRow]:
    """Check and measure dcbg's median on a device (see the module's description)

    Parameters
    ----------
    device: str or DeviceRequest
        "auto", "cpu", "cuda", "cuda:N" or "cuda:all" (every GPU on its own,
        then one recording split across them).
    events: int
        Windows per 80×320 stack (ignored when `cases` is given).
    file_events: int
        Events of the synthetic recording computed file to file; 0 skips it.
    num_cpus: int, optional
        CPU workers (default: all available; no more than there are, with a
        warning).
    cases: sequence of StackCase, optional
        The stacks to compute (default: :func:`default_cases`).
    on_row: callable, optional
        Called with each row as soon as it is done.
    on_step: callable, optional
        Called with what is being done (e.g. "k=300: comparing 8 windows
        with the definition") before each step that takes a while.

    Returns
    -------
    rows: list of SelftestRow
        The "load kernel", "median" and "file to file" rows of every device.
        A check that raised has its error in its row, and the device's
        remaining checks are skipped.

    Raises
    ------
    ValueError
        If `device` is no device name, or a size is too small.
    dcbg.errors.DeviceError
        If a GPU was asked for and cannot be used.
    """
    if file_events and file_events <= FILE_KERNEL_SIZE:
        raise setting_error(ValueError, "The file-to-file check computes kernel_size={k} and "
                            "needs more events than that, got {events}; set {setting} to 0 "
                            "to skip it, or to {least} or more.", "file_events",
                            k=FILE_KERNEL_SIZE, events=file_events,
                            least=FILE_KERNEL_SIZE + 1)
    cases = list(default_cases(events) if cases is None else cases)
    singles, split = device_requests(device)
    say = on_step if on_step is not None else (lambda text: None)
    num_cpus, warning = num_cpus_setting(num_cpus)
    if warning is not None:
        logger.warning(warning)
    results = _Results(num_cpus, say)
    rows: list[SelftestRow] = []

    def add(row: SelftestRow):
        rows.append(row)
        if on_row is not None:
            on_row(row)

    with tempfile.TemporaryDirectory(prefix="dcbg-selftest-") as scratch:
        folder = pathlib.Path(scratch)
        recording = None
        for request in singles + ([split] if split else []):
            name = request
            if request != split:
                say(f"{request}: loading the median kernel")
                # an unusable device raises here
                row, choice = load_kernel_row(request, [case.dtype for case in cases])
                name = row.device
                add(row)
            check, t0 = "file to file", time.perf_counter()
            try:
                if request != split:
                    for case in cases:
                        check, t0 = "median", time.perf_counter()
                        add(median_row(choice, case, results))
                if file_events:
                    check, t0 = "file to file", time.perf_counter()
                    if recording is None:  # written once the first device is known to work
                        from .synthetic import write_synthetic_rtdc
                        say(f"file to file: writing a synthetic recording of {file_events} "
                            f"events")
                        recording = write_synthetic_rtdc(folder / "recording.rtdc",
                                                         file_events, period=STACK_PERIOD)
                    expected = results.background(recording)
                    say(f"file to file: computing the recording on {name}")
                    add(file_row(name, recording, expected, results.num_cpus, folder))
            except Exception as error:  # noqa: BLE001 - reported in its row
                add(SelftestRow(name, check, time.perf_counter() - t0,
                                kernel_size=case.kernel_size if check == "median" else None,
                                dtype=case.dtype if check == "median" else None,
                                error=first_line(error)))
    return rows


COLUMNS = (("device", 8), ("check", 12), ("frames", 16), ("dtype", 7), ("k", 6),
           ("counts", 7),
           ("= CPU", 8), ("= definition", 13), ("pixel-outputs/s", 16), ("events/s", 10),
           ("seconds", 8))


def table_header() -> str:
    """The header of the self-test's table"""
    return " ".join(title.ljust(width) for title, width in COLUMNS) + " note"


def table_line(row: SelftestRow) -> str:
    """One row of the self-test's table"""
    def verdict(same, extra=""):
        return "-" if same is None else ("same" + extra if same else "DIFFERS")

    frames = "-" if row.frames is None else f"{row.frames}x{row.shape[0]}x{row.shape[1]}"
    cells = (row.device, row.check, frames, row.dtype or "-",
             "-" if row.kernel_size is None else str(row.kernel_size),
             "-" if row.count_bits is None else f"{row.count_bits}-bit",
             verdict(row.same_as_cpu),
             verdict(row.same_as_definition, f" ({row.definition_windows})"),
             "-" if row.pixel_outputs_per_s is None else f"{row.pixel_outputs_per_s:.3g}",
             "-" if row.events_per_s is None else f"{row.events_per_s:,.0f}",
             f"{row.seconds:.2f}")
    note = f"ERROR: {row.error}" if row.error else row.note
    return " ".join(cell.ljust(width) for cell, (_, width) in zip(cells, COLUMNS,
                                                                  strict=True)) + " " + note


def verdict(rows: typing.Sequence[SelftestRow]) -> str:
    """The self-test's last line: passed, or which checks failed"""
    failed = [row for row in rows if not row.passed]
    if not rows:
        return "selftest FAILED: nothing was checked"
    if not failed:
        widths = sorted({row.count_bits for row in rows if row.count_bits})
        dtypes = list(dict.fromkeys(row.dtype for row in rows if row.dtype))
        return (f"selftest passed: {len(rows)} checks, every median equals the CPU "
                f"engine's and the definition's ({' and '.join(dtypes)} frames, counts of "
                f"{', '.join(map(str, widths))} bits)")
    names = "; ".join(f"{row.device} {row.check}"
                      + (f" k={row.kernel_size}" if row.kernel_size else "")
                      + (f" {row.dtype}" if row.dtype not in (None, "uint8") else "")
                      for row in failed)
    return f"selftest FAILED: {len(failed)} of {len(rows)} checks ({names}); see the table"


def passed(rows: typing.Sequence[SelftestRow]) -> bool:
    """Whether the self-test passed: something was checked and nothing failed"""
    return bool(rows) and all(row.passed for row in rows)


def summary(rows: typing.Sequence[SelftestRow]) -> dict:
    """The self-test's results as JSON-ready values: verdict, rows and the GPUs"""
    from ._version import __version__
    from .cudaprobe import describe_cuda_devices
    return {"dcbg": __version__, "passed": passed(rows), "verdict": verdict(rows),
            "gpus": [{key: device[key] for key in ("cuda_index", "name", "memory_total",
                                                    "driver")}
                     for device in describe_cuda_devices()],
            "rows": [row.as_dict() for row in rows]}
