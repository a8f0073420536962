# Two entry points for a fresh machine: `make demo` (end-to-end run on embedded MNIST) and `make test`.
# Each creates the virtualenv, installs requirements.txt at the versions of constraints.txt (+ requirements-nodeps.txt)
# and this project in editable mode (pyproject.toml) with its `app` extra (Gradio, Selenium) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench study app

$(VENV)/.installed: requirements.txt constraints.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements-nodeps.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[app]"
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

# The web page for sampling and editing (http://127.0.0.1:7860), over the demo's model unless CKPT=... is given
app: $(VENV)/.installed
	$(PY) -m scripts.app $(if $(CKPT),--ckpt $(CKPT))

# Pure-Python builds of mamba-ssm/flash-attn for tests/test_triton_interpreter.py (nothing compiled; cached in .whl/)
.whl/site/.installed: requirements-cuda.txt scripts/interpreter_kernels.sh | $(VENV)/.installed
	scripts/interpreter_kernels.sh $(PY) .whl/site
	touch $@

# Pass 1: the whole suite on two pytest-xdist workers with one torch thread each, a test file per worker (its module
# fixtures, which train models, are built once; xdist's loadgroup does not group on pytest 9.2), the longest files
# first (tests/conftest.py LONGEST_FIRST; --no-loadscope-reorder keeps that order). Pass 2: the
# numerics tests again on two threads with the CPU's kernels forced to their lowest level, so a tolerance that holds
# only on one CPU fails on every CPU. On torch 2.14 ATEN_CPU_CAPABILITY
# changes ATen's kernels (matmul, conv, softmax, gelu, sums, exp, layer norm, bicubic), ONEDNN_MAX_CPU_ISA oneDNN's
# convolutions and MKL_CBWR=COMPATIBLE MKL's matmuls; MKL_ENABLE_INSTRUCTIONS changes no result, so it is not set.
# MVAR_CPU_BF16=0 takes bf16 as fp32, as on a CPU without bf16 instructions (models/precision.py), where pass 1 on
# an AVX512-BF16 or AMX CPU ran it in bf16: both paths run on every CPU that has them.
LOW_ISA := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_CBWR=COMPATIBLE MVAR_CPU_BF16=0
NUMERICS_FILES := $(shell grep -l "pytest.mark.numerics" tests/test_*.py)  # pass 2 collects only these files
test: $(VENV)/.installed .whl/site/.installed
	MVAR_TEST_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15
	$(LOW_ISA) MVAR_TEST_THREADS=2 $(PY) -m pytest -q -m "numerics and not slow" $(NUMERICS_FILES)

# The paper's question on Fashion-MNIST (apt-get install dataset-fashion-mnist): VAR and M-VAR learning curves and
# the verdicts at equal images, FLOPs and CPU time (docs/study.md); see README for the time it takes
study: $(VENV)/.installed
	$(PY) scripts/study.py --curves --report_dir docs

bench: $(VENV)/.installed
	$(PY) scripts/bench.py --only attn block

# The wheels scripts/gpu_check.sh installs offline on a GPU machine (.whl/gpu/; carry it there), size-checked
.PHONY: gpu-wheels
gpu-wheels: .whl/site/.installed
	scripts/gpu_wheels.sh $(PY)
