"""train.py end to end on a tiny tokenizer/model/ImageFolder (CPU): torchrun DDP == one process, SIGKILL + resume
is bit-identical, corrupt and incompatible checkpoints are clear errors that keep the previous file."""
import logging
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, SUBPROCESS_ENV, build_tiny_mvar, damage_tensor_data, interrupt, launch, launch_cmd, \
    write_image_folder
from models.loading import vae_checkpoint
from utils.evaluation.classifier import SmallCNN
from utils.run.checkpoint import BEST, LAST, PREV
from utils.run.log import SAME_ON_ALL_RANKS, TB_AXES, setup_logging

TINY = ["--pn=1_2_4", "--depth=2", "--embed_dim=64", "--num_heads=2", "--fuse=0", "--bs=4", "--ep=2",
        "--log_every=1", "--workers=0", "--seed=3", "--tblr=1e-1", "--sample_every=0", "--val_every=1"]
KILL_AFTER_FIRST_SAVE = r"saved checkpoint .*\(after ep 1 it 2\)"  # right after the first mid-epoch checkpoint
LOSS_RE = re.compile(r"ep (\d+)/\d+ it (\d+)/\d+ \| loss ([0-9.]+)")
GNORM_RE = re.compile(r"ep (\d+)/\d+ it (\d+)/\d+ \| .* gnorm ([0-9.]+)")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny tokenizer checkpoint (downsample 2 -> 8 px images) and an ImageFolder of 3 classes."""
    root = tmp_path_factory.mktemp("train_e2e")
    vae, _ = build_tiny_mvar(patch_nums=(1, 2, 4))
    torch.save(vae_checkpoint(vae), root / "vae.pth")
    write_image_folder(root / "data", 10, 12, {"train": 8, "val": 2})
    torch.manual_seed(0)
    torch.save(SmallCNN(3, ch=4).state_dict(), root / "clf.pt")  # a random feature network for --eval_net
    return root


def train_flags(setup: Path, out: Path, *extra: str) -> list[str]:
    return [f"--data_path={setup / 'data'}", f"--vae_ckpt={setup / 'vae.pth'}", f"--local_out_dir_path={out}", *TINY,
            *extra]


def train_cmd(setup: Path, out: Path, *extra: str, nproc: int = 1) -> list[str]:
    """The train.py command (plain python, or torchrun with `nproc` ranks) on the tiny set-up."""
    return launch_cmd(REPO / "train.py", *train_flags(setup, out, *extra), nproc=nproc)


def run_train(setup: Path, out: Path, *extra: str, nproc: int = 1, check: bool = True):
    return launch(REPO / "train.py", *train_flags(setup, out, *extra), nproc=nproc, check=check)


def logged_losses(text: str, pattern: re.Pattern = LOSS_RE):
    return {(int(e), int(i)): float(v) for e, i, v in pattern.findall(text)}


def model_state(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def max_abs_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference_run(setup):
    """Uninterrupted single-process run with the model's own randomness on (cond dropout, drop path, hflip)."""
    out = setup / "ref"
    proc = run_train(setup, out, "--save_every=2", "--hflip=1", "--drop_path_rate=0.1")
    return out, proc.stdout


NO_MODEL_RNG = ("--cond_drop_rate=0", "--drop_path_rate=0", "--hflip=1")  # per-rank draws differ by design


def eval_flags(setup: Path) -> tuple[str, ...]:
    return "--eval_every=1", "--eval_n=6", f"--eval_net={setup / 'clf.pt'}"


@pytest.fixture(scope="module")
def single_run(setup):
    return run_train(setup, setup / "single", *NO_MODEL_RNG, *eval_flags(setup)).stdout


@pytest.fixture(scope="module")
def two_rank_run(setup):
    """Runs train.py on 2 ranks (DDP or FSDP2) once per mode; returns (out_dir, stdout)."""
    done = {}

    def run(mode: str):
        if mode not in done:
            # FSDP2 also samples after epoch 1 without validation first (whose forward would leave the root unsharded)
            fsdp = ["--fsdp=1", "--sample_every=1", "--val_every=2"] if mode == "fsdp" else []
            done[mode] = setup / mode, run_train(setup, setup / mode, *NO_MODEL_RNG, *eval_flags(setup), *fsdp,
                                                 nproc=2).stdout
        return done[mode]
    return run


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(setup, single_run, two_rank_run, mode):
    """torchrun --nproc_per_node=2 (gloo, DDP or FSDP2, which also samples each epoch) with the same global batch:
    same logged losses and final weights as one process, and the same evaluation curve (its images sharded over the
    ranks). Cond dropout and drop path are off: their random draws are per rank by design."""
    out, log = two_rank_run(mode)
    loss_1, loss_2 = logged_losses(single_run), logged_losses(log)
    assert len(loss_1) == 12 and loss_1.keys() == loss_2.keys()
    assert max(abs(loss_1[k] - loss_2[k]) for k in loss_1) < 1e-4  # logged with 4 decimals
    # the gradients too (pre-clip norm): AdamW and the clip would hide ranks that sum their gradients
    norm_1, norm_2 = logged_losses(single_run, GNORM_RE), logged_losses(log, GNORM_RE)
    assert norm_1.keys() == loss_1.keys() and norm_2.keys() == loss_1.keys()
    assert max(abs(norm_1[k] - norm_2[k]) for k in norm_1) < 2e-3  # logged with 3 decimals
    diff = max_abs_diff(model_state(setup / "single" / LAST), model_state(out / LAST))
    assert diff < 1e-5, diff
    moved = max_abs_diff(model_state(setup / "single" / LAST), model_state(setup / "single" / PREV))
    assert moved > 1e-3  # the weights did change over the last epoch, so the comparison means something
    curve_1, curve_2 = (torch.load(d / LAST, weights_only=True)["eval_history"] for d in (setup / "single", out))
    assert [(p["epoch"], p["images"]) for p in curve_1] == [(p["epoch"], p["images"]) for p in curve_2] == \
        [(1, 24), (2, 48)]
    for p1, p2 in zip(curve_1, curve_2, strict=True):  # weights within 1e-5: the same samples up to rounding
        assert p2["fd_clf"] == pytest.approx(p1["fd_clf"], rel=1e-3) and p1["consistency"] == p2["consistency"]


@pytest.mark.parametrize("saved_by, resumed_by", [("fsdp", "single"), ("single", "fsdp")])
def test_fsdp_and_single_process_checkpoints_resume_into_each_other(setup, single_run, two_rank_run, saved_by,
                                                                   resumed_by):
    """The epoch-1 checkpoint of an FSDP2 run resumes in one process (and the reverse); the second epoch then ends
    where the uninterrupted single-process run ended, so model and AdamW moments were both carried over."""
    src = two_rank_run("fsdp")[0] if saved_by == "fsdp" else setup / "single"
    ckpt = torch.load(src / PREV, map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["iter"]) == (1, 0)
    out = setup / f"{saved_by}_to_{resumed_by}"
    out.mkdir()
    shutil.copy(src / PREV, out / LAST)
    fsdp = ["--fsdp=1", "--val_every=2"] if resumed_by == "fsdp" else []
    proc = run_train(setup, out, *NO_MODEL_RNG, *fsdp, nproc=2 if resumed_by == "fsdp" else 1)
    assert "resumed from" in proc.stdout
    if resumed_by == "fsdp":  # a warning every rank gives alike comes from rank 0 alone (once per job, not per rank)
        assert proc.stdout.count("the checkpoint holds RNG states of 1 ranks, this run has 2") == 1, proc.stdout
    diff = max_abs_diff(model_state(setup / "single" / LAST), model_state(out / LAST))
    assert diff < 1e-5, diff


def test_sigkill_mid_epoch_then_resume_is_bit_identical(setup, reference_run):
    ref_out, ref_log = reference_run
    out = setup / "killed"
    cmd = train_cmd(setup, out, "--save_every=2", "--hflip=1", "--drop_path_rate=0.1")
    proc, _ = interrupt(cmd, KILL_AFTER_FIRST_SAVE, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    resumed = run_train(setup, out, "--save_every=2", "--hflip=1", "--drop_path_rate=0.1")
    position = re.search(r"resumed from .* after ep (\d+) it (\d+)$", resumed.stdout, re.M)
    assert position and int(position.group(2)) > 0, resumed.stdout[-2000:]  # resumed mid-epoch
    ref, got = model_state(ref_out / LAST), model_state(out / LAST)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    ref_opt = torch.load(ref_out / LAST, weights_only=True)["trainer"]["optimizer"]["state"]
    got_opt = torch.load(out / LAST, weights_only=True)["trainer"]["optimizer"]["state"]
    assert all(torch.equal(ref_opt[i]["exp_avg_sq"], got_opt[i]["exp_avg_sq"]) for i in ref_opt)
    ref_losses, got_losses = logged_losses(ref_log), logged_losses(resumed.stdout)
    assert got_losses and all(ref_losses[k] == v for k, v in got_losses.items())


def test_other_ranks_log_their_own_warnings_and_leave_those_alike_on_every_rank_to_rank_0(capsys):
    log, root = logging.getLogger("mvar.test"), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        for rank in (0, 1):
            setup_logging(rank)
            log.warning("alike %d", rank, extra=SAME_ON_ALL_RANKS)
            log.warning("own %d", rank)
            log.info("info %d", rank)
    finally:
        root.handlers[:], root.level = handlers, level
    out = capsys.readouterr().out
    assert [m for m in ("alike 0", "own 0", "info 0", "alike 1", "own 1", "info 1") if m in out] == \
        ["alike 0", "own 0", "info 0", "own 1"], out
    assert "[rank1]" in out.split("own 1")[0].splitlines()[-1]


def test_only_rank_0_writes_the_runs_log_file(tmp_path):
    """The output folder is shared by every rank of a node (and often by every node): log.txt is rank 0's alone; a
    rank 1 that opened it too appended its warnings into rank 0's file. The log test above passes no folder."""
    log, root = logging.getLogger("mvar.test"), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        for rank in (1, 0):
            setup_logging(rank, tmp_path / f"rank{rank}")
            log.warning("own %d", rank)
    finally:
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:], root.level = handlers, level
    assert not (tmp_path / "rank1" / "log.txt").exists()
    assert "own 0" in (tmp_path / "rank0" / "log.txt").read_text()


def test_the_best_checkpoint_is_the_lowest_last_scale_val_loss_as_vars(reference_run):
    """VAR keeps the epoch of the lowest tail (last-scale) validation loss; we kept the lowest mean, another epoch
    whenever the two rank epochs otherwise. The seed drawn or given is logged."""
    ref_out, ref_log = reference_run
    tails = [float(m) for m in re.findall(r"ep \d+ val: L mean [0-9.]+ tail ([0-9.]+)", ref_log)]
    assert len(tails) == 2 and "seed 3 (a resume keeps it)" in ref_log
    best = torch.load(ref_out / BEST, weights_only=True)
    assert best["best_val"] == pytest.approx(min(tails), abs=1e-4)


@pytest.mark.parametrize("damage", ["truncated", "damaged"])
def test_corrupt_checkpoint_is_named_and_the_run_resumes_from_the_kept_previous(setup, reference_run, damage):
    """A truncated -last (unreadable) or one with 64 flipped bytes in its tensors (loads, but not to its digest):
    the run says so and resumes from the intact -prev, and its save (the one epoch end left) replaces the damaged
    file, keeping -prev."""
    ref_out, _ = reference_run
    out = setup / f"corrupt_{damage}"
    shutil.copytree(ref_out, out)
    if damage == "truncated":
        (out / LAST).write_bytes((out / LAST).read_bytes()[:1000])
    else:
        damage_tensor_data(out / LAST)
    prev_bytes = (out / PREV).read_bytes()
    proc = run_train(setup, out, "--save_every=2", "--hflip=1", "--drop_path_rate=0.1")  # the run's flags
    assert f"checkpoint {out / LAST} is {'unreadable' if damage == 'truncated' else 'damaged'}" in proc.stdout
    assert f"resuming from the previous checkpoint {out / PREV}" in proc.stdout
    assert f"resumed from {out / PREV}" in proc.stdout
    assert (out / PREV).read_bytes() == prev_bytes
    ref = model_state(ref_out / LAST)
    assert all(torch.equal(v, model_state(out / LAST)[k]) for k, v in ref.items())  # ... and ended as before


def test_resume_flag_starts_a_run_and_a_relaunch_continues_from_the_folder(setup, single_run):
    """--resume PATH seeds a new folder; relaunching the same command (say after preemption) continues from the
    folder's own newer checkpoint, not from PATH again."""
    out = setup / "resume_flag"
    cmd = (f"--resume={setup / 'single' / PREV}", *NO_MODEL_RNG)
    first = run_train(setup, out, *cmd)
    assert f"resumed from {setup / 'single' / PREV} after ep 1\n" in first.stdout
    assert max_abs_diff(model_state(setup / "single" / LAST), model_state(out / LAST)) == 0
    again = run_train(setup, out, *cmd, "--ep=3")
    assert "ignored" in again.stderr + again.stdout and f"resumed from {out / LAST} after ep 2" in again.stdout


def tb_axes(tb: Path) -> dict[str, EventAccumulator]:
    """A run's TensorBoard events, read per x axis as TensorBoard reads them (a resume's purge applied)."""
    axes = {axis: EventAccumulator(str(tb / axis), size_guidance={"images": 0, "scalars": 0})
            for axis in TB_AXES if (tb / axis).is_dir()}  # a folder per axis the run logged on
    for acc in axes.values():
        acc.Reload()
    return axes


def tb_points(tb: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> every (step, value) TensorBoard shows, in the order written."""
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for acc in tb_axes(tb).values()
            for tag in acc.Tags()["scalars"]}


def test_a_resume_hides_in_tensorboard_what_the_killed_run_logged_after_its_checkpoint(setup, single_run, tmp_path):
    """A run killed after logging past its checkpoint (here: the finished run without its last checkpoint, so it
    resumes after epoch 1 with epoch 2 logged) shows every point once in TensorBoard, on each x axis (iterations,
    epochs, training images), with the values of the uninterrupted run (the resume is exact) and the points from
    before the checkpoint kept."""
    out = tmp_path / "rewound"
    shutil.copytree(setup / "single", out)
    (out / LAST).unlink()
    whole = tb_points(out / "tb")
    assert [step for step, _ in whole["eval/fd_clf"]] == [24, 48] and len(whole["val/vL_mean"]) == 2
    resumed = run_train(setup, out, *NO_MODEL_RNG, *eval_flags(setup))
    assert "resumed from" in resumed.stdout and "after ep 1" in resumed.stdout
    shown = tb_points(out / "tb")
    assert shown.keys() == whole.keys()
    for tag, points in shown.items():
        assert [step for step, _ in points] == [step for step, _ in whole[tag]], tag  # each step once, none lost
        if not tag.startswith("speed/"):  # the rest depends on this machine's clock
            assert points == whole[tag], tag
    for path in out.glob("*.pth"):  # killed before its first checkpoint: the relaunch starts over and shows each
        path.unlink()               # point once (a review: the killed run's points stayed beside the new ones)
    run_train(setup, out, *NO_MODEL_RNG, *eval_flags(setup))
    shown = tb_points(out / "tb")
    assert all([step for step, _ in points] == [step for step, _ in whole[tag]] for tag, points in shown.items())


def test_init_from_loader_workers_progressive_training_and_tensorboard(setup, single_run):
    """--init_from takes the weights only (epoch 0, a lower first loss than from scratch); --workers=1 and --pg
    run through train.py; TensorBoard gets the per-scale, optimiser, speed and validation scalars and the sample
    grid."""
    first_scratch = logged_losses(single_run)[1, 1]
    out = setup / "init_from"
    proc = run_train(setup, out, f"--init_from={setup / 'single' / LAST}", "--workers=1", "--ep=1", *NO_MODEL_RNG,
                     "--sample_every=1")
    assert "initialised the weights from" in proc.stdout and "resumed" not in proc.stdout
    assert logged_losses(proc.stdout)[1, 1] < first_scratch - 0.5
    axes = tb_axes(out / "tb")
    scalars = set(tb_points(out / "tb"))
    for tag in ("train/loss", "train/grad_norm", "train/vocab_usage", "opt/lr", "opt/wd", "speed/images_per_s",
                "speed/tokens_per_s", "val/vL_mean", *(f"train/{m}_{r}" for m in ("L", "acc") for r in (2, 4, 8))):
        assert tag in scalars, (tag, sorted(scalars))
    assert axes["epochs"].Tags()["images"], "no sample grid in TensorBoard"

    pg = run_train(setup, setup / "progressive", "--pg=0.5", "--pg0=1", "--ep=2", *NO_MODEL_RNG)
    stages = [value for _, value in tb_points(setup / "progressive" / "tb")["opt/prog_si"]]
    assert stages[0] == 1 and stages[-1] == -1 and "loss" in pg.stdout  # grows from scale 1 to all scales


def test_incompatible_checkpoint_names_file_and_field(setup, reference_run):
    ref_out, _ = reference_run
    out = setup / "incompatible"
    shutil.copytree(ref_out, out)
    proc = run_train(setup, out, "--depth=3", "--fuse=1", check=False)
    assert proc.returncode != 0
    assert f"checkpoint {out / LAST} is incompatible" in proc.stderr and "model depth" in proc.stderr
    assert "backend" not in proc.stderr  # the kernels (--fuse) may change between runs


def test_resume_with_another_tokenizer_of_the_same_shape_is_refused_unless_meant(setup, reference_run):
    """The checkpoint embeds its tokenizer: --vae_ckpt with the same config but other weights is refused, naming
    both files, unless --allow_other_tokenizer says it is meant."""
    ref_out, _ = reference_run
    out = setup / "other_tokenizer"
    shutil.copytree(ref_out, out)
    other = torch.load(setup / "vae.pth", weights_only=True)
    other["vae"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in other["vae"].items()}
    torch.save(other, setup / "other_vae.pth")
    flags = ("--ep=3", "--drop_path_rate=0.1", f"--vae_ckpt={setup / 'other_vae.pth'}")  # the run's model
    proc = run_train(setup, out, *flags, check=False)
    assert proc.returncode != 0 and f"checkpoint {out / LAST} is incompatible" in proc.stderr
    assert "tokenizer weights differ" in proc.stderr and "--allow_other_tokenizer" in proc.stderr
    assert f"--vae_ckpt={setup / 'vae.pth'}" in proc.stderr and f"--vae_ckpt={setup / 'other_vae.pth'}" in proc.stderr
    proc = run_train(setup, out, *flags, "--allow_other_tokenizer")
    assert "continuing with this run's (--allow_other_tokenizer)" in proc.stdout
    # --init_from as well (a review: it loaded the weights under any tokenizer of the same shape)
    proc = run_train(setup, setup / "other_tokenizer_init", f"--init_from={ref_out / LAST}", *flags, check=False)
    assert proc.returncode != 0 and "is not the tokenizer --init_from=" in proc.stderr, proc.stderr[-2000:]
    assert "--allow_other_tokenizer" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_with_renamed_classes_or_more_images_mid_epoch_is_refused(setup, reference_run):
    """Checkpoints record the class names and the number of training images: a renamed class folder (which
    permutes the labels) is refused naming the names; a grown training set is refused mid-epoch (before: resumed
    silently, or `start_it outside` when it shrank)."""
    ref_out, _ = reference_run
    data = setup / "data_changed"
    shutil.copytree(setup / "data", data)
    for split in ("train", "val"):
        (data / split / "class0").rename(data / split / "classX")
    out = setup / "renamed_classes"
    shutil.copytree(ref_out, out)
    proc = run_train(setup, out, "--ep=3", "--drop_path_rate=0.1", f"--data_path={data}", check=False)
    assert proc.returncode != 0 and f"checkpoint {out / LAST} is incompatible with this run: the class names" \
        " differ (only in the checkpoint: class0 (1); only in this run: classX (1))" in proc.stderr

    for split in ("train", "val"):
        (data / split / "classX").rename(data / split / "class0")
    for i in range(4):
        shutil.copy(data / "train" / "class1" / "0.png", data / "train" / "class1" / f"extra{i}.png")
    out = setup / "grown_data"
    out.mkdir()
    shutil.copy(ref_out / PREV, out / LAST)
    assert torch.load(out / LAST, weights_only=True)["iter"] > 0  # a mid-epoch checkpoint
    proc = run_train(setup, out, "--drop_path_rate=0.1", f"--data_path={data}", check=False)
    assert proc.returncode != 0 and "incompatible with this run: the training set has 28 images, 24 when the " \
        "checkpoint was written: a mid-epoch position" in proc.stderr

    for i in range(4):  # as many images as the checkpoint's, but other files (a review: resumed silently)
        (data / "train" / "class1" / f"extra{i}.png").unlink()
    (data / "train" / "class1" / "0.png").rename(data / "train" / "class1" / "9.png")
    proc = run_train(setup, out, "--drop_path_rate=0.1", f"--data_path={data}", check=False)
    assert proc.returncode != 0 and "incompatible with this run: the training image files (their paths and labels) " \
        "differ from those the checkpoint was trained on: a mid-epoch position" in proc.stderr


def test_resume_mid_epoch_with_another_batch_says_which_flags_resume(setup, reference_run):
    ref_out, _ = reference_run
    out = setup / "other_batch"
    out.mkdir()
    shutil.copy(ref_out / PREV, out / LAST)  # mid-epoch, --bs=4 on one rank
    proc = run_train(setup, out, "--drop_path_rate=0.1", "--bs=6", check=False)
    assert proc.returncode != 0 and "global micro-batch 4 vs 6 (--bs/--ac): a mid-epoch position needs the same " \
        "batch; relaunch with --bs=4 --ac=1, or resume from an epoch-end checkpoint" in proc.stderr, proc.stderr
    # the same micro-batch with another --ac: its windows count from the resume point, so the first optimizer step
    # takes a whole window (it took a part where the iteration count was not a multiple of the new --ac)
    ckpt = torch.load(out / LAST, weights_only=True)
    ac = next(a for a in (2, 3, 4, 5) if (ckpt["epoch"] * 6 + ckpt["iter"]) % a)  # 24 images, micro-batch 4
    proc = run_train(setup, out, "--drop_path_rate=0.1", f"--bs={4 * ac}", f"--ac={ac}", "--ep=3")  # room for it
    first = [line for line in proc.stdout.splitlines() if re.search(r"ep \d+/\d+ it \d+/\d+ \|", line)][:ac]
    assert ["gnorm - |" in line for line in first] == [True] * (ac - 1) + [False], first


def test_partial_accumulation_window_still_saves(setup):
    """--ac=2 with 5 iterations: --save_every=3 falls on a non-stepping micro-step and is taken at the window's end
    (iter 4); the run ends inside a window, whose micro-step is discarded, and still writes its final and best
    checkpoints."""
    out = setup / "partial_window"
    proc = run_train(setup, out, "--bs=10", "--ac=2", "--ep=1", "--save_every=3")
    assert "saved checkpoint" in proc.stdout and "(after ep 1 it 4)" in proc.stdout, proc.stdout[-3000:]
    assert "the last 1 micro-step(s) were discarded" in proc.stdout
    last = torch.load(out / LAST, weights_only=True)
    assert (last["epoch"], last["iter"]) == (1, 0)
    assert (out / BEST).is_file()


def test_a_mid_epoch_checkpoint_counts_the_training_time_since_the_last_log_line(setup):
    """The checkpoint's training time (the evaluation curve's train_s after a resume) is the logged intervals' sum
    plus the time since the last log line: a save between log lines lost up to --log_every iterations of it."""
    out = setup / "unlogged_time"
    run_train(setup, out, "--ep=1", "--save_every=2", "--log_every=100")  # 5 iterations: saves at 2 and 4, no log
    mid = torch.load(out / PREV, weights_only=True)  # iteration 4's, kept as -prev by the epoch's end
    end = torch.load(out / LAST, weights_only=True)
    assert (mid["epoch"], mid["iter"]) == (0, 4)
    assert 0 < mid["trainer"]["train_seconds"] < end["trainer"]["train_seconds"]


def test_best_checkpoint_is_written_where_the_last_one_must_wait(setup):
    """An epoch ending inside an accumulation window (--ac=2, 5 iterations an epoch) cannot write -last, but its
    validated weights are the best so far: they are saved as -best alone (they were lost, while the best val loss
    already counted them). Likewise after a bad last step (unit below: Checkpointer with stand-ins)."""
    out = setup / "best_mid_window"
    proc = run_train(setup, out, "--bs=10", "--ac=2", "--ep=2", "--log_every=1")
    assert f"saved checkpoint {out / BEST} (after ep 1)" in proc.stdout, proc.stdout[-3000:]
    # and -last is written at the window's end in epoch 2 (a review: that epoch had no checkpoint at all)
    assert f"saved checkpoint {out / LAST} (after ep 2 it 1)" in proc.stdout, proc.stdout[-3000:]
    # a line after a micro-step without an optimizer step has no gradient norm: "-", not the "nan" of a divergence
    assert "ep 1/2 it 1/5 " in proc.stdout and "gnorm - |" in proc.stdout and "gnorm nan" not in proc.stdout

    import train
    saved = []
    trainer = SimpleNamespace(save_blocker=lambda resume_point=True: "the last optimizer step was bad"
                              if resume_point else None, checkpoint=lambda **position: dict(position))
    folder = SimpleNamespace(best=out / BEST, save=lambda ckpt, best=False, last=True: saved.append(
        ("last", ckpt["epoch"], best) if last else ("best", ckpt["epoch"])))
    saver = train.Checkpointer(folder, trainer, SimpleNamespace(), {})
    try:
        saver.save(3, 0, 0.5, best=True)
        assert saved == [("best", 3)] and saver.pending  # -last waits for the next good step
        trainer.save_blocker = lambda resume_point=True: "a weight is non-finite"
        saver.save(4, 0, 0.4, best=True)
        assert saved == [("best", 3)]  # never non-finite weights
    finally:
        saver.close()


def test_embedded_data_without_tokenizer_points_at_tokenizer_training(tmp_path):
    env = {**SUBPROCESS_ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--depth=2", "--dataset=mnist",
                           f"--local_out_dir_path={tmp_path}"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "vae_ch160v4096z32.pth" in proc.stderr and "scripts/train_tokenizer.py --dataset=mnist " in proc.stderr


def test_evaluation_while_training_leaves_training_alone_and_its_curve_survives_a_kill(setup, reference_run,
                                                                                      tmp_path):
    """--eval_every=1: a Frechet distance per epoch in a named network's features (here a random SmallCNN), logged
    with the training images seen and kept in the checkpoint. Training draws what it draws without it (the
    reference run's losses, model randomness on), and a run killed after its first evaluation resumes the curve."""
    _, ref_log = reference_run
    flags = ("--save_every=2", "--hflip=1", "--drop_path_rate=0.1", *eval_flags(setup))
    whole = run_train(setup, tmp_path / "whole", *flags)
    assert logged_losses(whole.stdout) == logged_losses(ref_log)
    assert re.search(r"ep 1 eval: fd_clf [0-9.]+ consistency [0-9.]+ after 24 training images \(6 generated\)",
                     whole.stdout)
    curve = torch.load(tmp_path / "whole" / LAST, weights_only=True)["eval_history"]
    assert [(p["epoch"], p["images"]) for p in curve] == [(1, 24), (2, 48)]
    assert all(p["fd_clf"] > 0 and 0 <= p["consistency"] <= 1 and p["tf32"] is False for p in curve)  # CPU: no TF32
    assert curve[0]["fd_clf"] != curve[1]["fd_clf"]

    proc, _ = interrupt(train_cmd(setup, tmp_path / "killed", *flags), r"saved checkpoint .*\(after ep 1\)",
                        signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    run_train(setup, tmp_path / "killed", *flags)
    resumed = torch.load(tmp_path / "killed" / LAST, weights_only=True)["eval_history"]
    times = [p.pop("train_s") for p in resumed], [p.pop("train_s") for p in curve]  # this machine's clock
    assert resumed == curve
    for t in times:  # training time so far, growing from point to point across the kill
        assert 0 < t[0] < t[1]
