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


def test_warnings_of_the_run_are_in_its_log(tmp_path):
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 60, shape=(8, 16), seed=2)
    too_many = available_cpus() + 1
    with dcbg.BackgroundRollMed(source, tmp_path / "out.rtdc", kernel_size=4,
                                num_cpus=too_many, io_threads=3, device="cpu") as bg:
        bg.process()
    with h5py.File(tmp_path / "out.rtdc") as h5:
        (_, record), = read_run_logs(h5)
    # 8x16 frames are one pixel slice: one worker starts, whatever was asked for
    assert record["workers"] == 1 and record["worker_kind"] == "threads"
    assert record["io_threads"] == min(3, available_cpus())
    # the codec threads are capped (and warned about, once per process) as the run starts
    others = [text for text in record["warnings"] if "I/O threads" not in text]
    assert len(others) == 1 and f"{too_many} CPU workers were asked for" in others[0]
