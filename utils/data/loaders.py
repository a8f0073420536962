"""Training data: ImageFolder (or an embedded data set) with VAR's transforms, and a resumable distributed sampler.

Augmentation is a pure function of (seed, epoch, position in the epoch): the sampler hands each item its own seed
and `SeededDataset` runs the transform under that seed. So the images a run sees do not depend on the number of
ranks or workers, and a run resumed mid-epoch continues with exactly the images it would have seen.
"""
import hashlib
import io
import logging
import math
import os
import signal
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension
from torchvision.transforms import InterpolationMode, transforms

from utils.data.embedded import EMBEDDED_DATASETS, build_embedded_dataset
from utils.run.log import SAME_ON_ALL_RANKS

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 100  # give up if this many images in a row are unreadable: the data set itself is broken


class DataError(ValueError):
    """A data folder or data flag that cannot train (train.py prints it as one error line)."""


def normalize_01_into_pm1(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return x.add(x).add_(-1)


def mid_reso_problem(mid_reso: float) -> str:
    """Why `--mid_reso` cannot crop ("" when it can): the crop needs the resized side at least the image size."""
    if 1 <= mid_reso < math.inf:
        return ""
    return (f"--mid_reso={mid_reso}: expected a finite number >= 1 (the shorter side is resized to mid_reso x the "
            "image size, then cropped to the image size)")


def image_source_problem(data_path: str, dataset: str | None, needed: bool = True) -> str:
    """Why the image flags are wrong ("" when they are right): `--data_path` and `--dataset` name one source, never
    both (the embedded set was ignored without a word); with no `--data_path`, an embedded data set must be named
    where images are `needed`. A command without `--data_path` (VAR's own launch commands, which need it) used to
    train on MNIST."""
    if data_path and dataset:
        return (f"--data_path={data_path} and --dataset={dataset} both name the images: pass one (the ImageFolder "
                "root or the embedded data set)")
    if data_path or dataset or not needed:
        return ""
    return ("--data_path: expected an ImageFolder root with train/ and val/ class folders (ImageNet's layout); "
            f"for an embedded data set instead, name it: --dataset={'|'.join(EMBEDDED_DATASETS)}")


def build_transforms(reso: int, mid_reso: float = 1.125, hflip: bool = False) -> tuple[Callable, Callable]:
    """VAR's transforms: resize the shorter side to round(mid_reso*reso) (LANCZOS), then a random (train) or
    center (val) reso x reso crop, optional horizontal flip (train), values in [-1, 1]."""
    mid = round(mid_reso * reso)
    train = [transforms.Resize(mid, interpolation=InterpolationMode.LANCZOS), transforms.RandomCrop((reso, reso)),
             transforms.ToTensor(), normalize_01_into_pm1]
    val = [transforms.Resize(mid, interpolation=InterpolationMode.LANCZOS), transforms.CenterCrop((reso, reso)),
           transforms.ToTensor(), normalize_01_into_pm1]
    if hflip:
        train.insert(0, transforms.RandomHorizontalFlip())
    return transforms.Compose(train), transforms.Compose(val)


def check_folder(root: str | Path, flag: str = "--data_path") -> None:
    """FileNotFoundError naming `flag` when the ImageFolder root `root` is no folder."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{flag}: folder {root} does not exist (expected an ImageFolder with one sub-folder "
                                f"per class)")


def is_image_name(path: str) -> bool:
    """An image's extension, and not a hidden file: macOS's AppleDouble `._x.JPEG` (a tar made on a Mac holds one
    per image) was listed, skipped as unreadable and stood in for by the class's first image, doubling the epoch."""
    return has_file_allowed_extension(path, IMG_EXTENSIONS) and not os.path.basename(path).startswith(".")


def pixel_bits(mode: str, fmt: str | None) -> int | None:
    """The depth an image of PIL `mode` read from a file of format `fmt` is taken at: 16 for single-channel 16-bit
    images (modes I;16*, and a PNG's or PGM's I, as Pillow reads some of them: 0-65535), None for other 32-bit
    integer images and float ones (no agreed range: refused), else 8. The training and the edit paths' one rule."""
    if mode.startswith("I;16") or (mode == "I" and fmt in ("PNG", "PPM")):
        return 16
    return None if mode in ("I", "F") else 8


def rgb(img: Image.Image, path: str) -> Image.Image:
    """`img` as 8-bit RGB. 16-bit images (`pixel_bits`) keep their top 8 bits: PIL's convert("RGB") clips them at
    255, nearly white. Images of no agreed range are a DataError naming the file."""
    bits = pixel_bits(img.mode, img.format)
    if bits is None:
        raise DataError(f"{path}: image mode {img.mode!r} (32-bit integer or float pixels, of no agreed range); "
                        "expected 8- or 16-bit images: convert the data set first")
    if bits == 16:
        img = Image.fromarray((np.asarray(img).clip(0, 65535).astype(np.uint32) >> 8).astype(np.uint8), "L")
    return img.convert("RGB")


class SafeImageFolder(ImageFolder):
    """ImageFolder that skips images that do not decode (broken, truncated): one warning per file (naming it, with
    the count so far in this process), and the next readable image in index order is returned in its place: the
    next among the first `span` images (all of them; `first_items` sets its limit, so a replacement is never an
    image the limit leaves out)."""

    def __init__(self, root: str, transform: Callable | None = None, flag: str = "--data_path"):
        check_folder(root, flag)
        try:
            super().__init__(root, transform=transform, is_valid_file=is_image_name)  # images are read by `read`
        except FileNotFoundError as e:  # no class folders / a class folder without images
            classes = [d for d in Path(root).iterdir() if d.is_dir()]
            empty = sorted(d.name for d in classes if not any(
                is_image_name(f) for _, _, files in os.walk(d, followlinks=True) for f in files))
            what = (f"has class folders without images: {name_list(empty, f' of {len(classes)}')}"
                    if 0 < len(empty) < len(classes)
                    else "holds no images in class sub-folders")
            raise FileNotFoundError(f"{flag}: {root} {what} (torchvision: {e})") from e
        self.bad_paths: set = set()
        self.span = len(self.samples)

    def read(self, index: int) -> Image.Image | None:
        """Image `index` as RGB, or None when its bytes do not decode (named in a warning, once per file). A file
        that cannot be read (gone, an I/O or network file-system error) raises: skipping it would drop images, even
        whole classes, for good (a token cache would be marked complete without them)."""
        path = self.samples[index][0]
        if path in self.bad_paths:
            return None
        data = Path(path).read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as img:
                return rgb(img, path)
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL: broken, truncated
            self.bad_paths.add(path)
            logger.warning("skipping unreadable image %s (%s: %s); %d skipped so far in this process",
                           path, type(e).__name__, e, len(self.bad_paths))
            return None

    def __getitem__(self, index: int):
        for attempt in range(MAX_CONSECUTIVE_BAD):
            i = (index + attempt) % self.span
            img = self.read(i)
            if img is None:
                continue
            return (self.transform(img) if self.transform is not None else img), self.samples[i][1]
        raise RuntimeError(f"{MAX_CONSECUTIVE_BAD} unreadable images in a row from index {index} in {self.root}: "
                           f"check the data set")


class SeededDataset(Dataset):
    """Wraps a data set whose transform draws from torch's global RNG; item (index, seed) runs it under `seed`
    (in a forked RNG, so the caller's generator is untouched)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU's alone: torch.manual_seed would reseed CUDA's too
            return self.dataset[index]


def open_split(data_path: str, dataset: str, split: str, transform: Callable | None,
               fmnist_dir: str | None = None) -> Dataset:
    """One split ("train" or "val"): `data_path`/split as a SafeImageFolder, or with an empty `data_path` the
    embedded data set `dataset` (utils.data.embedded; Fashion-MNIST read from `fmnist_dir`)."""
    if data_path:
        return SafeImageFolder(str(Path(data_path) / split), transform)
    return build_embedded_dataset(dataset, split, transform, fmnist_dir)


def build_datasets(data_path: str, dataset: str, reso: int, mid_reso: float = 1.125, hflip: bool = False,
                   fmnist_dir: str | None = None, train_limit: int = 0,
                   val_limit: int = 0) -> tuple[int, Dataset, Dataset]:
    """(num_classes, train set, val set): the splits of `open_split` through VAR's transforms. A positive
    `train_limit` / `val_limit` keeps only that many first images of the split."""
    if train_limit < 0 or val_limit < 0:
        raise DataError(f"--train_limit={train_limit} --val_limit={val_limit}: expected >= 0 (0 = all images)")
    train_tf, val_tf = build_transforms(reso, mid_reso, hflip)
    train_set = open_split(data_path, dataset, "train", train_tf, fmnist_dir)
    val_set = open_split(data_path, dataset, "val", val_tf, fmnist_dir)
    if data_path:
        check_same_classes(train_set.classes, val_set.classes, data_path)
    if len(train_set) == 0 or len(val_set) == 0:
        raise DataError(f"empty data set: {len(train_set)} train / {len(val_set)} val images "
                         f"(--data_path={data_path!r}, --dataset={dataset!r})")
    return len(train_set.classes), first_items(train_set, train_limit, "--train_limit"), \
        first_items(val_set, val_limit, "--val_limit")


def build_val_set(data_path: str, dataset: str, reso: int, mid_reso: float = 1.125, fmnist_dir: str | None = None,
                  val_limit: int = 0) -> tuple[list[str], Dataset, str | None]:
    """(the class names, the val set, the `file_list_digest` of all its images) as `build_datasets` makes them, for
    training from a token cache: train/ is read for its class folders (they give the labels their meaning), not
    listed image by image (1.28M files of ImageNet, on every rank)."""
    if val_limit < 0:
        raise DataError(f"--val_limit={val_limit}: expected >= 0 (0 = all images)")
    val_set = open_split(data_path, dataset, "val", build_transforms(reso, mid_reso)[1], fmnist_dir)
    classes = list(val_set.classes)
    if data_path:
        train = str(Path(data_path) / "train")
        check_folder(train)
        classes = find_classes(train)[0]
        check_same_classes(classes, val_set.classes, data_path)
    if len(val_set) == 0:
        raise DataError(f"empty data set: no val images (--data_path={data_path!r}, --dataset={dataset!r})")
    return classes, first_items(val_set, val_limit, "--val_limit"), file_list_digest(val_set)


def name_list(names: Sequence[str], of: str = "") -> str:
    """The first five of the sorted `names` and how many there are (`of`: " of 12"): "a, b, c, d, e, ... (7)"."""
    first = sorted(names)
    return f"{', '.join(first[:5])}{', ...' * (len(first) > 5)} ({len(first)}{of})"


def class_difference(first: Sequence[str], second: Sequence[str], names: tuple[str, str]) -> str:
    """How two lists of class names differ, in words: the names only one has (name_list), or "the same names in
    another order". `names` says what holds each list ("train/", "the checkpoint")."""
    only = [f"only in {name}: {name_list(c)}"
            for name, c in ((names[0], set(first) - set(second)), (names[1], set(second) - set(first))) if c]
    return "; ".join(only) or "the same names in another order"


def check_same_classes(train_classes: Sequence[str], val_classes: Sequence[str], data_path: str) -> None:
    """A label is an index into the sorted class folders of its own split, so train/ and val/ must have the same
    ones, or the val labels would name other classes: DataError naming the folders only one split has."""
    if list(train_classes) != list(val_classes):
        raise DataError(f"--data_path={data_path}: train/ and val/ must have the same class folders; "
                        + class_difference(train_classes, val_classes, ("train/", "val/")))


def first_items(dataset: Dataset, n: int, flag: str | None = None) -> Dataset:
    """The first `n` items of `dataset` (all of them for n = 0). With `flag`, a warning names it when they cover
    fewer classes than the whole: an ImageFolder lists its images class by class, so --train_limit=10000 of
    ImageNet is its first 8 classes."""
    if n <= 0:
        return dataset
    targets = getattr(dataset, "targets", None)
    if flag is not None and targets is not None:
        warn_limit_coverage(targets, n, flag)
    if isinstance(dataset, SafeImageFolder):
        dataset.span = min(n, len(dataset))
    return Subset(dataset, range(min(n, len(dataset))))


def warn_limit_coverage(targets: Sequence[int], n: int, flag: str) -> None:
    """A warning naming `flag` when the first `n` of `targets` (a split's labels in order) cover fewer classes than
    all of them: an ImageFolder, and a token cache extracted from one, lists its images class by class, so
    --train_limit=10000 of ImageNet is its first 8 classes."""
    kept, every = len(set(map(int, targets[:n]))), len(set(map(int, targets)))
    if kept < every:
        logger.warning("%s=%d keeps the data set's first %d images, which cover %d of its %d classes (in the set's "
                       "order; an ImageFolder's is class by class): the model still has every class, and their losses "
                       "measure those %d only", flag, n, min(n, len(targets)), kept, every, kept,
                       extra=SAME_ON_ALL_RANKS)


def dataset_targets(dataset: Dataset) -> list[int] | None:
    """The labels of a `build_datasets` split in index order, read without its images (None if it has none)."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    targets = getattr(base, "targets", None)
    if targets is None:
        return None
    return [int(targets[i]) for i in (dataset.indices if isinstance(dataset, Subset) else range(len(targets)))]


def class_names(dataset: Dataset) -> list[str]:
    """The class names of a `build_datasets` split (an ImageFolder's folder names, an embedded set's classes)."""
    return list((dataset.dataset if isinstance(dataset, Subset) else dataset).classes)


def file_list_digest(dataset: Dataset) -> str | None:
    """A digest of an ImageFolder split's files in use (paths under its root, with their labels), so that copies of
    the data on other nodes can be compared: class folders whose contents were swapped keep the class names but not
    the file list. None for the embedded and token-cache data sets (compared by their classes and size)."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    if not isinstance(base, ImageFolder):
        return None
    indices = dataset.indices if isinstance(dataset, Subset) else range(len(base))
    prefix = len(os.path.join(base.root, ""))  # ImageFolder joins root, class folder and file name
    h = hashlib.blake2b(digest_size=16)
    for i in indices:
        path, label = base.samples[i]
        h.update(f"{path[prefix:]}\t{label}\n".encode())
    return h.hexdigest()


# ---- samplers ---------------------------------------------------------------------------------------------------
def sample_seed(seed: int, epoch: int, pos: int) -> int:
    """Augmentation seed of the item at position `pos` of epoch `epoch` (deterministic, < 2**63). Positions from
    1,000,003 on (ImageNet's last 280k) share seeds with the next epoch's first ones: other images, so their crops
    and flips stay unrelated; kept, as token caches and resumed runs depend on these seeds."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + pos) % (2**63)


class DistributedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Resumable batch sampler that every rank agrees on.

    Epoch e shuffles all indices with a generator seeded by (seed, e) (same on every rank), pads the tail with the
    first indices to whole global batches (VAR's fill_last), and global batch i is positions [i*G, (i+1)*G); rank r
    takes its r-th slice of it. So the set of images in each global batch is independent of the world size.
    Items are (index, augmentation seed). `set_epoch(e, start_it)` starts the next iteration at batch `start_it`.
    """

    def __init__(self, dataset_len: int, glb_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if glb_batch_size % world_size:
            raise ValueError(f"global batch {glb_batch_size} is not divisible by the world size {world_size}")
        self.dataset_len, self.glb_batch_size, self.rank, self.world_size = dataset_len, glb_batch_size, rank, \
            world_size
        self.batch_size = glb_batch_size // world_size
        self.seed, self.shuffle = seed, shuffle
        self.iters_per_epoch = (dataset_len + glb_batch_size - 1) // glb_batch_size
        self.epoch, self.start_it = 0, 0

    def set_epoch(self, epoch: int, start_it: int = 0) -> None:
        if not 0 <= start_it <= self.iters_per_epoch:
            raise ValueError(f"start_it={start_it} outside [0, {self.iters_per_epoch}]")
        self.epoch, self.start_it = epoch, start_it

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """All positions of epoch `epoch` (length iters_per_epoch * glb_batch_size)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            idx = torch.randperm(self.dataset_len, generator=g)
        else:
            idx = torch.arange(self.dataset_len)
        total = self.iters_per_epoch * self.glb_batch_size
        while idx.numel() < total:  # pad (more than once only for tiny data sets)
            idx = torch.cat((idx, idx[: total - idx.numel()]))
        return idx

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        idx = self.epoch_indices(self.epoch).tolist()
        for it in range(self.start_it, self.iters_per_epoch):
            begin = it * self.glb_batch_size + self.rank * self.batch_size
            yield [(idx[p], sample_seed(self.seed, self.epoch, p)) for p in range(begin, begin + self.batch_size)]

    def __len__(self) -> int:
        return self.iters_per_epoch - self.start_it


class EvalDistributedSampler(Sampler[int]):
    """Contiguous, non-overlapping slices of the data set per rank; metrics are summed with counts.

    With `pad`, every rank gets the same number of positions (so the same number of batches: FSDP2 forwards are
    collective); positions past the end wrap around and are marked invalid by `PaddedEvalDataset`.
    """

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1, pad: bool = False):
        if pad:
            per_rank = -(-dataset_len // world_size)
            self.indices = list(range(rank * per_rank, (rank + 1) * per_rank))
        else:
            bounds = torch.linspace(0, dataset_len, world_size + 1).round().long().tolist()
            self.indices = list(range(bounds[rank], bounds[rank + 1]))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class PaddedEvalDataset(Dataset):
    """Position p -> (*dataset[p % len], p < len): the padded positions of `EvalDistributedSampler(pad=True)`
    repeat real items with a False validity flag, which `Trainer.evaluate` uses as a zero weight."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, pos: int):
        return (*self.dataset[pos % len(self.dataset)], pos < len(self.dataset))


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT: torchrun and SLURM signal every process of a job, and a worker
    that died of it would make the training process raise before its preemption checkpoint (utils.run.preemption).
    A worker still ends with its parent: DataLoader's shutdown, or its watchdog when the parent is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loaders(train_set: Dataset, val_set: Dataset, batch_size: int, workers: int, rank: int, world_size: int,
                  seed: int, pin_memory: bool = False, pad_eval: bool = False,
                  seeded: bool = True) -> tuple[DataLoader, DataLoader, DistributedBatchSampler]:
    """Train loader over `DistributedBatchSampler` (per-rank `batch_size`) and a val loader (1.5x batch).
    `seeded`: train items run their transform under their seed (`SeededDataset`); False hands the (index, seed)
    items to the data set itself (utils.data.token_cache.TokenDataset draws its view from the seed).

    With `pad_eval` every rank runs the same number of val batches (train.py: FSDP2's forwards and validation's
    per-batch stop check are collectives), which then are (images, labels, valid) with padded items marked invalid;
    otherwise val batches are (images, labels).
    """
    sampler = DistributedBatchSampler(len(train_set), batch_size * world_size, rank, world_size, seed)
    # an explicit generator keeps DataLoader from drawing its base seed from the global RNG (exact resume)
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                  generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_stop_signals)
    train_loader = DataLoader(SeededDataset(train_set) if seeded else train_set, batch_sampler=sampler, **common)
    # validation's workers live while it runs only: kept, they would double the processes every rank forks for
    # the whole run (VAR reads validation in the main process)
    val_loader = DataLoader(PaddedEvalDataset(val_set) if pad_eval else val_set,
                            batch_size=max(1, round(batch_size * 1.5)), shuffle=False, drop_last=False,
                            sampler=EvalDistributedSampler(len(val_set), rank, world_size, pad=pad_eval),
                            **{**common, "persistent_workers": False})
    return train_loader, val_loader, sampler
