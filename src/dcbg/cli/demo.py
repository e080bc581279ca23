"""``dcbg demo``: a synthetic recording and its background (see :mod:`dcbg.demo`)"""
from __future__ import annotations

import pathlib
import shlex

from ..demo import EVENTS as DEMO_EVENTS
from ..demo import FOLDER as DEMO_FOLDER
from ..demo import KERNEL_SIZE as DEMO_KERNEL_SIZE
from ..demo import run_demo
from ..devices import select_device
from .compute import result_line
from .options import UsageError, add_run_options
from .output import emit, progress_bar


def cmd_demo(args) -> int:
    """Synthesize a recording and compute its background (see :mod:`dcbg.demo`)

    Every option is checked before the previous demo's files are touched.
    """
    from ..synthetic import DEFAULT_SHAPE
    if args.events < DEMO_KERNEL_SIZE:
        raise UsageError(f"--events must be at least {DEMO_KERNEL_SIZE}, the demo's "
                         f"kernel_size, got {args.events}")
    device = select_device(args.device)  # an unusable device fails before --folder is checked
    folder = pathlib.Path(args.folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--folder {folder} is a file; give a folder for the demo's files")
    height, width = DEFAULT_SHAPE

    def announce(source):
        emit(f"Synthesizing {args.events} frames of {height}x{width} in {source} …")

    source, target, result = run_demo(
        folder, args.events, device=device, num_cpus=args.num_cpus,
        io_threads=args.io_threads, verify=args.verify, progress=progress_bar,
        on_synthesize=announce)
    emit(result_line(result))
    emit("Next steps, each works as printed:")
    for command, meaning in demo_next_commands(source, target):
        emit(f"  {command:<{DEMO_COMMAND_WIDTH}} # {meaning}")
    emit(f"For your own recording, use its path in place of {quoted(source)}")
    emit("(without --force, an existing output is kept and the command stops).")
    return 0


DEMO_COMMAND_WIDTH = 44
"""Width of the commands the demo prints last, so that their comments line up"""


def quoted(path: pathlib.Path) -> str:
    """A path as a shell takes it"""
    return shlex.quote(str(path))


def demo_next_commands(source: pathlib.Path, target: pathlib.Path) -> list[tuple[str, str]]:
    """The commands the demo ends with, each working as printed (command, what it does)"""
    return [
        (f"dcbg preview {quoted(target)}", "PNG of frames, backgrounds, corrected frames"),
        (f"dcbg info {quoted(target)}", "the output's PPID, run log and basin"),
        (f"dcbg compute {quoted(source)} --force",
         f"compute again; --force replaces {target.name}"),
    ]


def add_parser(subcommands):
    """`dcbg demo` and its options"""
    demo = subcommands.add_parser("demo",
                                  help="synthesize a recording and compute its background")
    demo.add_argument("--events", type=int, default=DEMO_EVENTS,
                      help=f"number of frames to synthesize, at least {DEMO_KERNEL_SIZE} (the "
                      f"demo's kernel_size; default: {DEMO_EVENTS})")
    demo.add_argument("--folder", default=DEMO_FOLDER,
                      help=f"where to put the files (default: ./{DEMO_FOLDER}, reused by "
                      f"every demo)")
    add_run_options(demo)
    demo.set_defaults(func=cmd_demo, runs_kernels=True)
