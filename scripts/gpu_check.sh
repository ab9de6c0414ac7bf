#!/usr/bin/env bash
# gpu_check.sh: everything that needs a GPU, in one command, with one markdown report.
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]
#
# For a fresh GPU machine without network, run from the source tree (PYTHONPATH=. is set here; nothing
# is installed). Steps, each under its own `timeout`, all inside GPU_CHECK_TOTAL seconds (default 530,
# under 9 minutes):
#   device     nvidia-smi, versions of python, torch, cupy, numpy, nvcc, compute-sanitizer
#   pytest     python3 -m pytest -m gpu [-n 4]     (GPU-marked tests, 4 workers when pytest-xdist is
#                                                   importable; all skipped counts as a failure)
#   emu-gpu    scripts/emu_vs_gpu.py               (same kernels, same inputs: CPU emulator vs GPU)
#   memcheck   compute-sanitizer --tool memcheck   on scripts/sanitize_driver.py (small fwd + bwd)
#   racecheck  compute-sanitizer --tool racecheck  on the same
#   synccheck  compute-sanitizer --tool synccheck  on the same
#   bench      examples/benchmark.py --quick --strict
#   bench-decode  examples/benchmark.py --decode          (KV-cache decoding vs SDPA, the time left)
#   bench-varlen  examples/benchmark.py --varlen only --quick  (packed vs padded training, the time left)
# A failing step does not stop the others. The report <date>-<gpu>.md (each step's status, time and
# output tail, then the benchmark table) goes to $OUT when that is set, else to RESULTS_DIR (default
# ./benchmarks/results), with <date>-<gpu>.log (every step's full output) and the benchmark's
# <date>-<gpu>-benchmark.csv / .png beside it, and <date>-<gpu>-decode.md / -varlen.md when those
# sections ran.
# Exit status: 0 when every step passed, 1 when any failed, 2 when there is no usable GPU (nothing is
# written then).
#
# Environment: PYTHON (default python3), NVIDIA_SMI (default nvidia-smi), COMPUTE_SANITIZER (default:
# found on PATH or under /usr/local/cuda*), GPU_CHECK_TOTAL (seconds, default 530), GPU_CHECK_STEPS
# (comma list of the steps above to run; default all), GPU_CHECK_COMMIT (the commit being checked, for
# the report, when the tree has no .git).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
SMI=${NVIDIA_SMI:-nvidia-smi}
TOTAL=${GPU_CHECK_TOTAL:-530}
RESERVE=15  # seconds kept for writing the report
EXTRA_MIN=30  # the fewest seconds worth starting one of the decode / packed-batch sections with
STEPS=${GPU_CHECK_STEPS:-device,pytest,emu-gpu,memcheck,racecheck,synccheck,bench,bench-decode,bench-varlen}
T0=$SECONDS

die() { echo "gpu_check: $*" >&2; exit 2; }

# --- 0. is there a GPU at all? (no side effects before this point) --------------------------------
command -v "$SMI" >/dev/null 2>&1 ||
    die "'$SMI' not found: this script needs a machine with an NVIDIA GPU and its driver (nothing was run)"
GPU_LIST=$(timeout 30 "$SMI" -L 2>&1) || die "'$SMI -L' failed, no usable GPU (nothing was run): $GPU_LIST"
[ -n "$GPU_LIST" ] || die "'$SMI -L' lists no GPU (nothing was run)"
command -v "$PY" >/dev/null 2>&1 || die "python '$PY' not found (set PYTHON)"

GPU_NAME=$(timeout 30 "$SMI" --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
GPU_NAME=${GPU_NAME:-unknown-gpu}
GPU_SLUG=$(printf '%s' "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
DATE=$(date -u +%Y-%m-%d)
STEM="$DATE-${GPU_SLUG:-gpu}"
if [ -n "${OUT:-}" ]; then DEST=$OUT; else DEST=${1:-$ROOT/benchmarks/results}; fi
mkdir -p "$DEST" || die "cannot create $DEST"
if [ -e "$DEST/$STEM.md" ]; then  # never overwrite an earlier report of the same day and GPU
    i=2; while [ -e "$DEST/$STEM-$i.md" ]; do i=$(( i + 1 )); done; STEM="$STEM-$i"
fi
REPORT="$DEST/$STEM.md"
FULLLOG="$DEST/$STEM.log"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || die "mktemp failed"
trap 'rm -rf "$WORK"' EXIT
: >"$FULLLOG"

if [ -n "${GPU_CHECK_COMMIT:-}" ]; then
    COMMIT=$GPU_CHECK_COMMIT
elif COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null); then
    git -C "$ROOT" diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT (with uncommitted changes)"
else
    COMMIT="unknown (no .git here; set GPU_CHECK_COMMIT)"
fi

SAN=${COMPUTE_SANITIZER:-}
if [ -z "$SAN" ]; then
    SAN=$(command -v compute-sanitizer 2>/dev/null ||
          ls /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer \
             /opt/nvidia/*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1)
fi

# --- step runner --------------------------------------------------------------------------------------
NAMES=() STATUS=() SECS=() BUDGETS=() DESCS=() LOGS=() NOTES=()
wanted() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
left() { echo $(( TOTAL - RESERVE - (SECONDS - T0) )); }

# run_step NAME BUDGET DESCRIPTION -- COMMAND...   (sets RC, LOG for a post-check)
run_step() {
    local name=$1 budget=$2 desc=$3; shift 4
    local n=$(( ${#NAMES[@]} + 1 ))
    LOG="$WORK/$n-$name.log"; RC=0
    NAMES+=("$name"); DESCS+=("$desc"); LOGS+=("$LOG")
    if ! wanted "$name"; then
        STATUS+=("SKIP"); SECS+=(0); BUDGETS+=("$budget"); NOTES+=("not in GPU_CHECK_STEPS"); : >"$LOG"
        RC=skip; return
    fi
    local l; l=$(left)
    (( budget > l )) && budget=$l
    if (( budget < 10 )); then
        STATUS+=("FAIL"); SECS+=(0); BUDGETS+=("$budget"); NOTES+=("not run: the ${TOTAL}s total budget is used up")
        echo "not run: time budget used up" >"$LOG"; RC=skip; return
    fi
    BUDGETS+=("$budget")
    echo "=== [$n $name] $desc (budget ${budget}s) ==="
    local t=$SECONDS
    timeout -k 10 "$budget" "$@" 2>&1 | tee "$LOG"
    RC=${PIPESTATUS[0]}
    SECS+=($(( SECONDS - t )))
    if (( RC == 0 )); then
        STATUS+=("PASS"); NOTES+=("")
    elif (( RC == 124 || RC == 137 )); then
        STATUS+=("FAIL"); NOTES+=("timed out after ${budget}s")
    else
        STATUS+=("FAIL"); NOTES+=("exit status $RC")
    fi
    { echo "=== [$n $name] $desc: ${STATUS[-1]} ${NOTES[-1]} ($(( SECONDS - t ))s) ==="; echo "\$ $*"; cat "$LOG"; echo; } >>"$FULLLOG"
}
fail_last() { STATUS[-1]="FAIL"; NOTES[-1]="$1"; echo "gpu_check: [${NAMES[-1]}] $1"; }

# --- 1. device ----------------------------------------------------------------------------------------
# Budgets (s): device 30, pytest 220, emu-gpu 70, memcheck 55, racecheck 55, synccheck 35 = 465, so the
# benchmark keeps at least 530 - 15 - 465 = 50 s even when every earlier step runs to its limit (it is
# capped at 200 s). pytest gets the most: on a cold machine NVRTC compiles every kernel module from
# scratch and Inductor compiles the torch.compile test, and the toy trainer runs twice.
run_step device 30 "device and versions" -- bash -c '
    "$1"; echo
    "$1" --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv; echo
    "$2" scripts/gpu_info.py; rc=$?; echo
    if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not on PATH"; fi
    if [ -n "$3" ]; then echo "compute-sanitizer: $3"; "$3" --version | head -n 2; else echo "compute-sanitizer: NOT FOUND"; fi
    exit $rc' device "$SMI" "$PY" "$SAN"

# --- 2. GPU-marked tests ------------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -m gpu -q -rs -p no:cacheprovider) PYTEST_DESC="pytest -m gpu"
if "$PY" -c 'import xdist' >/dev/null 2>&1; then  # pytest-xdist: compile and test in 4 processes
    PYTEST+=(-n 4); PYTEST_DESC="pytest -m gpu -n 4"
fi
run_step pytest 220 "GPU-marked tests ($PYTEST_DESC)" -- "${PYTEST[@]}"
if [ "$RC" != skip ]; then
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error|deselected)' "$LOG" | tail -n 1)
    if [ "$RC" = 5 ]; then
        fail_last "no GPU tests were collected"
    elif [ "$RC" = 0 ] && ! grep -q 'passed' <<<"$summary"; then
        fail_last "no GPU test passed (all skipped?): $summary"
    fi
fi

# --- 3. emulator vs GPU -------------------------------------------------------------------------------
run_step emu-gpu 70 "CPU emulator vs GPU, same kernels and inputs" -- \
    "$PY" scripts/emu_vs_gpu.py --max-seconds 45

# --- 4. compute-sanitizer -----------------------------------------------------------------------------
for tool in memcheck racecheck synccheck; do
    case $tool in memcheck|racecheck) b=55 ;; *) b=35 ;; esac
    if [ -z "$SAN" ]; then
        run_step "$tool" "$b" "compute-sanitizer --tool $tool" -- bash -c 'echo "compute-sanitizer not found (PATH, /usr/local/cuda*/bin); set COMPUTE_SANITIZER"; exit 3'
        continue
    fi
    run_step "$tool" "$b" "compute-sanitizer --tool $tool on a small forward + backward" -- \
        "$SAN" --tool "$tool" --error-exitcode 86 --print-limit 20 "$PY" scripts/sanitize_driver.py
    if [ "$RC" = 86 ]; then fail_last "compute-sanitizer $tool reported errors"; fi
done

# --- 5. benchmark -------------------------------------------------------------------------------------
BENCH="$WORK/bench"
b=$(( $(left) - 2 * EXTRA_MIN )); (( b > 200 )) && b=200
run_step bench "$b" "examples/benchmark.py --quick" -- \
    "$PY" examples/benchmark.py --quick --strict --require-gpu --out "$BENCH" --max-seconds $(( b > 60 ? b - 40 : b / 2 ))
if [ "$RC" != skip ]; then
    [ -f "$BENCH/benchmark.md" ] || fail_last "no benchmark table was written"
    [ -f "$BENCH/benchmark.csv" ] && cp "$BENCH/benchmark.csv" "$DEST/$STEM-benchmark.csv"
    [ -f "$BENCH/benchmark.png" ] && cp "$BENCH/benchmark.png" "$DEST/$STEM-benchmark.png"
fi

# --- 6. the decode and packed-batch sections, in the time that is left --------------------------------
# Each gets at most 90 s; with under EXTRA_MIN seconds left a section is recorded as skipped (not failed):
# the main benchmark above comes first.
for sec in decode varlen; do
    b=$(left); (( b > 90 )) && b=90
    if (( b < EXTRA_MIN )); then
        NAMES+=("bench-$sec"); DESCS+=("examples/benchmark.py, $sec section"); LOGS+=("$WORK/bench-$sec.log")
        STATUS+=("SKIP"); SECS+=(0); BUDGETS+=("$b"); NOTES+=("not run: under ${EXTRA_MIN}s of the budget left")
        echo "not run: under ${EXTRA_MIN}s of the budget left" >"$WORK/bench-$sec.log"
        continue
    fi
    case $sec in
        decode) run_step bench-decode "$b" "examples/benchmark.py --decode (KV-cache decoding vs SDPA)" -- \
                    "$PY" examples/benchmark.py --decode --out "$WORK/bench-decode" --max-seconds $(( b - 20 )) ;;
        varlen) run_step bench-varlen "$b" "examples/benchmark.py --varlen only --quick (packed vs padded)" -- \
                    "$PY" examples/benchmark.py --varlen only --quick --require-gpu --out "$WORK/bench-varlen" \
                    --max-seconds $(( b - 20 )) ;;
    esac
    if [ "$RC" != skip ]; then
        [ -f "$WORK/bench-$sec/$sec.md" ] || fail_last "no $sec table was written"
        [ -f "$WORK/bench-$sec/$sec.md" ] && cp "$WORK/bench-$sec/$sec.md" "$DEST/$STEM-$sec.md"
    fi
done

# --- report -------------------------------------------------------------------------------------------
FAILED=0
for s in "${STATUS[@]}"; do [ "$s" = FAIL ] && FAILED=$(( FAILED + 1 )); done
{
    echo "# GPU check: $GPU_NAME, $DATE"
    echo
    echo "- result: **$([ $FAILED = 0 ] && echo "all steps passed" || echo "$FAILED step(s) FAILED")**"
    echo "- GPU: $(timeout 20 "$SMI" --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
    echo "- commit: $COMMIT"
    echo "- command: \`scripts/gpu_check.sh\` ($(( SECONDS - T0 ))s of a ${TOTAL}s budget; steps: $STEPS)"
    echo "- files: \`$STEM.md\` (this report), \`$STEM.log\` (full output of every step),"
    echo "  \`$STEM-benchmark.csv\`, \`$STEM-benchmark.png\`, \`$STEM-decode.md\` and \`$STEM-varlen.md\` (when run)"
    echo
    echo "| # | step | status | seconds | budget | what | note |"
    echo "|---|---|---|---|---|---|---|"
    for i in "${!NAMES[@]}"; do
        echo "| $(( i + 1 )) | ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${BUDGETS[$i]} | ${DESCS[$i]} | ${NOTES[$i]} |"
    done
    for i in "${!NAMES[@]}"; do
        echo
        echo "## $(( i + 1 )). ${NAMES[$i]}: ${STATUS[$i]}${NOTES[$i]:+ (${NOTES[$i]})}"
        echo
        echo "${DESCS[$i]}; last lines of its output:"
        echo
        echo '```text'
        tail -n 60 "${LOGS[$i]}" | cut -c 1-300
        echo '```'
    done
    echo
    echo "## Benchmark table"
    echo
    if [ -f "$BENCH/benchmark.md" ]; then
        sed -E 's/^# /### /' "$BENCH/benchmark.md"
    else
        echo "(no benchmark table: see step bench above)"
    fi
} >"$REPORT"

echo
echo "gpu_check: $([ $FAILED = 0 ] && echo "all steps passed" || echo "$FAILED step(s) FAILED") in $(( SECONDS - T0 ))s"
for i in "${!NAMES[@]}"; do
    printf '  %-10s %-4s %4ss  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
done
echo "report: $REPORT"
[ -f "$DEST/$STEM-benchmark.csv" ] && echo "        $DEST/$STEM-benchmark.csv, $DEST/$STEM-benchmark.png, $FULLLOG"
[ "$FAILED" = 0 ]
