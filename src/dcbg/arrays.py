"""Rolling medians of arrays: NumPy arrays, memory maps, h5py datasets and CUDA arrays

:func:`rolling_median` gives the median of every window of ``kernel_size``
frames, :func:`rolling_median_background` dcnum's rolling-median background
(one row per frame), of uint8, uint16, int8 or int16 frames (see
:mod:`dcbg.dtypes`). Both run on the engines that compute ``image_bg`` of
files, on the device ``device`` picks, and give the same bytes on every
device:

- arrays in host memory (NumPy arrays, memory maps, h5py datasets, any
  array-like with ``shape``, ``dtype`` and slicing) are read batch by batch
  and their medians written batch by batch, with the reader and the writer
  of files (:class:`~dcbg.rtdc.reader.ImageSource`,
  :func:`~dcbg.rtdc.writer.stack_writer`): h5py datasets have their chunks
  decoded and encoded in a pool of threads where their layout allows, and
  an ``out`` on disk (a memory map or an h5py dataset) keeps the memory
  bounded for any number of frames;
- arrays in GPU memory (CuPy, or anything with ``__cuda_array_interface__``
  or DLPack, such as torch or JAX arrays) are computed where they are, without
  a copy through host memory, and come back as CuPy arrays.

A GPU's results are checked against the CPU kernel (``verify``, see
:mod:`dcbg.engines.verification`): for host arrays a sample of every batch,
as for files; for GPU arrays, which stay on the GPU, a sample of the first
call per process, GPU, width of the kernel's counts and dtype, unless asked
otherwise. GPU arrays of every supported dtype go to the GPU kernels as they
are: the kernels order signed values themselves, so nothing is flipped on
the host.
"""
from __future__ import annotations

import concurrent.futures
import mmap
import os

import numpy as np

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # NumPy 1
    byte_bounds = np.byte_bounds

from .dtypes import check_frame_dtype, flip_sign_bit, kernel_dtype, sign_bit
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
    frames: array-like of uint8, uint16, int8 or int16, shape (N, ...)
        The frames, events along the first axis; any further axes are
        pixels. Signed values are ordered as numbers. A NumPy array, memory
        map, h5py dataset or other array-like is read in batches; a CuPy
        array (or a CUDA array with ``__cuda_array_interface__`` or DLPack,
        e.g. a torch tensor) is computed on its own GPU.
    kernel_size: int
        Frames per window, at least 1 and at most N.
    device: str
        "auto", "cpu", "cuda", "cuda:N" or "cuda:all" for host arrays (see
        :func:`dcbg.devices.select_device`); the result never depends on it.
        GPU arrays are computed on the GPU that holds them.
    out: array-like, optional
        Where to put the result: an array of shape ``(N - kernel_size + 1,
        ...)`` and the dtype of `frames` (NumPy array, memory map or h5py
        dataset for host input; a CuPy array on the same GPU for GPU input),
        which can be written. It must not share storage with `frames`, since
        later windows still read frames that earlier results would
        overwrite: an `out` that overlaps them in memory, or in the file both
        map (two memory maps of one file), and the frames' own h5py dataset
        are refused; overlaps dcbg cannot see (an h5py dataset in the file
        of a memory map, say) give wrong results.
    verify: str, optional
        Which of a GPU's medians the CPU recomputes and compares: "sample"
        (a spread sample of every batch), "all" or "off". By default a sample
        of every batch for host arrays; for GPU arrays a sample of the first
        call per process, GPU, width of the kernel's counts and dtype (a
        checked call copies the sampled pixels to the host and waits for
        them). The CPU ignores it; the result never depends on it.

    Returns
    -------
    medians: numpy.ndarray or cupy.ndarray
        `out` if given; otherwise a new array of the dtype of `frames` (in
        this machine's byte order), a CuPy array for GPU input.
        For GPU input the work is ordered after what the caller's current
        CuPy stream holds and the result is ready on that stream.

    Raises
    ------
    TypeError
        If `frames` is no array of uint8, uint16, int8 or int16 (floats,
        bool, 32- and 64-bit integers are refused), or `out` has another
        dtype than `frames`.
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
    stack = on_gpu if on_gpu is not None else _host_stack(frames)
    dtype = check_frame_dtype(stack.dtype)
    _check_axes(stack)
    count, image_shape = stack.shape[0], tuple(stack.shape[1:])
    windows = (background_window_count if background else window_count)(count, kernel_size)
    shape = (count if background else windows, *image_shape)
    _check_out(out, shape, dtype)
    if on_gpu is not None:
        # GPU arrays stay on their GPU, the last window's repeats included: the host's
        # StackWriter.write_repeated would copy them through host memory
        from .engines.cuda import rolling_median_on_gpu
        return rolling_median_on_gpu(stack, kernel_size, windows, shape, out, verify)
    out = _host_out(out, shape, stack, dtype)
    _stream_through_engine(stack, dtype, kernel_size, windows, shape[0], device, out,
                           verify or DEFAULT_VERIFY)
    return out


def _stream_through_engine(stack, dtype: np.dtype, kernel_size, windows, rows, device, out,
                           verify: str):
    """Windows ``0 … windows-1`` of `stack` into `out`, whose later rows repeat the last

    The frames are read by the file engines' reader and the medians written
    by their writer. Signed frames are flipped into unsigned values of the
    same order as they are read, and their medians flipped back as they are
    written (see :mod:`dcbg.dtypes`), so the engines see unsigned values
    only.
    """
    from .devices import fall_back_to_cpu, select_device
    from .engines import engine_for
    from .rtdc.reader import ImageSource
    from .rtdc.writer import stack_writer
    from .settings import decide_run_settings

    settings = decide_run_settings(verify=verify)  # the codec threads and CPU workers
    choice = select_device(device)
    bit = sign_bit(dtype)
    engine_dtype = kernel_dtype(dtype)
    image_shape = tuple(stack.shape[1:]) or (1,)
    with concurrent.futures.ThreadPoolExecutor(settings.io_threads,
                                               thread_name_prefix="dcbg-io") as pool:
        source = ImageSource(stack, pool=pool, image_rules=False)

        def read_into(start, stop, buffer):
            source.read_into(start, stop, buffer.view(dtype))
            flip_sign_bit(buffer[:stop - start], bit)

        def run_on(device):
            writer = stack_writer(out, pool)  # a fresh one: a retry writes every frame again

            def write_at(offset, medians):
                flip_sign_bit(medians, bit)
                try:
                    writer.write_at(offset, medians.view(dtype))
                finally:
                    flip_sign_bit(medians, bit)  # the engine's buffer, as the engine left it

            engine = engine_for(device.ready(engine_dtype), image_shape, kernel_size,
                                min(READ_BATCH, windows), settings.num_cpus, windows,
                                settings.verify, engine_dtype)
            with engine:
                last = engine.run(read_into, 0, windows, write_at)
            flip_sign_bit(last, bit)
            writer.write_repeated(windows, last.view(dtype), rows - windows)
            writer.check_complete()

        try:
            run_on(choice)
        except Exception as error:
            cpu = fall_back_to_cpu(choice, error, "the medians")
            if cpu is None:
                raise
            run_on(cpu)


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
                f"frames must be an array of frames (NumPy, CuPy, an h5py dataset, a memory "
                f"map, a torch or JAX array), got {type(frames).__name__}.")
    return frames


def _check_axes(frames):
    """Refuse `frames` (on the host or a GPU) without an axis of events or without pixels"""
    if len(frames.shape) == 0:
        raise ValueError("frames must have at least one axis (the events), got a scalar.")
    frame_pixels(frames.shape[1:])


def _check_out(out, shape: tuple, dtype: np.dtype):
    """Refuse an array `out` of another shape or dtype (where it lives is checked later)

    The byte order may differ from the frames': assigning to `out` swaps the bytes.
    """
    if out is None or not (hasattr(out, "shape") and hasattr(out, "dtype")):
        return
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have the shape {shape}, got {tuple(out.shape)}.")
    if np.dtype(out.dtype).newbyteorder("=") != dtype:
        raise TypeError(f"out must be {dtype}, the dtype of the frames, got "
                        f"{np.dtype(out.dtype)}.")


def _host_out(out, shape: tuple, frames, dtype: np.dtype):
    """`out` if it is an array in host memory (see :func:`_check_out`), or a new one"""
    if out is None:
        return np.empty(shape, dtype)
    if not (hasattr(out, "shape") and hasattr(out, "dtype") and hasattr(out, "__setitem__")):
        raise TypeError(
            f"out must be a NumPy array, memory map or h5py dataset, got "
            f"{type(out).__name__}.")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError("out is read-only (a memory map opened with mode 'r', or a view "
                         "that cannot be written); give an array that can be written.")
    if getattr(getattr(out, "file", None), "mode", None) == "r":  # an h5py dataset
        raise ValueError(f"out is a dataset of {out.file.filename}, which is open read-only; "
                         f"open the file with mode 'a' or 'r+' to write the medians into it.")
    if isinstance(out, np.ndarray) and isinstance(frames, np.ndarray) and (
            np.may_share_memory(out, frames) or _same_file_bytes(out, frames)):
        raise overlap_error()
    if _same_h5py_dataset(out, frames):
        raise overlap_error()
    return out


def _same_h5py_dataset(out, frames) -> bool:
    """Whether `out` and `frames` are one h5py dataset, through one file handle or two

    Its medians would overwrite frames that a run falling back from a GPU to
    the CPU, or another range of ``cuda:all``, still reads.
    """
    if not all(hasattr(array, "file") and hasattr(array, "name") for array in (out, frames)):
        return False
    from .rtdc.basins import same_file
    return out.name == frames.name and same_file(out.file.filename, frames.file.filename)


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
