"""CPU backend: the seed's RawArray worker design with an O(1)-per-step median

Spawned worker processes share two RawArrays with the main process:
`shared_input` holds ``batch_size + kernel_size`` frames and `shared_output`
``batch_size`` frames, both flattened to pixels. The main process puts pixel
slices on a job queue; each worker slides the window over the batch for its
slice and increments a shared counter. Frames are uint8, so every pixel keeps
a 256-bin histogram of its window and a pointer to the median bin; moving
the window by one frame changes one count up and one down, and the pointer
walks to the new median in a step or two. The cost per frame does not
depend on the kernel size.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback

import numba
import numpy as np

from .errors import WorkerFailure
from .pipeline import Batch, Prefetcher, WriterThread

logger = logging.getLogger(__name__)

mp_spawn = mp.get_context("spawn")
"""Workers are spawned, never forked: forking a process with threads is unsafe"""

PIXELS_PER_JOB = 2048
"""Pixels per job: a uint16 histogram of 2048 pixels (1 MiB) stays in cache"""

PIPELINE_BATCH = 2048
"""Windows per CPU batch (at least 4 kernel sizes): short batches let the
reader, the workers and the writer overlap; the result never depends on it"""

WORKER_POLL_SECONDS = 0.005
"""How often the main process checks the counter and the workers' health"""


def default_cpu_count() -> int:
    """Number of CPUs this process may run on"""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def histogram_dtype(kernel_size: int) -> np.dtype:
    """Smallest unsigned type that counts up to `kernel_size`"""
    return np.dtype(np.uint16 if kernel_size < 2**16 else np.uint32)


@numba.njit(nogil=True, cache=True)
def rolling_median_columns(frames, out, kernel_size, output_size, start, stop, counts):
    """Rolling median of the pixel columns ``start:stop`` of `frames`

    ``out[t, p]`` becomes the element of rank ``kernel_size // 2`` of
    ``frames[t:t+kernel_size, p]`` for ``t < output_size``. `counts` is a
    zeroed scratch array of shape ``(stop - start, 256)``.
    """
    half = kernel_size // 2
    width = stop - start
    median = np.zeros(width, np.int64)
    below = np.zeros(width, np.int64)  # window elements smaller than median
    for row in range(kernel_size - 1):
        for j in range(width):
            counts[j, frames[row, start + j]] += 1
    for t in range(output_size):
        for j in range(width):
            m = median[j]
            b = below[j]
            entering = frames[t + kernel_size - 1, start + j]
            counts[j, entering] += 1
            if entering < m:
                b += 1
            if t > 0:
                leaving = frames[t - 1, start + j]
                counts[j, leaving] -= 1
                if leaving < m:
                    b -= 1
            while b > half:
                m -= 1
                b -= counts[j, m]
            while b + counts[j, m] <= half:
                b += counts[j, m]
                m += 1
            median[j] = m
            below[j] = b
            out[t, start + j] = m


def compute_median_for_slice(shared_input, shared_output, kernel_size, output_size, job_slice):
    """Compute the rolling median for a slice of pixels of the shared arrays

    Parameters
    ----------
    shared_input: np.ndarray
        View of the input RawArray, shape ``(batch_size + kernel_size,
        pixels)``; rows ``0 … output_size + kernel_size - 2`` hold frames.
    shared_output: np.ndarray
        View of the output RawArray, shape ``(batch_size, pixels)``; rows
        ``0 … output_size - 1`` of the columns in `job_slice` are written.
    kernel_size: int
        Number of events in each window.
    output_size: int
        Number of windows to compute in this batch.
    job_slice: slice
        The pixel columns this job owns; jobs never overlap, so workers
        write to the shared output without locks.
    """
    start, stop, _ = job_slice.indices(shared_input.shape[1])
    counts = np.zeros((stop - start, 256), dtype=histogram_dtype(kernel_size))
    rolling_median_columns(shared_input, shared_output, kernel_size, output_size,
                           start, stop, counts)


def job_slices(pixels: int, workers: int) -> list[slice]:
    """Split `pixels` into balanced, cache-sized slices, at least one per worker"""
    jobs = max(workers, -(-pixels // PIXELS_PER_JOB))
    jobs = min(jobs, pixels)
    bounds = np.linspace(0, pixels, jobs + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class WorkerRollMed(mp_spawn.Process):
    """Worker process computing rolling medians for jobs from a queue

    The worker maps the shared RawArrays, takes ``(output_size, job_slice)``
    jobs from `job_queue`, and increments `counter` after each. It stops when
    `counter` is negative, or when the main process is gone (so a killed
    main process leaves no orphans). An exception is reported on
    `error_queue` before the worker exits, so the main process can fail with
    the real cause. Ctrl-C is left to the main process, which stops the
    workers in order.
    """

    def __init__(self, job_queue, counter, shared_input, shared_output, batch_size,
                 kernel_size, error_queue):
        super().__init__(daemon=True)
        self.queue = job_queue
        self.counter = counter
        self.shared_input_raw = shared_input
        self.shared_output_raw = shared_output
        self.batch_size = batch_size
        self.kernel_size = kernel_size
        self.error_queue = error_queue
        self.parent_pid = os.getpid()

    def run(self):
        """Main loop (ends when the counter turns negative or the parent is gone)"""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            # Map the RawArrays here: mapping them in __init__ would copy them.
            shared_input = np.ctypeslib.as_array(self.shared_input_raw).reshape(
                self.batch_size + self.kernel_size, -1)
            shared_output = np.ctypeslib.as_array(self.shared_output_raw).reshape(
                self.batch_size, -1)
            while self.counter.value >= 0:
                try:
                    output_size, job_slice = self.queue.get(timeout=0.1)
                except queue.Empty:
                    if os.getppid() != self.parent_pid:
                        return
                    continue
                compute_median_for_slice(shared_input, shared_output, self.kernel_size,
                                         output_size, job_slice)
                with self.counter.get_lock():
                    self.counter.value += 1
        except BaseException:
            self.error_queue.put(traceback.format_exc())
            raise SystemExit(1) from None


class CPURollingMedian:
    """Rolling-median engine on spawned CPU worker processes

    Parameters
    ----------
    image_shape: tuple of int
        Shape of one frame.
    kernel_size: int
        Number of events in each window.
    batch_size: int
        Largest number of windows computed at once; :attr:`batch_size` may
        be smaller (see :data:`PIPELINE_BATCH`).
    num_cpus: int
        Number of worker processes.
    """

    def __init__(self, image_shape, kernel_size, batch_size, num_cpus):
        self.image_shape = tuple(image_shape)
        self.pixels = int(np.prod(self.image_shape))
        self.kernel_size = kernel_size
        batch_size = min(batch_size, max(PIPELINE_BATCH, 4 * kernel_size))
        self.batch_size = batch_size
        """windows per batch in this engine"""
        self.num_cpus = num_cpus

        self.shared_input_raw = mp_spawn.RawArray(
            np.ctypeslib.ctypes.c_uint8, self.pixels * (batch_size + kernel_size))
        """RawArray with the input frames of the current batch"""
        self.shared_output_raw = mp_spawn.RawArray(
            np.ctypeslib.ctypes.c_uint8, self.pixels * batch_size)
        """RawArray with the medians of the current batch"""
        self.shared_input = np.ctypeslib.as_array(self.shared_input_raw).reshape(
            batch_size + kernel_size, self.pixels)
        """numpy view on `shared_input_raw`, first axis enumerates events"""
        self.shared_output = np.ctypeslib.as_array(self.shared_output_raw).reshape(
            batch_size, self.pixels)
        """numpy view on `shared_output_raw`, first axis enumerates events"""

        self.worker_counter = mp_spawn.Value("q", 0)
        """number of finished jobs in the current batch; negative stops workers"""
        self.queue = mp_spawn.Queue()
        """queue of ``(output_size, job_slice)`` jobs"""
        self.error_queue = mp_spawn.Queue()
        """tracebacks of workers that failed"""
        self.jobs = job_slices(self.pixels, num_cpus)
        """pixel slices, one job each per batch"""
        self.workers: list[WorkerRollMed] = []
        """the worker processes"""
        self.stage_seconds: dict[str, float] = {}
        """seconds spent reading, computing and writing in the last run"""

    def start(self):
        """Spawn the worker processes"""
        self.workers = [WorkerRollMed(self.queue, self.worker_counter, self.shared_input_raw,
                                      self.shared_output_raw, self.batch_size,
                                      self.kernel_size, self.error_queue)
                        for _ in range(self.num_cpus)]
        for worker in self.workers:
            worker.start()

    def close(self):
        """Stop and join the worker processes"""
        self.worker_counter.value = -1000
        for worker in self.workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()
                worker.join()
        self.workers = []

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_workers(self):
        try:
            trace = self.error_queue.get_nowait()
        except queue.Empty:
            trace = None
        if trace is not None:
            raise WorkerFailure(
                f"A CPU worker failed while computing the median; the cause is below. "
                f"Re-run with --verbose and report it if it persists.\n{trace}")
        for worker in self.workers:
            if worker.exitcode is not None:
                raise WorkerFailure(
                    f"CPU worker process {worker.pid} died with exit code {worker.exitcode} "
                    f"while computing the median (often: out of memory); retry with a "
                    f"smaller batch_size or fewer --num-cpus.")

    def load(self, frames: np.ndarray):
        """Copy one batch of ``(rows, pixels)`` uint8 frames into the shared input"""
        self.shared_input[:len(frames)] = frames

    def compute(self, output_size: int) -> np.ndarray:
        """Rolling medians of the batch in the shared input

        Parameters
        ----------
        output_size: int
            Number of windows; :meth:`load` must have copied at least
            ``output_size + kernel_size - 1`` frames.

        Returns
        -------
        medians: np.ndarray
            View of shape ``(output_size, pixels)`` into the shared output,
            valid until the next call.
        """
        self.worker_counter.value = 0
        for job in self.jobs:
            self.queue.put((output_size, job))
        while self.worker_counter.value < len(self.jobs):
            time.sleep(WORKER_POLL_SECONDS)
            self._check_workers()
        return self.shared_output[:output_size]

    def run(self, read_into, batches: list[Batch], write, on_written=None) -> np.ndarray:
        """Compute all batches, reading ahead and writing behind in threads

        Returns the last computed background frame (flattened).
        """
        rows = max(batch.input_size for batch in batches)
        prefetcher = Prefetcher(read_into, batches,
                                [np.empty((rows, self.pixels), np.uint8)])
        writer = WriterThread(write, [np.empty((self.batch_size, *self.image_shape), np.uint8)],
                              on_written)
        median_seconds = 0.0
        try:
            for batch, frames in prefetcher:
                t0 = time.perf_counter()
                self.load(frames)
                prefetcher.release()  # the reader fills it again while the workers run
                medians = self.compute(batch.output_size)
                median_seconds += time.perf_counter() - t0
                buffer = writer.acquire()
                buffer.reshape(len(buffer), -1)[:batch.output_size] = medians
                writer.submit(buffer, batch.output_size)
                last = medians[-1].copy()
        finally:
            prefetcher.close()
            writer.close()
            self.stage_seconds = {"read": prefetcher.seconds, "median": median_seconds,
                                  "write": writer.seconds}
        return last
