"""ChipStream job with -b rollmed, plain and through dcbg: the background step and the whole job

    python benchmarks/bench_chipstream.py [--events 20000] [--no-append]

Runs the same ``chipstream-cli -b rollmed -kb kernel_size=100`` job on a
realistic recording twice, as ChipStream alone and as ``dcbg chipstream``,
each a new process. The background step's time is the "Background
computation time" line of the job log in each output (dcnum's line, which
dcbg's adapter writes too); the outputs are checked to be identical first.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import h5py
import hdf5plugin  # noqa: F401 - reads ChipStream's zstd datasets
import numpy as np

from common import append_results, table

CHIPSTREAM_CLI = "import sys; from chipstream.cli import main; sys.exit(main())"


def background_seconds(path: pathlib.Path) -> float:
    with h5py.File(path) as h5:
        log = next(name for name in h5["logs"] if name.startswith("dcnum-log"))
        for line in h5["logs"][log][:]:
            line = line.decode() if isinstance(line, bytes) else line
            found = re.search(r"Background computation time: ([\d.]+)s", line)
            if found:
                return float(found.group(1))
    raise RuntimeError(f"no background time in the job log of {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    from dcbg.synthetic import write_synthetic_rtdc
    scratch = tempfile.TemporaryDirectory(prefix="dcbg-bench-chipstream-")
    folder = pathlib.Path(scratch.name)
    write_synthetic_rtdc(folder / "rec.rtdc", args.events)
    job = ["-b", "rollmed", "-kb", "kernel_size=100", "rec.rtdc"]
    runs = {"ChipStream alone": [sys.executable, "-c", CHIPSTREAM_CLI, *job, "plain.rtdc"],
            "dcbg chipstream": [sys.executable, "-m", "dcbg", "chipstream", "--", *job,
                                "dcbg.rtdc"]}
    rows = []
    for (label, command), output in zip(runs.items(), ("plain.rtdc", "dcbg.rtdc"),
                                        strict=True):
        t0 = time.perf_counter()
        subprocess.run(command, cwd=folder, check=True, capture_output=True)
        seconds = time.perf_counter() - t0
        rows.append({"label": label, "events": args.events, "job": seconds,
                     "background": background_seconds(folder / output)})
        print(f"{label}: job {seconds:.1f} s", file=sys.stderr)
    with h5py.File(folder / "plain.rtdc") as plain, h5py.File(folder / "dcbg.rtdc") as dcbg:
        same = (np.array_equal(plain["events/image_bg"][:], dcbg["events/image_bg"][:])
                and {k: v for k, v in plain.attrs.items() if k.startswith("pipeline:")}
                == {k: v for k, v in dcbg.attrs.items() if k.startswith("pipeline:")})
    scratch.cleanup()  # an error leaves it to the interpreter's exit
    if not same:
        raise SystemExit("the outputs differ; no timing recorded")
    for row in rows:
        row["saved"] = rows[0]["job"] - row["job"]
        row["speedup"] = rows[0]["job"] / row["job"]
    body = table(rows, [("label", "run"), ("events", "N"), ("background", "background step s"),
                        ("job", "whole job s"), ("saved", "saved s"),
                        ("speedup", "whole job speed-up")])
    notes = ("Both runs: chipstream-cli 0.11 with dcnum 0.31, -b rollmed -kb kernel_size=100, "
             "all CPUs, a realistic 80x320 recording; image_bg and every pipeline:dcnum "
             "attribute identical. The whole job is wall time of a new process; the "
             "background step is the job log's 'Background computation time'.")
    if args.no_append:
        print(body + "\n\n" + notes)
    else:
        append_results("ChipStream job, plain and through dcbg",
                       "python benchmarks/bench_chipstream.py " + " ".join(sys.argv[1:]),
                       body, notes)


if __name__ == "__main__":
    main()
