"""The CUDA-only kernel paths, executed on CPU by Triton's interpreter (fp32) and checked against the PyTorch paths.

Mamba2 on mamba_ssm's Triton kernels (scan + gated RMSNorm), whole sequence and scale by scale with carried state,
with M-VAR's options and every non-default one we expose; intra-scale attention on flash-attn's Triton varlen
kernel. Outputs, every parameter and input gradient, final states. Planted integration mistakes must fail.
The kernels come from pure-Python builds installed by `make test` into .whl/site (scripts/interpreter_kernels.sh),
or from the environment. The work runs in one subprocess (tests/interpreter_worker.py): the interpreter must be
chosen before triton is imported.
"""
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import KERNEL_SITE as SITE, REPO  # tests/ is on sys.path under pytest
from interpreter_worker import MAMBA_RUNS, PLANTS

WORKER = Path(__file__).with_name("interpreter_worker.py")
TOL = 2e-5  # fp32, exact tl.dot in the interpreter: measured <= 3e-6 (Mamba2 grads), <= 5e-7 (attention)
PLANT_MIN = 1e-3  # a planted mistake must be off by at least this (measured 0.18 .. 1.4)


def _missing(*modules: str) -> str | None:
    absent = [m for m in modules if importlib.util.find_spec(m) is None
              and importlib.machinery.PathFinder.find_spec(m, [str(SITE)]) is None]
    return f"{', '.join(absent)} not installed (`make test` builds them into .whl/site)" if absent else None


MISSING = {"mamba": _missing("triton", "mamba_ssm", "einops"), "attention": _missing("triton", "flash_attn")}


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, float]]:
    """Runs every available part and every plant of it in one interpreter subprocess (~20 s of CPU)."""
    parts = [part for part, why in MISSING.items() if why is None]
    if not parts:
        pytest.skip("; ".join(MISSING.values()))
    plants = [name for name, (part, _, _) in PLANTS.items() if part in parts]
    env = {**os.environ, "TRITON_INTERPRET": "1", "FLASH_ATTENTION_TRITON_AMD_ENABLE": "TRUE", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SITE), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(WORKER), *(f"--{p}" for p in parts), "--plants", *plants],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    if "mamba" in parts:  # both kernels must really have run: a torch fallback would compare torch with torch
        assert "gated norm: triton" in report["mamba_kernels"], report["mamba_kernels"]
    return report["measured"]


def _need(part: str) -> None:
    if MISSING[part]:
        pytest.skip(MISSING[part])


def _assert_close(errors: dict[str, float]) -> None:
    bad = {name: err for name, err in errors.items() if not err <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


@pytest.mark.parametrize("run", [f"{name}/{'scale_by_scale' if stateful else 'full'}"
                                 for name, _, stateful in MAMBA_RUNS])
def test_mamba2_on_mamba_ssm_kernels_matches_torch(measured, run):
    _need("mamba")
    errors = measured[f"mamba2/{run}"]
    assert "grad:A_log" in errors and "grad:input" in errors and ("ssm_state" in errors) == run.endswith("scale")
    _assert_close(errors)


@pytest.mark.parametrize("case", ["l2_norm", "plain_scale"])
def test_intra_scale_attention_on_flash_attn_triton_matches_sdpa(measured, case):
    _need("attention")
    errors = measured[f"attention/{case}"]
    assert "grad:mat_qkv.weight" in errors and "grad:input" in errors
    _assert_close(errors)


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_planted_integration_mistake_is_caught(measured, plant):
    _need(PLANTS[plant][0])
    errors = measured[f"planted/{plant}"]
    assert max(errors.values()) > PLANT_MIN, f"{plant} went unnoticed: {errors}"
