"""Test inputs: named edge-case stacks and the instrument files beside the checkout"""
import json
import pathlib

import numpy as np

SHARED_DATA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"
"""Instrument recordings and dcnum's golden outputs (absent in a user's clone)"""


def golden_entries() -> list[dict]:
    """The golden outputs listed in ``../shared/data/golden/index.json``"""
    index = SHARED_DATA / "golden" / "index.json"
    return json.loads(index.read_text()) if index.exists() else []


def stack_cases() -> dict[str, np.ndarray]:
    """Named uint8 stacks covering the edge cases of the rolling median"""
    rng = np.random.default_rng(20261122)
    from dcbg.synthetic import synthetic_stack
    return {
        "random": rng.integers(0, 256, (63, 5, 7), dtype=np.uint8),
        "constant": np.full((40, 3, 4), 77, np.uint8),
        "alternating_0_255": (np.indices((51, 4, 6)).sum(axis=0) % 2 * 255).astype(np.uint8),
        "two_level": np.where(rng.random((45, 6, 5)) < 0.5, 12, 200).astype(np.uint8),
        "extremes": rng.choice(np.array([0, 255], np.uint8), (39, 2, 9)),
        "ramp": (np.arange(70)[:, None, None] * 3 + np.arange(8)[None, None, :]
                 + np.zeros((70, 2, 8), int)).astype(np.uint8),
        "realistic": synthetic_stack(80, shape=(12, 40), seed=7),
        "single_pixel": rng.integers(0, 256, (33, 1, 1), dtype=np.uint8),
    }


def as_dtype(values, dtype) -> np.ndarray:
    """Unsigned 16-bit values as `dtype` in the same order: uint16 as they are, the signed
    types shifted down by half the range, int8 (and uint8) from the high byte"""
    values = np.asarray(values, np.int64)
    if np.dtype(dtype).itemsize == 1:
        values = values >> 8
    return (values + np.iinfo(dtype).min).astype(dtype)


def twelve_bit_camera_frames(kernel_size: int, high_bits: bool = False) -> np.ndarray:
    """uint16 frames of a 12-bit camera: an offset, a dim to bright background, shot noise
    and a particle crossing the frame that saturates at 4095 (in the words' high bits: 65520)

    ``kernel_size + 120`` frames of 6 x 45 pixels, seeded by the kernel size.
    """
    rng = np.random.default_rng(kernel_size + 12)
    frames, height, width = kernel_size + 120, 6, 45
    signal = np.full((frames, height, width), 300.0)
    signal[:, :, 20:] += np.linspace(0, 2500, width - 20)
    for row in range(frames):
        x = (row * 3) % width
        signal[row, 1:4, x:x + 4] += 6000
    values = np.minimum(rng.poisson(signal), 4095).astype(np.uint16)
    return values << np.uint16(4) if high_bits else values


def jumping_values(kernel_size: int) -> np.ndarray:
    """16-bit values whose medians jump across the whole range every frame: columns that
    alternate between the bottom and the top of the range, beside uniform noise"""
    rng = np.random.default_rng(kernel_size)
    frames, pixels = kernel_size + 80, 37
    low = rng.integers(0, 3000, (frames, pixels))
    high = rng.integers(62000, 65536, (frames, pixels))
    alternate = np.where(np.arange(frames)[:, None] % 2 == 0, low, high)
    return np.concatenate([alternate, rng.integers(0, 65536, (frames, pixels))], axis=1)


def ramp_values(kernel_size: int) -> np.ndarray:
    """16-bit values whose medians climb and fall through all 65,536 levels, one level or
    less per frame: up then saturated, down then zero, up through the wrap to 0, and noisy"""
    t = np.arange(65536 + kernel_size + 40)[:, None]
    rng = np.random.default_rng(3)
    return np.concatenate([
        np.minimum(t, 65535),
        np.maximum(65535 - t, 0),
        (t + 30000) % 65536,
        np.clip(t - 20 + rng.integers(-9, 10, t.shape), 0, 65535),
    ], axis=1)


def mixed_values(kernel_size: int, extra: int) -> np.ndarray:
    """``kernel_size + extra`` frames of 10 pixels of 16-bit values, seeded by both: shot
    noise around 1900 counts, pixels that jump between the ends of the range, uniform noise"""
    rng = np.random.default_rng(kernel_size * 7 + extra)
    frames = kernel_size + extra
    noise = 1000 + rng.poisson(900, (frames, 5))
    jumps = np.where(rng.random((frames, 3)) < 0.5, rng.integers(0, 100, (frames, 3)),
                     rng.integers(65000, 65536, (frames, 3)))
    return np.concatenate([noise, jumps, rng.integers(0, 65536, (frames, 2))], axis=1)
