"""Safe output: a result appears complete or not at all, and never costs data

:func:`plan_output` decides once, before anything is opened for writing,
what an output path is: a new file, an existing file that gets a new
``image_bg``, or the input itself. It refuses a path that the input reads
its data from through its basins, so a raw recording is never written over.

In every case the background is written to a hidden temporary file beside the
target while it is computed (:class:`StagedOutput`); an
:class:`OutputLock` keeps two runs from writing the same path. A new output
is the temporary file, renamed to its name on success
(:class:`NewOutputFile`). Into an existing file (the input itself, or an
output that exists already, as dcnum's ``Background`` does it) the finished
background is written over the old one in one opening of the file where it
has the old one's stored size, and otherwise the file is rebuilt: copied,
with the new background, into the temporary file, which then takes its name
(:class:`ExistingOutputFile`); every other dataset stays as it is.
Either way, a completed run removes the ``image_bg`` and ``bg_off`` the
output carried (as dcnum does): a ``bg_off`` belongs to the background it
was computed for.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import pathlib
import posixpath
import shutil
import socket
import tempfile
import typing

import h5py

from ..errors import (
    OutputBusyError,
    OutputError,
    OutputWriteError,
    first_line,
    write_failure_reason,
)
from .basins import files_read_by, same_file
from .hdf5 import REPLACED_FEATURES, no_permission_error, open_hdf5

logger = logging.getLogger(__name__)

PARTIAL_GROUP = "dcbg_partial"
"""Group in which earlier dcbg builds made an in-place background (removed at commit)"""

BACKUP_GROUP = "previous_background"
"""Group of the temporary file that keeps an existing file's old background during the swap"""

PARTIAL_SUFFIX = ".dcbg-partial"
"""Suffix of a new output file while it is written (hidden name ``.<output>.…``)"""

LOCK_SUFFIX = ".dcbg-lock"
"""Suffix of the lock file beside an output (hidden name ``.<output>.dcbg-lock``)"""

NAME_MAX = 255
"""Longest file name (in bytes) of the usual file systems, where the system does not say"""

FEATURE_GROUPS = ("events", "basin_events")
"""Groups of an output file that hold features (its own and internal-basin ones)"""


NEW = "new"
EXISTING = "existing"
INPUT = "input"


@dataclasses.dataclass(frozen=True)
class OutputTarget:
    """Where a background goes, decided once by :func:`plan_output`"""

    path: pathlib.Path
    """the output path as given"""
    kind: str
    """:data:`NEW` (a file is created), :data:`EXISTING` (an existing file other
    than the input gets ``image_bg``) or :data:`INPUT` (the input file itself)"""


def check_output_path(path) -> pathlib.Path:
    """Refuse an output path in a missing folder, that is a folder, or whose name is too long"""
    path = pathlib.Path(path)
    folder = path.resolve().parent
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Output folder {folder} does not exist; create it or choose another path.")
    if len(os.fsencode(path.name)) > name_max(folder):
        raise OutputError(
            f"Output name {path.name[:40]}… is longer than the {name_max(folder)} bytes the "
            f"file system allows; choose a shorter name.")
    if path.is_dir():
        raise OutputError(
            f"Output {path} is a folder; give a file name inside it, e.g. "
            f"{path / 'background.rtdc'}.")
    return path


def name_max(folder: pathlib.Path) -> int:
    """Longest file name (bytes) the file system of `folder` allows"""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return NAME_MAX


def plan_output(output_path, input_path=None) -> OutputTarget:
    """Decide what writing a background to `output_path` means, before anything is opened

    Parameters
    ----------
    output_path: path-like
        Where ``image_bg`` goes.
    input_path: path-like, optional
        The input .rtdc file (None for array input).

    Raises
    ------
    OutputError
        If the path is a folder, its name is too long, an existing file
        there is not HDF5, or it is a file the input reads its data from
        through its basins (writing it would destroy the input's data).
    InputFileError
        If an existing file there (the input included) may not be written.
    FileNotFoundError
        If the output's folder does not exist.
    """
    path = check_output_path(output_path)
    if input_path is not None and same_file(path, input_path):
        check_writable(path)
        return OutputTarget(path, INPUT)
    if input_path is not None and path.exists():
        for source in files_read_by(pathlib.Path(input_path)):
            if same_file(path, source):
                raise OutputError(
                    f"Output {path} is {'the' if source == path else 'the same file as'} "
                    f"{source}, which the input {input_path} reads its data from through "
                    f"its basins, so writing it would destroy that data; choose another "
                    f"output path.")
    if path.exists():
        if not h5py.is_hdf5(path):
            raise OutputError(
                f"Output {path} exists and is not an HDF5 file, so dcbg cannot add image_bg "
                f"to it; remove it or choose another output path.")
        check_writable(path)
        return OutputTarget(path, EXISTING)
    return OutputTarget(path, NEW)


def check_writable(path: pathlib.Path):
    """Refuse an existing file this user may not write, before any computing

    The file is opened for writing only when the background is complete.
    """
    if not os.access(path, os.W_OK):
        raise no_permission_error(path, "a")


def check_existing_output(path: pathlib.Path, event_count: int):
    """Refuse an existing output whose events are not as many as the input's"""
    with open_hdf5(path, "r") as h5:
        events = h5.get("events")
        lengths = {name: obj.shape[0] for name, obj in (events or {}).items()
                   if isinstance(obj, h5py.Dataset) and obj.shape}
    other = next(((name, n) for name, n in sorted(lengths.items()) if n != event_count), None)
    if other is not None:
        raise OutputError(
            f"Output {path} exists with {other[1]} events (events/{other[0]}), but the input "
            f"has {event_count}, so a background of the input does not belong there; choose "
            f"another output path.")


def hidden_name(name: str, suffix: str, folder: pathlib.Path) -> str:
    """``.<name><suffix>``, shortened with a digest of `name` where it would not fit

    The name of a lock or temporary file must fit wherever the output's own
    name fits; the digest keeps two long names that share a beginning apart.
    """
    full = f".{name}{suffix}"
    limit = name_max(folder)
    if len(os.fsencode(full)) <= limit:
        return full
    digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:12]
    keep = limit - len(os.fsencode(f".~{digest}{suffix}"))
    stem = os.fsencode(name)[:keep].decode("utf-8", "ignore")
    return f".{stem}~{digest}{suffix}"


def permission_error(folder: pathlib.Path) -> OutputError:
    """The error for an output folder this user may not write to"""
    return OutputWriteError(
        f"You have no permission to write files in {folder}; choose an output folder you "
        f"can write to, or change its permissions.")


def remove_stale_background(h5: h5py.File, keep: tuple[str, ...] = ()):
    """Delete the ``image_bg`` and ``bg_off`` a file carries (events and basin_events)

    Paths in `keep` (e.g. ``"events/image_bg"``) stay. A link that leads
    nowhere is deleted too, so that the name is free for a new background.
    """
    for group_name, group, feature in list(_background_links(h5)):
        if f"{group_name}/{feature}" not in keep:
            del group[feature]


def _background_links(h5: h5py.Group):
    """(group name, group, feature) of every ``image_bg`` and ``bg_off`` link in `h5`"""
    for group_name in FEATURE_GROUPS:
        group = h5.get(group_name)
        if not isinstance(group, h5py.Group):
            continue
        for feature in REPLACED_FEATURES:
            if group.get(feature, getlink=True) is not None:
                yield group_name, group, feature


def stored_chunks(dataset: h5py.Dataset) -> list:
    """The chunks a dataset has stored: h5py's records with chunk_offset, byte_offset, size"""
    found = []
    try:
        dataset.id.chunk_iter(found.append)
    except (AttributeError, NotImplementedError):  # HDF5 before 1.14 has no H5Dchunk_iter
        found = [dataset.id.get_chunk_info(index)
                 for index in range(dataset.id.get_num_chunks())]
    return found


def chunk_format(dataset: h5py.Dataset) -> tuple:
    """What a dataset's stored chunks hold: its type, shape, chunk shape and filters"""
    plist = dataset.id.get_create_plist()
    filters = []
    for index in range(plist.get_nfilters()):
        code, flags, values, _ = plist.get_filter(index)
        filters.append((code, flags, tuple(values)))
    return (dataset.dtype, dataset.shape, dataset.maxshape, dataset.chunks, tuple(filters),
            plist.get_external_count(), plist.get_layout())


def fits_over(old, new: h5py.Dataset) -> bool:
    """Whether each chunk of dataset `new` can be written over the same chunk of `old`

    `old` must have the same type, shape, chunks and filters, be reached by
    no other link (all of them would see the new data), and store the same
    chunks, each of the same size as `new`'s: then HDF5 writes every new
    chunk where the old one lies and allocates nothing. A re-run with the
    same parameters gives such a background.
    """
    if not isinstance(old, h5py.Dataset) or h5py.h5o.get_info(old.id).rc != 1:
        return False
    if old.chunks is None or chunk_format(old) != chunk_format(new):
        return False
    sizes = {info.chunk_offset: info.size for info in stored_chunks(new)}
    old_sizes = {info.chunk_offset: info.size for info in stored_chunks(old)}
    return sizes == old_sizes


def write_chunks_over(old: h5py.Dataset, new: h5py.Dataset):
    """Write the chunks and attributes of `new` over those of `old` (see :func:`fits_over`)

    The chunks are copied as they are stored, without decoding them.
    """
    for info in stored_chunks(new):
        filter_mask, stored = new.id.read_direct_chunk(info.chunk_offset)
        old.id.write_direct_chunk(info.chunk_offset, stored, filter_mask)
    for name in list(old.attrs):
        del old.attrs[name]
    copy_attributes(new, old)


def copy_attributes(source, destination):
    """Copy the attributes of one HDF5 object to another, each with its stored type"""
    for name in source.attrs:
        destination.attrs.create(name, source.attrs[name], dtype=source.attrs.get_id(name).dtype)


def copy_background(source: h5py.Group, destination: h5py.Group):
    """Copy the ``image_bg`` and ``bg_off`` of `source`'s feature groups into `destination`

    The feature groups (``events``, ``basin_events``) are mirrored in
    `destination`; a soft or external link is copied as the link. HDF5
    copies a dataset's stored chunks as they are, without decoding them.
    """
    for group_name, group, feature in list(_background_links(source)):
        into = destination.require_group(group_name)
        link = group.get(feature, getlink=True)
        if isinstance(link, h5py.HardLink):
            group.copy(feature, into)
        else:
            into[feature] = link


def stored_backgrounds(h5: h5py.File) -> list[h5py.Dataset]:
    """The ``image_bg`` datasets a file stores in its feature groups (links to elsewhere not)"""
    return [group[feature] for _, group, feature in _background_links(h5)
            if feature == "image_bg"
            and isinstance(group.get(feature, getlink=True), h5py.HardLink)]


def copy_all_but_background(source: h5py.File, destination: h5py.File):
    """Copy a file's objects, links and attributes into another, but not its background

    The ``image_bg`` and ``bg_off`` of the feature groups stay behind, and
    so does the group an earlier dcbg build may have left
    (:data:`PARTIAL_GROUP`). Groups are walked and their datasets copied
    one by one, so that an object several hard links reach, in any groups,
    is copied once and linked again; soft and external links are copied as
    links.
    HDF5 copies each dataset's stored chunks as they are, without decoding
    them, and lays the copies out one after the other: the copy has no
    dead space.
    """
    left_behind = {f"/{group}/{feature}" for group in FEATURE_GROUPS
                   for feature in REPLACED_FEATURES} | {f"/{PARTIAL_GROUP}"}
    copied: dict[h5py.h5o.ObjectID, str] = {}

    def copy_group(group: h5py.Group, into: h5py.Group):
        copied[group.id] = group.name  # before its members: a link inside may lead back
        copy_attributes(group, into)
        for name in group:
            path = posixpath.join(group.name, name)
            link = group.get(name, getlink=True)
            if path in left_behind:
                continue
            if not isinstance(link, h5py.HardLink):
                into[name] = link
                continue
            item = group[name]
            if item.id in copied:
                into[name] = destination[copied[item.id]]
            elif isinstance(item, h5py.Group):  # walked, so that links into it stay links
                copy_group(item, into.require_group(name))
            else:
                group.copy(item, into, name=name)
                copied[item.id] = path

    copy_group(source, destination)


COMPACT_ATTRIBUTE_LIMIT = 60_000
"""Bytes of an attribute's data beyond which a copy into a file of HDF5's default
format may not store it (its object header messages hold at most 64 KiB)"""


def copies_unfaithfully(h5: h5py.File) -> bool:
    """Whether a copy of the file's objects into another file would change or fail

    A reference (an object's or a region's address in its own file, as
    dimension scales store) becomes a null reference in the copy, or points
    to whatever lies at that address there. An attribute of more than
    :data:`COMPACT_ATTRIBUTE_LIMIT` bytes, which a file written in a newer
    format can hold, does not fit an object header of the default format.
    """
    def unfaithful(obj) -> bool:
        attributes = [obj.attrs.get_id(name) for name in obj.attrs]
        types = [attribute.get_type() for attribute in attributes]
        if isinstance(obj, h5py.Dataset):
            types.append(obj.id.get_type())
        return (any(kind.detect_class(h5py.h5t.REFERENCE) for kind in types)
                or any(stored_bytes(attribute) > COMPACT_ATTRIBUTE_LIMIT
                       for attribute in attributes))

    return unfaithful(h5) or h5.visititems(
        lambda _, obj: True if unfaithful(obj) else None) is True


def stored_bytes(attribute: h5py.h5a.AttrID) -> int:
    """The bytes of an attribute's data (0 for an empty one, which h5py takes for an error)"""
    try:
        return attribute.get_storage_size()
    except RuntimeError:
        return 0


def sync_folder(folder: pathlib.Path):
    """Put a folder's entries (a rename in it) on disk, where the system allows it"""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Windows opens no folders; the rename is done either way
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename is done either way
    finally:
        os.close(handle)


def can_keep_owner(status: os.stat_result) -> bool:
    """Whether this user can give a new file the owner and group of a file with `status`"""
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        return True
    return status.st_uid == os.geteuid() and status.st_gid in {os.getegid(), *os.getgroups()}


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
        self.lock_path = self.path.with_name(
            hidden_name(self.path.name, LOCK_SUFFIX, self.path.parent))
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
        for partial in self.path.parent.glob(f"{partial_prefix(self.path)}*{PARTIAL_SUFFIX}"):
            partial.unlink(missing_ok=True)
        self.lock_path.unlink(missing_ok=True)
        return True

    def release(self):
        """Remove the lock file"""
        self.lock_path.unlink(missing_ok=True)


def partial_prefix(path: pathlib.Path) -> str:
    """Name prefix of the temporary files of an output (8 random characters follow)"""
    reserve = "." + "x" * 8 + PARTIAL_SUFFIX  # what mkstemp and the suffix add
    hidden = hidden_name(path.name, reserve, path.parent)
    return hidden[:-len(reserve)] + "."


class StagedOutput:
    """A hidden temporary HDF5 file beside an output path, written under the output's lock

    The background is written here while it is computed; the output path
    itself is not written before the commit of a subclass:
    :class:`NewOutputFile` renames the temporary file to the output's name,
    :class:`ExistingOutputFile` copies its background into the existing file.

    Parameters
    ----------
    path: path-like
        The final output path. While the temporary file exists, an
        :class:`OutputLock` keeps other runs from writing the same path.
    libver: str, optional
        h5py's ``libver`` (HDF5 format bounds) of the temporary file.

    Attributes
    ----------
    h5: h5py.File
        The temporary file.
    temp_path: pathlib.Path
        Its path.
    bg_group: h5py.Group
        Where ``image_bg`` is written (``events`` of the temporary file).
    """

    def __init__(self, path, libver: str | None = None):
        self.path = pathlib.Path(path)
        self.lock = OutputLock(self.path)
        try:
            handle, name = tempfile.mkstemp(prefix=partial_prefix(self.path),
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
        self._finished = False
        try:
            # mkstemp creates owner-only files; an output is an ordinary data file
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.temp_path, 0o666 & ~umask)
            self.h5 = h5py.File(self.temp_path, "w", libver=libver)
            self.bg_group = self.h5.require_group("events")
        except BaseException:
            self.temp_path.unlink(missing_ok=True)
            self.lock.release()
            raise

    def abort(self):
        """Close and delete the temporary file and release the lock (once committed: nothing)"""
        if not self._finished:
            self._finish()

    def _finish(self, keep_temporary: bool = False):
        self._finished = True
        try:
            if self.h5.id.valid:
                self.h5.close()
        except (OSError, RuntimeError):
            pass  # the file is deleted next; its last metadata do not matter
        finally:
            if not keep_temporary:
                self.temp_path.unlink(missing_ok=True)
            self.lock.release()


class NewOutputFile(StagedOutput):
    """An output .rtdc written under a temporary name and renamed on success

    Parameters
    ----------
    path: path-like
        The final output path; an existing file there is replaced only when
        the new one is complete.
    """

    def __init__(self, path):
        super().__init__(path, libver="latest")

    def commit(self, log: typing.Callable[[h5py.File], object] | None = None):
        """Close the file and move it to its final name

        `log` is called with the file first, to add the run's log.
        """
        try:
            if log is not None:
                log(self.h5)
            self.h5.close()  # HDF5 writes its last metadata here
        except (OSError, RuntimeError) as error:  # h5py raises both for failed writes
            self.abort()
            raise OutputWriteError(
                f"Finishing {self.path} failed ({write_failure_reason(error)}); free space "
                f"or choose another output path (the unfinished file was removed).") from error
        os.replace(self.temp_path, self.path)
        self._finish()


class ExistingOutputFile(StagedOutput):
    """An existing HDF5 file (the input itself, or an earlier output) that gets a new image_bg

    As dcnum's ``Background`` does, every other dataset, attribute, log and
    basin of the file stays; only ``image_bg`` and ``bg_off`` are replaced
    (see :func:`remove_stale_background`). The file is not opened while the
    background is computed (so the input may be this file, open read-only):
    the background is built in the temporary file and copied in by
    :meth:`commit`, all or nothing.

    Parameters
    ----------
    path: path-like
        The existing HDF5 file.
    """

    def __init__(self, path):
        # HDF5's default format bounds, the ones an opened file gets: the
        # copied dataset is stored as one created in the file would be.
        super().__init__(path)

    def commit(self, log: typing.Callable[[h5py.File], object] | None = None):
        """Replace the file's background by the finished one, add the run's log, close both files

        Where the file stores no background yet, or one whose every chunk
        has the size of the new one's (a re-run with the same parameters),
        the new background goes in within one opening of the file: the old
        ``bg_off`` is deleted, the new chunks are written over the old ones
        (:func:`write_chunks_over`) or the new dataset is added. The old
        datasets are first copied into the temporary file, and put back if
        this fails. Otherwise (a re-run with other parameters, or over a
        background another program wrote) HDF5 would leave the old
        background's space dead, or the new one would not fit in it: the
        file is rebuilt instead, every other object copied into the
        temporary file beside the new background, which then replaces the
        file (:meth:`_commit_rebuilt`). Either way a re-run leaves the file
        no larger than a fresh run does, and the stored chunks are copied as
        they are.

        `log` is called with the file once the new background is in it, so
        that the run's log describes a background the file holds.

        Raises
        ------
        OutputWriteError
            If the swap fails (a full disk, say). The file then holds its
            previous ``image_bg`` and ``bg_off`` again, or, should putting
            them back fail too, the message names the file that keeps them.
        """
        try:
            rebuild = self._rebuilds()
        except BaseException:
            self.abort()
            raise
        if rebuild:
            self._commit_rebuilt(log)
            return
        try:
            target = open_hdf5(self.path, "a")
        except BaseException:
            self.abort()
            raise
        try:
            copy_background(target, self.h5.create_group(BACKUP_GROUP))
            self.h5.flush()
        except BaseException as error:
            with contextlib.suppress(OSError, RuntimeError):
                target.close()  # unchanged so far
            self.abort()
            if isinstance(error, (OSError, RuntimeError)):  # h5py raises both for writes
                raise self._failure(error) from error
            raise
        logs = target.get("logs")
        logs_before = set(logs) if isinstance(logs, h5py.Group) else None
        try:
            if PARTIAL_GROUP in target:  # dead space that earlier dcbg builds left
                del target[PARTIAL_GROUP]
            self._swap(target)
            if log is not None:
                log(target)
            target.close()  # HDF5 writes the file's last metadata here
        except BaseException as error:
            restored = self._restore(target, logs_before)
            self._finish(keep_temporary=not restored)
            if not restored:
                raise OutputWriteError(
                    f"Finishing {self.path} failed ({write_failure_reason(error)}) and its "
                    f"previous image_bg could not be put back; it is kept in "
                    f"{self.temp_path} (group {BACKUP_GROUP}), so copy it back from there "
                    f"or run again once the disk is fine.") from error
            if isinstance(error, (OSError, RuntimeError)):
                raise self._failure(error) from error
            raise
        self._finish()

    def _rebuilds(self) -> bool:
        """Whether the new background replaces a stored one that it cannot be written over

        A file that other names reach (a symbolic or a second hard link) is
        never rebuilt: replacing it would part it from those names. Nor is
        a file that a copy would change (:func:`copies_unfaithfully`), nor
        one whose owner and group this user could not give the copy
        (another user's file, open to this one's group).
        """
        status = self.path.stat()
        if self.path.is_symlink() or status.st_nlink > 1 or not can_keep_owner(status):
            return False
        with open_hdf5(self.path, "r") as target:
            stored = stored_backgrounds(target)
            return bool(stored) and not (
                len(stored) == 1 and stored[0].name == "/events/image_bg"
                and fits_over(stored[0], self.bg_group["image_bg"])
            ) and not copies_unfaithfully(target)

    def _commit_rebuilt(self, log: typing.Callable[[h5py.File], object] | None):
        """Copy the rest of the file into the temporary file and give that the file's name"""
        try:
            with open_hdf5(self.path, "r") as target:
                copy_all_but_background(target, self.h5)
            if log is not None:
                log(self.h5)
            self.h5.close()  # HDF5 writes its last metadata here
            shutil.copymode(self.path, self.temp_path)
            status = self.path.stat()
            if hasattr(os, "chown"):
                os.chown(self.temp_path, status.st_uid, status.st_gid)
            # The copy replaces the file's data (in place, the recording's
            # images): on disk before it takes the name, so that a power
            # cut leaves one of the two whole.
            with open(self.temp_path, "rb") as copy:
                os.fsync(copy.fileno())
        except BaseException as error:
            self.abort()
            if isinstance(error, (OSError, RuntimeError)):  # h5py raises both for writes
                raise self._failure(error) from error
            raise
        os.replace(self.temp_path, self.path)
        sync_folder(self.path.parent)
        self._finish()

    def _swap(self, target: h5py.File):
        """Put the new background in the place of the old one (whose copy is saved)"""
        new = self.bg_group["image_bg"]
        events = target.require_group("events")
        old = events.get("image_bg") if isinstance(
            events.get("image_bg", getlink=True), h5py.HardLink) else None
        if old is not None and fits_over(old, new):
            remove_stale_background(target, keep=("events/image_bg",))
            write_chunks_over(old, new)
        else:
            del old  # HDF5 frees a deleted dataset's space only once nothing holds it open
            remove_stale_background(target)
            events.copy(new, events, name="image_bg")

    def _failure(self, error: BaseException) -> OutputWriteError:
        """The error for a failed commit after which the file is as it was"""
        return OutputWriteError(
            f"Finishing {self.path} failed ({write_failure_reason(error)}); free space "
            f"and run again (the file keeps its previous image_bg).")

    def _restore(self, target: h5py.File, logs_before: set[str] | None) -> bool:
        """Put the saved background back after a failed swap; whether that worked"""
        try:
            if not target.id.valid:
                target = open_hdf5(self.path, "a")
            with target:
                remove_stale_background(target)  # what arrived of the new one
                copy_background(self.h5[BACKUP_GROUP], target)
                if logs_before is None and "logs" in target:
                    del target["logs"]
                elif logs_before is not None:
                    for name in set(target["logs"]) - logs_before:
                        del target["logs"][name]
            return True
        except (OSError, RuntimeError) as error:
            logger.error("Could not put the previous background of %s back: %s", self.path,
                         first_line(error))
            return False
