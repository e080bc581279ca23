"""Reading: find a recording's frames (in the file or through its basins), read them in batches

:class:`RTDCInput` opens an .rtdc file and finds ``events/image`` in it or
in a file it reaches through its basins (mapped basins included).
:class:`ImageSource` reads frames batch by batch into a caller's buffer:
chunks of the filters in :mod:`dcbg.rtdc.chunks` are decoded in a thread
pool, anything else through h5py, and array-like stacks by slicing.
"""
from __future__ import annotations

import concurrent.futures
import logging
import pathlib

import h5py
import numpy as np

from ..errors import InputDataError, InputFileError, NoImageDataError
from .basins import BASIN_DEPTH, FileBasin, file_basins, measurement_identifier
from .chunks import ChunkCodec, ChunkedFrameReader, ChunkedReadError
from .hdf5 import READ_ERRORS, damaged_file_error, open_hdf5

logger = logging.getLogger(__name__)

def missing_input(path: pathlib.Path, what: str = "file") -> FileNotFoundError:
    """The error for an input file or folder that does not exist, naming a quoted ``~``"""
    hint = (" (a quoted '~' is not expanded: write the full path)"
            if str(path).startswith("~") else "")
    return FileNotFoundError(f"Input {what} {path} does not exist{hint}; check the path.")


def check_input_path(path) -> pathlib.Path:
    """Refuse an input path that does not exist or is a folder"""
    path = pathlib.Path(path)
    if not path.exists():
        raise missing_input(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"Input {path} is a folder; give an .rtdc file inside it.")
    return path


class RTDCInput:
    """An open .rtdc file and the dataset holding its images

    Parameters
    ----------
    path: path-like
        The .rtdc file.
    mode: str
        "r" to read only, "a" when the background is written into it.

    Attributes
    ----------
    h5: h5py.File
        The file itself.
    image: h5py.Dataset
        ``events/image``, from the file or from a basin file.
    image_path: pathlib.Path
        The file that holds `image`.
    image_mapping: np.ndarray or None
        For images reached through a mapped basin: the basin event of each
        event of this file (None when the events are the same).
    """

    def __init__(self, path, mode: str = "r"):
        self.path = check_input_path(path)
        self.h5 = open_hdf5(self.path, mode)
        self._basin_files: list[h5py.File] = []
        try:
            self.image, self.image_path, self.image_mapping = self.find_feature("image")
            check_image_stack(self.image, self.image_path, self.image_mapping)
        except (InputDataError, InputFileError):
            self.close()
            raise
        except READ_ERRORS as error:
            self.close()
            raise damaged_file_error(self.path, error) from error
        except BaseException:
            self.close()
            raise

    @property
    def event_count(self) -> int:
        """The file's own number of events (through a mapped basin: the mapping's length)"""
        return self.image.shape[0] if self.image_mapping is None else len(self.image_mapping)

    @property
    def identifier(self) -> str | None:
        """The measurement identifier of the file (dclab's and dcnum's)"""
        return measurement_identifier(self.h5)

    def find_feature(self, feature: str
                     ) -> tuple[h5py.Dataset, pathlib.Path, np.ndarray | None]:
        """``events/<feature>`` of the file or of a basin

        Returns the dataset, the file that holds it, and the event mapping
        of a mapped basin (None when the events are the file's own).

        Raises
        ------
        NoImageDataError
            If neither the file nor a reachable "file" basin has it.
        """
        missing: list[str] = []
        found = self._find(self.h5, self.path, 0, feature, missing)
        if found is not None:
            return found
        if missing:
            raise NoImageDataError(
                f"{self.path} has no events/{feature} of its own and its basin file "
                f"{missing[0]} does not exist; put the basin file back at that path (or "
                f"beside {self.path.name}) and run again.")
        needed = ("dcbg needs the raw frames to compute a background" if feature == "image"
                  else f"compute it first with 'dcbg compute {self.path.name}'")
        raise NoImageDataError(
            f"{self.path} has no events/{feature} data, neither in the file nor in a "
            f"reachable file basin; {needed}.")

    def _find(self, h5: h5py.File, path: pathlib.Path, depth: int, feature: str,
              missing: list[str]):
        dataset = _own_feature(h5, path, feature)
        if dataset is not None:
            return dataset, path, None
        if depth >= BASIN_DEPTH:
            return None
        for basin in file_basins(h5, path):
            if not basin.provides(feature):
                continue
            location = basin.existing_path()
            if location is None:
                missing.append(str(basin.paths[0]) if basin.paths else basin.name)
                continue
            opened = self._open_basin(basin, location)
            if opened is None:
                continue
            found = self._find(opened, location, depth + 1, feature, missing)
            if found is None:
                continue
            dataset, holder, inner = found
            mapping = _compose(_basin_mapping(h5, path, basin), inner)
            return dataset, holder, mapping
        return None

    def _open_basin(self, basin: FileBasin, location: pathlib.Path) -> h5py.File | None:
        opened = open_hdf5(location, "r")
        self._basin_files.append(opened)
        if basin.identifier and measurement_identifier(opened) not in (None, basin.identifier):
            logger.warning("Ignoring basin '%s': %s has measurement identifier %s, not %s",
                           basin.name, location, measurement_identifier(opened),
                           basin.identifier)
            return None
        return opened

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close the file and every basin file opened for it"""
        for basin in self._basin_files:
            if basin.id.valid:
                basin.close()
        self._basin_files = []
        if self.h5.id.valid:
            self.h5.close()


def _own_feature(h5: h5py.File, path: pathlib.Path, feature: str) -> h5py.Dataset | None:
    """``events/<feature>`` of the file itself, after checking links lead somewhere"""
    events = h5.get("events")
    if not isinstance(events, h5py.Group) or feature not in events.keys():
        return None
    link = events.get(feature, getlink=True)
    if isinstance(link, h5py.SoftLink) and events.get(feature) is None:
        raise NoImageDataError(
            f"events/{feature} in {path} is a link to {link.path}, which does not exist in "
            f"the file; repair the link or use the file it was copied from.")
    if isinstance(link, h5py.ExternalLink):
        target = pathlib.Path(link.filename)
        target = target if target.is_absolute() else path.parent / target
        if not target.exists():
            raise NoImageDataError(
                f"events/{feature} in {path} is a link to {link.path} in {link.filename}, "
                f"which does not exist; put {target.name} back beside {path.name} and run "
                f"again.")
    dataset = events.get(feature)
    if dataset is None:
        raise NoImageDataError(
            f"events/{feature} in {path} is a link that leads nowhere; repair it or use the "
            f"file it was copied from.")
    if not isinstance(dataset, h5py.Dataset):
        raise NoImageDataError(
            f"events/{feature} in {path} is a group, not a stack of frames; this file does "
            f"not follow the .rtdc format, so export it again from its source.")
    if dataset.is_virtual:
        _check_virtual_sources(dataset, path, feature)
    return dataset


def _check_virtual_sources(dataset: h5py.Dataset, path: pathlib.Path, feature: str):
    """A virtual dataset whose source file is gone reads as zeros: refuse it instead"""
    for source in dataset.virtual_sources():
        if source.file_name == ".":
            continue
        name = pathlib.Path(source.file_name)
        candidates = [name] if name.is_absolute() else [path.parent / name, name]
        if not any(candidate.exists() for candidate in candidates):
            raise NoImageDataError(
                f"events/{feature} in {path} is a virtual dataset whose source file "
                f"{source.file_name} does not exist, so its frames would read as zeros; put "
                f"that file back beside {path.name} and run again.")


def _basin_mapping(h5: h5py.File, path: pathlib.Path, basin: FileBasin) -> np.ndarray | None:
    if basin.mapping is None:
        return None
    events = h5.get("events")
    if not isinstance(events, h5py.Group) or basin.mapping not in events:
        raise NoImageDataError(
            f"{path} reaches its images through the mapped basin '{basin.name}', but its "
            f"event mapping events/{basin.mapping} is missing; export the file again.")
    mapping = np.asarray(events[basin.mapping][:])
    if mapping.ndim != 1 or not np.issubdtype(mapping.dtype, np.integer):
        raise NoImageDataError(
            f"The event mapping events/{basin.mapping} of the mapped basin '{basin.name}' in "
            f"{path} is not a list of event indices; export the file again.")
    return mapping.astype(np.int64)


def _compose(outer: np.ndarray | None, inner: np.ndarray | None) -> np.ndarray | None:
    """The mapping of a basin reached through another mapped basin"""
    if outer is None:
        return inner
    if inner is None:
        return outer
    return inner[outer]


def check_uint8_frames(shape: tuple, dtype, stack: str, in_a_file: bool):
    """Refuse a stack that is not uint8 frames, the only frames backgrounds are made of

    `stack` names the stack in the message ("events/image in FILE"). Frames
    in a file have two axes, (N, H, W); an array may hold frames of any
    shape after the events' axis.
    """
    layout = "(N, H, W)" if in_a_file else "(N, pixels…)"
    axes_ok = len(shape) == 3 if in_a_file else len(shape) >= 2
    if np.dtype(dtype) != np.uint8 or not axes_ok:
        raise NoImageDataError(
            f"{stack} is {np.dtype(dtype)} with shape {tuple(shape)}, but dcbg needs uint8 "
            f"frames of shape {layout}; convert the images first.")


def check_image_stack(image: h5py.Dataset, path: pathlib.Path, mapping=None):
    """Refuse image data dcbg cannot compute a background for, in one sentence"""
    shape = image.shape
    check_uint8_frames(shape, image.dtype, f"events/image in {path}", in_a_file=True)
    if shape[1] == 0 or shape[2] == 0:
        raise InputDataError(
            f"events/image in {path} holds frames of {shape[1]}x{shape[2]} pixels, which "
            f"have no pixels to compute a background for; check the file's export.")
    if mapping is not None and len(mapping) and (mapping.min() < 0
                                                 or mapping.max() >= shape[0]):
        raise NoImageDataError(
            f"The event mapping to the images in {path} points to events beyond its "
            f"{shape[0]} frames; the basin does not belong to this file.")


class ImageSource:
    """Batch-wise access to an image stack, never loading it whole

    Parameters
    ----------
    data: h5py.Dataset or array-like
        Stack with events along the first axis.
    pool: concurrent.futures.Executor, optional
        Threads that decode chunks in parallel; without one, or for data
        whose layout or filters dcbg does not decode itself, h5py reads.
    mapping: np.ndarray, optional
        Event ``i`` of the source is frame ``mapping[i]`` of `data` (a
        mapped basin).
    image_rules: bool
        Whether the stack must be images as an .rtdc file holds them (uint8,
        at least two axes), as it must for a background written to a file.
        The array functions check their own rules instead (the types of
        :data:`dcbg.dtypes.FRAME_DTYPES`, frames of any shape), and
        :meth:`read_into` then fills buffers of the stack's type.
    """

    def __init__(self, data, pool: concurrent.futures.Executor | None = None,
                 mapping: np.ndarray | None = None, image_rules: bool = True):
        self.data = data
        shape = tuple(data.shape)
        if image_rules:
            check_uint8_frames(shape, data.dtype, "The image stack", in_a_file=False)
        self.mapping = None if mapping is None else np.asarray(mapping, dtype=np.int64)
        self.shape = (len(self.mapping) if self.mapping is not None else shape[0], *shape[1:])
        self.image_shape = shape[1:]
        self.pixels = int(np.prod(self.image_shape))
        self.chunked: ChunkedFrameReader | None = None
        """the parallel chunk reader, None where h5py or slicing reads"""
        if isinstance(data, h5py.Dataset) and pool is not None:
            codec = ChunkCodec.for_dataset(data)
            if codec is not None:
                self.chunked = ChunkedFrameReader(data, codec, pool)

    def __len__(self):
        return self.shape[0]

    @property
    def filename(self) -> str:
        """The file the frames come from ("array" for in-memory stacks)"""
        return self.data.file.filename if isinstance(self.data, h5py.Dataset) else "array"

    def read_into(self, start: int, stop: int, out: np.ndarray):
        """Fill ``out[:stop-start]`` (flattened frames) with frames start…stop-1

        `out` has the stack's type (uint8 for images).

        Raises
        ------
        InputFileError
            If the data are damaged, naming the frames.
        """
        count = stop - start
        try:
            if self.mapping is not None:
                self._read_rows(self.mapping[start:stop], out)
            elif self.chunked is not None:
                self.chunked.read_into(start, stop, out)
            elif isinstance(self.data, h5py.Dataset):
                target = out[:count].reshape(count, *self.image_shape)
                self.data.read_direct(target, source_sel=np.s_[start:stop])
            else:
                target = out[:count].reshape(count, *self.image_shape)
                target[...] = np.asarray(self.data[start:stop])
        except ChunkedReadError as error:
            raise damaged_file_error(self.filename, error,
                                     f" at frames {error.start} to {error.stop - 1}") from error
        except READ_ERRORS as error:
            if not isinstance(self.data, h5py.Dataset):
                raise
            raise damaged_file_error(self.filename, error,
                                     f" at frames {start} to {stop - 1}") from error

    def _read_rows(self, rows: np.ndarray, out: np.ndarray):
        if self.chunked is not None:
            self.chunked.read_rows_into(rows, out)
            return
        unique, inverse = np.unique(rows, return_inverse=True)
        frames = np.asarray(self.data[unique] if len(unique) else self.data[:0])
        out[:len(rows)] = frames.reshape(len(unique), -1)[inverse]



class MappedStack:
    """A stack seen through an event mapping: event ``i`` is ``data[mapping[i]]``

    For reading single events of a mapped basin (previews); batches go
    through :class:`ImageSource`.
    """

    def __init__(self, data, mapping: np.ndarray):
        self.data = data
        self.mapping = np.asarray(mapping, dtype=np.int64)
        self.shape = (len(self.mapping), *data.shape[1:])
        self.dtype = data.dtype

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self.data[int(self.mapping[key[0]])][key[1:]]
        return self.data[int(self.mapping[key])]


def events_of(data, mapping: np.ndarray | None):
    """`data` as the referring file's events (through `mapping` where there is one)"""
    return data if mapping is None else MappedStack(data, mapping)
