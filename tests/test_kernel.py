"""The CUDA kernel without a GPU: it compiles, and its per-thread logic is exact

The same rollmed.cu is compiled with nvcc (or NVRTC through
CuPy) for real GPUs, and with g++ plus a shim of the CUDA built-ins for the
CPU, where it is compared byte for byte with the definition.
"""
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dcbg.engines import cudakernel, cudamemory
from dcbg.engines.cpu import compute_median_for_slice
from dcbg.reference import rolling_median_reference, rolling_median_windows_reference
from helpers import host_kernel as hk
from helpers.data import stack_cases
from helpers.processes import run_check_in_child

CASES = stack_cases()
H100_SMS = 132


def sm90_blocks_per_sm(kernel, block, shared_mem):
    """Resident blocks per SM of an sm_90 device: 228 KiB, 1 KiB reserved per block"""
    return min(228 * 1024 // (shared_mem + 1024), 2048 // block, 32)


def planned(pixels, output_size, kernel_size):
    return cudakernel.plan_launch(pixels, output_size, kernel_size, sm90_blocks_per_sm, H100_SMS)


def definition_medians(stack, kernel_size):
    """The definition's medians of the windows that fit in `stack`, one row per window"""
    count = max(len(stack) - kernel_size, 1)
    return rolling_median_reference(stack, kernel_size)[:count].reshape(count, -1)


def assert_kernel_exact(lib, stack, kernel_size, plan=None, expected=None):
    """The host-compiled kernel, and the CPU backend, give the definition's bytes

    `expected` is the definition's result for `stack`, when a test checks
    many plans on one stack and computes it once.
    """
    if expected is None:
        expected = definition_medians(stack, kernel_size)
    count = len(expected)
    frames = np.ascontiguousarray(stack.reshape(len(stack), -1)[:count + kernel_size - 1])
    pixels = frames.shape[1]
    if plan is None:
        plan = planned(pixels, count, kernel_size)
    guard = 5
    medians = np.full((count + 2 * guard, pixels), 0xAB, np.uint8)
    hk.launch(lib, plan, frames, medians[guard:guard + count], pixels, count, kernel_size)
    assert (medians[:guard] == 0xAB).all() and (medians[guard + count:] == 0xAB).all()
    assert np.array_equal(medians[guard:guard + count], expected)
    # and the CPU backend agrees on the same frames
    cpu = np.zeros_like(expected)
    compute_median_for_slice(frames, cpu, kernel_size, count, slice(0, pixels))
    assert np.array_equal(cpu, expected)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kernel_size", [2, 4, 10, 30])
def test_kernel_matches_definition(host_kernel, name, kernel_size):
    assert_kernel_exact(host_kernel, CASES[name], kernel_size)


@pytest.mark.parametrize("kernel_size", [254, 256, 300, 1000])
@pytest.mark.parametrize("extra", [0, 1, 37])
def test_kernel_large_kernels(host_kernel, kernel_size, extra):
    rng = np.random.default_rng(kernel_size * 3 + extra)
    stack = rng.integers(0, 256, (kernel_size + extra, 2, 3), dtype=np.uint8)
    stack[:, 0, 0] = 255  # one bin holds the whole window
    stack[:, 1, 2] = np.where(np.arange(len(stack)) % 2, 0, 255)
    assert_kernel_exact(host_kernel, stack, kernel_size)


@pytest.mark.parametrize("kernel_size", [2, 254])
def test_every_count_width_and_segmentation(host_kernel, kernel_size):
    """Count widths 8/16/32 bits and time segments all give the same bytes"""
    stack = np.concatenate([CASES["realistic"]] * 4)[:kernel_size + 90]
    count = len(stack) - kernel_size
    pixels = stack[0].size
    expected = definition_medians(stack, kernel_size)
    for name in ("dcbg_rollmed_count8", "dcbg_rollmed_count16", "dcbg_rollmed_count32"):
        for block in (32, 64, 96):
            for segment_length in (1, 7, count, count + 5):
                plan = cudakernel.LaunchPlan(name, block, (-(-pixels // block),
                                                     -(-count // segment_length)),
                                       segment_length, 0)
                assert_kernel_exact(host_kernel, stack, kernel_size, plan, expected)


def check_reads_stay_inside(library):
    """Short segments at both edges of buffers with unreadable neighbours

    The input holds exactly output_size + kernel_size - 1 rows, as the last
    batch of a run may, and the kernel loads rows ahead of use: a load or
    store outside the buffers kills this process. Runs in a child process.
    """
    lib = hk.load(library)
    rng = np.random.default_rng(5)
    pixels = 37  # two blocks of 32 with idle threads; rows far shorter than a page
    for kernel_size in (2, 3, 7, 256):
        for output_size in (1, 2, 3, 5, 9, 13):
            stack = rng.integers(0, 256, (output_size + kernel_size, pixels), np.uint8)
            expected = rolling_median_reference(stack, kernel_size)[:output_size]
            for segment_length in sorted({1, 2, 3, 5, output_size}):
                for block in (32, 64):
                    plan = cudakernel.LaunchPlan(cudakernel.kernel_name(kernel_size), block,
                                           (-(-pixels // block),
                                            -(-output_size // segment_length)),
                                           segment_length, 0)
                    for edge in ("end", "start"):
                        print(kernel_size, output_size, segment_length, block, edge,
                              flush=True)
                        frames = hk.guarded_copy(stack[:output_size + kernel_size - 1], edge)
                        medians = hk.guarded_copy(np.zeros_like(expected), edge)
                        hk.launch(lib, plan, frames, medians, pixels, output_size,
                                  kernel_size)
                        assert np.array_equal(medians, expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs mmap and mprotect")
def test_kernel_reads_stay_inside_the_input(host_kernel):
    run = run_check_in_child("test_kernel", "check_reads_stay_inside", host_kernel._name,
                             timeout=300)
    # -11 (SIGSEGV) is an access outside the buffers
    last_case = (run.stdout.splitlines() or [""])[-1]
    assert run.returncode == 0, (
        f"exit {run.returncode} in the case (kernel_size output_size segment_length block "
        f"edge) = ({last_case})\n{run.stderr[-3000:]}")



def test_instrument_frame_with_planned_segments(host_kernel):
    from dcbg.synthetic import synthetic_stack
    stack = synthetic_stack(330, shape=(80, 320), seed=11)
    launch = planned(80 * 320, 330 - 10, 10)
    assert launch.grid[1] > 1, "an 80x320 frame must be split in time on an H100"
    assert_kernel_exact(host_kernel, stack, 10, launch)


def test_plan_fills_the_gpu_and_keeps_warm_up_small():
    launch = planned(80 * 320, 10000, 100)
    resident = sm90_blocks_per_sm(launch.kernel, launch.block, launch.shared_mem) * H100_SMS
    assert launch.grid[0] * launch.grid[1] >= 0.9 * launch.waves * resident
    assert launch.segment_length >= cudakernel.MIN_SEGMENT_WINDOWS * 100
    assert launch.grid[1] * launch.segment_length >= 10000
    assert launch.shared_mem == launch.block * 256 and launch.shared_mem <= 48 * 1024
    big = planned(2048 * 2048, 500, 1000)
    assert big.kernel == "dcbg_rollmed_count16" and big.grid[1] == 1
    assert big.shared_mem == big.block * 512 <= 48 * 1024
    assert cudakernel.kernel_name(255) == "dcbg_rollmed_count8"
    assert cudakernel.kernel_name(256) == "dcbg_rollmed_count16"
    assert cudakernel.kernel_name(70000) == "dcbg_rollmed_count32"
    assert planned(4 * 5, 2000, 70000).block == 32  # 1 KiB of counts per thread


def test_batch_fits_free_memory():
    pixels = 80 * 320
    gib = 2**30
    assert cudamemory.device_batch_size(10000, 100, pixels, 80 * gib, 64 * gib) == 4096
    small = cudamemory.device_batch_size(10000, 100, pixels, 512 * 2**20, 64 * gib)
    assert 1 <= small < 4096
    assert (4 * small + 2 * 100) * pixels <= 512 * 2**20 * cudamemory.DEVICE_MEMORY_FRACTION
    with pytest.raises(MemoryError, match="MiB free"):
        cudamemory.device_batch_size(10000, 100, pixels, 2**20, 64 * gib)


def test_device_batch_ignores_the_methods_batch_and_caps_its_buffers():
    """A GPU with 141 GB and a batch_size of 800k must not pin tens of GiB per buffer"""
    gib = 2**30
    pixels = 80 * 320
    # the windows of the run bound the batch, not the method's batch_size
    assert cudamemory.device_batch_size(800_000, 100, pixels, 141 * gib, None) == 4096
    assert cudamemory.device_batch_size(300, 100, pixels, 141 * gib, None) == 300
    big_frames = 2048 * 2048  # 4 MiB frames: 256 MiB per output buffer at most
    batch = cudamemory.device_batch_size(800_000, 10, big_frames, 141 * gib, None)
    assert batch * big_frames <= cudamemory.BUFFER_BYTES_LIMIT and batch == 64


def test_device_batch_fits_the_host_memory_budget():
    pixels = 80 * 320
    budget = 100 * 2**20  # page-locked bytes this process may take
    batch = cudamemory.device_batch_size(800_000, 100, pixels, 141 * 2**30, budget)
    assert (5 * batch + 2 * 100) * pixels <= budget < (5 * (batch + 1) + 2 * 100) * pixels
    shared = cudamemory.device_batch_size(800_000, 100, pixels, 141 * 2**30, budget,
                                          host_share=0.5)
    assert (5 * shared + 2 * 100) * pixels <= budget / 2
    with pytest.raises(MemoryError, match="Only 1 MiB of host memory may be page-locked"):
        cudamemory.device_batch_size(800_000, 100, pixels, 141 * 2**30, 2**20)


def test_available_host_memory_reads_memavailable(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemFree:         1000 kB\n"
                       "MemAvailable:   65536000 kB\nBuffers:  12 kB\n")
    assert cudamemory.available_host_memory(meminfo) == 65536000 * 1024
    monkeypatch.setattr(cudamemory, "pinned_buffers", cudamemory.PinnedBuffers())
    assert cudamemory.pinned_memory_budget(meminfo) == int(
        65536000 * 1024 * cudamemory.HOST_MEMORY_FRACTION)


def test_planning_is_bounded_and_the_grid_fits_cuda():
    """Long batches of small frames: at most 65,535 segments, a bounded search"""
    for pixels, output_size in ((4 * 5, 10**9), (80 * 320, 826_000), (1, 10**7)):
        for kernel_size in (2, 10, 70000):
            plan = planned(pixels, output_size, kernel_size)
            assert plan.grid[1] <= cudakernel.MAX_GRID_Y
            assert plan.grid[1] * plan.segment_length >= output_size
    # a device that keeps more blocks resident than a grid may have segments
    huge = cudakernel.plan_launch(1, 10**7, 2, sm90_blocks_per_sm, 100_000)
    assert 60_000 < huge.grid[1] <= cudakernel.MAX_GRID_Y
    for pixel_blocks, resident in ((1, 4224), (200, 924), (16384, 924)):
        candidates = cudakernel.segment_candidates(pixel_blocks, resident, 10**8)
        assert len(candidates) <= 200 and candidates[0] == 1 and candidates[-1] == 10**8
        assert len(set(candidates)) == len(candidates)


@pytest.mark.parametrize("ci,werror", [("true", True), ("1", True), ("", False),
                                        ("false", False), (None, False)])
def test_shim_warnings_are_errors_only_in_ci(monkeypatch, ci, werror):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    assert ("-Werror" in hk.compile_flags()) == werror


def test_histograms_are_used_through_their_count_type_only(tmp_path):
    """Counts zeroed as 32-bit words and used as 8- or 16-bit ones break C++'s aliasing
    rules, which let the compiler reorder the zeroing after the counting"""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++")
    run = subprocess.run(
        [compiler, "-std=c++17", "-O2", "-fstrict-aliasing", "-Wstrict-aliasing=1", "-Werror",
         "-shared", "-fPIC", f"-I{hk.KERNEL_DIR}", str(hk.SHIM), "-o",
         str(tmp_path / "aliasing.so")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def check_segments_beyond_2_31_windows(library):
    """One segment of a batch of more than 2^31 windows, run alone

    The frame and median pointers are offset back by the segment's first
    window, so that the rows the segment touches are a small buffer; the
    kernel must count windows in 64 bits to find them. Runs in a child
    process: a kernel that wraps reads far outside the buffer.
    """
    lib = hk.load(library)
    kernel_size, windows, pixels = 5, 9, 3
    rng = np.random.default_rng(8)
    stack = rng.integers(0, 256, (windows + kernel_size - 1, pixels), np.uint8)
    expected = rolling_median_windows_reference(stack, kernel_size)
    # (segment length, segment): the segment's first window and its stop beyond 2^31 - 1
    for segment_length, segment in ((2**30 + 3, 1), (2**30 + 3, 2), (cudakernel.INT_MAX, 3)):
        first = segment * segment_length
        medians = np.zeros((windows, pixels), np.uint8)
        name = cudakernel.kernel_name(kernel_size).encode()
        rc = lib.dcbg_host_launch_rows(
            name, 1, segment + 1, segment, segment + 1, 32,
            stack.ctypes.data - first * pixels, medians.ctypes.data - first * pixels,
            pixels, first + windows, kernel_size, segment_length)
        assert rc == 0
        assert np.array_equal(medians, expected), (segment_length, segment)
        print(segment_length, segment, "ok", flush=True)


def test_kernel_counts_windows_beyond_2_31(host_kernel):
    run = run_check_in_child("test_kernel", "check_segments_beyond_2_31_windows",
                             host_kernel._name, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.count(" ok") == 3


def test_launch_arithmetic_beyond_2_31_windows(fake_gpu):
    """Window counts past int32 reach the kernel whole, and every segment fits its int"""
    fake_gpu()
    windows = 3_000_000_000
    # the last: so large a kernel that segments of four kernel sizes would pass int
    for pixels, kernel_size, count in ((1, 3, windows), (2048 * 2048, 3, windows),
                                       (1, 2**30, 2**33)):
        plan = planned(pixels, count, kernel_size)
        assert plan.segment_length <= cudakernel.INT_MAX
        assert plan.grid[1] <= cudakernel.MAX_GRID_Y
        assert plan.grid[1] * plan.segment_length >= count
        assert (plan.grid[1] - 1) * plan.segment_length < count
    launcher = cudakernel.Launcher(0, 1, 3)
    arguments = launcher.arguments(None, None, windows, planned(1, windows, 3))
    assert [type(value) for value in arguments[2:]] == [np.int64, np.int64, np.int32, np.int32]
    assert int(arguments[3]) == windows
    with pytest.raises(ValueError, match="more than one GPU launch computes"):
        planned(1, cudakernel.MAX_GRID_Y * cudakernel.INT_MAX + 1, 3)
    with pytest.raises(ValueError, match="more than a GPU kernel takes"):
        planned(1, 2**32, 2**31)


def nvcc_compile(tmp_path, arch, module):
    """nvcc's build of one module of rollmed.cu, with the macro that dcbg's compile gives"""
    source = tmp_path / "rollmed.cu"
    source.write_text(cudakernel.kernel_source())
    defines = [option for option in cudakernel.module_options(module)
               if option.startswith("-D")]
    return subprocess.run(
        ["nvcc", "-std=c++14", *defines, f"-arch={arch}", "-cubin", "--resource-usage",
         "-Werror", "all-warnings", str(source), "-o", str(tmp_path / f"{arch}.cubin")],
        capture_output=True, text=True)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_compiles_with_nvcc(tmp_path, arch):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    run = nvcc_compile(tmp_path, arch, "histogram")
    assert run.returncode == 0, run.stderr
    usage = run.stdout + run.stderr
    for name in ("dcbg_rollmed_count8", "dcbg_rollmed_count16", "dcbg_rollmed_count32"):
        assert name in usage
    assert "window" not in usage, "the window kernels are a module of their own"
    # histograms belong in shared memory: no per-thread local arrays, no spills
    assert "bytes stack frame" in usage
    for line in usage.splitlines():
        if "stack frame" in line:
            assert line.strip().startswith("0 bytes stack frame"), line
            assert "0 bytes spill stores" in line, line


def find_nvrtc():
    """libnvrtc from the CUDA toolkit or the nvidia-cuda-nvrtc wheel, if any

    The wheel may be in this environment or in the one of DCBG_CUDA_PYTHON.
    """
    import ctypes.util
    import glob
    import os
    import site
    candidates = [ctypes.util.find_library("nvrtc")]
    roots = site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu"]
    if os.environ.get("DCBG_CUDA_PYTHON"):
        roots.append(str(pathlib.Path(os.environ["DCBG_CUDA_PYTHON"]).parents[1] / "lib"))
    for root in roots:
        candidates += sorted(glob.glob(f"{root}/**/libnvrtc.so*", recursive=True))
    for candidate in filter(None, candidates):
        try:
            return ctypes.CDLL(candidate)
        except OSError:
            continue
    return None


@pytest.mark.parametrize("module", sorted(cudakernel.MODULE_MACROS))
def test_kernel_compiles_with_nvrtc(module):
    """NVRTC, as CuPy uses it: no implicit headers, so the source must stand alone"""
    import ctypes
    nvrtc = find_nvrtc()
    if nvrtc is None:
        pytest.skip("libnvrtc not found (CUDA toolkit or nvidia-cuda-nvrtc wheel)")
    program = ctypes.c_void_p()
    source = cudakernel.kernel_source().encode()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"rollmed.cu", 0,
                                    None, None) == 0
    options = [*(option.encode() for option in cudakernel.module_options(module)),
               b"-arch=sm_90"]
    option_array = (ctypes.c_char_p * len(options))(*options)
    result = nvrtc.nvrtcCompileProgram(program, len(options), option_array)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    assert result == 0, log.value.decode(errors="replace")


def cupy_python() -> str | None:
    """A Python with CuPy for the compile check: DCBG_CUDA_PYTHON, else this one if it has it"""
    import importlib.util
    import os
    if os.environ.get("DCBG_CUDA_PYTHON"):
        return os.environ["DCBG_CUDA_PYTHON"]
    return sys.executable if importlib.util.find_spec("cupy") else None


def test_kernels_compile_through_cupys_own_nvrtc_path():
    """As RawModule compiles them (CuPy's options and headers), for sm_80 and sm_90

    CI runs it in an environment installed from the cuda12 extra
    (DCBG_CUDA_PYTHON), where there is no GPU, so a broken GPU install is
    caught before a user meets it.
    """
    python = cupy_python()
    if python is None:
        pytest.skip("no CuPy here; CI sets DCBG_CUDA_PYTHON to a venv with the cuda12 extra")
    script = pathlib.Path(__file__).with_name("helpers") / "cupy_compile.py"
    run = subprocess.run([python, str(script), "--arch", "sm_80", "--arch", "sm_90"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    for arch in ("sm_80", "sm_90"):  # each module
        assert run.stdout.count(f"{arch}: OK cubin") == len(cudakernel.MODULE_MACROS), \
            run.stdout
