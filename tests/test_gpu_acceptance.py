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

import pytest

from helpers import host_kernel as hk

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
STANDIN = ROOT / "tests" / "helpers" / "standin"


@pytest.fixture
def acceptance(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_acceptance
    return gpu_acceptance


def test_report_follows_the_steps(acceptance, tmp_path):
    acceptance.start(tmp_path, ["install", "memcheck", "selftest"], 540, dry_run=False)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"] == "INCOMPLETE"
    assert [step["status"] for step in report["steps"]] == ["not run"] * 3

    (tmp_path / "logs" / "install.log").write_text("Successfully installed dcbg-0.1.0\n"
                                                   "CPU kernels: C\n")
    acceptance.record(tmp_path, {"step": "install", "status": "ok", "seconds": 20.0,
                                 "exit_code": 0, "command": "step_install", "note": ""})
    (tmp_path / "logs" / "memcheck.log").write_text("compute-sanitizer: not present\n")
    acceptance.record(tmp_path, {"step": "memcheck", "status": "not present", "seconds": 1.0,
                                 "exit_code": 99, "command": "step_memcheck", "note": ""})
    (tmp_path / "selftest.json").write_text(json.dumps({
        "verdict": "selftest FAILED: 1 of 2 checks", "gpus": [{"name": "NVIDIA H200"}],
        "rows": [{"device": "cuda:0", "check": "median", "kernel_size": 100,
                  "pixel_outputs_per_s": 2.5e11, "seconds": 0.1}]}))
    (tmp_path / "logs" / "selftest.log").write_text(
        "".join(f"line {i}\n" for i in range(40)) + "selftest FAILED: 1 of 2 checks\n")
    acceptance.record(tmp_path, {"step": "selftest", "status": "failed", "seconds": 30.0,
                                 "exit_code": 1, "command": "step_selftest", "note": ""})

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"] == "FAIL"
    assert report["device"] == "NVIDIA H200"
    install, memcheck, selftest = report["steps"]
    assert install["numbers"]["cpu kernels"] == ["CPU kernels: C"]
    assert memcheck["status"] == "not present"
    assert selftest["numbers"]["cuda:0 pixel-outputs/s k=100"] == 2.5e11
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# dcbg GPU acceptance: FAIL")
    assert "| selftest | failed | 30.0 |" in markdown and "2.5e+11" in markdown
    # the failed step's log ends the report, not its start
    assert "selftest FAILED: 1 of 2 checks\n```" in markdown and "line 39" in markdown
    assert "line 3\n" not in markdown


def test_a_run_out_of_time_skips_what_is_left_and_still_reports(tmp_path):
    out = tmp_path / "report"
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu_acceptance.sh"), "--dry-run", "--out",
                          str(out)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DCBG_ACCEPTANCE_BUDGET": "16"})
    assert run.returncode == 1, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "FAIL" and report["dry_run"] is True
    assert len(report["steps"]) == 10
    assert {step["status"] for step in report["steps"]} == {"skipped"}
    assert "no time left" in report["steps"][0]["note"]
    assert (out / "report.md").read_text().startswith("# dcbg GPU acceptance (dry run): FAIL")


def test_script_refuses_an_unknown_option(tmp_path):
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu_acceptance.sh"), "--fast"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr == "error: unknown option --fast; use --out DIR and --dry-run\n"


def test_sanitizer_program_checks_every_count_width(acceptance, fake_gpu, capsys):
    state = fake_gpu()
    assert acceptance.sanitize(0) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all("same as the CPU engine" in line for line in lines)
    assert {launch[0] for launch in state.launches} == {
        "dcbg_rollmed_count8", "dcbg_rollmed_count16", "dcbg_rollmed_count32"}


def test_sanitizer_program_fails_on_a_wrong_kernel(acceptance, fake_gpu, monkeypatch,
                                                   capsys):
    fake_gpu()
    launch = hk.launch

    def wrong(lib, plan, frames, medians, *args):
        launch(lib, plan, frames, medians, *args)
        if plan.kernel == "dcbg_rollmed_count32":
            medians[-1, -1] ^= 0x80

    monkeypatch.setattr(hk, "launch", wrong)
    assert acceptance.sanitize(0) == 1
    out = capsys.readouterr().out
    assert out.count("DIFFERS from the CPU engine") == 2  # the launch and the pipeline


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
