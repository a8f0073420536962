"""Extract the multi-scale token ids of a data set once, under K views, for `train.py --tokens DIR`.

    torchrun --nproc_per_node=8 [--nnodes=N ...] scripts/extract_tokens.py --data_path=/path/to/imagenet \
        --vae_ckpt=vae_ch160v4096z32.pth --pn=256 --views=center,center_flip --out=/path/to/tokens

The train split is stored under every view of --views (utils.data.views), the val split under the centre view;
the layout and manifest are utils.data.token_cache's. Each rank encodes its contiguous range of images in chunks
of --batch and commits every chunk atomically, so a relaunch of the same command (same number of ranks) continues
where a killed run stopped. An unreadable image is named in a warning, skipped and recorded in the manifest
(training leaves it out).
"""
import argparse
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import dist
from models.loading import CheckpointError, load_vae
from models.precision import set_tf32
from models.presets import parse_patch_nums
from models.tokenizer import VQVAE
from utils.data.loaders import SafeImageFolder, check_same_classes, file_list_digest, first_items, \
    image_source_problem, mid_reso_problem, open_split
from utils.data.token_cache import FORMAT, SPLITS, ShardWriter, TokenCacheError, identity_problems, read_manifest, \
    shard_bounds, shard_name, tokenizer_digest, write_json
from utils.data.views import parse_views, render_views
from utils.flags import DefaultsHelpFormatter, add_image_source_flags, default_pn, empty_path_problems
from utils.run.agreement import refuse_disagreement, run_facts
from utils.run.checkpoint import check_writable
from utils.run.rng import seed_problem

logger = logging.getLogger("extract_tokens")


class ViewSource(Dataset):
    """Image i of a split -> (i, its views (K, 3, reso, reso) or None when unreadable, label); the first `limit`
    images (0: all)."""

    def __init__(self, images: Dataset, views: list[str], reso: int, mid_reso: float, seed: int, limit: int = 0):
        self.images, self.views, self.reso, self.mid_reso, self.seed = images, views, reso, mid_reso, seed
        self.n = min(limit, len(images)) if limit else len(images)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, int]:
        if isinstance(self.images, SafeImageFolder):
            img, label = self.images.read(i), self.images.targets[i]
        else:
            img, label = self.images[i]
        if img is None:
            return i, None, label
        return i, render_views(img, self.views, self.reso, self.mid_reso, self.seed, i), label


def collate_chunk(items: list[tuple[int, torch.Tensor | None, int]]
                  ) -> tuple[list[int], torch.Tensor | None, list[int]]:
    """A chunk's readable items -> (their indices, their views stacked (N, K, 3, H, W), or None, their labels): one
    tensor per chunk from a loader worker, which shares every tensor it returns through file descriptors (one per
    image ran out of them at --batch 512 under the usual limit of 1024, and the extraction hung)."""
    good = [(i, v, label) for i, v, label in items if v is not None]
    views = torch.stack([v for _, v, _ in good]) if good else None
    return [i for i, _, _ in good], views, [label for _, _, label in good]


@torch.no_grad()
def encode(vae: VQVAE, views_NK3HW: torch.Tensor, encode_batch: int) -> np.ndarray:
    """Views -> their token ids of all scales, uint16 (N, K, L), through the encoder `encode_batch` images at a
    time (its activations, about 250 MB per 256 px image in fp32, bound the memory; not the ids)."""
    N, K = views_NK3HW.shape[:2]
    device = next(vae.parameters()).device
    ids_BL = [torch.cat(vae.img_to_idxBl(part.to(device)), dim=1).cpu()
              for part in views_NK3HW.flatten(0, 1).split(encode_batch)]
    return torch.cat(ids_BL).view(N, K, -1).numpy().astype(np.uint16)


def extract_shard(vae: VQVAE, source: ViewSource, writer: ShardWriter, args: argparse.Namespace, split: str) -> None:
    """Encode and commit this rank's remaining images of one split, chunk by chunk (tqdm on rank 0)."""
    from tqdm import tqdm

    chunks = [list(range(b, min(b + args.batch, writer.end))) for b in range(writer.next, writer.end, args.batch)]
    loader = DataLoader(source, batch_sampler=chunks, num_workers=args.workers, collate_fn=collate_chunk)
    bar = tqdm(total=writer.end - writer.begin, initial=writer.next - writer.begin, desc=f"{split} (rank 0)",
               unit="img", disable=not dist.is_main_process())
    for chunk, (indices, views_NK3HW, labels) in zip(chunks, loader, strict=True):
        ids_NKL = encode(vae, views_NK3HW, args.encode_batch) if views_NK3HW is not None else []
        writer.commit(chunk[0], {i: (ids_KL, label) for i, label, ids_KL in zip(indices, labels, ids_NKL, strict=True)},
                      chunk[-1] + 1)
        bar.update(len(chunk))
        done = writer.next - writer.begin
        if args.log_every and dist.is_main_process() and (done % (args.log_every * args.batch) == 0
                                                          or writer.next == writer.end):
            logger.info("%s: committed %d/%d images of shard %d", split, done, writer.end - writer.begin,
                        dist.get_rank())
    bar.close()


def plan(args: argparse.Namespace, identity: dict, sizes: dict[str, int], world: int) -> dict:
    """The manifest of this extraction (unfinished); a folder holding another one is refused."""
    splits = {s: {"images": n, "views": identity["views"] if s == "train" else ["center"],
                  "shards": shard_bounds(n, world, args.batch)} for s, n in sizes.items()}
    return {"format": FORMAT, **identity, "L": sum(pn * pn for pn in identity["patch_nums"]), "seed": args.seed,
            "batch": args.batch, "limit": args.limit, "source": os.path.normpath(args.data_path) if args.data_path else
            f"embedded:{args.dataset}", "splits": splits,
            "complete": False}


def layout(manifest: dict) -> str:
    """The source, image counts, views and shards of a manifest, in words."""
    return f"{manifest['source']}: " + ", ".join(f"{s} {i['images']} images x {len(i['views'])} view(s) in "
                                                  f"{len(i['shards'])} shard(s)" for s, i in manifest["splits"].items())


def start(out: Path, manifest: dict) -> bool:
    """Rank 0 writes the manifest, or checks that the one in `out` is this extraction's -> whether it is complete
    (all ranks; TokenCacheError naming what differs)."""
    problem, complete = None, False
    if dist.is_main_process():
        if (out / "manifest.json").exists():
            old = read_manifest(out)
            # --batch cuts the chunks: it matters to an unfinished cache only
            diffs = identity_problems(old, manifest) + [f"--{k}: cache {old[k]!r}, this run {manifest[k]!r}" for k in
                                                        ("seed", "batch")[:1 if old["complete"] else 2]
                                                        if old[k] != manifest[k]]
            # the splits as planned (finish() adds the skipped images); a finished cache serves any rank count
            keys = ("images", "views") if old["complete"] else ("images", "views", "shards")
            planned, ours = ({s: {k: i[k] for k in keys} for s, i in m["splits"].items()} for m in (old, manifest))
            if planned != ours:  # not the source's path: a copy of the images elsewhere (the file digest below)
                diffs.append(f"the images or ranks: cache {layout(old)}, this run {layout(manifest)}")
            if old.get("files", manifest.get("files")) != manifest.get("files"):
                diffs.append("the image files (digest of their paths and labels) are not the cache's")
            if not old["complete"] and old.get("tf32", manifest["tf32"]) != manifest["tf32"]:  # ids would mix
                diffs.append(f"TF32 (--tf32 on CUDA): cache {old['tf32']}, this run {manifest['tf32']}")
            if diffs:
                problem = f"{out} holds an extraction of other settings ({'; '.join(diffs)}): relaunch that " \
                          f"command (with as many ranks), or choose another --out"
            complete = old["complete"]
        elif shards := sorted(out.glob("*/shard-*")):  # the manifest they were written under is gone
            problem = f"{out} holds shard files ({shards[0].relative_to(out)}, ...) but no manifest.json, so which " \
                      f"tokenizer and images made them cannot be checked: choose another --out, or delete {out}"
        else:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "manifest.json", manifest)
            complete = False
    problem, complete = dist.broadcast_object((problem, complete))
    if problem:
        raise TokenCacheError(problem)
    return complete


def check_ranks_agree(args: argparse.Namespace, identity: dict, manifest: dict, images: dict[str, Dataset],
                      out: Path) -> None:
    """Collective: every rank must encode with the same tokenizer weights, the same images and plan, and write into
    the --out rank 0 wrote the manifest into (a shared disk), or the cache would mix tokenizers or data sets under
    rank 0's manifest; TokenCacheError listing what differs, before any image is encoded."""
    manifest_file = out / "manifest.json"
    facts = run_facts(vars(args), identity["tokenizer_digest"], images["train"], images["val"],
                      (manifest["files"]["train"], manifest["files"]["val"]))
    facts.update({"the plan (images, views and shards per split)": manifest["splits"],
                  "--out's manifest.json (rank 0 wrote or checked it: every rank must see --out, on a shared disk)":
                  hashlib.sha256(manifest_file.read_bytes()).hexdigest() if manifest_file.is_file() else None})
    refuse_disagreement(facts, TokenCacheError, "the ranks of this extraction disagree (another copy of the tokenizer "
                        "or the data, or another --out, on some node; paths may differ)")


def finish(out: Path, manifest: dict, world: int) -> None:
    """Rank 0, after every rank committed its shards: the skipped images into the manifest, marked complete."""
    for split, info in manifest["splits"].items():
        info["skipped"] = sorted(i for r in range(world) for i in json.loads(
            (out / split / f"{shard_name(r, world)}.progress.json").read_text())["skipped"])
        if info["skipped"]:
            logger.warning("%s: %d unreadable image(s) skipped (indices %s%s)", split, len(info["skipped"]),
                           info["skipped"][:10], " ..." if len(info["skipped"]) > 10 else "")
    write_json(out / "manifest.json", {**manifest, "complete": True})


def main(args: argparse.Namespace) -> None:
    device = dist.initialize(timeout_min=dist.SHARDED_JOB_WAIT_MIN)  # shards are ranges of classes: hours apart
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="[%(levelname)s] %(message)s")
    lowest = {"batch": 1, "encode_batch": 1, "workers": 0, "limit": 0}
    problems = [f"--{flag} must be >= {low}, got {getattr(args, flag)}" for flag, low in lowest.items()
                if getattr(args, flag) < low]
    problems += [p for p in (mid_reso_problem(args.mid_reso), image_source_problem(args.data_path, args.dataset),
                             seed_problem(args.seed)) if p]  # the seed: as train.py's (rand<i> crops take it)
    problems += empty_path_problems(args, {"out": "a cache folder", "vae_ckpt": "a tokenizer file"})
    if problems:
        raise ValueError("; ".join(problems))
    try:
        patch_nums = parse_patch_nums(args.pn or default_pn(args.vae_ckpt))
    except ValueError as e:
        raise ValueError(f"--pn={args.pn}: {e}") from None
    views = parse_views(args.views)
    set_tf32(device, args.tf32)  # the encoder's precision as train.py's on-the-fly tokenization (and VAR's)
    # the output folder and the tokenizer before the images are listed (minutes on ImageNet): a file there, no
    # permission, a missing or unreadable --vae_ckpt are an error line now
    out = Path(args.out)
    check_writable(out, f"--out={args.out}", create=False)  # made by `start`: a failed check leaves no folder
    vae = load_vae(args.vae_ckpt, device, v_patch_nums=patch_nums)
    if vae.vocab_size > 2**16:
        raise ValueError(f"the tokenizer's vocabulary ({vae.vocab_size}) does not fit uint16 ids")
    images = {s: open_split(args.data_path, args.dataset, s, None, args.fmnist_dir or None) for s in SPLITS}
    if args.data_path:  # the manifest's classes (train/'s) are what every label of both splits means
        check_same_classes(images["train"].classes, images["val"].classes, args.data_path)
    for split, dataset in images.items():  # --limit takes the first images: an ImageFolder's first classes
        first_items(dataset, args.limit, f"--limit ({split})")
    reso = patch_nums[-1] * vae.downsample
    identity = {"tokenizer_digest": tokenizer_digest(vae), "patch_nums": list(patch_nums), "reso": reso,
                "mid_reso": args.mid_reso, "views": views, "classes": list(images["train"].classes)}
    sources = {s: ViewSource(d, views if s == "train" else ["center"], reso, args.mid_reso, args.seed, args.limit)
               for s, d in images.items()}
    manifest = plan(args, identity, {s: len(d) for s, d in sources.items()}, world)
    manifest["tf32"] = args.tf32 and device.type == "cuda"  # whether the ids were encoded with TF32
    manifest["files"] = {s: file_list_digest(d) for s, d in images.items()}  # None for an embedded data set
    for split, dataset in images.items():  # whether --limit cut the split (a split of exactly --limit images is whole)
        manifest["splits"][split]["source_images"] = len(dataset)
    # which tokenizer file (train.py names it when its --vae_ckpt is missing; the digest above is what is checked)
    manifest["vae_ckpt"] = str(Path(args.vae_ckpt).resolve()) if args.vae_ckpt else None
    complete = start(out, manifest)
    if world > 1:
        check_ranks_agree(args, identity, manifest, images, out)
    if complete:
        logger.info("%s is complete already: nothing to do", out)
        return
    for split, info in manifest["splits"].items():
        source = sources[split]
        writer = ShardWriter(out, split, rank, world, info["shards"][rank], len(info["views"]), manifest["L"])
        extract_shard(vae, source, writer, args, split)
    dist.barrier()
    if rank == 0:
        finish(out, manifest, world)
        logger.info("token cache %s complete: %s", out, ", ".join(f"{s} {i['images']} images x {len(i['views'])} "
                                                                  f"view(s)" for s, i in manifest["splits"].items()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=DefaultsHelpFormatter)
    add_image_source_flags(p)
    p.add_argument("--vae_ckpt", default=None, help="tokenizer checkpoint, as train.py's")
    p.add_argument("--pn", default=None, help="patch schedule, as train.py's (default: the one --vae_ckpt was "
                   "trained at when it records it, else 256)")
    p.add_argument("--mid_reso", type=float, default=1.125, help="resize the shorter side to mid_reso*reso "
                   "before cropping, as train.py's")
    p.add_argument("--views", default="center", help="views of each training image: center, tl, tr, bl, br, "
                   "rand<i> (VAR's i-th random crop), each optionally _flip, comma-separated; preset: tencrop")
    p.add_argument("--seed", type=int, default=0, help="seed of the rand<i> crops")
    p.add_argument("--out", required=True, help="the cache folder (a relaunch continues in it)")
    p.add_argument("--batch", type=int, default=64, help="images per committed chunk (encoded --encode_batch "
                   "views at a time)")
    p.add_argument("--encode_batch", type=int, default=64, help="views per encoder forward: bounds the memory (a "
                   "--batch chunk holds --batch x views; about 250 MB per 256 px view in fp32); not in the manifest")
    p.add_argument("--workers", type=int, default=0, help="image-decoding processes per rank")
    p.add_argument("--limit", type=int, default=0, help="only the first N images of each split (0 = all)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 convolutions and "
                   "matmuls on CUDA, as train.py's --tf32 (its on-the-fly tokenization and VAR's run under it): "
                   "near-tie codes depend on it (about 1%% of a small tokenizer's ids, emulated); recorded in the "
                   "manifest")
    p.add_argument("--log_every", type=int, default=0, help="also log a line every N committed chunks (for logs "
                   "without a terminal; 0 = the progress bar only)")
    return p


if __name__ == "__main__":
    try:
        dist.run_then_finalize(main, build_parser().parse_args())
    except (TokenCacheError, ValueError, FileNotFoundError, ModuleNotFoundError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from e
