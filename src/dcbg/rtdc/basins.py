"""Basins: how one .rtdc file refers to features stored in another

A basin definition is a JSON record in the ``basins`` group (dclab's and
dcnum's format). dcbg follows "file" basins in HDF5 format to find the raw
frames, and writes one such basin into every new output so that readers see
the input's features through it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import uuid

import h5py

from .hdf5 import REPLACED_FEATURES, as_text, open_hdf5, read_json_lines, write_json_lines

logger = logging.getLogger(__name__)


def measurement_identifier(h5: h5py.File) -> str | None:
    """The identifier dclab and dcnum use to verify a basin belongs to a file"""
    identifier = h5.attrs.get("experiment:run identifier")
    if identifier:
        return as_text(identifier)
    parts = [h5.attrs.get(key) for key in
             ("experiment:time", "experiment:date", "setup:identifier")]
    if all(parts):
        digest = hashlib.md5("_".join(as_text(p) for p in parts).encode("utf-8"))
        return str(uuid.UUID(hex=digest.hexdigest()))
    return None


def read_basin_definitions(h5: h5py.File) -> list[dict]:
    """All basin definitions stored in the ``basins`` group of a file"""
    basins = []
    for key in sorted(h5.get("basins", {})):
        try:
            definition = read_json_lines(h5["basins"][key])
        except json.JSONDecodeError:
            logger.warning("Ignoring unreadable basin definition '%s' in %s", key, h5.filename)
            continue
        if isinstance(definition, dict):
            basins.append(definition)
    return basins


@dataclasses.dataclass(frozen=True)
class FileBasin:
    """A "file" basin in HDF5 format, as far as dcbg follows it

    Attributes
    ----------
    name: str
        The basin's name (for messages).
    paths: list of pathlib.Path
        Where the basin file may be, in the order to try: each listed
        path (relative ones resolved from the referring file's folder), then
        a file of the same name beside the referring file.
    features: list of str or None
        Features the basin provides; None means all of its own features.
    mapping: str or None
        The referring file's ``events/<mapping>`` that maps its events to
        the basin's events (dclab's "basinmap" features), None for a basin
        with the same events.
    identifier: str or None
        Measurement identifier the basin file must have.
    """

    name: str
    paths: list[pathlib.Path]
    features: list[str] | None
    mapping: str | None
    identifier: str | None

    def provides(self, feature: str) -> bool:
        """Whether the definition makes `feature` available (if the file has it)"""
        return self.features is None or feature in self.features

    def existing_path(self) -> pathlib.Path | None:
        """The first of :attr:`paths` that exists, or None"""
        return next((path for path in self.paths if path.is_file()), None)


def is_file_basin(definition: dict) -> bool:
    """Whether a basin definition is a "file" basin in HDF5 format, the kind dcbg follows"""
    return definition.get("type") == "file" and definition.get("format") == "hdf5"


def file_basins(h5: h5py.File, path: pathlib.Path) -> list[FileBasin]:
    """The "file"/"hdf5" basins of a file, with their candidate paths resolved"""
    basins = []
    folder = path.parent
    for definition in read_basin_definitions(h5):
        if not is_file_basin(definition):
            continue
        features = definition.get("features")
        mapping = definition.get("mapping")
        basins.append(FileBasin(
            name=str(definition.get("name") or "unnamed"),
            paths=basin_candidates(definition, folder),
            features=None if features is None else [str(f) for f in features],
            mapping=None if mapping in (None, "same") else str(mapping),
            identifier=definition.get("identifier")))
    return basins


def basin_candidates(definition: dict, folder: pathlib.Path) -> list[pathlib.Path]:
    """The paths a basin may be at, in the order to try

    Absolute paths as they are, relative ones in `folder` (the referring
    file's folder, as dclab resolves them), and finally each file name in
    `folder` itself, so that a basin file copied next to the file that refers
    to it is found too.
    """
    listed = [pathlib.Path(entry) for entry in definition.get("paths", []) or []]
    candidates = [path if path.is_absolute() else folder / path for path in listed]
    for path in listed:
        beside = folder / path.name
        if path.name and beside not in candidates:
            candidates.append(beside)
    return candidates


def offered_features(h5: h5py.File) -> list[str]:
    """The features a file's basin offers to a dcbg output

    The file's own features (``events`` and its internal basins'
    ``basin_events``) except event mappings and the background that the
    output replaces: a ``bg_off`` belongs to the background it was computed
    for.
    """
    names = set()
    for group in ("events", "basin_events"):
        if isinstance(h5.get(group), h5py.Group):
            names.update(h5[group].keys())
    return sorted(name for name in names
                  if name not in REPLACED_FEATURES and not name.startswith("basinmap"))


BASIN_DEPTH = 5
"""How many basins deep files are followed (basins may refer to basins)"""


def files_read_by(path: pathlib.Path) -> list[pathlib.Path]:
    """Every file whose data `path` reads: its basins' files and its external sources

    Follows "file" basins (every candidate path that exists) up to
    :data:`BASIN_DEPTH` levels deep, and the files behind external links and
    virtual datasets in their ``events``. Files that cannot be opened are
    listed but not followed.
    """
    found: list[pathlib.Path] = []
    pending = [(pathlib.Path(path), 0)]
    while pending:
        current, depth = pending.pop()
        try:
            h5 = h5py.File(current, "r")
        except OSError:
            continue
        with h5:
            linked = _external_files(h5, current)
            basins = file_basins(h5, current) if depth < BASIN_DEPTH else []
        for candidate in linked + [p for basin in basins for p in basin.paths]:
            if candidate.is_file() and not any(same_file(candidate, seen) for seen in found):
                found.append(candidate)
                pending.append((candidate, depth + 1))
    return found


def same_file(a, b) -> bool:
    """Whether two paths name the same file (symbolic and hard links included)"""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _external_files(h5: h5py.File, path: pathlib.Path) -> list[pathlib.Path]:
    """Files that external links and virtual datasets in ``events`` read from"""
    events = h5.get("events")
    if not isinstance(events, h5py.Group):
        return []
    names = []
    for name in events:
        link = events.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            names.append(link.filename)
            continue
        dataset = events.get(name)
        if isinstance(dataset, h5py.Dataset) and dataset.is_virtual:
            names += [source.file_name for source in dataset.virtual_sources()
                      if source.file_name != "."]
    return [p if p.is_absolute() else path.parent / p for p in map(pathlib.Path, names)]


def portable_paths(source: pathlib.Path, output_path: pathlib.Path) -> list[str]:
    """`source` as an absolute path and relative to the output's folder

    The pair keeps working when a folder is moved as a whole.
    """
    source = pathlib.Path(source).resolve()
    paths = [str(source)]
    try:
        paths.append(os.path.relpath(source, pathlib.Path(output_path).resolve().parent))
    except ValueError:  # another drive on Windows
        pass
    return paths


def store_basin(dst: h5py.File, definition: dict):
    """Write a basin definition into the ``basins`` group (named by its digest)"""
    key = hashlib.md5(json.dumps(definition, indent=2).encode("utf-8")).hexdigest()
    basins = dst.require_group("basins")
    if key not in basins:
        write_json_lines(basins, key, definition)


def write_output_basins(dst: h5py.File, src: h5py.File, source: pathlib.Path,
                        output_path: pathlib.Path):
    """Make every feature of the input reachable from a new output, one basin deep

    Writes a "file" basin to the input listing its own features, and a copy
    of each of the input's own "file" basins with paths that work from the
    output's folder (and their event mappings), as dcnum writes its outputs:
    dcnum reads basins one level deep, dclab any number of levels. Neither
    offers the input's ``image_bg`` or ``bg_off``
    (:data:`REPLACED_FEATURES`).
    """
    source = pathlib.Path(source)
    store_basin(dst, {
        "description": "Input of the dcbg background computation",
        "features": offered_features(src),
        "format": "hdf5",
        "identifier": measurement_identifier(src),
        "name": source.name,
        "paths": portable_paths(source, output_path),
        "type": "file",
    })
    for definition in read_basin_definitions(src):
        if not is_file_basin(definition):
            continue
        copy = dict(definition)
        candidates = basin_candidates(definition, source.parent)
        location = next((path for path in candidates if path.is_file()), None)
        if location is not None:
            copy["paths"] = portable_paths(location, output_path)
            if copy.get("features") is None:
                with open_hdf5(location, "r") as basin:
                    copy["features"] = offered_features(basin)
        if copy.get("features") is not None:
            copy["features"] = [f for f in copy["features"] if f not in REPLACED_FEATURES]
        mapping = definition.get("mapping")
        if mapping not in (None, "same") and mapping in src.get("events", {}):
            events = dst.require_group("events")
            if mapping not in events:
                events.create_dataset(mapping, data=src["events"][mapping][:])
        store_basin(dst, copy)
