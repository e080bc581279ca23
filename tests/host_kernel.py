"""Build tests/kernel_host_shim.cpp (which includes rollmed.cu) and run it"""
import ctypes
import pathlib
import shutil
import subprocess

import numpy as np

import dcbg.cuda

SHIM = pathlib.Path(__file__).with_name("kernel_host_shim.cpp")
KERNEL_DIR = pathlib.Path(dcbg.cuda.__file__).with_name("kernels")


def build(folder: pathlib.Path) -> ctypes.CDLL | None:
    """Compile the shim into a shared library; None when no C++ compiler exists"""
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        return None
    library = folder / "dcbg_kernel_host.so"
    subprocess.run([compiler, "-std=c++17", "-O2", "-Wall", "-Werror", "-shared", "-fPIC",
                    f"-I{KERNEL_DIR}", str(SHIM), "-o", str(library)], check=True)
    lib = ctypes.CDLL(str(library))
    lib.dcbg_host_launch.restype = ctypes.c_int
    lib.dcbg_host_launch.argtypes = [
        ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
        ctypes.c_int]
    return lib


def launch(lib, plan, frames: np.ndarray, medians: np.ndarray, pixels: int,
           output_size: int, kernel_size: int):
    """Run one launch of the kernel on the CPU; frames/medians are C-contiguous"""
    assert frames.flags.c_contiguous and medians.flags.c_contiguous
    rc = lib.dcbg_host_launch(plan.kernel.encode(), plan.grid[0], plan.grid[1], plan.block,
                              frames.ctypes.data, medians.ctypes.data, pixels, output_size,
                              kernel_size, plan.segment_length)
    assert rc == 0, f"host launch failed with code {rc}"
