"""Property-based tests: random stacks and sizes against the definition, random PPIDs"""
import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import dcbg
from dcbg import ppid
from dcbg.engines.batches import plan_windows
from dcbg.engines.cpu import CPURollingMedian, compute_median_for_slice
from dcbg.reference import rolling_median_reference
from dcbg.windows import background_window_count


@st.composite
def stacks_and_sizes(draw, max_events=70, max_side=5):
    """A uint8 stack (random, few-level or extreme values) with a valid k and b"""
    count = draw(st.integers(2, max_events))
    shape = (count, draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    values = draw(st.sampled_from(["any", "levels", "extremes"]))
    if values == "any":
        elements = st.integers(0, 255)
    elif values == "levels":
        elements = st.sampled_from(draw(st.lists(st.integers(0, 255), min_size=1,
                                                 max_size=3)))
    else:
        elements = st.sampled_from([0, 255])
    stack = draw(arrays(np.uint8, shape, elements=elements))
    kernel_size = 2 * draw(st.integers(1, count // 2))
    batch_size = draw(st.integers(kernel_size + 1, kernel_size + 2 * count))
    return stack, kernel_size, batch_size


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stacks_and_sizes())
def test_batched_slice_kernel_equals_definition(cpu_build, case):
    """Each build's per-slice median over the CPU backend's batch plan, on random everything"""
    stack, kernel_size, batch_size = case
    flat = stack.reshape(len(stack), -1)
    pixels = flat.shape[1]
    got = []
    windows = background_window_count(len(stack), kernel_size)
    for batch in plan_windows(0, windows, kernel_size, batch_size):
        frames = np.ascontiguousarray(flat[batch.start:batch.input_stop])
        out = np.zeros((batch.output_size, pixels), np.uint8)
        compute_median_for_slice(frames, out, kernel_size, batch.output_size,
                                 slice(0, pixels))
        got.append(out)
    medians = np.concatenate(got)
    assert len(medians) == windows
    expected = rolling_median_reference(stack, kernel_size).reshape(len(stack), -1)
    assert np.array_equal(medians, expected[:windows])


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stacks_and_sizes(max_events=120, max_side=9), st.integers(1, 2))
def test_cpu_backend_equals_definition(tmp_path, case, num_cpus):
    """The whole CPU backend (workers, pipeline, chunked file) on random input"""
    stack, kernel_size, batch_size = case
    out = tmp_path / "bg.rtdc"
    out.unlink(missing_ok=True)  # an existing output would keep its other datasets
    with dcbg.BackgroundRollMed(stack, out, kernel_size=kernel_size, batch_size=batch_size,
                                num_cpus=num_cpus, device="cpu") as bg:
        bg.process()
    with h5py.File(out) as h5:
        assert np.array_equal(h5["events/image_bg"][:],
                              rolling_median_reference(stack, kernel_size))


@st.composite
def wide_stacks_and_sizes(draw, max_events=90, max_pixels=40):
    """A 16-bit stack (any values, a narrow band, a few levels, the extremes), any k, a batch"""
    count = draw(st.integers(1, max_events))
    pixels = draw(st.integers(1, max_pixels))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["any", "band", "levels", "extremes"]))
    if kind == "any":
        values = rng.integers(0, 65536, (count, pixels))
    elif kind == "band":  # shot noise of any width around any level
        width = draw(st.integers(1, 300))
        values = draw(st.integers(0, 65535 - width)) + rng.integers(0, width + 1,
                                                                     (count, pixels))
    elif kind == "levels":
        values = rng.choice(draw(st.lists(st.integers(0, 65535), min_size=1, max_size=3)),
                            (count, pixels))
    else:
        values = rng.choice([0, 1, 32767, 32768, 65534, 65535], (count, pixels))
    kernel_size = draw(st.integers(1, count))
    batch_size = draw(st.integers(1, 2 * count))
    return values.astype(np.uint16), kernel_size, batch_size


@settings(max_examples=80, deadline=None)
@given(wide_stacks_and_sizes(), st.integers(1, 2))
def test_cpu_engine_on_16_bit_frames_equals_definition(case, num_cpus):
    """The CPU engine's batches and threads on uint16 frames, against a sort of each window"""
    stack, kernel_size, batch_size = case
    windows = len(stack) - kernel_size + 1
    medians = np.zeros((windows, stack.shape[1]), np.uint16)

    def read_into(start, stop, out):
        out[:stop - start] = stack[start:stop]

    def write_at(offset, rows):
        medians[offset:offset + len(rows)] = rows

    engine = CPURollingMedian(stack.shape[1:], kernel_size, batch_size, num_cpus, windows,
                              np.uint16)
    with engine:
        last = engine.run(read_into, 0, windows, write_at)
    expected = np.stack([np.sort(stack[j:j + kernel_size], axis=0)[kernel_size // 2]
                         for j in range(windows)])
    assert np.array_equal(medians, expected)
    assert np.array_equal(last, expected[-1])


PPID_ALPHABET = st.sampled_from(list("rollmedkb:^=.-+_ 0123456789eEx\\/\0é"))


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.text(), st.text(PPID_ALPHABET),
                 st.builds(lambda a, b: f"rollmed:{a}^{b}", st.text(PPID_ALPHABET),
                           st.text(PPID_ALPHABET))))
def test_random_ppids_raise_only_value_error(text):
    try:
        kwargs = dcbg.Background.get_ppkw_from_ppid(text)
    except ValueError:
        return
    # What parses must be a valid rollmed PPID that round-trips
    assert set(kwargs) == {"kernel_size", "batch_size"}
    assert all(isinstance(v, int) for v in kwargs.values())
    assert dcbg.Background.get_ppkw_from_ppid(
        dcbg.BackgroundRollMed.get_ppid_from_ppkw(kwargs)) == kwargs


@settings(max_examples=300, deadline=None)
@given(st.integers(-10**6, 10**6), st.integers(-10**6, 10**6))
def test_ppid_round_trip_of_any_integers(kernel_size, batch_size):
    kwargs = {"kernel_size": kernel_size, "batch_size": batch_size}
    text = dcbg.BackgroundRollMed.get_ppid_from_ppkw(kwargs)
    assert text == f"rollmed:k={kernel_size}^b={batch_size}"
    assert dcbg.Background.get_ppkw_from_ppid(text) == kwargs
    valid = kernel_size > 0 and kernel_size % 2 == 0 and batch_size > kernel_size
    if not valid:
        with pytest.raises(ValueError):
            dcbg.BackgroundRollMed.check_user_kwargs(**kwargs)


def test_unique_prefixes_are_unique():
    names = ["kernel_size", "batch_size", "bias", "kappa", "k"]
    prefixes = ppid.unique_prefixes(names)
    assert len(set(prefixes)) == len(names)
    for name, prefix in zip(names, prefixes, strict=True):
        assert name.startswith(prefix)
