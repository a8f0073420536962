#!/usr/bin/env bash
# The GPU check (issue 19): one command that runs every CUDA path and the paper's timings, each stage time-boxed.
#   scripts/gpu_check.sh [--out DIR] [--dry-run] [--python PY]
# --out DIR    report.md (summary + every check line + bench.py's tables), check.log (everything printed), pytest.log
#              and one JSON file of lines and raw numbers per stage: 7 small files (default: gpu_check_out)
# --dry-run    the same stages on the CPU with tiny shapes; what needs CUDA is a SKIP line saying so (tests run it)
# --python PY  the interpreter (default: python3, the GPU machine's, which has torch)
# Installs the travelling wheels of .whl/gpu/ (`make gpu-wheels`) into a scratch folder with pip --no-deps
# --no-index (no network), prints the environment and the kernels "auto" picks, then runs pytest -m gpu, the
# numerics (scripts/gpu_numerics.py), train.py (scripts/gpu_train_check.py) and the timings (scripts/gpu_timings.py).
# The stage budgets add up to under 10 minutes; a stage past its box is killed and reported as missing.
set -uo pipefail
OUT=gpu_check_out DRY=() PY=python3
while (($#)); do
    case $1 in
        --out) OUT=${2:?--out needs a folder}; shift 2 ;;
        --dry-run) DRY=(--dry-run); shift ;;
        --python) PY=${2:?--python needs an interpreter}; shift 2 ;;
        *) echo "usage: $0 [--out DIR] [--dry-run] [--python PY]" >&2; exit 2 ;;
    esac
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/{env,numerics,train,timings}.json "$OUT"/{report.md,check.log,pytest.log}
exec > >(tee -a "$OUT/check.log") 2>&1
cd "$REPO"
WORK=$(mktemp -d) && trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under `timeout`, say how it ended
    local name=$1 box=$2 rc
    shift 2
    echo "=== $name (time box ${box} s, at $((SECONDS - START)) s) ==="
    timeout -k 10 "$box" "$@"
    rc=$?
    ((rc == 124 || rc == 137)) && echo "=== $name: killed at its ${box} s time box ==="
    echo "=== $name: exit $rc ==="
}

SITE=$WORK/site
if compgen -G ".whl/gpu/*.whl" >/dev/null; then
    stage "install .whl/gpu (no network)" 60 "$PY" -m pip install -q --no-deps --no-index --target "$SITE" .whl/gpu/*.whl
else
    echo "no .whl/gpu/*.whl (make gpu-wheels): mamba_ssm / flash_attn / mlxtend only if already importable"
fi
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
stage environment 40 "$PY" scripts/gpu_env.py --out "$OUT/env.json" "${DRY[@]}"
GPU_TESTS=$(grep -l "pytest.mark.gpu" tests/test_*.py)  # the files with GPU tests: no time on collecting the rest
stage "pytest -m gpu" 90 "$PY" -m pytest -m gpu -rA -q -p no:cacheprovider $GPU_TESTS >"$OUT/pytest.log" 2>&1
tail -n 15 "$OUT/pytest.log"
stage numerics 120 "$PY" scripts/gpu_numerics.py --out "$OUT/numerics.json" "${DRY[@]}"
stage training 150 "$PY" scripts/gpu_train_check.py --work "$WORK/train" --out "$OUT/train.json" --run_timeout 70 \
    "${DRY[@]}"
stage timings 150 "$PY" scripts/gpu_timings.py --out "$OUT/timings.json" "${DRY[@]}"
echo "=== report (after $((SECONDS - START)) s) ==="
timeout 30 "$PY" scripts/gpu_report.py --out "$OUT" "${DRY[@]}"
