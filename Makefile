# Two entry points for a fresh machine: `make demo` (end-to-end run on embedded MNIST) and `make test`.
# Each creates the virtualenv, installs requirements.txt (+ requirements-nodeps.txt) and this project in editable
# mode (pyproject.toml) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements-nodeps.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) scripts/bench.py --only attn block
