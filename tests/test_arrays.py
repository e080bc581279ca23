"""dcbg.rolling_median and rolling_median_background on arrays, against the definitions

The definitions are written here on their own: element ``k // 2`` of each
window of frames, put in place by NumPy's partition, which orders signed
values as numbers.
"""
import h5py
import hdf5plugin
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numpy.lib.stride_tricks import sliding_window_view

import dcbg
from dcbg.engines import cpu
from dcbg.errors import GPUResultError
from dcbg.reference import rolling_median_reference, rolling_median_windows_reference
from helpers.data import (
    as_dtype,
    jumping_values,
    mixed_values,
    ramp_values,
    twelve_bit_camera_frames,
)

DTYPES = (np.uint8, np.uint16, np.int8, np.int16)


def definition(stack, kernel_size):
    """Element k // 2 of every window of `kernel_size` frames, one row per window"""
    stack = np.asarray(stack)
    flat = stack.reshape(len(stack), -1)
    windows = sliding_window_view(flat, kernel_size, axis=0)  # (windows, pixels, k)
    middle = np.partition(windows, kernel_size // 2, axis=-1)[..., kernel_size // 2]
    return middle.reshape(len(middle), *stack.shape[1:])


def background_definition(stack, kernel_size):
    """dcnum's background: row i is window min(i, N - k - 1), every row window 0 for N = k"""
    medians = definition(stack, kernel_size)
    count = len(stack)
    last = count - kernel_size - 1 if count > kernel_size else 0
    return medians[np.minimum(np.arange(count), last)]


def level_values(dtype):
    """Strategies for values of `dtype`: any, the extremes, a few levels around the middle"""
    info = np.iinfo(dtype)
    middle = (info.min + info.max) // 2
    return [st.integers(info.min, info.max), st.sampled_from([info.min, info.max]),
            st.sampled_from([info.min, info.min + 1, middle, middle + 1, info.max - 1,
                             info.max])]


@st.composite
def frame_stacks(draw, dtypes=DTYPES):
    """A stack of any supported dtype and frame shape (none, 1 pixel, extra axes), a k from 1
    to N, maybe a non-contiguous view"""
    dtype = draw(st.sampled_from(dtypes))
    count = draw(st.integers(1, 40))
    frame = draw(st.sampled_from([(), (1,), (1, 1), (3, 4), (2, 3, 2), (7,)]))
    values = draw(st.sampled_from(level_values(dtype)))
    stack = draw(arrays(dtype, (count, *frame), elements=values))
    if frame and draw(st.booleans()):  # a non-contiguous view: every other pixel of a wider one
        wide = np.repeat(stack, 2, axis=-1)
        stack = wide[..., ::2]
    kernel_size = draw(st.integers(1, count))
    return stack, kernel_size


@settings(max_examples=200, deadline=None)
@given(frame_stacks())
def test_rolling_median_equals_the_definition(case):
    stack, kernel_size = case
    got = dcbg.rolling_median(stack, kernel_size, device="cpu")
    assert got.dtype == stack.dtype and got.shape == (len(stack) - kernel_size + 1,
                                                       *stack.shape[1:])
    assert np.array_equal(got, definition(stack, kernel_size))


@settings(max_examples=150, deadline=None)
@given(frame_stacks())
def test_rolling_median_background_equals_dcnums_definition(case):
    stack, kernel_size = case
    got = dcbg.rolling_median_background(stack, kernel_size, device="cpu")
    assert got.dtype == stack.dtype and got.shape == stack.shape
    assert np.array_equal(got, background_definition(stack, kernel_size))


@settings(max_examples=60, deadline=None)
@given(frame_stacks())
def test_the_reference_definitions_take_every_dtype(case):
    """dcbg.reference, which selftest and users compare with, is the definition for each dtype"""
    stack, kernel_size = case
    assert np.array_equal(rolling_median_windows_reference(stack, kernel_size),
                          definition(stack, kernel_size))
    assert np.array_equal(rolling_median_reference(stack, kernel_size),
                          background_definition(stack, kernel_size))


def test_the_background_is_the_bytes_of_background_rollmed(tmp_path):
    from dcbg.synthetic import synthetic_stack
    stack = synthetic_stack(300, shape=(20, 30), seed=5)
    with dcbg.BackgroundRollMed(stack, tmp_path / "bg.rtdc", kernel_size=50, batch_size=70,
                                device="cpu") as bg:
        bg.process()
    with h5py.File(tmp_path / "bg.rtdc") as h5:
        expected = h5["events/image_bg"][:]
    assert np.array_equal(dcbg.rolling_median_background(stack, 50, device="cpu"), expected)


def test_h5py_and_memmap_in_and_out(tmp_path):
    """Streamed from an h5py dataset into a memory map and into an h5py dataset"""
    rng = np.random.default_rng(3)
    stack = rng.integers(0, 256, (130, 6, 5), dtype=np.uint8)
    with h5py.File(tmp_path / "frames.h5", "w") as h5:
        h5.create_dataset("frames", data=stack, chunks=(7, 6, 5))
    expected = rolling_median_windows_reference(stack, 9)
    with h5py.File(tmp_path / "frames.h5", "a") as h5:
        mapped = np.lib.format.open_memmap(tmp_path / "out.npy", "w+", np.uint8,
                                           expected.shape)
        assert dcbg.rolling_median(h5["frames"], 9, device="cpu", out=mapped) is mapped
        assert np.array_equal(np.load(tmp_path / "out.npy"), expected)
        target = h5.create_dataset("bg", shape=stack.shape, dtype=np.uint8)
        dcbg.rolling_median_background(h5["frames"], 9, device="cpu", out=target)
        assert np.array_equal(target[:], rolling_median_reference(stack, 9))
    source = np.lib.format.open_memmap(tmp_path / "in.npy", "w+", np.uint8, stack.shape)
    source[:] = stack
    assert np.array_equal(dcbg.rolling_median(source, 9, device="cpu"), expected)


def test_memory_stays_bounded_with_an_out_on_disk(tmp_path):
    """Each read asks the input for one engine batch, not for the whole stack"""
    values = np.random.default_rng(4).integers(0, 256, (5000, 4, 4), dtype=np.uint8)

    class Frames:
        shape, dtype = values.shape, values.dtype
        largest = 0

        def __getitem__(self, item):
            start, stop, _ = item.indices(self.shape[0])
            Frames.largest = max(Frames.largest, stop - start)
            return values[start:stop]

    out = np.lib.format.open_memmap(tmp_path / "out.npy", "w+", np.uint8, values.shape)
    dcbg.rolling_median_background(Frames(), 10, device="cpu", out=out)
    assert Frames.largest < 2100
    assert np.array_equal(out, rolling_median_reference(values, 10))


def extreme_stack(dtype, shape, seed):
    """Random values of `dtype` with a third of them at either end of its range"""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    values = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    ends = rng.choice(np.array([info.min, info.max], dtype), shape)
    return np.where(rng.random(shape) < 1 / 3, ends, values)


def workers_used(monkeypatch) -> list:
    """The kinds of CPU workers that compute batches from now on"""
    used = []
    for kind in (cpu.ThreadWorkers, cpu.ProcessWorkers):
        def compute(self, *args, _compute=kind.compute):
            used.append(self.kind)
            return _compute(self, *args)
        monkeypatch.setattr(kind, "compute", compute)
    return used


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_every_dtype_through_threads_and_worker_processes(monkeypatch, dtype, workers):
    """Several batches of 720-pixel frames, two jobs each, on both kinds of workers"""
    if workers == "processes":
        monkeypatch.setattr(cpu, "PROCESS_MIN_WINDOWS", 1)
    used = workers_used(monkeypatch)
    stack = extreme_stack(dtype, (300, 24, 30), seed=np.dtype(dtype).num)
    got = dcbg.rolling_median_background(stack, 21, device="cpu")
    assert set(used) == {workers} and len(used) >= 3
    assert got.dtype == dtype and np.array_equal(got, background_definition(stack, 21))


LAYOUTS = {
    "zstd chunks of whole frames": dict(chunks=(7, 6, 5), shuffle=True, fletcher32=True,
                                        **hdf5plugin.Zstd(clevel=5)),
    "deflate chunks of whole frames": dict(chunks=(16, 6, 5), compression="gzip",
                                           shuffle=True),
    "chunks that split frames": dict(chunks=(7, 3, 5), **hdf5plugin.Zstd()),
    "contiguous": {},
    "big-endian": dict(chunks=(7, 6, 5), shuffle=True, **hdf5plugin.Zstd()),
}
"""h5py datasets dcbg decodes and encodes itself (the first two) and those h5py does"""


def create(group, name, layout, shape, dtype, data=None):
    """A dataset of `layout`; a big-endian one holds values of the other byte order"""
    dtype = np.dtype(dtype)
    if layout == "big-endian":
        dtype = dtype.newbyteorder(">")
    return group.create_dataset(name, shape=shape, dtype=dtype, data=data, **LAYOUTS[layout])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_h5py_datasets_of_every_layout_in_and_out(tmp_path, dtype, layout):
    stack = extreme_stack(dtype, (90, 6, 5), seed=5)
    with h5py.File(tmp_path / "frames.h5", "w") as h5:
        frames = create(h5, "frames", layout, stack.shape, dtype, stack)
        medians = create(h5, "medians", layout, (90 - 8, 6, 5), dtype)
        background = create(h5, "background", layout, stack.shape, dtype)
        assert dcbg.rolling_median(frames, 9, device="cpu", out=medians) is medians
        dcbg.rolling_median_background(frames, 9, device="cpu", out=background)
        assert np.array_equal(medians[:], definition(stack, 9))
        assert np.array_equal(background[:], background_definition(stack, 9))
        own = dcbg.rolling_median(frames, 9, device="cpu")
        assert own.dtype == dtype and np.array_equal(own, definition(stack, 9))


@pytest.mark.parametrize("dtype", DTYPES)
def test_memory_maps_and_views_in_and_out(tmp_path, dtype):
    stack = extreme_stack(dtype, (70, 4, 9), seed=6)
    source = np.lib.format.open_memmap(tmp_path / "in.npy", "w+", dtype, stack.shape)
    source[:] = stack
    out = np.lib.format.open_memmap(tmp_path / "out.npy", "w+", dtype, stack.shape)
    dcbg.rolling_median_background(source, 10, device="cpu", out=out)
    assert np.array_equal(np.load(tmp_path / "out.npy"), background_definition(stack, 10))
    wide = np.zeros((70, 4, 18), dtype)  # out a view of every other pixel of a wider array
    dcbg.rolling_median_background(source[:, ::-1], 10, device="cpu", out=wide[..., ::2])
    assert np.array_equal(wide[..., ::2], background_definition(stack[:, ::-1], 10))
    assert not wide[..., 1::2].any()
    swapped = np.zeros((61, 4, 9), np.dtype(dtype).newbyteorder(">"))
    dcbg.rolling_median(source, 10, device="cpu", out=swapped)
    assert np.array_equal(swapped, definition(stack, 10))


def test_h5py_datasets_are_decoded_and_encoded_by_dcbgs_chunk_codecs(tmp_path, monkeypatch):
    """Frames and medians of whole-frame zstd chunks never pass through h5py's filters

    h5py runs a dataset's filters on one core under its lock; dcbg decodes
    and encodes the chunks in a pool of threads, as for files.
    """
    stack = extreme_stack(np.uint16, (200, 6, 5), seed=7)
    layout = "zstd chunks of whole frames"
    with h5py.File(tmp_path / "frames.h5", "w") as h5:
        frames = create(h5, "frames", layout, stack.shape, np.uint16, stack)
        background = create(h5, "background", layout, stack.shape, np.uint16)

        def refused(*args, **kwargs):
            raise AssertionError("read or written through h5py's filters")
        for method in ("__getitem__", "__setitem__", "read_direct", "write_direct"):
            monkeypatch.setattr(h5py.Dataset, method, refused)
        dcbg.rolling_median_background(frames, 30, device="cpu", out=background)
        monkeypatch.undo()
        assert np.array_equal(background[:], background_definition(stack, 30))


def test_a_uint16_recording_still_gets_the_clear_error_of_files(tmp_path):
    """Files follow RT-DC's format: uint8 frames; only the array functions take other types"""
    with h5py.File(tmp_path / "u16.rtdc", "w") as h5:
        h5.create_dataset("events/image", data=np.zeros((30, 4, 5), np.uint16))
    with pytest.raises(dcbg.errors.NoImageDataError,
                       match=r"is uint16 with shape \(30, 4, 5\), but dcbg needs uint8 frames"):
        dcbg.BackgroundRollMed(tmp_path / "u16.rtdc", tmp_path / "bg.rtdc", device="cpu")
    with pytest.raises(dcbg.errors.NoImageDataError,
                       match=r"stack is int16 with shape \(30, 4, 5\), but dcbg needs uint8"):
        dcbg.BackgroundRollMed(np.zeros((30, 4, 5), np.int16), tmp_path / "bg.rtdc",
                               device="cpu")



def assert_exact(stack, kernel_size):
    """Both array functions give the definition's bytes"""
    got = dcbg.rolling_median(stack, kernel_size, device="cpu")
    expected = definition(stack, kernel_size)
    if not np.array_equal(got, expected):
        where = tuple(np.argwhere(got != expected)[0])
        raise AssertionError(f"{np.count_nonzero(got != expected)} medians differ, first at "
                             f"{where}: {got[where]} instead of {expected[where]}")
    assert np.array_equal(dcbg.rolling_median_background(stack, kernel_size, device="cpu"),
                          background_definition(stack, kernel_size))


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int8])
@pytest.mark.parametrize("kernel_size", [1, 2, 3, 10, 100, 101])
def test_medians_that_jump_across_the_whole_range_every_frame(dtype, kernel_size):
    values = jumping_values(kernel_size)
    assert_exact(as_dtype(values, dtype), kernel_size)


@pytest.mark.parametrize("kernel_size", [4, 65])
def test_slow_ramps_over_all_65536_levels(kernel_size):
    """Medians that climb and fall through every level, one level or less per frame"""
    values = ramp_values(kernel_size)
    assert_exact(values.astype(np.uint16), kernel_size)
    assert_exact(as_dtype(values, np.int16), kernel_size)


@pytest.mark.parametrize("kernel_size", [3, 10, 100, 101])
@pytest.mark.parametrize("aligned", ["low bits", "high bits"])
def test_twelve_bit_camera_data_in_16_bit_words(kernel_size, aligned):
    """An offset, shot noise and a bright particle saturating at 4095 (or 65520, shifted)"""
    assert_exact(twelve_bit_camera_frames(kernel_size, aligned == "high bits"), kernel_size)


@pytest.mark.parametrize("kernel_size", [1, 2, 255, 256, 257])
def test_saturated_and_constant_stacks(kernel_size):
    frames = kernel_size + 20
    rng = np.random.default_rng(kernel_size)
    for dtype in DTYPES:
        info = np.iinfo(dtype)
        saturated = np.where(rng.random((frames, 5)) < 0.8, info.max,
                             rng.integers(info.min, info.max, (frames, 5)))
        assert_exact(saturated.astype(dtype), kernel_size)
        for level in {info.min, info.min + 1, -1, 0, 1, info.max - 1, info.max} & set(
                range(info.min, info.max + 1)):
            constant = np.full((frames, 3, 2), level, dtype)
            assert np.array_equal(dcbg.rolling_median(constant, kernel_size, device="cpu"),
                                  constant[:21])


@pytest.mark.parametrize("dtype", [np.int8, np.int16])
@pytest.mark.parametrize("kernel_size", [1, 2, 5, 6])
def test_signed_extremes_are_ordered_as_numbers(dtype, kernel_size):
    """-128 < -1 < 0 < 127 (and int16's), though their bits order -1 above 127"""
    info = np.iinfo(dtype)
    levels = np.array([info.min, info.min + 1, -1, 0, 1, info.max - 1, info.max], dtype)
    rng = np.random.default_rng(kernel_size)
    stack = rng.choice(levels, (kernel_size + 60, 4, 6))
    assert_exact(stack, kernel_size)
    ordered = np.array([info.min, -1, 0, info.max], dtype)[:, None]  # one window, N = k = 4
    assert dcbg.rolling_median(ordered, 4, device="cpu")[0, 0] == 0


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 64, 255, 256, 999, 1000, 1999, 2000])
@pytest.mark.parametrize("extra", [0, 1, 37])
def test_kernel_sizes_up_to_2000_from_a_single_window_on(kernel_size, extra):
    """Odd and even windows from 1 to 2,000 frames; N = k gives a single window"""
    values = mixed_values(kernel_size, extra)
    for dtype in DTYPES:
        assert_exact(as_dtype(values, dtype), kernel_size)


@pytest.mark.parametrize("call, error, message", [
    (lambda: dcbg.rolling_median(np.zeros((5, 2), np.float32), 2), TypeError,
     r"^frames must be uint8, uint16, int8 or int16, got float32; convert them first"),
    (lambda: dcbg.rolling_median(np.zeros((5, 2), bool), 2), TypeError,
     "must be uint8, uint16, int8 or int16, got bool"),
    (lambda: dcbg.rolling_median(np.zeros((5, 2), np.int32), 2), TypeError,
     "must be uint8, uint16, int8 or int16, got int32"),
    (lambda: dcbg.rolling_median(np.zeros((5, 2), np.uint64), 2), TypeError,
     "must be uint8, uint16, int8 or int16, got uint64"),
    (lambda: dcbg.rolling_median_background([[1.5, 2.0]] * 3, 2), TypeError, "got float64"),
    (lambda: dcbg.rolling_median(np.zeros((5, 2), np.uint16), 2, out=np.zeros((4, 2), np.uint8)),
     TypeError, r"^out must be uint16, the dtype of the frames, got uint8\.$"),
    (lambda: dcbg.rolling_median(np.zeros((5, 2), np.int16), 2,
                                 out=np.zeros((4, 2), np.uint16)),
     TypeError, "out must be int16, the dtype of the frames, got uint16"),
    (lambda: dcbg.rolling_median("frames.h5", 2), TypeError, "got str"),
    (lambda: dcbg.rolling_median(np.zeros((5, 2), np.uint8), 6), ValueError,
     "N=5 events.*kernel_size=6"),
    (lambda: dcbg.rolling_median(np.zeros((5, 2), np.uint8), 0), ValueError,
     "positive integer, got 0"),
    (lambda: dcbg.rolling_median(np.zeros((5, 2), np.uint8), 2.0), ValueError,
     "positive integer, got 2.0"),
    (lambda: dcbg.rolling_median(np.zeros((0, 2), np.uint8), 1), ValueError, "N=0"),
    (lambda: dcbg.rolling_median(np.uint8(3), 1), ValueError, "at least one axis"),
    (lambda: dcbg.rolling_median(np.zeros((5, 0, 4), np.uint8), 2, device="cpu"), ValueError,
     r"no pixels \(frame shape \(0, 4\)\)"),
    (lambda: dcbg.rolling_median(np.zeros((5, 2), np.uint8), 2, out=np.zeros((5, 2), np.uint8)),
     ValueError, r"shape \(4, 2\), got \(5, 2\)"),
    (lambda: dcbg.rolling_median(np.zeros((5, 2), np.uint8), 2, out=np.zeros((4, 2), float)),
     TypeError, "out must be uint8"),
    (lambda: dcbg.rolling_median(np.zeros((5, 2), np.uint8), 2, out=[0] * 4), TypeError,
     "out must be a NumPy array"),
    (lambda: dcbg.rolling_median(np.zeros((5, 2), np.uint8), 2, device="gpu"), ValueError,
     "Unknown device 'gpu'"),
])
def test_one_clear_sentence_for_each_mistake(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_an_out_that_cannot_be_written_is_refused_before_anything_is_computed(tmp_path):
    """A write into a file HDF5 opened read-only also leaves the file unable to close"""
    stack = np.zeros((10, 6, 5), np.uint16)
    with h5py.File(tmp_path / "out.h5", "w") as h5:
        create(h5, "chunked", "zstd chunks of whole frames", stack.shape, np.uint16)
        create(h5, "split", "chunks that split frames", stack.shape, np.uint16)
    with h5py.File(tmp_path / "out.h5") as h5:
        for name in ("chunked", "split"):
            with pytest.raises(ValueError, match=r"^out is a dataset of .*out.h5, which is "
                                                 r"open read-only; open the file with mode"):
                dcbg.rolling_median_background(stack, 3, device="cpu", out=h5[name])
    np.save(tmp_path / "out.npy", stack)
    with pytest.raises(ValueError, match=r"^out is read-only \(a memory map opened with"):
        dcbg.rolling_median_background(stack, 3, device="cpu",
                                       out=np.load(tmp_path / "out.npy", mmap_mode="r"))


def test_an_out_that_overlaps_the_frames_is_refused():
    stack = np.zeros((10, 3), np.uint8)
    with pytest.raises(ValueError, match="out overlaps frames"):
        dcbg.rolling_median_background(stack, 4, device="cpu", out=stack)


def test_an_h5py_out_that_is_the_frames_dataset_is_refused(tmp_path):
    """Also when the file is opened twice; the frames stay as they were"""
    stack = extreme_stack(np.uint16, (12, 3, 4), seed=7)
    with h5py.File(tmp_path / "movie.h5", "w") as h5:
        frames = h5.create_dataset("frames", data=stack)
        other = h5.create_dataset("other", shape=stack.shape, dtype=stack.dtype)
        with h5py.File(tmp_path / "movie.h5", "a") as again:
            for out in (frames, again["frames"]):
                with pytest.raises(ValueError, match="out overlaps frames"):
                    dcbg.rolling_median_background(frames, 4, device="cpu", out=out)
        assert np.array_equal(frames[:], stack)
        dcbg.rolling_median_background(frames, 4, device="cpu", out=other)  # same file
        assert np.array_equal(other[:], background_definition(stack, 4))


def test_a_gpu_out_that_overlaps_the_frames_is_refused(fake_gpu):
    fake_gpu()
    import cupy
    stack = np.random.default_rng(2).integers(0, 256, (30, 3, 4), dtype=np.uint8)
    frames = cupy.asarray(stack)
    with pytest.raises(ValueError, match="out overlaps frames"):
        dcbg.rolling_median_background(frames, 4, out=frames)
    with pytest.raises(ValueError, match="out overlaps frames"):
        dcbg.rolling_median(frames, 4, out=frames[3:])
    apart = cupy.asarray(np.zeros((57, 3, 4), np.uint8))  # frames and out side by side
    apart[:30] = frames
    assert dcbg.rolling_median(apart[:30], 4, out=apart[30:]) is not None
    assert np.array_equal(cupy.asnumpy(apart)[30:],
                          rolling_median_windows_reference(stack, 4))


FRAMES_AT = 100
"""Byte where the frames start in the mapped file: not a page boundary, as after a header"""


def mapped_frames(path, stack):
    """`stack` written into a file at FRAMES_AT, with room after it; its memory map"""
    path.write_bytes(bytes(FRAMES_AT + 2 * stack.nbytes))
    frames = np.memmap(path, np.uint8, "r+", FRAMES_AT, stack.shape)
    frames[:] = stack
    return frames


@pytest.mark.parametrize("out_at, overlaps", [
    (FRAMES_AT, True),  # the same bytes
    (FRAMES_AT + 7 * 3 * 4 - 1, True),  # the frames' last byte is out's first
    (FRAMES_AT - 5 * 3 * 4 + 1, True),  # out's last byte is the frames' first
    (FRAMES_AT + 7 * 3 * 4, False),  # right after the frames
    (0, False),  # before them, up to their first byte
])
def test_two_memory_maps_of_one_file_are_refused_where_their_bytes_overlap(tmp_path, out_at,
                                                                           overlaps):
    stack = np.random.default_rng(5).integers(0, 256, (7, 3, 4), dtype=np.uint8)
    path = tmp_path / "frames.bin"
    frames = mapped_frames(path, stack)
    out = np.memmap(path, np.uint8, "r+", out_at, (5, 3, 4))
    if overlaps:
        with pytest.raises(ValueError, match="out overlaps frames"):
            dcbg.rolling_median(frames, 3, device="cpu", out=out)
        assert np.array_equal(frames, stack)  # nothing was written
    else:
        dcbg.rolling_median(frames, 3, device="cpu", out=out)
        assert np.array_equal(out, rolling_median_windows_reference(stack, 3))
        assert np.array_equal(frames, stack)


def test_views_of_memory_maps_are_placed_in_their_file(tmp_path):
    stack = np.random.default_rng(6).integers(0, 256, (12, 2, 5), dtype=np.uint8)
    path = tmp_path / "frames.bin"
    mapped_frames(path, stack)
    whole = np.memmap(path, np.uint8, "r+")  # the whole file, header and room included
    frames = whole[FRAMES_AT:FRAMES_AT + stack.nbytes].reshape(stack.shape)
    other = np.memmap(path, np.uint8, "r+")
    background = dcbg.rolling_median_background
    for overlapping in (other[FRAMES_AT + 10:FRAMES_AT + 10 + stack.nbytes],
                        np.asarray(other)[FRAMES_AT:][::-1][-stack.nbytes:]):
        with pytest.raises(ValueError, match="out overlaps frames"):
            background(frames, 4, device="cpu", out=overlapping.reshape(stack.shape))
    beside = other[FRAMES_AT + stack.nbytes:FRAMES_AT + 2 * stack.nbytes].reshape(stack.shape)
    background(frames[:, :, ::-1], 4, device="cpu", out=beside)  # a view with negative strides
    assert np.array_equal(beside, rolling_median_reference(stack[:, :, ::-1], 4))


def test_memory_maps_of_different_files_and_copy_on_write_outs_are_accepted(tmp_path):
    stack = np.random.default_rng(7).integers(0, 256, (9, 4), dtype=np.uint8)
    frames = mapped_frames(tmp_path / "frames.bin", stack)
    expected = rolling_median_windows_reference(stack, 2)
    elsewhere = mapped_frames(tmp_path / "out.bin", np.zeros_like(stack))[:8]
    dcbg.rolling_median(frames, 2, device="cpu", out=elsewhere)
    assert np.array_equal(elsewhere, expected)
    # writes to a copy-on-write map stay in memory: the frames' bytes in the file do not change
    private = np.memmap(tmp_path / "frames.bin", np.uint8, "c", FRAMES_AT, (8, 4))
    dcbg.rolling_median(frames, 2, device="cpu", out=private)
    assert np.array_equal(private, expected) and np.array_equal(frames, stack)


class CudaTensor:
    """A CUDA array of another library (as torch's): __cuda_array_interface__ over GPU memory"""

    def __init__(self, device_array):
        self.device_array = device_array

    @property
    def __cuda_array_interface__(self):
        return self.device_array.__cuda_array_interface__


class DLPackTensor:
    """A CUDA array that only speaks DLPack (as JAX's)"""

    def __init__(self, device_array):
        self.device_array = device_array

    def __dlpack_device__(self):
        return (2, self.device_array.device.id)

    def __dlpack__(self, stream=None):
        raise AssertionError("the stand-in takes the array itself")


def host_transfers(state) -> list:
    return [call for call in state.calls
            if call[0] in ("device to host", "host to device", "download", "upload")]


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=frame_stacks(), background=st.booleans())
def test_gpu_arrays_equal_the_definition_without_host_copies(fake_gpu, case, background):
    """Frames of every supported dtype go to the GPU kernels as they are: signed values are
    ordered on the GPU, never flipped through host memory, and the frames stay unchanged"""
    stack, kernel_size = case
    state = fake_gpu()
    import cupy
    frames = cupy.asarray(stack)
    before = len(host_transfers(state))
    function = dcbg.rolling_median_background if background else dcbg.rolling_median
    result = function(frames, kernel_size, verify="off")  # a call that is not checked
    assert isinstance(result, cupy.ndarray) and len(host_transfers(state)) == before
    assert result.dtype == stack.dtype
    expected = (background_definition if background else definition)(stack, kernel_size)
    assert np.array_equal(cupy.asnumpy(result), expected)
    assert np.array_equal(cupy.asnumpy(frames), stack)
    for verify in ("sample", "all"):  # the check copes with every frame shape and view
        assert np.array_equal(cupy.asnumpy(function(frames, kernel_size, verify=verify)),
                              expected)


@pytest.mark.parametrize("wrap", [lambda a: a, CudaTensor, DLPackTensor])
def test_gpu_arrays_of_any_library_stay_on_their_gpu_and_stream(fake_gpu, wrap):
    state = fake_gpu(device_count=2)
    import cupy
    stack = np.random.default_rng(6).integers(0, 256, (30, 4, 6), dtype=np.uint8)
    with cupy.cuda.Device(1):
        frames = cupy.asarray(np.zeros_like(stack))
        stream = cupy.cuda.Stream()
        dcbg.rolling_median(frames, 7)  # the first call per GPU, count width and dtype is checked
        with stream:
            frames[...] = cupy.asarray(stack)  # still queued when dcbg is called
            before = len(host_transfers(state))
            result = dcbg.rolling_median(wrap(frames), 7)
        assert stream.pending, "the work is queued on the caller's stream"
        assert len(host_transfers(state)) == before
        assert result.device.id == 1 and state.launch_devices[-1] == 1
        with stream:
            got = cupy.asnumpy(result)
    assert np.array_equal(got, rolling_median_windows_reference(stack, 7))


def test_gpu_out_arrays(fake_gpu):
    fake_gpu(device_count=2)
    import cupy
    stack = np.random.default_rng(7).integers(0, 256, (25, 3, 5), dtype=np.uint8)
    frames = cupy.asarray(stack)
    out = cupy.empty((25, 3, 5), np.uint8)
    assert dcbg.rolling_median_background(frames, 6, out=out) is out
    assert np.array_equal(cupy.asnumpy(out), rolling_median_reference(stack, 6))
    wide = cupy.empty((20, 3, 10), np.uint8)
    strided = wide[:, :, ::2]  # not contiguous: computed aside, then copied in
    assert dcbg.rolling_median(frames, 6, out=strided) is strided
    expected = rolling_median_windows_reference(stack, 6)
    assert np.array_equal(cupy.asnumpy(wide)[:, :, ::2], expected)
    with pytest.raises(ValueError, match=r"out must have the shape \(20, 3, 5\)"):
        dcbg.rolling_median(frames, 6, out=out)
    with pytest.raises(TypeError, match="out must be a CuPy array on GPU 0"):
        dcbg.rolling_median(frames, 6, out=np.empty((20, 3, 5), np.uint8))
    with cupy.cuda.Device(1):
        elsewhere = cupy.empty((20, 3, 5), np.uint8)
    with pytest.raises(TypeError, match="on GPU 0, where the frames are"):
        dcbg.rolling_median(frames, 6, out=elsewhere)
    with pytest.raises(TypeError, match="frames must be uint8"):
        dcbg.rolling_median(cupy.asarray(stack.astype(np.float32)), 6)


def full_range_stack(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("dtype", [np.uint16, np.int8, np.int16])
def test_gpu_out_arrays_of_16_bit_and_signed_frames(fake_gpu, dtype):
    fake_gpu()
    import cupy
    stack = full_range_stack(np.random.default_rng(8), dtype, (25, 3, 5))
    frames = cupy.asarray(stack)
    out = cupy.empty((25, 3, 5), dtype)
    assert dcbg.rolling_median_background(frames, 6, out=out) is out
    assert np.array_equal(cupy.asnumpy(out), background_definition(stack, 6))
    wide = cupy.empty((20, 3, 10), dtype)
    strided = wide[:, :, ::2]  # not contiguous: computed aside, then copied in
    assert dcbg.rolling_median(frames, 6, out=strided) is strided
    assert np.array_equal(cupy.asnumpy(wide)[:, :, ::2], definition(stack, 6))
    same_size = np.dtype(f"{'u' if np.dtype(dtype).kind == 'i' else 'i'}"
                         f"{np.dtype(dtype).itemsize}")  # the bytes fit, the values do not
    with pytest.raises(TypeError, match=f"out must be {np.dtype(dtype)}, the dtype of the "
                                        f"frames, got {same_size}"):
        dcbg.rolling_median(frames, 6, out=cupy.empty((20, 3, 5), same_size))


def test_the_first_gpu_array_call_of_each_dtype_is_checked(fake_gpu):
    """uint16 and int16 frames share a kernel entry point, which orders their values
    differently: a checked uint16 call does not spare int16's first call its check"""
    state = fake_gpu()
    import cupy
    rng = np.random.default_rng(10)
    stacks = {dtype: full_range_stack(rng, dtype, (30, 4, 6)) for dtype in (np.uint16, np.int16)}
    first = dcbg.rolling_median(cupy.asarray(stacks[np.uint16]), 5)  # launch 0: checked
    assert np.array_equal(cupy.asnumpy(first), definition(stacks[np.uint16], 5))
    state.flips[1] = (2, 5, 0x40)  # a wrong median in the next launch
    with pytest.raises(GPUResultError, match="at event 2, pixel \\(row 0, column 5\\)") as raised:
        dcbg.rolling_median(cupy.asarray(stacks[np.int16]), 5)
    # the device setting does not move GPU arrays: the advice is a host copy
    assert str(raised.value).endswith("or compute a host copy of the frames (cupy.asnumpy).")
    state.flips[2] = (2, 5, 0x40)  # uint16's first call was checked: later ones are not
    wrong = dcbg.rolling_median(cupy.asarray(stacks[np.uint16]), 5)
    assert not np.array_equal(cupy.asnumpy(wrong), definition(stacks[np.uint16], 5))
