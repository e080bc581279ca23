"""Reading inputs: basins as dclab and dcnum write them, and bad inputs in one sentence"""
import re
import shutil
import warnings

import dclab
import h5py
import numpy as np
import pytest
from dclab.rtdc_dataset.writer import RTDCWriter
from dcnum.feat.feat_background import BackgroundRollMed as DcnumRollMed

import dcbg
from dcbg import errors
from dcbg.cli import main
from dcbg.reference import rolling_median_reference
from dcbg.rtdc.basins import write_output_basins
from dcbg.rtdc.reader import RTDCInput
from dcbg.rtdc.writer import copy_metadata
from dcbg.synthetic import write_synthetic_rtdc
from helpers.files import folder_state, write_images


def basin_file(source, path, **store_basin):
    """A features-only file whose images are in `source`, written as dcbg or dclab does"""
    if not store_basin:
        with RTDCInput(source) as rtdc_in, h5py.File(path, "w") as h5:
            copy_metadata(rtdc_in.h5, h5)
            write_output_basins(h5, rtdc_in.h5, rtdc_in.path, path)
        return path
    with dclab.new_dataset(source) as ds, RTDCWriter(path, mode="reset") as writer:
        writer.store_metadata(ds.config.as_dict(pop_filtering=True))
        writer.store_basin(basin_name="raw", basin_type="file", basin_format="hdf5",
                           basin_locs=[source], basin_descr="images", **store_basin)
        if store_basin.get("basin_map") is not None:
            writer.store_feature("deform", np.linspace(0, 0.1, len(store_basin["basin_map"])))
    return path


def background(path, tmp_path, **kwargs):
    out = tmp_path / "out.rtdc"
    out.unlink(missing_ok=True)
    with dcbg.BackgroundRollMed(path, out, device="cpu", **kwargs) as bg:
        bg.process()
    with h5py.File(out) as h5:
        return h5["events/image_bg"][:]


def images(path):
    with h5py.File(path) as h5:
        return h5["events/image"][:]


def test_basin_written_by_dclab_with_null_features(tmp_path, capsys):
    raw = write_synthetic_rtdc(tmp_path / "raw.rtdc", 80, shape=(10, 20), seed=3)
    path = basin_file(raw, tmp_path / "dclab.rtdc", basin_map=None)
    with h5py.File(path) as h5:
        (key,) = h5["basins"]
        assert b'"features": null' in b"\n".join(h5["basins"][key][:])
    assert np.array_equal(background(path, tmp_path, kernel_size=4),
                          rolling_median_reference(images(raw), 4))
    assert main(["info", str(path)]) == 0
    assert "80 events of 10x20 pixels (through basin" in capsys.readouterr().out


def test_mapped_basin_gives_the_mapped_events_as_dcnum_does(tmp_path):
    """dcnum 0.31 reads the images of a mapped basin through the mapping; so does dcbg"""
    raw = write_synthetic_rtdc(tmp_path / "raw.rtdc", 80, shape=(10, 20), seed=3)
    mapping = np.r_[np.arange(0, 60, 2), np.arange(60, 80)]
    path = basin_file(raw, tmp_path / "mapped.rtdc", basin_map=mapping)
    expected = rolling_median_reference(images(raw)[mapping], 6)
    for io_threads in (1, 3):
        got = background(path, tmp_path, kernel_size=6, batch_size=11, io_threads=io_threads)
        assert np.array_equal(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with DcnumRollMed(path, tmp_path / "dcnum.rtdc", kernel_size=6, batch_size=11,
                          num_cpus=1) as bg:
            bg.process()
    with h5py.File(tmp_path / "dcnum.rtdc") as h5:
        assert np.array_equal(h5["events/image_bg"][:], expected)


def test_basin_file_copied_beside_the_referring_file(tmp_path):
    """The advice for a missing basin file is to put it beside the file: that must work"""
    (tmp_path / "old").mkdir()
    raw = write_synthetic_rtdc(tmp_path / "old" / "raw.rtdc", 40, shape=(8, 8), seed=2)
    (tmp_path / "new").mkdir()
    path = basin_file(raw, tmp_path / "new" / "features.rtdc")
    shutil.move(raw, tmp_path / "new" / "raw.rtdc")
    shutil.rmtree(tmp_path / "old")
    assert np.array_equal(background(path, tmp_path, kernel_size=4),
                          rolling_median_reference(images(tmp_path / "new" / "raw.rtdc"), 4))


# Each builder makes a bad input in `folder` and returns (path, error class, message).
def bad_missing(folder):
    return folder / "missing.rtdc", FileNotFoundError, "does not exist"


def bad_not_hdf5(folder):
    path = folder / "notes.rtdc"
    path.write_text("this is a lab notebook, not a recording\n")
    return path, errors.InputFileError, "is not an HDF5 file"


def bad_truncated(folder):
    path = write_synthetic_rtdc(folder / "truncated.rtdc", 200, shape=(16, 24), seed=2)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])
    return path, errors.InputFileError, "truncated or damaged"


def bad_corrupt_chunk(folder):
    """A damaged chunk in the middle: found only when the run reaches it"""
    path = write_synthetic_rtdc(folder / "corrupt.rtdc", 600, shape=(16, 24), seed=2,
                                events_per_chunk=20)
    with h5py.File(path) as h5:
        info = h5["events/image"].id.get_chunk_info(15)  # frames 300 to 319
    with open(path, "r+b") as fd:
        fd.seek(info.byte_offset + info.size // 3)
        fd.write(bytes(range(7, 7 + 64)))
    return path, errors.InputFileError, "at frames .*truncated or damaged"


def bad_no_images(folder):
    path = folder / "features.rtdc"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("events/deform", data=np.linspace(0, 0.1, 50))
    return path, errors.NoImageDataError, "has no events/image"


def bad_basin_missing(folder):
    source = write_synthetic_rtdc(folder / "raw.rtdc", 40, shape=(8, 8))
    path = folder / "features_only.rtdc"
    basin_file(source, path)
    source.unlink()
    return path, errors.NoImageDataError, "basin file .*raw.rtdc does not exist"


def bad_dangling_soft_link(folder):
    path = folder / "soft.rtdc"
    with h5py.File(path, "w") as h5:
        h5["events/image"] = h5py.SoftLink("/raw/frames")
    return path, errors.NoImageDataError, "is a link to /raw/frames, which does not exist"


def bad_dangling_external_link(folder):
    path = folder / "external.rtdc"
    with h5py.File(path, "w") as h5:
        h5["events/image"] = h5py.ExternalLink("frames_elsewhere.h5", "/events/image")
    return path, errors.NoImageDataError, "link to /events/image in frames_elsewhere.h5"


def bad_virtual_source_missing(folder):
    source = write_images(folder / "source.h5", np.full((50, 4, 4), 9, np.uint8))
    path = folder / "virtual.rtdc"
    layout = h5py.VirtualLayout(shape=(50, 4, 4), dtype=np.uint8)
    layout[:] = h5py.VirtualSource("source.h5", "events/image", shape=(50, 4, 4))
    with h5py.File(path, "w") as h5:
        h5.create_group("events").create_virtual_dataset("image", layout)
    source.unlink()
    return path, errors.NoImageDataError, "virtual dataset whose source file source.h5"


def bad_zero_height_frames(folder):
    path = write_images(folder / "flat_frames.rtdc", np.zeros((50, 0, 16), np.uint8))
    return path, errors.InputDataError, "frames of 0x16 pixels"


def bad_image_is_a_group(folder):
    path = folder / "group.rtdc"
    with h5py.File(path, "w") as h5:
        h5.create_group("events/image")
    return path, errors.NoImageDataError, "events/image in .*group.rtdc is a group"


def bad_float_images(folder):
    path = write_images(folder / "float.rtdc", np.zeros((50, 4, 4), np.float32))
    return path, errors.NoImageDataError, "float32 .*needs uint8"


def bad_2d_images(folder):
    path = write_images(folder / "flat.rtdc", np.zeros((50, 16), np.uint8))
    return path, errors.NoImageDataError, r"shape \(50, 16\).*\(N, H, W\)"


def bad_zero_events(folder):
    path = write_images(folder / "empty.rtdc", np.zeros((0, 4, 4), np.uint8))
    return path, errors.InputDataError, "N=0 events"


def bad_too_few_events(folder):
    path = write_images(folder / "short.rtdc", np.zeros((20, 4, 4), np.uint8))
    return path, errors.InputDataError, "N=20 events.*kernel_size=30"


BAD_INPUTS = [bad_missing, bad_not_hdf5, bad_truncated, bad_corrupt_chunk, bad_no_images,
              bad_basin_missing, bad_float_images, bad_2d_images, bad_zero_events,
              bad_too_few_events, bad_dangling_soft_link, bad_dangling_external_link,
              bad_virtual_source_missing, bad_zero_height_frames, bad_image_is_a_group]


@pytest.mark.parametrize("build", BAD_INPUTS, ids=lambda b: b.__name__[4:])
def test_bad_input_through_the_api(tmp_path, build):
    path, error, message = build(tmp_path)
    before = folder_state(tmp_path)
    with pytest.raises(error, match=message) as info:
        with dcbg.BackgroundRollMed(path, tmp_path / "out.rtdc", kernel_size=30,
                                    batch_size=40, num_cpus=1, device="cpu") as bg:
            bg.process()
    assert path.name in str(info.value) or "N=" in str(info.value)
    assert folder_state(tmp_path) == before, "nothing changed, nothing left behind"


@pytest.mark.parametrize("build", BAD_INPUTS, ids=lambda b: b.__name__[4:])
def test_bad_input_through_the_cli(tmp_path, build, capsys):
    path, _, message = build(tmp_path)
    before = folder_state(tmp_path)
    code = main(["compute", str(path), "-kb", "kernel_size=30", "-kb", "batch_size=40",
                 "--num-cpus", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert "Errno" not in err and "object has no attribute" not in err
    assert folder_state(tmp_path) == before


