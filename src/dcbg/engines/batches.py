"""Batch plans, and the threads that keep reading and writing off the median's path

Data flows one way: a reader thread fills the next input batch, an engine
computes the medians of the current one, a writer thread stores the
previous one. Both threads rotate a fixed set of buffers, so memory stays
flat in the number of events, and both hand their exceptions to the thread
that consumes them.

Where a thread waits for the main thread, it looks again now and then
(:func:`next_item`): a Ctrl-C or SIGTERM raises its exception in the main
thread, and when that happens while a ``queue.Queue.put`` wakes the waiting
thread, the wake-up can be lost (the item is in the queue, the thread is
never told), and the thread would wait forever for the last item, the one
that tells it to stop.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
import typing

import numpy as np


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of windows

    Windows ``start … start+output_size-1`` are computed from the input
    frames ``start … start+output_size+kernel_size-2``.
    """

    index: int
    start: int
    output_size: int
    kernel_size: int

    @property
    def input_stop(self) -> int:
        """One past the last input frame this batch reads"""
        return self.start + self.output_size + self.kernel_size - 1

    @property
    def input_size(self) -> int:
        """Number of input frames this batch reads"""
        return self.output_size + self.kernel_size - 1


def plan_windows(first: int, stop: int, kernel_size: int, batch_size: int) -> list[Batch]:
    """Batches of at most `batch_size` for the windows ``first … stop-1``"""
    return [Batch(index, start, min(batch_size, stop - start), kernel_size)
            for index, start in enumerate(range(first, stop, batch_size))]


HANDOVER_POLL_SECONDS = 0.1
"""How often a thread that waits for an item from the main thread looks again"""


def next_item(items: queue.Queue):
    """The next item of `items`, even if the put that brought it failed to wake this thread"""
    while True:
        try:
            return items.get(timeout=HANDOVER_POLL_SECONDS)
        except queue.Empty:
            continue


def partition(total: int, parts: int) -> list[tuple[int, int]]:
    """Split ``0 … total-1`` into at most `parts` contiguous ranges as equal as possible

    Used for pixel slices of CPU jobs and for event ranges across GPUs; no
    range is empty.
    """
    parts = max(1, min(parts, total))
    bounds = np.linspace(0, total, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class _ThreadFailure:
    """Marker carrying an exception from a worker thread to the consumer"""

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Read batches in a background thread into a rotating set of buffers

    Iterating yields ``(batch, frames)`` where `frames` is a view of shape
    ``(batch.input_size, pixels)`` into one of `buffers`; call
    :meth:`release` once the oldest frames handed out have been consumed so
    their buffer can be refilled.

    Parameters
    ----------
    read_into: callable
        ``read_into(start, stop, out)`` fills ``out[:stop-start]`` with the
        frames ``start … stop-1`` flattened to ``(n, pixels)``.
    batches: list of Batch
        The batches in the order they are consumed.
    buffers: list of np.ndarray
        Buffers of shape ``(rows, pixels)`` with enough rows for any batch.
    """

    def __init__(self, read_into: typing.Callable, batches: list[Batch],
                 buffers: list[np.ndarray]):
        self._read_into = read_into
        self._batches = batches
        self._free: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._in_use: list[np.ndarray] = []
        self.seconds = 0.0
        """time spent reading (and decompressing) so far"""
        for buffer in buffers:
            self._free.put(buffer)
        self._thread = threading.Thread(target=self._run, name="dcbg-reader", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for batch in self._batches:
                buffer = next_item(self._free)
                if self._stop.is_set():
                    return
                frames = buffer[:batch.input_size]
                t0 = time.perf_counter()
                self._read_into(batch.start, batch.input_stop, frames)
                self.seconds += time.perf_counter() - t0
                self._ready.put((batch, buffer, frames))
        except BaseException as error:  # handed to the consumer, never lost
            self._ready.put(_ThreadFailure(error))

    def __iter__(self):
        for _ in self._batches:
            item = self._ready.get()
            if isinstance(item, _ThreadFailure):
                raise item.error
            batch, buffer, frames = item
            self._in_use.append(buffer)
            yield batch, frames

    def release(self):
        """Give the oldest consumed buffer back to the reader"""
        self._free.put(self._in_use.pop(0))

    def close(self):
        """Stop reading ahead and wait for the reader thread"""
        self._stop.set()
        self._free.put(None)
        self._thread.join()


class WriterThread:
    """Write output batches in a background thread, in submission order

    Parameters
    ----------
    write_at: callable
        ``write_at(offset, frames)`` stores an array of flattened frames
        at window `offset`.
    buffers: list of np.ndarray
        Output buffers of shape ``(rows, pixels)`` handed out by
        :meth:`acquire`; each returns to the pool once written.
    on_written: callable, optional
        Called with the number of frames after each write (progress).
    """

    def __init__(self, write_at: typing.Callable, buffers: list[np.ndarray],
                 on_written: typing.Callable | None = None):
        self._write_at = write_at
        self._on_written = on_written
        self._free: queue.Queue = queue.Queue()
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self.seconds = 0.0
        """time spent writing (and compressing) so far"""
        for buffer in buffers:
            self._free.put(buffer)
        self._thread = threading.Thread(target=self._run, name="dcbg-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            job = next_item(self._jobs)
            if job is None:
                return
            offset, buffer, count = job
            try:
                if self._error is None:
                    t0 = time.perf_counter()
                    self._write_at(offset, buffer[:count])
                    self.seconds += time.perf_counter() - t0
                    if self._on_written is not None:
                        self._on_written(count)
            except BaseException as error:  # handed to the consumer, never lost
                self._error = error
            finally:
                self._free.put(buffer)

    def _raise_if_failed(self):
        if self._error is not None:
            raise self._error

    def acquire(self) -> np.ndarray:
        """Return a free output buffer, waiting for the writer if needed"""
        while True:
            self._raise_if_failed()
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def submit(self, offset: int, buffer: np.ndarray, count: int):
        """Queue ``buffer[:count]`` for writing at `offset`; the buffer returns when done"""
        self._raise_if_failed()
        self._jobs.put((offset, buffer, count))

    def close(self):
        """Wait until everything submitted is written; re-raise write errors"""
        self._jobs.put(None)
        self._thread.join()
        self._raise_if_failed()
