"""The GPU acceptance run's parts that are cheap to check here

CI runs the whole flow (``bash benchmarks/gpu_acceptance.sh --dry-run``); these
tests cover its report, its time budget, the program compute-sanitizer runs,
the benchmark's memory guard for torch and the CuPy stand-in of child processes.
"""
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import time

import pytest

from helpers import host_kernel as hk

pytestmark = pytest.mark.slow  # the GPU acceptance script runs its whole flow on the stand-in

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
STANDIN = ROOT / "tests" / "helpers" / "standin"


@pytest.fixture
def acceptance(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_acceptance
    return gpu_acceptance


def test_report_follows_the_steps(acceptance, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    acceptance.start(out, work, ["install", "memcheck", "selftest"], 480, dry_run=False)
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "INCOMPLETE"
    assert [step["status"] for step in report["steps"]] == ["not run"] * 3

    (work / "logs" / "install.log").write_text(
        "no wheels in /x/.whl: dcbg is installed on the host's packages alone\n"
        "Python.h not found: dcbg's C kernels cannot be built here, the numba build runs\n"
        "Successfully installed dcbg-0.1.0\n"
        "missing packages: hdf5plugin (add their wheels to .whl/)\nCPU kernels: numba\n")
    acceptance.record(out, work, {"step": "install", "status": "failed", "seconds": 20.0,
                                  "exit_code": 1, "command": "step_install", "note": ""})
    (work / "logs" / "memcheck.log").write_text("compute-sanitizer: not present\n")
    acceptance.record(out, work, {"step": "memcheck", "status": "not present",
                                  "seconds": 1.0, "exit_code": 99,
                                  "command": "step_memcheck", "note": ""})
    (out / "selftest.json").write_text(json.dumps({
        "verdict": "selftest FAILED: 1 of 2 checks", "gpus": [{"name": "NVIDIA H200"}],
        "rows": [{"device": "cuda:0", "check": "median", "kernel_size": 100,
                  "pixel_outputs_per_s": 2.5e11, "seconds": 0.1},
                 {"device": "cuda:0", "check": "median", "kernel_size": 100,
                  "dtype": "uint16", "pixel_outputs_per_s": 9.5e10, "seconds": 0.1}]}))
    (work / "logs" / "selftest.log").write_text(
        "".join(f"line {i}\n" for i in range(40)) + "selftest FAILED: 1 of 2 checks\n")
    acceptance.record(out, work, {"step": "selftest", "status": "failed", "seconds": 30.0,
                                  "exit_code": 1, "command": "step_selftest", "note": ""})

    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "FAIL"
    assert report["device"] == "NVIDIA H200"
    install, memcheck, selftest = report["steps"]
    assert install["numbers"]["cpu kernels"] == ["CPU kernels: numba"]
    assert install["numbers"]["missing"][0].startswith("missing packages: hdf5plugin")
    assert install["numbers"]["python headers"][0].startswith("Python.h not found")
    assert install["numbers"]["installed"][0].startswith("no wheels in")
    assert memcheck["status"] == "not present"
    assert selftest["numbers"]["cuda:0 pixel-outputs/s k=100"] == 2.5e11
    assert selftest["numbers"]["cuda:0 pixel-outputs/s k=100 uint16"] == 9.5e10
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# dcbg GPU acceptance: FAIL")
    assert "| selftest | failed | 30.0 |" in markdown and "2.5e+11" in markdown
    # the failed step's log ends the report, not its start
    assert "selftest FAILED: 1 of 2 checks\n```" in markdown and "line 39" in markdown
    assert "line 3\n" not in markdown
    # the report folder holds the report, the steps' JSON and the logs' archive, no more
    assert sorted(path.name for path in out.iterdir()) == [
        "logs.tar.gz", "report.json", "report.md", "selftest.json"]
    with tarfile.open(out / "logs.tar.gz") as archive:
        assert sorted(archive.getnames()) == ["logs/install.log", "logs/memcheck.log",
                                              "logs/selftest.log"]


def run_script(tmp_path, *options, dry_run=True, timeout=120, **env):
    out = tmp_path / "report"
    command = ["bash", str(BENCHMARKS / "gpu_acceptance.sh"), "--out", str(out), *options]
    run = subprocess.run(command + (["--dry-run"] if dry_run else []), capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, **env})
    return run, out


def report_files(out: pathlib.Path) -> list[pathlib.Path]:
    return [path for path in out.rglob("*") if path.is_file()]


def test_a_run_out_of_time_skips_what_is_left_and_still_reports(tmp_path):
    run, out = run_script(tmp_path, DCBG_ACCEPTANCE_BUDGET="16")
    assert run.returncode == 1, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "FAIL" and report["dry_run"] is True
    assert len(report["steps"]) == 10
    assert {step["status"] for step in report["steps"]} == {"skipped"}
    assert "no time left" in report["steps"][0]["note"]
    assert (out / "report.md").read_text().startswith("# dcbg GPU acceptance (dry run): FAIL")
    assert sorted(path.name for path in report_files(out)) == [
        "logs.tar.gz", "report.json", "report.md"]


def test_a_stopped_run_stops_its_step_and_still_reports(tmp_path):
    """The host's kill, or the run's outer time limit, while a step runs"""
    out = tmp_path / "report"
    started = time.monotonic()
    process = subprocess.Popen(
        ["bash", str(BENCHMARKS / "gpu_acceptance.sh"), "--dry-run", "--out", str(out),
         "--steps", "info,selftest,recording"], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("== selftest"):
            process.terminate()  # the outer timeout's TERM, relayed to the script
            break
    rest = process.communicate(timeout=60)[0]
    assert process.returncode == 1, rest
    assert time.monotonic() - started < 60, "the selftest step was stopped, not waited for"
    report = json.loads((out / "report.json").read_text())
    assert [step["status"] for step in report["steps"]] == ["ok", "timeout", "skipped"]
    assert "time limit" in report["steps"][1]["note"]
    assert sorted(path.name for path in report_files(out)) == [
        "logs.tar.gz", "report.json", "report.md"]


def test_the_dry_run_passes_and_leaves_at_most_8_files(tmp_path):
    """As CI runs it: the GPU host gives back at most 8 files, at most 2 folders deep"""
    run, out = run_script(tmp_path, timeout=600)
    assert run.returncode == 0, (out / "report.md").read_text()
    files = report_files(out)
    assert len(files) <= 8 and all(len(path.relative_to(out).parts) <= 2 for path in files)
    assert {"report.md", "report.json", "selftest.json", "bench_cuda.json",
            "logs.tar.gz"} <= {path.name for path in files}
    with tarfile.open(out / "logs.tar.gz") as archive:
        assert "logs/gpu_tests.log" in archive.getnames()
        assert "logs/gpu-tests.xml" in archive.getnames()


def test_without_wheels_dcbg_is_installed_on_the_hosts_packages(tmp_path):
    """No .whl/ and no Python.h: dcbg is installed anyway, on numba's build, and the report
    says so (not a failed install)"""
    if (ROOT / ".whl").exists():
        pytest.skip("this checkout has a .whl/ folder")
    run, out = run_script(
        tmp_path, "--steps", "install", dry_run=False, DCBG_ACCEPTANCE_SITE=str(tmp_path / "site"),
        DCBG_PYTHON_INCLUDE=str(tmp_path / "no-headers"),
        PYTHONPATH=os.pathsep.join([str(STANDIN), os.environ.get("PYTHONPATH", "")]))
    report = json.loads((out / "report.json").read_text())
    (install,) = report["steps"]
    assert install["status"] == "ok", (out / "report.md").read_text()
    assert install["numbers"]["installed"][0].startswith(f"no wheels in {ROOT}/.whl")
    assert "the numba build runs" in install["numbers"]["python headers"][0]
    assert (tmp_path / "site" / "dcbg" / "__init__.py").exists()


def test_missing_packages_are_named(acceptance, monkeypatch):
    from importlib import metadata
    monkeypatch.setattr(metadata, "requires", lambda name: [
        "numpy>=1.24", "no-such-package-dcbg>=1", "dask[distributed]; extra == 'dask'"])
    assert acceptance.missing_packages(modules=("json", "no_such_module_dcbg")) == [
        "no-such-package-dcbg", "no_such_module_dcbg"]


@pytest.mark.parametrize("message,status", [
    ("========= Error: Device not supported", "not present"),
    ("========= ERROR SUMMARY: 2 errors", "failed"),
])
def test_a_sanitizer_that_does_not_support_the_gpu_is_not_present(tmp_path, message, status):
    sanitizer = tmp_path / "compute-sanitizer"
    sanitizer.write_text(f"#!/bin/sh\necho '{message}'\nexit 3\n")
    sanitizer.chmod(0o755)
    run, out = run_script(tmp_path, "--steps", "memcheck", DCBG_SANITIZER=str(sanitizer))
    (memcheck,) = json.loads((out / "report.json").read_text())["steps"]
    assert memcheck["status"] == status, run.stdout


def test_a_recording_stopped_halfway_leaves_no_file(acceptance, monkeypatch, tmp_path):
    import dcbg.synthetic
    path = tmp_path / "recording.rtdc"
    acceptance.write_recording(path, 20)
    assert path.exists()
    path.unlink()

    def stopped(target, events):
        target.write_bytes(b"half an HDF5 file")
        raise KeyboardInterrupt  # as the step's timeout stops it

    monkeypatch.setattr(dcbg.synthetic, "write_synthetic_rtdc", stopped)
    with pytest.raises(KeyboardInterrupt):
        acceptance.write_recording(path, 20)
    assert not path.exists()


def test_script_refuses_an_unknown_option(tmp_path):
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu_acceptance.sh"), "--fast"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr == "error: unknown option --fast; use --out DIR, --dry-run and --steps a,b\n"


def test_sanitizer_program_checks_every_count_width(acceptance, fake_gpu, capsys):
    state = fake_gpu()
    assert acceptance.sanitize(0) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 12 and all("same as the CPU engine" in line for line in lines)
    assert {launch[0] for launch in state.launches} == {
        f"dcbg_rollmed_{family}count{bits}" for family in ("", "window16_")
        for bits in (8, 16, 32)}


def test_sanitizer_program_fails_on_a_wrong_kernel(acceptance, fake_gpu, monkeypatch,
                                                   capsys):
    fake_gpu()
    launch = hk.launch

    def wrong(lib, plan, frames, medians, *args, **kwargs):
        launch(lib, plan, frames, medians, *args, **kwargs)
        if plan.kernel in ("dcbg_rollmed_count32", "dcbg_rollmed_window16_count16"):
            medians[-1, -1] ^= 0x80

    monkeypatch.setattr(hk, "launch", wrong)
    assert acceptance.sanitize(0) == 1
    out = capsys.readouterr().out
    # the launch and the pipeline of each
    assert out.count("DIFFERS from the CPU engine") == 4
    assert out.count("dcbg_rollmed_window16_count16: k=300, 2x40 frames, 20 windows") == 2


def test_torch_is_given_only_the_windows_that_fit(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_cuda
    window = bench_cuda.PIXELS * 1000  # torch copies each window of k=1000 frames
    assert bench_cuda.torch_windows(141 * 2**30, 1000, 1001) == 1001
    assert bench_cuda.torch_windows(8 * 2**30, 1000, 1001) == 4 * 2**30 // window
    assert bench_cuda.torch_windows(window, 1000, 1001) < bench_cuda.TORCH_MIN_WINDOWS


def test_stand_in_cupy_serves_a_child_process(host_kernel, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(STANDIN), os.environ.get("PYTHONPATH", "")]),
        "DCBG_STANDIN_CACHE": str(tmp_path), "DCBG_STANDIN_DEVICES": "2"}
    run = subprocess.run([sys.executable, "-m", "dcbg", "info"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert "GPU 1 (cuda:0): Fake GPU of CUDA ordinal 0" in run.stdout
    assert "auto picks: cuda:0" in run.stdout
    assert len(list(tmp_path.glob("dcbg_kernel_host-*.so"))) == 1  # built once, then kept
