"""FID dump: sharding without gaps or duplicates, resumption, and the npz OpenAI's evaluator reads."""
import zipfile

import numpy as np
import pytest
from PIL import Image

from utils.evaluation.fid import open_npz_array, read_npz_header
from utils.evaluation.fid_dump import DumpPlan, check_or_write_settings, chunk_seed, dump_shard, fid_folder_name, \
    missing_indices, npz_order, pack_npz, png_path

HW = (8, 6)


def fake_generate(calls=None):
    """Images that encode (class, seed) so tests can check what was generated where."""
    def generate(label_B, g_seed):
        if calls is not None:
            calls.append((label_B.copy(), g_seed))
        imgs = np.zeros((len(label_B), *HW, 3), dtype=np.uint8)
        imgs[..., 0] = label_B[:, None, None]
        imgs[..., 1] = g_seed % 251
        imgs[..., 2] = np.arange(len(label_B))[:, None, None]  # position in the batch
        return imgs
    return generate


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("bs", [1, 4, 7])
def test_shards_cover_every_index_once(world_size, bs):
    plan = DumpPlan(num_classes=7, num_per_class=5, batch_size=bs)
    owned = [i for r in range(world_size) for c in plan.chunks_of_rank(r, world_size) for i in plan.chunk_indices(c)]
    assert sorted(owned) == list(range(35))  # none missing, none twice
    assert plan.labels(range(35)).tolist() == [i // 5 for i in range(35)]


@pytest.mark.parametrize("world_size", [1, 3])
def test_dump_is_independent_of_world_size(tmp_path, world_size):
    plan = DumpPlan(num_classes=3, num_per_class=4, batch_size=5)
    folder = tmp_path / f"w{world_size}"
    written = sum(dump_shard(folder, plan, 7, fake_generate(), r, world_size) for r in range(world_size))
    assert written == 12 and missing_indices(folder, 12) == []
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(12)]
    for i in range(12):  # class from the index, seed from the chunk, position inside the chunk
        px = np.asarray(Image.open(png_path(folder, i)))[0, 0]
        assert px.tolist() == [i // 4, chunk_seed(7, i // 5) % 251, i % 5]


def test_resume_fills_gaps_and_replaces_corrupt_pngs(tmp_path):
    plan = DumpPlan(num_classes=2, num_per_class=6, batch_size=4)
    dump_shard(tmp_path, plan, 0, fake_generate())
    reference = {i: png_path(tmp_path, i).read_bytes() for i in range(12)}
    png_path(tmp_path, 1).unlink()
    png_path(tmp_path, 9).write_bytes(reference[9][:40])  # truncated: exists but does not decode
    assert missing_indices(tmp_path, 12) == [1, 9]
    before = {i: png_path(tmp_path, i).stat().st_mtime_ns for i in range(12) if i not in (1, 9)}
    calls = []
    assert dump_shard(tmp_path, plan, 0, fake_generate(calls)) == 2
    assert [c[0].tolist() for c in calls] == [[0, 0, 0, 0], [1, 1, 1, 1]]  # only the chunks with a gap
    assert {i: png_path(tmp_path, i).read_bytes() for i in range(12)} == reference
    assert all(png_path(tmp_path, i).stat().st_mtime_ns == t for i, t in before.items())  # untouched
    assert dump_shard(tmp_path, plan, 0, fake_generate(calls)) == 0 and len(calls) == 2


def test_wrong_image_size_is_regenerated(tmp_path):
    plan = DumpPlan(num_classes=1, num_per_class=2, batch_size=2)
    Image.new("RGB", (3, 3)).save(png_path(tmp_path, 0))
    assert dump_shard(tmp_path, plan, 0, fake_generate(), image_hw=HW) == 2


def test_generate_output_is_checked(tmp_path):
    plan = DumpPlan(num_classes=1, num_per_class=2, batch_size=2)
    with pytest.raises(ValueError, match="uint8"):
        dump_shard(tmp_path, plan, 0, lambda labels, seed: np.zeros((2, 4, 4, 3), np.float32))


def test_npz_is_what_the_openai_evaluator_reads(tmp_path):
    folder = tmp_path / "d2-cfg1.5-topk900-topp0.96-seed0-n3"
    plan = DumpPlan(num_classes=2, num_per_class=3, batch_size=4)
    dump_shard(folder, plan, 0, fake_generate())
    npz = pack_npz(folder, plan)
    assert npz == tmp_path / (folder.name + ".npz")
    with np.load(npz) as f:  # guided-diffusion evaluator: np.load(path)["arr_0"], uint8 NHWC
        assert f.files == ["arr_0", "arr_1"]
        arr, labels = f["arr_0"], f["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (6, *HW, 3)
    order = npz_order(6)
    for j, i in enumerate(order):
        assert np.array_equal(arr[j], np.asarray(Image.open(png_path(folder, int(i)))))
    assert labels.dtype == np.int64 and labels.tolist() == (order // 3).tolist() == arr[:, 0, 0, 0].tolist()
    with zipfile.ZipFile(npz) as zf:  # its streaming reader needs a stored (uncompressed) arr_0.npy member
        assert [(z.filename, z.compress_type) for z in zf.infolist()] == [("arr_0.npy", zipfile.ZIP_STORED),
                                                                          ("arr_1.npy", zipfile.ZIP_STORED)]
    assert read_npz_header(npz) == ((6, *HW, 3), np.uint8)
    assert np.array_equal(open_npz_array(npz), arr)
    assert not list(tmp_path.glob("*.tmp"))


def test_pack_refuses_gaps_and_mixed_sizes(tmp_path):
    plan = DumpPlan(num_classes=1, num_per_class=3, batch_size=3)
    dump_shard(tmp_path / "f", plan, 0, fake_generate())
    png_path(tmp_path / "f", 2).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 PNGs .* \['000002.png'\]"):
        pack_npz(tmp_path / "f", plan)
    with pytest.raises(ValueError, match="expected 5x5"):
        pack_npz(tmp_path / "f", plan, image_hw=(5, 5))
    Image.new("RGB", (4, 4)).save(png_path(tmp_path / "f", 2))
    with pytest.raises(ValueError, match="000002.png has shape"):
        pack_npz(tmp_path / "f", plan)
    assert not (tmp_path / "f.npz").exists() and not list(tmp_path.glob("*.tmp"))


def test_npz_rows_mix_the_classes_within_every_inception_score_split():
    """A review measured IS 36 instead of 144 on a 1,000 x 50 dump packed in class order: each split of 5,000 held 100
    classes. Shuffled, each split holds nearly every class."""
    plan = DumpPlan(num_classes=1000, num_per_class=50, batch_size=64)
    labels = plan.labels(npz_order(plan.total))
    assert sorted(labels.tolist()) == plan.labels(range(plan.total)).tolist()  # a permutation of the dump
    assert all(len(set(labels[s:s + 5000].tolist())) > 990 for s in range(0, plan.total, 5000))
    assert np.array_equal(npz_order(plan.total), npz_order(plan.total))  # fixed: the same npz every time


def test_pngs_without_settings_are_not_adopted(tmp_path):
    """A review saw a folder of someone else's PNGs adopted as this dump's (and its gaps filled with ours)."""
    settings = dict(ckpt="d2.pth", cfg=1.5)
    Image.new("RGB", (4, 4)).save(png_path(tmp_path, 0))
    with pytest.raises(ValueError, match="holds PNGs .*000000.png.* but no settings.json"):
        check_or_write_settings(tmp_path, settings)
    assert not (tmp_path / "settings.json").exists()


def test_settings_must_match_on_resume(tmp_path):
    """Every setting that changes the images, the numerics included: TF32, and the device (CPU and CUDA generators
    draw other streams from one seed); a damaged settings.json is named, not a JSON traceback. Before the first image,
    the message says which file to delete to start over (a review: a launch out of memory at its first batch left
    a folder that refused the smaller --bs, saying only to resume with the same flags)."""
    settings = dict(ckpt="d2.pth", vae="embedded", cfg=1.5, top_k=900, top_p=0.96, more_smooth=False, seed=0,
                    num_classes=2, num_per_class=3, batch_size=4, precision="fp32", tf32=True, device="cuda")
    check_or_write_settings(tmp_path, settings)
    check_or_write_settings(tmp_path, {**settings, "world_size": 8})  # not an image setting
    with pytest.raises(ValueError, match=r"'cfg': \(1.5, 2.0\)}, which wrote no image yet. Delete .*settings.json to "
                                         "start over"):  # a first launch that failed (out of memory, say)
        check_or_write_settings(tmp_path, {**settings, "cfg": 2.0})
    Image.new("RGB", (4, 4)).save(png_path(tmp_path, 0))  # images from here on: the settings bind them
    with pytest.raises(ValueError, match=r"'cfg': \(1.5, 2.0\)}. Resume with the same flags"):
        check_or_write_settings(tmp_path, {**settings, "cfg": 2.0})
    with pytest.raises(ValueError, match="'vae': \\('embedded', 'vae_ch160v4096z32.pth'\\)"):
        check_or_write_settings(tmp_path, {**settings, "vae": "vae_ch160v4096z32.pth"})
    with pytest.raises(ValueError, match="'tf32': \\(True, False\\)"):
        check_or_write_settings(tmp_path, {**settings, "tf32": False})
    with pytest.raises(ValueError, match="'device': \\('cuda', 'cpu'\\)"):
        check_or_write_settings(tmp_path, {**settings, "device": "cpu"})
    (tmp_path / "settings.json").write_text('{"ckpt": "d2.pth", "cf')  # cut short
    with pytest.raises(ValueError, match="settings.json is not readable JSON .*Restore it, or delete"):
        check_or_write_settings(tmp_path, settings)


def test_folder_name_encodes_settings():
    assert fid_folder_name("/x/d16.pth", 1.5, 900, 0.96, 0) == "d16-cfg1.5-topk900-topp0.96-seed0-n50"
    assert fid_folder_name("ck.pth", 4, 0, 0.0, 3, more_smooth=True, num_per_class=2).endswith("-n2-smooth")
    # a review: a repo id or folder lost its last dotted part (user/m-var-v0.1 -> m-var-v0)
    assert fid_folder_name("user/m-var-v0.1", 1.5, 900, 0.96, 0).startswith("m-var-v0.1-cfg1.5")
    assert fid_folder_name("/x/model.safetensors", 1.5, 900, 0.96, 0).startswith("model-cfg1.5")
    # two runs' checkpoints share train.py's file names: the run's folder tells their dumps apart
    assert fid_folder_name("runs/d16/ar-ckpt-best.pth", 1.5, 900, 0.96, 0).startswith("d16-ar-ckpt-best-cfg1.5")
    assert fid_folder_name("ar-ckpt-last.pth", 1.5, 900, 0.96, 0).startswith("ar-ckpt-last-cfg1.5")


def test_chunk_seeds_are_distinct():
    seeds = {chunk_seed(s, c) for s in range(3) for c in range(1000)}
    assert len(seeds) == 3000 and all(0 <= s < 2 ** 31 for s in seeds)


def test_settings_are_created_atomically(tmp_path, monkeypatch):
    """Issue 23: two dumps starting at once both saw no settings.json and both wrote theirs; now the one that loses
    the race is checked against the winner's."""
    import json

    from utils.evaluation import fid_dump

    settings = dict(ckpt="a.pth", vae="embedded", cfg=1.5, top_k=900, top_p=0.96, more_smooth=False, seed=0,
                    num_classes=2, num_per_class=3, batch_size=4, precision="fp32")
    real_dumps = json.dumps

    def other_dump_writes_first(obj, **kw):  # the other dump writes its settings while ours are being serialised
        (tmp_path / "settings.json").write_text(real_dumps({**settings, "cfg": 4.0}))
        return real_dumps(obj, **kw)

    monkeypatch.setattr(fid_dump.json, "dumps", other_dump_writes_first)
    with pytest.raises(ValueError, match=r"other settings .*'cfg': \(4.0, 1.5\)"):
        check_or_write_settings(tmp_path, settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.json"]  # no temporary file left


def test_full_disk_names_the_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Issue 23: a full disk during the dump was a bare ENOSPC and left .tmp files behind."""
    import errno

    from utils.run.checkpoint import DiskFullError

    folder = tmp_path / "f"
    dump_shard(folder, DumpPlan(2, 2, 2), 0, fake_generate(), image_hw=HW)
    real_save = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        fp.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    (folder / "000003.png").unlink()
    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(DiskFullError, match="disk full: cannot write 000003.png into .*f .*kept.*re-run"):
        dump_shard(folder, DumpPlan(2, 2, 2), 0, fake_generate(), image_hw=HW)
    monkeypatch.setattr(Image.Image, "save", real_save)

    def full_disk_zip(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    dump_shard(folder, DumpPlan(2, 2, 2), 0, fake_generate(), image_hw=HW)
    monkeypatch.setattr(zipfile.ZipFile, "write", full_disk_zip)
    with pytest.raises(DiskFullError, match="disk full: cannot write f.npz into .*PNGs are kept"):
        pack_npz(folder, DumpPlan(2, 2, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(4)]


def test_npz_rows_are_the_generated_images_pixel_for_pixel(tmp_path):
    """Row j of arr_0 is image npz_order(N)[j] as generated, every pixel in place: the other tests' images are
    constant per image, so a packing that flipped, transposed or shifted pixels passed them."""
    rng = np.random.default_rng(0)
    made = {}

    def generate(label_B, g_seed):
        imgs = rng.integers(0, 256, (len(label_B), *HW, 3), dtype=np.uint8)
        made[g_seed] = imgs
        return imgs
    plan = DumpPlan(num_classes=2, num_per_class=2, batch_size=4)
    dump_shard(tmp_path / "f", plan, 0, generate)
    with np.load(pack_npz(tmp_path / "f", plan)) as f:
        arr = f["arr_0"]
    assert np.array_equal(arr, made[chunk_seed(0, 0)][npz_order(4)])


@pytest.mark.parametrize("key, other", [("top_k", 600), ("top_p", 0.95), ("more_smooth", True), ("seed", 1),
                                        ("num_per_class", 5), ("precision", "bf16"), ("batch_size", 8)])
def test_a_resume_with_another_sampling_setting_is_refused(tmp_path, key, other):
    """Each sampling setting binds a dump (the test above checks cfg, vae, tf32, device): one left out of the checked
    settings would let a resume mix images of two settings in one npz."""
    settings = dict(ckpt="d2.pth", vae="embedded", cfg=1.5, top_k=900, top_p=0.96, more_smooth=False, seed=0,
                    num_classes=2, num_per_class=3, batch_size=4, precision="fp32", tf32=True, device="cuda")
    check_or_write_settings(tmp_path, settings)
    with pytest.raises(ValueError, match=f"'{key}': \\({settings[key]!r}, {other!r}\\)"):
        check_or_write_settings(tmp_path, {**settings, key: other})
