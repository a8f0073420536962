"""Sharded, resumable dump of class-conditional samples for FID, and packing into one ADM-style `.npz`.

Layout (after DiT's sample_ddp.py, with deterministic classes and resumption):
- N = num_classes * num_per_class images, global index `idx` in [0, N), class = idx // num_per_class, file
  `{idx:06d}.png` in the dump folder.
- The index range is cut into chunks of `batch_size` consecutive indices (the last one may be shorter); chunk c is
  one generation batch seeded with `chunk_seed(seed, c)` and belongs to rank c % world_size. The images depend on
  (settings, seed, batch_size) only, not on the number of ranks nor on interruptions.
- Binding: settings.json records a content hash of the M-VAR and tokenizer weights (models.loading.weights_digest);
  a dump folder made from other weights (another run, or the same run trained further) is refused, naming which
  differ.
- Resuming: a rank regenerates a chunk only if one of its PNGs is missing or does not decode, and writes only
  those files. PNGs are written to a temporary name and renamed, so a killed run leaves no half-written PNG (the
  next launch deletes a SIGKILL's temporary files: `remove_interrupted_writes`).
- One dump per folder at a time (sample.py takes the folder's run lock, utils.run.lock); settings.json is created
  atomically (the first dump's settings win, a racing one is checked against them). A full disk is a DiskFullError
  naming the file; no temporary file stays behind and the finished PNGs are kept for the resume.
- Packing (rank 0, after a barrier): the N PNGs are copied into a memory-mapped `.npy` (np.lib.format.open_memmap),
  which is then stored uncompressed as `arr_0.npy` inside `{folder}.npz`: exactly what `np.load(path)["arr_0"]`
  (OpenAI's guided-diffusion evaluator) reads, uint8 (N, H, W, 3), with the class labels as `arr_1` (int64 (N,), as
  in ADM's labeled reference batches). Peak disk use is twice the array (the `.npy` is deleted at the end), checked
  before any sampling (`check_pack_space`); RAM stays at one image.
- Row order: row j of the npz is PNG `npz_order(N)[j]`, a fixed shuffle. The PNGs are class-major, and the
  Inception Score (ADM's evaluator, like ours) averages over consecutive splits of 5,000 images: in class order a
  split of a 1,000-class dump holds 100 classes, which caps IS near 100 (a review measured 36 against 144 shuffled).
  FID and precision/recall do not depend on the order.
"""
import io
import json
import logging
import math
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image

from models.loading import CHECKPOINT_SUFFIXES
from utils.evaluation.fid import npz_order, read_npz_header
from utils.run.checkpoint import TEMP_SUFFIX, DiskFullError, allocate, disk_full_is_an_error, write_text_atomic
from utils.sample_io import save_image

logger = logging.getLogger(__name__)

SETTINGS_NAME = "settings.json"
# settings that change the images: a resumed dump must agree on all of them
WEIGHT_SETTINGS = {"model_weights": "the M-VAR weights", "vae_weights": "the tokenizer weights"}
IMAGE_SETTINGS = ("ckpt", "vae", "cfg", "top_k", "top_p", "more_smooth", "seed", "num_classes", "num_per_class",
                  "batch_size", "precision", "tf32", "device", *WEIGHT_SETTINGS)  # device: CPU and CUDA draw apart

# (label_B int64 array of class ids, g_seed) -> uint8 images (B, H, W, 3)
GenerateFn = Callable[[np.ndarray, int], np.ndarray]


class DumpFolderError(ValueError):
    """The dump folder holds another dump (other weights or settings) or other images: sample.py says so in one
    line."""


@dataclass(frozen=True)
class DumpPlan:
    """Which global indices exist, their classes, and how they are batched and sharded."""

    num_classes: int
    num_per_class: int
    batch_size: int

    def __post_init__(self):
        for name in ("num_classes", "num_per_class", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def total(self) -> int:
        return self.num_classes * self.num_per_class

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.total / self.batch_size)

    def chunk_indices(self, c: int) -> range:
        return range(c * self.batch_size, min((c + 1) * self.batch_size, self.total))

    def chunks_of_rank(self, rank: int, world_size: int) -> range:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        return range(rank, self.num_chunks, world_size)

    def labels(self, indices: Iterable[int]) -> np.ndarray:
        return np.asarray([i // self.num_per_class for i in indices], dtype=np.int64)


def chunk_seed(seed: int, chunk: int) -> int:
    """Seed of one generation batch: a 31-bit mix of (seed, chunk), so nearby seeds give unrelated streams. Two
    batches of one dump share a seed with a chance of about chunks^2 / 2^32 (0.2% at 50,000 images in batches of
    16): the same noise under other classes, correlated images, not copies; kept for the dumps made so far."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0] & 0x7FFFFFFF)


def png_path(folder: Path, idx: int) -> Path:
    return Path(folder) / f"{idx:06d}.png"


def png_is_valid(path: Path, image_hw: tuple[int, int] | None = None) -> bool:
    """True if `path` exists and fully decodes as an RGB image (of size `image_hw` when given)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            im.load()
            return im.mode == "RGB" and (image_hw is None or im.size == (image_hw[1], image_hw[0]))
    except Exception:  # noqa: BLE001 (any decoder error means: regenerate)
        return False


def save_png(img_HW3: np.ndarray, path: Path) -> None:
    """Write atomically: a temporary file renamed over `path`; a full disk is a DiskFullError."""
    with disk_full_is_an_error(path, "The PNGs written so far are kept: free some space and re-run to resume"):
        save_image(img_HW3, path)


TRAINING_CHECKPOINT_PREFIX = "ar-ckpt-"  # train.py's checkpoint files (utils.run.checkpoint.RunFolder "ar-ckpt")


def fid_folder_name(ckpt: str, cfg: float, top_k: int, top_p: float, seed: int, more_smooth: bool = False,
                    num_per_class: int = 50) -> str:
    """Folder name that encodes what the images depend on, e.g. `d16-cfg1.5-topk900-topp0.96-seed0-n50`: the
    checkpoint's file name without a weights suffix, or a Hub folder's or repo id's last part whole (m-var-v0.1).
    A training run's checkpoint (train.py's `ar-ckpt-*.pth`, the same name in every run) is named after its run's
    folder too (`d16-ar-ckpt-best-...`), so that two runs' dumps do not share a folder."""
    path = Path(str(ckpt))
    stem = (path.name.rsplit(".", 1)[0] if path.name.lower().endswith(CHECKPOINT_SUFFIXES) else path.name) or "model"
    if stem.startswith(TRAINING_CHECKPOINT_PREFIX) and path.parent.name not in ("", ".", ".."):
        stem = f"{path.parent.name}-{stem}"
    name = f"{stem}-cfg{cfg:g}-topk{top_k}-topp{top_p:g}-seed{seed}-n{num_per_class}"
    return name + ("-smooth" if more_smooth else "")


def check_or_write_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Record the settings in `folder/settings.json`, or check a resumed dump was started with the same ones
    (weights included): ValueError saying what differs."""
    path = Path(folder) / SETTINGS_NAME
    png = next(Path(folder).glob("*.png"), None)
    if not path.exists() and png is not None:
        raise DumpFolderError(f"{folder} holds PNGs ({png.name}, ...) but no {SETTINGS_NAME}: they are not a dump of "
                              "this sample.py (whose first step writes it), so which weights and settings made them "
                              f"cannot be checked. Choose another --fid_dir, or move them out of {folder}.")
    try:  # created atomically: of two dumps starting at once, one writes it and the other is checked against it
        write_text_atomic(path, json.dumps(settings, indent=2, sort_keys=True), exclusive=True)
        return
    except FileExistsError:  # a resumed dump, or one started at the same time
        pass
    try:
        old = json.loads(path.read_text())
    except ValueError as e:  # UnicodeDecodeError included
        raise DumpFolderError(f"{path} is not readable JSON ({e}): which settings made the images in {folder} cannot "
                              f"be checked. Restore it, or delete {folder} to start over.") from e
    diff = {k: (old.get(k), settings.get(k)) for k in IMAGE_SETTINGS if old.get(k) != settings.get(k)}
    if diff and png is None:  # a first launch that failed before its first image
        raise DumpFolderError(f"{folder} holds a dump made with other settings {{name: (old, new)}}: {diff}, which "
                              f"wrote no image yet. Delete {path} to start over with these settings, or resume with "
                              "the same flags.")
    weights = [WEIGHT_SETTINGS[k] for k in WEIGHT_SETTINGS if k in diff]
    if weights and all(old.get(k) is None for k in WEIGHT_SETTINGS):
        raise DumpFolderError(f"{folder} holds a dump that recorded no weight hashes (an older version): whether its "
                              f"images come from these weights cannot be checked. Delete {folder} to start over, or "
                              "choose another --fid_dir.")
    if weights:
        raise DumpFolderError(f"{folder} holds a dump made from other weights: {' and '.join(weights)} differ "
                              f"(another checkpoint, or the same run trained further; {{name: (old, new)}}: {diff}). "
                              f"Choose another --fid_dir, or delete {folder} to start over.")
    if diff:
        raise DumpFolderError(f"{folder} holds a dump made with other settings {{name: (old, new)}}: {diff}. "
                              "Resume with the same flags, or choose another --fid_dir.")


def dump_shard(folder: Path, plan: DumpPlan, seed: int, generate: GenerateFn, rank: int = 0, world_size: int = 1,
               image_hw: tuple[int, int] | None = None, progress: bool = False) -> int:
    """Generate this rank's missing or undecodable PNGs; returns how many files were written."""
    from tqdm import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chunks = plan.chunks_of_rank(rank, world_size)
    written = 0
    for c in tqdm(chunks, desc=f"FID dump (rank {rank})", disable=not progress, unit="batch"):
        indices = plan.chunk_indices(c)
        todo = [i for i in indices if not png_is_valid(png_path(folder, i), image_hw)]
        if not todo:
            continue
        imgs_BHW3 = generate(plan.labels(indices), chunk_seed(seed, c))
        if imgs_BHW3.dtype != np.uint8 or imgs_BHW3.ndim != 4 or imgs_BHW3.shape[0] != len(indices) \
                or imgs_BHW3.shape[-1] != 3:
            raise ValueError(f"generate() must return uint8 (B={len(indices)}, H, W, 3), got "
                             f"{imgs_BHW3.dtype} {tuple(imgs_BHW3.shape)}")
        for i in todo:
            save_png(imgs_BHW3[i - indices.start], png_path(folder, i))
        written += len(todo)
    return written


def missing_indices(folder: Path, total: int, image_hw: tuple[int, int] | None = None) -> list[int]:
    """Indices in [0, total) whose PNG is absent or does not decode."""
    return [i for i in range(total) if not png_is_valid(png_path(folder, i), image_hw)]


def pack_bytes(plan: DumpPlan, image_hw: tuple[int, int]) -> int:
    """The disk space `pack_npz` needs at its peak: the array twice (the `.npy`, then its copy inside the npz)."""
    return 2 * plan.total * image_hw[0] * image_hw[1] * 3


def remove_interrupted_writes(folder: Path) -> list[Path]:
    """Delete the temporary files a killed dump left (SIGKILL skips their clean-up): its PNGs' and settings file's
    (`utils.run.checkpoint.temp_path`, hidden, named after the file and its writer) and a packing's `.npy` /
    `.npz`. Only for rank 0 holding the folder's run lock before any rank samples: no writer is alive then."""
    folder = Path(folder)
    temp_name = re.compile(rf"\.(\d{{6,}}\.png|{re.escape(SETTINGS_NAME)}){TEMP_SUFFIX}")
    stale = [p for p in folder.iterdir() if temp_name.fullmatch(p.name)]
    stale += [p for p in pack_temp_paths(default_npz(folder)) if p.exists()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d temporary file(s) of an interrupted dump: %s", len(stale),
                    ", ".join(p.name for p in stale[:5]) + (", ..." if len(stale) > 5 else ""))
    return stale


def check_pack_space(folder: Path, plan: DumpPlan, image_hw: tuple[int, int]) -> None:
    """Before any sampling: DiskFullError when the disk of `folder` has less free space than packing will need
    (`pack_bytes`, the PNGs still to be written not counted), which would otherwise stop the dump at its very end."""
    need, free = pack_bytes(plan, image_hw), shutil.disk_usage(folder).free
    if free < need:
        raise DiskFullError(f"packing {plan.total} images of {image_hw[0]}x{image_hw[1]} into {folder.name}.npz "
                            f"needs {need / 2**20:.0f} MiB free beside {folder} (the array twice: a .npy, then the "
                            f"npz), besides the PNGs; {free / 2**20:.0f} MiB are free. Free some space or choose "
                            f"another --fid_dir")


def default_npz(folder: Path) -> Path:
    """Where `pack_npz` writes the npz of `folder` by default: beside it, `{folder}.npz`."""
    return folder.with_name(folder.name + ".npz")


def pack_temp_paths(npz_path: Path) -> tuple[Path, Path]:
    """The files `pack_npz` writes on its way to `npz_path`: the memory-mapped `.npy`, then the npz being zipped."""
    return npz_path.with_suffix(".npy.tmp"), npz_path.with_name(npz_path.name + ".tmp")


def pack_npz(folder: Path, plan: DumpPlan, npz_path: Path | None = None, image_hw: tuple[int, int] | None = None
             ) -> Path:
    """Pack the plan's `{idx:06d}.png` into `npz_path` (default `{folder}.npz`): `arr_0` uint8 (N, H, W, 3) in
    `npz_order(N)`, `arr_1` their int64 class labels.

    Goes through a memory-mapped `.npy` beside the npz; every image must have the first one's shape (and `image_hw`
    when given). A missing or undecodable PNG raises FileNotFoundError saying how many are missing.
    """
    total = plan.total
    folder = Path(folder)
    npz_path = Path(npz_path) if npz_path is not None else default_npz(folder)
    if total < 1:
        raise ValueError(f"nothing to pack: total={total}")
    first = png_path(folder, 0)
    if not png_is_valid(first):
        _raise_missing(folder, total)
    with Image.open(first) as im:
        H, W = im.height, im.width
    if image_hw is not None and (H, W) != tuple(image_hw):
        raise DumpFolderError(f"{first} is {H}x{W}, expected {image_hw[0]}x{image_hw[1]}: the folder holds another "
                              "model's dump")
    npy_path, tmp_npz = pack_temp_paths(npz_path)
    kept = f"The PNGs are kept; packing needs {pack_bytes(plan, (H, W)) / 2**20:.0f} MiB: free some space and re-run"
    try:
        with disk_full_is_an_error(npz_path, kept):
            arr = np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.uint8, shape=(total, H, W, 3))
            allocate(npy_path)
            order = npz_order(total)
            for j, i in enumerate(order):
                p = png_path(folder, int(i))
                try:
                    with Image.open(p) as im:
                        img = np.asarray(im.convert("RGB"))
                except (OSError, ValueError) as e:
                    _raise_missing(folder, total, e)
                if img.shape != (H, W, 3):
                    raise DumpFolderError(f"{p} has shape {img.shape}, expected {(H, W, 3)} like {first.name}")
                arr[j] = img
            arr.flush()
            del arr
            labels = io.BytesIO()
            np.save(labels, plan.labels(order))
            with zipfile.ZipFile(tmp_npz, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                zf.write(npy_path, arcname="arr_0.npy")
                zf.writestr("arr_1.npy", labels.getvalue())
            os.replace(tmp_npz, npz_path)
    finally:
        npy_path.unlink(missing_ok=True)
        tmp_npz.unlink(missing_ok=True)
    shape, dtype = read_npz_header(npz_path)
    if shape != (total, H, W, 3) or dtype != np.uint8:
        raise RuntimeError(f"{npz_path}: wrote {dtype} {shape}, expected uint8 {(total, H, W, 3)}")
    logger.info("packed %d images into %s (arr_0: uint8 %s, shuffled; arr_1: their labels)", total, npz_path, shape)
    return npz_path


def _raise_missing(folder: Path, total: int, cause: Exception | None = None) -> None:
    missing = missing_indices(folder, total)
    raise FileNotFoundError(f"{len(missing)} of the {total} PNGs in {folder} are missing or unreadable (first: "
                            f"{[png_path(folder, i).name for i in missing[:5]]}): rerun the dump to fill them") \
        from cause
