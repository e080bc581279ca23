"""The ``dcbg`` command line: compute, demo, preview, info, chipstream"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import pathlib
import sys
import threading

from ._version import __version__
from .base import Background, get_available_background_methods
from .devices import DEVICE_ENV, auto_choice, select_device
from .errors import OutputExistsError, first_line, sigterm_raises
from .jobs import FileResult, JobSettings, compute_file, run_on_dask, run_sequential, summary_table
from .ppid import ppid_to_kwargs, split_ppid
from .rtdc.hdf5 import GENERATION_ATTRIBUTE, PPID_ATTRIBUTE
from .rtdc.output import check_output_path
from .rtdc.writer import compression_kwargs
from .system import skip_numba_blas_probe

DEMO_EVENTS = 5000

DEMO_FOLDER = "dcbg-demo"
"""Folder of the demo's files, in the current folder, where the user finds them"""

DEFAULT_METHOD = "rollmed"


class UsageError(Exception):
    """A command-line usage error (exit code 2)"""


def keyword_entries(items: list[str]) -> list[tuple[str, str]]:
    """Split ``["kernel_size=100", …]`` into (key, value) pairs, in the order given"""
    entries = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or "^" in item:
            raise UsageError(f"-kb takes one KEY=VALUE, got '{item}'")
        entries.append((key.strip(), value.strip()))
    return entries


def method_and_kwargs(args) -> tuple[type[Background], dict]:
    """The background class and its keyword arguments from -b/-kb/--ppid

    -kb entries are read exactly like the keyword part of a PPID, so both
    refuse unknown and repeated keywords with the same message.
    """
    methods = get_available_background_methods()
    if args.ppid:
        if args.kb:
            raise UsageError("give either --ppid or -kb, not both")
        code, _ = split_ppid(args.ppid)
        if args.method is not None and args.method != code:
            raise UsageError(f"--ppid names the method '{code}' but -b names "
                             f"'{args.method}'; give only one of them")
        kwargs = Background.get_ppkw_from_ppid(args.ppid)
    else:
        code = args.method or DEFAULT_METHOD
        if code not in methods:
            raise UsageError(f"unknown method '{code}'; available: {sorted(methods)}")
        kwargs = ppid_to_kwargs(methods[code].check_user_kwargs,
                                "^".join(f"{k}={v}" for k, v in keyword_entries(args.kb)))
    cls = methods[code]
    cls.check_user_kwargs(**kwargs)
    return cls, kwargs


def default_output(path_in: pathlib.Path) -> pathlib.Path:
    """``<stem>_bg.rtdc`` beside the input"""
    return path_in.with_name(f"{path_in.stem}_bg.rtdc")


def collect_jobs(args) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """Input/output pairs for `dcbg compute`"""
    path_in = pathlib.Path(args.path_in)
    if args.recursive:
        if not path_in.is_dir():
            raise UsageError(f"--recursive needs a folder, but {path_in} is not one")
        if args.path_out:
            raise UsageError("PATH_OUT cannot be combined with --recursive")
        inputs = sorted(p for p in path_in.rglob("*.rtdc") if p.is_file()
                        and not p.name.endswith("_bg.rtdc") and not p.name.startswith("."))
        if not inputs:
            raise RuntimeError(f"no .rtdc files found below {path_in}")
    else:
        if path_in.is_dir():
            raise UsageError(f"{path_in} is a folder; add -r to process every .rtdc in it")
        inputs = [path_in]
    jobs = []
    for source in inputs:
        if args.in_place:
            if args.path_out:
                raise UsageError("PATH_OUT cannot be combined with --in-place")
            target = source
        else:
            target = pathlib.Path(args.path_out) if args.path_out else default_output(source)
            if target.exists() and source.exists() and target.samefile(source):
                raise UsageError(f"PATH_OUT {target} is the input file; add --in-place to "
                                 f"write image_bg into it, or choose another output")
        jobs.append((source, target))
    return jobs


class ProgressBar:
    """tqdm progress bar fed from a polling thread (terminal only)"""

    def __init__(self, background: Background, label: str):
        self.background = background
        self.enabled = sys.stderr.isatty()
        self.stop = threading.Event()
        self.label = label
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from tqdm import tqdm
        total = self.background.image_count
        with tqdm(total=total, desc=self.label, unit="ev", file=sys.stderr,
                  leave=False) as bar:
            while not self.stop.wait(0.2):
                bar.n = int(self.background.get_progress() * total)
                bar.refresh()

    def __enter__(self):
        if self.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.enabled:
            self.thread.join()


def summary_line(events: int, seconds: float, device, ppid: str) -> str:
    """The final line of a run"""
    rate = events / seconds if seconds > 0 else float("inf")
    return (f"{events} events in {seconds:.2f} s ({rate:,.0f} events/s) "
            f"on {device}, PPID {ppid}")


def progress_bar(background: Background) -> ProgressBar:
    """A progress bar for one file, labelled with the input's name"""
    label = background.hdin.path.name if background.hdin is not None else "stack"
    return ProgressBar(background, label)


def result_line(result: FileResult) -> str:
    """The line printed when one file is done"""
    if not result.ok:
        return f"{result.source}: FAILED: {result.message}"
    if result.skipped:
        return f"{result.source}: skipped: {result.message}"
    line = summary_line(result.events, result.seconds, result.device, result.ppid)
    return f"{result.target}: {line}"


def cmd_compute(args) -> int:
    cls, kwargs = method_and_kwargs(args)
    compression_kwargs(args.compress)  # reject bad values before any work
    select_ppid = cls.get_ppid_from_ppkw(kwargs)
    jobs = collect_jobs(args)
    skipped = []
    if not args.in_place:
        if not args.recursive:
            check_output_path(jobs[0][1])
        existing = [job for job in jobs if job[1].is_file() and not args.force]
        if existing and not args.recursive:
            raise OutputExistsError(f"{existing[0][1]} exists; add --force to replace it")
        skipped = [FileResult(str(source), str(target), True, skipped=True,
                              message="output exists; add --force to replace it")
                   for source, target in existing]
        jobs = [job for job in jobs if job not in existing]
    if args.dry_run:
        if args.dask:
            print(f"dask: {args.dask} (one task per file, {args.retries} retries)")
        else:
            device = select_device(args.device)
            print(f"device: {device} ({device.reason})")
        for source, target in jobs:
            print(f"{source} -> {target}")
        print(select_ppid)
        return 0
    settings = JobSettings(cls.get_ppid_code(), kwargs, args.compress, args.device,
                           args.num_cpus, args.io_threads)

    def report(result):
        print(result_line(result), flush=True)

    for result in skipped:
        report(result)
    if args.dask:
        results = run_on_dask(jobs, settings, args.dask, args.retries, on_result=report)
    elif args.recursive:
        results = run_sequential(jobs, settings, progress_bar, on_result=report)
    else:
        (source, target), = jobs
        report(compute_file(source, target, settings, progress_bar,
                            report_final_errors=False))
        return 0
    results = sorted(skipped + results, key=lambda result: result.source)
    print(summary_table(results))
    failed = sum(not result.ok for result in results)
    if failed:
        print(f"error: {failed} of {len(results)} files failed; see the table above",
              file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    from .rollmed import BackgroundRollMed
    from .synthetic import write_synthetic_rtdc
    folder = pathlib.Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "demo.rtdc"
    print(f"Synthesizing {args.events} frames of 80x320 in {source} …")
    write_synthetic_rtdc(source, args.events)
    settings = JobSettings(BackgroundRollMed.get_ppid_code(),
                           {"kernel_size": 100, "batch_size": 10000}, "zstd-5", args.device,
                           args.num_cpus, args.io_threads)
    target = default_output(source)
    print(result_line(compute_file(source, target, settings, progress_bar,
                                   report_final_errors=False)))
    print(f"Look at it: dcbg preview {target}")
    return 0


def cmd_chipstream(args) -> int:
    from .chipstream import run_chipstream
    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    return run_chipstream(arguments, args.device, args.io_threads)


def cmd_preview(args) -> int:
    from .preview import write_preview
    output = write_preview(args.path, args.output, args.events, args.row)
    print(f"{output}")
    return 0


def describe_file(path: pathlib.Path):
    """Print what an .rtdc file carries: images, background, PPID, run logs, basins"""
    from .rtdc.basins import basin_candidates, read_basin_definitions
    from .rtdc.reader import RTDCInput
    from .runlog import read_run_logs
    with RTDCInput(path) as rtdc_in:
        image = rtdc_in.image
        where = "" if rtdc_in.image_path == path else f" (through basin {rtdc_in.image_path})"
        print(f"{path}: {image.shape[0]} events of {image.shape[1]}x{image.shape[2]} "
              f"pixels{where}")
        h5 = rtdc_in.h5
        if "events" in h5 and "image_bg" in h5["events"]:
            attrs = h5["events/image_bg"].attrs
            ppid = attrs.get(PPID_ATTRIBUTE, "none recorded")
            generation = attrs.get(GENERATION_ATTRIBUTE, "?")
            print(f"image_bg: PPID {ppid} (generation {generation})")
        else:
            print("image_bg: none in this file")
        for definition in read_basin_definitions(h5):
            paths = definition.get("paths", [])
            exists = any(p.exists() for p in basin_candidates(definition, path.parent))
            print(f"basin {definition.get('name')!r}: {definition.get('type')}/"
                  f"{definition.get('format')}, {paths[0] if paths else 'no path'}"
                  f"{'' if exists else ' (missing)'}")
        logs = read_run_logs(h5)
        for name, record in logs:
            seconds = record.get("seconds", {})
            device = " ".join(str(record[k]) for k in ("device", "name") if record.get(k))
            print(f"log {name}: {record.get('software')}, {record.get('ppid')}, "
                  f"{record.get('events')} events on {device} "
                  f"in {seconds.get('total', '?')} s, host "
                  f"{record.get('host')}, warnings: {len(record.get('warnings', []))}")
        others = sorted(set(h5.get("logs", {})) - {name for name, _ in logs})
        if others:
            print(f"other logs: {', '.join(others)}")


def cmd_info(args) -> int:
    if args.path:
        describe_file(pathlib.Path(args.path))
        return 0
    print(f"dcbg {__version__}")
    print(f"python {sys.version.split()[0]}, CPUs available: {os.cpu_count()}")
    from .cpukernels import describe_build
    print(f"CPU kernels: {describe_build()}")
    from .cudaprobe import describe_cuda_devices
    devices = describe_cuda_devices()
    if not devices:
        print("NVIDIA GPUs: none found (pynvml missing or no driver)")
    for dev in devices:
        ordinal = "" if dev["cuda_index"] is None else f" (cuda:{dev['cuda_index']})"
        print(f"GPU {dev['index']}{ordinal}: {dev['name']}, PCI {dev['bus_id']}, "
              f"{dev['memory_free'] / 2**30:.1f} of {dev['memory_total'] / 2**30:.1f} GiB "
              f"free, driver {dev['driver']}")
    if os.environ.get(DEVICE_ENV):
        print(f"{DEVICE_ENV}={os.environ[DEVICE_ENV]}")
        try:
            device = select_device("auto")
            print(f"{DEVICE_ENV} picks: {device} ({device.reason})")
        except (ValueError, RuntimeError) as error:
            print(f"{DEVICE_ENV} picks: nothing usable ({first_line(error)})")
    choice, warning = auto_choice()
    print(f"auto picks: {choice} ({choice.reason})")
    if warning:
        print(f"WARNING: {warning}")
    print(f"methods: {', '.join(sorted(get_available_background_methods()))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcbg", description="Rolling-median background images for RT-DC recordings.")
    parser.add_argument("--version", action="version", version=f"dcbg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--device", default="auto",
                       help="auto (default), cpu, cuda, cuda:N or cuda:all")
        p.add_argument("--num-cpus", type=int, default=None,
                       help="CPU workers for the median (default: all available)")
        p.add_argument("--io-threads", type=int, default=None,
                       help="threads that decode and encode HDF5 chunks (default: "
                       "$DCBG_IO_THREADS or all CPUs available)")
        p.add_argument("--verbose", action="store_true", help="log details, show tracebacks")

    compute = sub.add_parser("compute", help="compute image_bg for a file or folder")
    compute.add_argument("path_in", metavar="PATH_IN",
                         help="input .rtdc file (or, with -r, a folder of them)")
    compute.add_argument("path_out", metavar="PATH_OUT", nargs="?",
                         help="output .rtdc file (default: <stem>_bg.rtdc beside the input)")
    compute.add_argument("-b", "--background-method", dest="method",
                         help=f"background method (default: {DEFAULT_METHOD})")
    compute.add_argument("-kb", "--kwargs-background", dest="kb", action="append", default=[],
                         metavar="KEY=VALUE", help="method keyword, e.g. kernel_size=100")
    compute.add_argument("--ppid",
                         help="method and keywords as a PPID, e.g. rollmed:k=100^b=10000")
    compute.add_argument("-c", "--compression", dest="compress", default="zstd-5",
                         help="zstd-1 … zstd-9 or none (default zstd-5)")
    compute.add_argument("--in-place", action="store_true",
                         help="write image_bg into the input file")
    compute.add_argument("--force", action="store_true", help="replace existing outputs")
    compute.add_argument("-r", "--recursive", action="store_true",
                         help="process every .rtdc below the folder PATH_IN")
    compute.add_argument("--dask", metavar="ADDRESS",
                         help="send one task per file to a Dask scheduler (tcp://host:8786), "
                         "or to a cluster started here: local or local:N")
    compute.add_argument("--retries", type=int, default=2,
                         help="with --dask: how often a failed task is retried (default 2)")
    compute.add_argument("--dry-run", action="store_true",
                         help="print what would be done and the PPID, compute nothing")
    common(compute)
    compute.set_defaults(func=cmd_compute, runs_kernels=True)

    demo = sub.add_parser("demo", help="synthesize a recording and compute its background")
    demo.add_argument("--events", type=int, default=DEMO_EVENTS)
    demo.add_argument("--folder", default=DEMO_FOLDER,
                      help=f"where to put the files (default: ./{DEMO_FOLDER}, reused by "
                      f"every demo)")
    common(demo)
    demo.set_defaults(func=cmd_demo, runs_kernels=True)

    preview = sub.add_parser(
        "preview", help="PNG of raw frames, backgrounds and corrected frames of a file")
    preview.add_argument("path", metavar="FILE", help=".rtdc file with image and image_bg")
    preview.add_argument("-e", "--event", dest="events", type=int, action="append",
                         metavar="EVENT", help="event to show (repeat; default: three)")
    preview.add_argument("-o", "--output", help="PNG path (default: <stem>_preview.png)")
    preview.add_argument("--row", type=int, help="pixel row of the time strip (default: "
                         "the middle row)")
    preview.add_argument("--verbose", action="store_true", help="show tracebacks")
    preview.set_defaults(func=cmd_preview)

    chip = sub.add_parser(
        "chipstream", help="run ChipStream's command line with its rollmed background on dcbg",
        description="Run chipstream-cli with the arguments after '--', its '-b rollmed' "
        "background computed by dcbg (ChipStream's options, outputs and exit codes are its "
        "own), e.g. dcbg chipstream --device cuda -- -b rollmed -kb kernel_size=100 "
        "data.rtdc")
    chip.add_argument("--device", help="dcbg's device for the background (default: "
                      "$DCBG_DEVICE or auto)")
    chip.add_argument("--io-threads", type=int, help="dcbg's chunk codec threads (default: "
                      "$DCBG_IO_THREADS or all CPUs available)")
    chip.add_argument("--verbose", action="store_true", help="show tracebacks")
    chip.add_argument("arguments", nargs=argparse.REMAINDER, metavar="-- ARGUMENTS",
                      help="chipstream-cli's arguments")
    chip.set_defaults(func=cmd_chipstream)

    info = sub.add_parser("info", help="version, devices and the backend auto picks; with "
                          "FILE: what the file carries (PPID, run logs, basins)")
    info.add_argument("path", metavar="FILE", nargs="?", help=".rtdc file to describe")
    common(info)
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    """Run the ``dcbg`` command line and return its exit code

    Parameters
    ----------
    argv: list of str, optional
        The arguments; defaults to ``sys.argv[1:]``.
    own_process: bool
        Whether this process runs only this command (the console script):
        the compute commands then skip numba's BLAS probe
        (:func:`dcbg.system.skip_numba_blas_probe`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if own_process and getattr(args, "runs_kernels", False):
        skip_numba_blas_probe()
    if args.command != "chipstream" or args.verbose:  # ChipStream's output stays its own
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        with sigterm_raises():
            return args.func(args)
    except UsageError as error:
        parser.error(str(error))  # exits 2
    except KeyboardInterrupt as error:
        cause = str(error) or "interrupted"
        print(f"error: {cause}; the unfinished output was removed and the input is unchanged",
              file=sys.stderr)
        return 1
    except Exception as error:
        if args.verbose:
            raise
        print(f"error: {first_line(error)}", file=sys.stderr)
        return 1


def console_main() -> int:
    """Entry point of the ``dcbg`` console script and of ``python -m dcbg``

    Runs :func:`main` in a process of its own, then freezes the garbage
    collector: the process ends right after, and the interpreter's final
    collection would otherwise walk every object it made, among them, where
    numba's build of the CPU kernels runs, all that numba and llvmlite
    created while loading it, about half a second of a short run.
    """
    try:
        return main(own_process=True)
    finally:
        gc.freeze()


if __name__ == "__main__":
    sys.exit(console_main())
