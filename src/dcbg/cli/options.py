"""The options several commands share, their types, and the usage error"""
from __future__ import annotations

import argparse

from ..devices import parse_device
from ..settings import DEFAULT_VERIFY, VERIFY_MODES


class UsageError(Exception):
    """A command-line usage error (exit code 2)"""


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


def device_option(text: str) -> str:
    """An argparse type: a device name (whether it can be used is checked later)"""
    try:
        parse_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_run_options(p: argparse.ArgumentParser):
    """The options of the commands that compute: the device, CPU workers, codec threads,
    the check of GPU results and --verbose"""
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
