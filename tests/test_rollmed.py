"""BackgroundRollMed end to end: dclab opens its outputs, dcnum's golden bytes, in place"""
import os
import shutil

import dclab
import h5py
import numpy as np
import pytest

import dcbg
from dcbg import errors
from dcbg.reference import rolling_median_reference
from dcbg.runlog import read_run_logs
from dcbg.synthetic import write_synthetic_rtdc
from helpers.data import golden_entries
from helpers.files import dataset_digests


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "rec.rtdc"
    return write_synthetic_rtdc(path, 120, shape=(16, 48), seed=3)


def test_new_output_opens_in_dclab(recording, tmp_path):
    out = tmp_path / "out.rtdc"
    with dcbg.BackgroundRollMed(recording, out, kernel_size=10, batch_size=33,
                                device="cpu") as bg:
        bg.process()
    with h5py.File(recording) as h5:
        stack = h5["events/image"][:]
    expected = rolling_median_reference(stack, 10)
    with dclab.new_dataset(out) as ds:
        assert len(ds) == len(stack)
        assert np.array_equal(ds["image_bg"][:], expected)
        assert np.array_equal(ds["image"][:], stack)  # through the basin
        assert np.allclose(ds["frame"], np.arange(len(stack)) * 3 + 1)
        assert ds.config["experiment"]["sample"] == "dcbg synthetic"
    with h5py.File(out) as h5:
        ds = h5["events/image_bg"]
        assert ds.attrs["dcnum ppid background"] == "rollmed:k=10^b=33"
        assert ds.attrs["dcnum ppid generation"] == "13"
        assert ds.attrs["CLASS"] == b"IMAGE"
        assert ds.attrs["IMAGE_SUBCLASS"] == b"IMAGE_GRAYSCALE"
        assert ds.attrs["IMAGE_VERSION"] == b"1.2"
        assert ds.chunks == (1000, 16, 48)
        assert "32015" in ds._filters  # zstd via hdf5plugin
        assert ds.fletcher32
        assert list(h5["events"]) == ["image_bg"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.rtdc"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("compress,filters", [(False, set()), ("zstd-1", {"32015"})])
def test_compression_settings(recording, tmp_path, compress, filters):
    out = tmp_path / "out.rtdc"
    with dcbg.BackgroundRollMed(recording, out, kernel_size=4, batch_size=50,
                                compress=compress, device="cpu") as bg:
        bg.process()
    with h5py.File(out) as h5:
        assert set(h5["events/image_bg"]._filters) - {"fletcher32"} == filters


def test_input_reached_through_basin(recording, tmp_path):
    first = tmp_path / "first.rtdc"
    with dcbg.BackgroundRollMed(recording, first, kernel_size=4, batch_size=50,
                                device="cpu") as bg:
        bg.process()
    # `first` holds no images itself, only a basin to the recording
    second = tmp_path / "second.rtdc"
    with dcbg.BackgroundRollMed(first, second, kernel_size=6, batch_size=50,
                                device="cpu") as bg:
        bg.process()
    with h5py.File(recording) as h5:
        images = h5["events/image"][:]
        frames = h5["events/frame"][:]
    with dclab.new_dataset(second) as ds:
        assert np.array_equal(ds["image_bg"][:], rolling_median_reference(images, 6))
        # every feature of the recording, two basins away
        assert np.array_equal(ds["image"][:], images)
        assert np.array_equal(ds["frame"][:], frames)


def test_in_place_keeps_every_other_dataset(recording, tmp_path):
    path = tmp_path / "copy.rtdc"
    shutil.copy(recording, path)
    before = dataset_digests(path)
    for kernel_size in (4, 8):  # the second run replaces the first image_bg
        with dcbg.BackgroundRollMed(path, path, kernel_size=kernel_size, batch_size=40,
                                    device="cpu") as bg:
            bg.process()
            bg.process()  # processing twice still writes into the input
    after = dataset_digests(path)
    for name, digest in before.items():
        assert after[name] == digest, name
    added = set(after) - set(before)
    assert {a for a in added if not a.startswith("logs")} == {"events/image_bg",
                                                              "events/image_bg@attrs"}
    with h5py.File(path) as h5:  # one run log per process() is the only other addition
        assert len(read_run_logs(h5)) == 4
        assert {a for a in added if a.startswith("logs/")} == {
            f"logs/{name}{suffix}" for name, _ in read_run_logs(h5) for suffix in ("", "@attrs")}
    with dclab.new_dataset(path) as ds:
        expected = rolling_median_reference(ds["image"][:], 8)
        assert np.array_equal(ds["image_bg"][:], expected)


def test_clear_errors_for_unusable_files(shared_data, tmp_path):
    empty = shared_data / "rtdc" / "M001_data.rtdc"
    with pytest.raises(ValueError, match="N=0 events"):
        dcbg.BackgroundRollMed(empty, tmp_path / "o.rtdc", device="cpu")
    no_image = shared_data / "rtdc" / "fmt-hdf5_cytoshot_extended-moments-features.rtdc"
    with pytest.raises(ValueError, match="fmt-hdf5_cytoshot.*has no events/image"):
        dcbg.BackgroundRollMed(no_image, tmp_path / "o.rtdc", device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dcbg.BackgroundRollMed(tmp_path / "missing.rtdc", tmp_path / "o.rtdc", device="cpu")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("entry", golden_entries(), ids=lambda e: e["image_bg"])
def test_golden_outputs_of_dcnum(shared_data, tmp_path, entry):
    expected = np.load(shared_data / entry["image_bg"])["image_bg"]
    out = tmp_path / "out.rtdc"
    with dcbg.BackgroundRollMed(shared_data / entry["input"], out,
                                kernel_size=entry["kernel_size"],
                                batch_size=entry["batch_size"], device="cpu") as bg:
        assert bg.get_ppid() == entry["ppid"]
        bg.process()
    with dclab.new_dataset(out) as ds:
        assert np.array_equal(ds["image_bg"][:], expected)
        assert ds["image"].shape == tuple(entry["shape"])


def test_golden_index_covers_every_recording_with_images(shared_data):
    """Each entry names files that exist, its PPID, shape and dtype agree, no file is left out"""
    entries = golden_entries()
    with_images = set()
    for path in sorted((shared_data / "rtdc").glob("*.rtdc")):
        with h5py.File(path) as h5:
            image = h5.get("events/image")
            if image is not None and image.shape[0] > 0:
                with_images.add(f"rtdc/{path.name}")
    assert {entry["input"] for entry in entries} == with_images
    for entry in entries:
        expected = np.load(shared_data / entry["image_bg"])["image_bg"]
        assert expected.dtype == np.uint8 and expected.shape == tuple(entry["shape"])
        assert entry["ppid"] == f"rollmed:k={entry['kernel_size']}^b={entry['batch_size']}"


@pytest.mark.parametrize("kwargs,error,message", [
    ({"kernel_size": 3}, ValueError, "positive even integer"),
    ({"kernel_size": "100"}, ValueError, "must be an integer"),
    ({"kernel_size": 10, "batch_size": 4}, ValueError, "larger than kernel_size"),
    # too few frames (50) is said before the batch_size rule they break as well
    ({"kernel_size": 20000}, errors.InputDataError, "N=50 events"),
    ({"kernel_size": 60, "batch_size": 30}, errors.InputDataError, "N=50 events"),
    ({"kernel": 10}, errors.UnknownKeywordError, "no keyword 'kernel'"),
    ({"kernel": 10}, TypeError, "no keyword 'kernel'"),
    ({"kernel_size": 4, "compress": "gzip"}, ValueError, "Unknown compression 'gzip'"),
])
def test_bad_arguments_through_the_api(tmp_path, kwargs, error, message):
    stack = np.zeros((50, 3, 3), np.uint8)
    with pytest.raises(error, match=message):
        with dcbg.BackgroundRollMed(stack, tmp_path / "o.rtdc", device="cpu", num_cpus=1,
                                    **kwargs) as bg:
            bg.process()
    with pytest.raises(FileNotFoundError, match="Output folder .*nope does not exist"):
        dcbg.BackgroundRollMed(stack, tmp_path / "nope" / "o.rtdc", kernel_size=4)
    for bad in ("rollmed:k100", "sparsemed:k=2", "rollmed:k=4^k=6^z=1", ""):
        with pytest.raises(ValueError):
            dcbg.Background.get_ppkw_from_ppid(bad)
    assert not list(tmp_path.iterdir())


def test_output_offers_the_inputs_features_but_not_its_old_background(recording, tmp_path):
    source = tmp_path / "with_bg.rtdc"
    shutil.copy(recording, source)
    with h5py.File(source, "a") as h5:
        h5["events/bg_off"] = np.linspace(-1, 1, 120)
        h5["events/image_bg"] = np.zeros((120, 16, 48), np.uint8)
    first = tmp_path / "first.rtdc"
    with dcbg.BackgroundRollMed(source, first, kernel_size=4, device="cpu") as bg:
        bg.process()
    second = tmp_path / "second.rtdc"  # from a file whose images are in a basin
    with dcbg.BackgroundRollMed(first, second, kernel_size=6, device="cpu") as bg:
        bg.process()
    for path, k in ((first, 4), (second, 6)):
        with dclab.new_dataset(path) as ds:
            assert "bg_off" not in ds.features
            assert np.array_equal(ds["image_bg"][:],
                                  rolling_median_reference(ds["image"][:], k))
            assert np.allclose(ds["frame"], np.arange(120) * 3 + 1)
    from dcnum.read import HDF5Data  # reads basins one level deep only
    with HDF5Data(second) as data:
        assert "image" in data.keys() and "bg_off" not in data.keys()
        assert data.image.shape == (120, 16, 48)
