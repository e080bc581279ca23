"""CPU kernel benchmark: the median of 16-bit frames against the median of 8-bit frames

    python benchmarks/bench_kernels16.py [--kernel-sizes 10,100,1000] [--windows 2048]
                                         [--repeat 3] [--append]

One core, one process, both types of frames in the same run: ns per
pixel-output (one pixel of one window's median) of the kernel the CPU engine
runs, on one batch of `--windows` windows in cache-sized jobs taken one after
the other as a worker takes them, for

- uint8: realistic 80x320 RT-DC frames (``dcbg.synthetic.synthetic_stack``),
- uint16: realistic 256x256 sCMOS-like frames (``synthetic_stack16``: a few
  hundred to a few thousand counts, shot and read noise, drifting particles),

and the ratio of the two. Each figure is the fastest of `--repeat` passes
after one untimed pass, by the wall clock and by the thread's CPU time.
Prints a table; ``--append`` also appends it to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from common import append_results, table
from iocases import BATCH, median_batch

SHAPES = {np.dtype(np.uint8): (80, 320), np.dtype(np.uint16): (256, 256)}
"""Frame shape of each type of frames"""


def synthetic_frames(dtype, count: int) -> np.ndarray:
    """`count` realistic frames of `dtype`, one row per frame"""
    from dcbg.synthetic import synthetic_stack, synthetic_stack16
    make = synthetic_stack16 if np.dtype(dtype) == np.uint16 else synthetic_stack
    stack = make(count, SHAPES[np.dtype(dtype)])
    return stack.reshape(count, -1)


def ns_per_pixel_output(frames: np.ndarray, kernel_size: int, windows: int,
                        repeat: int) -> tuple[float, float]:
    """The kernel's ns per pixel-output on `windows` windows of `frames`, on this core

    The fastest of `repeat` passes after an untimed one, by the wall clock and
    by this thread's CPU time: passes of 16-bit frames take several times
    longer than those of 8-bit frames, so on a shared machine other processes
    interrupt more of them, which the wall clock counts and the CPU time
    does not.
    """
    from dcbg.engines.cpu import job_slices
    frames = np.ascontiguousarray(frames[:windows + kernel_size - 1])
    medians = np.empty((windows, frames.shape[1]), frames.dtype)
    jobs = job_slices(frames.shape[1], 1)
    median_batch(frames, medians, kernel_size, windows, jobs)
    wall = cpu = float("inf")
    for _ in range(repeat):
        wall_start, cpu_start = time.perf_counter(), time.thread_time()
        median_batch(frames, medians, kernel_size, windows, jobs)
        wall = min(wall, time.perf_counter() - wall_start)
        cpu = min(cpu, time.thread_time() - cpu_start)
    outputs = windows * frames.shape[1]
    return wall * 1e9 / outputs, cpu * 1e9 / outputs


def measure(kernel_sizes: list[int], windows: int, repeat: int) -> list[dict]:
    """One row per kernel size: both types' ns per pixel-output and their ratio"""
    from dcbg import cpukernels
    from dcbg.engines.cpu import warm_up_kernel
    stacks = {dtype: synthetic_frames(dtype, windows + max(kernel_sizes) - 1)
              for dtype in SHAPES}
    rows = []
    for kernel_size in kernel_sizes:
        row = {"k": kernel_size}
        for dtype, frames in stacks.items():
            warm_up_kernel(dtype)
            name = dtype.name
            row[name], row[f"{name}_cpu"] = ns_per_pixel_output(frames, kernel_size, windows,
                                                                repeat)
            row[f"{name}_scratch"] = cpukernels.scratch(dtype, 1, kernel_size).nbytes
            print(f"k={kernel_size} {name}: {row[name]:.3f} ns per pixel-output "
                  f"({row[f'{name}_cpu']:.3f} ns of CPU time)", file=sys.stderr)
        row["ratio"] = row["uint16"] / row["uint8"]
        row["ratio_cpu"] = row["uint16_cpu"] / row["uint8_cpu"]
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-sizes", default="10,100,1000",
                        help="kernel sizes (comma separated)")
    parser.add_argument("--windows", type=int, default=BATCH,
                        help="windows of the measured batch (the CPU engine's batch)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed passes of each measurement; the fastest counts")
    parser.add_argument("--append", action="store_true",
                        help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    from dcbg.cpukernels import describe_build
    rows = measure([int(k) for k in args.kernel_sizes.split(",")], args.windows, args.repeat)
    for row in rows:
        for key in ("uint8", "uint16", "ratio", "uint8_cpu", "uint16_cpu", "ratio_cpu"):
            row[key] = f"{row[key]:.2f}"
    body = table(rows, [("k", "k"), ("uint8", "uint8 80x320, ns"),
                        ("uint16", "uint16 256x256, ns"), ("ratio", "uint16 ÷ uint8"),
                        ("uint8_cpu", "uint8, ns CPU"), ("uint16_cpu", "uint16, ns CPU"),
                        ("ratio_cpu", "÷, CPU"),
                        ("uint8_scratch", "uint8 scratch B/pixel"),
                        ("uint16_scratch", "uint16 scratch B/pixel")])
    notes = (f"ns per pixel-output on one core, the fastest of {args.repeat} passes over one "
             f"batch of {args.windows} windows, by the wall clock and by the thread's CPU time "
             f"(which other processes on a shared machine disturb less); CPU kernels: "
             f"{describe_build()}. Scratch: the kernel's scratch per pixel "
             f"(cpukernels.scratch); the 16-bit window kernel keeps up to 35 bytes more per "
             f"pixel (its levels and counts).")
    command = "python benchmarks/bench_kernels16.py " + " ".join(sys.argv[1:])
    if args.append:
        append_results("CPU kernels: the median of uint16 against uint8 frames, one core",
                       command.strip(), body, notes)
    else:
        print(body + "\n\n" + notes)


if __name__ == "__main__":
    main()
