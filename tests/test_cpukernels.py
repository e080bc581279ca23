"""The CPU kernels: both builds exact, the C build installed where it can be built, its checks"""
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import dcbg
from dcbg import cpukernels
from dcbg.engines.base import count_dtype
from dcbg.engines.cpu import compute_median_for_slice
from dcbg.reference import rolling_median_reference
from helpers import host_kernel as hk

SOURCE_TREE = pathlib.Path(__file__).resolve().parents[1] / "src"


C_BUILD_ONLY = pytest.mark.parametrize("cpu_build", ["C"], indirect=True)
"""Runs a test with the C build only (skipped where it is not installed)"""


def test_an_install_with_a_compiler_has_the_c_build():
    if pathlib.Path(dcbg.__file__).resolve().is_relative_to(SOURCE_TREE):
        pytest.skip("dcbg is imported from its source tree, not from an install")
    compiler = (sysconfig.get_config_var("CC") or "").split()
    headers = pathlib.Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not compiler or shutil.which(compiler[0]) is None or not headers.exists():
        pytest.skip("no C compiler or Python headers here, so pip built no C kernels")
    assert cpukernels.cpu_kernels().build == "C"


def test_an_unknown_build_is_named():
    with pytest.raises(ValueError, match="Unknown CPU kernel build 'fortran'"):
        cpukernels.load_build("fortran")


def window_medians(frames, kernel_size, count):
    """The element of rank k//2 of each of the first `count` windows, by sorting"""
    return np.stack([np.sort(frames[t:t + kernel_size], axis=0)[kernel_size // 2]
                     for t in range(count)])


@pytest.mark.parametrize("kernel_size", [1, 255, 256, 65535, 65536])
def test_every_count_width_on_column_ranges(cpu_build, kernel_size):
    """8-, 16- and 32-bit counts, and column ranges that start and stop inside a row"""
    rng = np.random.default_rng(kernel_size)
    count = 3
    frames = rng.integers(0, 256, (kernel_size + count - 1, 7), dtype=np.uint8)
    frames[:, 0] = 255  # a full window in one bin
    frames[:, 1] = np.where(np.arange(len(frames)) % 2, 0, 255)
    expected = window_medians(frames, kernel_size, count)
    out = np.full((count, 7), 0xAB, np.uint8)
    for job in (slice(0, 2), slice(2, 3), slice(3, 3), slice(3, 7)):
        compute_median_for_slice(frames, out, kernel_size, count, job)
    assert np.array_equal(out, expected)


def test_scratch_counts_need_not_be_zero(cpu_build):
    """A kernel zeroes its scratch counts itself: a reused (dirty) array gives the same bytes"""
    rng = np.random.default_rng(12)
    frames = rng.integers(0, 256, (40, 9), dtype=np.uint8)
    expected = window_medians(frames, 30, 11)
    counts = rng.integers(0, 256, (9, 256), dtype=np.uint8)
    for _ in range(2):
        out = np.zeros((11, 9), np.uint8)
        cpu_build.rolling_median_columns(frames, out, 30, 11, 0, 9, counts)
        assert np.array_equal(out, expected)


@pytest.mark.parametrize("change,message", [
    ({"frames": np.zeros((12, 6), np.int16)}, "frames must be a C-contiguous 2-D array"),
    ({"frames": np.zeros((12, 12), np.uint8)[:, ::2]}, "contiguous"),
    ({"frames": np.zeros(72, np.uint8)}, "frames must be a C-contiguous 2-D array"),
    ({"out": np.zeros((3, 6), np.uint8)[:, ::-1]}, "contiguous"),
    ({"out": np.zeros((3, 5), np.uint8)}, "as many columns as frames"),
    ({"output_size": 4, "frames": np.zeros((13, 6), np.uint8)}, "out must have output_size rows"),
    ({"frames": np.zeros((11, 6), np.uint8)}, "fewer rows than output_size"),
    ({"stop": 7}, "a range of the pixel columns"),
    ({"start": 5}, "counts must have the shape"),
    ({"counts": np.zeros((6, 255), np.uint8)}, "counts must have the shape"),
    ({"counts": np.zeros((6, 256), np.float32)}, "unsigned integers"),
    ({"kernel_size": 256, "frames": np.zeros((258, 6), np.uint8)}, "too narrow a type"),
    ({"kernel_size": 0}, "kernel_size must be positive"),
    ({"kernel_size": 2**62, "output_size": 2**62}, "fewer rows"),  # no overflow
])
@C_BUILD_ONLY
def test_c_kernel_names_what_is_wrong(cpu_build, change, message):
    arguments = {"frames": np.zeros((12, 6), np.uint8), "out": np.zeros((3, 6), np.uint8),
                 "kernel_size": 10, "output_size": 3, "start": 0, "stop": 6,
                 "counts": np.zeros((6, 256), np.uint8), **change}
    with pytest.raises((ValueError, BufferError), match=message):
        cpu_build.rolling_median_columns(*arguments.values())


def check_c_reads_stay_inside():
    """Column ranges at both edges of buffers with unreadable neighbours (a child process)"""
    kernel = cpukernels.load_build("C").rolling_median_columns
    rng = np.random.default_rng(8)
    pixels = 37
    for kernel_size in (1, 2, 7, 256):
        for output_size in (1, 2, 5):
            stack = rng.integers(0, 256, (output_size + kernel_size - 1, pixels), np.uint8)
            expected = window_medians(stack, kernel_size, output_size)
            for edge in ("end", "start"):
                print(kernel_size, output_size, edge, flush=True)
                frames = hk.guarded_copy(stack, edge)
                medians = hk.guarded_copy(np.zeros_like(expected), edge)
                for start, stop in ((0, 5), (5, pixels)):
                    counts = np.zeros((stop - start, 256), count_dtype(kernel_size))
                    kernel(frames, medians, kernel_size, output_size, start, stop, counts)
                assert np.array_equal(medians, expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs mmap and mprotect")
@C_BUILD_ONLY
def test_c_kernel_reads_stay_inside_its_arrays(cpu_build):
    run = subprocess.run(
        [sys.executable, "-c",
         "import test_cpukernels; test_cpukernels.check_c_reads_stay_inside()"],
        cwd=pathlib.Path(__file__).parent, capture_output=True, text=True, timeout=300)
    # -11 (SIGSEGV) is an access outside the arrays
    last_case = (run.stdout.splitlines() or [""])[-1]
    assert run.returncode == 0, (
        f"exit {run.returncode} in the case (kernel_size output_size edge) = ({last_case})\n"
        f"{run.stderr[-3000:]}")


def test_each_build_gives_the_definitions_bytes_on_instrument_frames(cpu_build):
    """Realistic 80x320 frames, all pixels in one call"""
    from dcbg.synthetic import synthetic_stack
    stack = synthetic_stack(140, (80, 320), 4)
    frames = stack.reshape(len(stack), -1)
    expected = rolling_median_reference(stack, 100)[:40].reshape(40, -1)
    out = np.zeros_like(expected)
    counts = np.zeros((frames.shape[1], 256), np.uint8)
    cpu_build.rolling_median_columns(frames, out, 100, 40, 0, frames.shape[1], counts)
    assert np.array_equal(out, expected)
