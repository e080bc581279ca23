"""Read a file's metadata in a child process before dcbg opens it

On some damaged files libhdf5 loops forever or crashes while decoding
variable-length string attributes (HDFGroup/hdf5#1707, found by fuzzing);
no code in the process that meets them can recover. :func:`probe_metadata`
runs this module as ``python -m dcbg.rtdc.probe FILE`` first, which reads
the root attributes, basins, logs and tables and the shapes of the events,
and turns a hang or a crash into a clean error, so a batch job goes on with
the next file. A file the child cannot read for another reason is left to
the normal checks, which explain the problem.
"""
from __future__ import annotations

import os
import subprocess
import sys

import h5py

from .hdf5 import damaged_file_error

PROBE_SECONDS = 60.0
"""How long reading a file's metadata may take before it counts as hung"""

PROBE_COMMAND = [sys.executable, "-m", "dcbg.rtdc.probe"]
"""The child's command line; the file's path is appended"""


def read_metadata(path):
    """Touch every piece of metadata that libhdf5 decodes when dcbg opens a file"""
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


def probe_metadata(path, timeout: float | None = None):
    """Read a file's metadata in a child process (see the module docstring)

    Raises
    ------
    InputFileError
        If reading the metadata hangs for `timeout` seconds (default
        :data:`PROBE_SECONDS`) or crashes.
    """
    timeout = PROBE_SECONDS if timeout is None else timeout
    try:
        done = subprocess.run([*PROBE_COMMAND, os.fspath(path)], capture_output=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise damaged_file_error(
            path, f"HDF5 hung for {timeout:.0f} s decoding its metadata") from None
    if done.returncode < 0:
        raise damaged_file_error(
            path, f"HDF5 crashed decoding its metadata, signal {-done.returncode}")


if __name__ == "__main__":
    try:
        read_metadata(sys.argv[1])
    except Exception:  # noqa: BLE001 - the parent's own checks explain other problems
        sys.exit(1)
