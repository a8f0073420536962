"""Convolutional encoder and decoder of VAR's multi-scale VQVAE (the LDM "vq-f16" layout).

Module and parameter names match VAR's `vae_ch160v4096z32.pth`, so the published weights load strictly.
Attention blocks sit only at the lowest resolution (the last encoder level, the first decoder up level)
and in each `mid`. Shape legend: B batch, C channels, H/W spatial size, h/w latent size.
"""
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NORM_GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6) as in the VQGAN/LDM autoencoders."""
    if channels % NORM_GROUPS:
        raise ValueError(f"VAE widths must be multiples of {NORM_GROUPS} (GroupNorm groups); got {channels} channels")
    return nn.GroupNorm(NORM_GROUPS, channels, eps=1e-6, affine=True)


# ----------------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------------

class Downsample2x(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BCHW, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BCHW, scale_factor=2, mode="nearest"))


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, with a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BCHW), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return self.nin_shortcut(x_BCHW) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv `qkv` and `proj_out`, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BCHW.shape
        qkv_B3CL = self.qkv(self.norm(x_BCHW)).view(B, 3, C, H * W)
        q_BLC, k_BLC, v_BLC = qkv_B3CL.transpose(2, 3).unbind(1)
        h_BLC = F.scaled_dot_product_attention(q_BLC, k_BLC, v_BLC)  # softmax scale C**-0.5
        # contiguous, as VAR's: a channels-last view gave proj_out's weight gradient strides DDP warns about
        return x_BCHW + self.proj_out(h_BLC.transpose(1, 2).contiguous().view(B, C, H, W))


class MidBlock(nn.Module):
    """ResNet - attention - ResNet at the lowest resolution."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x_BCHW)))


class Level(nn.Module):
    """One resolution level: `block` (ResNet blocks), `attn` (empty or one per block), optional resampler."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, with_attn: bool, dropout: float):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, dropout) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch) for _ in range(n_blocks if with_attn else 0))

    def run_blocks(self, h_BCHW: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h_BCHW = block(h_BCHW)
            if len(self.attn):
                h_BCHW = self.attn[i](h_BCHW)
        return h_BCHW


# ----------------------------------------------------------------------------------------------------------------------
# Encoder / decoder
# ----------------------------------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, z_channels, H/2**(L-1), W/2**(L-1)) for L = len(ch_mult) levels."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], z_channels: int, num_res_blocks: int = 2,
                 dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        n_levels = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            level = Level(block_in, ch * mult, num_res_blocks, with_attn=i == n_levels - 1, dropout=dropout)
            block_in = ch * mult
            if i != n_levels - 1:
                level.downsample = Downsample2x(block_in)
            self.down.append(level)
        self.mid = MidBlock(block_in, dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_B3HW)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))  # (B, z_channels, h, w)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h*2**(L-1), w*2**(L-1)); `up[i]` mirrors `encoder.down[i]`."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], z_channels: int, num_res_blocks: int = 3,
                 dropout: float = 0.0, out_channels: int = 3):
        super().__init__()
        n_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(block_in, dropout)
        levels = []
        for i in reversed(range(n_levels)):  # built from the lowest resolution upwards
            level = Level(block_in, ch * ch_mult[i], num_res_blocks, with_attn=i == n_levels - 1, dropout=dropout)
            block_in = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample2x(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z_BChw))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))  # (B, 3, H, W)
