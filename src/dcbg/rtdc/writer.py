"""Writing: ``events/image_bg`` chunk by chunk, and the metadata of a new output

:class:`ImageBgWriter` creates the dataset at its full size and stores each
chunk as soon as all of its frames have arrived, encoded in a thread pool
(see :mod:`dcbg.rtdc.chunks`); the dataset declares the usual filters,
so h5py, dclab and dcnum read it like any other.
"""
from __future__ import annotations

import concurrent.futures
import threading

import h5py
import hdf5plugin
import numpy as np

from ..errors import OutputWriteError, is_disk_full, write_failure_reason
from ..ppid import DCNUM_PPID_GENERATION
from ..settings import DEFAULT_COMPRESSION, zstd_level
from .chunks import ChunkCodec
from .hdf5 import (
    GENERATION_ATTRIBUTE,
    PPID_ATTRIBUTE,
    READ_ERRORS,
    damaged_file_error,
    set_image_attributes,
)

CHUNK_BYTES = 1024**2
"""Target size of one HDF5 chunk of image_bg (dcnum's choice)"""


def compression_filters(compression: str) -> dict:
    """h5py dataset keywords for a decided compression ("zstd-1" … "zstd-9" or "none")

    Zstandard is hdf5plugin's filter 32015; every chunk also carries a
    Fletcher-32 checksum. The setting is decided before (by
    :func:`dcbg.settings.parse_compression`), not read again here.
    """
    level = zstd_level(compression)
    if level is None:
        return {"fletcher32": True}
    return {**hdf5plugin.Zstd(clevel=level), "fletcher32": True}


def chunk_events(image_shape) -> int:
    """Events per chunk so one chunk is about 1 MiB (10 to 1000 events)"""
    return min(1000, max(10, CHUNK_BYTES // int(np.prod(image_shape))))


def create_image_dataset(group: h5py.Group, name: str, image_shape, count: int,
                         compression: str = DEFAULT_COMPRESSION,
                         chunk_length: int | None = None) -> h5py.Dataset:
    """An empty uint8 image stack of `count` frames with dcbg's chunks and filters

    `compression` is decided already (see :func:`compression_filters`).
    """
    image_shape = tuple(image_shape)
    dataset = group.create_dataset(
        name, shape=(count, *image_shape), maxshape=(None, *image_shape), dtype=np.uint8,
        chunks=(chunk_length or chunk_events(image_shape), *image_shape),
        **compression_filters(compression))
    set_image_attributes(dataset)
    return dataset


class ImageBgWriter:
    """Writes ``image_bg`` into an HDF5 group, chunk by chunk

    The dataset has its final size from the start. Frames arrive through
    :meth:`write_at` (from any thread, in any order); a chunk is encoded and
    stored once all of its frames are there, so memory holds at most the
    chunks that frames are still arriving for.

    Parameters
    ----------
    group: h5py.Group
        Where the dataset named "image_bg" is created (an existing one is
        replaced).
    image_shape: tuple of int
        Shape of one frame.
    count: int
        Number of frames of the dataset.
    compression: str
        As decided: "zstd-1" … "zstd-9" or "none" (see
        :func:`dcbg.settings.parse_compression`).
    target: path-like, optional
        The output file as the user named it, for error messages (the group
        may live in a temporary file).
    pool: concurrent.futures.Executor, optional
        Threads that encode chunks; without one, the caller's thread does.
    """

    def __init__(self, group: h5py.Group, image_shape, count: int,
                 compression: str = DEFAULT_COMPRESSION, target=None,
                 pool: concurrent.futures.Executor | None = None):
        self.image_shape = tuple(image_shape)
        self.count = count
        self.target = target if target is not None else group.file.filename
        self.pool = pool
        if "image_bg" in group:
            del group["image_bg"]
        self.dataset = create_image_dataset(group, "image_bg", self.image_shape, count,
                                            compression)
        self.codec = ChunkCodec.for_dataset(self.dataset)
        self.chunk_length = self.dataset.chunks[0]
        self.pixels = int(np.prod(self.image_shape))
        self.chunk_count = -(-count // self.chunk_length)
        self._partial: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._stored: set[int] = set()
        self._lock = threading.Lock()

    def write_at(self, offset: int, frames: np.ndarray):
        """Write frames at frame `offset`; returns once the caller may reuse `frames`"""
        frames = np.asarray(frames).reshape(-1, self.pixels)
        stop = offset + len(frames)
        if offset < 0 or stop > self.count:
            raise ValueError(f"frames {offset} to {stop - 1} lie outside image_bg, which has "
                             f"{self.count} frames")
        ready = []
        for chunk in self._chunks(offset, stop):
            first, last = self._rows(chunk)
            lo, hi = max(offset, first), min(stop, last)
            part = frames[lo - offset:hi - offset]
            if hi - lo == self.chunk_length:
                ready.append((chunk, part))
                continue
            with self._lock:
                buffer, filled = self._partial.get(chunk) or (
                    np.zeros((self.chunk_length, self.pixels), np.uint8),
                    np.zeros(self.chunk_length, bool))
                buffer[lo - first:hi - first] = part
                filled[lo - first:hi - first] = True
                if filled[:last - first].all():
                    self._partial.pop(chunk, None)
                    ready.append((chunk, buffer))
                else:
                    self._partial[chunk] = (buffer, filled)
        self._store(ready)

    def write_repeated(self, offset: int, frame: np.ndarray, count: int):
        """Write `count` copies of one frame from frame `offset` on

        Whole chunks of copies are identical, so one is encoded and stored
        as often as needed.
        """
        if count <= 0:
            return
        block = np.ascontiguousarray(np.broadcast_to(
            np.asarray(frame).reshape(1, self.pixels), (self.chunk_length, self.pixels)))
        stop = offset + count
        encoded = None
        for chunk in self._chunks(offset, stop):
            first, last = self._rows(chunk)
            lo, hi = max(offset, first), min(stop, last)
            if hi - lo == self.chunk_length:
                if encoded is None:
                    encoded = self.codec.encode(block)
                self._write_chunk(chunk, encoded)
            else:
                self.write_at(lo, block[:hi - lo])

    def check_complete(self):
        """Check that every frame was written

        Raises
        ------
        RuntimeError
            If frames are missing (a bug in the caller, never the data).
        """
        with self._lock:
            missing = sorted(set(range(self.chunk_count)) - self._stored)
        if missing:
            first, _ = self._rows(missing[0])
            raise RuntimeError(f"image_bg of {self.target} misses frames from {first} on; "
                               f"this is a bug in dcbg, please report it.")

    def set_ppid(self, ppid: str):
        """Store the background PPID and dcnum's pipeline generation"""
        self.dataset.attrs[PPID_ATTRIBUTE] = ppid
        self.dataset.attrs[GENERATION_ATTRIBUTE] = DCNUM_PPID_GENERATION

    def _chunks(self, start: int, stop: int) -> range:
        return range(start // self.chunk_length, (stop - 1) // self.chunk_length + 1)

    def _rows(self, chunk: int) -> tuple[int, int]:
        first = chunk * self.chunk_length
        return first, min(first + self.chunk_length, self.count)

    def _store(self, ready: list[tuple[int, np.ndarray]]):
        if self.pool is None:
            for chunk, data in ready:
                self._write_chunk(chunk, self.codec.encode(data))
            return
        futures = [(chunk, self.pool.submit(self.codec.encode, data)) for chunk, data in ready]
        try:
            for chunk, future in futures:  # in chunk order, each as soon as it is encoded
                self._write_chunk(chunk, future.result())
        finally:
            concurrent.futures.wait([future for _, future in futures])

    def _write_chunk(self, chunk: int, stored: bytes):
        offset = (chunk * self.chunk_length,) + (0,) * len(self.image_shape)
        try:
            self._write_direct(offset, stored)
        except (OSError, RuntimeError) as error:  # h5py raises both for failed writes
            if is_disk_full(error):
                raise OutputWriteError(
                    f"The disk is full while writing {self.target}; free space there or "
                    f"choose an output on another disk (the unfinished background is "
                    f"discarded).") from error
            raise OutputWriteError(
                f"Writing {self.target} failed ({write_failure_reason(error)}); check the "
                f"disk and run again (the unfinished background is discarded).") from error
        with self._lock:
            self._stored.add(chunk)

    def _write_direct(self, offset: tuple, stored: bytes):
        # The one call that hands bytes to HDF5 (and so to the disk).
        self.dataset.id.write_direct_chunk(offset, stored)


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
