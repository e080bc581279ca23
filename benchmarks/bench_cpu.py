"""CPU backend benchmark: dcbg against dcnum 0.31, side by side, same stack and workers

    python benchmarks/bench_cpu.py [--events 20000] [--num-cpus 2] [--no-dcnum]

Runs, each in a fresh interpreter (so peak memory is per run):
1. dcbg and dcnum's BackgroundRollMed on the same realistic 80x320 stack,
   k=100, b=10000, zstd output, the same number of workers;
2. dcbg at k = 10, 100, 1000 (cost per event should not depend on k);
3. dcbg with N growing 10x twice (throughput and memory flat in N);
4. file to file (.rtdc with zstd in and out) against the I/O floor, the same
   read and write with no median.
Prints a table and appends it to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np

from common import TiledStack, append_results, peak_rss_mib, run_isolated, table

PIXELS = 80 * 320


def run_case(case: dict) -> dict:
    """Run one measurement in this process and return its numbers"""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="dcbg-bench-"))
    out = tmp / "out.rtdc"
    k, b, cpus = case["k"], case.get("b", 10000), case["num_cpus"]
    if case["kind"] in ("dcbg", "dcnum"):
        source = TiledStack(case["events"])
    else:
        source = pathlib.Path(case["file"])
    t0 = time.perf_counter()
    if case["kind"] == "dcnum":
        warnings.simplefilter("ignore")
        from dcnum.feat.feat_background import BackgroundRollMed as DcnumRollMed
        with DcnumRollMed(source, out, kernel_size=k, batch_size=b, num_cpus=cpus) as bg:
            t1 = time.perf_counter()
            bg.process()
    elif case["kind"] == "io_floor":
        t1 = t0
        io_floor(source, out, b)
    else:
        import dcbg
        with dcbg.BackgroundRollMed(source, out, kernel_size=k, batch_size=b, num_cpus=cpus,
                                    device=case.get("device", "cpu"),
                                    compress=case.get("compress", True)) as bg:
            t1 = time.perf_counter()
            bg.process()
    t2 = time.perf_counter()
    events = case["events"]
    return {**case, "seconds": round(t2 - t0, 3), "process_seconds": round(t2 - t1, 3),
            "events_per_s": events / (t2 - t0), "mpix_per_s": events * PIXELS / (t2 - t0) / 1e6,
            **peak_rss_mib()}


def io_floor(path: pathlib.Path, out: pathlib.Path, batch_size: int):
    """Read events/image and write it as image_bg, batch by batch, no median

    Uses dcbg's own reader and writer threads, so the only difference to a
    real run is the missing median.
    """
    import h5py

    from dcbg.pipeline import Prefetcher, WriterThread, plan_batches
    from dcbg.rtdc import ImageBgWriter, ImageSource

    with h5py.File(path) as h5in, h5py.File(out, "w") as h5out:
        source = ImageSource(h5in["events/image"])
        writer = ImageBgWriter(h5out.require_group("events"), source.image_shape, True)
        batches = plan_batches(len(source), 2, batch_size)  # windows of 2: just a plan
        rows = max(batch.input_size for batch in batches)
        prefetcher = Prefetcher(source.read_into, batches,
                                [np.empty((rows, source.pixels), np.uint8)])
        thread = WriterThread(writer.append, [np.empty((rows, *source.image_shape), np.uint8)])
        try:
            for batch, frames in prefetcher:
                buffer = thread.acquire()
                buffer.reshape(len(buffer), -1)[:len(frames)] = frames
                prefetcher.release()
                thread.submit(buffer, batch.output_size)
        finally:
            prefetcher.close()
            thread.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--events", type=int, default=20000,
                        help="events for the side-by-side run with dcnum")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--no-dcnum", action="store_true", help="skip dcnum")
    parser.add_argument("--sweep-events", type=int, default=20000,
                        help="events for the k sweep and the file runs")
    parser.add_argument("--scaling", default="2000,20000,200000",
                        help="event counts for the N scaling (comma separated)")
    parser.add_argument("--no-append", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    module = pathlib.Path(__file__).stem
    cpus = args.num_cpus
    rows = []

    def measure(label, case):
        row = run_isolated(module, case)
        row["label"] = label
        rows.append(row)
        print(f"{label}: {row['events_per_s']:,.0f} events/s", file=sys.stderr)
        return row

    side = measure("dcbg", {"kind": "dcbg", "events": args.events, "k": 100,
                            "num_cpus": cpus})
    if not args.no_dcnum:
        try:
            import dcnum  # noqa: F401
        except ImportError:
            print("dcnum is not installed (pip install .[bench]); skipping it", file=sys.stderr)
        else:
            peer = measure("dcnum 0.31", {"kind": "dcnum", "events": args.events, "k": 100,
                                          "num_cpus": cpus})
            side["ratio"] = side["events_per_s"] / peer["events_per_s"]
            peer["ratio"] = 1.0
    for compress in (False, True):
        for k in (10, 100, 1000):
            measure("dcbg k sweep, " + ("zstd-5" if compress else "no compression"),
                    {"kind": "dcbg", "events": args.sweep_events, "k": k, "num_cpus": cpus,
                     "compress": compress})
    for count in (int(c) for c in args.scaling.split(",")):
        measure("dcbg N scaling", {"kind": "dcbg", "events": count, "k": 100,
                                   "num_cpus": cpus})

    from dcbg.synthetic import write_synthetic_rtdc
    folder = pathlib.Path(tempfile.mkdtemp(prefix="dcbg-bench-file-"))
    recording = write_synthetic_rtdc(folder / "rec.rtdc", args.sweep_events)
    file_case = {"events": args.sweep_events, "k": 100, "num_cpus": cpus,
                 "file": str(recording)}
    floor = measure("I/O floor (read+write, no median)", {"kind": "io_floor", **file_case})
    e2e = measure("dcbg .rtdc -> .rtdc", {"kind": "dcbg_file", **file_case})
    e2e["ratio"] = e2e["events_per_s"] / floor["events_per_s"]
    floor["ratio"] = 1.0

    columns = [("label", "run"), ("events", "N"), ("k", "k"), ("num_cpus", "workers"),
               ("events_per_s", "events/s"), ("mpix_per_s", "Mpixel/s"),
               ("ratio", "ratio to peer"), ("seconds", "wall s"),
               ("rss_main_mib", "peak RSS main MiB"), ("rss_worker_mib", "peak RSS worker MiB")]
    notes = ("Array input (a realistic 80x320 stack tiled from 4096 synthetic frames), zstd-5 "
             "output unless noted, b=10000; wall time includes starting the workers. "
             "'ratio to peer' is dcbg/dcnum for the side-by-side pair and dcbg/I-O floor for "
             "the file runs. The k sweep without compression isolates the median's cost; "
             "with zstd, small k leaves more noise in the background, which compresses "
             "worse and costs the writer more.")
    body = table(rows, columns)
    command = "python benchmarks/bench_cpu.py " + " ".join(sys.argv[1:])
    if args.no_append:
        print(body)
    else:
        append_results("CPU backend vs dcnum 0.31", command.strip(), body, notes)


if __name__ == "__main__":
    main()
