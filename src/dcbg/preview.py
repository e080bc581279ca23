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
import pathlib

import numpy as np

from .errors import InputDataError
from .rtdc.output import check_output_path
from .rtdc.reader import RTDCInput, events_of

MARGIN = 8
LABEL_HEIGHT = 18
STRIP_COLUMNS = 800
"""Largest number of events sampled for the time strip"""


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


def pick_events(image, image_bg, count: int = 3) -> list[int]:
    """Events with the most foreground among evenly spaced candidates (cells, not empty)"""
    total = len(image)
    candidates = np.unique(np.linspace(0, total - 1, min(total, 40)).round().astype(int))
    scores = [np.abs(image[i].astype(np.int16) - image_bg[i]).mean() for i in candidates]
    best = candidates[np.argsort(scores)[::-1][:count]]
    return sorted(int(i) for i in best)


def render_preview(path, events=None, row: int | None = None) -> Preview:
    """Render the preview of an .rtdc file that has (or reaches) image and image_bg

    Parameters
    ----------
    path: path-like
        The .rtdc file; ``image`` and ``image_bg`` may come through basins.
    events: list of int, optional
        Events to show (default: three with cells in them).
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

    scale = max(1, round(120 / height))
    panel_w, panel_h = width * scale, height * scale
    canvas_w = 3 * panel_w + 4 * MARGIN
    strip_h = min(width, 160)
    canvas_h = (LABEL_HEIGHT + len(events) * (LABEL_HEIGHT + panel_h + MARGIN)
                + LABEL_HEIGHT + strip_h + 2 * MARGIN)
    canvas = Image.new("L", (canvas_w, canvas_h), 255)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    draw.text((MARGIN, 3), f"{path.name}: {total} events, raw | background | "
              f"raw - background", fill=0, font=font)
    top = LABEL_HEIGHT
    panels = []
    for event, raw, background in zip(events, raws, backgrounds, strict=True):
        corrected, limit = corrected_frame(raw, background)
        draw.text((MARGIN, top + 3), f"event {event}   (difference ±{limit} shown as "
                  f"black…white)", fill=0, font=font)
        top += LABEL_HEIGHT
        boxes = {}
        for column, (name, frame) in enumerate((("raw", raw), ("background", background),
                                                ("corrected", corrected))):
            left = MARGIN + column * (panel_w + MARGIN)
            tile = Image.fromarray(np.ascontiguousarray(frame)).resize(
                (panel_w, panel_h), Image.NEAREST)
            canvas.paste(tile, (left, top))
            boxes[name] = (left, top, left + panel_w, top + panel_h)
        panels.append(boxes)
        top += panel_h + MARGIN
    draw.text((MARGIN, top + 3), f"row {row} of image_bg over time (events 0 to "
              f"{total - 1}, left to right), contrast stretched", fill=0, font=font)
    top += LABEL_HEIGHT
    strip_w = canvas_w - 2 * MARGIN
    strip = Image.fromarray(_stretch(strip_rows.astype(np.float32))).resize(
        (strip_w, strip_h), Image.NEAREST)
    canvas.paste(strip, (MARGIN, top))
    return Preview(canvas, events, panels, (MARGIN, top, MARGIN + strip_w, top + strip_h),
                   row)


def write_preview(path, output=None, events=None, row: int | None = None) -> pathlib.Path:
    """Render the preview of `path` and save it as PNG

    The default output is ``<stem>_preview.png`` beside the file. Returns
    the path written.
    """
    path = pathlib.Path(path)
    output = pathlib.Path(output) if output else path.with_name(f"{path.stem}_preview.png")
    check_output_path(output)
    preview = render_preview(path, events, row)
    partial = output.with_name(f".{output.name}.partial")
    preview.image.save(partial, format="PNG")
    partial.replace(output)
    return output
