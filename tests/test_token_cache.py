"""Token caches end to end on a tiny tokenizer and ImageFolder (CPU): scripts/extract_tokens.py (kill + relaunch
byte-identical, 2 ranks == 1, unreadable images skipped) and train.py --tokens (bit-identical to training from the
images' centre crop, kill + resume bit-identical, a cache of other settings refused)."""
import errno
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PER_RANK, REPO, SUBPROCESS_ENV, build_tiny_mvar, interrupt, launch, launch_cmd, write_image_folder
from test_trainer_e2e import KILL_AFTER_FIRST_SAVE, TINY, logged_losses, model_state
from models.loading import load_vae, vae_checkpoint
from scripts.extract_tokens import ViewSource, extract_shard, finish, plan, start
from trainer import data_problems
from utils.data.loaders import DataError, build_transforms, sample_seed
from utils.data.token_cache import IDENTITY, TokenCacheError, TokenDataset, content_digest, gaps, open_cache, \
    pick_view, read_manifest, ShardWriter, shard_bounds, shard_name, tokenizer_digest, write_json
from utils.data.views import parse_views, render_views
from utils.run.checkpoint import LAST

EXTRACT = REPO / "scripts" / "extract_tokens.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny tokenizer (8 px images at pn 1_2_4), an ImageFolder of square 12 px images (so --mid_reso=1 resizes
    them to 8x8 and the training transform's RandomCrop keeps them whole: the centre crop) and a copy of it with
    an unreadable file."""
    root = tmp_path_factory.mktemp("tokens")
    vae, _ = build_tiny_mvar(patch_nums=(1, 2, 4))
    torch.save(vae_checkpoint(vae), root / "vae.pth")
    write_image_folder(root / "data", 12, 12, {"train": 8, "val": 2})
    shutil.copytree(root / "data", root / "broken")
    (root / "broken" / "train" / "class1" / "3.png").write_bytes(b"not a png")
    return root


def extract_flags(setup: Path, out: Path, *extra: str, data: str = "data") -> list[str]:
    return [f"--data_path={setup / data}", f"--vae_ckpt={setup / 'vae.pth'}", "--pn=1_2_4", "--mid_reso=1",
            f"--out={out}", "--batch=2", *extra]


def train_flags(setup: Path, out: Path, *extra: str) -> list[str]:
    return [f"--vae_ckpt={setup / 'vae.pth'}", f"--local_out_dir_path={out}", *TINY, "--mid_reso=1",
            "--save_every=2", *extra]


def cache_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def all_ids(folder: Path, split: str) -> tuple[np.ndarray, list[int]]:
    """Every view's ids (N, K, L) and the labels of a cache split, as training reads them."""
    ds = TokenDataset(folder, read_manifest(folder), split)
    return np.stack([ds.ids[s][r] for s, r in zip(ds.shard_i, ds.row_i, strict=True)]), ds.targets


@pytest.fixture(scope="module")
def centre_cache(setup):
    launch(EXTRACT, *extract_flags(setup, setup / "centre"), nproc=1)
    return setup / "centre"


def test_training_from_a_cache_takes_its_schedule_and_tokenizer_and_names_them_when_the_file_is_gone(
        setup, centre_cache, tmp_path):
    """A walkthrough: train.py --tokens without --vae_ckpt and --pn went for VAR's tokenizer and schedule (and said
    only that VAR's file was not there), although the cache's manifest records which file and schedule made it.
    They are now the defaults; where the file is not on this machine, the error names the extraction's flags."""
    flags = [f for f in TINY if not f.startswith("--pn=")]
    out = launch(REPO / "train.py", f"--tokens={centre_cache}", f"--local_out_dir_path={tmp_path / 'out'}", *flags,
                 "--ep=1", nproc=1).stdout
    assert f"training from the token cache {centre_cache} (--pn=1_2_4)" in out
    assert f"loaded tokenizer checkpoint {setup / 'vae.pth'} (--vae_ckpt)" in out
    args = torch.load(tmp_path / "out" / LAST, weights_only=False)["args"]
    assert (args["pn"], args["vae_ckpt"]) == ("1_2_4", str(setup / "vae.pth"))

    moved = tmp_path / "moved"  # the cache on another machine, its tokenizer elsewhere
    shutil.copytree(centre_cache, moved)
    manifest = read_manifest(moved)
    write_json(moved / "manifest.json", {**manifest, "vae_ckpt": str(tmp_path / "elsewhere.pth")})
    env = {**SUBPROCESS_ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), f"--tokens={moved}", "--depth=1",
                           f"--local_out_dir_path={tmp_path / 'out2'}"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"was extracted with --vae_ckpt={tmp_path / 'elsewhere.pth'} --pn=1_2_4: pass the same to train.py" in \
        proc.stderr


def test_training_from_a_centre_crop_cache_equals_training_from_the_images(setup, centre_cache):
    """Loss for loss and weight for weight (torch.equal), validation included: the cache's val split is the centre
    view VAR's validation transform takes. A SIGKILL after the first mid-epoch checkpoint resumes bit-exactly."""
    images = launch(REPO / "train.py", *train_flags(setup, setup / "from_images", f"--data_path={setup / 'data'}"),
                    nproc=1).stdout
    tokens = launch(REPO / "train.py", *train_flags(setup, setup / "from_tokens", f"--tokens={centre_cache}"),
                    nproc=1).stdout
    assert "training from the token cache" in tokens
    assert logged_losses(images) == logged_losses(tokens) and len(logged_losses(tokens)) == 12
    val = [line.split("val: ")[1] for line in images.splitlines() if " val: " in line]
    assert val and val == [line.split("val: ")[1] for line in tokens.splitlines() if " val: " in line]
    ref = model_state(setup / "from_images" / LAST)
    assert all(torch.equal(v, model_state(setup / "from_tokens" / LAST)[k]) for k, v in ref.items())

    killed = setup / "tokens_killed"
    cmd = launch_cmd(REPO / "train.py", *train_flags(setup, killed, f"--tokens={centre_cache}"))
    proc, _ = interrupt(cmd, KILL_AFTER_FIRST_SAVE, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    resumed = launch(REPO / "train.py", *train_flags(setup, killed, f"--tokens={centre_cache}"), nproc=1).stdout
    assert "resumed from" in resumed
    assert all(logged_losses(tokens)[k] == v for k, v in logged_losses(resumed).items())
    assert all(torch.equal(v, model_state(killed / LAST)[k]) for k, v in ref.items())

    stale = launch(REPO / "train.py", *train_flags(setup, setup / "stale", f"--tokens={centre_cache}", "--pn=1_2"),
                   nproc=1, check=False)
    assert stale.returncode != 0 and stale.stderr.strip().splitlines()[-1] == (
        f"error: the token cache {centre_cache} was made for other settings: the patch schedule (--pn): cache "
        f"[1, 2, 4], this run [1, 2]; the resolution: cache 8, this run 4")


def test_a_cache_of_another_tokenizer_or_classes_is_refused_naming_it(setup, centre_cache):
    vae, _ = build_tiny_mvar(patch_nums=(1, 2, 4))
    manifest = open_cache(centre_cache, {"tokenizer_digest": tokenizer_digest(vae), "patch_nums": [1, 2, 4]})
    assert manifest["splits"]["train"]["images"] == 24
    with torch.no_grad():
        vae.quantize.embedding.weight.add_(0.01)
    with pytest.raises(TokenCacheError, match=r"the tokenizer \(weights digest of --vae_ckpt\): cache '[0-9a-f]+'"):
        open_cache(centre_cache, {"tokenizer_digest": tokenizer_digest(vae)})
    with pytest.raises(TokenCacheError, match=r"the class names: only in the cache: class2 \(1\); only in this run: "
                                              r"classX \(1\)$"):
        open_cache(centre_cache, {"classes": ["class0", "class1", "classX"]})
    with pytest.raises(TokenCacheError, match=r"the class names: only in the cache: class2 \(1\)$"):  # fewer classes
        open_cache(centre_cache, {"classes": ["class0", "class1"]})
    with pytest.raises(TokenCacheError, match=r"the class names: the same names in another order$"):
        open_cache(centre_cache, {"classes": ["class1", "class0", "class2"]})


def test_extraction_warns_that_limit_keeps_the_first_classes_and_training_says_it_again(setup, tmp_path, caplog):
    """A review: nothing said, when training, that a cache held only the first --limit images, or that unreadable
    images were left out of it; train.py warns of both, from the manifest."""
    import train

    proc = launch(EXTRACT, *extract_flags(setup, tmp_path / "cache", "--limit=3"), nproc=1)
    assert "--limit (train)=3 keeps the data set's first 3 images, which cover 1 of its 3 classes" in proc.stderr
    manifest = read_manifest(tmp_path / "cache")
    assert manifest["limit"] == 3 and manifest["splits"]["train"]["images"] == 3
    vae, _ = build_tiny_mvar(patch_nums=(1, 2, 4))
    args = SimpleNamespace(tokens=str(tmp_path / "cache"), data_path="", dataset="mnist", eval_every=0, mid_reso=1.0,
                           fmnist_dir="", val_limit=0, train_limit=0, patch_nums=(1, 2, 4), hflip=False)
    train.build_data(args, vae, reso=8)
    assert f"the token cache holds only the first 3 images of its train and val split(s) of {setup / 'data'} " \
           f"(extracted with --limit=3)" in caplog.text
    assert manifest["splits"]["train"]["source_images"] == len(list((setup / "data" / "train").rglob("*.png"))) > 3
    short_val = {**manifest, "splits": {**manifest["splits"], "val": {"images": 2}}}  # fewer than --limit: all of it
    assert "only the first 3 images of its train split(s)" in gaps(short_val)[0]
    whole_val = {**manifest, "splits": {**manifest["splits"], "val": {"images": 3, "source_images": 3}}}
    assert "only the first 3 images of its train split(s)" in gaps(whole_val)[0]  # as many as --limit, none cut
    old_format = {**manifest, "splits": {s: {"images": 3} for s in manifest["splits"]}}  # no source_images recorded
    assert "of its train and val split(s)" in gaps(old_format)[0]
    manifest["splits"]["val"]["skipped"] = [0, 2]
    assert gaps({**manifest, "limit": 0}) == [f"2 val image(s) of {setup / 'data'} were unreadable at extraction "
                                              f"and are left out (their indices: manifest.json, splits.val.skipped)"]


def test_ranks_compare_what_their_caches_ids_are(setup, centre_cache, tmp_path):
    """A review: with node-local caches the ranks compared only their size and classes, so a node's cache of other
    views, crops (--seed) or image files trained silently beside the others. The ranks compare a digest of what the
    ids are, which copies made from other paths or over another number of ranks share."""
    manifest = read_manifest(centre_cache)
    same = content_digest(manifest)
    elsewhere = {**manifest, "source": "/node1/imagenet", "batch": 7,
                 "splits": {s: {**i, "shards": [[0, 1], [1, i["images"]]]} for s, i in manifest["splits"].items()}}
    assert content_digest(elsewhere) == same
    for change in ({"seed": 1}, {"views": ["center_flip"]}, {"tf32": True}, {"tokenizer_digest": "0"},
                   {"files": {**manifest["files"], "train": "0"}},
                   {"splits": {**manifest["splits"], "val": {**manifest["splits"]["val"], "skipped": [1]}}},
                   {"splits": {**manifest["splits"], "train": {**manifest["splits"]["train"], "images": 5}}}):
        assert content_digest({**manifest, **change}) != same, change

    copy = tmp_path / "node1"  # rank 1's node extracted its copy with another --seed (same size, classes, views)
    shutil.copytree(centre_cache, copy)
    write_json(copy / "manifest.json", {**manifest, "seed": 1})
    wrapper = tmp_path / "per_rank.py"
    wrapper.write_text(PER_RANK.format(repo=str(REPO), train=str(REPO / "train.py"), flag_1=f"--tokens={copy}",
                                       extra_1=[]))
    proc = launch(wrapper, *train_flags(setup, tmp_path / "out", f"--tokens={centre_cache}"), nproc=2, check=False,
                  timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "the ranks do not train alike" in out, out[-3000:]
    assert re.search(r"the token cache \(digest of what its ids are\): rank 0: '[0-9a-f]{64}'; rank 1: '[0-9a-f]{64}'",
                     out), out[-3000:]
    assert "the training images:" not in out and "ep 1/" not in out  # equal sizes: the digest alone tells them apart


def test_the_content_digest_does_not_depend_on_the_manifests_key_order():
    """Ranks compare node-local caches by content_digest: the same content written in another key order (by
    another version of extract_tokens.py, or a tool that rewrote the JSON) is the same cache. A digest of the JSON
    as ordered passed the suite (a review of the mutants)."""
    manifest = {"format": 1, "tokenizer_digest": "abc", "patch_nums": [1, 2], "reso": 4, "mid_reso": 1.0,
                "views": ["center"], "classes": ["a", "b"], "L": 5, "seed": 0, "tf32": False,
                "files": {"train": "1", "val": "2"}, "complete": True,
                "splits": {"train": {"images": 3, "views": ["center"], "shards": [[0, 3]], "skipped": [1]},
                           "val": {"images": 2, "views": ["center"], "shards": [[0, 2]], "skipped": []}}}
    reordered = {k: manifest[k] for k in reversed(manifest)}
    reordered["splits"] = {s: {k: i[k] for k in reversed(i)} for s, i in reversed(manifest["splits"].items())}
    reordered["files"] = {"val": "2", "train": "1"}
    assert json.dumps(reordered) != json.dumps(manifest)
    assert content_digest(reordered) == content_digest(manifest)


def test_tokens_with_data_path_read_trains_class_folders_not_its_images(setup, centre_cache, tmp_path):
    """A review: validating a token-cache run on --data_path's val/ images listed all of train/ (1.28M files of
    ImageNet, on every rank) for its class names. train/ needs its class folders only; they must still be val/'s."""
    import train

    data = tmp_path / "data"
    shutil.copytree(setup / "data", data)
    for image in (data / "train").rglob("*.png"):
        image.unlink()
    vae, _ = build_tiny_mvar(patch_nums=(1, 2, 4))
    args = SimpleNamespace(tokens=str(centre_cache), data_path=str(data), dataset="mnist", eval_every=0, mid_reso=1.0,
                           fmnist_dir="", val_limit=0, train_limit=0, patch_nums=(1, 2, 4), hflip=False)
    num_classes, train_set, val_set, eval_images, _ = train.build_data(args, vae, reso=8)
    assert num_classes == 3 and len(train_set) == 24 and len(val_set) == 6 and val_set is eval_images
    (data / "train" / "class2").rename(data / "train" / "class9")
    with pytest.raises(DataError, match=r"train/ and val/ must have the same class folders; only in train/: class9"):
        train.build_data(args, vae, reso=8)
    shutil.rmtree(data / "train")
    with pytest.raises(FileNotFoundError, match=r"--data_path: folder .*train does not exist"):
        train.build_data(args, vae, reso=8)


def test_a_cache_validated_on_another_data_sets_images_is_refused_and_its_limits_warn(setup, centre_cache, tmp_path,
                                                                                     caplog):
    """A review: with --tokens and --data_path only the class names were compared, so a data set with the same class
    folders (ImageNet's wnids, digits) validated and scored a run that trained on another; and --train_limit or
    --val_limit on a cache kept its first classes without the warning the images path gives."""
    import train

    args = SimpleNamespace(tokens=str(centre_cache), data_path=str(tmp_path / "other"), dataset="mnist",
                           eval_every=0, mid_reso=1.0, fmnist_dir="", val_limit=0, train_limit=0, patch_nums=(1, 2, 4),
                           hflip=False)
    vae, _ = build_tiny_mvar(patch_nums=(1, 2, 4))
    shutil.copytree(setup / "data", tmp_path / "other")  # a copy elsewhere is the same data set
    assert len(train.build_data(args, vae, reso=8)[2]) == 6
    (tmp_path / "other" / "val" / "class0" / "1.png").rename(tmp_path / "other" / "val" / "class0" / "7.png")
    with pytest.raises(TokenCacheError, match=r"--data_path=.*other: its val/ images are not those of the data set "
                                              r"the token cache .*centre was extracted from \(.*data; "):
        train.build_data(args, vae, reso=8)
    args.data_path, args.train_limit, args.val_limit = "", 8, 2
    train.build_data(args, vae, reso=8)
    for flag, n in (("--train_limit", 8), ("--val_limit", 2)):
        assert f"{flag}={n} keeps the data set's first {n} images, which cover 1 of its 3 classes" in caplog.text


def test_pn_defaults_to_the_schedule_the_tokenizer_was_trained_at(setup, tmp_path):
    """A walkthrough: a tokenizer of ours trained at 1_2_3_4 (16 px), given without --pn, was run at VAR's 256
    schedule (64 px, 680 tokens) by train.py and extract_tokens.py, unsaid. It records its schedule: that is the
    default now; VAR's raw tokenizer records none (256), and a --pn given wins."""
    from models.presets import PATCH_NUMS
    from utils.flags import finalize_args, parse_args

    def schedule(*flags: str) -> tuple[int, ...]:
        return tuple(finalize_args(parse_args(["--dataset=mnist", *flags]), world_size=1).patch_nums)

    assert schedule(f"--vae_ckpt={setup / 'vae.pth'}") == (1, 2, 4)
    assert schedule(f"--vae_ckpt={setup / 'vae.pth'}", "--pn=1_2_3_4") == (1, 2, 3, 4)
    torch.save(load_vae(setup / "vae.pth").state_dict(), tmp_path / "raw.pth")
    assert schedule(f"--vae_ckpt={tmp_path / 'raw.pth'}") == tuple(PATCH_NUMS[256])
    flags = [f for f in extract_flags(setup, tmp_path / "cache", "--limit=2") if not f.startswith("--pn=")]
    launch(EXTRACT, *flags, nproc=1)
    assert read_manifest(tmp_path / "cache")["patch_nums"] == [1, 2, 4]


def test_extraction_refuses_val_class_folders_other_than_trains_before_extracting(setup, tmp_path):
    """Each split's labels index its own sorted class folders, and the manifest says they mean train/'s: a val/
    without class1 would store class2's images as class1. (The tokenizer and --out are checked before; --out is
    probed, not made.)"""
    shutil.copytree(setup / "data", tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "val" / "class1")
    proc = launch(EXTRACT, *extract_flags(setup, tmp_path / "cache", data=tmp_path / "data"), nproc=1, check=False)
    assert proc.returncode == 1
    assert "error: --data_path=" in proc.stderr and "same class folders; only in train/: class1 (1)" in proc.stderr
    assert not (tmp_path / "cache").exists()  # probed, not made


def test_an_out_that_is_a_file_and_a_vae_ckpt_that_is_no_checkpoint_are_one_error_line(setup, tmp_path):
    """A review: --out naming a file (or a path under one) ended in a FileExistsError / NotADirectoryError traceback
    from mkdir, after the images were listed and the tokenizer loaded; a --vae_ckpt that is no torch file in a
    CheckpointError traceback."""
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "image.png").write_bytes(b"not a checkpoint")
    for out, vae, says in ((tmp_path / "file", setup / "vae.pth", f"error: --out={tmp_path / 'file'}: cannot write"),
                           (tmp_path / "file" / "sub", setup / "vae.pth", f"error: --out={tmp_path / 'file' / 'sub'}"),
                           (tmp_path / "cache", tmp_path / "image.png", "error: checkpoint")):
        proc = launch(EXTRACT, *extract_flags(setup, out, f"--vae_ckpt={vae}"), nproc=1, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert says in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "file").read_text() == "not a folder"
    assert not (tmp_path / "cache").exists()  # probed, not made: the failed extraction leaves no empty folder


def test_a_shard_other_than_its_manifest_plans_is_damaged(centre_cache, tmp_path):
    """Rows or labels the manifest does not plan (a shard of another data set) are refused, not trained on: a label
    past the classes would be read as the unconditional class."""
    copy = tmp_path / "cache"
    shutil.copytree(centre_cache, copy)
    ids, labels = (copy / "train" / f"shard-00000-of-00001.{kind}.npy" for kind in ("ids", "labels"))
    np.save(ids, np.load(ids)[:23])  # a row fewer than planned
    with pytest.raises(TokenCacheError, match=r"holds ids \(23, 1, 21\) and 24 labels up to 2; its manifest plans ids "
                                              r"\(24, 1, 21\)"):
        TokenDataset(copy, read_manifest(copy), "train")
    shutil.copy(centre_cache / ids.relative_to(copy), ids)
    np.save(labels, np.append(np.load(labels), 1).astype(np.int32))  # one row more than planned
    with pytest.raises(TokenCacheError, match=r"damaged: shard-00000-of-00001 holds ids \(24, 1, 21\) and 25 labels "
                                              r"up to 2; its manifest plans ids \(24, 1, 21\) and labels below 3"):
        TokenDataset(copy, read_manifest(copy), "train")
    np.save(labels, np.full(24, 3, dtype=np.int32))  # class 3 of a 3-class cache
    with pytest.raises(TokenCacheError, match="24 labels up to 3; its manifest plans"):
        TokenDataset(copy, read_manifest(copy), "train")


def test_evaluating_from_a_cache_without_data_path_takes_the_embedded_images_of_its_classes(setup, centre_cache):
    """--eval_every scores generated images against real ones: without --data_path they are the embedded --dataset's
    validation images (scripts/study.py trains so), refused before training when its classes are not the cache's."""
    proc = launch(REPO / "train.py", *train_flags(setup, setup / "eval_mnist", f"--tokens={centre_cache}",
                                                  "--dataset=mnist", "--eval_every=1", "--eval_n=4"),
                  nproc=1, check=False)
    assert proc.returncode != 0 and "ep 1/" not in proc.stdout
    assert re.search(r"error: the token cache .* was made for other settings: the class names: only in the cache: "
                     r"class0, class1, class2 \(3\); only in this run: 0, 1, 2, 3, 4, ... \(10\)", proc.stderr)
    assert "the embedded --dataset=mnist's: for a cache of an image folder, pass --data_path" in proc.stderr


def test_val_images_beside_a_cache_are_cropped_at_the_caches_mid_reso(setup, centre_cache, caplog):
    """With --tokens, --mid_reso does not apply to training (the cache's crops were made at its own): the val/ and
    --eval_every images must be cropped alike, or validation measures another crop than training sees."""
    import train

    vae, _ = build_tiny_mvar(patch_nums=(1, 2, 4))
    args = SimpleNamespace(tokens=str(centre_cache), data_path=str(setup / "data"), dataset="mnist", eval_every=0,
                           mid_reso=2.0, fmnist_dir="", val_limit=0, train_limit=0, patch_nums=(1, 2, 4), hflip=True)
    _, _, val_set, eval_images, _ = train.build_data(args, vae, reso=8)
    assert read_manifest(centre_cache)["mid_reso"] == 1.0
    assert val_set is eval_images and val_set.transform.transforms[0].size == 8  # 1.0 x 8 px, not 2.0 x 8
    assert "--hflip does not apply to a token cache, and this one has no flipped views" in caplog.text


def test_the_manifest_records_whether_the_ids_were_encoded_with_tf32(centre_cache):
    """--tf32 (on by default, as train.py's) acts on CUDA only: a cache made on the CPU says it had none."""
    assert read_manifest(centre_cache)["tf32"] is False
    from scripts.extract_tokens import build_parser

    assert build_parser().parse_args(["--out=x"]).tf32 and not build_parser().parse_args(["--out=x", "--no-tf32"]).tf32


def test_an_unfinished_extraction_resumes_only_with_the_same_tf32_and_batch(centre_cache, tmp_path):
    """A review: a relaunch with another --tf32 (or on the CPU after CUDA) continued, mixing ids encoded two ways
    under a manifest naming one; a finished cache has nothing left to encode. Another --batch cuts other chunks:
    refused for an unfinished cache only (a review: a finished one was refused too)."""
    out = tmp_path / "cache"
    shutil.copytree(centre_cache, out)
    manifest = read_manifest(out)
    assert start(out, {**manifest, "tf32": True, "batch": manifest["batch"] + 1})  # complete: any setting
    with pytest.raises(TokenCacheError, match="--seed"):  # but its rand<i> crops follow the seed
        start(out, {**manifest, "seed": manifest["seed"] + 1})
    write_json(out / "manifest.json", {**manifest, "complete": False})
    with pytest.raises(TokenCacheError, match=r"TF32 \(--tf32 on CUDA\): cache False, this run True"):
        start(out, {**manifest, "complete": False, "tf32": True})
    with pytest.raises(TokenCacheError, match="--batch"):
        start(out, {**manifest, "complete": False, "batch": manifest["batch"] + 1})
    assert not start(out, {**manifest, "complete": False})


def test_only_an_unfinished_extraction_must_be_relaunched_on_as_many_ranks(tmp_path):
    """A relaunch on another number of ranks cuts other shards: refused while the cache is unfinished (the ranks
    would continue in other ranges than their progress files count), not once it is complete (it serves any number
    of ranks). Comparing the shards never, or always, passed the fast tests (a review of the mutants)."""
    identity = {"tokenizer_digest": "abc", "patch_nums": [1, 2, 4], "reso": 8, "mid_reso": 1.0, "views": ["center"],
                "classes": ["a", "b"]}
    args = SimpleNamespace(seed=0, batch=2, limit=0, data_path="/data", dataset="")
    one, two = ({**plan(args, identity, {"train": 8, "val": 4}, world=w), "tf32": False, "files": None}
                for w in (1, 2))
    assert not start(tmp_path, one)  # writes the manifest of a 1-rank extraction
    with pytest.raises(TokenCacheError, match=re.escape("the images or ranks: cache /data: train 8 images x 1 view(s) "
                                                        "in 1 shard(s), val 4 images x 1 view(s) in 1 shard(s), this "
                                                        "run /data: train 8 images x 1 view(s) in 2 shard(s)")):
        start(tmp_path, two)
    write_json(tmp_path / "manifest.json", {**one, "complete": True})
    assert start(tmp_path, two)


def test_shard_files_take_their_disk_space_when_created(tmp_path, monkeypatch):
    """A review: the shards were sparse memory maps, so a full disk killed the extraction with SIGBUS at a later
    write, naming nothing. Their blocks are reserved up front; a full disk then says which file and what to do."""
    writer = ShardWriter(tmp_path, "train", 0, 1, [0, 100], K=2, L=21)
    ids = tmp_path / "train" / f"{shard_name(0, 1)}.ids.npy"
    assert ids.stat().st_blocks * 512 >= ids.stat().st_size > 2 * 100 * 2 * 21 and writer.next == 0

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(TokenCacheError, match=r"disk full: cannot write shard-.*\.ids\.npy .*choose another --out"):
        ShardWriter(tmp_path, "val", 0, 1, [0, 100], K=1, L=21)


NO_IMAGES = "--data_path: expected an ImageFolder root with train/ and val/ class folders (ImageNet's layout); for " \
    "an embedded data set instead, name it: --dataset=mnist|imagenet20|fmnist"


def extraction_refusal(tmp_path: Path, *flags: str) -> str:
    """The ValueError extract_tokens.main raises for `flags` (dist.initialize stubbed by the caller)."""
    from scripts.extract_tokens import build_parser, main

    with pytest.raises(ValueError) as e:
        main(build_parser().parse_args([f"--out={tmp_path / 'cache'}", *flags]))
    return str(e.value)


def test_bad_extraction_flags_are_named_before_any_work(tmp_path, monkeypatch):
    """Each flag below its lowest value is named (and no flag at it: --workers=0, the default, is valid); the ranks
    wait for each other a day at the end, not the default 30 minutes (a review: ranks hours apart timed out just
    before the cache was marked complete)."""
    import dist

    waits = []
    monkeypatch.setattr(dist, "initialize", lambda timeout_min=30.0: waits.append(timeout_min) or torch.device("cpu"))
    assert extraction_refusal(tmp_path, "--batch=0", "--encode_batch=0", "--workers=-1", "--mid_reso=0.5",
                              "--limit=-1") == "--batch must be >= 1, got 0; --encode_batch must be >= 1, got 0; " \
        "--workers must be >= 0, got -1; --limit must be >= 0, got -1; --mid_reso=0.5: expected a finite number " \
        ">= 1 (the shorter side is resized to mid_reso x the image size, then cropped to the image size); " + NO_IMAGES
    assert waits == [24 * 60]
    for bad in ("inf", "nan"):  # a review: they passed, and failed on every image inside the loader's workers
        assert extraction_refusal(tmp_path, f"--mid_reso={bad}").startswith(f"--mid_reso={bad}: expected a finite")
    assert extraction_refusal(tmp_path, "--batch=1", "--encode_batch=1", "--workers=0", "--mid_reso=1",
                              "--limit=0") == NO_IMAGES  # it used to read MNIST
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("flags, message", [
    (["--views=rand0", "--seed=-1"], "--seed=-1: expected 0 <= seed < 2\\*\\*40"),  # train.py refuses it too
    (["--out="], "--out=: expected a cache folder \\(an empty path would be the current folder\\)"),
    (["--vae_ckpt="], "--vae_ckpt=: expected a tokenizer file"),
    (["--pn=abc"], "--pn=abc: bad patch schedule 'abc'"),
])
def test_bad_seed_and_empty_paths_are_refused(flags, message, setup, tmp_path, monkeypatch):
    """A review: a negative seed drew the rand<i> crops (train.py refuses it), an empty --out wrote the cache into
    the current folder."""
    import dist
    import scripts.extract_tokens as extract_tokens

    monkeypatch.setattr(dist, "initialize", lambda timeout_min=30.0: torch.device("cpu"))
    monkeypatch.setattr(extract_tokens, "open_split", lambda *a, **k: pytest.fail("images listed before the check"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        extract_tokens.main(extract_tokens.build_parser().parse_args(
            extract_flags(setup, tmp_path / "cache", *flags)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("problem", ["missing", "unreadable", "out under a file"])
def test_the_tokenizer_and_out_are_checked_before_the_images_are_listed(problem, setup, tmp_path, monkeypatch):
    """A review: a missing or unreadable --vae_ckpt and an unwritable --out were found only after both splits were
    listed (minutes on ImageNet)."""
    import dist
    import scripts.extract_tokens as extract_tokens
    from models.loading import CheckpointError
    from utils.run.checkpoint import OutputFolderError

    monkeypatch.setattr(dist, "initialize", lambda timeout_min=30.0: torch.device("cpu"))
    monkeypatch.setattr(extract_tokens, "open_split", lambda *a, **k: pytest.fail("images listed before the check"))
    (tmp_path / "file").write_bytes(b"not a checkpoint")
    vae, out = setup / "vae.pth", tmp_path / "cache"
    error, message = {"missing": (FileNotFoundError, "--vae_ckpt=.*nope.pth: no such file"),
                      "unreadable": (CheckpointError, "checkpoint .*file is unreadable"),
                      "out under a file": (OutputFolderError, "--out=.*file/cache: cannot write into")}[problem]
    if problem == "missing":
        vae = tmp_path / "nope.pth"
    elif problem == "unreadable":
        vae = tmp_path / "file"
    else:
        out = tmp_path / "file" / "cache"
    flags = [f if not f.startswith("--vae_ckpt=") else f"--vae_ckpt={vae}" for f in extract_flags(setup, out)]
    with pytest.raises(error, match=message):
        extract_tokens.main(extract_tokens.build_parser().parse_args(flags))


def test_a_tokenizer_whose_ids_overflow_uint16_is_refused(setup, tmp_path, monkeypatch):
    """The shards store uint16 ids: a tokenizer of more than 65,536 codes would have its ids wrapped silently."""
    import dist
    import scripts.extract_tokens as extract_tokens

    monkeypatch.setattr(dist, "initialize", lambda timeout_min=30.0: torch.device("cpu"))
    monkeypatch.setattr(extract_tokens, "load_vae", lambda *a, **kw: SimpleNamespace(vocab_size=2**16 + 1))
    assert extraction_refusal(tmp_path, f"--data_path={setup / 'data'}") == \
        "the tokenizer's vocabulary (65537) does not fit uint16 ids"


def test_resuming_images_from_tokens_mid_epoch_is_refused():
    old = {"classes": ["a"], "train_images": 8, "tokens": None}
    new = {**old, "tokens": ["center"]}
    assert "trained from the images, this run from the token cache's views ['center']" in \
        data_problems(old, new, mid_epoch=True)[0]
    assert data_problems(old, new, mid_epoch=False) == [] and data_problems({**old, "tokens": None}, old, True) == []
    assert data_problems({"classes": ["a"], "train_images": 8}, old, True) == []  # older checkpoints: images


def test_extraction_killed_and_relaunched_is_byte_identical_and_skips_unreadable_images(setup):
    flags = ("--views=rand0,rand1,tencrop", "--mid_reso=1.5", "--log_every=1")
    first = launch(EXTRACT, *extract_flags(setup, setup / "whole", *flags, data="broken"), nproc=1)
    assert f"skipping unreadable image {setup / 'broken' / 'train' / 'class1' / '3.png'}" in first.stderr
    whole = cache_files(setup / "whole")
    manifest = read_manifest(setup / "whole")
    assert manifest["complete"] and manifest["splits"]["train"]["skipped"] == [11]  # class1/3.png
    assert len(manifest["views"]) == 12 and manifest["splits"]["val"]["views"] == ["center"]
    ids, labels = all_ids(setup / "whole", "train")
    assert ids.shape == (23, 12, 21) and labels == [0] * 8 + [1] * 7 + [2] * 8
    assert not np.array_equal(ids[:, 0], ids[:, 1]) and not np.array_equal(ids[:, 6], ids[:, 11])  # rand1, flip
    again = launch(EXTRACT, *extract_flags(setup, setup / "whole", *flags, data="broken"), nproc=1)  # finished
    assert "is complete already: nothing to do" in again.stderr and cache_files(setup / "whole") == whole

    cmd = launch_cmd(EXTRACT, *extract_flags(setup, setup / "killed", *flags, data="broken"))
    proc, _ = interrupt(cmd, r"train: committed 2/24", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not read_manifest(setup / "killed")["complete"]
    launch(EXTRACT, *extract_flags(setup, setup / "killed", *flags, data="broken"), nproc=1)
    assert cache_files(setup / "killed") == whole

    stale = setup / "no_manifest"  # its manifest deleted (after a refusal, say): the shards' settings are unknown
    shutil.copytree(setup / "killed", stale)
    (stale / "manifest.json").unlink()
    with pytest.raises(TokenCacheError, match=r"holds shard files \((train|val)/shard-00000-of-00001.*but no manifest"):
        start(stale, read_manifest(setup / "killed"))
    assert not (stale / "manifest.json").exists()

    killed = read_manifest(setup / "killed")
    # a copy of the images elsewhere (staged to a job's local disk, say) continues it: their file lists agree (a
    # review: the source's path was compared too, and refused the relaunch)
    assert killed["files"]["train"] is not None and start(setup / "killed", {**killed, "source": "/staged/copy"})
    one_view = {s: {**i, "views": ["center"]} for s, i in killed["splits"].items()}  # as a relaunch with --views
    for change, message in (({"views": ["center"], "splits": one_view}, "the views (--views): cache ['rand0', "),
                            ({"seed": -1}, "--seed: cache "),  # its rand<i> crops (--batch only splits chunks)
                            ({"splits": {}}, "the images or ranks: cache "),
                            ({"files": {**killed["files"], "val": "0"}}, "the image files (digest of their paths")):
        with pytest.raises(TokenCacheError, match=re.escape(f"{setup / 'killed'} holds an extraction of other "
                                                            f"settings ({message}")) as refused:
            start(setup / "killed", {**read_manifest(setup / "killed"), **change})  # a relaunch with other flags
        sides = re.search(r"the images or ranks: cache (.*?), this run (.*?)(?:; |\): relaunch)", str(refused.value))
        assert sides is None or sides.group(1) != sides.group(2), str(refused.value)  # a walkthrough: views unsaid


# rank 1 commits each chunk 0.3 s late, looking first whether the manifest says complete already: rank 0 completes it
# only after every rank committed its shards (a barrier; without it rank 0 read rank 1's unwritten val progress)
SLOW_RANK_1 = """import json, os, runpy, sys, time
sys.path.insert(0, {repo!r})
if os.environ["LOCAL_RANK"] == "1":
    from utils.data import token_cache
    commit = token_cache.ShardWriter.commit
    def late_commit(self, *args):
        time.sleep(0.3)
        if json.loads(open({manifest!r}).read())["complete"]:
            print("rank 1: the manifest says complete before my commit", flush=True)
        commit(self, *args)
    token_cache.ShardWriter.commit = late_commit
runpy.run_path({extract!r}, run_name="__main__")
"""


def test_two_rank_extraction_equals_one_rank(setup, centre_cache, tmp_path):
    wrapper = tmp_path / "slow_rank_1.py"
    wrapper.write_text(SLOW_RANK_1.format(repo=str(REPO), manifest=str(setup / "two_ranks" / "manifest.json"),
                                          extract=str(EXTRACT)))
    proc = launch(wrapper, *extract_flags(setup, setup / "two_ranks"), nproc=2)
    assert "token cache" in proc.stderr and "complete before my commit" not in proc.stdout, proc.stdout[-2000:]
    assert (setup / "two_ranks" / "train" / "shard-00001-of-00002.ids.npy").is_file()
    for split in ("train", "val"):
        ids_1, labels_1 = all_ids(centre_cache, split)
        ids_2, labels_2 = all_ids(setup / "two_ranks", split)
        assert np.array_equal(ids_1, ids_2) and labels_1 == labels_2
    again = launch(EXTRACT, *extract_flags(setup, setup / "two_ranks"), nproc=1)  # a finished cache, on 1 rank
    assert "is complete already: nothing to do" in again.stderr


class FirstPixelTokenizer(torch.nn.Module):
    """A stand-in encoder whose ids name their image: scale 0 its first pixel p, scale 1 (p, 2p); `sizes` records
    the batch of each call."""

    def __init__(self):
        super().__init__()
        self.w, self.sizes = torch.nn.Parameter(torch.zeros(1)), []

    def img_to_idxBl(self, x):
        self.sizes.append(len(x))
        first = x[:, 0, 0, :1].long()
        return [first, torch.cat([first, 2 * first], dim=1)]


def test_the_encoder_takes_encode_batch_views_at_a_time():
    """--encode_batch bounds the encoder's batch (tencrop at --batch=64 is 640 views, about 155 GB at 256 px); the
    ids come back in order whatever it is, above 255 too (a 4096-code tokenizer's ids need uint16)."""
    from scripts.extract_tokens import encode

    views_NK3HW = 1000 * torch.arange(5 * 2, dtype=torch.float32).view(5, 2, 1, 1, 1).expand(5, 2, 3, 4, 4)
    expected = 1000 * np.stack([[[2 * n + k, 2 * n + k, 4 * n + 2 * k] for k in range(2)] for n in range(5)])
    for encode_batch, sizes in ((1, [1] * 10), (3, [3, 3, 3, 1]), (64, [10])):
        stub = FirstPixelTokenizer()
        assert np.array_equal(encode(stub, views_NK3HW, encode_batch), expected) and stub.sizes == sizes


def test_a_view_named_twice_is_refused():
    """A review: rand01 passed as another view than rand1, and stored the same crop twice."""
    for spec in ("rand1,rand01", "center,tencrop"):
        with pytest.raises(ValueError, match="--views="):
            parse_views(spec)
    assert parse_views("rand0,rand10,center_flip") == ["rand0", "rand10", "center_flip"]


def test_views_follow_the_seed():
    """Each epoch draws one view per image from the item's seed; the draws cover the views evenly."""
    counts = np.bincount([pick_view(s, 10) for s in range(10_000)], minlength=10)
    assert counts.min() > 900 and pick_view(123, 10) == pick_view(123, 10)


def test_the_view_of_a_seed_is_splitmix64s_output():
    """pick_view is splitmix64's output for the state `seed` (its published first outputs from state 0), so a run
    resumed under this code takes the views it took before: a finaliser with a shift or a 64-bit mask changed
    (a review of the mutants) still covered the views evenly and passed the suite."""
    assert pick_view(0, 2**64) == 0xE220A8397B1DCDAF and pick_view(0x9E3779B97F4A7C15, 2**64) == 0x6E789E6AA1B965F4
    assert [pick_view(s, 10) for s in range(8)] == [5, 5, 0, 3, 8, 8, 2, 7]
    assert [pick_view(s, 3) for s in range(8)] == [1, 2, 1, 0, 1, 2, 2, 0]


def ids_of(i: int, K: int = 2, L: int = 3) -> np.ndarray:
    """Image i's ids (K, L) in a hand-written shard: view v holds 100 * i + 10 * v + (0..L)."""
    return (100 * i + 10 * np.arange(K)[:, None] + np.arange(L)).astype(np.uint16)


def test_an_item_takes_the_view_its_seed_picks(tmp_path):
    """A cache of several views (tencrop, rand<n>) trains each item on view pick_view(seed), not on the first view
    only: a 2-view split written by hand, view v of image i holding ids_of(i)."""
    L, N = 5, 3
    (tmp_path / "train").mkdir()
    stem = tmp_path / "train" / shard_name(0, 1)
    np.save(stem.with_suffix(".ids.npy"), np.stack([ids_of(i, L=L) for i in range(N)]))
    np.save(stem.with_suffix(".labels.npy"), np.array([0, 1, 0], dtype=np.int32))
    manifest = {"L": L, "classes": ["a", "b"], "splits": {"train": {"shards": [[0, N]], "views": ["center", "rand0"]}}}
    ds = TokenDataset(tmp_path, manifest, "train")
    picked = set()
    for i in range(N):
        for seed in range(8):
            view = pick_view(seed, 2)
            picked.add(view)
            ids_L, label = ds[(i, seed)]
            assert torch.equal(ids_L, torch.arange(L) + 100 * i + 10 * view) and label == [0, 1, 0][i], (i, seed)
        assert torch.equal(ds[i][0], torch.arange(L) + 100 * i)  # a plain index: the first view
    assert picked == {0, 1}


def test_a_limited_split_takes_the_samplers_items(centre_cache):
    """--train_limit keeps the first images; items are the sampler's (index, seed) pairs or plain indices."""
    ds = TokenDataset(centre_cache, read_manifest(centre_cache), "train", limit=5)
    assert len(ds) == 5 and ds.targets == [0] * 5
    ids_L, label = ds[(4, 123)]
    assert ids_L.dtype == torch.int64 and ids_L.shape == (21,) and torch.equal(ids_L, ds[4][0]) and label == 0


def test_a_limit_that_leaves_out_only_the_last_image_warns_when_its_class_goes(tmp_path, caplog):
    """--train_limit=2 of images of classes 0, 1, 2 (the last one alone in its class) keeps 2 of the 3 classes:
    warned, naming the flag, as for any limit; a limit of all the images is not. A review of the mutants: a
    warning skipped for a limit one short of the split passed the suite."""
    commit(ShardWriter(tmp_path, "train", 0, 1, [0, 3], K=2, L=3), 0, 3)
    manifest = split_manifest([[0, 3]], ["a", "b", "c"])
    ds = TokenDataset(tmp_path, manifest, "train", limit=2, limit_flag="--train_limit")
    assert ds.targets == [0, 1]
    assert "--train_limit=2 keeps the data set's first 2 images, which cover 2 of its 3 classes" in caplog.text
    caplog.clear()
    assert len(TokenDataset(tmp_path, manifest, "train", limit=3, limit_flag="--train_limit")) == 3
    assert "keeps the data set's first" not in caplog.text


def test_a_split_pickles_without_its_ids_for_spawned_loader_workers(centre_cache):
    """Loader workers started by spawn or forkserver (Python 3.14's default on Linux) get the data set pickled: a
    pickled memmap is a copy of its array (a review: gigabytes per worker for an ImageNet cache)."""
    ds = TokenDataset(centre_cache, read_manifest(centre_cache), "train")
    blob = pickle.dumps(ds)
    assert not any(np.ascontiguousarray(ids).tobytes() in blob for ids in ds.ids)
    copy = pickle.loads(blob)
    assert isinstance(copy.ids[0], np.memmap) and len(copy) == len(ds)
    assert all(torch.equal(copy[(i, 7)][0], ds[(i, 7)][0]) and copy[i][1] == ds[i][1] for i in range(len(ds)))


@pytest.mark.parametrize("n, world, chunk", [(24, 2, 2), (25, 2, 2), (10, 3, 4), (3, 2, 4), (7, 8, 1)])
def test_shards_split_the_images_at_chunk_multiples_without_gap_or_overlap(n, world, chunk):
    """Every image in exactly one rank's range, ranges in rank order, each cut at a multiple of --batch (so a chunk
    holds the same images on any number of ranks): a last image left out when --batch does not divide the split,
    or a range past it, passed the suite."""
    bounds = shard_bounds(n, world, chunk)
    assert len(bounds) == world and [i for b, e in bounds for i in range(b, e)] == list(range(n))
    assert all(b % chunk == 0 for b, _ in bounds)


def test_the_plan_stores_val_under_the_centre_view_and_records_what_the_ids_depend_on():
    """The manifest an extraction starts with: a wrong L, seed or --limit in it would pass a cache for settings it
    was not made with; val under the train views would validate on flipped crops."""
    identity = {"tokenizer_digest": "abc", "patch_nums": [1, 2, 4], "reso": 8, "mid_reso": 1.0,
                "views": ["center", "center_flip"], "classes": ["a", "b"]}
    args = SimpleNamespace(seed=3, batch=4, limit=10, data_path="/data/imagenet/", dataset="mnist")
    assert plan(args, identity, {"train": 10, "val": 3}, world=2) == {
        "format": 1, **identity, "L": 21, "seed": 3, "batch": 4, "limit": 10, "source": "/data/imagenet",
        "splits": {"train": {"images": 10, "views": ["center", "center_flip"], "shards": [[0, 8], [8, 10]]},
                   "val": {"images": 3, "views": ["center"], "shards": [[0, 0], [0, 3]]}}, "complete": False}


def commit(writer: ShardWriter, start: int, stop: int, unreadable: tuple[int, ...] = ()) -> None:
    """Commit images [start, stop) of ids `ids_of(i)` and label i % 3, but the unreadable ones."""
    writer.commit(start, {i: (ids_of(i), i % 3) for i in range(start, stop) if i not in unreadable}, stop)


def shard_arrays(folder: Path, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    stem = folder / "train" / shard_name(rank, world)
    return np.load(stem.with_suffix(".ids.npy")), np.load(stem.with_suffix(".labels.npy"))


def split_manifest(shards: list[list[int]], classes: list[str], K: int = 2, L: int = 3) -> dict:
    """The manifest of a hand-written train split of `shards` ([begin, end) per rank) of K views of L ids."""
    return {"format": 1, "L": L, "classes": classes,
            "splits": {"train": {"images": shards[-1][1], "views": ["center", "rand0"][:K], "shards": shards}}}


def test_a_relaunched_shard_continues_after_its_last_commit_and_keeps_what_was_committed(tmp_path):
    """Rank 1's range [4, 9), killed after its first chunk (image 5 unreadable): the relaunch continues at 6,
    refuses a chunk elsewhere, before or after it (a review of the mutants: a chunk past it, which leaves rows
    of zeros counted as done, passed the suite), and the shard ends holding every image's ids and label in its
    row, zeros and -1 for the unreadable one, which its progress records."""
    commit(ShardWriter(tmp_path, "train", 1, 2, [4, 9], K=2, L=3), 4, 6, unreadable=(5,))
    writer = ShardWriter(tmp_path, "train", 1, 2, [4, 9], K=2, L=3)  # the relaunch
    assert writer.next == 6
    with pytest.raises(ValueError, match="chunk starts at 4, the shard continues at 6"):
        commit(writer, 4, 6)
    with pytest.raises(ValueError, match="chunk starts at 7, the shard continues at 6"):
        commit(writer, 7, 9)
    commit(writer, 6, 9)
    ids, labels = shard_arrays(tmp_path, 1, 2)
    assert np.array_equal(ids, np.stack([ids_of(4), np.zeros((2, 3)), ids_of(6), ids_of(7), ids_of(8)]))
    assert labels.tolist() == [1, -1, 0, 1, 2] and writer.progress == {"done": 5, "skipped": [5]}


def test_finish_records_the_unreadable_images_of_every_rank_and_training_leaves_them_out(tmp_path):
    """A cache of two ranks' shards, one unreadable image in each: the manifest lists both (a review of the
    mutants: rank 0's only passed the suite), and the split reads every other image in order."""
    bounds = [[0, 4], [4, 7]]
    for rank, (b, e) in enumerate(bounds):
        commit(ShardWriter(tmp_path, "train", rank, 2, [b, e], K=2, L=3), b, e, unreadable=(1, 5))
    finish(tmp_path, split_manifest(bounds, ["a", "b", "c"]), world=2)
    written = read_manifest(tmp_path)
    assert written["complete"] and written["splits"]["train"]["skipped"] == [1, 5]
    ids, labels = all_ids(tmp_path, "train")
    kept = [0, 2, 3, 4, 6]
    assert np.array_equal(ids, np.stack([ids_of(i) for i in kept])) and labels == [i % 3 for i in kept]


def test_extract_shard_encodes_the_ranks_range_chunk_by_chunk_to_its_end(tmp_path):
    """Five images at --batch=2 through an encoder whose ids name the image: each row holds its own image's ids,
    and the last chunk, of one unreadable image (nothing to encode), is committed as skipped."""
    source = [(i, None if i == 4 else torch.full((1, 3, 1, 1), 100.0 * i), i % 3) for i in range(5)]
    writer = ShardWriter(tmp_path, "train", 0, 1, [0, 5], K=1, L=3)
    args = SimpleNamespace(batch=2, workers=0, encode_batch=3, log_every=0)
    extract_shard(FirstPixelTokenizer(), source, writer, args, "train")
    ids, labels = shard_arrays(tmp_path, 0, 1)
    assert ids[:, 0].tolist() == [[100 * i, 100 * i, 200 * i] for i in range(4)] + [[0, 0, 0]]
    assert labels.tolist() == [0, 1, 2, 0, -1] and writer.progress == {"done": 5, "skipped": [4]}


def test_log_every_logs_the_last_chunk_of_a_shard_too(tmp_path, caplog):
    """--log_every=2 at --batch=2 over 5 images logs after 4 images and at the shard's end (5 of 5), so a log
    without a terminal shows each shard finished: a last chunk off the log interval went unlogged and passed the
    suite (a review of the mutants), whose extraction logs every chunk of an even shard."""
    caplog.set_level(logging.INFO, logger="extract_tokens")
    source = [(i, torch.full((1, 3, 1, 1), float(i)), 0) for i in range(5)]
    writer = ShardWriter(tmp_path, "train", 0, 1, [0, 5], K=1, L=3)
    extract_shard(FirstPixelTokenizer(), source, writer, SimpleNamespace(batch=2, workers=0, encode_batch=8,
                                                                          log_every=2), "train")
    assert [r.getMessage() for r in caplog.records if r.name == "extract_tokens"] == [
        "train: committed 4/5 images of shard 0", "train: committed 5/5 images of shard 0"]


FD_LIMITED_EXTRACTION = """import resource, sys
from types import SimpleNamespace
import torch
from scripts.extract_tokens import extract_shard
from test_token_cache import FirstPixelTokenizer
from utils.data.token_cache import ShardWriter
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the loader worker inherits it
source = [(i, torch.full((1, 3, 1, 1), float(i % 200)), 0) for i in range(600)]
writer = ShardWriter(sys.argv[1], "train", 0, 1, [0, 600], K=1, L=3)
extract_shard(FirstPixelTokenizer(), source, writer, SimpleNamespace(batch=300, workers=1, encode_batch=64,
                                                                      log_every=0), "train")
print("done", writer.progress["done"])
"""


def test_a_worker_sends_a_chunk_as_one_tensor_and_large_chunks_do_not_run_out_of_file_descriptors(tmp_path):
    """A review: the views came from a loader worker one tensor per image, each shared through file descriptors,
    so --batch 512 with --workers ran out of them under the usual limit of 1024; the worker's feeder thread died
    and the extraction waited forever. Here 300 images per chunk under a limit of 256."""
    proc = subprocess.run([sys.executable, "-c", FD_LIMITED_EXTRACTION, str(tmp_path)], env=SUBPROCESS_ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "done 600" in proc.stdout, proc.stderr[-3000:]


def test_an_images_random_crops_follow_its_index_and_a_limit_stops_at_the_split(tmp_path):
    """Two copies of one picture get their own rand0 crop (each image its own, as VAR's random crops); --limit
    past a split's size keeps the split."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8))
    source = ViewSource([(img, 0), (img, 1)], ["rand0"], reso=4, mid_reso=3.0, seed=0, limit=5)
    assert len(source) == 2
    (_, first, _), (i, second, label) = source[0], source[1]
    assert (i, label) == (1, 1) and torch.equal(second, render_views(img, ["rand0"], 4, 3.0, 0, 1))
    assert not torch.equal(first, second)


def test_a_flipped_view_mirrors_its_own_crop():
    """`_flip` mirrors the view's crop (LlamaGen's "a crop and its flip"): tl_flip is tl mirrored and rand0_flip
    the same random crop mirrored. Cropping the mirrored image at the same box instead (tl_flip = tr mirrored,
    rand0_flip another region) passed the suite, whose caches flip the centre crop only, which is symmetric."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 14, 3), dtype=np.uint8))  # not square
    views = ["tl", "tl_flip", "br", "br_flip", "rand0", "rand0_flip"]
    got = render_views(img, views, 4, 2.0, 0, 3)  # resized to 8 x 12: crops at many offsets
    for plain, flipped in zip(got[0::2], got[1::2], strict=True):
        assert torch.equal(flipped, plain.flip(-1))
    assert not torch.equal(got[0], got[2])  # the image has distinct corners


def test_the_centre_view_is_the_validation_transforms_crop_also_for_odd_margins():
    """The "center" view is VAR's validation transform (torchvision's CenterCrop, which rounds a half-pixel margin
    as Python's round does), so a cache's val split validates as the images do. A floor (//) crop, one pixel off
    where the margin is 3, 7, ... pixels, passed the suite, whose images leave even margins."""
    _, val_tf = build_transforms(8, mid_reso=1.125)  # the shorter side resized to 9
    rng = np.random.default_rng(0)
    for h, w in ((9, 11), (11, 9), (9, 15), (20, 14)):  # margins 3, 3, 7 and an even one
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert torch.equal(render_views(img, ["center"], 8, 1.125, 0, 0)[0], val_tf(img)), (h, w)


WHOLE_MANIFEST = {"format": 1, "tokenizer_digest": "0", "patch_nums": [1, 2], "reso": 32, "mid_reso": 1.125,
                  "views": ["center"], "classes": ["a"], "L": 5, "seed": 0, "batch": 64, "splits": {}, "complete": True}


@pytest.mark.parametrize("manifest, message", [
    (None, "is not a token cache (no manifest.json)"),
    ("{", "manifest.json is unreadable"),
    ('{"format": 2}', "format 2, this code reads format 1"),
    ('{"complete": true}', "format None, this code reads format 1"),  # no format at all (a mutant passed it)
    (json.dumps({**WHOLE_MANIFEST, "complete": False}), "is unfinished: relaunch scripts/extract_tokens.py"),
    (json.dumps({k: v for k, v in WHOLE_MANIFEST.items() if k != "mid_reso"}),
     "was made for other settings: --mid_reso: not recorded in the cache's manifest"),
])
def test_a_cache_without_a_finished_manifest_of_this_format_is_refused(tmp_path, manifest, message):
    """Training from a partial cache would read rows never written (zeros, as class 0). A manifest without a field
    the checks read was a KeyError traceback."""
    if manifest is not None:
        (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(TokenCacheError, match=re.escape(message)):
        open_cache(tmp_path, {k: WHOLE_MANIFEST[k] for k in IDENTITY})


def test_the_tokenizer_digest_ignores_its_usage_statistics():
    """ema_vocab_hit_SV counts code use (and is shaped by --pn): it does not change an id, so a cache stays valid
    for the same weights whatever their statistics."""
    vae, _ = build_tiny_mvar(patch_nums=(1, 2, 4))
    digest = tokenizer_digest(vae)
    vae.quantize.ema_vocab_hit_SV.add_(1.0)
    assert tokenizer_digest(vae) == digest


def test_a_cache_of_another_mid_reso_is_refused_and_told_apart(centre_cache):
    """--mid_reso scales the images before their crops are taken, so a cache made at another one holds other crops:
    training (or a relaunched extraction) must refuse it, and ranks comparing their node-local caches tell it
    apart."""
    manifest = read_manifest(centre_cache)
    with pytest.raises(TokenCacheError, match=r"--mid_reso: cache 1\.0, this run 1\.5$"):
        open_cache(centre_cache, {"mid_reso": 1.5})
    assert content_digest({**manifest, "mid_reso": 1.5}) != content_digest(manifest)


def test_extraction_crops_at_its_seed_and_mid_reso(setup, tmp_path):
    """The ids stored are those of the crops render_views makes at --seed and --mid_reso (both recorded in the
    manifest and checked against), not at their defaults: encoded here from the images for comparison."""
    from scripts.extract_tokens import encode
    from utils.data.loaders import open_split

    views = ["rand0", "center"]
    launch(EXTRACT, *extract_flags(setup, tmp_path / "cache", f"--views={','.join(views)}", "--seed=1",
                                   "--mid_reso=1.5", "--limit=2"), nproc=1)
    ids, _ = all_ids(tmp_path / "cache", "train")
    images = open_split(str(setup / "data"), "", "train", None)
    vae = load_vae(setup / "vae.pth", v_patch_nums=(1, 2, 4))

    def ids_at(seed, mid_reso):
        return encode(vae, torch.stack([render_views(images.read(i), views, 8, mid_reso, seed, i) for i in range(2)]),
                      encode_batch=64)
    assert np.array_equal(ids, ids_at(seed=1, mid_reso=1.5))
    assert not np.array_equal(ids, ids_at(seed=0, mid_reso=1.5)) and not np.array_equal(ids, ids_at(1, 1.0))


def test_a_shard_keeps_ids_up_to_65535_and_labels_of_a_thousand_classes(tmp_path):
    """A 65,536-code tokenizer's ids and ImageNet's 1000 labels come back as written: a narrower dtype would wrap
    them (label 999 in int8 is -25, an unreadable image left out of training)."""
    ids = np.array([[[0, 255, 65535]], [[256, 32768, 1]]], dtype=np.uint16)
    ShardWriter(tmp_path, "train", 0, 1, [0, 2], K=1, L=3).commit(0, {0: (ids[0], 999), 1: (ids[1], 128)}, 2)
    ds = TokenDataset(tmp_path, split_manifest([[0, 2]], [f"c{i}" for i in range(1000)], K=1), "train")
    assert len(ds) == 2 and ds.targets == [999, 128]
    assert [ds[i][0].tolist() for i in range(2)] == ids[:, 0].tolist()


def test_a_rank_without_images_lets_the_extraction_finish(tmp_path):
    """More ranks than chunks (a small val split on many GPUs) leave a rank an empty range: it commits nothing, and
    the cache must still be finished and read."""
    bounds = shard_bounds(3, 2, 4)
    assert bounds == [[0, 0], [0, 3]]
    for rank, (b, e) in enumerate(bounds):
        writer = ShardWriter(tmp_path, "train", rank, 2, [b, e], K=2, L=3)
        if e > b:
            commit(writer, b, e, unreadable=(1,))
    finish(tmp_path, split_manifest(bounds, ["a", "b", "c"]), world=2)
    assert read_manifest(tmp_path)["splits"]["train"]["skipped"] == [1]
    ids, labels = all_ids(tmp_path, "train")
    assert np.array_equal(ids, np.stack([ids_of(0), ids_of(2)])) and labels == [0, 2]


def test_neighbouring_items_draw_independent_views():
    """train.py's item seeds are consecutive down an epoch (utils.data.loaders.sample_seed): their views must not
    follow each other (seed % K would give positions 0, 1, 2, ... views k, k+1, k+2, ... every epoch)."""
    views = [pick_view(sample_seed(0, 1, pos), 10) for pos in range(10_000)]
    steps = np.bincount([(b - a) % 10 for a, b in zip(views[:-1], views[1:], strict=True)], minlength=10)
    assert steps.max() < 1_200


def test_a_tokenizer_of_65536_codes_fills_uint16_and_extracts(setup, tmp_path, monkeypatch):
    """uint16 holds ids 0..65535: a tokenizer of exactly 2**16 codes fits, and its extraction is not refused."""
    import dist
    import scripts.extract_tokens as extract_tokens

    vae = load_vae(setup / "vae.pth", v_patch_nums=(1, 2, 4))
    vae.vocab_size = 2**16
    monkeypatch.setattr(dist, "initialize", lambda timeout_min=30.0: torch.device("cpu"))
    monkeypatch.setattr(extract_tokens, "load_vae", lambda *a, **kw: vae)
    extract_tokens.main(extract_tokens.build_parser().parse_args(extract_flags(setup, tmp_path / "cache", "--limit=1")))
    assert read_manifest(tmp_path / "cache")["complete"]
