"""VAR's multi-scale residual VQVAE tokenizer (`vae_ch160v4096z32`) and its config (loading: models/loading.py).

Shape legend: B batch, H/W image size, C = Cvae latent channels, h/w latent size (H / downsample),
pn one scale's side, l = pn*pn tokens of one scale, L = sum of l over scales, V vocab.
"""
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.presets import PATCH_NUMS, parse_patch_nums
from models.quantizer import MultiScaleQuantizer, PatchNums
from models.vae_nets import Decoder, Encoder

logger = logging.getLogger(__name__)

VAE_REPO_ID = "FoundationVision/var"
VAE_FILENAME = "vae_ch160v4096z32.pth"

# ----------------------------------------------------------------------------------------------------------------------
# Config and model
# ----------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class VQVAEConfig:
    """Constructor arguments of VQVAE; checkpoints store `dataclasses.asdict(vae.config)`."""
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    dropout: float = 0.0
    beta: float = 0.25
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    v_patch_nums: tuple[int, ...] = PATCH_NUMS[256]
    test_mode: bool = True

    def __post_init__(self):  # lists come back from JSON / YAML
        self.ch_mult = tuple(self.ch_mult)
        self.v_patch_nums = parse_patch_nums(self.v_patch_nums)


class VQVAE(nn.Module):
    """Encoder -> quant_conv -> multi-scale residual quantizer -> post_quant_conv -> decoder.

    Downsample factor 2**(len(ch_mult)-1); the last patch size must equal image size / downsample.
    `test_mode=True` (inference, as when M-VAR trains) puts the model in eval mode and freezes all parameters.
    """

    def __init__(self, *, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), dropout: float = 0.0, beta: float = 0.25,
                 quant_conv_ks: int = 3, quant_resi: float = 0.5, share_quant_resi: int = 4,
                 v_patch_nums: str | Sequence[int] = PATCH_NUMS[256], test_mode: bool = True):
        super().__init__()
        self.config = VQVAEConfig(
            vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=tuple(ch_mult), dropout=dropout, beta=beta,
            quant_conv_ks=quant_conv_ks, quant_resi=quant_resi, share_quant_resi=share_quant_resi,
            v_patch_nums=v_patch_nums, test_mode=test_mode,
        )
        self.V = self.vocab_size = vocab_size
        self.Cvae = z_channels
        self.v_patch_nums = self.config.v_patch_nums
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.test_mode = test_mode

        self.encoder = Encoder(ch=ch, ch_mult=ch_mult, z_channels=z_channels, num_res_blocks=2, dropout=dropout)
        self.decoder = Decoder(ch=ch, ch_mult=ch_mult, z_channels=z_channels, num_res_blocks=3, dropout=dropout)
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, self.v_patch_nums, beta=beta,
                                            quant_resi=quant_resi, share_quant_resi=share_quant_resi)
        pad = quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)

        if test_mode:
            self.eval()
            self.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: VQVAEConfig | dict[str, Any], **overrides: Any) -> "VQVAE":
        """Build from a VQVAEConfig or its asdict() form; `overrides` replace single fields."""
        fields = dataclasses.asdict(cfg) if isinstance(cfg, VQVAEConfig) else dict(cfg)
        return cls(**{**fields, **overrides})

    # ---------------------------------------------------------------- training
    def forward(self, inp_B3HW: torch.Tensor, ret_usages: bool = False
                ) -> tuple[torch.Tensor, list[float] | None, torch.Tensor]:
        """VQVAE training step -> (reconstruction (B, 3, H, W), per-scale code usage % or None, vq_loss)."""
        f_hat, usages, vq_loss = self.quantize(self.quant_conv(self.encoder(inp_B3HW)), ret_usages=ret_usages)
        return self.decoder(self.post_quant_conv(f_hat)), usages, vq_loss

    # ---------------------------------------------------------------- images <-> tokens
    def img_to_f(self, inp_B3HW: torch.Tensor) -> torch.Tensor:
        """Continuous latent (B, C, h, w) before quantization."""
        return self.quant_conv(self.encoder(inp_B3HW))

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode f_hat (B, C, h, w) to an image in [-1, 1] (VAR's clamp), an infinite pixel (fp16 overflow) as NaN:
        the clamp would make it a saturated pixel, which no finiteness check downstream could tell from a real one."""
        img = self.decoder(self.post_quant_conv(f_hat))
        return img.masked_fill_(img.isinf(), float("nan")).clamp_(-1, 1)

    def img_to_idxBl(self, inp_B3HW: torch.Tensor, v_patch_nums: PatchNums | None = None) -> list[torch.Tensor]:
        """Multi-scale token indices: one (B, pn*pn) LongTensor per scale, row-major, small to large."""
        return self.quantize.f_to_idxBl_or_fhat(self.img_to_f(inp_B3HW), to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_img(self, ms_idx_Bl: list[torch.Tensor], same_shape: bool, last_one: bool = False
                     ) -> list[torch.Tensor] | torch.Tensor:
        """Images from square token maps: cumulative per scale (all full size if same_shape), or only the last."""
        ms_h_BChw = []
        for idx_Bl in ms_idx_Bl:
            pn = round(idx_Bl.shape[1] ** 0.5)
            ms_h_BChw.append(self.quantize.idxBl_to_h(idx_Bl, pn, pn))
        f_hats = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=same_shape, last_one=last_one)
        return self.fhat_to_img(f_hats) if last_one else [self.fhat_to_img(f) for f in f_hats]

    def img_to_reconstructed_img(self, inp_B3HW: torch.Tensor, v_patch_nums: PatchNums | None = None,
                                 last_one: bool = False) -> list[torch.Tensor] | torch.Tensor:
        """Reconstructions from the cumulative f_hat after each scale (or only the full one)."""
        f_hats = self.quantize.f_to_idxBl_or_fhat(self.img_to_f(inp_B3HW), to_fhat=True, v_patch_nums=v_patch_nums)
        return self.fhat_to_img(f_hats[-1]) if last_one else [self.fhat_to_img(f) for f in f_hats]
