"""CPU engine: a running median per pixel, on threads or on RawArray worker processes

For uint8 frames a pixel's window is a histogram of 256 grey levels and its
median a pointer into it; moving the window by one frame changes one count
up and one down, and the pointer moves by at most one rank. The C build
keeps per pixel only the counts of a few levels around the median and
updates 16 or 32 pixels at once with SIMD instructions, reading a pixel's
window only when its median leaves those levels; numba's build walks the
whole histogram. The cost per frame hardly depends on the kernel size. For
uint16 frames the kernels keep each pixel's window (see
:mod:`dcbg.cpukernels`); the engine runs both types the same way, with
buffers of the frames' type and the kernels' scratch per thread or worker.
The kernels are compiled and release the GIL.

Two kinds of workers run it on slices of pixels ("jobs"):

- :class:`ProcessWorkers`, the RawArray design of dcnum: spawned worker
  processes share `shared_input` ((batch_size + kernel_size) × pixels) and
  `shared_output` (batch_size × pixels) RawArrays of the frames' type with the
  main process, two of each: the reader decodes the next batch into one input
  while the workers compute on the other, and the writer encodes one output
  while they fill the other, so no batch is copied in or out. The workers
  take pixel slices from a job queue and count finished jobs in a shared
  counter. Each process pays a few tenths of a second to start (Python and
  numpy; a second with numba's build of the kernel), so they serve long
  inputs. The queue is a :class:`PipeQueue`, whose put and get run in the
  caller's thread, and :meth:`ProcessWorkers.close` stops every worker
  within seconds: a Ctrl-C or SIGTERM at any moment ends the process.
- :class:`ThreadWorkers`: threads of this process run the same kernel on the
  batch buffers directly; they cost nothing to start and serve short inputs.

Both give the same bytes. :class:`CPURollingMedian` picks one by the number
of windows (see :data:`PROCESS_MIN_WINDOWS`).
"""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing.connection
import os
import pathlib
import queue
import signal
import sys
import threading
import time
import traceback

import numpy as np

from .. import cpukernels
from ..errors import DEFERRABLE_SIGNALS, WorkerFailure, setting_error, signals_deferred
from ..system import mp_spawn, skip_numba_blas_probe
from .base import Engine, frame_pixels
from .batches import Prefetcher, WriterThread, partition, plan_windows

logger = logging.getLogger(__name__)

PIXELS_PER_JOB = 2048
"""Pixels per job: their histograms of uint8 frames (at most 1 MiB) stay in cache. For
uint16 frames a job's scratch holds `kernel_size` values per pixel, out of cache for long
windows, but the kernels read it only when a median leaves the levels they keep: jobs of
128 to 4096 pixels cost the same within 5 % at k = 100 and 1000 (measured)"""

MIN_PIXELS_PER_JOB = 256
"""Fewer pixels per job would cost more in handing jobs out than they compute"""

PIPELINE_BATCH = 2048
"""Most windows per CPU batch: short batches let the reader, the workers and
the writer overlap; the result never depends on it"""

PIPELINE_DEPTH = 4
"""A short input is split into at least this many batches, so that writing
the first batch overlaps computing the next"""

BATCH_MEMORY_BYTES = 1 << 30
"""Most bytes the batch buffers and the kernels' scratch take together, unless a batch
of `kernel_size` windows needs more (see :meth:`CPURollingMedian.plan_batch`)"""

PROCESS_MIN_WINDOWS = 50_000
"""Inputs with at least this many windows use worker processes, shorter ones
threads: below it, starting processes would cost more than it could gain"""

WORKER_POLL_SECONDS = 0.005
"""How often the main process checks the counter and the workers' health"""

JOB_WAIT_SECONDS = 0.1
"""How long an idle worker waits for a job before it checks that it should go on"""

SHARED_BUFFERS = 2
"""Input and output buffers of a batch, each: the workers compute on one while the
reader fills the other or the writer encodes it"""

JOBS_IN_FLIGHT = 128
"""Most jobs handed out and not yet finished: a job takes under 64 bytes in
the queue's pipe, so 128 of them fit in its buffer on every system (8 KiB
or more) and handing out a job never waits for a worker, dead or alive"""

WORKER_STOP_SECONDS = 1.0
"""How long :meth:`ProcessWorkers.close` waits at each step: for the
workers to stop on their own, then after terminating and after killing them"""

STOP = -1000
"""Counter value that tells the workers to stop"""


def compute_median_for_slice(shared_input, shared_output, kernel_size, output_size, job_slice,
                             scratch=None):
    """Compute the rolling median for a slice of pixels of the shared arrays

    Parameters
    ----------
    shared_input: np.ndarray
        View of the input RawArray, shape ``(batch_size + kernel_size,
        pixels)``; rows ``0 … output_size + kernel_size - 2`` hold frames,
        uint8 or uint16.
    shared_output: np.ndarray
        View of the output RawArray, shape ``(batch_size, pixels)``, of the
        input's type; rows ``0 … output_size - 1`` of the columns in
        `job_slice` are written.
    kernel_size: int
        Number of events in each window.
    output_size: int
        Number of windows to compute in this batch.
    job_slice: slice
        The pixel columns this job owns; jobs never overlap, so workers
        write to the shared output without locks.
    scratch: np.ndarray, optional
        The kernel's scratch for at least as many columns as the job has
        (:func:`dcbg.cpukernels.scratch` of the frames' type and
        `kernel_size`), which a thread or worker keeps for all its jobs;
        without it, scratch is allocated for this job.
    """
    start, stop, _ = job_slice.indices(shared_input.shape[1])
    if scratch is None:
        counts = cpukernels.scratch(shared_input.dtype, stop - start, kernel_size)
    else:
        counts = scratch[:stop - start]
    kernel = cpukernels.cpu_kernels().rolling_median_columns
    kernel(shared_input, shared_output, kernel_size, output_size, start, stop, counts)


def job_slices(pixels: int, workers: int) -> list[slice]:
    """Split `pixels` into balanced, cache-sized slices, at least one per worker"""
    jobs = max(workers, -(-pixels // PIXELS_PER_JOB))
    return [slice(a, b) for a, b in partition(pixels, jobs)]


def widest(jobs: list[slice]) -> int:
    """Columns of the widest job: the scratch a thread or worker keeps serves every job"""
    return max(job.stop - job.start for job in jobs)


class ScratchPerThread:
    """The kernel's scratch, one for each thread that runs jobs, kept for all its jobs

    For uint16 frames the scratch holds `kernel_size` values per column
    (8 MiB for a job at k = 2000): allocated per job, its pages would be
    mapped afresh every time.

    Parameters
    ----------
    dtype: numpy dtype
        The frames' type, uint8 or uint16.
    columns: int
        Columns of the widest job.
    kernel_size: int
        Number of frames in each window.
    """

    def __init__(self, dtype, columns: int, kernel_size: int):
        self.dtype = np.dtype(dtype)
        self.columns = columns
        self.kernel_size = kernel_size
        self._local = threading.local()

    def get(self) -> np.ndarray:
        """This thread's scratch"""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = cpukernels.scratch(self.dtype, self.columns,
                                                               self.kernel_size)
        return scratch


def warm_up_kernel(dtype=np.uint8):
    """Load the compiled kernel for `dtype` frames (for numba's build: numba and its cache)

    Call it before the kernel is needed, so that loading overlaps other work.
    """
    frames = np.zeros((3, 1), dtype)
    compute_median_for_slice(frames, np.zeros((1, 1), dtype), 2, 1, slice(0, 1))


def shared_raw_array(dtype, size: int):
    """A RawArray of `size` values of `dtype` (uint8 or uint16) that processes share"""
    return mp_spawn.RawArray(np.ctypeslib.as_ctypes_type(np.dtype(dtype)), size)


def shared_index(array: np.ndarray, shared: list[np.ndarray]) -> int | None:
    """Which of the `shared` buffers `array` is a view of from its first row (None: none)"""
    start = array.__array_interface__["data"][0]
    for index, buffer in enumerate(shared):
        if buffer.__array_interface__["data"][0] == start and array.strides == buffer.strides:
            return index
    return None


def shared_frames(raw, dtype, rows: int) -> np.ndarray:
    """A RawArray as `rows` rows of values of `dtype` in this machine's byte order

    numpy types the values of a ctypes array with an explicit byte order
    ("<H"), which the C kernels' check of their buffers does not take.
    """
    return np.ctypeslib.as_array(raw).view(np.dtype(dtype)).reshape(rows, -1)


class PipeQueue:
    """A queue between processes that writes and reads its pipe in the caller's thread

    :class:`multiprocessing.Queue` hands each item to a feeder thread. A
    signal that raises its exception in the main thread while ``put()``
    wakes that thread can leave it asleep for good, and the interpreter then
    waits for it forever at exit. Here nothing runs behind the caller's
    back: ``put()`` writes the item to the pipe, ``get()`` reads it, each
    under a lock the processes share. Unlike
    :class:`multiprocessing.SimpleQueue`, ``get()`` gives up after a
    timeout, so a worker can look whether it should go on. A put waits
    while the pipe is full; keep the items in it small and few (see
    :data:`JOBS_IN_FLIGHT`).
    """

    def __init__(self):
        self._reader, self._writer = mp_spawn.Pipe(duplex=False)
        self._read_lock = mp_spawn.Lock()
        self._write_lock = mp_spawn.Lock()

    def put(self, item):
        """Send `item` (pickled)"""
        with self._write_lock:
            self._writer.send(item)

    def get(self, timeout: float):
        """The next item; raises :class:`queue.Empty` if none came within `timeout` seconds"""
        if not self._read_lock.acquire(timeout=timeout):
            raise queue.Empty
        try:
            if not self._reader.poll(timeout):
                raise queue.Empty
            return self._reader.recv()
        finally:
            self._read_lock.release()


class WorkerRollMed(mp_spawn.Process):
    """Worker process computing rolling medians for jobs from a queue

    The worker maps the shared RawArrays (`shared_input` and `shared_output`,
    lists of :data:`SHARED_BUFFERS`), takes ``(input index, output index,
    output_size, job_slice)`` jobs from `job_queue`, computes them on those
    buffers with one scratch of the kernel for
    jobs of up to `columns` pixels, and increments `counter` after each. It stops when
    `counter` is negative, or when the main process is gone (so a killed
    main process leaves no orphans). It sets ``started[index]`` once it is
    ready, and puts a traceback on `error_queue` before it exits with an
    error, so the main process can fail with the real cause. Ctrl-C is left
    to the main process, which stops the workers (see
    :meth:`ProcessWorkers.close`).
    """

    def __init__(self, job_queue, counter, shared_input, shared_output, batch_size,
                 kernel_size, error_queue, started, index, columns, dtype):
        super().__init__(daemon=True)
        self.queue = job_queue
        self.counter = counter
        self.shared_input_raw = shared_input
        self.shared_output_raw = shared_output
        self.batch_size = batch_size
        self.kernel_size = kernel_size
        self.error_queue = error_queue
        self.started = started
        self.index = index
        self.columns = columns
        self.dtype = np.dtype(dtype)
        self.parent_pid = os.getpid()

    def run(self):
        """Main loop (ends when the counter turns negative or the parent is gone)"""
        # Started with SIGINT and SIGTERM blocked (see ProcessWorkers.start): Ctrl-C is the
        # main process's to handle, and terminate() must work again.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, DEFERRABLE_SIGNALS)
        skip_numba_blas_probe()  # this process runs nothing but the kernel
        try:
            # Map the RawArrays here: mapping them in __init__ would copy them.
            shared_inputs = [shared_frames(raw, self.dtype, self.batch_size + self.kernel_size)
                             for raw in self.shared_input_raw]
            shared_outputs = [shared_frames(raw, self.dtype, self.batch_size)
                              for raw in self.shared_output_raw]
            warm_up_kernel(self.dtype)
            scratch = cpukernels.scratch(self.dtype, self.columns, self.kernel_size)
            self.started[self.index] = 1
            # Read without the lock: a sibling killed while holding it must not stall this one.
            finished = self.counter.get_obj()
            while finished.value >= 0:
                try:
                    inputs, outputs, output_size, job_slice = self.queue.get(
                        timeout=JOB_WAIT_SECONDS)
                except queue.Empty:
                    if os.getppid() != self.parent_pid:
                        return
                    continue
                compute_median_for_slice(shared_inputs[inputs], shared_outputs[outputs],
                                         self.kernel_size, output_size, job_slice, scratch)
                with self.counter.get_lock():
                    self.counter.value += 1
        except BaseException:
            self.error_queue.put(traceback.format_exc())
            raise SystemExit(1) from None


def wait_for_exits(processes: list, seconds: float) -> list:
    """Wait up to `seconds` in all for `processes` to exit; return those still running"""
    deadline = time.monotonic() + seconds
    running = [process for process in processes if process.exitcode is None]
    while running and (left := deadline - time.monotonic()) > 0:
        multiprocessing.connection.wait([process.sentinel for process in running], left)
        running = [process for process in running if process.exitcode is None]
    return running


def _main_script_lacks_guard() -> bool:
    """Whether the main module is a script without ``if __name__ == "__main__":``"""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or getattr(main, "__spec__", None) is not None:
        return False  # interactive, -c, or -m: spawned workers do not re-run it
    try:
        return "__main__" not in pathlib.Path(path).read_text(errors="replace")
    except OSError:
        return False


class ProcessWorkers:
    """Spawned worker processes sharing RawArrays with this process

    Parameters
    ----------
    pixels: int
        Pixels per frame.
    kernel_size: int
        Number of frames per window.
    batch_size: int
        Most windows per batch.
    num_cpus: int
        Number of worker processes.
    dtype: numpy dtype
        The frames' type, uint8 or uint16.
    """

    kind = "processes"

    def __init__(self, pixels: int, kernel_size: int, batch_size: int, num_cpus: int,
                 dtype=np.uint8):
        self.kernel_size = kernel_size
        self.batch_size = batch_size
        self.num_cpus = num_cpus
        self.dtype = np.dtype(dtype)
        self.shared_input_raw = [shared_raw_array(dtype, pixels * (batch_size + kernel_size))
                                 for _ in range(SHARED_BUFFERS)]
        """RawArrays for the input frames of a batch: one is read into while the
        workers compute on another"""
        self.shared_output_raw = [shared_raw_array(dtype, pixels * batch_size)
                                  for _ in range(SHARED_BUFFERS)]
        """RawArrays for the medians of a batch: one is written while the
        workers fill another"""
        self.shared_input = [shared_frames(raw, dtype, batch_size + kernel_size)
                             for raw in self.shared_input_raw]
        """numpy views on `shared_input_raw`, first axis enumerates events"""
        self.shared_output = [shared_frames(raw, dtype, batch_size)
                              for raw in self.shared_output_raw]
        """numpy views on `shared_output_raw`, first axis enumerates events"""
        self.worker_counter = mp_spawn.Value("q", 0)
        """number of finished jobs in the current batch; negative stops workers"""
        self.queue = PipeQueue()
        """queue of ``(input index, output index, output_size, job_slice)`` jobs"""
        self.error_queue = PipeQueue()
        """tracebacks of workers that failed"""
        self.started = mp_spawn.RawArray("b", num_cpus)
        """per worker: 1 once it is ready to compute"""
        self.jobs = job_slices(pixels, num_cpus)
        """pixel slices, one job each per batch"""
        self.workers: list[WorkerRollMed] = []
        """the worker processes"""

    def start(self):
        """Spawn the worker processes (they start while the first batch is read)

        A signal waits until a worker is started whole, which it then stops
        with the others.
        """
        self.workers = [WorkerRollMed(self.queue, self.worker_counter, self.shared_input_raw,
                                      self.shared_output_raw, self.batch_size,
                                      self.kernel_size, self.error_queue, self.started,
                                      index, widest(self.jobs), self.dtype)
                        for index in range(self.num_cpus)]
        try:
            for worker in self.workers:
                with signals_deferred():
                    worker.start()
        except BaseException:
            self.close()
            raise

    def close(self):
        """Stop the worker processes within seconds, whatever they are doing

        The workers are asked to stop; those still running after
        :data:`WORKER_STOP_SECONDS` are terminated, and those still running
        after as long again are killed. The request is written without the
        counter's lock, which a worker killed while holding it would never
        give back (a worker counting a job at that moment may overwrite it,
        and is terminated).
        """
        self.worker_counter.get_obj().value = STOP
        started = [worker for worker in self.workers if worker.pid is not None]
        running = wait_for_exits(started, WORKER_STOP_SECONDS)
        for stop_now in (WorkerRollMed.terminate, WorkerRollMed.kill):
            for worker in running:
                stop_now(worker)
            running = wait_for_exits(running, WORKER_STOP_SECONDS)
        for worker in running:
            logger.warning("CPU worker process %d still runs after it was killed", worker.pid)
        for worker in started:
            worker.join(timeout=0)  # multiprocessing forgets the ones that exited
        self.workers = []

    def check(self):
        """Raise WorkerFailure if a worker reported an error or died"""
        try:
            report = self.error_queue.get(timeout=0)
        except queue.Empty:
            report = None
        if report is not None:
            raise WorkerFailure(
                f"A CPU worker failed while computing the median; the cause is below. "
                f"Report it with the cause if it persists.\n{report}")
        dead = [(self.started[worker.index], worker) for worker in self.workers
                if worker.exitcode is not None]
        for started, worker in sorted(dead, key=lambda item: -item[0]):
            if started:
                raise setting_error(
                    WorkerFailure, "CPU worker process {pid} died with exit code {code} while "
                    "computing the median (often: out of memory); retry with a smaller "
                    "batch_size or fewer CPU workers ({setting}).", "num_cpus",
                    pid=worker.pid, code=worker.exitcode)
            guard = (" The script that started dcbg has no 'if __name__ == "
                     "\"__main__\":' guard: worker processes import the main script, "
                     "so put the code that runs dcbg under that guard."
                     if _main_script_lacks_guard() else "")
            raise WorkerFailure(
                f"CPU worker process {worker.pid} exited with code {worker.exitcode} while "
                f"starting, before it computed anything (its own error is printed "
                f"above).{guard}")

    def buffers(self, rows: int, output_rows: int) -> tuple[list, list]:
        """Batch buffers to read frames into and write medians from: views of the RawArrays

        The workers compute on them where they lie, so :meth:`compute` copies
        nothing.
        """
        return ([shared[:rows] for shared in self.shared_input],
                [shared[:output_rows] for shared in self.shared_output])

    def compute(self, frames: np.ndarray, medians: np.ndarray, output_size: int):
        """Medians of `output_size` windows of `frames` into `medians` (flattened rows)

        Both are buffers from :meth:`buffers`, which the workers compute on
        where they lie.
        """
        inputs = shared_index(frames, self.shared_input)
        outputs = shared_index(medians, self.shared_output)
        if inputs is None or outputs is None:
            raise ValueError("ProcessWorkers computes only on the buffers from its buffers(); "
                             "this is a bug in dcbg, please report it.")
        # Read and reset without the lock: a worker killed while holding it must not
        # keep check() from noticing; no worker counts between batches.
        finished = self.worker_counter.get_obj()
        finished.value = 0
        handed_out = 0
        while finished.value < len(self.jobs):
            while handed_out < len(self.jobs) and handed_out - finished.value < JOBS_IN_FLIGHT:
                self.queue.put((inputs, outputs, output_size, self.jobs[handed_out]))
                handed_out += 1
            time.sleep(WORKER_POLL_SECONDS)
            self.check()


class ThreadWorkers:
    """Threads of this process running the kernel on the batch buffers directly

    Parameters
    ----------
    pixels: int
        Pixels per frame.
    kernel_size: int
        Number of frames per window.
    num_cpus: int
        Number of threads.
    dtype: numpy dtype
        The frames' type, uint8 or uint16.
    """

    kind = "threads"

    def __init__(self, pixels: int, kernel_size: int, num_cpus: int, dtype=np.uint8):
        self.kernel_size = kernel_size
        self.pixels = pixels
        self.dtype = np.dtype(dtype)
        self.jobs = job_slices(pixels, num_cpus)
        self.scratch = ScratchPerThread(self.dtype, widest(self.jobs), kernel_size)
        self.pool = concurrent.futures.ThreadPoolExecutor(num_cpus,
                                                          thread_name_prefix="dcbg-median")
        self._warm_up: concurrent.futures.Future | None = None

    def buffers(self, rows: int, output_rows: int) -> tuple[list, list]:
        """Batch buffers to read frames into and write medians from"""
        return ([np.empty((rows, self.pixels), self.dtype) for _ in range(SHARED_BUFFERS)],
                [np.empty((output_rows, self.pixels), self.dtype)
                 for _ in range(SHARED_BUFFERS)])

    def start(self):
        """Load the compiled kernel in the background while the first batch is read"""
        self._warm_up = self.pool.submit(warm_up_kernel, self.dtype)

    def close(self):
        """Stop the threads"""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def compute(self, frames: np.ndarray, medians: np.ndarray, output_size: int):
        """Medians of `output_size` windows of `frames` into `medians` (flattened rows)"""
        if self._warm_up is not None:
            self._warm_up.result()
        futures = [self.pool.submit(self._compute_job, frames, medians, output_size, job)
                   for job in self.jobs]
        concurrent.futures.wait(futures)
        for future in futures:
            future.result()

    def _compute_job(self, frames, medians, output_size: int, job: slice):
        compute_median_for_slice(frames, medians, self.kernel_size, output_size, job,
                                 self.scratch.get())


class CPURollingMedian(Engine):
    """Rolling-median engine on the CPU

    Parameters
    ----------
    image_shape: tuple of int
        Shape of one frame.
    kernel_size: int
        Number of events in each window.
    batch_size: int
        Largest number of windows computed at once (see :meth:`plan_batch`).
    num_cpus: int
        Number of workers (processes or threads), as decided
        (:func:`dcbg.settings.num_cpus_setting`: no more than the CPUs).
    windows: int
        Number of windows the engine will compute; chooses the workers.
    dtype: numpy dtype
        The frames' type: uint8, or uint16 (signed frames come as the
        unsigned values of :mod:`dcbg.dtypes`).

    Raises
    ------
    TypeError
        If the kernels take no frames of `dtype`.
    """

    def __init__(self, image_shape, kernel_size, batch_size, num_cpus, windows,
                 dtype=np.uint8):
        dtype = np.dtype(dtype)
        column_scratch = cpukernels.scratch(dtype, 1, kernel_size).nbytes  # checks dtype
        pixels = frame_pixels(image_shape)
        num_cpus = max(1, min(num_cpus, pixels // MIN_PIXELS_PER_JOB))
        processes = windows >= PROCESS_MIN_WINDOWS
        scratch_bytes = num_cpus * widest(job_slices(pixels, num_cpus)) * column_scratch
        super().__init__(image_shape, kernel_size, self.plan_batch(
            batch_size, kernel_size, windows, pixels * dtype.itemsize,
            SHARED_BUFFERS, scratch_bytes), dtype)
        self.num_cpus = num_cpus
        """number of workers: as decided, but no more than jobs for them"""
        if processes:
            self.workers = ProcessWorkers(self.pixels, kernel_size, self.batch_windows,
                                          self.num_cpus, self.dtype)
        else:
            self.workers = ThreadWorkers(self.pixels, kernel_size, self.num_cpus, self.dtype)
        self._started = False

    def facts(self) -> dict:
        """The workers started (as many as CPUs and pixel slices allow), their kind, the batch"""
        return {"workers": self.num_cpus, "worker_kind": self.workers.kind,
                "batch_windows": self.batch_windows}

    @staticmethod
    def plan_batch(batch_size: int, kernel_size: int, windows: int, frame_bytes: int = 0,
                   buffers: int = 2, scratch_bytes: int = 0) -> int:
        """Windows per CPU batch

        At most :data:`PIPELINE_BATCH` (and `batch_size`), at least four
        kernel sizes (re-reading ``kernel_size - 1`` frames per batch stays
        below a quarter), and for short inputs small enough that
        :data:`PIPELINE_DEPTH` batches overlap reading, computing and
        writing. Then, where frames of `frame_bytes` bytes are given, fewer
        if `buffers` input and output buffers of a batch and the kernels'
        `scratch_bytes` would take more than :data:`BATCH_MEMORY_BYTES`, but
        not fewer than `kernel_size` windows (re-reading at most half): large
        16-bit frames at large kernel sizes.

        Parameters
        ----------
        batch_size, kernel_size: int
            The method's keywords.
        windows: int
            Windows of the run.
        frame_bytes: int
            Bytes of one frame; 0 leaves memory out of the plan.
        buffers: int
            Buffers of each kind a batch fills: :data:`SHARED_BUFFERS`, one
            read ahead or written behind while the workers use the other.
        scratch_bytes: int
            The scratch all workers keep together.
        """
        overlapped = -(-windows // PIPELINE_DEPTH)
        wanted = max(1, min(batch_size, max(4 * kernel_size, min(PIPELINE_BATCH, overlapped))))
        if not frame_bytes:
            return wanted
        # buffers × (an input batch of b + k - 1 frames and an output batch of b)
        frames = (BATCH_MEMORY_BYTES - scratch_bytes) // (buffers * frame_bytes)
        affordable = (frames - (kernel_size - 1)) // 2
        return max(min(wanted, kernel_size), min(wanted, affordable))

    def __enter__(self):
        self.workers.start()
        self._started = True
        return self

    def close(self):
        if self._started:
            self.workers.close()
            self._started = False

    def run(self, read_into, first, stop, write_at, on_written=None) -> np.ndarray:
        """Compute all batches, reading ahead and writing behind in threads"""
        batches = plan_windows(first, stop, self.kernel_size, self.batch_windows)
        rows = max(batch.input_size for batch in batches)
        out_rows = max(batch.output_size for batch in batches)
        inputs, outputs = self.workers.buffers(rows, out_rows)
        prefetcher = Prefetcher(read_into, batches, inputs)
        writer = WriterThread(write_at, outputs, on_written)
        median_seconds = 0.0
        last = None
        try:
            for batch, frames in prefetcher:
                medians = writer.acquire()
                t0 = time.perf_counter()
                self.workers.compute(frames, medians, batch.output_size)
                median_seconds += time.perf_counter() - t0
                prefetcher.release()
                last = medians[batch.output_size - 1].copy()
                writer.submit(batch.start, medians, batch.output_size)
        finally:
            prefetcher.close()
            writer.close()
            self.stage_seconds = {"read": prefetcher.seconds, "median": median_seconds,
                                  "write": writer.seconds}
        logger.info("CPU median on %d %s", self.num_cpus, self.workers.kind)
        return last

