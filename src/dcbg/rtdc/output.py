"""Safe output: a result appears complete or not at all, and never costs data

A new output is written to a hidden temporary file beside the target and
renamed over it on success; an :class:`OutputLock` keeps two runs from
writing the same path. In place, the new background is built in a private
group of the input file and swapped in only when complete. Either way, a
completed run removes the ``image_bg`` and ``bg_off`` the output carried
(as dcnum does): a ``bg_off`` belongs to the background it was computed for.
"""
from __future__ import annotations

import errno
import logging
import os
import pathlib
import socket
import tempfile

import h5py

from ..errors import OutputBusyError, OutputError, OutputWriteError, first_line, is_disk_full

logger = logging.getLogger(__name__)

PARTIAL_GROUP = "dcbg_partial"
"""Group that holds an unfinished in-place background until it is complete"""

PARTIAL_SUFFIX = ".dcbg-partial"
"""Suffix of a new output file while it is written (hidden name ``.<output>.…``)"""

STALE_FEATURES = ("image_bg", "bg_off")
"""Features a new background replaces: the old background and its offsets"""

FEATURE_GROUPS = ("events", "basin_events")
"""Groups of an output file that hold features (its own and internal-basin ones)"""


def check_output_path(path) -> pathlib.Path:
    """Refuse an output path whose folder is missing or that is a folder itself"""
    path = pathlib.Path(path)
    if path.is_dir():
        raise OutputError(
            f"Output {path} is a folder; give a file name inside it, e.g. "
            f"{path / 'background.rtdc'}.")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Output folder {folder} does not exist; create it or choose another path.")
    return path


def permission_error(folder: pathlib.Path) -> OutputError:
    """The error for an output folder this user may not write to"""
    return OutputWriteError(
        f"You have no permission to write files in {folder}; choose an output folder you "
        f"can write to, or change its permissions.")


def remove_stale_background(h5: h5py.File):
    """Delete the ``image_bg`` and ``bg_off`` a file carries (events and basin_events)"""
    for group in FEATURE_GROUPS:
        for feature in STALE_FEATURES:
            if group in h5 and feature in h5[group]:
                del h5[group][feature]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class OutputLock:
    """A lock file that lets one run at a time write an output path

    The lock is a file ``.<name>.dcbg-lock`` beside the output, created
    atomically and holding the owner's process id and host name. A lock left
    by a process that no longer runs on this host is taken over.

    Parameters
    ----------
    path: path-like
        The output path to protect.
    """

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.lock_path = self.path.with_name(f".{self.path.name}.dcbg-lock")
        owner = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                handle = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._remove_if_stale():
                    raise OutputBusyError(
                        f"Another dcbg run ({self._owner()}) is writing {self.path}; wait "
                        f"for it to finish or choose another output path.") from None
                continue
            except OSError as error:
                if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise permission_error(self.path.parent) from error
                raise
            with os.fdopen(handle, "w") as lock:
                lock.write(owner)
            return
        raise OutputBusyError(
            f"Could not lock {self.path} for writing; remove {self.lock_path} if no dcbg "
            f"run is using it.")

    def _read_owner(self) -> tuple[int, str]:
        """Process id and host name written in the lock file"""
        pid, _, host = self.lock_path.read_text().partition(" ")
        return int(pid), host

    def _owner(self) -> str:
        try:
            pid, host = self._read_owner()
            return f"process {pid} on {host or 'unknown host'}"
        except (OSError, ValueError):
            return "unknown process"

    def _remove_if_stale(self) -> bool:
        try:
            pid, host = self._read_owner()
        except FileNotFoundError:
            return True  # released meanwhile
        except (OSError, ValueError):
            return False  # being written right now, or not ours to judge
        if host != socket.gethostname() or _process_alive(pid):
            return False
        logger.warning("Removing the stale lock %s of process %d, which no longer runs, "
                       "and its unfinished output", self.lock_path, pid)
        for partial in self.path.parent.glob(f".{self.path.name}.*{PARTIAL_SUFFIX}"):
            partial.unlink(missing_ok=True)
        self.lock_path.unlink(missing_ok=True)
        return True

    def release(self):
        """Remove the lock file"""
        self.lock_path.unlink(missing_ok=True)


class NewOutputFile:
    """An output .rtdc written under a temporary name and renamed on success

    Parameters
    ----------
    path: path-like
        The final output path; an existing file there is replaced only when
        the new one is complete. While the file is written, an
        :class:`OutputLock` keeps other runs from writing the same path.

    Attributes
    ----------
    h5: h5py.File
        The temporary file.
    bg_group: h5py.Group
        Where ``image_bg`` is written (``events`` of the temporary file).
    """

    def __init__(self, path):
        self.path = check_output_path(path)
        self.lock = OutputLock(self.path)
        try:
            handle, name = tempfile.mkstemp(prefix=f".{self.path.name}.",
                                            suffix=PARTIAL_SUFFIX, dir=self.path.parent)
        except OSError as error:
            self.lock.release()
            if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise permission_error(self.path.parent) from error
            raise OutputWriteError(
                f"Cannot create a file in {self.path.parent} ({first_line(error)}); check "
                f"the folder's permissions and free space.") from error
        os.close(handle)
        self.temp_path = pathlib.Path(name)
        try:
            # mkstemp creates owner-only files; an output is an ordinary data file
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.temp_path, 0o666 & ~umask)
            self.h5 = h5py.File(self.temp_path, "w", libver="latest")
            self.bg_group = self.h5.require_group("events")
        except BaseException:
            self.temp_path.unlink(missing_ok=True)
            self.lock.release()
            raise

    def commit(self):
        """Close the file and move it to its final name"""
        try:
            self.h5.close()  # HDF5 writes its last metadata here
        except OSError as error:
            self.abort()
            reason = "the disk is full" if is_disk_full(error) else first_line(error)
            raise OutputWriteError(
                f"Finishing {self.path} failed ({reason}); free space or choose another "
                f"output path (the unfinished file was removed).") from error
        os.replace(self.temp_path, self.path)
        self.lock.release()

    def abort(self):
        """Close and delete the unfinished file"""
        try:
            if self.h5.id.valid:
                self.h5.close()
        except OSError:
            pass  # the file is deleted next; its last metadata do not matter
        finally:
            self.temp_path.unlink(missing_ok=True)
            self.lock.release()


class InPlaceOutput:
    """Write image_bg into an existing file without touching anything else

    The new background is built in a private group and swapped in only when
    it is complete: then the old ``image_bg`` and ``bg_off`` are removed
    (see :func:`remove_stale_background`) and the new dataset moved to
    ``events/image_bg``. An interrupted run leaves every original dataset
    intact.

    Parameters
    ----------
    h5: h5py.File
        The file, opened for writing.
    """

    def __init__(self, h5: h5py.File):
        self.h5 = h5
        if PARTIAL_GROUP in h5:
            del h5[PARTIAL_GROUP]  # leftover of an interrupted run
        self.bg_group = h5.create_group(PARTIAL_GROUP)

    def commit(self):
        """Replace the old background by the finished dataset"""
        remove_stale_background(self.h5)
        self.h5.require_group("events")
        self.h5.move(f"{PARTIAL_GROUP}/image_bg", "events/image_bg")
        del self.h5[PARTIAL_GROUP]
        self.h5.flush()

    def abort(self):
        """Drop the unfinished background"""
        if self.h5.id.valid and PARTIAL_GROUP in self.h5:
            del self.h5[PARTIAL_GROUP]
