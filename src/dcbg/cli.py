"""The ``dcbg`` command line: compute, demo, preview, info, selftest, chipstream"""
from __future__ import annotations

import argparse
import difflib
import gc
import logging
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import threading

from ._version import __version__
from .base import Background, get_available_background_methods
from .devices import DEVICE_ENV, DeviceRequest, auto_choice, parse_device, select_device
from .errors import (
    InterruptedAfterStoring,
    OutputExistsError,
    UnknownKeywordError,
    first_line,
    sigterm_raises,
)
from .jobs import (
    FileResult,
    JobSettings,
    check_dask_address,
    check_input,
    compute_file,
    display_name,
    find_recordings,
    run_on_dask,
    run_sequential,
    summary_table,
)
from .ppid import format_value, keyword_defaults, ppid_to_kwargs, split_ppid
from .selftest import DEFAULT_EVENTS, DEFAULT_FILE_EVENTS
from .settings import DEFAULT_COMPRESSION, DEFAULT_VERIFY, VERIFY_MODES, parse_compression
from .system import skip_numba_blas_probe

DEMO_EVENTS = 5000

DEMO_KERNEL_SIZE = 100
"""The demo's kernel_size (dcnum's default), and so its least number of events"""

DEMO_FOLDER = "dcbg-demo"
"""Folder of the demo's files, in the current folder, where the user finds them"""

DEFAULT_METHOD = "rollmed"


class UsageError(Exception):
    """A command-line usage error (exit code 2)"""


def emit(line: str = ""):
    """Print a line to stdout, and go on quietly once its reader has gone

    When the program reading dcbg's output exits early (``dcbg info FILE |
    head -1``), writing raises BrokenPipeError; the work is not the
    printing, so it goes on (a folder run computes every file) and later
    lines are dropped.
    """
    try:
        print(line, flush=True)
    except BrokenPipeError:
        silence_stdout()


def silence_stdout():
    """Send the rest of stdout to the null device (its reader has gone)

    Python flushes stdout at exit; without this, the lines still buffered
    would raise BrokenPipeError once more there.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass  # a stdout without a file descriptor (an embedding program's) stays as it is


def flush_stdout():
    """Flush stdout at the end of a command; a reader that has gone is no error"""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
    except (AttributeError, OSError, ValueError):
        pass


def count_option(least: int):
    """An argparse type: a whole number of at least `least`"""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value
    parse.__name__ = "count"
    return parse


def device_option(text: str) -> DeviceRequest:
    """An argparse type: a device request, read once (whether it can be used is checked
    later)"""
    try:
        return parse_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def check_input_folder(path: pathlib.Path) -> pathlib.Path:
    """Refuse a missing input folder as missing, naming a quoted ``~`` as the cause"""
    if not path.exists():
        from .rtdc.reader import missing_input
        raise missing_input(path, "folder")
    return path


def keyword_entries(items: list[str]) -> list[tuple[str, str]]:
    """Split ``["kernel_size=100", …]`` into (key, value) pairs, in the order given"""
    entries = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or "^" in item:
            raise UsageError(f"-kb takes one KEY=VALUE, got '{item}'")
        entries.append((key.strip(), value.strip()))
    return entries


def default_keywords(cls: type[Background]) -> str:
    """The method's keywords with their defaults, as -kb takes them

    e.g. "kernel_size=100, batch_size=10000", from the signature of its
    ``check_user_kwargs``.
    """
    return ", ".join(f"{name}={format_value(value)}"
                     for name, value in keyword_defaults(cls.check_user_kwargs).items())


def unknown_kb_keyword(code: str, error: UnknownKeywordError) -> UnknownKeywordError:
    """The error for a -kb keyword the method does not have, said in -kb's terms"""
    close = difflib.get_close_matches(error.keyword or "", error.known, n=1)
    guess = f" (did you mean {close[0]}?)" if close else ""
    cls = get_available_background_methods()[code]
    return UnknownKeywordError(
        f"Unknown -kb keyword '{error.keyword}'{guess}; the keywords of {code} and their "
        f"defaults are {default_keywords(cls)}.", error.keyword, error.known)


def method_and_kwargs(args) -> tuple[type[Background], dict]:
    """The background class and its keyword arguments from -b/-kb/--ppid

    -kb entries are read exactly like the keyword part of a PPID, so both
    refuse unknown and repeated keywords. The keywords' rules are checked
    later, with the input (:meth:`dcbg.Background.check_kwargs`).
    """
    methods = get_available_background_methods()
    if args.ppid is not None and not args.ppid.strip():
        raise UsageError("--ppid is empty; give a PPID such as rollmed:k=100^b=10000, or "
                         "leave the option out for the defaults")
    if args.method is not None and not args.method.strip():
        raise UsageError(f"-b is empty; name a background method such as {DEFAULT_METHOD}, "
                         f"or leave the option out for the default")
    if args.ppid:
        if args.kb:
            raise UsageError("give either --ppid or -kb, not both")
        code, _ = split_ppid(args.ppid)
        if args.method is not None and args.method != code:
            raise UsageError(f"--ppid names the method '{code}' but -b names "
                             f"'{args.method}'; give only one of them")
    else:
        code = args.method or DEFAULT_METHOD
    if code not in methods:
        raise UsageError(f"unknown background method '{code}'; the available methods are "
                         f"{', '.join(sorted(methods))}")
    if args.ppid:
        kwargs = Background.get_ppkw_from_ppid(args.ppid)
    else:
        try:
            kwargs = ppid_to_kwargs(methods[code].check_user_kwargs,
                                    "^".join(f"{k}={v}" for k, v in keyword_entries(args.kb)))
        except UnknownKeywordError as error:
            raise unknown_kb_keyword(code, error) from None
    return methods[code], kwargs


def default_output(path_in: pathlib.Path) -> pathlib.Path:
    """``<stem>_bg.rtdc`` beside the input"""
    return path_in.with_name(f"{path_in.stem}_bg.rtdc")


def collect_jobs(args) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """Input/output pairs for `dcbg compute`

    Raises
    ------
    UsageError
        For arguments that do not fit together.
    FileNotFoundError
        If the input file or folder does not exist.
    """
    if not args.path_in.strip():
        raise UsageError("PATH_IN is empty; give an .rtdc file (or a folder with -r)")
    if args.path_out is not None and not args.path_out.strip():
        raise UsageError("PATH_OUT is empty; give an output file name, or leave it out for "
                         "<stem>_bg.rtdc beside the input")
    path_in = pathlib.Path(args.path_in)
    if args.recursive:
        if args.path_out:
            raise UsageError("PATH_OUT cannot be combined with --recursive")
        if not check_input_folder(path_in).is_dir():
            raise UsageError(f"--recursive needs a folder, but {path_in} is not one")
        inputs = find_recordings(path_in)
        if not inputs:
            raise RuntimeError(f"no .rtdc files found below {path_in}")
    else:
        if path_in.is_dir():
            raise UsageError(f"{path_in} is a folder; add -r to process every .rtdc in it")
        from .rtdc.reader import check_input_path
        inputs = [check_input_path(path_in)]
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


SKIPPED_MESSAGE = "output exists; add --force to replace it"
"""Why a folder run leaves a file alone"""


def cmd_compute(args) -> int:
    probe = None
    if not (args.recursive or args.dask or args.dry_run) and os.path.isfile(args.path_in):
        from .rtdc.probe import MetadataProbe
        probe = MetadataProbe(args.path_in)  # runs while the modules of a run load
    try:
        return compute(args, probe)
    finally:
        if probe is not None:
            probe.stop()


def compute(args, probe=None) -> int:
    """`dcbg compute`; `probe` is the single input's metadata probe, started already"""
    cls, kwargs = method_and_kwargs(args)
    args.compress = parse_compression(args.compress)  # before any work
    if args.dask:
        try:
            check_dask_address(args.dask)
        except ValueError as error:
            raise UsageError(in_command_line_terms(str(error))) from None
    select_ppid = cls.get_ppid_from_ppkw(kwargs)
    jobs = collect_jobs(args)
    # one input: too few events for kernel_size is said before a keyword rule
    cls.check_kwargs(kwargs, None if args.recursive else jobs[0][0])
    existing = []
    if not args.in_place:
        if not args.recursive:
            from .rtdc.output import check_output_path
            check_output_path(jobs[0][1])
        existing = [job for job in jobs if job[1].is_file() and not args.force]
        if existing and not args.recursive:
            raise OutputExistsError(f"{existing[0][1]} exists; add --force to replace it")
    # Chosen once for every file here; a Dask worker chooses for its own GPUs.
    device = args.device if args.dask else select_device(args.device)
    settings = JobSettings(cls.get_ppid_code(), kwargs, args.compress, device,
                           args.num_cpus, args.io_threads, args.verify)
    if args.dry_run:
        return dry_run(args, jobs, existing, settings, select_ppid)
    skipped = [FileResult(str(source), str(target), True, skipped=True,
                          message=SKIPPED_MESSAGE) for source, target in existing]
    jobs = [job for job in jobs if job not in existing]

    def report(result):
        emit(result_line(result))

    for result in skipped:
        report(result)
    if args.dask:
        results = run_on_dask(jobs, settings, args.dask, args.retries, on_result=report)
    elif args.recursive:
        results = run_sequential(jobs, settings, progress_bar, on_result=report)
    else:
        (source, target), = jobs
        report(compute_file(source, target, settings, progress_bar,
                            report_final_errors=False, probe=probe))
        return 0
    root = args.path_in if args.recursive else None
    results = sorted(skipped + results, key=lambda result: display_name(result.source, root))
    emit(summary_table(results, root))
    failed = sum(not result.ok for result in results)
    if failed:
        print(f"error: {failed} of {len(results)} files failed; see the table above",
              file=sys.stderr)
        return 1
    return 0


def dry_run(args, jobs, existing, settings: JobSettings, select_ppid: str) -> int:
    """Print what `dcbg compute` would do, after checking each input as it would

    Every input is opened read-only, its frames found and its output path
    checked (see :func:`dcbg.jobs.check_input`). A single file that cannot be computed
    is the command's error; in a folder run, such files and those that would
    be skipped are listed as such, and the exit code is 1 if any cannot be
    computed.
    """
    if args.dask:
        emit(f"dask: {args.dask} (one task per file, {args.retries} retries)")
    else:
        emit(f"device: {settings.device} ({settings.device.reason})")
    unusable = 0
    for source, target in jobs:
        if (source, target) in existing:
            emit(f"{source}: skipped: {SKIPPED_MESSAGE}")
            continue
        if not args.recursive:
            check_input(source, settings, target)
        else:
            try:
                check_input(source, settings, target)
            except Exception as error:  # noqa: BLE001 - one file's problem hides no other
                unusable += 1
                emit(f"{source}: cannot be computed: {first_line(error)}")
                continue
        emit(f"{source} -> {target}")
    emit(select_ppid)
    if unusable:
        print(f"error: {unusable} of {len(jobs)} files cannot be computed; see the list "
              f"above", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    """Synthesize a recording and compute its background

    Every option is checked before the previous demo's files are touched;
    the new recording is written under a temporary name and replaces the
    old one (and the old one's background) only when complete.
    """
    from .rollmed import BackgroundRollMed
    from .synthetic import DEFAULT_SHAPE, write_synthetic_rtdc
    if args.events < DEMO_KERNEL_SIZE:
        raise UsageError(f"--events must be at least {DEMO_KERNEL_SIZE}, the demo's "
                         f"kernel_size, got {args.events}")
    device = select_device(args.device)  # an unusable device fails before any file is written
    folder = pathlib.Path(args.folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--folder {folder} is a file; give a folder for the demo's files")
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "demo.rtdc"
    target = default_output(source)
    settings = JobSettings(BackgroundRollMed.get_ppid_code(),
                           {"kernel_size": DEMO_KERNEL_SIZE, "batch_size": 10000},
                           DEFAULT_COMPRESSION, device, args.num_cpus, args.io_threads,
                           args.verify)
    height, width = DEFAULT_SHAPE
    emit(f"Synthesizing {args.events} frames of {height}x{width} in {source} …")
    handle, partial = tempfile.mkstemp(prefix=f".{source.name}.", suffix=".partial",
                                       dir=folder)
    os.close(handle)
    try:
        write_synthetic_rtdc(partial, args.events)
        target.unlink(missing_ok=True)  # the background of the recording being replaced
        os.replace(partial, source)
    finally:
        pathlib.Path(partial).unlink(missing_ok=True)
    emit(result_line(compute_file(source, target, settings, progress_bar,
                                  report_final_errors=False)))
    emit("Next steps, each works as printed:")
    for command, meaning in demo_next_commands(source, target):
        emit(f"  {command:<{DEMO_COMMAND_WIDTH}} # {meaning}")
    emit(f"For your own recording, use its path in place of {quoted(source)}")
    emit("(without --force, an existing output is kept and the command stops).")
    return 0


DEMO_COMMAND_WIDTH = 44
"""Width of the commands the demo prints last, so that their comments line up"""


def quoted(path: pathlib.Path) -> str:
    """A path as a shell takes it"""
    return shlex.quote(str(path))


def demo_next_commands(source: pathlib.Path, target: pathlib.Path) -> list[tuple[str, str]]:
    """The commands the demo ends with, each working as printed (command, what it does)"""
    return [
        (f"dcbg preview {quoted(target)}", "PNG of frames, backgrounds, corrected frames"),
        (f"dcbg info {quoted(target)}", "the output's PPID, run log and basin"),
        (f"dcbg compute {quoted(source)} --force",
         f"compute again; --force replaces {target.name}"),
    ]


CHIPSTREAM_EXAMPLE = "dcbg chipstream --device cpu -- -b rollmed -kb kernel_size=100 data.rtdc"
"""How `dcbg chipstream` passes arguments on to ChipStream"""


def cmd_chipstream(args) -> int:
    from .chipstream import run_chipstream
    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    return run_chipstream(arguments, args.device, args.io_threads)


def cmd_preview(args) -> int:
    from .preview import write_preview
    output = write_preview(args.path, args.output, args.events, args.row)
    emit(f"{output}")
    return 0


INFO_ATTRIBUTES = (("experiment:sample", "sample"), ("experiment:date", "date"),
                   ("experiment:time", "time"), ("experiment:run identifier", "run identifier"),
                   ("setup:software version", "software"))
"""Root attributes `dcbg info FILE` names (key, label); the others are counted"""


def describe_images(path: pathlib.Path) -> tuple[str | None, str | None]:
    """The file's events and frames as `dcbg info` says them, or why its images are unusable

    The number of events is the file's own: through a mapped basin, the
    length of the mapping, not the basin's frame count.

    Returns
    -------
    description: str or None
        e.g. "213 events of 80x320 pixels (through mapped basin …, 400 frames)".
    unusable: str or None
        The first line of the error that makes the images unusable.
    """
    from .errors import InputDataError, InputFileError
    from .rtdc.reader import RTDCInput
    try:
        with RTDCInput(path) as rtdc_in:
            image, mapping = rtdc_in.image, rtdc_in.image_mapping
            events = rtdc_in.event_count
            where = ""
            if mapping is not None:
                where = f" (through mapped basin {rtdc_in.image_path}, {image.shape[0]} frames)"
            elif rtdc_in.image_path != rtdc_in.path:
                where = f" (through basin {rtdc_in.image_path})"
            return f"{events} events of {image.shape[1]}x{image.shape[2]} pixels{where}", None
    except (InputDataError, InputFileError) as error:
        return None, first_line(error)


def own_event_count(h5) -> int | None:
    """The number of events from a file's own features, else its event count attribute"""
    import h5py
    events = h5.get("events")
    for name in events if isinstance(events, h5py.Group) else ():
        try:
            feature = events.get(name)
        except (KeyError, OSError, RuntimeError, ValueError):  # a link that leads nowhere
            continue
        if isinstance(feature, h5py.Dataset) and feature.shape:
            return feature.shape[0]
    count = h5.attrs.get("experiment:event count")
    return None if count is None else int(count)


def background_line(h5) -> str:
    """What `dcbg info` says about the file's own image_bg"""
    import h5py

    from .rtdc.hdf5 import GENERATION_ATTRIBUTE, PPID_ATTRIBUTE, as_text
    events = h5.get("events")
    try:
        image_bg = events.get("image_bg") if isinstance(events, h5py.Group) else None
    except (KeyError, OSError, RuntimeError, ValueError):
        image_bg = None
    if not isinstance(image_bg, h5py.Dataset):
        return "image_bg: none in this file"
    ppid = as_text(image_bg.attrs.get(PPID_ATTRIBUTE, "none recorded"))
    generation = as_text(image_bg.attrs.get(GENERATION_ATTRIBUTE, "?"))
    return f"image_bg: PPID {ppid} (generation {generation})"


def attributes_line(h5) -> str:
    """The number of root attributes and the ones that name the measurement"""
    from .rtdc.hdf5 import as_text
    attrs = h5.attrs
    named = [f"{label} {as_text(attrs[key])}" for key, label in INFO_ATTRIBUTES if key in attrs]
    return f"attributes: {len(attrs)}" + (f" ({', '.join(named)})" if named else "")


def describe_file(path: pathlib.Path):
    """Print what an .rtdc file carries: events, images, background, attributes, basins, logs

    A file whose images cannot be used (a basin moved away, no images,
    frames that are not uint8) is described as far as it can be, with one
    line saying why; only a file that cannot be read at all is an error.
    """
    from .rtdc.basins import basin_candidates, read_basin_definitions
    from .rtdc.hdf5 import open_hdf5
    from .runlog import read_run_logs
    description, unusable = describe_images(path)
    with open_hdf5(path, "r") as h5:  # a file that cannot be read at all ends here
        if description is None:
            events = own_event_count(h5)
            emit(f"{path}: {'an unknown number of' if events is None else events} events")
            emit(f"images: cannot be used: {unusable}")
        else:
            emit(f"{path}: {description}")
        emit(background_line(h5))
        emit(attributes_line(h5))
        for definition in read_basin_definitions(h5):
            paths = definition.get("paths", [])
            exists = any(p.exists() for p in basin_candidates(definition, path.parent))
            emit(f"basin {definition.get('name')!r}: {definition.get('type')}/"
                 f"{definition.get('format')}, {paths[0] if paths else 'no path'}"
                 f"{'' if exists else ' (missing)'}")
        logs = read_run_logs(h5)
        for name, record in logs:
            seconds = record.get("seconds", {})
            device = " ".join(str(record[k]) for k in ("device", "name") if record.get(k))
            emit(f"log {name}: {record.get('software')}, {record.get('ppid')}, "
                 f"{record.get('events')} events on {device} "
                 f"in {seconds.get('total', '?')} s, host "
                 f"{record.get('host')}, warnings: {len(record.get('warnings', []))}")
        others = sorted(set(h5.get("logs", {})) - {name for name, _ in logs})
        if others:
            emit(f"other logs: {', '.join(others)}")


def cmd_info(args) -> int:
    if args.path:
        describe_file(pathlib.Path(args.path))
        return 0
    emit(f"dcbg {__version__}")
    emit(f"python {sys.version.split()[0]}, CPUs available: {os.cpu_count()}")
    from .cpukernels import describe_build
    emit(f"CPU kernels: {describe_build()}")
    from .cudaprobe import describe_cuda_devices
    devices = describe_cuda_devices()
    if not devices:
        emit("NVIDIA GPUs: none found (pynvml missing or no driver)")
    for dev in devices:
        ordinal = "" if dev["cuda_index"] is None else f" (cuda:{dev['cuda_index']})"
        emit(f"GPU {dev['index']}{ordinal}: {dev['name']}, PCI {dev['bus_id']}, "
             f"{dev['memory_free'] / 2**30:.1f} of {dev['memory_total'] / 2**30:.1f} GiB "
             f"free, driver {dev['driver']}")
    if os.environ.get(DEVICE_ENV):
        emit(f"{DEVICE_ENV}={os.environ[DEVICE_ENV]}")
        try:
            device = select_device("auto")
            emit(f"{DEVICE_ENV} picks: {device} ({device.reason})")
        except (ValueError, RuntimeError) as error:
            emit(f"{DEVICE_ENV} picks: nothing usable ({first_line(error)})")
    choice, warning = auto_choice()
    emit(f"auto picks: {choice} ({choice.reason})")
    if warning:
        emit(f"WARNING: {warning}")
    emit(f"methods: {', '.join(sorted(get_available_background_methods()))}")
    emit("Check that a device computes exact medians, and how fast: dcbg selftest "
         "[--device cuda]")
    return 0


class StatusLine:
    """What runs now, in one line on a terminal's stderr, erased before the next output

    Off where stderr is no terminal (a log file, a pipe), which would keep
    every state; there the lines of the output say how far a run has got.
    """

    def __init__(self):
        self.stream = sys.stderr
        self.enabled = self.stream.isatty()
        self.shown = False

    def show(self, text: str):
        """Replace the line by `text`"""
        if self.enabled:
            width = max(10, shutil.get_terminal_size().columns - 1)  # no wrap, \r reaches it
            self.stream.write(f"\r\x1b[K{f'{text} …'[:width]}")
            self.stream.flush()
            self.shown = True

    def clear(self):
        """Erase the line"""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def cmd_selftest(args) -> int:
    from . import selftest
    if args.json:
        from .rtdc.output import check_output_path
        check_output_path(args.json)  # before minutes of work, not after them
    emit(f"dcbg {__version__} selftest, --device {args.device}: load the kernel, compare "
         f"with the CPU engine and the definition, measure")
    emit(selftest.table_header())
    status = StatusLine()

    def show_row(row):
        status.clear()
        emit(selftest.table_line(row))

    try:
        rows = selftest.run_selftest(args.device, events=args.events,
                                     file_events=args.file_events, num_cpus=args.num_cpus,
                                     on_row=show_row, on_step=status.show)
    finally:
        status.clear()
    if args.json:
        import json
        pathlib.Path(args.json).write_text(json.dumps(selftest.summary(rows), indent=1))
    emit(selftest.verdict(rows))
    return 0 if selftest.passed(rows) else 1


COMPUTE_EXAMPLES = (
    ("dcbg compute measurement.rtdc --dry-run",
     "check the input and the output path, print the PPID, compute nothing"),
    ("dcbg compute measurement.rtdc",
     "writes measurement_bg.rtdc beside it, with the default keywords"),
    ("dcbg compute measurement.rtdc out.rtdc -kb kernel_size=200 -kb batch_size=20000",
     "a longer window; batch_size must stay larger than kernel_size"),
    ('dcbg compute measurement.rtdc --ppid "rollmed:k=100^b=10000" --force',
     "the method and its keywords as one PPID; --force replaces an existing output"),
    ("dcbg compute archive -r", "every .rtdc below the folder archive, one after another"),
)
"""Examples at the end of `dcbg compute --help` (command, what it does), in an order in
which each works after the ones before it"""


def compute_epilog() -> str:
    """The end of `dcbg compute --help`: the method keywords and examples

    It reads as the terminal shows it and as reStructuredText, which
    sphinx-argparse makes of it on the documentation's command-line page:
    each title with its indented lines is a definition list there.
    """
    methods = get_available_background_methods()
    lines = ["method keywords (-kb KEY=VALUE, once per keyword) and their defaults:"]
    lines += [f"  {code}: {default_keywords(cls)}" for code, cls in sorted(methods.items())]
    lines += ["", "examples:"]
    for command, meaning in COMPUTE_EXAMPLES:
        lines += [f"  {command}", f"      {meaning}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    methods = get_available_background_methods()
    parser = argparse.ArgumentParser(
        prog="dcbg", description="Rolling-median background images for RT-DC recordings.")
    parser.add_argument("--version", action="version", version=f"dcbg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--device", type=device_option, default="auto",
                       help="auto (default), cpu, cuda, cuda:N or cuda:all")
        p.add_argument("--num-cpus", type=count_option(1), default=None,
                       help="CPU workers for the median (default: all available; never "
                       "more than there are)")
        p.add_argument("--io-threads", type=count_option(1), default=None,
                       help="threads that decode and encode HDF5 chunks (default: "
                       "$DCBG_IO_THREADS or all CPUs available; never more than there are)")
        p.add_argument("--verify", choices=VERIFY_MODES, default=DEFAULT_VERIFY,
                       help="which pixels of every GPU batch the CPU recomputes and compares "
                       "before writing: sample (default, a spread sample), all, or off; "
                       "ignored on the CPU")
        p.add_argument("--verbose", action="store_true", help="log details, show tracebacks")

    compute = sub.add_parser(
        "compute", help="compute image_bg for a file or folder",
        description="Compute events/image_bg, the rolling-median background, of an .rtdc "
        "file\nor of every .rtdc below a folder.", epilog=compute_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    compute.add_argument("path_in", metavar="PATH_IN",
                         help="input .rtdc file (or, with -r, a folder of them)")
    compute.add_argument("path_out", metavar="PATH_OUT", nargs="?",
                         help="output .rtdc file (default: <stem>_bg.rtdc beside the input)")
    compute.add_argument("-b", "--background-method", dest="method",
                         help=f"background method (default: {DEFAULT_METHOD})")
    compute.add_argument("-kb", "--kwargs-background", dest="kb", action="append", default=[],
                         metavar="KEY=VALUE", help="a method keyword, once per keyword ("
                         + "; ".join(f"defaults of {code}: {default_keywords(cls)}"
                                     for code, cls in sorted(methods.items())) + ")")
    compute.add_argument("--ppid",
                         help="method and keywords as a PPID, e.g. rollmed:k=100^b=10000")
    compute.add_argument("-c", "--compression", dest="compress", default=DEFAULT_COMPRESSION,
                         help=f"zstd-1 … zstd-9 or none (default {DEFAULT_COMPRESSION})")
    compute.add_argument("--in-place", action="store_true",
                         help="write image_bg into the input file")
    compute.add_argument("--force", action="store_true", help="replace existing outputs")
    compute.add_argument("-r", "--recursive", action="store_true",
                         help="process every .rtdc below the folder PATH_IN")
    compute.add_argument("--dask", metavar="ADDRESS",
                         help="send one task per file to a Dask scheduler (tcp://host:8786), "
                         "or to a cluster started here: local or local:N (N >= 1 workers)")
    compute.add_argument("--retries", type=count_option(0), default=2,
                         help="with --dask: how often a failed task is retried (default 2)")
    compute.add_argument("--dry-run", action="store_true",
                         help="check every input, print what would be done and the PPID, "
                         "compute nothing")
    common(compute)
    compute.set_defaults(func=cmd_compute, runs_kernels=True)

    demo = sub.add_parser("demo", help="synthesize a recording and compute its background")
    demo.add_argument("--events", type=int, default=DEMO_EVENTS,
                      help=f"number of frames to synthesize, at least {DEMO_KERNEL_SIZE} (the "
                      f"demo's kernel_size; default: {DEMO_EVENTS})")
    demo.add_argument("--folder", default=DEMO_FOLDER,
                      help=f"where to put the files (default: ./{DEMO_FOLDER}, reused by "
                      f"every demo)")
    common(demo)
    demo.set_defaults(func=cmd_demo, runs_kernels=True)

    preview = sub.add_parser(
        "preview", help="PNG of raw frames, backgrounds and corrected frames of a file")
    preview.add_argument("path", metavar="FILE", help=".rtdc file with image and image_bg")
    preview.add_argument("-e", "--event", dest="events", type=int, action="append",
                         metavar="EVENT", help="event to show (repeat, up to 10; default: "
                         "three with cells)")
    preview.add_argument("-o", "--output", help=".png, .jpg or .jpeg path, the suffix "
                         "chooses the format (default: <stem>_preview.png)")
    preview.add_argument("--row", type=int, help="pixel row of the time strip (default: "
                         "the middle row)")
    preview.add_argument("--verbose", action="store_true", help="show tracebacks")
    preview.set_defaults(func=cmd_preview)

    chip = sub.add_parser(
        "chipstream", help="run ChipStream's command line with its rollmed background on dcbg",
        description="Run chipstream-cli with the arguments after '--', its '-b rollmed' "
        "background computed by dcbg (ChipStream's options, outputs and exit codes are its "
        f"own), e.g. {CHIPSTREAM_EXAMPLE}")
    chip.add_argument("--device", type=device_option, help="dcbg's device for the "
                      "background (default: $DCBG_DEVICE or auto)")
    chip.add_argument("--io-threads", type=count_option(1), help="dcbg's chunk codec threads "
                      "(default: $DCBG_IO_THREADS or all CPUs available)")
    chip.add_argument("--verbose", action="store_true", help="show tracebacks")
    chip.add_argument("arguments", nargs=argparse.REMAINDER, metavar="-- ARGUMENTS",
                      help="chipstream-cli's arguments")
    chip.set_defaults(func=cmd_chipstream)

    info = sub.add_parser("info", help="version, devices and the backend auto picks; with "
                          "FILE: what the file carries (PPID, run logs, basins)")
    info.add_argument("path", metavar="FILE", nargs="?", help=".rtdc file to describe")
    info.add_argument("--verbose", action="store_true", help="log details, show tracebacks")
    info.set_defaults(func=cmd_info)

    check = sub.add_parser(
        "selftest", help="check that a device computes exact medians, and how fast",
        description="On each chosen device: load (compile) the median kernel, compute "
        "synthetic stacks for kernel sizes that use every width of its counts, compare them "
        "byte for byte with the CPU engine and the definition, and measure the median "
        "alone and a recording file to file. Exit code 1 if any result differs.")
    check.add_argument("--device", type=device_option, default="auto",
                       help="auto (default: what a run would pick), cpu, cuda, cuda:N or "
                       "cuda:all (each GPU, then one recording split across them)")
    check.add_argument("--events", type=count_option(1), default=DEFAULT_EVENTS,
                       help=f"windows of each 80x320 stack (default {DEFAULT_EVENTS})")
    check.add_argument("--file-events", type=count_option(0), default=DEFAULT_FILE_EVENTS,
                       help=f"events of the recording computed file to file, 0 to skip it "
                       f"(default {DEFAULT_FILE_EVENTS})")
    check.add_argument("--num-cpus", type=count_option(1), default=None,
                       help="CPU workers (default: all available)")
    check.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    check.add_argument("--verbose", action="store_true", help="log details, show tracebacks")
    check.set_defaults(func=cmd_selftest, runs_kernels=True)

    for subcommand in sub.choices.values():  # its usage line goes with its errors
        subcommand.set_defaults(subcommand=subcommand)
    return parser


def subcommand_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the subcommand that runs (the top-level one if it has none)"""
    return getattr(args, "subcommand", parser)


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
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        message = f"unrecognized arguments: {' '.join(unknown)}"
        if args.command == "chipstream":
            message += (f"; put ChipStream's arguments after '--', e.g. "
                        f"{CHIPSTREAM_EXAMPLE}")
        subcommand_parser(parser, args).error(message)  # exits 2
    if own_process and getattr(args, "runs_kernels", False):
        skip_numba_blas_probe()
    if args.command != "chipstream" or args.verbose:  # ChipStream's output stays its own
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        with sigterm_raises():
            return args.func(args)
    except UsageError as error:
        subcommand_parser(parser, args).error(str(error))  # exits 2
    except InterruptedAfterStoring as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        cause = str(error) or "interrupted"
        print(f"error: {cause}; the unfinished output was removed and the input is unchanged",
              file=sys.stderr)
        return 1
    except Exception as error:
        if args.verbose:
            raise
        print(f"error: {in_command_line_terms(first_line(error))}", file=sys.stderr)
        return 1
    finally:
        flush_stdout()


API_TO_OPTIONS = (
    ('device="cpu" or "auto"', "--device cpu or auto"),
    ('device="cpu"', "--device cpu"),
    ("CPU workers (num_cpus)", "CPU workers (--num-cpus)"),
    ("The Dask address ", "--dask "),
)
"""How the library's advice (its keyword arguments) reads on the command line (its options)"""


def in_command_line_terms(message: str) -> str:
    """A library message with its keyword arguments said as the command's options"""
    for api, option in API_TO_OPTIONS:
        message = message.replace(api, option)
    return message


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
