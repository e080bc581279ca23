"""ChipStream's command line with dcbg as dcnum's "rollmed" background

ChipStream (``chipstream-cli``) builds a dcnum pipeline job and runs it with
dcnum's job runner, which looks the background method up in dcnum's method
table in this process. :func:`run_chipstream` registers dcbg there (see
:mod:`dcbg.dcnum_plugin`) and hands the arguments to ChipStream's own
command, so its options, output names, progress and exit codes stay its
own; only ``-b rollmed`` runs on dcbg. dcbg's device and codec threads reach
the background step through ``DCBG_DEVICE`` and ``DCBG_IO_THREADS``, and
the job's log in ChipStream's output (``logs/dcnum-log-*``) carries dcbg's
run log.
"""
from __future__ import annotations

import logging
import os

from .devices import DEVICE_ENV, DeviceRequest, select_device
from .errors import ExtraNotInstalled, install_advice
from .settings import IO_THREADS_ENV, io_threads_setting

logger = logging.getLogger(__name__)

BACKGROUND_ON_DCBG = "rollmed"
"""The background method of ChipStream that runs on dcbg"""


class ChipStreamMissing(ExtraNotInstalled):
    """ChipStream's command line is not installed"""


def run_chipstream(arguments: list[str], device: str | DeviceRequest | None = None,
                   io_threads: int | None = None) -> int:
    """Run ``chipstream-cli ARGUMENTS`` with dcbg registered; return its exit code

    Parameters
    ----------
    arguments: list of str
        ChipStream's command-line arguments, as for ``chipstream-cli``.
    device: str or DeviceRequest, optional
        dcbg's device for the background ("auto", "cpu", "cuda", ...).
    io_threads: int, optional
        dcbg's chunk codec threads (no more than the CPUs, with a warning).

    Both are checked before ChipStream starts, so a bad one starts nothing
    and leaves nothing behind.

    Raises
    ------
    ValueError
        If `device` is no device name or `io_threads` no positive integer.
    DeviceError
        If the CUDA device asked for cannot be used.
    ChipStreamMissing
        If ChipStream or its command line is not installed.
    """
    if io_threads is not None:
        io_threads, warning = io_threads_setting(io_threads)
        if warning is not None:
            logger.warning(warning)
    if device is not None:
        select_device(device)
    try:
        import chipstream  # noqa: F401 - sets up its process first, as its own script does
        from chipstream.cli.cli_main import chipstream_cli
    except ImportError as error:
        raise ChipStreamMissing(
            f"ChipStream's command line is not installed ({error}); install it with "
            f"{install_advice('chipstream')}.") from error
    if device is not None:
        os.environ[DEVICE_ENV] = str(device)
    if io_threads is not None:
        os.environ[IO_THREADS_ENV] = str(io_threads)
    from . import register_with_dcnum
    register_with_dcnum()
    method = _background_method(chipstream_cli, arguments)
    if method is not None and method.lower() != BACKGROUND_ON_DCBG:
        logger.warning("ChipStream's background method is '%s'; only '-b %s' runs on dcbg, "
                       "so this background is dcnum's own.", method, BACKGROUND_ON_DCBG)
    try:
        chipstream_cli.main(args=list(arguments), prog_name="chipstream-cli")
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def _background_method(command, arguments: list[str]) -> str | None:
    """The background method a ChipStream command line asks for (None for --help etc.)"""
    try:
        context = command.make_context("chipstream-cli", list(arguments),
                                       resilient_parsing=True)
    except Exception:  # noqa: BLE001 - ChipStream itself reports bad arguments
        return None
    if not context.params.get("path_in"):
        return None
    method = context.params.get("background_method")
    return None if method is None else str(method)
