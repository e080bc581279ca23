"""Every example in README.md, run as a user would type it

Each fenced ``bash`` block is run line by line in a folder holding the files
the README talks about (``measurement.rtdc``, ``copy.rtdc``, ``archive/``):
``dcbg`` commands must succeed (GPU commands must fail with the one-line
CUDA error where there is no GPU); ``pip install`` lines must name extras
that exist; ``docker`` lines must name Dockerfiles that exist; the venv and
pytest steps of the Quick start are what ``.ci/run`` does on a fresh clone.
The Dask cluster block runs as a whole script (scheduler, worker, dcbg), and
each ``python`` block runs in its own interpreter.
"""
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata

import h5py
import numpy as np
import pytest

from dcbg.devices import cuda_unavailable_reason
from dcbg.synthetic import write_synthetic_rtdc

pytestmark = pytest.mark.slow  # the README's blocks run as a user runs them, clusters included

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NO_GPU = cuda_unavailable_reason(0)


def readme_blocks() -> list[tuple[str, str, str]]:
    """(heading, language, code) of every fenced block"""
    blocks, heading, language, lines = [], "", None, []
    for line in README.read_text().splitlines():
        if language is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("```") and language is None:
            language, lines = line[3:].strip(), []
        elif line.startswith("```"):
            blocks.append((heading, language, "\n".join(lines)))
            language = None
        elif language is not None:
            lines.append(line)
    return blocks


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    write_synthetic_rtdc(folder / "measurement.rtdc", 260, seed=31)
    write_synthetic_rtdc(folder / "copy.rtdc", 150, shape=(40, 100), seed=32)
    (folder / "archive" / "day1").mkdir(parents=True)
    write_synthetic_rtdc(folder / "archive" / "a.rtdc", 120, shape=(20, 60), seed=33)
    write_synthetic_rtdc(folder / "archive" / "day1" / "b.rtdc", 130, shape=(20, 60), seed=34)
    return folder


def environment() -> dict:
    """PATH with this interpreter's scripts (dcbg, dask) first"""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), env["PATH"]])
    env.pop("DCBG_DEVICE", None)
    return env


def dcbg_command(words: list[str]) -> list[str]:
    script = shutil.which("dcbg", path=environment()["PATH"])
    return [script, *words[1:]] if script else [sys.executable, "-m", "dcbg", *words[1:]]


def run_dcbg(line: str, folder: pathlib.Path):
    words = shlex.split(line, comments=True)
    run = subprocess.run(dcbg_command(words), cwd=folder, capture_output=True, text=True,
                         env=environment(), timeout=600)
    if "cuda" in line and NO_GPU:
        assert run.returncode == 1, (line, run.stdout, run.stderr)
        assert re.match(r"error: CUDA devices? (\d+ )?cannot be used", run.stderr), run.stderr
    else:
        assert run.returncode == 0, (line, run.stdout, run.stderr)
    return run


def check_setup(command: str):
    """Install and container steps: what they name must exist"""
    extras = metadata.metadata("dcbg").get_all("Provides-Extra")
    words = shlex.split(command, comments=True)
    if words[:2] == ["pip", "install"]:
        for target in words[2:]:
            for extra in re.findall(r"\[([^\]]+)\]", target):
                assert all(name in extras for name in extra.split(",")), command
    elif words[:2] == ["docker", "build"]:
        assert (ROOT / words[words.index("-f") + 1]).is_file(), command
    elif words[:2] == ["docker", "run"]:
        assert words[-3:-1] == ["compute", "/data"], command
    else:
        assert command in ("python3 -m venv .venv", ". .venv/bin/activate",
                           "python -m pytest -q"), f"README command not covered: {command}"


BASH_BLOCKS = [(h, code) for h, lang, code in readme_blocks() if lang == "bash"]
PYTHON_BLOCKS = [(h, code) for h, lang, code in readme_blocks() if lang == "python"]


def test_readme_has_the_expected_examples():
    headings = [h for h, _ in BASH_BLOCKS + PYTHON_BLOCKS]
    for heading in ("Quick start", "Your own recording, from install to a picture",
                    "Command line", "Python", "Inside dcnum pipelines",
                    "Many recordings on a Dask cluster", "GPU install", "Docker",
                    "ChipStream with dcbg's background", "As an array library",
                    "16-bit microscopy movies"):
        assert heading in headings
    quick = dict(BASH_BLOCKS)["Quick start"].splitlines()
    assert len(quick) == 2, "Quick start is exactly two commands"


@pytest.mark.parametrize("heading,code", BASH_BLOCKS, ids=[h for h, _ in BASH_BLOCKS])
def test_bash_block(workspace, heading, code):
    if "dask scheduler" in code:
        script = "trap 'kill $(jobs -p) 2>/dev/null' EXIT\nset -e\n" + code
        run = subprocess.run(["bash", "-c", script], cwd=workspace, capture_output=True,
                             text=True, env=environment(), timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "2 of 2 files done" in run.stdout
        return
    for line in code.splitlines():
        for command in (c.strip() for c in line.split("&&")):
            command = command.split("  #")[0].strip()
            if not command or command.startswith("#"):
                continue
            if command.startswith("dcbg "):
                run_dcbg(command, workspace)
            else:
                check_setup(command)
    if heading == "ChipStream with dcbg's background":
        with h5py.File(workspace / "measurement_dcn.rtdc") as h5:
            log = next(name for name in h5["logs"] if name.startswith("dcnum-log"))
            assert any(b"Computed by dcbg" in line for line in h5["logs"][log][:])
    if heading == "Your own recording, from install to a picture":
        assert (workspace / "measurement_bg_preview.png").stat().st_size > 10_000
        with h5py.File(workspace / "measurement_bg.rtdc") as h5:
            assert h5["events/image_bg"].shape == (260, 80, 320)


@pytest.mark.parametrize("heading,code", PYTHON_BLOCKS, ids=[h for h, _ in PYTHON_BLOCKS])
def test_python_block(workspace, heading, code):
    env = environment()
    env["DCBG_DEVICE"] = "cpu" if NO_GPU else "auto"
    # A block that hangs prints every thread's stack and exits, instead of
    # leaving the test waiting until its timeout with nothing to show.
    watchdog = "import faulthandler; faulthandler.dump_traceback_later(300, exit=True)\n"
    run = subprocess.run([sys.executable, "-c", watchdog + code], cwd=workspace,
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    if heading == "Python":
        out = run.stdout.splitlines()
        assert out[0] == "rollmed:k=100^b=10000"
        assert out[2] == "{'kernel_size': 10, 'batch_size': 20}"
        assert "rollmed" in out[3]
    elif heading == "As an array library":
        assert run.stdout.splitlines() == ["(490, 80, 320) (500, 80, 320)", "(161, 80, 320)"]
    elif heading == "16-bit microscopy movies":
        assert run.stdout.splitlines() == ["uint16 (1000, 256, 256)", "True"]
        background = np.load(workspace / "background.npy", mmap_mode="r")
        frames = np.load(workspace / "movie.npy", mmap_mode="r")
        assert np.array_equal(background[-101:], np.broadcast_to(
            np.sort(frames[-102:-1], axis=0)[50], (101, 256, 256)))  # the last window repeats
    else:
        with h5py.File(workspace / "dcnum_out.rtdc") as h5:
            assert h5.attrs["pipeline:dcnum background"] == "rollmed:k=100^b=10000"


CUPY_DEPRECATED = ("ExternalStream",)
"""CuPy names that CuPy 14 deprecates (cupy.cuda.Stream.from_external replaces the first)"""


def test_gpu_examples_use_no_api_that_cupy_deprecates():
    """The GPU blocks run only on a GPU (test_gpu.py): what CuPy 14 warns about is caught here"""
    blocks = [code for _, language, code in readme_blocks() if language == "python gpu"]
    assert blocks
    for code in blocks:
        for name in CUPY_DEPRECATED:
            assert f"cupy.cuda.{name}(" not in code, name


def test_troubleshooting_quotes_real_messages():
    """Every message quoted under Troubleshooting is one the source can print"""
    section = README.read_text().split("## Troubleshooting")[1].split("\n## ")[0]
    source = "\n".join(p.read_text() for p in sorted((ROOT / "src" / "dcbg").rglob("*.py")))
    source = re.sub(r'"\s*\n\s*(?:rf|fr|f|r)?"', "", source)  # join implicit concatenation
    flat = " ".join(source.split())
    checked = 0
    for quote in re.findall(r"`(?:error: )?([^`]+)`", section):
        if quote.startswith(("-", "dcbg", "h5clear", "nvidia")):
            continue  # options and commands, not messages
        for fragment in re.split(r"…|: |; |\(|\)", quote):
            words = re.sub(r"[^A-Za-z0-9]", " ", fragment).split()
            if len(words) < 3:
                continue
            # a word of the message may be a {placeholder} in the source
            pattern = r"[\W_]+".join(rf"(?:{re.escape(w)}|\{{[^}}]*\}})" for w in words)
            assert re.search(pattern, flat), f"not in the source: {fragment!r}"
            checked += 1
    assert checked >= 15
