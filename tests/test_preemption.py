"""SIGTERM / SIGINT during training (issue 10): every rank finishes its step, a checkpoint is written collectively,
the process exits with a clear line, and the same command resumes to the very weights of an uninterrupted run. A
second signal exits at once."""
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from test_tokenizer_training import TINY as TOKENIZER_TINY
from conftest import SUBPROCESS_ENV as ENV
from conftest import interrupt, launch, launch_cmd
from test_trainer_e2e import (NO_MODEL_RNG, REPO, model_state, reference_run, run_train,  # noqa: F401
                              setup, train_cmd, two_rank_run)
from utils.run.checkpoint import LAST

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


def test_a_signal_at_an_epoch_end_saves_before_validating():
    """A review: a signal during an epoch's last iterations was saved only after validation, the sample grid and
    --eval_every, which can outlast a preemption's grace period (torchrun's: 30 s before SIGKILL)."""
    import types

    import train

    calls = []

    def save(epoch, it, best_val, best=False):
        calls.append(("save", epoch, it))
        raise SystemExit(143)  # Checkpointer.save exits after a signal's checkpoint

    saver = types.SimpleNamespace(preemption=types.SimpleNamespace(requested=lambda: True), save=save)
    trainer = types.SimpleNamespace(window_micro_steps=0, evaluate=lambda loader: calls.append("validated"))
    tb = types.SimpleNamespace(flush=lambda: calls.append("flush"))
    args = types.SimpleNamespace(ep=3, val_every=1, sample_every=1, eval_every=1)
    with pytest.raises(SystemExit):
        train.end_epoch(0, 5, args, trainer, None, tb, saver, None, 1.0)
    assert calls == ["flush", ("save", 1, 0)]


def test_a_signal_on_one_rank_stops_every_rank(monkeypatch):
    """`requested()` takes the largest signal number over the ranks (the all-reduce faked here over two ranks): a
    scheduler that signals one node's processes only stops every rank, and two ranks signalled alike agree on
    that signal, and the rank that got none exits with that signal's status (not 128 + its own 0). The end-to-end
    tests signal every rank, so a MIN (no rank stops: the others wait at the save's collectives) or a SUM passed
    them, and so did an exit status from the rank's own signal."""
    import torch.distributed as tdist

    from utils.run import preemption

    def other_rank_got(signum: int):
        def all_reduce(t, op, group=None):
            both = [int(t.item()), signum]
            t.fill_(max(both) if op == tdist.ReduceOp.MAX else min(both) if op == tdist.ReduceOp.MIN else sum(both))
        return all_reduce

    quiet, signalled, neither = (preemption.Preemption(signals=()) for _ in range(3))  # no handlers installed
    signalled.signum = signal.SIGTERM
    monkeypatch.setattr(preemption.dist, "initialized", lambda: True)
    monkeypatch.setattr(preemption.tdist, "all_reduce", other_rank_got(signal.SIGTERM))
    assert quiet.requested() and quiet.agreed == signal.SIGTERM  # this rank got nothing, the other SIGTERM
    with pytest.raises(SystemExit) as stop:
        quiet.exit("after ep 1 it 2")
    assert stop.value.code == 128 + signal.SIGTERM
    assert signalled.requested() and signalled.agreed == signal.SIGTERM  # both got it
    monkeypatch.setattr(preemption.tdist, "all_reduce", other_rank_got(0))
    assert not neither.requested() and neither.agreed == 0


def test_close_puts_the_previous_handlers_back():
    """After training `close()` restores the handlers found at creation, so a signal during the work that follows
    (a final evaluation, the next run of an in-process caller) acts as before instead of setting a flag no one reads
    any more; a close that kept ours passed the suite."""
    from utils.run import preemption

    previous = signal.getsignal(signal.SIGUSR1)
    p = preemption.Preemption(signals=(signal.SIGUSR1,))
    assert signal.getsignal(signal.SIGUSR1) == p._on_signal
    p.close()
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_under_nccl_the_stop_flag_goes_over_a_gloo_group(monkeypatch):
    """`requested()` all-reduces a CPU tensor: under NCCL (GPU only) that needs a gloo group of its own, made at
    creation (faked here: no process group exists). Without it every GPU run would fail or hang at its first step's
    check; the CPU tests run gloo, where the default group serves, so a Preemption that never made one passed."""
    from utils.run import preemption

    made, reduced = [], []
    monkeypatch.setattr(preemption.dist, "initialized", lambda: True)
    monkeypatch.setattr(preemption.tdist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(preemption.tdist, "new_group", lambda backend: made.append(backend) or "the gloo group")
    monkeypatch.setattr(preemption.tdist, "all_reduce", lambda t, op, group=None: reduced.append((t.device, group)))
    assert not preemption.Preemption(signals=()).requested()
    assert made == ["gloo"] and reduced == [(torch.device("cpu"), "the gloo group")]
