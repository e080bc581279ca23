"""The interface every engine implements"""
from __future__ import annotations

import abc
import typing

import numpy as np


def count_dtype(kernel_size: int) -> np.dtype:
    """Smallest unsigned type for histogram counts of a window of `kernel_size` frames

    A count never exceeds the window, so 8 bits serve kernel sizes up to 255.
    """
    if kernel_size <= 0xFF:
        return np.dtype(np.uint8)
    if kernel_size <= 0xFFFF:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def frame_pixels(image_shape) -> int:
    """Pixels of a frame of `image_shape`; refuses frames without any

    Raises
    ------
    ValueError
        If an axis of the frame is empty.
    """
    pixels = int(np.prod(tuple(image_shape), dtype=np.int64))
    if pixels == 0:
        raise ValueError(f"The frames have no pixels (frame shape {tuple(image_shape)}); "
                         f"give frames with at least one pixel.")
    return pixels


class Engine(abc.ABC):
    """Computes rolling medians of a range of windows on one kind of device

    An engine owns its resources (worker processes or threads, GPU memory)
    from ``__enter__`` to ``__exit__``. :meth:`run` plans its own batches,
    reads the input frames each batch needs with `read_into`, and hands
    every computed window to `write_at`; the writer has the dataset's full
    size already, so windows may arrive in any order.

    An engine computes frames of one dtype, its :attr:`dtype`: the buffers
    `read_into` fills and the medians `write_at` gets are of that dtype,
    signed or not, holding the caller's values as they are. An engine that
    takes signed frames orders them as signed numbers itself (its kernels
    flip the sign bit); an engine built for unsigned frames computes them
    as unsigned values, whatever a caller made them of.

    Parameters
    ----------
    image_shape: tuple of int
        Shape of one frame.
    kernel_size: int
        Number of frames per window.
    batch_windows: int
        Most windows the engine computes at once (its batch; on a GPU, the
        device batch). Not the method's ``batch_size`` keyword, which only
        names the run in its PPID and bounds the CPU engine's batches; the
        result never depends on either.
    dtype: numpy.dtype, optional
        Of the frames and medians (uint8 by default).

    Raises
    ------
    ValueError
        If the frames have no pixels.
    """

    def __init__(self, image_shape, kernel_size: int, batch_windows: int, dtype=np.uint8):
        self.image_shape = tuple(image_shape)
        self.pixels = frame_pixels(self.image_shape)
        self.kernel_size = kernel_size
        self.batch_windows = batch_windows
        """most windows per batch in this engine"""
        self.dtype = np.dtype(dtype)
        """the dtype of the frames and medians this engine computes"""
        self.stage_seconds: dict[str, float] = {}
        """seconds spent per stage (read, median, write) in the last run"""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def facts(self) -> dict:
        """What ran, for the run log: workers started, batch sizes (JSON values)"""
        return {"batch_windows": self.batch_windows}

    @abc.abstractmethod
    def close(self):
        """Give the engine's resources back (worker processes, GPU memory)"""

    @abc.abstractmethod
    def run(self, read_into: typing.Callable, first: int, stop: int,
            write_at: typing.Callable, on_written: typing.Callable | None = None
            ) -> np.ndarray:
        """Compute windows ``first … stop-1``

        Parameters
        ----------
        read_into: callable
            ``read_into(start, stop, out)`` fills ``out[:stop-start]`` with
            input frames ``start … stop-1`` flattened to ``(n, pixels)``, of
            the engine's dtype; it may be called from several threads.
        first, stop: int
            The windows to compute.
        write_at: callable
            ``write_at(offset, medians)`` stores flattened medians of
            windows ``offset …`` (of the engine's dtype); it may be called
            from several threads, and may change `medians` while it runs if
            it puts them back before it returns, so an engine reads a
            buffer it handed to `write_at` only after that call returned.
        on_written: callable, optional
            Called with a number of windows whenever some were written.

        Returns
        -------
        last: np.ndarray
            The flattened background of window ``stop-1``.
        """
