"""dcbg.windows: which windows a rolling median computes, and the stack-length check"""
import pytest

from dcbg.errors import InputDataError
from dcbg.windows import background_window_count, check_stack_length, window_count


@pytest.mark.parametrize("count, kernel_size", [(1, 1), (5, 1), (5, 5), (6, 5), (1000, 100)])
def test_one_window_starts_at_every_frame_that_has_kernel_size_frames_from_it(count,
                                                                             kernel_size):
    starts = [start for start in range(count) if start + kernel_size <= count]
    assert window_count(count, kernel_size) == len(starts)


@pytest.mark.parametrize("count, kernel_size, own", [
    (5, 5, 1),  # N == k: one window, every frame repeats it
    (6, 5, 1),  # frame 0 owns the only window that leaves one frame after it
    (10, 4, 6),  # frames 0 ... N-k-1
    (1000, 100, 900),
])
def test_frames_before_the_last_kernel_size_own_their_window(count, kernel_size, own):
    assert background_window_count(count, kernel_size) == own


@pytest.mark.parametrize("count, kernel_size", [(0, 1), (0, 4), (3, 4), (99, 100)])
@pytest.mark.parametrize("counter", [window_count, background_window_count,
                                     check_stack_length])
def test_too_few_frames_are_refused_naming_both_numbers(counter, count, kernel_size):
    with pytest.raises(InputDataError) as raised:
        counter(count, kernel_size)
    message = str(raised.value)
    assert f"N={count}" in message and f"kernel_size={kernel_size}" in message
    assert isinstance(raised.value, ValueError)  # what callers catch for bad input


def test_enough_frames_pass_the_check():
    assert check_stack_length(4, 4) is None
