"""Zero-shot editing: known tokens are the image's own at every scale and feed the model like generated ones, and
the unmasked region is the tokenizer's reconstruction (that a learned model's in-painting follows the class it is
given: tests/test_demo.py, on the demo's model)."""
import re

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from models import editing
from models.editing import token_masks
from test_mvar import ARCHS, assert_logits_equal, build_tiny, build_tiny_stateful, record_sampling
from utils.sample_io import box_mask, load_edit_inputs

pytestmark = pytest.mark.numerics  # rerun by `make test` at the lowest ISA level

IMG = 8  # build_tiny: patch_nums (1, 2, 3, 4) and a 2x tokenizer


def images(B=3, seed=0):
    return torch.rand(B, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def reconstruction(vae, img_B3HW):
    return vae.img_to_reconstructed_img(img_B3HW * 2 - 1, last_one=True).add(1).mul(0.5)


def test_token_mask_rule_regenerates_every_cell_that_touches_the_mask():
    mask = box_mask(IMG, IMG, (0, 5, IMG, IMG))  # rows 5..7 masked
    known = token_masks(mask, (1, 2, 3, 4))
    rows = [k.view(pn, pn)[:, 0].tolist() for k, pn in zip(known, (1, 2, 3, 4), strict=True)]
    # cells span rows [0,8) | [0,4) [4,8) | [0,3) [2,6) [5,8) | [0,2) [2,4) [4,6) [6,8)
    assert rows == [[False], [True, False], [True, False, False], [True, True, False, False]]
    assert all(k.view(-1).tolist() == [True] * k.numel() for k in token_masks(mask & False, (1, 2, 3, 4)))


def test_no_known_token_averages_a_masked_latent_cell():
    """A review: a scale's cells were pooled from the pixels, but its tokens average bins of the 16 x 16 latent (16 px
    cells): at pn = 13, token row 0 covers pixel rows [0, 20) and latent rows 0-1, i.e. pixel rows [0, 32), so a mask
    on rows 26-31 left it known while it carried the masked content."""
    mask = box_mask(256, 256, (0, 26, 256, 32))
    patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    rows = {pn: k.view(pn, pn)[:, 0].tolist() for k, pn in zip(token_masks(mask, patch_nums), patch_nums, strict=True)}
    assert rows[13][:2] == [False, False] and rows[13][2] and rows[10][0] is False  # latent rows 0-1 and 1-2
    assert rows[16][:3] == [True, False, True]  # the last scale: latent row 1 alone


@pytest.mark.parametrize("more_smooth", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_empty_mask_gives_the_tokenizers_reconstruction(arch, more_smooth):
    vae, mvar = build_tiny(arch)
    img = images()
    empty = torch.zeros(IMG, IMG, dtype=torch.bool)
    out, tokens = mvar.autoregressive_edit_cfg(img, empty, 3, g_seed=0, cfg=1.5, top_k=5, more_smooth=more_smooth,
                                               keep_unmasked=False, return_tokens=True)
    for got, want in zip(tokens, vae.img_to_idxBl(img * 2 - 1), strict=True):
        assert torch.equal(got, want)
    # the sampler's code maps are contiguous like idxBl_to_h's, so f_hat and its decoding run the same kernels on
    # the same layouts as the tokenizer's own reconstruction: bit-identical on any CPU
    assert torch.equal(out, reconstruction(vae, img))


@pytest.mark.parametrize("arch", ARCHS)
def test_known_tokens_feed_the_model_like_generated_ones(monkeypatch, arch):
    """The logits drawn from at every scale equal a teacher-forced pass over the edited token maps: the known
    tokens went into the Mamba2 states / KV caches exactly as if the model had generated them."""
    vae, mvar = build_tiny_stateful(arch)
    mvar.eval()  # no label dropout in the teacher-forced pass
    calls = record_sampling(monkeypatch)
    label_B = torch.tensor([1, 7])
    _, tokens = mvar.autoregressive_edit_cfg(images(2), box_mask(IMG, IMG, (2, 3, 7, 8)), label_B, g_seed=3,
                                             cfg=0.0, return_tokens=True)
    logits_sampled = torch.cat([logits for logits, _ in calls], dim=1)
    logits_tf = mvar(label_B, vae.quantize.idxBl_to_var_input(tokens))
    assert_logits_equal(logits_sampled, logits_tf)


def test_tokens_outside_the_mask_never_change_whatever_the_seed():
    vae, mvar = build_tiny()
    img, mask = images(), box_mask(IMG, IMG, (0, 4, IMG, IMG))
    own = vae.img_to_idxBl(img * 2 - 1)
    known = token_masks(mask.expand(3, 1, IMG, IMG), mvar.patch_nums)
    recon = reconstruction(vae, img)
    outs, changed = [], torch.zeros(3, 1, IMG, IMG, dtype=torch.bool)
    for seed in range(4):
        out, tokens = mvar.autoregressive_edit_cfg(img, mask, 2, g_seed=seed, cfg=2.0, top_p=0.9,
                                                   return_tokens=True)
        for got, want, keep in zip(tokens, own, known, strict=True):
            assert torch.equal(got[keep], want[keep])
        assert torch.equal(out[..., :4, :], recon[..., :4, :])  # unmasked pixels: the reconstruction, exactly
        changed |= (out != recon).any(1, keepdim=True)
        outs.append(out)
    assert changed[..., 4:, :].float().mean() > 0.5  # the masked region is regenerated...
    assert not torch.equal(outs[0], outs[1])  # ...differently for each seed
    assert torch.equal(outs[2], mvar.autoregressive_edit_cfg(img, mask, 2, g_seed=2, cfg=2.0, top_p=0.9))


def test_outpainting_keeps_the_center_and_its_tokens():
    vae, mvar = build_tiny("var")
    img, around = images(2), ~box_mask(IMG, IMG, (2, 2, 6, 6))  # regenerate everything but the center
    out, tokens = mvar.autoregressive_edit_cfg(img, around, 5, g_seed=0, top_k=8, return_tokens=True)
    recon = reconstruction(vae, img)
    assert torch.equal(out[..., 2:6, 2:6], recon[..., 2:6, 2:6]) and not torch.equal(out, recon)
    center = tokens[-1].view(2, 4, 4)[:, 1:3, 1:3]  # the 4x4 scale's cells of 2x2 px inside the center
    assert torch.equal(center, vae.img_to_idxBl(img * 2 - 1)[-1].view(2, 4, 4)[:, 1:3, 1:3])


def test_edits_of_one_image_encode_and_reconstruct_it_once(monkeypatch):
    """Several edits of one image (sample.py --edit, the app: the image repeated over the batch) encode it once and
    decode its reconstruction once, not once per edit; the edits are those of the image batch encoded whole."""
    vae, mvar = build_tiny("mvar")
    img = images(1).expand(4, -1, -1, -1)
    mask = box_mask(IMG, IMG, (0, 4, 8, 8))
    encoded, decoded = [], []
    encode, decode = vae.img_to_idxBl, vae.idxBl_to_img
    monkeypatch.setattr(vae, "img_to_idxBl", lambda x, **kw: encoded.append(len(x)) or encode(x, **kw))
    monkeypatch.setattr(vae, "idxBl_to_img", lambda idx, **kw: decoded.append(len(idx[0])) or decode(idx, **kw))
    once = mvar.autoregressive_edit_cfg(img, mask, 3, g_seed=1, top_k=8)
    assert encoded == [1] and decoded == [1]
    monkeypatch.setattr(editing, "all_the_same", lambda x: False)  # every copy encoded and decoded
    whole = mvar.autoregressive_edit_cfg(img, mask, 3, g_seed=1, top_k=8)
    assert encoded[1:] == [4] and decoded[1:] == [4]
    torch.testing.assert_close(once, whole, rtol=0, atol=1e-5)
    assert not torch.equal(once[0], once[1])  # four edits, not one repeated


@pytest.mark.parametrize("arch", ["mvar", "var1+mvar"])
def test_full_mask_is_plain_sampling(arch):
    _, mvar = build_tiny(arch)
    full = torch.ones(1, 1, IMG, IMG)
    kw = dict(label_B=torch.tensor([4, 0]), g_seed=9, cfg=1.5, top_k=10, top_p=0.9)
    edited = mvar.autoregressive_edit_cfg(images(2), full, **kw)
    assert torch.equal(edited, mvar.autoregressive_infer_cfg(2, **kw))


@pytest.mark.parametrize("img, mask, message", [
    (torch.rand(2, 3, 16, 16), torch.zeros(16, 16), r"\(B, 3, 8, 8\)"),
    (torch.rand(2, 3, IMG, IMG) * 2 - 1, torch.zeros(IMG, IMG), r"\[0, 1\]"),
    (torch.rand(2, 3, IMG, IMG), torch.full((IMG, IMG), 0.5), "binary"),
    (torch.rand(2, 3, IMG, IMG), torch.zeros(3, 1, IMG, IMG), "mask: expected"),
    # a review: a NaN pixel passed the range check (comparisons with NaN are false) and was edited from garbage
    # tokens; an empty batch was torch's reduction error
    (torch.rand(2, 3, IMG, IMG).index_fill_(2, torch.tensor([3]), float("nan")), torch.zeros(IMG, IMG), r"\[0, 1\]"),
    (torch.rand(0, 3, IMG, IMG), torch.zeros(IMG, IMG), r"an empty batch"),
])
def test_bad_inputs_are_clear_errors(img, mask, message):
    _, mvar = build_tiny()
    with pytest.raises(ValueError, match=message):
        mvar.autoregressive_edit_cfg(img, mask, 0)


def test_edit_inputs_take_every_value_of_0_1_and_refuse_other_shapes_naming_them():
    """check_edit_inputs directly: a white or black image (exactly 1.0 or 0.0, what a decoded PNG holds) is an
    image; a grey one-channel image, a (B, H, W) mask, an RGB mask and a mask of another batch size are ValueErrors
    naming the shapes; the mask comes back bool, one per image (B, 1, H, W). A review of the mutants: a range check
    of < 1, and each shape check dropped (some then failed inside torch, others broadcast), passed the suite."""
    from models.editing import check_edit_inputs

    mask = torch.zeros(IMG, IMG)
    mask[4:] = 1
    for fill in (0.0, 1.0):
        got = check_edit_inputs(torch.full((3, 3, IMG, IMG), fill), mask, IMG)
        assert got.dtype == torch.bool and got.shape == (3, 1, IMG, IMG)
        assert torch.equal(got, (mask == 1).expand(3, 1, IMG, IMG))
    with pytest.raises(ValueError, match=r"image: expected \(B, 3, 8, 8\) \(the tokenizer's size\), "
                                         r"got \(2, 1, 8, 8\)"):
        check_edit_inputs(torch.rand(2, 1, IMG, IMG), mask, IMG)
    img = torch.rand(3, 3, IMG, IMG)
    with pytest.raises(ValueError, match=r"mask: expected \(H, W\) or \(1 or B, 1, H, W\), got \(3, 8, 8\)"):
        check_edit_inputs(img, torch.zeros(3, IMG, IMG), IMG)
    for shape in ((1, 3, IMG, IMG), (2, 1, IMG, IMG)):
        with pytest.raises(ValueError, match=rf"mask: expected .* with H, W = \(8, 8\), got {re.escape(str(shape))}"):
            check_edit_inputs(img, torch.zeros(shape), IMG)


def test_box_outside_the_image_is_a_clear_error():
    with pytest.raises(ValueError, match=r"0 <= y0 < y1 <= 8"):
        box_mask(IMG, IMG, (0, 6, 8, 9))


def test_a_box_of_no_pixel_is_an_error_and_its_ends_are_exclusive():
    """x1 = x0 or y1 = y0 is an empty box (ends exclusive): refused, as one reaching the image's edge is not. A
    mutation review: a check of x0 <= x1 (a box of no pixel, then "the mask covers no pixel") passed the suite."""
    for box in ((2, 2, 2, 5), (2, 3, 5, 3)):
        with pytest.raises(ValueError, match=re.escape(f"box {box} (x0, y0, x1, y1) must satisfy 0 <= x0 < x1 <= 8")):
            box_mask(IMG, IMG, box)
    mask = box_mask(IMG, IMG, (7, 0, 8, 8))[0, 0]
    assert mask.sum() == 8 and mask[:, 7].all()


def test_an_edits_resize_size_is_torchvisions_truncated_one():
    """_resized_hw is the size torchvision's resize to a shorter side of `reso` gives (the longer side truncated):
    the mask is resized to it with the image, and the two must agree. A 3x4 image to 8 px is 8x10 (10.67
    truncated); rounding (8x11) passed the suite, whose edit images scale to whole sizes."""
    from torchvision.transforms import functional as TF

    from utils.sample_io import _resized_hw

    for h, w in ((3, 4), (4, 3), (12, 17), (7, 7)):
        assert _resized_hw(h, w, IMG) == tuple(TF.resize(torch.zeros(1, h, w), [IMG]).shape[-2:]), (h, w)
    assert _resized_hw(3, 4, IMG) == (8, 10) and _resized_hw(4, 3, IMG) == (10, 8)


def test_edit_inputs_from_a_mask_png_or_a_box(tmp_path):
    Image.fromarray(np.full((12, 16, 3), 200, np.uint8)).save(tmp_path / "img.png")  # 16x12: resized, cropped
    mask = np.zeros((12, 16), np.uint8)
    mask[6:, :] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    img, from_png = load_edit_inputs(tmp_path / "img.png", IMG, mask_path=tmp_path / "mask.png")
    _, from_box = load_edit_inputs(tmp_path / "img.png", IMG, box=(0, 6, 16, 12))
    assert img.shape == (1, 3, IMG, IMG) and torch.allclose(img, torch.full_like(img, 200 / 255), atol=1e-3)
    assert torch.equal(from_png, from_box) and from_png[0, 0, :, 0].tolist() == [False] * 4 + [True] * 4
    Image.fromarray(mask[:8]).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="the mask must have the image's size"):
        load_edit_inputs(tmp_path / "img.png", IMG, mask_path=tmp_path / "small.png")


@pytest.mark.parametrize("transparent", [(255, 255, 255, 0), (0, 0, 0, 0)])
def test_transparent_mask_pixels_are_not_regenerated(tmp_path, transparent):
    """A review found the alpha channel ignored: an editor's transparent-white background regenerated everything."""
    Image.new("RGB", (16, 12), (200, 200, 200)).save(tmp_path / "img.png")
    mask = Image.new("RGBA", (16, 12), transparent)
    mask.paste((255, 255, 255, 255), (0, 6, 16, 12))  # the painted lower half
    mask.save(tmp_path / "mask.png")
    _, from_png = load_edit_inputs(tmp_path / "img.png", IMG, mask_path=tmp_path / "mask.png")
    _, from_box = load_edit_inputs(tmp_path / "img.png", IMG, box=(0, 6, 16, 12))
    assert torch.equal(from_png, from_box)


def test_edit_image_16_bit_and_palette_keep_their_values(tmp_path):
    """Issue 23: convert("RGB") clipped a 16-bit PNG to 255 (the model edited a white blob)."""
    Image.fromarray(np.full((16, 16), 30000, np.uint16)).save(tmp_path / "gray16.png")
    palette = Image.new("P", (16, 16))
    palette.putpalette([40, 80, 120] * 256)
    palette.save(tmp_path / "palette.png")
    img16, _ = load_edit_inputs(tmp_path / "gray16.png", IMG, box=(0, 0, 16, 8))
    pal, _ = load_edit_inputs(tmp_path / "palette.png", IMG, box=(0, 0, 16, 8))
    assert torch.allclose(img16, torch.full_like(img16, 30000 / 65535), atol=1e-3)
    assert torch.allclose(pal[0, :, 0, 0], torch.tensor([40, 80, 120]) / 255, atol=1e-3)


def test_edit_box_is_in_the_pixels_of_the_image_as_displayed(tmp_path):
    """Issue 23: EXIF orientation was ignored, so a box drawn on the image as a viewer shows it was rejected."""
    stored = np.zeros((16, 32, 3), np.uint8)  # 32 wide, 16 high; orientation 6: shown turned 90 degrees clockwise
    stored[:, :16] = 255  # the stored left half is the upper half on screen
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(stored).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    img, mask = load_edit_inputs(tmp_path / "turned.jpg", IMG, box=(0, 16, 16, 32))  # the lower half as shown
    assert img[0, :, :IMG // 2].mean() > 0.9 and img[0, :, IMG // 2:].mean() < 0.1
    assert mask[0, 0, :, 0].tolist() == [False] * 4 + [True] * 4


def test_an_edit_image_longer_than_the_aspect_bound_is_refused_before_decoding(tmp_path):
    """The resize before the centre crop holds reso x reso * W/H pixels: a 59 kB 200000 x 100 PNG took 2.4 GB at
    256 px (a review). Past EDIT_MAX_ASPECT (16:1, either way) the image is refused; at it, it is edited."""
    from utils.sample_io import EDIT_MAX_ASPECT, read_edit_image

    for W, H in ((IMG * (EDIT_MAX_ASPECT + 1), IMG), (3, 3 * EDIT_MAX_ASPECT + 1)):
        Image.new("RGB", (W, H)).save(tmp_path / "long.png")
        with pytest.raises(ValueError, match=f"{W}x{H} px, longer than {EDIT_MAX_ASPECT}:1 .* crop it first"):
            read_edit_image(tmp_path / "long.png", IMG)
    Image.new("RGB", (IMG * EDIT_MAX_ASPECT, IMG)).save(tmp_path / "ok.png")
    middle = IMG * EDIT_MAX_ASPECT // 2  # a box in the centre square, which the model sees
    img, _ = load_edit_inputs(tmp_path / "ok.png", IMG, box=(middle, 0, middle + 1, 1))
    assert img.shape[-2:] == (IMG, IMG)


def test_large_edit_image_is_reduced_while_it_is_read(tmp_path, monkeypatch):
    """Issue 23: an 8000x8000 input for a 16 px model took 2.75 GB; the image reaching the resize is now about twice
    the model's size, and the result is that of the full-size image (a smooth one) within rounding."""
    import utils.sample_io as sample_io

    side = 2048
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rgb = np.stack([np.broadcast_to(ramp, (side, side)), np.broadcast_to(ramp[:, None], (side, side)),
                    np.full((side, side), 128.0)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    mask = np.zeros((side, side), np.uint8)
    mask[1500, 700] = 1  # one pixel: its model pixel is masked (a mask never shrinks)
    Image.fromarray(mask).save(tmp_path / "mask.png")
    seen = []
    real = sample_io._image_to_model_size
    monkeypatch.setattr(sample_io, "_image_to_model_size", lambda img, reso: seen.append(img.shape) or real(img, reso))
    jpg, from_mask = load_edit_inputs(tmp_path / "big.jpg", IMG, mask_path=tmp_path / "mask.png")
    png, _ = load_edit_inputs(tmp_path / "big.png", IMG, box=(0, 0, 1, 1))
    assert all(max(shape[-2:]) <= 4 * IMG for shape in seen), seen
    full = real(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255, IMG)
    for img in (jpg, png):
        assert (img[0] - full).abs().max() < 0.05
    assert from_mask[0, 0].nonzero().tolist() == [[1500 * IMG // side, 700 * IMG // side]]


def test_the_images_tokens_are_made_in_fp32_when_sampling_runs_in_half_precision():
    """A review: under sample.py --bf16/--fp16 the edit's image was tokenized inside the sampling autocast, so its
    known tokens (and the reconstruction kept outside the mask) came from a half-precision encoder and nearest-code
    search, not the fp32 tokenization training uses."""
    from models.editing import known_tokens

    vae, _ = build_tiny()
    seen, real = [], vae.img_to_idxBl

    def spy(inp_B3HW, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), inp_B3HW.dtype))
        return real(inp_B3HW, **kwargs)
    vae.img_to_idxBl = spy
    img, mask = images(B=1), torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = known_tokens(vae, img.bfloat16(), mask, vae.v_patch_nums)
    assert seen == [(False, torch.float32)]
    assert all(torch.equal(a, b) for a, b in zip(inside.idx_Bl, known_tokens(vae, img, mask, vae.v_patch_nums).idx_Bl,
                                                   strict=True))


def test_the_reconstruction_kept_outside_the_mask_is_mapped_to_0_1_in_fp32():
    """A review: under --bf16 the decoder's output was shifted and scaled to [0, 1] in bf16, a second rounding that
    moved about a third of the kept pixels by a level (autoregressive_infer_cfg converts to fp32 first)."""
    from models.editing import known_tokens, paste_unmasked

    vae, _ = build_tiny()
    img, mask = images(B=4), torch.zeros(4, 1, IMG, IMG, dtype=torch.bool)
    known = known_tokens(vae, img, mask, vae.v_patch_nums)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = paste_unmasked(vae, known, torch.zeros(4, 3, IMG, IMG), mask)
        decoded = vae.idxBl_to_img(known.idx_Bl, same_shape=True, last_one=True)
    assert decoded.dtype == torch.bfloat16 and kept.dtype == torch.float32
    assert torch.equal(kept, decoded.float().add(1).mul(0.5))


def test_a_mask_enlarged_to_the_model_covers_every_footprint_it_touches():
    """A review: enlarging a 28 px mask to 32 px by nearest interpolation left model row 18 (image rows
    [15.75, 16.625)) unmasked although image row 16 is masked, so the old content was pasted back there."""
    from utils.sample_io import _mask_to_model_size

    mask = torch.zeros(28, 28, dtype=torch.bool)
    mask[16:] = True
    rows = _mask_to_model_size(mask, 32)[0, 0, :, 0].tolist()
    assert rows[:18] == [False] * 18 and all(rows[18:])  # row 17 covers [14.875, 15.75): unmasked


def test_labels_and_masks_of_another_batch_are_refused_naming_the_shapes():
    """A review: one label for four images failed inside a reshape, four labels for one image broadcast silently,
    and a 5-D mask passed the checks."""
    _, mvar = build_tiny()
    img, mask = torch.rand(1, 3, IMG, IMG), box_mask(IMG, IMG, (0, 4, IMG, IMG))
    with pytest.raises(ValueError, match=r"label_B: expected 1 class ids \(B,\), one per image, got shape \(4,\)"):
        mvar.autoregressive_edit_cfg(img, mask, torch.tensor([1, 2, 3, 4]), g_seed=0)
    with pytest.raises(ValueError, match=r"label_B: expected 2 class ids"):
        mvar.autoregressive_infer_cfg(2, torch.tensor([1]), g_seed=0)
    with pytest.raises(ValueError, match=r"mask: expected \(H, W\) or"):
        mvar.autoregressive_edit_cfg(img, mask[None], 1, g_seed=0)


def test_a_coarse_token_is_regenerated_when_any_latent_cell_of_its_bin_is_masked():
    """One masked pixel masks its latent cell, and at every coarser scale the token whose bin holds that cell, even
    where the cell is a quarter of the bin: a majority (or average) rule would keep a token carrying masked content."""
    mask = box_mask(IMG, IMG, (0, 0, 1, 1))  # pixel (0, 0): latent cell (0, 0) of the 4 x 4 latent
    known = token_masks(mask, (1, 2, 3, 4))
    assert [k.view(-1).tolist().index(False) for k in known] == [0, 0, 0, 0]
    assert [int((~k).sum()) for k in known] == [1, 1, 1, 1]


def test_a_mask_png_marks_the_cells_the_reduced_image_put_its_pixels_in(tmp_path):
    """A review: a large image is reduced by PIL's reduce (blocks of `factor` from the origin), but the mask was
    pooled over blocks of H/h: on a 1045 px PNG (factor 2) a mask from row 65 on left model row 15 (and latent row 0)
    known, where --box for the same rows masks it."""
    from models.editing import token_masks

    side = 1045
    Image.new("RGB", (side, side), (128, 128, 128)).save(tmp_path / "img.png")
    mask = np.zeros((side, side), np.uint8)
    mask[65:300] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    _, from_png = load_edit_inputs(tmp_path / "img.png", 256, mask_path=tmp_path / "mask.png")
    _, from_box = load_edit_inputs(tmp_path / "img.png", 256, box=(0, 65, side, 300))
    assert torch.equal(from_png, from_box) and from_png[0, 0, 15].all()
    assert not token_masks(from_png, [16])[0].view(16, 16)[0].any()


def test_a_box_marks_the_model_rows_its_pixels_went_into(tmp_path):
    """A review: PIL's reduce of a 1600 px image by 3 (534 rows, the last of 1) puts rows 798-800 in reduced row 266,
    which resizes into model row 127 at 256 px; the box was scaled by 534/1600 and masked from row 128 on."""
    Image.new("RGB", (1600, 1600), (128, 128, 128)).save(tmp_path / "img.png")
    _, mask = load_edit_inputs(tmp_path / "img.png", 256, box=(0, 800, 1600, 1600))
    assert mask[0, 0, 127].all()


def test_a_32_bit_integer_tiff_is_refused_and_a_16_bit_png_read(tmp_path):
    """A review: a TIFF of 32-bit integers (mode I) was divided by 65535 as if 16-bit: pixels of 200 read as 0.003,
    a black image edited without a word. 16-bit PNGs keep their range."""
    Image.fromarray(np.full((IMG, IMG), 200, np.int32)).save(tmp_path / "wide.tiff")
    with pytest.raises(ValueError, match=r"wide\.tiff: mode I \(32-bit integer or float pixels"):
        load_edit_inputs(tmp_path / "wide.tiff", IMG, box=(0, 0, IMG, IMG))
    Image.fromarray(np.full((IMG, IMG), 65535, np.uint16)).save(tmp_path / "white.png")
    img, _ = load_edit_inputs(tmp_path / "white.png", IMG, box=(0, 0, IMG, IMG))
    assert torch.allclose(img, torch.ones_like(img))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_box_on_a_turned_jpeg_decoded_at_an_eighth_marks_the_cell_its_pixels_went_into(tmp_path, orientation):
    """A JPEG decoded at 1/8 scale (its draft) averages 8x8 blocks anchored at the stored image's origin, which an
    EXIF orientation puts at another corner of the image as displayed: a box over the displayed pixels of one white
    block marks the one cell that block became, for each orientation. The table of orientations with 6 and 8 (the
    two 90-degree turns) swapped passed the suite, whose turned images were read at full size (no draft)."""
    from PIL import ImageOps

    from utils.sample_io import read_edit_inputs

    stored = np.zeros((130, 138), np.uint8)  # neither side a multiple of 8: the blocks' anchor matters
    stored[:8, :8] = 255  # block (0, 0): one pixel of the draft
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    Image.fromarray(stored).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    shown = Image.fromarray(stored)
    shown.info["exif"] = exif.tobytes()
    ys, xs = np.nonzero(np.asarray(ImageOps.exif_transpose(shown)))  # where the block is displayed
    img, mask = read_edit_inputs(tmp_path / "turned.jpg", IMG, box=(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    assert img.shape[-2:] == ((17, 18) if orientation < 5 else (18, 17))  # read at 1/8
    assert torch.equal(mask, img.mean(0) > 0.5) and mask.sum() == 1


def test_a_mask_png_is_in_the_pixels_of_the_image_as_displayed(tmp_path):
    """A mask PNG with an EXIF orientation is turned as a viewer shows it, like the image (and the box): a mask read
    as stored (a 12x16 mask for a 16x12 image) passed the suite, whose masks carried no orientation."""
    Image.new("RGB", (16, 12), (200, 200, 200)).save(tmp_path / "img.png")
    stored = np.zeros((16, 12), np.uint8)  # orientation 6: shown turned 90 degrees clockwise, 16 wide, 12 high
    stored[:, :6] = 255  # the stored left half is the upper half on screen
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(stored).save(tmp_path / "mask.png", exif=exif)
    _, from_png = load_edit_inputs(tmp_path / "img.png", IMG, mask_path=tmp_path / "mask.png")
    _, from_box = load_edit_inputs(tmp_path / "img.png", IMG, box=(0, 0, 16, 6))
    assert torch.equal(from_png, from_box) and from_png[0, 0, :, 0].tolist() == [True] * 4 + [False] * 4
