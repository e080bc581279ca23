#!/usr/bin/env bash
# GPU acceptance run: from a GPU host with this checkout and a .whl/ folder to a verdict.
#
#   bash benchmarks/gpu_acceptance.sh [--out DIR] [--dry-run]
#
# The host needs Python 3.12 with numpy, h5py, numba, tqdm, pillow, CuPy (with NVRTC),
# nvidia-ml-py, pytest, torch, scipy and a C compiler; the wheels of what it lacks come
# from .whl/ (benchmarks/gpu_wheels.sh downloads them), and no network is used. Steps,
# each under its own timeout, the next one running whatever the last one did, all of
# them within $DCBG_ACCEPTANCE_BUDGET seconds (default 540):
#   install      the wheels and dcbg from the checkout (its C kernels compiled) into .site
#   nvidia_smi   nvidia-smi -L
#   info         python -m dcbg info
#   selftest     python -m dcbg selftest --device cuda
#   gpu_tests    the tests of the GPU, the kernel and the selftest (none needs dclab,
#                dcnum or dask)
#   memcheck, racecheck   compute-sanitizer on one small launch and one pipeline run
#                per count width
#   recording    a synthetic recording for the two benchmarks below
#   bench_cuda   the kernel against cupyx and torch, file to file cuda vs cpu vs I/O floor
#   cpu_scaling  dcbg compute --device cpu with 1, 2, 4, 8 and 16 workers
# Writes DIR/report.md and DIR/report.json (after every step, so that a run killed
# halfway leaves a report), DIR/logs/<step>.log and what the steps measured. DIR is
# --out, else $OUT when set, else ./gpu-report. Exit code 0 when every step passed
# (a tool the host lacks counts as "not present", no failure), 1 otherwise.
#
# --dry-run runs the same flow on a machine without a GPU, so that the script itself is
# tested: CuPy is the stand-in of tests/helpers/standin (the real kernel compiled for the
# CPU), sizes are tiny, dcbg is installed from the checkout into a temporary folder on
# the packages of the current environment (no wheels), nvidia-smi and compute-sanitizer
# are recorded as not present, and the sanitizer's program runs without it.
set -u

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DRY_RUN=0
OUT_DIR="${OUT:-./gpu-report}"
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR="${2:?--out needs a folder}"; shift 2 ;;
        --out=*) OUT_DIR="${1#--out=}"; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown option $1; use --out DIR and --dry-run" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT_DIR" || { echo "error: cannot create the report folder $OUT_DIR" >&2; exit 2; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT" || exit 2

export PYTHON="${PYTHON:-python3}"
export OUT_DIR ROOT DRY_RUN
export LOGS="$OUT_DIR/logs"
BUDGET="${DCBG_ACCEPTANCE_BUDGET:-540}"   # seconds for every step together
RESERVE=15                                # kept back for the last report
NOT_PRESENT=99                            # exit code of a step whose tool is missing
START=$(date +%s)
DEADLINE=$((START + BUDGET - RESERVE))
export WORK; WORK="$(mktemp -d "${TMPDIR:-/tmp}/dcbg-acceptance-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

if [ "$DRY_RUN" = 1 ]; then
    export SITE="$WORK/site"
    export PYTHONPATH="$SITE:$ROOT/tests/helpers/standin${PYTHONPATH:+:$PYTHONPATH}"
    export DCBG_STANDIN_CACHE="$WORK/standin"
    export SELFTEST_SIZES="--events 8 --file-events 300"
    export RECORDING_EVENTS=400 SCALING_WORKERS="1,2" BENCH_SIZES="--tiny"
else
    export SITE="$ROOT/.site"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export SELFTEST_SIZES="" RECORDING_EVENTS=20000 SCALING_WORKERS="1,2,4,8,16"
    export BENCH_SIZES=""
fi
export RECORDING="$WORK/recording.rtdc"

STEPS=(install nvidia_smi info selftest gpu_tests memcheck racecheck recording bench_cuda
       cpu_scaling)
STEP_LIST="$(IFS=,; echo "${STEPS[*]}")"
REPORT=("$PYTHON" "$ROOT/benchmarks/gpu_acceptance.py")
"${REPORT[@]}" start --out "$OUT_DIR" --steps "$STEP_LIST" --budget "$BUDGET" \
    $([ "$DRY_RUN" = 1 ] && echo --dry-run) || { echo "error: $PYTHON cannot write the report in $OUT_DIR" >&2; exit 1; }

step_install() {
    set -e
    if [ "$DRY_RUN" = 1 ]; then
        echo "dry run: no wheels installed; the current environment's packages serve"
    else
        shopt -s nullglob
        wheels=("$ROOT"/.whl/*.whl)
        if [ ${#wheels[@]} -eq 0 ]; then
            echo "error: no wheels in $ROOT/.whl; run benchmarks/gpu_wheels.sh where PyPI is reachable and copy .whl/ here"
            exit 1
        fi
        "$PYTHON" -m pip install --disable-pip-version-check --no-index --no-deps --upgrade \
            --target "$SITE" "${wheels[@]}"
    fi
    "$PYTHON" -c 'import setuptools, sys; v = int(setuptools.__version__.split(".")[0]); sys.exit(0 if v >= 77 else f"error: setuptools {setuptools.__version__} is too old to build dcbg, it needs 77 or newer: add its wheel to .whl/ (gpu_wheels.sh does) or pip install \"setuptools>=77\"")'
    "$PYTHON" -m pip install --disable-pip-version-check --no-index --no-deps --upgrade \
        --no-build-isolation --target "$SITE" "$ROOT"
    "$PYTHON" -c 'import dcbg, dcbg.cpukernels as k; print("dcbg from", dcbg.__file__); print("CPU kernels:", k.describe_build()); k.load_build("C")'
}

step_nvidia_smi() {
    if [ "$DRY_RUN" = 1 ] || ! command -v nvidia-smi >/dev/null; then
        echo "nvidia-smi: not present"; exit "$NOT_PRESENT"
    fi
    nvidia-smi -L && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
}

step_info() { "$PYTHON" -m dcbg info; }

step_selftest() {
    # shellcheck disable=SC2086 # the sizes are words
    "$PYTHON" -m dcbg selftest --device cuda --json "$OUT_DIR/selftest.json" $SELFTEST_SIZES
}

step_gpu_tests() {
    if [ "$DRY_RUN" = 1 ]; then
        # the stand-in is no CuPy to compile with: the kernel's build tests stay out
        tests=(tests/test_gpu.py tests/test_selftest.py -k "usable or instrument or wrong_gpu or arrays or readme")
    else
        tests=(tests/test_gpu.py tests/test_kernel.py tests/test_selftest.py)
    fi
    "$PYTHON" -m pytest -q -rs -p no:cacheprovider --junitxml "$OUT_DIR/gpu-tests.xml" "${tests[@]}"
}

sanitizer() {
    local tool=$1 found=""
    for candidate in compute-sanitizer /usr/local/cuda/bin/compute-sanitizer; do
        if [ "$DRY_RUN" = 0 ] && command -v "$candidate" >/dev/null; then found=$candidate; break; fi
    done
    if [ -z "$found" ]; then
        echo "compute-sanitizer: not present; its program runs without it:"
        "$PYTHON" "$ROOT/benchmarks/gpu_acceptance.py" sanitize || exit 1
        exit "$NOT_PRESENT"
    fi
    "$found" --tool "$tool" --error-exitcode 3 --print-limit 20 \
        "$PYTHON" "$ROOT/benchmarks/gpu_acceptance.py" sanitize
}
step_memcheck() { sanitizer memcheck; }
step_racecheck() { sanitizer racecheck; }

step_recording() {
    "$PYTHON" "$ROOT/benchmarks/gpu_acceptance.py" recording "$RECORDING" --events "$RECORDING_EVENTS"
}

step_bench_cuda() {
    cd "$ROOT/benchmarks" || exit 1
    local source=()
    [ -f "$RECORDING" ] && source=(--recording "$RECORDING")
    # shellcheck disable=SC2086 # the sizes are words
    "$PYTHON" bench_cuda.py --no-append --json "$OUT_DIR/bench_cuda.json" "${source[@]}" $BENCH_SIZES
}

step_cpu_scaling() {
    if [ ! -f "$RECORDING" ]; then
        "$PYTHON" "$ROOT/benchmarks/gpu_acceptance.py" recording "$RECORDING" --events "$RECORDING_EVENTS" || exit 1
    fi
    "$PYTHON" "$ROOT/benchmarks/gpu_acceptance.py" cpu-scaling --recording "$RECORDING" \
        --workers "$SCALING_WORKERS" --json "$OUT_DIR/cpu_scaling.json"
}

export NOT_PRESENT
export -f step_install step_nvidia_smi step_info step_selftest step_gpu_tests sanitizer \
    step_memcheck step_racecheck step_recording step_bench_cuda step_cpu_scaling

FAILED=0
run_step() {  # NAME TIMEOUT: run step_NAME under its timeout, log it, record it
    local name=$1 limit=$2 left started finished rc status note=""
    left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 10 ]; then
        "${REPORT[@]}" record --out "$OUT_DIR" --step "$name" --status skipped --seconds 0 \
            --exit-code 0 --note "no time left of the ${BUDGET} s budget"
        FAILED=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (at most ${limit} s)"
    started=$(date +%s.%N)
    timeout --kill-after=10 "$limit" bash -c "step_$name" >"$LOGS/$name.log" 2>&1 </dev/null
    rc=$?
    finished=$(date +%s.%N)
    case $rc in
        0) status=ok ;;
        124|137) status=timeout; note="stopped after ${limit} s" ;;
        "$NOT_PRESENT") status="not present" ;;
        *) status=failed ;;
    esac
    case $status in ok|"not present") ;; *) FAILED=1 ;; esac
    echo "   $status, $(awk "BEGIN {printf \"%.1f\", $finished - $started}") s; log: $LOGS/$name.log"
    "${REPORT[@]}" record --out "$OUT_DIR" --step "$name" --status "$status" \
        --seconds "$(awk "BEGIN {print $finished - $started}")" --exit-code "$rc" \
        --command "step_$name" --note "$note" || FAILED=1
}

run_step install 180
run_step nvidia_smi 30
run_step info 60
run_step selftest 120
run_step gpu_tests 180
run_step memcheck 90
run_step racecheck 120
run_step recording 60
run_step bench_cuda 200
run_step cpu_scaling 120

echo "report: $OUT_DIR/report.md"
sed -n '1p' "$OUT_DIR/report.md"
exit "$FAILED"
