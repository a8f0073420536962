# Two entry points for a fresh machine: `make demo` (end-to-end run on embedded MNIST) and `make test`.
# Each creates the virtualenv, installs requirements.txt (+ requirements-nodeps.txt) and this project in editable
# mode (pyproject.toml) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench study

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements-nodeps.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

# Pure-Python builds of mamba-ssm/flash-attn for tests/test_triton_interpreter.py (nothing compiled; cached in .whl/)
.whl/site/.installed: requirements-cuda.txt scripts/interpreter_kernels.sh | $(VENV)/.installed
	scripts/interpreter_kernels.sh $(PY) .whl/site
	touch $@

test: $(VENV)/.installed .whl/site/.installed
	$(PY) -m pytest -q

# The paper's ablations on Fashion-MNIST (apt-get install dataset-fashion-mnist): ~1.5 h on 2 CPU cores
study: $(VENV)/.installed
	$(PY) scripts/study.py --report_dir docs

bench: $(VENV)/.installed
	$(PY) scripts/bench.py --only attn block

# The wheels scripts/gpu_check.sh installs offline on a GPU machine (.whl/gpu/; carry it there), size-checked
.PHONY: gpu-wheels
gpu-wheels: .whl/site/.installed
	scripts/gpu_wheels.sh $(PY)
