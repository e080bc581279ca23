"""Which CUDA device a thread works on, without a context on any other device

Since CUDA 12, making a device current (``cudaSetDevice``) creates its
context, a few hundred MiB of that GPU's memory. CuPy's ``with
cupy.cuda.Device(n):`` makes device ``n`` current and, on leaving, the
device that was current before, which in a thread that never chose one is
device 0: a run on ``cuda:1`` would hold memory on GPU 0. So a thread that
dcbg starts makes its device current once, for the rest of its life
(:func:`use_device`), and code that may run in a caller's thread goes
through :func:`on_device`, which goes back only where the thread was
working on a device before.
"""
from __future__ import annotations

import contextlib


def use_device(device_index: int):
    """Make a CUDA device current in the calling thread for good (in threads dcbg starts)"""
    import cupy

    cupy.cuda.Device(device_index).use()


@contextlib.contextmanager
def on_device(device_index: int):
    """Work on a CUDA device within the block, wherever the calling thread came from

    A thread with a current context (it works on a GPU already) gets its
    device back afterwards, as with ``cupy.cuda.Device``. A thread without
    one keeps `device_index` current afterwards: going back to "no device"
    is not possible, and going back to device 0 would make a context there.
    """
    import cupy

    if not cupy.cuda.driver.ctxGetCurrent():
        cupy.cuda.Device(device_index).use()
        yield
        return
    with cupy.cuda.Device(device_index):
        yield
