"""dcbg.rolling_median and rolling_median_background on arrays, against the definitions"""
import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import dcbg
from dcbg.reference import rolling_median_reference, rolling_median_windows_reference


@st.composite
def frame_stacks(draw):
    """A uint8 stack of any frame shape (none, 1 pixel, extra axes), a k from 1 to N, a view"""
    count = draw(st.integers(1, 40))
    frame = draw(st.sampled_from([(), (1,), (1, 1), (3, 4), (2, 3, 2), (7,)]))
    values = draw(st.sampled_from([st.integers(0, 255), st.sampled_from([0, 255]),
                                   st.sampled_from([3, 4, 200])]))
    stack = draw(arrays(np.uint8, (count, *frame), elements=values))
    if frame and draw(st.booleans()):  # a non-contiguous view: every other pixel of a wider one
        wide = np.repeat(stack, 2, axis=-1)
        stack = wide[..., ::2]
    kernel_size = draw(st.integers(1, count))
    return stack, kernel_size


@settings(max_examples=150, deadline=None)
@given(frame_stacks())
def test_rolling_median_equals_the_definition(case):
    stack, kernel_size = case
    got = dcbg.rolling_median(stack, kernel_size, device="cpu")
    assert got.dtype == np.uint8 and got.shape == (len(stack) - kernel_size + 1,
                                                    *stack.shape[1:])
    assert np.array_equal(got, rolling_median_windows_reference(stack, kernel_size))


@settings(max_examples=100, deadline=None)
@given(frame_stacks())
def test_rolling_median_background_equals_dcnums_definition(case):
    stack, kernel_size = case
    got = dcbg.rolling_median_background(stack, kernel_size, device="cpu")
    assert got.shape == stack.shape
    assert np.array_equal(got, rolling_median_reference(stack, kernel_size))


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


@pytest.mark.parametrize("call, error, message", [
    (lambda: dcbg.rolling_median(np.zeros((5, 2), np.uint16), 2), TypeError, "must be uint8"),
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


def test_an_out_that_overlaps_the_frames_is_refused():
    stack = np.zeros((10, 3), np.uint8)
    with pytest.raises(ValueError, match="out overlaps frames"):
        dcbg.rolling_median_background(stack, 4, device="cpu", out=stack)


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


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=frame_stacks(), background=st.booleans())
def test_gpu_arrays_equal_the_definition_without_host_copies(fake_gpu, case, background):
    stack, kernel_size = case
    state = fake_gpu()
    import cupy
    frames = cupy.asarray(stack)
    before = len(host_transfers(state))
    function = dcbg.rolling_median_background if background else dcbg.rolling_median
    result = function(frames, kernel_size, verify="off")  # a call that is not checked
    assert isinstance(result, cupy.ndarray) and len(host_transfers(state)) == before
    reference = rolling_median_reference if background else rolling_median_windows_reference
    assert np.array_equal(cupy.asnumpy(result), reference(stack, kernel_size))
    for verify in ("sample", "all"):  # the check copes with every frame shape and view
        assert np.array_equal(cupy.asnumpy(function(frames, kernel_size, verify=verify)),
                              cupy.asnumpy(result))


@pytest.mark.parametrize("wrap", [lambda a: a, CudaTensor, DLPackTensor])
def test_gpu_arrays_of_any_library_stay_on_their_gpu_and_stream(fake_gpu, wrap):
    state = fake_gpu(device_count=2)
    import cupy
    stack = np.random.default_rng(6).integers(0, 256, (30, 4, 6), dtype=np.uint8)
    with cupy.cuda.Device(1):
        frames = cupy.asarray(np.zeros_like(stack))
        stream = cupy.cuda.Stream()
        dcbg.rolling_median(frames, 7)  # the first call per GPU and count width is checked
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
