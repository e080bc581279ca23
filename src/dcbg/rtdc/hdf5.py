"""HDF5 conventions shared by every file dcbg reads or writes

The attribute names of a background dataset, the HDF5 image attributes, the
JSON-lines text datasets that dclab and dcnum use for basins and logs, and
the translation of h5py's errors into one sentence for the user live here
once, so that the reader, the writer, the run log and the command line agree.
"""
from __future__ import annotations

import json
import pathlib

import h5py
import hdf5plugin  # noqa: F401 - registers the Zstandard filter: h5py reads and writes it
import numpy as np

from ..errors import InputFileError, OutputBusyError, first_line

PPID_ATTRIBUTE = "dcnum ppid background"
"""Attribute of ``image_bg`` that holds the background PPID (dcnum's name)"""

GENERATION_ATTRIBUTE = "dcnum ppid generation"
"""Attribute of ``image_bg`` that holds dcnum's pipeline generation"""

DCNUM_PPID_GENERATION = "13"
"""dcnum's pipeline generation, stored in :data:`GENERATION_ATTRIBUTE` beside every PPID"""

IMAGE_ATTRIBUTES = {"CLASS": "IMAGE", "IMAGE_VERSION": "1.2",
                    "IMAGE_SUBCLASS": "IMAGE_GRAYSCALE"}
"""HDF5 image attributes of a grayscale image stack, as instruments and dcnum write them"""

REPLACED_FEATURES = ("image_bg", "bg_off")
"""Features a new background replaces: the old background and the offsets computed for it"""

READ_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError, UnicodeDecodeError)
"""What h5py raises for files whose structure or data are damaged"""


def as_text(value) -> str:
    """An attribute or dataset element as str (h5py gives bytes or str)"""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def set_image_attributes(dataset: h5py.Dataset):
    """Mark a uint8 stack as a grayscale image for HDF5 viewers"""
    for key, value in IMAGE_ATTRIBUTES.items():
        dataset.attrs.create(key, np.bytes_(value))


def write_json_lines(group: h5py.Group, name: str, record, variable_length: bool = False
                     ) -> h5py.Dataset:
    """Store `record` as indented JSON, one line per dataset element

    dcnum writes basins as fixed-length byte strings and logs as
    variable-length UTF-8 strings; `variable_length` chooses between them.
    """
    lines = json.dumps(record, indent=2).split("\n")
    if variable_length:
        data = np.array([line.encode("utf-8") for line in lines],
                        dtype=h5py.string_dtype("utf-8"))
    else:
        data = np.array(lines, dtype=f"S{max(map(len, lines))}")
    return group.create_dataset(name, data=data)


def read_json_lines(dataset: h5py.Dataset):
    """The JSON record stored by :func:`write_json_lines` (raises json.JSONDecodeError)"""
    return json.loads("\n".join(as_text(line) for line in dataset[:]))


def damaged_file_error(path, cause: BaseException | str, where: str = "") -> InputFileError:
    """The error for an HDF5 file h5py cannot read (truncated or corrupted)"""
    return InputFileError(
        f"{path} cannot be read{where} ({first_line(cause)}); the file is truncated or "
        f"damaged, so copy it again from the instrument or a backup.")


def no_permission_error(path, mode: str) -> InputFileError:
    """The error for a file this user may not open in h5py's `mode`"""
    action = "read" if mode == "r" else "write"
    return InputFileError(
        f"{path} cannot be opened: you have no permission to {action} it; change its "
        f"permissions or work on a copy you own.")


def open_hdf5(path: pathlib.Path, mode: str) -> h5py.File:
    """Open an HDF5 file, turning h5py's errors into a sentence for the user"""
    try:
        return h5py.File(path, mode)
    except PermissionError as error:
        raise no_permission_error(path, mode) from error
    except OSError as error:
        text = str(error)
        if "unable to lock file" in text.lower():
            raise OutputBusyError(
                f"{path} is open for writing in another program (HDF5 file lock); close "
                f"that program or wait until it has finished, then run again.") from error
        if "already open for write" in text:
            raise OutputBusyError(
                f"{path} is marked as open for writing by another program (or by one that "
                f"crashed); if none is running, clear the mark with 'h5clear -s {path}' "
                f"and run again.") from error
        if "signature" in text:
            raise InputFileError(
                f"{path} is not an HDF5 file, so it is no .rtdc recording; check the "
                f"path.") from error
        if "Permission denied" in text or "errno = 13" in text:
            raise no_permission_error(path, mode) from error
        raise damaged_file_error(path, error) from error
