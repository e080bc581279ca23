"""RT-DC file I/O: read ``events/image`` in batches, write ``events/image_bg``

Input images come from the file itself or through its "file" basins (dclab's
and dcnum's basin definitions), compressed with any hdf5plugin filter.
Output goes either to a new file, written under a temporary name beside the
target and renamed on success, or into an existing file, where the new
background is built under a private group and only swapped in once complete.
No other dataset of the input is ever modified.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import socket
import tempfile
import uuid

import h5py
import hdf5plugin
import numpy as np

from .errors import (
    InputDataError,
    InputFileError,
    NoImageDataError,
    OutputBusyError,
    OutputWriteError,
    first_line,
    is_disk_full,
)
from .ppid import DCNUM_PPID_GENERATION

logger = logging.getLogger(__name__)

PARTIAL_GROUP = "dcbg_partial"
"""Group that holds an unfinished in-place background until it is complete"""

PARTIAL_SUFFIX = ".dcbg-partial"
"""Suffix of a new output file while it is written (hidden name ``.<output>.…``)"""

CHUNK_BYTES = 1024**2
"""Target size of one HDF5 chunk of image_bg (dcnum's choice)"""

READ_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError, UnicodeDecodeError)
"""What h5py raises for files whose structure or data are damaged"""


def _as_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def measurement_identifier(h5: h5py.File) -> str | None:
    """The identifier dclab and dcnum use to verify a basin belongs to a file"""
    identifier = h5.attrs.get("experiment:run identifier")
    if identifier:
        return _as_text(identifier)
    parts = [h5.attrs.get(key) for key in
             ("experiment:time", "experiment:date", "setup:identifier")]
    if all(parts):
        digest = hashlib.md5("_".join(_as_text(p) for p in parts).encode("utf-8"))
        return str(uuid.UUID(hex=digest.hexdigest()))
    return None


def read_basin_definitions(h5: h5py.File) -> list[dict]:
    """All basin definitions stored in the ``basins`` group of a file"""
    basins = []
    for key in sorted(h5.get("basins", {})):
        lines = [_as_text(line) for line in h5["basins"][key][:]]
        try:
            basins.append(json.loads("\n".join(lines)))
        except json.JSONDecodeError:
            logger.warning("Ignoring unreadable basin definition '%s' in %s", key, h5.filename)
    return basins


def basin_candidates(definition: dict, folder: pathlib.Path) -> list[pathlib.Path]:
    """The paths a basin may be at: absolute ones as they are, relative ones in `folder`"""
    candidates = []
    for entry in definition.get("paths", []):
        path = pathlib.Path(entry)
        candidates.append(path if path.is_absolute() else folder / path)
    return candidates


class RTDCInput:
    """An open .rtdc file and the dataset holding its images

    Parameters
    ----------
    path: path-like
        The .rtdc file.
    mode: str
        "r" to read only, "a" when the background is written into it.

    Attributes
    ----------
    h5: h5py.File
        The file itself.
    image: h5py.Dataset
        ``events/image``, from the file or from a basin file.
    image_path: pathlib.Path
        The file that holds `image`.
    """

    def __init__(self, path, mode: str = "r"):
        self.path = pathlib.Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"Input file {self.path} does not exist; check the path.")
        if self.path.is_dir():
            raise IsADirectoryError(
                f"Input {self.path} is a folder; give an .rtdc file (or use -r for folders).")
        self.h5 = open_hdf5(self.path, mode)
        self._basin_files: list[h5py.File] = []
        self._missing_basins: list[str] = []
        try:
            self.image, self.image_path = self.find_feature("image")
            shape, dtype = self.image.shape, self.image.dtype
        except NoImageDataError:
            self.close()
            raise
        except READ_ERRORS as error:
            self.close()
            raise damaged_file_error(self.path, error) from error
        except BaseException:
            self.close()
            raise
        if dtype != np.uint8 or len(shape) != 3:
            self.close()
            raise NoImageDataError(
                f"events/image in {self.image_path} is {dtype} with shape {shape}, but "
                f"dcbg needs uint8 frames of shape (N, H, W); convert the images first.")

    def find_feature(self, feature: str) -> tuple[h5py.Dataset, pathlib.Path]:
        """``events/<feature>`` of the file or of a basin, and the file holding it

        Raises
        ------
        NoImageDataError
            If neither the file nor a reachable "file" basin has it.
        """
        self._missing_basins = []
        return self._find(self.h5, self.path, 0, feature)

    def _find(self, h5, path, depth, feature):
        if "events" in h5 and feature in h5["events"]:
            return h5["events"][feature], path
        if depth < 5:
            for definition in read_basin_definitions(h5):
                if (definition.get("type") != "file"
                        or definition.get("format") != "hdf5"
                        or feature not in definition.get("features", [feature])):
                    continue
                if definition.get("mapping") not in (None, "same"):
                    logger.info("Skipping mapped basin '%s' of %s: dcbg needs every event",
                                definition.get("name"), path)
                    continue
                candidates = basin_candidates(definition, path.parent)
                for candidate in candidates:
                    if candidate.exists():
                        basin = open_hdf5(candidate, "r")
                        self._basin_files.append(basin)
                        try:
                            return self._find(basin, candidate, depth + 1, feature)
                        except NoImageDataError:
                            break
                else:
                    self._missing_basins.extend(str(c) for c in candidates[:1])
        if self._missing_basins and depth == 0:
            raise NoImageDataError(
                f"{path} has no events/{feature} of its own and its basin file "
                f"{self._missing_basins[0]} does not exist; put the basin file back at that "
                f"path (or beside {path.name}) and run again.")
        needed = ("dcbg needs the raw frames to compute a background" if feature == "image"
                  else f"compute it first with 'dcbg compute {path.name}'")
        raise NoImageDataError(
            f"{path} has no events/{feature} data, neither in the file nor in a reachable "
            f"file basin; {needed}.")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close the file and every basin file opened for it"""
        for basin in self._basin_files:
            basin.close()
        self._basin_files = []
        if self.h5.id.valid:
            self.h5.close()


def open_hdf5(path: pathlib.Path, mode: str) -> h5py.File:
    """Open an HDF5 file, turning h5py's errors into a sentence for the user"""
    try:
        return h5py.File(path, mode)
    except OSError as error:
        text = str(error)
        if "unable to lock file" in text.lower():
            raise OutputBusyError(
                f"{path} is open for writing in another program (HDF5 file lock); close "
                f"that program or wait until it has finished, then run again.") from error
        if "already open for write" in text:
            raise OutputBusyError(
                f"{path} is marked as open for writing by another program (or by one that "
                f"crashed); if none is running, clear the mark with 'h5clear -s {path}' "
                f"and run again.") from error
        if "signature" in text:
            raise InputFileError(
                f"{path} is not an HDF5 file, so it is no .rtdc recording; check the "
                f"path.") from error
        raise damaged_file_error(path, error) from error


def damaged_file_error(path, cause: BaseException | str, where: str = "") -> InputFileError:
    """The error for an HDF5 file h5py cannot read (truncated or corrupted)"""
    return InputFileError(
        f"{path} cannot be read{where} ({first_line(cause)}); the file is truncated or "
        f"damaged, so copy it again from the instrument or a backup.")


PROBE_SECONDS = 60.0
"""How long reading a file's metadata in the probe may take before it counts as hung"""

_PROBE_CODE = """
import sys, h5py
with h5py.File(sys.argv[1], "r") as h5:
    [h5.attrs[key] for key in h5.attrs]
    for group in ("basins", "logs", "tables"):
        if group in h5:
            h5[group].visititems(lambda name, obj: obj[()] if hasattr(obj, "shape") else None)
    if "events" in h5:
        [(obj.shape, obj.dtype) for obj in h5["events"].values()]
"""


def probe_metadata(path, timeout: float | None = None):
    """Read a file's metadata in a child process before this process touches it

    On some damaged files libhdf5 loops forever or crashes while decoding
    variable-length string attributes (HDFGroup/hdf5#1707, found here by
    fuzzing); no code in the process that calls it can recover. Reading the
    root attributes, basins, logs and tables in a child first turns both into
    a clean error, so a batch job goes on with the next file. A file the
    child cannot read for another reason is left to the normal checks, which
    explain the problem.

    Raises
    ------
    InputFileError
        If reading the metadata hangs for `timeout` seconds (default
        :data:`PROBE_SECONDS`) or crashes.
    """
    import subprocess
    import sys
    timeout = PROBE_SECONDS if timeout is None else timeout
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE_CODE, os.fspath(path)],
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise damaged_file_error(
            path, f"HDF5 hung for {timeout:.0f} s decoding its metadata") from None
    if done.returncode < 0:
        raise damaged_file_error(
            path, f"HDF5 crashed decoding its metadata, signal {-done.returncode}")


class ImageSource:
    """Batch-wise access to an image stack, never loading it whole

    Parameters
    ----------
    data: h5py.Dataset or array-like
        Stack with events along the first axis.
    """

    def __init__(self, data):
        self.data = data
        shape = tuple(data.shape)
        if len(shape) < 2:
            raise InputDataError(
                f"The image stack has shape {shape}; dcbg needs at least two axes "
                f"(events, pixels…).")
        if np.dtype(data.dtype) != np.uint8:
            raise InputDataError(
                f"The image stack is {np.dtype(data.dtype)}; dcbg computes uint8 backgrounds, "
                f"so convert the frames to uint8 first.")
        self.shape = shape
        self.image_shape = shape[1:]
        self.pixels = int(np.prod(self.image_shape))

    def __len__(self):
        return self.shape[0]

    def read_into(self, start: int, stop: int, out: np.ndarray):
        """Fill ``out[:stop-start]`` (flattened frames) with frames start…stop-1"""
        count = stop - start
        target = out[:count].reshape(count, *self.image_shape)
        if isinstance(self.data, h5py.Dataset):
            try:
                self.data.read_direct(target, source_sel=np.s_[start:stop])
            except READ_ERRORS as error:
                raise damaged_file_error(self.data.file.filename, error,
                                         f" at frames {start} to {stop - 1}") from error
        else:
            target[...] = np.asarray(self.data[start:stop])


def compression_kwargs(compression: str | bool | None) -> dict:
    """h5py dataset keywords for a compression setting

    `compression` is True (zstd level 5), False/None/"none", or "zstd-N"
    with N from 1 to 9 (hdf5plugin's Zstandard filter).
    """
    if compression is True:
        compression = "zstd-5"
    if compression in (False, None, "none"):
        return {"fletcher32": True}
    if isinstance(compression, str) and compression.startswith("zstd-"):
        level = compression[5:]
        if level.isdigit() and 1 <= int(level) <= 9:
            return {**hdf5plugin.Zstd(clevel=int(level)), "fletcher32": True}
    raise ValueError(
        f"Unknown compression '{compression}'; use 'zstd-1' to 'zstd-9' or 'none'.")


def chunk_events(image_shape) -> int:
    """Events per chunk so one chunk is about 1 MiB (10 to 1000 events)"""
    return min(1000, max(10, CHUNK_BYTES // int(np.prod(image_shape))))


class ImageBgWriter:
    """Appends frames to a new ``image_bg`` dataset inside an HDF5 group

    Parameters
    ----------
    group: h5py.Group
        Where the dataset named "image_bg" is created.
    image_shape: tuple of int
        Shape of one frame.
    compression: bool or str
        See :func:`compression_kwargs`.
    target: path-like, optional
        The output file as the user named it, for error messages (the group
        may live in a temporary file).
    """

    def __init__(self, group: h5py.Group, image_shape, compression=True, target=None):
        self.image_shape = tuple(image_shape)
        self.target = target if target is not None else group.file.filename
        if "image_bg" in group:
            del group["image_bg"]
        self.dataset = group.create_dataset(
            "image_bg", shape=(0, *self.image_shape), maxshape=(None, *self.image_shape),
            dtype=np.uint8, chunks=(chunk_events(self.image_shape), *self.image_shape),
            **compression_kwargs(compression))
        self.dataset.attrs.create("CLASS", np.bytes_("IMAGE"))
        self.dataset.attrs.create("IMAGE_VERSION", np.bytes_("1.2"))
        self.dataset.attrs.create("IMAGE_SUBCLASS", np.bytes_("IMAGE_GRAYSCALE"))

    @property
    def size(self) -> int:
        """Number of frames written so far"""
        return self.dataset.shape[0]

    def append(self, frames: np.ndarray):
        """Append frames of shape ``(n, *image_shape)``"""
        frames = np.asarray(frames).reshape(-1, *self.image_shape)
        offset = self.size
        self._guard(self.dataset.resize, offset + len(frames), axis=0)
        self._guard(self.dataset.__setitem__, slice(offset, None), frames)

    def _guard(self, function, *args, **kwargs):
        """Call an h5py writing function, translating write errors for the user"""
        try:
            function(*args, **kwargs)
        except OSError as error:
            if is_disk_full(error):
                raise OutputWriteError(
                    f"The disk is full while writing {self.target}; free space there or "
                    f"choose an output on another disk (the unfinished background is "
                    f"discarded).") from error
            raise OutputWriteError(
                f"Writing {self.target} failed ({first_line(error)}); check the disk and "
                f"run again (the unfinished background is discarded).") from error

    def preallocate(self, count: int):
        """Grow the dataset to `count` frames, to be filled with :meth:`write_at`"""
        self._guard(self.dataset.resize, count, axis=0)

    def write_at(self, offset: int, frames: np.ndarray):
        """Write frames at frame `offset` of the preallocated dataset"""
        frames = np.asarray(frames).reshape(-1, *self.image_shape)
        self._guard(self.dataset.__setitem__, slice(offset, offset + len(frames)), frames)

    def append_repeated(self, frame: np.ndarray, count: int):
        """Append `count` copies of one frame, one chunk-sized block at a time"""
        block = np.broadcast_to(np.asarray(frame).reshape(self.image_shape),
                                (min(count, 10 * self.dataset.chunks[0]), *self.image_shape))
        while count > 0:
            part = block[:count]
            self.append(part)
            count -= len(part)

    def set_ppid(self, ppid: str):
        """Store the background PPID and dcnum's pipeline generation"""
        self.dataset.attrs["dcnum ppid background"] = ppid
        self.dataset.attrs["dcnum ppid generation"] = DCNUM_PPID_GENERATION


def copy_metadata(src: h5py.File, dst: h5py.File):
    """Copy root attributes, logs and tables from `src` to `dst`

    Raises
    ------
    InputFileError
        If the metadata of `src` are damaged.
    """
    try:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for topic in ("logs", "tables"):
            if topic in src:
                src.copy(src[topic], dst, name=topic)
    except READ_ERRORS as error:
        raise damaged_file_error(src.filename, error, " (its metadata)") from error


def write_file_basin(dst: h5py.File, rtdc_in: RTDCInput, output_path: pathlib.Path):
    """Store a "file" basin in `dst` that points to the input file

    The basin lists the absolute path and the path relative to the output,
    so the pair keeps working when a folder is moved as a whole.
    """
    source = rtdc_in.path.resolve()
    paths = [str(source)]
    try:
        paths.append(os.path.relpath(source, output_path.resolve().parent))
    except ValueError:  # another drive on Windows
        pass
    definition = {
        "description": "Input of the dcbg background computation",
        "name": source.name,
        "format": "hdf5",
        "paths": paths,
        "type": "file",
        "identifier": measurement_identifier(rtdc_in.h5),
    }
    text = json.dumps(definition, indent=2)
    lines = text.split("\n")
    key = hashlib.md5(text.encode("utf-8")).hexdigest()
    basins = dst.require_group("basins")
    if key not in basins:
        basins.create_dataset(key, data=np.array(lines, dtype=f"S{max(map(len, lines))}"))


def check_output_folder(path: pathlib.Path):
    """Raise FileNotFoundError unless the folder of an output path exists"""
    folder = pathlib.Path(path).resolve().parent
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Output folder {folder} does not exist; create it or choose another path.")


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
    """

    def __init__(self, path):
        self.path = pathlib.Path(path)
        check_output_folder(self.path)
        self.lock = OutputLock(self.path)
        try:
            handle, name = tempfile.mkstemp(prefix=f".{self.path.name}.",
                                            suffix=PARTIAL_SUFFIX, dir=self.path.parent)
        except OSError as error:
            self.lock.release()
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

    The new background is built in a private group and swapped in (old
    ``events/image_bg`` unlinked, new one moved) only when it is complete,
    so an interrupted run leaves every original dataset intact.

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
        """Replace events/image_bg by the finished dataset"""
        events = self.h5.require_group("events")
        if "image_bg" in events:
            del events["image_bg"]
        self.h5.move(f"{PARTIAL_GROUP}/image_bg", "events/image_bg")
        del self.h5[PARTIAL_GROUP]
        self.h5.flush()

    def abort(self):
        """Drop the unfinished background"""
        if self.h5.id.valid and PARTIAL_GROUP in self.h5:
            del self.h5[PARTIAL_GROUP]
