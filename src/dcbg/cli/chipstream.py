"""``dcbg chipstream``: ChipStream's command line with its rollmed background on dcbg"""
from __future__ import annotations

import argparse

from .options import count_option, device_option

CHIPSTREAM_EXAMPLE = "dcbg chipstream --device cpu -- -b rollmed -kb kernel_size=100 data.rtdc"
"""How `dcbg chipstream` passes arguments on to ChipStream"""


def cmd_chipstream(args) -> int:
    from ..chipstream import run_chipstream
    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    return run_chipstream(arguments, args.device, args.io_threads)


def add_parser(subcommands):
    """`dcbg chipstream` and its options"""
    chip = subcommands.add_parser(
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
