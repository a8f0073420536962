"""Zero-shot editing for scale-wise models: in-painting, out-painting and class-conditional editing.

The image is tokenized at every scale. While sampling, each scale's tokens outside the mask are replaced by the
image's own tokens and the ones inside are drawn as usual (cfg, top-k, top-p), so the known tokens feed the next
scale, the carried Mamba2 states and VAR's KV caches exactly like generated ones. Out-painting is a mask around
the image; class-conditional editing is a mask over an object and another class.

Mask rule (pixel mask -> token grid): a token is *known* when what it summarises holds no masked pixel. The
last scale's tokens are the latent's cells; a coarser scale's token is the area average of a bin of latent cells
(the tokenizer's `interpolate(mode="area")`: rows floor(i*h/pn) .. ceil((i+1)*h/pn) of the h x h latent). So the
mask is pooled to the latent grid first (a cell that a masked pixel touches, even partly, is masked), then to each
scale over those same bins: every masked pixel is regenerated at every scale, and no known token averages a masked
latent cell. The 1x1 first scale is known only for an empty mask.

Shapes: B batch, H/W pixels, pn one scale's side, l = pn*pn tokens of one scale.
"""
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class KnownTokens:
    """Per scale: the image's tokens `idx_Bl` and where they are kept, `keep_Bl` (True = known)."""

    idx_Bl: list[torch.Tensor]
    keep_Bl: list[torch.Tensor]

    def merge_idx(self, si: int, idx_Bl: torch.Tensor) -> torch.Tensor:
        """Sampled token ids of scale `si` with the known ones put back."""
        return torch.where(self.keep_Bl[si], self.idx_Bl[si], idx_Bl)

    def merge_codes(self, si: int, h_BlC: torch.Tensor, known_h_BlC: torch.Tensor) -> torch.Tensor:
        """Code vectors of scale `si` (e.g. a Gumbel-softmax mixture) with the known tokens' codes put back."""
        return torch.where(self.keep_Bl[si].unsqueeze(-1), known_h_BlC, h_BlC)


def check_edit_inputs(img_B3HW: torch.Tensor, mask: torch.Tensor, image_size: int) -> torch.Tensor:
    """Check an image batch in [0, 1] and a binary mask; returns the mask as bool (B, 1, H, W)."""
    if img_B3HW.ndim != 4 or img_B3HW.shape[1] != 3 or img_B3HW.shape[-2:] != (image_size, image_size):
        raise ValueError(f"image: expected (B, 3, {image_size}, {image_size}) (the tokenizer's size), "
                         f"got {tuple(img_B3HW.shape)}")
    if img_B3HW.shape[0] == 0:
        raise ValueError("image: an empty batch (B = 0)")
    if not img_B3HW.is_floating_point() or not bool(((img_B3HW >= 0) & (img_B3HW <= 1)).all()):  # NaN fails too
        raise ValueError("image: expected floats in [0, 1] (what autoregressive_infer_cfg returns)")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask: expected a binary mask (bool, or 0/1 values; 1 = regenerate)")
        mask = mask != 0
    if mask.ndim not in (2, 4):
        raise ValueError(f"mask: expected (H, W) or (1 or B, 1, H, W), got {tuple(mask.shape)}")
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    B = img_B3HW.shape[0]
    if mask.shape[1] != 1 or mask.shape[-2:] != img_B3HW.shape[-2:] or mask.shape[0] not in (1, B):
        raise ValueError(f"mask: expected (H, W), (1 or B, 1, H, W) with H, W = {tuple(img_B3HW.shape[-2:])}, "
                         f"got {tuple(mask.shape)}")
    return mask.expand(B, 1, -1, -1).to(img_B3HW.device)


def token_masks(mask_B1HW: torch.Tensor, patch_nums: Sequence[int]) -> list[torch.Tensor]:
    """Per scale, which tokens are known (B, pn*pn) bool: cells with no masked pixel (see the module docstring)."""
    latent_B1hw = F.adaptive_max_pool2d(mask_B1HW.float(), patch_nums[-1])
    return [F.adaptive_max_pool2d(latent_B1hw, pn).flatten(1) == 0 for pn in patch_nums]


@torch.no_grad()
def known_tokens(vae: nn.Module, img_B3HW: torch.Tensor, mask_B1HW: torch.Tensor,
                 patch_nums: Sequence[int]) -> KnownTokens:
    """Tokenize the image ([0, 1]) at every scale and mark the tokens outside the mask as known. The tokens are made
    as training makes them (Trainer.tokenize): in fp32 with autocast off, also when sampling runs in fp16/bf16 (a
    half-precision encoder and nearest-code search would pick other codes, or overflow). A batch of one image
    repeated (several edits of it: sample.py --edit, the web app) is encoded once."""
    one = all_the_same(img_B3HW)
    with torch.autocast(img_B3HW.device.type, enabled=False):
        idx_Bl = vae.img_to_idxBl((img_B3HW[:1] if one else img_B3HW).float().mul(2).sub(1), v_patch_nums=patch_nums)
    if one:
        idx_Bl = [idx.expand(img_B3HW.shape[0], -1) for idx in idx_Bl]
    return KnownTokens(idx_Bl, token_masks(mask_B1HW, patch_nums))


def all_the_same(x_B: torch.Tensor) -> bool:
    """Whether a batch of more than one holds the same item throughout."""
    return x_B.shape[0] > 1 and bool((x_B == x_B[:1]).all())


@torch.no_grad()
def paste_unmasked(vae: nn.Module, known: KnownTokens, edited_B3HW: torch.Tensor,
                   mask_B1HW: torch.Tensor) -> torch.Tensor:
    """The edited image inside the mask, the tokenizer's reconstruction (in [0, 1]) outside it (decoded once for a
    repeated image)."""
    B = edited_B3HW.shape[0]
    one = all(all_the_same(idx) for idx in known.idx_Bl)
    recon_B3HW = vae.idxBl_to_img([idx[:1] for idx in known.idx_Bl] if one else known.idx_Bl, same_shape=True,
                                  last_one=True).float().add(1).mul(0.5)  # no second rounding in bf16/fp16
    if one:
        recon_B3HW = recon_B3HW.expand(B, -1, -1, -1)
    return torch.where(mask_B1HW, edited_B3HW, recon_B3HW.to(edited_B3HW.dtype))
