"""CUDA engine: the rolling-median kernel in an overlapped copy/compute pipeline

A batch flows through five stages that overlap:

1. a reader thread reads and decodes the next batches into pinned buffers,
2. the upload stream copies a batch to the device,
3. the compute stream runs the kernel on it,
4. the download stream copies its medians back into a pinned buffer, queued
   right after the kernel,
5. the writer thread waits for that download, checks a sample of its
   pixels against the CPU kernel (:mod:`~dcbg.engines.verification`) and
   encodes and writes it while the next batches are read, uploaded and
   computed.

Events order the streams: an upload waits until the kernel that read its
device buffer before is done, a kernel waits for its upload and for the
download of the output buffer it reuses, a download waits for its kernel.
The host waits (on blocking-sync events, which sleep instead of spinning a
core) only where it hands a pinned buffer to a thread: the reader gets an
input buffer back once its upload is done, the writer writes an output
buffer once its download is done. The pixels of a batch's frames that its
check needs are copied out of the input buffer before the reader gets it
back.

Frames of uint8, int8, uint16 and int16 go through the same pipeline in
buffers of their dtype: the kernel of their dtype orders signed values by
flipping their sign bit on the GPU, so the host copies the values the
engine is given as they are (the array functions give it unsigned ones),
and the check recomputes them in their own order.

The kernel and its launch plans come from :mod:`~dcbg.engines.cudakernel`;
batch sizes and the page-locked buffers, kept across runs, from
:mod:`~dcbg.engines.cudamemory`. If memory runs out anyway, the buffers are
released, the batch is halved and the run goes on; the result never depends
on the batch size.
"""
from __future__ import annotations

import gc
import itertools
import logging
import threading

import numpy as np

from ..errors import DeviceError, first_line, overlap_error, setting_error
from . import cudakernel, cudamemory, verification
from .base import Engine
from .batches import Prefetcher, WriterThread, plan_windows
from .cudacontext import on_device, use_device

logger = logging.getLogger(__name__)


class CUDARollingMedian(Engine):
    """Rolling-median engine on one CUDA device

    Parameters
    ----------
    image_shape: tuple of int
        Shape of one frame.
    kernel_size: int
        Number of events in each window.
    windows: int
        Most windows a device batch needs (the windows of the run); the
        device batch, :attr:`batch_windows`, is sized by device and host
        memory within it (see :func:`~dcbg.engines.cudamemory.device_batch_size`).
    kernels: dcbg.engines.cudakernel.CompiledKernels
        The module of kernels that computes frames of `dtype`, loaded on the
        device that computes, as the ready device holds them
        (:meth:`dcbg.devices.ReadyDevice.kernels_for`).
    memory_share: float
        Part of the device's free memory this engine may plan with (engines
        that share a device split it).
    free_bytes: int, optional
        The device's free memory, when the caller read it once for several
        engines; read now by default.
    host_share: float
        Part of the page-locked host memory budget this engine may plan with
        (engines that run at once split it).
    host_bytes: int, optional
        The page-locked host memory budget; by default a share of the
        memory available now (:func:`~dcbg.engines.cudamemory.pinned_memory_budget`).
    verify: str
        "sample", "all" or "off": which pixels of every batch the CPU
        recomputes and compares before the batch is written
        (see :mod:`~dcbg.engines.verification`).
    dtype: numpy.dtype, optional
        Of the frames and medians: uint8 (default), int8, uint16 or int16.

    Raises
    ------
    TypeError
        If the GPU kernels take no frames of `dtype`.
    ValueError
        If `kernels` is another module than the one of `dtype`'s kernels.
    MemoryError
        If not even a batch of one window fits.
    """

    def __init__(self, image_shape, kernel_size, windows,
                 kernels: cudakernel.CompiledKernels, memory_share: float = 1.0,
                 free_bytes: int | None = None, host_share: float = 1.0,
                 host_bytes: int | None = None, verify: str = "sample", dtype=np.uint8):
        import cupy

        super().__init__(image_shape, kernel_size, windows, dtype)
        self.cupy = cupy
        self.device_index = kernels.device_index
        """the CUDA ordinal of the device that computes"""
        device_index = self.device_index
        self.verify = verify
        self.result_check = verification.ResultCheck(verify, kernel_size, self.image_shape,
                                                     device_index, self.dtype)
        """the check of the last run's results against the CPU"""
        self.launcher = cudakernel.Launcher(device_index, self.pixels, kernel_size, kernels,
                                            self.dtype)
        """the kernel's launches on this device, each batch length planned once"""
        free = cudamemory.free_device_memory(device_index) if free_bytes is None else free_bytes
        host = cudamemory.pinned_memory_budget() if host_bytes is None else host_bytes
        self.batch_windows = cudamemory.device_batch_size(
            windows, kernel_size, self.pixels, free, host, memory_share, host_share,
            fill_windows=self.launcher.windows_to_fill(), itemsize=self.dtype.itemsize)
        logger.info("Device batches of %d windows (%.0f MiB free on the device, share %.2f; "
                    "%s of page-locked host memory, share %.2f)", self.batch_windows,
                    free / 2**20, memory_share,
                    "no limit" if host is None else f"{host / 2**20:.0f} MiB", host_share)

    def facts(self) -> dict:
        """The device batch, and the pixel-outputs the last run checked against the CPU"""
        return {"batch_windows": self.batch_windows,
                "verified_pixel_outputs": self.result_check.pixel_outputs}

    def close(self):
        """Nothing to give back: a run returns its page-locked buffers to the process's keep

        They serve the next file; memory that runs out releases them, and
        so does the end of the process.
        """

    def run(self, read_into, first, stop, write_at, on_written=None) -> np.ndarray:
        """Compute windows ``first … stop-1`` with every stage overlapped

        If the device or the host runs out of (page-locked) memory, at the
        start or in the middle (another process took memory), the batch
        size is halved and the run goes on from the first window not yet
        written; the result stays the same.

        Raises
        ------
        GPUResultError
            If a median differs from the CPU's recomputation of it.
        DeviceError
            If the device or the kernel fails.
        MemoryError
            If not even a batch of one window fits.
        """
        cupy = self.cupy
        written = 0

        def counted_write(offset, frames):
            nonlocal written
            write_at(offset, frames)
            written += len(frames)

        self.stage_seconds = {}
        self.result_check = verification.ResultCheck(self.verify, self.kernel_size,
                                                     self.image_shape, self.device_index,
                                                     self.dtype)
        with on_device(self.device_index):  # the thread's device for the whole run
            while True:
                batches = plan_windows(first + written, stop, self.kernel_size,
                                       self.batch_windows)
                try:
                    return self._run_batches(read_into, batches, counted_write, on_written)
                except (cupy.cuda.memory.OutOfMemoryError,
                        cudamemory.PinnedMemoryError) as error:
                    smaller = self.batch_windows // 2
                    if smaller < 1:
                        raise setting_error(
                            MemoryError, "CUDA device {index} is out of memory even for one "
                            "frame ({reason}); free GPU memory or use {setting}.", "device",
                            suggested=("cpu",), index=self.device_index,
                            reason=first_line(error)) from error
                    failure = first_line(error)
                except (cupy.cuda.runtime.CUDARuntimeError,
                        cupy.cuda.driver.CUDADriverError) as error:
                    raise setting_error(
                        DeviceError, "CUDA device {index} failed while computing the median "
                        "({reason}); no output was kept; check the GPU with nvidia-smi, or use "
                        "{setting}.", "device", suggested=("cpu",), index=self.device_index,
                        reason=first_line(error)) from error
                # Released only here, out of the except block: until it ends, the
                # exception's traceback keeps the failed attempt's buffers referenced,
                # and memory still referenced is not freed. A frame that holds the
                # exception makes a cycle that only the collector breaks.
                gc.collect()
                self._release_memory()
                logger.warning("CUDA device %d ran out of memory with batches of %d frames "
                               "(%s); going on from frame %d with batches of %d",
                               self.device_index, self.batch_windows, failure,
                               first + written, smaller)
                self.batch_windows = smaller

    def _release_memory(self):
        cudamemory.pinned_buffers.release(self.device_index)
        try:
            cudamemory.release_device_memory(self.device_index)
        except self.cupy.cuda.runtime.CUDARuntimeError:
            pass  # a broken context frees nothing; the next allocation says so

    def _run_batches(self, read_into, batches, write_at, on_written) -> np.ndarray:
        cupy = self.cupy
        rows, out_rows = self.batch_windows + self.kernel_size - 1, self.batch_windows
        pinned_in_count, pinned_out_count = cudamemory.PINNED_BUFFERS
        device_in_count, device_out_count = cudamemory.DEVICE_BUFFERS
        streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(3)]
        device_in = [cupy.empty((rows, self.pixels), self.dtype)
                     for _ in range(device_in_count)]
        device_out = [cupy.empty((out_rows, self.pixels), self.dtype)
                      for _ in range(device_out_count)]
        pinned = cudamemory.pinned_buffers.take(self.device_index, rows, self.pixels,
                                                pinned_in_count, self.dtype)
        try:
            pinned += cudamemory.pinned_buffers.take(self.device_index, out_rows,
                                                     self.pixels, pinned_out_count,
                                                     self.dtype)
        except BaseException:
            cudamemory.pinned_buffers.give_back(self.device_index, pinned)
            raise
        settled = False
        try:
            last = self._pipeline(read_into, batches, write_at, on_written, streams,
                                  device_in, device_out, pinned[:pinned_in_count],
                                  pinned[pinned_in_count:])
            settled = True
        finally:
            # A failed run may leave copies in flight: its buffers are kept
            # only once the streams are known to be idle.
            if settled or self._settle(streams):
                cudamemory.pinned_buffers.give_back(self.device_index, pinned)
        return last

    def _settle(self, streams) -> bool:
        try:
            for stream in streams:
                stream.synchronize()
        except Exception:  # noqa: BLE001 - a broken context: the buffers are dropped
            return False
        return True

    def _pipeline(self, read_into, batches, write_at, on_written, streams, device_in,
                  device_out, pinned_in, pinned_out) -> np.ndarray:
        cupy = self.cupy
        upload, compute, download = streams
        downloads: dict[int, object] = {}  # window offset → event of its download
        samples: dict[int, object] = {}  # window offset → its frames' pixels to check
        check = self.result_check

        def write_when_downloaded(offset, frames):
            use_device(self.device_index)  # the writer thread's device: waits in its context
            downloads.pop(offset).synchronize()
            check.check(samples.pop(offset), frames, offset)
            write_at(offset, frames)

        prefetcher = Prefetcher(read_into, batches, pinned_in)
        writer = WriterThread(write_when_downloaded, pinned_out, on_written)
        kernel_done: list = [None] * len(device_in)  # per input buffer: the kernel that read it
        downloaded: list = [None] * len(device_out)  # per output buffer: the download that read it
        timings: list[tuple[str, object, object]] = []
        final = None
        try:
            for batch, frames in prefetcher:
                slot_in = batch.index % len(device_in)
                slot_out = batch.index % len(device_out)
                if kernel_done[slot_in] is not None:
                    upload.wait_event(kernel_done[slot_in])
                start = upload.record()
                device_in[slot_in][:batch.input_size].set(frames, stream=upload)
                uploaded = upload.record(cupy.cuda.Event(block=True))
                timings.append(("upload", start, uploaded))

                compute.wait_event(uploaded)
                if downloaded[slot_out] is not None:
                    compute.wait_event(downloaded[slot_out])
                start = compute.record()
                self.launcher.launch(device_in[slot_in], device_out[slot_out],
                                     batch.output_size, compute)
                computed = kernel_done[slot_in] = compute.record()
                timings.append(("median", start, computed))

                buffer = writer.acquire()
                download.wait_event(computed)
                start = download.record()
                device_out[slot_out][:batch.output_size].get(
                    stream=download, out=buffer[:batch.output_size], blocking=False)
                downloaded[slot_out] = download.record(cupy.cuda.Event(block=True))
                timings.append(("download", start, downloaded[slot_out]))
                downloads[batch.start] = downloaded[slot_out]
                # copied while the upload runs: the reader refills this buffer next
                samples[batch.start] = check.take_frames(
                    frames, self.launcher.plan(batch.output_size).block, batch.start)
                writer.submit(batch.start, buffer, batch.output_size)
                final = (batch, buffer, downloaded[slot_out])

                uploaded.synchronize()  # the reader may refill this pinned buffer now
                prefetcher.release()
        except BaseException:
            prefetcher.close()
            try:
                writer.close()
            except BaseException:  # the first failure is the one to report
                pass
            raise
        else:
            prefetcher.close()
            writer.close()
            last = None
            if final is not None:
                # Taken once every write has returned, since write_at may change a buffer
                # while it writes it (the array functions flip signed values there); no
                # download follows, so the buffer still holds the last batch's medians.
                batch, buffer, _ = final
                last = buffer[batch.output_size - 1].copy()
        finally:
            self._add_seconds("read", prefetcher.seconds)
            self._add_seconds("write", writer.seconds)
            if check.active:  # the run's checks so far, through every retry
                self.stage_seconds["verify"] = check.seconds
        for stage, start, end in timings:  # all device work is done by now
            self._add_seconds(stage, cupy.cuda.get_elapsed_time(start, end) / 1e3)
        return last

    def _add_seconds(self, stage: str, seconds: float):
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds


_checked_gpu_arrays: set[tuple[int, str, str]] = set()
"""(device, kernel entry point, dtype) whose GPU-array results this process has checked
against the CPU: one entry point per kernel family and count width, which int16 and uint16
frames share with different values to order"""

_checked_lock = threading.Lock()

_array_checks = itertools.count()
"""Numbers the checks of GPU arrays, so that each samples other pixels"""


def rolling_median_on_gpu(frames, kernel_size: int, windows: int, shape: tuple, out,
                          verify: str | None = None):
    """Rolling medians of frames in GPU memory, computed where they are

    One launch on the caller's current stream of the frames' device: no
    copy through host memory, the work ordered after what the stream holds
    and the result ready on it. A checked call (see `verify`) then copies
    the sampled pixels of the frames and the result to the host in one
    copy on that stream, waits for it, and compares them with the CPU
    kernel's (see :mod:`~dcbg.engines.verification`).

    Parameters
    ----------
    frames: cupy.ndarray
        Frames of uint8, int8, uint16 or int16, events along the first axis
        (checked by the caller).
    kernel_size: int
        Frames per window.
    windows: int
        Windows to compute, from the first on.
    shape: tuple of int
        Shape of the result: `windows` rows, or more, which repeat the
        last window (dcnum's background).
    out: cupy.ndarray or None
        Where the result goes (of `shape` and the frames' dtype, checked by the
        caller; it must be on the frames' device).
    verify: str or None
        "sample" or "all" checks this call, "off" none; None checks a sample
        of the first call per process, GPU, dtype and width of the kernel's
        counts.

    Returns
    -------
    result: cupy.ndarray
        `out`, or a new array of the frames' dtype on their device.

    Raises
    ------
    TypeError
        If the GPU kernels take no frames of this dtype, or `out` is no CuPy
        array on the frames' GPU.
    GPUResultError
        If a checked median differs from the CPU's.
    """
    import cupy

    count = frames.shape[0]
    pixels = int(np.prod(shape[1:], dtype=np.int64))
    dtype = np.dtype(frames.dtype)
    device = frames.device.id
    if out is not None and (not isinstance(out, cupy.ndarray) or out.device.id != device):
        raise TypeError(f"out must be a CuPy array on GPU {device}, where the frames are.")
    if out is not None and np.dtype(out.dtype) != dtype:  # the kernel would write past it
        raise TypeError(f"out must be {dtype}, as the frames are, got {np.dtype(out.dtype)}.")
    if out is not None and cupy.may_share_memory(out, frames):
        raise overlap_error()
    launcher = cudakernel.launcher_for(device, pixels, kernel_size, dtype)
    with on_device(device):
        stream = cupy.cuda.get_current_stream()
        flat = cupy.ascontiguousarray(frames).reshape(count, pixels)
        direct = out is not None and out.flags.c_contiguous
        result = out if direct else cupy.empty(shape, dtype)
        medians = result.reshape(shape[0], pixels)
        launcher.launch(flat, medians, windows, stream)
        if shape[0] > windows:
            medians[windows:] = medians[windows - 1]
        first_call = (device, cudakernel.kernel_name(kernel_size, dtype), dtype.str)
        if verify is None:
            with _checked_lock:
                mode = "off" if first_call in _checked_gpu_arrays else "sample"
        else:
            mode = verify
        if mode != "off":
            check = verification.ResultCheck(mode, kernel_size, shape[1:], device, dtype)
            columns = check.columns(launcher.plan(windows).block, next(_array_checks))
            frames_part, medians_part = _sampled_on_host(cupy, flat, medians[:windows],
                                                         columns)
            check.compare(frames_part, medians_part, columns)
            with _checked_lock:  # only a check that passed counts
                _checked_gpu_arrays.add(first_call)
        if out is not None and not direct:
            out[...] = result
            result = out
    return result


def _sampled_on_host(cupy, frames, medians, columns):
    """The sampled pixels of frames and medians (all of them for None), in host memory

    Copied on the current stream, so after the launch; one copy for a sample.
    """
    if columns is None:
        return cupy.asnumpy(frames), cupy.asnumpy(medians)
    rows = frames.shape[0]
    index = cupy.asarray(columns)
    both = cupy.empty((rows + medians.shape[0], len(columns)), frames.dtype)
    cupy.take(frames, index, axis=1, out=both[:rows])
    cupy.take(medians, index, axis=1, out=both[rows:])
    host = cupy.asnumpy(both)
    return host[:rows], host[rows:]
