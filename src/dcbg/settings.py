"""The settings of a run, each defined, checked and decided in this one place

Compression of ``image_bg``, the codec threads, the CPU workers and the
verification of GPU results are decided once, before a run starts
(:func:`decide_run_settings`, called by :class:`dcbg.Background`), into a
:class:`RunSettings` that the engines and the writer take as decided and that
the run log records with what deciding warned about (a request capped at the
CPUs there are). The device is decided in :mod:`dcbg.devices`. None of them
changes a byte of the result except the compression, which changes only how
the bytes are stored.
"""
from __future__ import annotations

import dataclasses
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

_warned: set[str] = set()
"""The warnings about codec threads logged in this process"""


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


def capped_at_cpus(asked: int, what: str) -> tuple[int, str | None]:
    """`asked` workers of a kind, but no more than the CPUs this process may use

    Returns the number to start and, when it is fewer than asked, the warning
    that says so (`what` names them, e.g. "CPU workers").
    """
    available = available_cpus()
    if asked <= available:
        return asked, None
    return available, (f"{asked} {what} were asked for, but this process may use "
                       f"{available} CPUs; starting {available}")


def io_threads_setting(io_threads: int | None) -> tuple[int, str | None]:
    """The codec threads of a run: as asked (or the default), but no more than the CPUs

    Each codec thread keeps a CPU busy decoding or encoding chunks, and
    reading a chunk's bytes holds h5py's lock, so threads beyond the CPUs
    only wait. Returns the number and the warning of a request capped.
    """
    asked = positive_int("io_threads", default_io_threads() if io_threads is None
                         else io_threads)
    return capped_at_cpus(asked, "I/O threads")


def num_cpus_setting(num_cpus: int | None) -> tuple[int, str | None]:
    """The CPU workers of a run: as asked (default: the CPUs), but no more than the CPUs

    The CPU engine may start fewer still, where a frame has too few pixels
    to keep them busy. Returns the number and the warning of a request capped.
    """
    asked = positive_int("num_cpus", available_cpus() if num_cpus is None else num_cpus)
    return capped_at_cpus(asked, "CPU workers")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The settings of one run, decided once before it starts (:func:`decide_run_settings`)"""

    compression: str
    """of image_bg: "zstd-1" … "zstd-9" or "none\""""
    io_threads: int
    """threads that decode and encode HDF5 chunks (no more than the CPUs)"""
    num_cpus: int
    """CPU workers of the CPU engine (no more than the CPUs)"""
    verify: str
    """which of a GPU's results the CPU checks: "sample", "all" or "off\""""
    warnings: tuple[str, ...] = ()
    """what deciding them warned about, in the order decided"""

    def record(self) -> dict:
        """The decisions as the run log records them"""
        return {"compression": self.compression, "num_cpus": self.num_cpus,
                "io_threads": self.io_threads, "verify": self.verify}


def decide_run_settings(compress=True, num_cpus: int | None = None,
                        io_threads: int | None = None,
                        verify: str = DEFAULT_VERIFY) -> RunSettings:
    """Decide every setting of a run from what was asked for, once

    Each warning is logged as it is decided: the cap of CPU workers every
    time, the cap of codec threads once per process (a folder run asks the
    same for every file); the returned settings keep all of them for the
    run log.

    Parameters
    ----------
    compress: bool or str
        See :func:`parse_compression`.
    num_cpus, io_threads: int, optional
        See :func:`num_cpus_setting` and :func:`io_threads_setting`.
    verify: str
        See :func:`parse_verify`.

    Raises
    ------
    ValueError
        If a setting is none of the values it takes.
    """
    cpus, cpus_warning = num_cpus_setting(num_cpus)
    threads, threads_warning = io_threads_setting(io_threads)
    compression = parse_compression(compress)
    verify = parse_verify(verify)
    if cpus_warning is not None:
        logger.warning(cpus_warning)
    if threads_warning is not None and threads_warning not in _warned:
        _warned.add(threads_warning)
        logger.warning(threads_warning)
    warnings = tuple(text for text in (cpus_warning, threads_warning) if text is not None)
    return RunSettings(compression, threads, cpus, verify, warnings)
