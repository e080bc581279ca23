"""Signals, killed processes and dead workers: the run ends in seconds and leaves nothing"""
import multiprocessing
import os
import signal
import sys
import threading
import time

import h5py
import numpy as np
import pytest

import dcbg
from dcbg import errors
from dcbg.cli import main
from dcbg.engines import cpu
from dcbg.reference import rolling_median_reference
from dcbg.rtdc import output, reader
from dcbg.runlog import read_run_logs
from dcbg.synthetic import synthetic_stack, write_synthetic_rtdc
from helpers.files import dataset_digests, folder_state, hidden_files
from helpers.processes import alive, start_slow_run

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")


def test_worker_killed_during_process_raises_and_leaves_no_orphans(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "PROCESS_MIN_WINDOWS", 0)
    stack = synthetic_stack(2000, shape=(20, 30), seed=4)
    read_into = reader.ImageSource.read_into

    def slow(self, start, stop, out):
        time.sleep(0.05)
        read_into(self, start, stop, out)
    monkeypatch.setattr(reader.ImageSource, "read_into", slow)
    killed = []

    def kill_a_worker(bg):
        while bg.get_progress() == 0:  # a batch is done, so a worker computed
            time.sleep(0.01)
        for worker in multiprocessing.active_children():
            killed.append(worker.pid)
            os.kill(worker.pid, signal.SIGKILL)

    with dcbg.BackgroundRollMed(stack, tmp_path / "o.rtdc", kernel_size=10, batch_size=20,
                                num_cpus=2, device="cpu") as bg:
        threading.Thread(target=kill_a_worker, args=(bg,), daemon=True).start()
        t0 = time.monotonic()
        with pytest.raises(errors.WorkerFailure, match="died with exit code -9 while comp"):
            bg.process()
        assert time.monotonic() - t0 < 10
    assert killed
    assert multiprocessing.active_children() == []
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("how,sig", [("cli", signal.SIGINT), ("cli", signal.SIGTERM),
                                     ("api", signal.SIGTERM), ("api-in-place", signal.SIGINT),
                                     ("cli-in-place", signal.SIGTERM)])
def test_signal_mid_run_cleans_up(tmp_path, how, sig):
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 600, shape=(20, 40), seed=6)
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


def test_killed_main_process_leaves_no_orphans_and_a_rerun_works(tmp_path):
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 600, shape=(20, 40), seed=6)
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


def compute(source, target, kernel_size, compress=True):
    with dcbg.BackgroundRollMed(source, target, kernel_size=kernel_size, batch_size=20,
                                num_cpus=1, compress=compress, device="cpu") as bg:
        bg.process()


def signal_after(monkeypatch, module, name, sig, fail=None):
    """Make the function `name` of `module` send `sig` to this process once it has run

    With `fail`, it raises that instead of running, after sending the signal.
    """
    step = getattr(module, name)

    def with_signal(*args, **kwargs):
        result = step(*args, **kwargs) if fail is None else None
        signal.raise_signal(sig)
        if fail is not None:
            raise fail
        return result
    monkeypatch.setattr(module, name, with_signal)


def target_with_a_background(tmp_path, where, compress=True):
    """The input, and an output that holds an earlier background and its bg_off (not "new")"""
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 200, shape=(20, 40), seed=5)
    out = rec if where == "in-place" else tmp_path / "out.rtdc"
    if where != "new":
        compute(rec, out, kernel_size=4, compress=compress)
        with h5py.File(out, "a") as h5:
            h5["events/bg_off"] = np.ones(200)
    return rec, out


COMMIT_STEPS = [
    ("new", dcbg.runlog, "write_run_log", True),
    # the old image_bg and bg_off are deleted, the new background not yet copied in
    ("existing", output, "remove_stale_background", True),
    ("in-place", output, "remove_stale_background", True),
    # the old background's chunks are overwritten (uncompressed ones are of one size), the
    # run log not yet written
    ("existing", output, "write_chunks_over", False),
    ("in-place", output, "write_chunks_over", False),
]


@pytest.mark.parametrize("where,module,step,compress", COMMIT_STEPS,
                         ids=[f"{where}-{step}" for where, _, step, _ in COMMIT_STEPS])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_commit_waits_until_the_background_is_stored(tmp_path, monkeypatch,
                                                                         where, module, step,
                                                                         compress, sig):
    rec, out = target_with_a_background(tmp_path, where, compress)
    before = dataset_digests(out) if out.exists() else {}
    signal_after(monkeypatch, module, step, sig)
    cause = "interrupted" if sig == signal.SIGINT else "terminated by SIGTERM"
    with pytest.raises(KeyboardInterrupt) as raised:  # any other kind would stop pytest
        compute(rec, out, kernel_size=8, compress=compress)
    monkeypatch.undo()
    with h5py.File(out) as h5, h5py.File(rec) as h5in:
        assert "image_bg" in h5["events"]
        assert np.array_equal(h5["events/image_bg"][:],
                              rolling_median_reference(h5in["events/image"][:], 8))
        assert "bg_off" not in h5["events"]
        assert read_run_logs(h5)[-1][1]["ppid"] == "rollmed:k=8^b=20"
    after = dataset_digests(out)
    for name, digest in before.items():
        if not name.startswith(("events/image_bg", "events/bg_off")):
            assert after[name] == digest, name
    assert not hidden_files(tmp_path)
    assert isinstance(raised.value, errors.InterruptedAfterStoring), repr(raised.value)
    assert str(raised.value) == (f"{cause} while {out} was being finished; it was stored "
                                 f"whole, then the run stopped")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_signal_during_a_failing_commit_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    rec, out = target_with_a_background(tmp_path, "existing")
    before = dataset_digests(out)
    signal_after(monkeypatch, dcbg.runlog, "write_run_log", signal.SIGINT,
                  fail=OSError("Can't write data (errno = 28, error message = 'No space "
                               "left on device')"))
    with pytest.raises(KeyboardInterrupt) as raised:
        compute(rec, out, kernel_size=8)
    monkeypatch.undo()
    assert not isinstance(raised.value, errors.InterruptedAfterStoring)
    assert isinstance(raised.value.__context__, errors.OutputWriteError)
    assert dataset_digests(out) == before
    assert not hidden_files(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_command_line_says_the_output_was_stored_before_it_stopped(tmp_path, monkeypatch,
                                                                       capsys, sig):
    rec, _ = target_with_a_background(tmp_path, "in-place")
    signal_after(monkeypatch, output, "remove_stale_background", sig)
    assert main(["compute", str(rec), "--in-place", "-kb", "kernel_size=8", "-kb",
                 "batch_size=20", "--device", "cpu", "--num-cpus", "1"]) == 1
    cause = "interrupted" if sig == signal.SIGINT else "terminated by SIGTERM"
    assert capsys.readouterr().err == (f"error: {cause} while {rec} was being finished; it "
                                       f"was stored whole, then the run stopped\n")
    monkeypatch.undo()
    with h5py.File(rec) as h5:
        assert h5["events/image_bg"].attrs["dcnum ppid background"] == "rollmed:k=8^b=20"
