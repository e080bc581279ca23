"""Which windows a rolling median computes, and the checks on a stack's length

A window is ``kernel_size`` consecutive frames; window ``j`` starts at frame
``j``. :func:`window_count` counts the windows of a stack (one per start),
:func:`background_window_count` those that dcnum's rolling-median
background gives a frame of its own (see :mod:`dcbg.reference`).
"""
from __future__ import annotations

from .errors import InputDataError


def check_stack_length(image_count: int, kernel_size: int) -> None:
    """Raise InputDataError (a ValueError) when a stack is too short for the kernel"""
    if image_count < kernel_size or image_count == 0:
        raise InputDataError(
            f"The input has N={image_count} events, but the rolling median needs "
            f"at least kernel_size={kernel_size}; use a smaller kernel_size or "
            f"a longer recording.")


def window_count(image_count: int, kernel_size: int) -> int:
    """Number of whole windows of `kernel_size` frames in a stack: ``N - k + 1``"""
    check_stack_length(image_count, kernel_size)
    return image_count - kernel_size + 1


def background_window_count(image_count: int, kernel_size: int) -> int:
    """Number of frames that get their own window in dcnum's background

    Frames ``0 … N-k-1`` own a window; the remaining frames repeat the
    background of the last of them. With ``N == k`` there is one window.
    """
    check_stack_length(image_count, kernel_size)
    return max(image_count - kernel_size, 1)
