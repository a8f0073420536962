"""Export an M-VAR checkpoint to the Hugging Face Hub format: a folder with config.json, model.safetensors, the
tokenizer in tokenizer/ and a model card (README.md). Loading the folder gives the same logits, bit for bit.

    python scripts/export.py --ckpt local_output/ar-ckpt-best.pth --out hub/mvar-mnist    # our checkpoint
    python scripts/export.py --ckpt d16.pth --vae_ckpt vae_ch160v4096z32.pth --out hub/mvar-d16   # official files
    python scripts/export.py --depth 16 --out hub/mvar-d16          # official d16.pth + VAR's tokenizer, HF cache
    python scripts/export.py --ckpt var_d16.pth --arch var --out hub/var-d16 --repo_id me/var-d16 --push  # upload

Then: `python sample.py --ckpt hub/mvar-d16 ...`, or in Python
`models.hub_format.MVARHF.from_pretrained("hub/mvar-d16")`.
"""
import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path

from models.hub_format import MVARHF, OFFICIAL_DATA, model_file_tokenizer, read_model_file, training_data
from models.loading import VAR_PUBLISHED_DEPTHS, CheckpointError, attention_only_note, load_mvar, official_file, \
    recorded_class_names, resolve_mvar_checkpoint
from models.presets import ARCH_BRANCHES, parse_patch_nums
from utils.evaluation.fid_dump import fid_folder_name
from utils.flags import empty_path_problems
from utils.run.checkpoint import OutputFolderError, check_writable
from utils.run.log import setup_logging
from utils.sample_io import NonFiniteValueError, check_finite_weights

logger = logging.getLogger("export")

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="our checkpoint (train.py) or an official .pth (M-VAR d16.pth, VAR "
                   "var_d16.pth, ...); none: the official d{--depth}.pth from the Hugging Face cache")
    p.add_argument("--depth", type=int, default=None, help="without --ckpt: which official M-VAR file")
    p.add_argument("--vae_ckpt", default=None, help="tokenizer (default: the one inside --ckpt, else VAR's "
                   "vae_ch160v4096z32.pth from the Hugging Face cache)")
    p.add_argument("--allow_other_tokenizer", action="store_true", help="export with a --vae_ckpt other than the "
                   "tokenizer embedded in --ckpt (refused otherwise: the model was trained with its own)")
    p.add_argument("--pn", default=None, help="patch schedule of an official file whose L is not a preset")
    p.add_argument("--arch", default=None, choices=list(ARCH_BRANCHES), help="official files: the architecture they "
                   "must hold (needed for attention-only weights: var or intra, the intra-scale ablation, have the "
                   "same keys); without --ckpt, var picks VAR's official var_d{--depth}.pth")
    p.add_argument("--out", required=True, help="the folder to write (new or empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the export already in --out (its model card "
                   "included, which huggingface_hub would otherwise keep)")
    p.add_argument("--repo_id", default=None, help="the Hub repo (org/name) named in the model card; with --push the "
                   "one uploaded to")
    p.add_argument("--push", action="store_true", help="also upload the folder to --repo_id (needs `hf auth login`)")
    p.add_argument("--training_data", default=None, help="for the model card (default: from our checkpoint's "
                   f"flags; '{OFFICIAL_DATA}' for official files)")
    p.add_argument("--metric", action="append", default=[], metavar="NAME=VALUE",
                   help="a measured metric for the model card, e.g. FID=3.07 (repeatable)")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    setup_logging(0)
    if (args.ckpt is None) == (args.depth is None):
        raise SystemExit("error: pass one of --ckpt=PATH or --depth=N (the official OliverRen/M-VAR d{N}.pth)"
                         + (", not both" if args.ckpt else ""))
    if args.push and not args.repo_id:
        raise SystemExit("error: --push needs --repo_id=org/name")
    bad = [m for m in args.metric if "=" not in m]
    if bad:
        raise SystemExit(f"error: --metric {bad}: expected NAME=VALUE")
    if args.depth is not None and args.depth < 1:  # it used to ask the Hub for d0.pth (~30 s without internet)
        raise SystemExit(f"error: --depth={args.depth}: expected a depth >= 1 (the official OliverRen/M-VAR "
                         f"d{{N}}.pth; with --arch=var VAR's var_d{{{','.join(map(str, VAR_PUBLISHED_DEPTHS))}}}.pth)")
    if args.depth is not None and args.arch is not None:
        try:
            official_file(args.depth, args.arch)  # no such published file: said now, not after trying the Hub
        except ValueError as e:
            raise SystemExit(f"error: {e}") from e
    if empty := empty_path_problems(args, {"out": "the folder to write"}):
        raise SystemExit(f"error: {empty[0]}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out={out} is a file: expected a folder to write")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise SystemExit(f"error: --out={out} is not empty: pass --overwrite to replace the export there (its "
                             "model card included), or choose another folder")
        if not ((out / "config.json").is_file() and (out / "model.safetensors").is_file()):
            raise SystemExit(f"error: --out={out} holds no earlier export (config.json and model.safetensors): "
                             "--overwrite replaces an export only; choose an empty or new folder")
    try:  # a missing --ckpt, then a file above --out or no permission: error lines now, before the checkpoint is read
        ckpt_path = resolve_mvar_checkpoint(args.ckpt, None) if args.ckpt else None
        check_writable(out, f"--out={args.out}", create=False)  # a failed export leaves no folder
    except (FileNotFoundError, OutputFolderError) as e:
        raise SystemExit(f"error: {e}") from e
    try:
        ckpt_path = ckpt_path or resolve_mvar_checkpoint(None, args.depth, arch=args.arch or "mvar")
        patch_nums = parse_patch_nums(args.pn) if args.pn else None
        ckpt, config, ours = read_model_file(ckpt_path, args.arch, patch_nums)
        if ours and (args.arch or args.pn):
            raise ValueError(f"--arch/--pn are for official files; {ckpt_path.name} carries its own config")
        if note := attention_only_note(ckpt_path.name, ours, config.arch, args.arch):  # config.json would keep it
            raise ValueError(note + ": pass --arch, which the export records")
        vae, vae_id = model_file_tokenizer(ckpt, ckpt_path, config, args.vae_ckpt, args.allow_other_tokenizer)
        mvar = load_mvar(ckpt, vae=vae, patch_nums=patch_nums, model_cls=MVARHF, name=str(ckpt_path),
                         arch=config.arch)
        mvar.class_names = recorded_class_names(ckpt)  # the web app shows them
        check_finite_weights(mvar, f"M-VAR checkpoint {ckpt_path}")  # nothing non-finite is written nor uploaded
        check_finite_weights(vae, f"tokenizer ({'embedded in --ckpt' if vae_id == 'embedded' else vae_id})")
    except (ValueError, FileNotFoundError, NonFiniteValueError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from e
    card = dict(repo_id=args.repo_id, training_data=args.training_data or training_data(ckpt),
                metrics=dict(m.split("=", 1) for m in args.metric), source=ckpt_path.name,
                fid_sample=fid_sample_name(args))
    write_export(mvar, out, card)
    logger.info("wrote %s: %s", out, ", ".join(sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())))
    if args.push:
        url = mvar.push_to_hub(args.repo_id, model_card_kwargs=card)
        logger.info("pushed to %s", url)
    return out


def write_export(mvar: MVARHF, out: Path, card: dict) -> None:
    """save_pretrained into a temporary folder beside `out`, then each file into `out` by an atomic rename, the
    weights and config.json last: a failed write (a full disk, an interrupt) leaves an earlier export whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))  # same file system as `out`
    try:
        mvar.save_pretrained(tmp, model_card_kwargs=card)  # a fresh card: huggingface_hub keeps one it finds
        order = {"model.safetensors": 1, "config.json": 2}  # the weights, then their config, last
        for f in sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: order.get(p.name, 0)
                        if p.parent == tmp else 0):
            target = out / f.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fid_sample_name(args: argparse.Namespace) -> str:
    """The npz `sample.py --ckpt <this model> --fid --preset fid` writes: named after the repo id or the folder."""
    return fid_folder_name(args.repo_id or str(Path(args.out).resolve()), 1.5, 900, 0.96, 0) + ".npz"


if __name__ == "__main__":
    main()
