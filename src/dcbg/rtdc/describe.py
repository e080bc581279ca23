"""What an .rtdc file carries, in the lines ``dcbg info FILE`` prints

Its events and frames (through basins and event mappings), its own
``image_bg`` and the PPID that made it, the attributes that name the
measurement, its basins and whether they exist, and the run logs. A file
whose images cannot be used is described as far as it can be.
"""
from __future__ import annotations

import pathlib
from collections.abc import Iterator

import h5py

from ..errors import InputDataError, InputFileError, first_line
from ..runlog import read_run_logs
from .basins import basin_candidates, read_basin_definitions
from .hdf5 import GENERATION_ATTRIBUTE, PPID_ATTRIBUTE, as_text, open_hdf5
from .reader import RTDCInput

INFO_ATTRIBUTES = (("experiment:sample", "sample"), ("experiment:date", "date"),
                   ("experiment:time", "time"), ("experiment:run identifier", "run identifier"),
                   ("setup:software version", "software"))
"""Root attributes `dcbg info FILE` names (key, label); the others are counted"""


def describe_images(path: pathlib.Path) -> tuple[str | None, str | None]:
    """The file's events and frames as `dcbg info` says them, or why its images are unusable

    The number of events is the file's own: through a mapped basin, the
    length of the mapping, not the basin's frame count.

    Returns
    -------
    description: str or None
        e.g. "213 events of 80x320 pixels (through mapped basin …, 400 frames)".
    unusable: str or None
        The first line of the error that makes the images unusable.
    """
    try:
        with RTDCInput(path) as rtdc_in:
            image, mapping = rtdc_in.image, rtdc_in.image_mapping
            events = rtdc_in.event_count
            where = ""
            if mapping is not None:
                where = f" (through mapped basin {rtdc_in.image_path}, {image.shape[0]} frames)"
            elif rtdc_in.image_path != rtdc_in.path:
                where = f" (through basin {rtdc_in.image_path})"
            return f"{events} events of {image.shape[1]}x{image.shape[2]} pixels{where}", None
    except (InputDataError, InputFileError) as error:
        return None, first_line(error)


def own_event_count(h5) -> int | None:
    """The number of events from a file's own features, else its event count attribute"""
    events = h5.get("events")
    for name in events if isinstance(events, h5py.Group) else ():
        try:
            feature = events.get(name)
        except (KeyError, OSError, RuntimeError, ValueError):  # a link that leads nowhere
            continue
        if isinstance(feature, h5py.Dataset) and feature.shape:
            return feature.shape[0]
    count = h5.attrs.get("experiment:event count")
    return None if count is None else int(count)


def background_line(h5) -> str:
    """What `dcbg info` says about the file's own image_bg"""
    events = h5.get("events")
    try:
        image_bg = events.get("image_bg") if isinstance(events, h5py.Group) else None
    except (KeyError, OSError, RuntimeError, ValueError):
        image_bg = None
    if not isinstance(image_bg, h5py.Dataset):
        return "image_bg: none in this file"
    ppid = as_text(image_bg.attrs.get(PPID_ATTRIBUTE, "none recorded"))
    generation = as_text(image_bg.attrs.get(GENERATION_ATTRIBUTE, "?"))
    return f"image_bg: PPID {ppid} (generation {generation})"


def attributes_line(h5) -> str:
    """The number of root attributes and the ones that name the measurement"""
    attrs = h5.attrs
    named = [f"{label} {as_text(attrs[key])}" for key, label in INFO_ATTRIBUTES if key in attrs]
    return f"attributes: {len(attrs)}" + (f" ({', '.join(named)})" if named else "")


def describe_file(path: pathlib.Path) -> Iterator[str]:
    """The lines that describe what an .rtdc file carries: events, images, background,
    attributes, basins, logs

    The lines come one at a time, each as soon as it is read, so that a
    caller that prints them shows what was read before an error.

    A file whose images cannot be used (a basin moved away, no images,
    frames that are not uint8) is described as far as it can be, with one
    line saying why; only a file that cannot be read at all is an error.

    Parameters
    ----------
    path: pathlib.Path
        The .rtdc file.

    Yields
    ------
    line: str
        One line of the description, without its line end.

    Raises
    ------
    OSError
        If the file cannot be read at all (no HDF5 file, damaged, not
        readable for this user).
    """
    description, unusable = describe_images(path)
    with open_hdf5(path, "r") as h5:  # a file that cannot be read at all ends here
        if description is None:
            events = own_event_count(h5)
            yield f"{path}: {'an unknown number of' if events is None else events} events"
            yield f"images: cannot be used: {unusable}"
        else:
            yield f"{path}: {description}"
        yield background_line(h5)
        yield attributes_line(h5)
        for definition in read_basin_definitions(h5):
            paths = definition.get("paths", [])
            exists = any(p.exists() for p in basin_candidates(definition, path.parent))
            yield (f"basin {definition.get('name')!r}: {definition.get('type')}/"
                   f"{definition.get('format')}, {paths[0] if paths else 'no path'}"
                   f"{'' if exists else ' (missing)'}")
        logs = read_run_logs(h5)
        for name, record in logs:
            seconds = record.get("seconds", {})
            device = " ".join(str(record[k]) for k in ("device", "name") if record.get(k))
            yield (f"log {name}: {record.get('software')}, {record.get('ppid')}, "
                   f"{record.get('events')} events on {device} "
                   f"in {seconds.get('total', '?')} s, host "
                   f"{record.get('host')}, warnings: {len(record.get('warnings', []))}")
        others = sorted(set(h5.get("logs", {})) - {name for name, _ in logs})
        if others:
            yield f"other logs: {', '.join(others)}"
