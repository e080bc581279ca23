"""GPU results checked against the CPU kernel before anything is written

A GPU that dcbg never ran on may compute wrong bytes: memory without ECC,
a driver or compiler bug, a copy that raced its kernel. dcbg promises
dcnum's bytes, so a GPU engine checks every batch where it runs: the CPU
kernel recomputes some of the batch's pixels from the frames on the host,
for every window of the batch, and compares them with the GPU's medians as
they were downloaded, before the batch reaches the writer. A difference
raises :class:`~dcbg.errors.GPUResultError`.

The sample ("sample", the default) is spread so that both kinds of faults
show:

- faults at edges: the first and last pixel of every thread block's pixel
  range (the frame's first and last pixel among them, and the last, partial
  block), where an index computed wrongly would go astray;
- faults of a whole batch (a stale or reused buffer, a copy on the wrong
  stream): pseudo-random pixels, different in every batch and the same in
  every run, at least :data:`SAMPLE_FRACTION` of the pixels and at least
  :data:`SAMPLE_LEAST` of them (every pixel of smaller frames).

"all" checks every pixel, "off" nothing (see :func:`dcbg.settings.parse_verify`).

Frames of every dtype the GPU computes are checked: uint8 and uint16 by the
CPU kernel as they are, int8 and int16 as their unsigned views with the sign
bit flipped (which orders them as the signed values), the CPU's medians
flipped back before they are compared with the GPU's, byte for byte.
The check runs on a thread of the host that waits for the download anyway
(the writer's), so it stays off the GPU's path. Its CPU time goes mostly to
reading the sampled columns out of whole batches (with thread blocks of 32
pixels a sample touches every cache line of a frame), so the CPU kernels
gather and compare them (``gather_columns`` and ``first_difference`` of
:mod:`dcbg.cpukernels`) while prefetching the next frame. Its cost is
measured by ``benchmarks/bench_cuda.py --verify-cost``.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time

import numpy as np

from .. import cpukernels
from ..dtypes import flip_sign_bit, kernel_dtype, sign_bit
from ..errors import GPUResultError, setting_error
from .cpu import compute_median_for_slice, job_slices, widest

SAMPLE_FRACTION = 0.01
"""Least part of a frame's pixels that the pseudo-random part of a sample holds"""

SAMPLE_LEAST = 64
"""Least number of pseudo-random pixels in a sample (frames this small are checked whole)"""

SAMPLE_SEED = 0xDCB6
"""Seed of the pseudo-random pixels (with the batch's first window: reproducible)"""


def sample_columns(pixels: int, block: int, key: int) -> np.ndarray:
    """The pixels (columns of the flattened frames) checked in one batch, sorted

    Parameters
    ----------
    pixels: int
        Pixels per frame.
    block: int
        Pixels per thread block of the batch's launch.
    key: int
        Different for every batch (its first window): picks the pseudo-random pixels.

    Returns
    -------
    columns: np.ndarray
        int64, as the CPU kernels take them.
    """
    if pixels <= SAMPLE_LEAST:
        return np.arange(pixels, dtype=np.int64)
    firsts = np.arange(0, pixels, block)
    lasts = np.minimum(firsts + block, pixels) - 1
    spread = max(SAMPLE_LEAST, math.ceil(pixels * SAMPLE_FRACTION))
    chosen = np.random.default_rng([SAMPLE_SEED, key]).choice(pixels, spread, replace=False)
    checked = np.zeros(pixels, bool)  # sorted and unique at once, where a union sorts
    checked[firsts] = checked[lasts] = checked[chosen] = True
    return np.flatnonzero(checked).astype(np.int64, copy=False)


def pixel_words(pixel: int, image_shape: tuple) -> str:
    """A pixel of a flattened frame as a user finds it: "pixel (row 3, column 17)\""""
    if len(image_shape) == 2:
        row, column = np.unravel_index(pixel, image_shape)
        return f"pixel (row {row}, column {column})"
    if len(image_shape) > 2:
        return f"pixel {tuple(int(i) for i in np.unravel_index(pixel, image_shape))}"
    return f"pixel {pixel}"


@dataclasses.dataclass(frozen=True)
class FrameSample:
    """What the check of one batch needs of its input frames, copied out of the batch buffer"""

    columns: np.ndarray | None
    """the pixels checked (None: every pixel)"""
    frames: np.ndarray
    """C-contiguous ``(input frames, len(columns))`` of the frames' dtype: those pixels of
    the batch's frames"""


class ResultCheck:
    """Checks a GPU's medians against the CPU kernel, batch by batch

    :meth:`take_frames` copies the sampled pixels of a batch's input frames
    while the host still holds them; :meth:`check` recomputes them once the
    GPU's medians of the batch are on the host, and raises on a difference.
    Both may run on different threads; the counts are kept for the run log.

    Parameters
    ----------
    mode: str
        "sample", "all" or "off" (parsed, see :func:`dcbg.settings.parse_verify`).
    kernel_size: int
        Frames per window.
    image_shape: tuple of int
        Shape of one frame (to name a wrong pixel by row and column).
    device_index: int
        The CUDA device whose results are checked.
    dtype: numpy.dtype, optional
        Of the frames and medians: uint8 (default), int8, uint16 or int16.
    """

    def __init__(self, mode: str, kernel_size: int, image_shape, device_index: int,
                 dtype=np.uint8):
        self.mode = mode
        self.kernel_size = kernel_size
        self.dtype = np.dtype(dtype)
        self.unsigned = kernel_dtype(self.dtype)
        """the unsigned type of the same size: the CPU kernels' values"""
        self.sign_bit = sign_bit(self.dtype)
        """flipped to order signed values as unsigned ones (0 for unsigned frames)"""
        self.image_shape = tuple(image_shape)
        self.pixels = int(np.prod(self.image_shape, dtype=np.int64))
        self.device_index = device_index
        self.pixel_outputs = 0
        """pixel-outputs compared so far"""
        self.seconds = 0.0
        """time spent copying, recomputing and comparing so far"""
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether anything is checked"""
        return self.mode != "off"

    def columns(self, block: int, key: int) -> np.ndarray | None:
        """The pixels to check in a batch (None: every pixel); see :func:`sample_columns`"""
        if self.mode == "all":
            return None
        return sample_columns(self.pixels, block, key)

    def take_frames(self, frames: np.ndarray, block: int, key: int) -> FrameSample | None:
        """Copy the pixels to check of a batch's input frames ``(rows, pixels)``; None if off

        Parameters
        ----------
        frames: np.ndarray
            The batch's input frames as the host holds them (C-contiguous, of the
            check's dtype).
        block: int
            Pixels per thread block of the batch's launch.
        key: int
            The batch's first window (picks the pseudo-random pixels).
        """
        if not self.active:
            return None
        t0 = time.perf_counter()
        columns = self.columns(block, key)
        if columns is None:
            copied = np.array(frames)
        else:
            copied = np.empty((len(frames), len(columns)), self.dtype)
            cpukernels.cpu_kernels().gather_columns(frames.view(self.unsigned), columns,
                                                    copied.view(self.unsigned))
        self._add(0, time.perf_counter() - t0)
        return FrameSample(columns, copied)

    def check(self, sample: FrameSample | None, medians: np.ndarray, first_window: int):
        """Compare a batch's medians ``(windows, pixels)`` with the CPU's at the sample

        Parameters
        ----------
        sample: FrameSample or None
            What :meth:`take_frames` copied of the batch's frames (None: nothing to check).
        medians: np.ndarray
            C-contiguous, of the check's dtype: the GPU's medians of the batch, as
            downloaded.
        first_window: int
            The batch's first window.

        Raises
        ------
        GPUResultError
            If a median differs, naming the first one.
        """
        if sample is None:
            return
        # compared where they lie in the batch: no copy of the GPU's medians
        self._compare(sample.frames, medians, sample.columns, sample.columns, first_window)

    def compare(self, frames: np.ndarray, gpu: np.ndarray, columns: np.ndarray | None,
                first_window: int = 0):
        """Compare the GPU's medians of some pixels with the CPU's from the same frames

        Parameters
        ----------
        frames: np.ndarray
            C-contiguous ``(windows + kernel_size - 1, n)`` of the check's dtype: the
            input frames of the `n` pixels, from window `first_window` on.
        gpu: np.ndarray
            C-contiguous ``(windows, n)`` of the check's dtype: the GPU's medians of
            these pixels.
        columns: np.ndarray or None
            The pixels' indices in the flattened frame (None: all of them, in order).
        first_window: int
            The first window's index (the event whose background it is).

        Raises
        ------
        GPUResultError
            If a median differs, naming the first one.
        """
        self._compare(frames, gpu, None, columns, first_window, on_gpu_arrays=True)

    def _compare(self, frames: np.ndarray, gpu: np.ndarray, gpu_columns: np.ndarray | None,
                 columns: np.ndarray | None, first_window: int, on_gpu_arrays: bool = False):
        """Recompute the sampled pixels' medians from `frames` and compare the GPU's

        `gpu_columns` are the columns of `gpu` to compare (None: all of them, as
        many as `frames` has), `columns` the compared pixels' indices in the
        flattened frame (None: all, in order).
        """
        t0 = time.perf_counter()
        cpu = self._recompute(frames, len(gpu))
        found = cpukernels.cpu_kernels().first_difference(gpu.view(self.unsigned), gpu_columns,
                                                          cpu.view(self.unsigned))
        self._add(cpu.size, time.perf_counter() - t0)
        if found >= 0:
            window, index = divmod(found, cpu.shape[1])
            pixel = index if columns is None else int(columns[index])
            raise self._error(first_window + window, pixel,
                              gpu[window, index if gpu_columns is None else pixel],
                              cpu[window, index], on_gpu_arrays=on_gpu_arrays)

    def _recompute(self, frames: np.ndarray, windows: int) -> np.ndarray:
        """The CPU kernel's medians of the first `windows` windows of `frames`' columns,
        of the check's dtype"""
        width = frames.shape[1]
        values = frames.view(self.unsigned)
        if self.sign_bit:  # the CPU kernels order unsigned values; the frames stay as given
            values = values.copy()
            flip_sign_bit(values, self.sign_bit)
        cpu = np.empty((windows, width), self.unsigned)
        # one window per pixel: slices of cache size (a whole frame's would not fit),
        # which share one scratch
        jobs = job_slices(width, 1)
        scratch = cpukernels.scratch(self.unsigned, widest(jobs), self.kernel_size)
        for job in jobs:
            compute_median_for_slice(values, cpu, self.kernel_size, windows, job, scratch)
        flip_sign_bit(cpu, self.sign_bit)
        return cpu.view(self.dtype)

    def _error(self, event: int, pixel: int, gpu, cpu,
               on_gpu_arrays: bool = False) -> GPUResultError:
        """The error for a GPU's median `gpu` where the CPU computes `cpu`

        Arrays in GPU memory are computed on the GPU that holds them whatever
        the device setting, so their advice is to compute a host copy instead.
        """
        if on_gpu_arrays:
            return GPUResultError(
                f"CUDA device {self.device_index} computed a wrong median at event {event}, "
                f"{pixel_words(pixel, self.image_shape)}: the GPU gave {gpu} where the CPU "
                f"computes {cpu}, so its results cannot be trusted; check the GPU "
                f"(nvidia-smi, dcbg selftest --device cuda:{self.device_index}) or compute "
                f"a host copy of the frames (cupy.asnumpy).")
        return setting_error(
            GPUResultError, "CUDA device {index} computed a wrong median at event {event}, "
            "{pixel}: the GPU gave {gpu} where the CPU computes {cpu}, so its results cannot "
            "be trusted; check the GPU (nvidia-smi, dcbg selftest --device cuda:{index}) or "
            "use {setting}.", "device", suggested=("cpu",), index=self.device_index,
            event=event, pixel=pixel_words(pixel, self.image_shape), gpu=gpu, cpu=cpu)

    def _add(self, pixel_outputs: int, seconds: float):
        with self._lock:
            self.pixel_outputs += pixel_outputs
            self.seconds += seconds
