"""Writing: ``events/image_bg`` chunk by chunk, the array functions' `out`, and metadata

:class:`ImageBgWriter` creates the dataset at its full size and stores each
chunk as soon as all of its frames have arrived, encoded in a thread pool
(see :mod:`dcbg.rtdc.chunks`); the dataset declares the usual filters,
so h5py, dclab and dcnum read it like any other. The array functions write
their `out` with the same pieces (:func:`stack_writer`): an existing h5py
dataset chunk by chunk where its layout allows (:class:`ChunkedStackWriter`),
anything else by slicing (:class:`StackWriter`). The copies of the last
window's median that end dcnum's background are written by
:meth:`StackWriter.write_repeated`, for files and arrays in host memory alike.
"""
from __future__ import annotations

import concurrent.futures
import threading

import h5py
import hdf5plugin
import numpy as np

from ..errors import OutputWriteError, is_disk_full, write_failure_reason
from ..settings import DEFAULT_COMPRESSION, zstd_level
from .chunks import ChunkCodec
from .hdf5 import (
    DCNUM_PPID_GENERATION,
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


REPEAT_BLOCK_BYTES = 64 << 20
"""Most bytes of the block of copies :meth:`StackWriter.write_repeated` makes of a frame"""


class StackWriter:
    """Writes frames into an existing stack by slicing it: NumPy arrays, memory maps, h5py

    The array functions' way to their `out` where dcbg does not encode the
    chunks itself (see :func:`stack_writer`); subclasses store chunks.
    Frames arrive through :meth:`write_at` (from any thread, in any order,
    never overlapping), the last background's copies through
    :meth:`write_repeated`.

    Parameters
    ----------
    stack: array-like
        Where the frames go: events along the first axis, frames of any
        shape, of the type of the frames written.
    target: str, optional
        How error messages name the stack's file.
    """

    name = "out"
    """how messages name the stack"""

    def __init__(self, stack, target=None):
        self.stack = stack
        self.image_shape = tuple(stack.shape[1:])
        self.count = int(stack.shape[0])
        self.pixels = int(np.prod(self.image_shape, dtype=np.int64))
        self.dtype = np.dtype(stack.dtype).newbyteorder("=")
        """the type of the frames written (in this machine's byte order: assigning to a
        stack of the other one swaps the bytes)"""
        self.target = target
        self.block_rows = max(1, REPEAT_BLOCK_BYTES // max(1, self.pixels * self.dtype.itemsize))
        """rows of the block of copies that :meth:`write_repeated` writes at once"""

    def write_at(self, offset: int, frames: np.ndarray):
        """Write frames at frame `offset`; returns once the caller may reuse `frames`"""
        frames = self._rows(offset, frames)
        self.stack[offset:offset + len(frames)] = frames.reshape(len(frames),
                                                                 *self.image_shape)

    def write_repeated(self, offset: int, frame: np.ndarray, count: int):
        """Write `count` copies of one frame from frame `offset` on

        dcnum's background repeats the last window's median for the last
        frames. The copies go out in blocks of at most
        :data:`REPEAT_BLOCK_BYTES` aligned to :attr:`block_rows` (a chunk of
        a chunked dataset), so an `out` on disk stays within memory and
        whole chunks of copies, which are identical, are encoded once.
        """
        if count <= 0:
            return
        stop = offset + count
        frame = self._rows(offset, frame, stop)
        copies = np.ascontiguousarray(np.broadcast_to(frame, (min(self.block_rows, count),
                                                              self.pixels)))
        first = offset
        while first < stop:
            last = min(stop, (first // self.block_rows + 1) * self.block_rows)
            self._write_copies(first, copies[:last - first])
            first = last

    def check_complete(self):
        """Check that every frame was written (slices are stored at once: nothing to check)"""

    def _write_copies(self, offset: int, copies: np.ndarray):
        """Write a block of copies of one frame, at most :attr:`block_rows`, aligned to them"""
        self.write_at(offset, copies)

    def _rows(self, offset: int, frames: np.ndarray, stop: int | None = None) -> np.ndarray:
        """`frames` as rows of flattened frames, refused unless of the stack's type and inside

        The rows written are ``offset … stop-1`` (by default as many as `frames`).
        """
        frames = np.asarray(frames)
        if frames.dtype != self.dtype:
            raise TypeError(f"frames of {frames.dtype} were written to {self.name}, which is "
                            f"{self.dtype}; this is a bug in dcbg, please report it.")
        frames = frames.reshape(-1, self.pixels)
        stop = offset + len(frames) if stop is None else stop
        if offset < 0 or stop > self.count:
            raise ValueError(f"frames {offset} to {stop - 1} lie outside {self.name}, which "
                             f"has {self.count} frames; this is a bug in dcbg, please report "
                             f"it.")
        return frames


class ChunkedStackWriter(StackWriter):
    """Writes an existing chunked HDF5 dataset chunk by chunk, encoding chunks in threads

    A chunk is encoded (see :mod:`dcbg.rtdc.chunks`) and stored once all of
    its frames are there, so memory holds at most the chunks that frames
    are still arriving for, and h5py's lock is held only to store bytes.
    The dataset's chunks must hold whole frames and its filters be ones dcbg
    encodes (:meth:`~dcbg.rtdc.chunks.ChunkCodec.for_dataset`).

    Parameters
    ----------
    dataset: h5py.Dataset
        Where the frames go.
    codec: dcbg.rtdc.chunks.ChunkCodec
        Its codec.
    pool: concurrent.futures.Executor, optional
        Threads that encode chunks; without one, the caller's thread does.
    target: path-like, optional
        The dataset's file as the user named it, for error messages (it may
        be a temporary file); by default the file's name.
    """

    failure_note = ""
    """what became of the output after a failed write, for error messages"""

    def __init__(self, dataset: h5py.Dataset, codec: ChunkCodec,
                 pool: concurrent.futures.Executor | None = None, target=None):
        super().__init__(dataset, target if target is not None else dataset.file.filename)
        self.dataset = dataset
        self.pool = pool
        self.codec = codec
        self.chunk_length = dataset.chunks[0]
        self.block_rows = self.chunk_length
        self.chunk_count = -(-self.count // self.chunk_length)
        self._partial: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._stored: set[int] = set()
        self._lock = threading.Lock()
        self._encoded_copies: bytes | None = None

    def write_at(self, offset: int, frames: np.ndarray):
        """Write frames at frame `offset`; returns once the caller may reuse `frames`"""
        frames = self._rows(offset, frames)
        stop = offset + len(frames)
        ready = []
        for chunk in self._chunks(offset, stop):
            first, last = self._chunk_rows(chunk)
            lo, hi = max(offset, first), min(stop, last)
            part = frames[lo - offset:hi - offset]
            if hi - lo == self.chunk_length:
                ready.append((chunk, part))
                continue
            with self._lock:
                buffer, filled = self._partial.get(chunk) or (
                    np.zeros((self.chunk_length, self.pixels), self.dtype),
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
        as often as needed (see :meth:`StackWriter.write_repeated`).
        """
        self._encoded_copies = None
        try:
            super().write_repeated(offset, frame, count)
        finally:
            self._encoded_copies = None

    def _write_copies(self, offset: int, copies: np.ndarray):
        if len(copies) < self.chunk_length:
            self.write_at(offset, copies)
            return
        if self._encoded_copies is None:
            self._encoded_copies = self.codec.encode(copies)
        self._write_chunk(offset // self.chunk_length, self._encoded_copies)

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
            first, _ = self._chunk_rows(missing[0])
            raise RuntimeError(f"{self.name} of {self.target} misses frames from {first} on; "
                               f"this is a bug in dcbg, please report it.")

    def _chunks(self, start: int, stop: int) -> range:
        return range(start // self.chunk_length, (stop - 1) // self.chunk_length + 1)

    def _chunk_rows(self, chunk: int) -> tuple[int, int]:
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
                    f"choose an output on another disk{self.failure_note}.") from error
            raise OutputWriteError(
                f"Writing {self.target} failed ({write_failure_reason(error)}); check the "
                f"disk and run again{self.failure_note}.") from error
        with self._lock:
            self._stored.add(chunk)

    def _write_direct(self, offset: tuple, stored: bytes):
        # The one call that hands bytes to HDF5 (and so to the disk).
        self.dataset.id.write_direct_chunk(offset, stored)


def stack_writer(stack, pool: concurrent.futures.Executor | None = None) -> StackWriter:
    """The writer of frames into `stack`

    An h5py dataset whose chunks hold whole frames and whose filters dcbg
    encodes is written chunk by chunk, the chunks encoded in `pool`
    (:class:`ChunkedStackWriter`); any other stack (NumPy arrays, memory
    maps, other h5py datasets, array-likes) by slicing (:class:`StackWriter`),
    h5py running the filters of its datasets itself.
    """
    if isinstance(stack, h5py.Dataset):
        codec = ChunkCodec.for_dataset(stack)
        if codec is not None:
            return ChunkedStackWriter(stack, codec, pool)
    return StackWriter(stack)


class ImageBgWriter(ChunkedStackWriter):
    """Writes ``image_bg`` into an HDF5 group, chunk by chunk

    The dataset has its final size from the start, dcbg's chunks and the
    compression asked for (see :func:`create_image_dataset`); frames are
    written as by :class:`ChunkedStackWriter`.

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

    name = "image_bg"
    failure_note = " (the unfinished background is discarded)"

    def __init__(self, group: h5py.Group, image_shape, count: int,
                 compression: str = DEFAULT_COMPRESSION, target=None,
                 pool: concurrent.futures.Executor | None = None):
        if "image_bg" in group:
            del group["image_bg"]
        dataset = create_image_dataset(group, "image_bg", image_shape, count, compression)
        super().__init__(dataset, ChunkCodec.for_dataset(dataset), pool, target)

    def set_ppid(self, ppid: str):
        """Store the background PPID and dcnum's pipeline generation"""
        self.dataset.attrs[PPID_ATTRIBUTE] = ppid
        self.dataset.attrs[GENERATION_ATTRIBUTE] = DCNUM_PPID_GENERATION


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
