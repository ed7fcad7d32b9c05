#!/usr/bin/env bash
# One command for everything segcalib claims about GPUs: every CUDA test and every GPU benchmark
# target, in at most 8 minutes, with one JSON and one Markdown summary as the result.
#
#   bash benchmarks/gpu_check.sh OUTDIR [WHEELS_DIR]
#
# OUTDIR receives gpu_check.json, gpu_check.md and gpu_check.log (three files). WHEELS_DIR (from
# benchmarks/fetch_gpu_wheels.sh) holds wheels for what the GPU machine's Python may lack (MONAI,
# nibabel, pydantic, ...); those it lacks, or has older, are installed into a scratch folder that
# goes on PYTHONPATH. Without CUDA every stage says it skipped and why, and the summary is still
# written (a dry run). Each stage runs under `timeout` with its own limit, cut to what is left of
# the whole budget, so one hang cannot eat the rest.
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), GPU_CHECK_BUDGET_S
# (default 480), GPU_CHECK_REHEARSE=1 (no CUDA: run the stages on the CPU at tiny sizes instead),
# GPU_CHECK_KEEP=1 (keep the scratch folder: stage JSONs, logs, JUnit XML, installed wheels).
set -uo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR [WHEELS_DIR]" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd)
if [ -n "${2:-}" ] && [ ! -d "$2" ]; then echo "gpu_check.sh: WHEELS_DIR $2 is not a folder" >&2; exit 2; fi
WHEELS=${2:+$(cd "$2" && pwd)}
cd "$ROOT" || exit 2
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
BUDGET=${GPU_CHECK_BUDGET_S:-480}
RESERVE=15                       # seconds kept for the summary
REHEARSE=${GPU_CHECK_REHEARSE:+--rehearse}
T0=$(date +%s%N)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/segcalib-gpucheck.XXXXXX")
mkdir -p "$WORK/stages" "$WORK/logs"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

elapsed() { echo $(( ($(date +%s%N) - T0) / 1000000000 )); }
say() { echo "[gpu_check $(printf '%4d' "$(elapsed)") s] $*"; }

# run_stage NAME CAP_S MIN_S: run `python -m benchmarks.gpu_stages NAME` under a limit of
# min(CAP_S, budget left); record the shell's view (exit code, seconds, timeout) in NAME.meta.json.
run_stage() {
    local name=$1 cap=$2 min=$3 left limit rc start secs timed_out=false
    left=$(( BUDGET - $(elapsed) - RESERVE ))
    limit=$(( cap < left ? cap : left ))
    if (( limit < min )); then
        say "$name: NOT RUN: ${left} s left of the ${BUDGET} s budget, it needs ${min} s"
        printf '{"no_time": true, "reason": "not run: %s s left of the %s s budget, needs %s s", "seconds": 0, "timeout_s": 0}\n' \
            "$left" "$BUDGET" "$min" > "$WORK/stages/$name.meta.json"
        return
    fi
    say "$name: start (limit ${limit} s)"
    start=$(date +%s%N)
    timeout -k 10 "$limit" "$PY" -m benchmarks.gpu_stages "$name" --out "$WORK/stages" --budget "$limit" $REHEARSE \
        --wheels-installed "$INSTALLED" > "$WORK/logs/$name.log" 2>&1
    rc=$?
    secs=$(( ($(date +%s%N) - start) / 1000000 ))
    if (( rc == 124 || rc == 137 )); then timed_out=true; fi
    printf '{"rc": %d, "seconds": %d.%03d, "timeout_s": %d, "timed_out": %s}\n' \
        "$rc" $((secs / 1000)) $((secs % 1000)) "$limit" "$timed_out" > "$WORK/stages/$name.meta.json"
    say "$name: done in $((secs / 1000)).$(( secs % 1000 / 100 )) s, exit $rc$([ "$timed_out" = true ] && echo ' (TIMED OUT)')"
    tail -n 4 "$WORK/logs/$name.log" | sed 's/^/    /'
}

say "repo $ROOT, python $PY, budget ${BUDGET} s, scratch $WORK"
INSTALLED=""
if [ -n "$WHEELS" ]; then
    say "wheels: $WHEELS"
    mapfile -t TO_INSTALL < <("$PY" -m benchmarks.gpu_wheels "$WHEELS")
    if (( ${#TO_INSTALL[@]} )); then
        if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$WORK/site" "${TO_INSTALL[@]}" > "$WORK/logs/wheels.log" 2>&1; then
            export PYTHONPATH="$WORK/site:$PYTHONPATH"
            INSTALLED=$(printf '%s\n' "${TO_INSTALL[@]}" | xargs -n1 basename | paste -sd, -)
            say "installed ${#TO_INSTALL[@]} wheels into $WORK/site"
        else
            say "WARNING: pip could not install the wheels (see gpu_check.log); going on without them"
            cat "$WORK/logs/wheels.log"
        fi
    fi
fi

#         stage      cap  min   (most important first; export adapts its size to the time left)
run_stage env         60   10
run_stage cuda_tests 150   30
run_stage metrics     75   20
run_stage losses      90   20
run_stage evaluate    75   20
run_stage training    90   20
run_stage export     240   40

TOTAL=$(elapsed)
say "summary (total ${TOTAL} s)"
timeout 60 "$PY" -m benchmarks.gpu_summary "$WORK" "$OUTDIR" "$BUDGET" "$TOTAL"
rc=$?
[ -f "$WORK/logs/wheels.log" ] && { echo "===== wheels ====="; cat "$WORK/logs/wheels.log"; } >> "$OUTDIR/gpu_check.log"
if [ -n "${GPU_CHECK_KEEP:-}" ]; then say "scratch kept in $WORK"; else rm -rf "$WORK"; fi
say "wrote $OUTDIR/gpu_check.json, gpu_check.md, gpu_check.log"
exit $rc
