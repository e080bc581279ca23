"""The demo: a synthetic recording written into a folder, and its background computed

``dcbg demo`` runs it to show a first run without a recording of one's own;
its files stay in the folder for the next steps (``dcbg preview``,
``dcbg info``). A demo run replaces the previous one's files, but only once
its new recording is complete.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
import typing

from .devices import select_device
from .jobs import FileResult, JobSettings, compute_file, default_output
from .settings import DEFAULT_COMPRESSION, DEFAULT_VERIFY

EVENTS = 5000
"""Frames of the demo's recording unless asked otherwise"""

KERNEL_SIZE = 100
"""The demo's kernel_size (dcnum's default), and so its least number of events"""

BATCH_SIZE = 10000

FOLDER = "dcbg-demo"
"""Folder of the demo's files, in the current folder, where the user finds them"""

RECORDING = "demo.rtdc"
"""Name of the demo's recording in its folder"""


class DemoRun(typing.NamedTuple):
    """The demo's files and how computing the background went"""

    source: pathlib.Path
    """the synthetic recording"""
    target: pathlib.Path
    """its background, beside it"""
    result: FileResult


def write_recording(source: pathlib.Path, target: pathlib.Path, events: int):
    """Synthesize `events` frames into `source`, replacing it (and its background `target`)

    The recording is written under a temporary name in the same folder and
    replaces the old one only when complete, so that an interrupted demo
    leaves the previous one's files as they were.
    """
    from .synthetic import write_synthetic_rtdc
    handle, partial = tempfile.mkstemp(prefix=f".{source.name}.", suffix=".partial",
                                       dir=source.parent)
    os.close(handle)
    try:
        write_synthetic_rtdc(partial, events)
        target.unlink(missing_ok=True)  # the background of the recording being replaced
        os.replace(partial, source)
    finally:
        pathlib.Path(partial).unlink(missing_ok=True)


def run_demo(folder=FOLDER, events: int = EVENTS, *, device="auto",
             num_cpus: int | None = None, io_threads: int | None = None,
             verify: str = DEFAULT_VERIFY, progress=None,
             on_synthesize: typing.Callable[[pathlib.Path], None] | None = None) -> DemoRun:
    """Synthesize a recording in `folder` and compute its background beside it

    The device is chosen first, so that an unusable one fails before any
    file is written.

    Parameters
    ----------
    folder: path-like
        Where the recording and its background go (made if missing).
    events: int
        Frames of the recording, at least :data:`KERNEL_SIZE`.
    device: str, dcbg.devices.DeviceRequest or dcbg.devices.DeviceChoice
        As for :func:`dcbg.devices.select_device`.
    num_cpus, io_threads, verify:
        As for :class:`dcbg.Background`.
    progress: callable, optional
        As for :func:`dcbg.jobs.compute_file` (a progress bar).
    on_synthesize: callable, optional
        Called with the recording's path before it is synthesized.

    Returns
    -------
    DemoRun
        The recording, its background and the result of computing it.

    Raises
    ------
    Exception
        What :func:`dcbg.jobs.compute_file` raises when the background
        cannot be computed.
    """
    from .rollmed import BackgroundRollMed
    device = select_device(device)
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / RECORDING
    target = default_output(source)
    settings = JobSettings(BackgroundRollMed.get_ppid_code(),
                           {"kernel_size": KERNEL_SIZE, "batch_size": BATCH_SIZE},
                           DEFAULT_COMPRESSION, device, num_cpus, io_threads, verify)
    if on_synthesize is not None:
        on_synthesize(source)
    write_recording(source, target, events)
    return DemoRun(source, target, compute_file(source, target, settings, progress,
                                                report_final_errors=False))
