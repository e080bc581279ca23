"""Compare files and folders before and after a run"""
import hashlib
import pathlib

import h5py
import numpy as np

from dcbg.reference import rolling_median_reference


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


def existing_output(path, events=200):
    """An analysis file that already holds features, an old background and its bg_off"""
    with h5py.File(path, "w") as h5:
        h5.attrs["experiment:sample"] = "analysis"
        h5["events/deform"] = np.linspace(0, 0.1, events)
        h5["events/userdef1"] = np.arange(events, dtype=float)
        h5["events/bg_off"] = np.ones(events)
        h5["events/image_bg"] = np.zeros((events, 80, 160), np.uint8)
        h5["tables/notes"] = np.arange(3)
    return path


def assert_background_added(recording, out, before):
    """`out` kept every dataset but got the background of `recording` and lost its bg_off"""
    after = dataset_digests(out)
    for name in ("events/deform", "events/userdef1", "tables/notes", "@root"):
        assert after[name] == before[name]
    with h5py.File(out) as h5, h5py.File(recording) as h5in:
        assert "bg_off" not in h5["events"]
        assert np.array_equal(h5["events/image_bg"][:],
                              rolling_median_reference(h5in["events/image"][:], 4))
        assert h5["events/image_bg"].attrs["dcnum ppid background"] == "rollmed:k=4^b=20"
    assert sorted(p.name for p in out.parent.iterdir()) == ["analysis.rtdc", "rec.rtdc"]


def assert_only_run_logs_added(before: dict, after: dict, runs: int):
    """Every dataset and attribute of `before` is unchanged; `runs` run logs are all that came"""
    changed = sorted(name for name, digest in before.items() if after.get(name) != digest)
    assert not changed, changed
    added = sorted(set(after) - set(before))
    logs = [name for name in added if name.startswith("logs/dcbg-background_")]
    assert logs == added and len(added) == 2 * runs, added  # each with its @attrs


def file_size_after_reruns(run, path, reruns=3):
    """Size of `path` after a first run, its digests then, and its sizes after each re-run"""
    run()
    fresh, before = path.stat().st_size, dataset_digests(path)
    sizes = []
    for _ in range(reruns):
        run()
        sizes.append(path.stat().st_size)
    return fresh, before, sizes


def hidden_files(folder: pathlib.Path) -> list[str]:
    """Names of the hidden files in a folder (unfinished outputs, locks)"""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
