"""Multi-scale VQVAE tokenizer: VAR layout, quantizer round trips, training loss, loading."""
import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from models.loading import StateDictMismatchError, load_state_dict_checked, load_vae, vae_checkpoint
from models.presets import PATCH_NUMS, parse_patch_nums
from models.quantizer import Phi
from models.tokenizer import VQVAE, VQVAEConfig
from models.vae_nets import AttnBlock, Downsample2x, ResnetBlock, Upsample2x
from models.vq_losses import PatchDiscriminator, hinge_d_loss, hinge_g_loss

pytestmark = pytest.mark.numerics  # rerun by `make test` at the lowest ISA level

TINY = {"vocab_size": 32, "z_channels": 8, "ch": 32, "ch_mult": (1, 2), "v_patch_nums": (1, 2, 4, 8)}  # 16 px images


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def tiny() -> VQVAE:
    vae = VQVAE(**TINY, test_mode=False)
    vae.quantize.embedding.weight.data.normal_(0, 0.5)  # codes at the latents' scale, so scales use many codes
    return vae


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16) * 2 - 1


# ----------------------------------------------------------------------------------------------------------------------
# Full-size layout (meta device: no memory, no init cost)
# ----------------------------------------------------------------------------------------------------------------------

def test_full_size_layout_matches_var_checkpoint():
    with torch.device("meta"):
        vae = VQVAE()
    sd = vae.state_dict()
    assert len(sd) == 324
    assert n_params(vae) == 108_948_355
    assert n_params(vae.encoder) == 44_107_872
    assert n_params(vae.decoder) == 64_653_923
    assert n_params(vae.quantize) == 168_064
    assert (vae.Cvae, vae.V, vae.vocab_size, vae.downsample) == (32, 4096, 4096, 16)

    shapes = {
        "encoder.conv_in.weight": (160, 3, 3, 3),
        "encoder.down.0.block.1.conv2.weight": (160, 160, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (320, 160, 1, 1),
        "encoder.down.4.block.0.nin_shortcut.weight": (640, 320, 1, 1),
        "encoder.down.3.downsample.conv.weight": (320, 320, 3, 3),
        "encoder.down.4.attn.1.qkv.weight": (1920, 640, 1, 1),
        "encoder.down.4.attn.0.proj_out.bias": (640,),
        "encoder.mid.attn_1.norm.weight": (640,),
        "encoder.mid.block_2.norm1.bias": (640,),
        "encoder.conv_out.weight": (32, 640, 3, 3),
        "decoder.conv_in.weight": (640, 32, 3, 3),
        "decoder.up.4.block.2.conv1.weight": (640, 640, 3, 3),
        "decoder.up.4.attn.2.qkv.bias": (1920,),
        "decoder.up.3.block.0.nin_shortcut.weight": (320, 640, 1, 1),
        "decoder.up.1.block.0.nin_shortcut.weight": (160, 320, 1, 1),
        "decoder.up.1.upsample.conv.weight": (160, 160, 3, 3),
        "decoder.conv_out.weight": (3, 160, 3, 3),
        "quant_conv.weight": (32, 32, 3, 3),
        "post_quant_conv.bias": (32,),
        "quantize.embedding.weight": (4096, 32),
        "quantize.quant_resi.qresi_ls.3.weight": (32, 32, 3, 3),
        "quantize.ema_vocab_hit_SV": (10, 4096),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key

    def count(prefix: str, infix: str = "") -> int:
        return sum(k.startswith(prefix) and infix in k for k in sd)

    # encoder: conv_in 2 + 10 blocks*8 + nin 4 + downsample 8 + attn 12 + mid 22 + out 4; decoder: 15 blocks
    assert count("encoder.") == 132 and count("decoder.") == 178 and count("quantize.") == 10
    assert count("encoder.down.", ".attn.") == 12 and count("decoder.up.", ".attn.") == 18
    assert count("encoder.down.", "nin_shortcut") == 4 and count("decoder.up.", "nin_shortcut") == 4
    assert {k.split(".")[2] for k in sd if ".downsample." in k} == {"0", "1", "2", "3"}
    assert {k.split(".")[2] for k in sd if ".upsample." in k} == {"1", "2", "3", "4"}
    assert not any(k.startswith(("decoder.up.0.upsample", "encoder.down.4.downsample")) for k in sd)


def test_test_mode_freezes_and_evals():
    vae = VQVAE(**TINY)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    vae = VQVAE(**TINY, test_mode=False)
    assert vae.training and all(p.requires_grad for p in vae.parameters())


def test_phi_schedule_matches_var_ticks():
    q = VQVAE(**{**TINY, "v_patch_nums": PATCH_NUMS[256][:8]}).quantize  # 4 partially shared phis
    with torch.device("meta"):
        q10 = VQVAE().quantize
    assert [list(q10.quant_resi.qresi_ls).index(q10.phi(si, 10)) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert len(q.quant_resi.qresi_ls) == 4
    shared = VQVAE(**TINY, share_quant_resi=1).quantize
    assert {id(shared.phi(si, 4)) for si in range(4)} == {id(shared.quant_resi.qresi)}
    per_scale = VQVAE(**TINY, share_quant_resi=0).quantize
    assert [per_scale.phi(si, 4) for si in range(4)] == list(per_scale.quant_resi._modules.values())
    assert "quantize.quant_resi.3.weight" in VQVAE(**TINY, share_quant_resi=0).state_dict()


# ----------------------------------------------------------------------------------------------------------------------
# Quantizer round trips on a tiny tokenizer
# ----------------------------------------------------------------------------------------------------------------------

def test_shapes_per_scale(tiny, images):
    with torch.no_grad():
        idx_Bl = tiny.img_to_idxBl(images)
        assert [tuple(i.shape) for i in idx_Bl] == [(2, 1), (2, 4), (2, 16), (2, 64)]
        assert all(i.dtype == torch.long and 0 <= i.min() and i.max() < 32 for i in idx_Bl)
        var_in = tiny.quantize.idxBl_to_var_input(idx_Bl)
        assert var_in.shape == (2, 4 + 16 + 64, 8) and var_in.dtype == torch.float32
        imgs = tiny.idxBl_to_img(idx_Bl, same_shape=True)
        assert [tuple(x.shape) for x in imgs] == [(2, 3, 16, 16)] * 4
        small = tiny.idxBl_to_img(idx_Bl, same_shape=False)
        assert [tuple(x.shape) for x in small] == [(2, 3, 2 * pn, 2 * pn) for pn in (1, 2, 4, 8)]
        last = tiny.idxBl_to_img(idx_Bl, same_shape=True, last_one=True)
        assert torch.equal(last, imgs[-1]) and last.abs().max() <= 1
        recon = tiny.img_to_reconstructed_img(images)
        assert len(recon) == 4 and torch.equal(recon[-1], tiny.img_to_reconstructed_img(images, last_one=True))
        assert torch.equal(recon[-1], imgs[-1])
        with pytest.raises(ValueError, match=r"3 scales of code maps given, the schedule \(1, 2, 4, 8\) has 4"):
            tiny.idxBl_to_img(idx_Bl[:3], same_shape=True)  # decoded at 4x4 with the wrong phis, silently


def test_indices_are_nearest_codes_of_the_residual(tiny, images):
    with torch.no_grad():
        f = tiny.img_to_f(images)
        idx_Bl = tiny.img_to_idxBl(images)
        codes = tiny.quantize.embedding.weight
        f_hats = tiny.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)  # the running reconstruction after each scale
        for si, pn in enumerate(tiny.v_patch_nums):  # every scale codes what the earlier ones left, area-pooled
            rest = f if si == 0 else f - f_hats[si - 1]
            rest_NC = F.interpolate(rest, size=(pn, pn), mode="area").permute(0, 2, 3, 1).reshape(-1, 8)
            assert torch.equal(idx_Bl[si].flatten(), torch.cdist(rest_NC, codes).argmin(1)), si
        assert len(set(torch.cat(idx_Bl, 1).flatten().tolist())) > 8  # a real code book, not a collapsed one


def test_var_input_equals_downsampled_encoder_fhat(tiny, images):
    pns = tiny.v_patch_nums
    with torch.no_grad():
        f = tiny.img_to_f(images)
        idx_Bl = tiny.quantize.f_to_idxBl_or_fhat(f, to_fhat=False)
        f_hats = tiny.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)
        var_in = tiny.quantize.idxBl_to_var_input(idx_Bl)
        expected = torch.cat([F.interpolate(f_hats[si], size=(pns[si + 1],) * 2, mode="area").flatten(2).transpose(1, 2)
                              for si in range(len(pns) - 1)], dim=1)
    # measured bit-identical (AVX2 and ATEN_CPU_CAPABILITY=default); 1e-6 is ~8 ulp of the latents' range (|f| < 4)
    torch.testing.assert_close(var_in, expected, rtol=0, atol=1e-6)


def test_autoregressive_rebuild_equals_encoder_fhat(tiny, images):
    q, pns = tiny.quantize, tiny.v_patch_nums
    with torch.no_grad():
        f = tiny.img_to_f(images)
        idx_Bl = q.f_to_idxBl_or_fhat(f, to_fhat=False)
        f_hats = q.f_to_idxBl_or_fhat(f, to_fhat=True)
        var_in = q.idxBl_to_var_input(idx_Bl)
        f_hat, inputs = torch.zeros_like(f), []
        for si, pn in enumerate(pns):
            before = f_hat.clone()
            f_hat, next_BChw = q.get_next_autoregressive_input(si, len(pns), f_hat, q.idxBl_to_h(idx_Bl[si], pn, pn))
            assert not torch.equal(before, f_hat)
            if si < len(pns) - 1:
                inputs.append(next_BChw.flatten(2).transpose(1, 2))
            else:
                assert next_BChw is f_hat
    # the same residual sums in the same order: measured bit-identical at both ISA levels; 1e-6 as above
    torch.testing.assert_close(f_hat, f_hats[-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat(inputs, 1), var_in, rtol=0, atol=1e-6)


def test_patch_nums_must_end_at_latent_size(tiny, images):
    with pytest.raises(ValueError, match="latent size"):
        tiny.img_to_idxBl(images, v_patch_nums=(1, 2, 4))
    assert [i.shape[1] for i in tiny.img_to_idxBl(images, v_patch_nums=(1, 3, 8))] == [1, 9, 64]


# ----------------------------------------------------------------------------------------------------------------------
# Training forward: loss, straight-through gradients, usage tracking
# ----------------------------------------------------------------------------------------------------------------------

def test_training_forward_loss_and_gradients(tiny, images):
    rec, usages, vq_loss = tiny(images, ret_usages=True)
    assert len(usages) == 4
    assert rec.shape == images.shape and torch.isfinite(vq_loss)
    with torch.no_grad():
        f = tiny.img_to_f(images)
        f_hats = tiny.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)
        expected = sum(F.mse_loss(fh, f) for fh in f_hats) * (1 + tiny.quantize.beta) / len(f_hats)
        torch.testing.assert_close(rec, tiny.decoder(tiny.post_quant_conv(f_hats[-1])), rtol=0, atol=1e-5)
    torch.testing.assert_close(vq_loss, expected, rtol=1e-5, atol=0)

    (F.mse_loss(rec, images) + vq_loss).backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "decoder.conv_out.weight", "post_quant_conv.weight",
                 "quantize.embedding.weight", "quantize.quant_resi.qresi_ls.0.weight"):
        grad = tiny.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_every_gradient_has_its_parameters_strides(tiny, images):
    """DDP copies each gradient into a bucket laid out as its parameter and warns "Grad strides do not match bucket
    view strides" where they differ: the attention blocks fed proj_out a channels-last view of their output (a
    transposed (B, L, C) read as (B, C, H, W)), whose 1x1 conv weight gradient came out (C, 1, C, C)-strided, so
    every torchrun of scripts/train_tokenizer.py printed that warning on each rank."""
    rec, _, vq_loss = tiny(images)
    (F.mse_loss(rec, images) + vq_loss).backward()
    odd = [(n, p.stride(), p.grad.stride()) for n, p in tiny.named_parameters()
           if p.grad is not None and p.grad.stride() != p.stride()]
    assert not odd, odd


def test_quantizer_commitment_and_straight_through_gradients(tiny):
    q = tiny.quantize
    f = (torch.randn(2, 8, 8, 8) * 0.5).requires_grad_()
    with torch.no_grad():
        f_hats = q.f_to_idxBl_or_fhat(f, to_fhat=True)
    f_hat, _, vq_loss = q(f)
    assert torch.equal(f_hat, f_hats[-1] - f.detach() + f.detach())  # forward value: the quantized latent
    (grad_f,) = torch.autograd.grad(vq_loss, f, retain_graph=True)
    commitment = sum(2 * (f.detach() - fh) / f.numel() for fh in f_hats) * q.beta / len(f_hats)
    torch.testing.assert_close(grad_f, commitment)  # only the beta term reaches the encoder side
    weights = torch.randn_like(f)
    (grad_st,) = torch.autograd.grad((f_hat * weights).sum(), f)
    assert torch.equal(grad_st, weights)  # straight-through: identity gradient


def test_phi_formula():
    phi = VQVAE(**TINY).quantize.phi(0, 4)
    with torch.no_grad():
        phi.weight.zero_()
        phi.weight[range(8), range(8), 1, 1] = 3.0  # conv = 3 * identity + 1
        phi.bias.fill_(1.0)
        h = torch.randn(1, 8, 4, 4)
        torch.testing.assert_close(phi(h), 0.5 * h + 0.5 * (3 * h + 1))


@pytest.mark.parametrize("quant_resi", [0.2, -0.2])
def test_phi_blend_weights_the_conv_by_the_ratios_absolute_value(quant_resi):
    """VAR's phi is h * (1 - r) + conv(h) * r: at the default r = 0.5 a blend with the weights swapped gives the same
    values, so a quant_resi of 0.2 tells the two apart (0.8 h + 0.2 conv(h), not 0.2 h + 0.8 conv(h)). r is
    |quant_resi|: -0.2 blends as +0.2 (check_flags allows [-1, 1]); 0 is no phi. A Phi using the signed ratio
    (1.2 h - 0.2 conv(h)), or a negative ratio built as no phi at all, passed the suite (a mutation review)."""
    phi = VQVAE(**{**TINY, "quant_resi": quant_resi}).quantize.phi(0, 4)
    assert isinstance(phi, Phi) and phi.ratio == pytest.approx(0.2)
    with torch.no_grad():
        phi.weight.zero_()
        phi.weight[range(8), range(8), 1, 1] = 1.0  # conv = identity + 2
        phi.bias.fill_(2.0)
        h = torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(phi(h), 0.8 * h + 0.2 * (h + 2), rtol=0, atol=1e-6)
    assert isinstance(VQVAE(**{**TINY, "quant_resi": 0.0}).quantize.phi(0, 4), torch.nn.Identity)


def test_hinge_losses_values_and_signs():
    """The hinge GAN losses at known logits: the discriminator's is 0 when real logits are >= 1 and fake ones <= -1
    and grows on the wrong side (argument order: real, fake); the generator's is -mean(D(fake)), so it falls as the
    discriminator is fooled."""
    assert hinge_d_loss(torch.tensor([2.0]), torch.tensor([-2.0])).item() == 0.0
    assert hinge_d_loss(torch.tensor([-1.0]), torch.tensor([1.0])).item() == 2.0
    assert hinge_d_loss(torch.tensor([0.0, 3.0]), torch.tensor([0.5, -4.0])).item() == 0.5 * (0.5 + 0.75)
    assert hinge_g_loss(torch.tensor([1.0])).item() == -1.0
    assert hinge_g_loss(torch.tensor([2.0, -0.5])).item() == -0.75


def test_straight_through_passes_decoder_grad_to_encoder(tiny, images):
    rec, _, _ = tiny(images)
    rec.sum().backward()  # no vq loss: the encoder gets gradient only through the straight-through estimator
    assert tiny.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tiny.quantize.embedding.weight.grad is None or tiny.quantize.embedding.weight.grad.abs().sum() == 0


def test_usage_tracking(tiny, images):
    reduced = []

    def fake_all_reduce(hits_SV: torch.Tensor) -> None:  # pretend a second rank saw the same batch
        reduced.append(hits_SV.shape)
        hits_SV.mul_(2)

    tiny.quantize.hit_reducer = fake_all_reduce
    with torch.no_grad():
        idx_Bl = tiny.img_to_idxBl(images)
        _, usages, _ = tiny(images, ret_usages=True)
    assert reduced == [(4, 32)]
    hits_SV = torch.stack([2 * i.flatten().bincount(minlength=32).float() for i in idx_Bl])
    assert torch.equal(tiny.quantize.ema_vocab_hit_SV, hits_SV)  # first step copies
    margin = 2 * 2 * 64 / 32 * 0.08
    assert usages == pytest.approx((hits_SV >= margin).float().mean(1).mul(100).tolist())
    assert usages[0] == pytest.approx(100 / 32 * len(idx_Bl[0].unique()))
    with torch.no_grad():
        tiny(images)
    torch.testing.assert_close(tiny.quantize.ema_vocab_hit_SV, hits_SV)  # same batch: EMA fixed point
    # VAR's decay: 0.9 up to its 100th record, one record per scale (a review: 10 steps whatever the scales)
    zeros_SV, ones_SV = torch.zeros(4, 32), torch.ones(4, 32)
    for step, decay in ((24, 0.9), (25, 0.99)):  # 4 scales: records 96..99 at step 24, 100..103 at 25
        tiny.quantize.ema_vocab_hit_SV.copy_(ones_SV)
        tiny.quantize.set_hit_steps(step)
        tiny.quantize._record_hits(zeros_SV)
        assert torch.equal(tiny.quantize.ema_vocab_hit_SV, torch.full((4, 32), decay))
    tiny.eval()
    before = tiny.quantize.ema_vocab_hit_SV.clone()
    with torch.no_grad():
        tiny(images[:1])
    assert torch.equal(tiny.quantize.ema_vocab_hit_SV, before)  # eval does not update the statistics


# ----------------------------------------------------------------------------------------------------------------------
# Config, patch schedules, checkpoints
# ----------------------------------------------------------------------------------------------------------------------

def test_parse_patch_nums():
    assert parse_patch_nums("256") == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert parse_patch_nums(512) == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    assert sum(p * p for p in parse_patch_nums(256)) == 680 and sum(p * p for p in parse_patch_nums(512)) == 2240
    assert parse_patch_nums("1_2_3_4") == (1, 2, 3, 4)
    assert parse_patch_nums([1, 2, 4]) == (1, 2, 4)
    for bad in ("300", 128, "1_3_2", "1__2", "a_b", "", "1,2,3", (0, 1), (2, 2)):
        with pytest.raises(ValueError, match="patch schedule"):
            parse_patch_nums(bad)


def test_config_roundtrip():
    vae = VQVAE(**TINY)
    stored = dataclasses.asdict(vae.config)
    stored["ch_mult"], stored["v_patch_nums"] = list(stored["ch_mult"]), "1_2_4_8"  # as after JSON/YAML
    rebuilt = VQVAE.from_config(stored)
    assert rebuilt.config == vae.config == VQVAEConfig(**{**TINY, "test_mode": True})
    assert VQVAE.from_config(vae.config, v_patch_nums=(1, 8)).v_patch_nums == (1, 8)


def test_save_load_identical_outputs(tiny, images, tmp_path):
    tiny(images)  # fill the usage statistics
    tiny.eval()
    path = tmp_path / "vae.pth"
    torch.save(vae_checkpoint(tiny), path)
    loaded = load_vae(path)
    assert loaded.config == dataclasses.replace(tiny.config, test_mode=True)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        pairs = zip(tiny.img_to_idxBl(images), loaded.img_to_idxBl(images), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
        assert torch.equal(tiny.img_to_reconstructed_img(images, last_one=True),
                           loaded.img_to_reconstructed_img(images, last_one=True))
    for key, value in tiny.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert load_vae(path, test_mode=False).training

    torch.save(tiny.state_dict(), tmp_path / "plain.pth")  # VAR's format: a bare state dict
    assert torch.equal(load_vae(tmp_path / "plain.pth", **TINY).quantize.embedding.weight,
                       tiny.quantize.embedding.weight)


def test_usage_buffer_with_other_scale_count_keeps_ours(tiny, tmp_path):
    sd = tiny.state_dict()
    sd["quantize.ema_vocab_hit_SV"] = torch.ones(10, 32)
    other = VQVAE(**TINY)
    other.load_state_dict(sd)  # plain strict load
    assert torch.equal(other.quantize.ema_vocab_hit_SV, torch.zeros(4, 32))
    torch.save(sd, tmp_path / "ten_scales.pth")
    loaded = load_vae(tmp_path / "ten_scales.pth", **TINY)
    assert loaded.quantize.ema_vocab_hit_SV.shape == (4, 32)
    assert torch.equal(loaded.quantize.embedding.weight, tiny.quantize.embedding.weight)


def test_mismatched_checkpoint_names_the_keys(tiny, tmp_path):
    sd = tiny.state_dict()
    sd["quant_conv.weight"] = torch.zeros(8, 8, 1, 1)
    del sd["decoder.conv_out.bias"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(StateDictMismatchError) as err:
        load_vae(tmp_path / "bad.pth", flag="--vae", **TINY)
    msg = str(err.value)
    assert "decoder.conv_out.bias" in msg and "decoder.extra.weight" in msg and "--vae" in msg
    assert "quant_conv.weight: file (8, 8, 1, 1) vs model (8, 8, 3, 3)" in msg

    wrapped = {f"module.{k}": v for k, v in tiny.state_dict().items()}
    with pytest.raises(StateDictMismatchError, match="DDP/compiled wrapper"):
        load_state_dict_checked(VQVAE(**TINY), wrapped, what="tokenizer")
    target = VQVAE(**TINY)
    dropped = load_state_dict_checked(target, {k: v for k, v in tiny.state_dict().items() if "ema" not in k},
                                      ignore=("quantize.ema_*",))
    assert dropped == [] and torch.equal(target.quant_conv.weight, tiny.quant_conv.weight)


def test_patch_discriminator_layout_is_pix2pixs():
    """PatchGAN as pix2pix: a stride-2 4x4 conv, n_layers 4x4 convs doubling the width up to 8x (stride 2 but the
    last, stride 1), LeakyReLU 0.2, a 4x4 stride-1 conv to one logit per patch: 64 px with 3 layers give 6x6
    logits. Every conv stride 2, a width capped at 4x, ReLU or a 1x1 head passed the suite."""
    disc = PatchDiscriminator(ch=8, n_layers=4)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (8, (4, 4), (2, 2)), (16, (4, 4), (2, 2)), (32, (4, 4), (2, 2)), (64, (4, 4), (2, 2)), (64, (4, 4), (1, 1)),
        (1, (4, 4), (1, 1))]
    assert {m.negative_slope for m in disc.modules() if isinstance(m, torch.nn.LeakyReLU)} == {0.2}
    assert not any(isinstance(m, torch.nn.ReLU) for m in disc.modules())
    with torch.no_grad():
        assert PatchDiscriminator(ch=8, n_layers=3)(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_usage_margin_counts_one_steps_last_scale_tokens_on_all_ranks(tiny):
    """Usage % per scale: codes whose EMA reaches (>=) USAGE_MARGIN of a uniform share of the step's latent tokens,
    B * H * W summed over the ranks (VAR's margin). Counting all scales' tokens, one rank's, or `>` passed the
    suite. 5 images x 64 tokens x 5 ranks / 32 codes * 0.08 = 4.0 exactly; codes at 0.25 * j: j >= 16 used."""
    torch.manual_seed(0)
    tiny.eval()  # reports usage without recording the step
    tiny.quantize.hit_reducer = lambda hits_SV: hits_SV.mul_(5)  # five ranks with this batch
    tiny.quantize.ema_vocab_hit_SV.copy_((torch.arange(32.0) * 0.25).expand(4, 32))
    with torch.no_grad():
        _, usages, _ = tiny(torch.rand(5, 3, 16, 16) * 2 - 1, ret_usages=True)
    assert usages == [50.0] * 4  # > margin: 46.875; all scales: 31.25; one rank: 87.5


# ----------------------------------------------------------------------------------------------------------------------
# Pinned by a mutation review (each test names the mutant that passed the suite before it)
# ----------------------------------------------------------------------------------------------------------------------

def test_a_negative_share_quant_resi_is_refused_by_name():
    """share_quant_resi < 0 is a ValueError naming it; `< -1` as the check passed the suite, and -1 then failed with a
    ZeroDivisionError in phi_ticks."""
    with pytest.raises(ValueError, match="share_quant_resi must be >= 0, got -1"):
        VQVAE(**TINY, share_quant_resi=-1)


def test_a_single_scale_pass_uses_the_phi_at_position_0(tiny, images):
    """A schedule of one scale (a `v_patch_nums=(8,)` override) has no position si / (SN - 1): it takes the phi at 0,
    the first of the four shared ones. Taking the one at 1 (the last) passed the suite."""
    q = tiny.quantize
    with torch.no_grad():
        f = tiny.img_to_f(images)
        (idx_Bl,) = q.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=(8,))
        (f_hat,) = q.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=(8,))
        first, last = q.quant_resi.qresi_ls[0], q.quant_resi.qresi_ls[3]
        assert q.phi(0, 1) is first
        assert torch.equal(f_hat, first(q.idxBl_to_h(idx_Bl, 8, 8)))
        assert not torch.equal(f_hat, last(q.idxBl_to_h(idx_Bl, 8, 8)))


def test_a_loaded_usage_buffer_is_blended_on_a_new_processs_first_step():
    """Only a fresh (all-zero) usage EMA is overwritten by the first step's hits; a buffer loaded from a checkpoint
    (fine-tuning from step 0) is blended at the 0.9 decay. Copying on every first step passed the suite."""
    q = VQVAE(**TINY, test_mode=False).quantize
    q.ema_vocab_hit_SV.fill_(1.0)  # as loaded
    q._record_hits(torch.zeros(4, 32))
    assert torch.equal(q.ema_vocab_hit_SV, torch.full((4, 32), 0.9))
    fresh = VQVAE(**TINY, test_mode=False).quantize
    fresh._record_hits(torch.full((4, 32), 3.0))
    assert torch.equal(fresh.ema_vocab_hit_SV, torch.full((4, 32), 3.0))


def test_set_hit_steps_refuses_a_negative_count():
    """A negative step count would pick decays from records below 0; `< -1` as the check passed the suite."""
    q = VQVAE(**TINY).quantize
    with pytest.raises(ValueError, match="steps must be >= 0, got -1"):
        q.set_hit_steps(-1)
    q.set_hit_steps(0)
    assert q._hit_steps == 0


def test_a_single_scale_schedule_has_an_empty_teacher_forcing_input():
    """With one scale there is no next scale to feed: the input is (B, 0, Cvae), which concatenates after the start
    token as any other; a (B, Cvae, 0) tensor passed the suite."""
    q = VQVAE(**{**TINY, "v_patch_nums": (8,)}).quantize
    var_in = q.idxBl_to_var_input([torch.zeros(2, 64, dtype=torch.long)])
    assert var_in.shape == (2, 0, 8) and var_in.dtype == torch.float32


def test_embed_to_fhat_at_each_scales_size_grows_f_hat_bicubically_through_the_phis(tiny, images):
    """all_to_max_scale=False (VAR's experimental path, idxBl_to_img(same_shape=False)): f_hat starts at the first
    scale's size and, scale by scale, is bicubic-resized to the next and gets phi(codes) added. Area or bilinear
    resizing, or codes added without their phi, passed the suite (only the shapes were checked)."""
    q = tiny.quantize
    with torch.no_grad():
        hs = [q.idxBl_to_h(idx, pn, pn) for idx, pn in zip(tiny.img_to_idxBl(images), tiny.v_patch_nums, strict=True)]
        out = q.embed_to_fhat(hs, all_to_max_scale=False)
        f_hat = torch.zeros(2, 8, 1, 1)
        for si, (h, got) in enumerate(zip(hs, out, strict=True)):
            f_hat = F.interpolate(f_hat, size=h.shape[-2:], mode="bicubic") + q.phi(si, 4)(h)
            assert torch.equal(got, f_hat), si
        assert torch.equal(q.embed_to_fhat(hs, all_to_max_scale=False, last_one=True), f_hat)


def test_usage_buffer_with_fewer_scales_keeps_ours_too(tiny):
    """A stored usage EMA with fewer scales than the model (2 of 4) is replaced by the model's own, like one with more:
    keeping it only when it had more scales passed the suite (the load then failed on a size mismatch)."""
    sd = tiny.state_dict()
    sd["quantize.ema_vocab_hit_SV"] = torch.ones(2, 32)
    other = VQVAE(**TINY)
    other.load_state_dict(sd)
    assert torch.equal(other.quantize.ema_vocab_hit_SV, torch.zeros(4, 32))
    assert torch.equal(other.quantize.embedding.weight, tiny.quantize.embedding.weight)


def test_a_1x1_quant_conv_keeps_the_latent_size(tiny, images):
    """quant_conv_ks=1 pads by 0 (ks // 2), so the latent stays 8x8 and the schedule still ends at it; a padding of
    1 whatever the kernel passed the suite (its 10x10 latent then fails the last-scale check)."""
    vae = VQVAE(**TINY, quant_conv_ks=1)
    assert vae.quant_conv.padding == vae.post_quant_conv.padding == (0, 0)
    with torch.no_grad():
        assert vae.img_to_f(images).shape == (2, 8, 8, 8)
        assert vae.img_to_reconstructed_img(images, last_one=True).shape == images.shape


# ---------------------------------------------------------------- the VAE's layers, by hand

def test_downsample_pads_right_and_bottom_and_upsample_is_nearest():
    """VAR's resamplers: Downsample2x pads one zero column/row on the right/bottom before its stride-2 3x3 conv;
    Upsample2x repeats each pixel 2x2 (nearest) before its 3x3 conv. With one-tap / identity kernels their outputs
    are known exactly. Bilinear upsampling passed the suite; left/top padding was caught only incidentally (a precision
    test's tolerance, a count of codes in use)."""
    x = torch.arange(16.0).view(1, 1, 4, 4)
    down, up = Downsample2x(1), Upsample2x(1)
    with torch.no_grad():
        for conv in (down.conv, up.conv):
            conv.weight.zero_()
            conv.bias.zero_()
        down.conv.weight[0, 0, 2, 2] = 1.0  # out[i, j] = padded[2i + 2, 2j + 2]
        up.conv.weight[0, 0, 1, 1] = 1.0  # identity
        assert torch.equal(down(x), torch.tensor([[[[10.0, 0.0], [0.0, 0.0]]]]))
        assert torch.equal(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def test_resnet_block_is_vars_norm_silu_conv_twice_with_dropout_before_conv2():
    """h = conv2(dropout(silu(norm2(conv1(silu(norm1(x))))))), plus x (or its 1x1 nin_shortcut when the width
    changes); GroupNorm(32) with eps 1e-6, which a small-variance input makes visible. torch's default eps 1e-5 and
    dropout before norm2 passed the suite; no residual was caught only incidentally (as the padding above)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 4, 4, generator=gen) * 1e-3  # variance 1e-6: eps 1e-5 would change the norm by 5x

    def by_hand(block, x):
        def norm(m, t):
            return F.group_norm(t, 32, m.weight, m.bias, eps=1e-6)
        h = block.conv1(F.silu(norm(block.norm1, x)))
        return block.nin_shortcut(x) + block.conv2(F.dropout(F.silu(norm(block.norm2, h)), p=0.5, training=True))

    for out_ch in (32, 64):
        block = ResnetBlock(32, out_ch, dropout=0.5).train()
        with torch.no_grad():
            for m in (block.norm1, block.norm2):  # not the identity affine of a fresh GroupNorm
                m.weight.normal_(generator=gen)
                m.bias.normal_(generator=gen)
            torch.manual_seed(1)
            got = block(x)
            torch.manual_seed(1)
            torch.testing.assert_close(got, by_hand(block, x), rtol=1e-5, atol=1e-6)
    assert isinstance(ResnetBlock(32, 64).nin_shortcut, torch.nn.Conv2d)


def test_attention_block_is_vars_single_head_attention():
    """x + proj_out(v softmax(q^T k / sqrt(C))^T) with q, k, v the qkv conv's three C-channel slices in that order
    (VAR's layout, which its published weights need), on a non-square map. Another slicing, scale or output reshape
    was caught only incidentally (a precision test's tolerance, a code-index test)."""
    gen = torch.Generator().manual_seed(0)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 3, 5, generator=gen)
    with torch.no_grad():
        qkv = block.qkv(block.norm(x)).flatten(2)  # (B, 3C, L)
        q, k, v = qkv[:, :32], qkv[:, 32:64], qkv[:, 64:]
        w = torch.softmax(q.transpose(1, 2) @ k / 32**0.5, dim=2)  # (B, L, L)
        expected = x + block.proj_out((v @ w.transpose(1, 2)).view(2, 32, 3, 5))
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


def test_encoder_and_decoder_run_their_layers_in_vars_order():
    """Attention follows every ResNet block of the lowest-resolution level, and each `mid` is block - attention -
    block; the decoder runs `up` from the last level to the first. Attention after a level's last block only, or a
    `mid` without attention, was caught only by the two-process test's tolerance."""
    vae = VQVAE(**TINY)
    layer = re.compile(r"(conv_in|conv_out|norm_out|mid\.\w+|(down|up)\.\d+\.((block|attn)\.\d+|downsample|upsample))")
    calls = []
    for part in ("encoder", "decoder"):
        for name, m in getattr(vae, part).named_modules():
            if layer.fullmatch(name):
                m.register_forward_hook(lambda *_, name=f"{part}.{name}": calls.append(name))
    with torch.no_grad():
        vae.img_to_reconstructed_img(torch.zeros(1, 3, 16, 16), last_one=True)
    enc = ["conv_in", "down.0.block.0", "down.0.block.1", "down.0.downsample", "down.1.block.0", "down.1.attn.0",
           "down.1.block.1", "down.1.attn.1", "mid.block_1", "mid.attn_1", "mid.block_2", "norm_out", "conv_out"]
    dec = ["conv_in", "mid.block_1", "mid.attn_1", "mid.block_2", "up.1.block.0", "up.1.attn.0", "up.1.block.1",
           "up.1.attn.1", "up.1.block.2", "up.1.attn.2", "up.1.upsample", "up.0.block.0", "up.0.block.1",
           "up.0.block.2", "norm_out", "conv_out"]
    assert calls == [f"encoder.{n}" for n in enc] + [f"decoder.{n}" for n in dec]


def test_vae_widths_off_the_groupnorm_groups_are_refused_by_name():
    """A width that is not a multiple of 32 is a ValueError saying so; without the check torch's GroupNorm said only
    'num_channels must be divisible by num_groups'."""
    with pytest.raises(ValueError, match="VAE widths must be multiples of 32 \\(GroupNorm groups\\); got 48 channels"):
        VQVAE(**{**TINY, "ch": 48})


def test_patch_discriminator_runs_conv_norm_leaky_relu_in_order_and_draws_convs_at_std_0_02():
    """The layer sequence itself (a missing LeakyReLU after the first conv was caught only by a training test's
    tolerance) and pix2pix's init N(0, 0.02) of every conv weight (0.2 likewise)."""
    torch.manual_seed(0)
    disc = PatchDiscriminator(ch=64, n_layers=3)
    kinds = {torch.nn.Conv2d: "conv", torch.nn.GroupNorm: "norm", torch.nn.LeakyReLU: "lrelu"}
    assert [kinds[type(m)] for m in disc.main] == ["conv", "lrelu"] + ["conv", "norm", "lrelu"] * 3 + ["conv"]
    for conv in (m for m in disc.main if isinstance(m, torch.nn.Conv2d)):
        assert conv.weight.mean().abs() < 0.005 and 0.018 < conv.weight.std() < 0.022, conv


def test_patch_discriminator_convs_before_a_groupnorm_have_no_bias():
    """pix2pix's PatchGAN: the convs followed by a norm have no bias (the norm's own shift replaces it), the first and
    the logit conv have one; each bias-free conv is followed by its GroupNorm. Biases on every conv (other state-dict
    keys, so another discriminator on resume) passed the suite."""
    disc = PatchDiscriminator(ch=8, n_layers=3)
    layers = list(disc.main)
    convs = [m for m in layers if isinstance(m, torch.nn.Conv2d)]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert all(isinstance(layers[layers.index(c) + 1], torch.nn.GroupNorm) for c in convs if c.bias is None)
