"""Fixtures shared by the test modules (shared helpers live in tests/helpers)"""
import sys

import pytest

import dcbg
from dcbg import cpukernels, cudaprobe
from dcbg.engines import cuda, cudakernel, cudamemory
from dcbg.synthetic import write_synthetic_rtdc
from helpers import host_kernel as hk
from helpers.data import SHARED_DATA
from helpers.fake_cupy import make_fake_cupy


@pytest.fixture
def shared_data():
    """The instrument files and golden outputs beside the checkout"""
    if not (SHARED_DATA / "golden" / "index.json").exists():
        pytest.skip("../shared/data is not present (a user's clone has none)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def host_kernel(tmp_path_factory):
    """rollmed.cu compiled for the CPU with the host shim"""
    lib = hk.build(tmp_path_factory.mktemp("kernel"))
    if lib is None:
        pytest.skip("no C++ compiler to build the kernel's host shim")
    return lib


def forget_cuda_state(monkeypatch):
    """Start without what this process learnt of CUDA: compiled kernels, GPUs, pinned
    buffers, the GPU arrays checked"""
    monkeypatch.setattr(cudakernel, "_compiles", {})
    monkeypatch.setattr(cudakernel, "_launchers", {})
    monkeypatch.setattr(cudamemory, "pinned_buffers", cudamemory.PinnedBuffers())
    monkeypatch.setattr(cuda, "_checked_gpu_arrays", set())
    cudaprobe._nvml.cache_clear()
    cudaprobe._inventory.cache_clear()


@pytest.fixture
def fake_gpu(host_kernel, monkeypatch):
    """Install the CuPy/pynvml stand-in; call it with its options, get its state

    Each call starts a new process's view of CUDA: nothing compiled, the
    GPUs not yet described, no pinned buffers kept.
    """
    def install(**kwargs):
        cupy, cupyx, pynvml, state = make_fake_cupy(host_kernel, **kwargs)
        monkeypatch.setitem(sys.modules, "cupy", cupy)
        monkeypatch.setitem(sys.modules, "cupyx", cupyx)
        monkeypatch.setitem(sys.modules, "pynvml", pynvml)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        forget_cuda_state(monkeypatch)
        return state
    yield install
    cudaprobe._nvml.cache_clear()
    cudaprobe._inventory.cache_clear()


@pytest.fixture(scope="session")
def computed(tmp_path_factory):
    """A recording (400 events, 40x120) and its background computed on the CPU

    Tests read both files; a test that changes one works on its own copy.
    """
    folder = tmp_path_factory.mktemp("computed")
    source = write_synthetic_rtdc(folder / "rec.rtdc", 400, shape=(40, 120), seed=11)
    with dcbg.BackgroundRollMed(source, folder / "rec_bg.rtdc", kernel_size=20,
                                batch_size=100, num_cpus=1, device="cpu") as bg:
        bg.process()
    return source, folder / "rec_bg.rtdc"


@pytest.fixture(params=cpukernels.BUILDS)
def cpu_build(request, monkeypatch):
    """Each build of the CPU kernels in turn as the one dcbg runs (C skips where not built)"""
    try:
        kernels = cpukernels.load_build(request.param)
    except ImportError:
        pytest.skip(f"the {request.param} build of the CPU kernels is not installed")
    monkeypatch.setattr(cpukernels, "cpu_kernels", lambda: kernels)
    return kernels
