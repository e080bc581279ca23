"""Safe outputs: interrupted runs, full disks, locks, in-place swaps and dcnum's bg_off rule"""
import errno
import os
import shutil
import socket
import subprocess
import sys

import dclab
import h5py
import numpy as np
import pytest

import dcbg
from dcbg import errors
from dcbg.cli import main
from dcbg.reference import rolling_median_reference
from dcbg.rtdc import output
from dcbg.rtdc.writer import ImageBgWriter
from dcbg.synthetic import write_synthetic_rtdc
from helpers.files import (
    assert_background_added,
    assert_only_run_logs_added,
    dataset_digests,
    existing_output,
    file_size_after_reruns,
    folder_state,
    hidden_files,
)
from helpers.processes import start_slow_run


@pytest.fixture
def recording(tmp_path):
    """200 frames in chunks of 20; image_bg chunks hold 81 frames of this size"""
    return write_synthetic_rtdc(tmp_path / "rec.rtdc", 200, shape=(80, 160), seed=3,
                                events_per_chunk=20)


class Interrupt(Exception):
    pass


def fail_chunk_writes_after(monkeypatch, successful: int, error: BaseException):
    """Make the writer's disk writes fail once `successful` chunks were stored"""
    write_direct = ImageBgWriter._write_direct
    calls = []

    def failing(self, offset, stored):
        calls.append(offset)
        if len(calls) > successful:
            raise error
        write_direct(self, offset, stored)
    monkeypatch.setattr(ImageBgWriter, "_write_direct", failing)


def run_interrupted(source, target, monkeypatch, **kwargs):
    """Run a background whose writer fails after its first chunk"""
    fail_chunk_writes_after(monkeypatch, 1, Interrupt("simulated crash"))
    with pytest.raises(Interrupt):
        with dcbg.BackgroundRollMed(source, target, device="cpu", **kwargs) as bg:
            bg.process()
    monkeypatch.undo()


def test_interrupted_in_place_run_keeps_old_background(recording, monkeypatch):
    with dcbg.BackgroundRollMed(recording, recording, kernel_size=4, batch_size=40,
                                device="cpu") as bg:
        bg.process()
    before = dataset_digests(recording)
    run_interrupted(recording, recording, monkeypatch, kernel_size=8, batch_size=20)
    assert dataset_digests(recording) == before


def test_interrupted_new_output_leaves_nothing(recording, tmp_path, monkeypatch):
    run_interrupted(recording, tmp_path / "out.rtdc", monkeypatch, kernel_size=4,
                    batch_size=20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.rtdc"]


def test_an_existing_output_that_is_no_hdf5_file_is_kept(recording, tmp_path, capsys):
    out = tmp_path / "out.rtdc"
    out.write_bytes(b"previous result")
    with pytest.raises(errors.OutputError, match="exists and is not an HDF5 file"):
        dcbg.BackgroundRollMed(recording, out, kernel_size=4, device="cpu")
    assert main(["compute", str(recording), str(out), "--force", "--device", "cpu"]) == 1
    assert "is not an HDF5 file" in capsys.readouterr().err
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.rtdc", "rec.rtdc"]


DISK_FULL = OSError("Can't write data (file write failed: time = Sun Nov 22, errno = "
                    f"{errno.ENOSPC}, error message = 'No space left on device')")


def test_disk_full_new_output(recording, tmp_path, monkeypatch, capsys):
    out = tmp_path / "rec_bg.rtdc"
    before = folder_state(tmp_path)
    fail_chunk_writes_after(monkeypatch, 2, DISK_FULL)
    with pytest.raises(errors.OutputWriteError, match="disk is full while writing .*rec_bg"):
        with dcbg.BackgroundRollMed(recording, out, kernel_size=10, batch_size=20,
                                    num_cpus=1, device="cpu") as bg:
            bg.process()
    assert folder_state(tmp_path) == before
    assert main(["compute", str(recording), "-kb", "kernel_size=10", "-kb",
                 "batch_size=20", "--num-cpus", "1", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: The disk is full") and len(err.splitlines()) == 1
    assert folder_state(tmp_path) == before


def test_disk_full_in_place_keeps_everything(recording, monkeypatch):
    with dcbg.BackgroundRollMed(recording, recording, kernel_size=4, batch_size=30,
                                num_cpus=1, device="cpu") as bg:
        bg.process()
    before = dataset_digests(recording)
    fail_chunk_writes_after(monkeypatch, 1, DISK_FULL)
    with pytest.raises(errors.OutputWriteError, match="disk is full"):
        with dcbg.BackgroundRollMed(recording, recording, kernel_size=10, batch_size=20,
                                    num_cpus=1, device="cpu") as bg:
            bg.process()
    monkeypatch.undo()
    assert dataset_digests(recording) == before


def add_bg_off(path, group="events"):
    with h5py.File(path, "a") as h5:
        h5.require_group(group).create_dataset("bg_off", data=np.linspace(0, 1, 200))
        if group != "events":
            h5[group].create_dataset("image_bg", data=np.zeros((200, 80, 160), np.uint8))


@pytest.mark.parametrize("group", ["events", "basin_events"])
def test_completed_in_place_run_removes_stale_bg_off(recording, group):
    add_bg_off(recording, group)
    with dcbg.BackgroundRollMed(recording, recording, kernel_size=4, device="cpu") as bg:
        bg.process()
    with h5py.File(recording) as h5:
        assert "bg_off" not in h5[group]
        assert group == "events" or "image_bg" not in h5[group]
        assert "image_bg" in h5["events"] and "image" in h5["events"]


def test_interrupted_in_place_run_keeps_bg_off(recording, monkeypatch):
    add_bg_off(recording)
    before = dataset_digests(recording)
    run_interrupted(recording, recording, monkeypatch, kernel_size=8, batch_size=20)
    assert dataset_digests(recording) == before
    with h5py.File(recording) as h5:
        assert "bg_off" in h5["events"]


def test_bg_off_of_an_instrument_file_is_removed_as_dcnum_does(shared_data, tmp_path):
    path = tmp_path / "thresh.rtdc"
    shutil.copy(shared_data / "rtdc" / "dcnum_thresh_example.rtdc", path)
    path.chmod(0o644)
    with dcbg.BackgroundRollMed(path, path, kernel_size=6, batch_size=100,
                                device="cpu") as bg:
        bg.process()
    with dclab.new_dataset(path) as ds:
        assert "bg_off" not in ds.features_innate
        assert np.array_equal(ds["image_bg"][:], rolling_median_reference(ds["image"][:], 6))


def test_two_runs_on_one_output(tmp_path, capsys):
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 600, shape=(16, 24), seed=8)
    out = tmp_path / "out.rtdc"
    first, _ = start_slow_run(tmp_path, "api", rec, out)
    code = main(["compute", str(rec), str(out), "--force", "-kb", "kernel_size=10",
                 "--device", "cpu", "--num-cpus", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Another dcbg run (process" in err and "is writing" in err, err
    assert first.wait(timeout=60) == 0, first.communicate()
    with h5py.File(rec) as h5:
        expected = rolling_median_reference(h5["events/image"][:], 10)
    with dclab.new_dataset(out) as ds:
        assert np.array_equal(ds["image_bg"][:], expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.rtdc", "rec.rtdc"]


def test_in_place_run_on_a_file_open_elsewhere(tmp_path):
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 60, shape=(6, 8))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'a'); "
         "print('open', flush=True); time.sleep(60)", str(rec)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(errors.OutputBusyError, match="open for writing in another"):
            dcbg.BackgroundRollMed(rec, rec, kernel_size=4, device="cpu")
    finally:
        holder.kill()
        holder.wait()
    # The killed holder left HDF5's "open for write" mark in the superblock.
    with pytest.raises(errors.OutputBusyError, match="crashed.*h5clear -s"):
        dcbg.BackgroundRollMed(rec, tmp_path / "out.rtdc", kernel_size=4, device="cpu")
    assert [p.name for p in tmp_path.iterdir()] == ["rec.rtdc"]


def test_stale_lock_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 60, shape=(6, 8))
    out = tmp_path / "out.rtdc"
    (tmp_path / ".out.rtdc.dcbg-lock").write_text(f"{dead.pid} {socket.gethostname()}")
    (tmp_path / ".out.rtdc.abc123.dcbg-partial").write_bytes(b"half a file")
    with dcbg.BackgroundRollMed(rec, out, kernel_size=4, num_cpus=1, device="cpu") as bg:
        bg.process()
    assert "stale lock" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.rtdc", "rec.rtdc"]


def test_lock_of_a_live_process_is_respected(tmp_path):
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 60, shape=(6, 8))
    lock = tmp_path / ".out.rtdc.dcbg-lock"
    lock.write_text(f"{os.getppid()} {socket.gethostname()}")
    with pytest.raises(errors.OutputBusyError, match=f"process {os.getppid()}"):
        with dcbg.BackgroundRollMed(rec, tmp_path / "out.rtdc", kernel_size=4,
                                    num_cpus=1, device="cpu") as bg:
            bg.process()
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock.name, "rec.rtdc"]


def test_output_path_that_is_a_folder(recording, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    before = folder_state(tmp_path)
    with pytest.raises(errors.OutputError, match="is a folder; give a file name inside it"):
        dcbg.BackgroundRollMed(recording, folder, kernel_size=4, device="cpu")
    for extra in ([], ["--force"]):
        assert main(["compute", str(recording), str(folder), *extra, "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert "is a folder; give a file name inside it" in err and "Errno" not in err, err
    assert folder_state(tmp_path) == before


def test_output_folder_without_write_permission(recording, tmp_path, monkeypatch, capsys):
    """EACCES when the lock file is created (as for a folder you may not write to)"""
    real_open = os.open

    def denied(path, flags, *args, **kwargs):
        if str(path).endswith(".dcbg-lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", denied)
    assert main(["compute", str(recording), str(tmp_path / "out.rtdc"), "--device",
                 "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"You have no permission to write files in {tmp_path}" in err, err
    assert "[Errno 13]" not in err


def test_in_place_on_a_read_only_file(recording, monkeypatch, capsys):
    """h5py's PermissionError for a file opened to write is named, not called damage"""
    real_file = h5py.File

    def read_only(path, mode="r", *args, **kwargs):
        if mode != "r" and str(path) == str(recording):
            raise PermissionError(errno.EACCES, "Unable to synchronously open file (unable "
                                  "to open file: name = ..., errno = 13, error message = "
                                  "'Permission denied')")
        return real_file(path, mode, *args, **kwargs)
    monkeypatch.setattr(h5py, "File", read_only)
    assert main(["compute", str(recording), "--in-place", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "no permission to write it" in err and "damaged" not in err, err


def compute_bg(source, target, kernel_size=4, batch_size=20, **kwargs):
    with dcbg.BackgroundRollMed(source, target, kernel_size=kernel_size, batch_size=batch_size,
                                num_cpus=1, device="cpu", **kwargs) as bg:
        bg.process()


def basin_output(recording, tmp_path):
    """rec_bg.rtdc: a dcbg output whose frames come from rec.rtdc through its basin"""
    out = tmp_path / "rec_bg.rtdc"
    compute_bg(recording, out)
    return out


def test_the_file_an_input_reads_through_its_basin_is_never_an_output(recording, tmp_path,
                                                                     capsys):
    via_basin = basin_output(recording, tmp_path)
    os.link(recording, tmp_path / "hard.rtdc")
    os.symlink(recording, tmp_path / "soft.rtdc")
    before = folder_state(tmp_path)
    for target in (recording, tmp_path / "hard.rtdc", tmp_path / "soft.rtdc"):
        with pytest.raises(errors.OutputError, match="reads its data from through its basins"):
            dcbg.BackgroundRollMed(via_basin, target, kernel_size=4, device="cpu")
        assert main(["compute", str(via_basin), str(target), "--force", "--device",
                     "cpu"]) == 1
        err = capsys.readouterr().err
        assert "would destroy that data; choose another output path" in err
        assert len(err.splitlines()) == 1
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("how", ["api", "cli"])
def test_an_existing_output_keeps_everything_but_its_background(recording, tmp_path, how):
    out = existing_output(tmp_path / "analysis.rtdc")
    before = dataset_digests(out)
    if how == "api":
        compute_bg(recording, out)
    else:
        assert main(["compute", str(recording), str(out), "--force", "-kb", "kernel_size=4",
                     "-kb", "batch_size=20", "--device", "cpu", "--num-cpus", "1"]) == 0
    assert_background_added(recording, out, before)


def test_an_interrupted_run_leaves_an_existing_output_as_it_was(recording, tmp_path,
                                                                monkeypatch):
    out = existing_output(tmp_path / "analysis.rtdc")
    before = dataset_digests(out)
    run_interrupted(recording, out, monkeypatch, kernel_size=4, batch_size=20)
    assert dataset_digests(out) == before
    fail_chunk_writes_after(monkeypatch, 1, DISK_FULL)
    with pytest.raises(errors.OutputWriteError, match="disk is full"):
        compute_bg(recording, out)
    monkeypatch.undo()
    assert dataset_digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis.rtdc", "rec.rtdc"]


def test_an_existing_output_of_other_events_is_refused(recording, tmp_path, capsys):
    out = existing_output(tmp_path / "analysis.rtdc", events=150)
    before = dataset_digests(out)
    with pytest.raises(errors.OutputError, match="exists with 150 events .* input has 200"):
        compute_bg(recording, out)
    assert dataset_digests(out) == before


def test_a_file_size_limit_is_a_clean_error(tmp_path):
    """EFBIG from HDF5 (a disk or account limit) is one sentence, and leaves nothing"""
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 300, shape=(80, 160), compression="none")
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20));"
              "from dcbg.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", script, "compute", str(rec), "-c", "none",
                           "-kb", "kernel_size=4", "--device", "cpu", "--num-cpus", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: Writing") and len(done.stderr.splitlines()) == 1
    assert "outgrew the largest file" in done.stderr and "ref count" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.rtdc"]


def test_hidden_names_fit_wherever_the_output_name_fits(tmp_path):
    stem = "M" * (255 - len("_bg.rtdc") - len(".rtdc") + len(".rtdc"))
    source = write_synthetic_rtdc(tmp_path / f"{stem[:-8]}.rtdc", 40, shape=(6, 8))
    out = tmp_path / f"{stem[:-8]}_bg.rtdc"
    assert len(out.name) <= 255
    assert main(["compute", str(source), "-kb", "kernel_size=4", "--device", "cpu"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([source.name, out.name])
    from dcbg.rtdc.output import OutputLock
    locks = [OutputLock(tmp_path / (stem + "a.rtdc")), OutputLock(tmp_path / (stem + "b.rtdc"))]
    assert locks[0].lock_path != locks[1].lock_path  # long names that share a start
    assert all(len(lock.lock_path.name) <= 255 for lock in locks)
    for lock in locks:
        lock.release()
    too_long = tmp_path / ("x" * 256 + ".rtdc")
    with pytest.raises(errors.OutputError, match="longer than the 255 bytes"):
        compute_bg(source, too_long)


RERUN_ARGS = ["-kb", "kernel_size=4", "-kb", "batch_size=20", "--device", "cpu",
              "--num-cpus", "1"]


@pytest.mark.parametrize("how", ["cli-force", "cli-in-place", "api"])
def test_reruns_do_not_grow_the_file(tmp_path, how):
    """A replaced image_bg leaves no dead space: HDF5 puts the new one where the old one was"""
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 300, shape=(80, 160), seed=12)
    out = rec if how == "cli-in-place" else tmp_path / "rec_bg.rtdc"

    def run():
        if how == "api":
            compute_bg(rec, out)
        else:
            where = ["--in-place"] if how == "cli-in-place" else [str(out), "--force"]
            assert main(["compute", str(rec), *where, *RERUN_ARGS]) == 0

    fresh, before, sizes = file_size_after_reruns(run, out)
    assert max(sizes) <= 1.01 * fresh, (fresh, sizes)
    assert_only_run_logs_added(before, dataset_digests(out), runs=3)
    with h5py.File(out) as h5, h5py.File(rec) as h5in:
        assert np.array_equal(h5["events/image_bg"][:],
                              rolling_median_reference(h5in["events/image"][:], 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"rec.rtdc", out.name})


RERUN_SETTINGS = {  # the settings of a run, then of its re-run
    "k=40 after k=4": (("kernel_size=4", "zstd-5"), ("kernel_size=40", "zstd-5")),
    "k=4 after k=40": (("kernel_size=40", "zstd-5"), ("kernel_size=4", "zstd-5")),
    "zstd-5 after none": (("kernel_size=4", "none"), ("kernel_size=4", "zstd-5")),
    "none after zstd-5": (("kernel_size=4", "zstd-5"), ("kernel_size=4", "none")),
}


@pytest.mark.parametrize("how", ["cli-force", "cli-in-place", "api"])
@pytest.mark.parametrize("change", RERUN_SETTINGS)
def test_reruns_with_other_settings_leave_the_size_of_a_fresh_run(tmp_path, how, change):
    """A background of another stored size cannot take the old one's place: the file is rebuilt
    and keeps everything else"""
    fresh_folder, rerun_folder = tmp_path / "fresh", tmp_path / "rerun"
    for folder in (fresh_folder, rerun_folder):
        folder.mkdir()
        write_synthetic_rtdc(folder / "rec.rtdc", 300, shape=(80, 160), seed=12)

    def run(folder, kernel_size, compression):
        rec = folder / "rec.rtdc"
        out = rec if how == "cli-in-place" else folder / "rec_bg.rtdc"
        if how == "api":
            compute_bg(rec, out, kernel_size=int(kernel_size.split("=")[1]),
                       compress=compression, batch_size=100)
        else:
            where = ["--in-place"] if how == "cli-in-place" else [str(out), "--force"]
            assert main(["compute", str(rec), *where, "-kb", kernel_size, "-c", compression,
                         "--device", "cpu", "--num-cpus", "1"]) == 0
        return out

    first, second = RERUN_SETTINGS[change]
    fresh = run(fresh_folder, *second)
    out = run(rerun_folder, *first)
    before = dataset_digests(out)
    run(rerun_folder, *second)
    assert out.stat().st_size <= 1.01 * fresh.stat().st_size
    after = dataset_digests(out)
    assert after["events/image_bg"] == dataset_digests(fresh)["events/image_bg"]
    for digests in (before, after):
        del digests["events/image_bg"], digests["events/image_bg@attrs"]
    assert_only_run_logs_added(before, after, runs=1)
    assert sorted(p.name for p in rerun_folder.iterdir()) == sorted({"rec.rtdc", out.name})


def test_a_rebuilt_file_keeps_its_links_attributes_and_shared_objects(recording, tmp_path):
    """The copy of the rest of a file keeps what HDF5 stores beside datasets"""
    out = existing_output(tmp_path / "analysis.rtdc")  # its old image_bg is not chunked
    (tmp_path / "other.h5").write_bytes(b"")
    with h5py.File(out, "a") as h5:
        h5.attrs["empty"] = h5py.Empty("f8")
        h5.attrs.create("fixed", np.bytes_(b"abc"), dtype="S7")
        h5["events"].attrs["unit"] = "none"
        h5["events/deform_again"] = h5["events/deform"]  # one dataset, two names
        h5["tables/shared"] = h5["events/userdef1"]
        h5["events/soft"] = h5py.SoftLink("/events/deform")
        h5["external"] = h5py.ExternalLink("other.h5", "/data")
        h5["basin_events/bg_off"] = np.zeros(200)
        h5.create_group("meta/nested").attrs["depth"] = 2
    before = dataset_digests(out)
    compute_bg(recording, out)
    with h5py.File(out) as h5:
        assert h5.attrs["empty"] == h5py.Empty("f8")
        assert h5.attrs.get_id("fixed").dtype == np.dtype("S7")
        assert h5["events/deform_again"].id == h5["events/deform"].id
        assert h5["tables/shared"].id == h5["events/userdef1"].id
        assert h5.get("events/soft", getlink=True).path == "/events/deform"
        external = h5.get("external", getlink=True)
        assert (external.filename, external.path) == ("other.h5", "/data")
        assert "basin_events" in h5 and "bg_off" not in h5["basin_events"]
        assert h5["meta/nested"].attrs["depth"] == 2
    after = dataset_digests(out)
    for name in ("events/deform", "events/userdef1", "tables/notes", "events@attrs",
                 "meta/nested@attrs", "@root"):
        assert after[name] == before[name], name
    assert not hidden_files(tmp_path)


def test_a_rebuilt_file_keeps_hard_links_that_lead_back_to_a_group_above(recording, tmp_path):
    """A group may be reached from inside itself; the copy links it again instead of walking on"""
    out = existing_output(tmp_path / "analysis.rtdc")
    with h5py.File(out, "a") as h5:
        h5["meta/up"] = h5.create_group("meta")
        h5["meta/top"] = h5["/"]
    compute_bg(recording, out)
    with h5py.File(out) as h5:
        assert h5["meta/up"].id == h5["meta"].id and h5["meta/top"].id == h5["/"].id
        assert h5["events/image_bg"].attrs["dcnum ppid background"] == "rollmed:k=4^b=20"


def test_a_file_with_references_is_not_rebuilt(recording, tmp_path):
    """References are addresses in their file: a copy into another file would break them"""
    out = existing_output(tmp_path / "analysis.rtdc")
    with h5py.File(out, "a") as h5:
        h5["tables/features"] = np.array([h5["events/deform"].ref, h5["events/userdef1"].ref],
                                         dtype=h5py.ref_dtype)
        h5["tables/notes"].attrs["about"] = h5["events/deform"].ref
        h5["events/deform"].dims[0].attach_scale(h5["events/userdef1"])  # refs in attributes
    compute_bg(recording, out)
    with h5py.File(out) as h5:
        assert [h5[ref].name for ref in h5["tables/features"][:]] == ["/events/deform",
                                                                       "/events/userdef1"]
        assert h5[h5["tables/notes"].attrs["about"]].name == "/events/deform"
        assert [scale.name for scale in h5["events/deform"].dims[0].values()] == [
            "/events/userdef1"]
        assert h5["events/image_bg"].attrs["dcnum ppid background"] == "rollmed:k=4^b=20"


def test_a_file_with_attributes_beyond_the_default_format_is_not_rebuilt(recording, tmp_path):
    """A file written in a newer format can hold attributes that a copy could not store"""
    out = tmp_path / "analysis.rtdc"
    with h5py.File(out, "w", libver="latest") as h5:
        h5.attrs["long note"] = np.arange(20_000, dtype=float)  # 160 kB
        h5["events/deform"] = np.linspace(0, 0.1, 200)
        h5["events/image_bg"] = np.zeros((200, 80, 160), np.uint8)
    compute_bg(recording, out)
    with h5py.File(out) as h5:
        assert np.array_equal(h5.attrs["long note"], np.arange(20_000, dtype=float))
        assert h5["events/image_bg"].attrs["dcnum ppid background"] == "rollmed:k=4^b=20"
    assert not hidden_files(tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="only root can give a file another user")
def test_a_rebuilt_file_keeps_its_owner_and_group(recording, tmp_path):
    """A run by an administrator leaves a user's file that user's"""
    out = existing_output(tmp_path / "analysis.rtdc")
    os.chown(out, 4321, 8765)
    compute_bg(recording, out)
    assert (out.stat().st_uid, out.stat().st_gid) == (4321, 8765)
    with h5py.File(out) as h5:
        assert h5["events/image_bg"].attrs["dcnum ppid background"] == "rollmed:k=4^b=20"


def test_a_file_whose_owner_this_user_cannot_keep_is_not_rebuilt(recording, tmp_path,
                                                                monkeypatch):
    """Another user's file that this user's group may write stays that user's"""
    out = existing_output(tmp_path / "analysis.rtdc")
    stored_size = out.stat().st_size
    monkeypatch.setattr(os, "geteuid", lambda: out.stat().st_uid + 1, raising=False)
    compute_bg(recording, out)
    with h5py.File(out) as h5, h5py.File(recording) as h5in:
        assert np.array_equal(h5["events/image_bg"][:],
                              rolling_median_reference(h5in["events/image"][:], 4))
    assert out.stat().st_size >= stored_size  # the old background's space stays


def test_a_file_with_other_names_is_not_rebuilt(recording, tmp_path):
    """Replacing a file that a symbolic or a second hard link reaches would part it from them"""
    out = existing_output(tmp_path / "analysis.rtdc")
    os.link(out, tmp_path / "second_name.rtdc")
    link = tmp_path / "link.rtdc"
    link.symlink_to(out.name)
    compute_bg(recording, link)
    compute_bg(recording, out, kernel_size=8)
    assert link.is_symlink() and os.path.samefile(out, tmp_path / "second_name.rtdc")
    with h5py.File(tmp_path / "second_name.rtdc") as h5, h5py.File(recording) as h5in:
        assert np.array_equal(h5["events/image_bg"][:],
                              rolling_median_reference(h5in["events/image"][:], 8))


def fail_copies_into(monkeypatch, path, error, times=1, after_copying=True):
    """Make h5py's copies into the file `path` fail (the first `times` of them)

    With `after_copying`, the copy is made first, so that its data have
    overwritten whatever HDF5 had freed in the file.
    """
    copy = h5py.Group.copy
    failed = []

    def failing(self, source, dest, name=None, **kwargs):
        into = dest if isinstance(dest, h5py.Group) else self
        if into.file.filename == str(path) and len(failed) < times:
            failed.append(name)
            if after_copying:
                copy(self, source, dest, name=name, **kwargs)
            raise error
        return copy(self, source, dest, name=name, **kwargs)
    monkeypatch.setattr(h5py.Group, "copy", failing)
    return failed


def prepared_target(recording, tmp_path, where, compress=True, background=True):
    """An output (or the input) that holds a bg_off and (with `background`) an image_bg"""
    out = recording if where == "in-place" else existing_output(tmp_path / "analysis.rtdc")
    compute_bg(recording, out, compress=compress)
    with h5py.File(out, "a") as h5:
        h5["events/bg_off"] = np.linspace(0, 1, 200)
        if not background:
            del h5["events/image_bg"]
    return out, dataset_digests(out)


def fail_after_writing_over(monkeypatch, error):
    """Make the writing of the new chunks over the old image_bg fail once all are written"""
    write_chunks_over = output.write_chunks_over
    calls = []

    def failing(old, new):
        calls.append(old.name)
        write_chunks_over(old, new)  # the old background's bytes are overwritten now
        raise error
    monkeypatch.setattr(output, "write_chunks_over", failing)
    return calls


def fail_after_rebuilding(monkeypatch, error):
    """Make the copy of the rest of the file beside the new background fail once it is made"""
    copy_all_but_background = output.copy_all_but_background
    calls = []

    def failing(source, destination):
        calls.append(source.filename)
        copy_all_but_background(source, destination)
        raise error
    monkeypatch.setattr(output, "copy_all_but_background", failing)
    return calls


def fail_run_log(monkeypatch, error):
    """Make the writing of the run's log fail once it is written"""
    failed = []
    write_run_log = dcbg.runlog.write_run_log

    def failing_log(h5, record):
        failed.append(write_run_log(h5, record))
        raise error
    monkeypatch.setattr(dcbg.runlog, "write_run_log", failing_log)
    return failed


@pytest.mark.parametrize("where", ["existing", "in-place"])
@pytest.mark.parametrize("step", ["write-over", "copy", "log-after-write-over", "rebuild",
                                  "log-after-rebuild"])
def test_a_failed_swap_puts_the_previous_background_back(recording, tmp_path, monkeypatch,
                                                         where, step):
    """Every way of storing the new background fails: its chunks written over the old ones
    (chunks of the same sizes, as uncompressed ones are), the dataset added to a file that
    has none, or the file rebuilt around a new background of another size"""
    compress = step not in ("write-over", "log-after-write-over")
    out, before = prepared_target(recording, tmp_path, where, compress=compress,
                                  background=step != "copy")
    if step == "write-over":
        failed = fail_after_writing_over(monkeypatch, DISK_FULL)
    elif step == "copy":
        failed = fail_copies_into(monkeypatch, out, DISK_FULL)
    elif step == "rebuild":
        failed = fail_after_rebuilding(monkeypatch, DISK_FULL)
    else:
        failed = fail_run_log(monkeypatch, DISK_FULL)
    with dcbg.BackgroundRollMed(recording, out, kernel_size=8, batch_size=20, num_cpus=1,
                                compress=compress, device="cpu") as bg:
        with pytest.raises(errors.OutputWriteError,
                           match="disk is full.*keeps its previous image_bg"):
            bg.process()
        monkeypatch.undo()
        assert len(failed) == 1, "the failure came where it was injected"
        assert dataset_digests(out) == before
        assert not hidden_files(tmp_path)
        bg.process()  # the same instance runs again (in place: its input was reopened)
    with h5py.File(out) as h5, h5py.File(recording) as h5in:
        assert h5["events/image_bg"].attrs["dcnum ppid background"] == "rollmed:k=8^b=20"
        assert np.array_equal(h5["events/image_bg"][:],
                              rolling_median_reference(h5in["events/image"][:], 8))
        assert "bg_off" not in h5["events"]


def test_a_swap_that_cannot_be_undone_keeps_the_previous_background_aside(
        recording, tmp_path, monkeypatch):
    out, before = prepared_target(recording, tmp_path, "existing", compress=False)
    fail_after_writing_over(monkeypatch, DISK_FULL)
    fail_copies_into(monkeypatch, out, DISK_FULL, times=10, after_copying=False)
    with pytest.raises(errors.OutputWriteError, match="could not be put back; it is kept in"
                       ) as raised:
        compute_bg(recording, out, kernel_size=8, compress=False)
    monkeypatch.undo()
    kept, = [p for p in tmp_path.iterdir() if p.name.endswith(".dcbg-partial")]
    assert str(kept) in str(raised.value)
    with h5py.File(kept) as aside:
        assert sorted(aside["previous_background/events"]) == ["bg_off", "image_bg"]
    assert dataset_digests(kept)["previous_background/events/image_bg"] == \
        before["events/image_bg"]
    assert hidden_files(tmp_path) == [kept.name], "the lock is released"


def test_the_leftover_of_an_earlier_in_place_run_is_removed(recording, tmp_path):
    """Earlier dcbg builds made an in-place background in a group that a kill left behind"""
    compute_bg(recording, recording)
    with h5py.File(recording, "a") as h5:
        h5.create_dataset("dcbg_partial/image_bg", data=np.ones((200, 80, 160), np.uint8))
    before = {name: digest for name, digest in dataset_digests(recording).items()
              if not name.startswith("dcbg_partial")}
    compute_bg(recording, recording)
    after = dataset_digests(recording)
    assert "dcbg_partial" not in after
    assert_only_run_logs_added(before, after, runs=1)


@pytest.mark.parametrize("where", ["existing", "in-place"])
def test_a_file_that_may_not_be_written_is_refused_before_computing(recording, tmp_path,
                                                                    monkeypatch, where):
    out = recording if where == "in-place" else existing_output(tmp_path / "analysis.rtdc")
    before = folder_state(tmp_path)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        False if str(path) == str(out) and mode == os.W_OK else access(path, mode, **kw)))
    with pytest.raises(errors.InputFileError, match="no permission to write it"):
        dcbg.BackgroundRollMed(recording, out, kernel_size=4, device="cpu")
    assert folder_state(tmp_path) == before



@pytest.mark.parametrize("fail", [False, True])
def test_an_image_bg_that_is_a_link_is_replaced_or_put_back_as_the_link(
        recording, tmp_path, monkeypatch, fail):
    """Only the link is replaced: the dataset it leads to stays, and so does a dangling bg_off"""
    out = existing_output(tmp_path / "analysis.rtdc")
    with h5py.File(out, "a") as h5:
        h5.move("events/image_bg", "kept/background")
        h5["events/image_bg"] = h5py.SoftLink("/kept/background")
        del h5["events/bg_off"]
        h5["events/bg_off"] = h5py.SoftLink("/nowhere")
    before = dataset_digests(out)
    if fail:
        fail_copies_into(monkeypatch, out, DISK_FULL)
        with pytest.raises(errors.OutputWriteError, match="keeps its previous image_bg"):
            compute_bg(recording, out)
        monkeypatch.undo()
    else:
        compute_bg(recording, out)
    after = dataset_digests(out)
    assert after["kept/background"] == before["kept/background"]
    with h5py.File(out) as h5:
        image_bg = h5["events"].get("image_bg", getlink=True)
        bg_off = h5["events"].get("bg_off", getlink=True)
        assert isinstance(image_bg, h5py.SoftLink if fail else h5py.HardLink)
        assert isinstance(bg_off, h5py.SoftLink) if fail else bg_off is None
    assert not hidden_files(tmp_path)
