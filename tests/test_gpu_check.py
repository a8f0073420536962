"""scripts/gpu_check.sh --dry-run (issue 19): the GPU check's every stage runs on the CPU with tiny shapes, so a
renamed flag or a moved function fails here, not on the rare GPU machine. The report's structure is checked, not
its numbers: the dry run compares the CPU with itself (fp32 must agree exactly; bf16 may run as fp32 on a CPU
without bf16 instructions, models.precision)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SUBPROCESS_ENV
from models import mamba2_cpu
from scripts import gpu_report
from scripts.gpu_results import CheckLine, read_lines, write_lines
from scripts.markdown import read_tables

STAGE_FILES = ("env.json", "numerics.json", "train.json", "timings.json")


def run_dry(out, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """`gpu_check.sh --dry-run --out OUT ARGS` with this interpreter, the kernels left to "auto"."""
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k not in ("MVAR_ATTN_BACKEND", "MVAR_MAMBA_BACKEND")}
    return subprocess.run([str(REPO / "scripts/gpu_check.sh"), "--dry-run", "--out", str(out), "--python",
                           sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    return out, run_dry(out, timeout=400)


def test_dry_run_passes_and_writes_few_small_files(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert set(STAGE_FILES) | {"report.md", "check.log", "pytest.log"} == set(files)
    assert len(files) <= 8 and all(os.path.getsize(out / f) < 1 << 20 for f in files)  # what comes back from a GPU


def test_report_has_every_stage_and_no_failure(dry_run):
    out, _ = dry_run
    text = (out / "report.md").read_text()
    assert "all checks passed" in text and "0 FAIL" in text
    for title in ("environment", "pytest -m gpu", "numerics", "training through train.py", "timings",
                  "bench.py paper section", "bench.py train section"):
        assert f"## {title}" in text
    statuses = {row["status"] for table in read_tables(text) for row in table if "status" in row}
    assert statuses <= {"PASS", "SKIP", "INFO"}


def test_stage_lines(dry_run):
    out, _ = dry_run
    lines = {name: read_lines(out / name)[0] for name in STAGE_FILES}
    numerics = {line.check: line for line in lines["numerics.json"]}
    # the CPU against itself in fp32 with the same kernels: the same operations in the same order, so exactly
    # equal on any instruction set (a nonzero error here is a broken comparison, not rounding)
    fp32 = numerics["cpu sdpa+torch fp32 logits, max |error| / max |logit|"]
    assert fp32.status == "PASS" and float(fp32.value) == 0.0
    assert numerics["cpu sdpa+torch fp32 greedy sampled tokens equal"].value == "1.0000"
    cuda_only = [line for line in lines["numerics.json"] if "flash_attn" in line.check or "mamba_ssm" in line.check]
    assert cuda_only and all(line.status == "SKIP" and line.note for line in cuda_only)  # saying why
    if mamba2_cpu.available() is None:  # the CPU's own kernels run (on a GPU they SKIP: "needs CPU inputs")
        assert numerics["cpu sdpa+cpu_fused fp32 logits, max |error| / max |logit|"].status == "PASS"
    train = {line.check: line.status for line in lines["train.json"]}
    assert train["resumed weights bit-identical to the uninterrupted run"] == "PASS"
    assert train["SIGTERM: exit 143 and a checkpoint"] == "PASS"
    timings = [line.check for line in lines["timings.json"]]
    assert any("M-VAR-d24 / VAR-d30" in c for c in timings) and any("training step" in c for c in timings)
    env = json.loads((out / "env.json").read_text())
    assert env["kernels"] and "torch_features" in env


def test_a_rerun_of_some_stages_reports_those(tmp_path):
    """`--only timings`: the re-run after a fix, in the minutes a GPU lease has left."""
    proc = run_dry(tmp_path, "--only", "timings", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert {p.name for p in tmp_path.iterdir()} == {"env.json", "timings.json", "report.md", "check.log"}
    text = (tmp_path / "report.md").read_text()
    assert "all checks passed" in text and "## timings" in text and "## numerics" not in text


def test_a_stage_cut_short_keeps_its_lines_and_fails_the_report(tmp_path):
    write_lines(tmp_path / "env.json", [CheckLine("CUDA device", "PASS", "H200")])
    write_lines(tmp_path / "numerics.json", [CheckLine("cuda sdpa+torch fp32 logits", "PASS", "1e-7", "<= 1e-4")],
                complete=False)
    text, ok = gpu_report.report(tmp_path, dry_run=False, stages=["env", "numerics"])
    assert not ok and "cuda sdpa+torch fp32 logits" in text and "not finished" in text
    assert "stages without results or cut short: numerics (unfinished)" in text and "## timings" not in text
    text, ok = gpu_report.report(tmp_path, dry_run=False, stages=["env", "numerics", "timings"])
    assert "numerics (unfinished), timings" in text


@pytest.mark.parametrize("args, message", [(["--dryrun"], "usage"), (["--only", "numerics,tests"], "unknown stage"),
                                           (["--budget", "30"], "--budget")])
def test_bad_arguments_are_errors_before_any_work(tmp_path, args, message):
    proc = subprocess.run([str(REPO / "scripts/gpu_check.sh"), *args, "--out", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "out").exists()


def test_pytest_killed_before_its_summary_still_reports_its_verbose_lines():
    summary = "PASSED tests/test_a.py::test_x\nSKIPPED [1] tests/test_a.py:9: needs CUDA\n"
    assert [(ln.check, ln.status) for ln in gpu_report.pytest_lines(summary)] == [
        ("tests/test_a.py::test_x", "PASS"), ("[1] tests/test_a.py:9", "SKIP")]
    verbose = "tests/test_a.py::test_x PASSED    [ 33%]\ntests/test_a.py::test_y[bf16] FAILED   [ 66%]\n"
    assert [(ln.check, ln.status) for ln in gpu_report.pytest_lines(verbose)] == [
        ("tests/test_a.py::test_x", "PASS"), ("tests/test_a.py::test_y[bf16]", "FAIL")]
