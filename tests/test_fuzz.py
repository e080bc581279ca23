"""Damaged files: fuzzed inputs give clean errors, libhdf5 hangs and crashes are contained"""
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from dcbg import errors
from dcbg.cli import main
from dcbg.rtdc import metadata_check as probe
from dcbg.synthetic import write_synthetic_rtdc

pytestmark = pytest.mark.slow  # fuzzing runs many damaged files through the command line

HELPERS = pathlib.Path(__file__).with_name("helpers")


def test_fuzzed_files_give_only_clean_errors(tmp_path):
    """Bit flips, zeroed blocks and truncations of small .rtdc files

    The fuzzer runs in a child process, so that a crash inside HDF5 would
    fail this test instead of killing the test session.
    """
    run = subprocess.run([sys.executable, str(HELPERS / "fuzz_reader.py"), str(tmp_path),
                          "--count", "240", "--seed", "20261122", "--timeout", "10"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["tried"] == 240
    assert report["unclean"] == [], report["unclean"][:5]
    assert report["clean_errors"] > 0 and report["readable"] > 0
    assert report["hangs"] == [] and report["crashes"] == []


def test_hdf5_hangs_and_crashes_on_metadata_become_clean_errors(tmp_path, monkeypatch,
                                                                 capsys):
    """libhdf5 loops or crashes on some damaged attributes

    Fuzzing found such files; their bytes depend on the HDF5 version, so
    here the probe's child process hangs or crashes on purpose for files
    named so, and the batch goes on with the others.
    """
    good = write_synthetic_rtdc(tmp_path / "good.rtdc", 60, shape=(6, 8))
    for name in ("hangs.rtdc", "crashes.rtdc"):
        shutil.copy(good, tmp_path / name)
    monkeypatch.setattr(probe, "PROBE_SECONDS", 2.0)
    monkeypatch.setattr(probe, "PROBE_COMMAND", [sys.executable,
                                                 str(HELPERS / "probe_faults.py")])
    with pytest.raises(errors.InputFileError, match="HDF5 hung for 2 s"):
        probe.probe_metadata(tmp_path / "hangs.rtdc")
    with pytest.raises(errors.InputFileError, match="HDF5 crashed .*signal 11"):
        probe.probe_metadata(tmp_path / "crashes.rtdc")
    probe.probe_metadata(good)
    assert main(["compute", str(tmp_path), "-r", "-kb", "kernel_size=4", "--device", "cpu",
                 "--num-cpus", "1"]) == 1
    out = capsys.readouterr().out
    assert "1 of 3 files done" in out
    assert "hangs.rtdc: FAILED" in out and "crashes.rtdc: FAILED" in out
    assert (tmp_path / "good_bg.rtdc").exists()


def test_the_probe_runs_as_a_module(tmp_path):
    good = write_synthetic_rtdc(tmp_path / "good.rtdc", 60, shape=(6, 8))
    assert subprocess.run([*probe.PROBE_COMMAND, str(good)]).returncode == 0
    (tmp_path / "junk.rtdc").write_text("not hdf5")
    assert subprocess.run([*probe.PROBE_COMMAND, str(tmp_path / "junk.rtdc")],
                          capture_output=True).returncode == 1
