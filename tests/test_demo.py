"""The demo's work: a synthetic recording in a folder, and its background computed"""
import h5py
import pytest

from dcbg import demo
from dcbg.errors import DeviceError


def test_the_demo_writes_a_recording_and_its_background(tmp_path):
    announced = []
    run = demo.run_demo(tmp_path / "demo", 120, device="cpu", num_cpus=1,
                        on_synthesize=announced.append)
    assert announced == [run.source] == [tmp_path / "demo" / "demo.rtdc"]
    assert run.target == tmp_path / "demo" / "demo_bg.rtdc"
    assert run.result.ok and run.result.events == 120
    assert run.result.ppid == f"rollmed:k={demo.KERNEL_SIZE}^b={demo.BATCH_SIZE}"
    with h5py.File(run.target) as h5:
        assert h5["events/image_bg"].shape[0] == 120
    assert sorted(path.name for path in run.source.parent.iterdir()) == [
        "demo.rtdc", "demo_bg.rtdc"]  # no temporary file stays behind


def test_an_unusable_device_fails_before_any_file_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("DCBG_DEVICE", raising=False)
    with pytest.raises((DeviceError, ValueError)):
        demo.run_demo(tmp_path / "demo", 120, device="cuda:99")
    assert not (tmp_path / "demo").exists()
