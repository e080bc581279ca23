"""Every CPU path against the normative definition (SPEC section 2), byte for byte"""
import h5py
import numpy as np
import pytest

import dcbg
from conftest import stack_cases
from dcbg.cpu import compute_median_for_slice, job_slices
from dcbg.reference import rolling_median_reference

CASES = stack_cases()


def slice_medians(stack, kernel_size, slices):
    frames = stack.reshape(len(stack), -1)
    count = max(len(stack) - kernel_size, 1)
    out = np.full((count, frames.shape[1]), 0xAB, np.uint8)  # poisoned
    for job in slices:
        compute_median_for_slice(frames, out, kernel_size, count, job)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kernel_size", [2, 4, 10, 30])
def test_slice_kernel_matches_definition(name, kernel_size):
    stack = CASES[name]
    expected = rolling_median_reference(stack, kernel_size)
    pixels = stack[0].size
    for workers in (1, 2, 3):
        got = slice_medians(stack, kernel_size, job_slices(pixels, workers))
        assert np.array_equal(got, expected[:len(got)].reshape(len(got), -1))


@pytest.mark.parametrize("kernel_size", [254, 256, 300, 1000])
@pytest.mark.parametrize("extra", [0, 1, 37])
def test_slice_kernel_large_kernels(kernel_size, extra):
    rng = np.random.default_rng(kernel_size + extra)
    stack = rng.integers(0, 256, (kernel_size + extra, 3, 3), dtype=np.uint8)
    stack[:, 0, 0] = 255  # counts beyond 255 in one bin
    stack[:, 1, 1] = np.where(np.arange(len(stack)) % 2, 0, 255)
    expected = rolling_median_reference(stack, kernel_size)
    got = slice_medians(stack, kernel_size, [slice(0, 9)])
    assert np.array_equal(got, expected[:len(got)].reshape(len(got), -1))


def run_background(stack, tmp_path, **kwargs):
    out = tmp_path / "bg.rtdc"
    with dcbg.BackgroundRollMed(stack, out, device="cpu", **kwargs) as bg:
        bg.process()
        assert bg.get_progress() == 1
    with h5py.File(out) as h5:
        return h5["events/image_bg"][:]


@pytest.mark.parametrize("shape,count,kernel_size,batch_size,num_cpus", [
    ((1, 1), 20, 2, 3, 1),            # tiniest frame, many batches
    ((5, 7), 10, 10, 11, 2),          # N == k
    ((5, 7), 11, 10, 11, 2),          # N == k + 1
    ((9, 4), 101, 8, 13, 2),          # N not a multiple of the batch size
    ((9, 4), 50, 8, 1000, 1),         # batch larger than N
    ((80, 400), 23, 4, 7, 2),         # instrument frame size
    ((3, 5), 300, 256, 257, 2),       # k > 255
    ((4, 5), 2600, 10, 10000, 2),     # engine batches shorter than batch_size
])
def test_pipeline_matches_definition(tmp_path, shape, count, kernel_size, batch_size, num_cpus):
    rng = np.random.default_rng(count * kernel_size)
    stack = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
    got = run_background(stack, tmp_path, kernel_size=kernel_size, batch_size=batch_size,
                         num_cpus=num_cpus)
    assert np.array_equal(got, rolling_median_reference(stack, kernel_size))


def test_result_independent_of_batch_size_and_workers(tmp_path):
    stack = CASES["realistic"]
    expected = rolling_median_reference(stack, 10)
    for batch_size, num_cpus in [(11, 1), (17, 2), (69, 2), (500, 1)]:
        got = run_background(stack, tmp_path, kernel_size=10, batch_size=batch_size,
                             num_cpus=num_cpus)
        assert np.array_equal(got, expected), (batch_size, num_cpus)


def test_h5py_dataset_input_is_read_in_batches(tmp_path):
    stack = CASES["realistic"]
    with h5py.File(tmp_path / "in.h5", "w") as h5:
        h5["frames"] = stack
    with h5py.File(tmp_path / "in.h5") as h5:
        got = run_background(h5["frames"], tmp_path, kernel_size=6, batch_size=20)
    assert np.array_equal(got, rolling_median_reference(stack, 6))


@pytest.mark.parametrize("kwargs,message", [
    ({"kernel_size": 3}, "positive even integer"),
    ({"kernel_size": 0}, "positive even integer"),
    ({"kernel_size": -2}, "positive even integer"),
    ({"kernel_size": 10.0}, "must be an integer"),
    ({"kernel_size": 10, "batch_size": 10}, "larger than kernel_size"),
    ({"kernel_size": 100}, "N=20 events.*kernel_size=100"),
    ({"num_cpus": 0}, "num_cpus must be a positive integer"),
])
def test_invalid_arguments(tmp_path, kwargs, message):
    stack = np.zeros((20, 2, 2), np.uint8)
    with pytest.raises(ValueError, match=message):
        dcbg.BackgroundRollMed(stack, tmp_path / "o.rtdc", device="cpu", **kwargs)
    assert not list(tmp_path.iterdir()), "a failed check must not create files"


def test_empty_and_non_uint8_input(tmp_path):
    with pytest.raises(ValueError, match="N=0 events"):
        dcbg.BackgroundRollMed(np.zeros((0, 4, 4), np.uint8), tmp_path / "o.rtdc", device="cpu")
    with pytest.raises(ValueError, match="uint8"):
        dcbg.BackgroundRollMed(np.zeros((20, 4, 4), np.float32), tmp_path / "o.rtdc",
                               device="cpu")
