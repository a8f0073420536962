"""A diverging run (issue 23, bug 1): no checkpoint is written from non-finite or diverged weights, the last good
one survives, a loss far above its running level stops the run, and the printed advice (resume with a lower
--tblr) works."""
import math
import shutil

import pytest
import torch

from test_trainer_e2e import model_state, run_train, setup  # noqa: F401  (setup: the tiny data + tokenizer fixture)
from utils.run.checkpoint import LAST, PREV
from utils.run.divergence import DivergenceGuard


# ---- the guard ---------------------------------------------------------------------------------------------------
def test_guard_flags_non_finite_and_far_above_level_losses_only():
    guard = DivergenceGuard(tol=10.0)
    assert guard.update(4.2) is None and guard.level == 4.2
    for loss in (4.0, 3.5, 5.0, 3.0):  # an ordinary noisy, falling loss
        assert guard.update(loss) is None
    assert guard.healthy
    level = guard.level
    assert "non-finite" in guard.update(float("nan"))
    assert "non-finite" in guard.update(3.0, grad_finite=False)
    assert "running level" in guard.update(580_000.0)
    assert guard.bad_in_a_row == 3 and not guard.healthy and guard.level == level  # bad losses leave the level
    assert guard.update(3.1) is None and guard.healthy and guard.bad_in_a_row == 0


def test_guard_tolerance_has_a_one_nat_floor_and_zero_turns_it_off():
    guard = DivergenceGuard(tol=10.0)
    guard.update(0.01)  # a memorised batch: 10x its level alone would flag ordinary noise
    assert guard.update(0.5) is None and guard.update(9.9) is None and guard.update(10.5) is not None
    off = DivergenceGuard(tol=0.0)
    off.update(1.0)
    assert off.update(1e9) is None and off.update(float("inf")) is not None  # non-finite still counts


def test_guard_state_round_trip():
    guard = DivergenceGuard(tol=10.0)
    guard.update(2.0)
    other = DivergenceGuard(tol=10.0)
    other.load_state_dict(guard.state_dict())
    assert other.level == 2.0 and other.bad_in_a_row == 0
    other.load_state_dict({})  # checkpoints written before the guard: a fresh start
    assert other.level is None


# ---- train.py ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_run(setup):  # noqa: F811
    """One healthy epoch: ar-ckpt-last.pth after it (epoch 1, iteration 0)."""
    out = setup / "good"
    run_train(setup, out, "--ep=1")
    return out


def max_abs_weight(state: dict) -> float:
    return max(v.double().abs().max().item() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("tblr, symptom", [("1e30", "non-finite"), ("1e3", "running level")])
def test_diverging_run_keeps_the_last_good_checkpoint(setup, good_run, tblr, symptom):  # noqa: F811
    """--tblr=1e30 ends in NaN losses (from finite but huge weights), --tblr=1e3 in a finite loss ~1e5 times its
    level: both stop with an error naming the intact checkpoint; no checkpoint file holds diverged weights (the
    one saved from the first diverged update is moved aside), and the good one is what a relaunch resumes from."""
    out = setup / f"diverged_{tblr}"
    shutil.copytree(good_run, out)
    good = model_state(good_run / LAST)
    proc = run_train(setup, out, "--ep=3", f"--tblr={tblr}", "--save_every=1", "--max_nonfinite=3", check=False)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "3 steps in a row" in proc.stderr and symptom in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # an error line
    assert f"A relaunch resumes from {out / PREV} (after ep 1)" in proc.stderr, proc.stderr[-3000:]
    # fp32 weights that 1 epoch at lr 1.6e-3 left within ~1 (the first diverged update moves them by >= lr = 15)
    for path in out.glob("ar-ckpt-*.pth"):
        state = model_state(path)
        if path.name != "ar-ckpt-diverged.pth":
            assert max_abs_weight(state) < 10 * max_abs_weight(good), path.name
    resume = model_state(out / PREV)
    assert all(torch.equal(good[k], resume[k]) for k in good) and not (out / LAST).exists()


def test_relaunch_with_a_lower_lr_as_advised_resumes_and_finishes(setup, good_run):  # noqa: F811
    out = setup / "diverged_then_lower_lr"
    shutil.copytree(good_run, out)
    failed = run_train(setup, out, "--ep=3", "--tblr=1e30", "--save_every=1", "--max_nonfinite=3", check=False)
    assert failed.returncode != 0 and "lower --tblr" in failed.stderr
    proc = run_train(setup, out, "--ep=2", "--tblr=1e-1")
    assert f"resumed from {out / PREV} after ep 1\n" in proc.stdout
    assert math.isfinite(max_abs_weight(model_state(out / LAST)))
