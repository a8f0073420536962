"""Sample class-conditional images from an M-VAR (or VAR) checkpoint.

Pictures (a grid with one row per class, or a folder when --out has no image suffix such as .png or .jpg):
    python sample.py --ckpt out/ckpt.pth --classes 207 360 387 --num_per_class 4 --out grid.png
Official weights (`OliverRen/M-VAR` d{depth}.pth, VAR's `FoundationVision/var` var_d{depth}.pth with --model VAR-dN,
and VAR's tokenizer, read from the Hugging Face cache first):
    python sample.py --depth 16 --classes 207 --out grid.png
FID dump (50 PNGs per class for every class, sharded over ranks, resumable), then one ADM-format npz:
    torchrun --nproc_per_node=8 sample.py --depth 16 --fid --preset fid --fid_dir samples --fp16
    python scripts/fid.py --sample samples/d16-cfg1.5-topk900-topp0.96-seed0-n50.npz \\
        --ref VIRTUAL_imagenet256_labeled.npz

Zero-shot editing (in-/out-painting, class-conditional editing): a grid with one row per class, showing
before | mask | --num_per_class edits:
    python sample.py --ckpt out/ckpt.pth --edit digit.png --box 0,16,32,32 --classes 3 7 --out edit.png
--ckpt also takes a Hub folder (scripts/export.py) or a Hugging Face repo id, read offline-first.

The same flags and seed give the same images: batch c is drawn with a generator seeded from (seed, c);
--official_seed seeds the one batch with --seed itself, as the official demo does, for its images.
"""
import argparse
import contextlib
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Sequence

import numpy as np
import torch

import dist
from models.attention import resolve_backend
from models.backends import BackendError
from models.hub_format import MVARHF, HubSource, is_hub_source, model_file_tokenizer, read_config, read_model_file
from models.loading import CheckpointError, attention_only_note, load_mvar, load_vae, official_file, \
    resolve_mvar_checkpoint, weights_digest
from models.mamba2 import resolve_kernels
from models.mvar import MVAR, MVARConfig
from models.precision import effective_amp_dtype, set_tf32
from models.presets import ARCH_BRANCHES, MVAR_models, format_patch_nums, parse_patch_nums
from utils.evaluation.fid_dump import DumpFolderError, DumpPlan, check_or_write_settings, check_pack_space, \
    chunk_seed, dump_shard, fid_folder_name, pack_npz, remove_interrupted_writes
from utils.flags import ExamplesHelpFormatter, add_backend_flags, add_model_flag, device_problem, \
    empty_path_problems, sampling_problems
from utils.run.checkpoint import DiskFullError, OutputFolderError, check_writable, write_text_atomic
from utils.run.agreement import refuse_disagreement
from utils.run.lock import LOCK_NAME, RunLockError, lock_output_folder, read_owner
from utils.run.log import SAME_ON_ALL_RANKS, setup_logging
from utils.run.preemption import sigterm_raises
from utils.sample_io import NonFiniteValueError, check_finite_images, check_finite_weights, grid_format_problem, \
    grid_size_problem, is_image_file, load_edit_inputs, parse_box, read_edit_inputs, save_folder, save_grid, \
    to_uint8_BHW3

logger = logging.getLogger("sample")

PRESETS: dict[str, dict[str, Any]] = {
    "fid": {"cfg": 1.5, "top_p": 0.96, "top_k": 900, "more_smooth": False},  # the paper's FID settings
}
EDIT_CHECK_RESO = 16  # edit inputs are read at a stand-in resolution before the model (and its own) loads
DEMO_CLASSES = (980, 437, 22, 562)  # VAR's demo_sample.ipynb (ImageNet ids; 207 360 ... were DiT's)
PICTURE_ONLY_FLAGS = {"classes": "samples every class", "num_per_class": "takes --fid_num_per_class",
                      "out": "writes into --fid_dir"}
FID_ONLY_FLAGS = ("fid_num_per_class", "fid_dir")  # without --fid, forgetting it would write pictures unnoticed
SEED_LIMIT = 2 ** 64  # torch.Generator.manual_seed takes seeds below it (--official_seed passes --seed itself)


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------
def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(description=__doc__, formatter_class=ExamplesHelpFormatter)
    p.add_argument("--ckpt", default=None, help="M-VAR checkpoint: ours ({config, model, ...}), an official file, "
                   "a Hub folder (scripts/export.py) or a Hugging Face repo id")
    p.add_argument("--depth", type=int, default=None,
                   help="without --ckpt: use the official d{depth}.pth; with --ckpt: the depth it must have")
    p.add_argument("--arch", default=None, choices=list(ARCH_BRANCHES),
                   help="the architecture --ckpt must have (checked before sampling; a raw state dict with attention "
                   "and no Mamba is read as var unless --arch=intra); without --ckpt, var picks VAR's official "
                   "var_d{depth}.pth")
    add_model_flag(p)
    p.add_argument("--pn", default=None, help="patch schedule of an official file whose token count matches no "
                   "preset: 256, 512 or sides joined by '_' (our checkpoints carry theirs)")
    p.add_argument("--vae_ckpt", default=None, help="tokenizer file (default: the one embedded in --ckpt, else "
                                                    "VAR's vae_ch160v4096z32.pth from the Hugging Face cache)")
    p.add_argument("--allow_other_tokenizer", action="store_true", help="accept a --vae_ckpt (or a Hub folder's "
                   "tokenizer/) other than the tokenizer --ckpt was trained with; refused otherwise")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="fid: cfg 1.5, top_p 0.96, top_k 900, no more_smooth, the default with --fid; without it the "
                   "picture settings below apply (explicit flags win over both)")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance (>= 0, ramped over scales)")
    p.add_argument("--top_k", type=int, default=900, help="keep the k most likely tokens (0, or V and more: all)")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus mass in (0, 1] (1: no nucleus filter)")
    p.add_argument("--more_smooth", action=argparse.BooleanOptionalAction, default=False,
                   help="Gumbel-softmax mixture of codes: smoother pictures, not for FID")
    p.add_argument("--seed", type=int, default=0, help="global seed (>= 0); batch c is drawn from a generator "
                   "seeded with a mix of (seed, c)")
    p.add_argument("--official_seed", action="store_true", help="pictures in one batch: seed its generator with "
                   "--seed itself (the official demo's g_seed=seed), so that the official weights, classes and "
                   "settings give the official demo's images (its settings: --num_per_class 2 --fp16; in fp16 a rare "
                   "token differs: word_embed runs in fp32 here, in fp16 there)")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help=f"class ids, one grid row each (default: {' '.join(map(str, DEMO_CLASSES))})")
    p.add_argument("--num_per_class", type=int, default=4, help="images per class (grid columns)")
    p.add_argument("--bs", type=int, default=16, help="images per generation batch (per rank)")
    amp = p.add_mutually_exclusive_group()
    amp.add_argument("--fp16", action="store_true", help="autocast to float16")
    amp.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TensorFloat32 matmuls and "
                   "convolutions on CUDA, as the official demo and train.py's --tf32 (--no-tf32: exact fp32)")
    p.add_argument("--out", default="samples.png", help="an image path (.png, .jpg, ...: one grid) or a folder "
                   "(one PNG per image)")
    add_backend_flags(p)
    p.add_argument("--device", default=None, help="default: cuda (this rank's GPU) if available, else cpu")
    p.add_argument("--fid", action="store_true", help="FID dump of every class instead of pictures")
    p.add_argument("--fid_num_per_class", type=int, default=50, help="FID images per class")
    p.add_argument("--fid_dir", default="samples", help="parent folder of the FID dump and its npz")
    p.add_argument("--edit", default=None, metavar="IMAGE", help="zero-shot editing of this image: regenerate the "
                   "--mask/--box region with each of --classes; --out gets rows of before | mask | edits")
    p.add_argument("--mask", default=None, metavar="MASK.png", help="with --edit: non-black pixels are regenerated "
                   "(same size as the image; transparent pixels count as black)")
    p.add_argument("--outside", default="reconstruction", choices=("reconstruction", "original"), help="with --edit: "
                   "the pixels outside the mask: the tokenizer's reconstruction of the image (VAR's recipe: the tokens "
                   "there are the image's own) or its own pixels pasted back (a seam may show at the mask's edge)")
    p.add_argument("--box", default=None, metavar="x0,y0,x1,y1", help="with --edit: the pixel box to regenerate "
                   "(in the image's pixels, ends exclusive)")
    return p


def parse_args(argv: Sequence[str] | None = None,
               parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, apply the preset (explicit flags override it) and check every flag that needs no checkpoint.
    `parser_class`: one whose `error` raises instead of exiting, for callers that serve requests (scripts/app.py)."""
    parser = build_parser(parser_class)
    known = parser.parse_known_args(argv)[0]
    preset = known.preset or ("fid" if known.fid else None)  # an FID dump with the picture settings is no paper FID
    if preset is not None:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    problems = empty_path_problems(args, {
        "ckpt": "a checkpoint file, Hub folder or repo id", "out": "an image or folder", "fid_dir": "a folder",
        "vae_ckpt": "a tokenizer file", "edit": "an image", "mask": "an image"})
    args.from_model = ()  # the fields --model set (its checks against --ckpt name --model, not --depth or --arch)
    if args.model is not None:  # its depth and arch, where not given: the official file and the checks follow
        named = MVAR_models[args.model]
        args.from_model = tuple(f for f in ("depth", "arch") if getattr(args, f) is None)
        args.depth = args.depth if args.depth is not None else named["depth"]
        args.arch = args.arch if args.arch is not None else named.get("arch", MVARConfig.arch)
    if args.ckpt is None and args.depth is None:
        problems.append("pass --ckpt=PATH, or --depth=N for the official OliverRen/M-VAR d{N}.pth (with --arch=var "
                        "or --model=VAR-dN: VAR's FoundationVision/var var_d{N}.pth)")
    if args.ckpt is None and args.model is not None and set(MVAR_models[args.model]) - {"depth", "arch"}:
        problems.append(f"--model={args.model} has no published weights (the paper's own sizes): pass --ckpt=PATH")
    elif args.ckpt is None and args.depth is not None:
        try:
            official_file(args.depth, args.arch or "mvar")
        except ValueError as e:
            problems.append(str(e))
    problems += sampling_problems(args.cfg, args.top_k, args.top_p)
    if not 0 <= args.seed < SEED_LIMIT:
        problems.append(f"--seed must be in [0, 2**64), got {args.seed}")
    for flag in ("num_per_class", "bs", "fid_num_per_class", "depth"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            problems.append(f"--{flag} must be >= 1, got {value}")
    if args.device is not None and (problem := device_problem(args.device)):
        problems.append(problem)
    if args.fid:
        problems += [f"--{flag} is for pictures; --fid {does}" for flag, does in PICTURE_ONLY_FLAGS.items()
                     if getattr(args, flag) != parser.get_default(flag)]
    else:
        problems += [f"--{flag} is for an FID dump: add --fid (without it this run would write pictures to --out)"
                     for flag in FID_ONLY_FLAGS if getattr(args, flag) != parser.get_default(flag)]
    problems += official_seed_problems(args)
    if args.classes is not None and min(args.classes) < 0:
        problems.append(f"--classes must be >= 0, got {args.classes}")
    problems += edit_flag_problems(args)
    if args.pn is not None:
        try:
            args.pn = parse_patch_nums(args.pn)
        except ValueError as e:
            problems.append(f"--pn: {e}")
    if args.fid and args.more_smooth:
        logger.warning("--more_smooth is meant for pictures; the paper's FID uses --no-more_smooth",
                       extra=SAME_ON_ALL_RANKS)
    if problems:
        parser.error("\n  ".join(problems))
    return args


def official_seed_problems(args: argparse.Namespace) -> list[str]:
    """--official_seed seeds one batch with --seed, so every picture must be in it (a second batch would repeat the
    first one's random stream), and it has no meaning for an FID dump or an edit (the official code has neither)."""
    if not args.official_seed:
        return []
    if args.fid or args.edit is not None:
        return ["--official_seed is for pictures (the official demo); --fid and --edit seed each batch from "
                "(--seed, batch)"]
    count = len(args.classes or DEMO_CLASSES) * args.num_per_class
    if count > args.bs:
        return [f"--official_seed draws every picture in one batch, as the official demo: {count} pictures need "
                f"--bs >= {count}, got --bs={args.bs}"]
    return []


def edit_flag_problems(args: argparse.Namespace) -> list[str]:
    if args.edit is None:
        return [f"--{f} is for --edit" for f in ("mask", "box") if getattr(args, f) is not None] + \
            (["--outside is for --edit"] if args.outside != "reconstruction" else [])
    problems = [] if (args.mask is None) != (args.box is None) else ["--edit needs exactly one of --mask or --box"]
    if args.fid or args.classes is None:
        problems.append("--edit needs --classes (one row per class) and no --fid")
    if Path(args.out).suffix.lower() != ".png":
        problems.append(f"--edit writes one grid: --out must end in .png, got {args.out}")
    problems += [f"--out={args.out} is the --{f} file: the grid would replace it; name another --out"
                 for f in ("edit", "mask") if getattr(args, f) is not None
                 and Path(args.out).resolve() == Path(getattr(args, f)).resolve()]
    problems += [f"--{f}={getattr(args, f)}: no such file" for f in ("edit", "mask")
                 if getattr(args, f) is not None and not Path(getattr(args, f)).is_file()]
    if args.box is not None:
        try:
            args.box = parse_box(args.box)
        except ValueError as e:
            problems.append(str(e))
    if not problems:  # the image, mask and box checks that need no model (the crop's, before sampling: edit_rows)
        try:
            read_edit_inputs(args.edit, EDIT_CHECK_RESO, args.mask, args.box)
        except (ValueError, OSError) as e:
            problems.append(str(e))
    return problems


def check_against_config(args: argparse.Namespace, config: MVARConfig, ckpt: str) -> None:
    """Flags that need the checkpoint's config; raises ValueError naming the flag."""
    problems = []
    said = {f: f"--model={args.model} has {f}=" if f in getattr(args, "from_model", ()) else f"--{f}="
            for f in ("depth", "arch")}  # the flag the user passed
    if args.depth is not None and args.depth != config.depth:
        problems.append(f"{said['depth']}{args.depth}, but {ckpt} holds a depth-{config.depth} model")
    if args.arch is not None and args.arch != config.arch:
        problems.append(f"{said['arch']}{args.arch}, but {ckpt} holds arch={config.arch}")
    for field, value in MVAR_models[args.model].items() if args.model else ():
        if field not in ("depth", "arch") and getattr(config, field) != value:
            problems.append(f"--model={args.model} has {field}={value}, but {ckpt} holds {getattr(config, field)}")
    if args.pn is not None and tuple(args.pn) != tuple(config.patch_nums):
        problems.append(f"--pn={format_patch_nums(args.pn)}, but {ckpt} holds patch_nums "
                        f"{format_patch_nums(config.patch_nums)}")
    bad = [c for c in (args.classes or ()) if c >= config.num_classes]
    if bad:
        problems.append(f"--classes {bad} outside the model's classes [0, {config.num_classes - 1}]")
    if problems:
        raise ValueError("; ".join(problems))


def amp_dtype(args: argparse.Namespace) -> torch.dtype | None:
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None


def check_outputs(args: argparse.Namespace) -> None:
    """The output folder of this mode must be writable; a picture folder that holds images already gets a warning
    (this run's replace those of the same names, the others stay: two runs' images in one folder)."""
    if args.fid:
        check_writable(Path(args.fid_dir), f"--fid_dir={args.fid_dir}", create=False)  # made when images are written
    else:
        out = Path(args.out)
        if is_image_file(out) and out.is_dir():
            raise OutputFolderError(f"--out={args.out} is a folder, but its suffix asks for one image: name a file, "
                                    "or a folder without an image suffix for one PNG per image")
        if is_image_file(out) and (problem := grid_format_problem(out)):
            raise OutputFolderError(f"--out={problem}")
        check_writable(out.parent if is_image_file(out) else out, f"--out={args.out}", create=False)
        if not is_image_file(out) and (old := len(list(out.glob("class*.png")))):
            logger.warning("--out=%s already holds %d class*.png images: this run's replace those of the same "
                           "names and the others stay, so the folder may mix two runs (choose an empty folder to "
                           "keep them apart)", args.out, old, extra=SAME_ON_ALL_RANKS)


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
    if args.ckpt is not None and is_hub_source(args.ckpt):
        return load_hub_checked(args, device)
    if args.ckpt is None:
        ckpt_path = resolve_mvar_checkpoint(None, args.depth, arch=args.arch or "mvar")
    elif not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"--ckpt={args.ckpt}: no such file")
    else:
        ckpt_path = Path(args.ckpt)
    ckpt, config, ours = read_model_file(ckpt_path, args.arch, args.pn)
    if note := attention_only_note(ckpt_path.name, ours, config.arch, args.arch):
        logger.warning(note, extra=SAME_ON_ALL_RANKS)
    check_against_config(args, config, ckpt_path.name)
    vae, vae_id = model_file_tokenizer(ckpt, ckpt_path, config, args.vae_ckpt, args.allow_other_tokenizer, device)
    mvar = load_mvar(ckpt, device=device, vae=vae, patch_nums=args.pn, attn_backend=args.attn_backend,
                     mamba_backend=args.mamba_backend, name=str(ckpt_path), arch=config.arch)
    check_finite_weights(mvar, f"M-VAR checkpoint {ckpt_path}")
    check_finite_weights(vae, f"tokenizer ({'embedded in --ckpt' if vae_id == 'embedded' else vae_id})")
    return mvar, ckpt_path, vae_id


def load_hub_checked(args: argparse.Namespace, device: torch.device) -> tuple[MVAR, Path, str]:
    """load_checked for a Hub folder or repo id: config.json is checked before the weights are read."""
    source = HubSource(args.ckpt, flag="--ckpt")
    config = read_config(source)
    check_against_config(args, config, args.ckpt)
    vae = None if args.vae_ckpt is None else load_vae(args.vae_ckpt, device=device, v_patch_nums=config.patch_nums)
    mvar = MVARHF.from_pretrained(source, device=device, vae=vae, attn_backend=args.attn_backend,
                                  mamba_backend=args.mamba_backend, allow_other_tokenizer=args.allow_other_tokenizer,
                                  vae_name=f"--vae_ckpt={args.vae_ckpt}")
    vae_id = "embedded" if vae is None else Path(args.vae_ckpt).name
    check_finite_weights(mvar, f"M-VAR {args.ckpt}")
    check_finite_weights(mvar.vae, f"tokenizer ({'of ' + args.ckpt if vae is None else vae_id})")
    return mvar, source.folder or Path(args.ckpt), vae_id  # a folder's model.safetensors stands for its folder


def open_model(args: argparse.Namespace, device: torch.device) -> tuple[MVAR, Path, str]:
    """The checks and the loading of `main`, with its messages: --bf16 falls back to fp32 where slow, a forced kernel
    that cannot run and a checkpoint the loaders refuse are SystemExit("error: ...") (scripts/app.py says the same
    before its server starts) -> load_checked's (model, checkpoint path, tokenizer id)."""
    fall_back_to_fp32_where_slow(args, device)
    set_tf32(device, args.tf32)
    try:
        check_backends(args, device)
        return load_checked(args, device)
    except (BackendError, ValueError, FileNotFoundError, NonFiniteValueError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from e


def make_generate(mvar: MVAR, args: argparse.Namespace, device: torch.device):
    """labels (B,) int64 numpy, g_seed -> uint8 images (B, H, W, 3). Under --fp16/--bf16 the Linear weights are
    cast once per batch (`MVAR.inference_precision`), not on every call. The weights were checked finite at load,
    so a non-finite batch means overflowing activations: NonFiniteValueError saying where, before anything is
    written."""
    dtype = amp_dtype(args)

    def generate(label_B: np.ndarray, g_seed: int) -> np.ndarray:
        batch = f"classes {sorted(set(label_B.tolist()))} (seed {g_seed}, {precision_name(args)})"
        label_B = torch.as_tensor(label_B, dtype=torch.long, device=device)
        with torch.inference_mode(), mvar.inference_precision(dtype), overflow_is_an_error(args, batch):
            img_B3HW = mvar.autoregressive_infer_cfg(len(label_B), label_B, g_seed=g_seed, cfg=args.cfg,
                                                     top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth)
        check_finite_images(img_B3HW, f"the tokenizer decoder, for {batch},")
        return to_uint8_BHW3(img_B3HW)

    return generate


@contextlib.contextmanager
def overflow_is_an_error(args: argparse.Namespace, batch: str) -> Iterator[None]:
    """torch.multinomial's error on non-finite probabilities as a NonFiniteValueError saying what to try (the weights
    were checked finite at load, so the activations or the guidance overflowed)."""
    try:
        yield
    except RuntimeError as e:
        if "probability tensor contains" not in str(e):
            raise
        raise NonFiniteValueError(f"the M-VAR logits became non-finite while sampling {batch}; the weights are "
                                  f"finite, so the activations or the guidance (--cfg={args.cfg:g}) overflowed: try "
                                  f"{OVERFLOW_ADVICE[precision_name(args)]}") from e


OVERFLOW_ADVICE = {"fp16": "--bf16 (fp16 overflows past 65504), fp32 or a smaller --cfg",
                   "bf16": "fp32 (without --bf16) or a smaller --cfg", "fp32": "a smaller --cfg"}


def precision_name(args: argparse.Namespace) -> str:
    return "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"


# ---------------------------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------------------------
def grid_problem(args: argparse.Namespace, mvar: MVAR) -> str | None:
    """Why --out cannot hold the grid of this run's images at the model's size (WebP's and JPEG's largest side), or
    None (also for a folder or an FID dump): known once the model is, before any sampling."""
    if args.fid or not is_image_file(Path(args.out)):
        return None
    rows = len(args.classes if args.classes is not None else DEMO_CLASSES)  # one per class
    ncol = args.num_per_class + (2 if args.edit is not None else 0)  # an edit row starts with the image and mask
    return grid_size_problem(Path(args.out), rows, ncol, mvar.image_size)


def picture_labels(args: argparse.Namespace) -> tuple[np.ndarray, list[str]]:
    """Class ids of every picture, class-major (one grid row per class), and their file names."""
    classes = list(args.classes if args.classes is not None else DEMO_CLASSES)
    labels = np.repeat(np.asarray(classes, dtype=np.int64), args.num_per_class)
    seen: Counter[int] = Counter()  # a class given twice numbers its second row on from its first
    names = []
    for c in labels.tolist():
        names.append(f"class{c:04d}_{seen[c]:03d}")
        seen[c] += 1
    return labels, names


def picture_batches(args: argparse.Namespace, generate) -> Iterator[tuple[np.ndarray, list[str]]]:
    """The pictures of --classes x --num_per_class, a --bs batch at a time -> (uint8 (B, H, W, 3), file names).
    Batch c is drawn from chunk_seed(--seed, c) (with --official_seed, the one batch from --seed): this is what the
    same flags and seed reproduce (sample.py and scripts/app.py both sample through it)."""
    labels, names = picture_labels(args)
    for c, start in enumerate(range(0, len(labels), args.bs)):
        g_seed = args.seed if args.official_seed else chunk_seed(args.seed, c)
        yield generate(labels[start:start + args.bs], g_seed), names[start:start + args.bs]


def sample_pictures(args: argparse.Namespace, generate) -> Path:
    """A folder gets each batch as soon as it is finished; a grid is written at the end, or, when the run is
    interrupted (Ctrl-C, SIGTERM) or fails, with the images finished until then."""
    from tqdm import tqdm

    out, batches = Path(args.out), []
    num_images = len(picture_labels(args)[0])
    try:
        with sigterm_raises():
            for imgs_BHW3, names in tqdm(picture_batches(args, generate), desc="sampling", unit="batch",
                                         total=-(-num_images // args.bs)):
                if is_image_file(out):
                    batches.append(imgs_BHW3)
                else:
                    save_folder(imgs_BHW3, out, names)
    except BaseException:
        if batches:
            save_grid(np.concatenate(batches), out, ncol=args.num_per_class)
            logger.warning("stopped early: wrote the %d finished images to %s", sum(map(len, batches)), out)
        raise
    if batches:
        save_grid(np.concatenate(batches), out, ncol=args.num_per_class)
    logger.info("wrote %d images (%d classes x %d) to %s", num_images, num_images // args.num_per_class,
                args.num_per_class, out)
    return out


def edit_rows(args: argparse.Namespace, mvar: MVAR) -> Iterator[torch.Tensor]:
    """Per class of --classes: the image as the model sees it, the mask, then --num_per_class edits, (2 + n, 3, H, W)
    floats in [0, 1] (sample.py --edit and scripts/app.py both edit through it). The edits of class c are drawn --bs
    at a time, chunk j from chunk_seed(--seed, c + j x classes); non-finite logits or pixels are NonFiniteValueError."""
    img_13HW, mask_11HW = load_edit_inputs(args.edit, mvar.image_size, args.mask, args.box)
    dtype, classes = amp_dtype(args), len(args.classes)
    for c, cls in enumerate(args.classes):
        edits = []
        for j, start in enumerate(range(0, args.num_per_class, args.bs)):  # --bs edits at a time
            m, g_seed = min(args.bs, args.num_per_class - start), chunk_seed(args.seed, c + j * classes)
            batch = f"class {cls} (edits {start}-{start + m - 1}, seed {g_seed}, {precision_name(args)})"
            with torch.inference_mode(), mvar.inference_precision(dtype), overflow_is_an_error(args, batch):
                part = mvar.autoregressive_edit_cfg(img_13HW.expand(m, -1, -1, -1), mask_11HW, cls, g_seed=g_seed,
                                                    cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                                    more_smooth=args.more_smooth)
            check_finite_images(part, f"the tokenizer decoder, for {batch},")
            if args.outside == "original":
                part = torch.where(mask_11HW.to(part.device), part, img_13HW.to(part.device, part.dtype))
            edits.append(part.float().cpu())
        yield torch.cat([img_13HW, mask_11HW.float().expand(1, 3, -1, -1), *edits])


def sample_edit(args: argparse.Namespace, mvar: MVAR) -> Path:
    """One row per class: the image as the model sees it, the mask, then --num_per_class edits."""
    rows = list(edit_rows(args, mvar))
    out = save_grid(to_uint8_BHW3(torch.cat(rows)), Path(args.out), ncol=2 + args.num_per_class)
    logger.info("wrote %s: %d rows (classes %s) of before | mask | %d edits", out, len(rows), args.classes,
                args.num_per_class)
    return out


def sample_fid(args: argparse.Namespace, mvar: MVAR, ckpt_path: Path, vae_id: str, generate, rank: int,
               world_size: int) -> Path | None:
    """Every rank dumps its share; rank 0 then packs the npz and writes the settings JSON beside it. Rank 0 holds
    the dump folder's run lock throughout."""
    folder = Path(args.fid_dir) / fid_folder_name(str(ckpt_path), args.cfg, args.top_k, args.top_p, args.seed,
                                                  args.more_smooth, args.fid_num_per_class)
    plan = DumpPlan(num_classes=mvar.num_classes, num_per_class=args.fid_num_per_class, batch_size=args.bs)
    image_hw = (mvar.image_size,) * 2
    device_type = next(mvar.parameters()).device.type
    settings = {"ckpt": ckpt_path.name, "vae": vae_id, "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p,
                "more_smooth": args.more_smooth, "seed": args.seed, "num_classes": plan.num_classes,
                "num_per_class": plan.num_per_class, "batch_size": plan.batch_size, "precision": precision_name(args),
                "tf32": args.tf32 and device_type == "cuda", "device": device_type}  # TF32 only acts on CUDA
    lock = lock_output_folder(folder, holder=rank == 0)  # creates it; one dump per folder (they share the .npy)
    try:  # the images are bound to the weights they came from, on every rank
        settings.update(model_weights=weights_digest(mvar.state_dict()),
                        vae_weights=weights_digest(mvar.vae.state_dict()))
        check_ranks_agree(settings, folder)
        with dist.raised_on_every_rank(DumpFolderError, DiskFullError):  # or the other ranks would wait for rank 0
            if rank == 0:
                remove_interrupted_writes(folder)
                check_or_write_settings(folder, settings)
                check_pack_space(folder, plan, image_hw)
                logger.info("FID dump: %d images (%d classes x %d) into %s over %d rank(s)", plan.total,
                            plan.num_classes, plan.num_per_class, folder, world_size)
        t0 = time.time()
        written = dump_shard(folder, plan, args.seed, generate, rank, world_size, image_hw, progress=rank == 0)
        logger.info("rank %d wrote %d new PNGs in %.1fs", rank, written, time.time() - t0)
        dist.barrier()
        if rank != 0:
            return None
        npz = pack_npz(folder, plan, image_hw=image_hw)  # raises, naming them, if PNGs are missing
        where = str(ckpt_path.resolve()) if ckpt_path.exists() else str(ckpt_path)  # a file, a folder or a repo id
        info = {**settings, "ckpt_path": where, "arch": mvar.config.arch, "depth": mvar.depth,
                "num_images": plan.total, "image_hw": list(image_hw), "npz": str(npz), "folder": str(folder),
                "npz_order": f"row j is {folder.name}/{{utils.evaluation.fid_dump.npz_order(N)[j]:06d}}.png; arr_1 "
                             "holds the labels", "torch": torch.__version__}
        write_text_atomic(npz.with_suffix(".json"), json.dumps(info, indent=2, sort_keys=True) + "\n")
        return npz
    finally:
        if lock is not None:
            lock.release()


def check_ranks_agree(settings: dict[str, Any], folder: Path) -> None:
    """Collective: every rank must sample with the same settings and weights (nodes may read different copies of
    --ckpt) into one folder (--fid_dir on a disk they all see: the run lock rank 0 holds there must be visible to
    each), or the npz would mix models, or never be complete; a DumpFolderError lists what differs."""
    facts = {**{f"{k} (settings.json)": v for k, v in settings.items()},
             "the run lock of --fid_dir (rank 0's: every rank must see its folder, on a shared disk)":
             read_owner(folder / LOCK_NAME)}
    refuse_disagreement(facts, DumpFolderError, "the ranks of this FID dump disagree, so their images cannot make one "
                        "npz")


# ---------------------------------------------------------------------------------------------------------------
# Entry point (torchrun or a single process)
# ---------------------------------------------------------------------------------------------------------------
def device_of_rank(flag: str | None, rank_device: torch.device, world_size: int) -> torch.device:
    """--device, else the rank's own (`dist.initialize`: the GPU of its LOCAL_RANK). A numbered GPU under torchrun
    would put every rank on that one GPU: SystemExit saying so."""
    if flag is None:
        return rank_device
    device = torch.device(flag)
    if world_size > 1 and device.type == "cuda" and device.index is not None:
        raise SystemExit(f"error: --device={flag} would put all {world_size} ranks on that one GPU: leave --device out "
                         "(or pass --device=cuda), and each rank takes the GPU of its LOCAL_RANK")
    return device


def main(argv: Sequence[str] | None = None) -> Path | None:
    args = parse_args(argv)
    # an FID dump's ranks meet after their shares, which a resumed dump may have left unequal
    try:
        rank_device = dist.initialize(timeout_min=dist.SHARDED_JOB_WAIT_MIN) if args.fid else dist.initialize()
    except dist.LaunchError as e:
        raise SystemExit(f"error: {e}") from e
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = device_of_rank(args.device, rank_device, world_size)
    setup_logging(rank)
    if world_size > 1 and not args.fid:
        raise SystemExit("several ranks only make sense with --fid (pictures are written by one process)")
    try:
        check_outputs(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    mvar, ckpt_path, vae_id = open_model(args, device)
    if args.classes is None and not args.fid and max(DEMO_CLASSES) >= mvar.num_classes:
        raise SystemExit(f"error: --classes: the default, VAR's demo classes {' '.join(map(str, DEMO_CLASSES))} "
                         f"(ImageNet ids), is outside this model's {mvar.num_classes} classes: pass --classes with "
                         f"ids in [0, {mvar.num_classes - 1}]")
    if problem := grid_problem(args, mvar):
        raise SystemExit(f"error: --out={problem}")
    if args.edit is not None:
        try:
            return sample_edit(args, mvar)
        except (ValueError, FileNotFoundError, NonFiniteValueError) as e:
            raise SystemExit(f"error: {e}") from e
    generate = make_generate(mvar, args, device)
    try:
        if args.fid:  # SIGTERM (a preemption) unwinds: the lock is released, packing's temporary files go
            with sigterm_raises():
                return sample_fid(args, mvar, ckpt_path, vae_id, generate, rank, world_size)
        return sample_pictures(args, generate)
    except (NonFiniteValueError, RunLockError, DiskFullError, DumpFolderError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    dist.run_then_finalize(main)
