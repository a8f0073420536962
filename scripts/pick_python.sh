# Sourced by the launchers (torchrun.sh, train_smoke_cpu.sh) with REPO set: PYTHON, unless given, is the active
# virtualenv's or conda environment's python, which holds the CUDA kernels of requirements-cuda.txt where they were
# installed (conda's base, which many clusters activate in every shell, does not count), else the checkout's .venv
# that `make` creates, else python.
if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ] || { [ -n "${CONDA_PREFIX:-}" ] && [ "${CONDA_DEFAULT_ENV:-}" != base ]; } \
      || [ ! -x "$REPO/.venv/bin/python" ]; then
    PYTHON=python
  else
    PYTHON=$REPO/.venv/bin/python
  fi
fi
export PYTHON
