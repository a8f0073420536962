"""sample.py: grids and folders, same seed => same images, flag errors before any work, the FID dump end to end."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from models import MVARConfig
from models.loading import mvar_checkpoint
from utils.evaluation.fid_dump import DumpPlan, pack_npz
from utils.sample_io import to_uint8_BHW3

NUM_CLASSES, IMG = 10, 8  # patch_nums (1, 2, 3, 4) with a 2x tokenizer: 8x8 pixel images


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_mvar):
    vae, mvar = tiny_mvar(num_classes=NUM_CLASSES)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(mvar_checkpoint(mvar, vae), path)
    return path


def run(ckpt, *flags):
    return sample.main(["--ckpt", str(ckpt), "--device", "cpu", *map(str, flags)])


def test_grid_rows_per_class_and_same_seed_same_images(ckpt, tmp_path):
    flags = ("--classes", 1, 3, "--num_per_class", 3, "--bs", 6, "--cfg", 1.5, "--top_k", 10, "--top_p", 0.9)
    a = run(ckpt, *flags, "--seed", 0, "--out", tmp_path / "a.png")
    b = run(ckpt, *flags, "--seed", 0, "--out", tmp_path / "b.png")
    c = run(ckpt, *flags, "--seed", 1, "--out", tmp_path / "c.png")
    grid = np.asarray(Image.open(a))
    assert grid.shape == (2 * (IMG + 2) + 2, 3 * (IMG + 2) + 2, 3)  # 2 rows (classes) x 3 columns, padding 2
    assert a.read_bytes() == b.read_bytes()
    assert not np.array_equal(grid, np.asarray(Image.open(c)))

    folder = run(ckpt, *flags, "--seed", 0, "--out", tmp_path / "imgs")
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"class{c:04d}_{k:03d}.png" for c in (1, 3) for k in range(3)]
    for r, cls in enumerate((1, 3)):  # the folder's images are the grid's cells
        for k in range(3):
            y, x = 2 + r * (IMG + 2), 2 + k * (IMG + 2)
            cell = np.asarray(Image.open(folder / f"class{cls:04d}_{k:03d}.png"))
            assert np.array_equal(cell, grid[y:y + IMG, x:x + IMG])


def test_official_seed_draws_the_one_batch_as_the_official_demo(ckpt, tmp_path):
    """--official_seed: the batch is autoregressive_infer_cfg(B, labels, g_seed=--seed) itself (the official demo's
    call), not the per-batch mix of the default."""
    flags = ("--classes", 1, 3, "--num_per_class", 2, "--bs", 4, "--seed", 7, "--top_k", 10)
    official = run(ckpt, *flags, "--official_seed", "--out", tmp_path / "official")
    default = run(ckpt, *flags, "--out", tmp_path / "default")
    args = sample.parse_args(["--ckpt", str(ckpt), "--device", "cpu", *map(str, flags)])
    mvar, _, _ = sample.open_model(args, torch.device("cpu"))
    with torch.inference_mode():
        demo = to_uint8_BHW3(mvar.autoregressive_infer_cfg(4, torch.tensor([1, 1, 3, 3]), g_seed=7, cfg=args.cfg,
                                                           top_k=10, top_p=args.top_p, more_smooth=False))
    names = [f"class{c:04d}_{k:03d}.png" for c in (1, 3) for k in range(2)]
    got = np.stack([np.asarray(Image.open(official / n)) for n in names])
    assert np.array_equal(got, demo)
    assert not np.array_equal(np.stack([np.asarray(Image.open(default / n)) for n in names]), demo)


def test_tf32_flag_sets_cudas_matmuls_and_convolutions_only_there():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for argv, expected in (([], True), (["--no-tf32"], False)):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not expected
            args = sample.parse_args(["--ckpt", "x.pth", *argv])
            sample.set_tf32(torch.device("cpu"), args.tf32)  # no effect off CUDA
            assert torch.backends.cuda.matmul.allow_tf32 is (not expected)
            sample.set_tf32(torch.device("cuda"), args.tf32)  # sets the flags only; touches no GPU
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (expected, expected)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("flags, message", [
    (("--top_p", 0), "--top_p must be in \\(0, 1\\]"),
    (("--top_p", 1.5), "--top_p must be in \\(0, 1\\]"),
    (("--cfg", -1), "--cfg must be >= 0"),
    (("--bs", 0), "--bs must be >= 1"),
    (("--fid", "--classes", 1), "--classes is for pictures"),
    (("--fid", "--num_per_class", 8), "--num_per_class is for pictures; --fid takes --fid_num_per_class"),
    (("--fid", "--out", "x.png"), "--out is for pictures; --fid writes into --fid_dir"),
    (("--fid", "--official_seed"), "--official_seed is for pictures"),
    (("--outside", "original"), "--outside is for --edit"),
    (("--official_seed", "--classes", 1, 2, "--num_per_class", 4, "--bs", 4), "8 pictures need --bs >= 8, got --bs=4"),
    # a review: without --fid these were ignored and pictures written; a seed of 2**64 failed once the model loaded
    (("--fid_num_per_class", 7), "--fid_num_per_class is for an FID dump: add --fid"),
    (("--fid_dir", "dumps", "--classes", 1), "--fid_dir is for an FID dump: add --fid"),
    (("--official_seed", "--seed", 2 ** 64), "--seed must be in \\[0, 2\\*\\*64\\), got 18446744073709551616"),
    # a review: empty paths wrote into the current folder (--ckpt= blamed a missing config.json), --device=meta failed
    # after loading
    (("--out", ""), "--out=: expected an image or folder \\(an empty path would be the current folder\\)"),
    (("--fid", "--fid_dir", ""), "--fid_dir=: expected a folder \\(an empty path"),
    (("--ckpt", ""), "--ckpt=: expected a checkpoint file, Hub folder or repo id"),
    (("--device", "meta"), "--device=meta: the meta device holds shapes and no data"),
])
def test_bad_flags_fail_before_reading_anything(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "does-not-exist.pth"), *map(str, flags)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "does-not-exist" not in err  # the flags are checked before the checkpoint is looked at


@pytest.mark.parametrize("flags, message", [
    (("--classes", 3, NUM_CLASSES), f"--classes \\[{NUM_CLASSES}\\] outside the model's classes \\[0, 9\\]"),
    (("--depth", 3), "--depth=3, but tiny.pth holds a depth-2 model"),
    (("--arch", "var"), "--arch=var, but tiny.pth holds arch=mvar"),
    # a review: --model's depth was reported as a --depth the user never passed
    (("--model", "M-VAR-d16"), "error: --model=M-VAR-d16 has depth=16, but tiny.pth holds a depth-2 model$"),
    (("--model", "VAR-d16", "--depth", "2"), "error: --model=VAR-d16 has arch=var, but tiny.pth holds arch=mvar$"),
])
def test_checkpoint_mismatch_fails_before_building(flags, message, ckpt, monkeypatch, tmp_path):
    def must_not_run(*a, **k):
        raise AssertionError("model built before the flags were checked")

    monkeypatch.setattr(sample, "load_mvar", must_not_run)
    monkeypatch.setattr(sample, "load_vae", must_not_run)
    with pytest.raises(SystemExit, match=message):
        run(ckpt, *flags, "--out", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_the_default_classes_outside_the_models_are_an_error_before_sampling(ckpt, monkeypatch, tmp_path):
    """A walkthrough: without --classes, a model of fewer than 1000 classes (the demo's) got VAR's demo classes
    (ImageNet ids) and failed with an IndexError in the class embedding. Now an error line names the flag, before
    anything is generated."""
    monkeypatch.setattr(sample, "make_generate", lambda *a, **k: pytest.fail("generated before the check"))
    with pytest.raises(SystemExit, match="error: --classes: the default, VAR's demo classes 980 437 22 562 "
                                         "\\(ImageNet ids\\), is outside this model's 10 classes: pass --classes "
                                         "with ids in \\[0, 9\\]"):
        run(ckpt, "--out", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("flags, message", [
    (("--attn_backend", "flash_attn"), "flash_attn"),
    (("--mamba_backend", "mamba_ssm"), "mamba_ssm"),
])
def test_forced_kernel_that_cannot_run_fails_before_loading(flags, message, tmp_path):
    """On this CPU machine a forced CUDA kernel is an error naming it, before the checkpoint is looked at."""
    if torch.cuda.is_available():
        pytest.skip("the kernels may run on this machine")
    with pytest.raises(SystemExit, match=message) as e:
        sample.main(["--ckpt", str(tmp_path / "does-not-exist.pth"), "--device", "cpu", *flags])
    assert "does-not-exist" not in str(e.value)


def test_missing_official_checkpoint_says_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="(?s)d16.pth.*OliverRen/M-VAR.*--ckpt"):
        sample.main(["--depth", "16", "--device", "cpu", "--out", str(tmp_path / "x.png")])


@pytest.mark.parametrize("flags, message", [
    (["--model", "VAR-d16"], "(?s)var_d16.pth.*FoundationVision/var.*--ckpt"),  # VAR's file, not M-VAR's d16.pth
    (["--depth", "20", "--arch", "var"], "(?s)var_d20.pth.*FoundationVision/var.*--ckpt"),
    (["--model", "M-VAR-W"], "--model=M-VAR-W has no published weights"),  # failed at load before: no such d16.pth
    (["--depth", "16", "--arch", "intra"], "--arch=intra .* has no published weights"),
    (["--model", "VAR-d12"], r"VAR published no depth-12 weights \(only var_d\{16,20,24,30,36\}.pth"),
])
def test_without_ckpt_a_named_size_reads_its_own_published_file_or_says_there_is_none(flags, message, monkeypatch,
                                                                                       tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(SystemExit) as e:
        sample.main([*flags, "--device", "cpu", "--out", str(tmp_path / "x.png")])
    assert re.search(message, f"{e.value} {capsys.readouterr().err}"), e.value


def test_named_model_picks_the_official_file_and_is_checked_against_the_checkpoint(ckpt):
    assert (sample.parse_args(["--model", "M-VAR-d16"]).depth, sample.parse_args(["--model", "VAR-d20"]).arch) \
        == (16, "var")
    config = MVARConfig(depth=16, embed_dim=1024)
    sample.check_against_config(sample.parse_args(["--model", "M-VAR-d16", "--ckpt", "x.pth"]), MVARConfig(), "x")
    with pytest.raises(ValueError, match="--model=M-VAR-d16 has arch=mvar, but x.pth holds arch=var"):
        sample.check_against_config(sample.parse_args(["--model", "M-VAR-d16"]), MVARConfig(arch="var"), "x.pth")
    with pytest.raises(ValueError, match="--model=M-VAR-W has embed_dim=768, but x.pth holds 1024"):
        sample.check_against_config(sample.parse_args(["--model", "M-VAR-W", "--ckpt", "x.pth"]), config, "x.pth")


def test_preset_sets_the_paper_fid_settings_and_flags_override():
    args = sample.parse_args(["--ckpt", "x.pth", "--preset", "fid"])
    assert (args.cfg, args.top_p, args.top_k, args.more_smooth) == (1.5, 0.96, 900, False)
    assert sample.parse_args(["--ckpt", "x.pth", "--preset", "fid", "--cfg", "2"]).cfg == 2.0
    settings = ("cfg", "top_p", "top_k", "more_smooth")
    fid = sample.parse_args(["--ckpt", "x.pth", "--fid"])  # an FID dump defaults to the paper's FID settings
    assert tuple(getattr(fid, k) for k in settings) == (1.5, 0.96, 900, False)
    assert sample.parse_args(["--ckpt", "x.pth", "--fid", "--cfg", "4"]).cfg == 4.0
    assert tuple(getattr(sample.parse_args(["--ckpt", "x.pth"]), k) for k in settings) == (4.0, 0.95, 900, False)


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 4.0)" in text and "(default: samples.png)" in text and "python sample.py --ckpt" in text


def test_fid_dump_without_room_to_pack_stops_before_sampling(ckpt, tmp_path, monkeypatch):
    """A review: packing needs the array twice, and a disk without that room was found only after every image was
    sampled. It is refused before the first one, naming what packing needs and what is free."""
    from utils.evaluation import fid_dump

    need = fid_dump.pack_bytes(DumpPlan(NUM_CLASSES, 2, 8), (IMG, IMG))
    real = fid_dump.shutil.disk_usage
    monkeypatch.setattr(fid_dump.shutil, "disk_usage", lambda p: real(p)._replace(free=need - 1))
    monkeypatch.setattr(sample, "dump_shard", lambda *a, **k: pytest.fail("sampled without room to pack"))
    with pytest.raises(SystemExit, match=rf"^error: packing 20 images of {IMG}x{IMG} into tiny-.*\.npz needs "
                                         r"\d+ MiB free .*; \d+ MiB are free. .* another --fid_dir"):
        run(ckpt, "--fid", "--fid_num_per_class", 2, "--bs", 8, "--fid_dir", tmp_path)
    assert not list(tmp_path.glob("*/*.png"))
    monkeypatch.setattr(fid_dump.shutil, "disk_usage", lambda p: real(p)._replace(free=need))
    fid_dump.check_pack_space(tmp_path, DumpPlan(NUM_CLASSES, 2, 8), (IMG, IMG))  # exactly enough


def test_fid_dump_packs_npz_and_resumes(ckpt, tmp_path):
    flags = ("--fid", "--preset", "fid", "--top_k", 20, "--fid_num_per_class", 2, "--bs", 8,
             "--fid_dir", tmp_path)
    npz = run(ckpt, *flags)
    folder = tmp_path / "tiny-cfg1.5-topk20-topp0.96-seed0-n2"
    assert npz == tmp_path / f"{folder.name}.npz"
    with np.load(npz) as f:
        arr = f["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (2 * NUM_CLASSES, IMG, IMG, 3)
    info = json.loads(npz.with_suffix(".json").read_text())
    assert info["num_images"] == 20 and info["cfg"] == 1.5 and info["top_p"] == 0.96 and info["batch_size"] == 8
    assert info["vae"] == "embedded"

    (folder / "000005.png").unlink()
    (folder / "000013.png").write_bytes(b"not a png")
    untouched = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png") if p.name != "000013.png"}
    npz.unlink()
    assert run(ckpt, *flags) == npz
    with np.load(npz) as f:
        assert np.array_equal(f["arr_0"], arr)  # refilled with the very same images
    assert all((folder / n).stat().st_mtime_ns == t for n, t in untouched.items())

    with pytest.raises(SystemExit, match="^error: .*other settings"):  # same folder name, other batching
        run(ckpt, *flags[:-4], "--bs", 4, "--fid_dir", tmp_path)
    with pytest.raises(SystemExit, match="'vae': \\('embedded', 'tiny.pth'\\)"):  # same folder, another tokenizer
        run(ckpt, *flags, "--vae_ckpt", ckpt)

    (folder / "000007.png").unlink()  # packing alone names what is missing
    with pytest.raises(FileNotFoundError, match="1 of the 20 PNGs .* missing .*000007.png"):
        pack_npz(folder, DumpPlan(num_classes=NUM_CLASSES, num_per_class=2, batch_size=8))


@pytest.mark.parametrize("fid, wait_min", [(True, 24 * 60), (False, None)])
def test_an_fid_dumps_ranks_wait_for_each_other_a_day(ckpt, monkeypatch, fid, wait_min):
    """A review: after a resume the ranks' shares may be unequal, and the barrier after the dump failed NCCL's 30
    minutes while slower ranks still sampled. Pictures keep the default."""
    import dist

    waits = []

    def initialize(**kwargs):
        waits.append(kwargs.get("timeout_min"))
        raise KeyboardInterrupt  # stop here
    monkeypatch.setattr(dist, "initialize", initialize)
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, *(["--fid"] if fid else []))
    assert waits == [wait_min]


def test_pictures_pass_every_sampling_flag_and_seed_each_batch(ckpt, tmp_path, monkeypatch):
    """--cfg, --top_k, --top_p and --more_smooth reach the sampler, and batch c is drawn from chunk_seed(--seed, c):
    a flag dropped on its way (the image then follows the default) or one seed for every batch would pass unseen."""
    from models.mvar import MVAR
    from utils.evaluation.fid_dump import chunk_seed

    calls = []

    def fake(self, B, label_B, **kw):
        calls.append((B, label_B.tolist(), kw))
        return torch.full((B, 3, IMG, IMG), 0.5)
    monkeypatch.setattr(MVAR, "autoregressive_infer_cfg", fake)
    run(ckpt, "--classes", 1, 3, "--num_per_class", 3, "--bs", 4, "--cfg", 2.5, "--top_k", 7, "--top_p", 0.8,
        "--more_smooth", "--seed", 3, "--out", tmp_path / "imgs")
    flags = dict(cfg=2.5, top_k=7, top_p=0.8, more_smooth=True)
    assert calls == [(4, [1, 1, 1, 3], dict(g_seed=chunk_seed(3, 0), **flags)),
                     (2, [3, 3], dict(g_seed=chunk_seed(3, 1), **flags))]


def test_fid_folder_and_settings_record_the_seed_and_smoothing(ckpt, tmp_path, monkeypatch):
    """The dump folder's name and settings.json name what the images depend on, --seed and --more_smooth included:
    without them two seeds (or smoothed and plain samples) would share one folder, or a resume could not tell."""
    seen = []

    def stop(settings, folder):
        seen.append((settings, folder))
        raise KeyboardInterrupt
    monkeypatch.setattr(sample, "check_ranks_agree", stop)
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, "--fid", "--cfg", 2, "--top_k", 7, "--top_p", 0.8, "--more_smooth", "--seed", 3,
            "--fid_num_per_class", 2, "--fid_dir", tmp_path)
    (settings, folder), = seen
    assert folder == tmp_path / "tiny-cfg2-topk7-topp0.8-seed3-n2-smooth"
    assert {k: settings[k] for k in ("cfg", "top_k", "top_p", "more_smooth", "seed", "num_per_class")} == \
        dict(cfg=2.0, top_k=7, top_p=0.8, more_smooth=True, seed=3, num_per_class=2)


def test_to_uint8_rounds_to_nearest_clamps_and_keeps_the_pixel_layout():
    """[0, 1] floats -> uint8 round to nearest (x * 255 + 0.5, floored), out-of-range values clamp, and pixel (y, x)
    of channel c lands at [y, x, c]: truncation, ceiling, wrap-around and a transposed image would each pass a
    shape check (the FID dump and every grid go through this)."""
    img = torch.tensor([[[0.0, 10.2 / 255, 10.7 / 255], [1.0, -0.5, 1.5]],
                        [[0.5, 0.25, 0.75], [30.2 / 255, 200.8 / 255, 127.4 / 255]],
                        [[2.3 / 255, 3.6 / 255, 254.6 / 255], [0.0, 0.0, 1.0]]])[None]  # (1, 3, H=2, W=3)
    out = to_uint8_BHW3(img)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3, 3)
    assert out[0, :, :, 0].tolist() == [[0, 10, 11], [255, 0, 255]]
    assert out[0, :, :, 1].tolist() == [[128, 64, 191], [30, 201, 127]]
    assert out[0, :, :, 2].tolist() == [[2, 4, 255], [0, 0, 255]]


def test_to_uint8_rounds_halves_up_as_torchvisions_save_image():
    """k + 0.5 (exact in float32 for these) goes to k + 1, as torchvision.utils.save_image's `mul(255).add_(0.5)`
    then truncation: the FID dump's PNG-equivalent pixels. A mutation review: torch.round (halves to even: 2.5 -> 2)
    passed the suite."""
    k = torch.arange(255, dtype=torch.float32)
    img = ((k + 0.5) / 255).view(1, 1, 1, 255).expand(1, 3, 1, 255)
    assert to_uint8_BHW3(img)[0, 0, :, 0].tolist() == list(range(1, 256))


def test_a_grid_is_images_in_rows_of_ncol_on_white_padding(tmp_path):
    """save_grid: row r holds images r*ncol ... r*ncol+ncol-1, each framed by 2 px of white (255, as VAR's demo
    grid); an incomplete last row is padded with white cells. A mutation review: black padding passed the suite,
    which compares the cells only."""
    from utils.sample_io import save_grid

    imgs = np.stack([np.full((3, 4, 3), 10 * (i + 1), np.uint8) for i in range(5)])  # 5 images of 3x4 px
    grid = np.asarray(Image.open(save_grid(imgs, tmp_path / "g.png", ncol=2)))
    assert grid.shape == (3 * (3 + 2) + 2, 2 * (4 + 2) + 2, 3)
    cells = np.zeros(grid.shape[:2], bool)
    for i in range(5):
        y, x = 2 + (i // 2) * 5, 2 + (i % 2) * 6
        assert (grid[y:y + 3, x:x + 4] == 10 * (i + 1)).all(), i
        cells[y:y + 3, x:x + 4] = True
    assert (grid[~cells] == 255).all()


def test_an_fid_dumps_ranks_each_write_their_own_chunks_and_rank_0_packs_them_all(ckpt, tmp_path):
    """sample_fid passes its rank and the rank count to the dump: rank r of 2 writes the PNGs of chunks r, r + 2, ...
    only, and their union packs into the npz of a one-rank dump. Every rank writing every chunk (the same images,
    twice the work, two writers per file) passed the suite, whose dumps all ran in one process."""
    flags = ["--ckpt", str(ckpt), "--device", "cpu", "--fid", "--top_k", "20", "--fid_num_per_class", "2", "--bs", "3"]
    one = run(ckpt, *flags[4:], "--fid_dir", tmp_path / "one")
    args = sample.parse_args([*flags, "--fid_dir", str(tmp_path / "two")])
    mvar, ckpt_path, vae_id = sample.open_model(args, torch.device("cpu"))
    generate = sample.make_generate(mvar, args, torch.device("cpu"))
    folder = tmp_path / "two" / one.stem
    (tmp_path / "two").mkdir()

    def pngs():
        return sorted(int(p.stem) for p in folder.glob("*.png"))

    def chunks(r):  # 20 images in chunks of 3: rank r of 2 holds chunks r, r + 2, ...
        return [i for c in range(r, 7, 2) for i in range(3 * c, min(3 * c + 3, 2 * NUM_CLASSES))]
    with pytest.raises(FileNotFoundError, match="9 of the 20 PNGs"):  # rank 0 packs before rank 1 dumped its share
        sample.sample_fid(args, mvar, ckpt_path, vae_id, generate, rank=0, world_size=2)
    assert pngs() == chunks(0)
    assert sample.sample_fid(args, mvar, ckpt_path, vae_id, generate, rank=1, world_size=2) is None
    assert pngs() == list(range(2 * NUM_CLASSES))
    npz = sample.sample_fid(args, mvar, ckpt_path, vae_id, generate, rank=0, world_size=2)  # the resume packs
    with np.load(npz) as a, np.load(one) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
