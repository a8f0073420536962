"""Token caches: the multi-scale token ids of a data set under K views (utils.data.views), extracted once by
scripts/extract_tokens.py and trained from by `train.py --tokens DIR`.

A cache folder holds
- manifest.json: what the ids mean (IDENTITY: the tokenizer's digest, patch schedule, resolution, mid_reso, views,
  class names; CONTENT: the crop seed, TF32, the image files' digest), --limit, the image count of each split, its
  shards and its unreadable (skipped) images;
- {split}/shard-{r:05d}-of-{W:05d}.ids.npy: uint16 (n, K, L), the ids of all scales concatenated, one row per
  image of rank r's contiguous range [begin, end) and one column per view; .labels.npy: int32 (n,), -1 for an
  unreadable image (its ids are zeros); .progress.json: images committed so far and the skipped ones.
Splits: "train" with the K views, "val" with the centre view only (the crop of VAR's validation transform), so
validating from it gives the numbers validation from the images gives.

Shape legend: N images, K views, L tokens of all scales.
"""
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from models.loading import weights_digest
from models.tokenizer import VQVAE
from utils.data.loaders import class_difference, warn_limit_coverage
from utils.run.checkpoint import allocate, disk_full_is_an_error, write_text_atomic

FORMAT = 1
SPLITS = ("train", "val")
# manifest fields that say what the ids mean: a training run (or a relaunched extraction) must agree on them
IDENTITY = {"tokenizer_digest": "the tokenizer (weights digest of --vae_ckpt)", "patch_nums": "the patch schedule "
            "(--pn)", "reso": "the resolution", "mid_reso": "--mid_reso", "views": "the views (--views)",
            "classes": "the class names"}
# what else fixes a cache's ids and labels (with IDENTITY and each split's images, views and skipped images): not where
# the images were read from, nor how the work was split into shards
CONTENT = ("L", "seed", "tf32", "files")  # (--limit: in the splits' image counts)
MASK64 = 2**64 - 1
USAGE_BUFFER = "quantize.ema_vocab_hit_SV"  # usage statistics: shaped by the schedule, no effect on the ids


class TokenCacheError(ValueError):
    """A token cache that is missing, unfinished, damaged or made for other settings."""


def tokenizer_digest(vae: VQVAE) -> str:
    """`weights_digest` of the tokenizer's state dict without its usage statistics (which depend on --pn but not
    the ids), so a cache is bound to the weights that make the ids."""
    return weights_digest({k: v for k, v in vae.state_dict().items() if k != USAGE_BUFFER})


def shard_bounds(n: int, world: int, chunk: int) -> list[list[int]]:
    """Contiguous [begin, end) ranges of `n` images for `world` ranks, cut at multiples of `chunk`: chunk j is
    images [j*chunk, (j+1)*chunk) on any number of ranks, so the ids do not depend on it."""
    n_chunks = -(-n // chunk)
    cuts = [min(n, round(r * n_chunks / world) * chunk) for r in range(world + 1)]
    return [[b, e] for b, e in zip(cuts[:-1], cuts[1:], strict=True)]


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}"


def write_json(path: Path, obj: Any) -> None:
    """`obj` as JSON, atomically (a kill leaves the old file or the new one)."""
    write_text_atomic(path, json.dumps(obj, indent=1))


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of the cache in `folder` (TokenCacheError when there is none or it is unreadable)."""
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise TokenCacheError(f"{folder} is not a token cache (no manifest.json): make one with "
                              f"scripts/extract_tokens.py --out={folder}") from None
    except (OSError, ValueError) as e:
        raise TokenCacheError(f"{path} is unreadable ({e})") from e
    if manifest.get("format") != FORMAT:
        raise TokenCacheError(f"{path}: format {manifest.get('format')!r}, this code reads format {FORMAT}")
    return manifest


def identity_problems(manifest: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between the cache's IDENTITY fields and `expected` (only the fields `expected` names)."""
    problems = []
    for key, what in IDENTITY.items():
        if key not in expected or (key in manifest and manifest[key] == expected[key]):
            continue
        if key not in manifest:  # a hand-edited or damaged manifest: what its ids mean cannot be checked
            problems.append(f"{what}: not recorded in the cache's manifest")
        elif key == "classes":  # only in the cache / this run, or another order
            problems.append(f"{what}: {class_difference(manifest[key], expected[key], ('the cache', 'this run'))}")
        else:
            problems.append(f"{what}: cache {manifest[key]!r}, this run {expected[key]!r}")
    return problems


def open_cache(folder: str | Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a finished cache whose IDENTITY agrees with `expected`; TokenCacheError naming what differs
    (before any training)."""
    manifest = read_manifest(folder)
    if not manifest["complete"]:
        raise TokenCacheError(f"the token cache {folder} is unfinished: relaunch scripts/extract_tokens.py with "
                              f"its command to complete it")
    problems = identity_problems(manifest, expected)
    if problems:
        raise TokenCacheError(f"the token cache {folder} was made for other settings: " + "; ".join(problems))
    return manifest


def content_digest(manifest: dict[str, Any]) -> str:
    """A digest of what a cache's ids and labels are (IDENTITY, CONTENT, the splits' images, views and skipped images),
    the same for copies extracted on other nodes, from other paths or over another number of ranks: train.py's ranks
    compare their node-local caches by it."""
    splits = {s: {k: info.get(k) for k in ("images", "views", "skipped")} for s, info in manifest["splits"].items()}
    what = {**{k: manifest.get(k) for k in (*IDENTITY, *CONTENT)}, "splits": splits}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def gaps(manifest: dict[str, Any]) -> list[str]:
    """What a finished cache leaves out of its images, in words: the images past its --limit (when a split had more:
    its `source_images`), the unreadable ones."""
    limit, splits = manifest.get("limit", 0), manifest["splits"]

    def cut_short(info: dict[str, Any]) -> bool:
        if "source_images" in info:
            return info["images"] < info["source_images"]
        return info["images"] == limit  # a manifest from before the split's size was kept: one of --limit images

    cut = [split for split, info in splits.items() if limit and cut_short(info)]
    lines = [f"the token cache holds only the first {limit} images of its {' and '.join(cut)} split(s) of "
             f"{manifest['source']} (extracted with --limit={limit})"] if cut else []
    for split, info in splits.items():
        if skipped := info.get("skipped"):
            lines.append(f"{len(skipped)} {split} image(s) of {manifest['source']} were unreadable at extraction and "
                         f"are left out (their indices: manifest.json, splits.{split}.skipped)")
    return lines


# ---- writing (scripts/extract_tokens.py) ------------------------------------------------------------------------
class ShardWriter:
    """Rank `rank`'s shard of one split: memory-mapped ids and labels, filled chunk by chunk; each `commit` flushes
    the chunk and then records it in the progress file (atomically), so a relaunch continues at `next`, rewriting
    at most a chunk that was written but not committed."""

    def __init__(self, folder: Path, split: str, rank: int, world: int, bounds: list[int], K: int, L: int):
        self.begin, self.end = bounds
        stem = Path(folder) / split / shard_name(rank, world)
        self.progress_path = stem.with_suffix(".progress.json")
        ids_path, labels_path = stem.with_suffix(".ids.npy"), stem.with_suffix(".labels.npy")
        n = self.end - self.begin
        if self.progress_path.exists():
            self.progress = json.loads(self.progress_path.read_text())
            self.ids_NKL = np.load(ids_path, mmap_mode="r+")
            self.labels_N = np.load(labels_path, mmap_mode="r+")
        else:
            stem.parent.mkdir(parents=True, exist_ok=True)
            self.progress = {"done": 0, "skipped": []}
            self.ids_NKL = np.lib.format.open_memmap(ids_path, mode="w+", dtype=np.uint16, shape=(n, K, L))
            self.labels_N = np.lib.format.open_memmap(labels_path, mode="w+", dtype=np.int32, shape=(n,))
            for path in (ids_path, labels_path):  # a full disk is an error now, not a SIGBUS hours later
                with disk_full_is_an_error(path, "Free space, or choose another --out; relaunch with the same "
                                                 "command to go on.", TokenCacheError):
                    allocate(path)
            write_json(self.progress_path, self.progress)

    @property
    def next(self) -> int:
        """The first image (global index) not committed yet."""
        return self.begin + self.progress["done"]

    def commit(self, start: int, rows: dict[int, tuple[np.ndarray, int]], stop: int) -> None:
        """Store images [start, stop): `rows` maps a global index to (ids (K, L), label); an index missing from
        it is unreadable (label -1, recorded as skipped)."""
        if start != self.next:
            raise ValueError(f"chunk starts at {start}, the shard continues at {self.next}")
        for i in range(start, stop):
            ids_KL, label = rows.get(i, (0, -1))
            self.ids_NKL[i - self.begin] = ids_KL
            self.labels_N[i - self.begin] = label
        self.ids_NKL.flush()
        self.labels_N.flush()
        skipped = self.progress["skipped"] + [i for i in range(start, stop) if i not in rows]
        self.progress = {"done": stop - self.begin, "skipped": skipped}
        write_json(self.progress_path, self.progress)


# ---- reading (train.py) -----------------------------------------------------------------------------------------
def pick_view(seed: int, n_views: int) -> int:
    """The view in [0, n_views) of an item with augmentation seed `seed` (utils.data.loaders.sample_seed): a pure
    function, splitmix64's finaliser (well mixed, a microsecond; torch's RNG under the seed costs 250 us)."""
    z = (seed + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) % n_views


class TokenDataset(Dataset):
    """One split of a finished cache without its skipped images: item (i, seed) -> (ids (L,) int64 of view
    `pick_view(seed)`, label); a plain index i takes the first view. train.py's sampler gives each item the seed of
    its (run seed, epoch, position), so each epoch takes one view per image, the same on any number of ranks and
    after a resume (utils.data.loaders.build_loaders with seeded=False). A positive `limit` keeps the first `limit`
    images (`limit_flag`: the flag that set it, named in a warning when they miss classes). `.classes` as an
    ImageFolder's."""

    def __init__(self, folder: str | Path, manifest: dict[str, Any], split: str, limit: int = 0,
                 limit_flag: str | None = None):
        info = manifest["splits"][split]
        stems = [Path(folder) / split / shard_name(r, len(info["shards"])) for r in range(len(info["shards"]))]
        self.ids_paths = [s.with_suffix(".ids.npy") for s in stems]
        try:
            self.ids = self.open_ids()
            labels = [np.load(s.with_suffix(".labels.npy"), mmap_mode="r") for s in stems]
        except (OSError, ValueError) as e:
            raise TokenCacheError(f"the token cache {folder} is damaged ({split} split: {e})") from e
        self.classes = list(manifest["classes"])
        for stem, (begin, end), ids, lab in zip(stems, info["shards"], self.ids, labels, strict=True):
            expected = (end - begin, len(info["views"]), manifest["L"])
            if ids.shape != expected or lab.shape != expected[:1] or (len(lab) and lab.max() >= len(self.classes)):
                raise TokenCacheError(f"the token cache {folder} is damaged: {stem.name} holds ids {ids.shape} and "
                                      f"{len(lab)} labels up to {lab.max() if len(lab) else None}; its manifest "
                                      f"plans ids {expected} and labels below {len(self.classes)}. Extract it again")
        keep = [np.flatnonzero(lab >= 0) for lab in labels]  # unreadable images are left out
        n = limit if limit > 0 else None
        self.shard_i = np.concatenate([np.full(len(k), s, dtype=np.int32) for s, k in enumerate(keep)])[:n]
        self.row_i = np.concatenate(keep).astype(np.int64)[:n]
        targets = np.concatenate([lab[k] for lab, k in zip(labels, keep, strict=True)])
        if n and limit_flag:
            warn_limit_coverage(targets, n, limit_flag)
        self.targets = targets[:n].tolist()
        self.n_views = self.ids[0].shape[1]

    def open_ids(self) -> list[np.ndarray]:
        """The shards' ids, memory-mapped (read lazily, shared through the page cache)."""
        return [np.load(path, mmap_mode="r") for path in self.ids_paths]

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the mapped ids (loader workers started by spawn or forkserver, Python 3.14's default on
        Linux, map them again): a pickled memmap is a copy of the whole array, gigabytes per worker for ImageNet."""
        return {k: v for k, v in self.__dict__.items() if k != "ids"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.ids = self.open_ids()

    def __len__(self) -> int:
        return len(self.row_i)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, view = (item[0], pick_view(item[1], self.n_views)) if isinstance(item, tuple) else (item, 0)
        ids_L = self.ids[self.shard_i[i]][self.row_i[i], view]
        return torch.from_numpy(ids_L.astype(np.int64)), self.targets[i]
