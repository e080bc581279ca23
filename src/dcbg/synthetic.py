"""Synthetic but realistic RT-DC recordings

A frame is built like an instrument sees it: a channel with darker walls at
the top and bottom, a fixed illumination pattern (smooth gradient plus
per-pixel fixed-pattern noise), a frame-to-frame brightness flicker, shot
noise, and now and then a cell (dark body, bright rim) crossing the channel.
Frames are generated in blocks from per-block seeds, so a stack is the same
whatever block size it is read with, and it never has to sit in memory whole.
"""
from __future__ import annotations

import pathlib

import h5py
import numpy as np

from .rtdc.writer import create_image_dataset
from .settings import DEFAULT_COMPRESSION, parse_compression

DEFAULT_SHAPE = (80, 320)
BLOCK = 256
"""Frames per generated block (the unit of the per-block seeds)"""


def background_pattern(shape=DEFAULT_SHAPE, seed: int = 42) -> np.ndarray:
    """The static scene: channel walls and illumination, as float32"""
    height, width = shape
    rng = np.random.default_rng([seed, 0])
    y = np.arange(height)[:, None]
    x = np.arange(width)[None, :]
    illumination = np.cos(np.pi * (x / width - 0.4)) * np.exp(-((y - height / 2) / height) ** 2)
    scene = 110.0 + 25.0 * illumination
    wall = max(2, height // 10)
    scene = np.where((y < wall) | (y >= height - wall), scene * 0.45, scene)
    scene = scene + rng.normal(0.0, 2.5, shape)  # fixed-pattern noise of the sensor
    return scene.astype(np.float32)


def _cells(rng, count, shape, scene):
    height, width = shape
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    frames = np.repeat(scene[None], count, axis=0)
    for i in np.flatnonzero(rng.random(count) < 0.6):
        cx = rng.uniform(0, width)
        cy = rng.uniform(0.35, 0.65) * height
        ry = rng.uniform(0.08, 0.18) * height
        rx = ry * rng.uniform(1.0, 1.4)
        r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
        body = r < 1.0
        rim = (r >= 0.85) & (r < 1.15)
        frames[i][body] -= rng.uniform(20, 45)
        frames[i][rim] += rng.uniform(15, 35)
    return frames


def synthetic_block(index: int, count: int, shape=DEFAULT_SHAPE, seed: int = 42,
                    scene: np.ndarray | None = None) -> np.ndarray:
    """Frames ``index*BLOCK … index*BLOCK+count-1`` of the synthetic stack"""
    if scene is None:
        scene = background_pattern(shape, seed)
    rng = np.random.default_rng([seed, 1, index])
    frames = _cells(rng, count, shape, scene)
    frames *= rng.normal(1.0, 0.01, (count, 1, 1)).astype(np.float32)  # lamp flicker
    frames += rng.normal(0.0, 1.0, frames.shape).astype(np.float32) * np.sqrt(
        np.maximum(frames, 1.0)) * 0.35  # shot noise
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def synthetic_stack(count: int, shape=DEFAULT_SHAPE, seed: int = 42) -> np.ndarray:
    """A whole synthetic stack in memory, shape ``(count, *shape)``"""
    return _stack_of_blocks(synthetic_block, background_pattern(shape, seed), count, shape,
                            seed, np.uint8)


def _stack_of_blocks(block, scene: np.ndarray, count: int, shape, seed: int,
                     dtype) -> np.ndarray:
    """`count` frames made by `block` in blocks of :data:`BLOCK` over `scene`, in one array"""
    blocks = [block(i, min(BLOCK, count - start), shape, seed, scene)
              for i, start in enumerate(range(0, count, BLOCK))]
    return np.concatenate(blocks) if blocks else np.zeros((0, *shape), dtype)


SHAPE16 = (256, 256)
"""Frame shape of the synthetic 16-bit microscopy stacks"""

PARTICLES16 = 24
"""Bright particles drifting through a synthetic 16-bit stack"""


def background_pattern16(shape=SHAPE16, seed: int = 42) -> np.ndarray:
    """The static scene of a 16-bit camera in mean counts per pixel, as float32

    A camera offset of 100 counts with its per-pixel spread, and an
    illumination spot (a few hundred counts at the corners, about 2,500 in
    the middle) seen through a per-pixel gain spread of 1%.
    """
    height, width = shape
    rng = np.random.default_rng([seed, 10])
    y = (np.arange(height)[:, None] - height / 2) / height
    x = (np.arange(width)[None, :] - width / 2) / width
    illumination = 250.0 + 2250.0 * np.exp(-(x ** 2 + y ** 2) / 0.12)
    gain = rng.normal(1.0, 0.01, shape)
    offset = 100.0 + rng.normal(0.0, 2.0, shape)
    return (offset + illumination * gain).astype(np.float32)


def _particles16(seed: int, shape):
    """Start positions (y, x), velocities in pixels per frame and peak counts of the particles"""
    rng = np.random.default_rng([seed, 11])
    start = rng.uniform(0, 1, (PARTICLES16, 2)) * np.array(shape)
    speed = rng.uniform(0.3, 3.0, PARTICLES16)
    angle = rng.uniform(0, 2 * np.pi, PARTICLES16)
    velocity = np.stack([np.sin(angle), np.cos(angle)], axis=1) * speed[:, None]
    brightness = rng.uniform(2_000, 60_000, PARTICLES16)
    return start, velocity, brightness


def synthetic_block16(index: int, count: int, shape=SHAPE16, seed: int = 42,
                      scene: np.ndarray | None = None) -> np.ndarray:
    """Frames ``index*BLOCK … index*BLOCK+count-1`` of the synthetic 16-bit stack"""
    if scene is None:
        scene = background_pattern16(shape, seed)
    height, width = shape
    start, velocity, brightness = _particles16(seed, shape)
    rng = np.random.default_rng([seed, 12, index])
    frames = np.repeat(scene[None], count, axis=0)
    spot = np.arange(-4, 5)  # a particle's image: a Gaussian of 1.3 pixels in 9x9 pixels
    profile = np.exp(-(spot[:, None] ** 2 + spot[None, :] ** 2) / (2 * 1.3 ** 2))
    for i in range(count):
        centres = start + velocity * (index * BLOCK + i)
        for (cy, cx), peak in zip(centres, brightness, strict=True):
            rows = (int(cy) + spot) % height  # particles leave on one side, come back on the other
            cols = (int(cx) + spot) % width
            frames[i][np.ix_(rows, cols)] += (peak * profile).astype(np.float32)
    # shot noise with the Poisson sigma (sqrt of the counts) and read noise of 2 counts
    noise = rng.standard_normal(frames.shape, dtype=np.float32)
    frames += noise * np.sqrt(frames + 4.0)
    return np.clip(np.rint(frames), 0, 65535).astype(np.uint16)


def synthetic_stack16(count: int, shape=SHAPE16, seed: int = 42) -> np.ndarray:
    """A synthetic 16-bit microscopy stack (sCMOS-like), shape ``(count, *shape)``, uint16

    A static scene of a few hundred to a few thousand counts
    (:func:`background_pattern16`), bright particles drifting across it,
    some of them saturating the camera at 65535, and in every pixel shot
    noise (Gaussian with the Poisson sigma, the square root of the counts)
    plus read noise of 2 counts. The same seed gives the same bytes, whatever
    block size the frames are made in.
    """
    return _stack_of_blocks(synthetic_block16, background_pattern16(shape, seed), count, shape,
                            seed, np.uint16)


def write_synthetic_rtdc(path, count: int, shape=DEFAULT_SHAPE, seed: int = 42,
                         compression=DEFAULT_COMPRESSION, events_per_chunk: int | None = None,
                         period: int | None = None) -> pathlib.Path:
    """Write a synthetic recording as an instrument would, zstd-compressed

    The file has ``events/image``, the scalar features ``frame``, ``time``
    and ``index_online``, and the metadata dclab needs to open it.

    Parameters
    ----------
    path: path-like
        The .rtdc file to create (overwritten if present).
    count: int
        Number of events.
    shape: tuple of int
        Frame shape (height, width).
    seed: int
        Seed; the same seed gives the same bytes.
    compression: str
        See :func:`dcbg.settings.parse_compression`.
    events_per_chunk: int, optional
        HDF5 chunk length of ``events/image`` (default: about 1 MiB).
    period: int, optional
        Repeat the first `period` frames (a multiple of 256) instead of
        generating every frame, which takes about a millisecond each; they
        are the frames of :func:`synthetic_stack` of that length.
    """
    path = pathlib.Path(path)
    if period is not None and (period < BLOCK or period % BLOCK):
        raise ValueError(f"period must be a multiple of {BLOCK}, got {period}.")
    repeated: dict[int, np.ndarray] = {}  # the blocks of one period, where frames repeat
    scene = background_pattern(shape, seed)
    frame_rate = 4000.0
    with h5py.File(path, "w", libver="latest") as h5:
        attrs = {
            "experiment:date": "2026-11-22",
            "experiment:time": "12:00:00",
            "experiment:event count": count,
            "experiment:run index": 1,
            "experiment:sample": "dcbg synthetic",
            "experiment:run identifier": f"dcbg-synthetic-{seed}-{count}-{shape[0]}x{shape[1]}",
            "imaging:frame rate": frame_rate,
            "imaging:pixel size": 0.34,
            "imaging:roi size x": shape[1],
            "imaging:roi size y": shape[0],
            "setup:channel width": 20.0,
            "setup:chip region": "channel",
            "setup:flow rate": 0.06,
            "setup:medium": "CellCarrier",
            "setup:identifier": f"dcbg-synthetic-{seed}",
            "setup:software version": "dcbg synthetic",
        }
        h5.attrs.update(attrs)
        events = h5.create_group("events")
        image = create_image_dataset(events, "image", shape, count,
                                     parse_compression(compression), events_per_chunk)
        for i, start in enumerate(range(0, count, BLOCK)):
            stop = min(start + BLOCK, count)
            if period is None:
                image[start:stop] = synthetic_block(i, stop - start, shape, seed, scene)
                continue
            index = i % (period // BLOCK)
            if index not in repeated:
                repeated[index] = synthetic_block(index, BLOCK, shape, seed, scene)
            image[start:stop] = repeated[index][:stop - start]
        frames = np.arange(count, dtype=np.float64) * 3 + 1
        events.create_dataset("frame", data=frames)
        events.create_dataset("time", data=frames / frame_rate)
        events.create_dataset("index_online", data=np.arange(count, dtype=np.int32))
    return path
