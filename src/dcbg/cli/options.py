"""The options several commands share, their types, the usage error, and library
messages said in the options' terms"""
from __future__ import annotations

import argparse

from ..devices import DeviceRequest, parse_device
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


def device_option(text: str) -> DeviceRequest:
    """An argparse type: a device request, read once (whether it can be used is checked
    later)"""
    try:
        return parse_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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


def setting_options(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The library's settings as `parser` names them: ``{"num_cpus": "--num-cpus", …}``

    An option's destination, the name of its value, is the library's name
    of the setting it sets (``--num-cpus`` sets ``num_cpus``); its first
    spelling names it in messages (``--device``, ``-kb``).
    """
    return {action.dest: action.option_strings[0] for action in parser._actions
            if action.option_strings and action.dest != argparse.SUPPRESS}


def in_option_terms(error: BaseException, parser: argparse.ArgumentParser) -> str | None:
    """`error`'s message with the setting it names said as `parser`'s option

    Library errors that name a setting carry it (see
    :func:`dcbg.errors.setting_error`). None for other errors, and for a
    setting the command has no option for: those read as the library says
    them.
    """
    message = getattr(error, "setting_message", None)
    options = setting_options(parser)
    if message is None or message.setting not in options:
        return None
    return message.render(options[message.setting])
