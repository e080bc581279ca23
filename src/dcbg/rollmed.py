"""The rolling-median background (PPID code "rollmed")"""
from __future__ import annotations

from .base import Background
from .cpu import CPURollingMedian
from .devices import select_device
from .errors import UnknownKeywordError
from .pipeline import plan_batches
from .reference import check_stack_length, computed_frame_count


class BackgroundRollMed(Background):
    """Rolling median RT-DC background image computation

    For every frame and pixel, the background is the median over the next
    `kernel_size` frames (the upper middle element, no averaging); the last
    `kernel_size` frames repeat the background of frame ``N-k-1``. The result
    is byte-identical to dcnum 0.31's ``BackgroundRollMed`` and does not
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
        Number of CPU worker processes; defaults to the CPUs available.
    device: str
        "auto", "cpu", "cuda", "cuda:N" or "cuda:all" (see :mod:`dcbg.devices`).
    """

    def __init__(self, input_data, output_path, kernel_size=100, batch_size=10000,
                 compress=True, num_cpus=None, device="auto", **unknown):
        if unknown:
            raise UnknownKeywordError(
                f"BackgroundRollMed has no keyword {sorted(unknown)[0]!r}; its keywords are "
                f"kernel_size, batch_size, compress, num_cpus and device.")
        super().__init__(input_data=input_data, output_path=output_path, compress=compress,
                         num_cpus=num_cpus, kernel_size=kernel_size, batch_size=batch_size)
        self.kernel_size = kernel_size
        """number of frames per median window"""
        self.batch_size = batch_size
        """number of frames processed at once"""
        try:
            self.device = select_device(device)
            """the device that computes the median (:class:`dcbg.devices.DeviceChoice`)"""
        except BaseException:
            self.close()
            raise

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

    def validate_input(self):
        check_stack_length(self.image_count, self.kwargs["kernel_size"])

    def process_approach(self):
        """Compute all batches on the selected device, then repeat the last frame"""
        k, count = self.kernel_size, self.image_count
        computed = computed_frame_count(count, k)
        batch_size = min(self.batch_size, computed)
        if self.device.split:  # ranges of windows, each written at its own offset
            from .cuda import SplitRollingMedian
            engine = SplitRollingMedian(self.image_shape, k, batch_size, self.device.indices)
            self.writer.preallocate(computed)
            work, write = computed, self.writer.write_at
        else:
            if self.device.kind == "cuda":
                from .cuda import CUDARollingMedian
                engine = CUDARollingMedian(self.image_shape, k, batch_size, self.device.index)
            else:
                engine = CPURollingMedian(self.image_shape, k, batch_size, self.num_cpus)
            work, write = plan_batches(count, k, engine.batch_size), self.writer.append
        self.logger.info("Rolling median of %d frames %s, k=%d on %s (%s)", count,
                         self.image_shape, k, self.device, self.device.reason)
        with engine:
            try:
                last = engine.run(self.source.read_into, work, write, self._count_written)
            finally:
                self.stage_seconds.update(engine.stage_seconds)
        self.writer.append_repeated(last, count - computed)

    def log_device(self):
        return self.device
