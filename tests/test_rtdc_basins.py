"""Basins: identifiers, definitions, the files an input reads, and the basins of an output"""
import hashlib
import json
import logging
import os
import pathlib
import shutil
import uuid

import dclab
import h5py
import numpy as np
import pytest

from dcbg.rtdc import basins
from dcbg.rtdc.basins import (
    BASIN_DEPTH,
    FileBasin,
    file_basins,
    files_read_by,
    measurement_identifier,
    offered_features,
    portable_paths,
    read_basin_definitions,
    write_output_basins,
)
from dcbg.synthetic import write_synthetic_rtdc


def store_definition(h5, key, definition):
    """A basin definition as dclab stores it: indented JSON, one byte string per line"""
    lines = json.dumps(definition, indent=2, sort_keys=True).split("\n")
    h5.require_group("basins").create_dataset(key, data=np.array(lines, dtype="S"))


def file_basin(*paths, **extra):
    return {"type": "file", "format": "hdf5", "paths": [str(p) for p in paths], **extra}


def referring_file(path, *definitions, **datasets):
    """An HDF5 file with the given basin definitions and ``events`` datasets"""
    with h5py.File(path, "w") as h5:
        for number, definition in enumerate(definitions):
            store_definition(h5, f"basin{number}", definition)
        for name, data in datasets.items():
            h5[f"events/{name}"] = data
    return path


def test_the_run_identifier_is_the_measurement_identifier(tmp_path):
    with h5py.File(tmp_path / "f.rtdc", "w") as h5:
        h5.attrs["experiment:run identifier"] = np.bytes_("d5a1e6b2-run-7")
        h5.attrs["experiment:time"] = "10:00:00"
        h5.attrs["experiment:date"] = "2025-01-01"
        h5.attrs["setup:identifier"] = "RC-1"
        assert measurement_identifier(h5) == "d5a1e6b2-run-7"


def test_without_run_identifier_the_identifier_is_dclabs_md5(tmp_path):
    path = write_synthetic_rtdc(tmp_path / "rec.rtdc", 12, shape=(6, 8), seed=5)
    with h5py.File(path, "a") as h5:
        del h5.attrs["experiment:run identifier"]
        h5.attrs["setup:identifier"] = np.bytes_("RC-setup-5")  # bytes, as some writers do
    expected = str(uuid.UUID(hashlib.md5(b"12:00:00_2026-11-22_RC-setup-5").hexdigest()))
    with h5py.File(path) as h5:
        assert measurement_identifier(h5) == expected
    with dclab.new_dataset(path) as ds:
        assert ds.get_measurement_identifier() == expected


@pytest.mark.parametrize("missing", ["experiment:time", "experiment:date", "setup:identifier"])
def test_no_identifier_without_time_date_and_setup(tmp_path, missing):
    with h5py.File(tmp_path / "f.rtdc", "w") as h5:
        h5.attrs.update({"experiment:time": "10:00:00", "experiment:date": "2025-01-01",
                         "setup:identifier": "RC-1"})
        del h5.attrs[missing]
        assert measurement_identifier(h5) is None


def test_unreadable_basin_definitions_are_skipped_with_a_warning(tmp_path, caplog):
    path = referring_file(tmp_path / "f.rtdc", file_basin("a.rtdc", name="first"),
                          file_basin("b.rtdc", name="second"))
    with h5py.File(path, "a") as h5:
        h5["basins/broken"] = np.array([b"{", b'  "name": "cut off'])
        h5["basins/list"] = np.array([b"[1, 2]"])  # JSON, but no definition
        h5["basins/text"] = np.array(['{"name": "utf-8", "type": "internal"}'],
                                     dtype=h5py.string_dtype())
    with h5py.File(path) as h5, caplog.at_level(logging.WARNING):
        definitions = read_basin_definitions(h5)
    assert [d["name"] for d in definitions] == ["first", "second", "utf-8"]
    (record,) = caplog.records
    assert record.getMessage() == f"Ignoring unreadable basin definition 'broken' in {path}"


def test_a_file_without_basins_has_none(tmp_path):
    path = referring_file(tmp_path / "f.rtdc", deform=np.zeros(3))
    with h5py.File(path) as h5:
        assert read_basin_definitions(h5) == []
        assert file_basins(h5, path) == []


def test_file_basins_resolve_paths_from_the_referring_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "measurement"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths are not the working directory's
    path = referring_file(
        folder / "features.rtdc",
        file_basin("raw/rec.rtdc", "/archive/2024/rec.rtdc", name="raw", mapping="basinmap0",
                   features=["image", "deform"], identifier="run-1"),
        file_basin("rec.rtdc", mapping="same", features=None),
        {"type": "internal", "format": "h5dataset", "paths": ["basin_events"]},
        {"type": "remote", "format": "http", "urls": ["https://example.org/rec.rtdc"]},
        {"type": "file", "format": "s3", "paths": ["rec.rtdc"]})
    with h5py.File(path) as h5:
        found = file_basins(h5, pathlib.Path("..") / "measurement" / "features.rtdc")
    relative_folder = pathlib.Path("..") / "measurement"
    assert found == [
        FileBasin(name="raw",
                  paths=[relative_folder / "raw" / "rec.rtdc",
                         pathlib.Path("/archive/2024/rec.rtdc"),
                         relative_folder / "rec.rtdc"],  # a copy beside the file
                  features=["image", "deform"], mapping="basinmap0", identifier="run-1"),
        FileBasin(name="unnamed", paths=[relative_folder / "rec.rtdc"], features=None,
                  mapping=None, identifier=None),
    ]


def test_the_first_existing_candidate_is_used(tmp_path):
    basin = FileBasin("raw", [tmp_path / "gone.rtdc", tmp_path / "b.rtdc", tmp_path / "c.rtdc"],
                      None, None, None)
    assert basin.existing_path() is None
    (tmp_path / "c.rtdc").write_bytes(b"")
    assert basin.existing_path() == tmp_path / "c.rtdc"
    (tmp_path / "b.rtdc").write_bytes(b"")
    assert basin.existing_path() == tmp_path / "b.rtdc"
    (tmp_path / "gone.rtdc").mkdir()  # a folder is no basin file
    assert basin.existing_path() == tmp_path / "b.rtdc"


def test_provides():
    every = FileBasin("raw", [], None, None, None)
    some = FileBasin("raw", [], ["image", "deform"], None, None)
    assert every.provides("image") and every.provides("anything")
    assert some.provides("image") and some.provides("deform")
    assert not some.provides("area_um")
    assert not FileBasin("raw", [], [], None, None).provides("image")


def test_files_read_by_follows_basins_links_and_virtual_datasets(tmp_path):
    (tmp_path / "sub").mkdir()
    deep = referring_file(tmp_path / "sub" / "deep.rtdc", deform=np.zeros(4))
    linked = referring_file(tmp_path / "linked.rtdc", file_basin("sub/deep.rtdc"),
                            area_um=np.ones(4))
    virtual_source = referring_file(tmp_path / "sub" / "virtual_source.rtdc",
                                    image=np.zeros((4, 2, 2), np.uint8))
    middle = referring_file(tmp_path / "sub" / "middle.rtdc", file_basin("nowhere.rtdc"))
    with h5py.File(middle, "a") as h5:
        h5["events/area_um"] = h5py.ExternalLink("../linked.rtdc", "/events/area_um")
        layout = h5py.VirtualLayout(shape=(4, 2, 2), dtype=np.uint8)
        layout[:] = h5py.VirtualSource("virtual_source.rtdc", "events/image", (4, 2, 2))
        h5.create_virtual_dataset("events/image", layout)
        internal = h5py.VirtualLayout(shape=(4,), dtype=float)
        internal[:] = h5py.VirtualSource(".", "events/area_um", (4,))
        h5.create_virtual_dataset("events/volume", internal)  # from this file itself
    top = referring_file(tmp_path / "top.rtdc", file_basin("sub/middle.rtdc"))
    found = files_read_by(top)
    assert sorted(os.path.realpath(p) for p in found) == sorted(
        os.path.realpath(p) for p in (middle, linked, deep, virtual_source))


def test_files_read_by_stops_at_basin_depth(tmp_path):
    chain = [tmp_path / f"level{i}.rtdc" for i in range(BASIN_DEPTH + 3)]
    for path, basin in zip(chain[:-1], chain[1:], strict=True):
        referring_file(path, file_basin(basin.name))
    referring_file(chain[-1])
    assert files_read_by(chain[0]) == chain[1:BASIN_DEPTH + 1]


def test_files_read_by_lists_each_file_once(tmp_path):
    raw = referring_file(tmp_path / "raw.rtdc", file_basin("top.rtdc"))  # a cycle back
    os.link(raw, tmp_path / "raw_hardlink.rtdc")
    os.symlink(raw, tmp_path / "raw_symlink.rtdc")
    (tmp_path / "notes.rtdc").write_text("no HDF5 file")  # listed, but not followed
    top = referring_file(tmp_path / "top.rtdc",
                         file_basin("raw.rtdc", "raw_hardlink.rtdc", "missing.rtdc"),
                         file_basin(tmp_path / "raw_symlink.rtdc", "notes.rtdc"))
    found = files_read_by(top)
    assert found[0] == tmp_path / "raw.rtdc"
    assert sorted(p.name for p in found) == ["notes.rtdc", "raw.rtdc", "top.rtdc"]


def test_offered_features_leave_out_the_background_and_mappings(tmp_path):
    path = referring_file(tmp_path / "f.rtdc", image=np.zeros((2, 2, 2), np.uint8),
                          image_bg=np.zeros((2, 2, 2), np.uint8), bg_off=np.zeros(2),
                          deform=np.zeros(2), basinmap0=np.arange(2), basinmap1=np.arange(2))
    with h5py.File(path, "a") as h5:
        h5["basin_events/area_um"] = np.zeros(2)
        h5["basin_events/bg_off"] = np.zeros(2)
        h5["basin_events/deform"] = np.zeros(2)
    with h5py.File(path) as h5:
        assert offered_features(h5) == ["area_um", "deform", "image"]
    with h5py.File(tmp_path / "empty.rtdc", "w") as h5:
        assert offered_features(h5) == []


def test_portable_paths_are_absolute_and_relative_to_the_outputs_folder(tmp_path,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "rec.rtdc").write_bytes(b"")
    source = pathlib.Path("raw") / ".." / "raw" / "rec.rtdc"  # from the working directory
    resolved = str((tmp_path / "raw" / "rec.rtdc").resolve())
    assert portable_paths(source, tmp_path / "analysis" / "day1" / "out.rtdc") == [
        resolved, os.path.join("..", "..", "raw", "rec.rtdc")]
    assert portable_paths(source, pathlib.Path("out.rtdc")) == [
        resolved, os.path.join("raw", "rec.rtdc")]


def test_portable_paths_across_drives_keep_the_absolute_path(tmp_path, monkeypatch):
    def other_drive(path, start):
        raise ValueError("path is on mount 'C:', start on mount 'D:'")
    monkeypatch.setattr(basins.os.path, "relpath", other_drive)
    assert portable_paths(tmp_path / "rec.rtdc", tmp_path / "out.rtdc") == [
        str((tmp_path / "rec.rtdc").resolve())]


@pytest.fixture
def input_with_basins(tmp_path):
    """project/in/features.rtdc whose images are in raw.rtdc beside it, through a mapping"""
    folder = tmp_path / "project" / "in"
    folder.mkdir(parents=True)
    raw = write_synthetic_rtdc(folder / "raw.rtdc", 10, shape=(4, 6), seed=1)
    with h5py.File(raw, "a") as h5:
        h5["events/image_bg"] = np.zeros((10, 4, 6), np.uint8)
    mapping = np.array([1, 3, 4, 8])
    source = referring_file(
        folder / "features.rtdc",
        file_basin("raw.rtdc", name="raw", mapping="basinmap0", features=None,
                   identifier="dcbg-synthetic-1-10-4x6"),
        file_basin("/nowhere/old.rtdc", name="old", features=["image", "image_bg", "area_um"]),
        {"type": "internal", "format": "h5dataset", "paths": ["basin_events"], "name": "int"},
        deform=np.linspace(0, 1, 4), bg_off=np.ones(4), basinmap0=mapping)
    with h5py.File(source, "a") as h5:
        h5.attrs["experiment:run identifier"] = "features-run"
    return source, raw, mapping


def output_of(source, tmp_path):
    """A new output in project/out/ that write_output_basins gave the basins of `source`"""
    output = tmp_path / "project" / "out" / "result.rtdc"
    output.parent.mkdir()
    with h5py.File(source) as src, h5py.File(output, "w") as dst:
        write_output_basins(dst, src, source, output)
    return output


def output_definitions(path):
    with h5py.File(path) as h5:
        return {d["name"]: d for d in read_basin_definitions(h5)}


def test_output_basins_reach_the_input_and_its_own_file_basins(input_with_basins, tmp_path):
    source, raw, mapping = input_with_basins
    output = output_of(source, tmp_path)
    with h5py.File(output) as h5:
        assert np.array_equal(h5["events/basinmap0"][:], mapping)
        assert list(h5["events"]) == ["basinmap0"]
    definitions = output_definitions(output)
    assert sorted(definitions) == ["features.rtdc", "old", "raw"]
    assert definitions["features.rtdc"] == {
        "description": "Input of the dcbg background computation",
        "features": ["deform"],
        "format": "hdf5",
        "identifier": "features-run",
        "name": "features.rtdc",
        "paths": [str(source.resolve()), os.path.join("..", "in", "features.rtdc")],
        "type": "file",
    }
    assert definitions["raw"] == file_basin(
        raw.resolve(), os.path.join("..", "in", "raw.rtdc"), name="raw", mapping="basinmap0",
        features=["frame", "image", "index_online", "time"],
        identifier="dcbg-synthetic-1-10-4x6")
    # a basin file that is not there keeps its paths; the replaced background still goes
    assert definitions["old"] == file_basin("/nowhere/old.rtdc", name="old",
                                            features=["image", "area_um"])


def test_output_basins_keep_working_when_the_folder_moves(input_with_basins, tmp_path):
    source, raw, _ = input_with_basins
    output_of(source, tmp_path)
    shutil.move(tmp_path / "project", tmp_path / "moved")
    moved = tmp_path / "moved" / "out" / "result.rtdc"
    with h5py.File(moved) as h5:
        found = {basin.name: basin.existing_path() for basin in file_basins(h5, moved)}
    assert found["features.rtdc"].resolve() == (tmp_path / "moved/in/features.rtdc").resolve()
    assert found["raw"].resolve() == (tmp_path / "moved/in/raw.rtdc").resolve()
    assert found["old"] is None


def test_output_basins_are_written_once(input_with_basins, tmp_path):
    source, _, _ = input_with_basins
    output = tmp_path / "result.rtdc"
    with h5py.File(source) as src, h5py.File(output, "w") as dst:
        write_output_basins(dst, src, source, output)
        write_output_basins(dst, src, source, output)
        assert len(dst["basins"]) == 3
