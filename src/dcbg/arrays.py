"""Rolling medians of arrays: NumPy arrays, memory maps, h5py datasets and CUDA arrays

:func:`rolling_median` gives the median of every window of ``kernel_size``
frames, :func:`rolling_median_background` dcnum's rolling-median background
(one row per frame). Both run on the engines that compute ``image_bg`` of
files, on the device ``device`` picks, and give the same bytes on every
device:

- arrays in host memory (NumPy arrays, memory maps, h5py datasets, any
  array-like with ``shape``, ``dtype`` and slicing) are read batch by batch,
  so an ``out`` on disk (a memory map or an h5py dataset) keeps the memory
  bounded for any number of frames;
- arrays in GPU memory (CuPy, or anything with ``__cuda_array_interface__``
  or DLPack, such as torch or JAX arrays) are computed where they are, without
  a copy through host memory, and come back as CuPy arrays.

A GPU's results are checked against the CPU kernel (``verify``, see
:mod:`dcbg.engines.verification`): for host arrays a sample of every batch,
as for files; for GPU arrays, which stay on the GPU, a sample of the first
call per process, GPU and width of the kernel's counts, unless asked
otherwise.
"""
from __future__ import annotations

import mmap
import os

import hdf5plugin  # noqa: F401 - registers the Zstandard filter: h5py reads datasets with it
import numpy as np

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # NumPy 1
    byte_bounds = np.byte_bounds

from .engines.base import frame_pixels
from .errors import overlap_error
from .settings import DEFAULT_VERIFY, parse_verify
from .windows import background_window_count, window_count

READ_BATCH = 10000
"""Most windows an engine is asked to compute at once (engines may use fewer)"""


def rolling_median(frames, kernel_size: int, *, device: str = "auto", out=None,
                   verify: str | None = None):
    """Median of every window of `kernel_size` consecutive frames

    Row ``j`` of the result is, per pixel, element ``kernel_size // 2`` of
    the sorted window ``frames[j : j + kernel_size]`` (for an even size the
    upper of the two middle elements, as dcnum takes it; no averaging).

    Parameters
    ----------
    frames: array-like of uint8, shape (N, ...)
        The frames, events along the first axis; any further axes are
        pixels. A NumPy array, memory map, h5py dataset or other array-like
        is read in batches; a CuPy array (or a CUDA array with
        ``__cuda_array_interface__`` or DLPack, e.g. a torch tensor) is
        computed on its own GPU.
    kernel_size: int
        Frames per window, at least 1 and at most N.
    device: str
        "auto", "cpu", "cuda", "cuda:N" or "cuda:all" for host arrays (see
        :func:`dcbg.devices.select_device`); the result never depends on it.
        GPU arrays are computed on the GPU that holds them.
    out: array-like, optional
        Where to put the result: an array of shape ``(N - kernel_size + 1,
        ...)`` and dtype uint8 (NumPy array, memory map or h5py dataset for
        host input; a CuPy array on the same GPU for GPU input). It must not
        share storage with `frames`, since later windows still read frames
        that earlier results would overwrite: an `out` that overlaps them in
        memory, or in the file both map (two memory maps of one file), is
        refused; overlaps dcbg cannot see (an h5py dataset in the file of a
        memory map, say) give wrong results.
    verify: str, optional
        Which of a GPU's medians the CPU recomputes and compares: "sample"
        (a spread sample of every batch), "all" or "off". By default a sample
        of every batch for host arrays; for GPU arrays a sample of the first
        call per process, GPU and width of the kernel's counts (a checked
        call copies the sampled pixels to the host and waits for them). The
        CPU ignores it; the result never depends on it.

    Returns
    -------
    medians: numpy.ndarray or cupy.ndarray
        `out` if given; otherwise a new array, a CuPy array for GPU input.
        For GPU input the work is ordered after what the caller's current
        CuPy stream holds and the result is ready on that stream.

    Raises
    ------
    TypeError
        If `frames` is no array of uint8, or `out` has another dtype.
    ValueError
        If `kernel_size` is not a positive integer, there are fewer frames
        than `kernel_size`, the frames have no pixels, or `out` has the
        wrong shape or overlaps `frames`.
    dcbg.errors.GPUResultError
        If a checked median of a GPU differs from the CPU's (for host arrays
        under ``device="auto"`` the CPU computes them again instead).
    """
    return _compute(frames, kernel_size, device, out, verify, background=False)


def rolling_median_background(frames, kernel_size: int, *, device: str = "auto", out=None,
                              verify: str | None = None):
    """dcnum's rolling-median background: one row per frame

    Row ``i`` is the median of the window that starts at frame
    ``min(i, N - kernel_size - 1)`` (see :func:`rolling_median`), so the
    last `kernel_size` frames repeat the background of frame
    ``N - kernel_size - 1``; with ``N == kernel_size`` every row is the
    median of all frames. The bytes are those of
    :class:`dcbg.BackgroundRollMed` (and dcnum's) on the same frames.

    Parameters
    ----------
    frames, kernel_size, device, verify:
        As for :func:`rolling_median`.
    out: array-like, optional
        As for :func:`rolling_median` (it must not share storage with
        `frames`), of the shape of `frames`.

    Returns
    -------
    image_bg: numpy.ndarray or cupy.ndarray
        As for :func:`rolling_median`, of the shape of `frames`.
    """
    return _compute(frames, kernel_size, device, out, verify, background=True)


def _compute(frames, kernel_size, device, out, verify, background: bool):
    kernel_size = _check_kernel_size(kernel_size)
    verify = None if verify is None else parse_verify(verify)
    on_gpu = _gpu_array(frames)
    stack = _check_frames(on_gpu if on_gpu is not None else _host_stack(frames))
    count, image_shape = stack.shape[0], tuple(stack.shape[1:])
    windows = (background_window_count if background else window_count)(count, kernel_size)
    shape = (count if background else windows, *image_shape)
    _check_out(out, shape)
    if on_gpu is not None:
        from .engines.cuda import rolling_median_on_gpu
        return rolling_median_on_gpu(stack, kernel_size, windows, shape, out, verify)
    out = _host_out(out, shape, stack)
    _stream_through_engine(stack, image_shape, kernel_size, windows, shape[0], device, out,
                           verify or DEFAULT_VERIFY)
    return out


def _stream_through_engine(stack, image_shape, kernel_size, windows, rows, device, out,
                           verify: str):
    from .devices import fall_back_to_cpu, select_device
    from .engines import engine_for
    from .system import available_cpus

    choice = select_device(device)
    pixels = int(np.prod(image_shape, dtype=np.int64))

    def read_into(start, stop, buffer):
        buffer[:stop - start] = np.asarray(stack[start:stop]).reshape(stop - start, pixels)

    def write_at(offset, medians):
        out[offset:offset + len(medians)] = medians.reshape(len(medians), *image_shape)

    def run_on(device):
        engine = engine_for(device.ready(), image_shape or (1,), kernel_size,
                            min(READ_BATCH, windows), available_cpus(), windows, verify)
        with engine:
            return engine.run(read_into, 0, windows, write_at)

    try:
        last = run_on(choice)
    except Exception as error:
        cpu = fall_back_to_cpu(choice, error, "the medians")
        if cpu is None:
            raise
        last = run_on(cpu)  # every window again: each is written over
    _repeat_rows(out, last.reshape(image_shape), windows, rows)


def _repeat_rows(out, row, start: int, stop: int):
    """``out[start:stop] = row``, in blocks, so an on-disk `out` stays within memory"""
    block = max(1, min(stop - start, (64 << 20) // max(1, row.nbytes)))
    repeated = np.broadcast_to(row, (block, *row.shape))
    for first in range(start, stop, block):
        last = min(stop, first + block)
        out[first:last] = repeated[:last - first]


def _check_kernel_size(kernel_size) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, (int, np.integer)):
        raise ValueError(f"kernel_size must be a positive integer, got {kernel_size!r}.")
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive integer, got {kernel_size}.")
    return int(kernel_size)


def _gpu_array(frames):
    """`frames` as a CuPy array where it lives in GPU memory, else None"""
    if hasattr(frames, "__cuda_array_interface__"):
        import cupy
        return cupy.asarray(frames)
    if _dlpack_kind(frames) in (DLPACK_CUDA, DLPACK_CUDA_MANAGED):
        import cupy
        return cupy.from_dlpack(frames)
    return None


DLPACK_CPU, DLPACK_CUDA, DLPACK_CUDA_MANAGED = 1, 2, 13
"""DLPack's device types of host memory, CUDA device memory and CUDA managed memory"""


def _dlpack_kind(frames) -> int | None:
    """The DLPack device type of an array other than NumPy's, None if it has none"""
    device = getattr(frames, "__dlpack_device__", None)
    if device is None or isinstance(frames, np.ndarray):
        return None
    return int(device()[0])


def _host_stack(frames):
    """`frames` as something with shape, dtype and slicing"""
    if _dlpack_kind(frames) == DLPACK_CPU:  # a torch or JAX array in host memory
        frames = np.from_dlpack(frames)
    if not (hasattr(frames, "shape") and hasattr(frames, "dtype")
            and hasattr(frames, "__getitem__")):
        if isinstance(frames, (list, tuple)):
            frames = np.asarray(frames)
        else:
            raise TypeError(
                f"frames must be an array of uint8 frames (NumPy, CuPy, an h5py dataset, "
                f"a memory map, a torch or JAX array), got {type(frames).__name__}.")
    return frames


def _check_frames(frames):
    """`frames` (on the host or a GPU) if they are uint8 with an axis of events"""
    if np.dtype(frames.dtype) != np.uint8:
        raise TypeError(
            f"frames must be uint8, got {np.dtype(frames.dtype)}; convert them first, e.g. "
            f"with frames.astype('uint8') after scaling to 0…255.")
    if len(frames.shape) == 0:
        raise ValueError("frames must have at least one axis (the events), got a scalar.")
    frame_pixels(frames.shape[1:])
    return frames


def _check_out(out, shape: tuple):
    """Refuse an array `out` of another shape or dtype (where it lives is checked later)"""
    if out is None or not (hasattr(out, "shape") and hasattr(out, "dtype")):
        return
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have the shape {shape}, got {tuple(out.shape)}.")
    if np.dtype(out.dtype) != np.uint8:
        raise TypeError(f"out must be uint8, got {np.dtype(out.dtype)}.")


def _host_out(out, shape: tuple, frames):
    """`out` if it is an array in host memory (see :func:`_check_out`), or a new one"""
    if out is None:
        return np.empty(shape, np.uint8)
    if not (hasattr(out, "shape") and hasattr(out, "dtype") and hasattr(out, "__setitem__")):
        raise TypeError(
            f"out must be a NumPy array, memory map or h5py dataset, got "
            f"{type(out).__name__}.")
    if isinstance(out, np.ndarray) and isinstance(frames, np.ndarray) and (
            np.may_share_memory(out, frames) or _same_file_bytes(out, frames)):
        raise overlap_error()
    return out


def _same_file_bytes(out: np.ndarray, frames: np.ndarray) -> bool:
    """Whether `out` and `frames` map overlapping bytes of one file (memory maps or their views)

    Two memory maps of one file are separate arrays in memory, so
    ``np.may_share_memory`` does not see that writing one changes the other.
    """
    written, read = _mapped_bytes(out), _mapped_bytes(frames)
    if written is None or read is None or written[0] != read[0] or written[3] == "c":
        return False  # not both in one file, or out is copy-on-write: its writes stay in memory
    return written[1] < read[2] and read[1] < written[2]


def _mapped_bytes(array: np.ndarray) -> tuple[tuple[int, int], int, int, str] | None:
    """The file a memory-mapped array is in (device, inode), its first and end byte there
    and the memory map's mode; None where it is no memory map of a named file or view of one
    """
    if array.size == 0:
        return None
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    # the array numpy.memmap made over the mapping, `offset` bytes into the file
    if not (isinstance(root, np.memmap) and isinstance(root.base, mmap.mmap) and root.filename):
        return None
    try:
        info = os.stat(root.filename)
    except OSError:
        return None
    low, high = byte_bounds(array)
    start = root.offset + low - byte_bounds(root)[0]
    return (info.st_dev, info.st_ino), start, start + high - low, root.mode


__all__ = ["rolling_median", "rolling_median_background"]
