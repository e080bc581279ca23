"""Compare files and folders before and after a run"""
import hashlib
import pathlib

import h5py
import numpy as np


def dataset_digests(path) -> dict:
    """Digest of every dataset and attribute in a file, by name"""
    digests = {}
    with h5py.File(path) as h5:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                raw = (repr(data.tolist()).encode() if data.dtype == object
                       else np.ascontiguousarray(data).tobytes())
                digests[name] = hashlib.sha256(raw).hexdigest()
            digests[name + "@attrs"] = sorted((k, str(v)) for k, v in obj.attrs.items())
        h5.visititems(visit)
        digests["@root"] = sorted((k, str(v)) for k, v in h5.attrs.items())
    return digests


def folder_state(folder: pathlib.Path) -> dict:
    """Name and content digest of every file below a folder"""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_images(path, images, **attrs):
    """A minimal HDF5 file holding only ``events/image`` (and root attributes)"""
    with h5py.File(path, "w") as h5:
        h5.attrs.update(attrs)
        h5.create_dataset("events/image", data=images)
    return path
