"""Checkpoint files and train state (utils.run.checkpoint, utils.run.checkpoint), shared by train.py and the tokenizer
trainer: atomic saves that keep the previous file, one resume rule (last, else prev), stale temporary files of
killed saves, RNG capture/restore and the seeding rule."""
import logging
import os
import random
import shutil

import numpy as np
import pytest
import torch

import utils.run.checkpoint
from conftest import damage_tensor_data
from test_tokenizer_training import tiny_args
from tokenizer_trainer import train as train_tokenizer
from models.loading import CheckpointError, load_checkpoint
from utils.run.checkpoint import RunFolder, save_atomic, temp_path
from utils.run.rng import get_rng_state, seed_everything, set_rng_state


def test_atomic_save_keeps_previous_and_bad_files_are_named(tmp_path):
    folder = RunFolder(tmp_path, "ar-ckpt")
    last, prev = tmp_path / "ar-ckpt-last.pth", tmp_path / "ar-ckpt-prev.pth"
    save_atomic({"v": 1}, last, keep_previous=prev)
    save_atomic({"v": 2}, last, keep_previous=prev)
    assert load_checkpoint(last)["v"] == 2 and load_checkpoint(prev)["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([prev.name, last.name])  # no temp files left
    assert folder.find_resume() == last
    last.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="ar-ckpt-last.pth is unreadable"):
        load_checkpoint(last)
    last.write_text("# a README\n")  # a walkthrough: torch's message advised weights_only=False (code execution)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(last)
    assert "not a torch checkpoint of tensors" in str(e.value) and "weights_only` set to `False" not in str(e.value)
    last.unlink()
    assert folder.find_resume() == prev


def test_a_relaunch_that_diverges_again_keeps_the_first_set_aside_checkpoint(tmp_path):
    """`set_aside("diverged")` twice (a relaunch from -prev diverged too, before a good step): the second gets a
    number instead of replacing the first, so both checkpoints the divergences started from stay for inspection."""
    folder = RunFolder(tmp_path, "ar-ckpt")
    folder.writer = True
    save_atomic({"v": 1}, folder.last, keep_previous=folder.prev)
    save_atomic({"v": 2}, folder.last, keep_previous=folder.prev)
    assert folder.set_aside("diverged") == tmp_path / "ar-ckpt-diverged.pth"
    assert folder.find_resume() == folder.prev  # the relaunch resumes from the one before
    assert folder.set_aside("diverged") == tmp_path / "ar-ckpt-diverged-2.pth"
    assert load_checkpoint(tmp_path / "ar-ckpt-diverged.pth")["v"] == 2
    assert load_checkpoint(tmp_path / "ar-ckpt-diverged-2.pth")["v"] == 1
    assert folder.find_resume() is None and folder.set_aside("diverged") is None


def test_a_save_killed_between_its_two_renames_leaves_prev_to_resume_from(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path, "tokenizer")
    folder.writer = True
    folder.save({"step": 1})
    real_replace, calls = os.replace, []

    def killed_after_first_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for SIGKILL between `last -> prev` and `tmp -> last`
        real_replace(src, dst)

    monkeypatch.setattr(utils.run.checkpoint.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        folder.save({"step": 2})
    monkeypatch.undo()
    assert not folder.last.exists() and folder.find_resume() == folder.prev
    assert folder.load_resume() == (folder.prev, {"step": 1})


def test_tokenizer_trainer_resumes_from_prev_when_last_is_missing(tmp_path):
    """The state a kill between the two renames of a save leaves: only tokenizer-prev.pth. The re-run resumes from
    it (before: it started from step 0 and overwrote it) and ends where an uninterrupted run ends."""
    flags = ("--steps=4", "--save_every=2", "--log_every=2", "--reinit_every=1")
    train_tokenizer(tiny_args(*flags, f"--out_dir={tmp_path / 'once'}"))
    (tmp_path / "killed").mkdir()  # the step-4 save killed after renaming the step-2 file to -prev
    shutil.copy(tmp_path / "once" / "tokenizer-prev.pth", tmp_path / "killed" / "tokenizer-prev.pth")
    train_tokenizer(tiny_args(*flags, f"--out_dir={tmp_path / 'killed'}"))
    log = (tmp_path / "killed" / "log.txt").read_text()
    assert f"resumed from {tmp_path / 'killed' / 'tokenizer-prev.pth'} at step 2" in log
    once, resumed = (load_checkpoint(tmp_path / d / "tokenizer-last.pth") for d in ("once", "killed"))
    assert once["step"] == resumed["step"] == 4
    assert all(torch.equal(v, resumed["vae"][k]) for k, v in once["vae"].items())


def test_stale_temp_files_of_killed_saves_are_removed_at_start(tmp_path):
    """Only hidden temporary files of this folder's checkpoints whose writer is gone; a live writer's temporary
    file and every other file stay."""
    dead_pid = 2**22 + 12345  # above the kernel's largest pid (2**22): no such process
    stale = [temp_path(tmp_path / name, dead_pid) for name in ("tokenizer-last.pth", "tokenizer-best.pth")]
    # a review: a requeue onto another host kept a dead writer's file (GBs) whenever its pid was alive here
    stale += [temp_path(tmp_path / "tokenizer-last.pth", os.getppid(), host="gpu-a99"),
              tmp_path / f".tokenizer-prev.pth.tmp{dead_pid}"]  # a name from before the host was in it
    other_run = temp_path(tmp_path / "tokenizer-last.pth", os.getppid())  # a live process (our parent)
    other_prefix = temp_path(tmp_path / "ar-ckpt-last.pth", dead_pid)  # another trainer's checkpoint name
    kept = [other_run, other_prefix, tmp_path / "tokenizer-last.pth.tmp1",
            tmp_path / ".tokenizer-last.pth.tmp12x", tmp_path / "notes.txt"]
    for p in stale + kept:
        p.write_bytes(b"x")
    train_tokenizer(tiny_args("--steps=1", f"--out_dir={tmp_path}"))
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert "removed 4 temporary file(s) of interrupted saves" in (tmp_path / "log.txt").read_text()
    assert RunFolder(tmp_path, "ar-ckpt").remove_stale_temp_files() == [other_prefix]


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    save_atomic({"rng": get_rng_state()}, tmp_path / "r.pth")
    expected = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(load_checkpoint(tmp_path / "r.pth")["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_seed_rule_is_seed_times_world_plus_rank():
    draws = {}
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        seed_everything(3, rank, world)
        draws[rank, world] = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(3 * 2 + 1), random.seed(7), np.random.seed(7)
    assert torch.equal(draws[1, 2][0], torch.rand(2)) and draws[1, 2][1:] == (random.random(), np.random.rand())
    assert not torch.equal(draws[0, 2][0], draws[1, 2][0])  # ranks draw different streams
    assert not torch.equal(draws[0, 1][0], draws[0, 2][0])  # ... and rank 0 of 2 is not one process's stream


def test_damaged_tensor_data_is_named_and_resume_falls_back_to_an_intact_prev(tmp_path, caplog):
    """64 flipped bytes inside a checkpoint's tensors (torch's zip reader checks no CRC): loading names the file;
    a resume takes `-prev`, saying so, and its next save replaces the damaged `-last` instead of rotating the
    intact `-prev` out."""
    folder = RunFolder(tmp_path, "ar-ckpt")
    folder.writer = True
    for step in (1, 2):
        folder.save({"step": step, "model": {"w": torch.full((1000,), float(step))}})
    damage_tensor_data(folder.last)
    with pytest.raises(CheckpointError, match="ar-ckpt-last.pth is damaged"):
        load_checkpoint(folder.last)
    resumed = RunFolder(tmp_path, "ar-ckpt")
    resumed.writer = True
    with caplog.at_level(logging.WARNING, logger="utils.run.checkpoint"):
        path, ckpt = resumed.load_resume()
    assert (path, ckpt["step"]) == (folder.prev, 1) and "resuming from the previous checkpoint" in caplog.text
    resumed.save({"step": 2, "model": {"w": torch.full((1000,), 2.0)}})
    assert load_checkpoint(folder.prev)["step"] == 1 and load_checkpoint(folder.last)["step"] == 2


def test_a_temporary_file_named_after_this_process_is_removed(tmp_path):
    """A relaunched trainer in a container often gets the killed one's pid (its namespace's pid 1): a temporary
    file under our own pid is a killed save's, not a live writer's, and goes (it was kept for good, a whole
    checkpoint's size)."""
    folder = RunFolder(tmp_path, "ar-ckpt")
    own = temp_path(folder.last)
    own.write_bytes(b"x")
    assert folder.remove_stale_temp_files() == [own] and not own.exists()


@pytest.mark.parametrize("local_rank, shared, writes", [(0, True, False), (0, False, True), (1, False, False)])
def test_another_nodes_first_rank_writes_only_into_a_folder_of_its_own(tmp_path, monkeypatch, local_rank, shared,
                                                                      writes):
    """`is_checkpoint_writer` on a rank other than 0 (faked): the first rank of another node writes checkpoints
    only when its output folder is not rank 0's (rank 0's run token is not there); two writers of one shared folder
    race on its files. The multi-node tests give each node its own folder, so a writer whenever `local rank 0 or
    not shared` passed the suite."""
    monkeypatch.setattr(utils.run.checkpoint.dist, "is_main_process", lambda: False)
    monkeypatch.setattr(utils.run.checkpoint.dist, "initialized", lambda: True)
    monkeypatch.setattr(utils.run.checkpoint.dist, "broadcast_object", lambda obj: "rank 0's token")
    monkeypatch.setattr(utils.run.checkpoint.dist, "barrier", lambda: None)
    monkeypatch.setattr(utils.run.checkpoint.dist, "get_local_rank", lambda: local_rank)
    if shared:  # what rank 0 wrote into the folder before the barrier
        (tmp_path / ".run_token").write_text("rank 0's token")
    assert utils.run.checkpoint.is_checkpoint_writer(tmp_path) is writes


def test_ranks_at_the_same_epoch_but_another_iteration_are_refused(tmp_path, monkeypatch):
    """All ranks must resume from the same (epoch, iter): two ranks (faked) whose checkpoints differ only in the
    iteration are refused. A position of the epoch alone passed the suite, and would resume the ranks at different
    batches of the epoch."""
    folder = RunFolder(tmp_path, "ar-ckpt")
    folder.writer = True
    folder.save({"epoch": 1, "iter": 5})
    other = (1, 4, None)  # the other rank's checkpoint: (epoch, iter, step)
    monkeypatch.setattr(utils.run.checkpoint.dist, "all_gather_object",
                        lambda mine: [mine, None if mine is None else other])
    with pytest.raises(CheckpointError, match=r"different positions \[\(1, 5, None\), \(1, 4, None\)\]"):
        folder.load_resume()


@pytest.mark.parametrize("other_holds, resumes", [([(None, None, 1)], 1), ([(None, None, 2), (None, None, 1)], 2),
                                                  ([(None, None, 3)], None)])
def test_node_local_copies_one_save_apart_resume_from_the_newest_all_hold(tmp_path, monkeypatch, other_holds, resumes):
    """A review: a node whose save failed (or that died mid-save) left its own folder one checkpoint behind, and
    every relaunch was refused ("different positions") although this node's -prev is where the other one stands.
    The other rank (faked) holds `other_holds` as its -last and -prev; nothing common is still an error."""
    folder = RunFolder(tmp_path, "ar-ckpt")
    folder.writer = True
    for step in (1, 2):
        folder.save({"step": step})
    resumed = RunFolder(tmp_path, "ar-ckpt")
    resumed.writer = resumed.node_local = True
    monkeypatch.setattr(utils.run.checkpoint.dist, "all_gather_object", lambda mine: [
        mine, other_holds if isinstance(mine, list) else other_holds[0]])
    if resumes is None:
        with pytest.raises(CheckpointError, match="different positions"):
            resumed.load_resume()
        return
    path, ckpt = resumed.load_resume()
    assert ckpt["step"] == resumes and path == (resumed.prev if resumes == 1 else resumed.last)
    assert resumed.last_damaged == (resumes == 1)  # the next save must not keep this node's -last, which is ahead


def resumed_past_a_damaged_last(tmp_path) -> RunFolder:
    """A folder whose -last (step 2) is damaged, resumed from its -prev (step 1)."""
    folder = RunFolder(tmp_path, "ar-ckpt")
    folder.writer = True
    for step in (1, 2):
        folder.save({"step": step, "model": {"w": torch.full((1000,), float(step))}})
    damage_tensor_data(folder.last)
    resumed = RunFolder(tmp_path, "ar-ckpt")
    resumed.writer = True
    assert resumed.load_resume()[1]["step"] == 1
    return resumed


def test_a_divergence_after_resuming_past_a_damaged_last_sets_the_resumed_prev_aside(tmp_path):
    """The bad steps started from -prev (what the run resumed from), so -prev is set aside; moving the damaged -last
    instead left the relaunch resuming from the very checkpoint that diverged."""
    resumed = resumed_past_a_damaged_last(tmp_path)
    aside = resumed.set_aside("diverged")
    assert aside == tmp_path / "ar-ckpt-diverged.pth" and load_checkpoint(aside)["step"] == 1
    assert not resumed.prev.exists()


def test_saves_after_the_one_that_replaced_a_damaged_last_rotate_again(tmp_path):
    """Only the first save after resuming past a damaged -last skips the rotation: the next ones keep their previous
    file as -prev again (else -prev stayed the old checkpoint for the rest of the run)."""
    resumed = resumed_past_a_damaged_last(tmp_path)
    for step in (2, 3):
        resumed.save({"step": step})
    assert load_checkpoint(resumed.prev)["step"] == 2 and load_checkpoint(resumed.last)["step"] == 3


def test_a_best_only_save_writes_best_and_leaves_last(tmp_path):
    """`save(best=True, last=False)` (an epoch's best weights where -last must wait: train.Checkpointer.save_best)
    writes -best and leaves -last and -prev as they are; the end-to-end test reads only the log line, which names
    -best whether or not it was written, so a -best written only together with -last passed the suite."""
    folder = RunFolder(tmp_path, "ar-ckpt")
    folder.writer = True
    folder.save({"epoch": 1, "iter": 2})
    folder.save({"epoch": 2, "iter": 0}, best=True, last=False)
    assert load_checkpoint(folder.best)["epoch"] == 2 and load_checkpoint(folder.last)["epoch"] == 1
    assert not folder.prev.exists()
    folder.save({"epoch": 3, "iter": 0}, best=True)
    assert load_checkpoint(folder.best)["epoch"] == load_checkpoint(folder.last)["epoch"] == 3
    assert load_checkpoint(folder.prev)["epoch"] == 1


def test_the_best_checkpoint_follows_the_last_scales_val_loss_not_the_mean(monkeypatch):
    """train.end_epoch marks an epoch best when its last-scale (tail) val loss is below the best so far, as VAR does:
    here the mean improves and the tail does not, then the reverse. The end-to-end test checks only the best
    value saved, so a choice by the mean loss passed the suite."""
    import types

    import train

    monkeypatch.setattr(train, "inference_dtype", lambda *a: None)
    saved = []
    saver = types.SimpleNamespace(preemption=types.SimpleNamespace(requested=lambda: False), evaluator=None,
                                  save=lambda epoch, it, best_val, best=False: saved.append((epoch, best_val, best)))
    tb = types.SimpleNamespace(flush=lambda: None, scalars=lambda *a, **k: None)
    args = types.SimpleNamespace(ep=5, val_every=1, sample_every=0, eval_every=1)
    for ep, (mean, tail) in enumerate(((3.0, 2.0), (2.5, 2.1), (2.6, 1.9))):
        val = dict(vL_mean=mean, vL_tail=tail, vacc_mean=0.0, vacc_tail=0.0, n=4)
        trainer = types.SimpleNamespace(window_micro_steps=0, evaluate=lambda loader, stop, dtype, val=val: val)
        best = saved[-1][1] if saved else float("inf")
        train.end_epoch(ep, 3, args, trainer, None, tb, saver, None, best)
    assert saved == [(1, 2.0, True), (2, 2.0, False), (3, 1.9, True)]


def test_save_atomic_syncs_the_file_before_its_renames_and_the_folder_after(tmp_path, monkeypatch):
    """The new file's bytes reach the disk before it is renamed over `-last` (a crash right after the rename
    otherwise leaves an empty or partial `-last`, the old one already renamed to `-prev`), and the folder is synced
    after the renames. Every test passed with either fsync removed."""
    real_fsync, real_replace, events = os.fsync, os.replace, []
    monkeypatch.setattr(utils.run.checkpoint.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(utils.run.checkpoint.os, "replace",
                        lambda src, dst: events.append(f"replace -> {os.path.basename(dst)}") or real_replace(src, dst))
    last, prev = tmp_path / "ar-ckpt-last.pth", tmp_path / "ar-ckpt-prev.pth"
    save_atomic({"v": 1}, last, keep_previous=prev)
    events.clear()
    save_atomic({"v": 2}, last, keep_previous=prev)
    assert events == ["fsync", f"replace -> {prev.name}", f"replace -> {last.name}", "fsync"]
