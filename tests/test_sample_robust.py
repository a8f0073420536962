"""sample.py against careless input (issue 10): FID dumps bound to their weights, non-finite weights/outputs/flags,
output paths (image suffixes, unwritable places), a tokenizer file as --ckpt, raw files that need --pn."""
import contextlib
import json
import math
import os
import re
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from models.loading import mvar_checkpoint
from models.tokenizer import VQVAE
from utils.flags import device_problem
from utils.run.checkpoint import temp_path
from utils.run.lock import LOCK_NAME
from test_sample_cli import ckpt, run  # noqa: F401  (ckpt: the tiny checkpoint fixture)

FID = ("--fid", "--preset", "fid", "--top_k", 20, "--fid_num_per_class", 1, "--bs", 5)


def variant(src, dst, edit):
    """A copy of checkpoint `src` at `dst` with `edit(ckpt)` applied."""
    ck = torch.load(src, weights_only=True)
    edit(ck)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ck, dst)
    return dst


def bump(key):
    def edit(ck):
        part, name = key.split(":")
        ck[part][name] = ck[part][name] + 0.01
    return edit


def test_fid_dump_refuses_images_of_other_weights(ckpt, tmp_path):  # noqa: F811
    """Runs A and B in folders of one name (two experiments' runs/d16) both save ar-ckpt-last.pth: the same --fid_dir
    folder name, other weights. Before the weights were hashed, B's dump wrote 0 new PNGs and packed A's images.
    Runs in folders of other names dump into folders of their own."""
    a = variant(ckpt, tmp_path / "A" / "d16" / "ar-ckpt-last.pth", lambda ck: None)
    b = variant(ckpt, tmp_path / "B" / "d16" / "ar-ckpt-last.pth", bump("model:head.weight"))
    c = variant(ckpt, tmp_path / "C" / "d16" / "ar-ckpt-last.pth", bump("vae:decoder.conv_out.weight"))
    out = tmp_path / "fid"
    npz = run(a, *FID, "--fid_dir", out)
    assert npz.name.startswith("d16-ar-ckpt-last-")
    with pytest.raises(SystemExit, match="^error: .*other weights: the M-VAR weights differ") as e:
        run(b, *FID, "--fid_dir", out)
    assert "tokenizer" not in str(e.value).split("differ")[0]
    with pytest.raises(SystemExit, match="^error: .*other weights: the tokenizer weights differ"):
        run(c, *FID, "--fid_dir", out)
    assert run(a, *FID, "--fid_dir", out) == npz  # the same weights resume (a copy of A elsewhere would too)
    settings = next(out.glob("*/settings.json"))
    old = {k: v for k, v in json.loads(settings.read_text()).items() if not k.endswith("_weights")}
    settings.write_text(json.dumps(old))  # a dump of a version that did not hash the weights
    with pytest.raises(SystemExit, match="^error: .*recorded no weight hashes"):
        run(a, *FID, "--fid_dir", out)
    other_run = variant(ckpt, tmp_path / "d20" / "ar-ckpt-last.pth", bump("model:head.weight"))
    assert run(other_run, *FID, "--fid_dir", out).name.startswith("d20-ar-ckpt-last-")


def test_nan_cfg_is_a_flag_error(capsys):
    with pytest.raises(SystemExit) as e:
        sample.parse_args(["--ckpt", "x.pth", "--cfg", "nan"])
    assert e.value.code == 2 and "--cfg must be >= 0 and finite" in capsys.readouterr().err


def test_a_checkpoint_missing_a_weight_is_named_in_the_error(ckpt, tmp_path):  # noqa: F811
    """A review: the strict load's message said "M-VAR checkpoint state dict does not match", naming no file (with
    --depth the file comes from the Hugging Face cache, unseen)."""
    def drop(ck):
        del ck["model"]["head.weight"]
    bad = variant(ckpt, tmp_path / "gap.pth", drop)
    with pytest.raises(SystemExit, match=r"gap\.pth does not match the model: 1 missing key\(s\): head\.weight"):
        run(bad, "--classes", 1, "--out", tmp_path / "x.png")


def test_nan_weights_name_the_tensor_before_sampling(ckpt, tmp_path):  # noqa: F811
    def poison(ck):
        ck["model"]["head.weight"][0, 0] = math.nan
    bad = variant(ckpt, tmp_path / "nan.pth", poison)
    with pytest.raises(SystemExit, match=r"M-VAR checkpoint .*nan.pth has non-finite weights .*\['head.weight'\]"):
        run(bad, "--classes", 1, "--out", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_non_finite_decoder_output_writes_no_image(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """An overflow in the decoder's last layer (a review: VAR's clamp made +inf a white pixel, past every check)."""
    from models.vae_nets import Decoder

    real = Decoder.forward
    monkeypatch.setattr(Decoder, "forward", lambda self, z: real(self, z) + math.inf)
    with pytest.raises(SystemExit, match=r"tokenizer decoder, for classes \[0, 1, 2, 3, 4\] .*non-finite pixels"):
        run(ckpt, *FID, "--fid_dir", tmp_path)
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.glob("*.npz"))


def test_overflowing_logits_say_where(ckpt, tmp_path, monkeypatch):  # noqa: F811
    from models.mvar import MVAR

    real = MVAR.run_blocks
    monkeypatch.setattr(MVAR, "run_blocks", lambda self, *a: real(self, *a) * math.nan)
    with pytest.raises(SystemExit, match="M-VAR logits became non-finite while sampling classes"):
        run(ckpt, "--classes", 1, "--out", tmp_path / "x.png")


def edit_image(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("broken, message", [
    ("decoder", r"tokenizer decoder, for class 1 \(edits 0-3, seed \d+, fp32\), produced non-finite pixels"),
    ("logits", r"M-VAR logits became non-finite while sampling class 1 \(edits 0-3"),
])
def test_an_edit_that_overflows_is_an_error_not_black_pixels(ckpt, tmp_path, monkeypatch, broken, message):  # noqa: F811
    """The edit path wrote NaN pixels as black with exit 0, and overflowing logits ended in a bare traceback."""
    from models.mvar import MVAR

    if broken == "decoder":
        real = VQVAE.fhat_to_img
        monkeypatch.setattr(VQVAE, "fhat_to_img", lambda self, f: real(self, f) * math.nan)
    else:
        real = MVAR.run_blocks
        monkeypatch.setattr(MVAR, "run_blocks", lambda self, *a: real(self, *a) * math.nan)
    with pytest.raises(SystemExit, match=message):
        run(ckpt, "--edit", edit_image(tmp_path), "--box", "0,4,8,8", "--classes", 1, "--out", tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()


@pytest.mark.parametrize("inputs, message", [
    (("--box", "0,0,9,8"), r"box \(0, 0, 9, 8\) .* must satisfy 0 <= x0 < x1 <= 8"),
    (("--mask", "small"), r"the mask must have the image's size"),
    (("--mask", "black"), r"the mask covers no pixel"),
])
def test_bad_edit_inputs_are_named_before_the_model_loads(ckpt, tmp_path, monkeypatch, capsys, inputs,  # noqa: F811
                                                         message):
    """A review: a box outside the image, a mask of another size or an empty one were found after loading the
    model (with --depth, after its download)."""
    masks = {"small": np.full((4, 4), 255, np.uint8), "black": np.zeros((8, 8), np.uint8)}
    for name, pixels in masks.items():
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
    flag, value = inputs
    value = tmp_path / f"{value}.png" if flag == "--mask" else value
    monkeypatch.setattr(sample, "load_checked", lambda *a: pytest.fail("the model loaded before the check"))
    with pytest.raises(SystemExit):
        run(ckpt, "--edit", edit_image(tmp_path), flag, value, "--classes", 1, "--out", tmp_path / "e.png")
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("over", ["edit", "mask"])
def test_an_out_that_is_the_edits_image_or_mask_is_refused(ckpt, tmp_path, monkeypatch, capsys, over):  # noqa: F811
    """A review: --out naming the --edit image (or the --mask) replaced it with the grid, without a word."""
    image = edit_image(tmp_path)
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "mask.png")
    before = {p: p.read_bytes() for p in (image, tmp_path / "mask.png")}
    out = image if over == "edit" else tmp_path / "sub" / ".." / "mask.png"  # the same file, spelled otherwise
    monkeypatch.setattr(sample, "load_checked", lambda *a: pytest.fail("the model loaded before the check"))
    with pytest.raises(SystemExit):
        run(ckpt, "--edit", image, "--mask", tmp_path / "mask.png", "--classes", 1, "--out", out)
    assert f"is the --{over} file: the grid would replace it" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before


def test_whether_the_centre_crop_keeps_the_mask_is_judged_at_the_models_resolution(
        ckpt, tmp_path, monkeypatch):  # noqa: F811
    """A review: the flags' check cropped at a stand-in 16 px, whose rounding moves the crop by several percent of
    the width: a box at the edge of a 256 px model's crop was refused before anything loaded (and one outside it let
    through). The flags' check now takes what needs no model; the crop's, at the model's size, comes before
    sampling."""
    from models.mvar import MVAR
    from utils.sample_io import load_edit_inputs

    photo = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (160, 250, 3), dtype=np.uint8)).save(photo)
    edge = ("--edit", photo, "--box", "200,0,205,160", "--classes", 1, "--out", tmp_path / "e.png")
    assert load_edit_inputs(photo, 256, box=(200, 0, 205, 160))[1][0, 0, :, 248:].all()  # columns 248-255 at 256 px
    sample.parse_args(["--depth", "16", *map(str, edge)])  # the flags are fine for a 256 px model
    assert run(ckpt, *edge).is_file()  # and for the tiny model's 8 px
    monkeypatch.setattr(MVAR, "autoregressive_edit_cfg", lambda *a, **k: pytest.fail("sampled before the check"))
    with pytest.raises(SystemExit, match="the mask covers no pixel of the \\(resized, center-cropped\\) image the "
                                         "model sees at 8 px: it lies outside the centre square"):
        run(ckpt, *edge[:3], "240,0,250,160", *edge[4:])  # the right border, which the crop leaves out


def test_edits_are_drawn_bs_at_a_time(ckpt, tmp_path, monkeypatch):  # noqa: F811
    from models.mvar import MVAR

    sizes, real = [], MVAR.autoregressive_edit_cfg
    monkeypatch.setattr(MVAR, "autoregressive_edit_cfg", lambda self, img, *a, **k: sizes.append(len(img)) or
                        real(self, img, *a, **k))
    out = run(ckpt, "--edit", edit_image(tmp_path), "--box", "0,4,8,8", "--classes", 1, 2, "--num_per_class", 5,
              "--bs", 2, "--out", tmp_path / "e.png")
    assert sizes == [2, 2, 1] * 2
    assert np.asarray(Image.open(out)).shape == (2 * (8 + 2) + 2, 7 * (8 + 2) + 2, 3)  # before | mask | 5 edits


@pytest.mark.parametrize("name, fmt", [("grid.jpg", "JPEG"), ("sub/grid.webp", "WEBP"), ("grid.PNG", "PNG")])
def test_out_with_an_image_suffix_writes_that_image(ckpt, tmp_path, name, fmt):  # noqa: F811
    out = run(ckpt, "--classes", 1, 2, "--num_per_class", 2, "--out", tmp_path / name)
    assert out.is_file()
    with Image.open(out) as im:
        assert im.format == fmt and im.size == (2 * 10 + 2, 2 * 10 + 2)


def test_unwritable_out_fails_before_sampling(ckpt, tmp_path, monkeypatch):  # noqa: F811
    def must_not_run(*a, **k):
        raise AssertionError("sampled before checking the output")

    monkeypatch.setattr(sample, "load_checked", must_not_run)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="--out=.*a_file/grid.png: cannot write into"):
        run(ckpt, "--out", blocker / "grid.png")
    with pytest.raises(SystemExit, match="--fid_dir=.*a_file: cannot write into"):
        run(ckpt, "--fid", "--fid_dir", blocker)
    # a writable place is probed, not made: a run that fails later leaves no empty folder behind
    for flags in (["--out", tmp_path / "new" / "grid.png"], ["--out", tmp_path / "pngs"],
                  ["--fid", "--fid_dir", tmp_path / "fid" / "dump"]):
        with pytest.raises(AssertionError, match="sampled before checking"):
            run(ckpt, *flags)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_read_only_out_fails_before_sampling(ckpt, tmp_path, monkeypatch):  # noqa: F811
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    monkeypatch.setattr(sample, "load_checked", lambda *a: pytest.fail("sampled before checking the output"))
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(SystemExit, match="cannot write into"):
        run(ckpt, "--out", ro / "grid.png")


def test_tokenizer_file_as_ckpt_is_a_clear_error(ckpt, tmp_path):  # noqa: F811
    def to_tokenizer(ck):
        for k in ("config", "model"):
            del ck[k]
    tok = variant(ckpt, tmp_path / "tokenizer-last.pth", to_tokenizer)
    with pytest.raises(SystemExit, match="tokenizer-last.pth is a tokenizer checkpoint .*--vae_ckpt"):
        run(tok, "--out", tmp_path / "x.png")
    junk = tmp_path / "junk.pth"
    torch.save({"w": torch.ones(1)}, junk)
    with pytest.raises(SystemExit, match="junk.pth: not an M-VAR/VAR state dict"):
        run(junk, "--out", tmp_path / "x.png")
    wrapped = tmp_path / "ddp.pth"  # a raw state dict saved from a DDP model: the prefix is named
    torch.save({f"module.{k}": v for k, v in torch.load(ckpt, weights_only=True)["model"].items()}, wrapped)
    with pytest.raises(SystemExit, match="ddp.pth: not an M-VAR/VAR state dict.*start with 'module.'.*unwrap it"):
        run(wrapped, "--out", tmp_path / "x.png")


def test_raw_state_dict_of_a_custom_schedule_loads_with_pn(ckpt, tmp_path):  # noqa: F811
    """A raw (official-style) file with L matching no preset: the error names --pn, and sample.py has that flag."""
    ck = torch.load(ckpt, weights_only=True)
    raw = tmp_path / "raw.pth"
    torch.save(ck["model"], raw)
    vae = tmp_path / "vae.pth"
    torch.save({"vae_config": ck["vae_config"], "vae": ck["vae"]}, vae)
    flags = ("--vae_ckpt", vae, "--classes", 1, "--num_per_class", 2, "--seed", 4)
    with pytest.raises(SystemExit, match="pass the patch schedule explicitly \\(--pn=1_2_...\\)"):
        run(raw, *flags, "--out", tmp_path / "x.png")
    got = run(raw, *flags, "--pn", "1_2_3_4", "--out", tmp_path / "raw.png")
    want = run(ckpt, *flags, "--out", tmp_path / "ours.png")
    assert np.array_equal(np.asarray(Image.open(got)), np.asarray(Image.open(want)))
    with pytest.raises(SystemExit, match="--pn=1_2_4, but ours.pth holds patch_nums 1_2_3_4"):
        run(variant(ckpt, tmp_path / "ours.pth", lambda c: None), *flags, "--pn", "1_2_4", "--out", tmp_path / "y.png")


def test_a_raw_intra_scale_file_samples_as_intra_with_arch_intra(tiny_mvar, tmp_path, caplog):
    """The keys of the intra-scale ablation are VAR's: --arch=intra was refused ('holds arch=var') and without it
    the file sampled silently as VAR (block-causal global attention)."""
    vae, mvar = tiny_mvar(arch="intra", num_classes=10)
    raw, tok = tmp_path / "raw_intra.pth", tmp_path / "vae.pth"
    torch.save(mvar.state_dict(), raw)
    torch.save({k: v for k, v in mvar_checkpoint(mvar, vae).items() if k.startswith("vae")}, tok)

    def opened(*flags):
        args = sample.parse_args(["--ckpt", str(raw), "--vae_ckpt", str(tok), "--pn", "1_2_3_4", *flags])
        return sample.open_model(args, torch.device("cpu"))[0]

    intra = opened("--arch", "intra")
    assert intra.config.arch == "intra" and all(torch.equal(v, intra.state_dict()[k])
                                                for k, v in mvar.state_dict().items())
    assert "has attention and no Mamba" not in caplog.text
    assert opened().config.arch == "var"
    assert "raw_intra.pth has attention and no Mamba: read as VAR (--arch=intra for the intra-scale" in caplog.text
    # an architecture the keys rule out is named as such (it failed at the strict load, listing missing keys)
    with pytest.raises(SystemExit, match=r"arch=mvar was asked for \(--arch or --model\), but the weights hold "
                                         r"attention without Mamba2 .*: arch=var"):
        opened("--arch", "mvar")


def test_foreign_tokenizer_of_the_same_shape_is_refused_unless_allowed(ckpt, tmp_path):  # noqa: F811
    """The checkpoint embeds its tokenizer: another one of the same shape decodes its tokens into noise (issue 23)."""
    def to_tokenizer(ck):
        ck["vae"]["decoder.conv_out.weight"] += 0.01
        for k in ("config", "model"):
            del ck[k]
    own = variant(ckpt, tmp_path / "own.pth", lambda ck: [ck.pop(k) for k in ("config", "model")])
    foreign = variant(ckpt, tmp_path / "foreign.pth", to_tokenizer)
    flags = ("--classes", 1, "--num_per_class", 2)
    with pytest.raises(SystemExit, match=r"--vae_ckpt=.*foreign.pth is not the tokenizer --ckpt=.*tiny.pth was "
                                         r"trained with .*--allow_other_tokenizer"):
        run(ckpt, *flags, "--vae_ckpt", foreign, "--out", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    assert run(ckpt, *flags, "--vae_ckpt", foreign, "--allow_other_tokenizer", "--out", tmp_path / "y.png").is_file()
    assert run(ckpt, *flags, "--vae_ckpt", own, "--out", tmp_path / "z.png").is_file()  # a copy of its own is fine


def test_second_fid_dump_into_a_live_folder_is_refused(ckpt, tmp_path):  # noqa: F811
    """Issue 23: two dumps into one folder memory-mapped the same temporary .npy (SIGBUS, or a missing file)."""
    import socket
    import subprocess
    import sys

    from utils.run import lock as run_lock

    folder = tmp_path / "tiny-cfg1.5-topk20-topp0.96-seed0-n1"
    folder.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / run_lock.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid,
                                                            "start": run_lock._process_start(other.pid)}))
        with pytest.raises(SystemExit, match=f"error: .*{folder.name} is in use by a live run: .*pid {other.pid}"):
            run(ckpt, *FID, "--fid_dir", tmp_path)
    finally:
        other.kill()
        other.wait()
    assert not list(folder.glob("*.png")) and not (folder / "settings.json").exists()
    assert run(ckpt, *FID, "--fid_dir", tmp_path).is_file()  # the owner is gone: its lock is stale
    assert not (folder / run_lock.LOCK_NAME).exists()  # released at the end


def ctrl_c():
    raise KeyboardInterrupt


def sigterm():
    os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, before the call returns


def interrupted_after_one_batch(make_generate, stop):
    """sample.make_generate whose generator calls `stop` when asked for the second batch."""
    def make(*args):
        generate, calls = make_generate(*args), []

        def gen(label_B, g_seed):
            calls.append(1)
            if len(calls) == 2:
                stop()
            return generate(label_B, g_seed)
        return gen
    return make


@pytest.mark.parametrize("stop, raised", [(ctrl_c, KeyboardInterrupt), (sigterm, SystemExit)])
@pytest.mark.parametrize("out", ["grid.png", "folder"])
def test_interrupted_picture_run_writes_the_finished_images(ckpt, tmp_path, monkeypatch, out, stop, raised):  # noqa: F811
    """Issue 23: a Ctrl-C after minutes of a grid run wrote nothing; a review found the same of SIGTERM (a scheduler's
    stop), which now ends the run with status 143 after writing the finished rows."""
    monkeypatch.setattr(sample, "make_generate", interrupted_after_one_batch(sample.make_generate, stop))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(raised) as e:
        run(ckpt, "--classes", 1, 2, "--num_per_class", 3, "--bs", 3, "--out", tmp_path / out)
    assert raised is KeyboardInterrupt or e.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == handler  # put back
    if out == "folder":
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == [f"class0001_{k:03d}.png" for k in range(3)]
    else:
        with Image.open(tmp_path / out) as im:
            assert im.size == (3 * 10 + 2, 10 + 2)  # the finished row: 3 images of 8 px, padding 2


def test_a_tokenizer_of_another_shape_is_refused_with_or_without_the_allow_flag(ckpt, tmp_path):  # noqa: F811
    """The message used to say "same shapes, other weights ... pass --allow_other_tokenizer", and with that flag the
    model then refused the tokenizer: a vocabulary or latent width of another size fits no flag."""
    config = torch.load(ckpt, weights_only=True)["vae_config"]
    other = VQVAE(**{**config, "vocab_size": config["vocab_size"] // 2, "test_mode": True})
    path = tmp_path / "other_vae.pth"
    torch.save({"vae_config": {**config, "vocab_size": other.vocab_size}, "vae": other.state_dict()}, path)
    for allow in ((), ("--allow_other_tokenizer",)):
        with pytest.raises(SystemExit) as e:
            run(ckpt, "--classes", 1, "--vae_ckpt", path, *allow, "--out", tmp_path / "x.png")
        message = str(e.value)
        assert f"other_vae.pth (V={other.vocab_size}, Cvae=" in message and "does not fit" in message, message
        assert "--allow_other_tokenizer" not in message and "same shapes" not in message


@pytest.mark.parametrize("device, message", [("cuda", "no CUDA device here"), ("gpu0", "--device=gpu0: "),
                                             ("mps", "--device=mps: torch cannot allocate there")])
def test_a_device_that_is_not_there_is_a_flag_error(device, message, capsys):
    if device == "cuda" and torch.cuda.is_available() or device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"this machine has {device}")
    with pytest.raises(SystemExit):
        sample.parse_args(["--ckpt", "x.pth", "--device", device])
    assert message in capsys.readouterr().err


def test_a_cuda_device_is_checked_against_the_gpu_count_without_touching_a_gpu(monkeypatch):
    """cuda:N beyond the GPUs is refused; a CUDA device that exists is not allocated on (under torchrun every rank
    would open a context on GPU 0 before picking its own)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: pytest.fail("allocated on a CUDA device"))
    assert device_problem("cuda:5") == "--device=cuda:5: this machine has 2 CUDA device(s), cuda:0 to cuda:1"
    assert device_problem("cuda") is None and device_problem("cuda:1") is None


def test_fid_refuses_a_device_that_is_not_there(tmp_path, capsys):
    from scripts import fid
    (tmp_path / "s.npz").touch()
    with pytest.raises(SystemExit):
        fid.main(["--sample", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--device", "gpu0"])
    assert "--device=gpu0: " in capsys.readouterr().err


def test_out_with_an_image_suffix_that_is_a_folder_fails_before_loading(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """A review saw `--out X.png` naming an existing folder fail only after all the sampling."""
    def must_not_run(*a, **k):
        raise AssertionError("loaded before checking the output")

    monkeypatch.setattr(sample, "load_checked", must_not_run)
    (tmp_path / "X.png").mkdir()
    with pytest.raises(SystemExit, match=r"^error: --out=.*X.png is a folder, but its suffix asks for one image"):
        run(ckpt, "--classes", 1, "--out", tmp_path / "X.png")


def test_a_class_given_twice_gets_files_of_its_own(ckpt, tmp_path):  # noqa: F811
    """`--classes 1 1` into a folder wrote the second row over the first (and logged 4 images for 2 files)."""
    folder = run(ckpt, "--classes", 1, 1, "--num_per_class", 2, "--out", tmp_path / "imgs")
    assert sorted(p.name for p in folder.iterdir()) == [f"class0001_{k:03d}.png" for k in range(4)]
    grid = run(ckpt, "--classes", 1, 1, "--num_per_class", 2, "--out", tmp_path / "grid.png")
    cells = [np.asarray(Image.open(folder / f"class0001_{k:03d}.png")) for k in range(4)]
    with Image.open(grid) as im:
        g = np.asarray(im)
    assert all(np.array_equal(cells[2 * r + k], g[2 + r * 10:10 + r * 10, 2 + k * 10:10 + k * 10])
               for r in range(2) for k in range(2))


@pytest.mark.parametrize("precision, advice", [((), "overflowed: try a smaller --cfg"),
                                               (("--fp16",), "overflowed: try --bf16 (fp16 overflows past 65504)")])
def test_overflow_advice_fits_the_precision(ckpt, tmp_path, monkeypatch, precision, advice):  # noqa: F811
    """The advice said "try fp32" to a run already in fp32."""
    from models.mvar import MVAR

    real = MVAR.run_blocks
    monkeypatch.setattr(MVAR, "run_blocks", lambda self, *a: real(self, *a) * math.nan)
    with pytest.raises(SystemExit, match=re.escape(advice)):
        run(ckpt, "--classes", 1, *precision, "--out", tmp_path / "x.png")


def test_a_numbered_gpu_under_torchrun_is_refused():
    """A review found that an explicit --device cuda:0 under torchrun put every rank on GPU 0 (torch.device builds
    without touching a GPU, so this runs anywhere)."""
    own = torch.device("cuda", 3)
    assert sample.device_of_rank(None, own, 8) == own
    assert sample.device_of_rank("cuda", own, 8) == torch.device("cuda")  # the current device: set_device's
    assert sample.device_of_rank("cuda:0", own, 1) == torch.device("cuda", 0)
    with pytest.raises(SystemExit, match="--device=cuda:0 would put all 8 ranks on that one GPU"):
        sample.device_of_rank("cuda:0", own, 8)


def test_a_picture_folder_holding_images_gets_a_warning(ckpt, tmp_path, capsys):  # noqa: F811
    """Two runs into one folder left a mix (the second's images over the first's of the same names) without a word."""
    run(ckpt, "--classes", 0, "--num_per_class", 3, "--out", tmp_path / "imgs")
    assert "already holds" not in capsys.readouterr().out
    run(ckpt, "--classes", 0, "--num_per_class", 1, "--seed", 2, "--out", tmp_path / "imgs")
    assert re.search(r"--out=.*imgs already holds 3 class\*\.png images: this run's replace those of the same names",
                     capsys.readouterr().out)


def test_a_grid_its_format_cannot_hold_is_refused_before_sampling(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """A review: --out g.ico wrote the grid shrunk to an icon without a word, and a WebP grid over 16,383 px failed
    with a traceback after every image was sampled, losing them. The format is checked before the model loads, the
    size once its resolution is known; a PNG of the same size is fine."""
    monkeypatch.setattr(sample, "make_generate", lambda *a, **k: pytest.fail("sampled before the check"))
    with pytest.raises(SystemExit, match=r"g\.ico: a grid is written as PNG, JPEG, WebP, TIFF or BMP .*not ICO"):
        run(ckpt, "--classes", 1, "--out", tmp_path / "g.ico")
    # 8 px images: 1,700 in a row are 17,002 px wide
    with pytest.raises(SystemExit, match=r"wide\.webp: the grid would be 17002x12 px \(1 rows of 1700 images of 8 "
                                         r"px\), over WEBP's 16383 px"):
        run(ckpt, "--classes", 1, "--num_per_class", 1700, "--out", tmp_path / "wide.webp")
    assert not list(tmp_path.iterdir())
    from utils.sample_io import grid_size_problem
    assert grid_size_problem(tmp_path / "wide.png", 1, 1700, 8) is None
    assert grid_size_problem(tmp_path / "ok.webp", 1, 1638, 8) is None  # 16,382 px


def test_a_grid_of_exactly_its_formats_limit_is_written_one_pixel_more_is_refused(tmp_path):
    """WebP takes 16,383 px a side: a grid of exactly that is fine, 16,384 refused (with the padding: 1 image of
    16,379 px is 2 + 16,379 + 2). A mutation review: refusing the limit itself passed the suite (16,382 and 17,002
    px were its cases)."""
    from utils.sample_io import grid_size_problem

    assert grid_size_problem(tmp_path / "g.webp", 1, 1, 16_379) is None
    assert grid_size_problem(tmp_path / "g.webp", 1, 1, 16_380) == (
        f"{tmp_path / 'g.webp'}: the grid would be 16384x16384 px (1 rows of 1 images of 16380 px), over WEBP's "
        "16383 px: write a .png, fewer images per row or class, or a folder (an --out without an image suffix)")
    assert grid_size_problem(tmp_path / "g.jpg", 6549, 1, 8) is None  # JPEG's 65,500 px: 6,549 rows of 10 px + 2
    assert "would be 12x65502 px (6550 rows of 1 images of 8 px), over JPEG's 65500 px" in \
        grid_size_problem(tmp_path / "g.jpg", 6550, 1, 8)


def test_an_out_suffix_is_an_image_only_where_pil_writes_that_format():
    """--out names an image file where PIL can write its suffix's format, else a folder: .psd is a format PIL only
    reads, so `--out=x.psd` is a folder, as an unknown suffix. A mutation review: any registered suffix taken for an
    image (the grid then failed to save after sampling) passed the suite."""
    from utils.sample_io import is_image_file

    assert [is_image_file(p) for p in ("a.png", "a.JPG", "a.webp", "a.tif")] == [True] * 4
    assert [is_image_file(p) for p in ("a.psd", "a.xyz", "samples", "run.d16")] == [False] * 4


def test_non_finite_pixels_are_counted_by_kind():
    """The error counts NaN and Inf apart (NaN: an invalid operation, Inf: an overflow; the advice differs). A
    mutation review: the two counts swapped passed the suite, whose broken batches held one kind only."""
    from utils.sample_io import NonFiniteValueError, check_finite_images

    check_finite_images(torch.zeros(2, 3), "fine")
    img = torch.tensor([[math.nan, math.nan, 0.5], [math.inf, -math.inf, math.nan]])
    with pytest.raises(NonFiniteValueError) as e:
        check_finite_images(img, "the decoder")
    assert str(e.value) == "the decoder produced non-finite pixels (3 NaN, 2 Inf of 6 values); no image of this " \
        "batch was written"


def test_pictures_are_written_atomically(tmp_path, monkeypatch):
    """A review: the grid and the folder's PNGs were written in place, so a kill while writing left a truncated image
    under the final name, taken for a result later. A write that fails now leaves the old file and no temporary one."""
    from utils.sample_io import save_folder, save_grid

    imgs_BHW3 = np.zeros((2, 4, 4, 3), np.uint8)
    grid, folder = save_grid(imgs_BHW3, tmp_path / "g.jpg", ncol=2), save_folder(imgs_BHW3, tmp_path / "f", "ab")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert len(before) == 3 and Image.open(grid).format == "JPEG"

    def killed(self, fp, *args, **kwargs):
        with open(fp, "wb") if isinstance(fp, (str, os.PathLike)) else contextlib.nullcontext(fp) as f:
            f.write(b"trunc")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", killed)
    for write in (lambda: save_grid(imgs_BHW3 + 1, grid, ncol=2), lambda: save_folder(imgs_BHW3 + 1, folder, "ab")):
        with pytest.raises(KeyboardInterrupt):
            write()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_sigterm_during_an_fid_dump_unwinds_and_the_rerun_finishes(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """A review: SIGTERM (a preemption) ended an FID dump without its `finally`, leaving the folder's lock to age
    and, while packing, the array-sized `.npy.tmp`, which the rerun's free-space check then counted as used. The
    rerun also deletes the hidden temporary files a SIGKILL leaves (a PNG's, the settings')."""
    monkeypatch.setattr(sample, "make_generate", interrupted_after_one_batch(sample.make_generate, sigterm))
    with pytest.raises(SystemExit) as e:
        run(ckpt, *FID, "--fid_dir", tmp_path)
    assert e.value.code == 128 + signal.SIGTERM
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert not (folder / LOCK_NAME).exists() and list(folder.glob("*.png"))  # released; the batch kept
    monkeypatch.undo()
    stale = [tmp_path / f"{folder.name}.npy.tmp", tmp_path / f"{folder.name}.npz.tmp",  # a killed packing's
             temp_path(folder / "000003.png", 99999), temp_path(folder / "settings.json", 99998)]  # SIGKILL's
    for path in stale:
        path.write_bytes(b"x")
    assert run(ckpt, *FID, "--fid_dir", tmp_path).is_file() and not any(p.exists() for p in stale)


def test_edits_pass_every_sampling_flag_and_seed_each_chunk(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """--edit passes --cfg, --top_k, --top_p and --more_smooth to autoregressive_edit_cfg, and the chunk j of class c
    is drawn from chunk_seed(--seed, c + j x classes): a dropped flag or a seed shared by the classes passed unseen."""
    from models.mvar import MVAR
    from utils.evaluation.fid_dump import chunk_seed

    calls = []

    def fake(self, img, mask, cls, **kw):
        calls.append((len(img), cls, kw))
        return img.clone()
    monkeypatch.setattr(MVAR, "autoregressive_edit_cfg", fake)
    run(ckpt, "--edit", edit_image(tmp_path), "--box", "0,4,8,8", "--classes", 1, 2, "--num_per_class", 3,
        "--bs", 2, "--cfg", 2.5, "--top_k", 7, "--top_p", 0.8, "--more_smooth", "--seed", 3,
        "--out", tmp_path / "e.png")
    flags = dict(cfg=2.5, top_k=7, top_p=0.8, more_smooth=True)
    assert calls == [(2, 1, dict(g_seed=chunk_seed(3, 0), **flags)), (1, 1, dict(g_seed=chunk_seed(3, 2), **flags)),
                     (2, 2, dict(g_seed=chunk_seed(3, 1), **flags)), (1, 2, dict(g_seed=chunk_seed(3, 3), **flags))]


def test_outside_original_pastes_the_images_own_pixels_outside_the_mask_only(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """--outside original: the edit inside the mask, the image as the model sees it (the row's first cell) outside;
    the two swapped (the edit pasted over the kept region) passed the suite."""
    from models.mvar import MVAR

    monkeypatch.setattr(MVAR, "autoregressive_edit_cfg", lambda self, img, *a, **k: torch.full_like(img, 0.25))
    out = run(ckpt, "--edit", edit_image(tmp_path), "--box", "0,4,8,8", "--classes", 1, "--num_per_class", 1,
              "--outside", "original", "--out", tmp_path / "e.png")
    grid = np.asarray(Image.open(out))
    before, mask, edit = (grid[2:10, 2 + k * 10:10 + k * 10] for k in range(3))
    assert (mask[4:] == 255).all() and (mask[:4] == 0).all()  # the box: rows 4-7
    assert (edit[4:] == 64).all()  # round(0.25 * 255): the edit inside the box
    assert np.array_equal(edit[:4], before[:4]) and len(np.unique(before[:4])) > 2  # the image's own pixels outside


def test_an_interrupted_grid_keeps_its_rows_of_num_per_class_when_bs_differs(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """The grid a Ctrl-C writes has --num_per_class images per row, as the finished run's: its test used --bs equal
    to --num_per_class, so a grid of --bs per row passed it. Here the first batch of 4 is two rows of 2, the cells
    those of a folder run."""
    flags = ("--classes", 1, 2, 3, "--num_per_class", 2, "--bs", 4)
    folder = run(ckpt, *flags, "--out", tmp_path / "cells")
    monkeypatch.setattr(sample, "make_generate", interrupted_after_one_batch(sample.make_generate, ctrl_c))
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, *flags, "--out", tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as im:
        g = np.asarray(im)
    assert g.shape == (2 * 10 + 2, 2 * 10 + 2, 3)  # 2 rows (classes 1, 2) of 2 images of 8 px, padding 2
    for r, cls in enumerate((1, 2)):
        for k in range(2):
            cell = np.asarray(Image.open(folder / f"class{cls:04d}_{k:03d}.png"))
            assert np.array_equal(cell, g[2 + r * 10:10 + r * 10, 2 + k * 10:10 + k * 10])


def test_fp16_and_bf16_sample_pictures_and_edits_in_their_own_dtype(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """--fp16 samples under float16 and --bf16 under bfloat16 (fp32 where this CPU has no bf16 instructions), for
    pictures and edits: the two dtypes swapped passed the suite (the overflow advice named the flag, not the dtype)."""
    from models.mvar import MVAR
    from models.precision import effective_amp_dtype

    seen, real = [], MVAR.inference_precision
    monkeypatch.setattr(MVAR, "inference_precision", lambda self, dtype: seen.append(dtype) or real(self, None))
    monkeypatch.setattr(MVAR, "autoregressive_infer_cfg", lambda self, B, *a, **k: torch.full((B, 3, 8, 8), 0.5))
    monkeypatch.setattr(MVAR, "autoregressive_edit_cfg", lambda self, img, *a, **k: img.clone())
    bf16 = torch.bfloat16 if effective_amp_dtype(torch.device("cpu"), torch.bfloat16) is not None else None
    for precision, dtype in (((), None), (("--fp16",), torch.float16), (("--bf16",), bf16)):
        seen.clear()
        run(ckpt, "--classes", 1, "--num_per_class", 1, *precision, "--out", tmp_path / "p")
        run(ckpt, "--edit", edit_image(tmp_path), "--box", "0,4,8,8", "--classes", 1, "--num_per_class", 1,
            *precision, "--out", tmp_path / "e.png")
        assert seen == [dtype, dtype], (precision, seen)
