"""Bad input, interruptions and faults: a clear error, nothing lost, nothing left behind"""
import errno
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import dclab
import h5py
import numpy as np
import pytest

import dcbg
from conftest import dataset_digests
from dcbg import errors
from dcbg.cli import main
from dcbg.reference import rolling_median_reference
from dcbg.rtdc import RTDCInput, copy_metadata, write_file_basin
from dcbg.synthetic import synthetic_stack, write_synthetic_rtdc

TESTS = pathlib.Path(__file__).parent
SLOW_RUN = TESTS / "slow_run.py"


def folder_state(folder: pathlib.Path) -> dict:
    """Name and content digest of every file below a folder"""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_images(path, images, **attrs):
    with h5py.File(path, "w") as h5:
        h5.attrs.update(attrs)
        h5.create_dataset("events/image", data=images)
    return path


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
    with RTDCInput(source) as rtdc_in:
        with h5py.File(path, "w") as h5:
            copy_metadata(rtdc_in.h5, h5)
            write_file_basin(h5, rtdc_in, path)
    source.unlink()
    return path, errors.NoImageDataError, "basin file .*raw.rtdc does not exist"


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
              bad_too_few_events]


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
    import re
    assert re.search(message, err), err
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("argv,code,message", [
    (["-kb", "kernel_size=3"], 1, "positive even integer"),
    (["-kb", "kernel_size=0"], 1, "positive even integer"),
    (["-kb", "kernel_size=-2"], 1, "positive even integer"),
    (["-kb", "kernel_size=2.5"], 1, "not a valid int"),
    (["-kb", "kernel_size=ten"], 1, "not a valid int"),
    (["-kb", "kernel_size=10", "-kb", "batch_size=10"], 1, "larger than kernel_size"),
    (["-kb", "window=10"], 1, "Unknown PPID keyword 'window'"),
    (["--ppid", "rollmed:k100"], 1, "not of the form key=value"),
    (["--ppid", "k=100"], 1, "has no method code"),
    (["--ppid", "sparsemed:k=100"], 1, "Unknown background method 'sparsemed'"),
    (["-b", "sparsemed"], 2, "unknown method 'sparsemed'"),
    (["-c", "gzip"], 1, "Unknown compression 'gzip'"),
    (["{missing_folder}/out.rtdc"], 1, "Output folder .* does not exist"),
    (["{rec}"], 2, "is the input file; add --in-place"),
])
def test_bad_arguments_through_the_cli(tmp_path, capsys, argv, code, message):
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 60, shape=(6, 8))
    before = folder_state(tmp_path)
    argv = [a.format(rec=rec, missing_folder=tmp_path / "nope") for a in argv]
    full = ["compute", str(rec), *argv, "--device", "cpu", "--num-cpus", "1"]
    if code == 2:
        with pytest.raises(SystemExit) as exc:
            main(full)
        assert exc.value.code == 2
    else:
        assert main(full) == 1
    err = capsys.readouterr().err
    assert message.split(".*")[0] in err and "Traceback" not in err, err
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("kwargs,error,message", [
    ({"kernel_size": 3}, ValueError, "positive even integer"),
    ({"kernel_size": "100"}, ValueError, "must be an integer"),
    ({"kernel_size": 10, "batch_size": 4}, ValueError, "larger than kernel_size"),
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


def disk_full_after(monkeypatch, successful_writes: int):
    """Make h5py dataset writes fail with ENOSPC as HDF5 reports it"""
    original = h5py.Dataset.__setitem__
    calls = []

    def write(self, key, value):
        if self.name.endswith("image_bg"):
            calls.append(key)
            if len(calls) > successful_writes:
                raise OSError("Can't write data (file write failed: time = Sun Nov 22, "
                              f"errno = {errno.ENOSPC}, error message = 'No space left on "
                              "device')")
        return original(self, key, value)
    monkeypatch.setattr(h5py.Dataset, "__setitem__", write)


def run_on_a_full_disk(source, target, monkeypatch, successful_writes):
    disk_full_after(monkeypatch, successful_writes)
    with pytest.raises(errors.OutputWriteError, match=f"disk is full while writing .*"
                                                      f"{target.name}"):
        with dcbg.BackgroundRollMed(source, target, kernel_size=10, batch_size=20,
                                    num_cpus=1, device="cpu") as bg:
            bg.process()


def test_disk_full_new_output(tmp_path, monkeypatch, capsys):
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 200, shape=(8, 12))
    out = tmp_path / "rec_bg.rtdc"
    out.write_bytes(b"yesterday's result")
    before = folder_state(tmp_path)
    run_on_a_full_disk(rec, out, monkeypatch, 2)
    assert folder_state(tmp_path) == before
    assert main(["compute", str(rec), "--force", "-kb", "kernel_size=10", "-kb",
                 "batch_size=20", "--num-cpus", "1", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: The disk is full") and len(err.splitlines()) == 1
    assert folder_state(tmp_path) == before


def test_disk_full_in_place_keeps_everything(tmp_path, monkeypatch):
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 200, shape=(8, 12))
    with dcbg.BackgroundRollMed(rec, rec, kernel_size=4, batch_size=30, num_cpus=1,
                                device="cpu") as bg:
        bg.process()
    before = dataset_digests(rec)
    run_on_a_full_disk(rec, rec, monkeypatch, 1)
    monkeypatch.undo()
    assert dataset_digests(rec) == before


def test_worker_killed_during_process_raises_and_leaves_no_orphans(tmp_path, monkeypatch):
    stack = synthetic_stack(2000, shape=(20, 30), seed=4)
    read_into = dcbg.rtdc.ImageSource.read_into

    def slow(self, start, stop, out):
        time.sleep(0.05)
        read_into(self, start, stop, out)
    monkeypatch.setattr(dcbg.rtdc.ImageSource, "read_into", slow)
    killed = []

    def kill_a_worker(bg):
        while bg.get_progress() == 0:
            time.sleep(0.01)
        worker = multiprocessing.active_children()[0]
        killed.append(worker.pid)
        os.kill(worker.pid, signal.SIGKILL)

    with dcbg.BackgroundRollMed(stack, tmp_path / "o.rtdc", kernel_size=10, batch_size=20,
                                num_cpus=2, device="cpu") as bg:
        threading.Thread(target=kill_a_worker, args=(bg,), daemon=True).start()
        t0 = time.monotonic()
        with pytest.raises(errors.WorkerFailure, match=f"{killed or ''}.*died"):
            bg.process()
        assert time.monotonic() - t0 < 10
    assert killed
    assert multiprocessing.active_children() == []
    assert not list(tmp_path.iterdir())


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie"""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def start_slow_run(tmp_path, *args) -> tuple[subprocess.Popen, list[int]]:
    """Start slow_run.py and wait until it is mid-run; return it and its pids"""
    marker = tmp_path / "running.pids"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(SLOW_RUN), str(marker), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"slow run did not start: {proc.communicate()}")
        time.sleep(0.02)
    pids = [int(p) for p in marker.read_text().split()]
    marker.unlink()
    return proc, pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
@pytest.mark.parametrize("how,sig", [("cli", signal.SIGINT), ("cli", signal.SIGTERM),
                                     ("api", signal.SIGTERM), ("api-in-place", signal.SIGINT),
                                     ("cli-in-place", signal.SIGTERM)])
def test_signal_mid_run_cleans_up(tmp_path, how, sig):
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 600, shape=(16, 24), seed=6)
    in_place = how.endswith("in-place")
    if in_place:
        with dcbg.BackgroundRollMed(rec, rec, kernel_size=4, batch_size=100, num_cpus=1,
                                    device="cpu") as bg:
            bg.process()
        digests = dataset_digests(rec)
    out = rec if in_place else tmp_path / "out.rtdc"
    before = folder_state(tmp_path)
    if how.startswith("cli"):
        args = ["cli", "compute", rec, *(["--in-place"] if in_place else [out]),
                "-kb", "kernel_size=10", "-kb", "batch_size=20", "--num-cpus", "2",
                "--device", "cpu"]
    else:
        args = ["api", rec, out]
    proc, pids = start_slow_run(tmp_path, *args)
    assert len(pids) == 3, "main process and two workers"
    t0 = time.monotonic()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=20)
    assert time.monotonic() - t0 < 10, "the run ends within seconds"
    assert proc.returncode != 0
    if how.startswith("cli"):
        assert proc.returncode == 1
        assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
        assert "unfinished output was removed" in stderr
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids), "no orphan processes remain"
    assert folder_state(tmp_path) == before, "no partial output, no lock, input intact"
    if in_place:
        assert dataset_digests(rec) == digests


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_killed_main_process_leaves_no_orphans_and_a_rerun_works(tmp_path):
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 600, shape=(16, 24), seed=6)
    out = tmp_path / "out.rtdc"
    proc, pids = start_slow_run(tmp_path, "api", rec, out)
    proc.kill()  # SIGKILL: nothing in the process can clean up
    proc.communicate(timeout=20)
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids[1:]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids[1:]), "workers notice their parent is gone"
    assert not out.exists(), "no file that looks complete"
    # The dead run's lock and hidden partial file are taken over by the next run.
    assert main(["compute", str(rec), str(out), "-kb", "kernel_size=10", "--device", "cpu",
                 "--num-cpus", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.rtdc", "rec.rtdc"]


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
    import socket
    (tmp_path / ".out.rtdc.dcbg-lock").write_text(f"{dead.pid} {socket.gethostname()}")
    (tmp_path / ".out.rtdc.abc123.dcbg-partial").write_bytes(b"half a file")
    with dcbg.BackgroundRollMed(rec, out, kernel_size=4, num_cpus=1, device="cpu") as bg:
        bg.process()
    assert "stale lock" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.rtdc", "rec.rtdc"]


def test_lock_of_a_live_process_is_respected(tmp_path):
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 60, shape=(6, 8))
    import socket
    lock = tmp_path / ".out.rtdc.dcbg-lock"
    lock.write_text(f"{os.getppid()} {socket.gethostname()}")
    with pytest.raises(errors.OutputBusyError, match=f"process {os.getppid()}"):
        with dcbg.BackgroundRollMed(rec, tmp_path / "out.rtdc", kernel_size=4,
                                    num_cpus=1, device="cpu") as bg:
            bg.process()
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock.name, "rec.rtdc"]


def test_fuzzed_files_give_only_clean_errors(tmp_path):
    """Bit flips, zeroed blocks and truncations of small .rtdc files

    The fuzzer runs in a child process, so that a crash inside HDF5 would
    fail this test instead of killing the test session.
    """
    run = subprocess.run([sys.executable, str(TESTS / "fuzz_reader.py"), str(tmp_path),
                          "--count", "240", "--seed", "20261122", "--timeout", "10"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["tried"] == 240
    assert report["unclean"] == [], report["unclean"][:5]
    assert report["clean_errors"] > 0 and report["readable"] > 0
    assert report["hangs"] == [] and report["crashes"] == []


def test_hdf5_hangs_and_crashes_on_metadata_become_clean_errors(tmp_path, monkeypatch,
                                                                 capsys):
    """libhdf5 loops or crashes on some damaged attributes (HDFGroup/hdf5#1707)

    Fuzzing found such files; their bytes depend on the HDF5 version, so
    here the probe's child process hangs or crashes on purpose for files
    named so, and the batch goes on with the others.
    """
    good = write_synthetic_rtdc(tmp_path / "good.rtdc", 60, shape=(6, 8))
    for name in ("hangs.rtdc", "crashes.rtdc"):
        shutil.copy(good, tmp_path / name)
    monkeypatch.setattr(dcbg.rtdc, "PROBE_SECONDS", 2.0)
    monkeypatch.setattr(dcbg.rtdc, "_PROBE_CODE", dcbg.rtdc._PROBE_CODE + (
        "\nimport os, signal, time\n"
        "name = os.path.basename(sys.argv[1])\n"
        "if name == 'hangs.rtdc': time.sleep(60)\n"
        "if name == 'crashes.rtdc': os.kill(os.getpid(), signal.SIGSEGV)\n"))
    with pytest.raises(errors.InputFileError, match="HDF5 hung for 2 s"):
        dcbg.rtdc.probe_metadata(tmp_path / "hangs.rtdc")
    with pytest.raises(errors.InputFileError, match="HDF5 crashed .*signal 11"):
        dcbg.rtdc.probe_metadata(tmp_path / "crashes.rtdc")
    dcbg.rtdc.probe_metadata(good)
    assert main(["compute", str(tmp_path), "-r", "-kb", "kernel_size=4", "--device", "cpu",
                 "--num-cpus", "1"]) == 1
    out = capsys.readouterr().out
    assert "1 of 3 files done" in out
    assert "hangs.rtdc: FAILED" in out and "crashes.rtdc: FAILED" in out
    assert (tmp_path / "good_bg.rtdc").exists()
    shutil.rmtree(tmp_path / "fuzz", ignore_errors=True)
