"""The CUDA engine, its check of the GPU's results and GPU arrays on uint16, int16 and int8
frames, on the CPU through the CuPy stand-in (helpers/fake_cupy.py), compared with the
definition of test_kernel16.py: element ``k // 2`` of each window sorted by NumPy in the
frames' own (signed or unsigned) order"""
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcbg
from dcbg.engines import cudakernel, cudamemory, engine_for
from dcbg.engines.cuda import CUDARollingMedian, rolling_median_on_gpu
from dcbg.engines.split import SplitRollingMedian
from dcbg.engines.verification import ResultCheck, sample_columns
from dcbg.errors import GPUResultError
from dcbg.reference import rolling_median_reference
from helpers.fake_cupy import FakeEvent
from helpers.strategies import sixteen_bit_values
from test_engines_cuda import loaded
from test_kernel16 import as_dtype, definition

DTYPES = (np.uint8, np.uint16, np.int16, np.int8)
WINDOW_DTYPES = (np.uint16, np.int16, np.int8)
UNSET = 0x5A  # the bytes of medians the engine has not written


def flat(stack):
    return np.ascontiguousarray(stack.reshape(len(stack), -1))


def engine_medians(stack, kernel_size, batch, dtype=None, verify="all", engine=None):
    """Every window of `stack` through a CUDA engine of batches of at most `batch` windows

    Returns the medians, the last window's (run's return value) and the engine.
    """
    frames = flat(stack)
    dtype = np.dtype(frames.dtype if dtype is None else dtype)
    windows = len(frames) - kernel_size + 1
    medians = np.full((windows, frames.shape[1] * dtype.itemsize), UNSET,
                      np.uint8).view(dtype)

    def read_into(start, stop, out):
        assert out.dtype == dtype  # the engine's buffers hold the caller's values
        out[:stop - start] = frames[start:stop]

    def write_at(offset, rows):
        assert rows.dtype == dtype
        medians[offset:offset + len(rows)] = rows

    if engine is None:
        engine = CUDARollingMedian(stack.shape[1:], kernel_size, batch, loaded(0, dtype),
                                   verify=verify, dtype=dtype)
    with engine:
        last = engine.run(read_into, 0, windows, write_at)
    return medians, last, engine


def random_stack(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


@st.composite
def engine_cases(draw):
    """Frames of any dtype the GPU takes, a kernel size of 8- or 16-bit counts, a batch"""
    dtype = draw(st.sampled_from(DTYPES))
    kernel_size = draw(st.one_of(st.integers(1, 40), st.integers(250, 300)))
    windows = draw(st.integers(1, 60))
    pixels = draw(st.integers(1, 70))
    shape = (kernel_size + windows - 1, pixels)
    values = draw(sixteen_bit_values(shape))
    stack = as_dtype(values, dtype) if dtype != np.uint8 else (values >> 8).astype(np.uint8)
    batch = draw(st.integers(1, windows + 2))
    return stack, kernel_size, batch, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=engine_cases())
def test_the_engine_computes_every_dtype_exactly(fake_gpu, case):
    """Any dtype, kernel size (8- and 16-bit counts), batch and interleaving of the streams"""
    stack, kernel_size, batch, seed = case
    state = fake_gpu(seed=seed)
    medians, last, engine = engine_medians(stack, kernel_size, batch)
    expected = definition(stack, kernel_size)
    assert medians.dtype == stack.dtype and np.array_equal(medians, expected)
    assert last.dtype == stack.dtype and np.array_equal(last, expected[-1])
    assert engine.result_check.pixel_outputs == expected.size  # verify="all" saw them all
    name = cudakernel.kernel_name(kernel_size, stack.dtype)
    assert {launch[0] for launch in state.launches} == {name}
    assert len(state.launches) == -(-len(expected) // engine.batch_windows)


def adversarial_stacks16(rng):
    """Named uint16 stacks (frames, pixels) of the ways a 16-bit median may move"""
    pixels = 37  # no multiple of a warp or a vector
    frames = 140
    time = np.arange(frames)[:, None]
    yield "jumps", np.where(rng.random((frames, pixels)) < 0.5,
                            rng.integers(0, 8, (frames, pixels)),
                            rng.integers(65528, 65536, (frames, pixels)))
    yield "whole range", rng.integers(0, 65536, (frames, pixels))
    yield "slow ramp", (time * 65535 // (frames - 1) + np.arange(pixels)) % 65536
    yield "ramp over every level", np.arange(65536 + 3 * 4)[:, None] % 65536 + np.zeros(
        (1, 3), np.int64)
    yield "12-bit", 100 + rng.poisson(900, (frames, pixels)).clip(0, 4095 - 100)
    yield "saturated", np.where(rng.random((frames, pixels)) < 0.6, 65535,
                                rng.integers(60000, 65536, (frames, pixels)))
    yield "constant", np.full((frames, pixels), 40000)
    yield "zero and top", np.where((time + np.arange(pixels)) % 2, 65535, 0)


@pytest.mark.parametrize("dtype", WINDOW_DTYPES)
@pytest.mark.parametrize("kernel_size,batch", [(1, 7), (2, 5), (11, 40), (64, 1000),
                                               (101, 13), (140, 1)])
def test_adversarial_16_bit_stacks(fake_gpu, dtype, kernel_size, batch):
    """Medians that jump across the range, ramps, 12-bit data, saturation, constants, N = k
    (kernel_size 140: one window), in batches of every size"""
    rng = np.random.default_rng(kernel_size)
    for name, values in adversarial_stacks16(rng):
        if len(values) > 1000 and batch < 1000:
            continue  # the ramp over every level: 65,548 frames in long batches only
        fake_gpu(seed=kernel_size)
        stack = as_dtype(values, dtype)
        medians, _, _ = engine_medians(stack, kernel_size, batch)
        assert np.array_equal(medians, definition(stack, kernel_size)), name


@pytest.mark.parametrize("dtype", WINDOW_DTYPES)
def test_counts_of_32_bits(fake_gpu, dtype):
    """kernel_size 65,537: the window kernels' 32-bit counts, one value filling a window"""
    state = fake_gpu()
    kernel_size = 65_537
    rng = np.random.default_rng(3)
    values = rng.integers(0, 65536, (kernel_size + 5, 3))
    values[:, 0] = 65535
    values[:, 1] = rng.integers(30000, 30004, len(values))
    stack = as_dtype(values, dtype)
    medians, _, _ = engine_medians(stack, kernel_size, 4, verify="sample")
    assert np.array_equal(medians, definition(stack, kernel_size))
    assert {launch[0] for launch in state.launches} == {
        cudakernel.kernel_name(kernel_size, dtype)} and cudakernel.kernel_name(
        kernel_size, dtype).endswith("_count32")


@pytest.mark.parametrize("dtype", WINDOW_DTYPES)
def test_batches_and_pinned_buffers_count_bytes(fake_gpu, dtype):
    """A 16-bit frame takes twice the bytes of an 8-bit one: the device batch halves, and
    kept page-locked buffers serve runs of frames of another dtype with as many bytes"""
    state = fake_gpu()
    itemsize = np.dtype(dtype).itemsize
    shape, kernel_size = (100, 256), 50
    pixels = shape[0] * shape[1]
    free = 64 * 2**20
    engine = CUDARollingMedian(shape, kernel_size, 10**6, loaded(0, dtype), free_bytes=free,
                               host_bytes=None, dtype=dtype)
    uint8 = CUDARollingMedian(shape, kernel_size, 10**6, loaded(0), free_bytes=free,
                              host_bytes=None)
    rows = int(free * cudamemory.DEVICE_MEMORY_FRACTION) // (pixels * itemsize)
    assert engine.batch_windows == (rows - 2 * kernel_size) // 4
    assert uint8.batch_windows == (int(free * cudamemory.DEVICE_MEMORY_FRACTION) // pixels
                                   - 2 * kernel_size) // 4
    stack = random_stack(np.random.default_rng(1), dtype, (80, 4, 32))
    engine_medians(stack, 5, 20, verify="sample")
    allocated = list(state.pinned_allocations)
    assert allocated and all(size % (128 * itemsize) == 0 for size in allocated)
    same_bytes = {np.uint16: np.int16, np.int16: np.uint16, np.int8: np.uint8}[dtype]
    frames = stack.view(same_bytes)
    medians, _, _ = engine_medians(frames, 5, 20, verify="sample")
    assert state.pinned_allocations == allocated, "the kept buffers served"
    assert np.array_equal(medians, definition(frames, 5))
    assert cudamemory.pinned_buffers.held_bytes() == sum(allocated)


@pytest.mark.parametrize("dtype", WINDOW_DTYPES)
def test_a_split_run_and_engine_for_take_the_dtype(fake_gpu, dtype):
    from dcbg.devices import select_device
    state = fake_gpu(device_count=2)
    stack = random_stack(np.random.default_rng(4), dtype, (90, 3, 20))
    split = SplitRollingMedian(stack.shape[1:], 9, 82, [loaded(0, dtype), loaded(1, dtype)],
                               verify="all", dtype=dtype)
    assert split.dtype == dtype and all(engine.dtype == dtype for engine in split.engines)
    medians, _, _ = engine_medians(stack, 9, None, engine=split)
    assert np.array_equal(medians, definition(stack, 9))
    assert sorted(set(state.launch_devices)) == [0, 1]
    for device in ("cuda:0", "cuda:all"):
        engine = engine_for(select_device(device).ready(dtype), stack.shape[1:], 9, 50, 1,
                            82, "all", dtype)
        assert engine.dtype == dtype
        medians, _, _ = engine_medians(stack, 9, None, engine=engine)
        assert np.array_equal(medians, definition(stack, 9))


def test_a_device_ready_for_uint8_loads_the_window_kernels_once_when_first_asked(fake_gpu):
    """Files make the device ready for the uint8 kernel; an engine of 16-bit or int8
    frames on it gets the window kernels, compiled on first use and then shared"""
    from dcbg.devices import select_device
    state = fake_gpu(device_count=2)
    ready = select_device("cuda:all").ready()
    assert set(ready.kernels) == {"histogram"} and state.compiled == 2
    stack = random_stack(np.random.default_rng(5), np.int16, (60, 3, 20))
    engine = engine_for(ready, stack.shape[1:], 9, 50, 1, 52, "all", np.int16)
    window = ready.kernels["window"]
    assert [kernels.device_index for kernels in window] == [0, 1] and state.compiled == 4
    assert ready.kernels_for(np.uint16) is window and ready.kernels_for(np.int8) is window
    assert ready.kernels_for(np.uint8) is ready.kernels["histogram"]
    assert state.compiled == 4, "each module compiled once per device"
    medians, _, _ = engine_medians(stack, 9, None, engine=engine)
    assert np.array_equal(medians, definition(stack, 9))
    with pytest.raises(ValueError, match="int16 frames need the window kernels, not the "
                                         "histogram kernels"):
        CUDARollingMedian(stack.shape[1:], 9, 52, ready.kernels["histogram"][0],
                          dtype=np.int16)
    assert select_device("cpu").ready().kernels_for(np.int16) == ()


def test_the_engines_refuse_frames_their_kernels_do_not_take(fake_gpu):
    fake_gpu()
    with pytest.raises(TypeError, match="frames must be uint8, uint16, int8 or int16, got "
                                        "float32"):
        CUDARollingMedian((4, 8), 3, 10, loaded(0), dtype=np.float32)
    from dcbg.engines.cpu import CPURollingMedian
    with pytest.raises(TypeError, match="The CPU kernels take uint8 or uint16 frames, not "
                                        "int16"):
        CPURollingMedian((4, 8), 3, 10, 1, 10, dtype=np.int16)


# the check of the GPU's results

SHAPE = (12, 40)
PIXELS = SHAPE[0] * SHAPE[1]
KERNEL, BATCH = 10, 50


def sixteen_bit_stack(dtype, frames=300, seed=5):
    """Realistic 16-bit frames (few thousand counts, particles, noise) as `dtype`"""
    from dcbg.synthetic import synthetic_stack16
    return as_dtype(synthetic_stack16(frames, SHAPE, seed), dtype)


def batch_sample(dtype, batch: int, windows: int) -> np.ndarray:
    """The pixels the sampled check compares in batch `batch` of a run of `windows`"""
    length = min(BATCH, windows - batch * BATCH)
    block = cudakernel.launcher_for(0, PIXELS, KERNEL, dtype).plan(length).block
    return sample_columns(PIXELS, block, batch * BATCH)


@pytest.mark.parametrize("dtype", WINDOW_DTYPES)
@pytest.mark.parametrize("fault", ["stale_downloads", "skipped_uploads"])
def test_the_sampled_check_catches_a_stale_buffer_of_16_bit_frames(fake_gpu, dtype, fault):
    stack = sixteen_bit_stack(dtype)
    batches = -(-(len(stack) - KERNEL + 1) // BATCH)
    for number in range(batches):
        state = fake_gpu(seed=number)
        getattr(state, fault).add(number)
        with pytest.raises(GPUResultError, match="CUDA device 0 computed a wrong median"):
            engine_medians(stack, KERNEL, BATCH, verify="sample")


@pytest.mark.parametrize("dtype", WINDOW_DTYPES)
def test_a_flipped_bit_of_any_byte_is_caught_and_named_in_the_frames_values(
        fake_gpu, cpu_build, dtype):
    """By either build of the CPU kernels: the low bit, a bit of the high byte, the sign
    bit (where a wrong order of signed values shows); the values named as the frames'"""
    stack = sixteen_bit_stack(dtype)
    expected = definition(stack, KERNEL)
    top = 0x80 if np.dtype(dtype).itemsize == 1 else 0x8000
    for batch, window, column, bits in [(2, 7, 5, 0x01), (0, 0, 0, top >> 1),
                                        (5, 39, -1, top), (3, 49, -3, 0x04)]:
        state = fake_gpu()
        pixel = int(batch_sample(dtype, batch, len(expected))[column])
        state.flips[batch] = (window, pixel, bits)
        event = batch * BATCH + window
        cpu = expected[event, pixel]
        gpu = (cpu.view(f"u{cpu.itemsize}") ^ bits).view(dtype)
        row, column_of_frame = divmod(pixel, SHAPE[1])
        with pytest.raises(GPUResultError) as raised:
            engine_medians(stack, KERNEL, BATCH, verify="sample")
        assert (f"computed a wrong median at event {event}, pixel (row {row}, column "
                f"{column_of_frame}): the GPU gave {gpu} where the CPU computes {cpu},"
                ) in str(raised.value)


@pytest.mark.parametrize("dtype", [np.int16, np.int8])
def test_the_check_orders_signed_values_as_numbers(dtype):
    """A GPU that ordered signed values as their unsigned bytes would be refused: the CPU
    recomputes them in the signed order, whatever the frames"""
    rng = np.random.default_rng(6)
    stack = as_dtype(rng.integers(0, 65536, (30, 50)), dtype)
    unsigned = stack.view(f"u{np.dtype(dtype).itemsize}")
    as_bytes = np.ascontiguousarray(definition(unsigned, 5)).view(dtype)  # the wrong order
    right = np.ascontiguousarray(definition(stack, 5))
    assert not np.array_equal(as_bytes, right)
    check = ResultCheck("all", 5, (50,), 0, dtype)
    check.compare(np.ascontiguousarray(stack), right, None)
    with pytest.raises(GPUResultError):
        check.compare(np.ascontiguousarray(stack), as_bytes, None)


# GPU arrays

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("background", [False, True])
def test_gpu_arrays_of_every_dtype_stay_on_the_gpu(fake_gpu, dtype, background):
    state = fake_gpu()
    import cupy
    kernel_size = 7
    stack = random_stack(np.random.default_rng(2), dtype, (40, 5, 9))
    frames = cupy.asarray(stack)
    windows = len(stack) - kernel_size + (0 if background else 1)
    shape = (len(stack) if background else windows, 5, 9)
    expected = definition(stack, kernel_size)[:windows].reshape(windows, 5, 9)
    if background:
        expected = np.concatenate([expected, np.repeat(expected[-1:], len(stack) - windows,
                                                       axis=0)])
    before = len(state.calls)
    result = rolling_median_on_gpu(frames, kernel_size, windows, shape, None, verify="off")
    assert isinstance(result, cupy.ndarray) and result.dtype == dtype
    assert not [call for call in state.calls[before:] if "host" in call[0]]
    assert np.array_equal(cupy.asnumpy(result), expected)
    out = cupy.empty(shape, dtype)
    assert rolling_median_on_gpu(frames, kernel_size, windows, shape, out, "all") is out
    assert np.array_equal(cupy.asnumpy(out), expected)
    strided = cupy.empty((shape[0], 5, 18), dtype)[..., ::2]  # not contiguous: copied in
    rolling_median_on_gpu(frames, kernel_size, windows, shape, strided, "sample")
    assert np.array_equal(cupy.asnumpy(cupy.ascontiguousarray(strided)), expected)
    wide = cupy.asarray(np.repeat(stack, 2, axis=2))[..., 1::2]  # a view: made contiguous
    got = rolling_median_on_gpu(wide, kernel_size, windows, shape, None, "all")
    assert np.array_equal(cupy.asnumpy(got), expected)


def test_gpu_arrays_refuse_an_out_of_another_dtype_and_frames_the_kernels_do_not_take(
        fake_gpu):
    fake_gpu()
    import cupy
    frames = cupy.asarray(np.zeros((10, 4), np.uint16))
    with pytest.raises(TypeError, match="out must be uint16, as the frames are, got uint8"):
        rolling_median_on_gpu(frames, 3, 8, (8, 4), cupy.empty((8, 4), np.uint8))
    with pytest.raises(TypeError, match="frames must be uint8, uint16, int8 or int16"):
        rolling_median_on_gpu(cupy.asarray(np.zeros((10, 4), np.float32)), 3, 8, (8, 4), None)


def test_gpu_arrays_check_the_first_call_of_each_dtype(fake_gpu):
    """uint16 and int16 frames share an entry point but not the values it orders: the
    first call of each dtype is checked, later ones only when asked"""
    state = fake_gpu()
    import cupy
    rng = np.random.default_rng(9)
    stacks = {dtype: random_stack(rng, dtype, (30, 4, 6)) for dtype in WINDOW_DTYPES}
    launch = 0
    for dtype in (np.uint16, np.int16, np.int8):
        frames = cupy.asarray(stacks[dtype])
        state.flips[launch] = (2, 5, 0x40)
        with pytest.raises(GPUResultError, match="at event 2, pixel \\(row 0, column 5\\)"):
            rolling_median_on_gpu(frames, 5, 26, (26, 4, 6), None)
        expected = definition(stacks[dtype], 5).reshape(26, 4, 6)
        checked = rolling_median_on_gpu(frames, 5, 26, (26, 4, 6), None)  # passes now
        assert np.array_equal(cupy.asnumpy(checked), expected)
        launch += 2
        state.flips[launch] = (2, 5, 0x40)  # no longer checked by default
        wrong = rolling_median_on_gpu(frames, 5, 26, (26, 4, 6), None)
        assert not np.array_equal(cupy.asnumpy(wrong), expected)
        launch += 1
        state.flips[launch] = (2, 5, 0x40)
        with pytest.raises(GPUResultError):
            rolling_median_on_gpu(frames, 5, 26, (26, 4, 6), None, verify="sample")
        launch += 1


@pytest.mark.parametrize("dtype", [np.int16, np.int8])
def test_signed_host_arrays_on_the_gpu_repeat_the_right_last_rows(fake_gpu, monkeypatch,
                                                                 dtype):
    """The array functions flip signed medians in the engine's buffer while they write them;
    a slow write keeps them flipped while the CUDA engine finishes, which must not take the
    last window's row from the buffer before the write returned"""
    from dcbg.rtdc import writer

    fake_gpu()
    monkeypatch.setattr(cudamemory, "DEVICE_BATCH_LIMIT", 16)
    monkeypatch.setattr(cudakernel.Launcher, "windows_to_fill", lambda self: 0)
    write_at = writer.StackWriter.write_at

    def slow_write_at(self, offset, medians):
        if offset + len(medians) == windows:  # the last batch's medians stay flipped a while
            time.sleep(0.5)
        write_at(self, offset, medians)

    monkeypatch.setattr(writer.StackWriter, "write_at", slow_write_at)
    synchronize = FakeEvent.synchronize

    def main_thread_waits_longer(self):  # so that the writer is inside a write meanwhile
        synchronize(self)
        if threading.current_thread() is threading.main_thread():
            time.sleep(0.1)

    monkeypatch.setattr(FakeEvent, "synchronize", main_thread_waits_longer)
    stack = sixteen_bit_stack(dtype, frames=60)
    windows = len(stack) - 7  # the frames that get a window of their own
    got = dcbg.rolling_median_background(stack, 7, device="cuda", verify="off")
    assert np.array_equal(got, rolling_median_reference(stack, 7))
