"""One training step of M-VAR (VAR's recipe), validation per scale, and the optimizer with VAR's no-decay groups.

Shape legend: B batch, L tokens of all scales, V vocabulary, Cv tokenizer latent width.
"""
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import dist
from models.mvar import MVAR
from models.tokenizer import VQVAE

logger = logging.getLogger(__name__)

# parameter-name fragments that get no weight decay (VAR's list, restricted to names our models use)
NO_WD_KEYS = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul", "gamma", "ada_gss")
AMP_DTYPES = {0: None, 1: torch.float16, 2: torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


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


def build_optimizer(model: nn.Module, lr: float, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW(betas=(0.9, 0.95)), fused on CUDA when `fused`; lr and weight decay are set each step by the
    schedule (utils.lr_schedule.set_lr_wd)."""
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model), lr=lr, weight_decay=0.0, betas=(0.9, 0.95),
                             fused=True if fused and on_cuda else None)


@dataclass
class StepResult:
    """What one micro-step returns; tensors stay on the device (no sync) except the floats set when stepping."""
    loss: torch.Tensor  # the optimised loss (smoothed, weighted), scalar
    logits_BLV: torch.Tensor  # detached
    gt_BL: torch.Tensor
    grad_norm: float | None = None  # pre-clip global norm, set on stepping micro-steps
    loss_scale: float | None = None  # fp16 GradScaler scale after the step
    skipped: bool = False  # the optimizer step was skipped (non-finite loss/grad)


class Trainer:
    """Owns the frozen tokenizer, the (wrapped) model, the optimizer and the AMP scaler.

    model: the model as called for training (DDP / FSDP2 / compiled); its plain module is `self.mvar`.
    fp16: 0 fp32, 1 fp16 autocast + GradScaler, 2 bf16 autocast. The tokenizer always runs in fp32 outside autocast.
    """

    def __init__(self, vae: VQVAE, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 fp16: int = 0, tclip: float = 2.0, label_smooth: float = 0.0, ac: int = 1,
                 max_nonfinite: int = 20):
        self.vae, self.model, self.optimizer, self.device = vae, model, optimizer, device
        self.mvar: MVAR = dist.unwrap_model(model)
        self.amp_dtype = AMP_DTYPES[fp16]
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**11, growth_interval=1000) \
            if fp16 == 1 else None
        self.tclip, self.label_smooth, self.ac, self.max_nonfinite = tclip, label_smooth, ac, max_nonfinite
        self.nonfinite_in_a_row = 0
        self.params = [p for p in self.mvar.parameters() if p.requires_grad]
        self.seg_lens = [pn * pn for pn in self.mvar.patch_nums]

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def tokenize(self, inp_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> (targets gt_BL, teacher-forcing input x_BLCv_wo_first_l), fp32, no autocast."""
        with torch.autocast(self.device.type, enabled=False):
            gt_idx_Bl = self.vae.img_to_idxBl(inp_B3HW.float())
            return torch.cat(gt_idx_Bl, dim=1), self.vae.quantize.idxBl_to_var_input(gt_idx_Bl)

    def token_loss(self, logits_BLV: torch.Tensor, gt_BL: torch.Tensor, prog_si: int, prog_wp: float) -> torch.Tensor:
        """Cross-entropy per token with weight 1/L (VAR's loss), mean over the batch. In progressive training
        only the first scales are present and the newest one is weighted by `prog_wp`."""
        B, Lp, V = logits_BLV.shape
        ce_BL = F.cross_entropy(logits_BLV.reshape(-1, V), gt_BL[:, :Lp].reshape(-1),
                                label_smoothing=self.label_smooth, reduction="none").view(B, Lp)
        w_L = torch.full((Lp,), 1.0 / self.mvar.L, device=ce_BL.device)
        if prog_si >= 0:
            bg, ed = self.mvar.begin_ends[prog_si]
            w_L[bg:ed] *= min(max(prog_wp, 0.0), 1.0)
        return ce_BL.mul(w_L).sum(dim=-1).mean()

    def train_step(self, inp_B3HW: torch.Tensor, label_B: torch.Tensor, stepping: bool = True,
                   prog_si: int = -1, prog_wp: float = 1.0) -> StepResult:
        """One micro-step: forward, backward (loss / ac) and, when `stepping`, unscale, clip, optimizer step.

        Gradients are synchronised across ranks only on stepping micro-steps. A non-finite gradient norm skips
        the update (and zeroes the gradients); `max_nonfinite` such steps in a row raise NonFiniteError.
        """
        gt_BL, x_BLCv = self.tokenize(inp_B3HW)
        return self.step_tokens(gt_BL, x_BLCv, label_B, stepping, prog_si, prog_wp)

    def step_tokens(self, gt_BL: torch.Tensor, x_BLCv: torch.Tensor, label_B: torch.Tensor, stepping: bool = True,
                    prog_si: int = -1, prog_wp: float = 1.0) -> StepResult:
        """`train_step` after tokenization: targets gt_BL (B, L) and teacher input x_BLCv (B, L - 1, Cv)."""
        self.mvar.prog_si = prog_si
        try:
            with dist.grad_sync(self.model, stepping):
                with self.autocast():
                    logits_BLV = self.model(label_B, x_BLCv)
                loss = self.token_loss(logits_BLV.float(), gt_BL, prog_si, prog_wp)
                scaled = loss / self.ac
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        finally:
            self.mvar.prog_si = -1
        result = StepResult(loss=loss.detach(), logits_BLV=logits_BLV.detach(), gt_BL=gt_BL)
        if stepping:
            self.optimizer_step(result)
        return result

    def optimizer_step(self, result: StepResult) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = nn.utils.clip_grad_norm_(self.params, self.tclip if self.tclip > 0 else math.inf)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        result.grad_norm = norm.item()
        finite = math.isfinite(result.grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself when it found inf/nan
            self.scaler.update(new_scale=32768.0 if self.scaler.get_scale() > 32768.0 else None)
            result.loss_scale = self.scaler.get_scale()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.nonfinite_in_a_row = 0
            return
        result.skipped = True
        self.nonfinite_in_a_row += 1
        logger.warning("non-finite loss/gradient (grad norm %s, loss %s): optimizer step skipped (%d in a row)",
                       result.grad_norm, result.loss.item(), self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row >= self.max_nonfinite:
            raise NonFiniteError(f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or "
                                 f"gradient (--max_nonfinite={self.max_nonfinite}): stopping. The last checkpoint "
                                 f"is intact; lower --tblr, raise --tclip or use --fp16=2 (bf16).")

    # ---- metrics ------------------------------------------------------------------------------------------------
    def scale_metrics(self, logits_BLV: torch.Tensor, gt_BL: torch.Tensor, resos: Sequence[int]) -> dict[str, float]:
        """Batch metrics all-reduced over ranks: Lm/Accm (all tokens present), Lt/Acct (last scale, when present),
        L_{reso}/acc_{reso} per scale and the share of the vocabulary predicted (vocab_usage, %)."""
        B, Lp, V = logits_BLV.shape
        logits_BLV, gt_BL = logits_BLV.float(), gt_BL[:, :Lp]
        ce_BL = F.cross_entropy(logits_BLV.reshape(-1, V), gt_BL.reshape(-1), reduction="none").view(B, Lp)
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
    def evaluate(self, loader, resos: Sequence[int]) -> dict[str, float]:
        """Validation over `loader` (cond dropout off: eval mode): mean loss / accuracy overall, on the last
        scale and per scale, averaged over all samples of all ranks. Batches are (images, labels) or
        (images, labels, valid): items with valid False (padding, utils.data.PaddedEvalDataset) are not counted."""
        was_training = self.mvar.training
        self.mvar.eval()
        K = len(self.seg_lens)
        sums = torch.zeros(2 * K + 3, device=self.device, dtype=torch.float64)  # L, acc per scale; Lm, Accm, count
        for inp_B3HW, label_B, *valid in loader:
            inp_B3HW, label_B = inp_B3HW.to(self.device, non_blocking=True), label_B.to(self.device, non_blocking=True)
            w_B = valid[0].to(self.device, torch.float64) if valid else torch.ones(len(label_B), device=self.device,
                                                                                    dtype=torch.float64)
            gt_BL, x_BLCv = self.tokenize(inp_B3HW)
            with self.autocast():
                logits_BLV = self.mvar(label_B, x_BLCv)
            B, L, V = logits_BLV.shape
            ce_BL = F.cross_entropy(logits_BLV.float().reshape(-1, V), gt_BL.reshape(-1), reduction="none").view(B, L)
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
                "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        dist.load_full_state(self.model, state["model"], self.optimizer, state["optimizer"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
