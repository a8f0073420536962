"""Training of VAR's multi-scale residual VQVAE tokenizer (models.tokenizer.VQVAE, any size); the CLI is
scripts/train_tokenizer.py.

Loss = w_l1 * L1 + w_l2 * MSE (reconstruction) + w_vq * VAR's VQ loss (commitment + codebook, straight-through)
       [+ w_percep * LPIPS] [+ w_gan * hinge GAN loss of a PatchGAN discriminator, from step --gan_start;
       --gan_weight=adaptive scales it by VQGAN's adaptive weight].
--fp16 runs the networks under autocast (1 fp16 with train.py's loss scaling, 2 bf16; the quantizer's code search
and the losses stay fp32).
Per-scale codebook usage is logged; every --reinit_every steps the codes no scale uses are re-initialised from
the residuals the quantizer sees on the current batch. Runs on one process or under torchrun (DDP).

The output folder holds `tokenizer-last.pth` ({"vae_config", "vae", ...}: load it with models.loading.load_vae,
or pass it to train.py / sample.py as --vae_ckpt) and `tokenizer-prev.pth`; a run restarted with the same
--out_dir resumes from them (utils.run.checkpoint: the same seeding, saving and resume rules as train.py).
"""
import argparse
import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dist
from models.loading import vae_checkpoint, weights_digest
from models.precision import AMP_DTYPES, amp_autocast, effective_amp_dtype
from models.presets import parse_patch_nums
from models.quantizer import USAGE_MARGIN
from models.tokenizer import VQVAE, VQVAEConfig
from models.vae_nets import NORM_GROUPS
from models.vq_losses import PatchDiscriminator, adaptive_gan_weight, build_perceptual_loss, hinge_d_loss, \
    hinge_g_loss, perceptual_loss_problem
from utils.data.loaders import build_datasets, build_loaders, image_source_problem, mid_reso_problem
from utils.flags import DefaultsHelpFormatter, add_dist_timeout_flag, add_image_source_flags, changed_flags, \
    str2bool
from utils.run.agreement import refuse_disagreement, run_facts
from utils.run.checkpoint import RunFolder, check_writable
from utils.run.divergence import DivergenceGuard
from utils.run.log import SAME_ON_ALL_RANKS, TBLogger, setup_logging
from utils.run.loss_scale import LossScaler
from utils.run.preemption import Preemption
from utils.run.rng import gather_rng_states, resolve_seed, restore_rng_states, seed_everything, seed_problem
from utils.run.schedule import lr_factor, schedule_problem

logger = logging.getLogger(__name__)
WP0, WPE = 0.005, 0.01  # lr ratios at the start of the warm-up and at the end (train.py's --wp0 / --wpe defaults)


def int_list(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split("_"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train VAR's multi-scale VQVAE tokenizer.",
                                formatter_class=DefaultsHelpFormatter, allow_abbrev=False)
    g = p.add_argument_group("data")
    add_image_source_flags(g)
    g.add_argument("--reso", type=int, default=32, help="image side in pixels")
    g.add_argument("--mid_reso", type=float, default=1.125, help="resize the shorter side to mid_reso*reso, then "
                   "random-crop reso")
    g.add_argument("--hflip", type=str2bool, nargs="?", const=True, default=False, help="random horizontal flip "
                   "(`--hflip` alone: on)")
    g.add_argument("--workers", type=int, default=0, help="data-loader processes per rank")
    g.add_argument("--val_limit", type=int, default=0, help="validate on the first N validation images only (0 = all)")
    g = p.add_argument_group("tokenizer (VQVAEConfig)")
    g.add_argument("--vocab_size", type=int, default=512, help="codebook size V")
    g.add_argument("--z_channels", type=int, default=16, help="latent channels Cvae")
    g.add_argument("--ch", type=int, default=32, help="base width (a multiple of 32: GroupNorm groups)")
    g.add_argument("--ch_mult", type=int_list, default=(1, 1, 2, 2), help="width multipliers per level, '_'-joined; "
                   "downsample = 2**(levels-1)")
    g.add_argument("--pn", default="1_2_3_4", help="patch schedule (256, 512 or sides joined by '_'); the last side "
                   "must equal reso / downsample")
    g.add_argument("--share_quant_resi", type=int, default=4,
                   help="phi convs: 0 one per scale, 1 one for all, K >= 2 K convs shared over the scales (VAR: 4)")
    g.add_argument("--quant_resi", type=float, default=0.5, help="phi mixing ratio r")
    g.add_argument("--beta", type=float, default=0.25, help="commitment weight inside the VQ loss")
    g = p.add_argument_group("loss")
    g.add_argument("--w_l1", type=float, default=1.0, help="L1 reconstruction weight")
    g.add_argument("--w_l2", type=float, default=1.0, help="MSE reconstruction weight")
    g.add_argument("--w_vq", type=float, default=1.0, help="VQ loss weight")
    g.add_argument("--w_percep", type=float, default=0.0, help="LPIPS weight (> 0 needs the lpips package and "
                   "torchvision's VGG16 weights in the torch hub cache: nothing is downloaded)")
    g.add_argument("--w_gan", type=float, default=0.0, help="generator hinge-loss weight (0: no discriminator)")
    g.add_argument("--gan_weight", choices=("fixed", "adaptive"), default="fixed",
                   help="fixed: the generator term weighs --w_gan; adaptive: --w_gan x VQGAN's adaptive weight, the "
                   "reconstruction loss's gradient norm over the GAN loss's at the decoder's last layer (in [0, 1e4])")
    g.add_argument("--gan_start", type=int, default=0, help="step at which the GAN terms switch on")
    g.add_argument("--disc_ch", type=int, default=64, help="PatchGAN base width")
    g.add_argument("--disc_layers", type=int, default=3, help="PatchGAN stride-2 layers (fewer for tiny images)")
    g.add_argument("--reinit_every", type=int, default=100, help="re-initialise dead codes every N steps (0: never)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000, help="training iterations")
    g.add_argument("--bs", type=int, default=64, help="global batch size")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (tokenizer and discriminator)")
    g.add_argument("--wd", type=float, default=0.0, help="AdamW weight decay (weight matrices and kernels; not the "
                   "norms, biases or codebook)")
    g.add_argument("--wp", type=float, default=0.02, help="warm-up, as a fraction of --steps, in [0, 1) (train.py's "
                   "--wp counts epochs)")
    g.add_argument("--sche", default="cos", help="lr schedule after warm-up (utils.run.schedule)")
    g.add_argument("--clip", type=float, default=2.0, help="gradient-norm clip (0: off)")
    g.add_argument("--max_nonfinite", type=int, default=20, help="a step with a non-finite loss or gradient is "
                   "skipped; stop after this many in a row (train.py's flag)")
    g.add_argument("--fp16", type=int, default=0, choices=(0, 1, 2), help="0 fp32; 1 fp16 autocast of the networks "
                   "(tokenizer, LPIPS, discriminator) with train.py's GradScaler for each optimiser; 2 bf16 autocast "
                   "(fp32 on a CPU without bf16 instructions, logged). The quantizer's code search and the losses "
                   "stay fp32")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default="local_output/tokenizer", help="checkpoint/log folder (auto-resume)")
    g.add_argument("--log_every", type=int, default=50, help="log every N steps")
    g.add_argument("--save_every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    g.add_argument("--seed", type=int, default=0, help="global seed (initial weights; then rank r of W "
                   "uses seed * W + r)")
    add_dist_timeout_flag(g)
    return p


def build_vae(args: argparse.Namespace) -> VQVAE:
    """A trainable VQVAE from the flags; checks that the patch schedule fits the resolution."""
    vae = VQVAE(vocab_size=args.vocab_size, z_channels=args.z_channels, ch=args.ch, ch_mult=args.ch_mult,
                beta=args.beta, quant_resi=args.quant_resi, share_quant_resi=args.share_quant_resi,
                v_patch_nums=parse_patch_nums(args.pn), test_mode=False)
    if args.reso != vae.v_patch_nums[-1] * vae.downsample:
        raise ValueError(f"--reso={args.reso} but --pn ends at {vae.v_patch_nums[-1]} with downsample "
                         f"{vae.downsample} (--ch_mult has {len(args.ch_mult)} levels): expected --reso="
                         f"{vae.v_patch_nums[-1] * vae.downsample}")
    return vae


def check_flags(args: argparse.Namespace, world: int) -> VQVAEConfig:
    """Every flag that needs no data, before the data set is listed: ValueError naming each bad one -> the
    tokenizer's config (built on the meta device: no weights, no random draws)."""
    problems = [f"--{k}={getattr(args, k)}: expected a positive integer" for k in (
        "bs", "steps", "log_every", "save_every", "max_nonfinite", "vocab_size", "z_channels") if getattr(args, k) < 1]
    if min(args.ch_mult) < 1:
        problems.append(f"--ch_mult={'_'.join(map(str, args.ch_mult))}: expected positive width multipliers")
    problems += [f"--{k}={getattr(args, k)}: expected >= 0{what}" for k, what in (
        ("workers", " (0: load in the main process)"), ("val_limit", " (0 = all)"),
        ("share_quant_resi", " (0 one phi per scale, 1 one for all, K >= 2 K shared)")) if getattr(args, k) < 0]
    if args.ch < 1 or args.ch % NORM_GROUPS:
        problems.append(f"--ch={args.ch}: expected a positive multiple of {NORM_GROUPS} (the GroupNorm groups)")
    # phi(h) = (1 - |r|) h + |r| conv(h) (models.quantizer.Phi: VAR's abs): a mix for |r| <= 1 (0: no phi), beyond it
    # an extrapolation that scales h by a negative factor
    if not (math.isfinite(args.quant_resi) and abs(args.quant_resi) <= 1):
        problems.append(f"--quant_resi={args.quant_resi}: expected a finite mixing ratio in [-1, 1] (phi mixes "
                        f"(1 - |r|) h + |r| conv(h); 0: no phi; VAR: 0.5)")
    try:
        parse_patch_nums(args.pn)
    except ValueError as e:
        problems.append(f"--pn={args.pn}: {e}")
    problems += [f"--{k}={getattr(args, k)}: expected a finite number >= 0" for k in (
        "w_l1", "w_l2", "w_vq", "w_percep", "w_gan", "wd", "clip", "beta", "gan_start", "reinit_every")
        if not getattr(args, k) >= 0 or not math.isfinite(getattr(args, k))]
    if not (math.isfinite(args.lr) and args.lr > 0):
        problems.append(f"--lr={args.lr}: expected a positive learning rate")
    if args.gan_weight == "adaptive" and not args.w_gan > 0:
        problems.append(f"--gan_weight=adaptive scales the GAN term, which --w_gan={args.w_gan} leaves out: pass "
                        f"--w_gan > 0")
    disc_ok = args.disc_ch >= 2 and args.disc_layers >= 1
    if args.w_gan > 0 and not disc_ok:
        problems.append(f"--disc_ch={args.disc_ch} --disc_layers={args.disc_layers}: the discriminator needs a width "
                        f"of at least 2 and at least one layer")
    if args.bs % world:
        problems.append(f"--bs={args.bs} is not divisible by the {world} processes")
    if problem := mid_reso_problem(args.mid_reso):
        problems.append(problem)
    if problem := seed_problem(args.seed):
        problems.append(problem)
    if problem := image_source_problem(args.data_path, args.dataset):
        problems.append(problem)
    if not 0 <= args.wp < 1:
        problems.append(f"--wp={args.wp}: the warm-up is a fraction of --steps, in [0, 1) (train.py's --wp counts "
                        "epochs)")
    if args.w_percep > 0 and (why_not := perceptual_loss_problem()):
        problems.append(f"--w_percep={args.w_percep:g} needs LPIPS, unavailable offline: {why_not}; --w_percep=0 "
                        "trains without the perceptual term")
    if problem := schedule_problem(args.sche, wp0=WP0, wpe=WPE):
        problems.append(problem)
    if problems:  # before the networks are built from the flags (a size of 0 builds a tensor of nothing)
        raise ValueError("; ".join(problems))
    with torch.device("meta"):
        config = build_vae(args).config
    try:
        with torch.device("meta"):
            if args.w_gan > 0 and disc_ok:
                PatchDiscriminator(ch=args.disc_ch, n_layers=args.disc_layers)(torch.zeros(1, 3, args.reso, args.reso))
    except RuntimeError as e:
        raise ValueError(f"--disc_layers={args.disc_layers} does not fit --reso={args.reso} ({e}): use fewer "
                         "layers") from None
    return config


def check_resume(ckpt: dict[str, Any], config: VQVAEConfig, resume_path: Path, args: argparse.Namespace) -> None:
    """A resumed run keeps its tokenizer: ValueError naming each config field the flags change (the weights' shapes
    or their math); other changed flags are logged, as train.py does."""
    saved_wd = ckpt.get("args", {}).get("wd", args.wd)
    if (saved_wd == 0) != (args.wd == 0):  # one AdamW group without decay, two with: the saved state fits neither
        raise ValueError(f"--wd={args.wd:g}: {resume_path} was trained with --wd={saved_wd:g}, and its optimizer "
                         f"state has {'one parameter group' if saved_wd == 0 else 'two parameter groups'} for it: "
                         f"resume with a {'zero' if saved_wd == 0 else 'non-zero'} --wd, or choose another --out_dir")
    saved = dataclasses.asdict(VQVAEConfig(**ckpt["vae_config"]))
    differ = [f"{k} {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(config).items() if saved[k] != v]
    if differ:
        raise ValueError(f"{resume_path} is a tokenizer of another configuration ({', '.join(differ)}): resume it "
                         f"with its flags, or choose another --out_dir")
    if changed := changed_flags(ckpt.get("args", {}), vars(args)):
        logger.info("resuming %s with changed flags: %s", resume_path, ", ".join(changed))


@torch.no_grad()
def quantizer_residuals(vae: VQVAE, img_B3HW: torch.Tensor) -> torch.Tensor:
    """The vectors the codebook is matched against, over all scales: rows of f - f_hat(previous scales),
    area-downsampled to each scale (full size at the last), of every rank's images (collective) in the order one
    process with the global batch has them -> (N, Cvae)."""
    f_BChw = vae.img_to_f(img_B3HW)
    f_hats = vae.quantize.f_to_idxBl_or_fhat(f_BChw, to_fhat=True)
    rows, prev = [], torch.zeros_like(f_BChw)
    for si, pn in enumerate(vae.v_patch_nums):
        rest_BChw = f_BChw - prev
        if si < len(vae.v_patch_nums) - 1:
            rest_BChw = F.interpolate(rest_BChw, size=(pn, pn), mode="area")
        rows.append(dist.all_gather_cat(rest_BChw.permute(0, 2, 3, 1).reshape(-1, vae.Cvae)))
        prev = f_hats[si]
    return torch.cat(rows)


def freeze_unused_phis(vae: VQVAE) -> None:
    """Freeze the phi convs that no scale selects (e.g. 4 shared convs for 3 scales): they never get a gradient,
    which DDP (find_unused_parameters=False) would otherwise reject."""
    SN = len(vae.v_patch_nums)
    used = {id(vae.quantize.phi(si, SN)) for si in range(SN)}
    unused = [m for m in vae.quantize.quant_resi.modules() if isinstance(m, nn.Conv2d) and id(m) not in used]
    for m in unused:
        m.requires_grad_(False)
    if unused:
        logger.info("%d of the phi convs serve none of the %d scales: frozen", len(unused), SN)


CODEBOOK = "quantize.embedding.weight"
# train_step's logged terms, in log order
LOGGED = ("loss", "l1", "l2", "vq", "percep", "g", "gan_weight", "d", "grad_norm", "loss_scale")
OPT_LOGGED = ("loss_scale",)  # in TensorBoard under opt/ with the learning rate, as train.py logs them
UNSTABLE_HINT = "lower --lr or raise --clip. The last checkpoint holds the weights from before them."


def weight_decay_groups(vae: nn.Module, wd: float) -> list[dict[str, Any]]:
    """AdamW's groups for --wd: decay on the weight matrices and kernels, none on 1-D parameters (norms, biases) nor
    on the codebook, as VAR's generator is decayed; one group without decay when --wd is 0 (the default)."""
    params = list(vae.named_parameters())  # frozen ones too (unused phis): AdamW skips them, older states resume
    if wd == 0:
        return [{"params": [p for _, p in params], "weight_decay": 0.0}]
    decay = [p for n, p in params if p.ndim > 1 and n != CODEBOOK]
    no_decay = [p for n, p in params if p.ndim <= 1 or n == CODEBOOK]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


class TokenizerTrainer:
    """Optimisers, loss terms and one training step; `vae_ddp` is the (possibly DDP-wrapped) VQVAE."""

    def __init__(self, vae: VQVAE, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        self.vae = vae.to(device).train()
        if dist.initialized():
            self.vae.quantize.hit_reducer = dist.all_reduce_sum
        freeze_unused_phis(self.vae)
        self.vae_ddp = dist.wrap_model(self.vae, device)
        self.opt = torch.optim.AdamW(weight_decay_groups(self.vae, args.wd), lr=args.lr, betas=(0.5, 0.9))
        self.percep = None
        if args.w_percep > 0:
            self.percep, why_not = build_perceptual_loss(device)
            if self.percep is None:  # check_flags says so first
                raise ValueError(f"--w_percep={args.w_percep:g} needs LPIPS, unavailable offline: {why_not}")
        self.disc = self.disc_ddp = self.disc_opt = None
        if args.w_gan > 0:
            self.disc = PatchDiscriminator(ch=args.disc_ch, n_layers=args.disc_layers).to(device).train()
            self.disc_ddp = dist.wrap_model(self.disc, device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=args.lr, betas=(0.5, 0.9), weight_decay=0)
        self.amp_dtype = effective_amp_dtype(device, AMP_DTYPES[args.fp16])  # bf16 on a CPU without it: fp32
        fp16 = self.amp_dtype == torch.float16  # a loss scaler per optimiser, as train.py's
        self.scaler = LossScaler(device.type, args.max_nonfinite, UNSTABLE_HINT) if fp16 else None
        self.disc_scaler = LossScaler(device.type, args.max_nonfinite, UNSTABLE_HINT) \
            if fp16 and self.disc is not None else None
        self.step = 0
        self.guard = DivergenceGuard(tol=0.0)  # non-finite steps only: the loss terms have no common scale

    def set_lr(self) -> float:
        a = self.args
        lr = a.lr * lr_factor(a.sche, self.step, a.wp * a.steps, a.steps, wp0=WP0, wpe=WPE)
        for opt in (self.opt, self.disc_opt):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = lr
        return lr

    def loss_scale(self) -> float:
        """The tokenizer's fp16 loss scale (1 without fp16)."""
        return 1.0 if self.scaler is None else self.scaler.get_scale()

    def autocast(self) -> contextlib.AbstractContextManager:
        """--fp16's autocast for the networks' forward passes (the quantizer turns it off for its code search)."""
        return amp_autocast(self.device, self.amp_dtype)

    def train_step(self, img_B3HW: torch.Tensor, ret_usages: bool = False) -> dict[str, Any]:
        """One update of the tokenizer (and of the discriminator when the GAN is on) -> logged values: losses as
        detached 0-dim device tensors (the caller converts them on log steps), "lr" a float. A step whose loss or
        gradient is non-finite on any rank updates nothing (one host sync per step for that judgement);
        --max_nonfinite of them in a row raise NonFiniteError. The networks run under --fp16's autocast, the losses
        in fp32; under fp16 an overflow of the scaled gradients is GradScaler's skipped step (utils.run.loss_scale):
        it updates neither network."""
        a = self.args
        lr = self.set_lr()
        img_B3HW = img_B3HW.to(self.device, non_blocking=True)
        with self.autocast():
            rec_B3HW, usages, vq_loss = self.vae_ddp(img_B3HW, ret_usages=ret_usages)
        rec_B3HW = rec_B3HW.float()
        l1, l2 = F.l1_loss(rec_B3HW, img_B3HW), F.mse_loss(rec_B3HW, img_B3HW)
        rec_loss = a.w_l1 * l1 + a.w_l2 * l2  # the reconstruction terms (the adaptive GAN weight's reference)
        out: dict[str, Any] = {"l1": l1.detach(), "l2": l2.detach(), "vq": vq_loss.detach(), "lr": lr}
        if self.percep is not None:
            with self.autocast():
                percep = self.percep(rec_B3HW, img_B3HW).float().mean()
            rec_loss = rec_loss + a.w_percep * percep
            out["percep"] = percep.detach()
        loss = rec_loss + a.w_vq * vq_loss
        gan_on = self.disc is not None and self.step >= a.gan_start
        weight_overflow = None
        if gan_on:
            self.disc.requires_grad_(False)  # the generator term needs no discriminator gradients (nor DDP sync)
            with self.autocast():
                logits = self.disc(rec_B3HW)
            g_loss = hinge_g_loss(logits.float())
            weight = a.w_gan
            if a.gan_weight == "adaptive":  # VQGAN's: the GAN term's gradient scaled to the reconstruction's
                adaptive = adaptive_gan_weight(rec_loss, g_loss, self.vae.decoder.conv_out.weight,
                                               reduce=dist.all_reduce_mean, scale=self.loss_scale())
                if self.scaler is not None:  # NaN: a gradient overflowed fp16 at this scale, so the step is an overflow
                    weight_overflow = adaptive.isnan()
                    adaptive = adaptive.nan_to_num(nan=0.0)
                out["gan_weight"] = adaptive
                weight = weight * adaptive
            loss = loss + weight * g_loss
            out["g"] = g_loss.detach()
        self.opt.zero_grad(set_to_none=True)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if weight_overflow is not None:  # an overflow of the adaptive weight's gradients is GradScaler's too
            grad = self.vae.decoder.conv_out.weight.grad
            grad.copy_(torch.where(weight_overflow, math.inf, grad))
        if self.scaler is not None:
            out["loss_scale"] = torch.tensor(self.loss_scale(), device=self.device)  # the scale this step ran at
            self.scaler.unscale_(self.opt)
        grad_norm = nn.utils.clip_grad_norm_(self.vae.parameters(), a.clip if a.clip > 0 else math.inf)
        if a.clip > 0:
            out["grad_norm"] = grad_norm
        # one judgement for all ranks (the loss averaged, the norm of the synced gradients): a bad step is skipped
        loss_mean, norm = dist.all_reduce_mean(loss.detach().clone()).item(), grad_norm.item()
        overflow = self.scaler is not None and self.scaler.is_overflow(loss_mean, norm)
        reason = self.guard.update(loss_mean, math.isfinite(norm) or overflow)
        if reason is None:
            self.opt.step() if self.scaler is None else self.scaler.step(self.opt)  # GradScaler's skips an overflow
        if self.scaler is not None:
            self.scaler.update_capped()
        if gan_on:
            self.disc.requires_grad_(True)
            with self.autocast():
                logits = self.disc_ddp(torch.cat([img_B3HW, rec_B3HW.detach()]))  # one pass: GroupNorm is per image
            d_loss = hinge_d_loss(*logits.float().chunk(2))
            self.disc_opt.zero_grad(set_to_none=True)
            (d_loss if self.disc_scaler is None else self.disc_scaler.scale(d_loss)).backward()
            d_mean = dist.all_reduce_mean(d_loss.detach().clone()).item()
            if reason is None and not overflow and math.isfinite(d_mean):
                if self.disc_scaler is not None:
                    self.disc_scaler.unscale_(self.disc_opt)
                d_norm = nn.utils.clip_grad_norm_(self.disc.parameters(), math.inf).item()  # the norm only
                if self.disc_scaler is None and math.isfinite(d_norm):
                    self.disc_opt.step()
                elif self.disc_scaler is None:  # a finite loss, a non-finite gradient: NaN would enter its weights
                    logger.warning("step %d's discriminator gradient is not finite: its update is skipped",
                                   self.step + 1)
                else:  # an overflow of its own gradients: GradScaler skips its update and lowers its scale
                    self.disc_scaler.step(self.disc_opt)
                    self.disc_scaler.update_capped()
                    if self.disc_scaler.is_overflow(d_mean, d_norm):
                        self.disc_scaler.skipped(f"step {self.step + 1}'s discriminator update")
            out["d"] = d_loss.detach()
        out["loss"] = loss.detach()
        self.step += 1
        if overflow:
            self.scaler.skipped(f"step {self.step}'s update")
        if reason is not None:
            self.guard.skipped(reason, f"step {self.step}'s update", a.max_nonfinite, UNSTABLE_HINT)
        if a.reinit_every > 0 and self.step % a.reinit_every == 0:
            out["reinit"] = self.reinit_dead_codes(img_B3HW, tokens_per_step=img_B3HW.shape[0] * dist.get_world_size()
                                                   * sum(pn * pn for pn in self.vae.v_patch_nums))
        if usages is not None:
            out["usage"] = usages
        return out

    @torch.no_grad()
    def reinit_dead_codes(self, img_B3HW: torch.Tensor, tokens_per_step: int) -> int:
        """Codes whose usage EMA summed over scales is below VAR's usage margin get a random residual vector of
        the global batch, drawn by a generator of (--seed, step): the same codes for any world size (collective).
        Their Adam moments are cleared; their usage EMA is left as it was (below the margin), so the next check keeps
        a new code only if it was used at about 1 / (1 - 0.99**100) = 1.58x the margin since at --reinit_every=100
        (4.5x at the demo's 25): a faster turnover than judging it at the margin, which measured 0.03-0.08 dB lower
        PSNR on the demo's tokenizer over three seeds. Returns how many were reset."""
        quantize = self.vae.quantize
        dead_V = quantize.ema_vocab_hit_SV.sum(0) < tokens_per_step / quantize.vocab_size * USAGE_MARGIN
        n_dead = int(dead_V.sum())
        if n_dead == 0:
            return 0
        was_training = self.vae.training
        self.vae.eval()
        rows_NC = quantizer_residuals(self.vae, img_B3HW)
        self.vae.train(was_training)
        g = torch.Generator(rows_NC.device).manual_seed(self.args.seed * 1_000_003 + self.step)
        pick = torch.randint(len(rows_NC), (n_dead,), device=rows_NC.device, generator=g)
        noise = torch.randn((n_dead, rows_NC.shape[1]), device=rows_NC.device, generator=g)
        weight_VC = quantize.embedding.weight
        weight_VC[dead_V] = rows_NC[pick] + 1e-3 * rows_NC.std() * noise
        dist.broadcast(weight_VC.data, src=0)  # equal on every rank already, unless unlike devices reduce std apart
        state = self.opt.state.get(weight_VC, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead_V] = 0
        return n_dead

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs; collective (every rank's RNG state is gathered), so call it on all ranks."""
        ckpt = {**vae_checkpoint(self.vae), "optimizer": self.opt.state_dict(), "step": self.step,
                "args": vars(self.args), "rng": gather_rng_states(), "guard": self.guard.state_dict()}
        if self.disc is not None:
            ckpt.update(disc=self.disc.state_dict(), disc_optimizer=self.disc_opt.state_dict())
        for name in ("scaler", "disc_scaler"):
            if getattr(self, name) is not None:
                ckpt[name] = getattr(self, name).state_dict()
        return ckpt

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.vae.load_state_dict(ckpt["vae"], strict=True)
        self.opt.load_state_dict(ckpt["optimizer"])
        if self.disc is not None and "disc" in ckpt:
            shapes = {k: v.shape for k, v in self.disc.state_dict().items()}
            if shapes == {k: v.shape for k, v in ckpt["disc"].items()}:
                self.disc.load_state_dict(ckpt["disc"], strict=True)
                self.disc_opt.load_state_dict(ckpt["disc_optimizer"])
            elif int(ckpt["step"]) <= (saved_start := ckpt["args"].get("gan_start", 0)):  # nothing learned is lost
                logger.warning("the checkpoint's discriminator (never trained: step %d <= its run's --gan_start=%d) "
                               "has other shapes than --disc_ch/--disc_layers give: starting a new one",
                               int(ckpt["step"]), saved_start, extra=SAME_ON_ALL_RANKS)
            else:  # judged by the run that trained it: a resume with a later --gan_start has not untrained it
                raise ValueError(f"the checkpoint's discriminator, trained since --gan_start={saved_start}, "
                                 f"has other shapes than --disc_ch={self.args.disc_ch} --disc_layers="
                                 f"{self.args.disc_layers} give: resume with its flags")
        for name in ("scaler", "disc_scaler"):  # fp16's loss scales (a run resumed into fp16 starts at 2**11)
            if getattr(self, name) is not None and name in ckpt:
                getattr(self, name).load_state_dict(ckpt[name])
        self.step = int(ckpt["step"])
        self.guard.load_state_dict(ckpt.get("guard", {}))  # a checkpoint from before the guard: none bad
        self.vae.quantize.set_hit_steps(self.step)
        restore_rng_states(ckpt["rng"])


def logged_means(out: dict[str, Any]) -> dict[str, float]:
    """The LOGGED terms a `train_step` returned, averaged over the ranks (one host sync), in log order."""
    names = [k for k in LOGGED if k in out]
    return dict(zip(names, dist.all_reduce_mean(torch.stack([out[k].float() for k in names])).tolist(), strict=True))


@torch.no_grad()
def evaluate(vae: VQVAE, loader, device: torch.device) -> dict[str, float]:
    """Mean L1 and PSNR (images mapped to [0, 1]) of the full reconstruction over the val loader, all ranks."""
    vae.eval()
    sums = torch.zeros(3, device=device)  # l1 sum, psnr sum, count
    for img_B3HW, _ in loader:
        img_B3HW = img_B3HW.to(device)
        rec_B3HW = vae.img_to_reconstructed_img(img_B3HW, last_one=True)
        err_B = (rec_B3HW - img_B3HW).abs().mean(dim=(1, 2, 3))
        mse_B = ((rec_B3HW - img_B3HW) / 2).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
        sums += torch.stack([err_B.sum(), (-10 * mse_B.log10()).sum(), torch.tensor(len(err_B), device=device)])
    vae.train()
    dist.all_reduce_sum(sums)
    return {"val_l1": (sums[0] / sums[2]).item(), "val_psnr": (sums[1] / sums[2]).item()}


def train(args: argparse.Namespace) -> Path:
    """Train, checkpoint to `args.out_dir`, and return the path of the final checkpoint."""
    device = dist.initialize(timeout_min=args.dist_timeout_min)
    rank, world = dist.get_rank(), dist.get_world_size()
    config = check_flags(args, world)
    check_writable(Path(args.out_dir), "--out_dir")  # an OutputFolderError line, not rank 0's traceback at mkdir
    setup_logging(rank)  # log.txt once the folder's run lock is ours (as train.py)
    folder = RunFolder(args.out_dir, "tokenizer")
    folder.open(on_locked=lambda: setup_logging(rank, Path(args.out_dir)))
    resume_path, ckpt = folder.load_resume()
    if ckpt is not None:
        check_resume(ckpt, config, resume_path, args)
    args.seed = resolve_seed(args.seed, ckpt)
    torch.manual_seed(args.seed)  # the same initial weights for any world size

    num_classes, train_set, val_set = build_datasets(args.data_path, args.dataset, args.reso, args.mid_reso,
                                                     args.hflip, args.fmnist_dir, val_limit=args.val_limit)
    train_loader, val_loader, sampler = build_loaders(train_set, val_set, args.bs // world, args.workers, rank,
                                                      world, args.seed, pin_memory=device.type == "cuda")
    if args.w_gan > 0 and args.gan_start >= args.steps:
        logger.warning("--gan_start=%d >= --steps=%d: this run trains no GAN term (--w_gan=%g)", args.gan_start,
                       args.steps, args.w_gan, extra=SAME_ON_ALL_RANKS)
    trainer = TokenizerTrainer(build_vae(args), args, device)
    seed_everything(args.seed, rank, world)
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        logger.info("resumed from %s at step %d", resume_path, trainer.step)
        del ckpt
    if world > 1:
        refuse_disagreement(run_facts(vars(args), weights_digest(trainer.vae.state_dict()), train_set, val_set),
                            ValueError, "the ranks do not train alike (another copy of the data or other flags on some "
                            "node; paths may differ)")
    n_params = sum(p.numel() for p in trainer.vae.parameters()) / 1e6
    logger.info("tokenizer %.2fM params, config %s; %d train / %d val images (%d classes), %d steps of %d in %s",
                n_params, dataclasses.asdict(trainer.vae.config), len(train_set), len(val_set), num_classes,
                args.steps, args.bs, {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast with loss scaling",
                                      None: "fp32"}[trainer.amp_dtype])

    # TensorBoard (rank 0): the logged steps' losses, lr and code usage; a resume drops what a killed run logged
    # after its checkpoint
    tb = TBLogger(folder.dir / "tb", enabled=dist.is_main_process(), purge_from={"steps": trainer.step + 1})
    t0, last_log_step, preemption = time.time(), trainer.step, Preemption()
    while trainer.step < args.steps:
        epoch, start_it = divmod(trainer.step, sampler.iters_per_epoch)
        sampler.set_epoch(epoch, start_it)
        for img_B3HW, _ in train_loader:
            log_now = (trainer.step + 1) % args.log_every == 0 or trainer.step + 1 == args.steps
            out = trainer.train_step(img_B3HW, ret_usages=log_now)
            if log_now:
                means = logged_means(out)
                terms = {k: v for k, v in means.items() if k not in OPT_LOGGED}
                tb.scalars("steps", trainer.step, "train/", **terms,
                           **{f"usage_pct_scale{si}": u for si, u in enumerate(out["usage"])})
                tb.scalars("steps", trainer.step, "opt/", lr=out["lr"],
                           **{k: v for k, v in means.items() if k in OPT_LOGGED})
                speed = (trainer.step - last_log_step) / (time.time() - t0)
                t0, last_log_step = time.time(), trainer.step
                logger.info("step %d/%d %s lr %.2e | usage%% per scale %s | reinit %d | %.2f it/s", trainer.step,
                            args.steps, " ".join(f"{k} {v:.4f}" for k, v in means.items()),
                            out["lr"], [round(u, 1) for u in out["usage"]], out.get("reinit", 0), speed)
            stop = preemption.requested()  # collective: every rank stops after the same step
            if stop or trainer.step % args.save_every == 0 or trainer.step == args.steps:
                tb.flush()
                folder.save(trainer.state_dict())  # every rank: it gathers the RNG states
            if stop and trainer.step < args.steps:
                preemption.exit(f"at step {trainer.step}: checkpoint {folder.last} saved")
            if trainer.step >= args.steps:
                break
    preemption.close()
    metrics = evaluate(trainer.vae, val_loader, device)
    tb.scalars("steps", trainer.step, "val/", l1=metrics["val_l1"], psnr=metrics["val_psnr"])
    tb.close()
    logger.info("val reconstruction: L1 %.4f PSNR %.2f dB; checkpoint %s", metrics["val_l1"], metrics["val_psnr"],
                folder.last)
    return folder.last
