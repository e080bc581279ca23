"""``dcbg info``: version, devices and what auto picks; with FILE, what it carries"""
from __future__ import annotations

import os
import pathlib
import sys

from .._version import __version__
from ..background import get_available_background_methods
from ..devices import DEVICE_ENV, auto_choice, select_device
from ..errors import first_line
from ..system import available_cpus
from .output import emit


def cmd_info(args) -> int:
    if args.path:
        from ..rtdc.describe import describe_file
        for line in describe_file(pathlib.Path(args.path)):
            emit(line)
        return 0
    emit(f"dcbg {__version__}")
    emit(f"python {sys.version.split()[0]}, CPUs available: {available_cpus()}")
    from ..cpukernels import describe_build
    emit(f"CPU kernels: {describe_build()}")
    from ..cudaprobe import describe_cuda_devices
    devices = describe_cuda_devices()
    if not devices:
        emit("NVIDIA GPUs: none found (pynvml missing or no driver)")
    for dev in devices:
        ordinal = "" if dev["cuda_index"] is None else f" (cuda:{dev['cuda_index']})"
        emit(f"GPU {dev['index']}{ordinal}: {dev['name']}, PCI {dev['bus_id']}, "
             f"{dev['memory_free'] / 2**30:.1f} of {dev['memory_total'] / 2**30:.1f} GiB "
             f"free, driver {dev['driver']}")
    if os.environ.get(DEVICE_ENV):
        emit(f"{DEVICE_ENV}={os.environ[DEVICE_ENV]}")
        try:
            device = select_device("auto")
            emit(f"{DEVICE_ENV} picks: {device} ({device.reason})")
        except (ValueError, RuntimeError) as error:
            emit(f"{DEVICE_ENV} picks: nothing usable ({first_line(error)})")
    choice, warning = auto_choice()
    emit(f"auto picks: {choice} ({choice.reason})")
    if warning:
        emit(f"WARNING: {warning}")
    emit(f"methods: {', '.join(sorted(get_available_background_methods()))}")
    emit("Check that a device computes exact medians, and how fast: dcbg selftest "
         "[--device cuda]")
    return 0


def add_parser(subcommands):
    """`dcbg info` and its options"""
    info = subcommands.add_parser("info", help="version, devices and the backend auto picks; "
                                  "with FILE: what the file carries (PPID, run logs, basins)")
    info.add_argument("path", metavar="FILE", nargs="?", help=".rtdc file to describe")
    info.add_argument("--verbose", action="store_true", help="log details, show tracebacks")
    info.set_defaults(func=cmd_info)
