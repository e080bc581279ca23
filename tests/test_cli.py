"""The dcbg command line as a user types it"""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from dcbg import cpukernels
from dcbg.cli import main
from dcbg.reference import rolling_median_reference
from dcbg.synthetic import write_synthetic_rtdc
from helpers.files import folder_state


@pytest.fixture
def recording(tmp_path):
    return write_synthetic_rtdc(tmp_path / "rec.rtdc", 60, shape=(10, 30), seed=5)


def image_bg(path):
    with h5py.File(path) as h5:
        return h5["events/image_bg"][:], h5["events/image_bg"].attrs["dcnum ppid background"]


def images(path):
    with h5py.File(path) as h5:
        return h5["events/image"][:]


def test_compute_default_output(recording, capsys):
    assert main(["compute", str(recording), "-kb", "kernel_size=10", "-kb", "b=25",
                 "--device", "cpu", "--num-cpus", "1"]) == 0
    out = recording.with_name("rec_bg.rtdc")
    data, ppid = image_bg(out)
    assert ppid == "rollmed:k=10^b=25"
    assert np.array_equal(data, rolling_median_reference(images(recording), 10))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "60 events" in line and "events/s" in line and "on cpu" in line
    assert line.endswith("PPID rollmed:k=10^b=25")


def test_existing_output_needs_force(recording, tmp_path, capsys):
    target = tmp_path / "given.rtdc"
    assert main(["compute", str(recording), str(target), "--ppid", "rollmed:k=4^b=20",
                 "--device", "cpu"]) == 0
    kept = target.read_bytes()
    capsys.readouterr()
    assert main(["compute", str(recording), str(target), "--ppid", "rollmed:k=6^b=20"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and len(err.splitlines()) == 1
    assert target.read_bytes() == kept
    assert main(["compute", str(recording), str(target), "--ppid", "rollmed:k=6^b=20",
                 "--force", "--device", "cpu"]) == 0
    assert image_bg(target)[1] == "rollmed:k=6^b=20"


def test_dry_run_prints_ppid_and_writes_nothing(recording, tmp_path, capsys):
    assert main(["compute", str(recording), "--dry-run", "-kb", "kernel_size=8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "rollmed:k=8^b=10000"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.rtdc"]


def test_in_place_and_recursive(recording, tmp_path):
    sub = tmp_path / "day1"
    sub.mkdir()
    second = write_synthetic_rtdc(sub / "other.rtdc", 30, shape=(6, 8), seed=9)
    assert main(["compute", str(tmp_path), "-r", "-kb", "kernel_size=6",
                 "--device", "cpu"]) == 0
    for source in (recording, second):
        data, _ = image_bg(source.with_name(source.stem + "_bg.rtdc"))
        assert np.array_equal(data, rolling_median_reference(images(source), 6))
    assert main(["compute", str(second), "--in-place", "-kb", "kernel_size=4",
                 "--device", "cpu"]) == 0
    assert np.array_equal(image_bg(second)[0],
                          rolling_median_reference(images(second), 4))


@pytest.mark.parametrize("argv,message", [
    (["compute", "{rec}", "-kb", "kernel_size=3"], "positive even integer"),
    (["compute", "{rec}", "--ppid", "rollmed:q=1"], "Unknown PPID keyword 'q'"),
    (["compute", "{rec}", "-c", "lzma"], "Unknown compression 'lzma'"),
    (["compute", "{missing}"], "does not exist"),
    (["compute", "{rec}", "-kb", "kernel_size=4", "--device", "cuda:7"],
     "CUDA device 7 cannot be used"),
    (["compute", "{rec}", "-kb", "kernel_size=1000"], "N=60 events"),
])
def test_errors_are_one_line(recording, tmp_path, capsys, argv, message):
    argv = [a.format(rec=recording, missing=tmp_path / "missing.rtdc") for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_usage_errors_exit_2(recording, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compute"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["compute", str(recording), "-kb", "kernel_size"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["compute", str(recording.parent)])  # a folder without -r
    assert exc.value.code == 2


def test_demo_and_info_as_console_script(tmp_path):
    run = subprocess.run([sys.executable, "-m", "dcbg", "demo", "--events", "300",
                          "--folder", str(tmp_path), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "300 events" in run.stdout and "rollmed:k=100^b=10000" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == (
        f"Look at it: dcbg preview {tmp_path / 'demo_bg.rtdc'}")
    data, _ = image_bg(tmp_path / "demo_bg.rtdc")
    assert np.array_equal(data, rolling_median_reference(images(tmp_path / "demo.rtdc"), 100))
    info = subprocess.run([sys.executable, "-m", "dcbg", "info"], capture_output=True,
                          text=True, timeout=120)
    assert info.returncode == 0 and "auto picks:" in info.stdout
    assert f"CPU kernels: {cpukernels.describe_build()}" in info.stdout


CONSOLE_RUN = """
import gc, json, sys
from dcbg.cli import console_main
sys.argv = ["dcbg", *sys.argv[1:]]
code = console_main()
print(json.dumps({"code": code, "frozen": gc.get_freeze_count(),
                  "scipy.linalg": repr(sys.modules.get("scipy.linalg", "absent"))}))
"""


def console_run(*argv) -> dict:
    """Run the console entry point in a new process; its exit code and state after"""
    run = subprocess.run([sys.executable, "-c", CONSOLE_RUN, *map(str, argv)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_console_entry_point_owns_its_process(recording, tmp_path):
    target = tmp_path / "out.rtdc"
    state = console_run("compute", recording, target, "-kb", "kernel_size=10", "--device",
                        "cpu")
    assert state["code"] == 0
    assert state["scipy.linalg"] == "None"  # numba's BLAS probe was skipped
    assert state["frozen"] > 0  # no final collection over numba's objects
    data, _ = image_bg(target)
    assert np.array_equal(data, rolling_median_reference(images(recording), 10))
    state = console_run("info", target)
    assert state["code"] == 0 and state["scipy.linalg"] != "None"


@pytest.mark.parametrize("argv,code,message", [
    (["-kb", "kernel_size=3"], 1, "positive even integer"),
    (["-kb", "kernel_size=0"], 1, "positive even integer"),
    (["-kb", "kernel_size=-2"], 1, "positive even integer"),
    (["-kb", "kernel_size=2.5"], 1, "not a valid int"),
    (["-kb", "kernel_size=ten"], 1, "not a valid int"),
    (["-kb", "kernel_size=10", "-kb", "batch_size=10"], 1, "larger than kernel_size"),
    (["-kb", "window=10"], 1, "Unknown PPID keyword 'window'"),
    (["--ppid", "rollmed:k100"], 1, "not of the form key=value"),
    (["--ppid", "k=100"], 1, "has no method code"),
    (["--ppid", "sparsemed:k=100"], 1, "Unknown background method 'sparsemed'"),
    (["-b", "sparsemed"], 2, "unknown method 'sparsemed'"),
    (["-c", "gzip"], 1, "Unknown compression 'gzip'"),
    (["{missing_folder}/out.rtdc"], 1, "Output folder .* does not exist"),
    (["{rec}"], 2, "is the input file; add --in-place"),
])
def test_bad_arguments_through_the_cli(tmp_path, capsys, argv, code, message):
    rec = write_synthetic_rtdc(tmp_path / "rec.rtdc", 60, shape=(6, 8))
    before = folder_state(tmp_path)
    argv = [a.format(rec=rec, missing_folder=tmp_path / "nope") for a in argv]
    full = ["compute", str(rec), *argv, "--device", "cpu", "--num-cpus", "1"]
    if code == 2:
        with pytest.raises(SystemExit) as exc:
            main(full)
        assert exc.value.code == 2
    else:
        assert main(full) == 1
    err = capsys.readouterr().err
    assert message.split(".*")[0] in err and "Traceback" not in err, err
    assert folder_state(tmp_path) == before


def test_demo_writes_into_a_folder_of_the_current_one(tmp_path):
    for _ in range(2):  # a second demo reuses the folder
        run = subprocess.run([sys.executable, "-m", "dcbg", "demo", "--events", "150",
                              "--device", "cpu"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "dcbg-demo").iterdir()) == ["demo.rtdc",
                                                                          "demo_bg.rtdc"]
    assert "Look at it: dcbg preview dcbg-demo/demo_bg.rtdc" in run.stdout


def test_recursive_run_skips_existing_outputs_and_processes_new_files(tmp_path, capsys):
    write_synthetic_rtdc(tmp_path / "a.rtdc", 40, shape=(6, 8), seed=1)
    assert main(["compute", str(tmp_path), "-r", "-kb", "kernel_size=4",
                 "--device", "cpu"]) == 0
    done = (tmp_path / "a_bg.rtdc").read_bytes()
    write_synthetic_rtdc(tmp_path / "b.rtdc", 40, shape=(6, 8), seed=2)  # added since
    capsys.readouterr()
    assert main(["compute", str(tmp_path), "-r", "-kb", "kernel_size=4",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "a.rtdc: skipped: output exists; add --force to replace it" in out
    assert "1 of 2 files done, 40 events, 1 skipped (output exists), 0 failed" in out
    assert (tmp_path / "a_bg.rtdc").read_bytes() == done
    assert (tmp_path / "b_bg.rtdc").exists()


def test_recursive_run_treats_a_folder_named_rtdc_as_a_folder(tmp_path, capsys):
    inner = tmp_path / "day1.rtdc"
    inner.mkdir()
    write_synthetic_rtdc(inner / "a.rtdc", 40, shape=(6, 8), seed=1)
    assert main(["compute", str(tmp_path), "-r", "-kb", "kernel_size=4",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out and "1 of 1 files done" in out
    assert (inner / "a_bg.rtdc").exists()


@pytest.mark.parametrize("argv", [
    ["-kb", "kernel_size=10", "-kb", "kernel_size=20"],
    ["-kb", "k=10", "-kb", "kernel_size=20"],
    ["--ppid", "rollmed:k=10^b=20^k=12"],
])
def test_a_keyword_given_twice_is_refused_the_same_way(recording, tmp_path, capsys, argv):
    before = folder_state(tmp_path)
    assert main(["compute", str(recording), *argv, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Keyword 'kernel_size' is given twice")
    assert "give each keyword once" in err and len(err.splitlines()) == 1
    assert folder_state(tmp_path) == before


def test_ppid_and_another_method_conflict(recording, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compute", str(recording), "--ppid", "rollmed:k=4", "-b", "sparsemed"])
    assert exc.value.code == 2
    assert "--ppid names the method 'rollmed' but -b names 'sparsemed'" in (
        capsys.readouterr().err)
    assert main(["compute", str(recording), "--ppid", "rollmed:k=4", "-b", "rollmed",
                 "--dry-run"]) == 0


def test_integers_are_read_exactly(recording, capsys):
    assert main(["compute", str(recording), "--dry-run", "--force", "--ppid",
                 "rollmed:k=4^b=99999999999999999999999"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "rollmed:k=4^b=99999999999999999999999"
    assert main(["compute", str(recording), "--dry-run", "--force", "-kb", "b=1e4"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "rollmed:k=100^b=10000"
    assert main(["compute", str(recording), "--dry-run", "-kb", "b=1e30"]) == 1
    assert "not a valid int" in capsys.readouterr().err


def test_more_cpus_than_exist_are_capped_with_a_warning(recording, caplog):
    assert main(["compute", str(recording), "-kb", "kernel_size=4", "--num-cpus", "1000",
                 "--device", "cpu", "--force"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "1000 CPU workers were asked for" in warnings[0]
