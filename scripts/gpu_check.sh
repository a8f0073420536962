#!/usr/bin/env bash
# The GPU check (issue 19): one command that runs every CUDA path and the paper's timings, each stage time-boxed.
#   scripts/gpu_check.sh [--out DIR] [--dry-run] [--python PY] [--only STAGES] [--budget SECONDS]
# --out DIR      report.md (summary + every check line + bench.py's tables), check.log (everything printed), pytest.log
#                and one JSON file of lines and raw numbers per stage: 7 small files (default: gpu_check_out)
# --dry-run      the same stages on the CPU with tiny shapes; what needs CUDA is a SKIP line saying so (tests run it)
# --python PY    the interpreter (default: python3, the GPU machine's, which has torch)
# --only STAGES  comma-separated, of pytest,numerics,train,timings: the re-run after a fix (the environment always
#                runs; the report covers these)
# --budget S     the whole check's wall time, report included (default 480: of a lease's 15 minutes, a start of a
#                minute or two, this and the transfers leave about 4 minutes for a re-run of what failed, `--only ...
#                --budget 180`, on the still warm machine). After the install and the environment, each stage gets the
#                time left (less 30 s kept for the report) in proportion to its weight among the stages still to
#                run (pytest 3, numerics 3, train 4, timings 4), so what one stage leaves unused goes to the next;
#                a stage with under 20 s left is not started (the report then lists it as without results).
# Installs the travelling wheels of .whl/gpu/ (`make gpu-wheels`; $GPU_WHEELS names another folder; without them only
# a dry run starts) into a scratch folder with pip --no-deps --no-index (no network), prints the environment and the
# kernels "auto" picks, then runs pytest -m gpu, the numerics (scripts/gpu_numerics.py), train.py
# (scripts/gpu_train_check.py) and the timings (scripts/gpu_timings.py).
# A stage past its box is killed, and after each stage every process naming the scratch folder (the training runs';
# torchrun's workers run in sessions of their own); what it finished stays in its JSON file, and the report says it was cut short.
# Triton compiles the autotuned kernels' configs in parallel threads (models/triton_autotune.py) and, here, keeps its
# autotuning results on disk (TRITON_CACHE_AUTOTUNING=1), so each train.py process after the first skips the benchmark
# of the kernels whose configs have no pre-hook; mamba_ssm's backward kernels have one, and Triton benchmarks them in
# every process (from the compiled binaries on disk; train.py --deterministic: one config per kernel instead).
set -uo pipefail
OUT=gpu_check_out DRY=() PY=python3 ONLY=pytest,numerics,train,timings BUDGET=480
USAGE="usage: $0 [--out DIR] [--dry-run] [--python PY] [--only pytest,numerics,train,timings] [--budget SECONDS]"
while (($#)); do
    case $1 in
        --out) OUT=${2:?--out needs a folder}; shift 2 ;;
        --dry-run) DRY=(--dry-run); shift ;;
        --python) PY=${2:?--python needs an interpreter}; shift 2 ;;
        --only) ONLY=${2:?--only needs stages}; shift 2 ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
        *) echo "$USAGE" >&2; exit 2 ;;
    esac
done
for s in ${ONLY//,/ }; do
    [[ $s =~ ^(pytest|numerics|train|timings)$ ]] || { echo "--only: unknown stage '$s'; $USAGE" >&2; exit 2; }
done
if ! [[ $BUDGET =~ ^[0-9]+$ ]] || ((BUDGET < 60)); then
    echo "--budget: '$BUDGET' is not a number of seconds >= 60" >&2
    exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=${GPU_WHEELS:-.whl/gpu}
[[ $WHEELS == /* ]] || WHEELS=$REPO/$WHEELS
if ! compgen -G "$WHEELS/*.whl" >/dev/null && ((${#DRY[@]} == 0)); then  # a lease spent without mamba_ssm or MNIST
    echo "error: no wheels in $WHEELS: run \`make gpu-wheels\` here and carry .whl/gpu to the GPU machine" >&2
    exit 2
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/{env,numerics,train,timings}.json{,.part} "$OUT"/{report.md,check.log,pytest.log}
exec > >(tee -a "$OUT/check.log") 2>&1
TEE=$!
cd "$REPO"
WORK=$(mktemp -d) && trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

REPORT_S=30 MIN_STAGE_S=20
# pytest 3: its mamba_ssm test compiles and autotunes every kernel config in fp32 and bf16 from cold caches (about
# 95 s for sm_90, estimated from CPU compile times), which the later stages then read from disk
declare -A WEIGHT=([pytest]=3 [numerics]=3 [train]=4 [timings]=4) RAN=()
wanted() { [[ ,$ONLY, == *,$1,* ]]; }
box_of() {  # BOX = stage $1's share of the time left, by weight among the wanted stages not run yet (at least
    # MIN_STAGE_S; `stage` cuts it to what is left)
    local s rest=0 left=$((BUDGET - REPORT_S - (SECONDS - START)))
    for s in ${ONLY//,/ }; do [[ ${RAN[$s]:-} ]] || rest=$((rest + WEIGHT[$s])); done
    RAN[$1]=1
    BOX=$((left * WEIGHT[$1] / rest))
    ((BOX < MIN_STAGE_S)) && BOX=$MIN_STAGE_S
    return 0
}
stage() {  # stage NAME SECONDS [--log FILE] COMMAND...: run COMMAND under `timeout` (its output to FILE if given),
    # its box cut to the budget left; say how it ended, and kill what it left running
    local name=$1 box=$2 log=/dev/stdout rc left=$((BUDGET - REPORT_S - (SECONDS - START)))
    shift 2
    [[ $1 == --log ]] && { log=$2; shift 2; }
    if ((left < MIN_STAGE_S)); then
        echo "=== $name: not started, ${left} s left of the ${BUDGET} s budget ==="
        return
    fi
    ((box > left)) && box=$left
    echo "=== $name (time box ${box} s, at $((SECONDS - START)) s of ${BUDGET}) ==="
    timeout -s KILL "$box" "$@" >>"$log" 2>&1  # KILL: a train.py that got TERM would first finish its step and save
    rc=$?
    ((rc == 124 || rc == 137)) && echo "=== $name: killed at its ${box} s time box ==="
    echo "=== $name: exit $rc ==="
    # torchrun's workers run in sessions of their own, out of reach of timeout's kill: they would hold the GPU.
    # -S: the standard library only (no site-packages): it starts in milliseconds, and the tests' stand-in interpreter
    # (tests/conftest.warm_python) runs it itself, not through a relay whose command line names $WORK/ too
    "$PY" -S -m scripts.process_tree --kill-mentioning "$WORK/"
}

SITE=$WORK/site
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    stage "install $WHEELS (no network)" 60 "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "$WHEELS"/*.whl
else
    echo "dry run without $WHEELS/*.whl: mamba_ssm / mlxtend only if already importable"
fi
# TRITON_F32_DEFAULT=tf32x3 (the numerics' fp32: three TF32 products per fp32 dot) for every stage: Triton keys its
# compile and autotune caches on it, so set in one stage only it would have every other compile mamba_ssm again
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1 \
    TRITON_F32_DEFAULT=tf32x3
timeout 15 nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
stage environment 40 "$PY" scripts/gpu_env.py --out "$OUT/env.json" --fallback_file "$WORK/fallback" "${DRY[@]}"
# where no Triton kernel launches, "auto" in the later stages would pick mamba_ssm and fail at every call: the
# training and timings then run the portable Mamba2 (env.json says so; the numerics still try mamba_ssm, and fail)
FALLBACK=$(cat "$WORK/fallback" 2>/dev/null)
if [[ $FALLBACK ]]; then
    export MVAR_MAMBA_BACKEND=$FALLBACK
    echo "=== the later stages run with MVAR_MAMBA_BACKEND=$FALLBACK: no Triton kernel launches on this GPU ==="
fi
if wanted pytest; then
    GPU_TESTS=$(grep -l "pytest.mark.gpu" tests/test_*.py)  # the files with GPU tests: no time collecting the rest
    box_of pytest
    stage "pytest -m gpu" "$BOX" --log "$OUT/pytest.log" "$PY" -m pytest -m gpu -rA -v -p no:cacheprovider $GPU_TESTS
    tail -n 15 "$OUT/pytest.log"
fi
wanted numerics && box_of numerics && stage numerics "$BOX" "$PY" scripts/gpu_numerics.py --out "$OUT/numerics.json" \
    "${DRY[@]}"
wanted train && box_of train && stage training "$BOX" "$PY" scripts/gpu_train_check.py --work "$WORK/train" \
    --out "$OUT/train.json" --run_timeout 90 --box $((BOX - 10)) "${DRY[@]}"  # its start-up: 10 s
# expandable segments: the memory of a batch that did not fit is reusable by the next try (no fragmentation)
wanted timings && box_of timings && stage timings "$BOX" env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    "$PY" scripts/gpu_timings.py --out "$OUT/timings.json" "${DRY[@]}"
rm -f "$OUT"/*.part  # a stage killed while writing its file: the file before stays
echo "=== report (after $((SECONDS - START)) s) ==="
timeout $((REPORT_S - 5)) "$PY" scripts/gpu_report.py --out "$OUT" --stages "env,$ONLY" "${DRY[@]}"
rc=$?
exec >&- 2>&-  # the pipe to tee closed: give it 5 s to write check.log's last lines (a process a stage left
for _ in {1..50}; do kill -0 "$TEE" 2>/dev/null || break; sleep 0.1; done  # behind may hold the pipe open)
exit $rc
