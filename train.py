"""Train M-VAR (or the VAR / ablation baselines) with VAR's recipe; single process, torchrun DDP or FSDP2.

    torchrun --nproc_per_node=8 [--nnodes=N --node_rank=R --master_addr=A --master_port=P] train.py \
        --depth=16 --bs=768 --ep=200 --fp16=1 --alng=1e-3 --wpe=0.1 --data_path=/path/to/imagenet

Without --data_path the embedded data set (--dataset, default mnist) is used. The output folder
(--local_out_dir_path) holds log.txt, TensorBoard events and checkpoints; a restarted run resumes from it
mid-epoch with the exact data order and RNG states.
"""
import argparse
import dataclasses
import logging
import math
import random
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.utils

import dist
from models.loading import DERIVED_KEYS, load_vae
from models.mvar import KERNEL_DEFAULTS, MVAR, MVARConfig
from models.tokenizer import VQVAE, VQVAEConfig
from trainer import Trainer, build_optimizer
from utils.args import finalize_args, parse_args
from utils.checkpoint import BEST, LAST, PREV, CheckpointError, find_resume_checkpoint, get_rng_state, \
    load_checkpoint, save_atomic, set_rng_state
from utils.data import build_datasets, build_loaders
from utils.logging_utils import Averager, TBLogger, setup_logging
from utils.lr_schedule import lr_factor, prog_state, set_lr_wd, wd_at
from utils.preemption import Preemption
from utils.run_lock import lock_output_folder
from utils.state_dict import load_state_dict_checked

logger = logging.getLogger("train")
COMPILE_MODES = {1: "reduce-overhead", 2: "max-autotune", 3: "default"}


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, vae: VQVAE, num_classes: int, device: torch.device) -> MVAR:
    """A freshly initialised model (VAR's init) whose config comes from the flags and the tokenizer."""
    config = MVARConfig(
        depth=args.depth, num_classes=num_classes, V=vae.vocab_size, Cvae=vae.Cvae, patch_nums=args.patch_nums,
        arch=args.arch, var_blocks=args.var_blocks, embed_dim=args.embed_dim, num_heads=args.num_heads,
        shared_aln=args.saln,
        attn_l2_norm=args.anorm, drop_path_rate=None if args.drop_path_rate < 0 else args.drop_path_rate,
        cond_drop_rate=args.cond_drop_rate, attn_backend="auto" if args.fuse else "sdpa",
        mamba_backend="auto" if args.fuse else "torch",
    )
    mvar = MVAR(config, vae=vae).to(device)
    mvar.init_weights(init_adaln=args.aln, init_adaln_gamma=args.alng, init_head=args.hd, init_std=args.ini,
                      gamma_rows=args.alng_rows)
    if args.init_from:
        ckpt = load_checkpoint(args.init_from, mmap=False)
        state = ckpt["model"] if "model" in ckpt and "config" in ckpt else ckpt
        load_state_dict_checked(mvar, state, ignore=DERIVED_KEYS, what=f"--init_from={args.init_from}")
        logger.info("initialised the weights from %s", args.init_from)
    return mvar


def is_checkpoint_writer(out_dir: Path) -> bool:
    """Rank 0 writes checkpoints; on other nodes, local rank 0 also writes when the output folder is not shared
    (so every node can resume from its own copy)."""
    token = dist.broadcast_object(uuid.uuid4().hex if dist.is_main_process() else None)
    marker = out_dir / ".run_token"
    if dist.is_main_process():
        marker.write_text(token)
    dist.barrier()
    if dist.is_main_process():
        return True
    shared = marker.is_file() and marker.read_text() == token
    return dist.get_local_rank() == 0 and not shared


def check_resumable(ckpt: dict[str, Any], path: Path, config: MVARConfig, vae: VQVAE, glb_batch_size: int) -> None:
    """Raise CheckpointError naming `path` when the checkpoint does not belong to this run's setup."""
    missing = [k for k in ("config", "model", "vae_config", "trainer", "epoch", "iter", "args", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint (missing {missing}); use --init_from "
                              f"to start from its weights")
    problems = []
    # kernel backends (--fuse) may change between runs
    old, new = {**ckpt["config"], **KERNEL_DEFAULTS}, {**dataclasses.asdict(config), **KERNEL_DEFAULTS}
    if MVARConfig(**old) != MVARConfig(**new):
        problems += [f"model {k}: checkpoint {old.get(k)!r}, this run {v!r}" for k, v in new.items() if old.get(k) != v]
    if VQVAEConfig(**ckpt["vae_config"]) != vae.config:
        problems.append("the tokenizer config differs (--vae_ckpt)")
    if ckpt["iter"] > 0 and ckpt["args"]["glb_batch_size"] != glb_batch_size:
        problems.append(f"global micro-batch {ckpt['args']['glb_batch_size']} vs {glb_batch_size} (--bs/--ac): a "
                        f"mid-epoch position needs the same batch")
    if problems:
        raise CheckpointError(f"checkpoint {path} is incompatible with this run: " + "; ".join(problems))


def save_checkpoint(out_dir: Path, writer: bool, trainer: Trainer, vae: VQVAE, args: argparse.Namespace,
                    epoch: int, it: int, best_val: float, also_best: bool = False) -> None:
    """Collective: every rank contributes its RNG state (and shards under FSDP2); writers save atomically.
    (epoch, it) is the position of the next iteration to run."""
    state = trainer.state_dict()
    rng = dist.all_gather_object(get_rng_state())
    if writer:
        ckpt = {"config": dataclasses.asdict(trainer.mvar.config), "model": state.pop("model"),
                "vae_config": dataclasses.asdict(vae.config), "vae": vae.state_dict(), "trainer": state,
                "epoch": epoch, "iter": it, "args": vars(args), "rng": rng, "best_val": best_val}
        t0 = time.time()
        save_atomic(ckpt, out_dir / LAST, keep_previous=out_dir / PREV)
        if also_best:
            save_atomic(ckpt, out_dir / BEST)
        logger.info("saved checkpoint %s (epoch %d, iter %d) in %.1fs", out_dir / LAST, epoch, it, time.time() - t0)
    dist.barrier()


def seed_everything(seed: int, rank: int, world_size: int) -> None:
    """Different, reproducible streams per rank (seed * world + rank), as VAR."""
    s = seed * world_size + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


@torch.no_grad()
def sample_grid(mvar: MVAR, num_classes: int, seed: int, n: int = 16) -> torch.Tensor:
    """A (3, H, W) grid of n class-conditional samples (classes 0, 1, ...), without touching the training RNG."""
    was_training = mvar.training
    mvar.eval()
    devices = [mvar.pos_1LC.device] if mvar.pos_1LC.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        labels = torch.arange(n, device=mvar.pos_1LC.device) % num_classes
        imgs = mvar.autoregressive_infer_cfg(n, labels, g_seed=seed, cfg=1.5, top_k=min(900, mvar.V), top_p=0.96)
    mvar.train(was_training)
    return torchvision.utils.make_grid(imgs.float().cpu(), nrow=int(math.sqrt(n)))


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> None:
    device = dist.initialize()
    rank, world = dist.get_rank(), dist.get_world_size()
    args = finalize_args(args, world)
    out_dir = Path(args.local_out_dir_path)
    if dist.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    setup_logging(rank, out_dir)
    node_writer = is_checkpoint_writer(out_dir)
    lock_output_folder(out_dir, holder=node_writer)  # held until the process exits
    writer = node_writer and (rank == 0 or not args.fsdp)  # FSDP2 gathers states on rank 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    logger.info("world size %d, device %s; per-rank batch %d, global micro-batch %d, %d accumulation step(s), "
                "peak lr %.3g", world, device, args.batch_size, args.glb_batch_size, args.ac, args.tlr)

    # resume: the output folder's newest checkpoint, else --resume; every rank must see the same decision. The
    # folder wins so that a preempted job relaunched with the same command continues instead of starting over.
    resume_path = find_resume_checkpoint(out_dir)
    if resume_path is not None and args.resume:
        logger.warning("--resume=%s ignored: %s has its own checkpoint %s", args.resume, out_dir, resume_path.name)
    elif args.resume:
        resume_path = Path(args.resume)
    try:
        ckpt = load_checkpoint(resume_path) if resume_path is not None else None
    except CheckpointError as e:
        if resume_path == out_dir / LAST and (out_dir / PREV).is_file():
            raise CheckpointError(f"{e}; the previous checkpoint {out_dir / PREV} is intact: move the bad file "
                                  f"aside and re-run to resume from it") from e
        raise
    positions = dist.all_gather_object(None if ckpt is None else (ckpt.get("epoch"), ckpt.get("iter")))
    if len(set(positions)) > 1:  # e.g. nodes with their own output folders, some without a checkpoint
        raise CheckpointError(f"the ranks would resume from different (epoch, iteration) points {positions} (None: "
                              f"from scratch): put the same checkpoint in every node's {out_dir}")
    if ckpt is not None and "args" in ckpt:
        if args.seed is not None and args.seed != ckpt["args"].get("seed"):
            logger.warning("--seed=%s ignored: resuming with the checkpoint's seed %s", args.seed, ckpt["args"]["seed"])
        args.seed = ckpt["args"]["seed"]
    if args.seed is None:
        args.seed = dist.broadcast_object(random.SystemRandom().randrange(2**31) if dist.is_main_process() else None)
    torch.manual_seed(args.seed)  # the same initial weights for any world size

    # tokenizer (frozen, fp32) -> image size; data; model
    try:
        vae = load_vae(args.vae_ckpt, device, v_patch_nums=args.patch_nums)
    except FileNotFoundError as e:
        if args.vae_ckpt or args.data_path:
            raise
        raise FileNotFoundError(f"{e}\nFor the embedded data set, a small tokenizer of your own is enough: "
                                "python scripts/train_tokenizer.py --reso=32 --ch=32 --ch_mult=1_1_2_2 "
                                "--z_channels=16 --vocab_size=512 --pn=1_2_3_4 --out_dir=local_output/tokenizer, "
                                "then --vae_ckpt=local_output/tokenizer/tokenizer-last.pth --pn=1_2_3_4 (make demo "
                                "does both)") from e
    reso = args.patch_nums[-1] * vae.downsample
    num_classes, train_set, val_set = build_datasets(args.data_path, args.dataset, reso, args.mid_reso, args.hflip)
    num_classes = args.num_classes or num_classes
    train_loader, val_loader, sampler = build_loaders(train_set, val_set, args.batch_size, args.workers, rank,
                                                      world, args.seed, pin_memory=device.type == "cuda",
                                                      pad_eval=args.fsdp)  # FSDP2: equal val batch counts
    mvar = build_model(args, vae, num_classes, device)
    seed_everything(args.seed, rank, world)
    logger.info("%d train / %d val images at %dpx, %d classes; model %s: %.2fM params", len(train_set),
                len(val_set), reso, num_classes, mvar.extra_repr(), sum(p.numel() for p in mvar.parameters()) / 1e6)
    if args.vfast:
        vae.encoder.compile(mode=COMPILE_MODES[args.vfast])
    if args.tfast:
        mvar.compile(mode=COMPILE_MODES[args.tfast])
    model = dist.wrap_model(mvar, device, fsdp=args.fsdp)
    trainer = Trainer(vae, model, build_optimizer(mvar, args.tlr, fused=args.afuse), device, fp16=args.fp16,
                      tclip=args.tclip, label_smooth=args.ls, ac=args.ac, max_nonfinite=args.max_nonfinite)

    start_ep, start_it, best_val = 0, 0, math.inf
    if ckpt is not None:
        check_resumable(ckpt, resume_path, mvar.config, vae, args.glb_batch_size)
        try:
            trainer.load_state_dict({**ckpt["trainer"], "model": ckpt["model"]})
        except Exception as e:
            raise CheckpointError(f"checkpoint {resume_path} cannot be loaded: {e}") from e
        start_ep, start_it, best_val = ckpt["epoch"], ckpt["iter"], ckpt.get("best_val", math.inf)
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank])
        else:
            logger.warning("checkpoint saved with %d ranks, running %d: RNG streams restart (not bit-exact)",
                           len(ckpt["rng"]), world)
        logger.info("resumed from %s at epoch %d, iteration %d", resume_path, start_ep, start_it)
        del ckpt

    tb = TBLogger(out_dir / "tb", enabled=dist.is_main_process())
    iters = sampler.iters_per_epoch
    max_it, wp_it, pgwp_it = args.ep * iters, args.wp * iters, args.pgwp * iters
    resos = [pn * vae.downsample for pn in args.patch_nums]
    meter, t_log, n_img, last_save = Averager(), time.time(), 0, time.time()
    save_pending, preemption = False, Preemption()
    for ep in range(start_ep, args.ep):
        sampler.set_epoch(ep, start_it if ep == start_ep else 0)
        for it, (inp_B3HW, label_B) in enumerate(train_loader, start=sampler.start_it):
            g_it = ep * iters + it
            lr = args.tlr * lr_factor(args.sche, g_it, wp_it, max_it, args.wp0, args.wpe)
            wd = wd_at(g_it, max_it, args.twd, args.twde)
            set_lr_wd(trainer.optimizer, lr, wd)
            prog_si, prog_wp = prog_state(g_it, wp_it, max_it, args.pg, args.pg0, len(args.patch_nums), pgwp_it)
            stepping = (g_it + 1) % args.ac == 0
            res = trainer.train_step(inp_B3HW.to(device, non_blocking=True), label_B.to(device, non_blocking=True),
                                     stepping=stepping, prog_si=prog_si, prog_wp=prog_wp)
            n_img += args.glb_batch_size
            meter.update(loss=res.loss)
            if res.grad_norm is not None:
                meter.update(grad_norm=res.grad_norm)

            if (it + 1) % args.log_every == 0 or it + 1 == iters:
                stats = meter.pop()
                stats["loss"] = dist.all_reduce_mean(stats["loss"].float()).item()
                stats.update(trainer.scale_metrics(res.logits_BLV, res.gt_BL, resos))
                dt = time.time() - t_log
                img_s, tok_s = n_img / dt, n_img * res.logits_BLV.shape[1] / dt
                logger.info("ep %d/%d it %d/%d | loss %.4f Lm %.4f Accm %.2f | lr %.3g wd %.3g gnorm %.3f%s | "
                            "%.1f img/s %.0f tok/s", ep + 1, args.ep, it + 1, iters, stats["loss"], stats["Lm"],
                            stats["Accm"], lr, wd, stats.get("grad_norm", float("nan")),
                            f" scale {res.loss_scale:g}" if res.loss_scale is not None else "", img_s, tok_s)
                tb.scalars(g_it, "train/", **stats)
                tb.scalars(g_it, "opt/", lr=lr, wd=wd, loss_scale=res.loss_scale, prog_si=prog_si, prog_wp=prog_wp)
                tb.scalars(g_it, "speed/", images_per_s=img_s, tokens_per_s=tok_s)
                t_log, n_img = time.time(), 0
                if args.save_every_min > 0:  # rank 0's clock decides for everyone
                    save_pending |= dist.broadcast_object(time.time() - last_save >= 60 * args.save_every_min)
            # a save due on a micro-step inside an accumulation window waits for the window's end
            save_pending |= args.save_every > 0 and (g_it + 1) % args.save_every == 0
            save_pending |= preemption.requested()  # collective: every rank stops after the same step
            if save_pending and stepping and it + 1 < iters:
                t_pause = time.time()
                save_checkpoint(out_dir, writer, trainer, vae, args, ep, it + 1, best_val)
                if preemption.requested():
                    preemption.exit(f"at epoch {ep}, iteration {it + 1}: checkpoint {out_dir / LAST} saved")
                last_save, save_pending = time.time(), False
                t_log += last_save - t_pause  # the save's time does not count against img/s

        # epoch end: validation, samples, checkpoint (resuming from it starts the next epoch)
        is_best = False
        if (ep + 1) % args.val_every == 0 or ep + 1 == args.ep:
            val = trainer.evaluate(val_loader, resos)
            is_best = val["vL_mean"] < best_val
            best_val = min(best_val, val["vL_mean"])
            logger.info("ep %d val: L mean %.4f tail %.4f | acc mean %.2f tail %.2f (%d images)", ep + 1,
                        val["vL_mean"], val["vL_tail"], val["vacc_mean"], val["vacc_tail"], val["n"])
            tb.scalars(ep + 1, "val/", **val)
        if args.sample_every > 0 and ((ep + 1) % args.sample_every == 0 or ep + 1 == args.ep) \
                and (args.fsdp or dist.is_main_process()):
            tb.image("samples", sample_grid(mvar, num_classes, seed=args.seed + ep), ep + 1)
        tb.flush()
        # a checkpoint never splits an accumulation window, except the final one: its partial window is dropped
        whole_window = (ep + 1) * iters % args.ac == 0
        if ep + 1 == args.ep and not whole_window:
            trainer.optimizer.zero_grad(set_to_none=True)
            logger.warning("training ends inside an accumulation window: the last %d micro-step(s) were discarded "
                           "(--ac=%d does not divide %d iterations)", (ep + 1) * iters % args.ac, args.ac,
                           (ep + 1) * iters)
        if whole_window or ep + 1 == args.ep:
            save_checkpoint(out_dir, writer, trainer, vae, args, ep + 1, 0, best_val, also_best=is_best)
            last_save, save_pending = time.time(), False
            if preemption.requested() and ep + 1 < args.ep:
                preemption.exit(f"after epoch {ep + 1}: checkpoint {out_dir / LAST} saved")
        elif is_best:
            logger.warning("ep %d has the best val loss so far but is not saved as %s: the epoch ends inside an "
                           "accumulation window (choose --ac dividing the %d iterations per epoch)", ep + 1, BEST,
                           iters)
        t_log, n_img = time.time(), 0  # validation, sampling and saving do not count against img/s
    tb.close()
    preemption.close()
    logger.info("training finished: %d epochs, best val loss %.4f", args.ep, best_val)


if __name__ == "__main__":
    dist.run_then_finalize(main, parse_args())
