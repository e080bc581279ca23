"""The window kernels of rollmed.cu (uint16, int16 and int8 frames) without a GPU

They run on the CPU through the host shim, as the uint8 kernel does in
test_kernel.py, and are compared byte for byte with the definition, written
here on its own: element ``k // 2`` of each window sorted by NumPy, in the
frames' own (signed or unsigned) order.
"""
import re
import shutil
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from dcbg.dtypes import FRAME_DTYPES
from dcbg.engines import cudakernel
from dcbg.errors import DeviceError
from helpers import host_kernel as hk
from helpers.data import (
    as_dtype,
    jumping_values,
    mixed_values,
    ramp_values,
    twelve_bit_camera_frames,
)
from helpers.processes import run_check_in_child
from helpers.strategies import sixteen_bit_values
from test_kernel import H100_SMS, nvcc_compile, sm90_blocks_per_sm

WINDOW_DTYPES = (np.uint16, np.int16, np.int8)
UNSET = 0x5A  # the bytes of output rows the kernel must not write


def definition(stack, kernel_size):
    """Element k // 2 of every sorted window of `kernel_size` frames, one row per window"""
    flat = stack.reshape(len(stack), -1)
    windows = sliding_window_view(flat, kernel_size, axis=0)  # (windows, pixels, k)
    return np.partition(windows, kernel_size // 2, axis=-1)[..., kernel_size // 2]


def planned(pixels, output_size, kernel_size, dtype):
    return cudakernel.plan_launch(pixels, output_size, kernel_size, sm90_blocks_per_sm,
                                  H100_SMS, dtype)


def hand_plan(name, block, pixels, output_size, segment_length):
    """A plan of any shape; its shared memory, that of every window kernel, is checked"""
    return cudakernel.LaunchPlan(name, block, (-(-pixels // block),
                                               -(-output_size // segment_length)),
                                 segment_length, block * cudakernel.WINDOW_BYTES)


def run_kernel(lib, stack, kernel_size, plan=None):
    """The kernel's medians of every window of `stack` (frames of its dtype)"""
    frames = np.ascontiguousarray(stack.reshape(len(stack), -1))
    count = len(frames) - kernel_size + 1
    pixels = frames.shape[1]
    if plan is None:
        plan = planned(pixels, count, kernel_size, frames.dtype)
    guard = 3
    medians = np.full((count + 2 * guard, pixels * frames.itemsize), UNSET,
                      np.uint8).view(frames.dtype)
    value_xor = cudakernel.kernel_family(frames.dtype).value_xor
    hk.launch(lib, plan, frames, medians[guard:guard + count], pixels, count, kernel_size,
              value_xor=value_xor)
    assert (medians[:guard].view(np.uint8) == UNSET).all()
    assert (medians[guard + count:].view(np.uint8) == UNSET).all()
    return medians[guard:guard + count]


def assert_exact(lib, stack, kernel_size, plan=None, expected=None):
    """The host-compiled window kernel gives the definition's bytes"""
    if expected is None:
        expected = definition(stack, kernel_size)
    got = run_kernel(lib, stack, kernel_size, plan)
    assert got.dtype == stack.dtype
    if not np.array_equal(got, expected):
        where = np.argwhere(got != expected)[0]
        raise AssertionError(f"{len(np.argwhere(got != expected))} medians differ, first at "
                             f"(window, pixel) = {tuple(where)}: {got[tuple(where)]} instead "
                             f"of {expected[tuple(where)]}")



@st.composite
def window_cases(draw):
    """A stack of 16- or 8-bit frames, a kernel size and a launch plan of any shape"""
    dtype = draw(st.sampled_from(WINDOW_DTYPES))
    kernel_size = draw(st.integers(1, 40))
    count = draw(st.integers(1, 50))
    pixels = draw(st.integers(1, 70))
    shape = (kernel_size + count - 1, pixels)
    values = draw(sixteen_bit_values(shape))
    stack = as_dtype(values, dtype)
    name = cudakernel.kernel_name(kernel_size, dtype)
    if draw(st.booleans()):
        widths = [8, 16, 32] if kernel_size <= 255 else [16, 32]
        name = name.rsplit("_count", 1)[0] + f"_count{draw(st.sampled_from(widths))}"
    block = draw(st.sampled_from([32, 64, 96, 128]))
    segment_length = draw(st.integers(1, count + 2))
    return stack, kernel_size, hand_plan(name, block, pixels, count, segment_length)


@settings(max_examples=250, deadline=None)
@given(window_cases())
def test_window_kernel_matches_definition(host_kernel, case):
    stack, kernel_size, plan = case
    assert_exact(host_kernel, stack, kernel_size, plan)


@pytest.mark.parametrize("dtype", WINDOW_DTYPES)
@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4, 5, 10, 33, 100, 101])
def test_medians_jump_across_the_whole_range_every_frame(host_kernel, dtype, kernel_size):
    """Every step leaves the counted levels, each time for another level"""
    values = jumping_values(kernel_size)
    assert_exact(host_kernel, as_dtype(values, dtype), kernel_size)


@pytest.mark.parametrize("kernel_size", [4, 5, 64])
def test_ramps_over_every_level(host_kernel, kernel_size):
    """Medians that climb and fall through all 65,536 levels, one level or less per frame"""
    values = ramp_values(kernel_size)
    stack = values.astype(np.uint16)
    assert_exact(host_kernel, stack, kernel_size)
    assert_exact(host_kernel, as_dtype(values, np.int16), kernel_size)


@pytest.mark.parametrize("kernel_size", [3, 10, 100, 101])
def test_twelve_bit_camera_data(host_kernel, kernel_size):
    """12-bit values in 16-bit words: offset, shot noise, bright particles saturating at 4095"""
    assert_exact(host_kernel, twelve_bit_camera_frames(kernel_size), kernel_size)


@pytest.mark.parametrize("kernel_size", [1, 2, 255, 256, 257])
def test_constant_and_saturated_pixels(host_kernel, kernel_size):
    """One level holds the whole window (255 fills an 8-bit count), at either end of the range"""
    frames = kernel_size + 20
    levels = [0, 1, 31, 32, 33, 4095, 32768, 65503, 65504, 65535]
    values = np.tile(np.array(levels), (frames, 1))
    rng = np.random.default_rng(kernel_size)
    mostly_saturated = np.where(rng.random((frames, 5)) < 0.8, 65535,
                                rng.integers(0, 65535, (frames, 5)))
    values = np.concatenate([values, mostly_saturated], axis=1)
    for dtype in WINDOW_DTYPES:
        assert_exact(host_kernel, as_dtype(values, dtype), kernel_size)


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 31, 32, 33, 64, 254, 255, 256, 257, 999,
                                         1000, 1999, 2000])
@pytest.mark.parametrize("extra", [0, 1, 37])
def test_kernel_sizes_up_to_2000(host_kernel, kernel_size, extra):
    """Odd and even windows from 1 to 2,000 frames, from a single window (N = k) on"""
    values = mixed_values(kernel_size, extra)
    for dtype in (np.uint16, np.int16):
        assert_exact(host_kernel, as_dtype(values, dtype), kernel_size)


@pytest.mark.parametrize("kernel_size", [65535, 65536, 65537])
def test_the_widest_counts(host_kernel, kernel_size):
    """16-bit counts up to 65,535 frames, 32-bit counts beyond, with a median that jumps"""
    rng = np.random.default_rng(kernel_size)
    frames = kernel_size + 3
    # 65535 and 0 in turn, kernel_size // 2 zeros: the median is 65535, then 0
    # where a 65535 leaves and a 0 enters, then 65535 where a 0 leaves and a
    # 65535 enters, and so on
    balanced = np.concatenate([np.where(np.arange(kernel_size) % 2 == 0, 65535, 0),
                               [0, 65535, 0]])
    values = np.stack([np.full(frames, 12345), np.full(frames, 65535), balanced,
                       rng.integers(0, 65536, frames)], axis=1)
    expected = definition(values.astype(np.uint16), kernel_size)
    assert list(expected[:, 2]) == [65535, 0, 65535, 0]
    assert_exact(host_kernel, values.astype(np.uint16), kernel_size, expected=expected)


@pytest.mark.parametrize("dtype", [np.int16, np.int8])
def test_signed_values_through_value_xor(host_kernel, dtype):
    """Signed frames in signed order: around zero, at both extremes, anywhere"""
    rng = np.random.default_rng(8)
    info = np.iinfo(dtype)
    frames = 90
    around_zero = rng.integers(-3, 4, (frames, 7))
    extremes = rng.choice(np.array([info.min, info.min + 1, -1, 0, info.max]), (frames, 7))
    anywhere = rng.integers(info.min, info.max + 1, (frames, 7))
    stack = np.concatenate([around_zero, extremes, anywhere], axis=1).astype(dtype)
    for kernel_size in (1, 2, 5, 10, 31):
        expected = definition(stack, kernel_size)
        assert_exact(host_kernel, stack, kernel_size, expected=expected)
        if kernel_size > 1:  # the unsigned order would give other medians on these frames
            unsigned = definition(stack.view(f"u{stack.itemsize}"), kernel_size)
            assert not np.array_equal(unsigned.view(dtype), expected)


@pytest.mark.parametrize("dtype", WINDOW_DTYPES)
@pytest.mark.parametrize("kernel_size", [2, 11, 254])
def test_every_count_width_block_and_segmentation(host_kernel, dtype, kernel_size):
    """Count widths 8/16/32 bits, blocks with idle threads and time segments: the same bytes"""
    rng = np.random.default_rng(kernel_size)
    count, pixels = 60, 70
    values = np.clip(5000 + np.cumsum(rng.integers(-300, 301, (kernel_size + count - 1,
                                                                pixels)), axis=0), 0, 65535)
    stack = as_dtype(values, dtype)
    expected = definition(stack, kernel_size)
    prefix = cudakernel.kernel_family(dtype).prefix
    for width in (8, 16, 32):
        for block in (32, 64, 96, 128):
            for segment_length in (1, 2, 7, count, count + 5):
                plan = hand_plan(f"{prefix}_count{width}", block, pixels, count,
                                 segment_length)
                assert_exact(host_kernel, stack, kernel_size, plan, expected)


def check_window_reads_stay_inside(library):
    """Short segments at both edges of buffers with unreadable neighbours

    The input holds exactly output_size + kernel_size - 1 rows, and medians
    that jump make every step rescan its window: a load or store outside the
    buffers kills this process. Runs in a child process.
    """
    lib = hk.load(library)
    rng = np.random.default_rng(6)
    pixels = 37  # two blocks of 32 with idle threads; rows far shorter than a page
    for dtype in (np.uint16, np.int8):
        for kernel_size in (1, 2, 3, 7, 256):
            for output_size in (1, 2, 3, 5, 9, 13):
                rows = output_size + kernel_size - 1
                values = np.where(np.arange(rows)[:, None] % 2 == 0,
                                  rng.integers(0, 200, (rows, pixels)),
                                  rng.integers(65300, 65536, (rows, pixels)))
                stack = as_dtype(values, dtype)
                expected = definition(stack, kernel_size)
                for segment_length in sorted({1, 2, 3, 5, output_size}):
                    for block in (32, 64):
                        plan = hand_plan(cudakernel.kernel_name(kernel_size, dtype), block,
                                         pixels, output_size, segment_length)
                        for edge in ("end", "start"):
                            print(np.dtype(dtype), kernel_size, output_size, segment_length,
                                  block, edge, flush=True)
                            frames = hk.guarded_copy(stack, edge)
                            medians = hk.guarded_copy(np.zeros_like(expected), edge)
                            hk.launch(lib, plan, frames, medians, pixels, output_size,
                                      kernel_size,
                                      value_xor=cudakernel.kernel_family(dtype).value_xor)
                            assert np.array_equal(medians, expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs mmap and mprotect")
def test_window_kernel_reads_stay_inside_the_input(host_kernel):
    run = run_check_in_child("test_kernel16", "check_window_reads_stay_inside",
                             host_kernel._name, timeout=300)
    # -11 (SIGSEGV) is an access outside the buffers
    last_case = (run.stdout.splitlines() or [""])[-1]
    assert run.returncode == 0, (
        f"exit {run.returncode} in the case (dtype kernel_size output_size segment_length "
        f"block edge) = ({last_case})\n{run.stderr[-3000:]}")


def test_entry_points_and_their_shared_memory(host_kernel):
    assert cudakernel.kernel_name(255, np.uint16) == "dcbg_rollmed_window16_count8"
    assert cudakernel.kernel_name(256, np.int16) == "dcbg_rollmed_window16_count16"
    assert cudakernel.kernel_name(65536, np.uint16) == "dcbg_rollmed_window16_count32"
    assert cudakernel.kernel_name(10, np.int8) == "dcbg_rollmed_window8_count8"
    assert cudakernel.kernel_name(10) == cudakernel.kernel_name(10, np.uint8) \
        == "dcbg_rollmed_count8"
    assert len(cudakernel.KERNEL_NAMES) == len(set(cudakernel.KERNEL_NAMES)) == 9
    assert cudakernel.WINDOW_BYTES == host_kernel.dcbg_host_window_bytes() == 128
    for kernel_size, count_bytes in ((255, 1), (256, 2), (65536, 4)):
        for dtype in WINDOW_DTYPES:  # 128, 64 or 32 levels
            name = cudakernel.kernel_name(kernel_size, dtype)
            assert cudakernel.THREAD_SHARED_BYTES[name] == 128
            assert cudakernel.block_sizes(name) == [(block, block * 128)
                                                    for block in cudakernel.BLOCK_SIZES]
        name = cudakernel.kernel_name(kernel_size)
        assert cudakernel.THREAD_SHARED_BYTES[name] == 256 * count_bytes
    assert cudakernel.kernel_family(np.int16).value_xor == 0x8000
    assert cudakernel.kernel_family(np.int8).value_xor == 0x80
    assert cudakernel.kernel_family(np.uint16).value_xor == 0
    # the GPU takes what the array functions take, refused with their one message
    assert set(cudakernel.KERNEL_FAMILIES) == set(FRAME_DTYPES)
    assert cudakernel.kernel_family(">u2") is cudakernel.kernel_family(np.uint16)
    for dtype in (np.float32, np.int32, np.uint32, bool):
        with pytest.raises(TypeError, match=f"^frames must be uint8, uint16, int8 or int16, "
                                            f"got {np.dtype(dtype)}; convert them first"):
            cudakernel.kernel_name(10, dtype)


def test_every_window_entry_point_runs_in_the_shim(host_kernel):
    stack = np.arange(40, dtype=np.uint16).reshape(8, 5) * 1000
    for name in cudakernel.KERNEL_NAMES:
        if "window" not in name:
            continue
        dtype = np.uint16 if "window16" in name else np.int8
        frames = stack.astype(dtype) if dtype == np.uint16 else as_dtype(stack, dtype)
        assert_exact(host_kernel, frames, 3, hand_plan(name, 32, 5, 6, 6))


@pytest.mark.parametrize("blocks", [1, 3])
def test_the_shim_fails_a_launch_whose_blocks_use_more_shared_memory_than_planned(
        host_kernel, blocks):
    """A plan with too little shared memory: the block's last threads write where the
    launch gave nothing, which the shim sees after every block (it refreshes the garbage of
    the shared memory a block may use, and leaves the rest to show such writes)"""
    stack = np.arange(8 * 64 * blocks, dtype=np.uint16).reshape(8, 64 * blocks)
    name = cudakernel.kernel_name(3, np.uint16)
    plan = hand_plan(name, 64, 64 * blocks, 6, 6)
    assert_exact(host_kernel, stack, 3, plan)
    short = cudakernel.LaunchPlan(name, 64, plan.grid, 6, 63 * cudakernel.WINDOW_BYTES)
    with pytest.raises(AssertionError, match="host launch failed with code 3"):
        run_kernel(host_kernel, stack, 3, short)


def test_plan_of_a_16_bit_stack():
    """256x256 frames at k=100: 128 bytes of counts per thread, half the uint8 kernel's"""
    plan = planned(256 * 256, 10000, 100, np.uint16)
    assert plan.kernel == "dcbg_rollmed_window16_count8"
    assert plan.shared_mem == plan.block * 128
    assert plan.grid[1] * plan.segment_length >= 10000
    assert plan.segment_length >= cudakernel.MIN_SEGMENT_WINDOWS * 100
    assert planned(4 * 5, 2000, 70000, np.uint16).kernel == "dcbg_rollmed_window16_count32"


def test_planning_counts_the_longer_warm_up_of_the_window_kernel():
    """A first window costs a radix select: fewer time segments than the uint8 kernel takes"""
    uint8 = planned(80 * 320, 100_000, 200, np.uint8)
    uint16 = cudakernel.plan_launch(80 * 320, 100_000, 200, lambda name, block, shared: 1,
                                    H100_SMS, np.uint16)
    same_occupancy = cudakernel.plan_launch(80 * 320, 100_000, 200,
                                            lambda name, block, shared: 1, H100_SMS)
    assert uint16.kernel.startswith("dcbg_rollmed_window16") and uint8.kernel.startswith(
        "dcbg_rollmed_count")
    assert uint16.grid[1] < same_occupancy.grid[1]


@pytest.mark.parametrize("dtype", WINDOW_DTYPES)
def test_launcher_runs_the_window_kernel_through_the_stand_in(fake_gpu, dtype):
    """Launcher(dtype=...) picks the entry point, its shared memory and value_xor"""
    state = fake_gpu()
    import cupy
    rng = np.random.default_rng(2)
    kernel_size, count, pixels = 9, 40, 50
    stack = as_dtype(rng.integers(0, 65536, (kernel_size + count - 1, pixels)), dtype)
    launcher = cudakernel.Launcher(0, pixels, kernel_size, dtype=dtype)
    frames = cupy.asarray(stack)
    medians = cupy.asarray(np.zeros((count, pixels), dtype))
    stream = cupy.cuda.Stream()
    launcher.launch(frames, medians, count, stream)
    stream.synchronize()
    assert np.array_equal(medians.array, definition(stack, kernel_size))
    assert [launch[0] for launch in state.launches] == [cudakernel.kernel_name(kernel_size,
                                                                                dtype)]
    assert launcher.plan(count).shared_mem == launcher.plan(count).block * 128
    assert cudakernel.launcher_for(0, pixels, kernel_size, dtype) is cudakernel.launcher_for(
        0, pixels, kernel_size, dtype) is not cudakernel.launcher_for(0, pixels, kernel_size)


@pytest.mark.parametrize("dtype", WINDOW_DTYPES)
def test_the_stand_in_runs_16_bit_and_signed_frames_as_the_engine_moves_them(fake_gpu, dtype):
    """Device buffers, pinned buffers, uploads, launches and downloads of every window dtype"""
    fake_gpu()
    import cupy
    import cupyx
    rng = np.random.default_rng(5)
    kernel_size, count, pixels = 7, 30, 45
    stack = as_dtype(rng.integers(0, 65536, (kernel_size + count - 1, pixels)), dtype)
    launcher = cudakernel.Launcher(0, pixels, kernel_size, dtype=dtype)
    stream = cupy.cuda.Stream(non_blocking=True)
    frames = cupy.empty(stack.shape, dtype)
    medians = cupy.empty((count, pixels), dtype)
    pinned_in = cupyx.empty_pinned(stack.shape, dtype)
    pinned_out = cupyx.empty_pinned((count, pixels), dtype)
    pinned_in[...] = stack
    frames.set(pinned_in, stream=stream)
    launcher.launch(frames, medians, count, stream)
    medians.get(stream=stream, out=pinned_out)
    assert np.array_equal(pinned_out, definition(stack, kernel_size))


def test_the_stand_in_refuses_arrays_of_another_element_size(fake_gpu):
    """A 16-bit kernel reads its arrays as 16-bit values, whatever dtype they have"""
    fake_gpu()
    import cupy
    kernel = cudakernel.load_kernels(0, np.uint16).functions["dcbg_rollmed_window16_count8"]
    stream = cupy.cuda.Stream()

    def arguments(dtype):
        return (cupy.empty((4, 8), dtype), cupy.empty((1, 8), dtype), np.int64(8),
                np.int64(1), np.int32(4), np.int32(1), np.uint32(0))

    with stream:
        kernel((1, 1), (32,), arguments(np.int16))
        with pytest.raises(TypeError, match="argument 0 must hold elements of 2 bytes"):
            kernel((1, 1), (32,), arguments(np.uint8))
        with pytest.raises(TypeError, match="argument 3 must be int64"):
            kernel((1, 1), (32,), arguments(np.uint16)[:3] + (np.int32(1),)
                   + arguments(np.uint16)[4:])
        with pytest.raises(TypeError, match="takes 7 arguments, got 6"):
            kernel((1, 1), (32,), arguments(np.uint16)[:6])


def test_window_kernels_compile_as_their_own_module_on_first_use(fake_gpu):
    """uint8 runs compile the uint8 kernel alone; the first 16-bit or int8 launcher of a
    device compiles the window kernels, once for all their dtypes"""
    state = fake_gpu(device_count=2)
    uint8 = cudakernel.Launcher(0, 50, 9)
    assert state.compile_options == [cudakernel.module_options("histogram")]
    assert set(uint8.kernels.functions) == set(cudakernel.MODULE_KERNEL_NAMES["histogram"]) \
        == {"dcbg_rollmed_count8", "dcbg_rollmed_count16", "dcbg_rollmed_count32"}
    occupancy_asked = len(state.occupancy_devices)
    assert occupancy_asked == sum(len(cudakernel.block_sizes(name))
                                  for name in uint8.kernels.functions)
    launchers = [cudakernel.Launcher(0, 50, 9, dtype=dtype) for dtype in WINDOW_DTYPES]
    assert state.compile_options == [cudakernel.module_options(module)
                                     for module in ("histogram", "window")]
    assert all(launcher.kernels is launchers[0].kernels for launcher in launchers)
    assert set(launchers[0].kernels.functions) == set(cudakernel.MODULE_KERNEL_NAMES["window"])
    assert len(state.occupancy_devices) - occupancy_asked == 6 * len(cudakernel.BLOCK_SIZES)
    assert cudakernel.Launcher(0, 80, 300, dtype=np.int16).kernels is launchers[0].kernels
    assert state.compiled == 2
    cudakernel.Launcher(1, 50, 9, dtype=np.uint16)  # each device compiles its own
    assert state.compiled == 3 and set(state.occupancy_devices[-24:]) == {1}
    assert sorted(cudakernel.KERNEL_NAMES) == sorted(
        name for names in cudakernel.MODULE_KERNEL_NAMES.values() for name in names)


def test_a_failed_window_kernel_compile_is_the_device_error_of_the_uint8_kernel(fake_gpu):
    state = fake_gpu()
    cudakernel.Launcher(0, 50, 9)  # the uint8 kernel compiled
    state.compile_error = RuntimeError("nvrtc: error: failed to load libnvrtc.so.12")
    for _ in range(2):  # the failed compile is kept, as the uint8 kernel's
        with pytest.raises(DeviceError, match="CUDA device 0 cannot be used: .*cannot load "
                                              "NVRTC") as raised:
            cudakernel.Launcher(0, 50, 9, dtype=np.uint16)
        assert raised.value.__cause__ is state.compile_error
    assert state.compiled == 1
    assert cudakernel.Launcher(0, 50, 9).kernels is cudakernel.load_kernels(0)


def check_window_segments_beyond_2_31_windows(library):
    """One segment of a batch of more than 2^31 windows, run alone, for each window kernel

    As test_kernel's check of the uint8 kernel: the pointers are offset back
    by the segment's first window, so only a kernel that counts windows in
    64 bits finds the rows of the small buffers. Runs in a child process.
    """
    lib = hk.load(library)
    kernel_size, windows, pixels = 5, 9, 3
    rng = np.random.default_rng(9)
    for dtype in WINDOW_DTYPES:
        stack = as_dtype(rng.integers(0, 65536, (windows + kernel_size - 1, pixels)), dtype)
        expected = definition(stack, kernel_size)
        name = cudakernel.kernel_name(kernel_size, dtype).encode()
        value_xor = cudakernel.kernel_family(dtype).value_xor
        for segment_length, segment in ((2**30 + 3, 1), (2**30 + 3, 2),
                                        (cudakernel.INT_MAX, 3)):
            first = segment * segment_length
            offset = first * pixels * stack.itemsize
            medians = np.zeros((windows, pixels), dtype)
            rc = lib.dcbg_host_launch_levels(
                name, 1, segment + 1, segment, segment + 1, 32, stack.ctypes.data - offset,
                medians.ctypes.data - offset, pixels, first + windows, kernel_size,
                segment_length, value_xor, 32 * cudakernel.WINDOW_BYTES)
            assert rc == 0
            assert np.array_equal(medians, expected), (np.dtype(dtype), segment_length,
                                                       segment)
            print(np.dtype(dtype), segment_length, segment, "ok", flush=True)


def test_window_kernels_count_windows_beyond_2_31(host_kernel):
    run = run_check_in_child("test_kernel16", "check_window_segments_beyond_2_31_windows",
                             host_kernel._name, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.count(" ok") == 3 * len(WINDOW_DTYPES)


@pytest.mark.parametrize("dtype", WINDOW_DTYPES)
def test_window_launch_arithmetic_beyond_2_31_windows(fake_gpu, dtype):
    """Window counts past int32 reach the window kernels whole, after the same planning"""
    fake_gpu()
    windows = 3_000_000_000
    for pixels, kernel_size, count in ((1, 3, windows), (2048 * 2048, 3, windows),
                                       (1, 2**30, 2**33)):
        plan = planned(pixels, count, kernel_size, dtype)
        assert plan.segment_length <= cudakernel.INT_MAX
        assert plan.grid[1] <= cudakernel.MAX_GRID_Y
        assert plan.grid[1] * plan.segment_length >= count
        assert (plan.grid[1] - 1) * plan.segment_length < count
    launcher = cudakernel.Launcher(0, 1, 3, dtype=dtype)
    arguments = launcher.arguments(None, None, windows, planned(1, windows, 3, dtype))
    assert [type(value) for value in arguments[2:]] == [np.int64, np.int64, np.int32,
                                                        np.int32, np.uint32]
    assert int(arguments[3]) == windows
    assert int(arguments[6]) == cudakernel.kernel_family(dtype).value_xor
    with pytest.raises(ValueError, match="more than one GPU launch computes"):
        planned(1, cudakernel.MAX_GRID_Y * cudakernel.INT_MAX + 1, 3, dtype)
    with pytest.raises(ValueError, match="more than a GPU kernel takes"):
        planned(1, 2**32, 2**31, dtype)


@pytest.mark.parametrize("dtype", WINDOW_DTYPES)
def test_batches_of_large_kernels_fill_the_gpu_by_the_window_kernels_occupancy(fake_gpu,
                                                                               dtype):
    """The window kernels keep more threads resident than the uint8 kernel (half its
    shared memory or less): a batch of windows_to_fill windows fills their slots"""
    fake_gpu()
    kernel_size, pixels = 600, 80 * 320
    launcher = cudakernel.Launcher(0, pixels, kernel_size, dtype=dtype)
    plan = launcher.plan(launcher.windows_to_fill())
    resident = launcher.blocks_per_sm(plan.kernel, plan.block, plan.shared_mem) * plan.block
    threads = plan.grid[0] * plan.grid[1] * plan.block
    assert threads >= 0.9 * resident * 132
    uint8 = cudakernel.Launcher(0, pixels, kernel_size)
    assert launcher.windows_to_fill() > uint8.windows_to_fill()


def ptxas_usage(text):
    """{entry point: (its stack frame line, registers)} from nvcc --resource-usage"""
    usage = {}
    for match in re.finditer(r"Function properties for (\w+)\n\s*(.*stack frame.*)\n"
                             r".*Used (\d+) registers", text):
        usage[match.group(1)] = (match.group(2).strip(), int(match.group(3)))
    return usage


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_the_window_module_compiles_with_nvcc_without_local_memory(tmp_path, arch):
    """Its own entry points, all of them and no other; the counts live in shared memory: no
    stack frame, no spills"""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    run = nvcc_compile(tmp_path, arch, "window")
    assert run.returncode == 0, run.stderr
    usage = ptxas_usage(run.stdout + run.stderr)
    assert set(usage) == set(cudakernel.MODULE_KERNEL_NAMES["window"]), usage
    for name in usage:
        frame, _registers = usage[name]
        assert frame.startswith("0 bytes stack frame") and "0 bytes spill stores" in frame, (
            name, frame)
