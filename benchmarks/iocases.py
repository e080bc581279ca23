"""Reading, writing and the I/O floor, measured the way dcbg does them and the way h5py does

Shared by bench_cpu.py and bench_cuda.py. "The I/O floor" is a run without
the median: read and decode the input frames, encode and write the
background frames (the real output's bytes, held in memory), with dcbg's
reader and writer threads and a codec pool of N threads. "The h5py floor"
does the same serially in one thread with h5py's own reads and writes, the
way dcbg did before it decoded chunks itself.
"""
from __future__ import annotations

import concurrent.futures
import functools
import pathlib
import time

import h5py
import hdf5plugin  # noqa: F401 - registers the Zstandard filter with h5py
import numpy as np

BATCH = 2048
"""Frames per batch, as the CPU engine's"""

OUTPUT_COMPRESSION = "zstd-5"
"""Of the background written, as ``dcbg compute`` writes it by default"""


def load_background(path: pathlib.Path) -> np.ndarray:
    """The image_bg of a computed output, whole (not timed)"""
    with h5py.File(path) as h5:
        return h5["events/image_bg"][:]


def load_checksum():
    """Load dcbg's compiled Fletcher-32 checksum before a timer starts

    Its one-time load (0.4-1 s on 2 CPUs for numba's build: numba and its
    cache; a millisecond for the C build) is start-up, which the
    whole-command row measures; the floors measure reading and writing, with
    1 and with N threads.
    """
    from dcbg.rtdc.chunks import fletcher32
    fletcher32(b"\0\0")


def read_all(path: pathlib.Path, threads: int) -> float:
    """Seconds to read and decode events/image with `threads` codec threads"""
    from dcbg.rtdc.reader import ImageSource
    load_checksum()
    with h5py.File(path) as h5, concurrent.futures.ThreadPoolExecutor(threads) as pool:
        source = ImageSource(h5["events/image"], pool=pool)
        out = np.empty((BATCH, source.pixels), np.uint8)
        t0 = time.perf_counter()
        for start in range(0, len(source), BATCH):
            source.read_into(start, min(start + BATCH, len(source)), out)
        return time.perf_counter() - t0


def write_all(background: np.ndarray, out: pathlib.Path, threads: int) -> float:
    """Seconds to encode and write `background` as image_bg (zstd-5) with `threads` threads"""
    from dcbg.rtdc.writer import ImageBgWriter
    flat = background.reshape(len(background), -1)
    load_checksum()
    with h5py.File(out, "w") as h5, concurrent.futures.ThreadPoolExecutor(threads) as pool:
        writer = ImageBgWriter(h5.require_group("events"), background.shape[1:],
                               len(background), OUTPUT_COMPRESSION, pool=pool)
        t0 = time.perf_counter()
        for start in range(0, len(flat), BATCH):
            writer.write_at(start, flat[start:start + BATCH])
        writer.check_complete()
        h5.flush()
        return time.perf_counter() - t0


def io_floor(path: pathlib.Path, background: np.ndarray, out: pathlib.Path,
             threads: int) -> float:
    """Seconds for a run without the median: read the input, write the background

    dcbg's reader and writer threads overlap as in a real run; only the
    median is missing.
    """
    from dcbg.engines.batches import Prefetcher, WriterThread, plan_windows
    from dcbg.rtdc.reader import ImageSource
    from dcbg.rtdc.writer import ImageBgWriter
    flat = background.reshape(len(background), -1)
    load_checksum()
    with h5py.File(path) as h5in, h5py.File(out, "w") as h5out, \
            concurrent.futures.ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        source = ImageSource(h5in["events/image"], pool=pool)
        writer = ImageBgWriter(h5out.require_group("events"), source.image_shape,
                               len(source), OUTPUT_COMPRESSION, pool=pool)
        batches = plan_windows(0, len(source), 1, BATCH)  # windows of one frame
        prefetcher = Prefetcher(source.read_into, batches,
                                [np.empty((BATCH, source.pixels), np.uint8) for _ in range(2)])
        thread = WriterThread(writer.write_at,
                              [np.empty((BATCH, source.pixels), np.uint8) for _ in range(2)])
        try:
            for batch, _frames in prefetcher:
                buffer = thread.acquire()
                buffer[:batch.output_size] = flat[batch.start:batch.start + batch.output_size]
                prefetcher.release()
                thread.submit(batch.start, buffer, batch.output_size)
        finally:
            prefetcher.close()
            thread.close()
        writer.check_complete()
        h5out.flush()
        return time.perf_counter() - t0


def h5py_floor(path: pathlib.Path, background: np.ndarray, out: pathlib.Path) -> float:
    """Seconds for the same read and write through h5py alone, serially, in one thread"""
    from dcbg.rtdc.writer import create_image_dataset
    with h5py.File(path) as h5in, h5py.File(out, "w") as h5out:
        t0 = time.perf_counter()
        image = h5in["events/image"]
        dataset = create_image_dataset(h5out.require_group("events"), "image_bg",
                                       image.shape[1:], len(image), OUTPUT_COMPRESSION)
        buffer = np.empty((BATCH, *image.shape[1:]), np.uint8)
        for start in range(0, len(image), BATCH):
            stop = min(start + BATCH, len(image))
            image.read_direct(buffer, np.s_[start:stop], np.s_[0:stop - start])
            dataset[start:stop] = background[start:stop]
        h5out.flush()
        return time.perf_counter() - t0


MEDIAN_KERNEL_SIZES = (10, 100, 1000)
"""The kernel sizes whose median per_frame_costs measures"""


def fastest_seconds(function, repeat: int) -> float:
    """The fastest of `repeat` timed calls of `function` (after one untimed call)

    The untimed call faults the buffers' pages in and loads what the call
    needs; the fastest call is the one the shared machine disturbed least.
    """
    function()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - t0)
    return best


def median_batch(frames, medians, kernel_size: int, windows: int, jobs: list[slice]):
    """The medians of `windows` windows of `frames`, job by job in this thread"""
    from dcbg.engines.cpu import compute_median_for_slice
    for job in jobs:
        compute_median_for_slice(frames, medians, kernel_size, windows, job)


def per_frame_costs(path: pathlib.Path, background: np.ndarray,
                    kernel_sizes=MEDIAN_KERNEL_SIZES, repeat: int = 3) -> dict[str, float]:
    """µs per frame on one core: decode, encode and the median at each kernel size

    Decoding takes the stored chunks of the input (zstd-5 and Fletcher-32),
    encoding the chunks of the background (zstd-5 and Fletcher-32), the
    median one CPU batch of windows in cache-sized jobs, as a worker takes
    them. Each figure is the fastest of `repeat` passes in this thread. Keys:
    ``decode``, ``encode``, ``median_k<kernel_size>`` (µs per frame),
    ``pixels`` (per frame) and ``median_implementation`` (the kernel's).
    """
    from dcbg.cpukernels import median_implementation
    from dcbg.engines.cpu import job_slices, warm_up_kernel
    from dcbg.rtdc.chunks import ChunkCodec
    from dcbg.rtdc.writer import chunk_events, create_image_dataset
    costs = {}
    with h5py.File(path) as h5:
        image = h5["events/image"]
        codec = ChunkCodec.for_dataset(image)
        stored = [image.id.read_direct_chunk((start, 0, 0))
                  for start in range(0, len(image) - image.chunks[0] + 1, image.chunks[0])]
        out = np.empty(image.chunks, np.uint8)

        def decode_all():
            for mask, data in stored:
                codec.decode(data, mask, out)

        costs["decode"] = (fastest_seconds(decode_all, repeat)
                           / (len(stored) * image.chunks[0]))
    length = chunk_events(background.shape[1:])
    with h5py.File("in-memory", "w", driver="core", backing_store=False) as h5:
        codec = ChunkCodec.for_dataset(create_image_dataset(h5, "x", background.shape[1:],
                                                            length, OUTPUT_COMPRESSION))
    blocks = [np.ascontiguousarray(background[start:start + length])
              for start in range(0, len(background) - length + 1, length)]

    def encode_all():
        for block in blocks:
            codec.encode(block)

    costs["encode"] = fastest_seconds(encode_all, repeat) / (len(blocks) * length)
    warm_up_kernel()
    for kernel_size in kernel_sizes:
        with h5py.File(path) as h5:
            windows = min(BATCH, len(h5["events/image"]) - kernel_size + 1)
            frames = h5["events/image"][:windows + kernel_size - 1]
        frames = frames.reshape(len(frames), -1)
        medians = np.empty((windows, frames.shape[1]), np.uint8)
        jobs = job_slices(frames.shape[1], 1)
        batch = functools.partial(median_batch, frames, medians, kernel_size, windows, jobs)
        costs[f"median_k{kernel_size}"] = fastest_seconds(batch, repeat) / windows
    return {**{stage: seconds * 1e6 for stage, seconds in costs.items()},
            "pixels": int(np.prod(background.shape[1:])),
            "median_implementation": median_implementation()}
