"""Tokenizer training (tokenizer_trainer.py; CLI scripts/train_tokenizer.py): loss decreases, dead codes are
re-initialised, GAN terms update the discriminator, and the checkpoint loads through models.loading.load_vae and
resumes."""
import copy
import dataclasses
import functools
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import PER_RANK, REPO, launch, write_image_folder
from models.loading import load_vae
from models.vq_losses import adaptive_gan_weight, build_perceptual_loss, hinge_d_loss, hinge_g_loss
from tokenizer_trainer import TokenizerTrainer, build_parser, build_vae, check_flags, check_resume, evaluate, \
    quantizer_residuals, train
from utils.data.loaders import build_datasets
from utils.run.divergence import NonFiniteError
from utils.run.log import read_scalars

# a step's log line with --w_gan and --gan_weight=adaptive
STEP_RE = re.compile(r"step \d+/\d+ loss ([\d.]+) l1 ([\d.]+) l2 ([\d.]+) vq ([\d.]+) g ([-\d.]+) "
                     r"gan_weight ([\d.]+) d ([\d.]+) grad_norm ([\d.]+)")
TINY = ["--reso=8", "--ch=32", "--ch_mult=1_2", "--z_channels=8", "--vocab_size=64", "--pn=1_2_4", "--bs=16",
        "--mid_reso=1.0", "--reinit_every=0", "--lr=3e-3", "--wp=0", "--dataset=mnist"]


def tiny_args(*extra: str):
    return build_parser().parse_args(TINY + list(extra))


@functools.cache
def mnist_batch(n: int = 16) -> torch.Tensor:
    _, train_set, _ = build_datasets("", "mnist", reso=8, mid_reso=1.0)
    return torch.stack([train_set[i * 4500 // n][0] for i in range(n)])  # digits of every class


def test_reconstruction_loss_goes_down():
    args = tiny_args("--steps=30")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    img = mnist_batch()
    first = trainer.train_step(img)
    for _ in range(28):
        trainer.train_step(img)
    last = trainer.train_step(img, ret_usages=True)
    assert last["l1"] < 0.6 * first["l1"], (first, last)
    assert last["loss"] < first["loss"]
    assert len(last["usage"]) == 3 and all(0 <= u <= 100 for u in last["usage"])


def test_weight_decay_spares_norms_biases_and_the_codebook():
    """--wd decays the weight matrices and kernels only, as VAR's generator: norms and biases decayed toward 0 and a
    codebook shrunk toward the origin are not what a weight decay is for. --wd 0 keeps one group (older runs'
    optimizer states resume)."""
    args = tiny_args("--wd=0.05")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    names = {id(p): n for n, p in trainer.vae.named_parameters()}
    decayed = {names[id(p)] for g in trainer.opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    kept = {names[id(p)] for g in trainer.opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert "quantize.embedding.weight" in kept and "encoder.conv_in.weight" in decayed
    assert all(trainer.vae.get_parameter(n).ndim > 1 for n in decayed)
    assert any(n.endswith("norm.weight") or ".norm" in n for n in kept) and any(n.endswith(".bias") for n in kept)
    plain = TokenizerTrainer(build_vae(tiny_args()), tiny_args(), torch.device("cpu"))
    assert len(plain.opt.param_groups) == 1 and plain.opt.param_groups[0]["weight_decay"] == 0


def test_dead_codes_take_residual_vectors():
    args = tiny_args("--steps=10")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    img = mnist_batch()
    trainer.train_step(img)  # fills the usage EMA and the Adam state
    quantize = trainer.vae.quantize
    dead_before = quantize.ema_vocab_hit_SV.sum(0) == 0
    assert dead_before.any()
    old_W = quantize.embedding.weight.detach().clone()
    rows = quantizer_residuals(trainer.vae.eval(), img)  # what the re-init draws from (before it changes f_hat)
    trainer.vae.train()
    n = trainer.reinit_dead_codes(img, tokens_per_step=16 * (1 + 4 + 16))
    assert n == int(dead_before.sum())
    new_W = quantize.embedding.weight.detach()
    assert torch.equal(new_W[~dead_before], old_W[~dead_before])
    # each new code sits next to one of the residuals the quantizer matches
    nearest = torch.cdist(new_W[dead_before], rows).min(dim=1).values
    assert (nearest < 0.01 * rows.norm(dim=1).mean()).all()
    assert trainer.opt.state[quantize.embedding.weight]["exp_avg"][dead_before].abs().sum() == 0


def test_gan_term_updates_discriminator():
    args = tiny_args("--steps=2", "--w_gan=0.1", "--disc_ch=16", "--disc_layers=1")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    before = [p.detach().clone() for p in trainer.disc.parameters()]
    out = trainer.train_step(mnist_batch(8))
    assert {"g", "d"} <= out.keys()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.disc.parameters(), strict=True))


def gan_trainer(*flags: str) -> TokenizerTrainer:
    """A tiny tokenizer trainer with a discriminator and the adaptive GAN weight, from seed 0."""
    args = tiny_args("--w_gan=0.1", "--gan_weight=adaptive", "--disc_ch=16", "--disc_layers=1", *flags)
    torch.manual_seed(0)
    return TokenizerTrainer(build_vae(args), args, torch.device("cpu"))


@pytest.mark.numerics
@pytest.mark.parametrize("fp16, dtype", [(2, torch.bfloat16), (1, torch.float16)])
def test_low_precision_runs_the_networks_in_it_and_the_code_search_and_losses_in_fp32(monkeypatch, fp16, dtype):
    """--fp16=2 (bf16, forced on any CPU: MVAR_CPU_BF16=1) and --fp16=1 (fp16 with a loss scale): the encoder,
    decoder and discriminator compute in that dtype, the quantizer returns fp32 (its code search runs outside
    autocast), every logged loss is fp32, and the step's losses and adaptive GAN weight are those of the same step in
    fp32 within the low precision's error; MVAR_CPU_BF16=0 trains --fp16=2 in fp32."""
    monkeypatch.setenv("MVAR_CPU_BF16", "1")
    dtypes = {}

    def trainer_with_hooks(*flags: str) -> TokenizerTrainer:
        trainer = gan_trainer(*flags)
        for name, module in (("encoder", trainer.vae.encoder.conv_in), ("decoder", trainer.vae.decoder.conv_out),
                             ("quantizer", trainer.vae.quantize), ("disc", trainer.disc.main[0])):
            module.register_forward_hook(lambda m, i, o, name=name: dtypes.setdefault(name, set()).add(
                (o[0] if isinstance(o, tuple) else o).dtype))
        return trainer

    img = mnist_batch(8)
    half = trainer_with_hooks(f"--fp16={fp16}")
    assert half.amp_dtype == dtype and (half.scaler is not None) == (fp16 == 1)
    out_half = half.train_step(img)
    assert dtypes == {"encoder": {dtype}, "decoder": {dtype}, "quantizer": {torch.float32}, "disc": {dtype}}, dtypes
    quantize = copy.deepcopy(half.vae.quantize).eval()
    f_BChw = half.vae.img_to_f(img).detach()
    with torch.autocast("cpu", dtype=dtype):  # the code search and the VQ loss ignore autocast
        f_hat_low, _, vq_low = quantize(f_BChw)
    f_hat_fp32, _, vq_fp32 = quantize(f_BChw)
    assert torch.equal(f_hat_low, f_hat_fp32) and torch.equal(vq_low, vq_fp32)
    assert (out_half.get("loss_scale") == 2.0**11) if fp16 == 1 else "loss_scale" not in out_half
    dtypes.clear()
    out_full = trainer_with_hooks().train_step(img)
    assert dtypes["decoder"] == {torch.float32}
    for k in ("l1", "l2", "vq", "g", "gan_weight", "d", "loss"):  # measured at most 0.6% (bf16: 3.1% the weight)
        assert out_half[k].dtype == torch.float32 and out_half[k].isfinite(), k
        tol = {torch.bfloat16: 0.03, torch.float16: 0.01}[dtype] * (3 if k == "gan_weight" else 1)
        assert abs(out_half[k] - out_full[k]) <= tol * abs(out_full[k]) + 1e-3, (k, out_half[k], out_full[k])
    monkeypatch.setenv("MVAR_CPU_BF16", "0")
    assert trainer_with_hooks("--fp16=2").amp_dtype is None


def weights(trainer: TokenizerTrainer) -> list[torch.Tensor]:
    """Copies of the tokenizer's parameters, then the discriminator's."""
    return [p.detach().clone() for p in (*trainer.vae.parameters(), *trainer.disc.parameters())]


def networks_changed(trainer: TokenizerTrainer, before: list[torch.Tensor]) -> tuple[bool, bool]:
    """Whether any parameter of the tokenizer, and of the discriminator, differs from `weights(trainer)` before."""
    changed = [not torch.equal(a, b) for a, b in zip(before, weights(trainer), strict=True)]
    n_vae = len(list(trainer.vae.parameters()))
    return any(changed[:n_vae]), any(changed[n_vae:])


def test_an_fp16_overflow_updates_neither_network_and_too_many_in_a_row_stop_the_run():
    """--fp16=1: a step whose scaled gradients overflow fp16 (the adaptive weight's included) is GradScaler's skip:
    neither the tokenizer nor the discriminator changes, the scale is lowered and no bad step is counted (a save may
    follow); a good step updates both and resets the count, and --max_nonfinite overflows in a row stop the run."""
    trainer = gan_trainer("--fp16=1", "--max_nonfinite=2")
    trainer.scaler.CAP = math.inf  # so that the scale after an overflow is GradScaler's backoff alone
    img = mnist_batch(8)
    trainer.train_step(img)

    for _ in range(2):  # an overflow, then a good step, twice: the count starts again
        before = weights(trainer)
        trainer.scaler.update(new_scale=2.0**120)  # the scaled gradients overflow fp16 (2**120: exact in fp32)
        out = trainer.train_step(img)
        assert networks_changed(trainer, before) == (False, False)
        assert out["loss"].isfinite() and out["gan_weight"] == 0  # both weight gradients overflowed: NaN -> 0
        assert trainer.scaler.get_scale() == 2.0**119 and trainer.scaler.overflows_in_a_row == 1
        assert trainer.guard.healthy and trainer.guard.bad_in_a_row == 0
        trainer.scaler.update(new_scale=2.0**11)
        before = weights(trainer)
        trainer.train_step(img)
        assert networks_changed(trainer, before) == (True, True) and trainer.scaler.overflows_in_a_row == 0
    trainer.scaler.update(new_scale=1e38)
    trainer.train_step(img)
    trainer.scaler.update(new_scale=1e38)
    with pytest.raises(NonFiniteError, match="2 fp16 steps in a row overflowed"):
        trainer.train_step(img)


@pytest.mark.parametrize("fp16", [1, 0])
def test_an_overflow_of_the_gan_gradient_alone_is_no_step_without_the_gan_term(monkeypatch, fp16):
    """A review: under fp16 the GAN loss's gradient alone overflowing made the adaptive weight 0, the step's own
    gradients stayed finite, and the step ran without its GAN term (the scale never lowered). A non-finite gradient
    of either loss now makes the weight NaN: under fp16 the step is GradScaler's overflow, in fp32 a bad step;
    neither updates a weight."""
    import tokenizer_trainer

    trainer = gan_trainer(f"--fp16={fp16}")
    trainer.train_step(mnist_batch(8))
    monkeypatch.setattr(tokenizer_trainer, "adaptive_gan_weight", lambda *a, **k: torch.tensor(math.nan))
    before = weights(trainer)
    trainer.train_step(mnist_batch(8))
    assert networks_changed(trainer, before) == (False, False)
    if fp16:
        assert trainer.scaler.overflows_in_a_row == 1 and trainer.guard.bad_in_a_row == 0
    else:
        assert trainer.guard.bad_in_a_row == 1


def test_an_fp16_overflow_of_the_discriminator_skips_its_update_only():
    trainer = gan_trainer("--fp16=1")
    trainer.disc_scaler.CAP = math.inf
    trainer.train_step(mnist_batch(8))
    before = weights(trainer)
    trainer.disc_scaler.update(new_scale=2.0**120)  # its scaled gradients overflow fp16 (2**120: exact in fp32)
    trainer.train_step(mnist_batch(8))
    assert networks_changed(trainer, before) == (True, False)
    assert trainer.disc_scaler.get_scale() == 2.0**119 and trainer.disc_scaler.overflows_in_a_row == 1
    assert trainer.scaler.overflows_in_a_row == 0 and trainer.guard.bad_in_a_row == 0


def test_an_fp16_step_with_a_non_finite_loss_is_a_bad_step_not_an_overflow():
    trainer = gan_trainer("--fp16=1")
    img = mnist_batch(8).clone()
    img[0, 0, 0, 0] = math.nan
    before = weights(trainer)
    trainer.train_step(img)
    assert networks_changed(trainer, before) == (False, False)
    assert trainer.guard.bad_in_a_row == 1 and trainer.scaler.overflows_in_a_row == 0


def test_the_fp16_loss_scales_resume_with_the_run():
    trainer = gan_trainer("--fp16=1")
    trainer.train_step(mnist_batch(8))
    trainer.scaler.update(new_scale=512.0)
    trainer.disc_scaler.update(new_scale=64.0)
    resumed = gan_trainer("--fp16=1")
    resumed.load_state_dict(trainer.state_dict())
    assert (resumed.scaler.get_scale(), resumed.disc_scaler.get_scale()) == (512.0, 64.0)


def test_the_adaptive_weight_is_the_ratio_of_the_two_gradients_norms_at_the_layer():
    """VQGAN's weight: |grad of the reconstruction loss| / (|grad of the GAN loss| + 1e-4) at the given layer, clamped
    to 1e4, detached; `reduce` (the ranks' mean) sees both gradients before the norms are taken."""
    layer = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec, g = (layer * torch.tensor([3.0, 4.0])).sum(), (layer * torch.tensor([0.6, 0.8])).sum()  # gradient norms 5, 1
    weight = adaptive_gan_weight(rec, g, layer)
    assert weight.item() == pytest.approx(5 / (1 + 1e-4), rel=1e-6) and not weight.requires_grad
    seen = []
    halved = adaptive_gan_weight(rec, g, layer, reduce=lambda t: seen.append(t.clone()) or t * torch.tensor(
        [[0.5], [1.0]]))  # a stand-in for the mean over ranks: the reconstruction's gradient halved
    assert torch.equal(seen[0], torch.tensor([[3.0, 4.0], [0.6, 0.8]]))
    assert halved.item() == pytest.approx(2.5 / (1 + 1e-4), rel=1e-6)
    assert adaptive_gan_weight(rec, 0 * g, layer).item() == 1e4  # no GAN gradient: the clamp
    inf = (layer * torch.tensor([math.inf, 1.0])).sum()  # a non-finite gradient of either loss: NaN, not 0 or 1e4
    assert adaptive_gan_weight(rec, inf, layer).isnan() and adaptive_gan_weight(inf, g, layer).isnan()


@pytest.mark.numerics
def test_under_fp16_the_adaptive_weight_takes_the_loss_scale_so_its_gradients_do_not_underflow():
    """A conv under fp16 autocast whose output gradients (1e-8, 2e-8) are below fp16's smallest: unscaled, both
    weight gradients are 0 and so is the weight; with the loss scale (`scale`) it is fp32's, 0.46."""
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def losses(dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=dtype or torch.float16, enabled=dtype is not None):
            out = conv(torch.ones(1, 3, 64, 64))
        return 1e-8 * out.float().sum(), 2e-8 * out.float().sum()

    fp32 = adaptive_gan_weight(*losses(None), conv.weight)
    assert fp32.item() == pytest.approx(0.46, abs=0.01)
    assert adaptive_gan_weight(*losses(torch.float16), conv.weight).item() == 0
    assert adaptive_gan_weight(*losses(torch.float16), conv.weight, scale=2.0**15).item() == pytest.approx(
        fp32.item(), rel=1e-2)  # measured 2e-5 here; a CPU with fp16 instructions may accumulate otherwise
    assert adaptive_gan_weight(*losses(None), conv.weight, scale=2.0**15).item() == pytest.approx(fp32.item(), rel=1e-6)


def test_adaptive_gan_weight_scales_the_generator_term_by_the_decoders_gradients(tmp_path):
    """--gan_weight=adaptive: the step's weight is adaptive_gan_weight of the reconstruction terms (L1, MSE: not the
    VQ loss) and the GAN term at the decoder's output conv, recomputed here on copies of the models, and the loss
    weighs the GAN term by --w_gan times it; with --w_gan=0 the flag is refused before the data."""
    import copy

    args = tiny_args("--steps=2", "--w_gan=0.1", "--gan_weight=adaptive", "--w_l2=0.5", "--disc_ch=16",
                     "--disc_layers=1")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    vae, disc = copy.deepcopy(trainer.vae), copy.deepcopy(trainer.disc)
    img = mnist_batch(8)
    out = trainer.train_step(img)
    rec = vae(img)[0]
    layer = vae.decoder.conv_out.weight
    rec_grad, = torch.autograd.grad(F.l1_loss(rec, img) + 0.5 * F.mse_loss(rec, img), layer, retain_graph=True)
    g_grad, = torch.autograd.grad(hinge_g_loss(disc(rec)), layer)
    assert out["gan_weight"].item() == pytest.approx((rec_grad.norm() / (g_grad.norm() + 1e-4)).item(), rel=1e-4)
    assert abs(out["gan_weight"].item() - 1) > 0.05  # a weight of 1 (the fixed one) would not pass
    weighted = out["l1"] + 0.5 * out["l2"] + out["vq"] + 0.1 * out["gan_weight"] * out["g"]
    torch.testing.assert_close(out["loss"], weighted, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="--gan_weight=adaptive scales the GAN term, which --w_gan=0.0 leaves out"):
        train(tiny_args("--gan_weight=adaptive", f"--out_dir={tmp_path}"))


def test_discriminator_loss_gets_real_logits_first_and_fake_second(monkeypatch):
    """hinge_d_loss(logits_real, logits_fake) must get the discriminator's logits on the real images first and on the
    (detached) reconstructions second: with the halves swapped the discriminator learns to call reconstructions real
    and still trains. The logits are matched exactly to the discriminator's outputs for those inputs."""
    import tokenizer_trainer

    args = tiny_args("--steps=2", "--w_gan=0.1", "--disc_ch=16", "--disc_layers=1")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    calls, d_args = [], []
    trainer.disc.register_forward_hook(lambda mod, inp, out: calls.append((inp[0].detach(), out.detach())))
    trainer.vae.register_forward_hook(lambda mod, inp, out: calls.append(("rec", out[0].detach())))
    monkeypatch.setattr(tokenizer_trainer, "hinge_d_loss",
                        lambda *a: d_args.append([t.detach() for t in a]) or hinge_d_loss(*a))
    img = mnist_batch(8)
    trainer.train_step(img)
    (rec,) = [out for inp, out in calls if isinstance(inp, str)]
    seen = [(inp, out) for inp, out in calls if not isinstance(inp, str)]

    def logits_of(images):  # the discriminator's output rows for these input images, from its latest call
        return torch.stack([next(out[i] for inp, out in reversed(seen) for i in range(len(inp))
                                 if torch.equal(inp[i], x)) for x in images])

    (real, fake), = d_args
    assert torch.equal(real, logits_of(img)) and torch.equal(fake, logits_of(rec))
    assert not torch.equal(real, fake)


def test_the_hinge_losses_by_hand():
    """VQGAN's hinge: the discriminator's 0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake))), the generator's
    -mean D(fake). A sign flipped on the fake term (relu(1 - D(fake)): reconstructions pushed towards "real") was
    caught only by the two-rank test's tolerance, as the GAN's chaos amplified float noise; values by hand here."""
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).item() == 0.5 * ((0.0 + 1.0) / 2 + (0.0 + 1.5) / 2)
    assert hinge_g_loss(fake).item() == 0.75


def test_total_loss_weights_the_vq_term_by_w_vq():
    """The returned loss is w_l1 * l1 + w_l2 * l2 + w_vq * vq (no GAN, no LPIPS): a --w_vq left out of the sum
    trained with weight 1 whatever the flag said."""
    trainer = TokenizerTrainer(build_vae(args := tiny_args("--w_vq=0.3")), args, torch.device("cpu"))
    out = trainer.train_step(mnist_batch(8))
    assert out["vq"] > 0.01 * out["loss"]  # the term is large enough to tell the weights apart
    torch.testing.assert_close(out["loss"], out["l1"] + out["l2"] + 0.3 * out["vq"], rtol=1e-6, atol=0)


def test_resume_restores_the_usage_ema_step_count():
    """The quantizer's usage EMA picks its decay by how many steps it has seen (`_hit_steps`): a resumed trainer
    must carry on from the checkpoint's step, not restart the 0.9-decay warm-up at 0."""
    args = tiny_args("--steps=3")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    img = mnist_batch(8)
    for _ in range(2):
        trainer.train_step(img)
    assert trainer.vae.quantize._hit_steps == 2
    resumed = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    assert resumed.vae.quantize._hit_steps == 0
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.step == resumed.vae.quantize._hit_steps == 2


def test_a_non_finite_step_updates_nothing_and_too_many_stop_the_run(caplog):
    """A batch with a NaN made every weight (and the discriminator's) NaN, and the next saves kept them: a bad step
    is now skipped, a good one counts on, and --max_nonfinite bad ones in a row stop the run."""
    args = tiny_args("--steps=10", "--w_gan=0.1", "--disc_ch=16", "--disc_layers=1", "--gan_start=0",
                     "--max_nonfinite=2")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    img = mnist_batch(8)
    trainer.train_step(img)
    bad = img.clone()
    bad[0, 0, 0, 0] = float("nan")
    weights = [p.detach().clone() for p in (*trainer.vae.parameters(), *trainer.disc.parameters())]
    trainer.train_step(bad)
    assert all(torch.equal(w, p) for w, p in zip(weights, (*trainer.vae.parameters(), *trainer.disc.parameters()),
                                                  strict=True))
    assert trainer.guard.bad_in_a_row == 1 and "update skipped (1 in a row)" in caplog.text
    trainer.train_step(img)  # a good step in between: the count starts over
    assert trainer.guard.bad_in_a_row == 0 and trainer.step == 3
    assert all(p.isfinite().all() for p in trainer.vae.parameters())
    trainer.train_step(bad)
    with pytest.raises(NonFiniteError, match="2 steps in a row .*--max_nonfinite=2"):
        trainer.train_step(bad)


def test_perceptual_term_reports_why_it_is_unavailable():
    module, why = build_perceptual_loss(torch.device("cpu"))
    if module is None:
        assert "lpips" in why.lower() or "vgg16" in why.lower()
    else:
        assert why == ""


def test_a_perceptual_term_that_cannot_run_is_an_error_before_the_data(tmp_path, monkeypatch):
    """It used to warn once and train another objective, recorded as --w_percep=1 in the checkpoint."""
    import tokenizer_trainer
    from models.vq_losses import perceptual_loss_problem

    if not perceptual_loss_problem():
        pytest.skip("LPIPS runs here")
    monkeypatch.setattr(tokenizer_trainer, "build_datasets", lambda *a, **k: pytest.fail("data read before the check"))
    with pytest.raises(ValueError, match="--w_percep=1 needs LPIPS, unavailable offline: .*--w_percep=0 trains"):
        train(tiny_args("--w_percep=1", f"--out_dir={tmp_path}"))


def test_bad_resolution_names_the_flag():
    with pytest.raises(ValueError, match="--reso=16"):
        build_vae(tiny_args("--reso=16"))


@pytest.mark.parametrize("flag, on", [("--hflip", True), ("--hflip=1", True), ("--hflip=false", False), ("", False)])
def test_hflip_takes_the_forms_train_py_takes(flag, on):
    """A bare `--hflip`, which train.py takes, was an argparse error here."""
    assert tiny_args(*filter(None, [flag])).hflip is on


def test_zero_periods_are_errors_before_training(tmp_path):
    with pytest.raises(ValueError, match="--save_every=0"):
        train(tiny_args("--save_every=0", f"--out_dir={tmp_path}"))


@pytest.mark.parametrize("flag, message", [
    ("--sche=cosine", "--sche='cosine': expected one of"),
    ("--wp=2", "--wp=2.0: the warm-up is a fraction of --steps, in \\[0, 1\\)"),
    ("--ch=48", "--ch=48: expected a positive multiple of 32 \\(the GroupNorm groups\\)"),
    ("--mid_reso=0.9", "--mid_reso=0.9: expected a finite number >= 1"), ("--mid_reso=inf", "--mid_reso=inf: "),
    ("--seed=1099511627776", "--seed=1099511627776: expected 0 <= seed < 2\\*\\*40"),
    ("--disc_layers=3", "--disc_layers=3 does not fit --reso=8"),  # with --w_gan: a PatchGAN deeper than 8 px
    # a review: these trained (a negative weight maximised its term) or failed inside torch, after the data
    ("--w_l1=-1", "--w_l1=-1.0: expected a finite number >= 0"), ("--w_vq=nan", "--w_vq=nan: expected"),
    ("--lr=0", "--lr=0.0: expected a positive learning rate"), ("--clip=-2", "--clip=-2.0: expected"),
    ("--disc_ch=1", "--disc_ch=1 --disc_layers=3: the discriminator needs a width of at least 2"),
    # a mutation review: dropping any of these checks passed the suite (--wp=1 is a warm-up as long as the run)
    ("--steps=0", "--steps=0: expected a positive integer"), ("--bs=0", "--bs=0: expected a positive integer"),
    ("--gan_start=-1", "--gan_start=-1: expected a finite number >= 0"),
    ("--reinit_every=-1", "--reinit_every=-1: expected a finite number >= 0"),
    ("--wp=1", "--wp=1.0: the warm-up is a fraction of --steps, in \\[0, 1\\)"),
])
def test_bad_flags_fail_before_the_data_is_read(flag, message, tmp_path, monkeypatch):
    import tokenizer_trainer

    monkeypatch.setattr(tokenizer_trainer, "build_datasets", lambda *a, **k: pytest.fail("data read before the check"))
    with pytest.raises(ValueError, match=message):
        train(tiny_args(flag, "--w_gan=0.1", f"--out_dir={tmp_path}"))


def test_the_cli_ends_a_bad_flag_in_one_error_line(tmp_path):
    from conftest import REPO, launch

    proc = launch(REPO / "scripts" / "train_tokenizer.py", *TINY, "--wp=2", f"--out_dir={tmp_path}", nproc=1,
                  check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: --wp=2.0: the warm-up is a fraction of --steps, in [0, 1) (train.py's --wp counts epochs)"]
    no_data = [f for f in TINY if f != "--dataset=mnist"]  # it used to train on MNIST
    proc = launch(REPO / "scripts" / "train_tokenizer.py", *no_data, f"--out_dir={tmp_path}", nproc=1, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: --data_path: expected an ImageFolder root with train/ and val/ class folders"), proc.stderr[-2000:]


def test_resume_keeps_the_tokenizer_and_a_never_trained_discriminator_may_change(tmp_path):
    """A relaunch with another tokenizer configuration is refused naming the fields (the shapes or the math of the
    weights would change under a half-trained tokenizer); a discriminator saved before --gan_start may be rebuilt
    with other shapes, one trained since may not."""
    gan = ("--w_gan=0.1", "--gan_start=3", "--disc_layers=1", "--disc_ch=32")
    train(tiny_args("--steps=2", "--save_every=2", *gan, f"--out_dir={tmp_path}"))
    for flags, message in ((("--vocab_size=32",), "another configuration \\(vocab_size 64 -> 32\\)"),
                           (("--quant_resi=-0.2", "--beta=1"), "beta 0.25 -> 1.0, quant_resi 0.5 -> -0.2")):
        with pytest.raises(ValueError, match=message):
            train(tiny_args("--steps=3", *gan, *flags, f"--out_dir={tmp_path}"))
    train(tiny_args("--steps=4", "--save_every=2", *gan[:-1], "--disc_ch=64", "--lr=1e-3",
                    f"--out_dir={tmp_path}"))  # step 2 <= --gan_start: its discriminator never trained
    log = (tmp_path / "log.txt").read_text()
    assert "never trained: step 2 <= its run's --gan_start=3" in log and "--lr 0.003 -> 0.001" in log
    assert torch.load(tmp_path / "tokenizer-last.pth", weights_only=True)["step"] == 4
    with pytest.raises(ValueError, match="trained since --gan_start=3, has other shapes than --disc_ch=32"):
        train(tiny_args("--steps=5", *gan, f"--out_dir={tmp_path}"))
    # a review: a later --gan_start made the trained discriminator look untrained, and it was silently dropped
    with pytest.raises(ValueError, match="trained since --gan_start=3, has other shapes than --disc_ch=32"):
        train(tiny_args("--steps=5", *gan[:1], "--gan_start=10", *gan[2:], f"--out_dir={tmp_path}"))


def test_main_writes_a_loadable_checkpoint_and_resumes(tmp_path):
    args = tiny_args("--steps=3", "--log_every=2", "--save_every=2", f"--out_dir={tmp_path}")
    ckpt_path = train(args)
    vae = load_vae(ckpt_path)
    assert vae.v_patch_nums == (1, 2, 4) and vae.vocab_size == 64 and not vae.training
    assert dataclasses.asdict(vae.config)["ch_mult"] == (1, 2)
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["step"] == 3
    idx = vae.img_to_idxBl(mnist_batch(2))
    assert [t.shape for t in idx] == [(2, 1), (2, 4), (2, 16)]
    # a second run in the same folder resumes at step 3 and trains to --steps
    train(tiny_args("--steps=4", f"--out_dir={tmp_path}"))
    assert torch.load(ckpt_path, weights_only=True)["step"] == 4
    # TensorBoard: the logged steps' terms (the MSE among them), code usage and each run's final validation; the
    # resume keeps the first run's points up to its step-3 checkpoint
    scalars = read_scalars(tmp_path / "tb")
    assert list(scalars["train/l2"][0]) == [2, 3, 4] and list(scalars["train/usage_pct_scale2"][0]) == [2, 3, 4]
    assert list(scalars["val/psnr"][0]) == [3, 4] and np.isfinite(scalars["train/loss"][1]).all()


def test_an_fp16_run_logs_its_precision_and_loss_scale_and_keeps_the_scales(tmp_path):
    ckpt_path = train(tiny_args("--fp16=1", "--w_gan=0.1", "--disc_ch=16", "--disc_layers=1", "--steps=2",
                                "--log_every=1", f"--out_dir={tmp_path}"))
    log = (tmp_path / "log.txt").read_text()
    assert "steps of 16 in fp16 autocast with loss scaling" in log
    assert re.search(r"step 2/2 loss [\d.]+ .* grad_norm [\d.]+ loss_scale 2048\.0000 lr", log), log
    scalars = read_scalars(tmp_path / "tb")  # with the learning rate under opt/, as train.py logs them
    assert list(scalars["opt/loss_scale"][1]) == [2048.0, 2048.0] and "opt/lr" in scalars
    assert "train/loss_scale" not in scalars and "train/lr" not in scalars
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["scaler"]["scale"] == ckpt["disc_scaler"]["scale"] == 2048.0


def test_resume_is_exact(tmp_path):
    """Resuming from the step-6 checkpoint of a 12-step run ends exactly where that run ended, with dead-code re-init
    (global RNG) and the usage EMA (its step count picks the decay) in play."""
    args = ("--steps=12", "--reinit_every=1", "--log_every=4", "--save_every=6")
    train(tiny_args(*args, f"--out_dir={tmp_path / 'once'}"))
    (tmp_path / "twice").mkdir()
    shutil.copy(tmp_path / "once" / "tokenizer-prev.pth", tmp_path / "twice" / "tokenizer-last.pth")  # step 6
    train(tiny_args(*args, f"--out_dir={tmp_path / 'twice'}"))
    once, twice = (torch.load(tmp_path / d / "tokenizer-last.pth", weights_only=True) for d in ("once", "twice"))
    assert once["step"] == twice["step"] == 12 and len(once["rng"]) == 1
    for k, v in once["vae"].items():
        assert torch.equal(v, twice["vae"][k]), k


def test_resume_restores_this_ranks_rng_or_warns(caplog):
    args = tiny_args("--steps=2")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    trainer.train_step(mnist_batch(8))
    ckpt = trainer.state_dict()
    expected = torch.rand(3)  # the draws right after the save
    trainer.load_state_dict(ckpt)
    assert torch.equal(torch.rand(3), expected)
    before = torch.get_rng_state()
    with caplog.at_level("WARNING", logger="utils.run.checkpoint"):
        trainer.load_state_dict({**ckpt, "rng": ckpt["rng"] * 2})  # saved by 2 ranks, resumed by 1
    assert "RNG states of 2 ranks" in caplog.text
    assert torch.equal(torch.get_rng_state(), before)


def test_torchrun_two_processes_match_one(tmp_path, run_torchrun):
    """DDP (2 ranks x 8 images, gloo) takes the same steps as one process with the global batch of 16, with the GAN
    and its adaptive weight (a weight from each rank's own half batch fails it), and dead codes re-initialised after
    step 2 (from rank 0's half batch and its own RNG stream, a review found: step 3 differed by 0.006)."""
    flags = TINY + ["--steps=4", "--log_every=1", "--w_gan=0.1", "--gan_weight=adaptive", "--disc_ch=16",
                    "--disc_layers=1", "--reinit_every=2"]
    logs, reinits = {}, {}
    for name, nproc in (("ddp", 2), ("one", 1)):
        proc = run_torchrun("scripts/train_tokenizer.py", *flags, f"--out_dir={tmp_path / name}", nproc=nproc)
        logs[name] = [[float(v) for v in m] for m in STEP_RE.findall(proc.stdout + proc.stderr)]
        reinits[name] = [int(n) for n in re.findall(r"\| reinit (\d+) \|", proc.stdout + proc.stderr)]
    assert len(logs["one"]) == 4 and reinits["one"][1] > 0 and reinits["ddp"] == reinits["one"]
    torch.testing.assert_close(logs["ddp"], logs["one"], atol=2e-3, rtol=0)  # each term of STEP_RE
    ddp, one = (torch.load(tmp_path / d / "tokenizer-last.pth", weights_only=True) for d in ("ddp", "one"))
    assert len(one["rng"]) == 1 and len(ddp["rng"]) == 2  # every rank's RNG state (seed * 2 + rank): both kept
    assert not torch.equal(ddp["rng"][0]["torch"], ddp["rng"][1]["torch"])
    for part in ("vae", "disc"):
        diffs = torch.cat([(ddp[part][k] - v).abs().flatten() for k, v in one[part].items()
                           if k != "quantize.ema_vocab_hit_SV"])  # hit counts differ where float noise flips a tie
        # Adam turns float-level gradient noise on near-zero gradients into lr-sized steps for a few elements;
        # unsynchronised gradients would move most elements by ~lr (3e-3)
        assert diffs.max() < 1e-3 and (diffs > 1e-4).float().mean() < 1e-3, (part, diffs.max())


def test_ranks_with_other_data_or_flags_are_refused_before_training(tmp_path):
    """A review: tokenizer training never compared the ranks' data or flags (a node with one stray file shuffled
    another index -> file mapping: a quarter of the images repeated, a quarter dropped). As train.py: named, with
    each rank's value, before any step; the output folder may differ per node."""
    write_image_folder(tmp_path / "data", 10, 12, {"train": 6, "val": 2})
    shutil.copytree(tmp_path / "data", tmp_path / "copy")
    (tmp_path / "copy/train/class0/0.png").rename(tmp_path / "copy/train/class1/moved.png")
    wrapper = tmp_path / "per_rank.py"
    wrapper.write_text(PER_RANK.format(repo=str(REPO), train=str(REPO / "scripts/train_tokenizer.py"),
                                       flag_1=f"--data_path={tmp_path / 'copy'}", extra_1=["--steps=7"]))
    folder_flags = [f for f in TINY if f != "--dataset=mnist"]  # the folder is the data, not MNIST
    proc = launch(wrapper, *folder_flags, "--steps=3", "--log_every=1", f"--data_path={tmp_path / 'data'}",
                  f"--out_dir={tmp_path / 'out'}", nproc=2, check=False, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "the ranks do not train alike" in out, out[-3000:]
    assert "--steps: rank 0: 3; rank 1: 7" in out and "the training files (digest of their paths and labels)" in out
    assert "--data_path" not in out.split("the ranks do not train alike")[1].split("\n\n")[0]
    assert not re.search(r"step \d+/\d+ loss", out)


def test_dead_codes_are_those_below_the_usage_margin_summed_over_scales():
    """A code is dead when its usage EMA summed over the scales is below USAGE_MARGIN of a uniform share of the
    step's tokens (B * sum(pn^2)): a rarely used code (not only a never used one) is reset, and a code used a little
    at every scale is kept. `== 0` as the rule, or the last scale's EMA alone, passed the suite."""
    args = tiny_args("--steps=10")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    quantize = trainer.vae.quantize
    tokens = 16 * (1 + 4 + 16)  # margin 336 / 64 * 0.08 = 0.42 hits
    quantize.ema_vocab_hit_SV.fill_(10.0)
    quantize.ema_vocab_hit_SV[:, :3] = torch.tensor([[0.4, 0.2, 0.0], [0.0, 0.2, 0.0], [0.0, 0.2, 0.0]])
    old_W = quantize.embedding.weight.detach().clone()
    torch.manual_seed(0)
    assert trainer.reinit_dead_codes(mnist_batch(), tokens_per_step=tokens) == 2
    changed = (quantize.embedding.weight != old_W).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [0, 2]  # 0.4 < 0.42 <= 0.6 summed over scales


def test_dead_codes_are_judged_every_reinit_every_steps_against_all_scales_tokens(monkeypatch):
    """--reinit_every=3 re-initialises after steps 3 and 6, with the margin's token count of one step: the batch
    times the tokens of every scale (1 + 4 + 16 here). Counting the last scale's tokens only (a margin 16/21 of
    VAR's), or a reset after step 1, 4, ..., passed the suite."""
    args = tiny_args("--steps=6", "--reinit_every=3")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    calls = []
    monkeypatch.setattr(trainer, "reinit_dead_codes", lambda img, tokens_per_step: calls.append(
        (trainer.step, len(img), tokens_per_step)) or 0)
    img = mnist_batch(4)
    for _ in range(6):
        trainer.train_step(img)
    assert calls == [(3, 4, 4 * 21), (6, 4, 4 * 21)]


def test_the_gan_terms_switch_on_at_gan_start():
    """--gan_start=2: steps 0 and 1 train the tokenizer alone (no generator term, discriminator untouched), step 2
    on both; the discriminator is not weight-decayed. A GAN on from step 0 whatever --gan_start, or from the step
    after it, passed the suite."""
    args = tiny_args("--steps=4", "--w_gan=0.1", "--gan_start=2", "--disc_ch=16", "--disc_layers=1", "--wd=0.05")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    assert all(g["weight_decay"] == 0 for g in trainer.disc_opt.param_groups)
    before = [p.detach().clone() for p in trainer.disc.parameters()]
    img = mnist_batch(4)
    for _ in range(2):
        assert not {"g", "d"} & trainer.train_step(img).keys()
    assert all(torch.equal(b, p) for b, p in zip(before, trainer.disc.parameters(), strict=True))
    assert {"g", "d"} <= trainer.train_step(img).keys()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.disc.parameters(), strict=True))


def test_the_warm_up_is_a_fraction_of_steps_and_the_discriminator_follows_the_schedule():
    """--wp=0.25 of --steps=8: lr rises from WP0 * lr at step 0 to the peak at step 2, then the cosine decays it to
    WPE * lr at the last step; the discriminator's optimiser gets the same lr. --wp read as steps (no warm-up here),
    or a discriminator left at the peak lr, passed the suite."""
    args = tiny_args("--steps=8", "--wp=0.25", "--lr=1e-3", "--sche=cos", "--w_gan=0.1", "--disc_ch=16",
                     "--disc_layers=1")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    lrs = []
    for step in range(8):
        trainer.step = step
        lrs.append(trainer.set_lr())
        assert [g["lr"] for g in trainer.disc_opt.param_groups] == [lrs[-1]]
        assert all(g["lr"] == lrs[-1] for g in trainer.opt.param_groups)
    assert lrs[:3] == pytest.approx([1e-3 * 0.005, 1e-3 * (0.005 + 0.995 / 2), 1e-3], rel=1e-12)
    assert lrs[-1] == pytest.approx(1e-3 * 0.01, rel=1e-12) and lrs[2:] == sorted(lrs[2:], reverse=True)


def test_the_tokenizer_gradient_is_clipped_to_clip():
    """--clip=0.01: the gradient the optimiser steps with has norm 0.01 (the logged grad_norm is the norm before
    clipping, far above it). A clip that only logged the norm passed the suite: Adam's first steps hardly depend
    on the gradient's scale."""
    args = tiny_args("--steps=2", "--clip=0.01")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    out = trainer.train_step(mnist_batch(4))
    grads = [p.grad for p in trainer.vae.parameters() if p.grad is not None]
    assert out["grad_norm"] > 1.0
    torch.testing.assert_close(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])),
                               torch.tensor(0.01), rtol=1e-5, atol=0)


def test_a_step_skipped_for_a_non_finite_gradient_leaves_the_discriminator_alone():
    """A finite loss with a non-finite tokenizer gradient skips the step: the discriminator, whose own loss is finite
    here, must not step either. Stepping it whenever its loss was finite passed the suite (a NaN batch makes both
    losses NaN)."""
    args = tiny_args("--steps=4", "--w_gan=0.1", "--disc_ch=16", "--disc_layers=1", "--gan_start=0")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    trainer.vae.decoder.conv_out.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = [p.detach().clone() for p in (*trainer.vae.parameters(), *trainer.disc.parameters())]
    out = trainer.train_step(mnist_batch(4))
    assert out["loss"].isfinite() and out["d"].isfinite() and trainer.guard.bad_in_a_row == 1
    assert all(torch.equal(b, p) for b, p in zip(before, (*trainer.vae.parameters(), *trainer.disc.parameters()),
                                                 strict=True))


def test_dead_codes_get_distinct_residuals_and_a_code_at_the_margin_lives():
    """Each dead code draws its own residual vector of the batch (all of them on one vector would re-die together),
    and a code whose summed usage EMA equals the margin exactly is used (`<`, VAR's `>=` for used): one shared
    draw, or `<=`, passed the suite. Margin here: 1600 / 64 * 0.08 = 2.0, exact in binary."""
    args = tiny_args("--steps=10")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    quantize = trainer.vae.quantize
    quantize.ema_vocab_hit_SV.zero_()
    quantize.ema_vocab_hit_SV[:, 0] = torch.tensor([1.0, 0.5, 0.5])  # exactly the margin: kept
    quantize.ema_vocab_hit_SV[:, 1] = torch.tensor([1.0, 0.5, 0.25])  # just below: dead
    old_W = quantize.embedding.weight.detach().clone()
    img = mnist_batch()
    rows = quantizer_residuals(trainer.vae.eval(), img)
    trainer.vae.train()
    torch.manual_seed(0)
    assert trainer.reinit_dead_codes(img, tokens_per_step=1600) == 63
    new_W = quantize.embedding.weight.detach()
    assert torch.equal(new_W[0], old_W[0]) and not torch.equal(new_W[1], old_W[1])
    # 63 draws from the residuals spread like them (one shared draw: 1e-3 of it)
    assert new_W[1:].std(0).mean() > 0.25 * rows.std(0).mean()


@pytest.mark.parametrize("flag, message", [
    ("--vocab_size=0", "--vocab_size=0: expected a positive integer"),
    ("--z_channels=0", "--z_channels=0: expected a positive integer"),
    ("--ch_mult=1_0", "--ch_mult=1_0: expected positive width multipliers"),
    ("--quant_resi=nan", "--quant_resi=nan: expected a finite mixing ratio"),
    # a review: --ch=0 failed in the first train step, --ch=-32 blamed --disc_layers, --ch=33 and --pn=abc named no
    # flag, --workers=-1 gave torch's message, --val_limit=-1 named a --train_limit this CLI lacks, --quant_resi=-5
    # trained phi(h) = -4 h + 5 conv(h) (|r| is the mix: models.quantizer.Phi)
    ("--ch=0", "--ch=0: expected a positive multiple of 32"), ("--ch=-32", "--ch=-32: expected a positive multiple"),
    ("--ch=33", "--ch=33: expected a positive multiple of 32"), ("--pn=abc", "--pn=abc: bad patch schedule 'abc'"),
    ("--workers=-1", "--workers=-1: expected >= 0"), ("--val_limit=-1", "--val_limit=-1: expected >= 0 \\(0 = all\\)"),
    ("--quant_resi=-5", "--quant_resi=-5.0: expected a finite mixing ratio in \\[-1, 1\\]"),
    ("--quant_resi=1.5", "--quant_resi=1.5: expected a finite mixing ratio in \\[-1, 1\\]"),
    ("--share_quant_resi=-1", "--share_quant_resi=-1: expected >= 0"),
])
def test_tokenizer_sizes_are_checked_before_the_data_is_read(flag, message, tmp_path, monkeypatch):
    """A review: these failed inside torch after the data was listed and the run folder made (vocab 0: argmin of
    nothing), or, --quant_resi=nan, trained without phi and then refused to resume itself (nan != nan)."""
    import tokenizer_trainer

    monkeypatch.setattr(tokenizer_trainer, "build_datasets", lambda *a, **k: pytest.fail("data read before the check"))
    with pytest.raises(ValueError, match=message):
        train(tiny_args(flag, f"--out_dir={tmp_path}"))
    assert not (tmp_path / "log.txt").exists()


@pytest.mark.parametrize("disc_ch", [7, 36, 100])
def test_any_patchgan_width_builds(disc_ch):
    """A review: GroupNorm(min(32, c / 4), c) rejected common widths (36: 144 channels in 32 groups) with torch's
    error; the groups are now the largest divisor of c up to that (the same for the power-of-two widths)."""
    from models.vq_losses import PatchDiscriminator, norm_groups

    assert [norm_groups(c) for c in (64, 128, 256, 512, 14, 144, 800)] == [16, 32, 32, 32, 2, 24, 32]
    disc = PatchDiscriminator(ch=disc_ch, n_layers=3)
    assert disc(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def test_a_resume_across_zero_and_non_zero_wd_names_the_flag(tmp_path):
    """--wd=0 trains one AdamW group, --wd > 0 two (no decay on norms and the codebook): a relaunch across them
    failed in torch's load_state_dict ("different number of parameter groups"), naming no flag."""
    train(tiny_args("--steps=1", f"--out_dir={tmp_path}"))
    with pytest.raises(ValueError, match="--wd=0.05: .* was trained with --wd=0, .* one parameter group"):
        train(tiny_args("--steps=2", "--wd=0.05", f"--out_dir={tmp_path}"))


def test_a_gan_that_never_starts_is_named(tmp_path):
    """A review: --gan_start at or past --steps trained no GAN term without a word."""
    train(tiny_args("--steps=1", "--w_gan=0.1", "--gan_start=1", "--disc_layers=1", f"--out_dir={tmp_path}"))
    assert "--gan_start=1 >= --steps=1: this run trains no GAN term" in (tmp_path / "log.txt").read_text()


def test_a_non_finite_discriminator_gradient_under_a_finite_loss_updates_nothing():
    """A review: in fp32/bf16 only the discriminator's loss was judged, so a non-finite gradient under a finite loss
    would have written NaN into it, after which every generator step is skipped until the run stops."""
    args = tiny_args("--steps=2", "--w_gan=0.1", "--disc_ch=16", "--disc_layers=1")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    weight = next(trainer.disc.parameters())
    before = [p.detach().clone() for p in trainer.disc.parameters()]
    hook = weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    trainer.train_step(mnist_batch())
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.disc.parameters(), strict=True))
    hook.remove()
    trainer.train_step(mnist_batch())
    assert not torch.equal(before[0], weight) and weight.isfinite().all()


def test_an_unwritable_out_dir_is_one_error_line(tmp_path):
    """As train.py's --local_out_dir_path: an OutputFolderError (printed as one line by scripts/train_tokenizer.py)
    before any work, not an OSError traceback from rank 0's mkdir while the other ranks wait at a barrier."""
    from utils.run.checkpoint import OutputFolderError

    (tmp_path / "a_file").write_text("")
    with pytest.raises(OutputFolderError, match="--out_dir: cannot write into"):
        train(tiny_args(f"--out_dir={tmp_path / 'a_file' / 'run'}", "--steps=1"))


# ----------------------------------------------------------------------------------------------------------------------
# Pinned by a mutation review (each test names the mutant that passed the suite before it)
# ----------------------------------------------------------------------------------------------------------------------

def test_the_mixing_ratio_may_be_plus_or_minus_one_and_the_batch_must_split_over_the_ranks():
    """--quant_resi in [-1, 1] includes its ends (|r| = 1: phi is the conv alone); --bs must divide by the processes.
    Refusing |r| = 1, or not checking --bs against the world size, passed the suite."""
    for r in (1.0, -1.0):
        assert check_flags(tiny_args(f"--quant_resi={r}"), 1).quant_resi == r
    with pytest.raises(ValueError, match="--bs=15 is not divisible by the 2 processes"):
        check_flags(tiny_args("--bs=15"), 2)
    assert check_flags(tiny_args("--bs=16"), 2).vocab_size == 64


def test_a_resume_may_change_a_non_zero_wd():
    """Only a change across --wd=0 and --wd > 0 (one AdamW group vs two) is refused on resume; 0.05 -> 0.1 keeps the
    groups and resumes. Refusing any change of --wd passed the suite."""
    args = tiny_args("--wd=0.1")
    config = check_flags(args, 1)
    ckpt = {"args": vars(tiny_args("--wd=0.05")), "vae_config": dataclasses.asdict(config)}
    check_resume(ckpt, config, Path("tokenizer-last.pth"), args)
    with pytest.raises(ValueError, match="--wd=0: tokenizer-last.pth was trained with --wd=0.05"):
        check_resume(ckpt, config, Path("tokenizer-last.pth"), tiny_args("--wd=0"))


def test_quantizer_residuals_are_the_vectors_the_codes_were_matched_against():
    """quantizer_residuals (what dead codes are re-drawn from) gives, scale by scale, f minus the earlier scales'
    f_hat, area-pooled: the nearest code of each row is the index the quantizer chose there. Rows of f itself at
    every scale passed the suite (the re-init test draws from this same function)."""
    torch.manual_seed(0)
    vae = build_vae(tiny_args()).eval()
    vae.quantize.embedding.weight.data.normal_(0, 0.3)  # codes at the latents' scale: many in use
    img = mnist_batch(4)
    with torch.no_grad():
        rows = quantizer_residuals(vae, img)
        idx = torch.cat([i.flatten() for i in vae.img_to_idxBl(img)])
    assert rows.shape == (4 * (1 + 4 + 16), 8) and len(idx.unique()) > 10
    assert torch.equal(vae.quantize._nearest_code(rows), idx)


def test_phis_no_scale_uses_are_frozen_and_the_others_train():
    """--pn=1_2_4 with 4 shared phis: scales 0, 1, 2 sit at 0, 0.5, 1 and pick phis 0, 2, 3 (0.5 is a tie of ticks
    1 and 2, decided by rounding); phi 1 serves none and is frozen (DDP rejects parameters without a gradient). Also
    freezing the last scale's phi passed the suite: it then never trained."""
    args = tiny_args()
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    q = trainer.vae.quantize
    phis = list(q.quant_resi.qresi_ls)
    used = [phis.index(q.phi(si, 3)) for si in range(3)]
    assert used == [0, 2, 3]
    assert [all(p.requires_grad for p in phi.parameters()) for phi in phis] == [True, False, True, True]
    trainer.train_step(mnist_batch(4))
    assert all(phis[i].weight.grad.abs().sum() > 0 for i in used) and phis[1].weight.grad is None


def test_the_optimisers_are_vqgans_adamw():
    """AdamW with betas (0.5, 0.9) for the tokenizer and the discriminator (VQGAN's). torch's default (0.9, 0.999)
    for the tokenizer passed the suite."""
    args = tiny_args("--w_gan=0.1", "--disc_ch=16", "--disc_layers=1")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    for opt in (trainer.opt, trainer.disc_opt):
        assert isinstance(opt, torch.optim.AdamW) and {g["betas"] for g in opt.param_groups} == {(0.5, 0.9)}


def test_total_loss_weights_each_reconstruction_term_by_its_flag():
    """loss = w_l1 * l1 + w_l2 * l2 + w_vq * vq: a --w_l1 left out of the sum (the other tests keep it at 1) passed
    the suite."""
    args = tiny_args("--w_l1=0.7", "--w_l2=0.4", "--w_vq=0.3")
    out = TokenizerTrainer(build_vae(args), args, torch.device("cpu")).train_step(mnist_batch(8))
    torch.testing.assert_close(out["loss"], 0.7 * out["l1"] + 0.4 * out["l2"] + 0.3 * out["vq"], rtol=1e-6, atol=0)


def test_dead_codes_are_drawn_by_the_seed_and_step_with_noise_and_their_adam_moments_cleared():
    """The re-init draws, from torch.Generator(seed * 1_000_003 + step), the residual rows to copy and a Gaussian
    nudge of 1e-3 of their std (so two codes on one row do not stay twins): exactly reproducible, on any world size.
    Both Adam moments of a reset code are zeroed. Rows copied without the nudge, or a stale exp_avg_sq (Adam's step
    for the new code scaled by the old code's history), passed the suite; a seed without the step was caught only by
    the two-process test's tolerance."""
    args = tiny_args("--steps=10", "--seed=3")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    img = mnist_batch()
    trainer.train_step(img)  # fills the Adam state of the codes in use
    trainer.step = 5
    quantize = trainer.vae.quantize
    state = trainer.opt.state[quantize.embedding.weight]
    quantize.ema_vocab_hit_SV.fill_(10.0)
    quantize.ema_vocab_hit_SV[:, :32] = 0.0  # codes 0..31 dead, used ones (non-zero Adam moments) among them
    dead = torch.arange(64) < 32
    assert all(state[key][dead].abs().sum() > 0 for key in ("exp_avg", "exp_avg_sq"))
    rows = quantizer_residuals(trainer.vae.eval(), img)
    trainer.vae.train()
    g = torch.Generator().manual_seed(3 * 1_000_003 + 5)
    pick = torch.randint(len(rows), (int(dead.sum()),), generator=g)
    noise = torch.randn((int(dead.sum()), 8), generator=g)
    assert trainer.reinit_dead_codes(img, tokens_per_step=336) == int(dead.sum())
    assert torch.equal(quantize.embedding.weight[dead], rows[pick] + 1e-3 * rows.std() * noise)
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key][dead].abs().sum() == 0 and state[key][~dead].abs().sum() > 0, key


def test_resume_restores_the_count_of_bad_steps_in_a_row():
    """A run stopped after a skipped non-finite step resumes with that count: --max_nonfinite counts across the
    restart. Resuming with a fresh guard passed the suite."""
    args = tiny_args("--steps=3")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    bad = mnist_batch(4).clone()
    bad[0, 0, 0, 0] = math.nan
    trainer.train_step(bad)
    assert trainer.guard.bad_in_a_row == 1
    resumed = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.guard.bad_in_a_row == 1


def test_a_discriminator_saved_at_exactly_gan_start_steps_may_change_shape(caplog):
    """A checkpoint at step == --gan_start has run steps 0 .. gan_start - 1, none with the GAN: its discriminator
    never trained, so a resume may rebuild it with other shapes. `<` as the rule (refusing this resume) passed the
    suite."""
    args = tiny_args("--steps=4", "--w_gan=0.1", "--gan_start=2", "--disc_ch=16", "--disc_layers=1")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    before = [p.detach().clone() for p in trainer.disc.parameters()]
    for _ in range(2):
        trainer.train_step(mnist_batch(4))
    assert all(torch.equal(b, p) for b, p in zip(before, trainer.disc.parameters(), strict=True))
    other = tiny_args("--steps=4", "--w_gan=0.1", "--gan_start=2", "--disc_ch=32", "--disc_layers=1")
    resumed = TokenizerTrainer(build_vae(other), other, torch.device("cpu"))
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.step == 2 and "never trained: step 2 <= its run's --gan_start=2" in caplog.text


def test_evaluate_reports_l1_in_model_units_and_psnr_of_images_in_0_1():
    """Validation: the mean L1 of reconstructions in [-1, 1] and the PSNR of the images mapped to [0, 1]: an error of
    0.2 everywhere is L1 0.2 and, 0.1 in [0, 1], PSNR 20 dB; the tokenizer is left in train mode. PSNR of the [-1, 1]
    images (14 dB here), a halved L1, or a tokenizer left in eval mode passed the suite."""

    class Shifted(torch.nn.Module):  # a tokenizer whose reconstruction is the image + 0.2
        def img_to_reconstructed_img(self, img, last_one):
            assert last_one and not self.training
            return img + 0.2

    vae = Shifted()
    img = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) - 0.5
    metrics = evaluate(vae, [(img[:2], None), (img[2:], None)], torch.device("cpu"))
    assert metrics["val_l1"] == pytest.approx(0.2, rel=1e-5) and metrics["val_psnr"] == pytest.approx(20, rel=1e-5)
    assert vae.training


def test_clip_leaves_the_discriminators_gradient_alone():
    """--clip bounds the tokenizer's gradient only: the discriminator steps with its full gradient (its norm is taken
    just to see that it is finite). Clipping it too was caught only by the two-process test's tolerance."""
    args = tiny_args("--steps=2", "--clip=0.01", "--w_gan=0.1", "--disc_ch=16", "--disc_layers=1")
    trainer = TokenizerTrainer(build_vae(args), args, torch.device("cpu"))
    trainer.train_step(mnist_batch(4))
    disc_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.disc.parameters()]))
    vae_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.vae.parameters()
                                                     if p.grad is not None]))
    assert disc_norm > 1.0 and vae_norm == pytest.approx(0.01, rel=1e-5)
