"""Many recordings: one file per task, one after another or on a Dask cluster

:func:`compute_file` is the unit of work. :func:`run_sequential` runs the
tasks here; :func:`run_on_dask` sends them to a Dask distributed scheduler
(``--dask ADDRESS``) or to a cluster it starts on this machine
(``--dask local[:N]``, with dask-cuda's one-GPU-per-worker cluster when
dask-cuda is installed and a GPU is asked for). A file that fails never
stops the others; every file gets a :class:`FileResult`, and
:func:`summary_table` prints them.

Errors that depend on the file (bad input, invalid arguments, an existing
output) are final and reported at once; others (a dead worker process, a
GPU fault, out of memory, a lost Dask worker) are retried.

:func:`find_recordings` lists the recordings below a folder and
:func:`check_input` checks one without computing it (``--dry-run``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import socket
import time
import typing

from .devices import DeviceChoice, DeviceRequest, parse_device
from .errors import InputDataError, InputFileError, OutputError, first_line, setting_error
from .settings import DEFAULT_COMPRESSION, DEFAULT_VERIFY

logger = logging.getLogger(__name__)

FINAL_ERRORS = (InputDataError, InputFileError, OutputError, FileNotFoundError, ValueError)
"""Errors a retry cannot fix: they are reported, not raised"""

RECORDING_SUFFIX = ".rtdc"
"""File name ending of a recording, in any letter case"""

OUTPUT_SUFFIX = "_bg.rtdc"
"""File name ending of dcbg's default outputs, which a folder run does not take as inputs"""

LOCAL_CLUSTER = "local"
"""``--dask`` address of a cluster started on this machine (``local`` or ``local:N``)"""

DASK_ADDRESS_WORDS = "The Dask address"
"""How the library's messages name the Dask address (the command line: ``--dask``)"""

SCHEDULER_CONNECT_SECONDS = 5
"""How long a run tries to reach a Dask scheduler: long enough for one started just before
(``dask scheduler &`` then ``dcbg compute``), short enough that a wrong address fails soon"""

SCHEDULER_ADDRESS = re.compile(r"^(?:[a-z][a-z0-9+.-]*://)?(?P<host>[^/:]+|\[[0-9a-f:.]+\])"
                               r":(?P<port>\d+)$", re.IGNORECASE)
"""A Dask scheduler address: ``[protocol://]host:port`` (IPv6 hosts in brackets)"""

@dataclasses.dataclass(frozen=True)
class JobSettings:
    """How every file of a batch is computed (picklable, sent to Dask workers)"""

    method: str
    """PPID code of the background method, e.g. "rollmed\""""
    kwargs: dict
    """keyword arguments of the method"""
    compress: str | bool = DEFAULT_COMPRESSION
    device: str | DeviceRequest | DeviceChoice = "auto"
    """a device as asked for (chosen where the file is computed, as on a Dask worker), or
    a device chosen once for every file"""
    num_cpus: int | None = None
    io_threads: int | None = None
    verify: str = DEFAULT_VERIFY
    """which of a GPU's results the CPU checks (see :func:`dcbg.settings.parse_verify`)"""


@dataclasses.dataclass
class FileResult:
    """What happened to one file"""

    source: str
    target: str
    ok: bool
    events: int = 0
    seconds: float = 0.0
    device: str = ""
    ppid: str = ""
    host: str = ""
    attempts: int = 1
    message: str = ""
    """the error of a failed file (or why a file was skipped), in one line"""
    skipped: bool = False
    """whether the file was left alone (its output exists)"""

    @property
    def status(self) -> str:
        """One of "ok", "skipped" and "FAILED"."""
        return "FAILED" if not self.ok else "skipped" if self.skipped else "ok"


def compute_file(source, target, settings: JobSettings, progress=None,
                 report_final_errors: bool = True, probe=None) -> FileResult:
    """Compute one file's background; final errors come back as a failed result

    Parameters
    ----------
    source, target: path-like
        Input .rtdc and output path (the same path writes in place).
    settings: JobSettings
        Method, keywords, compression, device, CPU workers, codec threads and
        the check of GPU results (see :mod:`dcbg.settings`).
    progress: callable, optional
        Context manager factory called with the Background instance while it
        runs (the command line's progress bar).
    report_final_errors: bool
        False raises final errors too (one file on the command line, where
        ``--verbose`` shows their traceback).
    probe: dcbg.rtdc.metadata_check.MetadataProbe, optional
        The probe of `source`'s metadata, started before (the command line
        starts it right after reading its arguments); started here by default.

    The file's metadata are first read in a child process
    (:class:`dcbg.rtdc.metadata_check.MetadataProbe`), joined before the file is
    opened, so a file on which libhdf5 hangs or crashes fails cleanly instead
    of stopping the batch.

    Raises
    ------
    Exception
        Errors that a retry may fix (see the module docstring).
    """
    from .rtdc.metadata_check import MetadataProbe
    t0 = time.perf_counter()
    if probe is None and pathlib.Path(source).is_file():
        probe = MetadataProbe(source)  # runs while the modules of a run load
    from .background import get_available_background_methods, load_run_modules
    cls = get_available_background_methods()[settings.method]
    try:
        if probe is not None:
            if isinstance(settings.device, DeviceChoice):  # chosen once, as by the CLI
                settings.device.preload()  # the kernel loads or compiles while the child reads
            load_run_modules()  # while the child reads
            probe.join()
        with cls(source, target, compress=settings.compress, num_cpus=settings.num_cpus,
                 device=settings.device, io_threads=settings.io_threads,
                 verify=settings.verify, **settings.kwargs) as background:
            if progress is None:
                background.process()
            else:
                with progress(background):
                    background.process()
            return FileResult(str(source), str(target), True, background.image_count,
                              time.perf_counter() - t0, str(background.device),
                              background.get_ppid(), socket.gethostname())
    except FINAL_ERRORS as error:
        if not report_final_errors:
            raise
        return FileResult(str(source), str(target), False, seconds=time.perf_counter() - t0,
                          host=socket.gethostname(), message=first_line(error))
    finally:
        if probe is not None:
            probe.stop()


def check_input(source, settings: JobSettings, target) -> int:
    """Check that an input can be computed, without computing it; its number of events

    Makes the check a run makes before it writes anything
    (:meth:`dcbg.Background.preflight`): the input path, the output path
    `target`, the input's frames found as a run finds them (through basins
    and event mappings) and their number against the method's keywords, an
    existing output's events. Nothing is written, not even for an in-place
    run.

    Raises
    ------
    FileNotFoundError, InputFileError, InputDataError, OutputError
        As the computation would.
    """
    from .background import get_available_background_methods
    cls = get_available_background_methods()[settings.method]
    with cls.preflight(source, target, cls.with_defaults(settings.kwargs)) as found:
        return found.event_count


def default_output(path_in: pathlib.Path) -> pathlib.Path:
    """Where a recording's background goes unless told otherwise: ``<stem>_bg.rtdc`` beside it"""
    return path_in.with_name(f"{path_in.stem}{OUTPUT_SUFFIX}")


def is_recording(path: pathlib.Path) -> bool:
    """Whether a folder run takes `path` as an input

    Names ending in ``.rtdc`` in any letter case count (instruments on some
    systems write ``.RTDC``); dcbg's own outputs (``*_bg.rtdc``) and hidden
    files (unfinished outputs among them) do not.
    """
    name = path.name.lower()
    return (name.endswith(RECORDING_SUFFIX) and not name.endswith(OUTPUT_SUFFIX)
            and not name.startswith(".") and path.is_file())


def find_recordings(folder) -> list[pathlib.Path]:
    """Every recording below `folder` (see :func:`is_recording`), sorted

    Symbolic links to folders are followed, as users who link their
    measurement days into one folder expect; a folder reached twice (a link
    cycle, or two links to one folder) is searched once.
    """
    found = []
    searched: set[tuple[int, int]] = set()
    for root, folders, files in os.walk(folder, followlinks=True):
        try:
            status = os.stat(root)
        except OSError:
            folders[:] = []
            continue
        identity = (status.st_dev, status.st_ino)
        if identity in searched:
            folders[:] = []
            continue
        searched.add(identity)
        folders.sort()
        found += [path for path in (pathlib.Path(root, name) for name in files)
                  if is_recording(path)]
    return sorted(found)


def check_dask_address(address: str) -> str:
    """`address` if it names a Dask scheduler or a local cluster, else a ValueError

    Valid are ``local``, ``local:N`` with N ≥ 1 workers, and
    ``[protocol://]host:port`` such as ``tcp://localhost:8786``.
    """
    name, colon, count = address.partition(":")
    if name == LOCAL_CLUSTER:
        if colon and not (count.isdigit() and int(count) >= 1):
            raise setting_error(
                ValueError, "{setting} {address} does not give a number of workers of at least "
                "1; use 'local' or 'local:N' with N >= 1.", "dask", words=DASK_ADDRESS_WORDS,
                address=address)
        return address
    if not SCHEDULER_ADDRESS.match(address):
        raise setting_error(
            ValueError, "{setting} {address} is not a scheduler address; give it as "
            "tcp://HOST:PORT (e.g. tcp://localhost:8786), or 'local' / 'local:N' for a cluster "
            "on this machine.", "dask", words=DASK_ADDRESS_WORDS, address=address)
    return address


def run_sequential(jobs, settings: JobSettings, progress=None,
                   on_result: typing.Callable | None = None) -> list[FileResult]:
    """Compute the files one after another on this machine

    Errors that a retry might fix are not retried here (the cause is local);
    they fail their file and the next file goes on. Ctrl-C stops everything.
    """
    results = []
    for source, target in jobs:
        try:
            result = compute_file(source, target, settings, progress)
        except Exception as error:  # noqa: BLE001 - one file's failure stops no other
            result = FileResult(str(source), str(target), False, host=socket.gethostname(),
                                message=first_line(error))
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def start_local_cluster(spec: str, device: str | DeviceRequest):
    """A Dask cluster on this machine for ``local`` or ``local:N``

    With a GPU device requested and dask-cuda installed, one worker per GPU
    (pinned through CUDA_VISIBLE_DEVICES); otherwise N single-threaded
    worker processes. Workers are not daemonic, so that the CPU backend may
    start its own worker processes.
    """
    import dask
    from distributed import LocalCluster

    _, _, count = check_dask_address(spec).partition(":")
    workers = int(count) if count else None
    dask.config.set({"distributed.worker.daemon": False})
    if parse_device(device).kind != "cpu":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            LocalCUDACluster = None
        from .cudaprobe import cuda_device_count
        gpus = cuda_device_count()
        if LocalCUDACluster is not None and gpus > 0:
            visible = list(range(gpus))[:workers or None]
            return LocalCUDACluster(CUDA_VISIBLE_DEVICES=visible, threads_per_worker=1)
    return LocalCluster(n_workers=workers or 1, threads_per_worker=1, processes=True,
                        dashboard_address=None)


def run_on_dask(jobs, settings: JobSettings, address: str, retries: int = 2,
                on_result: typing.Callable | None = None) -> list[FileResult]:
    """Send one task per file to a Dask cluster and collect every file's result

    Parameters
    ----------
    jobs: list of (source, target)
        The files; paths must be valid on the workers (a shared file system).
    settings: JobSettings
        How to compute them.
    address: str
        A scheduler address (``tcp://host:8786``), or ``local``/``local:N``
        for a cluster on this machine.
    retries: int
        How often a task that raised (not a final error) or whose worker died
        is run again.
    on_result: callable, optional
        Called with each FileResult as it arrives.

    Returns
    -------
    results: list of FileResult
        In the order of `jobs`.

    Raises
    ------
    ExtraNotInstalled
        If Dask's ``distributed`` is not installed (dcbg's ``dask`` extra).
    """
    from .errors import ExtraNotInstalled, install_advice
    try:
        from distributed import Client, as_completed
    except ImportError as error:
        raise ExtraNotInstalled(
            f"Computing on a Dask cluster needs Dask's distributed package, which is not "
            f"installed; install it with {install_advice('dask')}.") from error

    if not logging.getLogger("dcbg").isEnabledFor(logging.INFO):
        # Dask logs every worker's start and stop at INFO; dcbg reports per file.
        import dask
        dask.config.set({"logging.distributed": "warning"})
        logging.getLogger("distributed").setLevel(logging.WARNING)
    cluster = None
    if check_dask_address(address).partition(":")[0] == LOCAL_CLUSTER:
        cluster = start_local_cluster(address, settings.device)
        client = Client(cluster)
    else:
        client = connect_to_scheduler(address)
    try:
        futures = {}
        for index, (source, target) in enumerate(jobs):
            # absolute paths: a worker's working folder is not ours
            future = client.submit(compute_file, os.path.abspath(source), os.path.abspath(target),
                                   settings, retries=retries, pure=False,
                                   key=f"dcbg-{index}-{pathlib.Path(source).name}")
            futures[future] = index
        results: list[FileResult | None] = [None] * len(jobs)
        for future in as_completed(futures):
            index = futures[future]
            source, target = jobs[index]
            if future.status == "finished":
                # the paths as given, not the absolute ones the worker was sent
                result = dataclasses.replace(future.result(), source=str(source),
                                             target=str(target))
            else:
                error = future.exception()
                result = FileResult(str(source), str(target), False,
                                    attempts=retries + 1, message=first_line(error))
            results[index] = result
            if on_result is not None:
                on_result(result)
        return results
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def connect_to_scheduler(address: str):
    """A Dask client of the scheduler at `address`, or an OSError naming the address

    Connecting is retried for :data:`SCHEDULER_CONNECT_SECONDS` (Dask's own
    default waits 30 s where nothing listens).
    """
    from distributed import Client
    try:
        greet_scheduler(address)
        return Client(address, timeout=f"{SCHEDULER_CONNECT_SECONDS}s")
    except OSError as error:
        raise ConnectionError(
            f"No Dask scheduler answered at {address} within {SCHEDULER_CONNECT_SECONDS} s; "
            f"start one there (dask scheduler) or give the address of a running one."
        ) from error


def greet_scheduler(address: str):
    """Exchange Dask's greeting with `address`; OSError unless it answers as Dask does in time

    Dask's client limits the time to reach the address, not the greeting
    after it: a server of another kind there (a dashboard's web port, say)
    never answers it, so the client would wait for good, or reads its answer
    as the length of a message and fails with a MemoryError.
    """
    import asyncio
    import concurrent.futures

    from distributed.comm import connect
    from distributed.security import Security

    async def greet():
        comm = await asyncio.wait_for(
            connect(address, timeout=SCHEDULER_CONNECT_SECONDS,
                    **Security().get_connection_args("client")),
            SCHEDULER_CONNECT_SECONDS)
        await comm.close()

    # a thread of its own: the caller's may run an event loop already (a notebook's does)
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        try:
            thread.submit(asyncio.run, greet()).result()
        except OSError:
            raise
        except Exception as error:  # noqa: BLE001 - a timeout before Python 3.11, or what
            # Dask makes of a foreign answer
            raise OSError(f"{address} gave no answer a Dask scheduler gives") from error


def display_name(source, root=None) -> str:
    """`source` relative to the folder `root` (its file name without one, or outside it)

    Relative paths tell ``day1/M001_data.rtdc`` from ``day2/M001_data.rtdc``.
    """
    path = pathlib.Path(source)
    if root is not None:
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
        if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
            return relative
    return path.name


def summary_table(results: list[FileResult], root=None) -> str:
    """A plain-text table of every file's outcome, with a total line

    Parameters
    ----------
    results: list of FileResult
        The files, in the order to list them.
    root: path-like, optional
        The folder of a folder run: files are named relative to it.
    """
    rows = [("file", "status", "events", "seconds", "events/s", "device", "host", "error")]
    for result in results:
        done = result.status == "ok"
        rate = f"{result.events / result.seconds:,.0f}" if done and result.seconds else ""
        rows.append((display_name(result.source, root), result.status,
                     str(result.events) if done else "",
                     f"{result.seconds:.2f}" if done else "", rate, result.device,
                     result.host, result.message))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join([cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
                       + [row[-1]]).rstrip() for row in rows]
    counts = {status: sum(r.status == status for r in results)
              for status in ("ok", "skipped", "FAILED")}
    events = sum(r.events for r in results if r.status == "ok")
    skipped = f", {counts['skipped']} skipped (output exists)" if counts["skipped"] else ""
    lines.append(f"{counts['ok']} of {len(results)} files done, {events} events{skipped}, "
                 f"{counts['FAILED']} failed")
    return "\n".join(lines)
