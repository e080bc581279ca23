"""The CUDA engine's pipeline on the CPU, through the CuPy stand-in (helpers/fake_cupy.py)"""
import sys

import h5py
import numpy as np
import pytest

import dcbg
from dcbg import devices
from dcbg.engines import cuda
from dcbg.pipeline import partition
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


@pytest.mark.parametrize("name", ["random", "two_level", "realistic", "alternating_0_255"])
@pytest.mark.parametrize("kernel_size,batch_size", [(2, 3), (10, 17), (30, 1000)])
def test_cuda_backend_matches_definition(fake_gpu, tmp_path, name, kernel_size, batch_size):
    state = fake_gpu()
    stack = stack_cases()[name]
    got, device = run(stack, tmp_path, kernel_size=kernel_size, batch_size=batch_size,
                      device="cuda")
    assert device == "cuda:0"
    assert np.array_equal(got, rolling_median_reference(stack, kernel_size))
    windows = max(len(stack) - kernel_size, 1)
    assert sum(launch[3] for launch in state.launches) == windows
    assert state.compiled == 1 and state.compile_options == [cuda.COMPILE_OPTIONS]


@pytest.mark.parametrize("seed", range(6))
def test_every_interleaving_of_the_streams_gives_the_same_bytes(fake_gpu, tmp_path, seed):
    state = fake_gpu(seed=seed)
    stack = stack_cases()["random"]
    got, _ = run(stack, tmp_path, kernel_size=4, batch_size=5, device="cuda")
    assert np.array_equal(got, rolling_median_reference(stack, 4))
    assert len(state.launches) == 12
    # uploads and downloads have streams of their own, apart from the kernel's
    uploads = {name for kind, name in state.copies if kind == "upload"}
    downloads = {name for kind, name in state.copies if kind == "download"}
    assert len(uploads) == len(downloads) == 1 and uploads != downloads


def test_the_stand_in_catches_a_missing_stream_dependency(fake_gpu, tmp_path, monkeypatch):
    """Drop the kernel's wait for its upload: some interleaving then gives wrong bytes"""
    stack = stack_cases()["random"]
    expected = rolling_median_reference(stack, 4)
    wait_event = FakeStream.wait_event

    def without_upload_wait(self, event):
        upload, compute = self.state.streams[1:3]  # the engine creates them in this order
        if not (self is compute and event.stream is upload):
            wait_event(self, event)

    monkeypatch.setattr(FakeStream, "wait_event", without_upload_wait)
    wrong = 0
    for seed in range(8):
        fake_gpu(seed=seed)
        got, _ = run(stack, tmp_path, kernel_size=4, batch_size=5, device="cuda")
        wrong += not np.array_equal(got, expected)
    assert wrong > 0


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


def test_small_gpu_splits_batches_without_changing_the_result(fake_gpu, tmp_path):
    pixels = 12 * 40  # room for device batches of only a few frames
    state = fake_gpu(free_bytes=int((4 * 8 + 2 * 10) * pixels / cuda.MEMORY_FRACTION) + 1)
    stack = stack_cases()["realistic"]
    got, _ = run(stack, tmp_path, kernel_size=10, batch_size=10000, device="cuda")
    assert np.array_equal(got, rolling_median_reference(stack, 10))
    assert max(launch[3] for launch in state.launches) == 8
    assert len(state.launches) == -(-(len(stack) - 10) // 8)
    with h5py.File(tmp_path / "bg.rtdc") as h5:  # the PPID keeps the user's batch size
        assert h5["events/image_bg"].attrs["dcnum ppid background"] == "rollmed:k=10^b=10000"


def test_cuda_backend_file_to_file(fake_gpu, tmp_path):
    state = fake_gpu()
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 700, shape=(20, 64), seed=4)
    with dcbg.BackgroundRollMed(source, tmp_path / "out.rtdc", kernel_size=20,
                                batch_size=150, device="auto") as bg:
        assert bg.device.kind == "cuda"
        bg.process()
        assert {"read", "upload", "kernel", "download", "write", "total"} <= set(
            bg.stage_seconds)
    with h5py.File(source) as h5:
        expected = rolling_median_reference(h5["events/image"][:], 20)
    with h5py.File(tmp_path / "out.rtdc") as h5:
        assert np.array_equal(h5["events/image_bg"][:], expected)
    assert len(state.launches) == -(-(700 - 20) // 150)
    assert 0 in state.freed_devices and "pinned" in state.freed_devices


def test_out_of_memory_at_start_halves_the_batch(fake_gpu, tmp_path, caplog):
    state = fake_gpu()
    stack = stack_cases()["realistic"]  # 80 frames of 12x40
    pixels = 12 * 40
    state.largest_allocation = 30 * pixels  # reported free memory is a lie
    got, _ = run(stack, tmp_path, kernel_size=10, batch_size=1000, device="cuda")
    assert np.array_equal(got, rolling_median_reference(stack, 10))
    assert "ran out of memory with batches of 70 frames" in caplog.text
    assert max(launch[3] for launch in state.launches) == 17  # 70 → 35 → 17
    with h5py.File(tmp_path / "bg.rtdc") as h5:  # the warnings are in the run log too
        (_, record), = read_run_logs(h5)
    assert len(record["warnings"]) == 2 and "going on from frame 0" in record["warnings"][0]
    assert record["device"] == "cuda:0" and record["cupy"] == "fake"
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


def test_out_of_memory_mid_run_goes_on_from_the_first_unwritten_frame(fake_gpu, tmp_path,
                                                                      caplog):
    state = fake_gpu()
    stack = stack_cases()["random"]  # 63 frames
    state.faults[3] = sys.modules["cupy"].cuda.memory.OutOfMemoryError("Out of memory")
    got, _ = run(stack, tmp_path, kernel_size=6, batch_size=8, device="cuda")
    assert np.array_equal(got, rolling_median_reference(stack, 6))
    # At launch 3, batch 0 is written, batch 1 is being downloaded and batch 2
    # computed: the run goes on after batch 0, and batches 1 and 2 run twice.
    assert "going on from frame 8 with batches of 4" in caplog.text
    done = [launch for launch in state.launches if launch[0] != "fault"]
    assert sum(launch[3] for launch in done) == 57 + 2 * 8


def test_kernel_fault_is_a_clear_error_and_leaves_nothing(fake_gpu, tmp_path, capsys):
    state = fake_gpu()
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
def test_cuda_all_splits_one_recording_across_devices(fake_gpu, tmp_path, device_count):
    state = fake_gpu(device_count=device_count)
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
    assert sorted(d for d in state.freed_devices if d != "pinned") == sorted(
        [i % device_count for i in range(ranges)])


def test_engines_sharing_a_gpu_share_its_memory(fake_gpu):
    from dcbg.engines.split import SplitRollingMedian
    pixels = 80 * 320
    state = fake_gpu(free_bytes=int((4 * 1000 + 2 * 100) * pixels / cuda.MEMORY_FRACTION))
    single = cuda.CUDARollingMedian((80, 320), 100, 10000, 0)
    assert single.batch_size == 1000
    readings = state.memory_readings
    split = SplitRollingMedian((80, 320), 100, 10000, [0])
    assert [engine.batch_size for engine in split.engines] == [475, 475]
    assert state.memory_readings == readings + 1  # one reading, shared


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
    fake_gpu(device_count=3)
    described = cuda.describe_cuda_devices()
    assert [d["index"] for d in described] == [0, 1, 2]
    assert [d["cuda_index"] for d in described] == [2, 1, 0]  # NVML counts the other way
    for ordinal in range(3):
        assert cuda.describe_cuda_device(ordinal)["name"] == f"Fake GPU of CUDA ordinal {ordinal}"


def test_launch_plan_uses_occupancy_and_whole_waves(fake_gpu):
    fake_gpu()
    engine = cuda.CUDARollingMedian((80, 320), 100, 10000, 0)
    plan = engine.plan(10000)
    resident = engine.blocks_per_sm(plan.kernel, plan.block, plan.shared_mem) * 132
    blocks = plan.grid[0] * plan.grid[1]
    assert plan.kernel == "dcbg_rollmed_count8" and plan.block in cuda.BLOCK_SIZES
    # the stand-in's occupancy: 228 KiB of shared memory, 1 KiB reserved per block
    assert resident == 132 * (228 * 1024 // (plan.block * 256 + 1024))
    assert blocks / (plan.waves * resident) > 0.9, "the last wave is nearly full"
    assert plan.segment_length >= cuda.MIN_SEGMENT_WINDOWS * 100
    assert plan.grid[1] * plan.segment_length >= 10000
    wide = engine.plan(500)  # too short to split: one segment
    assert wide.grid[1] == 1


def test_no_cupy_means_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import fails
    monkeypatch.delenv(devices.DEVICE_ENV, raising=False)
    choice = devices.select_device("auto")
    assert choice.kind == "cpu" and "CuPy is not installed" in choice.reason
    with pytest.raises(RuntimeError, match="CuPy is not installed"):
        devices.select_device("cuda")
