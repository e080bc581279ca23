"""Build kernel_host_shim.cpp (which includes rollmed.cu) and run it on the CPU"""
import ctypes
import mmap
import os
import pathlib
import shutil
import subprocess

import numpy as np

from dcbg.engines import cudakernel

SHIM = pathlib.Path(__file__).with_name("kernel_host_shim.cpp")
KERNEL_DIR = pathlib.Path(cudakernel.__file__).with_name("kernels")
PROT_NONE = 0  # mprotect flag; the mmap module only names the others


def kernel_files() -> list[pathlib.Path]:
    """Every CUDA source file of the package (for build checks)"""
    return sorted(KERNEL_DIR.glob("*.cu"))


def compile_flags() -> list[str]:
    """The shim's compiler flags: warnings are errors only in CI

    CI sets ``CI`` (GitHub's and most others set it to ``true``); elsewhere, a
    warning of another compiler (a GPU host's, a user's) must not stop the
    tests that run the kernel.
    """
    werror = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return ["-std=c++17", "-O2", "-Wall", *(["-Werror"] if werror else []), "-shared", "-fPIC"]


def build(folder: pathlib.Path) -> ctypes.CDLL | None:
    """Compile the shim into a shared library; None when no C++ compiler exists"""
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        return None
    library = folder / "dcbg_kernel_host.so"
    subprocess.run([compiler, *compile_flags(), f"-I{KERNEL_DIR}", str(SHIM), "-o",
                    str(library)], check=True)
    return load(library)


def load(library) -> ctypes.CDLL:
    """Load a shim library that :func:`build` compiled"""
    lib = ctypes.CDLL(str(library))
    lib.dcbg_host_launch.restype = ctypes.c_int
    lib.dcbg_host_launch.argtypes = [
        ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int,
        ctypes.c_int]
    lib.dcbg_host_launch_rows.restype = ctypes.c_int
    lib.dcbg_host_launch_rows.argtypes = [
        ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
        ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong,
        ctypes.c_int, ctypes.c_int]
    return lib


def launch(lib, plan, frames: np.ndarray, medians: np.ndarray, pixels: int,
           output_size: int, kernel_size: int):
    """Run one launch of the kernel on the CPU; frames/medians are C-contiguous"""
    assert frames.flags.c_contiguous and medians.flags.c_contiguous
    rc = lib.dcbg_host_launch(plan.kernel.encode(), plan.grid[0], plan.grid[1], plan.block,
                              frames.ctypes.data, medians.ctypes.data, pixels, output_size,
                              kernel_size, plan.segment_length)
    assert rc == 0, f"host launch failed with code {rc}"


def guarded_copy(array: np.ndarray, edge: str) -> np.ndarray:
    """A C-contiguous copy of `array` right next to a page that cannot be read

    With ``edge="end"`` the copy's last byte is the last readable one, with
    ``edge="start"`` its first byte is the first readable one. Touching
    the unreadable page kills the process with SIGSEGV, so use it in a
    child process. An access that lands more than a page beyond the edge
    may go unnoticed.
    """
    size = array.nbytes
    pages = -(-size // mmap.PAGESIZE)
    region = mmap.mmap(-1, (pages + 2) * mmap.PAGESIZE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for page in (0, pages + 1):
        if libc.mprotect(base + page * mmap.PAGESIZE, mmap.PAGESIZE, PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
    offset = mmap.PAGESIZE if edge == "start" else (pages + 1) * mmap.PAGESIZE - size
    copy = np.frombuffer(region, array.dtype, array.size, offset).reshape(array.shape)
    copy[...] = array
    return copy
