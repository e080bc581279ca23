"""Start a dcbg run that is slow on purpose, and watch its processes"""
import os
import pathlib
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


def start_slow_run(tmp_path, *args) -> tuple[subprocess.Popen, list[int]]:
    """Start slow_run.py and wait until it is mid-run; return it and its pids"""
    marker = tmp_path / "running.pids"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SLOW_RUN.parent), os.environ.get("PYTHONPATH", "")])}
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
