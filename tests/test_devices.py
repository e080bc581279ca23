"""Choosing the device: the spellings, the environment variable, and what "auto" says"""
import logging
import sys

import pytest

from dcbg import cudaprobe, devices
from dcbg.devices import DeviceChoice, parse_device, select_device
from dcbg.errors import DeviceError


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(devices.DEVICE_ENV, raising=False)


@pytest.fixture
def no_cuda_questions(monkeypatch):
    """Fail the test if anything asks what CUDA can do"""
    def asked(*args):
        raise AssertionError("CUDA was probed")
    for name in ("visible_nvidia_gpus", "device_problem", "cuda_device_count"):
        monkeypatch.setattr(cudaprobe, name, asked)
    monkeypatch.setattr(devices, "cuda_unavailable_reason", asked)


@pytest.fixture
def usable_gpus(monkeypatch):
    """CUDA devices 0 and 1 can be used (and the kernel compiles)"""
    monkeypatch.setattr(cudaprobe, "cuda_device_count", lambda: 2)
    monkeypatch.setattr(cudaprobe, "device_problem",
                        lambda index=0: None if index < 2 else "no such device")
    monkeypatch.setattr(devices, "cuda_unavailable_reason", lambda index=0: None)


@pytest.mark.parametrize("text,expected", [
    ("auto", ("auto", None)),
    (" AUTO ", ("auto", None)),
    ("cpu", ("cpu", None)),
    ("CPU", ("cpu", None)),
    ("cuda", ("cuda", 0)),
    ("Cuda", ("cuda", 0)),
    ("cuda:0", ("cuda", 0)),
    ("cuda:3", ("cuda", 3)),
    ("CUDA:12\n", ("cuda", 12)),
    ("cuda:all", ("cuda", "all")),
    ("CUDA:ALL", ("cuda", "all")),
])
def test_every_accepted_spelling(text, expected):
    request = parse_device(text)
    assert (request.kind, request.index) == expected
    assert str(request) == text, "the request reads as it was written"
    assert parse_device(request) is request, "read once"


@pytest.mark.parametrize("text", [
    "gpu", "", "cuda:", "cuda:-1", "cuda:x", "cuda:1.5", "cuda: 1", "cuda0", "cuda:0:1",
    "cpu:0", "auto:1", "cuda:any", None,
    "cuda:\u00b2",  # a digit to str.isdigit(), not to int()
])
def test_a_wrong_spelling_says_which_ones_are_accepted(text):
    with pytest.raises(ValueError, match=r"^Unknown device '.*'; use 'auto', 'cpu', 'cuda', "
                                         r"'cuda:N' or 'cuda:all'\.$"):
        parse_device(text)


def test_cpu_is_chosen_without_asking_cuda(no_env, no_cuda_questions):
    choice = select_device("cpu")
    assert choice == DeviceChoice("cpu", None, "requested")
    assert not choice.split


def test_a_choice_made_before_is_returned_as_it_is(no_cuda_questions, monkeypatch):
    monkeypatch.setenv(devices.DEVICE_ENV, "cpu")
    for choice in (DeviceChoice("cuda", 1, "requested"),
                   DeviceChoice("cpu", None, "CuPy is not installed"),
                   DeviceChoice("cuda", 0, "split", (0, 1))):
        assert select_device(choice) is choice


@pytest.mark.parametrize("env,expected", [("cpu", "cpu"), (" cuda:1 ", "cuda:1"),
                                          ("cuda:all", "cuda:all"), ("auto", "cuda:0"),
                                          ("", "cuda:0"), ("  ", "cuda:0")])
def test_the_environment_variable_overrides_auto(usable_gpus, monkeypatch, env, expected):
    monkeypatch.setenv(devices.DEVICE_ENV, env)
    assert str(select_device("auto")) == expected


@pytest.mark.parametrize("requested", ["cpu", "cuda", "cuda:1", "cuda:all"])
def test_the_environment_variable_leaves_an_explicit_device_alone(usable_gpus, monkeypatch,
                                                                  requested):
    expected = {"cuda": "cuda:0"}.get(requested, requested)
    for env in ("cpu", "cuda:1", "gpu"):
        monkeypatch.setenv(devices.DEVICE_ENV, env)
        assert str(select_device(requested)) == expected


def test_a_wrong_environment_variable_is_refused_for_auto(usable_gpus, monkeypatch):
    monkeypatch.setenv(devices.DEVICE_ENV, "gpu")
    with pytest.raises(ValueError, match="^DCBG_DEVICE: Unknown device 'gpu'"):
        select_device("auto")


def test_auto_without_cupy_picks_the_cpu_and_says_why(no_env, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import fails
    monkeypatch.setattr(cudaprobe, "visible_nvidia_gpus", lambda: 0)
    with caplog.at_level(logging.INFO, logger="dcbg.devices"):
        choice = select_device("auto")
    assert (choice.kind, choice.index, str(choice)) == ("cpu", None, "cpu")
    assert choice.reason.startswith("CuPy is not installed")
    assert "pip install" in choice.reason
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], \
        "no GPU, nothing to warn about"
    with pytest.raises(DeviceError, match="^CUDA device 0 cannot be used: CuPy is not "
                                          "installed; install the extra"):
        select_device("cuda")


def test_auto_with_a_visible_but_unusable_gpu_warns_once_with_the_fix(no_env, monkeypatch,
                                                                      caplog):
    reason = "CuPy cannot load NVRTC, the CUDA kernel compiler (libnvrtc.so.12 missing); " \
             + cudaprobe.FIX_INSTALL
    monkeypatch.setattr(devices, "cuda_unavailable_reason", lambda index=0: reason)
    monkeypatch.setattr(cudaprobe, "visible_nvidia_gpus", lambda: 1)
    with caplog.at_level(logging.INFO, logger="dcbg.devices"):
        choice = select_device("auto")
    assert choice == DeviceChoice("cpu", None, reason, automatic=True)
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    text = warning.getMessage()
    assert "\n" not in text
    assert text.startswith("A GPU is visible, but dcbg cannot use it: CuPy cannot load NVRTC")
    assert 'pip install ".[cuda12]" or ".[cuda13]" in the dcbg checkout' in text
    assert text.endswith("computing on the CPU meanwhile.")


def test_auto_takes_a_usable_gpu(no_env, usable_gpus, caplog):
    with caplog.at_level(logging.INFO, logger="dcbg.devices"):
        choice = select_device()
    assert (str(choice), choice.index, choice.split) == ("cuda:0", 0, False)
    assert "Using the CUDA backend" in caplog.text


def test_explicit_cuda_that_cannot_be_used_is_an_error(no_env, usable_gpus):
    with pytest.raises(DeviceError, match=r"^CUDA device 2 cannot be used: no such device; "
                                          r"or use device=\"cpu\" or \"auto\"\.$"):
        select_device("cuda:2")


def test_cuda_all_splits_across_every_device(no_env, usable_gpus):
    choice = select_device("cuda:all")
    assert (choice.kind, choice.index, choice.indices, choice.split) == ("cuda", 0, (0, 1),
                                                                         True)
    assert "split across 2 device(s)" in choice.reason


def test_cuda_all_without_devices_is_an_error(no_env, monkeypatch):
    monkeypatch.setattr(cudaprobe, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(cudaprobe, "device_problem", lambda index=0: "no CUDA device found")
    with pytest.raises(DeviceError, match="^CUDA devices cannot be used: no CUDA device found"):
        select_device("cuda:all")


@pytest.mark.parametrize("choice,text", [
    (DeviceChoice("cpu", None, "requested"), "cpu"),
    (DeviceChoice("cuda", 0, "requested"), "cuda:0"),
    (DeviceChoice("cuda", 3, "requested"), "cuda:3"),
    (DeviceChoice("cuda", 0, "requested", (0, 1, 2)), "cuda:all"),
])
def test_a_choice_reads_as_the_device_string_that_selects_it(choice, text):
    assert str(choice) == text
    index = devices.ALL_DEVICES if choice.split else choice.index
    request = parse_device(text)
    assert (request.kind, request.index) == (choice.kind, index)
