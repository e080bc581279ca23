"""Read a file's metadata in a child process before dcbg opens it

On some damaged files libhdf5 loops forever or crashes while decoding
variable-length string attributes (found by fuzzing);
no code in the process that meets them can recover. :class:`MetadataProbe`
runs this module as ``python -m dcbg.rtdc.metadata_check FILE`` in a child, which
reads the root attributes, basins, logs and tables and the shapes of the
events, and turns a hang or a crash into a clean error, so a batch job goes
on with the next file. A file the child cannot read for another reason is
left to the normal checks, which explain the problem.

The child is started as soon as the file is known and joined just before
the file is opened, so that it runs while the parent loads its modules
(``dcbg compute`` starts it right after reading its arguments). This module
imports h5py only in the child, so the parent starts it at once.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

PROBE_SECONDS = 60.0
"""How long reading a file's metadata may take before it counts as hung"""

PROBE_COMMAND = [sys.executable, "-m", "dcbg.rtdc.metadata_check"]
"""The child's command line; the file's path is appended"""


def read_metadata(path):
    """Touch every piece of metadata that libhdf5 decodes when dcbg opens a file"""
    import h5py

    with h5py.File(path, "r") as h5:
        for key in h5.attrs:
            h5.attrs[key]
        for group in ("basins", "logs", "tables"):
            if group in h5:
                h5[group].visititems(lambda name, obj: obj[()] if hasattr(obj, "shape")
                                     else None)
        if "events" in h5:
            for obj in h5["events"].values():
                getattr(obj, "shape", None)


class MetadataProbe:
    """The child that reads a file's metadata, started now and joined before the file opens

    Parameters
    ----------
    path: path-like
        The file.
    timeout: float, optional
        Seconds from the start after which the child counts as hung
        (default :data:`PROBE_SECONDS`).
    """

    def __init__(self, path, timeout: float | None = None):
        self.path = path
        self.timeout = PROBE_SECONDS if timeout is None else timeout
        self._started = time.monotonic()
        self._child = subprocess.Popen([*PROBE_COMMAND, os.fspath(path)],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)

    def join(self):
        """Wait until the child is done (at most what is left of the timeout)

        Raises
        ------
        InputFileError
            If reading the metadata hung for the timeout or crashed.
        """
        left = self.timeout - (time.monotonic() - self._started)
        try:
            code = self._child.wait(max(0.0, left))
        except subprocess.TimeoutExpired:
            self.stop()
            from .hdf5 import damaged_file_error
            raise damaged_file_error(
                self.path, f"HDF5 hung for {self.timeout:.0f} s decoding its metadata") from None
        if code < 0:
            from .hdf5 import damaged_file_error
            raise damaged_file_error(
                self.path, f"HDF5 crashed decoding its metadata, signal {-code}")

    def stop(self):
        """End the child if it still runs (a command that fails before it needs the file)"""
        if self._child.poll() is None:
            self._child.kill()
        self._child.wait()


def probe_metadata(path, timeout: float | None = None):
    """Read a file's metadata in a child process and wait for it (see :class:`MetadataProbe`)

    Raises
    ------
    InputFileError
        If reading the metadata hangs for `timeout` seconds (default
        :data:`PROBE_SECONDS`) or crashes.
    """
    MetadataProbe(path, timeout).join()


if __name__ == "__main__":
    try:
        read_metadata(sys.argv[1])
    except Exception:  # noqa: BLE001 - the parent's own checks explain other problems
        sys.exit(1)
