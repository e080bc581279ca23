"""Tests on a real CUDA device (marker `gpu`); skipped where there is none"""
import h5py
import numpy as np
import pytest

import dcbg
from dcbg.cudaprobe import cuda_device_count, visible_nvidia_gpus
from dcbg.devices import cuda_unavailable_reason
from dcbg.engines import cudakernel, cudamemory
from dcbg.reference import rolling_median_reference
from helpers.data import stack_cases

# Where a GPU is visible, these tests must run: a GPU that CuPy cannot use
# (no NVRTC, no headers, a compile error) fails them instead of skipping.
GPU_VISIBLE = visible_nvidia_gpus() > 0 or cuda_device_count() > 0
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not GPU_VISIBLE, reason="no NVIDIA GPU visible")]


def test_the_visible_gpu_is_usable():
    assert cuda_unavailable_reason(0) is None


def background(stack, tmp_path, device, device_batch=None, **kwargs):
    """The background of `stack` on `device`; a GPU's batches capped at `device_batch` windows"""
    out = tmp_path / f"{device.replace(':', '')}.rtdc"
    with pytest.MonkeyPatch.context() as monkeypatch:
        if device_batch is not None:
            monkeypatch.setattr(cudamemory, "DEVICE_BATCH_LIMIT", device_batch)
            monkeypatch.setattr(cudakernel.Launcher, "windows_to_fill", lambda self: 0)
        with dcbg.BackgroundRollMed(stack, out, device=device, **kwargs) as bg:
            bg.process()
    with h5py.File(out) as h5:
        return h5["events/image_bg"][:]


@pytest.mark.parametrize("name", sorted(stack_cases()))
@pytest.mark.parametrize("kernel_size", [2, 10, 30])
def test_gpu_matches_cpu_and_definition(tmp_path, name, kernel_size):
    stack = stack_cases()[name]
    gpu = background(stack, tmp_path, "cuda", device_batch=37, kernel_size=kernel_size,
                     batch_size=37)
    cpu = background(stack, tmp_path, "cpu", kernel_size=kernel_size, batch_size=37,
                     num_cpus=2)
    assert np.array_equal(gpu, cpu)
    assert np.array_equal(gpu, rolling_median_reference(stack, kernel_size))


@pytest.mark.parametrize("kernel_size,count", [(256, 300), (1000, 1001), (1000, 2500)])
def test_gpu_large_kernels(tmp_path, kernel_size, count):
    rng = np.random.default_rng(kernel_size + count)
    stack = rng.integers(0, 256, (count, 6, 10), dtype=np.uint8)
    gpu = background(stack, tmp_path, "cuda", device_batch=333, kernel_size=kernel_size,
                     batch_size=kernel_size + 333)
    assert np.array_equal(gpu, rolling_median_reference(stack, kernel_size))


def test_gpu_instrument_sized_batches(tmp_path):
    from dcbg.synthetic import synthetic_stack
    stack = synthetic_stack(3000, shape=(80, 320), seed=8)
    gpu = background(stack, tmp_path, "cuda", device_batch=1234, kernel_size=100,
                     batch_size=1234)
    cpu = background(stack, tmp_path, "cpu", kernel_size=100, batch_size=10000, num_cpus=2)
    assert np.array_equal(gpu, cpu)


def test_gpu_split_across_all_devices_matches_one_device(tmp_path):
    """cuda:all: with one GPU, two ranges share it; with several, one range each"""
    from dcbg.synthetic import synthetic_stack
    stack = synthetic_stack(2500, shape=(80, 320), seed=9)
    split = background(stack, tmp_path, "cuda:all", device_batch=700, kernel_size=100,
                       batch_size=700)
    single = background(stack, tmp_path, "cuda:0", kernel_size=100, batch_size=700)
    assert np.array_equal(split, single)
    assert np.array_equal(split[:199], rolling_median_reference(stack[:299], 100)[:199])


@pytest.mark.parametrize("kernel_size", [1, 7, 100, 300])
def test_gpu_arrays_equal_the_definition_and_the_cpu(kernel_size):
    import cupy

    from dcbg.reference import rolling_median_windows_reference
    stack = np.random.default_rng(kernel_size).integers(0, 256, (kernel_size + 60, 9, 13),
                                                          dtype=np.uint8)
    frames = cupy.asarray(stack)
    stream = cupy.cuda.Stream()
    with stream:
        medians = dcbg.rolling_median(frames, kernel_size)
        background = dcbg.rolling_median_background(frames[:, :, ::2], kernel_size)
        got = cupy.asnumpy(medians), cupy.asnumpy(background)
    assert np.array_equal(got[0], rolling_median_windows_reference(stack, kernel_size))
    assert np.array_equal(got[0], dcbg.rolling_median(stack, kernel_size, device="cpu"))
    assert np.array_equal(got[1], rolling_median_reference(stack[:, :, ::2], kernel_size))


def test_readme_gpu_examples_run():
    """The README's CuPy and torch examples (CI has no GPU and no torch: they run here)"""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not hasattr(torch.cuda.Stream, "__cuda_stream__"):
        pytest.skip(f"torch {torch.__version__} is older than 2.10: its streams have no "
                    f"__cuda_stream__ for cupy.cuda.Stream.from_external")
    import pathlib
    import subprocess
    import sys
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = readme.split("```python gpu\n")[1:]
    assert blocks, "the README shows the GPU array examples"
    for block in blocks:
        code = block.split("```")[0]
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.strip() == "(1901, 80, 320) torch.Size([2000, 80, 320])"


def test_gpu_results_pass_their_check_against_the_cpu(tmp_path):
    """The check of every batch (all pixels, and a sample) and of GPU arrays, on real CuPy"""
    import cupy

    from dcbg.runlog import read_run_logs
    from dcbg.synthetic import synthetic_stack
    stack = synthetic_stack(900, shape=(80, 320), seed=3)
    for verify in ("all", "sample"):
        out = tmp_path / f"{verify}.rtdc"
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(cudamemory, "DEVICE_BATCH_LIMIT", 300)
            monkeypatch.setattr(cudakernel.Launcher, "windows_to_fill", lambda self: 0)
            with dcbg.BackgroundRollMed(stack, out, kernel_size=100, device="cuda",
                                        verify=verify) as bg:
                bg.process()
        with h5py.File(out) as h5:
            assert np.array_equal(h5["events/image_bg"][:], rolling_median_reference(stack, 100))
            (_, record), = read_run_logs(h5)
        every = 800 * 80 * 320  # windows x pixels
        checked = record["verified_pixel_outputs"]
        assert record["verify"] == verify
        assert checked == every if verify == "all" else 0 < checked < every // 4
    frames = cupy.asarray(stack[:400])
    for verify in (None, "sample", "all"):
        got = dcbg.rolling_median(frames, 100, verify=verify)
        assert np.array_equal(cupy.asnumpy(got), dcbg.rolling_median(stack[:400], 100,
                                                                     device="cpu"))


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int8])
def test_gpu_engine_and_arrays_of_16_bit_and_int8_frames(dtype):
    """The window kernels on the GPU, in the engine's pipeline (batches of 37 windows,
    every pixel checked by the CPU) and on GPU arrays, equal to the definition, at kernel
    sizes of 8- and 16-bit counts"""
    import cupy

    from dcbg.engines.cuda import CUDARollingMedian, rolling_median_on_gpu
    from dcbg.reference import rolling_median_windows_reference
    from dcbg.synthetic import synthetic_stack16
    rng = np.random.default_rng(4)
    values = synthetic_stack16(300, (20, 50), seed=4).astype(np.int64)
    values[:, :, :10] = rng.integers(0, 65536, (300, 20, 10))  # jumps across the range
    if dtype == np.int8:
        values >>= 8
    stack = (values + np.iinfo(dtype).min).astype(dtype)  # the same order, signed
    frames = stack.reshape(len(stack), -1)
    for kernel_size in (7, 101, 256):
        expected = rolling_median_windows_reference(stack, kernel_size)
        windows = len(expected)
        medians = np.zeros((windows, frames.shape[1]), dtype)

        def read_into(start, stop, out):
            out[:stop - start] = frames[start:stop]

        def write_at(offset, rows, medians=medians):
            medians[offset:offset + len(rows)] = rows

        with CUDARollingMedian(stack.shape[1:], kernel_size, 37,
                               cudakernel.load_kernels(0, dtype), verify="all",
                               dtype=dtype) as engine:
            engine.run(read_into, 0, windows, write_at)
        assert np.array_equal(medians, expected.reshape(windows, -1))
        got = rolling_median_on_gpu(cupy.asarray(stack), kernel_size, windows,
                                    expected.shape, None, "all")
        assert got.dtype == dtype and np.array_equal(cupy.asnumpy(got), expected)
