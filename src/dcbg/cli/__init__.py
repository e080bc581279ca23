"""The ``dcbg`` command line: compute, demo, preview, info, selftest, chipstream

One module per job: :mod:`~dcbg.cli.compute`, :mod:`~dcbg.cli.demo`,
:mod:`~dcbg.cli.preview`, :mod:`~dcbg.cli.chipstream`,
:mod:`~dcbg.cli.info` and :mod:`~dcbg.cli.selftest` each hold one
subcommand (its options, the call of the library that does its work, what
it prints); :mod:`~dcbg.cli.options` the options they share and the usage
error; :mod:`~dcbg.cli.output` stdout, the progress bar and the status line.
This module builds the parser and runs a command, turning its errors into
an ``error:`` line and an exit code.
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys

from .._version import __version__
from ..errors import InterruptedAfterStoring, first_line, sigterm_raises
from ..system import skip_numba_blas_probe
from . import chipstream, compute, demo, info, preview, selftest
from .chipstream import CHIPSTREAM_EXAMPLE
from .options import UsageError, in_option_terms
from .output import flush_stdout


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``dcbg`` command and its subcommands"""
    parser = argparse.ArgumentParser(
        prog="dcbg", description="Rolling-median background images for RT-DC recordings.")
    parser.add_argument("--version", action="version", version=f"dcbg {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True)
    for command in (compute, demo, preview, chipstream, info, selftest):  # the order of --help
        command.add_parser(subcommands)
    for subcommand in subcommands.choices.values():  # its usage line goes with its errors
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
        said = in_option_terms(error, subcommand_parser(parser, args)) or error
        print(f"error: {first_line(said)}", file=sys.stderr)
        return 1
    finally:
        flush_stdout()


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
