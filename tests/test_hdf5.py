"""dcbg.rtdc.hdf5: the HDF5 conventions shared by the reader, the writer and the run log"""
import os

import h5py
import numpy as np
import pytest

from dcbg.errors import InputFileError
from dcbg.rtdc import hdf5


@pytest.mark.parametrize("value", [b"rollmed:k=100^b=10000", "rollmed:k=100^b=10000",
                                   np.bytes_(b"rollmed:k=100^b=10000")])
def test_attributes_read_as_text_whether_h5py_gives_bytes_or_str(value):
    assert hdf5.as_text(value) == "rollmed:k=100^b=10000"


def test_image_stacks_are_marked_as_grayscale_images_as_instruments_mark_them(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        dataset = h5.create_dataset("image", (2, 3, 4), np.uint8)
        hdf5.set_image_attributes(dataset)
        assert {key: hdf5.as_text(dataset.attrs[key]) for key in hdf5.IMAGE_ATTRIBUTES} == \
            hdf5.IMAGE_ATTRIBUTES
        assert isinstance(dataset.attrs["CLASS"], bytes)  # fixed-length strings, as dcnum


@pytest.mark.parametrize("variable_length", [False, True])
def test_json_records_are_stored_one_line_per_element_and_read_back(tmp_path,
                                                                    variable_length):
    record = {"ppid": "rollmed:k=100^b=10000", "events": 20, "seconds": {"total": 1.5},
              "name": "Gerät"}
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        dataset = hdf5.write_json_lines(h5, "log", record, variable_length=variable_length)
        lines = [hdf5.as_text(line) for line in dataset[:]]
        assert lines[0] == "{" and lines[-1] == "}" and len(lines) > 4
        assert hdf5.read_json_lines(dataset) == record
        assert h5py.check_string_dtype(dataset.dtype).length is (
            None if variable_length else dataset.dtype.itemsize)


def test_a_file_that_is_no_hdf5_file_is_named_as_such(tmp_path):
    path = tmp_path / "notes.rtdc"
    path.write_text("not an HDF5 file")
    with pytest.raises(InputFileError, match="is not an HDF5 file"):
        hdf5.open_hdf5(path, "r")


def test_a_truncated_file_is_called_damaged_with_the_advice_to_copy_it_again(tmp_path):
    path = tmp_path / "cut.rtdc"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("events/image", data=np.zeros((50, 8, 8), np.uint8))
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(InputFileError) as raised:
        hdf5.open_hdf5(path, "r")
    message = str(raised.value)
    assert message.startswith(f"{path} cannot be read (") and "truncated file" in message
    assert message.endswith("the file is truncated or damaged, so copy it again from the "
                            "instrument or a backup.")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs file permissions that bind (root reads every file)")
def test_a_file_without_permission_says_so(tmp_path):
    path = tmp_path / "locked.rtdc"
    with h5py.File(path, "w"):
        pass
    path.chmod(0)
    try:
        with pytest.raises(InputFileError, match="no permission to read it"):
            hdf5.open_hdf5(path, "r")
    finally:
        path.chmod(0o644)


def test_the_error_of_a_damaged_file_is_one_sentence_naming_where():
    error = hdf5.damaged_file_error("rec.rtdc", OSError("bad\nsecond line"), " at frames 4 to 9")
    assert str(error) == ("rec.rtdc cannot be read at frames 4 to 9 (bad); the file is "
                          "truncated or damaged, so copy it again from the instrument or a "
                          "backup.")
