"""Signals, killed processes and dead workers: the run ends in seconds and leaves nothing"""
import multiprocessing
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
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
from helpers.processes import alive, slow_run, start_slow_run, wait_for_session_end

pytestmark = [pytest.mark.slow,  # real interrupts of real runs, many of them
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")]


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


def blocked_signals(pid: int) -> set[int]:
    """The signals a process blocks (Linux)"""
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    mask = int(status.split("SigBlk:")[1].split()[0], 16)
    return {number for number in range(1, 65) if mask >> (number - 1) & 1}


def test_a_signal_while_the_handlers_are_put_back_waits_for_them(monkeypatch):
    """A signal another thread took can reach the main thread as the block ends: its handler
    may run between two of the handlers being put back, and must not stop that halfway"""
    with errors.sigterm_raises():
        handler = signal.getsignal(signal.SIGTERM)
        put_back = signal.signal
        arrived = []

        def signal_arriving_meanwhile(signum, action):
            if action is handler and not arrived:
                arrived.append(signum)  # the interpreter runs the handler set at this moment
                signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
            return put_back(signum, action)
        with pytest.raises(errors.Terminated, match="terminated by SIGTERM"):
            with errors.signals_deferred():
                monkeypatch.setattr(signal, "signal", signal_arriving_meanwhile)
        monkeypatch.undo()
        assert arrived and signal.getsignal(signal.SIGTERM) is handler


def test_a_deferred_signal_raises_when_the_outermost_block_ends():
    steps = []
    with errors.sigterm_raises():
        handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises(errors.Terminated, match="terminated by SIGTERM"):
            with errors.signals_deferred():
                with errors.signals_deferred():
                    child = subprocess.Popen(["sleep", "30"])
                    os.kill(os.getpid(), signal.SIGTERM)
                    steps.append("inner block done")
                steps.append("outer block done")
        assert signal.getsignal(signal.SIGTERM) is handler
    assert steps == ["inner block done", "outer block done"]
    try:
        assert {signal.SIGINT, signal.SIGTERM} <= blocked_signals(child.pid), \
            "a process started in the block cannot be stopped halfway through its start"
    finally:
        child.kill()
        child.wait()
    assert not {signal.SIGINT, signal.SIGTERM} & blocked_signals(os.getpid())


def test_signal_while_workers_start_stops_the_ones_started(monkeypatch):
    workers = cpu.ProcessWorkers(pixels=600, kernel_size=4, batch_size=10, num_cpus=2)
    start = cpu.WorkerRollMed.start

    def start_then_signal(worker):
        start(worker)
        os.kill(os.getpid(), signal.SIGTERM)  # one worker runs, the other is yet to start

    monkeypatch.setattr(cpu.WorkerRollMed, "start", start_then_signal)
    with errors.sigterm_raises(), pytest.raises(errors.Terminated):
        workers.start()
    assert multiprocessing.active_children() == []


def test_signal_while_the_output_is_created_leaves_no_file(tmp_path, monkeypatch):
    mkstemp = tempfile.mkstemp

    def signal_then_mkstemp(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the lock file exists, the output not yet
        return mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", signal_then_mkstemp)
    with dcbg.BackgroundRollMed(synthetic_stack(60, shape=(8, 8), seed=2), tmp_path / "o.rtdc",
                                kernel_size=10, num_cpus=1, device="cpu") as bg:
        with pytest.raises(errors.Terminated):
            bg.process()
    assert not list(tmp_path.iterdir()), "no lock, no partial output"


STOPPED = {signal.SIGINT: "error: interrupted", signal.SIGTERM: "error: terminated by SIGTERM"}
"""The command line's line on stderr after a signal, up to its common end"""

STOPPED_END = "; the unfinished output was removed and the input is unchanged"

WAKES = ([("cli", wake, signal.SIGINT if wake % 2 else signal.SIGTERM) for wake in range(1, 7)]
         + [("rolling_median", wake, signal.SIGINT) for wake in range(1, 4)])
"""(what runs, which wake-up of a thread by the main thread gets the signal, the signal);
a batch wakes the reader, the writer and the workers' job hand-out in turn, so the first
six wake-ups meet each with SIGINT and with SIGTERM"""


@pytest.mark.parametrize("mode,wake,sig", WAKES)
def test_signal_while_the_main_thread_wakes_a_thread_ends_the_run(tmp_path, mode, wake, sig):
    """The signal raises between releasing a sleeping thread and forgetting its waiter

    That loses the next wake-up of the same condition; the run must end all
    the same, within seconds, with its message and no file or process left.
    """
    data = tmp_path / "data"
    data.mkdir()
    rec = write_synthetic_rtdc(data / "rec.rtdc", 600, shape=(20, 40), seed=6)
    before = folder_state(data)
    if mode == "cli":
        args = ["cli", "compute", rec, data / "out.rtdc", "-kb", "kernel_size=10", "-kb",
                "batch_size=20", "--num-cpus", "2", "--device", "cpu"]
    else:
        args = ["rolling_median", 600]
    marker = tmp_path / "run.pids"
    proc = slow_run(marker, "--signal-at-wake", wake, sig.name, *args, new_session=True)
    signalled = marker.with_suffix(".signalled")
    deadline = time.monotonic() + 120
    while not signalled.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert signalled.exists(), f"the run ended before the wake-up: {proc.communicate()}"
    end = wait_for_session_end(proc, float(signalled.read_text()) + 10)
    assert end.returncode is not None, f"the run still ran 10 s after the signal: {end}"
    assert not end.left, "a worker process outlived the run"
    if mode == "cli":
        assert end.returncode == 1, end
        assert end.stderr == STOPPED[sig] + STOPPED_END + "\n"
    else:
        assert end.returncode == -signal.SIGINT, end  # the KeyboardInterrupt reached the top
        assert end.stderr.rstrip().endswith("KeyboardInterrupt"), end.stderr
    assert folder_state(data) == before, "no partial output, no lock, input intact"


RANDOM_RUNS = 16
"""Runs that the random interrupts stop (or just miss)"""

WAKE_PAUSE = 0.002
"""Seconds the main thread of a run pauses right after it woke a thread (see slow_run.py):
a busy machine's scheduler does so when the woken thread takes the main thread's core,
which is where an interrupt was once lost about once in 50 runs of 60,000 frames"""


def test_interrupts_at_random_moments_end_every_run(tmp_path):
    """SIGINT and SIGTERM, to the main process or the whole process group, at random times

    Each run is stopped at any moment from its start to its end: while the
    workers start, while jobs are handed out or computed, while the writer
    writes, while the output is committed. Every process of the run must be
    gone 10 s after the signal, the input unchanged, and the output absent
    or complete.
    """
    data = tmp_path / "data"
    data.mkdir()
    events = 3000
    rec = write_synthetic_rtdc(data / "rec.rtdc", events, shape=(20, 40), seed=6)
    out = data / "out.rtdc"
    with h5py.File(rec) as h5:
        expected = dcbg.rolling_median_background(h5["events/image"][:], 10)
    before = folder_state(data)
    rng = random.Random(33)
    cases = [(mode, sig, group) for group in (False, True) for mode in ("cli", "rolling_median")
             for sig in (signal.SIGINT, signal.SIGTERM)]
    stopped = 0
    for run in range(RANDOM_RUNS):
        mode, sig, group = cases[run % len(cases)]
        if mode == "cli":  # 150 batches, 3 s at least
            args = ["--read-delay", 0.02, "cli", "compute", rec, out, "-kb", "kernel_size=10",
                    "-kb", "batch_size=20", "--num-cpus", "2", "--device", "cpu"]
        else:  # 20 batches, 2 s at least
            args = ["--read-delay", 0.1, "rolling_median", 40_000]
        delay = rng.uniform(0, 3.5)
        what = f"run {run}: {mode}, {sig.name} to the {'group' if group else 'process'} " \
               f"after {delay:.2f} s"
        proc = slow_run(tmp_path / "run.pids", "--slow-wakes", WAKE_PAUSE, *args,
                        new_session=True)
        time.sleep(delay)
        signalled = time.monotonic()
        if proc.poll() is None:
            (os.killpg if group else os.kill)(proc.pid, sig)
        end = wait_for_session_end(proc, signalled + 10)
        assert end.returncode is not None, f"{what}: still running 10 s after the signal: {end}"
        assert not end.left, f"{what}: processes outlived the run by 10 s: {end}"
        assert end.returncode in (0, 1, -sig), f"{what}: {end}"
        if mode == "cli" and end.returncode == 1:
            # a signal during the commit stops the run after storing the output whole
            stored = f" while {out} was being finished; it was stored whole, then the run stopped"
            ending = stored if out.exists() else STOPPED_END
            assert end.stderr == STOPPED[sig] + ending + "\n", f"{what}: {end}"
        stopped += end.returncode != 0
        if out.exists():
            with h5py.File(out) as h5:
                assert np.array_equal(h5["events/image_bg"][:], expected), what
            out.unlink()
        assert folder_state(data) == before, f"{what}: no partial output, no lock, input intact"
    assert stopped >= RANDOM_RUNS // 2, "most runs were still running when the signal came"


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
    # a background of another size: the rest of the file is copied beside the new one, the
    # copy has not yet taken the file's name
    ("existing", output, "copy_all_but_background", True),
    ("in-place", output, "copy_all_but_background", True),
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
    signal_after(monkeypatch, output, "copy_all_but_background", sig)
    assert main(["compute", str(rec), "--in-place", "-kb", "kernel_size=8", "-kb",
                 "batch_size=20", "--device", "cpu", "--num-cpus", "1"]) == 1
    cause = "interrupted" if sig == signal.SIGINT else "terminated by SIGTERM"
    assert capsys.readouterr().err == (f"error: {cause} while {rec} was being finished; it "
                                       f"was stored whole, then the run stopped\n")
    monkeypatch.undo()
    with h5py.File(rec) as h5:
        assert h5["events/image_bg"].attrs["dcnum ppid background"] == "rollmed:k=8^b=20"
