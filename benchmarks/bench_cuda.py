"""CUDA benchmark: the kernel against its GPU peers, and file to file against the I/O floor

    python benchmarks/bench_cuda.py [--events 10000] [--kernel-sizes 10,100,1000]
                                    [--file-events 20000] [--recording FILE] [--tiny]
                                    [--json FILE] [--no-append]
    python benchmarks/bench_cuda.py --verify-cost [--file-events 10000] [--no-append]

On CUDA device 0, in one run:
1. .rtdc -> .rtdc with zstd in and out, k=100, all CPUs: ``dcbg compute
   --device cuda`` and ``--device cpu`` as whole commands, against the parallel
   I/O floor (the same read and write with no median, all CPUs), with the CUDA
   run's seconds per stage from its run log (read, upload, kernel, download,
   write; the device stages timed with CUDA events, summed over batches and
   overlapping each other);
2. the dcbg kernel alone at each kernel size: device memory in and out, its
   output first checked byte for byte against the CPU engine, then one
   warm-up launch (which plans it; the engine keeps the plan) and `LAUNCHES`
   launches back to back between two CUDA events; against
   cupyx.scipy.ndimage.median_filter (size=(k,1,1)) and torch's unfold +
   kthvalue (where torch has CUDA) on the same device and frames, torch on as
   many windows as half the free device memory holds (it copies every
   window), or skipped, saying why;
3. the dcbg kernel on uint16 frames (the 16-bit window kernel) at k=100:
   realistic 256×256 microscopy frames (``dcbg.synthetic.synthetic_stack16``),
   as many pixel-outputs as the 80×320 rows, its output first checked
   against the CPU engine, timed as above, against
   cupyx.scipy.ndimage.median_filter on the same stack.
Prints tables and appends them to benchmarks/RESULTS.md; with --json, writes
the rows after each part, so that a run stopped halfway keeps what it
measured. A command that fails stops the benchmark with the end of its error
output.

--verify-cost needs no GPU: it measures what the check of a GPU's results
(``verify="sample"``, dcbg/engines/verification.py) costs the CPU, against the
CPU time of the rest of a GPU run, reading and decoding the recording and
encoding and writing its background (see :func:`verification_cost`).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import TiledStack, append_results, run_isolated, table

SHAPE = (80, 320)
PIXELS = SHAPE[0] * SHAPE[1]

SHAPE16 = (256, 256)
"""Frames of the uint16 kernel row: a microscopy camera's region"""

KERNEL16 = 100
"""kernel_size of the uint16 kernel row"""

PERIOD16 = 512
"""Distinct synthetic 16-bit frames of its stack, which repeat (each takes milliseconds)"""

LAUNCHES = 20
"""Kernel launches timed back to back between two events"""

PEER_REPEATS = 3
"""Timed calls of each peer (after one warm-up); the median counts"""

TORCH_MEMORY_SHARE = 0.5
"""Part of the free device memory torch's copy of every window may take"""

TORCH_MIN_WINDOWS = 16
"""Fewer windows than this say nothing about torch's speed: it is skipped instead"""

SLOW_CALL_SECONDS = 2.0
"""A peer's call that takes longer is timed once, not `PEER_REPEATS` times"""

PEER_FRAMES = 2000
"""Frames the peers compute (at least two kernel sizes)"""

TINY = {"events": 64, "kernel_sizes": "10", "file_events": 300, "peer_frames": 40,
        "peer_repeats": 1, "shape16": (16, 32), "kernel16": 10}
"""--tiny: sizes that run in seconds, on the CuPy stand-in too (a dry run, no measurement)"""


def elapsed_seconds(function, calls: int) -> float:
    """Seconds per call of `function()`, `calls` calls between two CUDA events"""
    import cupy
    stream = cupy.cuda.get_current_stream()
    start = stream.record(cupy.cuda.Event(block=True))
    for _ in range(calls):
        function()
    end = stream.record(cupy.cuda.Event(block=True))
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3 / calls


def median_seconds(function, repeats: int) -> float:
    """Median seconds of `function()` over `repeats` timed calls, after one warm-up

    A call slower than :data:`SLOW_CALL_SECONDS` is timed once: the peers
    at large kernel sizes would otherwise take the benchmark's time.
    """
    first = elapsed_seconds(function, 1)
    if first > SLOW_CALL_SECONDS:
        return elapsed_seconds(function, 1)
    return float(np.median([elapsed_seconds(function, 1) for _ in range(repeats)]))


def torch_windows(free_bytes: int, kernel_size: int, wanted: int) -> int:
    """Windows torch's unfold + kthvalue may take: kthvalue copies each window whole"""
    per_window = PIXELS * kernel_size
    return min(wanted, int(free_bytes * TORCH_MEMORY_SHARE) // per_window)


def kernel_rows(stack: np.ndarray, k: int, peer_frames: int, peer_repeats: int) -> list[dict]:
    """The dcbg kernel on every window of `stack`, and its peers on `peer_frames` frames"""
    import cupy

    from dcbg.devices import select_device
    from dcbg.engines.cudakernel import launcher_for
    from dcbg.selftest import engine_medians

    events = len(stack) - k
    flat = stack.reshape(len(stack), -1)
    frames = cupy.asarray(flat)
    medians = cupy.empty((events, PIXELS), np.uint8)
    launcher = launcher_for(0, PIXELS, k)
    launcher.launch(frames, medians, events)  # plans the launch; the timed ones reuse it
    expected, _, _ = engine_medians(select_device("cpu"), flat, SHAPE, k, os.cpu_count())
    if not np.array_equal(cupy.asnumpy(medians), expected):
        raise SystemExit(f"error: the CUDA kernel disagrees with the CPU engine at k={k}; "
                         f"no timing recorded; run dcbg selftest --device cuda")
    seconds = elapsed_seconds(lambda: launcher.launch(frames, medians, events), LAUNCHES)
    rows = [{"label": "dcbg CUDA kernel", "events": events, "k": k, "seconds": seconds}]
    import dcbg
    device_stack = frames.reshape(stack.shape)
    result = cupy.empty((events + 1, *SHAPE), np.uint8)
    dcbg.rolling_median(device_stack, k, out=result)  # plans it; the timed calls reuse it
    if not np.array_equal(cupy.asnumpy(result[:events]).reshape(events, -1), expected):
        raise SystemExit(f"error: dcbg.rolling_median disagrees with the CPU engine at k={k}")
    seconds = elapsed_seconds(lambda: dcbg.rolling_median(device_stack, k, out=result), LAUNCHES)
    rows.append({"label": "dcbg.rolling_median(CuPy array, out=)", "events": events + 1,
                 "k": k, "seconds": seconds})

    ndimage = importlib.import_module("cupyx.scipy.ndimage")
    peer_frames = min(len(stack), peer_frames)
    subset = cupy.asarray(stack[:peer_frames])
    seconds = median_seconds(lambda: ndimage.median_filter(subset, size=(k, 1, 1)),
                             peer_repeats)
    rows.append({"label": "cupyx median_filter(size=(k,1,1))", "events": peer_frames, "k": k,
                 "seconds": seconds})
    rows += torch_rows(stack, k, min(events, peer_frames - k + 1), peer_repeats)
    return rates(rows, SHAPE, "uint8")


def rates(rows: list[dict], shape, dtype: str) -> list[dict]:
    """`rows` (the dcbg kernel's first) with their frames, pixel-outputs and events per
    second, and the dcbg kernel's speed over each other's"""
    pixels = shape[0] * shape[1]
    for row in rows:
        row["frames"] = f"{shape[0]}x{shape[1]} {dtype}"
        row["pix_per_s"] = row["events"] * pixels / row["seconds"]
        row["events_per_s"] = row["events"] / row["seconds"]
    for row in rows[1:]:
        row["ratio"] = rows[0]["pix_per_s"] / row["pix_per_s"]
    return rows


def kernel_rows16(pixel_outputs: int, k: int, shape, peer_pixel_outputs: int,
                  peer_repeats: int) -> list[dict]:
    """The dcbg kernel on realistic uint16 frames of `shape`, windows enough for
    `pixel_outputs`, and cupyx's median_filter on the same stack"""
    import cupy

    from dcbg.devices import select_device
    from dcbg.engines.cudakernel import launcher_for
    from dcbg.selftest import engine_medians
    from dcbg.synthetic import synthetic_stack16

    pixels = shape[0] * shape[1]
    events = max(1, pixel_outputs // pixels)
    base = synthetic_stack16(min(PERIOD16, events + k), shape).reshape(-1, pixels)
    flat = base[np.arange(events + k) % len(base)]
    frames = cupy.asarray(flat)
    medians = cupy.empty((events, pixels), np.uint16)
    launcher = launcher_for(0, pixels, k, np.uint16)
    launcher.launch(frames, medians, events)  # plans the launch; the timed ones reuse it
    expected, _, _ = engine_medians(select_device("cpu"), flat, shape, k, os.cpu_count())
    if not np.array_equal(cupy.asnumpy(medians), expected):
        raise SystemExit(f"error: the CUDA kernel disagrees with the CPU engine on uint16 "
                         f"frames at k={k}; no timing recorded; run dcbg selftest --device "
                         f"cuda")
    seconds = elapsed_seconds(lambda: launcher.launch(frames, medians, events), LAUNCHES)
    rows = [{"label": "dcbg CUDA kernel uint16", "events": events, "k": k,
             "seconds": seconds}]
    ndimage = importlib.import_module("cupyx.scipy.ndimage")
    peer_frames = min(len(flat), max(2 * k, peer_pixel_outputs // pixels))
    subset = frames[:peer_frames].reshape(peer_frames, *shape)
    seconds = median_seconds(lambda: ndimage.median_filter(subset, size=(k, 1, 1)),
                             peer_repeats)
    rows.append({"label": "cupyx median_filter uint16 (size=(k,1,1))", "events": peer_frames,
                 "k": k, "seconds": seconds})
    return rates(rows, shape, "uint16")


def torch_rows(stack: np.ndarray, k: int, wanted: int, peer_repeats: int) -> list[dict]:
    """torch's unfold + kthvalue on `wanted` windows of the same device, where they fit"""
    try:
        import torch
    except ImportError:
        print(f"k={k}: torch is not installed; its row is skipped", file=sys.stderr)
        return []
    if not torch.cuda.is_available():
        print(f"k={k}: torch has no CUDA here; its row is skipped", file=sys.stderr)
        return []
    free, _ = torch.cuda.mem_get_info(0)
    windows = torch_windows(free, k, wanted)
    if windows < TORCH_MIN_WINDOWS:
        print(f"k={k}: torch's copy of {TORCH_MIN_WINDOWS} windows needs "
              f"{TORCH_MIN_WINDOWS * PIXELS * k / 2**30:.1f} GiB, more than "
              f"{TORCH_MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free; its row is "
              f"skipped", file=sys.stderr)
        return []
    try:
        seconds = torch_seconds(stack[:windows + k - 1], k, peer_repeats)
    finally:
        torch.cuda.empty_cache()  # the next steps get the device's memory back
    return [{"label": "torch unfold+kthvalue", "events": windows, "k": k, "seconds": seconds}]


def torch_seconds(frames: np.ndarray, k: int, repeats: int) -> float:
    """Median seconds of torch's unfold + kthvalue over every window of `frames`"""
    import torch
    tensor = torch.as_tensor(frames.reshape(len(frames), -1), device="cuda:0")
    return median_seconds(  # (windows, pixels, k) -> (windows, pixels)
        lambda: tensor.unfold(0, k, 1).kthvalue(k // 2 + 1, dim=-1).values, repeats)


def h100_blocks_per_sm(kernel: str, block: int, shared_mem: int) -> int:
    """Resident blocks per SM of an sm_90 GPU (228 KiB of shared memory per SM, 1 KiB of
    it reserved per block, 2048 threads, 32 blocks), as CUDA's occupancy calculator says"""
    return min(228 * 1024 // (shared_mem + 1024), 2048 // block, 32)


def process_cpu_seconds() -> float:
    """CPU seconds (user and system) of every thread of this process so far"""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def verification_cost(recording: pathlib.Path, background: pathlib.Path, kernel_size: int,
                      mode: str = "sample") -> dict:
    """CPU seconds of the check of a GPU's results per batch, against reading and writing

    Runs on the CPU alone. The check: for every device batch of the
    recording, as the CUDA engine plans them (:data:`DEVICE_BATCH_LIMIT`
    windows, the launch plan an H100 gets, whose thread blocks decide the
    sample), the copy of the sampled pixels of its frames and the
    recomputation and comparison with its medians (the CPU's, so every
    check passes), in this thread's CPU seconds. The rest of a GPU run's CPU
    time: the parallel I/O floor, reading and decoding the recording and
    encoding and writing the background with every CPU, in the process's CPU
    seconds. Both with the same reader and writer as a run.
    """
    import h5py

    from dcbg.engines.batches import plan_windows
    from dcbg.engines.cudakernel import plan_launch
    from dcbg.engines.cudamemory import DEVICE_BATCH_LIMIT
    from dcbg.engines.verification import ResultCheck
    from dcbg.rtdc.reader import ImageSource
    from iocases import io_floor, load_background

    cpus = os.cpu_count()
    bg = load_background(background)
    with tempfile.TemporaryDirectory(prefix="dcbg-bench-verify-") as folder:
        cpu0, t0 = process_cpu_seconds(), time.perf_counter()
        io_floor(recording, bg, pathlib.Path(folder) / "out.rtdc", cpus)
        io_cpu, io_wall = process_cpu_seconds() - cpu0, time.perf_counter() - t0
    count = len(bg)
    medians = bg.reshape(count, -1)
    pixels = medians.shape[1]
    check = ResultCheck(mode, kernel_size, bg.shape[1:], 0)
    windows = count - kernel_size
    batches = plan_windows(0, windows, kernel_size, DEVICE_BATCH_LIMIT)
    check_cpu, columns = 0.0, []
    with h5py.File(recording) as h5:
        source = ImageSource(h5["events/image"])
        frames = np.empty((DEVICE_BATCH_LIMIT + kernel_size - 1, pixels), np.uint8)
        for batch in batches:
            source.read_into(batch.start, batch.input_stop, frames)  # not timed
            block = plan_launch(pixels, batch.output_size, kernel_size, h100_blocks_per_sm,
                                132).block
            t0 = time.thread_time()
            sample = check.take_frames(frames[:batch.input_size], block, batch.start)
            check.check(sample, medians[batch.start:batch.start + batch.output_size],
                        batch.start)
            check_cpu += time.thread_time() - t0
            columns.append(pixels if sample.columns is None else len(sample.columns))
    share = check_cpu / (check_cpu + io_cpu)
    return {"events": count, "k": kernel_size, "batches": len(batches), "mode": mode,
            "sampled_pixels": f"{min(columns)}-{max(columns)} of {pixels}",
            "check_cpu_s": check_cpu, "io_cpu_s": io_cpu, "io_wall_s": io_wall,
            "check_ms_per_batch": 1e3 * check_cpu / len(batches),
            "io_ms_per_batch": 1e3 * io_cpu * DEVICE_BATCH_LIMIT / count,
            "share_percent": 100 * share, "pixel_outputs": check.pixel_outputs}


def verify_cost_main(args):
    """--verify-cost: the check's CPU cost on a synthetic recording, as a table"""
    from dcbg.rollmed import BackgroundRollMed
    from dcbg.synthetic import write_synthetic_rtdc
    with tempfile.TemporaryDirectory(prefix="dcbg-bench-verify-") as scratch:
        folder = pathlib.Path(scratch)
        if args.recording:
            recording = args.recording
        else:
            recording = write_synthetic_rtdc(folder / "rec.rtdc", args.file_events)
        background = folder / "rec_bg.rtdc"
        with BackgroundRollMed(recording, background, kernel_size=100, device="cpu") as bg:
            bg.process()
        rows = [verification_cost(recording, background, 100, mode)
                for mode in ("sample", "all")]
    body = table(rows, [("mode", "verify"), ("events", "N"), ("k", "k"),
                        ("batches", "device batches"), ("sampled_pixels", "pixels checked"),
                        ("check_ms_per_batch", "check, CPU ms per batch"),
                        ("io_ms_per_batch", "read + write, CPU ms per batch"),
                        ("share_percent", "check ÷ run's CPU time, %")])
    notes = ("No GPU involved. Check: the copy of the sampled pixels of each device batch's "
             "frames, the CPU kernel on them and the comparison with the batch's medians, in "
             "CPU seconds of its thread; batches of the CUDA engine's limit, the sample from "
             "an H100's launch plan. Read + write: the parallel I/O floor (read and decode "
             "the recording, encode and write its background, zstd-5, every CPU), in CPU "
             "seconds of the process, per batch of the same length. The share is check ÷ "
             "(check + read + write): the CPU time of a GPU run, whose median runs on the "
             "GPU.")
    if args.no_append:
        print(f"{body}\n\n{notes}")
    else:
        append_results("Verification of GPU results: CPU cost",
                       "python benchmarks/bench_cuda.py " + " ".join(sys.argv[1:]), body,
                       notes)


def run_case(case: dict) -> dict:
    """One file-to-file measurement in this process, which runs nothing else"""
    kind = case["kind"]
    with tempfile.TemporaryDirectory(prefix="dcbg-bench-cuda-") as folder:
        out = pathlib.Path(folder) / "out.rtdc"
        if kind == "io_floor":
            from iocases import io_floor, load_background
            seconds = io_floor(pathlib.Path(case["file"]), load_background(case["bg"]), out,
                               case["threads"])
            stages = {}
        else:
            command = [sys.executable, "-m", "dcbg", "compute", case["file"], str(out),
                       "--device", case["device"], "--num-cpus", str(case["num_cpus"])]
            t0 = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if done.returncode != 0:
                raise SystemExit(f"error: {' '.join(command)} exited with code "
                                 f"{done.returncode}:\n{done.stderr[-3000:]}")
            stages = run_log_seconds(out)
    events = case["events"]
    # the floor runs in this process, a command in its only child
    who = resource.RUSAGE_SELF if kind == "io_floor" else resource.RUSAGE_CHILDREN
    peak = resource.getrusage(who).ru_maxrss
    return {**case, "seconds": round(seconds, 3), "events_per_s": events / seconds,
            "stages": stages, "rss_main_mib": round(peak / 1024)}


def run_log_seconds(path: pathlib.Path) -> dict:
    """Seconds per stage that the run log of an output records"""
    import h5py

    from dcbg.runlog import read_run_logs
    with h5py.File(path) as h5:
        return read_run_logs(h5)[-1][1]["seconds"]


def write_background(recording: pathlib.Path, background: pathlib.Path):
    """The recording's image_bg, computed on the GPU: what the I/O floor writes"""
    command = [sys.executable, "-m", "dcbg", "compute", str(recording), str(background),
               "--device", "cuda", "--force"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} exited with code {done.returncode}:\n"
                         f"{done.stderr[-3000:]}")


def file_rows(recording: pathlib.Path, events: int, folder: pathlib.Path) -> list[dict]:
    """The parallel I/O floor and both whole commands, each in a new process"""
    cpus = os.cpu_count()
    background = folder / "rec_bg.rtdc"
    write_background(recording, background)
    files = {"events": events, "file": str(recording), "bg": str(background),
             "num_cpus": cpus, "k": 100}
    module = pathlib.Path(__file__).stem
    floor = run_isolated(module, {"kind": "io_floor", "threads": cpus, **files})
    floor["label"] = f"parallel I/O floor .rtdc -> .rtdc, {cpus} threads (no median)"
    rows = [floor]
    for device in ("cuda", "cpu"):
        row = run_isolated(module, {"kind": "command", "device": device, **files})
        row["label"] = f"dcbg compute --device {device}, whole command, {cpus} CPUs"
        row["ratio"] = row["events_per_s"] / floor["events_per_s"]
        rows.append(row)
    return rows


def recording_events(path: pathlib.Path) -> int:
    """Events of an existing recording"""
    import h5py
    with h5py.File(path) as h5:
        return len(h5["events/image"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--events", type=int, default=10000,
                        help="windows of the kernel runs (default 10000)")
    parser.add_argument("--kernel-sizes", default="10,100,1000")
    parser.add_argument("--file-events", type=int, default=20000,
                        help="events of the synthetic recording (default 20000)")
    parser.add_argument("--recording", type=pathlib.Path,
                        help="use this .rtdc recording (80x320, zstd) instead of writing one")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes that run in seconds: checks the script, measures "
                        "nothing (implies --no-append)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows to this file")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--verify-cost", action="store_true",
                        help="measure only the CPU cost of checking a GPU's results (no GPU "
                        "needed; --file-events sets the recording's events, default 10000)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    if args.verify_cost:
        if "--file-events" not in sys.argv:
            args.file_events = 10000
        verify_cost_main(args)
        return
    peer_frames, peer_repeats = PEER_FRAMES, PEER_REPEATS
    shape16, kernel16 = SHAPE16, KERNEL16
    if args.tiny:
        args.events, args.kernel_sizes = TINY["events"], TINY["kernel_sizes"]
        args.file_events, args.no_append = TINY["file_events"], True
        peer_frames, peer_repeats = TINY["peer_frames"], TINY["peer_repeats"]
        shape16, kernel16 = TINY["shape16"], TINY["kernel16"]
    from dcbg.cudaprobe import describe_cuda_devices
    from dcbg.devices import cuda_unavailable_reason
    reason = cuda_unavailable_reason(0)
    if reason:
        raise SystemExit(f"error: no CUDA device to benchmark: {reason}")
    device = ", ".join(f"{d['name']} ({d['memory_total'] / 2**30:.0f} GiB, driver {d['driver']})"
                       for d in describe_cuda_devices()) or "unknown GPU"
    results = {"device": device, "file": [], "stages": {}, "kernel": []}

    def save():  # after each part, so that a benchmark stopped halfway keeps what it measured
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    with tempfile.TemporaryDirectory(prefix="dcbg-bench-gpu-") as scratch:
        folder = pathlib.Path(scratch)
        if args.recording:
            recording, events = args.recording, recording_events(args.recording)
        else:
            from dcbg.synthetic import write_synthetic_rtdc
            recording = write_synthetic_rtdc(folder / "rec.rtdc", args.file_events)
            events = args.file_events
        results["file"] = file_rows(recording, events, folder)
    results["stages"] = results["file"][1]["stages"]
    save()
    print("file-to-file rows done", file=sys.stderr, flush=True)
    kernel_sizes = [int(k) for k in args.kernel_sizes.split(",")]
    stack = TiledStack(args.events + max(kernel_sizes))[:]  # every size takes a prefix
    for k in kernel_sizes:
        results["kernel"] += kernel_rows(stack[:args.events + k], k,
                                         max(peer_frames, 2 * k), peer_repeats)
        save()
        print(f"kernel rows of k={k} done", file=sys.stderr, flush=True)
    # as many pixel-outputs as the 80x320 rows, the peer as many as at k=100 on 80x320
    results["kernel"] += kernel_rows16(args.events * PIXELS, kernel16, shape16,
                                       max(peer_frames, 2 * KERNEL16) * PIXELS, peer_repeats)
    save()
    print(f"kernel rows of uint16 frames at k={kernel16} done", file=sys.stderr, flush=True)
    for row in results["kernel"]:
        row.setdefault("ratio", "")

    kernel_table = table(results["kernel"], [("label", "run"), ("frames", "frames"),
                                             ("events", "N"), ("k", "k"),
                                             ("pix_per_s", "pixel-outputs/s"),
                                             ("ratio", "dcbg kernel ÷ peer")])
    file_table = table(results["file"], [("label", "run"), ("events", "N"),
                                         ("events_per_s", "events/s"),
                                         ("ratio", "÷ parallel I/O floor"),
                                         ("seconds", "wall s"), ("rss_main_mib", "peak RSS MiB")])
    stage_table = table([{"stage": name, "seconds": value}
                         for name, value in results["stages"].items()],
                        [("stage", "CUDA run, stage"), ("seconds", "s")])
    body = f"{kernel_table}\n\n{file_table}\n\n{stage_table}"
    notes = (f"Kernel rows: device memory in and out; the dcbg kernel's output equals the "
             f"CPU engine's, its time is that of {LAUNCHES} launches back to back between "
             f"two CUDA events (after a warm-up launch), the peers' the median of "
             f"{peer_repeats} calls (one where a call takes over {SLOW_CALL_SECONDS} s). "
             f"File rows: zstd-5 in and out, wall time of a new process (interpreter, "
             f"imports, probe and run). Stages overlap, so they add up to more than the total.")
    if args.no_append:
        print(f"CUDA backend on {device}\n\n{body}\n\n{notes}")
    else:
        append_results(f"CUDA backend on {device}",
                       "python benchmarks/bench_cuda.py " + " ".join(sys.argv[1:]), body,
                       notes)

if __name__ == "__main__":
    main()
