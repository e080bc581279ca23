"""The Background base class, with dcnum's Background API

The file modules (:mod:`dcbg.rtdc`, with h5py, numpy and the codecs) are
imported where a run first needs them, not with this module: the command
line reads its arguments, and starts the metadata probe of its input
(:mod:`dcbg.rtdc.metadata_check`), before they load.
"""
from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import logging
import pathlib
import threading
import time
import typing

from . import ppid
from .devices import DeviceChoice, ReadyDevice, fall_back_to_cpu, select_device
from .errors import (
    InputDataError,
    InterruptedAfterStoring,
    first_line,
    signals_deferred,
    sigterm_raises,
)
from .settings import RunSettings, decide_run_settings

if typing.TYPE_CHECKING:
    from .rtdc.output import OutputTarget, StagedOutput
    from .rtdc.reader import ImageSource, RTDCInput
    from .rtdc.writer import ImageBgWriter


class Progress:
    """A fraction in [0, 1] that threads add to and read, like dcnum's ``image_proc``

    It has what dcnum's code uses of its ``multiprocessing.Value("d")``,
    ``value`` and ``get_lock()``, without the process-shared lock, whose
    resource tracker is a Python process of its own started with every run:
    dcbg's progress is counted in the process that runs it.
    """

    def __init__(self):
        self.value = 0.0
        """the fraction done"""
        self._lock = threading.Lock()

    def get_lock(self) -> threading.Lock:
        """The lock to hold while reading and changing :attr:`value` together"""
        return self._lock


@dataclasses.dataclass
class Preflight:
    """What the check before a run found (:meth:`Background.preflight`)"""

    target: OutputTarget
    """what the output path is: a new file, an existing one, or the input"""
    source: ImageSource
    """the input's frames, for batch-wise reading"""
    rtdc_input: RTDCInput | None = None
    """the input .rtdc file, open read-only (None for array input)"""

    @property
    def event_count(self) -> int:
        """The input's number of events"""
        return len(self.source)

    def close(self):
        """Close the input file"""
        if self.rtdc_input is not None:
            self.rtdc_input.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_input(path: pathlib.Path, pool: concurrent.futures.Executor | None = None
               ) -> tuple[RTDCInput, ImageSource]:
    """Open an input .rtdc file read-only and find its frames (through basins and mappings)"""
    from .rtdc.reader import ImageSource, RTDCInput
    rtdc_input = RTDCInput(path)
    try:
        return rtdc_input, ImageSource(rtdc_input.image, pool=pool,
                                       mapping=rtdc_input.image_mapping)
    except BaseException:
        rtdc_input.close()
        raise


class Background(abc.ABC):
    """Base class for background computation

    Subclasses implement :meth:`check_user_kwargs` (which defines the
    method's keyword arguments and therefore its PPID) and
    :meth:`process_approach` (which fills :attr:`writer`). The device is
    chosen before any file is opened; the input is then opened and checked
    with :meth:`preflight`, so a bad input creates no output.

    Parameters
    ----------
    input_data: path-like or array-like
        Path to an .rtdc file whose ``events/image`` (in the file or
        through a file basin) is used, or any array-like uint8 stack whose
        first axis enumerates events (h5py datasets included); it is read in
        batches, never loaded whole.
    output_path: path-like
        Where ``events/image_bg`` goes. If it is the input file itself,
        the background is written into it. If another file exists there,
        it gets the new ``image_bg`` and keeps every other dataset, as with
        dcnum (it must have as many events as the input). Otherwise a new
        file is created that carries the input's metadata and a basin
        pointing to the input. Either way the result appears whole or not
        at all, and a file the input reads its data from through its basins
        is refused before anything is opened for writing.
    compress: bool or str
        True for zstd level 5, False for none, or "zstd-1" … "zstd-9".
    num_cpus: int, optional
        Number of CPU workers; defaults to the CPUs available.
    device: str
        "auto", "cpu", "cuda", "cuda:N" or "cuda:all" (see
        :mod:`dcbg.devices`); never changes the result.
    io_threads: int, optional
        Threads that decode and encode HDF5 chunks; defaults to
        ``DCBG_IO_THREADS`` or the CPUs available. Never changes the result.
    verify: str
        "sample" (default), "all" or "off": the pixels of every GPU batch that
        the CPU recomputes and compares before the batch is written (see
        :mod:`dcbg.engines.verification`). A difference raises
        :class:`~dcbg.errors.GPUResultError` and nothing is written; under
        ``device="auto"`` the CPU computes the background again instead. The
        CPU engine ignores it; it is not part of the PPID.
    kwargs:
        The method's keyword arguments (see :meth:`check_user_kwargs`).
    """

    def __init__(self, input_data, output_path, compress=True, num_cpus=None, device="auto",
                 io_threads=None, verify="sample", **kwargs):
        self.logger = logging.getLogger(f"dcbg.{self.__class__.__name__}")
        self.check_kwargs(kwargs, input_data)

        self.kwargs = self.with_defaults(kwargs)
        """keyword arguments of the method (all of them, defaults filled in)"""

        self.settings: RunSettings = decide_run_settings(compress, num_cpus, io_threads,
                                                         verify)
        """the run's settings, decided here once, and what deciding them warned about"""

        self.device: DeviceChoice = select_device(device)
        """the device that computes the background (chosen here unless given as chosen)"""
        self.device.preload()

        self.ready_device: ReadyDevice | None = None
        """the device, its kernels loaded, while :meth:`process` runs (engines are built on
        it)"""

        self.output_path = pathlib.Path(output_path)
        """path of the output file"""

        self.image_proc = Progress()
        """fraction of images that have been processed (safe to poll from any thread)"""

        self.hdin: RTDCInput | None = None
        """the open input .rtdc file (None for array input)"""

        self.h5in = None
        """input h5py.File (None for array input); kept for dcnum's API"""

        self.h5out = None
        """the file :meth:`process` writes while it runs (the output's hidden temporary
        file, from which an existing output gets its new background); kept for dcnum's API"""

        self.paths_ref: list[pathlib.Path] = []
        """input files the output refers to through its basin; kept for dcnum's API"""

        self.in_place = False
        """whether image_bg is written into the input file itself"""

        self.target: OutputTarget | None = None
        """what the output path is: a new file, an existing one, or the input"""

        self.stage_seconds: dict[str, float] = {}
        """seconds spent per stage in the last run (read, median, write, total)"""

        self.engine_facts: dict = {}
        """what computed the last run: workers started, batch sizes (see the run log)"""

        self.gpu_failure: dict | None = None
        """the GPU failure the last run recovered from on the CPU (``device="auto"``)"""

        self.run_record: dict | None = None
        """the run log the last :meth:`process` stored in the output"""

        self.writer: ImageBgWriter | None = None
        """writer of events/image_bg in the output while :meth:`process` runs"""

        self.io_pool = concurrent.futures.ThreadPoolExecutor(
            self.io_threads, thread_name_prefix="dcbg-io")
        """threads shared by the reader and the writer for chunk codecs"""

        self.source: ImageSource | None = None
        """batch-wise reader of the input frames"""

        self.input_data = None
        """the input image stack (h5py dataset or array-like)"""

        self._output: StagedOutput | None = None
        self._input_path = (pathlib.Path(input_data)
                            if isinstance(input_data, (str, pathlib.Path)) else None)
        from .rtdc.output import INPUT
        try:
            found = self.preflight(input_data, self.output_path, self.kwargs, self.io_pool)
        except BaseException:
            self.close()
            raise
        self.target = found.target
        self.in_place = self.target.kind == INPUT
        self.hdin = found.rtdc_input
        self.h5in = None if self.hdin is None else self.hdin.h5
        self.source = found.source
        self.input_data = self.source.data
        if self._input_path is not None and not self.in_place:
            self.paths_ref.append(self._input_path)
        self.image_shape = self.source.image_shape
        """shape of one frame"""
        self.image_count = found.event_count
        """number of frames in the input"""

    @property
    def num_cpus(self) -> int:
        """number of CPU workers (no more than the CPUs; the CPU engine starts no more
        than its frames have pixel slices)"""
        return self.settings.num_cpus

    @property
    def io_threads(self) -> int:
        """number of threads that decode and encode HDF5 chunks"""
        return self.settings.io_threads

    @property
    def compress(self) -> str:
        """compression of image_bg as decided: zstd-1 … zstd-9, or none"""
        return self.settings.compression

    @property
    def verify(self) -> str:
        """which pixels of a GPU's batches the CPU checks: "sample", "all" or "off" """
        return self.settings.verify

    @classmethod
    def preflight(cls, input_data, output_path, kwargs: dict,
                  pool: concurrent.futures.Executor | None = None) -> Preflight:
        """Check that a run can compute `input_data` into `output_path`, before any writing

        The one check before a run: :class:`Background` makes it and keeps
        what it opened, ``dcbg compute --dry-run`` makes it and closes, so the
        two never disagree. In order: the input path, what the output path is
        (:func:`~dcbg.rtdc.output.plan_output`, which refuses a file the
        input reads its data from), the input's frames (in the file or
        through its basins), their number against the method's keywords
        (:meth:`check_event_count`), and an existing output's number of
        events.

        Parameters
        ----------
        input_data: path-like or array-like
            The input as :class:`Background` takes it.
        output_path: path-like
            Where ``image_bg`` would go.
        kwargs: dict
            The method's keyword arguments, all of them.
        pool: concurrent.futures.Executor, optional
            Codec threads for reading the frames' chunks (a run's).

        Returns
        -------
        found: Preflight
            The output plan, the open input and its frames; close it (or use
            it as a context manager) unless its handles are kept.

        Raises
        ------
        FileNotFoundError, InputFileError, InputDataError, OutputError
            For the first problem found.
        """
        from .rtdc.output import EXISTING, check_existing_output, plan_output
        from .rtdc.reader import ImageSource, check_input_path
        input_path = (pathlib.Path(input_data)
                      if isinstance(input_data, (str, pathlib.Path)) else None)
        if input_path is not None:
            check_input_path(input_path)  # before the output, which may sit beside it
        target = plan_output(output_path, input_path)
        rtdc_input = None
        if input_path is not None:
            rtdc_input, source = open_input(input_path, pool)
        else:
            source = ImageSource(input_data, pool=pool)
        found = Preflight(target, source, rtdc_input)
        try:
            cls.check_event_count(found.event_count, kwargs)
            if target.kind == EXISTING:
                check_existing_output(target.path, found.event_count)
        except BaseException:
            found.close()
            raise
        return found

    @classmethod
    def with_defaults(cls, kwargs: dict) -> dict:
        """The method's keyword arguments: `kwargs`, and the defaults of those it lacks"""
        return {**ppid.keyword_defaults(cls.check_user_kwargs), **kwargs}

    @classmethod
    def check_event_count(cls, events: int, kwargs: dict):
        """Refuse an input of `events` events that the method cannot compute with `kwargs`

        Parameters
        ----------
        events: int
            The input's number of events.
        kwargs: dict
            The method's keyword arguments, all of them.

        Raises
        ------
        InputDataError
            If the input has too few events (here: none).
        """
        if events == 0:
            raise InputDataError(
                "The input has no events (N=0); a background needs frames.")

    @classmethod
    def check_kwargs(cls, kwargs: dict, input_data=None):
        """Check the method's keyword arguments (:meth:`check_user_kwargs`) for an input

        Where the keywords break a rule and the input has too few events for
        them, the input's error is raised: no keyword value makes a short
        recording long enough, and the value that suits it may satisfy the
        rule too (kernel_size=20000 on 5,000 events also breaks
        ``batch_size > kernel_size`` with the default batch_size).

        Parameters
        ----------
        kwargs: dict
            The method's keyword arguments; those left out take their defaults.
        input_data: path-like or array-like, optional
            The input as :class:`Background` takes it; opened read-only, and
            only where a keyword breaks a rule.

        Raises
        ------
        InputDataError
            If a keyword breaks a rule and the input has too few events.
        ValueError
            If a keyword breaks a rule.
        """
        try:
            cls.check_user_kwargs(**kwargs)
            return
        except ValueError as error:
            keyword_error = error
        if input_data is not None:
            events = input_event_count(input_data)
            try:
                cls.check_event_count(events, cls.with_defaults(kwargs))
            except TypeError:
                pass  # a keyword of the wrong type, which its own error names
        raise keyword_error

    def _open_input(self):
        """Open the input .rtdc file read-only again and find its frames (after a commit)"""
        self.hdin, self.source = open_input(self._input_path, self.io_pool)
        self.h5in = self.hdin.h5
        self.input_data = self.source.data

    def _close_input(self):
        if self.hdin is not None:
            self.hdin.close()
            self.hdin = None
            self.h5in = None

    def _open_output(self):
        """Create the unfinished output, whole even if Ctrl-C comes meanwhile (then discarded
        whole by :meth:`_discard_output`)"""
        from .rtdc.basins import write_output_basins
        from .rtdc.output import NEW, ExistingOutputFile, NewOutputFile
        from .rtdc.writer import ImageBgWriter, copy_metadata
        with signals_deferred():
            if self.target.kind != NEW:  # an existing output, or the input itself
                self._output = ExistingOutputFile(self.output_path)
            else:
                self._output = NewOutputFile(self.output_path)
                if self.hdin is not None:
                    copy_metadata(self.hdin.h5, self._output.h5)
                    write_output_basins(self._output.h5, self.hdin.h5, self.hdin.path,
                                        self.output_path)
            self.h5out = self._output.h5
            self.writer = ImageBgWriter(self._output.bg_group, self.image_shape,
                                        self.image_count, self.compress,
                                        target=self.output_path, pool=self.io_pool)

    def _discard_output(self):
        """Remove the unfinished output, all of it even if a second Ctrl-C comes meanwhile"""
        if self._output is not None:
            with signals_deferred():
                self._output.abort()
                self._output = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()

    def close(self):
        """Close all files and stop the codec threads; an unfinished output is discarded"""
        self._discard_output()
        self._close_input()
        self.io_pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    @abc.abstractmethod
    def check_user_kwargs():
        """Check the method's keyword arguments (they define the PPID)"""

    def get_ppid(self) -> str:
        """Return the background pipeline identifier, e.g. ``rollmed:k=100^b=10000``"""
        return self.get_ppid_from_ppkw(self.kwargs)

    @classmethod
    def get_ppid_code(cls) -> str:
        """The method's code in a PPID: the lower-case class name without "background"."""
        if cls is Background:
            raise ValueError("The Background base class has no PPID code; use a subclass.")
        key = cls.__name__.lower()
        return key[len("background"):] if key.startswith("background") else key

    @classmethod
    def get_ppid_from_ppkw(cls, kwargs: dict) -> str:
        """Return the PPID for the given keyword arguments of this method"""
        return f"{cls.get_ppid_code()}:{ppid.kwargs_to_ppid(cls.check_user_kwargs, kwargs)}"

    @staticmethod
    def get_ppkw_from_ppid(bg_ppid: str) -> dict:
        """Return the keyword arguments encoded in a PPID of any method"""
        code, rest = ppid.split_ppid(bg_ppid)
        methods = get_available_background_methods()
        if code not in methods:
            raise ValueError(
                f"Unknown background method '{code}' in PPID '{bg_ppid}'; available "
                f"methods are {sorted(methods)}.")
        return ppid.ppid_to_kwargs(methods[code].check_user_kwargs, rest)

    def get_progress(self) -> float:
        """Fraction of frames processed, a float in [0, 1]"""
        return self.image_proc.value if self.image_count else 0.0

    def process(self):
        """Compute the background and store it with its PPID

        The background is written to a hidden temporary file beside the
        output while it is computed. A new output file is that file, renamed
        to its final name when complete. Into the input file or an existing
        output, the finished background is copied in place of the previous
        ``image_bg`` (whose ``bg_off`` is removed with it, as dcnum does), so
        a re-run does not grow the file; until then the file is not written
        at all, and a failed swap puts the previous background back. Any
        error, Ctrl-C or SIGTERM (in the main thread) before the commit
        discards the unfinished background and stops the workers. Ctrl-C or
        SIGTERM during the commit waits until the background is stored, then
        raises :class:`~dcbg.errors.InterruptedAfterStoring` (a
        KeyboardInterrupt).
        A GPU that ``device="auto"`` chose and that fails during the run (a
        CUDA error, a result that differs from the CPU's) leaves the
        background to the CPU, which computes it again from the start in a
        fresh output; an explicit GPU fails with the error.
        """
        from . import runlog
        with sigterm_raises(), runlog.WarningCollector() as warnings:
            try:
                # a failed kernel compile fails before any output
                self.ready_device = self.device.ready()
                if self._output is None:
                    self._open_output()
                start = runlog.utc_now()
                t0 = time.perf_counter()
                self.image_proc.value = 0
                self.stage_seconds = {}
                self.gpu_failure = None
                self._process_falling_back()
                self.writer.check_complete()
                self.writer.set_ppid(self.get_ppid())
                self.stage_seconds["total"] = time.perf_counter() - t0
                record = runlog.run_record(self.get_ppid(), self.ready_device, self.settings,
                                           self.engine_facts, start, self.image_count,
                                           self.stage_seconds, warnings.messages,
                                           self.gpu_failure)
                self.run_record = record
                self._commit(record)
            except BaseException:
                self._discard_output()
                raise
            finally:
                self._output = None
                self.h5out = None
                self.writer = None
        self.logger.info("Background of %d frames computed in %.1f s",
                         self.image_count, time.perf_counter() - t0)

    def _commit(self, record: dict):
        """Store the finished background with the run log `record`, all or nothing

        Ctrl-C and SIGTERM wait until it is stored: cut short, the swap into
        an existing file could leave it without any background. In place,
        the input (open read-only while computing) is closed for the commit,
        since HDF5 opens a file either read-only or for writing, and opened
        again after it.
        """
        from . import runlog
        try:
            with signals_deferred():
                if self.in_place:
                    self._close_input()
                try:
                    self._output.commit(lambda h5: runlog.write_run_log(h5, record))
                    self._output = None
                    self.image_proc.value = 1
                finally:
                    if self.in_place:
                        self._open_input()
        except KeyboardInterrupt as error:
            if self._output is not None:
                raise  # the commit failed and discarded the background: as usual
            raise InterruptedAfterStoring(
                f"{str(error) or 'interrupted'} while {self.output_path} was being finished; "
                f"it was stored whole, then the run stopped") from error

    def _process_falling_back(self):
        try:
            self.process_approach()
        except Exception as error:
            cpu = fall_back_to_cpu(self.device, error, f"the background of {self._name()}")
            if cpu is None:
                raise
            self.gpu_failure = {"device": str(self.device), "error": first_line(error),
                                **self.engine_facts}
            self._discard_output()  # nothing the GPU computed is kept
            self._open_output()
            self.device = cpu
            self.ready_device = cpu.ready()
            self.image_proc.value = 0
            self.stage_seconds = {}
            self.process_approach()

    def _name(self) -> str:
        return str(self.hdin.path) if self.hdin is not None else "the input frames"

    def _count_written(self, frames: int):
        with self.image_proc.get_lock():  # writers of several devices report at once
            self.image_proc.value = min(1.0,
                                        self.image_proc.value + frames / self.image_count)

    @abc.abstractmethod
    def process_approach(self):
        """Compute the background and write every frame with :attr:`writer`"""


def load_run_modules():
    """Import the modules a run needs beyond this one, before the run needs them

    The file modules (with h5py, numpy and the codecs), the run log and the
    CPU engine (which also checks a GPU's results) are imported where a run
    first needs them; :func:`dcbg.jobs.compute_file` imports them here while
    the input's metadata probe runs, instead of after it.
    """
    from . import runlog  # noqa: F401
    from .engines import cpu  # noqa: F401
    from .rtdc import basins, output, reader, writer  # noqa: F401


def input_event_count(input_data) -> int:
    """The number of events of an input as :class:`Background` takes it (path or stack)"""
    from .rtdc.reader import ImageSource, RTDCInput
    if isinstance(input_data, (str, pathlib.Path)):
        with RTDCInput(input_data) as rtdc_in:
            return rtdc_in.event_count
    return len(ImageSource(input_data))


def get_available_background_methods() -> dict[str, type[Background]]:
    """Return the background methods by PPID code, e.g. ``{"rollmed": …}``"""
    from . import rollmed  # noqa: F401 - defines the built-in methods
    return {cls.get_ppid_code(): cls for cls in Background.__subclasses__()}
