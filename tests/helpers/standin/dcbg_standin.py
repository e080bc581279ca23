"""Build the CuPy and pynvml stand-ins once per process, for ``import cupy`` in child processes

With ``tests/helpers/standin`` on ``PYTHONPATH``, ``import cupy``,
``import cupyx`` (and ``cupyx.scipy.ndimage``) and ``import pynvml`` give the
stand-ins of :mod:`helpers.fake_cupy`, all sharing one state, whose kernels
are the real ``rollmed.cu`` compiled for the CPU by
:mod:`helpers.host_kernel`. So a command run in a new process (``python -m
dcbg selftest --device cuda``, a benchmark, the GPU acceptance script's dry
run) goes through dcbg's CUDA path on a machine without a GPU.

The compiled kernel is kept in a cache folder (``DCBG_STANDIN_CACHE``,
default ``dcbg-standin`` in the temporary folder), named by a hash of its
sources, so only the first process after a change to them compiles it.
``DCBG_STANDIN_DEVICES`` sets how many GPUs the stand-in shows (default 1).
"""
import functools
import hashlib
import os
import pathlib
import sys
import tempfile

HELPERS = pathlib.Path(__file__).resolve().parents[1]
"""tests/helpers"""


def cache_folder() -> pathlib.Path:
    """Where the compiled kernel is kept"""
    default = pathlib.Path(tempfile.gettempdir()) / f"dcbg-standin-{os.getuid()}"
    return pathlib.Path(os.environ.get("DCBG_STANDIN_CACHE") or default)


def kernel_library(host_kernel) -> pathlib.Path:
    """The kernel compiled for the CPU, from the cache or compiled now"""
    sources = [host_kernel.SHIM, *host_kernel.kernel_files()]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()
    library = cache_folder() / f"dcbg_kernel_host-{digest[:16]}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        # Compile in a folder of its own and rename: processes that start
        # together never load a half-written library.
        with tempfile.TemporaryDirectory(dir=library.parent) as folder:
            if host_kernel.build(pathlib.Path(folder)) is None:
                raise ImportError("The CuPy stand-in needs a C++ compiler (g++) to build "
                                  "the kernel for the CPU; install one.")
            os.replace(pathlib.Path(folder) / "dcbg_kernel_host.so", library)
    return library


@functools.cache
def modules() -> dict:
    """The stand-in modules by name, installed in ``sys.modules``"""
    if str(HELPERS.parent) not in sys.path:
        sys.path.append(str(HELPERS.parent))  # makes tests/helpers importable as `helpers`
    from helpers import host_kernel
    from helpers.fake_cupy import make_fake_cupy

    library = host_kernel.load(kernel_library(host_kernel))
    devices = int(os.environ.get("DCBG_STANDIN_DEVICES", "1"))
    cupy, cupyx, pynvml, state = make_fake_cupy(library, device_count=devices)
    cupy.standin_state = state  # for a test that wants to look inside
    installed = {"cupy": cupy, "cupyx": cupyx, "cupyx.scipy": cupyx.scipy,
                 "cupyx.scipy.ndimage": cupyx.scipy.ndimage, "pynvml": pynvml}
    sys.modules.update(installed)
    return installed
