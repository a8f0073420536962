#!/usr/bin/env bash
# Pure-Python builds of the CUDA kernel packages, for tests/test_triton_interpreter.py (Triton's interpreter, CPU).
#   scripts/interpreter_kernels.sh PYTHON [SITE_DIR=.whl/site]      (`make test` runs it)
# mamba-ssm and flash-attn are built from source with their CUDA/C++ extensions switched off (nothing is compiled;
# flash-attn keeps its Triton implementation), at the versions of requirements-cuda.txt; the wheels are cached in
# .whl/. They go into SITE_DIR, not into PYTHON's environment: they carry the same version numbers as the CUDA
# builds, so installed there they would turn a later `pip install -r requirements-cuda.txt` into a silent no-op.
set -euo pipefail
PY=${1:?usage: $0 PYTHON [SITE_DIR]}
SITE=${2:-.whl/site}
cd "$(dirname "$0")/.."
# Build tools for the two setup.py files (they import torch, so no build isolation); installed into PYTHON's env.
BUILD_TOOLS=(setuptools==84.2.1 wheel==0.48.0 packaging==26.4 psutil==7.2.2)
RUNTIME=(einops==0.8.2)  # mamba_ssm's one import beyond torch/triton

pinned() { grep -Eo "^$1==[^ ]+" requirements-cuda.txt; }

build() {  # build REQUIREMENT ENV...: the py3-none-any wheel into .whl/ unless it is there already
    local req=$1 name=${1%%==*} version=${1#*==}
    shift
    local wheel_file=".whl/${name//-/_}-${version}-py3-none-any.whl"
    [[ -f $wheel_file ]] && return
    if ! env "$@" "$PY" -m pip wheel -q --no-build-isolation --no-deps -w .whl "$req" || [[ ! -f $wheel_file ]]; then
        echo "error: could not build $wheel_file (pure Python, $*): see pip's output above." >&2
        echo "  It needs PyPI (the sdist) once; or copy the wheel into .whl/ from a machine that built it." >&2
        echo "  Without it tests/test_triton_interpreter.py skips; run the other tests with: $PY -m pytest -q" >&2
        exit 1
    fi
}

"$PY" -m pip install -q "${BUILD_TOOLS[@]}"
mkdir -p .whl
build "$(pinned mamba-ssm)" MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE
build "$(pinned flash-attn)" FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
    FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE
rm -rf "$SITE"
"$PY" -m pip install -q --no-deps --target "$SITE" "${RUNTIME[@]}" \
    ".whl/mamba_ssm-$(pinned mamba-ssm | cut -d= -f3)-py3-none-any.whl" \
    ".whl/flash_attn-$(pinned flash-attn | cut -d= -f3)-py3-none-any.whl"
echo "interpreter kernels installed in $SITE"
