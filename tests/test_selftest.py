"""``dcbg selftest`` on the CPU and on the stand-in GPU: it passes where the medians are
right, and fails (exit code 1) where a kernel, the engine or the definition disagree"""
import json
import sys

import numpy as np
import pytest

from dcbg import cpukernels, selftest
from dcbg.cli import main
from dcbg.selftest import StackCase, run_selftest
from helpers import host_kernel as hk
from helpers.fake_cupy import CUDARuntimeError

# one stack per width of the kernel's counts, small enough for a unit test
TINY = [StackCase(10, (8, 40), 50), StackCase(300, (4, 20), 30),
        StackCase(70_000, (2, 3), 40, realistic=False)]


def corrupt_kernel(monkeypatch, name):
    """Make the stand-in GPU's kernel `name` write one wrong byte per launch"""
    launch = hk.launch

    def wrong(lib, plan, frames, medians, pixels, output_size, kernel_size):
        launch(lib, plan, frames, medians, pixels, output_size, kernel_size)
        if plan.kernel == name:
            medians[0, 0] ^= 1

    monkeypatch.setattr(hk, "launch", wrong)


def test_cpu_passes_on_every_count_width():
    rows = run_selftest("cpu", cases=TINY, file_events=150, num_cpus=2)
    assert selftest.passed(rows)
    assert [row.check for row in rows] == ["load kernel", "median", "median", "median",
                                           "file to file"]
    medians = [row for row in rows if row.check == "median"]
    assert sorted(row.count_bits for row in medians) == [8, 16, 32]
    assert all(row.same_as_definition and row.definition_windows for row in medians)
    assert [row.pixel_outputs_per_s > 0 for row in medians[:2]] == [True, True]
    assert medians[2].pixel_outputs_per_s is None  # 6 pixels say nothing about speed
    file_row = rows[-1]
    assert file_row.same_as_cpu and file_row.frames == 150 and file_row.events_per_s > 0
    assert "passed" in selftest.verdict(rows)


def test_gpu_passes_and_runs_every_kernel(fake_gpu):
    state = fake_gpu()
    rows = run_selftest("cuda", cases=TINY, file_events=150, num_cpus=2)
    assert selftest.passed(rows), [selftest.table_line(row) for row in rows]
    assert {row.device for row in rows} == {"cuda:0"}
    medians = [row for row in rows if row.check == "median"]
    assert all(row.same_as_cpu and row.same_as_definition for row in medians)
    kernels = {launch[0] for launch in state.launches}
    assert kernels == {"dcbg_rollmed_count8", "dcbg_rollmed_count16", "dcbg_rollmed_count32"}
    # each stack goes through the pipeline in several batches, which overlap
    assert sum(call[0] == "upload" for call in state.calls) >= 3 * len(TINY)


@pytest.mark.parametrize("kernel", ["dcbg_rollmed_count16", "dcbg_rollmed_count32"])
def test_a_wrong_gpu_kernel_fails_the_selftest(fake_gpu, monkeypatch, kernel):
    fake_gpu()
    corrupt_kernel(monkeypatch, kernel)
    rows = run_selftest("cuda", cases=TINY, file_events=0, num_cpus=1)
    wrong = [row for row in rows if not row.passed]
    bits = int(kernel.removeprefix("dcbg_rollmed_count"))
    assert [row.count_bits for row in wrong] == [bits]
    assert wrong[0].same_as_cpu is False and wrong[0].same_as_definition is False
    assert "differs from the CPU engine" in wrong[0].note
    assert not selftest.passed(rows)
    assert selftest.verdict(rows).startswith("selftest FAILED: 1 of 4 checks")


def test_a_cpu_kernel_that_differs_from_the_definition_fails(monkeypatch):
    kernels = cpukernels.cpu_kernels()

    def wrong(frames, out, kernel_size, output_size, start, stop, counts):
        kernels.rolling_median_columns(frames, out, kernel_size, output_size, start, stop,
                                       counts)
        out[0, start] ^= 1

    monkeypatch.setattr(cpukernels, "cpu_kernels",
                        lambda: kernels._replace(rolling_median_columns=wrong))
    rows = run_selftest("cpu", cases=TINY[:1], file_events=0, num_cpus=1)
    assert rows[-1].same_as_definition is False
    assert "differs from the definition" in rows[-1].note
    assert not selftest.passed(rows)


def test_command_exits_1_and_shows_the_difference(fake_gpu, monkeypatch, capsys):
    fake_gpu()
    corrupt_kernel(monkeypatch, "dcbg_rollmed_count8")
    code = main(["selftest", "--device", "cuda", "--events", "2", "--file-events", "0"])
    out = capsys.readouterr().out
    assert code == 1
    assert out.count("DIFFERS") >= 2  # k=10 and k=100 both run the 8-bit kernel
    assert "selftest FAILED" in out.splitlines()[-1]


def test_command_prints_one_table_and_writes_json(tmp_path, capsys):
    report = tmp_path / "selftest.json"
    code = main(["selftest", "--device", "cpu", "--events", "2", "--file-events", "120",
                 "--num-cpus", "1", "--json", str(report)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[1] == selftest.table_header()
    assert lines[-1].startswith("selftest passed")
    assert len(lines) == 2 + 1 + 4 + 1 + 1  # title, header, load, 4 medians, file, verdict
    data = json.loads(report.read_text())
    assert data["passed"] is True and len(data["rows"]) == 6
    assert {row["count_bits"] for row in data["rows"]} >= {8, 16, 32}


@pytest.mark.parametrize("where", ["missing_folder/report.json", "."])
def test_a_json_path_that_cannot_be_written_fails_before_the_selftest(tmp_path, capsys,
                                                                       where):
    code = main(["selftest", "--device", "cpu", "--events", "2", "--file-events", "0",
                 "--num-cpus", "1", "--json", str(tmp_path / where)])
    captured = capsys.readouterr()
    assert code == 1  # as dcbg compute treats an output in a missing folder
    assert captured.out == ""  # nothing was computed
    assert captured.err.startswith("error: Output ")
    assert len(captured.err.strip().splitlines()) == 1 and "Errno" not in captured.err


def test_cuda_all_checks_each_gpu_then_the_split(fake_gpu):
    fake_gpu(device_count=2)
    rows = run_selftest("cuda:all", cases=TINY[:1], file_events=150, num_cpus=1)
    assert selftest.passed(rows)
    assert [(row.device, row.check) for row in rows] == [
        ("cuda:0", "load kernel"), ("cuda:0", "median"), ("cuda:0", "file to file"),
        ("cuda:1", "load kernel"), ("cuda:1", "median"), ("cuda:1", "file to file"),
        ("cuda:all", "file to file")]


def test_a_gpu_fault_is_reported_in_its_row(fake_gpu):
    state = fake_gpu()
    state.faults[3] = CUDARuntimeError("cudaErrorIllegalAddress: an illegal memory access")
    rows = run_selftest("cuda", cases=TINY, file_events=150, num_cpus=1)
    failed = rows[-1]
    assert "illegal memory access" in failed.error
    assert failed.check == "median" and failed.kernel_size is not None
    assert not selftest.passed(rows)
    assert "ERROR: " in selftest.table_line(failed)


def test_info_points_to_the_selftest(capsys):
    assert main(["info"]) == 0
    assert "dcbg selftest" in capsys.readouterr().out


def test_an_unusable_gpu_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy fails as where it is missing
    code = main(["selftest", "--device", "cuda", "--events", "2", "--file-events", "0"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: CUDA device 0 cannot be used: CuPy is not installed")
    assert len(err.strip().splitlines()) == 1


def test_sizes_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="--file-events 0 to skip it"):
        run_selftest("cpu", cases=TINY[:1], file_events=100)
    with pytest.raises(ValueError, match="at least one window"):
        selftest.default_cases(0)


def test_difference_names_the_first_wrong_pixel():
    expected = np.zeros((3, 4), np.uint8)
    actual = expected.copy()
    actual[1, 2] = 7
    assert selftest.difference(expected, expected) is None
    assert selftest.difference(actual, expected) == (
        "1 of 12 pixel-outputs differ, the first at (window, pixel) (1, 2)")
