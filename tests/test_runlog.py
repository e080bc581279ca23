"""The run log every process() leaves in its output"""
import json

import dclab
import h5py

import dcbg
from dcbg import cpukernels
from dcbg.runlog import read_run_logs
from dcbg.synthetic import write_synthetic_rtdc
from dcbg.system import available_cpus


def test_run_log_in_the_output(computed):
    source, output = computed
    with h5py.File(output) as h5:
        logs = read_run_logs(h5)
    assert len(logs) == 1
    name, record = logs[0]
    assert name.startswith("dcbg-background_")
    assert record["software"] == f"dcbg {dcbg.__version__}"
    assert record["ppid"] == "rollmed:k=20^b=100"
    assert record["device"] == "cpu" and record["workers"] == 1
    assert record["cpu_kernels"] == cpukernels.cpu_kernels().build
    assert record["events"] == 400 and record["warnings"] == []
    # the settings as decided
    assert (record["compression"], record["num_cpus"], record["verify"]) == ("zstd-5", 1,
                                                                            "sample")
    assert record["io_threads"] == available_cpus()
    assert set(record["seconds"]) == {"read", "median", "write", "total"}
    assert 0 < record["seconds"]["median"] <= record["seconds"]["total"]
    assert record["start"] <= record["end"]
    with dclab.new_dataset(output) as ds:  # dclab shows it among the logs
        assert json.loads("\n".join(ds.logs[name]))["ppid"] == "rollmed:k=20^b=100"


def test_in_place_runs_add_one_log_each(computed, tmp_path):
    source, _ = computed
    path = tmp_path / "copy.rtdc"
    path.write_bytes(source.read_bytes())
    for kernel_size in (4, 6):
        with dcbg.BackgroundRollMed(path, path, kernel_size=kernel_size, num_cpus=1,
                                    device="cpu") as bg:
            bg.process()
    with h5py.File(path) as h5:
        assert [r["ppid"] for _, r in read_run_logs(h5)] == ["rollmed:k=4^b=10000",
                                                              "rollmed:k=6^b=10000"]


def test_warnings_of_the_run_are_in_its_log(tmp_path, monkeypatch):
    from dcbg import settings
    monkeypatch.setattr(settings, "_warned", set())
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 60, shape=(8, 16), seed=2)
    too_many = available_cpus() + 1
    for name in ("out.rtdc", "again.rtdc"):
        with dcbg.BackgroundRollMed(source, tmp_path / name, kernel_size=4, compress="zstd-2",
                                    num_cpus=too_many, io_threads=too_many,
                                    device="cpu") as bg:
            bg.process()
        with h5py.File(tmp_path / name) as h5:
            (_, record), = read_run_logs(h5)
        # 8x16 frames are one pixel slice: one worker starts, whatever was asked for
        assert record["workers"] == 1 and record["worker_kind"] == "threads"
        assert record["num_cpus"] == record["io_threads"] == available_cpus()
        assert record["compression"] == "zstd-2"
        # the caps are decided (and warned about) before the run, and every run's log
        # keeps them, also where the codec threads were warned about in an earlier run
        assert record["warnings"] == [
            f"{too_many} CPU workers were asked for, but this process may use "
            f"{available_cpus()} CPUs; starting {available_cpus()}",
            f"{too_many} I/O threads were asked for, but this process may use "
            f"{available_cpus()} CPUs; starting {available_cpus()}"]
