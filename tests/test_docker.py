"""The Docker images, checked without a Docker daemon: what their files ask of the host

No test here builds an image (CI has no daemon); they read the Dockerfiles and
the build context's .dockerignore as Docker would and hold them to what the
README promises: the CUDA image runs on every driver that runs CUDA 12, its
NVRTC is pinned to one CUDA minor version, the build context leaves the heavy
folders out, and containers run as the user who starts them.
"""
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKERFILES = {name: ROOT / "docker" / f"Dockerfile.{name}" for name in ("cuda", "cpu")}
RUN_AS_USER = '--user "$(id -u):$(id -g)"'


def instructions(dockerfile: pathlib.Path) -> list[tuple[str, str]]:
    """The (INSTRUCTION, arguments) of a Dockerfile, continuation lines joined"""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            found.append((keyword.upper(), arguments.strip()))
    return found


def environment(dockerfile: pathlib.Path) -> dict[str, str]:
    """The variables its ENV instructions set (KEY=VALUE form)"""
    variables = {}
    for keyword, arguments in instructions(dockerfile):
        if keyword == "ENV":
            variables.update(word.split("=", 1) for word in shlex.split(arguments))
    return variables


def cuda_image_version(image: str) -> tuple[int, int] | None:
    """CUDA (major, minor) of an nvidia/cuda image, None for any other image"""
    match = re.fullmatch(r"(?:docker\.io/)?nvidia/cuda:(\d+)\.(\d+)[.\w-]*", image)
    return (int(match.group(1)), int(match.group(2))) if match else None


def dockerignore_excludes(path: str) -> bool:
    """Whether the root's .dockerignore leaves `path` (relative to the root) out

    As Docker matches: each pattern against the path and every folder above
    it, ``*`` within one name, ``**`` across folders, the last matching
    pattern decides and ``!`` takes a path back in.
    """
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = "".join(".*" if part == "**" else "[^/]*" if part == "*" else
                        "[^/]" if part == "?" else re.escape(part)
                        for part in re.split(r"(\*\*|\*|\?)", pattern))
        regex = regex.replace(".*/", "(?:.*/)?")  # "**/" also matches no folder at all
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:end])) for end in range(1, len(parts) + 1)):
            excluded = not keep
    return excluded


@pytest.mark.parametrize("name", ["cuda", "cpu"])
def test_no_base_image_asks_for_a_newer_driver_than_cuda_12_needs(name):
    bases = [arguments.split()[0] for keyword, arguments in instructions(DOCKERFILES[name])
             if keyword == "FROM"]
    assert bases, name
    for image in bases:
        # an nvidia/cuda image refuses drivers older than its own CUDA minor version
        version = cuda_image_version(image)
        assert version is None or version <= (12, 0), f"{name}: {image} refuses 535/550 drivers"


def test_version_check_of_cuda_images():
    assert cuda_image_version("nvidia/cuda:12.6.3-runtime-ubuntu24.04") == (12, 6)
    assert cuda_image_version("nvidia/cuda:12.0.1-base-ubuntu22.04") == (12, 0)
    assert cuda_image_version("ubuntu:24.04") is None


def test_cuda_image_has_the_drivers_libraries_mounted_and_asks_only_for_cuda_12():
    dockerfile = DOCKERFILES["cuda"]
    bases = [arguments.split()[0] for keyword, arguments in instructions(dockerfile)
             if keyword == "FROM"]
    if all(cuda_image_version(image) is None for image in bases):
        # a plain base sets what an nvidia/cuda image would: the toolkit mounts libcuda
        # only for "compute", NVML and nvidia-smi only for "utility"
        variables = environment(dockerfile)
        assert variables.get("NVIDIA_VISIBLE_DEVICES") == "all"
        assert {"compute", "utility"} <= set(variables["NVIDIA_DRIVER_CAPABILITIES"].split(","))
        assert variables.get("NVIDIA_REQUIRE_CUDA") == "cuda>=12.0"


def test_cuda_image_pins_nvrtc_to_one_minor_version_of_the_extras_major():
    pyproject = (ROOT / "pyproject.toml").read_text()
    extra_major = re.search(r'cuda12 = \[.*"cuda-toolkit\[nvrtc,cudart\]==(\d+)\.\*"',
                            pyproject).group(1)
    installs = " ".join(arguments for keyword, arguments in instructions(DOCKERFILES["cuda"])
                        if keyword == "RUN" and "pip install" in arguments)
    assert "[cuda12]" in installs
    pins = re.findall(r"cuda-toolkit\[nvrtc,cudart\]==(\d+)\.(\d+)\.\*", installs)
    assert len(pins) == 1, installs
    assert pins[0][0] == extra_major
    assert "CUPY_COMPILE_WITH_PTX" not in environment(DOCKERFILES["cuda"])  # cubins only


def test_kernel_cache_volume_is_writable_by_any_user():
    dockerfile = DOCKERFILES["cuda"]
    variables = environment(dockerfile)
    cache = [arguments for keyword, arguments in instructions(dockerfile) if keyword == "VOLUME"]
    assert cache == ["/cache"]
    assert variables["CUPY_CACHE_DIR"].startswith("/cache/")
    assert variables["NUMBA_CACHE_DIR"].startswith("/cache/")
    runs = [arguments for keyword, arguments in instructions(dockerfile) if keyword == "RUN"]
    assert any(re.search(r"chmod -R (a\+rwX|0?777) /cache\b", run) for run in runs)


@pytest.mark.parametrize("name", ["cuda", "cpu"])
def test_usage_comment_builds_from_the_root_and_runs_as_the_user(name):
    comments = [line.lstrip("# ") for line in DOCKERFILES[name].read_text().splitlines()
                if line.startswith("#")]
    builds = [line for line in comments if line.startswith("docker build")]
    runs = [line for line in comments if line.startswith("docker run")]
    assert builds == [f"docker build -f docker/Dockerfile.{name} -t dcbg:{name} ."]
    assert runs and all(RUN_AS_USER in line for line in runs), runs
    readme_runs = [line for line in (ROOT / "README.md").read_text().splitlines()
                   if line.startswith("docker run") and f"dcbg:{name}" in line]
    assert readme_runs and all(RUN_AS_USER in line for line in readme_runs), readme_runs


@pytest.mark.parametrize("path", [
    ".git/HEAD", ".venv/bin/python", ".venv-cuda12/lib/site.py", "build/docs-html/index.html",
    ".whl/cupy_cuda12x-14.1.0-cp312-none-any.whl", ".site/lib/python3.12/dcbg/cli.py",
    "measurement.rtdc", "data/day1/M001_data.rtdc", "src/dcbg/__pycache__/cli.cpython-312.pyc",
    "src/dcbg/cpukernels/_compiled.cpython-311-x86_64-linux-gnu.so", ".pytest_cache/v/x",
    ".ruff_cache/0.6/x", "src/dcbg.egg-info/PKG-INFO", "dist/dcbg-0.1.0.whl",
])
def test_dockerignore_leaves_heavy_and_local_files_out_of_the_context(path):
    assert dockerignore_excludes(path), path


def test_dockerignore_keeps_what_the_images_copy():
    copied = []
    for dockerfile in DOCKERFILES.values():
        for keyword, arguments in instructions(dockerfile):
            if keyword == "COPY" and not arguments.startswith("--from"):
                copied += arguments.split()[:-1]
    assert {"pyproject.toml", "setup.py", "README.md", "LICENSE", "src"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not dockerignore_excludes(source), source
    for path in (ROOT / "src").rglob("*"):
        relative = path.relative_to(ROOT).as_posix()
        if path.is_file() and path.suffix in (".py", ".c", ".cu"):
            assert not dockerignore_excludes(relative), relative
