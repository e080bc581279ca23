"""What this process may use: its CPUs, and how it starts worker processes"""
from __future__ import annotations

import multiprocessing as mp
import os

mp_spawn = mp.get_context("spawn")
"""Workers are spawned, never forked: forking a process with threads is unsafe"""


def available_cpus() -> int:
    """Number of CPUs this process may run on (its affinity mask where there is one)"""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
