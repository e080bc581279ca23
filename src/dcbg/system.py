"""What this process may use: its CPUs, how it starts worker processes, what it imports"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys

mp_spawn = mp.get_context("spawn")
"""Workers are spawned, never forked: forking a process with threads is unsafe"""


def available_cpus() -> int:
    """Number of CPUs this process may run on (its affinity mask where there is one)"""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def skip_numba_blas_probe():
    """Keep numba from importing SciPy's linear algebra in this process

    When numba first compiles or loads a kernel it imports ``scipy.linalg``
    (0.2–0.4 s) only to learn whether BLAS is there for ``np.dot`` and its
    kin. dcbg's kernels use no BLAS, so a process that runs nothing but dcbg
    (the command line, a CPU worker) hides the module and numba takes its
    BLAS-free path. Never call it in a process that runs other code.
    """
    if "scipy.linalg" not in sys.modules:
        sys.modules["scipy.linalg"] = None
