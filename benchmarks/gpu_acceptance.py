"""The Python steps of benchmarks/gpu_acceptance.sh, and its report

    python benchmarks/gpu_acceptance.py recording FILE --events N
    python benchmarks/gpu_acceptance.py sanitize [--device-index 0]
    python benchmarks/gpu_acceptance.py cpu-scaling --recording FILE [--workers 1,2,4,8,16]
                                                    [--json FILE]
    python benchmarks/gpu_acceptance.py missing-packages
    python benchmarks/gpu_acceptance.py start --out DIR --work DIR --steps a,b,… --budget S
                                              [--dry-run]
    python benchmarks/gpu_acceptance.py record --out DIR --work DIR --step NAME --status S
                                               --seconds S --exit-code N --command TEXT
                                               [--note TEXT]

``sanitize`` is the program compute-sanitizer runs: one small launch of the
kernel per count width (8, 16 and 32 bits) on arrays of their exact size, and
a run of the engine's whole pipeline on each, compared with the CPU engine.
``cpu-scaling`` times ``dcbg compute --device cpu`` with 1, 2, 4, … workers.
``missing-packages`` names what dcbg and the run need that is not installed.
``start`` and ``record`` keep the run's steps in the work folder
(WORK/steps.jsonl, beside the steps' logs in WORK/logs and the GPU tests'
WORK/gpu-tests.xml) and rewrite DIR/report.md, DIR/report.json and
DIR/logs.tar.gz from them and from the JSON the steps left in DIR
(selftest.json, bench_cuda.json, cpu_scaling.json), so that a run killed
halfway still leaves a report. The report needs nothing but the standard
library.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree

SANITIZE_CASES = ((10, (4, 40), 200), (300, (2, 40), 20), (70_000, (1, 3), 4))
"""(kernel_size, frame shape, windows): one per count width, small enough for racecheck"""

SANITIZE_DTYPES = ("uint8", "uint16")
"""The frames of each case: the histogram kernel's and the 16-bit window kernel's"""

FINE = ("ok", "not present")
"""Step outcomes that pass (a tool the host lacks is no failure of dcbg)"""

LOG_TAIL = 15
"""Lines of a failed step's log that the report quotes"""

LOG_ARCHIVE = "logs.tar.gz"
"""The report folder's archive of every log of the run"""

RUN_MODULES = ("cupy", "pynvml", "pytest")
"""Modules the run's steps import besides dcbg's requirements"""


def write_recording(path: pathlib.Path, events: int):
    """A synthetic 80x320 recording, zstd-compressed, as the file-to-file steps read

    Written under a temporary name and renamed once complete, so that a
    step stopped halfway leaves no file that the benchmarks would take.
    """
    from dcbg.synthetic import write_synthetic_rtdc
    t0 = time.perf_counter()
    partial = path.with_name(f"{path.stem}.partial{path.suffix}")
    partial.unlink(missing_ok=True)
    write_synthetic_rtdc(partial, events)
    os.replace(partial, path)
    print(f"{path}: {events} events in {time.perf_counter() - t0:.1f} s")


def missing_packages(distribution: str = "dcbg", modules=RUN_MODULES) -> list[str]:
    """The requirements of `distribution` that are not installed, and the `modules` that
    do not import"""
    from importlib import metadata, util

    from pip._vendor.packaging.requirements import Requirement
    missing = []
    for line in metadata.requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(requirement.name)
    return missing + [name for name in modules if util.find_spec(name) is None]


def sanitize(device_index: int) -> int:
    """One launch and one pipeline run per count width and kernel family, checked; the
    exit code"""
    import cupy
    import numpy as np

    from dcbg.devices import select_device
    from dcbg.engines.cpu import compute_median_for_slice
    from dcbg.engines.cudacontext import on_device
    from dcbg.engines.cudakernel import launcher_for
    from dcbg.selftest import engine_medians

    # Every array gets its own allocation, not a slice of CuPy's pool, so
    # memcheck sees an access just past an array's end.
    cupy.cuda.set_allocator(None)
    device = select_device(f"cuda:{device_index}")
    rng = np.random.default_rng(7)
    failed = 0
    cases = [(dtype, *case) for dtype in SANITIZE_DTYPES for case in SANITIZE_CASES]
    for dtype, kernel_size, shape, windows in cases:
        pixels = shape[0] * shape[1]
        top = np.iinfo(dtype).max
        frames = rng.integers(0, top + 1, (windows + kernel_size, pixels)).astype(dtype)
        frames[:, 0] = top  # one value fills the whole window
        expected = np.empty((windows, pixels), dtype)
        compute_median_for_slice(frames, expected, kernel_size, windows, slice(0, pixels))
        launcher = launcher_for(device_index, pixels, kernel_size, dtype)
        with on_device(device_index):
            device_frames = cupy.asarray(frames[:windows + kernel_size - 1])
            device_medians = cupy.empty((windows, pixels), dtype)
            launcher.launch(device_frames, device_medians, windows)
            launched = cupy.asnumpy(device_medians)
            plan = launcher.plan(windows)
        piped, _, _ = engine_medians(device, frames, shape, kernel_size, 1)
        for what, medians in (("one launch", launched), ("the pipeline", piped)):
            same = np.array_equal(medians, expected)
            failed += not same
            print(f"{plan.kernel}: k={kernel_size}, {shape[0]}x{shape[1]} frames, {windows} "
                  f"windows, grid {plan.grid} x {plan.block}, {what}: "
                  f"{'same as' if same else 'DIFFERS from'} the CPU engine", flush=True)
    return 1 if failed else 0


def cpu_scaling(recording: pathlib.Path, workers: list[int], report: pathlib.Path | None
                ) -> int:
    """``dcbg compute --device cpu`` with each number of workers; the exit code"""
    import tempfile

    import h5py

    from dcbg.runlog import read_run_logs
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    counts = sorted({count for count in workers if count <= cpus} | {min(cpus, max(workers))})
    with h5py.File(recording) as h5:
        events = len(h5["events/image"])
    rows = []
    print("| workers | events/s | speed-up | median stage s | wall s |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="dcbg-scaling-") as folder:
        out = pathlib.Path(folder) / "out.rtdc"
        for count in counts:
            command = [sys.executable, "-m", "dcbg", "compute", str(recording), str(out),
                       "--device", "cpu", "--num-cpus", str(count), "--force"]
            t0 = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if done.returncode != 0:
                print(f"error: {' '.join(command)} exited with code {done.returncode}:\n"
                      f"{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            with h5py.File(out) as h5:
                stages = read_run_logs(h5)[-1][1]["seconds"]
            row = {"workers": count, "events": events, "seconds": round(seconds, 3),
                   "events_per_s": events / seconds, "median_seconds": stages.get("median")}
            row["speedup"] = row["events_per_s"] / rows[0]["events_per_s"] if rows else 1.0
            rows.append(row)
            print(f"| {count} | {row['events_per_s']:,.0f} | {row['speedup']:.2f} | "
                  f"{row['median_seconds']} | {seconds:.2f} |", flush=True)
    if report is not None:
        report.write_text(json.dumps({"cpus": cpus, "rows": rows}, indent=1))
    return 0


# --- the report ------------------------------------------------------------------------

def read_json(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def log_lines(work: pathlib.Path, step: str) -> list[str]:
    try:
        return (work / "logs" / f"{step}.log").read_text(errors="replace").splitlines()
    except OSError:
        return []


def matching(lines: list[str], pattern: str) -> list[str]:
    return [line.strip() for line in lines if re.search(pattern, line)]


def selftest_numbers(out: pathlib.Path) -> dict:
    data = read_json(out / "selftest.json")
    if data is None:
        return {}
    numbers = {"verdict": data.get("verdict")}
    for row in data.get("rows", []):
        if row["check"] == "load kernel":
            numbers[f"{row['device']} load kernel s"] = round(row["seconds"], 2)
        elif row["check"] == "median" and row.get("pixel_outputs_per_s"):
            # RT-DC's uint8 frames unnamed, as before other dtypes were tested
            dtype = "" if row.get("dtype", "uint8") == "uint8" else f" {row['dtype']}"
            numbers[f"{row['device']} pixel-outputs/s k={row['kernel_size']}{dtype}"] = float(
                f"{row['pixel_outputs_per_s']:.3g}")
        elif row["check"] == "file to file" and row.get("events_per_s"):
            numbers[f"{row['device']} file to file events/s"] = round(row["events_per_s"])
    return numbers


def junit_numbers(work: pathlib.Path) -> dict:
    try:
        root = ElementTree.parse(work / "gpu-tests.xml").getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def sanitizer_numbers(lines: list[str]) -> dict:
    checks = matching(lines, r"(same as|DIFFERS from) the CPU engine")
    same = sum("same as" in line for line in checks)
    return {"sanitizer": matching(lines, r"ERROR SUMMARY|not present")[:1],
            "checks": f"{same} of {len(checks)} the same as the CPU engine"}


def bench_numbers(out: pathlib.Path) -> dict:
    data = read_json(out / "bench_cuda.json")
    if data is None:
        return {}
    numbers = {}
    for row in data.get("kernel", []):
        label = row["label"].split("(")[0].strip()
        numbers[f"{label} k={row['k']} pixel-outputs/s"] = float(f"{row['pix_per_s']:.3g}")
        if row.get("ratio"):
            numbers[f"dcbg ÷ {label} k={row['k']}"] = round(row["ratio"], 1)
    for row in data.get("file", []):
        numbers[f"{row['label'].split(',')[0]} events/s"] = round(row["events_per_s"])
    return numbers


def scaling_numbers(out: pathlib.Path) -> dict:
    data = read_json(out / "cpu_scaling.json")
    if data is None:
        return {}
    return {f"{row['workers']} workers events/s": round(row["events_per_s"])
            for row in data.get("rows", [])}


def step_numbers(out: pathlib.Path, work: pathlib.Path, step: str) -> dict:
    """The key numbers of a step, from what it left in the report and work folders"""
    lines = log_lines(work, step)
    if step == "install":
        return {"installed": matching(lines, r"^Successfully installed|^no wheels"),
                "missing": matching(lines, r"^missing packages:"),
                "python headers": matching(lines, r"^Python.h not found"),
                "cpu kernels": matching(lines, r"^CPU kernels:")}
    if step == "nvidia_smi":
        return {"gpus": matching(lines, r"^GPU \d+:")}
    if step == "info":
        return {"lines": matching(lines, r"^(auto picks|WARNING)")}
    if step == "selftest":
        return selftest_numbers(out)
    if step == "gpu_tests":
        return junit_numbers(work) or {"summary": (lines or [""])[-1]}
    if step in ("memcheck", "racecheck"):
        return sanitizer_numbers(lines)
    if step == "bench_cuda":
        return bench_numbers(out)
    if step == "cpu_scaling":
        return scaling_numbers(out)
    return {"last line": (lines or [""])[-1]}


def device_name(out: pathlib.Path, work: pathlib.Path, dry_run: bool) -> str:
    """The GPU, as the selftest, nvidia-smi or dcbg info saw it"""
    selftest = read_json(out / "selftest.json") or {}
    names = [gpu["name"] for gpu in selftest.get("gpus", [])]
    names = names or [re.sub(r"^GPU \d+: |\s*\(UUID.*$", "", line)
                      for line in matching(log_lines(work, "nvidia_smi"), r"^GPU \d+:")]
    names = names or [line.split(": ", 1)[1].split(",")[0]
                      for line in matching(log_lines(work, "info"), r"^GPU \d")]
    name = ", ".join(names) or "unknown (no step saw a GPU)"
    return f"{name} (CuPy stand-in)" if dry_run else name


def write_report(out: pathlib.Path, work: pathlib.Path):
    """report.json, report.md and the logs' archive from the run's steps so far"""
    run = read_json(work / "run.json") or {}
    records = {}
    steps_file = work / "steps.jsonl"
    if steps_file.exists():
        for line in steps_file.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["step"]] = record
    steps = []
    for name in run.get("steps", list(records)):
        record = records.get(name, {"step": name, "status": "not run"})
        if name in records:
            record["numbers"] = step_numbers(out, work, name)
            record["log"] = f"{LOG_ARCHIVE}: logs/{name}.log"
        steps.append(record)
    statuses = [step["status"] for step in steps]
    if any(status not in FINE + ("not run",) for status in statuses):
        verdict = "FAIL"
    elif "not run" in statuses:
        verdict = "INCOMPLETE"
    else:
        verdict = "PASS"
    dry_run = bool(run.get("dry_run"))
    report = {
        "title": "dcbg GPU acceptance" + (" (dry run)" if dry_run else ""),
        "verdict": verdict, "dry_run": dry_run, "device": device_name(out, work, dry_run),
        "host": run.get("host"), "started": run.get("started"),
        "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(sum(step.get("seconds", 0) for step in steps), 1),
        "budget_seconds": run.get("budget"), "steps": steps}
    pack_logs(out, work)
    replace_text(out / "report.json", json.dumps(report, indent=1, ensure_ascii=False))
    replace_text(out / "report.md", markdown(report, work))


def replace_text(path: pathlib.Path, text: str):
    """Write a file under a temporary name and rename it: a kill leaves the old or the new"""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def pack_logs(out: pathlib.Path, work: pathlib.Path):
    """Every log of the run so far, and the GPU tests' JUnit XML, in one archive of `out`"""
    partial = out / f".{LOG_ARCHIVE}.partial"
    with tarfile.open(partial, "w:gz") as archive:
        for path in sorted((work / "logs").glob("*.log")):
            archive.add(path, f"logs/{path.name}")
        if (work / "gpu-tests.xml").exists():
            archive.add(work / "gpu-tests.xml", "logs/gpu-tests.xml")
    os.replace(partial, out / LOG_ARCHIVE)


def markdown(report: dict, work: pathlib.Path) -> str:
    lines = [f"# {report['title']}: {report['verdict']}", "",
             f"- device: {report['device']}", f"- host: {report['host']}",
             f"- started: {report['started']}, report written {report['updated']}",
             f"- steps took {report['seconds']} s of the {report['budget_seconds']} s budget",
             "", "| step | status | s | key numbers |", "|---|---|---|---|"]
    for step in report["steps"]:
        numbers = "; ".join(f"{key}: {shown(value)}"
                            for key, value in step.get("numbers", {}).items() if value)
        note = f" ({step['note']})" if step.get("note") else ""
        lines.append(f"| {step['step']} | {step['status']}{note} | {step.get('seconds', '')} | "
                     f"{numbers.replace('|', '/')} |")
    for step in report["steps"]:
        if step["status"] not in FINE + ("not run",):
            tail = log_lines(work, step["step"])[-LOG_TAIL:]
            lines += ["", f"## {step['step']}: {step['status']}", "",
                      f"`{step.get('command', '')}` exited with code {step.get('exit_code')}; "
                      f"the end of {step.get('log')}:", "", "```", *tail, "```"]
    lines += ["", f"Each step's whole output is logs/<step>.log in {LOG_ARCHIVE}."]
    return "\n".join(lines) + "\n"


def shown(value) -> str:
    """A key number as the report's table shows it"""
    if isinstance(value, list):
        return ", ".join(value)
    if isinstance(value, float) and abs(value) >= 1e6:
        return f"{value:.3g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def start(out: pathlib.Path, work: pathlib.Path, steps: list[str], budget: int,
          dry_run: bool):
    """Begin a run's report: its plan, and every step not run yet"""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "steps.jsonl").write_text("")
    run = {"steps": steps, "budget": budget, "dry_run": dry_run,
           "host": f"{os.uname().nodename}, {os.cpu_count()} CPUs, Python "
                   f"{sys.version.split()[0]}",
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds")}
    (work / "run.json").write_text(json.dumps(run, indent=1))
    write_report(out, work)


def record(out: pathlib.Path, work: pathlib.Path, entry: dict):
    """Add one step's outcome and rewrite the report"""
    with (work / "steps.jsonl").open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
    write_report(out, work)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    recording = sub.add_parser("recording", help="write a synthetic recording")
    recording.add_argument("path", type=pathlib.Path)
    recording.add_argument("--events", type=int, required=True)
    sanitizer = sub.add_parser("sanitize", help="small launches for compute-sanitizer")
    sanitizer.add_argument("--device-index", type=int, default=0)
    scaling = sub.add_parser("cpu-scaling", help="dcbg compute --device cpu, 1 … N workers")
    scaling.add_argument("--recording", type=pathlib.Path, required=True)
    scaling.add_argument("--workers", default="1,2,4,8,16")
    scaling.add_argument("--json", type=pathlib.Path)
    sub.add_parser("missing-packages", help="name what dcbg and the run lack")
    begin = sub.add_parser("start", help="begin the report of a run")
    begin.add_argument("--out", type=pathlib.Path, required=True)
    begin.add_argument("--work", type=pathlib.Path, required=True)
    begin.add_argument("--steps", required=True)
    begin.add_argument("--budget", type=int, required=True)
    begin.add_argument("--dry-run", action="store_true")
    entry = sub.add_parser("record", help="add a step's outcome to the report")
    entry.add_argument("--out", type=pathlib.Path, required=True)
    entry.add_argument("--work", type=pathlib.Path, required=True)
    entry.add_argument("--step", required=True)
    entry.add_argument("--status", required=True)
    entry.add_argument("--seconds", type=float, required=True)
    entry.add_argument("--exit-code", type=int, required=True)
    entry.add_argument("--command", default="")
    entry.add_argument("--note", default="")
    args = parser.parse_args()
    if args.command == "recording":
        write_recording(args.path, args.events)
    elif args.command == "sanitize":
        return sanitize(args.device_index)
    elif args.command == "cpu-scaling":
        return cpu_scaling(args.recording, [int(w) for w in args.workers.split(",")],
                           args.json)
    elif args.command == "missing-packages":
        missing = missing_packages()
        if missing:
            print(f"missing packages: {', '.join(missing)} (add their wheels to .whl/; the "
                  f"steps that need them fail)")
            return 1
        print("every package dcbg and the run need is installed")
    elif args.command == "start":
        start(args.out, args.work, args.steps.split(","), args.budget, args.dry_run)
    else:
        record(args.out, args.work, {"step": args.step, "status": args.status,
                          "seconds": round(args.seconds, 1), "exit_code": args.exit_code,
                          "command": args.command, "note": args.note})
    return 0


if __name__ == "__main__":
    sys.exit(main())
