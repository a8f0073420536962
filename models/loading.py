"""Load M-VAR / VAR weights: our checkpoints (with their config) and the official raw state dicts.

Official files (`OliverRen/M-VAR` d16.pth ..., `FoundationVision/var` var_d16.pth ...) carry no config: it is
read off the tensor shapes. They also carry derived buffers (`lvl_1L`, `attn_bias_for_masking`,
`blocks.i.attn.patch_nums`) that this implementation recomputes, so those are the only keys ignored.
"""
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import torch

from models.mvar import MVAR, MVARConfig
from models.tokenizer import PATCH_NUMS, VQVAE, load_vae  # noqa: F401  (re-exported: the one tokenizer loader)
from utils.checkpoint import load_checkpoint
from utils.hub import resolve_checkpoint
from utils.state_dict import load_state_dict_checked

logger = logging.getLogger(__name__)

MVAR_REPO = "OliverRen/M-VAR"
DERIVED_KEYS = ("lvl_1L", "attn_bias_for_masking", "blocks.*.attn.patch_nums")  # fnmatch patterns


def config_from_state_dict(
    state_dict: dict[str, torch.Tensor], patch_nums: Sequence[int] | None = None, **overrides,
) -> MVARConfig:
    """Infer the MVARConfig of a raw (official) state dict from its tensor shapes.

    The patch schedule comes from `patch_nums`, else the official `blocks.0.attn.patch_nums` buffer, else L
    (256 or 512 px presets). Weights with attention and no Mamba load as `arch="var"`: an `intra` ablation has the
    same keys, so pass `arch="intra"` for those (and `var_blocks=K` for a VAR + intra mix, which the keys cannot
    tell apart either; a VAR + mvar/mamba mix is inferred).
    """
    missing = [k for k in ("pos_start", "pos_1LC", "head.weight", "word_embed.weight", "class_emb.weight")
               if k not in state_dict]
    if missing:
        raise KeyError(f"not an M-VAR/VAR state dict: missing {missing}")
    C = state_dict["pos_start"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    mamba_blocks = [i for i in range(depth) if f"blocks.{i}.mamba.A_log" in state_dict]
    has_mamba = bool(mamba_blocks)
    has_attn = f"blocks.{depth - 1}.attn.mat_qkv.weight" in state_dict
    arch = "mvar" if has_attn and has_mamba else ("mamba" if has_mamba else "var")
    var_blocks = mamba_blocks[0] if has_mamba else 0  # leading VAR blocks of a var_blocks mix
    L = state_dict["pos_1LC"].shape[1]
    stored = state_dict.get("blocks.0.attn.patch_nums")  # official M-VAR files: the pn*pn of every scale
    if patch_nums is None and stored is not None:
        patch_nums = tuple(math.isqrt(int(n)) for n in stored.tolist())
    if patch_nums is None:
        by_len = {sum(p * p for p in pn): pn for pn in PATCH_NUMS.values()}
        if L not in by_len:
            raise ValueError(f"checkpoint has L={L} tokens: pass the patch schedule explicitly (--pn=1_2_...)")
        patch_nums = by_len[L]
    if sum(p * p for p in patch_nums) != L:
        raise ValueError(f"patch_nums {tuple(patch_nums)} give L={sum(p * p for p in patch_nums)}, "
                         f"but the checkpoint has L={L}")
    scale_mul = state_dict.get("blocks.0.attn.scale_mul_1H11")
    if has_mamba:  # Mamba2 sizes: norm.weight is d_inner, conv1d spans x, B and C (d_inner + 2 * d_state)
        d_inner = state_dict[f"blocks.{var_blocks}.mamba.norm.weight"].shape[0]
        conv_w = state_dict[f"blocks.{var_blocks}.mamba.conv1d.weight"]
        overrides = dict(expand=d_inner // C, d_state=(conv_w.shape[0] - d_inner) // 2, d_conv=conv_w.shape[-1],
                         **overrides)
    fields = dict(
        depth=depth, num_classes=state_dict["class_emb.weight"].shape[0] - 1, V=state_dict["head.weight"].shape[0],
        Cvae=state_dict["word_embed.weight"].shape[1], patch_nums=tuple(patch_nums), arch=arch,
        var_blocks=var_blocks, embed_dim=C,
        num_heads=scale_mul.shape[1] if scale_mul is not None else C // 64,
        shared_aln="shared_ada_lin.1.weight" in state_dict, attn_l2_norm=scale_mul is not None,
    )
    fields.update(overrides)
    return MVARConfig(**fields)


def load_mvar(
    src: str | Path | dict[str, Any], device: str | torch.device = "cpu", vae: VQVAE | None = None,
    patch_nums: Sequence[int] | None = None, attn_backend: str = "auto", mamba_backend: str = "auto",
    model_cls: type[MVAR] = MVAR, name: str | None = None,
    **config_overrides,
) -> MVAR:
    """Build an MVAR from a checkpoint path or an already loaded dict and load its weights strictly.

    Accepts our checkpoints (a dict with "config" and "model", trainer checkpoints included) and official raw
    state dicts. `config_overrides` change non-weight settings (e.g. cond_drop_rate). The kernels are a run-time
    choice (models.backends), never part of a checkpoint: "auto" (then $MVAR_ATTN_BACKEND / $MVAR_MAMBA_BACKEND)
    unless given, so a model trained with the portable kernels runs the fused ones where they exist.
    `model_cls`: an MVAR subclass to build (e.g. models.hub.MVARHF); `name`: what errors call the source.
    """
    ckpt = load_checkpoint(src, mmap=False) if isinstance(src, (str, Path)) else src
    name = name or (str(src) if isinstance(src, (str, Path)) else "state dict")
    if "config" in ckpt and "model" in ckpt:
        config = MVARConfig.from_dict(ckpt["config"], **config_overrides)
        state_dict = ckpt["model"]
    else:
        state_dict = ckpt
        config = config_from_state_dict(state_dict, patch_nums, **config_overrides)
    with torch.device(device):
        mvar = model_cls(config, vae=vae, attn_backend=attn_backend, mamba_backend=mamba_backend)
    load_state_dict_checked(mvar, state_dict, ignore=DERIVED_KEYS, what=f"M-VAR checkpoint {name}")
    logger.info("loaded %s: arch=%s depth=%d C=%d L=%d", name, config.arch, config.depth, config.embed_dim, mvar.L)
    return mvar.eval()


def resolve_mvar_checkpoint(path: str | None, depth: int, flag: str = "--ckpt") -> Path:
    """An explicit path, else the official `OliverRen/M-VAR` file d{depth}.pth, offline-first."""
    return resolve_checkpoint(path, MVAR_REPO, f"d{depth}.pth", flag)


def mvar_checkpoint(mvar: MVAR, vae: VQVAE | None = None) -> dict[str, Any]:
    """The self-describing dict our tools save: config + weights (+ the tokenizer when given)."""
    ckpt: dict[str, Any] = {"config": dataclasses.asdict(mvar.config), "model": mvar.state_dict()}
    if vae is not None:
        ckpt.update(vae_config=dataclasses.asdict(vae.config), vae=vae.state_dict())
    return ckpt
