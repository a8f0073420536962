"""SIGTERM / SIGINT during training (issue 10): every rank finishes its step, a checkpoint is written collectively,
the process exits with a clear line, and the same command resumes to the very weights of an uninterrupted run. A
second signal exits at once."""
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from test_tokenizer_training import TINY as TOKENIZER_TINY
from conftest import SUBPROCESS_ENV as ENV
from conftest import interrupt, launch, launch_cmd
from test_trainer_e2e import (NO_MODEL_RNG, REPO, model_state, reference_run, run_train,  # noqa: F401
                              setup, train_cmd, two_rank_run)
from utils.evaluation.during_training import CHUNK
from utils.run.checkpoint import BEST, LAST

STOP_RE = re.compile(r"stopped by (SIG\w+) after ep (\d+) it (\d+): checkpoint .* saved")


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_exits_and_resumes_bit_identically(setup, reference_run, sig):  # noqa: F811
    ref_out, _ = reference_run
    out = setup / f"preempted_{sig.name}"
    flags = ("--save_every=2", "--hflip=1", "--drop_path_rate=0.1")  # the reference run's
    proc, log = interrupt(train_cmd(setup, out, *flags), "ep 1/2 it 3/", sig)
    assert proc.returncode == 128 + sig, log[-3000:]
    stop = STOP_RE.search(log)
    assert stop and stop.group(1) == sig.name, log[-3000:]
    ckpt = torch.load(out / LAST, weights_only=True)
    assert (ckpt["epoch"] + 1, ckpt["iter"]) == (int(stop.group(2)), int(stop.group(3))) and 3 <= ckpt["iter"] < 6
    assert not (out / ".run.lock").exists()  # released on the way out
    resumed = run_train(setup, out, *flags)
    assert f"after ep 1 it {ckpt['iter']}\n" in resumed.stdout
    assert_same_weights(model_state(ref_out / LAST), model_state(out / LAST))


def test_sigterm_to_every_process_with_loader_workers_still_saves(setup, reference_run):  # noqa: F811
    """SLURM signals every process of the job, torchrun each worker's process group: the DataLoader workers get
    the SIGTERM too. They ignore it, so the run saves (before, a worker's death made the step raise, and the run
    ended without a checkpoint); the resume, with workers, ends on the uninterrupted run's weights."""
    ref_out, _ = reference_run
    out = setup / "preempted_with_workers"
    flags = ("--save_every=2", "--hflip=1", "--drop_path_rate=0.1", "--workers=2")
    proc, log = interrupt(train_cmd(setup, out, *flags), "ep 1/2 it 3/", signal.SIGTERM, group=True)
    assert proc.returncode == 128 + signal.SIGTERM and STOP_RE.search(log), log[-3000:]
    assert log.count("SIGTERM received") == 1, log[-3000:]  # the workers neither log nor die
    assert 3 <= torch.load(out / LAST, weights_only=True)["iter"] < 6
    run_train(setup, out, *flags)
    assert_same_weights(model_state(ref_out / LAST), model_state(out / LAST))


def test_torchrun_two_ranks_stop_together_and_resume_bit_identically(setup, two_rank_run):  # noqa: F811
    """SIGTERM to the torchrun agent (what Kubernetes or SLURM sends first): it forwards the signal to both
    workers; both finish the same step and save; the relaunch ends on the uninterrupted 2-rank run's weights."""
    ref_out, _ = two_rank_run("ddp")
    out = setup / "preempted_ddp"
    proc, log = interrupt(train_cmd(setup, out, *NO_MODEL_RNG, nproc=2), "ep 1/2 it 2/", signal.SIGTERM)
    assert proc.returncode != 0
    stop = STOP_RE.search(log)
    assert stop and stop.group(1) == "SIGTERM", log[-3000:]
    ckpt = torch.load(out / LAST, weights_only=True)
    assert (ckpt["epoch"] + 1, ckpt["iter"]) == (int(stop.group(2)), int(stop.group(3))) and len(ckpt["rng"]) == 2
    assert 0 < ckpt["iter"] < 6
    resumed = run_train(setup, out, *NO_MODEL_RNG, nproc=2)
    assert f"after ep 1 it {ckpt['iter']}\n" in resumed.stdout
    assert_same_weights(model_state(ref_out / LAST), model_state(out / LAST))


def test_tokenizer_trainer_stops_on_sigterm_and_resumes_exactly(tmp_path):
    script = REPO / "scripts/train_tokenizer.py"
    flags = [*TOKENIZER_TINY, "--steps=10", "--log_every=1", "--save_every=100", "--reinit_every=2"]
    launch(script, *flags, f"--out_dir={tmp_path / 'once'}", nproc=1)
    proc, log = interrupt(launch_cmd(script, *flags, f"--out_dir={tmp_path / 'twice'}"), "step 3/10", signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    stopped = re.search(r"stopped by SIGTERM at step (\d+)", log)
    assert stopped and 3 <= int(stopped.group(1)) < 10, log[-3000:]
    again = launch(script, *flags, f"--out_dir={tmp_path / 'twice'}", nproc=1)
    assert f"at step {stopped.group(1)}" in again.stdout + again.stderr
    a, b = (torch.load(tmp_path / d / "tokenizer-last.pth", weights_only=True)["vae"] for d in ("once", "twice"))
    assert_same_weights(a, b)


HANDLER = textwrap.dedent("""
    import os, signal, sys, time
    from utils.run import preemption
    preemption.REPEAT_S = float(sys.argv[1])
    p = preemption.Preemption()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # the same event twice (torchrun forwarding): still one request
    print("requested", p.requested(), flush=True)
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGINT)  # a second signal later: at once
    time.sleep(5)
    print("still alive", flush=True)
""")


def test_second_signal_exits_at_once():
    proc = subprocess.run([sys.executable, "-c", HANDLER, "0.1"], env=ENV, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGINT and "requested True" in proc.stdout and "still alive" not in proc.stdout
    assert "SIGTERM received" in proc.stderr and "second SIGINT: exiting now" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", HANDLER, "60"], env=ENV, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "still alive" in proc.stdout  # within REPEAT_S: one event


def end_of_epoch(signal_after: int, ep: int = 0, blocked: bool = False, stop_validation: bool = False,
                 stop_evaluation: bool = False) -> list:
    """What train.end_epoch does with stand-ins (3 epochs; validation, samples and --eval_every due; best val 1.0,
    this epoch's 0.5) when the collective signal check says yes from its `signal_after`-th call on (the 1st is before
    validation); `blocked`: a signal's save returns (the last step was bad) instead of exiting; `stop_validation`,
    `stop_evaluation`: validation or the evaluation ends early (their own checks, between batches or chunks)."""
    import types

    import train
    from utils.run.preemption import Stopped

    calls, checks = [], []

    def requested():
        checks.append(1)
        return len(checks) > signal_after

    def save(epoch, it, best_val, best=False, epoch_end_pending=False):
        calls.append(("save", epoch, it, best_val, epoch_end_pending))
        if epoch_end_pending and not blocked:
            raise SystemExit(143)  # Checkpointer.save exits after a signal's checkpoint

    def evaluate(*args, stop):
        if stop_evaluation:
            raise Stopped("stopped before chunk 2 of 3")
        calls.append("evaluated")
        return {"epoch": 1, "images": 5, "train_s": 1.0, "fd": 2.0}

    saver = types.SimpleNamespace(preemption=types.SimpleNamespace(requested=requested), save=save,
                                  evaluator=types.SimpleNamespace(evaluate=evaluate, scores=lambda p: {"fd": p["fd"]}))
    val = dict(vL_mean=0.6, vL_tail=0.5, vacc_mean=0.0, vacc_tail=0.0, n=4)
    def validate(loader, stop, dtype):
        assert dtype == torch.float16  # train.inference_dtype's, as the test patches it (validation's precision)
        if stop_validation:
            raise Stopped("validation stopped before batch 2 of 3")
        calls.append("validated")
        return val

    trainer = types.SimpleNamespace(window_micro_steps=0, train_seconds=1.0, evaluate=validate)
    tb = types.SimpleNamespace(flush=lambda: None, scalars=lambda *a, **k: None,
                               image=lambda *a, **k: calls.append("samples"))
    args = types.SimpleNamespace(ep=3, val_every=1, sample_every=1, eval_every=1, eval_n=6, fsdp=True, seed=0,
                                 glb_batch_size=1)
    try:
        train.end_epoch(ep, 5, args, trainer, None, tb, saver, types.SimpleNamespace(num_classes=3), 1.0)
    except SystemExit as e:
        calls.append(e.code)
    return calls


def test_a_signal_at_an_epoch_end_saves_first_and_leaves_that_end_to_the_resumed_run(monkeypatch):
    """A review: a signal during an epoch's last iterations was saved only after validation, the sample grid and
    --eval_every, which can outlast a preemption's grace period (torchrun's: 30 s before SIGKILL). A signal before
    any of them, between them, or during validation or the evaluation (their checks between batches or chunks) now
    saves at once, with the best val loss from before this epoch's end and marked pending, so that the resumed run
    does that end first; in the last epoch too. A signal's save that waits for a good step (the last was bad) skips
    the rest of the end."""
    import train

    monkeypatch.setattr(train, "sample_grid", lambda *a, **k: None)
    monkeypatch.setattr(train, "inference_dtype", lambda *a, **k: torch.float16)
    pending = ("save", 1, 0, 1.0, True)
    assert end_of_epoch(0) == [pending, 143]
    assert end_of_epoch(0, ep=2) == [("save", 3, 0, 1.0, True), 143]  # the last epoch too
    assert end_of_epoch(1) == ["validated", pending, 143]
    assert end_of_epoch(1, stop_validation=True) == [pending, 143]  # the best val loss from before this end
    assert end_of_epoch(2) == ["validated", "samples", pending, 143]
    assert end_of_epoch(3, stop_evaluation=True) == ["validated", "samples", pending, 143]
    assert end_of_epoch(3) == ["validated", "samples", "evaluated", ("save", 1, 0, 0.5, False)]  # no signal
    assert end_of_epoch(1, blocked=True) == ["validated", pending, ("save", 1, 0, 0.5, False)]


def test_an_evaluation_asks_before_each_chunk_whether_to_stop():
    """sharded_features calls `stop` (a collective) before each chunk, as often on every rank; True ends it."""
    from utils.evaluation.during_training import sharded_features
    from utils.run.preemption import Stopped

    asked, made = [], []

    def images(start, stop):
        made.append(start)
        return np.zeros((stop - start, 2, 2, 3), np.uint8)

    def features(imgs):
        return np.zeros((len(imgs), 2)), None

    def stop():
        asked.append(len(made))
        return len(asked) == 3

    with pytest.raises(Stopped, match="before chunk 3 of 4"):
        sharded_features(4 * CHUNK, images, features, stop)
    assert asked == [0, 1, 2] and made == [0, CHUNK]
    assert sharded_features(2 * CHUNK, images, features, lambda: False)[0].shape == (2 * CHUNK, 2)


@pytest.fixture(scope="module")
def evaluated_run(setup):  # noqa: F811
    """An uninterrupted run with --eval_every=1 (a random SmallCNN's features; 5 chunks of generated images) and
    model randomness on."""
    flags = ("--hflip=1", "--drop_path_rate=0.1", "--eval_every=1", f"--eval_n={5 * CHUNK}",
             f"--eval_net={setup / 'clf.pt'}")
    run_train(setup, setup / "evaluated", *flags)
    return setup / "evaluated", flags


@pytest.mark.parametrize("epoch", [1, 2])
def test_a_signal_during_an_evaluation_and_the_resume_give_the_uninterrupted_run(setup, evaluated_run, epoch):  # noqa: F811
    """SIGTERM as the evaluation of epoch 1, or of the last epoch (2), starts: it stops before its next chunk, the
    checkpoint is saved at (epoch, 0), marked pending, and the run exits 143; the same command does that epoch's
    end first, then goes on. Weights, best val loss, -best and the evaluation curve are the uninterrupted run's.
    Before, the checkpoint waited for the whole evaluation (minutes at --eval_n=1000 on a CPU, past a preemption's
    grace period), and after a signal before an epoch's end that epoch's evaluation point was never made."""
    ref, flags = evaluated_run
    out = setup / f"cut_in_epoch_{epoch}"
    proc, log = interrupt(train_cmd(setup, out, *flags), f"ep {epoch} eval: generating", signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    cut = torch.load(out / LAST, weights_only=True)
    assert (cut["epoch"], cut["iter"], cut["epoch_end_pending"]) == (epoch, 0, True)
    assert len(cut["eval_history"]) == epoch - 1  # that epoch's point is the resumed run's
    resumed = run_train(setup, out, *flags)
    assert f"ep {epoch}: its end (validation, samples, --eval_every) was left by a signal: done first" in \
        resumed.stdout + resumed.stderr
    whole, again = (torch.load(d / LAST, weights_only=True) for d in (ref, out))
    assert_same_weights(whole["model"], again["model"])
    assert_same_weights(model_state(ref / BEST), model_state(out / BEST))
    assert again["best_val"] == whole["best_val"] and not again["epoch_end_pending"]
    drop_time = lambda curve: [{k: v for k, v in p.items() if k != "train_s"} for p in curve]  # noqa: E731
    assert drop_time(again["eval_history"]) == drop_time(whole["eval_history"]) and len(whole["eval_history"]) == 2


def test_the_gloo_group_of_the_stop_check_waits_as_long_as_dist_timeout_min(monkeypatch):
    """Under NCCL the per-step stop check runs on a gloo group of its own: made without a timeout, it would wait
    torch's default 30 minutes whatever --dist_timeout_min says (a 2-rank check: 40 s for a 5 s timeout)."""
    import datetime

    import torch.distributed as tdist

    import dist
    from utils.run import preemption

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist.initialize(timeout_min=2.5)  # no process group: only the timeout is recorded
    made = {}
    monkeypatch.setattr(preemption.dist, "initialized", lambda: True)
    monkeypatch.setattr(tdist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(tdist, "new_group", lambda **kw: made.update(kw))
    try:
        preemption.Preemption().close()
        assert made["backend"] == "gloo" and made["timeout"] == datetime.timedelta(minutes=2.5)
    finally:
        dist.initialize()  # back to the default


def test_a_signal_on_one_rank_stops_every_rank(monkeypatch):
    """The per-step stop check is a MAX over the ranks (faked: this rank and another): a rank that got no signal
    stops too, on the other's, so both save the same step. A MIN, or no reduction at all, passed the suite: the
    2-rank test signals torchrun, which forwards the signal to both workers, so each rank has one of its own."""
    import torch.distributed as tdist

    from utils.run import preemption

    other = {"signum": 0}  # the other rank's flag

    def all_reduce(t, op=None, group=None):
        values = [int(t.item()), other["signum"]]
        t.fill_({tdist.ReduceOp.MAX: max, tdist.ReduceOp.MIN: min}.get(op, sum)(values))

    monkeypatch.setattr(preemption.dist, "initialized", lambda: True)
    monkeypatch.setattr(tdist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(tdist, "all_reduce", all_reduce)
    p = preemption.Preemption(signals=(signal.SIGUSR1,))
    try:
        assert not p.requested()
        other["signum"] = signal.SIGTERM  # only the other rank got one
        assert p.requested() and p.agreed == signal.SIGTERM and not p.signum
    finally:
        p.close()


def test_close_puts_the_previous_handlers_back():
    """After training (`close`), a signal is the previous handler's again: ours would only set a flag that nobody
    reads any more, and the final evaluation would run on until a SIGKILL. A close that kept ours passed the
    suite."""
    from utils.run.preemption import Preemption

    def previous(signum, frame):
        pass

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        p = Preemption(signals=(signal.SIGUSR1,))
        assert signal.getsignal(signal.SIGUSR1) == p._on_signal
        p.close()
        assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        signal.signal(signal.SIGUSR1, old)
