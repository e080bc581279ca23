"""Start a dcbg run that is slow on purpose, and watch its processes"""
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time

SLOW_RUN = pathlib.Path(__file__).with_name("slow_run.py")


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (Linux)"""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def session_processes(session: int) -> list[int]:
    """The processes of a session that are alive (Linux)"""
    pids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if fields[0] not in ("Z", "X") and int(fields[3]) == session:
            pids.append(int(stat.parent.name))
    return pids


def slow_run(marker, *args, new_session: bool = False) -> subprocess.Popen:
    """Start slow_run.py with `args` (see there); in a session of its own if asked

    Every process the run starts stays in its session, which is how a test
    finds its workers however early it stops them.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SLOW_RUN.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(SLOW_RUN), str(marker), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=new_session)


def start_slow_run(tmp_path, *args) -> tuple[subprocess.Popen, list[int]]:
    """Start slow_run.py and wait until it is mid-run; return it and its pids"""
    marker = tmp_path / "running.pids"
    marker.unlink(missing_ok=True)
    proc = slow_run(marker, *args)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"slow run did not start: {proc.communicate()}")
        time.sleep(0.02)
    pids = [int(p) for p in marker.read_text().split()]
    marker.unlink()
    return proc, pids


@dataclasses.dataclass
class RunEnd:
    """How a run in a session of its own ended"""

    returncode: int | None
    """its exit status, None if it still ran at the deadline"""
    stdout: str
    stderr: str
    left: list[int]
    """processes of its session alive at the deadline (killed since)"""


def wait_for_session_end(proc: subprocess.Popen, deadline: float) -> RunEnd:
    """Wait until `deadline` (monotonic clock) for a run and all processes of its session to end

    Whatever still runs then is killed, so a hung run costs the test no more.
    """
    try:
        stdout, stderr = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        returncode = None
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = session_processes(proc.pid)
    if left or returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # they ended meanwhile
        stdout, stderr = proc.communicate()
    return RunEnd(returncode, stdout, stderr, left)


def run_check_in_child(module: str, check: str, *args, timeout: float
                       ) -> subprocess.CompletedProcess:
    """Call ``module.check(*args)`` of a test module in a new interpreter

    For checks that can crash the process (a host-compiled kernel reading
    outside its buffers ends in SIGSEGV), so that a crash fails one test
    with its output instead of ending the whole session.
    """
    call = f"import {module}; {module}.{check}({', '.join(map(repr, args))})"
    return subprocess.run([sys.executable, "-c", call], cwd=pathlib.Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=timeout)
