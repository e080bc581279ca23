#!/usr/bin/env bash
# GPU acceptance run: from a GPU host with this checkout (and a .whl/ folder) to a verdict.
#
#   bash benchmarks/gpu_acceptance.sh [--out DIR] [--dry-run] [--steps a,b,...]
#
# The host needs Python 3.12 with numpy, h5py, numba, tqdm, pillow, CuPy (with NVRTC),
# nvidia-ml-py, pytest, torch, scipy and a C compiler; the wheels of what it lacks come
# from .whl/ (benchmarks/gpu_wheels.sh downloads them), and no network is used. Without
# .whl/, dcbg is installed on the host's packages alone and the report names the packages
# that are missing. Steps, each under its own timeout, the next one running whatever the
# last one did, all of them within $DCBG_ACCEPTANCE_BUDGET seconds (default 480, so that
# a second run fits in the host's 15 minutes); at that limit, or when the host stops the
# command, the running step is stopped and the report is written:
#   install      the wheels and dcbg from the checkout into .site: its C kernels where
#                Python.h is present, else numba's build (the report says which)
#   nvidia_smi   nvidia-smi -L
#   info         python -m dcbg info
#   selftest     python -m dcbg selftest --device cuda
#   gpu_tests    the tests that need a GPU (marked gpu); CI runs the others
#   memcheck, racecheck   compute-sanitizer on one small launch and one pipeline run
#                per count width (a sanitizer that does not support the GPU counts as
#                not present)
#   recording    a synthetic recording of 10,000 events for the two benchmarks below
#   bench_cuda   the kernel against cupyx and torch, file to file cuda vs cpu vs I/O floor
#   cpu_scaling  dcbg compute --device cpu with 1, 2, 4, 8 and 16 workers
# --steps runs only the steps named (a second run for those that failed).
#
# DIR (--out, else $OUT when set, else ./gpu-report) receives at most six files, rewritten
# after every step so that a run killed halfway leaves them: report.md, report.json,
# selftest.json, bench_cuda.json, cpu_scaling.json and logs.tar.gz (each step's output,
# logs/<step>.log, and the GPU tests' JUnit XML). Logs and scratch files stay in a work
# folder under $TMPDIR, removed at the end. Exit code 0 when every step passed (a tool
# the host lacks counts as "not present", no failure), 1 otherwise.
#
# --dry-run runs the same flow on a machine without a GPU, so that the script itself is
# tested: CuPy is the stand-in of tests/helpers/standin (the real kernel compiled for the
# CPU), sizes are tiny, dcbg is installed from the checkout into the work folder on the
# packages of the current environment (no wheels), nvidia-smi and compute-sanitizer are
# recorded as not present (unless DCBG_SANITIZER names a sanitizer to run), and the
# sanitizer's program runs without it.
set -u

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DRY_RUN=0
OUT_DIR="${OUT:-./gpu-report}"
ONLY=""
ARGS=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR="${2:?--out needs a folder}"; shift 2 ;;
        --out=*) OUT_DIR="${1#--out=}"; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --steps) ONLY="${2:?--steps needs step names}"; shift 2 ;;
        --steps=*) ONLY="${1#--steps=}"; shift ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown option $1; use --out DIR, --dry-run and --steps a,b" >&2
           exit 2 ;;
    esac
done

BUDGET="${DCBG_ACCEPTANCE_BUDGET:-480}"   # seconds for the whole run
RESERVE=20                                # kept back for the last report
# The outer time limit: the whole script runs under timeout, which sends TERM at the
# budget's end (and KILL 15 s later); the trap below then writes the report.
if [ -z "${DCBG_ACCEPTANCE_INNER:-}" ]; then
    export DCBG_ACCEPTANCE_INNER=1
    exec timeout --preserve-status --kill-after=15 "$BUDGET" bash "$0" "${ARGS[@]}"
fi

STEPS=(install nvidia_smi info selftest gpu_tests memcheck racecheck recording bench_cuda
       cpu_scaling)
if [ -n "$ONLY" ]; then
    IFS=, read -r -a STEPS <<<"$ONLY"
    for name in "${STEPS[@]}"; do
        case " install nvidia_smi info selftest gpu_tests memcheck racecheck recording bench_cuda cpu_scaling " in
            *" $name "*) ;;
            *) echo "error: unknown step $name; the steps are install, nvidia_smi, info, selftest, gpu_tests, memcheck, racecheck, recording, bench_cuda and cpu_scaling" >&2; exit 2 ;;
        esac
    done
fi

mkdir -p "$OUT_DIR" || { echo "error: cannot create the report folder $OUT_DIR" >&2; exit 2; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT" || exit 2

export PYTHON="${PYTHON:-python3}"
export OUT_DIR ROOT DRY_RUN
NOT_PRESENT=99                            # exit code of a step whose tool is missing
START=$(date +%s)
DEADLINE=$((START + BUDGET - RESERVE))
export WORK; WORK="$(mktemp -d "${TMPDIR:-/tmp}/dcbg-acceptance-XXXXXX")"
export LOGS="$WORK/logs"
mkdir -p "$LOGS" "$WORK/tmp"
export TMPDIR="$WORK/tmp"                 # the steps' scratch files stay in the work folder

if [ "$DRY_RUN" = 1 ]; then
    export SITE="$WORK/site"
    export PYTHONPATH="$SITE:$ROOT/tests/helpers/standin${PYTHONPATH:+:$PYTHONPATH}"
    export DCBG_STANDIN_CACHE="$WORK/standin"
    export SELFTEST_SIZES="--events 8 --file-events 300"
    export RECORDING_EVENTS=400 SCALING_WORKERS="1,2" BENCH_SIZES="--tiny"
else
    export SITE="${DCBG_ACCEPTANCE_SITE:-$ROOT/.site}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export SELFTEST_SIZES="" RECORDING_EVENTS=10000 SCALING_WORKERS="1,2,4,8,16"
    export BENCH_SIZES=""
fi
export RECORDING="$WORK/recording.rtdc"

STEP_LIST="$(IFS=,; echo "${STEPS[*]}")"
REPORT=("$PYTHON" "$ROOT/benchmarks/gpu_acceptance.py")
"${REPORT[@]}" start --out "$OUT_DIR" --work "$WORK" --steps "$STEP_LIST" --budget "$BUDGET" \
    $([ "$DRY_RUN" = 1 ] && echo --dry-run) || { echo "error: $PYTHON cannot write the report in $OUT_DIR" >&2; rm -rf "$WORK"; exit 1; }

step_install() {
    set -e
    if [ "$DRY_RUN" = 1 ]; then
        echo "dry run: no wheels installed; the current environment's packages serve"
    else
        shopt -s nullglob
        wheels=("$ROOT"/.whl/*.whl)
        if [ ${#wheels[@]} -eq 0 ]; then
            echo "no wheels in $ROOT/.whl: dcbg is installed on the host's packages alone (benchmarks/gpu_wheels.sh downloads the others where PyPI is reachable)"
        else
            "$PYTHON" -m pip install --disable-pip-version-check --no-index --no-deps \
                --upgrade --target "$SITE" "${wheels[@]}"
        fi
    fi
    headers=1
    if ! "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(os.environ.get("DCBG_PYTHON_INCLUDE") or sysconfig.get_paths()["include"], "Python.h")))'; then
        headers=0
        echo "Python.h not found: dcbg's C kernels cannot be built here, the numba build runs (install the Python headers, e.g. python3-dev, for the C build)"
    fi
    "$PYTHON" -c 'import setuptools, sys; v = int(setuptools.__version__.split(".")[0]); sys.exit(0 if v >= 77 else f"error: setuptools {setuptools.__version__} is too old to build dcbg, it needs 77 or newer: add its wheel to .whl/ (gpu_wheels.sh does) or pip install \"setuptools>=77\"")'
    "$PYTHON" -m pip install --disable-pip-version-check --no-index --no-deps --upgrade \
        --no-build-isolation --target "$SITE" "$ROOT"
    missing=0
    "$PYTHON" "$ROOT/benchmarks/gpu_acceptance.py" missing-packages || missing=1
    "$PYTHON" -c 'import dcbg, dcbg.cpukernels as k; print("dcbg from", dcbg.__file__); print("CPU kernels:", k.describe_build())'
    if [ "$headers" = 1 ]; then
        "$PYTHON" -c 'import dcbg.cpukernels as k; k.load_build("C")'
    fi
    exit "$missing"
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
    # the modules with tests marked gpu, and only those tests (CI runs every other)
    mapfile -t modules < <(grep -l "pytest.mark.gpu" tests/test_*.py)
    local select=()
    # the stand-in runs on the CPU: the largest stacks stay out
    [ "$DRY_RUN" = 1 ] && select=(-k "usable or instrument or arrays or readme")
    "$PYTHON" -m pytest -q -rs -p no:cacheprovider -m gpu --junitxml "$WORK/gpu-tests.xml" \
        "${modules[@]}" "${select[@]}"
}

sanitizer() {
    local tool=$1 found="${DCBG_SANITIZER:-}" output rc
    if [ -z "$found" ] && [ "$DRY_RUN" = 0 ]; then
        for candidate in compute-sanitizer /usr/local/cuda/bin/compute-sanitizer; do
            if command -v "$candidate" >/dev/null; then found=$candidate; break; fi
        done
    fi
    if [ -n "$found" ]; then
        output="$WORK/$tool.out"
        "$found" --tool "$tool" --error-exitcode 3 --print-limit 20 \
            "$PYTHON" "$ROOT/benchmarks/gpu_acceptance.py" sanitize 2>&1 | tee "$output"
        rc=${PIPESTATUS[0]}
        # an older sanitizer than the GPU: no check of dcbg, so no failure of it either
        if [ "$rc" -eq 0 ] || ! grep -qiE "device (is )?not supported|unsupported device" "$output"; then
            exit "$rc"
        fi
        echo "compute-sanitizer: not present for this GPU (it does not support the device); its program runs without it:"
    else
        echo "compute-sanitizer: not present; its program runs without it:"
    fi
    "$PYTHON" "$ROOT/benchmarks/gpu_acceptance.py" sanitize || exit 1
    exit "$NOT_PRESENT"
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
CURRENT=""       # the step running now
STEP_STARTED=""
DONE=()          # the steps recorded so far

record() {  # NAME STATUS SECONDS EXIT_CODE NOTE
    "${REPORT[@]}" record --out "$OUT_DIR" --work "$WORK" --step "$1" --status "$2" \
        --seconds "$3" --exit-code "$4" --command "step_$1" --note "$5" || FAILED=1
    DONE+=("$1")
}

stop_run() {  # the budget's end or the host: stop the step, record the rest, report
    trap - TERM INT HUP
    # The step's process may have started before its pid was kept: stop every job.
    local running
    running=$(jobs -p)
    if [ -n "$running" ]; then
        # shellcheck disable=SC2086 # one pid per word
        kill -TERM $running 2>/dev/null
        # shellcheck disable=SC2086
        wait $running 2>/dev/null
    fi
    # The step stopped is the one announced and not yet recorded, even where it has
    # no process yet or its process ended already (the outer timeout's TERM reaches
    # the step's processes too).
    case " ${DONE[*]} " in *" $CURRENT "*) ;; *)
        [ -n "$CURRENT" ] && record "$CURRENT" timeout \
            "$(awk "BEGIN {print $(date +%s.%N) - $STEP_STARTED}")" 143 \
            "stopped at the run's time limit of ${BUDGET} s, or by the host" ;;
    esac
    for name in "${STEPS[@]}"; do
        case " ${DONE[*]} " in *" $name "*) ;; *)
            record "$name" skipped 0 0 "the run was stopped before this step" ;;
        esac
    done
    echo "stopped; report: $OUT_DIR/report.md"
    rm -rf "$WORK"
    exit 1
}
trap stop_run TERM INT HUP

run_step() {  # NAME TIMEOUT: run step_NAME under its timeout, log it, record it
    local name=$1 limit=$2 left finished rc status note=""
    case " ${STEPS[*]} " in *" $name "*) ;; *) return ;; esac
    left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 10 ]; then
        record "$name" skipped 0 0 "no time left of the ${BUDGET} s budget"
        FAILED=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    STEP_STARTED=$(date +%s.%N)
    CURRENT=$name  # before it is announced: a stop from then on stops this step
    echo "== $name (at most ${limit} s)"
    # in the background, so that a TERM is handled at once, not when the step ends
    timeout --kill-after=10 "$limit" bash -c "step_$name" >"$LOGS/$name.log" 2>&1 </dev/null &
    wait $!
    rc=$?
    finished=$(date +%s.%N)
    case $rc in
        0) status=ok ;;
        124|137) status=timeout; note="stopped after ${limit} s" ;;
        "$NOT_PRESENT") status="not present" ;;
        *) status=failed ;;
    esac
    case $status in ok|"not present") ;; *) FAILED=1 ;; esac
    echo "   $status, $(awk "BEGIN {printf \"%.1f\", $finished - $STEP_STARTED}") s"
    record "$name" "$status" "$(awk "BEGIN {print $finished - $STEP_STARTED}")" "$rc" "$note"
    CURRENT=""
}

run_step install 120
run_step nvidia_smi 15
run_step info 30
run_step selftest 90
run_step gpu_tests 120
run_step memcheck 60
run_step racecheck 60
run_step recording 120
run_step bench_cuda 120
run_step cpu_scaling 90

trap - TERM INT HUP
echo "report: $OUT_DIR/report.md (the logs are in $OUT_DIR/logs.tar.gz)"
sed -n '1p' "$OUT_DIR/report.md"
rm -rf "$WORK"
exit "$FAILED"
