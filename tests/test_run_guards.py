"""Guards around a training run (issue 10): one live run per output folder, a full disk while saving, and flags
that would train nothing."""
import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import PER_RANK, REPO, launch
from test_trainer_e2e import TINY, run_train, setup  # noqa: F401  (setup: the tiny data + tokenizer fixture)
from models import MVAR, MVARConfig
from models.loading import CheckpointError, mvar_checkpoint
from scripts.gpu_train_check import write_tokenizer
from utils.flags import FlagError, changed_flags, finalize_args, parse_args, sampling_problems
from utils.data.loaders import image_source_problem
from utils.run import lock as run_lock
from utils.run.checkpoint import RunFolder, save_atomic
from utils.run.lock import LOCK_NAME, RunLock, RunLockError, read_owner


@pytest.mark.parametrize("flag", ["--depth=0", "--tlr=0", "--tlr=nan", "--tblr=0", "--mid_reso=0.9",
                                  # a review: --pg=1 divided by zero at the last iteration, --pg=2 never trained the
                                  # last scales; the others trained silently with a meaning no help gives, or failed
                                  # at the first step
                                  "--pg=1", "--pg=2", "--cond_drop_rate=2", "--ls=1.5", "--drop_path_rate=1.5",
                                  "--wp0=-0.1", "--wpe=2", "--twd=-0.1", "--twde=-1", "--wp=-3", "--pgwp=-1",
                                  "--sche=bogus", "--sche=lin1", "--sche=lin1.5", "--sche=lin-0.5",
                                  "--sche=exp --wpe=0",
                                  # a review: CUDA graphs overwrite the accumulated gradients (pytorch#169545)
                                  "--tfast=1 --ac=2", "--tfast=2 --ac=4",
                                  # a review: FSDP2's gathered weights move between CUDA-graph replays
                                  "--tfast=1 --fsdp=1", "--tfast=2 --fsdp=1",
                                  # a walkthrough: --eval_every sampled with these and logged a meaningless FID,
                                  # or read a missing --eval_net once the data and the model were built
                                  "--eval_top_p=2 --eval_every=1", "--eval_cfg=-2 --eval_every=1",
                                  "--eval_top_k=-1 --eval_every=1", "--eval_net=/no/such/clf.pt --eval_every=1",
                                  # --pn and --vae_ckpt default to the cache's: read before any work
                                  "--tokens=/no/such/cache",
                                  # a review of the data path: failed at the first batch (the data order's seed past
                                  # 64 bits) or in the transforms' build, after the model
                                  "--seed=1152921504606846976", "--seed=-1099511627776", "--mid_reso=inf",
                                  # a sweep of bad values: NaN passed every range check (--ini=nan drew the weights
                                  # uniformly in [-2, 2], --tclip=nan trained unclipped, --save_every_min=nan and
                                  # --diverge_tol=nan turned their checks off, --aln=nan trained NaN steps); the
                                  # others failed after the data, or trained a warm-up that never ended
                                  "--ini=nan", "--hd=nan", "--aln=nan", "--alng=inf", "--tclip=nan",
                                  "--save_every_min=nan", "--diverge_tol=nan", "--max_nonfinite=0",
                                  "--num_classes=-1", "--workers=-3", "--wp=5 --ep=1", "--wp=2 --ep=2",
                                  # an empty path was the current folder ("" is no path, not "off")
                                  "--local_out_dir_path=", "--vae_ckpt=", "--init_from=", "--resume="])
def test_flags_that_train_nothing_are_refused(flag):
    with pytest.raises(ValueError, match=flag.split("=")[0]):
        finalize_args(parse_args(flag.split()), world_size=1)


@pytest.mark.parametrize("flags, message", [
    ("--ac=0", "--ac=0: expected a positive integer"),  # unchecked: a ZeroDivisionError traceback
    ("--train_limit=-1", "--train_limit=-1: expected >= 0 (0 = off)"),
    ("--pg=0.5 --pg0=10", "--pg0=10: expected a scale index in [0, 9]"),  # 256's schedule has scales 0 to 9
    ("--tokens=/no/cache --pn=1_2 --vae_ckpt=/no/vae.pth --eval_every=1",
     "--data_path: expected an ImageFolder root with train/ and val/ class folders (ImageNet's layout); for an "
     "embedded data set instead, name it: --dataset=mnist|imagenet20|fmnist (--eval_every with --tokens scores "
     "against real images)"),
])
def test_a_refusal_says_what_the_flag_expects(flags, message):
    """The whole error line, for refusals the list above did not cover: a mutation review found that --ac=0 (a
    ZeroDivisionError), a negative --train_limit, --pg0 one past the last scale, and --eval_every over a token cache
    with no images to score against all trained or failed later without the suite noticing."""
    with pytest.raises(FlagError) as e:
        finalize_args(parse_args(flags.split()), world_size=1)
    assert str(e.value) == message


def test_the_boundary_values_that_train_are_accepted():
    """The ranges' closed ends train: guidance 0 and top-k 0 (no guidance, no filter) in the evaluation's sampling,
    --cond_drop_rate=1, --wp0=0 (a warm-up from zero), --pg0 at the last scale, and VAR's --workers=-1, taken as 0.
    A mutation review: refusing each of them (cfg <= 0, top_k <= 0, cond_drop_rate < 1, wp0 > 0, workers < 0, the
    workers passed on as -1) passed the suite."""
    args = finalize_args(parse_args(["--dataset=mnist", "--eval_every=1", "--eval_cfg=0", "--eval_top_k=0",
                                     "--cond_drop_rate=1", "--wp0=0", "--pg=0.5", "--pg0=9", "--workers=-1"]), 1)
    assert (args.eval_cfg, args.eval_top_k, args.cond_drop_rate, args.wp0, args.pg0, args.workers) == \
        (0.0, 0, 1.0, 0.0, 9, 0)
    assert sampling_problems(0.0, 0, 1.0) == []
    assert sampling_problems(-0.5, -1, 0.0, prefix="--eval_") == [
        "--eval_top_p must be in (0, 1] (1 disables the nucleus filter), got 0.0",
        "--eval_cfg must be >= 0 and finite (0: no guidance), got -0.5",
        "--eval_top_k must be >= 0 (0 disables the filter), got -1"]


def test_dist_timeout_takes_positive_minutes_and_defaults_to_vars_30(capsys):
    """torch.distributed's timeout: VAR's 30 minutes, and 0 (every collective would time out at once) a usage error.
    A mutation review: a timeout of 0 accepted passed the suite."""
    assert parse_args([]).dist_timeout_min == 30.0 and parse_args(["--dist_timeout_min=0.5"]).dist_timeout_min == 0.5
    for bad in ("0", "-1", "inf"):
        with pytest.raises(SystemExit):
            parse_args([f"--dist_timeout_min={bad}"])
        assert f"argument --dist_timeout_min: expected minutes > 0, got '{bad}'" in capsys.readouterr().err


def test_flags_of_vars_train_py_that_this_one_does_not_take_say_why(capsys):
    """A review: VAR's launch lines may set --exp_name or --opt, which VAR's own parser takes; here they were
    "unrecognized arguments" without a word on what they did there. Other unknown flags stay argparse's error."""
    with pytest.raises(SystemExit):
        parse_args(["--depth=16", "--exp_name=d16", "--opt", "adamw"])
    err = capsys.readouterr().err
    assert "flag(s) of VAR's train.py that this one does not take: --exp_name (VAR's names the run" in err
    assert "--opt (the optimizer is AdamW" in err and "Remove them from the command" in err
    with pytest.raises(SystemExit):
        parse_args(["--glb_batch_size=512", "--bogus=1"])
    err = capsys.readouterr().err
    assert "--glb_batch_size (VAR sets it from the other flags" in err and "Remove it from" in err
    with pytest.raises(SystemExit):
        parse_args(["--bogus=1"])
    assert "unrecognized arguments: --bogus=1" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--saln=1", "--var_blocks=1"], "shared_aln needs one adaLN layout for all blocks"),
    (["--embed_dim=100", "--num_heads=3"], "embed_dim=100 is not divisible by num_heads=3"),
    (["--depth=2", "--var_blocks=5"], "var_blocks=5"),
    # a walkthrough: Mamba2's constraint was a traceback once the data were read (attention alone takes it)
    (["--embed_dim=100"], "embed_dim=100: Mamba2's expand x embed_dim = 200 must be a multiple of its head size 64"),
    # a sweep: a ZeroDivisionError traceback (finalize_args catches ValueError)
    (["--num_heads=0"], "num_heads=0: expected sizes >= 1"), (["--embed_dim=0"], "embed_dim=0: expected sizes >= 1"),
])
def test_model_flags_that_make_no_model_are_refused_before_any_work(flags, message):
    """They were a ValueError traceback once the tokenizer and the data were read."""
    with pytest.raises(ValueError, match=f"the model flags do not make a model: .*{message}"):
        finalize_args(parse_args(flags), world_size=1)
    if flags == ["--embed_dim=100"]:  # VAR's blocks have no Mamba2
        assert finalize_args(parse_args([*flags, "--arch=var", "--dataset=mnist"]), world_size=1).embed_dim == 100


@pytest.mark.parametrize("flag", ["--attn_backend=flash_attn", "--mamba_backend=mamba_ssm"])
def test_a_forced_kernel_that_cannot_run_is_refused_before_any_work(setup, tmp_path, flag):  # noqa: F811
    """Under --tfast the kernel was first resolved inside dynamo's trace: the refusal came as dynamo's internal
    error with a traceback, after the tokenizer and the data were read."""
    proc = run_train(setup, tmp_path / "out", flag, "--tfast=3", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"error: {flag[2:]!s}".replace("=", "='", 1) in out, out[-3000:]
    assert "Traceback" not in out and "train / " not in out  # no traceback; the data were not built


def test_a_forced_kernel_the_blocks_do_not_use_is_not_checked(setup, tmp_path):  # noqa: F811
    """VAR's blocks run block-causal SDPA whatever --attn_backend says, and have no Mamba2: a review found the
    check refusing `--arch=var` runs for kernels they never call."""
    run_train(setup, tmp_path / "out", "--arch=var", "--attn_backend=flash_attn", "--mamba_backend=mamba_ssm",
              "--ep=1")


def test_an_unknown_embedded_data_set_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--dataset=foo"])
    assert "--dataset: invalid choice: 'foo'" in capsys.readouterr().err


# ---- run lock ----------------------------------------------------------------------------------------------------
def sleeper():
    """A live process of this host that is not us."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def write_lock(folder, host, pid, start=None, age_s=0.0):
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "start": start, "since": "then"}))
    os.utime(path, (time.time() - age_s,) * 2)
    return path


def test_live_owner_refuses_naming_it_and_releases_on_exit(tmp_path):
    proc = sleeper()
    try:
        write_lock(tmp_path, socket.gethostname(), proc.pid, run_lock._process_start(proc.pid))
        with pytest.raises(RunLockError, match=f"in use by a live run: host {socket.gethostname()}, pid {proc.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    lock = RunLock(tmp_path).acquire()  # the owner is dead now: stale, taken over
    assert read_owner(tmp_path / LOCK_NAME)["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_reused_pid_and_silent_remote_owner_are_stale(tmp_path):
    if run_lock._process_start(os.getpid()) is None:
        pytest.skip("no /proc: a reused pid cannot be told apart")
    proc = sleeper()
    try:  # same pid, another start time: the pid was reused by an unrelated process
        write_lock(tmp_path, socket.gethostname(), proc.pid, start="1")
        RunLock(tmp_path).acquire().release()
    finally:
        proc.kill()
        proc.wait()
    write_lock(tmp_path, "other-node", 1, age_s=run_lock.STALE_S + 1)  # no heartbeat: the node is gone
    RunLock(tmp_path).acquire().release()


def test_a_lock_taken_over_by_another_launcher_meanwhile_is_not_removed(tmp_path, monkeypatch):
    """Two launchers judge one stale lock: the first takes it over (a fresh lock of its own) while the second is
    between its check and its removal. The second used to delete the first's fresh lock and start a second live
    run in the folder; now it finds the lock is no longer the stale one, leaves it, and is refused."""
    proc = sleeper()
    try:
        write_lock(tmp_path, socket.gethostname(), 2 ** 22 + 1)  # a dead process's lock on this host
        fresh = {"host": socket.gethostname(), "pid": proc.pid, "start": run_lock._process_start(proc.pid),
                 "since": "now"}
        real_pid_alive, swapped = run_lock.pid_alive, []

        def first_launcher_wins(pid, start=None):  # its takeover lands right after our check found the owner dead
            if not swapped:
                swapped.append((tmp_path / LOCK_NAME).write_text(json.dumps(fresh)))
            return real_pid_alive(pid, start)

        monkeypatch.setattr(run_lock, "pid_alive", first_launcher_wins)
        with pytest.raises(RunLockError, match=f"in use by a live run: host {socket.gethostname()}, pid {proc.pid}"):
            RunLock(tmp_path).acquire()
        assert read_owner(tmp_path / LOCK_NAME) == fresh and [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]
    finally:
        proc.kill()
        proc.wait()


def test_a_takeover_is_logged_into_the_log_file_opened_once_the_lock_is_ours(tmp_path):
    """RunFolder.open opens log.txt (`on_locked`) only once the lock is this run's; the warning that it took over a
    stale lock came before, so it reached the console only."""
    write_lock(tmp_path, socket.gethostname(), 2 ** 22 + 1)  # a dead process's lock on this host
    log = logging.FileHandler(tmp_path / "log.txt")
    folder = RunFolder(tmp_path, "ar-ckpt")
    try:
        folder.open(on_locked=lambda: logging.getLogger().addHandler(log))
    finally:
        logging.getLogger().removeHandler(log)
        log.close()
    folder.lock.release()
    took_over = f"took over the stale run lock {tmp_path / LOCK_NAME} of {socket.gethostname()} pid {2 ** 22 + 1} "
    assert (tmp_path / "log.txt").read_text().count(f"{took_over}(exited)") == 1


def test_a_takeover_is_logged_when_another_rank_is_refused(tmp_path, monkeypatch, caplog):
    """The takeover's warning waits for the caller's log file; when another rank's lock is refused, the caller never
    gets there and the warning was lost."""
    import contextlib

    @contextlib.contextmanager
    def another_rank_refused(*errors):
        yield
        raise RunLockError("node 1's folder is in use by a live run")

    write_lock(tmp_path, socket.gethostname(), 2 ** 22 + 1)  # a dead process's lock on this host
    monkeypatch.setattr(run_lock.dist, "raised_on_every_rank", another_rank_refused)
    with caplog.at_level("WARNING", logger="utils.run.lock"), pytest.raises(RunLockError, match="node 1"):
        run_lock.lock_output_folder(tmp_path, holder=True, on_locked=lambda: pytest.fail("refused: no log file"))
    assert caplog.text.count("took over the stale run lock") == 1 and not (tmp_path / LOCK_NAME).exists()


def test_stale_locks_left_aside_by_a_killed_launcher_are_removed(tmp_path, monkeypatch):
    """A takeover moves the stale lock aside for a moment; a launcher killed there left `.run.lock.stale.*` files
    for good. A later run removes those of dead processes of this host and those older than STALE_S."""
    proc = sleeper()
    try:
        here = socket.gethostname()
        dead, live, remote = (tmp_path / f"{LOCK_NAME}.stale.{h}.{p}" for h, p in
                              ((here, 2 ** 22 + 1), (here, proc.pid), ("node.b.cluster", 7)))
        for p in (dead, live, remote):
            p.write_text("{}")
        RunLock(tmp_path).acquire().release()
        assert not dead.exists() and live.exists() and remote.exists()  # the others may be a live launcher's
        monkeypatch.setattr(run_lock, "STALE_S", 0.0)
        RunLock(tmp_path).acquire().release()
        assert [p.name for p in tmp_path.iterdir()] == []
    finally:
        proc.kill()
        proc.wait()


def test_a_recent_remote_lock_is_watched_until_stale_or_alive(tmp_path, monkeypatch, caplog):
    """Another host's lock with a recent heartbeat: a relaunch waits. Its heartbeat advancing means a live run
    (refused at once); none until STALE_S means a node killed moments ago (taken over; a scheduler's requeue onto
    other nodes right after a SIGKILL then resumes instead of failing)."""
    monkeypatch.setattr(run_lock, "STALE_S", 1.5)
    monkeypatch.setattr(run_lock, "POLL_S", 0.05)
    write_lock(tmp_path, "other-node", 1, age_s=0.5)
    beat = threading.Timer(0.3, os.utime, (tmp_path / LOCK_NAME,))
    beat.start()
    t0 = time.monotonic()
    with pytest.raises(RunLockError, match="host other-node, pid 1"):
        RunLock(tmp_path).acquire()
    assert time.monotonic() - t0 < 1.0  # refused at the heartbeat, not at STALE_S
    beat.join()

    write_lock(tmp_path, "other-node", 1, age_s=0.5)
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="utils.run.lock"):
        run_lock.lock_output_folder(tmp_path, holder=True).release()  # it logs the takeover
    assert 0.9 < time.monotonic() - t0 < 3.0
    assert "waiting up to 1s for it to go stale" in caplog.text and "no heartbeat for 2s" in caplog.text


def test_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path).acquire()
    path = tmp_path / LOCK_NAME
    os.utime(path, (0, 0))
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 5
    lock.release()


def test_a_release_leaves_a_lock_that_another_run_took_over(tmp_path):
    """`release` (also at exit) removes the lock only while it names this process: a run whose lock another one took
    over (judged stale: no heartbeat from a hung node) must not delete the new owner's lock at its exit, which left
    the folder open to a third run. An unconditional unlink passed the suite."""
    lock = RunLock(tmp_path).acquire()
    path = write_lock(tmp_path, "other-node", 4242)
    lock.release()
    assert path.exists() and read_owner(path)["host"] == "other-node"


def test_a_process_of_another_user_is_alive():
    """os.kill(pid, 0) on another user's process raises PermissionError: that process exists, so its lock is live
    (taken for dead, a launcher of another user would take over a running job's folder). Faked here, so that it runs
    as root too; False there passed the suite."""
    real_kill = os.kill

    def not_ours(pid, sig):
        if pid == 4242 and sig == 0:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, sig)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_lock.os, "kill", not_ours)
        assert run_lock.pid_alive(4242)


def test_the_heartbeat_survives_its_lock_being_moved_aside_for_a_moment(tmp_path, monkeypatch):
    """A launcher judging the lock moves it aside for a moment (`_remove_if_still`); the heartbeat that meets the
    missing file must keep beating once it is back (a heartbeat that stopped there let the lock of a live run go
    stale after STALE_S, and another host take it over). The suite's heartbeat test never hid the file."""
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.02)
    lock = RunLock(tmp_path).acquire()
    path, aside = tmp_path / LOCK_NAME, tmp_path / "aside"
    try:
        os.rename(path, aside)
        time.sleep(0.2)  # several beats find no file
        os.rename(aside, path)
        os.utime(path, (0, 0))
        deadline = time.monotonic() + 2.0
        while path.stat().st_mtime == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert path.stat().st_mtime > 0
    finally:
        lock.release()


def test_a_remote_lock_with_our_pid_is_another_run(tmp_path, monkeypatch):
    """A lock of another host that names our pid (containers often run the trainer as the same pid) is not an earlier
    run of this process: it is watched as any remote lock, and refused when its heartbeat advances. Removing it at
    once for its pid alone (the host not compared) started a second live run there, and passed the suite."""
    monkeypatch.setattr(run_lock, "STALE_S", 1.5)
    monkeypatch.setattr(run_lock, "POLL_S", 0.05)
    path = write_lock(tmp_path, "other-node", os.getpid(), age_s=0.5)
    beat = threading.Timer(0.3, os.utime, (path,))
    beat.start()
    try:
        with pytest.raises(RunLockError, match=f"host other-node, pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    finally:
        beat.join()
    assert read_owner(path)["host"] == "other-node"


def test_an_empty_lock_file_is_being_written_and_not_removed_while_young(tmp_path):
    """A lock file is created empty (O_EXCL) and its owner written right after: one found empty and younger than a
    heartbeat is a launcher between the two, and is left alone (retried, then refused); removing any empty file at
    once let a second launcher in beside the first. An empty file older than a heartbeat is a crash's, taken over."""
    path = tmp_path / LOCK_NAME
    path.touch()
    with pytest.raises(RunLockError, match="could not take the run lock"):
        RunLock(tmp_path).acquire()
    assert path.exists() and path.read_text() == ""
    os.utime(path, (time.time() - run_lock.HEARTBEAT_S - 1,) * 2)
    RunLock(tmp_path).acquire().release()


def test_second_training_run_in_a_live_folder_is_refused(setup, tmp_path):  # noqa: F811
    """An orphan of a killed launcher still holds the folder: a relaunch must not write the same checkpoints, nor
    its lines into that run's log.txt."""
    out = tmp_path / "out"
    out.mkdir()
    proc = sleeper()
    try:
        write_lock(out, socket.gethostname(), proc.pid, run_lock._process_start(proc.pid))
        run = run_train(setup, out, check=False)
    finally:
        proc.kill()
        proc.wait()
    assert run.returncode != 0
    assert f"in use by a live run: host {socket.gethostname()}, pid {proc.pid}" in run.stderr, run.stderr[-2000:]
    assert not list(out.glob("*.pth")) and not (out / "log.txt").exists()  # the live run's log is its own


# ---- disk full ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")])
def test_disk_full_while_saving_names_the_folder_and_keeps_the_previous_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "ar-ckpt-last.pth"
    save_atomic({"step": 1}, path, keep_previous=tmp_path / "ar-ckpt-prev.pth")
    before = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"x" * 100)
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=f"disk full: cannot write ar-ckpt-last.pth into {tmp_path} .*kept"):
        save_atomic({"step": 2}, path, keep_previous=tmp_path / "ar-ckpt-prev.pth")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ar-ckpt-last.pth"]


def test_other_write_errors_are_not_called_disk_full(tmp_path, monkeypatch):
    """An I/O error (or a read-only folder, a stale NFS handle) is a CheckpointError naming the file, the folder and
    the error, not "disk full"; it was an OSError, which train.py ended in a traceback."""
    save_atomic({"step": 1}, tmp_path / "x.pth")
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(CheckpointError, match=f"^cannot write x.pth into {tmp_path} \\(OSError: .*I/O error\\)\\. "
                                              "The previous checkpoint there is kept") as raised:
        save_atomic({"step": 2}, tmp_path / "x.pth", keep_previous=tmp_path / "x-prev.pth")
    assert "disk full" not in str(raised.value) and torch.load(tmp_path / "x.pth") == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pth"]


def test_a_failed_save_stops_training_with_one_error_line(setup, tmp_path):  # noqa: F811
    """A save that fails other than by a full disk (here the rename of -last to -prev, which is a folder: the same
    for root, whom a read-only folder would not stop) ends train.py with one error line naming the file, the folder
    and the error, and the checkpoint saved before is kept. It ended in a traceback."""
    out = tmp_path / "out"
    run_train(setup, out, "--ep=1")
    before = (out / "ar-ckpt-last.pth").read_bytes()
    (out / "ar-ckpt-prev.pth").mkdir()
    (out / "ar-ckpt-prev.pth" / "x").touch()
    run = run_train(setup, out, "--ep=2", check=False)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert f"error: cannot write ar-ckpt-last.pth into {out} (IsADirectoryError" in run.stderr, run.stderr[-2000:]
    assert (out / "ar-ckpt-last.pth").read_bytes() == before


# ---- resuming: changed flags, incompatible checkpoints -------------------------------------------------------
def test_an_unused_dataset_flag_is_no_changed_flag():
    """Runs saved before --dataset lost its default recorded "mnist": an ImageNet run's relaunch logged
    "--dataset 'mnist' -> None" though nothing changed. Without --data_path the data set is what trains."""
    saved, now = {"data_path": "/in", "dataset": "mnist", "tblr": 1e-4}, {"data_path": "/in", "dataset": None,
                                                                          "tblr": 5e-5}
    assert changed_flags(saved, now) == ["--tblr 0.0001 -> 5e-05"]
    assert changed_flags({**saved, "data_path": ""}, {**now, "data_path": "", "dataset": "fmnist"}) == [
        "--dataset 'mnist' -> 'fmnist'", "--tblr 0.0001 -> 5e-05"]


def test_resume_logs_changed_flags_and_an_incompatible_one_is_an_error_line(setup, tmp_path):  # noqa: F811
    """Issue 23: a new --tblr on resume was applied silently; an incompatible checkpoint ended in a traceback."""
    from test_trainer_e2e import run_train

    out = tmp_path / "out"
    run_train(setup, out, "--ep=1")
    resumed = run_train(setup, out, "--ep=2", "--tblr=5e-2")
    line = next(ln for ln in resumed.stdout.splitlines() if "with changed flags" in ln)
    assert "--ep 1 -> 2" in line and "--tblr 0.1 -> 0.05" in line and "--depth" not in line, line
    wrong = run_train(setup, out, "--ep=3", "--depth=3", check=False)
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr, wrong.stderr[-2000:]
    assert f"error: checkpoint {out / 'ar-ckpt-last.pth'} is incompatible" in wrong.stderr


@pytest.mark.parametrize("flags, message", [
    (["--depth=0"], "error: --depth=0: expected a positive integer"),
    (["--pn=1_3_2"], "error: --pn=1_3_2: bad patch schedule"),
    (["--data_path={tmp}/nope"], "error: --data_path: folder .*nope/train does not exist"),
    (["--dataset=mnist", "--init_from={tmp}/nope.pth"], "error: --init_from=.*nope.pth: no such file"),
    (["--dataset=mnist", "--num_classes=2"], "error: --num_classes=2 is below the data's 10 classes"),  # trained
    # before, with label 2 = null; a command without --data_path (VAR's official ones) trained on MNIST
    (["--data_path={tmp}", "--dataset=mnist"], "error: --data_path=.* and --dataset=mnist both name the images"),
    ([], "error: --data_path: expected an ImageFolder root with train/ and val/ class folders .* --dataset=mnist"),
    # a sweep: these trained NaN steps until --max_nonfinite stopped the run with advice on the lr (or a traceback
    # in the epoch's sample grid), or failed once the tokenizer, the data and the model were built; now they are
    # refused before the tokenizer loads
    (["--dataset=mnist", "--init_from={tmp}/nan.pth"], r"error: --init_from=.*nan.pth has non-finite weights"),
    (["--dataset=mnist", "--resume={tmp}/nan.pth"], r"error: .*nan.pth has non-finite weights .*\['head.weight'\]"),
    (["--dataset=mnist", "--eval_every=1", "--eval_n=4", "--eval_net={tmp}/nan.pth"],
     r"error: --eval_net=.*nan.pth: expected 'inception' or a SmallCNN state dict file"),
])
def test_a_bad_flag_or_file_is_one_error_line_before_training(flags, message, tmp_path):
    vae = tmp_path / "vae.pth"
    write_tokenizer(vae)
    if any("nan.pth" in f for f in flags):  # a model checkpoint with one NaN weight
        mvar = MVAR(MVARConfig(depth=1, embed_dim=64, num_heads=1, V=32, Cvae=8, num_classes=10, patch_nums=(1, 2)))
        with torch.no_grad():
            mvar.head.weight[0, 0] = float("nan")
        torch.save({**mvar_checkpoint(mvar), "epoch": 0, "iter": 1}, tmp_path / "nan.pth")
    proc = launch(REPO / "train.py", f"--vae_ckpt={vae}", "--pn=1_2_3_4", "--depth=1", "--embed_dim=32",
                  "--num_heads=1", f"--local_out_dir_path={tmp_path / 'out'}",
                  *(f.format(tmp=tmp_path) for f in flags), nproc=1, check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(message, proc.stderr.strip().splitlines()[-1]), proc.stderr[-500:]
    assert not (tmp_path / "out" / "ar-ckpt-last.pth").exists()
    if any("nan.pth" in f for f in flags):
        assert "loaded tokenizer" not in proc.stdout + proc.stderr


def test_the_launchers_resolve_relative_paths_from_the_callers_folder(tmp_path):
    """`bash /repo/scripts/train_d16.sh --data_path=imagenet` from a job's folder: imagenet is that folder's, not the
    repository's (the launcher used to cd there)."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "$PWD"\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(REPO / "scripts/train_d16.sh"), "--data_path=imagenet"], cwd=tmp_path,
                          env={**os.environ, "PYTHON": str(fake)}, capture_output=True, text=True, timeout=30)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[0] == str(tmp_path), proc.stdout + proc.stderr
    assert str(REPO / "train.py") in lines and lines[-1] == "--data_path=imagenet" and "--depth=16" in lines


# ---- the launcher ------------------------------------------------------------------------------------------------
def launcher_env():
    """This environment without a job's node layout and torch settings (the launcher reads them)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TORCH_", "MASTER_", "NODE_RANK", "NNODES"))}


def run_launcher(tmp_path, cores=96, **env):
    """scripts/torchrun.sh with a stand-in PYTHON that prints the environment it got and its arguments, on a node
    whose `nproc` says `cores`."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nenv | grep -E '^TORCH_(ELASTIC|DISABLE)' | sort\necho \"$@\"\n")
    fake.chmod(0o755)
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin/nproc").write_text(f"#!/bin/sh\necho {cores}\n")
    (tmp_path / "bin/nproc").chmod(0o755)
    path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    return subprocess.run(["bash", str(REPO / "scripts/torchrun.sh"), "--depth=16"], env={**launcher_env(),
                          "PYTHON": str(fake), "PATH": path, **env}, capture_output=True, text=True, timeout=30)


def test_launcher_passes_the_node_layout_and_the_preemption_settings(tmp_path):
    proc = run_launcher(tmp_path, NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.7")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300",
        f"-m torch.distributed.run --nproc_per_node=8 --nnodes=2 --node_rank=1 --master_addr=10.0.0.7 "
        f"--master_port=29500 {REPO}/train.py --workers=8 --depth=16"]  # the recipe's flags after: they win
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600" in run_launcher(tmp_path, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="600").stdout


@pytest.mark.parametrize("cores, env, workers", [(96, {}, 8), (32, {}, 3), (8, {}, 1), (256, {}, 8),
                                                 (32, {"NPROC_PER_NODE": "2"}, 8), (16, {"NPROC_PER_NODE": "4"}, 3),
                                                 (32, {"WORKERS": "0"}, 0), (8, {"WORKERS": "12"}, 12)])
def test_launcher_shares_the_nodes_cores_among_the_ranks_data_loaders(tmp_path, cores, env, workers):
    """A fixed --workers=8 started 72 loader processes beside 8 ranks on a 32-core node: they took the cores the
    ranks' own processes need. The default leaves one core to each rank, at least 1 and at most 8 loaders;
    WORKERS, when set, is passed as it is."""
    proc = run_launcher(tmp_path, cores, **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].endswith(f"train.py --workers={workers} --depth=16"), proc.stdout


@pytest.mark.parametrize("active, conda_env", [("VIRTUAL_ENV", None), ("CONDA_PREFIX", "mvar"), (None, None),
                                               ("CONDA_PREFIX", "base")])
def test_launcher_runs_the_active_environments_python(tmp_path, active, conda_env):
    """The checkout's .venv (made by `make test`, without the CUDA kernels of requirements-cuda.txt) used to win
    over the environment a cluster user had activated, whose python has them: training fell back to the portable
    Mamba2 kernels with one log line. With no environment active, or only conda's base (which many clusters
    activate in every shell), the .venv still runs it."""
    def fake_python(path, says):
        path.parent.mkdir(parents=True)
        path.write_text(f"#!/bin/sh\necho {says}\n")
        path.chmod(0o755)

    checkout = tmp_path / "checkout"  # the launcher finds the .venv beside its own folder
    (checkout / "scripts").mkdir(parents=True)
    for script in ("torchrun.sh", "pick_python.sh"):
        shutil.copy(REPO / "scripts" / script, checkout / "scripts")
    fake_python(checkout / ".venv/bin/python", "checkout venv")
    fake_python(tmp_path / "env/bin/python", "active environment")
    env = {k: v for k, v in launcher_env().items() if k not in ("PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX",
                                                                "CONDA_DEFAULT_ENV")}
    env["PATH"] = f"{tmp_path / 'env/bin'}:{env['PATH']}"
    if active:
        env[active] = str(tmp_path / "env")
    if conda_env:
        env["CONDA_DEFAULT_ENV"] = conda_env
    proc = subprocess.run(["bash", str(checkout / "scripts/torchrun.sh")], capture_output=True, text=True, timeout=30,
                          env=env)
    active_wins = active is not None and conda_env != "base"
    assert proc.returncode == 0 and proc.stdout == ("active environment\n" if active_wins else "checkout venv\n"), \
        proc.stdout + proc.stderr


@pytest.mark.parametrize("env", [{"NNODES": "2", "NODE_RANK": "1"}, {"NNODES": "2", "MASTER_ADDR": "10.0.0.7"}])
def test_launcher_refuses_several_nodes_without_their_address_and_rank(tmp_path, env):
    """Before, a node launched without them waited silently for peers at 127.0.0.1 as node 0."""
    proc = run_launcher(tmp_path, **env)
    assert proc.returncode == 2 and "NNODES=2 needs MASTER_ADDR" in proc.stderr and not proc.stdout


# ---- ranks that do not train alike --------------------------------------------------------------------------------


def test_ranks_with_other_data_or_flags_are_refused_before_training(setup, tmp_path):  # noqa: F811
    """Rank 1 reads a node-local copy of the data with one image in another class folder (same classes, same count:
    its labels would be silently wrong) and sets --save_every otherwise (its collectives would go out of step: a
    hang on NCCL). Both are named, with each rank's value, before any step; node-local paths may differ."""
    shutil.copytree(setup / "data", tmp_path / "copy")
    (tmp_path / "copy/train/class0/0.png").rename(tmp_path / "copy/train/class1/moved.png")
    wrapper = tmp_path / "per_rank.py"
    wrapper.write_text(PER_RANK.format(repo=str(REPO), train=str(REPO / "train.py"),
                                       flag_1=f"--data_path={tmp_path / 'copy'}", extra_1=["--save_every=7"]))
    proc = launch(wrapper, f"--data_path={setup / 'data'}", f"--vae_ckpt={setup / 'vae.pth'}",
                  f"--local_out_dir_path={tmp_path / 'out'}", *TINY, nproc=2, check=False, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "the ranks do not train alike" in out, out[-3000:]
    assert "--save_every: rank 0: 0; rank 1: 7" in out, out[-3000:]
    assert "the training files (digest of their paths and labels): rank 0: '" in out, out[-3000:]
    assert "--data_path" not in out.split("the ranks do not train alike")[1].split("\n\n")[0]  # may differ per node
    assert "ep 1/2 it 1/" not in out


def test_disagreements_name_each_value_with_its_ranks(monkeypatch):
    import dist
    from utils.run.agreement import rank_disagreements
    facts = [{"--bs": 8, "classes": [f"n{i:03}" for i in range(10)]} for _ in range(3)]
    facts[2]["classes"] = facts[2]["classes"][:5] + ["n999"] + facts[2]["classes"][6:]
    monkeypatch.setattr(dist, "all_gather_object", lambda mine: facts)
    assert rank_disagreements(facts[0]) == ["classes: ranks 0,1: 10 items; rank 2: 10 items, item 5 = 'n999'"]
    facts[1]["--bs"], facts[2]["classes"] = 16, facts[0]["classes"][:6]
    assert rank_disagreements(facts[0]) == ["--bs: ranks 0,2: 8; rank 1: 16",
                                            "classes: ranks 0,1: 10 items; rank 2: 6 items, the first 6 of rank 0's"]
    facts[1]["--bs"], facts[2]["classes"], facts[2]["cache"] = 8, facts[0]["classes"], "abc"  # on one rank only
    assert rank_disagreements(facts[0]) == rank_disagreements(facts[2]) == ["cache: ranks 0,1: None; rank 2: 'abc'"]


# ---- data and output folders that cannot train: one error line before any work ----------------------------------
def test_unusable_folders_end_in_one_error_line(setup, tmp_path):  # noqa: F811
    (tmp_path / "a_file").write_text("")
    proc = run_train(setup, tmp_path / "a_file/out", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --local_out_dir_path: cannot write into ") \
        and "Traceback" not in proc.stderr, proc.stderr[-2000:]

    data = tmp_path / "data"
    shutil.copytree(setup / "data", data)
    (data / "val/class2").rename(data / "val/class9")
    proc = run_train(setup, tmp_path / "out", f"--data_path={data}", check=False)
    assert proc.stderr.strip().endswith("train/ and val/ must have the same class folders; only in train/: class2 (1); "
                                        "only in val/: class9 (1)") and "Traceback" not in proc.stderr, proc.stderr

    (data / "val/class9").rename(data / "val/class2")
    (data / "train/class3").mkdir()
    proc = run_train(setup, tmp_path / "out", f"--data_path={data}", check=False)
    assert f"error: --data_path: {data / 'train'} has class folders without images: class3 (1 of 4) (torchvision: " \
        in proc.stderr, proc.stderr


@pytest.mark.parametrize("data_path, dataset, needed, message", [
    ("/in", "mnist", False, "--data_path=/in and --dataset=mnist both name the images"),  # with --tokens too
    ("", None, True, "--data_path: expected an ImageFolder root"),
    ("", None, False, ""), ("/in", None, True, ""), ("", "fmnist", True, ""),
])
def test_one_image_source_is_named(data_path, dataset, needed, message):
    """train.py, the tokenizer trainer and extract_tokens share this rule: --dataset beside --data_path was ignored."""
    got = image_source_problem(data_path, dataset, needed)
    assert got.startswith(message) and bool(got) == bool(message), got
