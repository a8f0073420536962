"""M-VAR training (VAR's recipe): the optimizer with VAR's no-decay groups, the per-iteration schedule, one training
step, the metrics it logs, validation per scale, and the checkpoint state.

Shape legend: B batch, L tokens of all scales, V vocabulary, Cv tokenizer latent width.
"""
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dist
from models.loading import CheckpointError, weights_digest
from models.mvar import MVAR, MVARConfig
from models.precision import AMP_DTYPES, amp_autocast, effective_amp_dtype
from models.tokenizer import VQVAE, VQVAEConfig
from utils.data.loaders import PaddedEvalDataset, class_difference
from utils.run.checkpoint import position_text
from utils.run.divergence import DivergenceGuard
from utils.run.log import SAME_ON_ALL_RANKS, Averager
from utils.run.loss_scale import LossScaler
from utils.run.preemption import Stopped
from utils.run.rng import gather_rng_states, restore_rng_states
from utils.run.schedule import Schedule, SchedulePoint, set_lr_wd

logger = logging.getLogger(__name__)

# parameter-name fragments that get no weight decay (VAR's list, restricted to names our models use)
NO_WD_KEYS = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul", "gamma", "ada_gss")


def param_groups(model: nn.Module) -> list[dict]:
    """Decay / no-decay groups as VAR: no decay on 1-D params, biases, NO_WD_KEYS and params flagged
    `_no_weight_decay` (Mamba2's A_log, D, dt_bias). Groups carry `wd_sc` read by `set_lr_wd`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith("bias") or getattr(p, "_no_weight_decay", False) \
                or any(k in name for k in NO_WD_KEYS):
            no_decay.append(p)
        else:
            decay.append(p)
    return [g for g in ({"params": decay, "wd_sc": 1.0, "lr_sc": 1.0},
                        {"params": no_decay, "wd_sc": 0.0, "lr_sc": 1.0}) if g["params"]]


def token_ce(logits_BLV: torch.Tensor, gt_BL: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token cross-entropy (B, L') in fp32 of logits over the first L' tokens against the targets `gt_BL`."""
    B, Lp, V = logits_BLV.shape
    return F.cross_entropy(logits_BLV.float().reshape(-1, V), gt_BL[:, :Lp].reshape(-1),
                           label_smoothing=label_smoothing, reduction="none").view(B, Lp)


UNSTABLE_HINT = "lower --tblr, raise --tclip or use --fp16=2 (bf16)."  # after too many bad or overflowed steps
IMPLEMENTATION_KEYS = ("fused", "foreach")  # AdamW's group keys that choose how it runs, not what it computes


def build_optimizer(model: nn.Module, lr: float, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW(betas=(0.9, 0.95)), fused when `fused` (CUDA and CPU: one pass over each parameter instead of about
    ten, 0.23x the step time on the CPU at 42M parameters, docs/benchmarks.md); lr and weight decay are set each step
    by the schedule (utils.run.schedule.set_lr_wd)."""
    return torch.optim.AdamW(param_groups(model), lr=lr, weight_decay=0.0, betas=(0.9, 0.95),
                             fused=True if fused else None)


def data_problems(old: dict[str, Any] | None, new: dict[str, Any], mid_epoch: bool) -> list[str]:
    """What makes a resume on the data `new` wrong, given the checkpoint's `old` (None: not recorded) ->
    `check_resumable` problems. Other class names (a renamed folder permutes the labels) always; only mid-epoch,
    where the position would point at other images (at an epoch end it is logged): another number of training
    images, images against a token cache ("tokens": its views, None for images; train.py --tokens), other image
    files ("train_files": their digest) or another cache ("cache": the digest of what its ids are)."""
    if old is None:
        return []
    problems = []

    def changed(what: str, at_epoch_end: str) -> None:
        if mid_epoch:  # the position would point at other images
            problems.append(f"{what}: a mid-epoch position needs the same data (restore it, or resume from a "
                            f"checkpoint at an epoch end)")
        else:
            logger.warning("%s: %s", what, at_epoch_end, extra=SAME_ON_ALL_RANKS)

    if old["classes"] != new["classes"]:
        what = class_difference(old["classes"], new["classes"], ("the checkpoint", "this run"))
        problems.append(f"the class names differ ({what}): the labels would not mean the same classes")
    old_src, new_src = (f"the token cache's views {d['tokens']}" if d.get("tokens") else "the images"
                        for d in (old, new))
    if old["train_images"] != new["train_images"]:
        changed(f"the training set has {new['train_images']} images, {old['train_images']} when the checkpoint was "
                f"written", "epochs now follow the new size")
    if old_src != new_src:
        changed(f"the checkpoint was trained from {old_src}, this run from {new_src} (--tokens)",
                "the next epochs draw from the latter")
    elif old["train_images"] == new["train_images"]:
        for key, what in (("train_files", "the training image files (their paths and labels)"),
                          ("cache", "the token cache's ids (another extraction)")):
            if None not in (old.get(key), new.get(key)) and old[key] != new[key]:
                changed(f"{what} differ from those the checkpoint was trained on", "the next epochs draw from these")
    return problems


@dataclass
class StepResult:
    """What one micro-step returns; tensors stay on the device (no sync) except the floats set when stepping."""
    loss: torch.Tensor  # the optimised loss (smoothed, weighted), scalar
    logits_BLV: torch.Tensor | None  # detached; dropped when the next step starts (`Trainer.scheduled_step`)
    gt_BL: torch.Tensor
    grad_norm: float | None = None  # pre-clip global norm, set on stepping micro-steps
    loss_scale: float | None = None  # fp16 GradScaler scale the step ran at (VAR logs it so), before its update
    skipped: bool = False  # the optimizer step was skipped (non-finite loss/grad)
    stepped: bool = False  # the micro-step ended an accumulation window (the optimizer stepped or skipped)
    schedule: SchedulePoint | None = None  # set by `Trainer.scheduled_step`


class Trainer:
    """Owns the frozen tokenizer, the (wrapped) model, the optimizer, the schedule and the AMP scaler.

    model: the model as called for training (DDP / FSDP2 / compiled); its plain module is `self.mvar`.
    lr / fused_adam: the optimizer's (`build_optimizer`); `schedule` sets lr, wd and the progressive stage each
    iteration in `scheduled_step` (steps driven by `micro_step` directly keep the lr given here).
    fp16: 0 fp32, 1 fp16 autocast + GradScaler, 2 bf16 autocast (fp32, with one log line, on a CPU without bf16
    instructions, where bf16 is emulated and slower). The tokenizer always runs in fp32 outside autocast.
    max_nonfinite / diverge_tol: bad optimizer steps (`DivergenceGuard` with tolerance `diverge_tol`) are skipped;
    `max_nonfinite` of them in a row raise NonFiniteError.
    """

    def __init__(self, vae: VQVAE | None, model: nn.Module, device: torch.device, lr: float = 1e-4,
                 fused_adam: bool = True, schedule: Schedule | None = None, fp16: int = 0, tclip: float = 2.0,
                 label_smooth: float = 0.0, ac: int = 1, max_nonfinite: int = 20, diverge_tol: float = 10.0):
        self.vae, self.model, self.device, self.schedule = vae, model, device, schedule
        self.mvar: MVAR = dist.unwrap_model(model)
        self.optimizer = build_optimizer(self.mvar, lr, fused=fused_adam)
        self.amp_dtype = effective_amp_dtype(device, AMP_DTYPES[fp16])  # bf16 on a CPU without it: fp32, logged
        self.scaler = LossScaler(device.type, max_nonfinite, UNSTABLE_HINT) if fp16 == 1 else None
        self.tclip, self.label_smooth, self.ac, self.max_nonfinite = tclip, label_smooth, ac, max_nonfinite
        self.guard = DivergenceGuard(diverge_tol)
        self.window_losses: list[torch.Tensor] = []  # the open window's micro-step losses: the guard judges their mean
        self.params = [p for p in self.mvar.parameters() if p.requires_grad]
        self.seg_lens = [pn * pn for pn in self.mvar.patch_nums]
        self.resos = [pn * vae.downsample for pn in self.mvar.patch_nums] if vae is not None else None
        self.meter, self.last, self.n_img = Averager(), None, 0  # what `pop_metrics` reports
        self.train_seconds = 0.0  # training time so far, summed over `pop_metrics` calls; kept by checkpoints

    def autocast(self):
        return amp_autocast(self.device, self.amp_dtype)

    @property
    def overflows_in_a_row(self) -> int:
        """fp16 steps GradScaler skipped in a row (not bad steps: `optimizer_step`)."""
        return 0 if self.scaler is None else self.scaler.overflows_in_a_row

    @torch.no_grad()
    def tokenize(self, inp_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> (targets gt_BL, teacher-forcing input x_BLCv_wo_first_l), fp32, no autocast."""
        with torch.autocast(self.device.type, enabled=False):
            gt_idx_Bl = self.vae.img_to_idxBl(inp_B3HW.float())
            return torch.cat(gt_idx_Bl, dim=1), self.vae.quantize.idxBl_to_var_input(gt_idx_Bl)

    @torch.no_grad()
    def ids_to_tokens(self, idx_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of all scales (B, L) from a token cache (utils.data.token_cache) -> (gt_BL, x_BLCv) as
        `tokenize` makes them from the images, without the encoder."""
        with torch.autocast(self.device.type, enabled=False):
            return idx_BL, self.vae.quantize.idxBl_to_var_input(list(idx_BL.split(self.seg_lens, dim=1)))

    def targets(self, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gt_BL, x_BLCv) of a batch: images (B, 3, H, W) through `tokenize`, or token ids (B, L) (an integer
        tensor: train.py --tokens) through `ids_to_tokens`."""
        return self.tokenize(inp) if inp.is_floating_point() else self.ids_to_tokens(inp)

    def token_loss(self, logits_BLV: torch.Tensor, gt_BL: torch.Tensor, prog_si: int, prog_wp: float) -> torch.Tensor:
        """Cross-entropy per token with weight 1/L (VAR's loss), mean over the batch. In progressive training
        only the first scales are present and the newest one is weighted by `prog_wp`."""
        ce_BL = token_ce(logits_BLV, gt_BL, self.label_smooth)
        w_L = torch.full((ce_BL.shape[1],), 1.0 / self.mvar.L, device=ce_BL.device)
        if prog_si >= 0:
            bg, ed = self.mvar.begin_ends[prog_si]
            w_L[bg:ed] *= min(max(prog_wp, 0.0), 1.0)
        return ce_BL.mul(w_L).sum(dim=-1).mean()

    def scheduled_step(self, inp_B3HW: torch.Tensor, label_B: torch.Tensor, g_it: int) -> StepResult:
        """train.py's step at global iteration `g_it` (on images, or token ids: `targets`): lr, wd and progressive
        stage from the schedule, then `micro_step`, stepping the optimizer at the end of each accumulation window
        (--ac micro-steps from the start or the resume point). The layers below: `micro_step` (tokenize) ->
        `micro_step_tokens` (forward, backward) -> `optimizer_step` (clip, update)."""
        point = self.schedule.at(g_it)
        set_lr_wd(self.optimizer, point.lr, point.wd)
        if self.last is not None:  # its fp32 logits (1 GB at d16, batch 96) would live through this step's peak
            self.last.logits_BLV = None
        res = self.micro_step(inp_B3HW.to(self.device, non_blocking=True), label_B.to(self.device, non_blocking=True),
                              stepping=self.window_micro_steps + 1 == self.ac, prog_si=point.prog_si,
                              prog_wp=point.prog_wp)
        res.schedule, self.last = point, res
        self.n_img += len(label_B) * dist.get_world_size()
        self.meter.update(loss=res.loss)
        if res.grad_norm is not None:
            self.meter.update(grad_norm=res.grad_norm)
        return res

    def micro_step(self, inp_B3HW: torch.Tensor, label_B: torch.Tensor, stepping: bool = True,
                   prog_si: int = -1, prog_wp: float = 1.0) -> StepResult:
        """One micro-step: forward, backward (loss / ac) and, when `stepping`, unscale, clip, optimizer step.
        `inp_B3HW` may be token ids (B, L) instead of images (`targets`).

        Gradients are synchronised across ranks only on stepping micro-steps. A bad step (`optimizer_step`) skips
        the update (and zeroes the gradients); `max_nonfinite` such steps in a row raise NonFiniteError.
        """
        gt_BL, x_BLCv = self.targets(inp_B3HW)
        return self.micro_step_tokens(gt_BL, x_BLCv, label_B, stepping, prog_si, prog_wp)

    def micro_step_tokens(self, gt_BL: torch.Tensor, x_BLCv: torch.Tensor, label_B: torch.Tensor,
                          stepping: bool = True, prog_si: int = -1, prog_wp: float = 1.0) -> StepResult:
        """`micro_step` after tokenization: targets gt_BL (B, L) and teacher input x_BLCv (B, L - first_l, Cv), the
        scales after the first (first_l = its pn * pn)."""
        with dist.grad_sync(self.model, stepping):
            with self.autocast():
                logits_BLV = self.model(label_B, x_BLCv, prog_si=prog_si)
            loss = self.token_loss(logits_BLV.float(), gt_BL, prog_si, prog_wp)
            scaled = loss / self.ac
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        result = StepResult(loss=loss.detach(), logits_BLV=logits_BLV.detach(), gt_BL=gt_BL, stepped=stepping)
        self.window_losses.append(result.loss)
        if stepping:
            self.optimizer_step(result)
        return result

    def optimizer_step(self, result: StepResult) -> None:
        """The end of an accumulation window: unscale (fp16), clip, optimizer step unless the step is bad, zero the
        gradients; records the grad norm (and loss scale) in `result`. Bad: `self.guard` judges the grad norm and
        the window's mean micro-step loss averaged over the ranks (so all ranks agree): a spike in any micro-step of
        the window counts, as its gradients are in the update."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = nn.utils.clip_grad_norm_(self.params, self.tclip if self.tclip > 0 else math.inf)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        result.grad_norm = norm.item()
        loss = dist.all_reduce_mean(torch.stack(self.window_losses).mean()).item()
        self.window_losses = []
        # fp16's ordinary overflow: GradScaler skips the step and lowers the scale. The weights are unchanged, so it
        # is no bad step (a save may follow), unless max_nonfinite of them come in a row (utils.run.loss_scale)
        overflow = self.scaler is not None and self.scaler.is_overflow(loss, result.grad_norm)
        reason = self.guard.update(loss, math.isfinite(result.grad_norm) or overflow)
        if reason is None and self.scaler is None:
            self.optimizer.step()
        elif reason is None:
            self.scaler.step(self.optimizer)
        if self.scaler is not None:
            result.loss_scale = self.scaler.get_scale()
            self.scaler.update_capped()
        self.optimizer.zero_grad(set_to_none=True)
        if overflow:
            result.skipped = True
            self.scaler.skipped("the step")
        if reason is None:
            return
        result.skipped = True
        self.guard.skipped(reason, f"optimizer step (grad norm {result.grad_norm:.4g})", self.max_nonfinite,
                           UNSTABLE_HINT)

    def save_blocker(self, resume_point: bool = True) -> str | None:
        """Why the current weights must not be checkpointed (None: they may): a weight is non-finite, or, for a
        checkpoint a run resumes from (`resume_point`), the last optimizer step was bad. Collective: all ranks
        agree."""
        if resume_point and not self.guard.healthy:
            return "the last optimizer step was bad"
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]  # DTensor shards under FSDP2
        n_bad = torch.stack([~torch.isfinite(p).all() for p in local]).sum().float()
        return "a weight is non-finite" if dist.all_reduce_sum(n_bad).item() > 0 else None

    @property
    def window_micro_steps(self) -> int:
        """Micro-steps of the open accumulation window (0: none open); a checkpoint's position is always a window's
        end, so windows count from the start or the resume point."""
        return len(self.window_losses)

    def discard_partial_window(self) -> None:
        """Drop the gradients of an accumulation window that will not be completed (the end of training)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.window_losses = []

    # ---- metrics ------------------------------------------------------------------------------------------------
    def pop_metrics(self, seconds: float) -> dict[str, dict[str, float | None]]:
        """What `scheduled_step` saw since the last call (`seconds` of training), all ranks: "train/" mean loss, grad
        norm and the last batch's `scale_metrics`; "opt/" the last schedule point and loss scale; "speed/" images and
        tokens per second."""
        stats, res, point = self.meter.pop(), self.last, self.last.schedule
        stats["loss"] = dist.all_reduce_mean(stats["loss"].float()).item()
        stats.update(self.scale_metrics(res.logits_BLV, res.gt_BL))
        speed = {"images_per_s": self.n_img / seconds, "tokens_per_s": self.n_img * res.logits_BLV.shape[1] / seconds}
        self.n_img, self.train_seconds = 0, self.train_seconds + seconds
        return {"train/": stats, "opt/": {"lr": point.lr, "wd": point.wd, "loss_scale": res.loss_scale,
                                          "prog_si": point.prog_si, "prog_wp": point.prog_wp}, "speed/": speed}

    def scale_metrics(self, logits_BLV: torch.Tensor, gt_BL: torch.Tensor) -> dict[str, float]:
        """Batch metrics all-reduced over ranks: Lm/Accm (all tokens present), Lt/Acct (last scale, when present),
        L_{reso}/acc_{reso} per scale and the share of the vocabulary predicted (vocab_usage, %)."""
        B, Lp, V = logits_BLV.shape
        resos = self.resos
        ce_BL, gt_BL = token_ce(logits_BLV, gt_BL), gt_BL[:, :Lp]
        hit_BL = (logits_BLV.argmax(-1) == gt_BL).float()
        names, vals = ["Lm", "Accm"], [ce_BL.mean(), hit_BL.mean() * 100]
        for si, (bg, ed) in enumerate(self.mvar.begin_ends):
            if ed > Lp:
                break
            names += [f"L_{resos[si]}", f"acc_{resos[si]}"]
            vals += [ce_BL[:, bg:ed].mean(), hit_BL[:, bg:ed].mean() * 100]
        stats = dist.all_reduce_mean(torch.stack(vals))
        out = dict(zip(names, stats.tolist(), strict=True))
        if Lp == self.mvar.L:
            out["Lt"], out["Acct"] = out[f"L_{resos[-1]}"], out[f"acc_{resos[-1]}"]
        counts_V = dist.all_reduce_sum(logits_BLV.argmax(-1).flatten().bincount(minlength=V).float())
        out["vocab_usage"] = (counts_V / counts_V.sum() > 0.001 / V).float().mean().item() * 100
        return out

    @torch.no_grad()
    def evaluate(self, loader, resos: Sequence[int] | None = None, stop: Callable[[], bool] | None = None,
                 dtype: torch.dtype | None = None) -> dict[str, float]:
        """Validation over `loader` (cond dropout off: eval mode), in fp32 as VAR's eval_ep (`dtype`: autocast to that
        instead, for a kernel that takes no fp32): mean loss / accuracy overall, on the last scale and per scale,
        averaged over all samples of all ranks. Batches are (images, labels) or
        (images, labels, valid), images or token ids (`targets`): items with valid False (padding,
        utils.data.loaders.PaddedEvalDataset) are not counted. `stop()`, a collective asked before each batch
        (so every rank must have as many: a padded loader), True raises utils.run.preemption.Stopped."""
        if stop is not None and not isinstance(loader.dataset, PaddedEvalDataset):
            raise ValueError("a stop check before each val batch is a collective: build the loader with pad_eval=True "
                             "(utils.data.loaders.build_loaders), so that every rank runs as many batches")
        resos = resos or self.resos
        was_training = self.mvar.training
        self.mvar.eval()
        K = len(self.seg_lens)
        sums = torch.zeros(2 * K + 3, device=self.device, dtype=torch.float64)  # L, acc per scale; Lm, Accm, count
        for i, (inp_B3HW, label_B, *valid) in enumerate(loader):
            if stop is not None and stop():
                self.mvar.train(was_training)
                raise Stopped(f"validation stopped before batch {i + 1} of {len(loader)}")
            inp_B3HW, label_B = inp_B3HW.to(self.device, non_blocking=True), label_B.to(self.device, non_blocking=True)
            w_B = valid[0].to(self.device, torch.float64) if valid else torch.ones(len(label_B), device=self.device,
                                                                                    dtype=torch.float64)
            gt_BL, x_BLCv = self.targets(inp_B3HW)
            with amp_autocast(self.device, dtype):
                logits_BLV = self.mvar(label_B, x_BLCv)
            ce_BL = token_ce(logits_BLV, gt_BL)
            hit_BL = (logits_BLV.argmax(-1) == gt_BL).double()
            for si, (bg, ed) in enumerate(self.mvar.begin_ends):
                sums[si] += ce_BL[:, bg:ed].double().mean(1) @ w_B
                sums[K + si] += hit_BL[:, bg:ed].mean(1) @ w_B * 100
            sums[2 * K] += ce_BL.double().mean(1) @ w_B
            sums[2 * K + 1] += hit_BL.mean(1) @ w_B * 100
            sums[2 * K + 2] += w_B.sum()
        dist.all_reduce_sum(sums)
        self.mvar.train(was_training)
        n = max(sums[-1].item(), 1.0)
        out = {"vL_mean": sums[2 * K].item() / n, "vacc_mean": sums[2 * K + 1].item() / n,
               "vL_tail": sums[K - 1].item() / n, "vacc_tail": sums[2 * K - 1].item() / n, "n": sums[-1].item()}
        for si in range(K):
            out[f"vL_{resos[si]}"], out[f"vacc_{resos[si]}"] = sums[si].item() / n, sums[K + si].item() / n
        return out

    # ---- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Full (unsharded) model and optimizer states, plus the scaler; collective under FSDP2."""
        return {"model": dist.full_model_state_dict(self.model),
                "optimizer": dist.full_optimizer_state_dict(self.model, self.optimizer),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "guard": self.guard.state_dict(), "train_seconds": self.train_seconds}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s state; the optimizer's implementation (fused or not: --afuse) stays this run's,
        where torch's load_state_dict would copy the checkpoint's with the other group keys (and place the step
        counters for it): this run's are written into the saved groups before loading."""
        saved = state["optimizer"]
        groups = [{**g, **{k: ours[k] for k in IMPLEMENTATION_KEYS if k in ours}}
                  for g, ours in zip(saved["param_groups"], self.optimizer.param_groups, strict=True)]
        dist.load_full_state(self.model, state["model"], self.optimizer, {**saved, "param_groups": groups})
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.guard.load_state_dict(state.get("guard", {}))  # older checkpoints: a fresh guard
        self.train_seconds = state.get("train_seconds", 0.0)

    def checkpoint(self, **position: Any) -> dict[str, Any]:
        """Everything a resume needs (collective: FSDP2 gathers, every rank's RNG state is gathered); `position`
        (epoch, iter: the next iteration to run; args; best_val; data: train.py's record, `data_problems`)
        is stored alongside."""
        state = self.state_dict()
        return {"config": dataclasses.asdict(self.mvar.config), "model": state.pop("model"),
                "vae_config": dataclasses.asdict(self.vae.config), "vae": self.vae.state_dict(), "trainer": state,
                "rng": gather_rng_states(), **position}

    def resume(self, ckpt: dict[str, Any], path: Path, args: dict[str, Any],
               data: dict[str, Any]) -> tuple[int, int, float]:
        """Load a `checkpoint` of this run's setup (`check_resumable`) and restore this rank's RNG state ->
        (epoch, iteration, best val loss) to continue from."""
        self.check_resumable(ckpt, path, args, data)
        try:
            self.load_state_dict({**ckpt["trainer"], "model": ckpt["model"]})
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} cannot be loaded: {e}") from e
        restore_rng_states(ckpt["rng"])
        logger.info("resumed from %s %s", path, position_text(ckpt))
        return ckpt["epoch"], ckpt["iter"], ckpt.get("best_val", math.inf)

    def check_resumable(self, ckpt: dict[str, Any], path: Path, args: dict[str, Any], data: dict[str, Any]) -> None:
        """Raise CheckpointError naming `path` when the checkpoint does not belong to this run's setup: its flags
        `args` and `data` (as `checkpoint` stores them) against the checkpoint's. Checkpoints written before the
        data were recorded are not checked for them."""
        missing = [k for k in ("config", "model", "vae_config", "trainer", "epoch", "iter", "args", "rng")
                   if k not in ckpt]
        if missing:
            raise CheckpointError(f"checkpoint {path} is not a training checkpoint (missing {missing}); use "
                                  f"--init_from to start from its weights")
        problems = []
        old, new = dataclasses.asdict(MVARConfig.from_dict(ckpt["config"])), dataclasses.asdict(self.mvar.config)
        problems += [f"model {k}: checkpoint {old[k]!r}, this run {v!r}" for k, v in new.items() if old[k] != v]
        if VQVAEConfig(**ckpt["vae_config"]) != self.vae.config:
            problems.append("the tokenizer config differs (--vae_ckpt)")
        elif (theirs := weights_digest(ckpt["vae"])) != (ours := weights_digest(self.vae.state_dict())):
            other = (f"the tokenizer weights differ: the checkpoint embeds those of --vae_ckpt="
                     f"{ckpt['args'].get('vae_ckpt')} (digest {theirs}), this run loaded --vae_ckpt="
                     f"{args['vae_ckpt']} (digest {ours})")
            if args["allow_other_tokenizer"]:
                logger.warning("%s: continuing with this run's (--allow_other_tokenizer)", other,
                               extra=SAME_ON_ALL_RANKS)
            else:
                problems.append(f"{other}; pass --allow_other_tokenizer if this is meant")
        if ckpt["iter"] > 0 and ckpt["args"]["glb_batch_size"] != args["glb_batch_size"]:
            saved = ckpt["args"]
            ranks = len(ckpt["rng"])  # one RNG state per rank (gather_rng_states)
            cause = f" ({ranks} ranks then, {dist.get_world_size()} now: --bs rounds to a multiple of --ac x " \
                    f"ranks)" if ranks != dist.get_world_size() else ""
            problems.append(f"global micro-batch {saved['glb_batch_size']} vs {args['glb_batch_size']} (--bs/--ac)"
                            f"{cause}: a mid-epoch position needs the same batch; relaunch with "
                            f"--bs={saved['glb_batch_size'] * saved['ac']} --ac={saved['ac']}"
                            f"{f' on {ranks} ranks' if cause else ''}, or resume from an epoch-end checkpoint")
        problems += data_problems(ckpt.get("data"), data, mid_epoch=ckpt["iter"] > 0)
        if problems:
            raise CheckpointError(f"checkpoint {path} is incompatible with this run: " + "; ".join(problems))
