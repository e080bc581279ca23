"""ChipStream's command line with its rollmed background on dcbg, end to end"""
import subprocess
import sys

import h5py
import hdf5plugin  # noqa: F401 - reads ChipStream's zstd datasets
import numpy as np
import pytest

from dcbg.cli import main
from dcbg.synthetic import write_synthetic_rtdc
from helpers.files import folder_state

pytestmark = pytest.mark.slow  # ChipStream runs whole dcnum pipelines

pytest.importorskip("chipstream.cli", reason="ChipStream is not installed (extra 'chipstream')")


CHIPSTREAM_CLI = "import sys; from chipstream.cli import main; sys.exit(main())"
"""ChipStream's console script chipstream-cli, run by this interpreter"""


def chipstream(tmp_path, *argv):
    run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def contents(path):
    with h5py.File(path) as h5:
        events = {name: h5["events"][name][:] for name in h5["events"]}
        pipeline = {k: v for k, v in h5.attrs.items() if k.startswith("pipeline:")}
        log = next(name for name in h5["logs"] if name.startswith("dcnum-log"))
        lines = [line.decode() if isinstance(line, bytes) else line
                 for line in h5["logs"][log][:]]
    return events, pipeline, lines


def test_chipstream_job_through_dcbg_gives_chipstreams_own_output(tmp_path):
    write_synthetic_rtdc(tmp_path / "rec.rtdc", 600, shape=(80, 320), seed=15)
    job = ["-b", "rollmed", "-kb", "kernel_size=50", "-kb", "batch_size=400", "rec.rtdc"]
    plain = chipstream(tmp_path, sys.executable, "-c", CHIPSTREAM_CLI, *job, "plain.rtdc")
    dcbg = chipstream(tmp_path, sys.executable, "-m", "dcbg", "chipstream", "--device", "cpu",
                      "--", *job, "dcbg.rtdc")
    plain_events, plain_pipeline, plain_log = contents(tmp_path / "plain.rtdc")
    dcbg_events, dcbg_pipeline, dcbg_log = contents(tmp_path / "dcbg.rtdc")
    assert np.array_equal(dcbg_events["image_bg"], plain_events["image_bg"])
    assert dcbg_pipeline == plain_pipeline
    assert dcbg_pipeline["pipeline:dcnum background"] == "rollmed:k=50^b=400"
    assert sorted(dcbg_events) == sorted(plain_events)
    for name, data in plain_events.items():  # segmentation and every feature
        assert np.array_equal(dcbg_events[name], data, equal_nan=data.dtype.kind == "f"), name
    proof = [line for line in dcbg_log if "Computed by dcbg" in line]
    assert len(proof) == 1 and '"ppid": "rollmed:k=50^b=400"' in proof[0]
    assert '"device": "cpu"' in proof[0]
    assert not any("dcbg" in line for line in plain_log)
    # ChipStream's console output is its own
    assert dcbg.stdout.splitlines()[:2] == plain.stdout.splitlines()[:2]
    assert "INFO" not in dcbg.stderr


def test_other_background_methods_say_they_stay_dcnums(tmp_path):
    # in a process of its own: registering with dcnum lasts for the process
    write_synthetic_rtdc(tmp_path / "rec.rtdc", 60, shape=(8, 16), seed=1)
    run = chipstream(tmp_path, sys.executable, "-m", "dcbg", "chipstream", "--", "--dry-run",
                     "rec.rtdc")
    assert "ChipStream's background method is 'sparsemed'" in run.stderr


def test_without_chipstream_the_error_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "chipstream", None)
    assert main(["chipstream", "--", "data.rtdc"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ChipStream's command line is not installed")
    assert 'install it with pip install ".[chipstream]" in the dcbg checkout.' in err


@pytest.mark.parametrize("options,code,message", [
    (["--io-threads", "0"], 2, "argument --io-threads: must be at least 1, got 0"),
    (["--device", "gpu"], 2, "argument --device: Unknown device 'gpu'"),
    (["--device", "cuda:99"], 1, "error: CUDA device 99 cannot be used"),
])
def test_bad_dcbg_options_start_no_chipstream_job(tmp_path, options, code, message):
    write_synthetic_rtdc(tmp_path / "rec.rtdc", 60, shape=(8, 16), seed=1)
    before = folder_state(tmp_path)
    run = subprocess.run([sys.executable, "-m", "dcbg", "chipstream", *options, "--", "-b",
                          "rollmed", "rec.rtdc"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == code and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    assert folder_state(tmp_path) == before
