"""Batch plans, and the reader and writer threads around an engine"""
import queue
import threading
import time

import numpy as np
import pytest

from dcbg.engines.batches import Batch, Prefetcher, WriterThread, partition, plan_windows
from helpers.threads import finishes

PIXELS = 3


def frames_of(start, stop):
    """Input frames whose values tell which frame they are"""
    return np.repeat(np.arange(start, stop, dtype=np.uint8)[:, None], PIXELS, axis=1)


@pytest.mark.parametrize("first,stop,kernel_size,batch_size", [
    (0, 100, 10, 30),  # a ragged last batch
    (0, 90, 10, 30),  # batches that divide the windows
    (0, 7, 4, 1000),  # one batch larger than all windows
    (25, 80, 6, 20),  # windows that do not start at 0
    (3, 20, 1, 5),  # kernel 1: a window is its own frame
    (0, 1, 2, 1),  # a single window
])
def test_plans_cover_every_window_once_with_the_frames_it_needs(first, stop, kernel_size,
                                                                batch_size):
    batches = plan_windows(first, stop, kernel_size, batch_size)
    windows = [w for b in batches for w in range(b.start, b.start + b.output_size)]
    assert windows == list(range(first, stop))
    assert [b.index for b in batches] == list(range(len(batches)))
    for batch in batches:
        assert 1 <= batch.output_size <= batch_size
        assert batch.kernel_size == kernel_size
        # window w is the median of frames w … w+kernel_size-1
        last_window = batch.start + batch.output_size - 1
        assert batch.input_stop == last_window + kernel_size
        assert batch.input_size == batch.input_stop - batch.start


def test_a_plan_of_no_windows_is_empty():
    assert plan_windows(40, 40, 10, 30) == []


def test_batch_input_range():
    batch = Batch(index=2, start=60, output_size=30, kernel_size=10)
    assert (batch.input_stop, batch.input_size) == (99, 39)


@pytest.mark.parametrize("total,parts", [
    (10, 3), (100, 7), (7, 7), (5, 12), (1, 2), (1000, 1), (9, 0), (17, -3), (480, 16)])
def test_partition_is_contiguous_balanced_and_never_empty(total, parts):
    ranges = partition(total, parts)
    assert len(ranges) == max(1, min(parts, total))
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))
    sizes = [b - a for a, b in ranges]
    assert min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1
    assert all(isinstance(bound, int) for pair in ranges for bound in pair)


class RecordingReader:
    """read_into for a Prefetcher that checks it is never handed a buffer still in use"""

    def __init__(self, fail_at=None):
        self.calls = []
        self.held = []  # buffers the consumer has not released
        self.overwritten = []
        self.fail_at = fail_at
        self.lock = threading.Lock()

    def __call__(self, start, stop, out):
        with self.lock:
            if any(np.shares_memory(out, buffer) for buffer in self.held):
                self.overwritten.append(start)
        self.calls.append((start, stop))
        if start == self.fail_at:
            raise OSError(f"cannot read frame {start}")
        out[:stop - start] = frames_of(start, stop)


def test_reader_fills_buffers_in_order_and_never_one_in_use():
    batches = plan_windows(0, 60, 5, 7)
    buffers = [np.zeros((11, PIXELS), np.uint8) for _ in range(2)]
    reader = RecordingReader()
    prefetcher = Prefetcher(reader, batches, buffers)
    seen = []
    held_frames = []
    for batch, frames in prefetcher:
        assert frames.shape == (batch.input_size, PIXELS)
        assert any(np.shares_memory(frames, buffer) for buffer in buffers)
        with reader.lock:
            reader.held.append(frames)
        held_frames.append((frames, frames.copy()))
        seen.append(batch)
        if len(held_frames) == 2:  # the consumer keeps the two newest batches
            oldest, copy = held_frames.pop(0)
            assert np.array_equal(oldest, copy), "a buffer was refilled before release()"
            with reader.lock:
                reader.held.pop(0)
            prefetcher.release()
    prefetcher.close()
    assert seen == batches
    assert reader.calls == [(b.start, b.input_stop) for b in batches]
    assert reader.overwritten == []
    assert all(np.array_equal(frames, copy) for frames, copy in held_frames)
    assert prefetcher.seconds >= 0


def test_reader_handed_frames_equal_the_input():
    batches = plan_windows(10, 40, 4, 8)
    prefetcher = Prefetcher(RecordingReader(), batches,
                            [np.zeros((11, PIXELS), np.uint8) for _ in range(3)])
    for batch, frames in prefetcher:
        assert np.array_equal(frames, frames_of(batch.start, batch.input_stop))
        prefetcher.release()
    prefetcher.close()


def test_a_read_error_reaches_the_consumer():
    batches = plan_windows(0, 30, 2, 10)
    reader = RecordingReader(fail_at=10)
    prefetcher = Prefetcher(reader, batches,
                            [np.zeros((11, PIXELS), np.uint8) for _ in range(2)])
    consumed = []

    def consume():
        for batch, _ in prefetcher:
            consumed.append(batch.start)
            prefetcher.release()

    with pytest.raises(OSError, match="cannot read frame 10"):
        finishes(consume)
    assert consumed == [0]
    finishes(prefetcher.close)


def test_close_stops_a_reader_waiting_for_a_buffer():
    batches = plan_windows(0, 50, 2, 10)
    reader = RecordingReader()
    prefetcher = Prefetcher(reader, batches, [np.zeros((11, PIXELS), np.uint8)])
    iterator = iter(prefetcher)
    next(iterator)  # the only buffer is in use: the reader waits for it
    finishes(prefetcher.close)
    assert not prefetcher._thread.is_alive()
    assert reader.calls == [(0, 11)]


def lose_wake_ups(items: queue.Queue):
    """Make puts to `items` wake no waiting thread

    So it goes when a signal raises its exception in the main thread while
    a put wakes a thread: the item is in the queue, the thread is never told.
    """
    items.not_empty.notify = lambda n=1: None


def test_the_reader_finds_buffers_whose_wake_up_was_lost():
    batches = plan_windows(0, 50, 2, 10)
    prefetcher = Prefetcher(RecordingReader(), batches,
                            [np.zeros((11, PIXELS), np.uint8) for _ in range(2)])
    lose_wake_ups(prefetcher._free)

    def consume():
        starts = []
        for batch, _ in prefetcher:
            starts.append(batch.start)
            time.sleep(0.01)  # the reader waits for this buffer by now
            prefetcher.release()
        prefetcher.close()
        return starts

    assert finishes(consume, seconds=10) == [batch.start for batch in batches]


def test_close_before_anything_was_consumed():
    reader = RecordingReader()
    prefetcher = Prefetcher(reader, plan_windows(0, 50, 2, 10),
                            [np.zeros((11, PIXELS), np.uint8) for _ in range(2)])
    finishes(prefetcher.close)
    assert len(reader.calls) <= 2


class RecordingWriter:
    """write_at for a WriterThread: keeps copies of what it was given"""

    def __init__(self, fail_at=None, gate=None):
        self.writes = []
        self.attempts = []
        self.fail_at = fail_at
        self.gate = gate

    def __call__(self, offset, frames):
        self.attempts.append(offset)
        if offset == self.fail_at:
            if self.gate is not None:
                self.gate.wait()
            raise OSError(28, "No space left on device")
        self.writes.append((offset, frames.copy()))


def test_writer_writes_in_submission_order_and_returns_buffers():
    writer_calls = RecordingWriter()
    written_counts = []
    buffers = [np.zeros((6, PIXELS), np.uint8) for _ in range(2)]
    writer = WriterThread(writer_calls, buffers, written_counts.append)
    jobs = [(30, 6), (0, 4), (12, 6), (6, 1), (50, 3), (40, 5)]  # more jobs than buffers

    def submit_all():
        for offset, count in jobs:
            buffer = writer.acquire()
            buffer[:] = 255
            buffer[:count] = frames_of(offset, offset + count)
            writer.submit(offset, buffer, count)
        writer.close()

    finishes(submit_all)
    assert [offset for offset, _ in writer_calls.writes] == [offset for offset, _ in jobs]
    for (offset, count), (_, frames) in zip(jobs, writer_calls.writes, strict=True):
        assert np.array_equal(frames, frames_of(offset, offset + count))
    assert written_counts == [count for _, count in jobs]
    # every buffer is back in the pool
    returned = [finishes(writer.acquire) for _ in buffers]
    assert sorted(map(id, returned)) == sorted(map(id, buffers))
    assert writer.seconds >= 0


def test_the_writer_finds_jobs_whose_wake_up_was_lost():
    write_at = RecordingWriter()
    writer = WriterThread(write_at, [np.zeros((4, PIXELS), np.uint8) for _ in range(2)])
    lose_wake_ups(writer._jobs)
    for offset in (0, 4, 8):
        buffer = finishes(writer.acquire)
        buffer[:] = frames_of(offset, offset + 4)
        writer.submit(offset, buffer, 4)
    finishes(writer.close, seconds=10)  # its stop sign gets no wake-up either
    assert [offset for offset, _ in write_at.writes] == [0, 4, 8]


def test_a_write_error_reaches_the_submitter_on_submit():
    writer = WriterThread(RecordingWriter(fail_at=0), [np.zeros((4, PIXELS), np.uint8)])
    buffer = writer.acquire()
    writer.submit(0, buffer, 4)
    try:
        buffer = finishes(writer.acquire)  # the failed write gives the buffer back
    except OSError:
        pass
    with pytest.raises(OSError, match="No space left"):
        writer.submit(4, buffer, 4)
    with pytest.raises(OSError, match="No space left"):
        writer.close()


def test_a_write_error_reaches_the_submitter_on_acquire():
    writer = WriterThread(RecordingWriter(fail_at=0), [np.zeros((4, PIXELS), np.uint8)])
    writer.submit(0, writer.acquire(), 4)

    def acquire_twice():
        writer.acquire()  # may hand out the returned buffer before it sees the error
        writer.acquire()  # none left: only the error can end the wait

    with pytest.raises(OSError, match="No space left"):
        finishes(acquire_twice)


def test_a_write_error_reaches_close_and_later_writes_are_skipped():
    gate = threading.Event()
    write_at = RecordingWriter(fail_at=8, gate=gate)
    written_counts = []
    buffers = [np.zeros((4, PIXELS), np.uint8) for _ in range(4)]
    writer = WriterThread(write_at, buffers, written_counts.append)
    for offset in (0, 8, 12, 16):  # the write of 8 fails only once all are submitted
        writer.submit(offset, writer.acquire(), 4)
    gate.set()
    with pytest.raises(OSError, match="No space left"):
        finishes(writer.close)
    assert write_at.attempts == [0, 8]
    assert [offset for offset, _ in write_at.writes] == [0]
    assert written_counts == [4]
    # acquire() raises the error now, so look into the pool itself
    assert sorted(map(id, [writer._free.get_nowait() for _ in buffers])) == sorted(
        map(id, buffers)), "buffers of skipped writes return to the pool too"
