"""Run dcbg with a slowed-down reader, so a test can hit it mid-run

Usage: ``python slow_run.py MARKER [OPTIONS] MODE ARGS…`` where MODE is ``cli ARGS…`` (the
command line), ``api INPUT OUTPUT`` (BackgroundRollMed with kernel_size=10, batch_size=20,
2 CPU workers) or ``rolling_median FRAMES`` (:func:`dcbg.rolling_median` of FRAMES random
20×40 frames, kernel_size=10). The CPU engine uses worker processes whatever the input's
length, so that tests see them. Each batch read sleeps 0.1 s; after the third batch the
reader writes the process ids of the main process and its CPU workers to MARKER, so the test
knows the run is under way and which processes must be gone afterwards.

OPTIONS:

``--read-delay SECONDS``
    Each batch read sleeps SECONDS instead.
``--signal-at-wake N SIGNAL``
    Send SIGNAL (SIGINT, SIGTERM) to this process at the moment its main thread has woken
    a sleeping thread for the N-th time, between the two steps of waking in
    ``threading.Condition.notify``: after the waiter's lock is released, before the waiter
    is forgotten. A signal whose handler raises there leaves the waiter behind, and the
    next wake-up of that condition is lost. The test finds the signal's time (monotonic
    clock) in MARKER with the suffix ".signalled".
``--slow-wakes SECONDS``
    Pause the main thread at that moment of every wake-up, as a busy machine does when the
    woken thread takes the main thread's core, so that signals at random times meet it.
"""
import functools
import multiprocessing
import os
import pathlib
import signal
import sys
import threading
import time

from dcbg.engines import cpu
from dcbg.rtdc import reader

DELAY = 0.1
"""Seconds each batch read sleeps, unless --read-delay says otherwise"""


def after_each_wake(hook):
    """Call `hook` each time the main thread has woken a thread, before it forgets the waiter"""

    def notify(self, n=1):
        # threading.Condition.notify, with the hook placed where a signal hurts most
        if not self._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        waiters = self._waiters
        while waiters and n > 0:
            waiter = waiters[0]
            try:
                waiter.release()
            except RuntimeError:
                pass  # an earlier notify released it and was stopped before forgetting it
            else:
                n -= 1
                if threading.current_thread() is threading.main_thread():
                    hook()
            try:
                waiters.remove(waiter)
            except ValueError:
                pass

    threading.Condition.notify = notify


def signal_at_wake(wake: int, signum: int, record: pathlib.Path):
    """Make the main thread's `wake`-th wake-up of a thread send `signum` to this process"""
    wakes = 0

    def count():
        nonlocal wakes
        wakes += 1
        if wakes == wake:
            partial = record.with_name(record.name + ".tmp")
            partial.write_text(repr(time.monotonic()))
            partial.replace(record)
            os.kill(os.getpid(), signum)  # its handler runs right after this call

    after_each_wake(count)


class SlowFrames:
    """An array-like of frames that takes `delay` seconds per slice read, and reports each read"""

    def __init__(self, frames, delay, on_read):
        self.frames = frames
        self.shape = frames.shape
        self.dtype = frames.dtype
        self.delay = delay
        self.on_read = on_read

    def __getitem__(self, index):
        time.sleep(self.delay)
        frames = self.frames[index]
        self.on_read()
        return frames


def main():
    # A shell starts background jobs with SIGINT ignored and Python keeps that;
    # the tests send SIGINT as Ctrl-C in a terminal does, whoever started them.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    marker = pathlib.Path(sys.argv[1])
    args = sys.argv[2:]
    delay = DELAY
    while args[0].startswith("--"):
        option, args = args[0], args[1:]
        if option == "--read-delay":
            delay, args = float(args[0]), args[1:]
        elif option == "--slow-wakes":
            after_each_wake(functools.partial(time.sleep, float(args[0])))
            args = args[1:]
        else:  # --signal-at-wake
            signal_at_wake(int(args[0]), signal.Signals[args[1]],
                           marker.with_suffix(".signalled"))
            args = args[2:]
    mode, args = args[0], args[1:]
    reads = []

    def count_read():
        reads.append(None)
        if len(reads) == 3:
            pids = [os.getpid()] + [p.pid for p in multiprocessing.active_children()]
            marker.with_suffix(".tmp").write_text(" ".join(map(str, pids)))
            marker.with_suffix(".tmp").replace(marker)

    read_into = reader.ImageSource.read_into

    def slow_read_into(self, start, stop, out):
        time.sleep(delay)
        read_into(self, start, stop, out)
        count_read()

    reader.ImageSource.read_into = slow_read_into
    cpu.PROCESS_MIN_WINDOWS = 0
    if mode == "cli":
        from dcbg.cli import main as cli_main
        return cli_main(args)
    import dcbg
    if mode == "rolling_median":
        import numpy as np
        frames = np.random.default_rng(5).integers(0, 256, (int(args[0]), 20, 40), np.uint8)
        dcbg.rolling_median(SlowFrames(frames, delay, count_read), 10, device="cpu")
        return 0
    with dcbg.BackgroundRollMed(args[0], args[1], kernel_size=10, batch_size=20,
                                num_cpus=2, device="cpu") as bg:
        bg.process()
    return 0


if __name__ == "__main__":
    sys.exit(main())
