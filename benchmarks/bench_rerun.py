"""What a re-run over an existing output costs: seconds, file size, and the commit's seconds

    python benchmarks/bench_rerun.py [--events 100000] [--recording PATH] [--folder DIR]
                                     [--kernel-size 100] [--other-kernel-size 200]
                                     [--num-cpus N] [--reruns 3]

On the CPU, as ``dcbg compute`` runs in this process: a fresh output of a
synthetic recording of 80×320 frames, then `--reruns` runs with ``--force``
over it; then a first ``--in-place`` run on a copy of the recording and
`--reruns` more. Then, for each, a re-run with ``--other-kernel-size``, whose
background has another stored size (the file is rebuilt), beside a fresh run
with that kernel size. For each run it prints the wall seconds, the file's
size (also as a fraction of the first run's with the same kernel size) and
the seconds of the commit alone (storing the finished background: for a new
output closing and renaming it, for an existing file the swap of the old
background for the new one, or the rebuild). Writing the recording takes a while;
``--recording`` reuses one (it is only read). Prints a table; RESULTS.md is
left alone.
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile
import time

from common import SHAPE, machine, table
from dcbg.cli import main as dcbg_main
from dcbg.rtdc import output
from dcbg.synthetic import write_synthetic_rtdc


class CommitClock:
    """Adds up the seconds spent in the commits of dcbg's outputs while it is installed"""

    def __init__(self):
        self.seconds = 0.0
        self._originals = {}

    def __enter__(self):
        for cls in (output.NewOutputFile, output.ExistingOutputFile):
            commit = cls.commit
            self._originals[cls] = commit

            def timed(this, *args, _commit=commit, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _commit(this, *args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - t0
            cls.commit = timed
        return self

    def __exit__(self, *exc):
        for cls, commit in self._originals.items():
            cls.commit = commit


def run(argv: list[str], path: pathlib.Path) -> dict:
    """One ``dcbg compute``: wall seconds, size of `path` after it, commit seconds"""
    with CommitClock() as clock:
        t0 = time.perf_counter()
        code = dcbg_main(argv)
        seconds = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"dcbg compute {' '.join(argv)} failed with exit code {code}")
    return {"seconds": seconds, "size": path.stat().st_size, "commit_s": clock.seconds}


def formatted(rows: list[dict]) -> list[dict]:
    """The rows as the table shows them, each size also as a fraction of its first run's"""
    shown = []
    for row in rows:
        first = next(other for other in rows
                     if other["how"] == row["how"] and other["k"] == row["k"])
        shown.append({**row, "seconds": f"{row['seconds']:.1f}",
                      "size_mb": f"{row['size'] / 1e6:.2f}",
                      "ratio": f"{row['size'] / first['size']:.4f}",
                      "commit_s": f"{row['commit_s']:.2f}"})
    return shown


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--recording", type=pathlib.Path,
                        help="an existing .rtdc to use instead of writing one")
    parser.add_argument("--folder", type=pathlib.Path,
                        help="where the outputs go (default: a temporary folder)")
    parser.add_argument("--kernel-size", type=int, default=100)
    parser.add_argument("--other-kernel-size", type=int, default=200,
                        help="the kernel size of the last re-run, which changes the "
                             "background's stored size")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--reruns", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.folder) as scratch:
        folder = pathlib.Path(scratch)
        recording = args.recording
        if recording is None:
            recording = folder / "recording.rtdc"
            t0 = time.perf_counter()
            write_synthetic_rtdc(recording, args.events, shape=SHAPE, seed=42)
            print(f"wrote {recording} ({args.events} events) in "
                  f"{time.perf_counter() - t0:.0f} s")
        options = ["--device", "cpu"]
        if args.num_cpus is not None:
            options += ["--num-cpus", str(args.num_cpus)]

        def compute(paths: list[str], path: pathlib.Path, how: str, label: str,
                    kernel_size: int) -> dict:
            return {"how": how, "run": label, "k": kernel_size,
                    **run(["compute", *paths, "-kb",
                           f"kernel_size={kernel_size}", *options], path)}

        k, other_k = args.kernel_size, args.other_kernel_size
        rows = []
        out = folder / "recording_bg.rtdc"
        for index in range(args.reruns + 1):
            rows.append(compute([str(recording), str(out), "--force"], out, "--force",
                                "fresh" if index == 0 else f"re-run {index}", k))
        fresh = folder / "fresh_bg.rtdc"
        rows.append(compute([str(recording), str(fresh)], fresh, "--force",
                            f"fresh, k={other_k}", other_k))
        rows.append(compute([str(recording), str(out), "--force"], out, "--force",
                            f"re-run, k={other_k}", other_k))
        fresh.unlink()
        copy = folder / "copy.rtdc"
        shutil.copyfile(recording, copy)
        input_mb = copy.stat().st_size / 1e6
        for index in range(args.reruns + 1):
            rows.append(compute([str(copy), "--in-place"], copy, "--in-place",
                                "first" if index == 0 else f"re-run {index}", k))
        other_copy = folder / "other_copy.rtdc"
        shutil.copyfile(recording, other_copy)
        rows.append(compute([str(other_copy), "--in-place"], other_copy, "--in-place",
                            f"first, k={other_k}", other_k))
        other_copy.unlink()
        rows.append(compute([str(copy), "--in-place"], copy, "--in-place",
                            f"re-run, k={other_k}", other_k))

    print(f"{machine()}; {args.events} events of {SHAPE[0]}×{SHAPE[1]}, "
          f"k={args.kernel_size}, device cpu; the recording is {input_mb:.2f} MB")
    print(table(formatted(rows), [("how", "output"), ("run", "run"), ("seconds", "wall s"),
                                  ("size_mb", "file MB"), ("ratio", "size / first run, same k"),
                                  ("commit_s", "commit s")]))


if __name__ == "__main__":
    main()
