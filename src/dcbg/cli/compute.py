"""``dcbg compute``: the background of a file, or of every recording below a folder"""
from __future__ import annotations

import argparse
import difflib
import os
import pathlib
import sys

from ..background import Background, get_available_background_methods
from ..devices import select_device
from ..errors import OutputExistsError, UnknownKeywordError, first_line
from ..jobs import (
    FileResult,
    JobSettings,
    check_dask_address,
    check_input,
    compute_file,
    default_output,
    display_name,
    find_recordings,
    run_on_dask,
    run_sequential,
    summary_table,
)
from ..ppid import format_value, keyword_defaults, ppid_to_kwargs, split_ppid
from ..settings import DEFAULT_COMPRESSION, decide_run_settings, parse_compression
from .options import UsageError, add_run_options, count_option, in_option_terms
from .output import emit, progress_bar

DEFAULT_METHOD = "rollmed"


def check_input_folder(path: pathlib.Path) -> pathlib.Path:
    """Refuse a missing input folder as missing, naming a quoted ``~`` as the cause"""
    if not path.exists():
        from ..rtdc.reader import missing_input
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
        from ..rtdc.reader import check_input_path
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


def summary_line(events: int, seconds: float, device, ppid: str) -> str:
    """The final line of a run"""
    rate = events / seconds if seconds > 0 else float("inf")
    return (f"{events} events in {seconds:.2f} s ({rate:,.0f} events/s) "
            f"on {device}, PPID {ppid}")


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
        from ..rtdc.metadata_check import MetadataProbe
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
            raise UsageError(in_option_terms(error, args.subcommand) or str(error)) from None
    select_ppid = cls.get_ppid_from_ppkw(kwargs)
    jobs = collect_jobs(args)
    # one input: too few events for kernel_size is said before a keyword rule
    cls.check_kwargs(kwargs, None if args.recursive else jobs[0][0])
    existing = []
    if not args.in_place:
        if not args.recursive:
            from ..rtdc.output import check_output_path
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
    # the settings as a run decides them, so a setting the run would refuse fails here too
    decide_run_settings(settings.compress, settings.num_cpus, settings.io_threads,
                        settings.verify)
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


def add_parser(subcommands):
    """`dcbg compute` and its options"""
    methods = get_available_background_methods()
    compute = subcommands.add_parser(
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
    add_run_options(compute)
    compute.set_defaults(func=cmd_compute, runs_kernels=True)
