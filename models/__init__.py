"""Models: the multi-scale VQVAE tokenizer and the M-VAR transformer, plus the VAR-style builder."""
from collections.abc import Sequence

import torch

from models.backends import ATTN, MAMBA
from models.mvar import MVAR, MVARConfig
from models.presets import MVAR_models
from models.tokenizer import PATCH_NUMS, VQVAE

__all__ = ["MVAR", "MVARConfig", "MVAR_models", "VQVAE", "build_vae_mvar"]


def build_vae_mvar(
    device: str | torch.device, patch_nums: Sequence[int] = PATCH_NUMS[256],
    V: int = 4096, Cvae: int = 32, ch: int = 160, share_quant_resi: int = 4,
    num_classes: int = 1000, depth: int = 16, shared_aln: bool = False, attn_l2_norm: bool = True,
    flash_if_available: bool = True, fused_if_available: bool = True,
    init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = -1,
    arch: str = "mvar", ch_mult: Sequence[int] = (1, 1, 2, 2, 4), embed_dim: int | None = None,
    num_heads: int | None = None, gamma_rows: str = "official", **config_overrides,
) -> tuple[VQVAE, MVAR]:
    """Build the tokenizer (frozen, eval) and an initialised M-VAR on `device`, mirroring VAR's `build_vae_var`.

    flash_if_available / fused_if_available (VAR's names): False forces the portable PyTorch kernels (SDPA
    attention, the pure-PyTorch Mamba2); `attn_backend=` / `mamba_backend=` (models.backends) name one instead.
    """
    patch_nums = tuple(patch_nums)
    # the tokenizer is drawn on the CPU and moved, so that a random one is the same on every device
    vae = VQVAE(vocab_size=V, z_channels=Cvae, ch=ch, ch_mult=tuple(ch_mult), test_mode=True,
                share_quant_resi=share_quant_resi, v_patch_nums=patch_nums).to(device)
    attn_backend = config_overrides.pop("attn_backend", "auto" if flash_if_available else ATTN.portable)
    mamba_backend = config_overrides.pop("mamba_backend", "auto" if fused_if_available else MAMBA.portable)
    config = MVARConfig(
        depth=depth, num_classes=num_classes, V=V, Cvae=Cvae, patch_nums=patch_nums, arch=arch,
        embed_dim=embed_dim, num_heads=num_heads, shared_aln=shared_aln, attn_l2_norm=attn_l2_norm,
        **config_overrides,
    )
    with torch.device(device):  # built where it runs: init_weights redraws the weights there anyway
        mvar = MVAR(config, vae=vae, attn_backend=attn_backend, mamba_backend=mamba_backend)
    if torch.device(device).type != "meta":
        mvar.init_weights(init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head,
                          init_std=init_std, gamma_rows=gamma_rows)
    return vae, mvar
