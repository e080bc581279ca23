#!/usr/bin/env python3
"""Compile dcbg's CUDA kernels through CuPy's NVRTC path for given architectures, no GPU needed

    python cupy_compile.py [FILE.cu ...] [--arch sm_80 --arch sm_90] [--verbose]

Without files it compiles every ``.cu`` of the installed dcbg with its own
options and checks that each kernel entry point is in the binary. The source
goes through the call chain of ``cupy.RawModule(code=..., options=...)``:
``compile_with_cache`` assembles the options (CCCL, CuPy and CUDA header
include paths, default standard), CuPy's compiler adds ``-ftz=true`` and the
architecture, and NVRTC compiles. Two places of that chain touch the CUDA
driver and are bypassed for the duration of the call (both are private CuPy
names, checked to exist; unchanged from CuPy 13.6 to 14.2):

* ``compiler._get_arch_for_options_for_nvrtc`` is memoized per device, so it
  asks for the current device even with an explicit architecture; it is
  replaced by its undecorated function (``__wrapped__``).
* The chain ends by loading the binary on the device; the NVRTC step is
  wrapped so that the binary is captured and the chain stops there.

The on-disk kernel cache is bypassed (``CUPY_CACHE_IN_MEMORY=1``) so NVRTC
always runs. Exit status: 0 all compiled, 1 a compile failed (NVRTC log on
stderr), 2 an environment problem (no CuPy, no NVRTC, no CUDA headers, CUDA
majors that disagree, an unsupported CuPy).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import re
import sys

from dcbg.errors import install_advice

DEFAULT_ARCHS = ("sm_80", "sm_90")

FIX = (f"install the CUDA extra of dcbg for your CUDA major, e.g. {install_advice('cuda12')} "
       "(CuPy >= 14.1 plus cuda-toolkit[nvrtc,cudart] of the same major)")


class EnvironmentProblem(Exception):
    """CuPy, NVRTC or the CUDA headers are missing or unusable"""


class _Captured(BaseException):
    """Raised from the NVRTC hook to stop before the module is loaded on a device"""

    def __init__(self, binary: bytes, options: tuple, kind: str):
        super().__init__()
        self.binary = binary
        self.options = options
        self.kind = kind


def parse_arch(text: str) -> str:
    match = re.fullmatch(r"(?:sm_|compute_)?(\d{2,3})[a-z]?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not an architecture: {text!r} (use e.g. sm_80)")
    return match.group(1)


def load_cupy():
    try:
        import cupy
        from cupy.cuda import compiler
    except Exception as exc:  # noqa: BLE001 - any import failure is an environment problem
        raise EnvironmentProblem(
            f"cannot import cupy: {type(exc).__name__}: {exc}; {FIX}") from exc
    if cupy.cuda.runtime.is_hip:
        raise EnvironmentProblem("this CuPy is a ROCm/HIP build; NVRTC checks need a CUDA build")
    try:
        version = compiler._get_nvrtc_version()
    except Exception as exc:  # noqa: BLE001 - pathfinder, ctypes and CuPy raise various types
        raise EnvironmentProblem(
            f"CuPy {cupy.__version__} cannot load NVRTC: {type(exc).__name__}: "
            f"{first_line(exc)}{nvrtc_hint(cupy)}; {FIX}") from exc
    return cupy, compiler, version


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def loaded_library(fragment: str) -> str | None:
    """Path of a shared library loaded in this process (Linux)"""
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if fragment in os.path.basename(path):
                    return path
    return None


def cuda_headers(options: tuple) -> tuple[str | None, int | None]:
    """(folder, CUDART_VERSION) of the cuda_runtime_api.h that NVRTC's -I order finds first"""
    for opt in options:
        if not opt.startswith("-I"):
            continue
        header = pathlib.Path(opt[2:], "cuda_runtime_api.h")
        if header.is_file():
            match = re.search(r"^#define\s+CUDART_VERSION\s+(\d+)", header.read_text(),
                              re.MULTILINE)
            return opt[2:], int(match.group(1)) if match else None
    return None, None


def nvrtc_hint(cupy) -> str:
    """Extra advice where CuPy 13 cannot see the NVRTC wheel"""
    if int(cupy.__version__.split(".")[0]) >= 14:
        return ""
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    folders = [pathlib.Path(p, sub) for p in (spec.submodule_search_locations or [])
               for sub in ("cuda_nvrtc/lib", "cu13/lib")] if spec else []
    found = [str(f) for f in folders if f.is_dir()]
    return (" (CuPy 13 dlopen()s libnvrtc.so.N by name only and never looks into NVIDIA wheels"
            + (f": LD_LIBRARY_PATH={found[0]} would work" if found else "") + "; CuPy >= 14 does)")


@contextlib.contextmanager
def device_free(compiler):
    """Patch the two device-touching spots of CuPy's compile chain for the duration"""
    arch_fn = compiler._get_arch_for_options_for_nvrtc
    unwrapped = getattr(arch_fn, "__wrapped__", None)
    if unwrapped is None:
        raise EnvironmentProblem("unsupported CuPy: _get_arch_for_options_for_nvrtc has no "
                                 "__wrapped__ (memoize changed)")
    # CuPy 14.x: _compile_with_cache_cuda calls _compile_using_nvrtc_no_warning;
    # CuPy 13.x: it calls compile_using_nvrtc directly.
    hook_name = ("_compile_using_nvrtc_no_warning"
                 if hasattr(compiler, "_compile_using_nvrtc_no_warning")
                 else "compile_using_nvrtc")
    nvrtc_fn = getattr(compiler, hook_name)
    program_cls = compiler._NVRTCProgram
    seen = {}

    class RecordingProgram(program_cls):
        """Records the final option list and output kind NVRTC gets"""

        def compile(self, options=(), log_stream=None):
            seen["options"], seen["kind"] = tuple(options), self.method
            return super().compile(options, log_stream)

    def capture(source, options=(), *args, **kwargs):
        binary, _mapping = nvrtc_fn(source, options, *args, **kwargs)
        raise _Captured(binary, seen["options"], seen["kind"])

    saved_env = os.environ.get("CUPY_CACHE_IN_MEMORY")
    os.environ["CUPY_CACHE_IN_MEMORY"] = "1"
    compiler._get_arch_for_options_for_nvrtc = unwrapped
    compiler._NVRTCProgram = RecordingProgram
    setattr(compiler, hook_name, capture)
    try:
        yield
    finally:
        compiler._get_arch_for_options_for_nvrtc = arch_fn
        compiler._NVRTCProgram = program_cls
        setattr(compiler, hook_name, nvrtc_fn)
        if saved_env is None:
            os.environ.pop("CUPY_CACHE_IN_MEMORY", None)
        else:
            os.environ["CUPY_CACHE_IN_MEMORY"] = saved_env


def compile_for_arch(cupy, compiler, source: str, options: tuple, arch: str):
    """(binary, kind, options) of `source` for `arch` as RawModule would compile it"""
    from cupy._core import core
    with device_free(compiler):
        try:
            # The very call RawModule makes (cupy/_core/raw.pyx: _get_raw_module), plus arch.
            core.compile_with_cache(source, options, arch=arch, prepend_cupy_headers=False)
        except _Captured as done:
            return done.binary, done.kind, done.options
        except RuntimeError as exc:  # CompileException is no RuntimeError: it passes through
            # e.g. CuPy 14.1+: 'Failed to find CUDA headers...', CuPy 13: CUDA root not found
            raise EnvironmentProblem(f"CuPy could not assemble the compile options: "
                                     f"{first_line(exc)}; {FIX}") from exc
    raise EnvironmentProblem("CuPy's compile chain returned without running NVRTC "
                             "(unsupported CuPy version?)")


def check_one(cupy, compiler, path, source, options, arch, entries, verbose, nvrtc) -> bool:
    """Compile one file for one arch and print its line; True where it compiled"""
    try:
        binary, kind, used = compile_for_arch(cupy, compiler, source, options, arch)
    except compiler.CompileException as exc:
        print(f"sm_{arch}: FAILED ({path.name}, NVRTC {nvrtc})", flush=True)
        # in-memory compiles have no file name: NVRTC calls it "default_program"
        log = exc.get_message().replace(exc.name or "default_program", str(path))
        print(f"NVRTC log for {path}, sm_{arch}:\n{log.rstrip()}\n"
              f"options: {' '.join(exc.options)}", file=sys.stderr, flush=True)
        return False
    header_dir, cudart = cuda_headers(used)
    build_major = cupy.cuda.driver.get_build_version() // 1000
    major = int(nvrtc.split(".")[0])
    if header_dir is None or cudart is None:
        raise EnvironmentProblem(f"no cuda_runtime_api.h in NVRTC's include path; {FIX}")
    if {build_major, cudart // 1000} != {major}:
        raise EnvironmentProblem(
            f"CUDA majors disagree: CuPy built for CUDA {build_major}, NVRTC {nvrtc}, "
            f"headers {cudart // 1000}.{cudart % 1000 // 10} in {header_dir}; {FIX}")
    missing = [e for e in entries if e.encode() not in binary]
    status = "OK" if not missing else f"MISSING ENTRY {', '.join(missing)}"
    arch_opt = next(o for o in used if o.startswith("-arch="))
    print(f"sm_{arch}: {status} {kind} {len(binary)} bytes ({path.name}, NVRTC {nvrtc}, "
          f"{arch_opt}, CUDA headers {cudart // 1000}.{cudart % 1000 // 10} in {header_dir})")
    if verbose:
        print(f"  NVRTC options: {' '.join(used)}")
    return not missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=pathlib.Path, nargs="*", metavar="FILE.cu",
                        help="CUDA source(s) to compile (default: every kernel of dcbg)")
    parser.add_argument("--arch", action="append", type=parse_arch,
                        help="target architecture, e.g. sm_80 (repeatable; default sm_80, sm_90)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print the full option list NVRTC got")
    args = parser.parse_args(argv)
    archs = args.arch or [parse_arch(a) for a in DEFAULT_ARCHS]
    from host_kernel import kernel_files  # beside this script

    from dcbg.engines import cudakernel
    options = cudakernel.COMPILE_OPTIONS
    files = args.files or kernel_files()
    entries = list(cudakernel.KERNEL_NAMES) if not args.files else []

    try:
        cupy, compiler, (major, minor) = load_cupy()
        print(f"CuPy {cupy.__version__}, NVRTC {major}.{minor} from "
              f"{loaded_library('libnvrtc') or '?'}")
        failed = False
        for path in files:
            try:
                source = path.read_text()
            except OSError as exc:
                raise EnvironmentProblem(f"cannot read {path}: {exc}") from exc
            for arch in archs:
                failed |= not check_one(cupy, compiler, path, source, options, arch,
                                        entries, args.verbose, f"{major}.{minor}")
        return 1 if failed else 0
    except EnvironmentProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
