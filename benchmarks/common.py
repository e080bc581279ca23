"""Shared pieces of the benchmarks: the stack, isolated runs, the results table"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys

import numpy as np

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
SHAPE = (80, 320)


class TiledStack:
    """A realistic stack of any length without holding it in memory

    The first `period` synthetic frames repeat cyclically; slicing returns
    numpy arrays, so dcbg and dcnum read it like an h5py dataset.
    """

    def __init__(self, count: int, shape=SHAPE, period: int = 4096, seed: int = 42):
        from dcbg.synthetic import synthetic_stack
        self.base = synthetic_stack(min(period, count), shape, seed)
        self.shape = (count, *shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, item):
        if isinstance(item, (int, np.integer)):
            return self.base[int(item) % len(self.base)]
        start, stop, step = item.indices(len(self))
        return self.base[np.arange(start, stop, step) % len(self.base)]


def peak_rss_mib() -> dict:
    """Peak resident memory of this process and of its largest child, MiB"""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"rss_main_mib": round(own), "rss_worker_mib": round(children)}


def run_isolated(module: str, case: dict, timeout: int = 3600) -> dict:
    """Run one case in a fresh interpreter so its peak memory is its own"""
    command = [sys.executable, "-m", module, "--case", json.dumps(case)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(pathlib.Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=pathlib.Path(__file__).parent)
    if done.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    """One line describing this machine"""
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} CPUs, {memory:.0f} GiB, Python {platform.python_version()}"


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of `rows` with (key, title) columns"""
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key, "")
            cells.append(f"{value:,.1f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def append_results(title: str, command: str, body: str, notes: str = ""):
    """Append a dated section to benchmarks/RESULTS.md and print it"""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n## {title}\n\n- date: {stamp}\n- machine: {machine()}\n"
               f"- command: `{command}`\n\n{body}\n")
    if notes:
        section += f"\n{notes}\n"
    print(section)
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in this folder; "
                           "newest last. Numbers are what the command printed.\n")
    with RESULTS.open("a") as handle:
        handle.write(section)
