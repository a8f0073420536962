"""Train M-VAR (or the VAR / ablation baselines) with VAR's recipe; single process, torchrun DDP or FSDP2.

    torchrun --nproc_per_node=8 [--nnodes=N --node_rank=R --master_addr=A --master_port=P] train.py \
        --depth=16 --bs=768 --ep=200 --fp16=1 --alng=1e-3 --wpe=0.1 --data_path=/path/to/imagenet

Instead of --data_path, an embedded data set (--dataset=mnist|imagenet20|fmnist): one of the two is needed. The
output folder (--local_out_dir_path) holds log.txt, TensorBoard events and checkpoints; a restarted run resumes from it
mid-epoch with the exact data order and RNG states.
"""
import argparse
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torchvision.utils
from torch.utils.data import Dataset

import dist
from models import backends
from models.attention import resolve_backend
from models.hub_format import ModelWeights, TokenizerMismatchError, check_own_tokenizer, read_model_weights
from models.loading import DERIVED_KEYS, CheckpointError, load_state_dict_checked, load_vae
from models.mamba2 import resolve_kernels
from models.mvar import MVAR, MVARConfig
from models.precision import AMP_DTYPES, effective_amp_dtype, set_tf32
from models.presets import format_patch_nums
from models.tokenizer import VQVAE
from trainer import StepResult, Trainer
from utils.data.loaders import DataError, build_datasets, build_loaders, build_val_set, class_names, \
    file_list_digest
from utils.data.token_cache import TokenCacheError, TokenDataset, content_digest, gaps, open_cache, read_manifest, \
    tokenizer_digest
from utils.evaluation.during_training import TrainingEval, load_classifier_file
from utils.flags import FlagError, changed_flags, finalize_args, model_shape, parse_args
from utils.run.agreement import refuse_disagreement, run_facts
from utils.run.checkpoint import OutputFolderError, RunFolder, check_writable, position_text
from utils.run.divergence import NonFiniteError
from utils.run.lock import RunLockError
from utils.run.log import SAME_ON_ALL_RANKS, TBLogger, setup_logging
from utils.run.preemption import Preemption, Stopped
from utils.run.rng import resolve_seed, seed_everything
from utils.run.schedule import Schedule
from utils.sample_io import nonfinite_weights_problem

logger = logging.getLogger("train")
COMPILE_MODES = {1: "reduce-overhead", 2: "max-autotune", 3: "default"}


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------
def load_tokenizer(args: argparse.Namespace, device: torch.device) -> VQVAE:
    """The frozen tokenizer of --vae_ckpt (default: VAR's, from the Hugging Face cache)."""
    try:
        return load_vae(args.vae_ckpt, device, v_patch_nums=args.patch_nums)
    except FileNotFoundError as e:
        if args.tokens and (flags := extraction_flags(args.tokens)):
            raise FileNotFoundError(f"{e}\nThe token cache {args.tokens} was extracted with {flags}: pass the same "
                                    "to train.py") from e
        if args.vae_ckpt or args.data_path or not args.dataset:
            raise
        raise FileNotFoundError(f"{e}\nFor the embedded data set, a small tokenizer of your own is enough: "
                                f"python scripts/train_tokenizer.py --dataset={args.dataset} --reso=32 --ch=32 "
                                "--ch_mult=1_1_2_2 --z_channels=16 --vocab_size=512 --pn=1_2_3_4 "
                                "--out_dir=local_output/tokenizer, "
                                "then --vae_ckpt=local_output/tokenizer/tokenizer-last.pth --pn=1_2_3_4 (make demo "
                                "does both)") from e


def extraction_flags(tokens: str) -> str:
    """The tokenizer flags the token cache `tokens` was extracted with ("" when its manifest is unreadable)."""
    try:
        manifest = read_manifest(tokens)
    except (TokenCacheError, OSError, ValueError):
        return ""
    vae = [f"--vae_ckpt={manifest['vae_ckpt']}"] if manifest.get("vae_ckpt") else []  # not in older manifests
    return " ".join([*vae, f"--pn={format_patch_nums(manifest['patch_nums'])}"])


def build_data(args: argparse.Namespace, vae: VQVAE, reso: int
               ) -> tuple[int, Dataset, Dataset, Dataset, list[str] | None]:
    """(num_classes, train set, val set, the images --eval_every scores against, the token cache's views or None):
    the images (build_datasets), or with --tokens the cache's train split (checked against this run's tokenizer,
    schedule and resolution) validated on --data_path's val/ images when given, else on the cache's val split; the
    evaluation's images are then --data_path's, else the embedded --dataset's (the cache's classes must match)."""
    if not args.tokens:
        num_classes, train_set, val_set = build_datasets(args.data_path, args.dataset, reso, args.mid_reso,
                                                         args.hflip, args.fmnist_dir, args.train_limit,
                                                         args.val_limit)
        return num_classes, train_set, val_set, val_set, None
    expected, val_images, val_files = {"tokenizer_digest": tokenizer_digest(vae), "patch_nums": list(args.patch_nums),
                                       "reso": reso}, None, None
    if args.data_path or args.eval_every:  # cropped as the cache's images were (its --mid_reso, not this run's)
        mid_reso = read_manifest(args.tokens).get("mid_reso", args.mid_reso)
        expected["classes"], val_images, val_files = build_val_set(
            args.data_path, args.dataset, reso, mid_reso, fmnist_dir=args.fmnist_dir, val_limit=args.val_limit)
    try:
        manifest = open_cache(args.tokens, expected)
    except TokenCacheError as e:
        if args.data_path or not args.eval_every:
            raise
        raise TokenCacheError(f"{e}\n--eval_every compares generated images with real ones, here the embedded "
                              f"--dataset={args.dataset}'s: for a cache of an image folder, pass --data_path (its "
                              f"val/ images)") from None
    cache_val_files = (manifest.get("files") or {}).get("val")
    if args.data_path and None not in (val_files, cache_val_files) and val_files != cache_val_files:
        raise TokenCacheError(f"--data_path={args.data_path}: its val/ images are not those of the data set the token "
                              f"cache {args.tokens} was extracted from ({manifest['source']}; the digests of their "
                              "file lists differ): training would learn one data set and be validated on another. "
                              "Pass the --data_path the cache was extracted from (a copy elsewhere will do)")
    for gap in gaps(manifest):
        logger.warning(gap, extra=SAME_ON_ALL_RANKS)
    views = manifest["splits"]["train"]["views"]
    logger.info("training from the token cache %s (--pn=%s): views %s at mid_reso %g (one per image and epoch, fixed "
                "at extraction: VAR draws a new random crop every epoch)", args.tokens,
                format_patch_nums(manifest["patch_nums"]), views, manifest["mid_reso"])
    if args.hflip and not any(v.endswith("_flip") for v in views):
        logger.warning("--hflip does not apply to a token cache, and this one has no flipped views (extract them with "
                       "scripts/extract_tokens.py --views=center,center_flip)", extra=SAME_ON_ALL_RANKS)
    val_set = val_images if args.data_path else TokenDataset(args.tokens, manifest, "val", args.val_limit,
                                                             "--val_limit")
    return len(manifest["classes"]), TokenDataset(args.tokens, manifest, "train", args.train_limit, "--train_limit"), \
        val_set, val_images, views


def read_init_from(path: str) -> ModelWeights:
    """--init_from's weights, read before the tokenizer and the data: a missing, unreadable or non-finite file is
    refused before minutes of listing images."""
    weights = read_model_weights(path, "--init_from")
    if problem := nonfinite_weights_problem(weights.state.items(), f"--init_from={path}"):
        raise CheckpointError(problem)
    return weights


def read_start_files(args: argparse.Namespace, ckpt: dict[str, Any] | None, resume_path: Path | None
                     ) -> ModelWeights | None:
    """Collective, before the tokenizer and the data (minutes of listing ImageNet): refuse a resume checkpoint with
    non-finite weights (it would train NaN steps until --max_nonfinite) and an --eval_net that is no classifier; the
    weights of --init_from, which a resume's checkpoint replaces (then not read)."""
    with dist.raised_on_every_rank(CheckpointError, FileNotFoundError):
        if ckpt is not None and (problem := nonfinite_weights_problem(ckpt["model"].items(), str(resume_path))):
            raise CheckpointError(problem)
        init = read_init_from(args.init_from) if args.init_from and ckpt is None else None
    if ckpt is not None and args.init_from:
        logger.info("--init_from=%s not read: resuming from %s", args.init_from, resume_path)
    if args.eval_every and args.eval_net != "inception":
        load_classifier_file(args.eval_net)
    return init


def build_model(args: argparse.Namespace, vae: VQVAE, num_classes: int, device: torch.device,
                weights: ModelWeights | None = None) -> MVAR:
    """A freshly initialised model (VAR's init) whose config comes from the flags and the tokenizer, its weights
    then --init_from's (`weights`) where given."""
    config = MVARConfig(
        depth=args.depth, num_classes=num_classes, V=vae.vocab_size, Cvae=vae.Cvae, patch_nums=args.patch_nums,
        arch=args.arch, var_blocks=args.var_blocks, embed_dim=args.embed_dim, num_heads=args.num_heads,
        shared_aln=args.saln,
        attn_l2_norm=args.anorm, drop_path_rate=None if args.drop_path_rate < 0 else args.drop_path_rate,
        cond_drop_rate=args.cond_drop_rate,
    )
    attn_backend, mamba_backend = backends.from_flags(args.attn_backend, args.mamba_backend, fuse=args.fuse)
    with torch.device(device):  # built where it runs, not drawn on the CPU first (seconds for a d30)
        mvar = MVAR(config, vae=vae, attn_backend=attn_backend, mamba_backend=mamba_backend)
    mvar.grad_ckpt = args.grad_ckpt
    mvar.init_weights(init_adaln=args.aln, init_adaln_gamma=args.alng, init_head=args.hd, init_std=args.ini,
                      gamma_rows=args.alng_rows)
    if weights is not None:
        try:  # the tokenizer the weights were trained with, where recorded (official files do not), as a resume
            check_own_tokenizer(vae, weights.tokenizer_digest, f"the tokenizer (--vae_ckpt={args.vae_ckpt})",
                                f"--init_from={args.init_from}", args.allow_other_tokenizer, (config.V, config.Cvae))
        except TokenizerMismatchError as e:
            raise CheckpointError(str(e)) from None
        load_state_dict_checked(mvar, weights.state, ignore=DERIVED_KEYS, what=f"--init_from={args.init_from}")
        changed = weights.config.design_differences(config) if weights.config else []
        if changed:  # the same names and shapes: a warm start into another design (an ablation's), or a flag missed
            logger.warning("--init_from=%s was trained as another design: %s (its weights loaded: their names and "
                           "shapes are this run's)", args.init_from, ", ".join(changed))
        logger.info("initialised the weights from %s", args.init_from)
    return mvar


def build_schedule(args: argparse.Namespace, iters_per_epoch: int) -> Schedule:
    """VAR's lr / wd / progressive schedules from the (finalized) flags; warm-ups are given in epochs."""
    return Schedule(tlr=args.tlr, max_it=args.ep * iters_per_epoch, wp_it=args.wp * iters_per_epoch,
                    sche=args.sche, wp0=args.wp0, wpe=args.wpe, twd=args.twd, twde=args.twde, pg=args.pg,
                    pg0=args.pg0, num_scales=len(args.patch_nums), pgwp_it=args.pgwp * iters_per_epoch)


# ----------------------------------------------------------------------------------------------------------------
# Saving, logging, epoch end
# ----------------------------------------------------------------------------------------------------------------
class Checkpointer:
    """train.py's saves: mid-epoch every --save_every iterations and every --save_every_min minutes (rank 0's
    clock decides for everyone), at epoch end, and on SIGTERM/SIGINT (then the process exits: utils.run.preemption);
    a save due inside an accumulation window waits for its end, one due while the last optimizer step was bad (or a
    weight is non-finite: `Trainer.save_blocker`) for the next good step. When bad steps stop the run before a good
    step has run from the newest checkpoint's weights, that checkpoint is set aside (`diverged`)."""

    def __init__(self, folder: RunFolder, trainer: Trainer, args: argparse.Namespace, data: dict[str, Any],
                 evaluator: TrainingEval | None = None):
        self.folder, self.trainer, self.args, self.data, self.evaluator = folder, trainer, args, data, evaluator
        self.last_save, self.pending = time.time(), False
        self.tested = False  # a good optimizer step has run from the newest checkpoint's weights
        self.blocked = False  # the pending save was refused (logged once)
        self.preemption = Preemption()

    def due(self, g_it: int, log_step: bool) -> bool:
        """Whether a save is pending after iteration `g_it`; collective (the clock is rank 0's, a signal any
        rank's)."""
        if log_step and self.args.save_every_min > 0:
            self.pending |= dist.broadcast_object(time.time() - self.last_save >= 60 * self.args.save_every_min)
        self.pending |= self.args.save_every > 0 and (g_it + 1) % self.args.save_every == 0
        self.pending |= self.preemption.requested()
        return self.pending

    def step_done(self, res: StepResult) -> None:
        """Note a finished micro-step: a good optimizer step tests the newest checkpoint's weights."""
        self.tested |= res.stepped and not res.skipped

    def save(self, epoch: int, it: int, best_val: float, best: bool = False, unlogged_s: float = 0.0,
             epoch_end_pending: bool = False) -> float:
        """Collective save at position (epoch, it: the next iteration to run) -> the seconds it took; exits after
        it when a signal asked to stop and training is not over, or the end of epoch `epoch` is left to the resumed
        run (`epoch_end_pending`: a signal came before it or during it). Postponed (stays pending) when
        `Trainer.save_blocker` objects; a `best` one is then written as -best alone (save_best). `unlogged_s`: the
        training time since the last log line (`pop_metrics`), which the checkpoint's training time includes."""
        t0 = time.time()
        blocker = self.trainer.save_blocker()
        if blocker is not None:
            if not self.blocked:
                logger.warning("checkpoint %s not saved: %s (the next good step saves)",
                               position_text({"epoch": epoch, "iter": it}), blocker, extra=SAME_ON_ALL_RANKS)
            self.pending = self.blocked = True
            if best:
                self.save_best(epoch, it, best_val)
            return time.time() - t0
        state = self.state(epoch, it, best_val)
        state["trainer"]["train_seconds"] += unlogged_s
        state["epoch_end_pending"] = epoch_end_pending
        self.folder.save(state, best=best)
        self.last_save, self.pending, self.blocked, self.tested = time.time(), False, False, False
        if self.preemption.requested() and ((epoch, it) < (self.args.ep, 0) or epoch_end_pending):
            self.preemption.exit(f"{position_text({'epoch': epoch, 'iter': it})}: checkpoint {self.folder.last} saved")
        return self.last_save - t0

    def save_best(self, epoch: int, it: int, best_val: float) -> None:
        """Collective: the validated weights as -best only, where -last may not be written now (the last optimizer
        step was bad, or the epoch ends inside an accumulation window): a run never resumes from -best, and
        `best_val` already counts these weights. Not with a non-finite weight."""
        blocker = self.trainer.save_blocker(resume_point=False)
        if blocker is None:
            self.folder.save(self.state(epoch, it, best_val), best=True, last=False)
        else:
            logger.warning("the best val loss so far is not saved as %s: %s", self.folder.best.name, blocker,
                           extra=SAME_ON_ALL_RANKS)

    def state(self, epoch: int, it: int, best_val: float) -> dict[str, Any]:
        """What a checkpoint at (epoch, it) holds (Trainer.checkpoint and the run's flags, data and curve)."""
        curve = {"eval_history": self.evaluator.history} if self.evaluator else {}
        return self.trainer.checkpoint(epoch=epoch, iter=it, args=vars(self.args), best_val=best_val, data=self.data,
                                       **curve)

    def diverged(self, error: NonFiniteError) -> NonFiniteError:
        """`error` (bad steps stopped the run), saying which checkpoint a relaunch resumes from, after setting the
        newest one aside as `-diverged` if no good step ran from its weights. Collective."""
        aside = None if self.tested else self.folder.set_aside("diverged")
        note = f" The newest checkpoint held the weights the bad steps started from: moved to {aside}." if aside else ""
        resume = dist.broadcast_object(self.folder.resume_point() if dist.is_main_process() else None)
        return NonFiniteError(f"{error}{note} {resume}.")

    def close(self) -> None:
        self.preemption.close()


def log_progress(tb: TBLogger, metrics: dict[str, dict], args: argparse.Namespace, ep: int, it: int, iters: int,
                 g_it: int) -> None:
    """One log line and the TensorBoard scalars of `Trainer.pop_metrics`."""
    stats, opt, speed = metrics["train/"], metrics["opt/"], metrics["speed/"]
    grad_norm = stats.get("grad_norm")  # none without an optimizer step since the last line (--ac): "-", not nan
    logger.info("ep %d/%d it %d/%d | loss %.4f Lm %.4f Accm %.2f | lr %.3g wd %.3g gnorm %s%s | "
                "%.1f img/s %.0f tok/s", ep + 1, args.ep, it + 1, iters, stats["loss"], stats["Lm"], stats["Accm"],
                opt["lr"], opt["wd"], "-" if grad_norm is None else f"{grad_norm:.3f}",
                f" scale {opt['loss_scale']:g}" if opt["loss_scale"] is not None else "", speed["images_per_s"],
                speed["tokens_per_s"])
    for prefix, values in metrics.items():
        tb.scalars("steps", g_it, prefix, **values)


def images_after(epochs: int, iters: int, args: argparse.Namespace) -> int:
    """Training images seen after `epochs` epochs (whole global batches): the x axis of the evaluation curve."""
    return epochs * iters * args.glb_batch_size


def end_epoch(ep: int, iters: int, args: argparse.Namespace, trainer: Trainer, val_loader, tb: TBLogger,
              saver: Checkpointer, mvar: MVAR, best_val: float) -> float:
    """Validation, sample grid, evaluation and checkpoint after epoch `ep` (resuming from it starts the next epoch)
    -> the best val loss so far. A signal (a collective check before each of them, and between validation's
    batches and --eval_every's chunks) makes the checkpoint come first, marked so that the resumed run does this
    epoch's end before going on (`epoch_end_pending`), and the run exits: a preemption's grace period is short, and
    validation and --eval_every can outlast it."""
    best_before, is_best = best_val, False

    def signalled() -> bool:  # collective; not inside an accumulation window, which no checkpoint splits
        return not trainer.window_micro_steps and saver.preemption.requested()

    def validate() -> None:
        nonlocal best_val, is_best
        val = trainer.evaluate(val_loader, stop=signalled, dtype=inference_dtype(args, trainer))
        is_best = val["vL_tail"] < best_val  # VAR picks its best checkpoint by the last scale's loss
        best_val = min(best_val, val["vL_tail"])
        logger.info("ep %d val: L mean %.4f tail %.4f | acc mean %.2f tail %.2f (%d images)", ep + 1,
                    val["vL_mean"], val["vL_tail"], val["vacc_mean"], val["vacc_tail"], val["n"])
        tb.scalars("epochs", ep + 1, "val/", **val)

    def samples() -> None:
        if args.fsdp or dist.is_main_process():
            tb.image("epochs", "samples", sample_grid(mvar, mvar.num_classes, args.seed + ep,
                                                      inference_dtype(args, trainer)), ep + 1)

    def evaluate() -> None:
        logger.info("ep %d eval: generating %d images", ep + 1, args.eval_n)
        point = saver.evaluator.evaluate(mvar, ep + 1, images_after(ep + 1, iters, args), trainer.train_seconds,
                                         stop=signalled)
        scores = saver.evaluator.scores(point)
        logger.info("ep %d eval: %s after %d training images (%d generated)", ep + 1,
                    " ".join(f"{k} {v:.4f}" for k, v in scores.items()), point["images"], args.eval_n)
        tb.scalars("images", point["images"], "eval/", **scores)

    due = lambda every: every > 0 and ((ep + 1) % every == 0 or ep + 1 == args.ep)  # noqa: E731
    phases = [phase for phase, wanted in ((validate, due(args.val_every)), (samples, due(args.sample_every)),
                                          (evaluate, saver.evaluator is not None and due(args.eval_every))) if wanted]
    for phase in phases:  # after the last, a signal's checkpoint is the epoch end's own (below)
        stopped = signalled()
        if not stopped:
            try:
                phase()
            except Stopped:
                stopped = True
        if stopped:
            tb.flush()
            # exits; returns when the last step was bad (the checkpoint then waits for a good step, and the rest of
            # this epoch's end is not done)
            saver.save(ep + 1, 0, best_before, epoch_end_pending=True)
            break
    tb.flush()
    # a checkpoint never splits an accumulation window, except the final one: its partial window is dropped
    open_window = trainer.window_micro_steps
    if ep + 1 == args.ep and open_window:
        trainer.discard_partial_window()
        logger.warning("training ends inside an accumulation window: the last %d micro-step(s) were discarded "
                       "(--ac=%d does not divide the iterations run since the start or the resume)", open_window,
                       args.ac, extra=SAME_ON_ALL_RANKS)
    if not open_window or ep + 1 == args.ep:
        saver.save(ep + 1, 0, best_val, best=is_best)
    else:  # -last waits for the window's end, early in the next epoch
        saver.pending = True
        if is_best:
            saver.save_best(ep + 1, 0, best_val)
    return best_val


def check_kernels(args: argparse.Namespace, device: torch.device) -> None:
    """A forced --attn_backend / --mamba_backend (or its env var) that cannot run on this device in this run's
    precision: a BackendError before any work (else at the first step, and under --tfast from inside dynamo's
    trace, as its internal error with a traceback). Only the kernels the model's blocks use are checked."""
    config = model_shape(args)
    blocks = [(config.block_arch(i), config.block_branches(i)) for i in range(config.depth)]
    attn_backend, mamba_backend = backends.from_flags(args.attn_backend, args.mamba_backend, fuse=args.fuse)
    if any("attn" in branches and arch != "var" for arch, branches in blocks):  # VAR's: block-causal SDPA
        resolve_backend(attn_backend, device, effective_amp_dtype(device, AMP_DTYPES[args.fp16]) or torch.float32,
                        config.attn_drop_rate, config.embed_dim // config.num_heads)
    if any("mamba" in branches for _, branches in blocks):
        resolve_kernels(mamba_backend, device.type == "cuda", device)


def inference_dtype(args: argparse.Namespace, trainer: Trainer) -> torch.dtype | None:
    """The precision of validation, the epoch's sample grid and --eval_every's samples: fp32 (None; VAR validates in
    fp32), unless the attention kernel this run forces (--attn_backend, $MVAR_ATTN_BACKEND) runs fp16/bf16 only: then
    the training's autocast dtype."""
    attn_backend = backends.from_flags(args.attn_backend, args.mamba_backend, fuse=args.fuse)[0]  # as the model's
    try:
        resolve_backend(attn_backend, trainer.device, torch.float32)
    except backends.BackendError:
        return trainer.amp_dtype
    return None


@torch.no_grad()
def sample_grid(mvar: MVAR, num_classes: int, seed: int, dtype: torch.dtype | None = None, n: int = 16
                ) -> torch.Tensor:
    """A (3, H, W) grid of n class-conditional samples (classes 0, 1, ...) in `dtype` (None: fp32), without
    touching the training RNG."""
    was_training = mvar.training
    mvar.eval()
    devices = [mvar.pos_1LC.device] if mvar.pos_1LC.is_cuda else []
    with torch.random.fork_rng(devices=devices), mvar.inference_precision(dtype):
        labels = torch.arange(n, device=mvar.pos_1LC.device) % num_classes
        imgs = mvar.autoregressive_infer_cfg(n, labels, g_seed=seed, cfg=1.5, top_k=min(900, mvar.V), top_p=0.96)
    mvar.train(was_training)
    return torchvision.utils.make_grid(imgs.float().cpu(), nrow=int(math.sqrt(n)))


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def use_deterministic_kernels(device: torch.device) -> None:
    """--deterministic: before any kernel runs (cuBLAS reads its workspace setting at its first use, mamba_ssm its
    mode when the kernels are imported, at the first forward). torch's flash, memory-efficient and cuDNN attention
    add with atomics in their backward unless the deterministic mode is strict, which would also refuse ops that
    have no deterministic CUDA kernel: on CUDA, SDPA runs its math kernel instead (more memory at long scales), and
    the attention backends that cannot be deterministic are not chosen (models.attention)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        for enable in (torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                       torch.backends.cuda.enable_cudnn_sdp):
            enable(False)
    if os.environ.get("TRITON_CACHE_AUTOTUNING") == "1":  # read by mamba_ssm when its kernels are imported
        del os.environ["TRITON_CACHE_AUTOTUNING"]
        logger.warning("--deterministic: TRITON_CACHE_AUTOTUNING=1 ignored in this process. With it mamba_ssm keeps "
                       "every Triton config and relies on Triton's cache, which skips configs with pre-hooks: a "
                       "relaunched run could pick another config and differ; without it each kernel has one config",
                       extra=SAME_ON_ALL_RANKS)
    logger.info("deterministic kernels (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG=%s%s)",
                os.environ["CUBLAS_WORKSPACE_CONFIG"], ", SDPA's math kernel" if device.type == "cuda" else "")


def cudnn_benchmark(args: argparse.Namespace, device: torch.device) -> bool:
    """Whether cuDNN times its convolution algorithms (the tokenizer's) for this run's shapes, as VAR sets it
    (`seed_everything(benchmark=pg == 0)`: progressive training changes the shapes); not under --deterministic, where a
    relaunch must not time another algorithm faster."""
    return device.type == "cuda" and args.pg == 0 and not args.deterministic


def main(args: argparse.Namespace) -> None:
    device = dist.initialize(timeout_min=args.dist_timeout_min)
    rank, world = dist.get_rank(), dist.get_world_size()
    args = finalize_args(args, world)
    check_writable(Path(args.local_out_dir_path), "--local_out_dir_path")
    setup_logging(rank)  # log.txt once the folder's run lock is ours: a refused run writes nothing into a live one's
    folder = RunFolder(args.local_out_dir_path, "ar-ckpt")
    folder.open(rank0_state=args.fsdp,  # FSDP2 gathers the states on rank 0
                on_locked=lambda: setup_logging(rank, Path(args.local_out_dir_path)))
    set_tf32(device, args.tf32)
    torch.backends.cudnn.benchmark = cudnn_benchmark(args, device)
    if args.deterministic:
        use_deterministic_kernels(device)  # before the kernel check: torch_varlen refuses --deterministic
    check_kernels(args, device)
    logger.info("flags: %s", " ".join(f"--{k}={v}" for k, v in sorted(vars(args).items())))
    logger.info("world size %d, device %s; per-rank batch %d, global micro-batch %d, %d accumulation step(s), "
                "peak lr %.3g", world, device, args.batch_size, args.glb_batch_size, args.ac, args.tlr)
    if args.bs_effective != args.bs:
        logger.warning("--bs=%d is not a multiple of --ac x ranks (%d x %d): each optimizer step takes %d images",
                       args.bs, args.ac, world, args.bs_effective, extra=SAME_ON_ALL_RANKS)

    # resume: the output folder's newest checkpoint, else --resume. The folder wins so that a preempted job
    # relaunched with the same command continues instead of starting over.
    resume_path, ckpt = folder.load_resume(args.resume)
    args.seed = resolve_seed(args.seed, ckpt)
    logger.info("seed %d (a resume keeps it)", args.seed)  # the flags line above shows --seed=None when drawn
    changed = changed_flags(ckpt.get("args", {}), vars(args)) if ckpt is not None else []
    if changed:
        logger.info("resuming %s with changed flags: %s", resume_path, ", ".join(changed))
    init = read_start_files(args, ckpt, resume_path)
    torch.manual_seed(args.seed)  # the same initial weights for any world size

    # build: tokenizer (frozen, fp32) -> image size; data; model; trainer
    vae = load_tokenizer(args, device)
    reso = args.patch_nums[-1] * vae.downsample
    num_classes, train_set, val_set, eval_images, cache_views = build_data(args, vae, reso)
    # checked on resume: the labels' meaning always; mid-epoch, that the position points at the same images
    data = {"classes": class_names(train_set), "train_images": len(train_set), "tokens": cache_views,
            "train_files": file_list_digest(train_set),  # an image folder's (None for a cache, embedded data)
            "cache": content_digest(read_manifest(args.tokens)) if args.tokens else None}  # what its ids are
    if world > 1:  # one collective: the ranks' flags, tokenizer and data must agree
        facts = run_facts(vars(args), tokenizer_digest(vae), train_set, val_set,
                          (data["train_files"], file_list_digest(val_set)))
        if args.tokens:  # node-local caches: what their ids are (views, seed, source files, ...), not just their size
            facts["the token cache (digest of what its ids are)"] = data["cache"]
        refuse_disagreement(facts, FlagError, "the ranks do not train alike (another copy of the data, tokenizer or "
                            "flags on some node; paths may differ)")
    if 0 < args.num_classes < num_classes:
        raise FlagError(f"--num_classes={args.num_classes} is below the data's {num_classes} classes: the labels from "
                        f"{args.num_classes} on would be read as the unconditional (classifier-free guidance) label")
    num_classes = args.num_classes or num_classes
    train_loader, val_loader, sampler = build_loaders(train_set, val_set, args.batch_size, args.workers, rank,
                                                      world, args.seed, pin_memory=device.type == "cuda",
                                                      pad_eval=True,  # equal val batch counts: FSDP2, stop checks
                                                      seeded=not args.tokens)  # a cache's view: from the seed
    mvar = build_model(args, vae, num_classes, device, init)
    seed_everything(args.seed, rank, world)
    logger.info("%d train / %d val images at %dpx, %d classes; model %s: %.2fM params", len(train_set),
                len(val_set), reso, num_classes, mvar.extra_repr(), sum(p.numel() for p in mvar.parameters()) / 1e6)
    if args.vfast:
        vae.encoder.compile(mode=COMPILE_MODES[args.vfast])
    if args.tfast:
        mvar.compile_for_training(mode=COMPILE_MODES[args.tfast])
    iters = sampler.iters_per_epoch
    trainer = Trainer(vae, dist.wrap_model(mvar, device, fsdp=args.fsdp), device, lr=args.tlr, fused_adam=args.afuse,
                      schedule=build_schedule(args, iters), fp16=args.fp16, tclip=args.tclip, label_smooth=args.ls,
                      ac=args.ac, max_nonfinite=args.max_nonfinite, diverge_tol=args.diverge_tol)
    start_ep, start_it, best_val = (0, 0, math.inf) if ckpt is None else \
        trainer.resume(ckpt, resume_path, vars(args), data)
    epoch_end_pending = ckpt is not None and ckpt.get("epoch_end_pending", False)  # a signal's: done first, below
    evaluator = None
    if args.eval_every:
        evaluator = TrainingEval(net=args.eval_net, n=args.eval_n, seed=args.seed, cfg=args.eval_cfg,
                                 top_k=args.eval_top_k, top_p=args.eval_top_p, dtype=inference_dtype(args, trainer),
                                 tf32=args.tf32 and device.type == "cuda")
        evaluator.prepare(eval_images, num_classes, device)
        evaluator.load_history(ckpt.get("eval_history") if ckpt is not None else None)  # the curve goes on
    # a resume hides in TensorBoard what a killed run logged after its checkpoint, on each x axis
    # (a fresh start too: a run killed before its first checkpoint logged from the start)
    purge_from = {"steps": start_ep * iters + start_it, "epochs": start_ep + 1 - epoch_end_pending,
                  "images": images_after(start_ep, iters, args) + 1 - epoch_end_pending}
    del ckpt

    # loop
    tb = TBLogger(folder.dir / "tb", enabled=dist.is_main_process(), purge_from=purge_from)
    saver = Checkpointer(folder, trainer, args, data, evaluator)
    if epoch_end_pending:  # what a signal cut short or came before: validation, samples, evaluation, checkpoint
        logger.info("ep %d: its end (validation, samples, --eval_every) was left by a signal: done first", start_ep)
        best_val = end_epoch(start_ep - 1, iters, args, trainer, val_loader, tb, saver, mvar, best_val)
    for ep in range(start_ep, args.ep):
        sampler.set_epoch(ep, start_it if ep == start_ep else 0)
        t_log = time.time()  # validation, sampling and saving do not count against img/s
        for it, (inp_B3HW, label_B) in enumerate(train_loader, start=sampler.start_it):
            g_it = ep * iters + it
            try:
                res = trainer.scheduled_step(inp_B3HW, label_B, g_it)
            except NonFiniteError as e:
                raise saver.diverged(e) from None
            saver.step_done(res)
            log_step = (it + 1) % args.log_every == 0 or it + 1 == iters
            if log_step:
                log_progress(tb, trainer.pop_metrics(time.time() - t_log), args, ep, it, iters, g_it)
                t_log = time.time()
            # mid-epoch save (every N iterations or minutes; the epoch end saves anyway), at a window's end
            if saver.due(g_it, log_step) and res.stepped and it + 1 < iters:
                tb.flush()  # a signal's save exits: what was logged up to the checkpoint is kept
                t_log += saver.save(ep, it + 1, best_val, unlogged_s=time.time() - t_log)
        best_val = end_epoch(ep, iters, args, trainer, val_loader, tb, saver, mvar, best_val)
    tb.close()
    saver.close()
    if saver.blocked:
        logger.warning("the final checkpoint was not saved (see above): %s is the last one", folder.find_resume(),
                       extra=SAME_ON_ALL_RANKS)
    logger.info("training finished: %d epochs, best val loss %.4f", args.ep, best_val)


if __name__ == "__main__":
    try:
        dist.run_then_finalize(main, parse_args())
    except (FlagError, backends.BackendError, FileNotFoundError, CheckpointError, RunLockError, NonFiniteError,
            TokenCacheError, OutputFolderError, DataError, dist.LaunchError) as e:
        # a flag or file that does not fit, a diverged run (its message says which checkpoint is intact), a token
        # cache of other settings
        raise SystemExit(f"error: {e}") from e
