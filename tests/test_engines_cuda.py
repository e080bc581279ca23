"""The CUDA engine's pipeline on the CPU, through the CuPy stand-in (helpers/fake_cupy.py)"""
import sys
import threading

import h5py
import numpy as np
import pytest

import dcbg
from dcbg import cudaprobe, devices
from dcbg.engines import cudakernel, cudamemory
from dcbg.engines.batches import partition
from dcbg.engines.cuda import CUDARollingMedian
from dcbg.errors import GPUResultError
from dcbg.reference import rolling_median_reference
from dcbg.runlog import read_run_logs
from dcbg.synthetic import write_synthetic_rtdc
from helpers.data import stack_cases
from helpers.fake_cupy import FakeStream


def run(stack, tmp_path, **kwargs):
    out = tmp_path / "bg.rtdc"
    out.unlink(missing_ok=True)
    with dcbg.BackgroundRollMed(stack, out, **kwargs) as bg:
        device = str(bg.device)
        bg.process()
    with h5py.File(out) as h5:
        return h5["events/image_bg"][:], device


@pytest.fixture
def device_batches(monkeypatch):
    """Cap the device batch at a few windows, so small stacks run in many batches"""
    def cap(windows):
        monkeypatch.setattr(cudamemory, "DEVICE_BATCH_LIMIT", windows)
        monkeypatch.setattr(cudakernel.Launcher, "windows_to_fill", lambda self: 0)
    return cap


def loaded(index, dtype=np.uint8):
    """The kernels of `dtype` on a CUDA device, as the ready device hands them to the
    engines"""
    return cudakernel.load_kernels(index, dtype)


def flat(stack):
    return np.ascontiguousarray(stack.reshape(len(stack), -1))


@pytest.mark.parametrize("name", ["random", "two_level", "realistic", "alternating_0_255"])
@pytest.mark.parametrize("kernel_size,device_batch", [(2, 3), (10, 17), (30, 1000)])
def test_cuda_backend_matches_definition(fake_gpu, device_batches, tmp_path, name,
                                         kernel_size, device_batch):
    state = fake_gpu()
    device_batches(device_batch)
    stack = stack_cases()[name]
    got, device = run(stack, tmp_path, kernel_size=kernel_size, batch_size=1000,
                      device="cuda")
    assert device == "cuda:0"
    assert np.array_equal(got, rolling_median_reference(stack, kernel_size))
    windows = max(len(stack) - kernel_size, 1)
    assert sum(launch[3] for launch in state.launches) == windows
    assert len(state.launches) == -(-windows // device_batch)
    # the uint8 kernel's module only: the window kernels wait for frames of their dtypes
    assert state.compiled == 1
    assert state.compile_options == [cudakernel.module_options("histogram")]


@pytest.mark.parametrize("seed", range(6))
def test_every_interleaving_of_the_streams_gives_the_same_bytes(fake_gpu, device_batches,
                                                                tmp_path, seed):
    state = fake_gpu(seed=seed)
    device_batches(5)
    stack = stack_cases()["random"]
    got, _ = run(stack, tmp_path, kernel_size=4, batch_size=5, device="cuda")
    assert np.array_equal(got, rolling_median_reference(stack, 4))
    assert len(state.launches) == 12
    # uploads and downloads have streams of their own, apart from the kernel's
    uploads = {name for kind, name in state.copies if kind == "upload"}
    downloads = {name for kind, name in state.copies if kind == "download"}
    assert len(uploads) == len(downloads) == 1 and uploads != downloads


def test_the_stand_in_catches_a_missing_stream_dependency(fake_gpu, device_batches, tmp_path,
                                                          monkeypatch):
    """Drop the kernel's wait for its upload: some interleavings then give wrong bytes, and
    the sampled check refuses them, never letting wrong bytes through

    Interleavings also depend on the threads' timing, so each run is judged by itself.
    """
    stack = stack_cases()["random"]
    expected = rolling_median_reference(stack, 4)
    wait_event = FakeStream.wait_event

    def without_upload_wait(self, event):
        upload, compute = self.state.streams[1:3]  # the engine creates them in this order
        if not (self is compute and event.stream is upload):
            wait_event(self, event)

    monkeypatch.setattr(FakeStream, "wait_event", without_upload_wait)
    wrong = refused = 0
    for seed in range(8):
        fake_gpu(seed=seed)
        device_batches(5)
        got, _ = run(stack, tmp_path, kernel_size=4, batch_size=5, device="cuda",
                     verify="off")
        wrong += not np.array_equal(got, expected)
        fake_gpu(seed=seed)
        device_batches(5)
        try:
            checked, _ = run(stack, tmp_path, kernel_size=4, batch_size=5, device="cuda")
        except GPUResultError:
            refused += 1
        else:
            assert np.array_equal(checked, expected), "the check let wrong bytes through"
    assert wrong > 0 and refused > 0


@pytest.mark.parametrize("buffers", [(3, 2), (1, 1), (2, 3)])
def test_the_pipeline_rotates_as_many_device_buffers_as_planned(fake_gpu, device_batches,
                                                               tmp_path, monkeypatch, buffers):
    """cudamemory.DEVICE_BUFFERS sizes the batch and is what the pipeline allocates; every
    interleaving of the streams gives the same bytes with any number of buffers"""
    monkeypatch.setattr(cudamemory, "DEVICE_BUFFERS", buffers)
    stack = stack_cases()["random"]
    pixels = int(np.prod(stack.shape[1:]))
    for seed in range(3):
        state = fake_gpu(seed=seed)
        device_batches(5)
        got, _ = run(stack, tmp_path, kernel_size=4, batch_size=5, device="cuda")
        assert np.array_equal(got, rolling_median_reference(stack, 4))
        inputs = state.empty_shapes.count((5 + 4 - 1, pixels))
        outputs = state.empty_shapes.count((5, pixels))
        assert (inputs, outputs) == buffers


def test_each_batch_is_downloaded_and_written_before_the_next_is_uploaded(fake_gpu):
    """Read, upload, kernel, download per batch: the writer is never batches behind"""
    state = fake_gpu()
    stack = stack_cases()["realistic"][:14]  # 10 windows of k=4: two batches of 5
    frames = flat(stack)
    written = threading.Event()
    medians = np.zeros((10, frames.shape[1]), np.uint8)

    def read_into(start, stop, out):
        if start > 0 and not written.wait(timeout=20):
            raise AssertionError("batch 0 was not written while batch 1 was read")
        out[:stop - start] = frames[start:stop]

    def write_at(offset, rows):
        medians[offset:offset + len(rows)] = rows
        written.set()

    engine = CUDARollingMedian(stack.shape[1:], 4, 5, loaded(0))
    last = engine.run(read_into, 0, 10, write_at)
    assert state.calls == [("upload", 8), ("kernel", 5), ("download", 5)] * 2
    expected = flat(rolling_median_reference(stack, 4))[:10]
    assert np.array_equal(medians, expected) and np.array_equal(last, expected[-1])


def test_the_host_waits_only_on_blocking_sync_events_of_the_device(fake_gpu, device_batches,
                                                                   tmp_path):
    state = fake_gpu(device_count=2)
    device_batches(5)
    stack = stack_cases()["random"]
    got, _ = run(stack, tmp_path, kernel_size=4, batch_size=10, device="cuda:1")
    assert np.array_equal(got, rolling_median_reference(stack, 4))
    assert state.host_waits and all(state.host_waits)
    # the writer thread too waits in the device's context (none is made on device 0)
    assert state.foreign_waits == []


def test_auto_picks_cuda_and_env_overrides(fake_gpu, tmp_path, monkeypatch):
    fake_gpu()
    stack = stack_cases()["random"]
    monkeypatch.delenv(devices.DEVICE_ENV, raising=False)
    assert str(devices.select_device("auto")) == "cuda:0"
    monkeypatch.setenv(devices.DEVICE_ENV, "cpu")
    got, device = run(stack, tmp_path, kernel_size=4, batch_size=10, num_cpus=1)
    assert device == "cpu"
    assert np.array_equal(got, rolling_median_reference(stack, 4))
    with pytest.raises(dcbg.errors.DeviceError,
                       match="CUDA device 3 cannot be used.*does not exist"):
        devices.select_device("cuda:3")


def test_explicit_cuda_compiles_in_the_background(fake_gpu, monkeypatch):
    state = fake_gpu()
    monkeypatch.delenv(devices.DEVICE_ENV, raising=False)
    choice = devices.select_device("cuda:0")
    assert state.compiled == 0, "choosing an explicit device does not wait for a compile"
    choice.preload()
    choice.ready()
    choice.preload()
    assert state.compiled == 1


@pytest.mark.parametrize("problem,message", [
    ("nvrtc", "cannot load NVRTC"),
    ("cache", "cannot write its kernel cache in /cache/cupy"),
    ("context", "could not set up the device"),
])
def test_a_failed_background_compile_fails_before_any_output(fake_gpu, tmp_path, monkeypatch,
                                                             problem, message):
    state = fake_gpu()
    state.compile_error = {
        "nvrtc": RuntimeError("nvrtc: error: failed to load libnvrtc.so.12"),
        "cache": PermissionError(13, "Permission denied", "/cache/cupy/tmpabc"),
        "context": sys.modules["cupy"].cuda.runtime.CUDARuntimeError(
            "cudaErrorDevicesUnavailable: CUDA-capable device(s) is/are busy or unavailable"),
    }[problem]
    monkeypatch.setenv("CUPY_CACHE_DIR", "/cache/cupy")
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 60, shape=(8, 16), seed=4)
    folder_when_raised = []
    kernels_or_device_error = cudakernel.kernels_or_device_error

    def watched(index, *dtype):
        try:
            return kernels_or_device_error(index, *dtype)
        except dcbg.errors.DeviceError:
            folder_when_raised.append(sorted(p.name for p in tmp_path.iterdir()))
            raise

    monkeypatch.setattr(cudakernel, "kernels_or_device_error", watched)
    with dcbg.BackgroundRollMed(source, tmp_path / "out.rtdc", kernel_size=10,
                                device="cuda") as bg:
        with pytest.raises(dcbg.errors.DeviceError,
                           match=f"CUDA device 0 cannot be used: .*{message}"):
            bg.process()
    assert folder_when_raised[0] == ["rec.rtdc"], "the output was opened before the error"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.rtdc"]
    monkeypatch.delenv(devices.DEVICE_ENV, raising=False)
    choice = devices.select_device("auto")  # auto compiles to decide, and says why not
    assert choice.kind == "cpu" and message.split(" in ")[0] in choice.reason


def test_compile_problems_are_told_apart():
    class CUDADriverError(RuntimeError):
        pass

    assert "CUDA headers" in cudakernel.compile_problem(
        RuntimeError("Failed to find CUDA headers; set CUDA_PATH"))
    assert "older than" in cudakernel.compile_problem(
        CUDADriverError("CUDA_ERROR_UNSUPPORTED_PTX_VERSION: the provided PTX was compiled "
                        "with an unsupported toolchain"))
    assert "could not set up the device" in cudakernel.compile_problem(
        CUDADriverError("CUDA_ERROR_INVALID_CONTEXT: invalid device context"))
    assert "failed to compile" in cudakernel.compile_problem(
        ValueError("rollmed.cu(12): error: identifier undefined"))


def test_an_old_cupy_is_named_with_the_version_needed(fake_gpu, monkeypatch):
    fake_gpu(version="12.3.0")
    monkeypatch.delenv(devices.DEVICE_ENV, raising=False)
    with pytest.raises(dcbg.errors.DeviceError,
                       match="CuPy 12.3.0 is too old, dcbg needs CuPy 13 or newer"):
        devices.select_device("cuda")
    assert "CuPy 12.3.0 is too old" in devices.select_device("auto").reason
    assert cudaprobe.cupy_version_problem("13.0.0") is None
    assert cudaprobe.cupy_version_problem("14.0.0rc1") is None


def test_small_gpu_splits_batches_without_changing_the_result(fake_gpu, tmp_path):
    pixels = 12 * 40  # room for device batches of only a few frames
    state = fake_gpu(free_bytes=int((4 * 8 + 2 * 10) * pixels
                                    / cudamemory.DEVICE_MEMORY_FRACTION) + 1)
    stack = stack_cases()["realistic"]
    got, _ = run(stack, tmp_path, kernel_size=10, batch_size=10000, device="cuda")
    assert np.array_equal(got, rolling_median_reference(stack, 10))
    assert max(launch[3] for launch in state.launches) == 8
    assert len(state.launches) == -(-(len(stack) - 10) // 8)
    with h5py.File(tmp_path / "bg.rtdc") as h5:  # the PPID keeps the user's batch size
        assert h5["events/image_bg"].attrs["dcnum ppid background"] == "rollmed:k=10^b=10000"


def test_device_batch_follows_memory_not_the_methods_batch(fake_gpu):
    fake_gpu(free_bytes=141 * 2**30)
    assert CUDARollingMedian((80, 320), 100, 800_000, loaded(0),
                             host_bytes=64 * 2**30).batch_windows == cudamemory.DEVICE_BATCH_LIMIT
    budget = 50 * 2**20  # page-locked host memory for about 400 frames
    engine = CUDARollingMedian((80, 320), 100, 800_000, loaded(0), host_bytes=budget)
    assert (5 * engine.batch_windows + 2 * 100) * 80 * 320 <= budget


def test_files_share_pinned_buffers_compile_and_gpu_description(fake_gpu, tmp_path):
    """Per process, not per file: pinned buffers of exact size, NVML and the GPU description"""
    state = fake_gpu()
    pixels = 20 * 64
    for name in ("a", "b"):
        source = write_synthetic_rtdc(tmp_path / f"{name}.rtdc", 700, shape=(20, 64), seed=4)
        with dcbg.BackgroundRollMed(source, tmp_path / f"{name}_bg.rtdc", kernel_size=20,
                                    batch_size=150, device="auto") as bg:
            assert bg.device.kind == "cuda"
            bg.process()
            assert {"read", "upload", "median", "download", "write", "total"} <= set(
                bg.stage_seconds)
        with h5py.File(source) as h5:
            expected = rolling_median_reference(h5["events/image"][:], 20)
        with h5py.File(tmp_path / f"{name}_bg.rtdc") as h5:
            assert np.array_equal(h5["events/image_bg"][:], expected)
            (_, record), = read_run_logs(h5)
            assert record["name"] == "Fake GPU of CUDA ordinal 0"
    assert len(state.launches) == 2  # the device batch took all 680 windows, not 150
    # five buffers for the first file, none for the second; each of its exact size
    assert sorted(state.pinned_allocations) == sorted([699 * pixels] * 2 + [680 * pixels] * 3)
    assert state.compiled == 1 and state.nvml_inits == 1 and state.nvml_descriptions == 1
    # NVML read the GPU's total memory once, and its free memory once per run
    assert state.nvml_memory_readings == 1 + 2
    assert state.freed_devices == []


def test_out_of_memory_at_start_halves_the_batch(fake_gpu, tmp_path, caplog):
    state = fake_gpu()
    stack = stack_cases()["realistic"]  # 80 frames of 12x40
    pixels = 12 * 40
    run(stack, tmp_path, kernel_size=10, batch_size=1000, device="cuda")
    assert cudamemory.pinned_buffers.held_bytes() == (2 * 79 + 3 * 70) * pixels
    state.largest_allocation = 30 * pixels  # reported free memory is a lie
    got, _ = run(stack, tmp_path, kernel_size=10, batch_size=1000, device="cuda")
    assert np.array_equal(got, rolling_median_reference(stack, 10))
    assert "ran out of memory with batches of 70 frames" in caplog.text
    assert max(launch[3] for launch in state.launches[1:]) == 17  # 70 → 35 → 17
    # the kept buffers were released with the device's pool, and smaller ones taken
    assert state.freed_devices == [0, 0]
    assert cudamemory.pinned_buffers.held_bytes() == (2 * 26 + 3 * 17) * pixels
    with h5py.File(tmp_path / "bg.rtdc") as h5:  # the warnings are in the run log too
        (_, record), = read_run_logs(h5)
    assert len(record["warnings"]) == 2 and "going on from frame 0" in record["warnings"][0]
    assert record["device"] == "cuda:0" and record["cupy"] == "14.2.0"
    assert record["cuda_runtime"] == "13.0"
    assert record["name"] == "Fake GPU of CUDA ordinal 0"
    assert record["pci_bus_id"] == "0000:10:00.0"


def test_pinned_memory_failure_retries_with_a_smaller_batch(fake_gpu, tmp_path, caplog):
    state = fake_gpu()
    stack = stack_cases()["realistic"]
    state.largest_pinned = 40 * 12 * 40  # page-locked host memory for 40 frames per buffer
    got, _ = run(stack, tmp_path, kernel_size=10, batch_size=1000, device="cuda")
    assert np.array_equal(got, rolling_median_reference(stack, 10))
    assert "cudaErrorMemoryAllocation" in caplog.text
    assert max(launch[3] for launch in state.launches) <= 31


def test_out_of_memory_mid_run_goes_on_from_the_first_unwritten_frame(fake_gpu, device_batches,
                                                                      tmp_path, caplog):
    state = fake_gpu()
    device_batches(8)
    stack = stack_cases()["random"]  # 63 frames
    state.faults[3] = sys.modules["cupy"].cuda.memory.OutOfMemoryError("Out of memory")
    got, _ = run(stack, tmp_path, kernel_size=6, batch_size=8, device="cuda")
    assert np.array_equal(got, rolling_median_reference(stack, 6))
    # At launch 3, batches 0 to 2 are downloaded and with the writer: they are
    # written, and the run goes on after them; no batch runs twice.
    assert "going on from frame 24 with batches of 4" in caplog.text
    done = [launch for launch in state.launches if launch[0] != "fault"]
    assert sum(launch[3] for launch in done) == 57


def test_kernel_fault_is_a_clear_error_and_leaves_nothing(fake_gpu, device_batches, tmp_path,
                                                          capsys):
    state = fake_gpu()
    device_batches(50)
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 300, shape=(8, 16), seed=4)
    state.faults[2] = sys.modules["cupy"].cuda.runtime.CUDARuntimeError(
        "cudaErrorIllegalAddress: an illegal memory access was encountered")
    with pytest.raises(dcbg.errors.DeviceError, match="CUDA device 0 failed.*illegal memory"):
        with dcbg.BackgroundRollMed(source, tmp_path / "out.rtdc", kernel_size=10,
                                    batch_size=50, device="cuda") as bg:
            bg.process()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.rtdc"]
    from dcbg.cli import main
    state.faults[len(state.launches) + 1] = sys.modules["cupy"].cuda.runtime.CUDARuntimeError(
        "cudaErrorLaunchFailure: unspecified launch failure")
    assert main(["compute", str(source), "-kb", "kernel_size=10", "-kb", "batch_size=50",
                 "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: CUDA device 0 failed") and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.rtdc"]


@pytest.mark.parametrize("device_count", [1, 2, 3])
def test_cuda_all_splits_one_recording_across_devices(fake_gpu, device_batches, tmp_path,
                                                      device_count):
    state = fake_gpu(device_count=device_count)
    device_batches(60)
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 500, shape=(12, 32), seed=13)
    out = tmp_path / "split.rtdc"
    with dcbg.BackgroundRollMed(source, out, kernel_size=16, batch_size=60,
                                device="cuda:all") as bg:
        assert str(bg.device) == "cuda:all"
        bg.process()
        assert bg.get_progress() == pytest.approx(1.0)
    with h5py.File(source) as h5:
        expected = rolling_median_reference(h5["events/image"][:], 16)
    with h5py.File(out) as h5:
        assert np.array_equal(h5["events/image_bg"][:], expected)
        assert h5["events/image_bg"].attrs["dcnum ppid background"] == "rollmed:k=16^b=60"
    # every device took part; one device still ran two ranges
    assert sorted(set(state.launch_devices)) == list(range(device_count))
    ranges = max(2, device_count)
    per_range = [-(-(b - a) // 60) for a, b in partition(484, ranges)]
    assert len(state.launches) == sum(per_range)
    assert state.freed_devices == []  # the buffers of every range stay for the next file
    assert cudamemory.pinned_buffers.held_bytes() == ranges * (2 * 75 + 3 * 60) * 12 * 32


def test_engines_sharing_a_gpu_share_its_memory(fake_gpu, monkeypatch):
    from dcbg.engines.split import SplitRollingMedian
    pixels = 80 * 320
    state = fake_gpu(free_bytes=int((4 * 1000 + 2 * 100) * pixels
                                    / cudamemory.DEVICE_MEMORY_FRACTION))
    monkeypatch.setattr(cudamemory, "pinned_memory_budget", lambda: 64 * 2**30)
    single = CUDARollingMedian((80, 320), 100, 10000, loaded(0))
    assert single.batch_windows == 1000
    readings = state.memory_readings
    split = SplitRollingMedian((80, 320), 100, 10000, [loaded(0)])
    assert [engine.batch_windows for engine in split.engines] == [475, 475]
    assert state.memory_readings == readings + 1  # one reading, shared
    # the ranges share the host's page-locked memory budget too
    budget = (5 * 300 + 2 * 100) * pixels
    monkeypatch.setattr(cudamemory, "pinned_memory_budget", lambda: budget)
    split = SplitRollingMedian((80, 320), 100, 10000, [loaded(0)])
    assert [engine.batch_windows for engine in split.engines] == [130, 130]


def test_split_ranges_and_a_failing_range(fake_gpu, tmp_path, monkeypatch):
    assert partition(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert partition(1, 2) == [(0, 1)]
    state = fake_gpu(device_count=2)
    stack = stack_cases()["realistic"]
    state.faults[1] = sys.modules["cupy"].cuda.runtime.CUDARuntimeError(
        "cudaErrorECCUncorrectable")
    with pytest.raises(dcbg.errors.DeviceError, match="ECCUncorrectable"):
        run(stack, tmp_path, kernel_size=10, batch_size=20, device="cuda:all")
    assert not (tmp_path / "bg.rtdc").exists()
    monkeypatch.setattr(sys.modules["cupy"].cuda.runtime, "getDeviceCount", lambda: 0)
    with pytest.raises(RuntimeError, match="CUDA devices cannot be used: no CUDA device"):
        devices.select_device("cuda:all")


def test_nvml_is_matched_to_cuda_by_pci_bus_id(fake_gpu):
    state = fake_gpu(device_count=3)
    described = cudaprobe.describe_cuda_devices()
    assert [d["index"] for d in described] == [0, 1, 2]
    assert [d["cuda_index"] for d in described] == [2, 1, 0]  # NVML counts the other way
    for ordinal in range(3):
        device = cudaprobe.describe_cuda_ordinals((ordinal,))[ordinal]
        assert device["name"] == f"Fake GPU of CUDA ordinal {ordinal}"
    # described once per process; the free memory is read each time
    state.free_bytes //= 2
    assert cudaprobe.describe_cuda_ordinals((0,))[0]["memory_free"] == state.free_bytes
    assert state.nvml_inits == 1 and state.nvml_descriptions == 3
    assert cudaprobe.visible_nvidia_gpus() == 3 and state.nvml_inits == 1


def test_launch_plan_uses_occupancy_and_whole_waves(fake_gpu):
    fake_gpu()
    engine = CUDARollingMedian((80, 320), 100, 10000, loaded(0))
    plan = engine.launcher.plan(10000)
    resident = engine.launcher.blocks_per_sm(plan.kernel, plan.block, plan.shared_mem) * 132
    blocks = plan.grid[0] * plan.grid[1]
    assert plan.kernel == "dcbg_rollmed_count8" and plan.block in cudakernel.BLOCK_SIZES
    # the stand-in's occupancy: 228 KiB of shared memory, 1 KiB reserved per block
    assert resident == 132 * (228 * 1024 // (plan.block * 256 + 1024))
    assert blocks / (plan.waves * resident) > 0.9, "the last wave is nearly full"
    assert plan.segment_length >= cudakernel.MIN_SEGMENT_WINDOWS * 100
    assert plan.grid[1] * plan.segment_length >= 10000
    wide = engine.launcher.plan(500)  # too short to split: one segment
    assert wide.grid[1] == 1


def test_occupancy_is_asked_on_the_kernels_own_device(fake_gpu):
    """Once, where the kernels are compiled, for every entry point of the module and block
    size"""
    state = fake_gpu(device_count=2)
    engine = CUDARollingMedian((80, 320), 100, 10000, loaded(1))
    asked = len(state.occupancy_devices)
    assert asked == sum(len(cudakernel.block_sizes(name))
                        for name in cudakernel.MODULE_KERNEL_NAMES["histogram"])
    engine.launcher.plan(10000)
    engine.launcher.plan(777)
    assert len(state.occupancy_devices) == asked, "planning asks the driver no more"
    assert set(state.occupancy_devices) == {1}
    assert set(state.function_devices) == {1}, "a kernel handle was taken on another device"


def test_launches_reuse_their_plan(fake_gpu, monkeypatch):
    state = fake_gpu()
    calls = []
    plan_launch = cudakernel.plan_launch

    def counted(*args):
        calls.append(args[1])
        return plan_launch(*args)

    monkeypatch.setattr(cudakernel, "plan_launch", counted)
    cupy = sys.modules["cupy"]
    engine = CUDARollingMedian((4, 8), 4, 100, loaded(0))
    frames, medians = cupy.empty((40, 32), np.uint8), cupy.empty((40, 32), np.uint8)
    for _ in range(3):
        engine.launcher.launch(frames, medians, 20)
    engine.launcher.launch(frames, medians, 30)
    assert calls == [20, 30] and len(state.launches) == 4


def test_a_run_on_one_gpu_makes_no_context_on_another(fake_gpu, device_batches, tmp_path):
    """Leaving `with Device(1)` in a thread that never chose a device would choose device 0,
    and since CUDA 12 that makes a context there (GPU memory of another user's job)"""
    state = fake_gpu(device_count=2)
    device_batches(5)
    stack = stack_cases()["random"]
    got, _ = run(stack, tmp_path, kernel_size=4, batch_size=10, device="cuda:1")
    assert np.array_equal(got, rolling_median_reference(stack, 4))
    assert state.contexts == {1}


def test_gpu_arrays_of_one_gpu_make_no_context_on_another(fake_gpu):
    state = fake_gpu(device_count=2)
    import cupy
    stack = np.random.default_rng(3).integers(0, 256, (30, 4, 6), dtype=np.uint8)
    got = {}

    def user_thread():  # a thread of the caller that works on GPU 1 only
        cupy.cuda.Device(1).use()
        frames = cupy.asarray(stack)
        out = cupy.empty((24, 4, 6), np.uint8)
        dcbg.rolling_median(frames, 7, out=out)
        got["medians"] = cupy.asnumpy(out)

    thread = threading.Thread(target=user_thread)
    thread.start()
    thread.join()
    from dcbg.reference import rolling_median_windows_reference
    assert np.array_equal(got["medians"], rolling_median_windows_reference(stack, 7))
    assert state.contexts == {1}


def test_gpu_arrays_in_a_thread_without_a_cuda_call_yet(fake_gpu):
    """The occupancy calculator is a driver call that needs a context in its thread; the
    first call of a thread with out= makes none before the launch is planned"""
    fake_gpu()
    import cupy
    stack = np.random.default_rng(4).integers(0, 256, (30, 4, 6), dtype=np.uint8)
    frames, out = cupy.asarray(stack), cupy.empty((24, 4, 6), np.uint8)
    failures = []

    def worker():
        try:
            dcbg.rolling_median(frames, 7, out=out)
        except BaseException as error:  # handed to the test's thread
            failures.append(error)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert failures == []
    from dcbg.reference import rolling_median_windows_reference
    assert np.array_equal(cupy.asnumpy(out), rolling_median_windows_reference(stack, 7))


def test_out_of_memory_frees_the_failed_attempts_buffers(fake_gpu, device_batches, tmp_path):
    """Memory is released once nothing references the failed attempt's arrays any more
    (while its exception is handled, its traceback still does: nothing would be freed)"""
    state = fake_gpu()
    device_batches(8)
    stack = stack_cases()["random"]
    state.faults[3] = sys.modules["cupy"].cuda.memory.OutOfMemoryError("Out of memory")
    got, _ = run(stack, tmp_path, kernel_size=6, batch_size=8, device="cuda")
    assert np.array_equal(got, rolling_median_reference(stack, 6))
    assert state.freed_devices == [0] and state.held_at_release == [0]


def test_frames_without_pixels_are_refused_before_planning(fake_gpu):
    fake_gpu()
    import cupy

    from dcbg.engines.cpu import CPURollingMedian
    for build in (lambda: CUDARollingMedian((0, 320), 10, 100, loaded(0)),
                  lambda: CPURollingMedian((80, 0), 10, 100, 1, 100),
                  lambda: dcbg.rolling_median(cupy.empty((20, 8, 0), np.uint8), 3),
                  lambda: dcbg.rolling_median(np.empty((20, 0), np.uint8), 3, device="cuda")):
        with pytest.raises(ValueError, match="The frames have no pixels"):
            build()


def test_an_unwritable_kernel_cache_at_import_gets_the_cache_advice(tmp_path, monkeypatch):
    """CuPy makes its kernel cache folder when it is imported: that failure is no broken
    install, and the advice is the cache's"""
    package = tmp_path / "site" / "cupy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(  # CuPy's step at import, nothing else
        "import os\nos.makedirs(os.environ['CUPY_CACHE_DIR'], exist_ok=True)\n")
    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / "cache"
    monkeypatch.setenv("CUPY_CACHE_DIR", str(cache))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    problem = cudaprobe.device_problem(0)
    assert problem.startswith(f"CuPy cannot write its kernel cache in {cache} (")
    assert problem.endswith("set CUPY_CACHE_DIR to a writable folder")
    assert not cudaprobe.in_kernel_cache(OSError(2, "No such file", "/usr/lib/libcuda.so"))


def test_an_nvml_failure_costs_the_run_only_its_description(fake_gpu, tmp_path, caplog):
    state = fake_gpu()
    state.nvml_error = sys.modules["pynvml"].NVMLError("Unknown Error")
    stack = stack_cases()["realistic"]
    got, _ = run(stack, tmp_path, kernel_size=10, batch_size=1000, device="cuda")
    assert np.array_equal(got, rolling_median_reference(stack, 10))
    with h5py.File(tmp_path / "bg.rtdc") as h5:
        (_, record), = read_run_logs(h5)
    assert record["device"] == "cuda:0" and "name" not in record
    assert record["warnings"] == [] and "NVML" not in caplog.text


@pytest.mark.parametrize("kernel_size", [600, 1000])
def test_large_kernels_get_batches_that_fill_the_gpu(fake_gpu, kernel_size):
    """4096 windows of k ≥ 512 make one time segment, 25,600 threads of an 80x320 frame:
    less than half of what the device keeps resident"""
    fake_gpu(free_bytes=80 * 2**30)
    engine = CUDARollingMedian((80, 320), kernel_size, 10**6, loaded(0),
                               host_bytes=64 * 2**30)
    assert engine.batch_windows > cudamemory.DEVICE_BATCH_LIMIT
    assert engine.batch_windows * 80 * 320 <= cudamemory.BUFFER_BYTES_LIMIT
    plan = engine.launcher.plan(engine.batch_windows)
    resident = (engine.launcher.blocks_per_sm(plan.kernel, plan.block, plan.shared_mem)
                * plan.block * 132)
    threads = plan.grid[0] * plan.grid[1] * plan.block
    assert plan.grid[1] >= 2 and threads >= 0.9 * resident
    # small kernels keep the usual cap; memory still bounds every batch
    assert CUDARollingMedian((80, 320), 50, 10**6, loaded(0),
                             host_bytes=64 * 2**30).batch_windows == cudamemory.DEVICE_BATCH_LIMIT
    assert CUDARollingMedian((80, 320), kernel_size, 10**6, loaded(0),
                             host_bytes=(5 * 3000 + 2 * kernel_size) * 80 * 320
                             ).batch_windows == 3000


def test_the_stand_in_is_as_strict_as_cupy_and_cuda(fake_gpu):
    """What CuPy or CUDA refuses (or gets wrong silently on a GPU), the stand-in refuses"""
    state = fake_gpu(device_count=2)
    cupy = sys.modules["cupy"]
    runtime_error = cupy.cuda.runtime.CUDARuntimeError
    with cupy.cuda.Device(1):
        other = cupy.cuda.Stream()
        elsewhere = cupy.empty((4, 8), np.uint8)
    here = cupy.empty((4, 8), np.uint8)
    stream = cupy.cuda.Stream()
    host = np.zeros((4, 8), np.uint8)
    with pytest.raises(RuntimeError, match=r"created on \(1\) does not match .* device \(0\)"):
        with other:
            pass
    with pytest.raises(runtime_error, match="upload"):
        here.set(host, stream=other)
    with pytest.raises(runtime_error, match="download"):
        elsewhere.get(stream=stream, out=host)
    with pytest.raises(runtime_error, match="InvalidResourceHandle"):
        other.record()
    # uploads and downloads as CuPy's ndarray.set and get check them
    with pytest.raises(ValueError, match="Shape mismatch"):
        here.set(np.zeros((3, 8), np.uint8), stream=stream)
    with pytest.raises(TypeError, match="cannot be set"):
        here.set(host.astype(np.uint16), stream=stream)
    with pytest.raises(RuntimeError, match="non-contiguous"):
        cupy.empty((4, 16), np.uint8)[:, ::2].set(host, stream=stream)
    with pytest.raises(ValueError, match="Shape mismatch"):
        here.get(stream=stream, out=np.zeros((4, 7), np.uint8))
    with pytest.raises(TypeError, match="cannot be obtained"):
        here.get(stream=stream, out=host.astype(np.int8))
    with pytest.raises(RuntimeError, match="non-contiguous"):
        here.get(stream=stream, out=np.zeros((4, 16), np.uint8)[:, ::2])
    # kernels: tuples for grid and block, scalars of the parameters' C types, local arrays
    kernels = cudakernel.load_kernels(0).functions
    kernel = kernels["dcbg_rollmed_count8"]
    good = (here, cupy.empty((1, 8), np.uint8), np.int64(8), np.int64(1), np.int32(4),
            np.int32(1))
    with stream:
        kernel((1, 1), (32,), good)
        with pytest.raises(TypeError, match="'grid' has incorrect type"):
            kernel([1, 1], (32,), good)
        with pytest.raises(TypeError, match="'block' has incorrect type"):
            kernel((1, 1), 32, good)
        with pytest.raises(TypeError, match="argument 3 must be int64"):
            kernel((1, 1), (32,), good[:3] + (np.int32(1),) + good[4:])
        with pytest.raises(ValueError, match=r"resides \(1\) is different"):
            kernel((1, 1), (32,), (elsewhere,) + good[1:])
    # contexts: leaving `with Device(1)` in a thread that never chose a device makes one on 0
    state.contexts.clear()
    errors = []

    def fresh_thread():
        try:
            cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(0, 32, 0)
        except cupy.cuda.driver.CUDADriverError as error:
            errors.append(error)
        with cupy.cuda.Device(1):
            pass

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert state.contexts == {0, 1} and "INVALID_CONTEXT" in str(errors[0])
