"""A record of every run, stored in the output's ``logs`` group as dcnum does

Each run adds one dataset ``logs/dcbg-background_<UTC start>``: JSON text,
one line per dataset element (the form dclab shows in ``ds.logs``). It holds
the dcbg version, the PPID, the device with its driver and library
versions, the run's settings as decided (compression, CPU workers, codec
threads, the check of a GPU's results), the host, start and end time, the
number of events, seconds per stage, the warnings of deciding the settings
and those logged during the run, the pixel-outputs of a GPU's results
compared with the CPU and, where a GPU that ``device="auto"`` chose failed
and the CPU computed the run again, that failure.
"""
from __future__ import annotations

import datetime
import json
import logging
import platform
import socket
import typing

import h5py

from . import cpukernels
from ._version import __version__
from .rtdc.hdf5 import read_json_lines, write_json_lines

if typing.TYPE_CHECKING:
    from .settings import RunSettings

LOG_PREFIX = "dcbg-background"
"""Name prefix of the run logs in the ``logs`` group"""


def utc_now() -> str:
    """The current UTC time, ISO 8601 with seconds"""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class WarningCollector(logging.Handler):
    """Collects the warnings dcbg logs while it is attached"""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("dcbg").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("dcbg").removeHandler(self)


def device_details(device) -> dict:
    """What a log should say about the device: name, driver, CUDA and CuPy versions

    `device` is the :class:`~dcbg.devices.ReadyDevice` of the run, which
    holds the GPU's description as NVML gave it when the device was made ready.
    """
    if device.kind != "cuda":
        return {"device": "cpu", "processor": platform.processor() or platform.machine()}
    from .cudaprobe import runtime_versions
    details = {"device": str(device)}
    info = device.description
    if info is not None:
        details.update(name=info["name"], driver=info["driver"], pci_bus_id=info["bus_id"],
                       memory_total_bytes=info["memory_total"])
    details.update(runtime_versions())
    return details


def run_record(ppid: str, device, settings: RunSettings, engine_facts: dict, start: str,
               events: int, stage_seconds: dict, warnings: list[str],
               gpu_failure: dict | None = None) -> dict:
    """The log of one run as a dict

    `device` is the run's :class:`~dcbg.devices.ReadyDevice`. `settings` are
    the run's settings as decided (compression, CPU workers, codec threads,
    the check of GPU results), whose warnings come first among the run's.
    `engine_facts` says what computed it (:meth:`dcbg.engines.Engine.facts`):
    the CPU workers started and their kind, the batch of windows (on a GPU
    the device batch, on several GPUs one per range, and the pixel-outputs
    checked against the CPU). `gpu_failure`, where a GPU failed and the CPU
    computed the run again, holds the GPU, its error and its facts.
    """
    failure = {} if gpu_failure is None else {"gpu_failure": gpu_failure}
    return {
        "software": f"dcbg {__version__}",
        "ppid": ppid,
        **device_details(device),
        **engine_facts,
        **settings.record(),
        **failure,
        "cpu_kernels": cpukernels.cpu_kernels().build,
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "start": start,
        "end": utc_now(),
        "events": events,
        "seconds": {stage: round(value, 3) for stage, value in stage_seconds.items()},
        "warnings": [*settings.warnings, *warnings],
    }


def write_run_log(h5: h5py.File, record: dict) -> str:
    """Add a run log to ``logs`` of a file; returns its dataset name"""
    logs = h5.require_group("logs")
    stamp = record["start"].replace(":", "").replace("+0000", "Z")
    name = f"{LOG_PREFIX}_{stamp}"
    suffix = 1
    while name in logs:  # two runs in one second
        suffix += 1
        name = f"{LOG_PREFIX}_{stamp}_{suffix}"
    write_json_lines(logs, name, record, variable_length=True)
    return name


def read_run_logs(h5: h5py.File) -> list[tuple[str, dict]]:
    """All dcbg run logs of a file, oldest first"""
    found = []
    for name in sorted(h5.get("logs", {})):
        if name.startswith(LOG_PREFIX):
            try:
                found.append((name, read_json_lines(h5["logs"][name])))
            except json.JSONDecodeError:
                continue
    return found
