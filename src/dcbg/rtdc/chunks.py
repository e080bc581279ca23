"""Chunk codecs: HDF5 chunks decoded and encoded outside HDF5, in a thread pool

h5py holds one process-wide lock around every dataset read and write, and
HDF5 runs a dataset's filters (decompression, checksums) inside that call,
so h5py alone decodes on one core however many threads ask. dcbg instead
copies a chunk's stored bytes with ``read_direct_chunk`` (short, under the
lock), runs the filter pipeline itself in threads whose codecs release the
GIL, and stores chunks it encoded the same way with ``write_direct_chunk``.
The stored bytes are the ones HDF5 would read or write, so h5py, dclab and
dcnum read the files as usual.

Filters handled here, which instruments and dcnum use: Zstandard (HDF5
filter 32015, hdf5plugin's), deflate, shuffle and Fletcher-32. Datasets with
any other filter, or stored contiguous, compact, virtual or in chunks that
split a frame, are read through h5py (:meth:`ChunkCodec.for_dataset` returns
None for them), as are values of another byte order than this machine's, which
HDF5 converts while it reads. Values of any item size are decoded (shuffle's
element size is the dataset's), so uint16 and int16 stacks take the same path
as uint8 ones.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import zlib

import h5py
import numpy as np
from numcodecs import zstd

from .. import cpukernels

ZSTD = 32015
"""HDF5 filter id of Zstandard (registered by hdf5plugin)"""

DEFLATE = h5py.h5z.FILTER_DEFLATE
SHUFFLE = h5py.h5z.FILTER_SHUFFLE
FLETCHER32 = h5py.h5z.FILTER_FLETCHER32

FILTER_NAMES = {ZSTD: "zstd", DEFLATE: "deflate", SHUFFLE: "shuffle", FLETCHER32: "fletcher32"}
"""The filters dcbg decodes and encodes itself"""

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ChunkError(ValueError):
    """A stored chunk does not decode: damaged data or a wrong checksum"""


@dataclasses.dataclass(frozen=True)
class Filter:
    """One stage of an HDF5 filter pipeline"""

    code: int
    """HDF5 filter id"""
    options: tuple[int, ...] = ()
    """the filter's client data values (level, element size)"""


def fletcher32(data) -> int:
    """HDF5's Fletcher-32 checksum of a bytes-like object (computed without the GIL)"""
    return int(cpukernels.cpu_kernels().fletcher32(np.frombuffer(data, np.uint8)))


def zstd_content_size(frame) -> int | None:
    """Decompressed size declared in a Zstandard frame header, None if not declared

    Raises
    ------
    ChunkError
        If `frame` does not start with a Zstandard frame header.
    """
    frame = memoryview(frame)
    if len(frame) < 6 or bytes(frame[:4]) != ZSTD_MAGIC:
        raise ChunkError("no Zstandard frame")
    descriptor = frame[4]
    size_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    position = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single_segment else 0, 2, 4, 8)[size_flag]
    if width == 0:
        return None
    if len(frame) < position + width:
        raise ChunkError("truncated Zstandard frame header")
    size = int.from_bytes(frame[position:position + width], "little")
    return size + 256 if width == 2 else size


def _unshuffle(data, element_size: int) -> bytes:
    data = np.frombuffer(data, np.uint8)
    whole = len(data) // element_size * element_size
    planes = data[:whole].reshape(element_size, -1)
    return planes.T.tobytes() + data[whole:].tobytes()


def _shuffle(data, element_size: int) -> bytes:
    data = np.frombuffer(data, np.uint8)
    whole = len(data) // element_size * element_size
    elements = data[:whole].reshape(-1, element_size)
    return elements.T.tobytes() + data[whole:].tobytes()


class ChunkCodec:
    """The filter pipeline of one chunked dataset, run outside HDF5

    Decoding undoes the filters in reverse order, skipping those the
    chunk's filter mask marks as not applied (HDF5 skips optional filters
    that fail, e.g. a compression that would enlarge the chunk); encoding
    applies all of them in order. Both are safe to call from many threads.

    Parameters
    ----------
    filters: list of Filter
        The pipeline in HDF5's order (the order of writing).
    chunk_shape: tuple of int
        Shape of one chunk.
    itemsize: int
        Bytes per element.
    """

    def __init__(self, filters: list[Filter], chunk_shape, itemsize: int = 1):
        unknown = [f.code for f in filters if f.code not in FILTER_NAMES]
        if unknown:
            raise ValueError(f"dcbg does not implement the HDF5 filter(s) {unknown}")
        self.filters = list(filters)
        self.chunk_shape = tuple(chunk_shape)
        self.nbytes = int(np.prod(self.chunk_shape)) * itemsize
        """bytes of one decoded chunk"""

    def __repr__(self):
        names = "+".join(FILTER_NAMES[f.code] for f in self.filters) or "no filters"
        return f"ChunkCodec({names}, chunks {self.chunk_shape})"

    @classmethod
    def for_dataset(cls, dataset: h5py.Dataset) -> ChunkCodec | None:
        """The codec of a dataset, or None where h5py has to read it

        Only chunked, non-virtual datasets whose chunks hold whole frames
        (the chunk shape equals the frame shape beyond the first axis), whose
        values are in this machine's byte order and whose filters are all in
        :data:`FILTER_NAMES` qualify.
        """
        if dataset.is_virtual or dataset.chunks is None or dataset.external:
            return None
        if not dataset.dtype.isnative:
            return None  # HDF5 swaps the bytes while it reads and writes
        if tuple(dataset.chunks[1:]) != tuple(dataset.shape[1:]):
            return None
        plist = dataset.id.get_create_plist()
        filters = []
        for index in range(plist.get_nfilters()):
            code, _flags, options, _name = plist.get_filter(index)
            if code not in FILTER_NAMES:
                return None
            filters.append(Filter(int(code), tuple(int(o) for o in options)))
        return cls(filters, dataset.chunks, dataset.dtype.itemsize)

    def decode(self, stored, filter_mask: int, out: np.ndarray):
        """Decode the stored bytes of one chunk into `out`

        Parameters
        ----------
        stored: bytes
            The chunk as stored in the file.
        filter_mask: int
            Bit i set means filter i was not applied to this chunk.
        out: np.ndarray
            C-contiguous array of :attr:`nbytes` bytes.

        Raises
        ------
        ChunkError
            If the data do not decode, a checksum does not match, or the
            decoded size is not the chunk's size.
        """
        target = out.reshape(-1).view(np.uint8)
        data = memoryview(stored)
        active = [f for i, f in enumerate(self.filters) if not filter_mask >> i & 1]
        for position, stage in enumerate(reversed(active)):
            last = position == len(active) - 1
            data = self._undo(stage, data, target if last else None)
        if data is not target:
            if len(data) != self.nbytes:
                raise ChunkError(f"a chunk holds {len(data)} bytes instead of {self.nbytes}")
            target[:] = np.frombuffer(data, np.uint8)

    def _undo(self, stage: Filter, data: memoryview, target: np.ndarray | None):
        if stage.code == FLETCHER32:
            if len(data) < 4:
                raise ChunkError("a chunk is shorter than its checksum")
            stored = int.from_bytes(data[-4:], "little")
            computed = fletcher32(data[:-4])
            if stored not in (computed, _swapped_halves(computed)):
                raise ChunkError("the Fletcher-32 checksum of a chunk does not match")
            return data[:-4]
        if stage.code == ZSTD:
            size = zstd_content_size(data)
            expected = self.nbytes if target is not None else size
            if size is not None and size != expected:
                raise ChunkError(f"a chunk decompresses to {size} bytes instead of "
                                 f"{expected}")
            try:
                if target is not None:
                    return zstd.decompress(data, target)
                return memoryview(zstd.decompress(data))
            except (RuntimeError, ValueError) as error:
                raise ChunkError(f"Zstandard: {error}") from error
        if stage.code == DEFLATE:
            try:
                return memoryview(zlib.decompress(data))
            except zlib.error as error:
                raise ChunkError(f"deflate: {error}") from error
        element_size = stage.options[0] if stage.options else 1
        return data if element_size <= 1 else memoryview(_unshuffle(data, element_size))

    def encode(self, chunk: np.ndarray) -> bytes:
        """The stored bytes of one chunk (all filters applied, in order)"""
        data = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
        if data.nbytes != self.nbytes:
            raise ValueError(f"a chunk has {self.nbytes} bytes, got {data.nbytes}")
        for stage in self.filters:
            if stage.code == ZSTD:
                data = zstd.compress(data, stage.options[0] if stage.options else 3)
            elif stage.code == DEFLATE:
                data = zlib.compress(data, stage.options[0] if stage.options else 6)
            elif stage.code == SHUFFLE:
                element_size = stage.options[0] if stage.options else 1
                if element_size > 1:
                    data = _shuffle(data, element_size)
            else:
                data = bytes(data) + fletcher32(data).to_bytes(4, "little")
        return bytes(data)


def _swapped_halves(checksum: int) -> int:
    # HDF5 before 1.6.3 stored the checksum with the bytes of each 16-bit
    # half swapped on little-endian machines; HDF5 still accepts that form.
    return ((checksum & 0x00FF00FF) << 8) | ((checksum >> 8) & 0x00FF00FF)


class ChunkedFrameReader:
    """Reads frames of a chunked dataset by decoding its chunks in a thread pool

    Chunks that lie wholly inside the requested frames are decoded straight
    into the caller's buffer; chunks cut by the request are decoded into a
    per-thread scratch buffer and the requested frames copied out.

    Parameters
    ----------
    dataset: h5py.Dataset
        Chunked dataset whose chunks hold whole frames.
    codec: ChunkCodec
        Its codec (see :meth:`ChunkCodec.for_dataset`).
    pool: concurrent.futures.Executor
        Threads that decode.
    """

    def __init__(self, dataset: h5py.Dataset, codec: ChunkCodec,
                 pool: concurrent.futures.Executor):
        self.dataset = dataset
        self.codec = codec
        self.pool = pool
        self.length = dataset.shape[0]
        self.chunk_length = dataset.chunks[0]
        self.frame_bytes = codec.nbytes // self.chunk_length
        frame_values = self.frame_bytes // dataset.dtype.itemsize
        self.fill = np.full(frame_values, dataset.fillvalue or 0, dataset.dtype).view(np.uint8)
        """the bytes of a frame of a chunk never written, which HDF5 reads as the fill value"""
        self._local = threading.local()

    def read_into(self, start: int, stop: int, out: np.ndarray):
        """Fill ``out[:stop-start]`` (rows of whole frames) with frames start…stop-1

        Raises
        ------
        ChunkedReadError
            Naming the frames of the first chunk that failed to decode.
        """
        rows = np.arange(start, stop)
        self._gather(rows, out, contiguous=True)

    def read_rows_into(self, rows: np.ndarray, out: np.ndarray):
        """Fill ``out[i]`` with frame ``rows[i]`` for every i (any order, repeats allowed)"""
        self._gather(np.asarray(rows, dtype=np.int64), out, contiguous=False)

    def _gather(self, rows: np.ndarray, out: np.ndarray, contiguous: bool):
        if len(rows) == 0:
            return
        target = out[:len(rows)].reshape(len(rows), -1).view(np.uint8)
        chunk_ids = rows // self.chunk_length
        jobs = []
        if contiguous:
            first = int(rows[0])
            for chunk in range(int(chunk_ids[0]), int(chunk_ids[-1]) + 1):
                lo = max(first, chunk * self.chunk_length)
                hi = min(first + len(rows), (chunk + 1) * self.chunk_length)
                jobs.append((chunk, np.arange(lo - first, hi - first)))
        else:
            order = np.argsort(chunk_ids, kind="stable")
            bounds = np.flatnonzero(np.diff(chunk_ids[order])) + 1
            for positions in np.split(order, bounds):
                jobs.append((int(chunk_ids[positions[0]]), positions))
        futures = [self.pool.submit(self._read_chunk, chunk, rows, positions, target)
                   for chunk, positions in jobs]
        concurrent.futures.wait(futures)
        for future in futures:
            future.result()  # the first failure, in frame order

    def _read_chunk(self, chunk: int, rows: np.ndarray, positions: np.ndarray,
                    target: np.ndarray):
        first_row = chunk * self.chunk_length
        wanted = rows[positions] - first_row
        try:
            mask, stored = self.dataset.id.read_direct_chunk(self._coordinates(first_row))
        except (OSError, KeyError, RuntimeError, ValueError) as error:
            if self._never_written(first_row, error):
                target[positions] = self.fill  # HDF5 reads the fill value
                return
            raise ChunkedReadError(first_row, first_row + self.chunk_length, error) from error
        whole = (len(positions) == self.chunk_length
                 and np.array_equal(wanted, np.arange(self.chunk_length))
                 and positions[-1] - positions[0] == self.chunk_length - 1)
        try:
            if whole:
                self.codec.decode(stored, mask, target[positions[0]:positions[-1] + 1])
            else:
                scratch = self._scratch()
                self.codec.decode(stored, mask, scratch)
                if np.all(np.diff(positions) == 1) and np.all(np.diff(wanted) == 1):
                    target[positions[0]:positions[-1] + 1] = scratch[wanted[0]:wanted[-1] + 1]
                else:
                    target[positions] = scratch[wanted]
        except ChunkError as error:
            stop = min(first_row + self.chunk_length, self.length)
            raise ChunkedReadError(first_row, stop, error) from error

    def _coordinates(self, first_row: int) -> tuple:
        return (first_row,) + (0,) * (self.dataset.ndim - 1)

    def _never_written(self, first_row: int, error: BaseException) -> bool:
        """Whether the chunk that failed to read has no storage, its frames never written

        HDF5's message for it changes between versions ("not initialized",
        "not allocated", "chunk address isn't defined"); where HDF5 gives
        chunk information (1.10.5 and later), the chunk's missing address
        decides.
        """
        try:
            info = self.dataset.id.get_chunk_info_by_coord(self._coordinates(first_row))
        except (AttributeError, OSError, KeyError, RuntimeError, ValueError):
            return "not initialized" in str(error) or "not allocated" in str(error)
        return info.byte_offset is None

    def _scratch(self) -> np.ndarray:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = np.empty((self.chunk_length, self.frame_bytes),
                                                     np.uint8)
        return scratch


class ChunkedReadError(Exception):
    """A chunk of frames ``start … stop-1`` could not be read or decoded"""

    def __init__(self, start: int, stop: int, cause: BaseException):
        super().__init__(str(cause))
        self.start = start
        self.stop = stop
