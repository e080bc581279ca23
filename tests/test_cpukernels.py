"""The CPU kernels: both builds exact, the C build installed where it can be built, its checks"""
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcbg
from dcbg import cpukernels
from dcbg.engines.base import count_dtype
from dcbg.engines.cpu import compute_median_for_slice
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
    """The element of rank k//2 of each of the first `count` windows, by selection"""
    rank = kernel_size // 2
    return np.stack([np.partition(frames[t:t + kernel_size], rank, axis=0)[rank]
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


GUARDED_KERNEL_SIZES = {np.dtype(np.uint8): (1, 2, 7, 19, 40, 256),
                        np.dtype(np.uint16): (1, 2, 7, 40, 57, 100, 256, 1100)}
"""Kernel sizes of the guarded runs: every kernel of each type, with its lanes"""


def check_c_reads_stay_inside():
    """Column ranges at both edges of buffers with unreadable neighbours (a child process)

    Every implementation of the C median for uint8 and uint16 frames, on
    noise (the window kernels read whole windows of pixels and turn to the
    histogram or sorted-window kernel) and on a ramp (windows move every
    step), with ranges narrower than a vector, of whole vectors and ending
    in a vector that overlaps the one before it.
    """
    from dcbg.cpukernels import _compiled
    rng = np.random.default_rng(8)
    pixels = 37
    for dtype, kernel_sizes in GUARDED_KERNEL_SIZES.items():
        levels = np.iinfo(dtype).max + 1
        for implementation in _compiled.median_implementations():
            for kernel_size in kernel_sizes:
                for output_size in (1, 2, 5, 40):
                    rows = output_size + kernel_size - 1
                    noise = rng.integers(0, levels, (rows, pixels)).astype(dtype)
                    ramp = ((np.arange(rows)[:, None] * 5 + np.arange(pixels)) % levels
                            ).astype(dtype)
                    for name, stack in (("noise", noise), ("ramp", ramp)):
                        expected = window_medians(stack, kernel_size, output_size)
                        for edge in ("end", "start"):
                            print(dtype, implementation, kernel_size, output_size, name, edge,
                                  flush=True)
                            frames = hk.guarded_copy(stack, edge)
                            medians = hk.guarded_copy(np.zeros_like(expected), edge)
                            for ranges in (((0, 5), (5, pixels)), ((0, pixels),),
                                           ((0, 16), (16, 32), (32, pixels))):
                                medians[...] = 0
                                for start, stop in ranges:
                                    counts = hk.guarded_copy(cpukernels.scratch(
                                        dtype, stop - start, kernel_size), edge)
                                    _compiled.rolling_median_columns(
                                        frames, medians, kernel_size, output_size, start,
                                        stop, counts, implementation=implementation)
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
        f"exit {run.returncode} in the case (dtype implementation kernel_size output_size "
        f"stack edge) = ({last_case})\n"
        f"{run.stderr[-3000:]}")


def test_each_build_gives_the_definitions_bytes_on_instrument_frames(cpu_build):
    """Realistic 80x320 frames, all pixels in one call"""
    from dcbg.synthetic import synthetic_stack
    stack = synthetic_stack(140, (80, 320), 4)
    frames = stack.reshape(len(stack), -1)
    expected = window_medians(frames, 100, 40)
    out = np.zeros_like(expected)
    counts = np.zeros((frames.shape[1], 256), np.uint8)
    cpu_build.rolling_median_columns(frames, out, 100, 40, 0, frames.shape[1], counts)
    assert np.array_equal(out, expected)


def c_median_implementations() -> list[str]:
    """The implementations of the C median this CPU runs (none without the C build)"""
    try:
        from dcbg.cpukernels import _compiled
    except ImportError:
        return []
    return list(_compiled.median_implementations())


def c_median(frames, kernel_size, count, ranges, implementation, count_type=None):
    """The C median of `count` windows over the column ranges, into a poisoned output

    Columns outside the ranges keep the poison in the result; dirty scratch.
    """
    from dcbg.cpukernels import _compiled
    out = np.full((count, frames.shape[1]), POISON[frames.dtype], frames.dtype)
    for start, stop in ranges:
        counts = cpukernels.scratch(frames.dtype, stop - start, kernel_size)
        if count_type is not None:
            counts = counts.astype(count_type)
        counts[...] = 3
        _compiled.rolling_median_columns(frames, out, kernel_size, count, start, stop, counts,
                                         implementation=implementation)
    return out


POISON = {np.dtype(np.uint8): 0xAB, np.dtype(np.uint16): 0xABCD}
"""What the medians outside the computed columns keep, per type of frames"""


def only_in(ranges, medians):
    """`medians` with the columns outside `ranges` poisoned"""
    inside = np.zeros(medians.shape[1], bool)
    for start, stop in ranges:
        inside[start:stop] = True
    return np.where(inside, medians, medians.dtype.type(POISON[medians.dtype]))


def median_test_stack(kind, rows, pixels, rng):
    """Frames (rows x pixels) on which a median moves in different ways"""
    time = np.arange(rows)[:, None]
    if kind == "noise":  # medians jump across the grey scale: the window kernel gives up
        return rng.integers(0, 256, (rows, pixels), dtype=np.uint8)
    if kind == "levels":  # few and neighbouring levels, with the extremes
        return rng.choice(np.array([0, 1, 2, 130, 254, 255], np.uint8), (rows, pixels))
    if kind == "extremes":
        return rng.choice(np.array([0, 255], np.uint8), (rows, pixels))
    if kind == "ramp":  # every median moves on, past any window of levels
        return ((time * 3 + np.arange(pixels)) % 256).astype(np.uint8)
    if kind == "steps":  # long plateaus and far jumps, up and down
        level = np.where(time // 7 % 3 == 1, 250, np.where(time // 7 % 3 == 2, 3, 120))
        return (level + rng.integers(-2, 3, (rows, pixels))).clip(0, 255).astype(np.uint8)
    from dcbg.synthetic import synthetic_stack  # instrument-like frames, whose medians wander
    stack = synthetic_stack(rows, (pixels // 10, 10), seed=rows)
    return np.ascontiguousarray(stack.reshape(rows, -1))


RANGES = ((0, 70),), ((3, 40), (40, 61), (61, 70)), ((5, 21), (60, 70))
"""Column ranges of 70 pixels: whole and partial vectors of 8 to 32 lanes, and a remainder"""


@pytest.mark.parametrize("implementation", c_median_implementations())
@pytest.mark.parametrize("kernel_size", [1, 2, 3, 10, 19, 20, 64, 255, 256, 301])
@pytest.mark.parametrize("kind", ["noise", "levels", "extremes", "ramp", "steps", "instrument"])
def test_each_c_median_implementation_gives_the_definitions_bytes(implementation, kernel_size,
                                                                  kind):
    """Every implementation (SIMD and scalar) on every kind of median movement"""
    rng = np.random.default_rng(kernel_size)
    count = 25
    frames = median_test_stack(kind, count + kernel_size - 1, 70, rng)
    expected = window_medians(frames, kernel_size, count)
    for ranges in RANGES:
        got = c_median(frames, kernel_size, count, ranges, implementation)
        assert np.array_equal(got, only_in(ranges, expected))


@pytest.mark.parametrize("implementation", c_median_implementations())
@pytest.mark.parametrize("kernel_size", [40, 300])
def test_c_median_turns_to_the_histogram_kernel_mid_batch(implementation, kernel_size):
    """Columns whose medians become noise part-way take the histogram kernel from there

    Instrument frames, then noise in every column but a few; counts wider
    than needed. The window kernel gives up on a vector at a step of its
    own and the histogram kernel continues on that vector's columns.
    """
    rng = np.random.default_rng(kernel_size)
    count = 150
    frames = median_test_stack("instrument", count + kernel_size - 1, 70, rng)
    noise = kernel_size // 2 + 30
    frames[noise:, 6:] = rng.integers(0, 256, (len(frames) - noise, 64), dtype=np.uint8)
    expected = window_medians(frames, kernel_size, count)
    for ranges in RANGES:
        for count_type in (count_dtype(kernel_size), np.uint32):
            got = c_median(frames, kernel_size, count, ranges, implementation, count_type)
            assert np.array_equal(got, only_in(ranges, expected))


@pytest.mark.parametrize("implementation", c_median_implementations())
def test_c_median_counts_to_65535_in_16_bit_lanes(implementation):
    """The largest kernel the window kernel takes: one level holds every element"""
    kernel_size = 65535
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (kernel_size + 2, 20), dtype=np.uint8)
    frames[:, 0] = 255
    frames[:, 1] = np.where(np.arange(len(frames)) % 2, 0, 255)
    frames[:, 2] = 0
    expected = window_medians(frames, kernel_size, 3)
    got = c_median(frames, kernel_size, 3, [(0, 20)], implementation)
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("kernel_size", [10, 100, 300])
def test_c_median_implementations_agree_on_instrument_frames(kernel_size):
    """Realistic 80x320 frames, all pixels in one call, through each implementation"""
    from dcbg.synthetic import synthetic_stack
    implementations = c_median_implementations()
    if not implementations:
        pytest.skip("the C build of the CPU kernels is not installed")
    count = 20
    stack = synthetic_stack(count + kernel_size - 1, (80, 320), 4)
    frames = stack.reshape(len(stack), -1)
    expected = window_medians(frames, kernel_size, count)
    for implementation in implementations:
        got = c_median(frames, kernel_size, count, [(0, frames.shape[1])], implementation)
        assert np.array_equal(got, expected), implementation


@C_BUILD_ONLY
def test_c_median_lists_its_implementations_and_refuses_unknown_ones(cpu_build):
    from dcbg.cpukernels import _compiled
    implementations = _compiled.median_implementations()
    assert implementations[-1] == "scalar"
    assert set(implementations) <= {"avx2", "simd128", "scalar"}
    assert cpukernels.median_implementation() == implementations[0]
    assert f"median: {implementations[0]}" in cpukernels.describe_build()
    frames = np.zeros((3, 4), np.uint8)
    with pytest.raises(ValueError, match="Unknown median implementation 'fortran'"):
        _compiled.rolling_median_columns(frames, np.zeros((1, 4), np.uint8), 3, 1, 0, 4,
                                         np.zeros((4, 256), np.uint8), implementation="fortran")


def test_numba_build_names_itself_as_the_median_implementation(monkeypatch):
    kernels = cpukernels.CPUKernels("numba", *[None] * (len(cpukernels.CPUKernels._fields) - 1))
    monkeypatch.setattr(cpukernels, "cpu_kernels", lambda: kernels)
    assert cpukernels.median_implementation() == "numba"


def column_cases(rng):
    """(source rows, pixels, columns, rows gathered): sorted samples as the check of GPU
    results takes them, unsorted and repeated columns, a single row, no columns"""
    from dcbg.engines.verification import sample_columns
    yield 40, 25_600 // 8, sample_columns(25_600 // 8, 32, 1), 37
    yield 9, 480, sample_columns(480, 96, 2), 9
    yield 5, 300, rng.integers(0, 300, 50), 5
    yield 3, 17, np.array([16, 0, 16, 5], np.int64), 2
    yield 1, 64, np.arange(64, dtype=np.int64), 1
    yield 4, 10, np.empty(0, np.int64), 4


COLUMN_DTYPES = [np.uint8, np.uint16]
"""The values the column kernels take (signed ones go in as their unsigned views)"""


def random_values(rng, shape, dtype):
    return rng.integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)


@pytest.mark.parametrize("dtype", COLUMN_DTYPES)
def test_gather_columns_equals_numpy(cpu_build, dtype):
    rng = np.random.default_rng(8)
    for rows, pixels, columns, gathered in column_cases(rng):
        source = random_values(rng, (rows, pixels), dtype)
        out = np.full((gathered, len(columns)), 0xAB, dtype)
        cpu_build.gather_columns(source, columns, out)
        assert np.array_equal(out, source[:gathered][:, columns])


@pytest.mark.parametrize("dtype", COLUMN_DTYPES)
def test_first_difference_finds_the_first_row_by_row(cpu_build, dtype):
    """-1 where all are equal, else the flat index of the first difference in the order of
    the rows; a difference outside the columns compared is none; in 16-bit values a
    difference in either byte counts"""
    rng = np.random.default_rng(9)
    top = np.iinfo(dtype).max
    for rows, pixels, columns, compared in column_cases(rng):
        actual = random_values(rng, (rows, pixels), dtype)
        expected = np.ascontiguousarray(actual[:compared][:, columns])
        assert cpu_build.first_difference(actual, columns, expected) == -1
        if len(columns) == 0:
            continue
        unused = np.setdiff1d(np.arange(pixels), columns)
        if len(unused):
            actual[0, unused[0]] ^= top
            assert cpu_build.first_difference(actual, columns, expected) == -1
        for _ in range(5):
            wrong = expected.copy()
            places = rng.integers(0, wrong.size, 3)
            wrong.flat[places] ^= rng.integers(1, top + 1, 3).astype(dtype)
            first = np.flatnonzero(wrong != expected)[0]
            assert cpu_build.first_difference(actual, columns, wrong) == first
    actual = random_values(rng, (6, 20), dtype)
    expected = actual[:4].copy()
    assert cpu_build.first_difference(actual, None, expected) == -1
    expected[2, 19] ^= 1
    expected[3, 0] ^= 1
    assert cpu_build.first_difference(actual, None, expected) == 2 * 20 + 19
    if dtype == np.uint16:  # only the high byte differs, with and without columns
        expected = actual[:4].copy()
        expected[1, 7] ^= 0x100
        assert cpu_build.first_difference(actual, None, expected) == 20 + 7
        columns = np.arange(3, 20, dtype=np.int64)
        assert cpu_build.first_difference(actual, columns,
                                          np.ascontiguousarray(expected[:, 3:])) == 17 + 4


@pytest.mark.parametrize("kernel", ["gather_columns", "first_difference"])
@pytest.mark.parametrize("first, second", [(np.uint8, np.uint16), (np.uint16, np.uint8),
                                           (np.int16, np.int16), (np.uint32, np.uint32)])
def test_the_column_kernels_take_two_arrays_of_one_size_of_1_or_2_bytes(cpu_build, kernel,
                                                                        first, second):
    """Values of another size than the other array's would be read at the wrong places"""
    with pytest.raises(ValueError, match="must be"):
        getattr(cpu_build, kernel)(np.zeros((3, 10), first), np.arange(4, dtype=np.int64),
                                   np.zeros((3, 4), second))


@pytest.mark.parametrize("kernel, rows, columns, shape, message", [
    ("gather_columns", 3, [0, 10], (3, 2), "column 10 is outside the 10 pixel columns"),
    ("gather_columns", 3, [-1, 3], (3, 2), "column -1 is outside"),
    ("gather_columns", 3, np.array([1, 3], np.int32), (3, 2),
     "columns must be a contiguous 1-D array of int64"),
    ("gather_columns", 3, [1, 3], (3, 3), "one column per entry of columns"),
    ("gather_columns", 2, [1, 3], (3, 2), "at most the rows of source"),
    ("first_difference", 3, [1, 10], (3, 2), "column 10 is outside"),
    ("first_difference", 2, None, (3, 10), "at most the rows of actual"),
    ("first_difference", 3, None, (3, 4), "per column of actual where columns is None"),
])
def test_the_column_kernels_refuse_what_they_would_read_or_write_out_of_bounds(
        cpu_build, kernel, rows, columns, shape, message):
    source = np.zeros((rows, 10), np.uint8)
    if isinstance(columns, list):
        columns = np.array(columns, np.int64)
    with pytest.raises(ValueError, match=message):
        getattr(cpu_build, kernel)(source, columns, np.zeros(shape, np.uint8))


# 16-bit frames

def median_test_stack16(kind, rows, pixels, rng):
    """uint16 frames (rows x pixels) on which a median moves in different ways"""
    time = np.arange(rows)[:, None]
    column = np.arange(pixels)
    if kind == "noise":  # medians jump across the 16-bit range: the window kernel gives up
        return rng.integers(0, 65536, (rows, pixels)).astype(np.uint16)
    if kind == "flips":  # each frame at the other end of the range: odd windows flip the median
        low = rng.integers(0, 40, (rows, pixels))
        return np.where(time % 2 == 1, 65535 - low, low).astype(np.uint16)
    if kind == "ramp":  # every median sweeps all 65,536 levels, wrapping from 65535 to 0
        return ((time * (65536 // rows + 1) + column * 977) % 65536).astype(np.uint16)
    if kind == "creep":  # a slow ramp: one level a frame, the columns spread over the range
        return ((time + column * 937) % 65536).astype(np.uint16)
    if kind == "12-bit":  # 12-bit camera data in 16-bit words, around mid-range
        return np.clip(rng.normal(2000, 45, (rows, pixels)), 0, 4095).astype(np.uint16)
    if kind == "12-bit high":  # ... and the same in the high bits of the words
        return (np.clip(rng.normal(2000, 45, (rows, pixels)), 0, 4095).astype(np.uint16)
                << np.uint16(4))
    if kind == "saturated":  # mostly 65535: the window of levels at the top of the range
        return np.where(rng.random((rows, pixels)) < 0.8, 65535,
                        rng.integers(65000, 65536, (rows, pixels))).astype(np.uint16)
    if kind == "constant":
        return np.tile(np.array([0, 1, 32768, 65534, 65535] * pixels, np.uint16)[:pixels],
                       (rows, 1))
    if kind == "levels":  # few and neighbouring levels, with the extremes
        return rng.choice(np.array([0, 1, 2, 32767, 32768, 65534, 65535], np.uint16),
                          (rows, pixels))
    if kind == "steps":  # long plateaus and far jumps, up and down
        level = np.where(time // 7 % 3 == 1, 65500, np.where(time // 7 % 3 == 2, 30, 33000))
        return (level + rng.integers(-20, 21, (rows, pixels))).clip(0, 65535).astype(np.uint16)
    from dcbg.synthetic import synthetic_stack16  # sCMOS-like frames with particles
    stack = synthetic_stack16(rows, (pixels // 10, 10), seed=rows)
    return np.ascontiguousarray(stack.reshape(rows, -1))


STACK16_KINDS = ("noise", "flips", "ramp", "creep", "12-bit", "12-bit high", "saturated",
                 "constant", "levels", "steps", "instrument")
KERNEL_SIZES16 = (1, 2, 3, 10, 55, 56, 57, 100, 159, 160, 255, 256, 1000, 2000)
"""Every kernel of 16-bit values at its edges: sorted lanes up to 56, windows of 8-bit counts
(more levels below 160) up to 255, of 16-bit counts above, and even k"""


def medians16(kind, kernel_size, count=25, pixels=70):
    """A test stack of `kind` and the medians of its `count` windows, by the definition"""
    frames = median_test_stack16(kind, count + kernel_size - 1, pixels,
                                 np.random.default_rng(kernel_size))
    return frames, window_medians(frames, kernel_size, count)


@pytest.mark.parametrize("kernel_size", KERNEL_SIZES16)
@pytest.mark.parametrize("kind", STACK16_KINDS)
def test_each_build_gives_the_definitions_bytes_on_16_bit_frames(cpu_build, kind, kernel_size):
    """Each build as the engines call it, on every kind of median movement"""
    frames, expected = medians16(kind, kernel_size)
    for ranges in RANGES:
        out = np.full_like(expected, POISON[frames.dtype])
        for start, stop in ranges:
            compute_median_for_slice(frames, out, kernel_size, len(expected),
                                     slice(start, stop))
        assert np.array_equal(out, only_in(ranges, expected))


@pytest.mark.parametrize("kernel_size", KERNEL_SIZES16)
@pytest.mark.parametrize("kind", STACK16_KINDS)
def test_each_c_median_implementation_gives_the_definitions_bytes_on_16_bit_frames(kind,
                                                                                   kernel_size):
    """Every implementation (SIMD and scalar) on every kind of median movement"""
    implementations = c_median_implementations()
    if not implementations:
        pytest.skip("the C build of the CPU kernels is not installed")
    frames, expected = medians16(kind, kernel_size)
    for implementation in implementations:
        for ranges in RANGES:
            got = c_median(frames, kernel_size, len(expected), ranges, implementation)
            assert np.array_equal(got, only_in(ranges, expected)), (implementation, ranges)


@pytest.mark.parametrize("implementation", c_median_implementations())
@pytest.mark.parametrize("kernel_size", [60, 300, 1100])
def test_c_median16_turns_to_sorted_lanes_or_windows_mid_batch(implementation, kernel_size):
    """Columns whose medians become noise part-way take the sorted lanes or windows from there

    sCMOS-like frames, then noise across the 16-bit range in every column
    but a few: the window kernel gives up on a vector at a step of its own
    and the sorted lanes (up to 1024 frames: 8- and 16-bit counts) or the
    sorted windows continue on that vector's columns.
    """
    rng = np.random.default_rng(kernel_size)
    count = 150
    frames = median_test_stack16("instrument", count + kernel_size - 1, 70, rng)
    noise = kernel_size // 2 + 30
    frames[noise:, 6:] = rng.integers(0, 65536, (len(frames) - noise, 64))
    expected = window_medians(frames, kernel_size, count)
    for ranges in RANGES:
        got = c_median(frames, kernel_size, count, ranges, implementation)
        assert np.array_equal(got, only_in(ranges, expected))


@pytest.mark.parametrize("implementation", c_median_implementations())
@pytest.mark.parametrize("kernel_size", [65535, 65536])
def test_c_median16_counts_to_65535_and_beyond(implementation, kernel_size):
    """The largest kernel of 16-bit counts, one level holding every element, and one more"""
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 65536, (kernel_size + 2, 20)).astype(np.uint16)
    frames[:, 0] = 65535
    frames[:, 1] = np.where(np.arange(len(frames)) % 2, 0, 65535)
    frames[:, 2] = 0
    frames[:, 3] = 1000 + np.arange(len(frames)) % 3
    expected = window_medians(frames, kernel_size, 3)
    got = c_median(frames, kernel_size, 3, [(0, 20)], implementation)
    assert np.array_equal(got, expected)


@st.composite
def stacks16(draw):
    """uint16 frames from a seed, with a kernel size, a window count and a column range

    The values are drawn by numpy from a seed, in one of several shapes: all
    levels, a narrow band anywhere (as camera noise around an offset), a
    few levels, or the two extremes.
    """
    count = draw(st.integers(1, 30))
    kernel_size = draw(st.one_of(st.integers(1, 64), st.integers(1, 2000)))
    pixels = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    shape = (count + kernel_size - 1, pixels)
    values = draw(st.sampled_from(["any", "band", "levels", "extremes"]))
    if values == "any":
        frames = rng.integers(0, 65536, shape)
    elif values == "band":
        offset = draw(st.integers(0, 65535))
        width = draw(st.integers(1, 400))
        frames = np.clip(offset + rng.integers(-width, width + 1, shape), 0, 65535)
    elif values == "levels":
        frames = rng.choice(draw(st.lists(st.integers(0, 65535), min_size=1, max_size=3)),
                            shape)
    else:
        frames = rng.choice([0, 65535], shape)
    start = draw(st.integers(0, pixels))
    stop = draw(st.integers(start, pixels))
    return frames.astype(np.uint16), kernel_size, count, (start, stop)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stacks16())
def test_16_bit_medians_of_random_stacks_equal_the_definition(cpu_build, case):
    """Each build, and each implementation of the C build, on random stacks and ranges"""
    frames, kernel_size, count, (start, stop) = case
    expected = only_in([(start, stop)], window_medians(frames, kernel_size, count))
    out = np.full_like(expected, POISON[frames.dtype])
    compute_median_for_slice(frames, out, kernel_size, count, slice(start, stop))
    assert np.array_equal(out, expected)
    if cpu_build.build == "C":
        for implementation in c_median_implementations():
            got = c_median(frames, kernel_size, count, [(start, stop)], implementation)
            assert np.array_equal(got, expected), implementation


@pytest.mark.parametrize("change,message", [
    ({"out": np.zeros((3, 6), np.uint8)}, "out must be a C-contiguous 2-D array of unsigned "
                                          "integers of 2 bytes"),
    ({"frames": np.zeros((12, 6), np.uint8)}, "out must be a C-contiguous 2-D array of "
                                              "unsigned integers of 1 byte"),
    ({"counts": np.zeros((6, 256), np.uint16)}, r"shape \(stop - start, kernel_size\)"),
    ({"counts": np.zeros((6, 10), np.uint8)}, "counts must be .* of 2 bytes"),
    ({"start": 2}, r"shape \(stop - start, kernel_size\)"),
    ({"frames": np.zeros((11, 6), np.uint16)}, "fewer rows than output_size"),
])
@C_BUILD_ONLY
def test_c_kernel_names_what_is_wrong_with_16_bit_arguments(cpu_build, change, message):
    arguments = {"frames": np.zeros((12, 6), np.uint16), "out": np.zeros((3, 6), np.uint16),
                 "kernel_size": 10, "output_size": 3, "start": 0, "stop": 6,
                 "counts": np.zeros((6, 10), np.uint16), **change}
    with pytest.raises(ValueError, match=message):
        cpu_build.rolling_median_columns(*arguments.values())


def test_scratch_fits_each_type_of_frames():
    assert cpukernels.scratch(np.uint8, 7, 300).shape == (7, 256)
    assert cpukernels.scratch(np.uint8, 7, 300).dtype == np.uint16
    assert cpukernels.scratch(np.uint8, 7, 3).dtype == np.uint8
    assert cpukernels.scratch(np.uint16, 7, 300).shape == (7, 300)
    assert cpukernels.scratch(np.uint16, 7, 300).dtype == np.uint16
    for dtype in (np.int16, np.float32, np.uint32, bool):
        with pytest.raises(TypeError, match="take uint8 or uint16 frames"):
            cpukernels.scratch(dtype, 7, 3)
