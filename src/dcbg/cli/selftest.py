"""``dcbg selftest``: whether a device computes exact medians, and how fast"""
from __future__ import annotations

import pathlib

from .._version import __version__
from ..selftest import DEFAULT_EVENTS, DEFAULT_FILE_EVENTS
from .options import count_option, device_option
from .output import StatusLine, emit


def cmd_selftest(args) -> int:
    from .. import selftest
    if args.json:
        from ..rtdc.output import check_output_path
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
        import os
        target = pathlib.Path(args.json)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_text(json.dumps(selftest.summary(rows), indent=1))
        os.replace(partial, target)  # a report appears whole or not at all
    emit(selftest.verdict(rows))
    return 0 if selftest.passed(rows) else 1


def add_parser(subcommands):
    """`dcbg selftest` and its options"""
    check = subcommands.add_parser(
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
