"""One check before a run: the dry run makes the check a run makes, and finds what it finds"""
import os
import pathlib

import h5py
import numpy as np
import pytest

import dcbg
from dcbg.errors import InputDataError, InputFileError
from dcbg.jobs import JobSettings, check_input
from dcbg.synthetic import write_synthetic_rtdc

SETTINGS = JobSettings("rollmed", {"kernel_size": 10}, device="cpu")


def damaged_input_into_a_missing_folder(tmp_path):
    source = tmp_path / "damaged.rtdc"
    source.write_bytes(b"not HDF5 at all")
    return source, tmp_path / "missing" / "out.rtdc"


def short_input_onto_an_output_of_other_events(tmp_path):
    source = write_synthetic_rtdc(tmp_path / "short.rtdc", 8, shape=(4, 6), seed=1)
    target = write_synthetic_rtdc(tmp_path / "other.rtdc", 30, shape=(4, 6), seed=2)
    return source, target


def input_onto_an_output_of_other_events(tmp_path):
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 40, shape=(4, 6), seed=1)
    target = write_synthetic_rtdc(tmp_path / "other.rtdc", 30, shape=(4, 6), seed=2)
    return source, target


def missing_input(tmp_path):
    return tmp_path / "missing.rtdc", tmp_path / "out.rtdc"


def input_into_a_folder(tmp_path):
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 40, shape=(4, 6), seed=1)
    (tmp_path / "folder").mkdir()
    return source, tmp_path / "folder"


def input_without_images(tmp_path):
    source = tmp_path / "features.rtdc"
    with h5py.File(source, "w") as h5:
        h5["events/deform"] = [0.1, 0.2]
    return source, tmp_path / "out.rtdc"


@pytest.mark.parametrize("case", [damaged_input_into_a_missing_folder,
                                  short_input_onto_an_output_of_other_events,
                                  input_onto_an_output_of_other_events, missing_input,
                                  input_into_a_folder, input_without_images])
def test_the_dry_run_finds_the_problem_the_run_finds_first(tmp_path, case):
    source, target = case(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(Exception) as dry:
        check_input(source, SETTINGS, target)
    with pytest.raises(Exception) as run:
        with dcbg.BackgroundRollMed(source, target, kernel_size=10, device="cpu"):
            pass
    assert (type(dry.value), str(dry.value)) == (type(run.value), str(run.value))
    assert sorted(tmp_path.rglob("*")) == before, "the checks wrote nothing"


def test_a_run_keeps_what_the_check_opened_and_the_dry_run_closes_it(tmp_path):
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 40, shape=(4, 6), seed=1)
    assert check_input(source, SETTINGS, source) == 40  # in place: nothing is written
    with h5py.File(source, "a"):  # the dry run left the file closed
        pass
    kwargs = {"kernel_size": 10, "batch_size": 10000}
    with dcbg.BackgroundRollMed.preflight(source, tmp_path / "out.rtdc", kwargs) as found:
        assert (found.event_count, found.target.kind) == (40, "new")
        assert found.rtdc_input.h5.id.valid
    assert not found.rtdc_input.h5.id.valid
    with dcbg.BackgroundRollMed(source, tmp_path / "out.rtdc", kernel_size=10,
                                device="cpu") as bg:
        assert bg.hdin.h5.id.valid and bg.image_count == 40 and bg.target.kind == "new"
        assert bg.source.chunked is not None, "the run's check reads with its codec threads"
    assert not (tmp_path / "out.rtdc").exists()


def input_of_uint16_frames(tmp_path):
    """Files hold uint8 frames (RT-DC's); 16-bit frames are for the array functions"""
    source = tmp_path / "uint16.rtdc"
    with h5py.File(source, "w") as h5:
        h5["events/image"] = np.zeros((40, 4, 6), np.uint16)
    return source, tmp_path / "out.rtdc"


def test_the_dry_run_refuses_frames_a_file_run_does_not_take(tmp_path):
    source, target = input_of_uint16_frames(tmp_path)
    with pytest.raises(InputDataError, match="is uint16 .* dcbg needs uint8 frames") as dry:
        check_input(source, SETTINGS, target)
    with pytest.raises(InputDataError) as run:
        dcbg.BackgroundRollMed(source, target, kernel_size=10, device="cpu")
    assert str(dry.value) == str(run.value)
    with pytest.raises(InputDataError,
                       match=r"stack is uint16 with shape \(40, 4, 6\), but dcbg needs uint8"):
        dcbg.BackgroundRollMed.preflight(np.zeros((40, 4, 6), np.uint16), target,
                                         {"kernel_size": 10, "batch_size": 10000})
    with pytest.raises(InputDataError, match=r"stack is uint8 with shape \(40,\), but dcbg "
                                             r"needs uint8 frames of shape \(N, pixels…\)"):
        dcbg.BackgroundRollMed.preflight(np.zeros(40, np.uint8), target,
                                         {"kernel_size": 10, "batch_size": 10000})
    assert not target.exists()


def test_the_dry_run_refuses_an_existing_output_the_run_may_not_write(tmp_path, monkeypatch):
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 40, shape=(4, 6), seed=1)
    target = write_synthetic_rtdc(tmp_path / "old.rtdc", 40, shape=(4, 6), seed=2)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
        pathlib.Path(path) != target and access(path, mode, **kwargs)))
    before = target.read_bytes()
    with pytest.raises(InputFileError) as dry:
        check_input(source, SETTINGS, target)
    with pytest.raises(InputFileError) as run:
        dcbg.BackgroundRollMed(source, target, kernel_size=10, device="cpu")
    assert str(dry.value) == str(run.value) and str(target) in str(dry.value)
    assert target.read_bytes() == before


def test_the_dry_run_refuses_a_codec_thread_setting_the_run_refuses(tmp_path, monkeypatch,
                                                                   capsys):
    from dcbg.cli import main
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 40, shape=(4, 6), seed=1)
    monkeypatch.setenv("DCBG_IO_THREADS", "abc")
    arguments = ["compute", str(source), "--device", "cpu", "-kb", "kernel_size=10"]
    assert main([*arguments, "--dry-run"]) == 1
    dry = capsys.readouterr().err
    assert main(arguments) == 1
    assert dry == capsys.readouterr().err != ""
    assert "DCBG_IO_THREADS" in dry
    assert not (tmp_path / "rec_bg.rtdc").exists()
