"""``dcbg selftest`` on the CPU and on the stand-in GPU: it passes where the medians are
right, and fails (exit code 1) where a kernel, the engine or the definition disagree"""
import io
import json
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dcbg import cpukernels, selftest
from dcbg.cli import main
from dcbg.engines import cudakernel
from dcbg.reference import rolling_median_windows_reference, window_medians_by_partition
from dcbg.selftest import StackCase, run_selftest
from helpers import host_kernel as hk
from helpers.fake_cupy import CUDARuntimeError

# one stack per width of the kernel's counts, small enough for a unit test
TINY = [StackCase(10, (8, 40), 50), StackCase(300, (4, 20), 30),
        StackCase(70_000, (2, 3), 40, realistic=False)]
# the same of uint16 frames (the window kernels on a GPU)
TINY16 = [StackCase(case.kernel_size, case.shape, case.windows, case.realistic, "uint16")
          for case in TINY]


def corrupt_kernel(monkeypatch, name, bits=1):
    """Make the stand-in GPU's kernel `name` get `bits` of one median wrong per launch"""
    launch = hk.launch

    def wrong(lib, plan, frames, medians, pixels, output_size, kernel_size, **extra):
        launch(lib, plan, frames, medians, pixels, output_size, kernel_size, **extra)
        if plan.kernel == name:
            medians[0, 0] ^= bits

    monkeypatch.setattr(hk, "launch", wrong)


def test_cpu_passes_on_every_count_width():
    rows = run_selftest("cpu", cases=TINY + TINY16, file_events=150, num_cpus=2)
    assert selftest.passed(rows)
    assert [row.check for row in rows] == ["load kernel"] + ["median"] * 6 + ["file to file"]
    medians = [row for row in rows if row.check == "median"]
    assert [(row.count_bits, row.dtype) for row in medians] == [
        (bits, dtype) for dtype in ("uint8", "uint16") for bits in (8, 16, 32)]
    medians = medians[:3]
    assert all(row.same_as_definition and row.definition_windows for row in medians)
    assert [row.pixel_outputs_per_s > 0 for row in medians[:2]] == [True, True]
    assert medians[2].pixel_outputs_per_s is None  # 6 pixels say nothing about speed
    file_row = rows[-1]
    assert file_row.same_as_cpu and file_row.frames == 150 and file_row.events_per_s > 0
    assert "passed" in selftest.verdict(rows)


def test_gpu_passes_and_runs_every_kernel(fake_gpu):
    state = fake_gpu()
    rows = run_selftest("cuda", cases=TINY + TINY16, file_events=150, num_cpus=2)
    assert selftest.passed(rows), [selftest.table_line(row) for row in rows]
    assert {row.device for row in rows} == {"cuda:0"}
    medians = [row for row in rows if row.check == "median"]
    assert all(row.same_as_cpu and row.same_as_definition for row in medians)
    assert [row.dtype for row in medians] == ["uint8"] * 3 + ["uint16"] * 3
    kernels = {launch[0] for launch in state.launches}
    assert kernels == {f"dcbg_rollmed_{family}count{bits}" for family in ("", "window16_")
                       for bits in (8, 16, 32)}
    # each stack goes through the pipeline in several batches, which overlap
    assert sum(call[0] == "upload" for call in state.calls) >= 3 * len(TINY + TINY16)
    # the "load kernel" row compiled both modules, side by side, and launched a kernel of each
    assert sorted(state.compile_options) == sorted(cudakernel.module_options(module)
                                                   for module in ("histogram", "window"))
    assert [launch[0] for launch in state.launches[:4]] == [
        "dcbg_rollmed_count8"] * 2 + ["dcbg_rollmed_window16_count8"] * 2  # and a timed one
    assert "uint8 and uint16 frames" in selftest.verdict(rows)


@pytest.mark.parametrize("kernel", ["dcbg_rollmed_count16", "dcbg_rollmed_count32",
                                    "dcbg_rollmed_window16_count8",
                                    "dcbg_rollmed_window16_count16",
                                    "dcbg_rollmed_window16_count32"])
def test_a_wrong_gpu_kernel_fails_the_selftest(fake_gpu, monkeypatch, kernel):
    """One wrong median per launch of a kernel (in the high byte of 16-bit medians): its
    row fails, and only its row"""
    fake_gpu()
    corrupt_kernel(monkeypatch, kernel, 0x100 if "window16" in kernel else 1)
    rows = run_selftest("cuda", cases=TINY + TINY16, file_events=0, num_cpus=1)
    wrong = [row for row in rows if not row.passed]
    bits = int(kernel.rsplit("_count", 1)[1])
    dtype = "uint16" if "window16" in kernel else "uint8"
    assert [(row.count_bits, row.dtype) for row in wrong] == [(bits, dtype)]
    assert wrong[0].same_as_cpu is False and wrong[0].same_as_definition is False
    assert "differs from the CPU engine" in wrong[0].note
    assert "the engine's check: CUDA device 0 computed a wrong median" in wrong[0].note
    assert not selftest.passed(rows)
    assert selftest.verdict(rows).startswith("selftest FAILED: 1 of 7 checks")
    if dtype == "uint16":
        assert selftest.verdict(rows).endswith(f"k={wrong[0].kernel_size} uint16); see the "
                                               f"table")


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


def test_a_wrong_window_far_from_the_start_fails_the_definition_check(monkeypatch):
    kernels = cpukernels.cpu_kernels()

    def wrong(frames, out, kernel_size, output_size, start, stop, counts):
        kernels.rolling_median_columns(frames, out, kernel_size, output_size, start, stop,
                                       counts)
        out[output_size - 1, start] ^= 1  # the last window of every batch

    monkeypatch.setattr(cpukernels, "cpu_kernels",
                        lambda: kernels._replace(rolling_median_columns=wrong))
    rows = run_selftest("cpu", cases=[StackCase(10, (8, 40), 200)], file_events=0,
                        num_cpus=1)
    assert rows[-1].same_as_definition is False
    window = int(rows[-1].note.split("(window, pixel) (")[1].split(",")[0])
    assert window >= 40  # beyond the first windows, which once were all it compared


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_the_partition_twin_equals_the_definition(data):
    count = data.draw(st.integers(1, 30))
    values = data.draw(st.sampled_from([st.integers(0, 255), st.sampled_from([0, 255]),
                                        st.sampled_from([7, 8])]))
    stack = data.draw(arrays(np.uint8, (count, *data.draw(st.sampled_from([(), (2, 3)]))),
                             elements=values))
    kernel_size = data.draw(st.integers(1, count))
    starts = data.draw(st.lists(st.integers(0, count - kernel_size), max_size=6))
    expected = rolling_median_windows_reference(stack, kernel_size)[starts]
    assert np.array_equal(window_medians_by_partition(stack, kernel_size, starts), expected)


def test_definition_windows_cover_every_count_width_and_the_stacks_ends():
    cases = selftest.default_cases()
    starts = {(case.kernel_size, case.dtype): selftest.definition_starts(case)
              for case in cases}
    for dtype in ("uint8", "uint16"):
        assert {case.count_bits for case in cases if case.dtype == dtype} == {8, 16, 32}
    for case in cases:
        chosen = starts[case.kernel_size, case.dtype]
        assert chosen[0] == 0 and chosen[-1] == case.windows - 1  # the first and last windows
        assert list(chosen[:4]) == [0, 1, 2, 3]  # medians that follow one another
        assert len(chosen) >= selftest.DEFINITION_WINDOWS[0]
    # each window costs k times the pixels: fewer of them where k is large
    assert len(starts[300, "uint8"]) < len(starts[100, "uint8"]) < len(starts[10, "uint8"])


def test_the_default_cases_include_realistic_16_bit_microscopy_stacks():
    """256x256 frames at k=100 and 300 with as many pixel-outputs as the 80x320 stacks"""
    cases = [case for case in selftest.default_cases(4096) if case.dtype == "uint16"]
    assert [(case.kernel_size, case.shape, case.realistic) for case in cases] == [
        (100, (256, 256), True), (300, (256, 256), True), (70_000, (2, 3), False)]
    assert cases[0].windows * 256 * 256 == 4096 * 80 * 320
    assert [case.windows for case in selftest.default_cases(1) if case.dtype == "uint16"
            ] == [1, 1, 200]
    stack = selftest.case_stack(cases[0])
    assert stack.dtype == np.uint16 and stack.shape == (cases[0].frames, 256, 256)
    assert 100 < np.median(stack) < 3000 and stack.max() == 65535  # saturated particles
    tiny = selftest.case_stack(cases[2])
    assert tiny.dtype == np.uint16 and (tiny[:, 0, 0] == 65535).all() and tiny.max() > 255
    with pytest.raises(ValueError, match="from 0 to 3"):
        window_medians_by_partition(np.zeros((5, 2), np.uint8), 2, [4])


def test_each_row_comes_when_done_after_saying_what_runs():
    events = []
    rows = run_selftest("cpu", cases=TINY, file_events=150, num_cpus=1,
                        on_row=lambda row: events.append(("row", row.check, row.kernel_size)),
                        on_step=lambda text: events.append(("step", text)))
    assert selftest.passed(rows)
    assert events[:2] == [("step", "cpu: loading the median kernel"),
                          ("row", "load kernel", None)]
    for case in TINY:
        row = events.index(("row", "median", case.kernel_size))
        steps = [event[1] for event in events[:row] if event[0] == "step"]
        assert steps[-1].startswith(f"k={case.kernel_size}: comparing ")
        assert f"k={case.kernel_size}: computing {case.frames} frames of " in " ".join(steps)
    file_steps = [event[1] for event in events[events.index(("row", "median", 70_000)):]
                  if event[0] == "step"]
    assert file_steps[0] == "file to file: writing a synthetic recording of 150 events"
    assert events[-1] == ("row", "file to file", 100)


def test_a_periodic_recording_repeats_the_synthetic_stack(tmp_path):
    import h5py

    from dcbg.synthetic import synthetic_stack, write_synthetic_rtdc
    path = write_synthetic_rtdc(tmp_path / "periodic.rtdc", 600, shape=(4, 6), period=256)
    with h5py.File(path) as h5:
        image = h5["events/image"][:]
    assert np.array_equal(image, synthetic_stack(256, (4, 6))[np.arange(600) % 256])
    with pytest.raises(ValueError, match="multiple of 256"):
        write_synthetic_rtdc(tmp_path / "other.rtdc", 600, shape=(4, 6), period=300)


class Terminal(io.StringIO):
    """stderr as a terminal shows it"""

    def isatty(self):
        return True


def test_command_shows_what_runs_on_a_terminal_only(monkeypatch, capsys):
    argv = ["selftest", "--device", "cpu", "--events", "2", "--file-events", "120",
            "--num-cpus", "1"]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""  # a log file keeps no erased lines
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(argv) == 0
    shown = terminal.getvalue()
    assert "\r\x1b[Kcpu: loading the median kernel …" in shown
    assert "\r\x1b[Kk=300: comparing 2 windows with the definition …" in shown
    assert shown.endswith("\r\x1b[K")  # erased before the verdict
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.splitlines()[-1].startswith("selftest passed")


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
    # title, header, load, 4 medians of uint8 and 3 of uint16 frames, file, verdict
    assert len(lines) == 2 + 1 + 4 + 3 + 1 + 1
    data = json.loads(report.read_text())
    assert data["passed"] is True and len(data["rows"]) == 9
    assert {(row["count_bits"], row["dtype"]) for row in data["rows"]} >= {
        (bits, dtype) for bits in (8, 16, 32) for dtype in ("uint8", "uint16")}
    assert "uint8 and uint16 frames" in lines[-1]


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
    with pytest.raises(ValueError, match="set file_events to 0 to skip it, or to 101 or more"):
        run_selftest("cpu", cases=TINY[:1], file_events=100)
    with pytest.raises(ValueError, match="at least one window per stack, got 0; set events to 1"):
        selftest.default_cases(0)


def test_sizes_that_cannot_work_are_said_in_options_on_the_command_line(capsys):
    assert main(["selftest", "--device", "cpu", "--file-events", "100"]) == 1
    assert capsys.readouterr().err.endswith(
        "got 100; set --file-events to 0 to skip it, or to 101 or more.\n")


def test_difference_names_the_first_wrong_pixel():
    expected = np.zeros((3, 4), np.uint8)
    actual = expected.copy()
    actual[1, 2] = 7
    assert selftest.difference(expected, expected) is None
    assert selftest.difference(actual, expected) == (
        "1 of 12 pixel-outputs differ, the first at (window, pixel) (1, 2)")
