"""--fp16=1 (fp16 autocast + GradScaler, the GPU recipe's precision) end to end on the CPU through train.py:
the loss stays finite and falls with fp32's, the scaler state is checkpointed, and a SIGKILL + resume is
bit-identical."""
import math
import signal

import pytest
import torch

from conftest import interrupt
from test_trainer_e2e import (GNORM_RE, KILL_AFTER_FIRST_SAVE, LOSS_RE, logged_losses, model_state,  # noqa: F401
                             run_train, setup, train_cmd)
from utils.run.checkpoint import LAST

FP16 = ("--fp16=1", "--save_every=2")  # 2 epochs of 6 steps


@pytest.fixture(scope="module")
def fp16_run(setup):  # noqa: F811 (the fixture imported above)
    out = setup / "fp16"
    return out, run_train(setup, out, *FP16).stdout


def test_fp16_training_on_cpu_loss_finite_and_falling(setup, fp16_run):  # noqa: F811
    out, log = fp16_run
    losses = [loss for _, loss in sorted(logged_losses(log).items())]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses), log[-2000:]
    assert sum(losses[-4:]) < 0.95 * sum(losses[:4]), losses  # the last third well below the first
    # and step for step the fp32 run's: losses at most 3e-4 apart over the 12 steps, the (unscaled, pre-clip)
    # gradient norms 1e-3 as logged, which a gradient left scaled by 2048 would not be
    fp32 = run_train(setup, setup / "fp32", "--save_every=2").stdout
    for pattern, bound in ((LOSS_RE, 3e-3), (GNORM_RE, 1e-2)):
        got, want = ([v for _, v in sorted(logged_losses(text, pattern).items())] for text in (log, fp32))
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < bound, (got, want)
    assert log.count(" scale 2048 |") == 12  # the GradScaler's scale is logged at every step
    scaler = torch.load(out / LAST, weights_only=True)["trainer"]["scaler"]
    assert scaler["scale"] == 2048 and scaler["_growth_tracker"] == 12  # saved; no step skipped for inf/nan


def test_fp16_sigkill_then_resume_is_bit_identical(setup, fp16_run):  # noqa: F811
    ref_out, ref_log = fp16_run
    out = setup / "fp16_killed"
    proc, _ = interrupt(train_cmd(setup, out, *FP16), KILL_AFTER_FIRST_SAVE, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    resumed = run_train(setup, out, *FP16).stdout
    assert "resumed from" in resumed
    ref, got = model_state(ref_out / LAST), model_state(out / LAST)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    ref_losses, got_losses = logged_losses(ref_log), logged_losses(resumed)
    assert got_losses and all(ref_losses[k] == v for k, v in got_losses.items())
