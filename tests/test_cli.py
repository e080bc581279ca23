"""The dcbg command line as a user types it"""
import ast
import importlib
import json
import os
import pathlib
import shlex
import string
import subprocess
import sys

import h5py
import numpy as np
import pytest

from dcbg import cpukernels
from dcbg.cli import build_parser, main
from dcbg.cli.compute import COMPUTE_EXAMPLES
from dcbg.cli.options import in_option_terms, setting_options
from dcbg.devices import select_device
from dcbg.errors import DeviceError, setting_error
from dcbg.ppid import keyword_defaults
from dcbg.reference import rolling_median_reference
from dcbg.rollmed import BackgroundRollMed
from dcbg.synthetic import write_synthetic_rtdc
from helpers.files import folder_state, write_images


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


def test_compute_help_names_the_keywords_their_defaults_and_examples_that_work(
        tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compute", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    defaults = keyword_defaults(BackgroundRollMed.check_user_kwargs)
    assert defaults == {"kernel_size": 100, "batch_size": 10000}
    assert "rollmed: kernel_size=100, batch_size=10000" in help_text  # the method's own
    assert "defaults of rollmed: kernel_size=100, batch_size=10000" in " ".join(
        help_text.split())  # -kb's own help, wrapped
    monkeypatch.chdir(tmp_path)
    write_synthetic_rtdc("measurement.rtdc", 210, shape=(4, 6), seed=6)
    (tmp_path / "archive" / "day1").mkdir(parents=True)
    write_synthetic_rtdc("archive/day1/a.rtdc", 110, shape=(4, 6), seed=7)
    for command, meaning in COMPUTE_EXAMPLES:
        assert f"  {command}\n      {meaning}\n" in help_text + "\n"
        words = shlex.split(command)
        assert words[:2] == ["dcbg", "compute"]
        assert main(words[1:]) == 0, (command, capsys.readouterr().err)
    assert (tmp_path / "out.rtdc").is_file() and (tmp_path / "measurement_bg.rtdc").is_file()


@pytest.mark.slow
def test_demo_and_info_as_console_script(tmp_path):
    run = subprocess.run([sys.executable, "-m", "dcbg", "demo", "--events", "300",
                          "--folder", str(tmp_path), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "300 events" in run.stdout and "rollmed:k=100^b=10000" in run.stdout
    assert f"  dcbg preview {tmp_path / 'demo_bg.rtdc'} " in run.stdout
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
    (["-kb", "window=10"], 1, "Unknown -kb keyword 'window'; the keywords of rollmed and their "
                              "defaults are kernel_size=100, batch_size=10000"),
    (["-kb", "kernal_size=200"], 1, "Unknown -kb keyword 'kernal_size' (did you mean "
                                    "kernel_size?)"),
    # too few events is said first: kernel_size=20000 breaks batch_size's rule as well
    (["-kb", "kernel_size=20000"], 1, "N=60 events"),
    (["-kb", "kernel_size=100", "-kb", "batch_size=50"], 1, "N=60 events"),
    (["-kb", "kernel_size=40", "-kb", "batch_size=20"], 1, "batch_size must be larger"),
    (["--ppid", "rollmed:k100"], 1, "not of the form key=value"),
    (["--ppid", "k=100"], 1, "has no method code"),
    (["--ppid", "sparsemed:k=100"], 2, "unknown background method 'sparsemed'"),
    (["-b", "sparsemed"], 2, "unknown background method 'sparsemed'"),
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


def test_demo_writes_into_a_folder_of_the_current_one(tmp_path, monkeypatch, capsys):
    for _ in range(2):  # a second demo reuses the folder
        run = subprocess.run([sys.executable, "-m", "dcbg", "demo", "--events", "150",
                              "--device", "cpu"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "dcbg-demo").iterdir()) == ["demo.rtdc",
                                                                          "demo_bg.rtdc"]
    # the demo ends with commands that work as printed, in the folder it ran in
    commands = [line.strip() for line in run.stdout.splitlines() if line.startswith("  dcbg ")]
    assert [command.split()[1] for command in commands] == ["preview", "info", "compute"]
    assert "dcbg compute dcbg-demo/demo.rtdc --force" in commands[-1]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        words = shlex.split(command, comments=True)
        assert main(words[1:]) == 0, (command, capsys.readouterr().err)
    assert (tmp_path / "dcbg-demo" / "demo_bg_preview.png").stat().st_size > 10_000
    assert image_bg(tmp_path / "dcbg-demo" / "demo_bg.rtdc")[1] == "rollmed:k=100^b=10000"


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
    assert main(["compute", str(recording), "--dry-run", "--force", "-kb", "k=10", "-kb",
                 "b=1e4"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "rollmed:k=10^b=10000"
    assert main(["compute", str(recording), "--dry-run", "-kb", "b=1e30"]) == 1
    assert "not a valid int" in capsys.readouterr().err


def test_more_cpus_than_exist_are_capped_with_a_warning(recording, caplog):
    assert main(["compute", str(recording), "-kb", "kernel_size=4", "--num-cpus", "1000",
                 "--device", "cpu", "--force"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "1000 CPU workers were asked for" in warnings[0]


def usage_error(argv, capsys) -> str:
    """Run a command that must be a usage error (exit 2); its stderr"""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def mapped_basin_file(raw, path, mapping):
    """A features-only file whose events are `raw`'s frames `mapping`, as dclab writes it"""
    import dclab
    from dclab.rtdc_dataset.writer import RTDCWriter
    with dclab.new_dataset(raw) as ds, RTDCWriter(path, mode="reset") as writer:
        writer.store_metadata(ds.config.as_dict(pop_filtering=True))
        writer.store_basin(basin_name="raw", basin_type="file", basin_format="hdf5",
                           basin_locs=[raw], basin_descr="images", basin_map=mapping)
        writer.store_feature("deform", np.linspace(0, 0.1, len(mapping)))
    return path


def test_info_counts_the_files_own_events_through_a_mapped_basin(tmp_path, capsys):
    raw = write_synthetic_rtdc(tmp_path / "raw.rtdc", 80, shape=(10, 20), seed=3)
    mapped = mapped_basin_file(raw, tmp_path / "mapped.rtdc", np.arange(0, 80, 3))
    assert main(["info", str(mapped)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"{mapped}: 27 events of 10x20 pixels (through mapped basin {raw}, 80 frames)"


def moved_basin(folder):
    """An output of dcbg whose input (holding the frames) was moved away"""
    source = write_synthetic_rtdc(folder / "rec.rtdc", 40, shape=(6, 8), seed=4)
    assert main(["compute", str(source), "-kb", "kernel_size=4", "--device", "cpu"]) == 0
    source.rename(folder / "elsewhere.rtdc")
    return folder / "rec_bg.rtdc", 40, "basin file", ["image_bg: PPID rollmed:k=4^b=10000",
                                                      "(missing)", "log dcbg-background_"]


def uint16_images(folder):
    path = write_images(folder / "u16.rtdc", np.zeros((30, 4, 5), np.uint16),
                        **{"experiment:sample": "beads"})
    return path, 30, "is uint16", ["attributes: 1 (sample beads)"]


def features_only(folder):
    path = folder / "features.rtdc"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("events/deform", data=np.linspace(0, 0.1, 25))
    return path, 25, "has no events/image data", ["image_bg: none in this file"]


@pytest.mark.parametrize("make", [moved_basin, uint16_images, features_only])
def test_info_describes_a_file_whose_images_cannot_be_used(tmp_path, capsys, make):
    path, events, why, shown = make(tmp_path)
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"{path}: {events} events" and err == ""
    assert lines[1].startswith("images: cannot be used: ") and why in lines[1]
    for text in shown:
        assert any(text in line for line in lines), (text, out)


@pytest.mark.parametrize("option", [["--device", "cpu"], ["--num-cpus", "2"],
                                    ["--io-threads", "0"]])
def test_info_refuses_options_it_does_not_use(recording, capsys, option):
    err = usage_error(["info", str(recording), *option], capsys)
    assert "dcbg info: error: unrecognized arguments" in err


def test_chipstream_options_are_checked_before_chipstream_starts(tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "chipstream", None)  # a started ChipStream fails as missing
    err = usage_error(["chipstream", "--io-threads", "0", "--", "data.rtdc"], capsys)
    assert "dcbg chipstream: error: argument --io-threads: must be at least 1, got 0" in err
    err = usage_error(["chipstream", "--device", "gpu", "--", "data.rtdc"], capsys)
    assert "Unknown device 'gpu'" in err
    assert main(["chipstream", "--device", "cuda:99", "--", "data.rtdc"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: CUDA device 99 cannot be used") and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    from dcbg.chipstream import run_chipstream
    with pytest.raises(ValueError, match="io_threads must be a positive integer"):
        run_chipstream(["data.rtdc"], io_threads=0)


def test_chipstream_arguments_before_the_separator_are_explained(capsys):
    err = usage_error(["chipstream", "-b", "rollmed", "data.rtdc"], capsys)
    assert err.startswith("usage: dcbg chipstream")
    assert "unrecognized arguments: -b; put ChipStream's arguments after '--'" in err


@pytest.fixture
def previous_demo(tmp_path):
    """A folder with the files of an earlier demo"""
    folder = tmp_path / "demo"
    folder.mkdir()
    write_synthetic_rtdc(folder / "demo.rtdc", 30, shape=(6, 8), seed=1)
    (folder / "demo_bg.rtdc").write_bytes(b"the earlier demo's background")
    return folder


@pytest.mark.parametrize("events", ["5", "-3", "99"])
def test_demo_refuses_too_few_events_before_touching_the_previous_demo(previous_demo, capsys,
                                                                       events):
    before = folder_state(previous_demo)
    err = usage_error(["demo", "--events", events, "--folder", str(previous_demo)], capsys)
    assert ("dcbg demo: error: --events must be at least 100, the demo's kernel_size, "
            f"got {events}") in err
    assert "-kb" not in err and "Traceback" not in err
    assert folder_state(previous_demo) == before


def test_demo_checks_the_device_before_touching_the_previous_demo(previous_demo, capsys):
    before = folder_state(previous_demo)
    assert main(["demo", "--folder", str(previous_demo), "--device", "cuda:7"]) == 1
    assert "CUDA device 7 cannot be used" in capsys.readouterr().err
    assert folder_state(previous_demo) == before


def test_demo_options_have_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--events EVENTS number of frames to synthesize, at least 100" in help_text


def test_a_missing_input_is_reported_as_missing_input(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, message in [
        (["no_such_folder/rec.rtdc"], "Input file no_such_folder/rec.rtdc does not exist"),
        (["~/dcbg-no-such-file.rtdc"], "a quoted '~' is not expanded"),
        (["no_such_folder", "-r"], "Input folder no_such_folder does not exist"),
        (["no_such_folder/rec.rtdc", "--dry-run"], "Input file no_such_folder/rec.rtdc does "
                                                   "not exist"),
    ]:
        assert main(["compute", *argv, "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
        assert "Output folder" not in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["--ppid", ""], "--ppid is empty"),
    (["--ppid", " "], "--ppid is empty"),
    (["-b", ""], "-b is empty"),
    (["{out}", "-b", ""], "-b is empty"),
    ([""], "PATH_OUT is empty"),
])
def test_empty_values_are_usage_errors(recording, tmp_path, capsys, argv, message):
    before = folder_state(tmp_path)
    argv = [a.format(out=tmp_path / "out.rtdc") for a in argv]
    err = usage_error(["compute", str(recording), *argv, "--device", "cpu"], capsys)
    assert err.startswith("usage: dcbg compute") and f"dcbg compute: error: {message}" in err
    assert folder_state(tmp_path) == before


def test_an_unknown_method_is_one_usage_error_from_b_and_from_ppid(recording, capsys):
    errors = [usage_error(["compute", str(recording), *argv], capsys).splitlines()[-1]
              for argv in (["-b", "sparsemed"], ["--ppid", "sparsemed:k=200"])]
    assert errors[0] == errors[1] == (
        "dcbg compute: error: unknown background method 'sparsemed'; the available methods "
        "are rollmed")


def two_days(folder):
    """Two measurement days with recordings of the same name"""
    for day, seed in (("day1", 1), ("day2", 2)):
        (folder / day).mkdir()
        write_synthetic_rtdc(folder / day / "M001_data.rtdc", 30, shape=(6, 8), seed=seed)
    return folder


def test_recursive_summary_names_files_relative_to_the_folder(tmp_path, capsys):
    two_days(tmp_path)
    assert main(["compute", str(tmp_path), "-r", "-kb", "kernel_size=4", "--device",
                 "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split()[:2] for line in lines[lines.index(next(
        line for line in lines if line.startswith("file "))) + 1:-1]]
    assert rows == [["day1/M001_data.rtdc", "ok"], ["day2/M001_data.rtdc", "ok"]]


def test_recursive_run_follows_linked_folders_once_and_takes_upper_case_names(tmp_path,
                                                                              capsys):
    archive = tmp_path / "archive"
    archive.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    two_days(elsewhere)
    (archive / "linked").symlink_to(elsewhere)
    (elsewhere / "day1" / "loop").symlink_to(elsewhere)  # a link cycle
    write_synthetic_rtdc(archive / "M002.RTDC", 30, shape=(6, 8), seed=3)
    assert main(["compute", str(archive), "-r", "-kb", "kernel_size=4", "--device",
                 "cpu"]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 files done, 90 events, 0 failed" in out
    for output in (archive / "M002_bg.rtdc", elsewhere / "day1" / "M001_data_bg.rtdc",
                   elsewhere / "day2" / "M001_data_bg.rtdc"):
        assert image_bg(output)[1] == "rollmed:k=4^b=10000"


def test_dry_run_checks_each_input_and_lists_the_skipped_ones(tmp_path, capsys):
    write_synthetic_rtdc(tmp_path / "a.rtdc", 30, shape=(6, 8), seed=1)
    (tmp_path / "a_bg.rtdc").write_bytes(b"an earlier output")
    write_synthetic_rtdc(tmp_path / "b.rtdc", 30, shape=(6, 8), seed=2)
    (tmp_path / "c.rtdc").write_text("not a recording")
    write_synthetic_rtdc(tmp_path / "short.rtdc", 3, shape=(6, 8), seed=2)
    before = folder_state(tmp_path)
    assert main(["compute", str(tmp_path), "-r", "--dry-run", "-kb", "kernel_size=4",
                 "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[1:] == [
        f"{tmp_path / 'a.rtdc'}: skipped: output exists; add --force to replace it",
        f"{tmp_path / 'b.rtdc'} -> {tmp_path / 'b_bg.rtdc'}",
        f"{tmp_path / 'c.rtdc'}: cannot be computed: {tmp_path / 'c.rtdc'} is not an HDF5 "
        f"file, so it is no .rtdc recording; check the path.",
        f"{tmp_path / 'short.rtdc'}: cannot be computed: The input has N=3 events, but the "
        f"rolling median needs at least kernel_size=4; use a smaller kernel_size or a longer "
        f"recording.",
        "rollmed:k=4^b=10000"]
    assert err == "error: 2 of 4 files cannot be computed; see the list above\n"
    assert main(["compute", str(tmp_path / "c.rtdc"), "--dry-run", "--device", "cpu"]) == 1
    assert "is not an HDF5 file" in capsys.readouterr().err
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("argv,message", [
    (["--retries", "-1"], "argument --retries: must be at least 0, got -1"),
    (["--dask", "local:0"], "--dask local:0 does not give a number of workers of at least 1"),
    (["--dask", "bogus"], "--dask bogus is not a scheduler address; give it as "
                          "tcp://HOST:PORT"),
    (["--dask", "tcp://host"], "is not a scheduler address"),
    (["--io-threads", "0"], "argument --io-threads: must be at least 1, got 0"),
    (["--num-cpus", "-1"], "argument --num-cpus: must be at least 1, got -1"),
    (["--device", "gpu"], "argument --device: Unknown device 'gpu'"),
])
def test_bad_batch_options_are_usage_errors(recording, capsys, argv, message):
    err = usage_error(["compute", str(recording), *argv], capsys)
    assert err.startswith("usage: dcbg compute") and message in err


def test_more_io_threads_than_cpus_are_capped_with_a_warning(recording, tmp_path, caplog,
                                                            monkeypatch):
    from dcbg import settings
    from dcbg.system import available_cpus
    monkeypatch.setattr(settings, "_warned", set())  # warned once per process
    target = tmp_path / "out.rtdc"
    assert main(["compute", str(recording), str(target), "-kb", "kernel_size=4",
                 "--io-threads", "1000", "--device", "cpu"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"1000 I/O threads were asked for, but this process may use "
                        f"{available_cpus()} CPUs; starting {available_cpus()}"]
    with h5py.File(target) as h5:
        log = next(name for name in h5["logs"] if name.startswith("dcbg-background"))
        record = json.loads("\n".join(line.decode() if isinstance(line, bytes) else line
                                      for line in h5["logs"][log][:]))
    assert record["io_threads"] == available_cpus()


def closed_stdout_run(*argv, cwd=None):
    """Run dcbg with a stdout whose reader has gone (as in ``dcbg … | head -0``)"""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        run = subprocess.run([sys.executable, "-m", "dcbg", *map(str, argv)], cwd=cwd,
                             stdout=write_end, stderr=subprocess.PIPE, text=True,
                             timeout=300)
    finally:
        os.close(write_end)
    return run


@pytest.mark.parametrize("with_file", [True, False])
def test_a_closed_stdout_ends_info_quietly(recording, with_file):
    run = closed_stdout_run("info", *([recording] if with_file else []))
    assert run.returncode == 0 and run.stderr == ""


def test_a_closed_stdout_does_not_stop_a_folder_run(tmp_path):
    two_days(tmp_path)
    run = closed_stdout_run("compute", tmp_path, "-r", "-kb", "kernel_size=4", "--device",
                            "cpu")
    assert run.returncode == 0 and "Broken pipe" not in run.stderr, run.stderr
    for day in ("day1", "day2"):
        assert image_bg(tmp_path / day / "M001_data_bg.rtdc")[1] == "rollmed:k=4^b=10000"


def test_usage_errors_show_the_subcommands_usage(recording, capsys):
    err = usage_error(["compute", str(recording.parent)], capsys)  # a folder without -r
    assert err.startswith("usage: dcbg compute [-h]")
    assert "dcbg compute: error: " in err and "add -r" in err


def test_dry_run_refuses_an_output_that_the_input_reads_through_its_basin(recording, capsys):
    assert main(["compute", str(recording), "-kb", "kernel_size=4", "--device", "cpu"]) == 0
    output = recording.with_name("rec_bg.rtdc")
    before = recording.read_bytes()
    capsys.readouterr()
    assert main(["compute", str(output), str(recording), "--force", "--dry-run",
                 "-kb", "kernel_size=4", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: Output {recording} is") and "through its basins" in err
    assert recording.read_bytes() == before


SOURCE = pathlib.Path(__file__).resolve().parents[1] / "src" / "dcbg"


def setting_error_calls() -> list:
    """Every error of dcbg whose message names a setting: (module, the setting_error call)"""
    calls = []
    for path in sorted(SOURCE.rglob("*.py")):
        module = ".".join(("dcbg", *path.relative_to(SOURCE).with_suffix("").parts))
        calls += [(module, node) for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.Call)
                  and getattr(node.func, "id", "") == "setting_error"]
    return calls


SETTING_ERRORS = setting_error_calls()

SAID = {
    ("device", ("cpu",)): ('device="cpu"', "--device cpu"),
    ("device", ("cpu", "auto")): ('device="cpu" or "auto"', "--device cpu or auto"),
    ("num_cpus", ()): ("num_cpus", "--num-cpus"),
    ("dask", ()): ("The Dask address", "--dask"),
    ("events", ()): ("events", "--events"),
    ("file_events", ()): ("file_events", "--file-events"),
}
"""How each setting that dcbg's errors name reads in the library and on the command line"""

SELFTEST_SETTINGS = {"events", "file_events"}
"""Settings of dcbg selftest's options; the others are dcbg compute's"""


def compute_parser():
    return build_parser().parse_args(["compute", "x.rtdc"]).subcommand


def parser_of(setting: str):
    """The parser of the command whose option sets `setting`"""
    if setting in SELFTEST_SETTINGS:
        return build_parser().parse_args(["selftest"]).subcommand
    return compute_parser()


def test_the_options_are_read_from_the_parser():
    options = setting_options(compute_parser())
    assert options["device"] == "--device" and options["num_cpus"] == "--num-cpus"
    assert options["dask"] == "--dask" and options["kb"] == "-kb"
    assert len(SETTING_ERRORS) >= len(SAID)  # the search finds the errors


@pytest.mark.parametrize("module,call", SETTING_ERRORS,
                         ids=[f"{module}:{call.lineno}" for module, call in SETTING_ERRORS])
def test_every_error_naming_a_setting_says_it_as_the_option_on_the_command_line(module, call):
    _, template, setting = (ast.literal_eval(arg) if isinstance(arg, ast.Constant) else None
                            for arg in call.args)
    keywords = {keyword.arg: keyword.value for keyword in call.keywords}
    suggested = ast.literal_eval(keywords.pop("suggested", ast.Constant(())))
    words = keywords.pop("words", None)
    if words is not None:  # a constant of its module
        words = getattr(importlib.import_module(module), words.id)
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    assert fields == {"setting", *keywords}, "the template's fields are the call's"
    error = setting_error(RuntimeError, template, setting, suggested=suggested, words=words,
                          **dict.fromkeys(keywords, 7))
    library, command_line = SAID[setting, tuple(suggested)]
    assert str(error).count(library) == 1
    assert in_option_terms(error, parser_of(setting)) == str(error).replace(library, command_line)


def test_a_device_that_cannot_be_used_is_said_in_each_ones_terms(recording, capsys):
    with pytest.raises(DeviceError) as caught:
        select_device("cuda:7")
    assert str(caught.value).endswith('; or use device="cpu" or "auto".')
    assert main(["compute", str(recording), "--device", "cuda:7"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: CUDA device 7 cannot be used: ")
    assert err.endswith("; or use --device cpu or auto.\n")
