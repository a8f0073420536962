"""Sample class-conditional images from an M-VAR (or VAR) checkpoint.

Pictures (a grid with one row per class, or a folder when --out has no .png suffix):
    python sample.py --ckpt out/ckpt.pth --classes 207 360 387 --num_per_class 4 --out grid.png
Official weights (`OliverRen/M-VAR` d{depth}.pth and VAR's tokenizer, read from the Hugging Face cache first):
    python sample.py --depth 16 --classes 207 --out grid.png
FID dump (50 PNGs per class for every class, sharded over ranks, resumable), then one ADM-format npz:
    torchrun --nproc_per_node=8 sample.py --depth 16 --fid --preset fid --fid_dir samples --bf16
    python scripts/fid.py --sample samples/d16-cfg1.5-topk900-topp0.96-seed0-n50.npz \\
        --ref VIRTUAL_imagenet256_labeled.npz

The same flags and seed give the same images: batch c is drawn with a generator seeded from (seed, c).
"""
import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import numpy as np
import torch

import dist
from models.loading import config_from_state_dict, load_mvar, resolve_mvar_checkpoint
from models.attention import resolve_backend
from models.backends import BackendError
from models.mamba2 import resolve_kernels
from models.mvar import MVAR, MVARConfig
from models.precision import effective_amp_dtype
from models.tokenizer import load_vae
from utils.args import add_backend_flags, add_model_flag
from utils.checkpoint import load_checkpoint
from utils.fid_dump import DumpPlan, check_or_write_settings, chunk_seed, dump_shard, fid_folder_name, pack_npz
from utils.image_grid import save_folder, save_grid, to_uint8_BHW3
from utils.logging_utils import setup_logging
from utils.registry import ARCH_BRANCHES, MVAR_models

logger = logging.getLogger("sample")

PRESETS: dict[str, dict[str, Any]] = {
    "fid": {"cfg": 1.5, "top_p": 0.96, "top_k": 900, "more_smooth": False},  # the paper's FID settings
}
DEMO_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # VAR's demo classes (ImageNet ids)


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="M-VAR checkpoint: ours ({config, model, ...}) or an official file")
    p.add_argument("--depth", type=int, default=None,
                   help="without --ckpt: use the official d{depth}.pth; with --ckpt: the depth it must have")
    p.add_argument("--arch", default=None, choices=list(ARCH_BRANCHES),
                   help="the architecture --ckpt must have (checked before sampling)")
    add_model_flag(p)
    p.add_argument("--vae_ckpt", default=None, help="tokenizer file (default: the one embedded in --ckpt, else "
                                                    "VAR's vae_ch160v4096z32.pth from the Hugging Face cache)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="fid: cfg 1.5, top_p 0.96, top_k 900, no more_smooth (explicit flags still win)")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance (>= 0, ramped over scales)")
    p.add_argument("--top_k", type=int, default=900, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus mass in (0, 1] (1: no nucleus filter)")
    p.add_argument("--more_smooth", action=argparse.BooleanOptionalAction, default=False,
                   help="Gumbel-softmax mixture of codes: smoother pictures, not for FID")
    p.add_argument("--seed", type=int, default=0, help="global seed (>= 0)")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help=f"class ids, one grid row each (default: {' '.join(map(str, DEMO_CLASSES))})")
    p.add_argument("--num_per_class", type=int, default=4, help="images per class (grid columns)")
    p.add_argument("--bs", type=int, default=16, help="images per generation batch (per rank)")
    amp = p.add_mutually_exclusive_group()
    amp.add_argument("--fp16", action="store_true", help="autocast to float16")
    amp.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    p.add_argument("--out", default="samples.png", help="a .png path (grid) or a folder (one PNG per image)")
    add_backend_flags(p)
    p.add_argument("--device", default=None, help="default: cuda (this rank's GPU) if available, else cpu")
    p.add_argument("--fid", action="store_true", help="FID dump of every class instead of pictures")
    p.add_argument("--fid_num_per_class", type=int, default=50, help="FID images per class")
    p.add_argument("--fid_dir", default="samples", help="parent folder of the FID dump and its npz")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse, apply the preset (explicit flags override it) and check every flag that needs no checkpoint."""
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset is not None:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    problems = []
    if args.model is not None:  # its depth and arch, where not given: the official file and the checks follow
        named = MVAR_models[args.model]
        args.depth = args.depth if args.depth is not None else named["depth"]
        args.arch = args.arch if args.arch is not None else named.get("arch", MVARConfig.arch)
    if args.ckpt is None and args.depth is None:
        problems.append("pass --ckpt=PATH, or --depth=N for the official OliverRen/M-VAR d{N}.pth")
    if not 0.0 < args.top_p <= 1.0:
        problems.append(f"--top_p must be in (0, 1] (1 disables the nucleus filter), got {args.top_p}")
    if args.cfg < 0:
        problems.append(f"--cfg must be >= 0 (0: no guidance), got {args.cfg}")
    for flag in ("top_k", "seed"):
        if getattr(args, flag) < 0:
            problems.append(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    for flag in ("num_per_class", "bs", "fid_num_per_class", "depth"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            problems.append(f"--{flag} must be >= 1, got {value}")
    if args.classes is not None and args.fid:
        problems.append("--classes is for pictures; --fid samples every class")
    if args.classes is not None and min(args.classes) < 0:
        problems.append(f"--classes must be >= 0, got {args.classes}")
    if args.fid and args.more_smooth:
        logger.warning("--more_smooth is meant for pictures; the paper's FID uses --no-more_smooth")
    if problems:
        parser.error("\n  ".join(problems))
    return args


def check_against_config(args: argparse.Namespace, config: MVARConfig, ckpt: str) -> None:
    """Flags that need the checkpoint's config; raises ValueError naming the flag."""
    problems = []
    if args.depth is not None and args.depth != config.depth:
        problems.append(f"--depth={args.depth}, but {ckpt} holds a depth-{config.depth} model")
    if args.arch is not None and args.arch != config.arch:
        problems.append(f"--arch={args.arch}, but {ckpt} holds arch={config.arch}")
    for field, value in MVAR_models[args.model].items() if args.model else ():
        if field not in ("depth", "arch") and getattr(config, field) != value:
            problems.append(f"--model={args.model} has {field}={value}, but {ckpt} holds {getattr(config, field)}")
    bad = [c for c in (args.classes or ()) if c >= config.num_classes]
    if bad:
        problems.append(f"--classes {bad} outside the model's classes [0, {config.num_classes - 1}]")
    if problems:
        raise ValueError("; ".join(problems))


def amp_dtype(args: argparse.Namespace) -> torch.dtype | None:
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None


def fall_back_to_fp32_where_slow(args: argparse.Namespace, device: torch.device) -> None:
    """--bf16 on a CPU without bf16 instructions runs in fp32 (logged once), and the FID settings say so."""
    if args.bf16 and effective_amp_dtype(device, torch.bfloat16) is None:
        args.bf16 = False


def check_backends(args: argparse.Namespace, device: torch.device) -> None:
    """A forced kernel (--attn_backend / --mamba_backend, or their env vars) that cannot run here: a BackendError
    saying why, before anything is loaded."""
    resolve_backend(args.attn_backend, device, amp_dtype(args) or torch.float32)
    resolve_kernels(args.mamba_backend, device.type == "cuda", device)


# ---------------------------------------------------------------------------------------------------------------
# Loading and generation
# ---------------------------------------------------------------------------------------------------------------
def load_checked(args: argparse.Namespace, device: torch.device) -> tuple[MVAR, Path, str]:
    """Resolve and read the checkpoint, check it against the flags, then build the model and its tokenizer
    -> (model, checkpoint path, which tokenizer: the --vae_ckpt file name, 'embedded' or 'official')."""
    if args.ckpt is None:
        ckpt_path = resolve_mvar_checkpoint(None, args.depth)
    elif not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"--ckpt={args.ckpt}: no such file")
    else:
        ckpt_path = Path(args.ckpt)
    ckpt = load_checkpoint(ckpt_path, mmap=False)
    ours = "config" in ckpt and "model" in ckpt
    config = MVARConfig.from_dict(ckpt["config"]) if ours else config_from_state_dict(ckpt)
    check_against_config(args, config, ckpt_path.name)
    embedded_vae = "vae" in ckpt and "vae_config" in ckpt
    if args.vae_ckpt is None and embedded_vae:
        vae, vae_id = load_vae(ckpt_path, device=device, flag="--ckpt"), "embedded"
    else:
        vae = load_vae(args.vae_ckpt, device=device, v_patch_nums=config.patch_nums)
        vae_id = "official" if args.vae_ckpt is None else Path(args.vae_ckpt).name
    mvar = load_mvar(ckpt, device=device, vae=vae, attn_backend=args.attn_backend, mamba_backend=args.mamba_backend)
    return mvar, ckpt_path, vae_id


def make_generate(mvar: MVAR, args: argparse.Namespace, device: torch.device):
    """labels (B,) int64 numpy, g_seed -> uint8 images (B, H, W, 3). Under --fp16/--bf16 the Linear weights are
    cast once per batch (`MVAR.inference_precision`), not on every call."""
    dtype = amp_dtype(args)

    def generate(label_B: np.ndarray, g_seed: int) -> np.ndarray:
        label_B = torch.as_tensor(label_B, dtype=torch.long, device=device)
        with torch.inference_mode(), mvar.inference_precision(dtype):
            img_B3HW = mvar.autoregressive_infer_cfg(len(label_B), label_B, g_seed=g_seed, cfg=args.cfg,
                                                     top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth)
        return to_uint8_BHW3(img_B3HW)

    return generate


def precision_name(args: argparse.Namespace) -> str:
    return "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"


# ---------------------------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------------------------
def sample_pictures(args: argparse.Namespace, generate) -> Path:
    from tqdm import tqdm

    classes = list(args.classes if args.classes is not None else DEMO_CLASSES)
    labels = np.repeat(np.asarray(classes, dtype=np.int64), args.num_per_class)  # class-major: one row per class
    batches: list[np.ndarray] = []
    for c, start in enumerate(tqdm(range(0, len(labels), args.bs), desc="sampling", unit="batch")):
        batches.append(generate(labels[start:start + args.bs], chunk_seed(args.seed, c)))
    imgs_BHW3 = np.concatenate(batches)
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        save_grid(imgs_BHW3, out, ncol=args.num_per_class)
    else:
        save_folder(imgs_BHW3, out, [f"class{c:04d}_{k:03d}" for c in classes for k in range(args.num_per_class)])
    logger.info("wrote %d images (%d classes x %d) to %s", len(imgs_BHW3), len(classes), args.num_per_class, out)
    return out


def sample_fid(args: argparse.Namespace, mvar: MVAR, ckpt_path: Path, vae_id: str, generate, rank: int,
               world_size: int) -> Path | None:
    """Every rank dumps its share; rank 0 then packs the npz and writes the settings JSON beside it."""
    folder = Path(args.fid_dir) / fid_folder_name(str(ckpt_path), args.cfg, args.top_k, args.top_p, args.seed,
                                                  args.more_smooth, args.fid_num_per_class)
    plan = DumpPlan(num_classes=mvar.num_classes, num_per_class=args.fid_num_per_class, batch_size=args.bs)
    image_hw = (mvar.patch_nums[-1] * mvar.vae.downsample,) * 2
    settings = {"ckpt": ckpt_path.name, "vae": vae_id, "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p,
                "more_smooth": args.more_smooth, "seed": args.seed, "num_classes": plan.num_classes,
                "num_per_class": plan.num_per_class, "batch_size": plan.batch_size, "precision": precision_name(args)}
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        check_or_write_settings(folder, settings)
        logger.info("FID dump: %d images (%d classes x %d) into %s over %d rank(s)", plan.total,
                    plan.num_classes, plan.num_per_class, folder, world_size)
    dist.barrier()
    t0 = time.time()
    written = dump_shard(folder, plan, args.seed, generate, rank, world_size, image_hw, progress=rank == 0)
    logger.info("rank %d wrote %d new PNGs in %.1fs", rank, written, time.time() - t0)
    dist.barrier()
    if rank != 0:
        return None
    npz = pack_npz(folder, plan.total, image_hw=image_hw)  # raises, naming them, if PNGs are missing
    info = {**settings, "ckpt_path": str(ckpt_path.resolve()), "arch": mvar.config.arch, "depth": mvar.depth,
            "num_images": plan.total, "image_hw": list(image_hw), "npz": str(npz), "folder": str(folder),
            "torch": torch.__version__}
    npz.with_suffix(".json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return npz


# ---------------------------------------------------------------------------------------------------------------
# Entry point (torchrun or a single process)
# ---------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> Path | None:
    args = parse_args(argv)
    device = dist.initialize()
    device = torch.device(args.device) if args.device is not None else device
    rank, world_size = dist.get_rank(), dist.get_world_size()
    setup_logging(rank)
    if world_size > 1 and not args.fid:
        raise SystemExit("several ranks only make sense with --fid (pictures are written by one process)")
    fall_back_to_fp32_where_slow(args, device)
    try:
        check_backends(args, device)
    except BackendError as e:
        raise SystemExit(f"error: {e}") from e
    try:
        mvar, ckpt_path, vae_id = load_checked(args, device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    generate = make_generate(mvar, args, device)
    if args.fid:
        return sample_fid(args, mvar, ckpt_path, vae_id, generate, rank, world_size)
    return sample_pictures(args, generate)


if __name__ == "__main__":
    dist.run_then_finalize(main)
