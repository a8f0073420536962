"""VAR's multi-scale residual vector quantizer with the "phi" refinement convs.

Shape legend: B batch, C = Cvae latent channels, H/W full latent size, ph/pw (or pn) one scale's size,
V vocab, S or SN number of scales, l = pn*pn tokens of one scale, L = sum of all l.
"""
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# A VQ-VAE with a uniform code usage would hit each code B*H*W/V times per step; a code counts as "used"
# when its EMA hit count reaches this fraction of that (VAR's margin).
USAGE_MARGIN = 0.08
PatchNums = Sequence[int | tuple[int, int]]


# ----------------------------------------------------------------------------------------------------------------------
# phi: residual refinement convs, chosen by the scale's position in [0, 1]
# ----------------------------------------------------------------------------------------------------------------------

class Phi(nn.Conv2d):
    """phi(h) = (1 - r) * h + r * conv3x3(h)."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw * (1 - self.ratio) + super().forward(h_BChw) * self.ratio


def phi_ticks(n: int) -> np.ndarray:
    """Positions in [0, 1] that `n` phi convs stand for (VAR's rule, including its special case for 4)."""
    margin = 1 / (3 * n) if n == 4 else 1 / (2 * n)
    return np.linspace(margin, 1 - margin, n)


def _nearest_tick(ticks: np.ndarray, at: float) -> int:
    return int(np.argmin(np.abs(ticks - at)))


class PhiShared(nn.Module):
    """`share_quant_resi=1`: one phi for all scales."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, at: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """`share_quant_resi=n>1`: n phis; a scale uses the one whose tick is nearest its position."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = phi_ticks(len(qresi_ls))

    def __getitem__(self, at: float) -> nn.Module:
        return self.qresi_ls[_nearest_tick(self.ticks, at)]

    def extra_repr(self) -> str:
        return f"ticks={np.round(self.ticks, 4).tolist()}"


class PhiNonShared(nn.ModuleList):
    """`share_quant_resi=0`: one phi per scale. Indexed by the position in [0, 1], not by an integer."""

    def __init__(self, qresi: list[nn.Module]):
        super().__init__(qresi)
        self.ticks = phi_ticks(len(qresi))

    def __getitem__(self, at: float) -> nn.Module:
        return super().__getitem__(_nearest_tick(self.ticks, at))

    def extra_repr(self) -> str:
        return f"ticks={np.round(self.ticks, 4).tolist()}"


def build_phis(channels: int, ratio: float, share_quant_resi: int, n_scales: int) -> nn.Module:
    """The phi bank for `share_quant_resi` (0: one per scale, 1: one shared, n: n partially shared)."""
    if share_quant_resi < 0:
        raise ValueError(f"share_quant_resi must be >= 0, got {share_quant_resi}")

    def make() -> nn.Module:
        return Phi(channels, ratio) if abs(ratio) > 1e-6 else nn.Identity()

    if share_quant_resi == 0:
        return PhiNonShared([make() for _ in range(n_scales)])
    if share_quant_resi == 1:
        return PhiShared(make())
    return PhiPartiallyShared(nn.ModuleList(make() for _ in range(share_quant_resi)))


# ----------------------------------------------------------------------------------------------------------------------
# Quantizer
# ----------------------------------------------------------------------------------------------------------------------

class MultiScaleQuantizer(nn.Module):
    """Residual quantization of a latent f (B, C, H, W) into token maps of sizes `v_patch_nums` (small to large).

    `hit_reducer`, if set, sums the per-scale hit counts across processes in place (e.g.
    `torch.distributed.all_reduce`) before they enter the usage EMA; the model itself never calls `dist`.
    """

    def __init__(self, vocab_size: int, Cvae: int, v_patch_nums: Sequence[int], beta: float = 0.25,
                 quant_resi: float = 0.5, share_quant_resi: int = 4):
        super().__init__()
        self.vocab_size, self.Cvae, self.beta = vocab_size, Cvae, beta
        self.v_patch_nums = tuple(v_patch_nums)
        self.quant_resi_ratio = quant_resi
        self.quant_resi = build_phis(Cvae, quant_resi, share_quant_resi, len(self.v_patch_nums))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.v_patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.hit_reducer: Callable[[torch.Tensor], object] | None = None
        self._hit_steps = 0

    def extra_repr(self) -> str:
        return f"V={self.vocab_size}, Cvae={self.Cvae}, v_patch_nums={self.v_patch_nums}, beta={self.beta}, " \
               f"quant_resi={self.quant_resi_ratio}"

    def phi(self, si: int, SN: int) -> nn.Module:
        """The phi conv for scale `si` of `SN`."""
        return self.quant_resi[si / (SN - 1) if SN > 1 else 0.0]

    # ---------------------------------------------------------------- encoding
    def idxBl_to_h(self, idx_Bl: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
        """Codes of (B, ph*pw) or (B*ph*pw,) indices as a contiguous (B, C, ph, pw) map."""
        return self.embedding(idx_Bl).view(-1, ph, pw, self.Cvae).permute(0, 3, 1, 2).contiguous()

    def _nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code by plain squared L2 distance (no normalisation)."""
        e_VC = self.embedding.weight.detach()
        d_NV = torch.addmm(z_NC.square().sum(1, keepdim=True) + e_VC.square().sum(1), z_NC, e_VC.T, alpha=-2)
        return d_NV.argmin(dim=1)

    def _residual_scales(self, f_BChw: torch.Tensor, patch_hws: list[tuple[int, int]]
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (idx_Bl, h_BChw) scale by scale; h is phi(upsampled codes), with grad to codebook and phi."""
        B, C, H, W = f_BChw.shape
        if patch_hws[-1] != (H, W):
            raise ValueError(f"the last patch size {patch_hws[-1]} must equal the latent size {(H, W)} "
                             f"(image size / VAE downsample factor)")
        f_rest = f_BChw.detach().clone()
        SN = len(patch_hws)
        for si, (ph, pw) in enumerate(patch_hws):
            last = si == SN - 1
            rest_BChw = f_rest if last else F.interpolate(f_rest, size=(ph, pw), mode="area")
            idx_N = self._nearest_code(rest_BChw.permute(0, 2, 3, 1).reshape(-1, C))
            h_BChw = self.idxBl_to_h(idx_N, ph, pw)
            if not last:
                h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
            h_BChw = self.phi(si, SN)(h_BChw)
            f_rest.sub_(h_BChw.detach())
            yield idx_N.view(B, ph * pw), h_BChw

    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool,
                           v_patch_nums: PatchNums | None = None) -> list[torch.Tensor]:
        """Per scale: the (B, ph*pw) indices, or (to_fhat) the cumulative f_hat (B, C, H, W) after that scale."""
        patch_hws = [(pn, pn) if isinstance(pn, int) else tuple(pn) for pn in (v_patch_nums or self.v_patch_nums)]
        f_hat = torch.zeros_like(f_BChw, dtype=torch.float32)
        out = []
        for idx_Bl, h_BChw in self._residual_scales(f_BChw.detach(), patch_hws):
            if to_fhat:
                f_hat = f_hat + h_BChw
                out.append(f_hat)
            else:
                out.append(idx_Bl)
        return out

    # ---------------------------------------------------------------- training
    def forward(self, f_BChw: torch.Tensor, ret_usages: bool = False
                ) -> tuple[torch.Tensor, list[float] | None, torch.Tensor]:
        """Straight-through quantization for VQVAE training -> (f_hat_BChw, per-scale usage % or None, vq_loss)."""
        with torch.autocast(device_type=f_BChw.device.type, enabled=False):
            f_BChw = f_BChw.float()
            f_no_grad = f_BChw.detach()
            patch_hws = [(pn, pn) for pn in self.v_patch_nums]
            SN = len(patch_hws)
            f_hat = torch.zeros_like(f_no_grad)
            hits_SV = f_no_grad.new_zeros(SN, self.vocab_size)
            vq_loss = f_no_grad.new_zeros(())
            for si, (idx_Bl, h_BChw) in enumerate(self._residual_scales(f_BChw, patch_hws)):
                hits_SV[si] = idx_Bl.flatten().bincount(minlength=self.vocab_size)
                f_hat = f_hat + h_BChw
                vq_loss = vq_loss + self.beta * F.mse_loss(f_hat.detach(), f_BChw) + F.mse_loss(f_hat, f_no_grad)
            vq_loss = vq_loss / SN
            f_hat_st = (f_hat.detach() - f_no_grad) + f_BChw  # value of f_hat, gradient of f

        if self.hit_reducer is not None:
            self.hit_reducer(hits_SV)
        if self.training:
            self._record_hits(hits_SV)
        usages = self.usages(tokens_per_step=float(hits_SV[-1].sum())) if ret_usages else None
        return f_hat_st, usages, vq_loss

    @torch.no_grad()
    def _record_hits(self, hits_SV: torch.Tensor) -> None:
        """EMA of per-scale code hits, VAR's: its record count goes up once per scale, so scale si of step t is
        record t * SN + si, with decay 0.9 below record 100 and 0.99 from there (10 steps at VAR's 10 scales, 25 at
        4). A fresh buffer's first step copies every scale (VAR copies record 0 only, scale 0's, so that its other
        scales start at a tenth of their hits; VAR also overwrites scale 0 of a buffer loaded from a checkpoint in
        each new process, where this one carries on blending it)."""
        SN = len(hits_SV)
        if self._hit_steps == 0 and not bool(self.ema_vocab_hit_SV.any()):
            decay_S1 = hits_SV.new_zeros(SN, 1)
        else:
            record_S1 = self._hit_steps * SN + torch.arange(SN, device=hits_SV.device)[:, None]
            decay_S1 = torch.where(record_S1 < 100, 0.9, 0.99).to(hits_SV.dtype)
        self.ema_vocab_hit_SV.mul_(decay_S1).add_(hits_SV * (1 - decay_S1))
        self._hit_steps += 1

    def set_hit_steps(self, steps: int) -> None:
        """Set how many training steps the usage EMA has seen (e.g. the step of a resumed run), which picks its
        decay; without it a resumed run would restart the 0.9-decay warm-up."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self._hit_steps = int(steps)

    def usages(self, tokens_per_step: float) -> list[float]:
        """Percentage of codes per scale whose EMA hit count reaches USAGE_MARGIN of a uniform share."""
        margin = tokens_per_step / self.vocab_size * USAGE_MARGIN
        return (self.ema_vocab_hit_SV >= margin).float().mean(dim=1).mul(100).tolist()

    # ---------------------------------------------------------------- decoding / teacher forcing
    def idxBl_to_var_input(self, gt_idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input: f_hat after each of the first SN-1 scales, area-resized to the next scale,
        flattened and concatenated -> (B, L - first_l, Cvae) float32."""
        B, SN = gt_idx_Bl[0].shape[0], len(self.v_patch_nums)
        H = W = self.v_patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, W, dtype=torch.float32)
        next_scales = []
        for si in range(SN - 1):
            pn, pn_next = self.v_patch_nums[si], self.v_patch_nums[si + 1]
            h_BChw = F.interpolate(self.idxBl_to_h(gt_idx_Bl[si], pn, pn), size=(H, W), mode="bicubic")
            f_hat = f_hat + self.phi(si, SN)(h_BChw)
            next_BCl = F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").view(B, self.Cvae, -1)
            next_scales.append(next_BCl.transpose(1, 2))
        if not next_scales:
            return f_hat.new_zeros(B, 0, self.Cvae)
        return torch.cat(next_scales, dim=1)

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale `si`'s codes h (B, C, pn, pn) to f_hat -> (f_hat, next input (B, C, pn_next, pn_next)).

        At the last scale the second output is f_hat itself. f_hat is not modified in place.
        """
        H, W = f_hat.shape[-2:]
        if si == SN - 1:
            f_hat = f_hat + self.phi(si, SN)(h_BChw)
            return f_hat, f_hat
        f_hat = f_hat + self.phi(si, SN)(F.interpolate(h_BChw, size=(H, W), mode="bicubic"))
        pn_next = self.v_patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")

    def embed_to_fhat(self, ms_h_BChw: list[torch.Tensor], all_to_max_scale: bool = True, last_one: bool = False
                      ) -> list[torch.Tensor] | torch.Tensor:
        """Cumulative f_hat from per-scale code maps. all_to_max_scale=False keeps each scale's own size
        (bicubic-growing f_hat; experimental, as in VAR). last_one returns only the final f_hat. Every scale of
        `v_patch_nums` is needed: the phi of each follows its place in the schedule."""
        SN = len(ms_h_BChw)
        if SN != len(self.v_patch_nums):
            raise ValueError(f"{SN} scales of code maps given, the schedule {self.v_patch_nums} has "
                             f"{len(self.v_patch_nums)}: pass them all")
        B = ms_h_BChw[0].shape[0]
        out = []
        if all_to_max_scale:
            H, W = ms_h_BChw[-1].shape[-2:]
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, H, W, dtype=torch.float32)
            for si, h_BChw in enumerate(ms_h_BChw):
                if si < SN - 1:
                    h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
                f_hat = f_hat + self.phi(si, SN)(h_BChw)
                out.append(f_hat)
        else:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, *ms_h_BChw[0].shape[-2:], dtype=torch.float32)
            for si, h_BChw in enumerate(ms_h_BChw):
                f_hat = F.interpolate(f_hat, size=h_BChw.shape[-2:], mode="bicubic")
                f_hat = f_hat + self.phi(si, SN)(h_BChw)
                out.append(f_hat)
        return out[-1] if last_one else out

    # ---------------------------------------------------------------- checkpoints
    def keep_own_ema_if_rescaled(self, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
        """Replace a stored `ema_vocab_hit_SV` that has another number of scales by ours (usage stats only)."""
        key = prefix + "ema_vocab_hit_SV"
        stored = state_dict.get(key)
        ours = self.ema_vocab_hit_SV
        if stored is not None and stored.ndim == 2 and stored.shape[1] == ours.shape[1] \
                and stored.shape[0] != ours.shape[0]:
            logger.info("%s has %d scales, the model %d: keeping the model's own usage statistics",
                        key, stored.shape[0], ours.shape[0])
            state_dict[key] = ours.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.keep_own_ema_if_rescaled(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
