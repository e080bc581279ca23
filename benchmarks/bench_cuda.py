"""CUDA benchmark: the kernel against its GPU peers, and file to file against the I/O floor

    python benchmarks/bench_cuda.py [--events 10000] [--kernel-sizes 10,100,1000]
                                    [--file-events 50000] [--no-append]

On one device, in one run:
1. the dcbg kernel alone (device memory in and out, timed with CUDA events) at
   each kernel size, its output first checked byte for byte against the CPU
   engine, against cupyx.scipy.ndimage.median_filter(size=(k,1,1)) and torch's
   unfold + kthvalue (where torch has CUDA) on the same device and stack;
2. .rtdc -> .rtdc with zstd in and out, k=100, all CPUs: ``dcbg compute
   --device cuda`` and ``--device cpu`` as whole commands, against the parallel
   I/O floor (the same read and write with no median, all CPUs), with the CUDA
   run's seconds per stage from its run log (read, upload, kernel, download,
   write; the device stages timed with CUDA events, summed over batches and
   overlapping each other).
Prints tables and appends them to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

from common import TiledStack, append_results, run_isolated, table

PIXELS = 80 * 320


def time_device(function, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of `function()` measured with CUDA events"""
    import cupy
    for _ in range(warmup):
        function()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        function()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(np.median(times))


def kernel_rows(events: int, k: int) -> list[dict]:
    import cupy

    from dcbg.engines.cpu import compute_median_for_slice, job_slices
    from dcbg.engines.cuda import CUDARollingMedian

    stack = TiledStack(events + k - 1)[:]
    frames = cupy.asarray(stack.reshape(len(stack), -1))
    medians = cupy.empty((events, PIXELS), np.uint8)
    engine = CUDARollingMedian((80, 320), k, events, 0)
    engine.launch(frames, medians, events)
    cupy.cuda.get_current_stream().synchronize()
    expected = np.empty((events, PIXELS), np.uint8)
    for job in job_slices(PIXELS, 1):
        compute_median_for_slice(stack.reshape(len(stack), -1), expected, k, events, job)
    if not np.array_equal(cupy.asnumpy(medians), expected):
        raise SystemExit("the CUDA kernel disagrees with the CPU backend; no timing recorded")
    seconds = time_device(lambda: engine.launch(frames, medians, events))
    rows = [{"label": "dcbg CUDA kernel", "events": events, "k": k, "seconds": seconds}]

    import cupyx.scipy.ndimage as ndi
    subset = frames[:min(len(stack), max(2000, 2 * k))].reshape(-1, 80, 320)
    seconds = time_device(lambda: ndi.median_filter(subset, size=(k, 1, 1)), repeats=3)
    rows.append({"label": "cupyx median_filter(size=(k,1,1))", "events": len(subset),
                 "k": k, "seconds": seconds})
    try:
        import torch
        if torch.cuda.is_available():
            tensor = torch.as_tensor(cupy.asnumpy(frames[:len(subset)]), device="cuda")

            def torch_median():
                windows = tensor.unfold(0, k, 1)  # (n, pixels, k)
                return windows.kthvalue(k // 2 + 1, dim=-1).values

            seconds = time_device(torch_median, repeats=3)
            rows.append({"label": "torch unfold+kthvalue", "events": len(tensor) - k + 1,
                         "k": k, "seconds": seconds})
    except ImportError:
        pass
    for row in rows:
        row["pix_per_s"] = row["events"] * PIXELS / row["seconds"]
        row["events_per_s"] = row["events"] / row["seconds"]
    for row in rows[1:]:
        row["ratio"] = rows[0]["pix_per_s"] / row["pix_per_s"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10000)
    parser.add_argument("--kernel-sizes", default="10,100,1000")
    parser.add_argument("--file-events", type=int, default=50000)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    from dcbg.engines.cuda import cuda_unavailable_reason, describe_cuda_devices
    reason = cuda_unavailable_reason(0)
    if reason:
        raise SystemExit(f"error: no CUDA device to benchmark: {reason}")
    gpu = describe_cuda_devices()
    rows = []
    for k in (int(k) for k in args.kernel_sizes.split(",")):
        rows += kernel_rows(args.events, k)
    for row in rows:
        row.setdefault("ratio", "")

    cpus = os.cpu_count()
    from dcbg.synthetic import write_synthetic_rtdc
    scratch = tempfile.TemporaryDirectory(prefix="dcbg-bench-gpu-")
    folder = pathlib.Path(scratch.name)
    recording = write_synthetic_rtdc(folder / "rec.rtdc", args.file_events)
    background = folder / "rec_bg.rtdc"
    subprocess.run([sys.executable, "-m", "dcbg", "compute", str(recording), str(background),
                    "--device", "cuda"], check=True, capture_output=True)
    files = {"events": args.file_events, "file": str(recording), "bg": str(background),
             "num_cpus": cpus, "k": 100}
    floor = run_isolated("bench_cpu", {"kind": "io_floor", "threads": cpus, **files})
    floor["label"] = f"parallel I/O floor .rtdc -> .rtdc, {cpus} threads (no median)"
    file_rows = [floor]
    for device in ("cuda", "cpu"):
        row = run_isolated("bench_cpu", {"kind": "command", "device": device, **files})
        row["label"] = f"dcbg compute --device {device}, whole command, {cpus} CPUs"
        row["ratio"] = row["events_per_s"] / floor["events_per_s"]
        file_rows.append(row)
    stages = file_rows[1]["stages"]
    scratch.cleanup()  # an error leaves it to the interpreter's exit

    device = ", ".join(f"{d['name']} ({d['memory_total'] / 2**30:.0f} GiB, driver {d['driver']})"
                       for d in gpu) or "unknown GPU"
    kernel_table = table(rows, [("label", "run"), ("events", "N"), ("k", "k"),
                                ("pix_per_s", "pixel-outputs/s"),
                                ("ratio", "dcbg kernel ÷ peer")])
    file_table = table(file_rows, [("label", "run"), ("events", "N"),
                                   ("events_per_s", "events/s"),
                                   ("ratio", "÷ parallel I/O floor"), ("seconds", "wall s"),
                                   ("rss_main_mib", "peak RSS MiB")])
    stage_table = table([{"stage": name, "seconds": value} for name, value in stages.items()],
                        [("stage", "CUDA run, stage"), ("seconds", "s")])
    body = f"{kernel_table}\n\n{file_table}\n\n{stage_table}"
    notes = ("Kernel rows: device memory in and out, median of CUDA-event timings; the dcbg "
             "kernel's output equals the CPU engine's. File rows: zstd-5 in and out, wall "
             "time of a new process (interpreter, imports, probe and run). Stages overlap, "
             "so they add up to more than the total.")
    if args.no_append:
        print(body)
    else:
        append_results(f"CUDA backend on {device}",
                       "python benchmarks/bench_cuda.py " + " ".join(sys.argv[1:]), body,
                       notes)


if __name__ == "__main__":
    main()
