#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_acceptance.sh installs on a GPU host without a
# package registry, into .whl/ (or the folder given), for CPython 3.12 on manylinux x86_64.
#
#   bash benchmarks/gpu_wheels.sh [FOLDER]
#
# The GPU host brings numpy, h5py, numba, tqdm, pillow, CuPy with NVRTC,
# nvidia-ml-py, pytest, torch and scipy. dcbg needs besides hdf5plugin and
# numcodecs (with its dependency typing_extensions), and building dcbg's C
# kernels from the checkout needs setuptools 77 or newer (pyproject.toml).
# After downloading, every requirement of every wheel is checked to be either
# one of these wheels or something the host brings; the script fails if not.
set -euo pipefail
cd "$(dirname "$0")/.."
FOLDER="${1:-.whl}"
PYTHON="${PYTHON:-python3}"

# numcodecs 0.16 still runs with numpy 1.24 (0.17 needs numpy 2), whichever the host has
WHEELS=("hdf5plugin>=4.1" "numcodecs>=0.16,<0.17" "typing_extensions>=4.6" "setuptools>=77")
HOST_BRINGS="numpy h5py numba tqdm pillow cupy-cuda13x nvidia-ml-py pytest torch scipy"

mkdir -p "$FOLDER"
"$PYTHON" -m pip download --disable-pip-version-check --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    --no-deps -d "$FOLDER" "${WHEELS[@]}"

"$PYTHON" - "$FOLDER" "$HOST_BRINGS" <<'EOF'
"""Check that each wheel's requirements are met by the other wheels or by the host"""
import pathlib
import re
import sys
import zipfile

from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

folder, host = pathlib.Path(sys.argv[1]), sys.argv[2].split()
wheels = sorted(folder.glob("*.whl"))
provided = {canonicalize_name(name) for name in host}
provided |= {canonicalize_name(wheel.name.split("-")[0]) for wheel in wheels}
environment = {"python_version": "3.12", "python_full_version": "3.12.0",
               "sys_platform": "linux", "platform_system": "Linux",
               "platform_machine": "x86_64", "implementation_name": "cpython",
               "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist()
                        if re.fullmatch(r"[^/]+\.dist-info/METADATA", name))
        text = archive.read(metadata).decode()
    needs = [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines()
             if line.startswith("Requires-Dist:")]
    needs = [need for need in needs
             if need.marker is None or need.marker.evaluate(environment)]
    print(f"{wheel.name}: needs {', '.join(map(str, needs)) or 'nothing'}")
    missing += [f"{wheel.name} needs {need}" for need in needs
                if canonicalize_name(need.name) not in provided]
if missing:
    sys.exit("error: not covered by the wheels or the host: " + "; ".join(missing))
total = sum(wheel.stat().st_size for wheel in wheels)
print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {folder}; every requirement is covered")
EOF
