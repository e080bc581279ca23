"""What the commands print: lines on stdout whose reader may go, a progress bar, a
status line"""
from __future__ import annotations

import os
import shutil
import sys
import threading

from ..background import Background


def emit(line: str = ""):
    """Print a line to stdout, and go on quietly once its reader has gone

    When the program reading dcbg's output exits early (``dcbg info FILE |
    head -1``), writing raises BrokenPipeError; the work is not the
    printing, so it goes on (a folder run computes every file) and later
    lines are dropped.
    """
    try:
        print(line, flush=True)
    except BrokenPipeError:
        silence_stdout()


def silence_stdout():
    """Send the rest of stdout to the null device (its reader has gone)

    Python flushes stdout at exit; without this, the lines still buffered
    would raise BrokenPipeError once more there.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass  # a stdout without a file descriptor (an embedding program's) stays as it is


def flush_stdout():
    """Flush stdout at the end of a command; a reader that has gone is no error"""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
    except (AttributeError, OSError, ValueError):
        pass


class ProgressBar:
    """tqdm progress bar fed from a polling thread (terminal only)"""

    def __init__(self, background: Background, label: str):
        self.background = background
        self.enabled = sys.stderr.isatty()
        self.stop = threading.Event()
        self.label = label
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from tqdm import tqdm
        total = self.background.image_count
        with tqdm(total=total, desc=self.label, unit="ev", file=sys.stderr,
                  leave=False) as bar:
            while not self.stop.wait(0.2):
                bar.n = int(self.background.get_progress() * total)
                bar.refresh()

    def __enter__(self):
        if self.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.enabled:
            self.thread.join()


def progress_bar(background: Background) -> ProgressBar:
    """A progress bar for one file, labelled with the input's name"""
    label = background.hdin.path.name if background.hdin is not None else "stack"
    return ProgressBar(background, label)


class StatusLine:
    """What runs now, in one line on a terminal's stderr, erased before the next output

    Off where stderr is no terminal (a log file, a pipe), which would keep
    every state; there the lines of the output say how far a run has got.
    """

    def __init__(self):
        self.stream = sys.stderr
        self.enabled = self.stream.isatty()
        self.shown = False

    def show(self, text: str):
        """Replace the line by `text`"""
        if self.enabled:
            width = max(10, shutil.get_terminal_size().columns - 1)  # no wrap, \r reaches it
            self.stream.write(f"\r\x1b[K{f'{text} …'[:width]}")
            self.stream.flush()
            self.shown = True

    def clear(self):
        """Erase the line"""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False
