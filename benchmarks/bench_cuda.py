"""CUDA benchmark: kernel against its GPU peers, and file to file against the I/O floor

    python benchmarks/bench_cuda.py [--events 10000] [--kernel-size 100] [--file-events 50000]

On one device and one realistic 80x320 stack, in one run:
1. the dcbg kernel alone (device memory in and out, timed with CUDA events),
2. cupyx.scipy.ndimage.median_filter(size=(k,1,1)) on the same stack,
3. torch unfold + kthvalue, if torch with CUDA is installed,
4. the dcbg CPU backend on the same stack (all CPUs),
5. .rtdc -> .rtdc with zstd on the GPU, against the I/O floor (the same read
   and write with no median, see bench_cpu.io_floor).
The kernel's output is first checked byte for byte against the CPU backend.
Prints a table and appends it to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import pathlib
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
    from dcbg.cpu import compute_median_for_slice
    from dcbg.cuda import CUDARollingMedian

    stack = TiledStack(events + k - 1)[:]
    frames = cupy.asarray(stack.reshape(len(stack), -1))
    medians = cupy.empty((events, PIXELS), np.uint8)
    engine = CUDARollingMedian((80, 320), k, events, 0)
    engine.launch(frames, medians, events)
    cupy.cuda.get_current_stream().synchronize()
    expected = np.empty((events, PIXELS), np.uint8)
    compute_median_for_slice(stack.reshape(len(stack), -1), expected, k, events,
                             slice(0, PIXELS))
    if not np.array_equal(cupy.asnumpy(medians), expected):
        raise SystemExit("the CUDA kernel disagrees with the CPU backend; no timing recorded")
    seconds = time_device(lambda: engine.launch(frames, medians, events))
    rows = [{"label": "dcbg CUDA kernel", "events": events, "k": k, "seconds": seconds}]

    import cupyx.scipy.ndimage as ndi
    subset = frames[:min(len(stack), 2000)].reshape(-1, 80, 320)
    seconds = time_device(lambda: ndi.median_filter(subset, size=(k, 1, 1)), repeats=3)
    rows.append({"label": "cupyx median_filter(size=(k,1,1))", "events": len(subset),
                 "k": k, "seconds": seconds})
    try:
        import torch
        if torch.cuda.is_available():
            tensor = torch.as_tensor(cupy.asnumpy(frames[:min(len(stack), 2000)]),
                                     device="cuda")

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
    parser.add_argument("--kernel-size", type=int, default=100)
    parser.add_argument("--file-events", type=int, default=50000)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    from dcbg.devices import cuda_unavailable_reason, describe_cuda_devices
    reason = cuda_unavailable_reason(0)
    if reason:
        raise SystemExit(f"error: no CUDA device to benchmark: {reason}")
    gpu = describe_cuda_devices()
    k = args.kernel_size
    rows = kernel_rows(args.events, k)

    cpu = run_isolated("bench_cpu", {"kind": "dcbg", "events": args.events, "k": k,
                                     "num_cpus": os.cpu_count(), "device": "cpu"})
    cpu["label"] = f"dcbg CPU backend ({os.cpu_count()} workers, end to end)"
    cpu["pix_per_s"] = cpu["events_per_s"] * PIXELS
    cpu["ratio"] = rows[0]["pix_per_s"] / cpu["pix_per_s"]
    rows.append(cpu)

    from dcbg.synthetic import write_synthetic_rtdc
    folder = pathlib.Path(tempfile.mkdtemp(prefix="dcbg-bench-gpu-"))
    recording = write_synthetic_rtdc(folder / "rec.rtdc", args.file_events)
    case = {"events": args.file_events, "k": k, "num_cpus": 1, "file": str(recording)}
    floor = run_isolated("bench_cpu", {"kind": "io_floor", **case})
    floor["label"] = "I/O floor .rtdc -> .rtdc (no median)"
    e2e = run_isolated("bench_cpu", {"kind": "dcbg_file", "device": "cuda", **case})
    e2e["label"] = "dcbg CUDA .rtdc -> .rtdc"
    for row in (floor, e2e):
        row["pix_per_s"] = row["events_per_s"] * PIXELS
    e2e["ratio"] = e2e["events_per_s"] / floor["events_per_s"]
    rows += [floor, e2e]

    columns = [("label", "run"), ("events", "N"), ("k", "k"), ("events_per_s", "events/s"),
               ("pix_per_s", "pixel-outputs/s"), ("ratio", "dcbg kernel ÷ peer (or e2e ÷ floor)"),
               ("rss_main_mib", "peak RSS MiB")]
    device = ", ".join(f"{d['name']} ({d['memory_total'] / 2**30:.0f} GiB, driver {d['driver']})"
                       for d in gpu) or "unknown GPU"
    body = table(rows, columns)
    if args.no_append:
        print(body)
    else:
        append_results(f"CUDA backend on {device}",
                       "python benchmarks/bench_cuda.py " + " ".join(sys.argv[1:]), body,
                       "Kernel rows: device memory in and out, median of CUDA-event timings. "
                       "File rows: wall time, zstd-5 in and out.")


if __name__ == "__main__":
    main()
