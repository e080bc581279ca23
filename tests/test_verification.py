"""GPU results checked against the CPU, and device="auto" falling back to the CPU, on the
CuPy stand-in with injected faults (helpers/fake_cupy.py: a flipped bit, a stale download,
a skipped upload, a launch error)"""
import logging
import pathlib
import shutil
import sys

import h5py
import numpy as np
import pytest

import dcbg
from dcbg import devices, selftest
from dcbg.cli import build_parser, main
from dcbg.engines import cudakernel, cudamemory, verification
from dcbg.engines.verification import sample_columns
from dcbg.errors import GPUResultError
from dcbg.reference import rolling_median_reference, rolling_median_windows_reference
from dcbg.runlog import read_run_logs
from dcbg.synthetic import write_synthetic_rtdc
from helpers.files import dataset_digests, folder_state

SHAPE = (12, 40)
PIXELS = SHAPE[0] * SHAPE[1]
EVENTS, KERNEL, BATCH = 300, 10, 50
"""A recording of 290 windows in device batches of 50: batch b starts at window 50 b"""


@pytest.fixture
def gpu(fake_gpu, monkeypatch):
    """The stand-in GPU with device batches of BATCH windows; "auto" picks it"""
    def install(**kwargs):
        state = fake_gpu(**kwargs)
        monkeypatch.setattr(cudamemory, "DEVICE_BATCH_LIMIT", BATCH)
        # these small frames would otherwise take every window in one batch to fill the GPU
        monkeypatch.setattr(cudakernel.Launcher, "windows_to_fill", lambda self: 0)
        return state
    monkeypatch.delenv(devices.DEVICE_ENV, raising=False)
    return install


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A realistic recording and its background by the definition"""
    path = write_synthetic_rtdc(tmp_path_factory.mktemp("rec") / "rec.rtdc", EVENTS,
                                shape=SHAPE, seed=5)
    with h5py.File(path) as h5:
        expected = rolling_median_reference(h5["events/image"][:], KERNEL)
    return path, expected


def compute(source, output, **kwargs):
    with dcbg.BackgroundRollMed(source, output, kernel_size=KERNEL, batch_size=BATCH,
                                **kwargs) as bg:
        bg.process()
    with h5py.File(output) as h5:
        return h5["events/image_bg"][:], read_run_logs(h5)[-1][1]


def batch_sample(batch: int, windows: int = BATCH) -> np.ndarray:
    """The pixels the sampled check compares in batch `batch` of the recording"""
    block = cudakernel.launcher_for(0, PIXELS, KERNEL).plan(windows).block
    return sample_columns(PIXELS, block, batch * BATCH)


def unsampled_pixel(batch: int) -> int:
    return int(np.setdiff1d(np.arange(PIXELS), batch_sample(batch))[0])


def test_the_sample_covers_every_blocks_edges_and_changes_from_batch_to_batch():
    for pixels, block in ((480, 32), (25_600, 128), (1000, 96), (65, 64)):
        columns = sample_columns(pixels, block, 0)
        edges = {*range(0, pixels, block), *(min(b + block, pixels) - 1
                                             for b in range(0, pixels, block))}
        assert {0, pixels - 1} <= edges <= set(columns.tolist())
        assert np.all(np.diff(columns) > 0) and columns[-1] < pixels
        assert len(columns) >= len(edges) + max(64, pixels // 100) // 2
        assert np.array_equal(columns, sample_columns(pixels, block, 0))  # reproducible
        assert not np.array_equal(columns, sample_columns(pixels, block, 4096))
    assert np.array_equal(sample_columns(64, 32, 7), np.arange(64))  # small frames: whole


@pytest.mark.parametrize("fault", ["stale_downloads", "skipped_uploads"])
def test_the_sampled_check_catches_a_stale_buffer_in_every_batch(gpu, recording, tmp_path,
                                                                 fault):
    source, _ = recording
    batches = -(-(EVENTS - KERNEL) // BATCH)
    for number in range(batches):
        state = gpu(seed=number)
        getattr(state, fault).add(number)
        with pytest.raises(GPUResultError, match="CUDA device 0 computed a wrong median"):
            compute(source, tmp_path / "out.rtdc", device="cuda")
        assert folder_state(tmp_path) == {}, "nothing is written"


def test_a_flipped_bit_at_a_sampled_pixel_is_caught_and_named(gpu, recording, tmp_path,
                                                              cpu_build):
    """By either build of the CPU kernels, which gather and compare the sample"""
    source, expected = recording
    gpu()
    for batch, window, pixel in [(2, 7, int(batch_sample(2)[5])), (0, 0, 0),
                                 (5, 39, PIXELS - 1), (3, 49, int(batch_sample(3)[-3]))]:
        state = gpu()
        state.flips[batch] = (window, pixel)
        event = batch * BATCH + window
        row, column = divmod(pixel, SHAPE[1])
        cpu = expected[event, row, column]
        with pytest.raises(GPUResultError) as raised:
            compute(source, tmp_path / "out.rtdc", device="cuda")
        assert str(raised.value) == (
            f"CUDA device 0 computed a wrong median at event {event}, pixel (row {row}, "
            f"column {column}): the GPU gave {cpu ^ 1} where the CPU computes {cpu}, so its "
            f"results cannot be trusted; check the GPU (nvidia-smi, dcbg selftest --device "
            f"cuda:0) or use device=\"cpu\".")
        assert folder_state(tmp_path) == {}


def test_all_catches_a_flipped_bit_at_any_pixel(gpu, recording, tmp_path):
    source, expected = recording
    state = gpu()
    pixel = unsampled_pixel(1)
    state.flips[1] = (3, pixel)
    got, record = compute(source, tmp_path / "sampled.rtdc", device="cuda")
    assert record["verify"] == "sample"
    # what a sample cannot see: the one wrong byte is where it did not look
    assert np.count_nonzero(got != expected) == 1
    state = gpu()
    state.flips[1] = (3, pixel)
    with pytest.raises(GPUResultError, match=f"at event {BATCH + 3}, pixel "
                                             f"\\(row {pixel // SHAPE[1]},"):
        compute(source, tmp_path / "all.rtdc", device="cuda", verify="all")


@pytest.mark.parametrize("target", ["existing", "in place"])
def test_an_explicit_gpu_fails_and_leaves_the_files_as_they_were(gpu, recording, tmp_path,
                                                                target):
    source = tmp_path / "rec.rtdc"
    shutil.copy(recording[0], source)
    output = tmp_path / "rec_bg.rtdc" if target == "existing" else source
    compute(source, output, device="cpu", num_cpus=1)
    before = folder_state(tmp_path), dataset_digests(output)
    for device in ("cuda", "cuda:0", "cuda:all"):
        state = gpu()
        state.stale_downloads.add(1)
        with pytest.raises(GPUResultError):
            compute(source, output, device=device)
        # the same files, and in them the same datasets and attributes
        assert sorted(folder_state(tmp_path)) == sorted(before[0])
        assert dataset_digests(output) == before[1]


def test_the_command_line_fails_on_an_explicit_gpu_with_one_line(gpu, recording, tmp_path,
                                                                capsys):
    source = tmp_path / "rec.rtdc"
    shutil.copy(recording[0], source)
    output = tmp_path / "out.rtdc"
    compute(source, output, device="cpu", num_cpus=1)
    before = dataset_digests(output)
    state = gpu()
    state.flips[0] = (0, 0)
    assert main(["compute", str(source), str(output), "-kb", f"kernel_size={KERNEL}",
                 "--device", "cuda", "--force"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: CUDA device 0 computed a wrong median at event 0, pixel "
                          "(row 0, column 0)") and len(err.splitlines()) == 1
    assert err.rstrip().endswith("or use --device cpu.")
    assert dataset_digests(output) == before


@pytest.mark.parametrize("fault", ["flip", "stale", "launch error"])
def test_auto_computes_the_file_again_on_the_cpu(gpu, recording, tmp_path, caplog, fault):
    source, expected = recording
    state = gpu()
    if fault == "flip":
        state.flips[2] = (4, int(batch_sample(2)[9]))
    elif fault == "stale":
        state.stale_downloads.add(3)
    else:
        state.faults[2] = sys.modules["cupy"].cuda.runtime.CUDARuntimeError(
            "cudaErrorIllegalAddress: an illegal memory access was encountered")
    with caplog.at_level(logging.WARNING, logger="dcbg"):
        got, record = compute(source, tmp_path / "out.rtdc", device="auto")
    assert np.array_equal(got, expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"cuda:0 failed, so the CPU computes the background of "
                                  f"{source} again (device=\"auto\"): ")
    assert record["device"] == "cpu" and record["warnings"] == warnings
    failure = record["gpu_failure"]
    assert failure["device"] == "cuda:0" and failure["batch_windows"] == BATCH
    cause = "illegal memory access" if fault == "launch error" else "wrong median"
    assert cause in failure["error"] and cause in warnings[0]
    if fault != "launch error":  # the batches before the faulty one were checked
        assert failure["verified_pixel_outputs"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["out.rtdc"]


def test_a_device_from_the_environment_is_explicit(gpu, recording, tmp_path, monkeypatch):
    state = gpu()
    monkeypatch.setenv(devices.DEVICE_ENV, "cuda")
    state.stale_downloads.add(0)
    with pytest.raises(GPUResultError):
        compute(recording[0], tmp_path / "out.rtdc", device="auto")
    assert not (tmp_path / "out.rtdc").exists()
    monkeypatch.setenv(devices.DEVICE_ENV, "auto")
    state = gpu()
    state.stale_downloads.add(0)
    got, record = compute(recording[0], tmp_path / "out.rtdc", device="auto")
    assert np.array_equal(got, recording[1]) and record["device"] == "cpu"


def test_host_arrays_fall_back_under_auto_and_fail_on_an_explicit_gpu(gpu, caplog):
    stack = np.random.default_rng(3).integers(0, 256, (120, 6, 9), dtype=np.uint8)
    state = gpu()
    state.flips[1] = (0, 0)
    with caplog.at_level(logging.WARNING, logger="dcbg"):
        got = dcbg.rolling_median_background(stack, 8)
    assert np.array_equal(got, rolling_median_reference(stack, 8))
    assert "cuda:0 failed, so the CPU computes the medians again" in caplog.text
    state = gpu()
    state.flips[1] = (0, 0)
    with pytest.raises(GPUResultError, match="at event 50, pixel \\(row 0, column 0\\)"):
        dcbg.rolling_median(stack, 8, device="cuda")


def test_the_run_log_has_the_mode_and_the_pixel_outputs_checked(gpu, recording, tmp_path):
    source, expected = recording
    gpu()
    windows = EVENTS - KERNEL
    sizes = [min(BATCH, windows - start) for start in range(0, windows, BATCH)]
    sampled = sum(size * len(batch_sample(b, size)) for b, size in enumerate(sizes))
    for mode, count in (("sample", sampled), ("all", windows * PIXELS), ("off", 0)):
        gpu()
        got, record = compute(source, tmp_path / f"{mode}.rtdc", device="cuda", verify=mode)
        assert np.array_equal(got, expected)
        assert record["verify"] == mode and record["verified_pixel_outputs"] == count
        assert ("verify" in record["seconds"]) == (mode != "off")
        assert record["ppid"] == f"rollmed:k={KERNEL}^b={BATCH}"
    gpu()
    _, record = compute(source, tmp_path / "split.rtdc", device="cuda:all", verify="all")
    assert record["verified_pixel_outputs"] == windows * PIXELS
    _, record = compute(source, tmp_path / "cpu.rtdc", device="cpu", verify="all",
                        num_cpus=1)
    assert record["verify"] == "all" and "verified_pixel_outputs" not in record
    with pytest.raises(ValueError, match="Unknown verify 'some'; use 'sample'"):
        dcbg.BackgroundRollMed(source, tmp_path / "x.rtdc", verify="some")


def test_gpu_arrays_check_the_first_call_per_gpu_and_count_width(gpu):
    """Frames of 24 pixels: a sample is every pixel, so any flipped bit is in it"""
    state = gpu(device_count=2)
    import cupy
    stack = np.random.default_rng(8).integers(0, 256, (40, 4, 6), dtype=np.uint8)
    frames = cupy.asarray(stack)
    expected = rolling_median_windows_reference(stack, 6)

    def copies_back():
        return sum(call[0] == "device to host" for call in state.calls)

    # launch 0: the first call on GPU 0 with 8-bit counts is checked, with one copy back
    assert np.array_equal(cupy.asnumpy(dcbg.rolling_median(frames, 6)), expected)
    assert copies_back() == 2  # the check's, and this test's asnumpy
    state.flips[1] = (3, 17)  # later calls are not checked by default
    wrong = dcbg.rolling_median(frames, 6)
    assert copies_back() == 2 and not np.array_equal(cupy.asnumpy(wrong), expected)
    state.flips[2] = (3, 17)
    with pytest.raises(GPUResultError, match="at event 3, pixel \\(row 2, column 5\\)"):
        dcbg.rolling_median(frames, 6, verify="sample")  # every call, when asked
    long_stack = cupy.asarray(np.repeat(stack, 8, axis=0))
    for launch in (3, 4):  # 16-bit counts: checked, and again after a check that failed
        state.flips[launch] = (1, 1)
        with pytest.raises(GPUResultError, match="at event 1, pixel \\(row 0, column 1\\)"):
            dcbg.rolling_median_background(long_stack, 300)
    with cupy.cuda.Device(1):
        on_one = cupy.asarray(stack)
    state.flips[5] = (2, 2)
    with pytest.raises(GPUResultError, match="CUDA device 1"):  # another GPU: checked again
        dcbg.rolling_median(on_one, 6)
    state.flips[6] = (0, 0)
    assert not np.array_equal(cupy.asnumpy(dcbg.rolling_median(frames, 6, verify="off")),
                              expected)


def test_a_checked_gpu_call_reads_after_the_callers_queued_work(gpu):
    """The check's copy is ordered on the caller's stream, after the frames are there"""
    for seed in range(6):
        state = gpu(seed=seed)
        import cupy
        stack = np.random.default_rng(seed).integers(0, 256, (50, 10, 30), dtype=np.uint8)
        frames = cupy.asarray(np.zeros_like(stack))
        stream = cupy.cuda.Stream()
        with stream:
            frames[...] = cupy.asarray(stack)  # still queued when dcbg is called
            result = dcbg.rolling_median(frames, 9, verify="all")
            got = cupy.asnumpy(result)
        assert np.array_equal(got, rolling_median_windows_reference(stack, 9))
        assert not state.null_stream.pending and not state.null_stream.submitted


def test_verify_on_the_command_line_reaches_the_engine(gpu, recording, tmp_path, capsys):
    source, expected = recording
    gpu()
    output = tmp_path / "out.rtdc"
    assert main(["compute", str(source), str(output), "-kb", f"kernel_size={KERNEL}",
                 "-kb", f"batch_size={BATCH}", "--device", "cuda", "--verify", "all"]) == 0
    with h5py.File(output) as h5:
        (_, record), = read_run_logs(h5)
        assert np.array_equal(h5["events/image_bg"][:], expected)
    assert record["verify"] == "all"
    assert record["verified_pixel_outputs"] == (EVENTS - KERNEL) * PIXELS
    assert build_parser().parse_args(["demo", "--verify", "off"]).verify == "off"
    assert build_parser().parse_args(["compute", "x.rtdc"]).verify == "sample"
    with pytest.raises(SystemExit) as exited:
        main(["compute", str(source), "--verify", "some"])
    assert exited.value.code == 2 and "invalid choice: 'some'" in capsys.readouterr().err


def test_the_selftest_checks_every_pixel_of_its_gpu_runs(gpu, monkeypatch):
    gpu()
    modes = []
    check = verification.ResultCheck

    def recorded(mode, *args):
        modes.append(mode)
        return check(mode, *args)

    monkeypatch.setattr(verification, "ResultCheck", recorded)
    rows = selftest.run_selftest("cuda", cases=[selftest.StackCase(10, (8, 40), 50)],
                                 file_events=150, num_cpus=1)
    assert selftest.passed(rows) and modes and set(modes) == {"all"}
    assert rows[-1].note == "zstd in, zstd-5 out, verify=all"


def test_the_cost_of_the_check_is_measured_without_a_gpu(tmp_path, monkeypatch):
    """bench_cuda.py --verify-cost on a tiny recording: it runs on the CPU and checks
    every pixel-output it claims to"""
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_cuda
    monkeypatch.setattr(cudamemory, "DEVICE_BATCH_LIMIT", 40)
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 150, shape=SHAPE, seed=2)
    with dcbg.BackgroundRollMed(source, tmp_path / "bg.rtdc", kernel_size=KERNEL,
                                device="cpu", num_cpus=1) as bg:
        bg.process()
    for mode in ("sample", "all"):
        row = bench_cuda.verification_cost(source, tmp_path / "bg.rtdc", KERNEL, mode)
        assert row["batches"] == 4 and 0 < row["share_percent"] < 100
        if mode == "all":
            assert row["pixel_outputs"] == (150 - KERNEL) * PIXELS
