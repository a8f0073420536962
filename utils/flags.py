"""Command-line flags of train.py: VAR's names and defaults (the official launch commands run unchanged, with
--data_path, which VAR's default leaves a placeholder), plus M-VAR and robustness extras. `finalize_args` derives
the values VAR computes at start-up (per-rank batch, lr, ...).
The choices come from `models.presets` (architectures, model sizes, kernel backends, patch schedules).
"""
import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.loading import recorded_patch_nums
from models.mvar import MVARConfig
from models.presets import ARCH_BRANCHES, ATTN_KERNELS, MAMBA_KERNELS, MVAR_models, format_patch_nums, \
    parse_patch_nums
from utils.data.embedded import EMBEDDED_DATASETS
from utils.data.loaders import image_source_problem, mid_reso_problem
from utils.data.token_cache import TokenCacheError, read_manifest
from utils.run.rng import seed_problem
from utils.run.schedule import schedule_problem

# MVARConfig field of a `--model` entry -> (train.py flag, its value)
MODEL_FLAGS = {"depth": lambda v: ("depth", v), "arch": lambda v: ("arch", v), "embed_dim": lambda v: ("embed_dim", v),
               "patch_nums": lambda v: ("pn", format_patch_nums(v))}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in its help, except None: the help says what an unset flag means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


class ExamplesHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """The description's usage examples as written, and the defaults as DefaultsHelpFormatter."""


def str2bool(v: str) -> bool:
    """Boolean flag values as VAR's launch commands write them: 1/0, true/false, yes/no, on/off."""
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on", "y", "t"):
        return True
    if s in ("0", "false", "no", "off", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false), got {v!r}")


def add_dist_timeout_flag(parser: argparse._ActionsContainer) -> None:
    """--dist_timeout_min: how long the ranks wait for each other at a collective (torch.distributed's timeout)."""
    def minutes(v: str) -> float:
        if not (math.isfinite(m := float(v)) and m > 0):
            raise argparse.ArgumentTypeError(f"expected minutes > 0, got {v!r}")
        return m

    parser.add_argument("--dist_timeout_min", type=minutes, default=30.0, help="minutes the ranks wait for each "
                        "other at a collective before the job fails (VAR's 30); raise it where one rank may work that "
                        "long alone between two (a slow filesystem's checkpoint write)")


def add_backend_flags(parser: argparse._ActionsContainer, default: str | None = "auto") -> None:
    """--attn_backend / --mamba_backend, spelled the same in every CLI (resolved by models.backends)."""
    parser.add_argument("--attn_backend", default=default, choices=("auto", *ATTN_KERNELS),
                        help="intra-scale attention kernel (auto: $MVAR_ATTN_BACKEND, else the fastest that runs)")
    parser.add_argument("--mamba_backend", default=default, choices=("auto", *MAMBA_KERNELS),
                        help="Mamba2 kernel (auto: $MVAR_MAMBA_BACKEND, else the fastest that runs: mamba_ssm on CUDA "
                        "when installed, cpu_fused on the CPU when a C compiler works, else torch)")


def add_image_source_flags(parser: argparse._ActionsContainer) -> None:
    """--data_path / --dataset / --fmnist_dir, spelled the same in every CLI that reads images (utils.data.loaders.
    open_split): --dataset has no default, so that a command without --data_path is refused, not run on MNIST."""
    parser.add_argument("--data_path", default="", help="ImageFolder root with train/ and val/ class sub-folders "
                        "(ImageNet's layout)")
    parser.add_argument("--dataset", default=None, choices=EMBEDDED_DATASETS, help="an embedded data set "
                        "(utils.data.embedded) instead of --data_path")
    parser.add_argument("--fmnist_dir", default="", help="folder with Fashion-MNIST's four IDX files for "
                        "--dataset=fmnist; empty = $FMNIST_DIR, else /usr/share/datasets/fashion-mnist (Debian's "
                        "`apt-get install dataset-fashion-mnist`)")


# what --eval_net takes (train.py's flag check and utils.evaluation.during_training's loading say it alike)
EVAL_NET_EXPECTED = "expected 'inception' or a SmallCNN state dict file (the study's classifier.pt)"


def sampling_problems(cfg: float, top_k: int, top_p: float, prefix: str = "--") -> list[str]:
    """What is wrong with classifier-free guidance and top-k / top-p values (sample.py's --cfg --top_k --top_p,
    train.py's --eval_cfg ...: `prefix` names them)."""
    problems = []
    if not 0.0 < top_p <= 1.0:
        problems.append(f"{prefix}top_p must be in (0, 1] (1 disables the nucleus filter), got {top_p}")
    if not math.isfinite(cfg) or cfg < 0:
        problems.append(f"{prefix}cfg must be >= 0 and finite (0: no guidance), got {cfg}")
    if top_k < 0:
        problems.append(f"{prefix}top_k must be >= 0 (0 disables the filter), got {top_k}")
    return problems


def empty_path_problems(args: argparse.Namespace, expected: dict[str, str]) -> list[str]:
    """One line per path flag given as "" ("--out="), saying what it expects: an empty path is the current folder,
    not "off" (`expected`: flag name -> what it takes, e.g. {"out": "a cache folder"})."""
    return [f"--{flag}=: expected {what} (an empty path would be the current folder)"
            for flag, what in expected.items() if getattr(args, flag) == ""]


def device_problem(value: str, flag: str = "--device") -> str | None:
    """Why torch cannot run on the device `value` names (None: it can). A CUDA device is checked against the GPUs
    seen without touching one (each rank would otherwise open a context on GPU 0); meta holds no data; any other is
    tried with an empty tensor (mps or xpu in a build without them, a misspelt name)."""
    try:
        device = torch.device(value)
    except RuntimeError as e:
        return f"{flag}={value}: {e}"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"{flag}={value}: no CUDA device here (torch.cuda.is_available() is False)"
        if device.index is not None and device.index >= count:
            return f"{flag}={value}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        return None
    if device.type == "meta":  # torch allocates there (shapes, no data): a run failed once the model had loaded
        return f"{flag}={value}: the meta device holds shapes and no data, nothing can run there: pass cpu or cuda"
    try:
        torch.empty(0, device=device)
    except Exception as e:  # torch raises RuntimeError, NotImplementedError, AssertionError, ... by backend
        return f"{flag}={value}: torch cannot allocate there ({type(e).__name__}: {str(e).splitlines()[0]})"
    return None


def add_model_flag(parser: argparse.ArgumentParser) -> None:
    """DiT's `--model M-VAR-d16`: a named size from `MVAR_models`; it sets the defaults of the flags it names
    (see `apply_model`), so the official flags keep working and explicit ones win."""
    parser.add_argument("--model", default=None, choices=list(MVAR_models), help="a named size: train.py takes its "
                        "--depth, --arch, --embed_dim, --pn as defaults (explicit flags win); sample.py its depth and "
                        "arch, and checks a --ckpt against the rest: " + ", ".join(MVAR_models))


def apply_model(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> None:
    """Set the parser's defaults from the `--model` named in argv, if any."""
    name = parser.parse_known_args(argv)[0].model
    if name is not None:
        parser.set_defaults(**dict(MODEL_FLAGS[field](v) for field, v in MVAR_models[name].items()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train M-VAR (or the VAR / ablation baselines) on an ImageFolder.",
                                formatter_class=DefaultsHelpFormatter, allow_abbrev=False)
    b = dict(type=str2bool, nargs="?", const=True)  # `--hflip`, `--hflip=1`, `--hflip=false` all work

    g = p.add_argument_group("data")
    add_image_source_flags(g)
    g.add_argument("--tokens", default="", help="train from this token cache (scripts/extract_tokens.py: one of "
                   "its views per image per epoch) instead of the images; --mid_reso/--hflip then do not apply (the "
                   "val/ and --eval_every images are cropped at the cache's --mid_reso). Validation: --data_path's "
                   "val/ images if given, else the cache's val split (its centre view); --eval_every scores "
                   "against --data_path's val/ images, else the embedded --dataset's")
    g.add_argument("--pn", default=None, help="patch schedule: 256 or 512 (VAR's presets, models.presets) or sides "
                   "joined by '_'; image size = last side * tokenizer downsample. Default: with --tokens the cache's, "
                   "else the one --vae_ckpt was trained at when it records it (ours), else 256")
    g.add_argument("--mid_reso", type=float, default=1.125, help="resize the shorter side to mid_reso*reso before "
                   "cropping")
    g.add_argument("--hflip", default=False, **b, help="random horizontal flip")
    g.add_argument("--workers", type=int, default=0, help="data-loader processes per rank (0: load in the main "
                   "process, VAR's default; -1, VAR's no-multiprocessing, is 0 too; use 8-12 per GPU for ImageNet)")
    g.add_argument("--train_limit", type=int, default=0, help="train on the first N training images only, in the data "
                   "set's order (an ImageFolder's is class by class: a warning says when they miss classes); 0 = all; "
                   "short studies, scripts/study.py")
    g.add_argument("--val_limit", type=int, default=0, help="validate on the first N validation images only, in the "
                   "data set's order as --train_limit (0 = all)")
    g.add_argument("--num_classes", type=int, default=0, help="class count of the model; 0 = the data set's")

    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=16, help="number of blocks; width 64*depth, depth heads")
    add_model_flag(g)
    g.add_argument("--arch", default="mvar", choices=list(ARCH_BRANCHES), help="block type: mvar (intra-scale "
                   "attn + Mamba2), var (block-causal attn), intra (intra-scale attn only), mamba (Mamba2 only)")
    g.add_argument("--var_blocks", type=int, default=0, help="keep the first N blocks as VAR blocks (block-causal "
                   "attention + FFN), the rest --arch: the paper's Figure 5 'from VAR to M-VAR'")
    g.add_argument("--embed_dim", type=int, default=None, help="width override (default 64*depth)")
    g.add_argument("--num_heads", type=int, default=None, help="attention heads override (default embed_dim/64)")
    g.add_argument("--saln", default=False, **b, help="shared adaLN across blocks")
    g.add_argument("--anorm", default=True, **b, help="L2-normalised attention (attn_l2_norm)")
    g.add_argument("--fuse", default=True, **b, help="VAR's kernel switch: 1 = --attn_backend/--mamba_backend "
                   "auto, 0 = the portable PyTorch kernels (sdpa, torch); explicit backend flags win")
    add_backend_flags(g, default=None)
    g.add_argument("--drop_path_rate", type=float, default=-1.0, help="stochastic depth of the last block; "
                   "<0 = 0.1*depth/24")
    g.add_argument("--cond_drop_rate", type=float, default=0.1, help="probability of dropping the class label "
                   "(classifier-free guidance) in training")
    g.add_argument("--vae_ckpt", default=None, help="tokenizer checkpoint (VAR's vae_ch160v4096z32.pth or ours); "
                   "default: with --tokens the file the cache was extracted with, where it is on this machine, else "
                   "the official file from the Hugging Face cache (offline-first)")
    g.add_argument("--allow_other_tokenizer", default=False, **b, help="resume (or --init_from) although the "
                   "--vae_ckpt weights differ from the tokenizer the checkpoint embeds (same config); the run and its "
                   "checkpoints then use this one")
    g.add_argument("--init_from", default=None, help="initialise the model weights from this checkpoint (ours or "
                   "official M-VAR/VAR) or Hub model folder (scripts/export.py's, or a repo id); optimizer and "
                   "schedule start fresh; the design is the flags' (a file recording another, e.g. --arch=var "
                   "weights into --arch=intra, is a warning naming the fields)")
    g.add_argument("--tfast", type=int, default=0, choices=(0, 1, 2, 3), help="torch.compile the model: "
                   "0 off, 1 reduce-overhead, 2 max-autotune, 3 default")
    g.add_argument("--vfast", type=int, default=0, choices=(0, 1, 2, 3), help="torch.compile the tokenizer "
                   "encoder (same modes as --tfast)")
    g.add_argument("--grad_ckpt", default=False, **b, help="activation checkpointing per block: the "
                   "blocks' activations are recomputed in the backward instead of kept (same gradients; memory and "
                   "time in docs/benchmarks.md)")

    g = p.add_argument_group("initialisation (VAR's init_weights)")
    g.add_argument("--ini", type=float, default=-1.0, help="init std of linear/embedding weights; <0 = sqrt(1/(3C))")
    g.add_argument("--hd", type=float, default=0.02, help="head weight multiplier")
    g.add_argument("--aln", type=float, default=0.5, help="adaLN scale/shift weight multiplier")
    g.add_argument("--alng", type=float, default=1e-5, help="adaLN gamma weight multiplier")
    g.add_argument("--alng_rows", default="official", choices=("official", "all"), help="which adaLN gammas get "
                   "--alng: official = the first two (as the official M-VAR code), all = every gamma")

    g = p.add_argument_group("optimisation")
    g.add_argument("--bs", type=int, default=768, help="global batch size per optimizer step (all ranks, all "
                   "--ac micro-steps)")
    g.add_argument("--ac", type=int, default=1, help="gradient accumulation micro-steps per optimizer step")
    g.add_argument("--ep", type=int, default=250, help="training epochs")
    g.add_argument("--tblr", type=float, default=1e-4, help="base lr; peak lr = ac*tblr*(bs/ac)/256")
    g.add_argument("--tlr", type=float, default=None, help="peak lr override (default from --tblr)")
    g.add_argument("--twd", type=float, default=0.05, help="initial weight decay")
    g.add_argument("--twde", type=float, default=0.0, help="final weight decay (0 = --twd), half-cosine")
    g.add_argument("--wp", type=float, default=0.0, help="warm-up epochs (0 = ep/50)")
    g.add_argument("--wp0", type=float, default=0.005, help="lr ratio at the start of warm-up")
    g.add_argument("--wpe", type=float, default=0.01, help="lr ratio at the end of training")
    g.add_argument("--sche", default="lin0", help="lr schedule after warm-up: lin0, lin, lin00, cos, exp, const, "
                   "lin<T>")
    g.add_argument("--afuse", default=True, **b, help="fused AdamW (one pass per parameter; CUDA and CPU)")
    g.add_argument("--tclip", type=float, default=2.0, help="gradient-norm clip; <=0 disables (norm still logged)")
    g.add_argument("--ls", type=float, default=0.0, help="label smoothing of the token cross-entropy")
    g.add_argument("--fp16", type=int, default=0, choices=(0, 1, 2), help="0 fp32, 1 fp16 + GradScaler, 2 bf16")
    g.add_argument("--tf32", default=True, **b, help="TensorFloat32 matmuls/convs on CUDA")
    g.add_argument("--deterministic", default=False, **b, help="deterministic kernels, so that a run and its resume "
                   "give the same weights on a GPU too (torch.use_deterministic_algorithms, warn_only; mamba_ssm's "
                   "ordered sums and one config per Triton kernel, TRITON_CACHE_AUTOTUNING=1 dropped; attention by "
                   "flash-attn's deterministic backward or SDPA's math kernel, not torch_varlen); slower; not in VAR. "
                   "On the CPU training is deterministic without it")
    g.add_argument("--fsdp", default=False, **b, help="shard with FSDP2 fully_shard instead of DDP (d30+)")
    g.add_argument("--max_nonfinite", type=int, default=20, help="stop after this many bad optimizer steps in a row "
                   "(non-finite loss or gradient, or a loss above --diverge_tol times its running level; each is "
                   "skipped, and no checkpoint is written while the last step was bad)")
    g.add_argument("--diverge_tol", type=float, default=10.0, help="a step whose loss is above this many times its "
                   "running level (at least 1 nat) is bad; 0 = only non-finite steps are")

    g = p.add_argument_group("progressive training")
    g.add_argument("--pg", type=float, default=0.0, help="in (0, 1): progressive training over the first pg "
                   "fraction of iterations (sets --sche=lin<pg>); 0 = off")
    g.add_argument("--pg0", type=int, default=4, help="first progressive stage: index of the last trained scale")
    g.add_argument("--pgwp", type=float, default=0.0, help="warm-up epochs of each new stage's loss weight "
                   "(0 = ep/300)")

    g = p.add_argument_group("evaluation while training (utils/evaluation/during_training.py)")
    g.add_argument("--eval_every", type=int, default=0, help="epochs between evaluations of the Frechet distance "
                   "of generated to validation images (and after the last epoch); 0 = off")
    g.add_argument("--eval_n", type=int, default=1000, help="images generated per evaluation (sharded over ranks), "
                   "and validation images in the reference (of the same classes in the same proportions)")
    g.add_argument("--eval_net", default="inception", help="feature network: 'inception' (FID) or a classifier "
                   "saved as a SmallCNN state dict (FD_clf; the study's classifier.pt)")
    g.add_argument("--eval_cfg", type=float, default=1.5, help="guidance of the evaluation's samples")
    g.add_argument("--eval_top_k", type=int, default=900,
                   help="top-k of the evaluation's samples (0, or V and more: all tokens)")
    g.add_argument("--eval_top_p", type=float, default=0.96, help="top-p of the evaluation's samples")

    g = p.add_argument_group("run, logging, checkpoints")
    g.add_argument("--seed", type=int, default=None, help="seed (default: drawn at start and saved for resume)")
    g.add_argument("--local_out_dir_path", default="local_output", help="output folder: checkpoints, log.txt, "
                   "TensorBoard; auto-resume looks here")
    g.add_argument("--resume", default=None, help="start from this checkpoint when the output folder has none yet "
                   "(a relaunch then continues from the folder's own newer checkpoint)")
    g.add_argument("--save_every", type=int, default=0, help="also checkpoint every this many iterations (0 = only "
                   "at epoch end and by --save_every_min)")
    g.add_argument("--save_every_min", type=float, default=30.0, help="also checkpoint when this many minutes "
                   "passed since the last save (0 = off)")
    g.add_argument("--val_every", type=int, default=10, help="validate (and update ar-ckpt-best, by the last "
                   "scale's loss as VAR) every this many epochs and at the end")
    g.add_argument("--log_every", type=int, default=50, help="log line every this many iterations")
    g.add_argument("--sample_every", type=int, default=10, help="sample grid to TensorBoard every this many epochs "
                   "(0 = off)")
    add_dist_timeout_flag(g)
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # old launchers
    return p


class FlagError(ValueError):
    """A flag value that cannot train (train.py prints it as one error line, before any work)."""


def model_shape(args: argparse.Namespace) -> MVARConfig:
    """The model's config from the flags alone, before the tokenizer and the data (which give V, Cvae and the
    classes) are read: its blocks, widths and heads."""
    return MVARConfig(depth=args.depth, patch_nums=args.patch_nums, arch=args.arch, var_blocks=args.var_blocks,
                      embed_dim=args.embed_dim, num_heads=args.num_heads, shared_aln=args.saln)


def cache_defaults(args: argparse.Namespace) -> None:
    """--pn and --vae_ckpt where not given: with --tokens the cache's (the schedule in its manifest, and the
    tokenizer file it was extracted with where that file is on this machine; the tokenizer's digest is what is
    checked when the cache is opened), else the schedule --vae_ckpt was trained at where it records one (ours; a
    walkthrough: a 16 px tokenizer ran at 256's 64 px unsaid), else VAR's 256 schedule and tokenizer."""
    if args.tokens and (args.pn is None or args.vae_ckpt is None):
        try:
            manifest = read_manifest(args.tokens)
        except TokenCacheError as e:
            raise FlagError(f"--tokens={args.tokens}: {e}") from None
        if args.pn is None:
            args.pn = format_patch_nums(manifest["patch_nums"])
        if args.vae_ckpt is None and manifest.get("vae_ckpt") and Path(manifest["vae_ckpt"]).is_file():
            args.vae_ckpt = manifest["vae_ckpt"]  # not in older manifests
    args.pn = args.pn or default_pn(args.vae_ckpt)


def default_pn(vae_ckpt: str | None) -> str:
    """--pn where not given (and no token cache gives it): the schedule the tokenizer `vae_ckpt` was trained at where
    it records one (ours), else VAR's 256 (train.py and scripts/extract_tokens.py)."""
    trained_at = recorded_patch_nums(vae_ckpt)
    return format_patch_nums(trained_at) if trained_at else "256"


PATH_FLAGS = {"local_out_dir_path": "an output folder", "vae_ckpt": "a tokenizer file", "resume": "a checkpoint",
              "init_from": "a model file or folder", "eval_net": "'inception' or a classifier file"}


def finalize_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Derived settings, as VAR computes them: per-rank micro-batch, peak lr, schedule defaults, patch_nums."""
    if not_finite := [f"--{k}={v}" for k, v in vars(args).items() if isinstance(v, float) and not math.isfinite(v)]:
        raise FlagError(f"{', '.join(not_finite)}: expected a finite number")  # NaN passes every range check below
    if empty := empty_path_problems(args, PATH_FLAGS):
        raise FlagError("; ".join(empty))
    for name in ("bs", "ac", "ep", "val_every", "log_every", "depth", "max_nonfinite"):
        if getattr(args, name) < 1:
            raise FlagError(f"--{name}={getattr(args, name)}: expected a positive integer")
    for name in ("save_every", "save_every_min", "sample_every", "train_limit", "val_limit", "eval_every",
                 "diverge_tol"):
        if getattr(args, name) < 0:
            raise FlagError(f"--{name}={getattr(args, name)}: expected >= 0 (0 = off)")
    if args.num_classes < 0:
        raise FlagError(f"--num_classes={args.num_classes}: expected >= 0 (0 = the data set's)")
    if args.workers < -1:
        raise FlagError(f"--workers={args.workers}: expected >= 0 (-1, VAR's 'no worker processes', is taken as 0)")
    if problem := seed_problem(args.seed):
        raise FlagError(problem)
    if args.eval_every and args.eval_n < 2:
        raise FlagError(f"--eval_n={args.eval_n}: expected at least 2 images per evaluation")
    if args.eval_every and (problems := sampling_problems(args.eval_cfg, args.eval_top_k, args.eval_top_p,
                                                           "--eval_")):
        raise FlagError("; ".join(problems))
    if args.eval_every and args.eval_net != "inception" and not Path(args.eval_net).is_file():
        raise FlagError(f"--eval_net={args.eval_net}: {EVAL_NET_EXPECTED}: no such file")
    if problem := mid_reso_problem(args.mid_reso):
        raise FlagError(problem)
    if args.tfast in (1, 2) and args.ac > 1:  # reduce-overhead and max-autotune both use CUDA graphs
        raise FlagError(f"--tfast={args.tfast} (CUDA graphs) with --ac={args.ac}: the graphed backward's gradients are "
                        f"overwritten by the next micro-step's replay (pytorch/pytorch#169545); use --tfast=3 "
                        f"(default mode) or --ac=1")
    if args.tfast in (1, 2) and args.fsdp:
        raise FlagError(f"--tfast={args.tfast} (CUDA graphs) with --fsdp: FSDP2 gathers each block's weights into "
                        f"fresh memory at every step, and CUDA graphs over its collectives are still being made to "
                        f"work upstream (pytorch/pytorch#167861); use --tfast=3 (default mode) with --fsdp")
    ranges = {"pg": (0 <= args.pg < 1, "in [0, 1): a fraction of the iterations (0 = off)"),
              "cond_drop_rate": (0 <= args.cond_drop_rate <= 1, "a probability in [0, 1]"),
              "ls": (0 <= args.ls < 1, "in [0, 1)"),
              "drop_path_rate": (args.drop_path_rate < 1, "below 1 (negative = 0.1 x depth / 24)"),
              "wp0": (0 <= args.wp0 <= 1, "a ratio of the peak lr in [0, 1]"),
              "wpe": (0 <= args.wpe <= 1, "a ratio of the peak lr in [0, 1]"),
              **{k: (getattr(args, k) >= 0, ">= 0 (0 = the default)" if k != "twd" else ">= 0")
                 for k in ("twd", "twde", "wp", "pgwp")}}
    bad = [f"--{k}={getattr(args, k)}: expected {what}" for k, (ok, what) in ranges.items() if not ok]
    if bad:
        raise FlagError("; ".join(bad))
    cache_defaults(args)
    try:
        args.patch_nums = parse_patch_nums(args.pn)
    except ValueError as e:
        raise FlagError(f"--pn={args.pn}: {e}") from None
    args.batch_size = max(1, round(args.bs / args.ac / world_size))  # per rank, per micro-step
    args.glb_batch_size = args.batch_size * world_size  # per micro-step
    args.bs_effective = args.glb_batch_size * args.ac  # per optimizer step; differs from --bs after rounding
    args.tlr = args.tlr if args.tlr is not None else args.ac * args.tblr * args.glb_batch_size / 256
    args.twde = args.twde or args.twd
    args.wp = args.wp or args.ep / 50
    args.pgwp = args.pgwp or args.ep / 300
    if args.wp >= args.ep:
        raise FlagError(f"--wp={args.wp:g}: the warm-up is as long as the run (--ep={args.ep}) or longer, so the lr "
                        f"never reaches its peak --tlr: expected fewer epochs than --ep")
    if args.pg > 0:
        args.sche = f"lin{args.pg:g}"
    if problem := schedule_problem(args.sche, args.wp0, args.wpe):
        raise FlagError(problem)
    if args.pg > 0 and not 0 <= args.pg0 < len(args.patch_nums):
        raise FlagError(f"--pg0={args.pg0}: expected a scale index in [0, {len(args.patch_nums) - 1}]")
    try:
        model_shape(args)
    except ValueError as e:
        raise FlagError(f"the model flags do not make a model: {e}") from None
    args.workers = max(0, args.workers)
    for name in ("tblr", "tlr"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) <= 0:
            raise FlagError(f"--{name}={getattr(args, name)}: expected a positive learning rate")
    if problem := image_source_problem(args.data_path, args.dataset, needed=not args.tokens or args.eval_every):
        missing = args.tokens and not (args.data_path or args.dataset)
        raise FlagError(problem + (" (--eval_every with --tokens scores against real images)" if missing else ""))
    return args


# flags of VAR's train.py (utils/arg_util.py) that this one does not take, and why: VAR warns about a flag it does not
# know and goes on, argparse here stops at one, so a VAR launch line that sets these gets this reason
VAR_ONLY_FLAGS = {
    "exp_name": "VAR's names the run in its logs only; the output folder is --local_out_dir_path",
    "opt": "the optimizer is AdamW (VAR's default, --opt=adamw), fused with --afuse",
    "patch_size": "it is the tokenizer's downsampling, 16 (VAR's default): the images are 16 x --pn's last scale",
    **dict.fromkeys(("batch_size", "glb_batch_size", "patch_nums", "resos", "data_load_reso"),
                    "VAR sets it from the other flags itself ('don't specify this'), as this train.py does"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags, `--model` applied (not yet finalized: that needs the world size). A flag of VAR's train.py that
    this one does not take is an error saying why (`VAR_ONLY_FLAGS`)."""
    parser = build_parser()
    apply_model(parser, argv)
    args, unknown = parser.parse_known_args(argv)
    var_only = [(a, VAR_ONLY_FLAGS[name]) for a in unknown
                if (name := a.split("=", 1)[0].removeprefix("--")) in VAR_ONLY_FLAGS and a.startswith("--")]
    if var_only:
        listed = "; ".join(f"{a.split('=', 1)[0]} ({why})" for a, why in var_only)
        parser.error(f"flag(s) of VAR's train.py that this one does not take: {listed}. Remove "
                     f"{'it' if len(var_only) == 1 else 'them'} from the command.")
    return parser.parse_args(argv)


def changed_flags(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`--name old -> new` for each flag a resumed run sets otherwise than the checkpoint's run (a lower learning
    rate is legitimate, but is worth saying). --dataset is not compared where --data_path is set: it is unused
    there, and runs saved before it lost its default recorded "mnist"."""
    unused = {"dataset"} if now.get("data_path") else set()
    return [f"--{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k in saved and saved[k] != v and k not in unused]
