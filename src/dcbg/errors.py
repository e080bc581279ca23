"""The errors dcbg raises, each a subclass of the built-in a caller expects

Every message is one sentence that names the file (or argument), says what
is wrong and what to do about it; the command line prints it as its
``error:`` line. Catch the built-in bases (ValueError, OSError,
RuntimeError) or these classes for finer handling.

A message that names a setting (``use device="cpu"``) is made by
:func:`setting_error`: the error carries the setting's name, so that the
command line says the same message with its option (``use --device cpu``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import signal
import threading
import typing


@dataclasses.dataclass
class SettingMessage:
    """An error message that names a setting, said in the library's terms or a command line's

    The library names a setting by its keyword argument, and the values it
    suggests as Python strings (``device="cpu" or "auto"``); a command line
    names it by its option (``--device cpu or auto``). The words around it
    are the same, so the message is kept as a template and said either way.

    Attributes
    ----------
    template: str
        The message, with ``{setting}`` where the setting goes and its other
        fields in braces, as :meth:`str.format` takes them.
    setting: str
        The setting's name in the library (``"device"``, ``"num_cpus"``).
    suggested: tuple of str
        The values the message suggests, in order; none where it names the
        setting alone.
    fields: dict
        The template's other fields.
    words: str or None
        How the library says a setting that is none of its keyword arguments
        (``"The Dask address"``); without, the setting's name.
    """

    template: str
    setting: str
    suggested: tuple[str, ...] = ()
    fields: dict = dataclasses.field(default_factory=dict)
    words: str | None = None

    def render(self, option: str | None = None) -> str:
        """The message, the setting said by the library or as the command-line `option`"""
        if option is not None:
            named = f"{option} {' or '.join(self.suggested)}" if self.suggested else option
        elif self.suggested:
            first, *others = self.suggested
            named = " or ".join([f'{self.setting}="{first}"', *(f'"{v}"' for v in others)])
        else:
            named = self.words or self.setting
        return self.template.format(setting=named, **self.fields)


ErrorType = typing.TypeVar("ErrorType", bound=BaseException)


def setting_error(error_type: type[ErrorType], template: str, setting: str, *,
                  suggested: tuple[str, ...] = (), words: str | None = None,
                  **fields) -> ErrorType:
    """An error whose message names a setting, said in the library's terms

    Parameters
    ----------
    error_type: type
        The exception class; it is called with the message alone.
    template, setting, suggested, words:
        As :class:`SettingMessage` has them.
    fields:
        The template's other fields.

    Returns
    -------
    error: error_type
        With the attributes ``setting`` (the setting's name), ``suggested``
        (the values the message suggests) and ``setting_message`` (the
        :class:`SettingMessage`, which a command line renders with its
        option). They survive pickling, so a Dask worker's error keeps them.
    """
    message = SettingMessage(template, setting, tuple(suggested), fields, words)
    error = error_type(message.render())
    error.setting = setting
    error.suggested = message.suggested
    error.setting_message = message
    return error


class InputDataError(ValueError):
    """The input is readable but unsuitable: wrong dtype or shape, too few events"""


class NoImageDataError(InputDataError):
    """The input has no usable ``events/image`` data"""


class InputFileError(OSError):
    """The input file cannot be read: not HDF5, truncated or corrupted"""


class UnknownKeywordError(ValueError, TypeError):
    """A keyword argument the background method does not have

    It is also a TypeError, which Python raises for unexpected keywords.

    Attributes
    ----------
    keyword: str or None
        The keyword as it was given.
    known: tuple of str
        The method's keywords.
    """

    def __init__(self, message: str, keyword: str | None = None, known=()):
        super().__init__(message)
        self.keyword = keyword
        self.known = tuple(known)


class OutputError(OSError):
    """The output cannot be written where it was asked for"""


class OutputExistsError(OutputError, FileExistsError):
    """The output file exists and replacing it was not allowed"""


class OutputBusyError(OutputError):
    """Another run or program is writing the same output file"""


class OutputWriteError(OutputError):
    """Writing the output failed (disk full, quota, I/O error)"""


class WorkerFailure(RuntimeError):
    """A CPU worker process died or raised while computing medians"""


class DeviceError(RuntimeError):
    """The CUDA device failed while computing (driver or kernel error)"""


class GPUResultError(DeviceError):
    """A GPU's median differs from the CPU's recomputation of the same pixel"""


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM; raised so that cleanup runs as for Ctrl-C"""


class ExtraNotInstalled(ImportError):
    """A package that one of dcbg's extras brings is missing; the message says how to install it"""


def install_advice(*extras: str) -> str:
    """The command that installs dcbg with `extras` (alternatives), as every message words it

    dcbg is installed from its checkout: no package index has it, so asking
    pip for dcbg by name with an extra fails. ``pip install ".[dask]"``, run in
    the checkout, installs dcbg again with the extra's packages.

    Parameters
    ----------
    extras: str
        Names of extras of dcbg's ``pyproject.toml``; several are offered as
        alternatives ("cuda12" or "cuda13").

    Returns
    -------
    advice: str
        E.g. ``pip install ".[cuda12]" or ".[cuda13]" in the dcbg checkout``.
    """
    choices = " or ".join(f'".[{extra}]"' for extra in extras)
    return f"pip install {choices} in the dcbg checkout"


class InterruptedAfterStoring(KeyboardInterrupt):
    """Ctrl-C or SIGTERM came while a finished output was being stored

    The output was stored whole first; then the run stopped as the signal
    asked.
    """


def overlap_error() -> ValueError:
    """The error for an `out` that shares memory with the frames (host or GPU)"""
    return ValueError("out overlaps frames; give an array of its own, since later windows "
                      "still read the frames that earlier results would overwrite.")


def is_disk_full(error: BaseException) -> bool:
    """Whether an OSError (also h5py's, which carry errno only in the text) means ENOSPC"""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


def is_file_too_large(error: BaseException) -> bool:
    """Whether a write failed because the file outgrew a size limit (EFBIG)"""
    if isinstance(error, OSError) and error.errno == errno.EFBIG:
        return True
    return "File too large" in str(error)


def write_failure_reason(error: BaseException) -> str:
    """Why a write failed, in words: a full disk, a size limit, or HDF5's own first line"""
    if is_disk_full(error):
        return "the disk is full"
    if is_file_too_large(error):
        return ("the file outgrew the largest file this file system or your account's "
                "limits allow")
    return first_line(error)


DEFERRABLE_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals that stop a run, which :func:`signals_deferred` holds back"""


def raise_terminated(signum, frame):
    """Signal handler turning SIGTERM into :class:`Terminated`"""
    raise Terminated(f"terminated by {signal.Signals(signum).name}")


def first_line(error: BaseException | str) -> str:
    """The first line of an exception's message (or a text), whitespace collapsed"""
    text = str(error).split("\n")[0]
    return " ".join(text.split()) or type(error).__name__


@contextlib.contextmanager
def sigterm_raises():
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread

    Without this, SIGTERM ends Python at once and a temporary output would
    stay behind. Only a default handler is replaced (a host application's
    own handler is respected), and only in the main thread, where Python
    delivers signals.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred():
    """Within the block, SIGINT and SIGTERM wait; they take effect as it ends

    For the steps that must not stop halfway: creating, committing or
    removing an output, starting a worker process. A signal that arrives
    meanwhile raises its exception (KeyboardInterrupt, :class:`Terminated`)
    when the block is done, so cleanup finds everything whole; a signal
    whose action is the system's default ends the process then. Processes
    started in the block begin with both signals blocked, so a Ctrl-C in
    the terminal, which reaches every process of the job, cannot stop them
    halfway through their start either; they unblock them once ready, as
    the CPU workers do. Only the main thread defers: Python runs signal
    handlers nowhere else. Blocks may nest.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []

    def remember(signum, frame):
        # Also while the handlers are being put back (a signal that another
        # thread took reaches the main thread at any moment): raising then
        # would leave the rest of them unrestored.
        arrived.append((signum, frame))

    handlers = {signum: signal.signal(signum, remember) for signum in DEFERRABLE_SIGNALS
                if callable(signal.getsignal(signum))}
    blocking = hasattr(signal, "pthread_sigmask")
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRABLE_SIGNALS) if blocking else None
    try:
        yield
    finally:
        if blocking:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a blocked one is remembered now
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if arrived:
            signum, frame = arrived[0]
            handlers[signum](signum, frame)
