"""The rolling-median background (PPID code "rollmed")"""
from __future__ import annotations

from .background import Background
from .errors import UnknownKeywordError
from .windows import background_window_count, check_stack_length


class BackgroundRollMed(Background):
    """Rolling median RT-DC background image computation

    For every frame and pixel, the background is the median over the next
    `kernel_size` frames (the upper middle element, no averaging); the last
    `kernel_size` frames repeat the background of frame ``N-k-1`` (see
    :func:`dcbg.reference.rolling_median_reference`). The result is
    byte-identical to dcnum 0.31's ``BackgroundRollMed`` and does not
    depend on `batch_size`, the device or the number of workers.

    Parameters
    ----------
    input_data: path-like or array-like
        .rtdc file or uint8 image stack (see :class:`dcbg.Background`).
    output_path: path-like
        Output .rtdc file; the input path itself writes into the input.
    kernel_size: int
        Number of frames per median window (positive, even).
    batch_size: int
        Number of frames processed at once (larger than `kernel_size`).
        Larger batches cost more memory and do not change the result.
    compress: bool or str
        True for zstd level 5, False for none, or "zstd-1" … "zstd-9".
    num_cpus: int, optional
        Number of CPU workers; defaults to the CPUs available.
    device: str
        "auto", "cpu", "cuda", "cuda:N" or "cuda:all" (see :mod:`dcbg.devices`).
    io_threads: int, optional
        Threads that decode and encode HDF5 chunks (see :class:`dcbg.Background`).
    verify: str
        "sample" (default), "all" or "off": which pixels of every GPU batch the
        CPU checks before it is written (see :class:`dcbg.Background`).
    """

    def __init__(self, input_data, output_path, kernel_size=100, batch_size=10000,
                 compress=True, num_cpus=None, device="auto", io_threads=None,
                 verify="sample", **unknown):
        if unknown:
            raise UnknownKeywordError(
                f"BackgroundRollMed has no keyword {sorted(unknown)[0]!r}; its keywords are "
                f"kernel_size, batch_size, compress, num_cpus, device, io_threads and "
                f"verify.")
        super().__init__(input_data=input_data, output_path=output_path, compress=compress,
                         num_cpus=num_cpus, device=device, io_threads=io_threads,
                         verify=verify, kernel_size=kernel_size, batch_size=batch_size)

    @property
    def kernel_size(self) -> int:
        """number of frames per median window"""
        return self.kwargs["kernel_size"]

    @property
    def batch_size(self) -> int:
        """number of frames processed at once"""
        return self.kwargs["batch_size"]

    @staticmethod
    def check_user_kwargs(*, kernel_size: int = 100, batch_size: int = 10000):
        """Check the keyword arguments of the rolling median

        Parameters
        ----------
        kernel_size: int
            Number of frames per median window; a positive even integer.
        batch_size: int
            Number of frames processed at once; an integer larger than
            `kernel_size`.

        Raises
        ------
        ValueError
            If a rule above is broken.
        """
        for name, value in (("kernel_size", kernel_size), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}.")
        if kernel_size <= 0 or kernel_size % 2:
            raise ValueError(
                f"kernel_size must be a positive even integer, got {kernel_size}.")
        if batch_size <= kernel_size:
            raise ValueError(
                f"batch_size must be larger than kernel_size ({kernel_size}), "
                f"got {batch_size}.")

    @classmethod
    def check_event_count(cls, events: int, kwargs: dict):
        """Refuse an input with fewer events than `kernel_size`"""
        check_stack_length(events, kwargs["kernel_size"])

    def process_approach(self):
        """Compute every window on the chosen device, then repeat the last one"""
        from .engines import engine_for
        k, count = self.kernel_size, self.image_count
        windows = background_window_count(count, k)
        with engine_for(self.ready_device, self.image_shape, k, min(self.batch_size, windows),
                        self.num_cpus, windows, self.verify) as engine:
            self.logger.info("Rolling median of %d frames %s, k=%d on %s (%s)", count,
                             self.image_shape, k, self.device, self.device.reason)
            try:
                last = engine.run(self.source.read_into, 0, windows, self.writer.write_at,
                                  self._count_written)
            finally:
                self.stage_seconds.update(engine.stage_seconds)
                self.engine_facts = engine.facts()
        self.writer.write_repeated(windows, last, count - windows)
        self._count_written(count - windows)
