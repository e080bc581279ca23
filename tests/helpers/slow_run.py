"""Run dcbg with a slowed-down reader, so a test can hit it mid-run

Usage: ``python slow_run.py MARKER cli ARGS…`` runs the command line,
``python slow_run.py MARKER api INPUT OUTPUT`` runs BackgroundRollMed
(kernel_size=10, batch_size=20, 2 CPU workers). The CPU engine uses worker
processes whatever the input's length, so that tests see them. Each batch
read sleeps 0.1 s; after the third batch the reader writes the process ids
of the main process and its CPU workers to MARKER, so the test knows the
run is under way and which processes must be gone afterwards.
"""
import multiprocessing
import os
import pathlib
import signal
import sys
import time

from dcbg.engines import cpu
from dcbg.rtdc import reader

DELAY = 0.1


def main():
    # A shell starts background jobs with SIGINT ignored and Python keeps that;
    # the tests send SIGINT as Ctrl-C in a terminal does, whoever started them.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    marker = pathlib.Path(sys.argv[1])
    mode = sys.argv[2]
    read_into = reader.ImageSource.read_into
    calls = []

    def slow_read_into(self, start, stop, out):
        time.sleep(DELAY)
        read_into(self, start, stop, out)
        calls.append(start)
        if len(calls) == 3:
            pids = [os.getpid()] + [p.pid for p in multiprocessing.active_children()]
            marker.with_suffix(".tmp").write_text(" ".join(map(str, pids)))
            marker.with_suffix(".tmp").replace(marker)

    reader.ImageSource.read_into = slow_read_into
    cpu.PROCESS_MIN_WINDOWS = 0
    if mode == "cli":
        from dcbg.cli import main as cli_main
        return cli_main(sys.argv[3:])
    import dcbg
    with dcbg.BackgroundRollMed(sys.argv[3], sys.argv[4], kernel_size=10, batch_size=20,
                                num_cpus=2, device="cpu") as bg:
        bg.process()
    return 0


if __name__ == "__main__":
    sys.exit(main())
