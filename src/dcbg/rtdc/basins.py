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

from .hdf5 import as_text, read_json_lines, write_json_lines

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


def file_basins(h5: h5py.File, path: pathlib.Path) -> list[FileBasin]:
    """The "file"/"hdf5" basins of a file, with their candidate paths resolved"""
    basins = []
    folder = path.parent
    for definition in read_basin_definitions(h5):
        if definition.get("type") != "file" or definition.get("format") != "hdf5":
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


def write_file_basin(dst: h5py.File, source: pathlib.Path, identifier: str | None,
                     output_path: pathlib.Path):
    """Store a "file" basin in `dst` that points to `source`

    The basin lists the absolute path and the path relative to the output,
    so the pair keeps working when a folder is moved as a whole. It lists no
    features, so readers take every feature of the source, including those
    the source itself reaches through its own basins.
    """
    source = pathlib.Path(source).resolve()
    paths = [str(source)]
    try:
        paths.append(os.path.relpath(source, pathlib.Path(output_path).resolve().parent))
    except ValueError:  # another drive on Windows
        pass
    definition = {
        "description": "Input of the dcbg background computation",
        "name": source.name,
        "format": "hdf5",
        "paths": paths,
        "type": "file",
        "identifier": identifier,
    }
    key = hashlib.md5(json.dumps(definition, indent=2).encode("utf-8")).hexdigest()
    basins = dst.require_group("basins")
    if key not in basins:
        write_json_lines(basins, key, definition)
