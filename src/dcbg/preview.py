"""Preview images: look at a background instead of reading numbers

For a few events the preview shows, side by side under their column titles,
the raw frame, its background and the background-corrected frame
(raw − background, stretched symmetrically around mid-gray so that cells
stand out and a good background leaves a flat gray). Below, a strip shows one
pixel row of the background over time: event number along x (marked under
the strip), pixel of the row along y (marked at its left), so drift and
flicker of the illumination are visible at a glance.

Every text is drawn with Pillow's default font, which where FreeType is
missing (or Pillow is older than 10.1) is a bitmap font of Latin-1
characters only, so the texts keep to those.
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
"""Height of a band of text: the title, the column titles, each event's line, the strip's"""
TEXT_HEIGHT = 12
"""Height of a line of text in the font of _font, for centring it on a tick"""
TICK = 3
"""Length of the tick marks on the strip's axes"""
COLUMNS = (("raw", "raw"), ("background", "background"), ("corrected", "raw - background"))
"""The panels of each event, left to right: their names in Preview.panels and their titles"""
STRIP_TICKS = 5
"""About how many event numbers are marked under the strip"""
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
"""Widest preview: three widest panels (lines of text that are wider are cut)"""
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
    titles: dict
        Box of each column's title, by the panel names of `panels`.
    axes: dict
        Box of the strip's "events" axis (the event numbers under it) and of
        its "pixels" axis (the pixels of the row, at its left).
    """

    image: object
    events: list[int]
    panels: list[dict]
    strip: tuple[int, int, int, int]
    row: int
    titles: dict
    axes: dict


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


def event_ticks(total: int) -> list[int]:
    """Events to mark under the strip: 0, multiples of a round step, and the last event

    The step is the largest 1, 2 or 5 times a power of ten that gives about
    STRIP_TICKS marks; a multiple no farther than half a step from the last event
    is left out, so that their numbers do not run into each other.
    """
    last = total - 1
    if last < 1:
        return [0]
    rough = last / (STRIP_TICKS - 1)
    power = 10 ** max(0, math.floor(math.log10(rough)))
    step = max(m * power for m in (1, 2, 5) if m * power <= max(rough, 1))
    ticks = list(range(0, last, step))
    if len(ticks) > 1 and last - ticks[-1] <= step / 2:
        ticks.pop()
    return [*ticks, last]


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
    title = f"{path.name}: {total} events"
    corrected = [corrected_frame(raw, background) for raw, background in zip(raws, backgrounds,
                                                                              strict=True)]
    labels = [f"event {event}   (difference ±{limit} shown as black...white)"
              for event, (_, limit) in zip(events, corrected, strict=True)]
    strip_label = (f"row {row} of image_bg over time: events 0 to {total - 1} left to right, "
                   f"pixels 0 to {width - 1} of the row top to bottom; contrast stretched")
    pixel_ticks = sorted({0, width - 1})
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    text_w = max(measure.textlength(text, font=font) for text in [title, strip_label, *labels])
    # a column is as wide as its panel, or as the widest title where frames are narrow
    column_w = max(panel_w, max(math.ceil(measure.textlength(text, font=font))
                                for _, text in COLUMNS))
    canvas_w = max(3 * column_w + 4 * MARGIN,
                   min(math.ceil(text_w) + 2 * MARGIN, CANVAS_MAX_WIDTH))
    canvas_h = (2 * LABEL_HEIGHT + len(events) * (LABEL_HEIGHT + panel_h + MARGIN)
                + LABEL_HEIGHT + strip_h + LABEL_HEIGHT + MARGIN)
    canvas = Image.new("L", (canvas_w, canvas_h), 255)
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, 3), title, fill=0, font=font)
    top = LABEL_HEIGHT
    titles = {}
    for column, (name, text) in enumerate(COLUMNS):
        left = MARGIN + column * (column_w + MARGIN)
        draw.text((left, top + 3), text, fill=0, font=font)
        titles[name] = (left, top, left + column_w, top + LABEL_HEIGHT)
    top += LABEL_HEIGHT
    panels = []
    for label, raw, background, (difference, _) in zip(labels, raws, backgrounds, corrected,
                                                       strict=True):
        draw.text((MARGIN, top + 3), label, fill=0, font=font)
        top += LABEL_HEIGHT
        boxes = {}
        for column, frame in enumerate((raw, background, difference)):
            left = MARGIN + column * (column_w + MARGIN)
            canvas.paste(_resized(frame, (panel_h, panel_w)), (left, top))
            boxes[COLUMNS[column][0]] = (left, top, left + panel_w, top + panel_h)
        panels.append(boxes)
        top += panel_h + MARGIN
    draw.text((MARGIN, top + 3), strip_label, fill=0, font=font)
    top += LABEL_HEIGHT
    gutter = math.ceil(max(measure.textlength(str(p), font=font) for p in pixel_ticks)) + 2 * TICK
    strip = (MARGIN + gutter, top, canvas_w - MARGIN, top + strip_h)
    left, _, right, bottom = strip
    canvas.paste(_resized(_stretch(strip_rows.astype(np.float32)), (strip_h, right - left)),
                 (left, top))
    for pixel in pixel_ticks:  # the strip's rows are the pixels of the row, 0 at the top
        y = top + int((pixel + 0.5) * strip_h / width)
        draw.line([(left - TICK, y), (left - 1, y)], fill=0)
        text = str(pixel)
        text_top = min(max(y - TEXT_HEIGHT // 2, top), bottom - TEXT_HEIGHT)
        draw.text((left - TICK - 1 - measure.textlength(text, font=font), text_top),
                  text, fill=0, font=font)
    # the strip's columns are the sampled events: an event is marked at its column's middle
    for event in event_ticks(total):
        column = min(int(np.searchsorted(sampled, event)), len(sampled) - 1)
        x = left + int((column + 0.5) * (right - left) / len(sampled))
        draw.line([(x, bottom), (x, bottom + TICK - 1)], fill=0)
        text = str(event)
        text_w = measure.textlength(text, font=font)
        text_left = min(max(x - text_w / 2, left), right - text_w)
        draw.text((text_left, bottom + TICK), text, fill=0, font=font)
    axes = {"events": (left, bottom, right, bottom + LABEL_HEIGHT),
            "pixels": (MARGIN, top, left, bottom)}
    return Preview(canvas, events, panels, strip, row, titles, axes)


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
