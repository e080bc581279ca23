"""Many recordings on a Dask LocalCluster (loopback), one task per file"""
import socket
import threading

import h5py
import numpy as np
import pytest

from dcbg import jobs
from dcbg.cli import main
from dcbg.jobs import FileResult, JobSettings, check_dask_address, run_on_dask, summary_table
from dcbg.reference import rolling_median_reference
from dcbg.synthetic import write_synthetic_rtdc
from helpers.threads import finishes

pytest.importorskip("distributed", reason="dask.distributed is not installed")


@pytest.fixture
def archive(tmp_path):
    """Three good recordings in two folders and one damaged file"""
    (tmp_path / "day2").mkdir()
    good = [write_synthetic_rtdc(tmp_path / "a.rtdc", 80, shape=(8, 16), seed=1),
            write_synthetic_rtdc(tmp_path / "b.rtdc", 120, shape=(10, 12), seed=2),
            write_synthetic_rtdc(tmp_path / "day2" / "c.rtdc", 60, shape=(6, 20), seed=3)]
    bad = tmp_path / "day2" / "broken.rtdc"
    bad.write_bytes(good[0].read_bytes()[:3000])
    return tmp_path, good, bad


def check_outputs(good, kernel_size):
    for source in good:
        with h5py.File(source) as h5:
            expected = rolling_median_reference(h5["events/image"][:], kernel_size)
        with h5py.File(source.with_name(f"{source.stem}_bg.rtdc")) as h5:
            assert np.array_equal(h5["events/image_bg"][:], expected)


@pytest.mark.slow
def test_cli_on_a_local_dask_cluster(archive, capsys):
    folder, good, bad = archive
    code = main(["compute", str(folder), "-r", "--dask", "local:2", "-kb", "kernel_size=10",
                 "--device", "cpu", "--num-cpus", "1"])
    out, err = capsys.readouterr()
    assert code == 1, "one file failed"
    assert err.strip() == "error: 1 of 4 files failed; see the table above"
    check_outputs(good, 10)
    assert not bad.with_name("broken_bg.rtdc").exists()
    lines = out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("file  ")):]
    assert table[0].split()[:3] == ["file", "status", "events"]
    rows = {line.split()[0]: line for line in table[1:-1]}
    assert set(rows) == {"a.rtdc", "b.rtdc", "day2/c.rtdc", "day2/broken.rtdc"}
    assert "FAILED" in rows["day2/broken.rtdc"]
    assert "truncated or damaged" in rows["day2/broken.rtdc"]
    assert rows["b.rtdc"].split()[1:3] == ["ok", "120"]
    assert table[-1] == "3 of 4 files done, 260 events, 1 failed"


def test_failures_that_a_retry_may_fix_are_retried(archive):
    folder, good, _ = archive
    # Asking for a GPU that does not exist raises RuntimeError: not final, so retried.
    settings = JobSettings("rollmed", {"kernel_size": 10, "batch_size": 100}, "zstd-1",
                           "cuda:7", 1)
    jobs = [(good[0], folder / "out.rtdc")]
    seen = []
    results = run_on_dask(jobs, settings, "local:1", retries=1, on_result=seen.append)
    assert seen == results and len(results) == 1
    assert not results[0].ok and results[0].attempts == 2
    assert "CUDA device 7 cannot be used" in results[0].message
    assert not (folder / "out.rtdc").exists()


def test_sequential_recursive_run_goes_on_after_a_failure(archive, capsys):
    folder, good, bad = archive
    assert main(["compute", str(folder), "-r", "-kb", "kernel_size=6", "--device", "cpu",
                 "--num-cpus", "1"]) == 1
    out, err = capsys.readouterr()
    check_outputs(good, 6)
    assert f"{bad}: FAILED: {bad} cannot be read" in out
    assert out.strip().splitlines()[-1] == "3 of 4 files done, 260 events, 1 failed"
    assert err.startswith("error: 1 of 4 files failed")


def test_summary_table_layout():
    results = [FileResult("/x/a.rtdc", "/x/a_bg.rtdc", True, 1000, 2.0, "cpu", "ppid", "h1"),
               FileResult("/x/b.rtdc", "/x/b_bg.rtdc", False, host="h2", message="bad file")]
    lines = summary_table(results).splitlines()
    assert lines[1].split() == ["a.rtdc", "ok", "1000", "2.00", "500", "cpu", "h1"]
    assert lines[2].split() == ["b.rtdc", "FAILED", "h2", "bad", "file"]
    assert lines[-1] == "1 of 2 files done, 1000 events, 1 failed"


@pytest.mark.parametrize("address", ["local:0", "local:-1", "local:x", "bogus", "tcp://host",
                                     "host:port"])
def test_bad_dask_addresses_are_refused_before_any_cluster_starts(address):
    settings = JobSettings("rollmed", {"kernel_size": 4, "batch_size": 10})
    with pytest.raises(ValueError, match=f"The Dask address {address} "):
        run_on_dask([], settings, address)


@pytest.mark.parametrize("address", ["local", "local:3", "tcp://localhost:8786",
                                     "scheduler.lab:8786", "tls://[::1]:8786"])
def test_valid_dask_addresses_pass(address):
    assert check_dask_address(address) == address


def closed_port() -> int:
    """A port of this machine that nothing listens on (bound once, then released)"""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_address_where_no_scheduler_listens_fails_soon_naming_it(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setattr(jobs, "SCHEDULER_CONNECT_SECONDS", 1)  # 5 s for users, here shorter
    address = f"tcp://127.0.0.1:{closed_port()}"
    settings = JobSettings("rollmed", {"kernel_size": 4, "batch_size": 10})
    with pytest.raises(ConnectionError, match=f"No Dask scheduler answered at {address} "
                                              f"within 1 s; start one there"):
        run_on_dask([], settings, address)
    recording = write_synthetic_rtdc(tmp_path / "rec.rtdc", 30, shape=(6, 8))
    assert main(["compute", str(recording), "--dask", address, "-kb", "kernel_size=4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: No Dask scheduler answered at {address} within 1 s")
    assert len(err.strip().splitlines()) == 1
    assert not recording.with_name("rec_bg.rtdc").exists()


class NotAScheduler:
    """A server on a port of this machine that accepts connections but is no Dask scheduler

    With `answer`, it sends those bytes to each client (as a web server's error page
    does); without, it never answers (as a server that waits for a request of its own).
    """

    def __init__(self, answer: bytes | None):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.answer = answer
        self.connections = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.connections.append(connection)  # kept open: the client is not told to stop
            if self.answer is not None:
                connection.sendall(self.answer)

    def close(self):
        for connection in [self.listener, *self.connections]:
            connection.close()


@pytest.mark.parametrize("answer", [None, b"HTTP/1.1 400 Bad Request\r\n\r\n" * 4])
def test_an_address_where_another_server_listens_fails_soon_naming_it(monkeypatch, answer):
    """A Dask dashboard's port (8787) given for the scheduler's (8786), say"""
    monkeypatch.setattr(jobs, "SCHEDULER_CONNECT_SECONDS", 1)
    server = NotAScheduler(answer)
    settings = JobSettings("rollmed", {"kernel_size": 4, "batch_size": 10})
    try:
        with pytest.raises(ConnectionError) as raised:
            finishes(lambda: run_on_dask([], settings, server.address), seconds=60)
    finally:
        server.close()
    message = str(raised.value)
    assert message.startswith(f"No Dask scheduler answered at {server.address} within 1 s")
    assert len(message.splitlines()) == 1


def test_summary_table_names_files_relative_to_the_folder():
    results = [FileResult("/x/day1/a.rtdc", "/x/day1/a_bg.rtdc", True, 10, 1.0, "cpu"),
               FileResult("/x/day2/a.rtdc", "/x/day2/a_bg.rtdc", True, 10, 1.0, "cpu"),
               FileResult("/elsewhere/b.rtdc", "/elsewhere/b_bg.rtdc", True, 10, 1.0, "cpu")]
    names = [line.split()[0] for line in summary_table(results, "/x").splitlines()[1:-1]]
    assert names == ["day1/a.rtdc", "day2/a.rtdc", "b.rtdc"]
