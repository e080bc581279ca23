"""The settings of a run, each defined and checked in this one place

Compression of ``image_bg``, the codec threads, the CPU workers and the
verification of GPU results are decided once, where a run starts (the
command line, :class:`dcbg.Background`, ChipStream's hook), and handed on as
decided; the device is decided in :mod:`dcbg.devices`. None of them changes
a byte of the result except the compression, which changes only how the
bytes are stored.
"""
from __future__ import annotations

import logging
import os

from .system import available_cpus

logger = logging.getLogger(__name__)

DEFAULT_COMPRESSION = "zstd-5"
"""Compression of image_bg unless asked otherwise (dcnum's: Zstandard level 5)"""

NO_COMPRESSION = "none"

VERIFY_MODES = ("sample", "all", "off")
"""How much of a GPU's results the CPU recomputes and compares: a spread sample of the
pixels of every batch, every pixel, or nothing"""

DEFAULT_VERIFY = "sample"

IO_THREADS_ENV = "DCBG_IO_THREADS"
"""Environment variable giving the default number of chunk codec threads"""

_warned: set[tuple[int, int]] = set()


def parse_compression(compression) -> str:
    """The compression setting in its one spelling: "zstd-1" … "zstd-9" or "none"

    Parameters
    ----------
    compression: bool, None or str
        True for :data:`DEFAULT_COMPRESSION`, False or None for none, or one
        of the names above.

    Raises
    ------
    ValueError
        For anything else.
    """
    if compression is True:
        return DEFAULT_COMPRESSION
    if compression is False or compression is None or compression == NO_COMPRESSION:
        return NO_COMPRESSION
    if isinstance(compression, str) and compression.startswith("zstd-"):
        level = compression[5:]
        if level.isdigit() and 1 <= int(level) <= 9:
            return f"zstd-{int(level)}"
    raise ValueError(
        f"Unknown compression '{compression}'; use 'zstd-1' to 'zstd-9' or 'none'.")


def parse_verify(verify) -> str:
    """The verification of GPU results in its one spelling: "sample", "all" or "off"

    A GPU engine recomputes on the CPU, for every batch, a spread sample of
    its pixels ("sample") or all of them ("all"), and compares them with
    the GPU's before anything is written (see
    :mod:`dcbg.engines.verification`). The CPU engine ignores it; the result
    never depends on it.

    Raises
    ------
    ValueError
        For anything else.
    """
    if isinstance(verify, str) and verify.strip().lower() in VERIFY_MODES:
        return verify.strip().lower()
    raise ValueError(f"Unknown verify {verify!r}; use 'sample' (the default), 'all' or 'off'.")


def zstd_level(compression: str) -> int | None:
    """The Zstandard level of a parsed compression setting, None for no compression"""
    return None if compression == NO_COMPRESSION else int(compression[5:])


def positive_int(name: str, value) -> int:
    """`value` if it is a positive int, else a ValueError naming `name`"""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def default_io_threads() -> int:
    """Codec threads when none are asked for: ``DCBG_IO_THREADS``, else every CPU"""
    text = os.environ.get(IO_THREADS_ENV, "").strip()
    if not text:
        return available_cpus()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{IO_THREADS_ENV} must be a positive integer, got {text!r}.")
    return int(text)


def io_threads_setting(io_threads: int | None) -> int:
    """The codec threads of a run: as asked (or the default), but no more than the CPUs

    Each codec thread keeps a CPU busy decoding or encoding chunks, and
    reading a chunk's bytes holds h5py's lock, so threads beyond the CPUs
    only wait. A request above the CPUs is capped with a warning, once per
    process rather than once per file.
    """
    asked = positive_int("io_threads", default_io_threads() if io_threads is None
                         else io_threads)
    available = available_cpus()
    if asked <= available:
        return asked
    if (asked, available) not in _warned:
        _warned.add((asked, available))
        logger.warning("%d I/O threads were asked for, but this process may use %d CPUs; "
                       "starting %d", asked, available, available)
    return available


def num_cpus_setting(num_cpus: int | None) -> int:
    """The CPU workers asked for (the CPU engine caps them at the CPUs there are)"""
    return positive_int("num_cpus", available_cpus() if num_cpus is None else num_cpus)
