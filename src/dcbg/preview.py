"""Preview images: look at a background instead of reading numbers

For a few events the preview shows, side by side, the raw frame, its
background and the background-corrected frame (raw − background, stretched
symmetrically around mid-gray so that cells stand out and a good background
leaves a flat gray). Below, a strip shows one pixel row of the background
over time (time to the right), so drift and flicker of the illumination are
visible at a glance.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib

import hdf5plugin  # noqa: F401  (h5py reads single Zstandard-compressed frames through it)
import numpy as np

from .errors import InputDataError
from .rtdc.output import check_output_path
from .rtdc.reader import RTDCInput, events_of

MARGIN = 8
LABEL_HEIGHT = 18
STRIP_COLUMNS = 800
"""Largest number of events sampled for the time strip"""
PANEL_HEIGHT = 120
"""Height that small frames are enlarged to (by a whole factor, pixels stay square)"""
PANEL_MAX = (240, 640)
"""Largest panel (height, width): larger frames are shrunk to fit"""
PANEL_MIN = 24
"""Smallest panel height and width: a frame of one or a few rows is stretched to it"""
STRIP_HEIGHT = (40, 160)
"""Smallest and largest height of the time strip"""
MAX_EVENTS = 10
"""Most events in one preview, which bounds the image's height"""
CANVAS_MAX_WIDTH = 3 * PANEL_MAX[1] + 4 * MARGIN
"""Widest preview: three widest panels (labels that are wider are cut)"""
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
"""Image formats by the output's suffix"""
SAVE_OPTIONS = {"JPEG": {"quality": 95}}
"""JPEG's default quality blurs single pixels of small frames"""
CANDIDATES = 40
"""Evenly spaced events among which the default events are chosen"""
STRONGEST_PIXELS = 16
"""A frame's foreground is its 16th strongest local difference: an area, not a pixel"""


@dataclasses.dataclass
class Preview:
    """A rendered preview and where its parts are

    Attributes
    ----------
    image: PIL.Image.Image
        The grayscale image.
    events: list of int
        The events shown, top to bottom.
    panels: list of dict
        Per event, the boxes ``(left, top, right, bottom)`` of the "raw",
        "background" and "corrected" panels.
    strip: tuple of int
        Box of the time strip.
    row: int
        The pixel row shown in the strip.
    """

    image: object
    events: list[int]
    panels: list[dict]
    strip: tuple[int, int, int, int]
    row: int


def _font(size: int = 12):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _stretch(values: np.ndarray) -> np.ndarray:
    """Map the 1st…99th percentile to 0…255 (flat data becomes mid-gray)"""
    low, high = np.percentile(values, [1, 99])
    if high - low < 1:
        return np.full(values.shape, 128, np.uint8)
    return np.clip((values - low) * 255.0 / (high - low), 0, 255).astype(np.uint8)


def corrected_frame(raw: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, int]:
    """raw − background as uint8 around 128, and the difference that maps to 0/255"""
    difference = raw.astype(np.int16) - background.astype(np.int16)
    limit = max(1, int(np.ceil(np.percentile(np.abs(difference), 99.5))))
    return np.clip(128 + difference * 127.0 / limit, 0, 255).astype(np.uint8), limit


def _local_mean(values: np.ndarray) -> np.ndarray:
    """Mean over each pixel's 3x3 neighbourhood (edges repeated), for frames of any size"""
    height, width = values.shape
    padded = np.pad(values, 1, mode="edge")
    total = np.zeros_like(values)
    for dy in range(3):
        for dx in range(3):
            total += padded[dy:dy + height, dx:dx + width]
    return total / 9


def foreground(raw: np.ndarray, background: np.ndarray) -> float:
    """How strongly something that is not background shows in a frame

    The lamp's flicker brightens or darkens a whole frame, so the background
    is first scaled by the frame's median brightness ratio; shot noise
    differs pixel by pixel, so differences are averaged over 3x3
    neighbourhoods before the strongest area counts. A mean over the whole
    frame would instead rank frames by flicker and noise.
    """
    raw = raw.astype(np.float32)
    background = background.astype(np.float32)
    gain = np.median(raw / np.maximum(background, 1))
    local = np.abs(_local_mean(raw - gain * background)).ravel()
    strongest = min(STRONGEST_PIXELS, local.size)
    return float(np.partition(local, local.size - strongest)[local.size - strongest])


def pick_events(image, image_bg, count: int = 3) -> list[int]:
    """Events with the most foreground among evenly spaced candidates (cells, not empty)"""
    total = len(image)
    candidates = np.unique(np.linspace(0, total - 1, min(total, CANDIDATES)).round()
                           .astype(int))
    scores = [foreground(image[i], image_bg[i]) for i in candidates]
    best = candidates[np.argsort(scores, kind="stable")[::-1][:count]]
    return sorted(int(i) for i in best)


def panel_size(height: int, width: int) -> tuple[int, int]:
    """Size (height, width) at which frames of this size are shown

    Small frames are enlarged by a whole factor towards PANEL_HEIGHT, large
    ones shrunk to fit PANEL_MAX, both keeping the aspect ratio; only frames
    so flat or narrow that a side would fall below PANEL_MIN are stretched
    along that side.
    """
    scale = min(max(1, round(PANEL_HEIGHT / height)),
                PANEL_MAX[0] / height, PANEL_MAX[1] / width)
    if scale >= 1:
        scale = math.floor(scale)
    return (min(max(round(height * scale), PANEL_MIN), PANEL_MAX[0]),
            min(max(round(width * scale), PANEL_MIN), PANEL_MAX[1]))


def _resized(frame: np.ndarray, size: tuple[int, int]):
    """A frame as a PIL image of (height, width) `size`, pixels kept sharp when enlarged"""
    from PIL import Image
    height, width = size
    shrinks = height < frame.shape[0] or width < frame.shape[1]
    return Image.fromarray(np.ascontiguousarray(frame)).resize(
        (width, height), Image.BOX if shrinks else Image.NEAREST)


def render_preview(path, events=None, row: int | None = None) -> Preview:
    """Render the preview of an .rtdc file that has (or reaches) image and image_bg

    Parameters
    ----------
    path: path-like
        The .rtdc file; ``image`` and ``image_bg`` may come through basins.
    events: list of int, optional
        Events to show, at most MAX_EVENTS (default: three with cells in
        them).
    row: int, optional
        Pixel row for the time strip (default: the middle row).
    """
    from PIL import Image, ImageDraw

    path = pathlib.Path(path)
    with RTDCInput(path) as rtdc_in:
        image = events_of(rtdc_in.image, rtdc_in.image_mapping)
        bg_data, _, bg_mapping = rtdc_in.find_feature("image_bg")
        image_bg = events_of(bg_data, bg_mapping)
        total, height, width = image.shape
        if image_bg.shape != image.shape:
            raise InputDataError(
                f"image_bg of {path} has shape {image_bg.shape}, image {image.shape}; "
                f"recompute the background with 'dcbg compute'.")
        events = list(events) if events else pick_events(image, image_bg)
        if len(events) > MAX_EVENTS:
            raise InputDataError(
                f"A preview shows at most {MAX_EVENTS} events, but {len(events)} were "
                f"asked for; write several previews with fewer events each.")
        for event in events:
            if not 0 <= event < total:
                raise InputDataError(
                    f"Event {event} does not exist in {path}, which has events 0 to "
                    f"{total - 1}; choose events in that range.")
        row = height // 2 if row is None else row
        if not 0 <= row < height:
            raise InputDataError(
                f"Row {row} does not exist in frames of height {height} in {path}; "
                f"choose a row from 0 to {height - 1}.")
        raws = [image[e] for e in events]
        backgrounds = [image_bg[e] for e in events]
        sampled = np.unique(np.linspace(0, total - 1, min(total, STRIP_COLUMNS)).astype(int))
        strip_rows = np.stack([image_bg[int(i), row, :] for i in sampled], axis=1)

    panel_h, panel_w = panel_size(height, width)
    strip_h = min(max(width, STRIP_HEIGHT[0]), STRIP_HEIGHT[1])
    font = _font()
    title = f"{path.name}: {total} events, raw | background | raw - background"
    corrected = [corrected_frame(raw, background) for raw, background in zip(raws, backgrounds,
                                                                              strict=True)]
    labels = [f"event {event}   (difference ±{limit} shown as black…white)"
              for event, (_, limit) in zip(events, corrected, strict=True)]
    strip_label = (f"row {row} of image_bg over time (events 0 to {total - 1}, left to "
                   f"right), contrast stretched")
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    text_w = max(measure.textlength(text, font=font) for text in [title, strip_label, *labels])
    canvas_w = max(3 * panel_w + 4 * MARGIN,
                   min(math.ceil(text_w) + 2 * MARGIN, CANVAS_MAX_WIDTH))
    canvas_h = (LABEL_HEIGHT + len(events) * (LABEL_HEIGHT + panel_h + MARGIN)
                + LABEL_HEIGHT + strip_h + 2 * MARGIN)
    canvas = Image.new("L", (canvas_w, canvas_h), 255)
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, 3), title, fill=0, font=font)
    top = LABEL_HEIGHT
    panels = []
    for label, raw, background, (difference, _) in zip(labels, raws, backgrounds, corrected,
                                                       strict=True):
        draw.text((MARGIN, top + 3), label, fill=0, font=font)
        top += LABEL_HEIGHT
        boxes = {}
        for column, (name, frame) in enumerate((("raw", raw), ("background", background),
                                                ("corrected", difference))):
            left = MARGIN + column * (panel_w + MARGIN)
            canvas.paste(_resized(frame, (panel_h, panel_w)), (left, top))
            boxes[name] = (left, top, left + panel_w, top + panel_h)
        panels.append(boxes)
        top += panel_h + MARGIN
    draw.text((MARGIN, top + 3), strip_label, fill=0, font=font)
    top += LABEL_HEIGHT
    strip_w = canvas_w - 2 * MARGIN
    canvas.paste(_resized(_stretch(strip_rows.astype(np.float32)), (strip_h, strip_w)),
                 (MARGIN, top))
    return Preview(canvas, events, panels, (MARGIN, top, MARGIN + strip_w, top + strip_h),
                   row)


def image_format(output: pathlib.Path) -> str:
    """The image format (Pillow's name) that the suffix of `output` asks for"""
    try:
        return FORMATS[output.suffix.lower()]
    except KeyError:
        suffix = f"the suffix '{output.suffix}'" if output.suffix else "no suffix"
        raise ValueError(
            f"The preview {output} has {suffix}, which dcbg cannot write; end its name "
            f"with .png, .jpg or .jpeg.") from None


def write_preview(path, output=None, events=None, row: int | None = None) -> pathlib.Path:
    """Render the preview of `path` and save it as PNG or JPEG

    Parameters
    ----------
    path: path-like
        The .rtdc file; see :func:`render_preview`.
    output: path-like, optional
        Where to write; its suffix (.png, .jpg or .jpeg) chooses the format.
        The default is ``<stem>_preview.png`` beside the file.
    events, row:
        See :func:`render_preview`.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    path = pathlib.Path(path)
    output = pathlib.Path(output) if output else path.with_name(f"{path.stem}_preview.png")
    file_format = image_format(output)
    check_output_path(output)
    preview = render_preview(path, events, row)
    # A short name of its own, so that it fits wherever the output's name fits
    partial = output.with_name(f".dcbg-preview-{os.getpid()}.partial")
    try:
        preview.image.save(partial, format=file_format, **SAVE_OPTIONS.get(file_format, {}))
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    return output
