"""Trainer.micro_step and friends on a tiny tokenizer + model (CPU): loss, no-decay groups, the scheduled step,
accumulation, progressive training, non-finite steps, AMP, validation, trainer state."""
import copy
import json
import logging
import math
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torch.utils.data import TensorDataset

from conftest import build_tiny_mvar
from models.precision import AMP_DTYPES
from trainer import Trainer, data_problems, param_groups
from utils.data.loaders import build_loaders
from utils.run.divergence import NonFiniteError
from utils.run.preemption import Stopped
from utils.run.schedule import Schedule

pytestmark = pytest.mark.numerics  # rerun by `make test` at the lowest ISA level

PN = (1, 2, 4)
CPU = torch.device("cpu")
TEN_STEPS = Schedule(tlr=1e-3, max_it=10, wp_it=1, num_scales=len(PN))  # one warm-up iteration


def tiny(cond_drop_rate=0.0, arch="mvar", drop_path_rate=None, **trainer_kw):
    vae, mvar = build_tiny_mvar(patch_nums=PN, num_classes=4, init_adaln_gamma=0.1, cond_drop_rate=cond_drop_rate,
                                arch=arch, drop_path_rate=drop_path_rate)
    return Trainer(vae, mvar, CPU, lr=1e-3, **trainer_kw)


def batch(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, 8, 8, generator=g) * 2 - 1, torch.randint(0, 4, (B,), generator=g)


def test_no_weight_decay_groups_follow_var():
    tr = tiny()
    names = {id(p): n for n, p in tr.mvar.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(tr.mvar))
    for n in ("pos_start", "pos_1LC", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "blocks.0.attn.q_bias",
              "blocks.0.mamba.A_log", "blocks.0.mamba.D", "blocks.0.mamba.dt_bias", "blocks.0.ffn.fc1.bias",
              "head.bias"):
        assert n in no_decay, n
    for n in ("blocks.0.attn.mat_qkv.weight", "blocks.0.mamba.in_proj.weight", "blocks.0.ffn.fc1.weight",
              "word_embed.weight", "head.weight", "blocks.0.ada_lin.1.weight"):
        assert n in decay, n
    opt = tr.optimizer
    assert opt.defaults["betas"] == (0.9, 0.95) and [g["wd_sc"] for g in opt.param_groups] == [1.0, 0.0]


def test_every_1d_parameter_gets_no_weight_decay():
    """VAR decays no 1-D parameter: Mamba2's gated RMSNorm weight (`mamba.norm.weight`) is 1-D with no bias suffix,
    no _no_weight_decay flag and no NO_WD_KEYS fragment, so only the ndim rule spares it (a `p.ndim < 1` decayed
    it)."""
    tr = tiny()
    names = {id(p): n for n, p in tr.mvar.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(tr.mvar))
    one_d = {n for n, p in tr.mvar.named_parameters() if p.ndim <= 1}
    assert {"blocks.0.mamba.norm.weight", "blocks.1.mamba.norm.weight"} <= one_d
    assert one_d <= no_decay and not one_d & decay


def test_shared_adaln_gammas_get_no_weight_decay():
    """--saln: each block's `ada_gss` (its learnt shift of the shared modulation, 4-D, so the ndim rule does not spare
    it) is in VAR's no-decay list; dropping it from NO_WD_KEYS decayed it and passed the suite, whose models have no
    shared adaLN."""
    _, mvar = build_tiny_mvar(patch_nums=PN, num_classes=4, shared_aln=True)
    names = {id(p): n for n, p in mvar.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(mvar))
    assert {"blocks.0.ada_gss", "blocks.1.ada_gss"} <= no_decay and "shared_ada_lin.1.weight" in decay


def test_loss_is_uniform_token_cross_entropy():
    tr = tiny()
    logits_BLV, gt_BL = torch.randn(3, 21, 64), torch.randint(0, 64, (3, 21))
    assert torch.allclose(tr.token_loss(logits_BLV, gt_BL, -1, 1.0), F.cross_entropy(logits_BLV.flatten(0, 1),
                                                                                      gt_BL.flatten()))
    tr.label_smooth = 0.1
    ref = F.cross_entropy(logits_BLV.flatten(0, 1), gt_BL.flatten(), label_smoothing=0.1)
    assert torch.allclose(tr.token_loss(logits_BLV, gt_BL, -1, 1.0), ref)
    # progressive: first 5 tokens (scales 1, 2), the newest scale weighted by prog_wp, weights still 1/L
    tr.label_smooth = 0.0
    ce_BL = F.cross_entropy(logits_BLV[:, :5].flatten(0, 1), gt_BL[:, :5].flatten(), reduction="none").view(3, 5)
    ref = (ce_BL[:, :1].sum(1) + 0.25 * ce_BL[:, 1:5].sum(1)).mean() / 21
    assert torch.allclose(tr.token_loss(logits_BLV[:, :5], gt_BL, 1, 0.25), ref)


def test_loss_goes_down_on_a_fixed_batch_by_reading_the_teacher_input():
    """Most of a fixed batch's loss drop can come from the token frequencies per position and label alone (a model
    that ignores its input goes from 4.16 to 2.0 in 25 steps), so the model is raced against a blind copy of itself,
    trained on the same targets with the teacher input zeroed, one label for all: it must end clearly lower."""
    inp, _ = batch(8)
    label = torch.zeros(8, dtype=torch.long)
    seeing, blind = tiny(), tiny()
    gt_BL, x_BLCv = seeing.targets(inp)
    losses = [(seeing.micro_step_tokens(gt_BL, x_BLCv, label).loss.item(),
               blind.micro_step_tokens(gt_BL, torch.zeros_like(x_BLCv), label).loss.item()) for _ in range(60)]
    (first, _), (last, last_blind) = losses[0], losses[-1]
    assert last < first - 2.0 and last < last_blind - 0.1, losses[-1]


def test_adamw_is_fused_on_the_cpu_too_and_steps_like_the_single_tensor_one():
    """--afuse (the default) fuses AdamW on the CPU as on CUDA (one pass per parameter); ten steps follow those of
    the single-tensor AdamW (--afuse=0) from the same weights to fp32 rounding (measured 1.2e-7 apart, at AVX2 and at
    ATEN_CPU_CAPABILITY=default; allowed 1e-5, while the weights move by 1e-2, so a different update fails)."""
    fused, plain = tiny(), tiny(fused_adam=False)
    assert fused.optimizer.defaults["fused"] and not plain.optimizer.defaults["fused"]
    start = [p.detach().clone() for p in fused.mvar.parameters()]
    for seed in range(10):
        inp, label = batch(4, seed)
        for trainer in (fused, plain):
            torch.manual_seed(seed)  # the same dropout draws
            trainer.micro_step(inp, label)
    moved = max((p.detach() - p0).abs().max().item() for p, p0 in zip(fused.mvar.parameters(), start, strict=True))
    gap = max((a.detach() - b.detach()).abs().max().item()
              for a, b in zip(fused.mvar.parameters(), plain.mvar.parameters(), strict=True))
    assert moved > 1e-3 and gap < 1e-5, (moved, gap)


def test_progressive_step_trains_only_the_first_scales():
    tr = tiny()
    tr.label_smooth = 0.0
    res = tr.micro_step(*batch(), prog_si=1, prog_wp=0.5)
    assert res.logits_BLV.shape == (4, 5, 64) and tr.micro_step(*batch()).logits_BLV.shape == (4, 21, 64)
    assert res.grad_norm is not None and math.isfinite(res.grad_norm)
    # the loss of the first two scales (5 tokens), the newest one weighted by prog_wp, over all 21 tokens
    ce_BL = F.cross_entropy(res.logits_BLV.flatten(0, 1), res.gt_BL[:, :5].flatten(), reduction="none").view(4, 5)
    assert res.loss.item() == pytest.approx(((ce_BL[:, :1].sum(1) + 0.5 * ce_BL[:, 1:].sum(1)).mean() / 21).item(),
                                            rel=1e-5)


def test_step_follows_the_schedule_steps_at_window_ends_and_reports_its_metrics():
    sched = Schedule(tlr=1e-3, max_it=10, wp_it=2, pg=0.5, pg0=1, num_scales=len(PN), pgwp_it=1)
    tr = tiny(ac=2, schedule=sched)
    for g_it in range(4):
        res, point = tr.scheduled_step(*batch(), g_it), sched.at(g_it)
        assert res.schedule == point and res.stepped == (g_it % 2 == 1) and (res.grad_norm is None) != res.stepped
        assert [(g["lr"], g["weight_decay"]) for g in tr.optimizer.param_groups] == [(point.lr, point.wd),
                                                                                     (point.lr, 0.0)]
        assert res.logits_BLV.shape[1] == (tr.mvar.begin_ends[point.prog_si][1] if point.prog_si >= 0 else 21)
    assert sched.at(0).prog_si == 1  # the progressive stage did reach the model
    metrics = tr.pop_metrics(seconds=2.0)
    assert metrics["opt/"]["lr"] == sched.at(3).lr and metrics["speed/"]["images_per_s"] == 4 * 4 / 2.0
    assert set(metrics["train/"]) >= {"loss", "grad_norm", "Lm", "Accm", "vocab_usage"}


def test_the_scheduled_step_weights_the_newest_scale_by_the_schedules_prog_wp():
    """Progressive training ramps the loss weight of a newly added scale in (`prog_wp`, here 0.25 at the first
    iteration of stage 1); `scheduled_step` passing the stage alone trained it at full weight at once, and the
    suite checked only the stage reaching the model."""
    sched = Schedule(tlr=1e-3, max_it=20, wp_it=2, pg=0.8, pg0=0, num_scales=len(PN), pgwp_it=4)
    point = sched.at(6)
    assert (point.prog_si, point.prog_wp) == (1, 0.25)
    tr = tiny(schedule=sched)
    res = tr.scheduled_step(*batch(), 6)
    assert res.logits_BLV.shape[1] == 5
    assert torch.equal(res.loss, tr.token_loss(res.logits_BLV, res.gt_BL, 1, 0.25))
    assert not torch.equal(res.loss, tr.token_loss(res.logits_BLV, res.gt_BL, 1, 1.0))


def test_the_logged_loss_and_grad_norm_are_the_means_since_the_last_log():
    """pop_metrics reports the mean loss and grad norm of the steps since its last call (--log_every of them), then
    starts afresh; the end-to-end runs log every step, so a sum reported as the mean passed the suite."""
    tr = tiny(schedule=TEN_STEPS)
    results = [tr.scheduled_step(*batch(seed=g_it), g_it) for g_it in range(3)]
    train = tr.pop_metrics(seconds=1.0)["train/"]
    assert train["loss"] == pytest.approx(sum(r.loss.item() for r in results) / 3, rel=1e-6)
    assert train["grad_norm"] == pytest.approx(sum(r.grad_norm for r in results) / 3, rel=1e-12)
    last = tr.scheduled_step(*batch(seed=3), 3)
    assert tr.pop_metrics(seconds=1.0)["train/"]["loss"] == last.loss.item()


def test_the_speed_counts_the_images_of_every_rank(monkeypatch):
    """images_per_s is the global throughput: each step counts its micro-batch times the world size (two ranks
    faked here); counting this rank's images alone passed the suite, whose multi-rank runs do not read the speed."""
    import dist

    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    tr = tiny(schedule=TEN_STEPS)
    for g_it in range(3):
        tr.scheduled_step(*batch(seed=g_it), g_it)
    speed = tr.pop_metrics(seconds=2.0)["speed/"]
    assert speed["images_per_s"] == 3 * 4 * 2 / 2.0 and speed["tokens_per_s"] == 3 * 4 * 2 * 21 / 2.0


@pytest.mark.parametrize("arch", ["mvar", "var"])
def test_grad_ckpt_gives_the_plain_steps_loss_and_gradients(arch):
    """--grad_ckpt recomputes each block in the backward: the same operations on the same inputs, with the drop
    path's and the label dropout's random draws replayed, so the loss and every gradient are bit-identical."""
    plain, ckpt = (tiny(cond_drop_rate=0.5, arch=arch, drop_path_rate=0.3) for _ in range(2))
    ckpt.mvar.grad_ckpt = True
    losses = []
    for tr in (plain, ckpt):
        torch.manual_seed(1)  # the same draws for the label dropout and the drop path
        losses.append(tr.micro_step(*batch(), stepping=False).loss)
    assert torch.equal(losses[0], losses[1])
    for (n, p), q in zip(plain.mvar.named_parameters(), ckpt.mvar.parameters(), strict=True):
        assert p.grad is not None and torch.equal(p.grad, q.grad), n


def test_accumulation_equals_one_big_step():
    inp, label = batch(8)
    big, acc = tiny(), tiny(ac=2)
    res_big = big.micro_step(inp, label)
    acc.micro_step(inp[:4], label[:4], stepping=False)
    res = acc.micro_step(inp[4:], label[4:], stepping=True)
    # the gradient itself (pre-clip norm): AdamW's first step would hide a loss not divided by ac (clip binds too)
    assert res.grad_norm == pytest.approx(res_big.grad_norm, rel=1e-5)
    for (n, p), q in zip(big.mvar.named_parameters(), acc.mvar.parameters(), strict=True):
        # two half-batch backward passes summed vs one: the gradients differ by fp32 rounding (~1e-7 relative), and
        # AdamW's first step (~lr * sign(g)) passes that on to the weights; measured 6e-8 (AVX2) and 1.9e-7
        # (ATEN_CPU_CAPABILITY=default), allowed 1e-6
        assert torch.allclose(p, q, atol=1e-6), n


def test_gradients_are_synchronised_on_the_window_ending_micro_step_only(monkeypatch):
    """--ac=3: DDP's all-reduce (dist.grad_sync) is off for the first two micro-steps of a window and on for the
    third; syncing every micro-step gives the same update at --ac times the communication, and passed the suite."""
    import dist

    seen, real = [], dist.grad_sync
    monkeypatch.setattr(dist, "grad_sync", lambda model, enabled: seen.append(enabled) or real(model, enabled))
    tr = tiny(ac=3, schedule=TEN_STEPS)
    for g_it in range(6):
        tr.scheduled_step(*batch(seed=g_it), g_it)
    assert seen == [False, False, True] * 2


def total_norm(tensors) -> float:
    """The global 2-norm of these tensors together, as clip_grad_norm_ computes it."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])).item()


def backward_gradients(tr) -> dict:
    """Each parameter's gradient as the backward pass computes it (before any unscaling or clipping), by name."""
    grads = {}
    for n, p in tr.mvar.named_parameters():
        p.register_hook(lambda g, n=n: grads.__setitem__(n, g.clone()))
    return grads


def stepped_gradient_norms(tr) -> list:
    """The total gradient norm the optimizer steps with, one entry per optimizer step."""
    seen = []
    tr.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(total_norm(
        p.grad for g in opt.param_groups for p in g["params"])))
    return seen


def test_clip_logs_pre_clip_norm_and_clips():
    tr = tiny(tclip=1e-3)
    before = copy.deepcopy(tr.mvar.state_dict())
    grads = backward_gradients(tr)
    seen = stepped_gradient_norms(tr)
    res = tr.micro_step(*batch())
    norm = total_norm(grads.values())
    assert res.grad_norm == pytest.approx(norm, rel=1e-5) and res.grad_norm > 100 * 1e-3  # logged before clipping
    assert seen == [pytest.approx(1e-3, rel=1e-4)]  # ... and clipped to tclip before the step
    assert any(not torch.equal(before[k], v) for k, v in tr.mvar.state_dict().items())


def test_tclip_zero_turns_the_clip_off():
    """--tclip<=0 disables clipping (utils.flags): the optimizer steps with the whole gradient, whose norm is logged.
    A clip to max_norm 0 instead zeroed every gradient (no training at all) and passed the suite."""
    tr = tiny(tclip=0.0)
    seen = stepped_gradient_norms(tr)
    res = tr.micro_step(*batch())
    assert res.grad_norm > 0 and seen == [pytest.approx(res.grad_norm, rel=1e-5)]


def test_non_finite_steps_are_skipped_then_stop_the_run(caplog):
    tr = tiny(max_nonfinite=2)
    inp, label = batch()
    with torch.no_grad():
        tr.mvar.head.bias[0] = float("nan")
    before = {k: v.clone() for k, v in tr.mvar.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="trainer"):
        res = tr.micro_step(inp, label)
    assert res.skipped and tr.guard.bad_in_a_row == 1 and "skipped" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in tr.mvar.state_dict().items() if k != "head.bias")
    with pytest.raises(NonFiniteError, match="--max_nonfinite=2"):
        tr.micro_step(inp, label)


def test_an_fp16_overflow_is_gradscalers_skip_not_a_bad_step():
    """A review: GradScaler's ordinary overflow counted as a bad step, which blocked a save (the final checkpoint
    too, when the last step overflowed). It still skips the step, and max_nonfinite in a row stop the run."""
    tr = tiny(fp16=1, max_nonfinite=2)
    inp, label = batch()
    tr.micro_step(inp, label)
    before = {k: v.clone() for k, v in tr.mvar.state_dict().items()}
    tr.scaler.update(new_scale=1e38)  # the scaled gradients overflow
    res = tr.micro_step(inp, label)
    assert res.skipped and not math.isfinite(res.grad_norm) and res.loss_scale > 1e37 > tr.scaler.get_scale()
    assert tr.guard.bad_in_a_row == 0 and tr.save_blocker() is None
    assert all(torch.equal(before[k], v) for k, v in tr.mvar.state_dict().items())
    tr.scaler.update(new_scale=1e38)
    with pytest.raises(NonFiniteError, match="2 fp16 steps in a row overflowed"):
        tr.micro_step(inp, label)


def test_an_fp16_step_with_a_non_finite_loss_is_a_bad_step_not_an_overflow():
    """utils.run.loss_scale's rule in the generator's trainer (the tokenizer trainer's test pinned it alone): a NaN
    loss under --fp16=1 also makes the gradients non-finite, but it is a bad step, skipped and counted by the guard,
    which blocks a save; not GradScaler's overflow, whose count stays 0 (GradScaler still halves its scale, as in
    VAR, since the gradients it unscaled were non-finite)."""
    tr = tiny(fp16=1, max_nonfinite=2)
    inp, label = batch()
    tr.micro_step(inp, label)
    scale = tr.scaler.get_scale()
    with torch.no_grad():
        tr.mvar.head.bias[0] = float("nan")
    before = {k: v.clone() for k, v in tr.mvar.state_dict().items()}
    res = tr.micro_step(inp, label)
    assert res.skipped and not math.isfinite(res.loss.item()) and tr.guard.bad_in_a_row == 1
    assert tr.overflows_in_a_row == 0 and tr.scaler.get_scale() == scale / 2 and tr.save_blocker() is not None
    assert all(torch.equal(before[k], v) for k, v in tr.mvar.state_dict().items() if k != "head.bias")


def test_fp16_gradients_are_unscaled_before_the_clip():
    """--fp16=1: GradScaler's scaled gradients are unscaled before the clip, so the logged norm is the true one and
    the clip binds at --tclip (here 1e-3); clipping the scaled gradients (unscale_ left to scaler.step) clipped them
    2**11 times too hard and logged a norm 2**11 too high, and passed the suite."""
    tr = tiny(fp16=1, tclip=1e-3)
    grads = backward_gradients(tr)  # the scaled gradients under fp16
    seen = stepped_gradient_norms(tr)
    res = tr.micro_step(*batch())
    scaled = total_norm(grads.values())
    assert res.grad_norm == pytest.approx(scaled / 2.0**11, rel=1e-5) and res.grad_norm > 100 * 1e-3
    assert seen == [pytest.approx(1e-3, rel=1e-4)]


def test_a_good_step_between_fp16_overflows_resets_their_count():
    """--max_nonfinite counts fp16 overflows in a row: two overflows with a good step between them stop no run at
    max_nonfinite=2 (a count that a good step did not reset stopped it there, and passed the suite)."""
    tr = tiny(fp16=1, max_nonfinite=2)
    inp, label = batch()
    tr.micro_step(inp, label)
    for _ in range(2):
        tr.scaler.update(new_scale=1e38)  # the scaled gradients overflow
        assert tr.micro_step(inp, label).skipped and tr.overflows_in_a_row == 1
        tr.scaler.update(new_scale=2.0**11)
        assert not tr.micro_step(inp, label).skipped and tr.overflows_in_a_row == 0


def test_fp16_overflows_in_a_row_resume_with_the_run():
    """A run saved inside a streak of fp16 overflows counts on after its resume, as the guard's bad steps do: the
    count restarted at 0, so a resumed run tolerated up to twice --max_nonfinite overflows in a row before it
    stopped. A checkpoint from before the count was kept resumes at 0."""
    tr = tiny(fp16=1, max_nonfinite=2)
    inp, label = batch()
    tr.micro_step(inp, label)
    tr.scaler.update(new_scale=1e38)  # the scaled gradients overflow
    assert tr.micro_step(inp, label).skipped and tr.overflows_in_a_row == 1
    state = tr.state_dict()
    resumed = tiny(fp16=1, max_nonfinite=2)
    resumed.load_state_dict(state)
    assert resumed.overflows_in_a_row == 1 and resumed.scaler.get_scale() == tr.scaler.get_scale()
    resumed.load_state_dict({**state, "scaler": {**state["scaler"], "scale": 1e38}})  # overflows again
    with pytest.raises(NonFiniteError, match="2 fp16 steps in a row overflowed"):
        resumed.micro_step(inp, label)
    older = tiny(fp16=1, max_nonfinite=2)
    older.load_state_dict({**state, "scaler": {k: v for k, v in state["scaler"].items() if k != "overflows_in_a_row"}})
    assert older.overflows_in_a_row == 0 and older.scaler.get_scale() == tr.scaler.get_scale()


def test_the_fp16_loss_scale_is_capped_at_32768_as_vars():
    """VAR caps GradScaler's scale at 2**15 after each step (a higher one overflows the fp16 gradients more often);
    the cap left out passed the suite. The step logs the scale it ran at, as VAR does (it logged the next one)."""
    tr = tiny(fp16=1)
    inp, label = batch()
    tr.micro_step(inp, label)
    tr.scaler.update(new_scale=65536.0)
    res = tr.micro_step(inp, label)
    assert not res.skipped and res.loss_scale == 65536.0 and tr.scaler.get_scale() == 32768.0


def test_the_fp16_loss_scale_doubles_after_1000_steps_without_an_overflow_as_vars():
    """VAR's GradScaler grows its scale from 2**11 every 1000 good steps (growth_interval=1000); another interval
    (2000) passed the suite, whose fp16 runs take a dozen steps. 1000 steps of the scaler alone on one weight."""
    from utils.run.loss_scale import LossScaler

    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.0)
    scaler = LossScaler("cpu", max_nonfinite=2, hint="")
    scales = []
    for _ in range(1000):
        scaler.scale(w.sum()).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update_capped()
        opt.zero_grad(set_to_none=True)
        scales.append(scaler.get_scale())
    assert scales[0] == scales[998] == 2048.0 and scales[999] == 4096.0


def test_with_accumulation_the_guard_judges_the_windows_mean_loss():
    """--ac=2: the update holds both micro-steps' gradients, so the guard judges both losses (their mean), not the
    last micro-step's alone, which let a spike in an earlier micro-step through; a far too high window is skipped."""
    tr = tiny(ac=2, diverge_tol=10.0)
    judged = []
    update = tr.guard.update
    tr.guard.update = lambda loss, finite=True: judged.append(loss) or update(loss, finite)
    first = tr.micro_step(*batch(seed=1), stepping=False)
    last = tr.micro_step(*batch(seed=2), stepping=True)
    assert first.loss != last.loss and judged == [pytest.approx((first.loss + last.loss).item() / 2, rel=1e-6)]
    tr.guard.tol = 1.5  # a window's mean loss above 1.5x the running level is bad
    bias = tr.mvar.head.bias.detach().clone()
    with torch.no_grad():  # a spike in the first micro-step only
        tr.mvar.head.bias.add_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(0)) * 20)
    spike = tr.micro_step(*batch(seed=1), stepping=False).loss.item()
    with torch.no_grad():
        tr.mvar.head.bias.copy_(bias)
    res = tr.micro_step(*batch(seed=2), stepping=True)
    level = tr.guard.level
    assert res.loss.item() < 1.5 * level < (spike + res.loss.item()) / 2 and res.skipped, (spike, res.loss, level)


def test_no_checkpoint_after_a_bad_step_or_of_non_finite_weights():
    """`save_blocker`: the weights a bad step was judged on, or non-finite ones, are not saved (train.py waits for
    the next good step); a loss far above its running level is a bad step too, and skipped."""
    tr = tiny(diverge_tol=10.0)
    inp, label = batch()
    assert not tr.micro_step(inp, label).skipped and tr.save_blocker() is None
    tr.guard.tol = 0.1  # the next (ordinary) loss is now far above the tolerated level
    before = {k: v.clone() for k, v in tr.mvar.state_dict().items()}
    assert tr.micro_step(inp, label).skipped and "bad" in tr.save_blocker()
    assert all(torch.equal(before[k], v) for k, v in tr.mvar.state_dict().items())
    tr.guard.tol = 10.0
    assert not tr.micro_step(inp, label).skipped and tr.save_blocker() is None
    with torch.no_grad():
        tr.mvar.head.weight[0, 0] = float("inf")
    assert "non-finite" in tr.save_blocker()


def test_a_non_finite_weight_on_another_rank_blocks_the_save_on_this_one(monkeypatch):
    """`save_blocker` counts the non-finite weights of all ranks (an FSDP2 shard holds some weights on one rank
    only): the all-reduce faked here adds another rank's one. Judging the local weights alone passed the suite, and
    would let the ranks disagree on saving (the others then wait at the save's collectives)."""
    import dist

    tr = tiny()
    tr.micro_step(*batch())
    assert tr.save_blocker() is None
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t.add_(1))
    assert tr.save_blocker() == "a weight is non-finite"
    assert tr.save_blocker(resume_point=False) == "a weight is non-finite"


@pytest.mark.parametrize("fp16", [1, 2])
def test_mixed_precision_steps(fp16, monkeypatch):
    """fp16 (GradScaler) and bf16 steps: bf16 forced (emulated on a CPU without bf16 instructions, where --fp16=2
    would otherwise train in fp32), so both low precisions really run on every CPU."""
    monkeypatch.setenv("MVAR_CPU_BF16", "1")
    tr = tiny(fp16=fp16)
    assert tr.amp_dtype == (torch.float16 if fp16 == 1 else torch.bfloat16)
    res = tr.micro_step(*batch())
    assert math.isfinite(res.loss.item()) and res.logits_BLV.dtype == torch.float32
    assert (res.loss_scale == 2.0**11) if fp16 == 1 else res.loss_scale is None
    assert (tr.scaler is not None) == (fp16 == 1)
    ref = tiny(fp16=0).micro_step(*batch()).logits_BLV
    # the same first step in fp32: the logits differ (low precision ran) by the rounding of an 8 (bf16) / 11 (fp16)
    # bit mantissa over a few layers: measured 0.015 (bf16) and 0.0018 (fp16) of the logits' std on AVX2 and
    # ATEN_CPU_CAPABILITY=default; allowed 4x that, where wrong weights or a skipped layer are off by the std itself
    err = (res.logits_BLV - ref).abs().max().item() / ref.std().item()
    assert 0 < err < (0.06 if fp16 == 2 else 0.008), err


def test_evaluate_reports_per_scale_metrics_with_cond_dropout_off():
    tr = tiny(cond_drop_rate=1.0)  # in train mode every label would be dropped
    loader = [batch(4, seed=1), batch(2, seed=2)]
    a, b = tr.evaluate(loader, resos=(2, 4, 8)), tr.evaluate(loader, resos=(2, 4, 8))
    assert a == b and a["n"] == 6 and tr.mvar.training
    assert set(a) >= {"vL_2", "vL_4", "vL_8", "vacc_8", "vL_mean", "vacc_tail"}
    assert a["vL_tail"] == a["vL_8"] and 0 < a["vL_mean"] < 10
    labels_seen = []
    handle = tr.mvar.class_emb.register_forward_hook(lambda m, i, o: labels_seen.append(i[0].clone()))
    tr.evaluate(loader[:1], resos=(2, 4, 8))
    handle.remove()
    assert torch.equal(labels_seen[0], loader[0][1])  # no label replaced by the null class


def test_validations_tail_metrics_are_the_last_scales():
    """vL_tail / vacc_tail (VAR's last-scale numbers: the best checkpoint's criterion, logged every validation) are
    the last scale's. A vacc_tail read from the scale before passed the suite, where a fresh model's accuracy is 0
    on every scale; here the logits are right on the last scale only."""
    tr = tiny()
    inp, lab = batch(4, seed=1)
    gt_BL, _ = tr.targets(inp)
    bg, _ = tr.mvar.begin_ends[-1]
    logits_BLV = F.one_hot((gt_BL + 1) % tr.mvar.V, tr.mvar.V).float() * 5  # wrong everywhere
    logits_BLV[:, bg:] = F.one_hot(gt_BL[:, bg:], tr.mvar.V).float() * 5  # but on the last scale
    tr.mvar.forward = lambda label_B, x_BLCv, prog_si=-1: logits_BLV
    got = tr.evaluate([(inp, lab)], resos=(2, 4, 8))
    assert (got["vacc_tail"], got["vacc_8"], got["vacc_4"], got["vacc_2"]) == (100.0, 100.0, 0.0, 0.0)
    assert got["vL_tail"] == got["vL_8"] < got["vL_4"] - 1 and got["vL_4"] == pytest.approx(got["vL_2"], rel=1e-6)


@pytest.mark.parametrize("fp16", [0, 1, 2])
def test_evaluate_equals_a_direct_computation_over_the_valid_samples(fp16):
    """Per-sample means over all samples (not per batch: the batches hold 4 and 2), padding (valid False) left out;
    in fp32 whatever the training precision, as VAR's eval_ep (a review: it ran under the training's autocast)."""
    tr = tiny(fp16=fp16)
    tr.amp_dtype = AMP_DTYPES[fp16]  # bf16 too where this CPU would fall back to fp32 (CPU autocast emulates it)
    with torch.no_grad():
        tr.mvar.head.weight.mul_(300)  # logits of a trained model's size (a fresh one's are near 0: CE ~ log V)
    (inp_a, lab_a), (inp_b, lab_b) = batch(4, seed=1), batch(2, seed=2)
    valid = torch.tensor([True, False, True, True, True, True])
    got = tr.evaluate([(inp_a, lab_a, valid[:4]), (inp_b, lab_b, valid[4:])], resos=(2, 4, 8))
    tr.mvar.eval()
    with torch.no_grad():
        gt_BL, x_BLCv = tr.targets(torch.cat([inp_a, inp_b])[valid])
        logits_BLV = tr.mvar(torch.cat([lab_a, lab_b])[valid], x_BLCv)
    ce_BL = F.cross_entropy(logits_BLV.flatten(0, 1), gt_BL.flatten(), reduction="none").view(gt_BL.shape)
    hit_BL = (logits_BLV.argmax(-1) == gt_BL).double() * 100
    assert got["n"] == 5
    assert got["vL_mean"] == pytest.approx(ce_BL.mean().item(), rel=1e-5)
    assert got["vacc_mean"] == pytest.approx(hit_BL.mean().item(), rel=1e-5)
    for reso, (bg, ed) in zip((2, 4, 8), tr.mvar.begin_ends, strict=True):
        assert got[f"vL_{reso}"] == pytest.approx(ce_BL[:, bg:ed].mean().item(), rel=1e-5), reso
        assert got[f"vacc_{reso}"] == pytest.approx(hit_BL[:, bg:ed].mean().item(), rel=1e-5), reso


def test_validation_and_the_logged_losses_are_the_unsmoothed_cross_entropy_under_label_smoothing():
    """--ls smooths the optimised loss only: VAR's validation and its logged Lm/Lt use a CrossEntropyLoss without
    smoothing (val_loss), so val losses stay comparable across --ls. Smoothing them too (token_ce given
    label_smooth) passed the suite, whose validation runs without --ls."""
    tr = tiny(label_smooth=0.1)
    with torch.no_grad():
        tr.mvar.head.weight.mul_(300)  # confident logits, where smoothing moves the loss by far more than rounding
    inp, lab = batch(4, seed=1)
    got = tr.evaluate([(inp, lab)], resos=(2, 4, 8))
    tr.mvar.eval()
    with torch.no_grad():
        gt_BL, x_BLCv = tr.targets(inp)
        logits_BLV = tr.mvar(lab, x_BLCv)
    plain = F.cross_entropy(logits_BLV.flatten(0, 1), gt_BL.flatten()).item()
    smoothed = F.cross_entropy(logits_BLV.flatten(0, 1), gt_BL.flatten(), label_smoothing=0.1).item()
    assert abs(smoothed - plain) > 1e-3 * plain  # 100x the tolerance below: the checks can tell them apart
    assert got["vL_mean"] == pytest.approx(plain, rel=1e-5)
    assert tr.scale_metrics(logits_BLV, gt_BL)["Lm"] == pytest.approx(plain, rel=1e-5)
    # the optimised loss is the smoothed one
    assert tr.token_loss(logits_BLV, gt_BL, -1, 1.0).item() == pytest.approx(smoothed, rel=1e-5)


def test_trainer_state_round_trip_gives_identical_next_step():
    tr = tiny(fp16=1)
    inp, label = batch()
    tr.micro_step(inp, label)
    state = copy.deepcopy(tr.state_dict())
    other = tiny(fp16=1)
    other.load_state_dict(state)
    a, b = tr.micro_step(inp, label), other.micro_step(inp, label)
    assert a.loss.item() == b.loss.item()
    assert all(torch.equal(p, q) for p, q in zip(tr.mvar.parameters(), other.mvar.parameters(), strict=True))


def test_trainer_state_round_trip_keeps_the_loss_scale_and_the_divergence_guard():
    """A resume restores GradScaler's scale (a fresh 2**11 would overflow or underflow again after a run had found
    its scale) and the guard's running level and bad-step count (a fresh guard forgets a run of bad steps and
    judges the next losses against no level)."""
    tr = tiny(fp16=1)
    tr.micro_step(*batch())  # GradScaler makes its scale at the first step
    tr.scaler.update(new_scale=512.0)
    tr.guard.level, tr.guard.bad_in_a_row = 3.25, 2
    other = tiny(fp16=1)
    assert other.scaler.get_scale() == 2.0**11 and (other.guard.level, other.guard.bad_in_a_row) == (None, 0)
    other.load_state_dict(copy.deepcopy(tr.state_dict()))
    assert other.scaler.get_scale() == 512.0
    assert (other.guard.level, other.guard.bad_in_a_row) == (3.25, 2) and not other.guard.healthy


def test_a_resume_keeps_this_runs_optimizer_implementation():
    """--afuse=0 on a relaunch runs the plain AdamW although the checkpoint's groups say fused (torch's
    load_state_dict copies every group key), and the other way round."""
    for saved, wanted in ((True, False), (False, True)):
        tr, other = tiny(fused_adam=saved), tiny(fused_adam=wanted)
        tr.micro_step(*batch())
        other.load_state_dict(copy.deepcopy(tr.state_dict()))
        assert all(g["fused"] is (True if wanted else None) for g in other.optimizer.param_groups)
        other.micro_step(*batch())  # and it steps (the fused kernel needs its step counters where it wants them)


def test_optimizer_state_is_saved_by_name_without_side_effects_and_old_index_keys_load():
    import dist

    tr = tiny()
    empty = dist.full_optimizer_state_dict(tr.mvar, tr.optimizer)
    assert empty["state"] == {} and not tr.optimizer.state  # saving before any step must not create state
    tr.micro_step(*batch())
    named = dist.full_optimizer_state_dict(tr.mvar, tr.optimizer)
    names = [n for n, _ in tr.mvar.named_parameters()]
    assert named["state"] and set(named["state"]) <= set(names)
    for sd in (named, tr.optimizer.state_dict()):  # ours, and plain index-keyed (checkpoints before names)
        other = tiny()
        dist.load_full_state(other.mvar, tr.mvar.state_dict(), other.optimizer, copy.deepcopy(sd))
        got = dist.full_optimizer_state_dict(other.mvar, other.optimizer)
        assert all(torch.equal(got["state"][n]["exp_avg_sq"], named["state"][n]["exp_avg_sq"]) for n in named["state"])
        assert got["param_groups"] == named["param_groups"]


def test_another_batch_or_training_set_is_refused_mid_epoch_only():
    """A checkpoint at an epoch's end resumes with another --bs/--ac or training set size (the next epoch is drawn
    afresh; the latter is logged); one mid-epoch needs the same global micro-batch and images. Refusing them at an
    epoch's end too (the batch check, or `data_problems` told every position is mid-epoch) passed the suite."""
    from models.loading import CheckpointError

    tr = tiny()
    args = {"glb_batch_size": 4, "ac": 1, "vae_ckpt": "vae.pth", "allow_other_tokenizer": False}
    data = {"classes": ["a", "b"], "train_images": 24}
    ckpt, path = tr.checkpoint(epoch=1, iter=0, args=args, data=data), Path("ar-ckpt-last.pth")
    for run_args, run_data, refused in (({**args, "glb_batch_size": 8}, data, "global micro-batch 4 vs 8"),
                                        (args, {**data, "train_images": 28}, "the training set has 28 images, 24")):
        tr.check_resumable(ckpt, path, run_args, run_data)
        with pytest.raises(CheckpointError, match=refused):
            tr.check_resumable({**ckpt, "iter": 3}, path, run_args, run_data)


def test_a_data_digest_recorded_on_one_side_only_is_not_compared():
    """Checkpoints written before the training files' or the token cache's digest was recorded (and embedded data
    sets, whose file digest is None) resume mid-epoch: only two recorded digests that differ are refused. A missing
    digest taken for a different one passed the suite (its runs record both sides alike)."""
    images, cache = {"classes": ["a"], "train_images": 8}, {"classes": ["a"], "train_images": 8, "tokens": ["center"]}
    assert data_problems(images, {**images, "train_files": "f1", "cache": None}, mid_epoch=True) == []
    assert data_problems({**images, "train_files": None}, {**images, "train_files": "f1"}, mid_epoch=True) == []
    assert data_problems(cache, {**cache, "cache": "c1"}, mid_epoch=True) == []
    assert "the training image files" in data_problems({**images, "train_files": "f0"},
                                                       {**images, "train_files": "f1"}, mid_epoch=True)[0]
    assert "the token cache's ids" in data_problems({**cache, "cache": "c0"}, {**cache, "cache": "c1"}, True)[0]


def test_a_resume_continues_from_the_checkpoints_position_weights_and_best_val_loss():
    """`resume` -> (epoch, iter, best val loss) of the checkpoint, its weights loaded: a best val loss forgotten
    (inf) made the first validation after every resume "best", overwriting -best with worse weights, and passed the
    suite. Checkpoints without one start from inf."""
    tr = tiny()
    tr.micro_step(*batch())
    args = {"glb_batch_size": 4, "ac": 1, "vae_ckpt": "vae.pth", "allow_other_tokenizer": False}
    ckpt = copy.deepcopy(tr.checkpoint(epoch=2, iter=3, args=args, best_val=1.25, data=None))
    other = tiny()
    assert other.resume(ckpt, Path("ar-ckpt-last.pth"), args, {}) == (2, 3, 1.25)
    assert all(torch.equal(p, q) for p, q in zip(tr.mvar.parameters(), other.mvar.parameters(), strict=True))
    del ckpt["best_val"]
    assert tiny().resume(ckpt, Path("ar-ckpt-last.pth"), args, {}) == (2, 3, math.inf)


def test_a_resume_restores_the_rng_state_the_checkpoint_was_written_with():
    """`resume` restores this rank's generators from the checkpoint (the label dropout and drop path draw from
    them), so the resumed run draws what the uninterrupted one would. A resume that left them at the fresh seed
    passed this file; only the end-to-end SIGKILL test (a whole run, test_trainer_e2e.py) told it by its weights."""
    tr = tiny()
    tr.micro_step(*batch())
    args = {"glb_batch_size": 4, "ac": 1, "vae_ckpt": "vae.pth", "allow_other_tokenizer": False}
    torch.manual_seed(123)
    ckpt = copy.deepcopy(tr.checkpoint(epoch=0, iter=1, args=args, data=None))
    expected = torch.rand(4)  # the uninterrupted run's next draws
    other = tiny()
    torch.manual_seed(0)  # the resumed process's fresh seed
    other.resume(ckpt, Path("ar-ckpt-last.pth"), args, {})
    assert torch.equal(torch.rand(4), expected)


def val_set(n=7):
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, torch.randint(0, 4, (n,), generator=g))


EVAL_WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import dist
    from test_trainer import tiny, val_set
    from trainer import Trainer
    from utils.data.loaders import build_loaders

    def main():
        device = dist.initialize()
        tr = tiny()
        model = dist.wrap_model(tr.mvar, device, fsdp=True)  # every forward is a collective
        tr = Trainer(tr.vae, model, device)
        _, loader, _ = build_loaders(val_set(), val_set(), 2, 0, dist.get_rank(), 2, seed=0, pad_eval=True)
        metrics = tr.evaluate(loader, resos=(2, 4, 8))
        if dist.is_main_process():
            json.dump(metrics, open(sys.argv[1], "w"))
        dist.barrier()

    main()
    dist.finalize()  # once the FSDP2 model is out of scope
""")


def test_fsdp_evaluate_on_two_ranks_with_odd_val_set_equals_one_process(tmp_path, run_torchrun):
    """7 val images on 2 FSDP2 ranks (batches of 3): padded to 4 + 4 so both ranks run 2 collective forwards, and
    the padded image is not counted: the metrics equal one process's."""
    _, loader, _ = build_loaders(val_set(), val_set(), 2, 0, 0, 1, seed=0)
    ref = tiny().evaluate(loader, resos=(2, 4, 8))
    script, out = tmp_path / "worker.py", tmp_path / "metrics.json"
    script.write_text(EVAL_WORKER)
    run_torchrun(script, out, timeout=120)
    got = json.loads(out.read_text())
    assert ref["n"] == got["n"] == 7 and ref.keys() == got.keys()
    assert all(math.isclose(ref[k], got[k], rel_tol=1e-5, abs_tol=1e-6) for k in ref), (ref, got)


def test_validation_asks_before_each_batch_whether_to_stop():
    """A review: validation ran to its end after a signal (ImageNet's 50,000 images at d30: minutes, past a
    preemption's grace period). `stop()`, train.py's collective signal check, is asked before each batch of the
    padded loader (every rank has as many); True raises Stopped naming the batch, with the model's mode restored."""
    _, loader, _ = build_loaders(val_set(), val_set(), 2, 0, 0, 1, seed=0, pad_eval=True)  # 7 images: batches of 3
    tr, asked = tiny(), []

    def stop():
        asked.append(len(asked))
        return len(asked) == 2

    tr.mvar.train()
    with pytest.raises(Stopped, match="before batch 2 of 3"):
        tr.evaluate(loader, resos=(2, 4, 8), stop=stop)
    assert asked == [0, 1] and tr.mvar.training
    assert tr.evaluate(loader, resos=(2, 4, 8), stop=lambda: False) == tr.evaluate(loader, resos=(2, 4, 8))
    _, unpadded, _ = build_loaders(val_set(), val_set(), 2, 0, 0, 1, seed=0)  # ranks' batch counts may differ
    with pytest.raises(ValueError, match="pad_eval=True"):
        tr.evaluate(unpadded, resos=(2, 4, 8), stop=lambda: False)


def test_deterministic_flag_turns_on_deterministic_kernels(monkeypatch, caplog):
    """train.py --deterministic (for a bit-exact resume on a GPU, where some kernels add with atomics)."""
    import train
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "1")
    sdpa = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in ("flash", "mem_efficient", "cudnn")}
    try:
        with caplog.at_level(logging.INFO, logger=train.logger.name):
            train.use_deterministic_kernels(torch.device("cpu"))
            assert all(getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in sdpa)  # untouched
            # on CUDA, SDPA's math kernel: the others add with atomics in their backward under warn_only
            train.use_deterministic_kernels(torch.device("cuda"))
            assert not any(getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in sdpa)
            assert torch.backends.cuda.math_sdp_enabled()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        for name, enabled in sdpa.items():
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(enabled)
    assert train.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "TRITON_CACHE_AUTOTUNING=1 ignored" in caplog.text and "deterministic kernels" in caplog.text
    assert "TRITON_CACHE_AUTOTUNING" not in train.os.environ  # mamba_ssm then keeps one config per kernel
    assert train.parse_args(["--deterministic=1"]).deterministic and not train.parse_args([]).deterministic


def test_cudnn_times_its_convolutions_as_in_var_unless_deterministic():
    """VAR's seed_everything(benchmark=pg == 0): a review found it unset here (the tokenizer's convolutions ran
    cuDNN's heuristic picks). Not with progressive training (other shapes per stage) nor --deterministic."""
    import train

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert train.cudnn_benchmark(train.parse_args([]), cuda)
    for flags, device in ((["--pg=0.5"], cuda), (["--deterministic=1"], cuda), ([], cpu)):
        assert not train.cudnn_benchmark(train.parse_args(flags), device), (flags, device)


class Built(Exception):
    """Raised by a stand-in MVAR.__init__ with the default device it was called under."""


@pytest.mark.parametrize("builder", ["models.build_vae_mvar", "train.build_model", "bench.random_train_step"])
def test_models_are_built_on_their_device(builder, monkeypatch):
    """Every builder constructs M-VAR where it will run, not on the CPU first: init_weights redraws the weights on the
    device anyway, and a VAR-d30's 2B weights drawn on the CPU and copied over cost seconds of a GPU run."""
    import train
    from models import build_vae_mvar
    from scripts import bench

    def built_here(self, *args, **kwargs):
        raise Built(torch.get_default_device())

    monkeypatch.setattr(train.MVAR, "__init__", built_here)  # the class every builder constructs
    meta = torch.device("meta")
    build = {
        "models.build_vae_mvar": lambda: build_vae_mvar(meta, patch_nums=PN, V=32, Cvae=8, ch=32, ch_mult=(1, 2)),
        "train.build_model": lambda: train.build_model(
            train.finalize_args(train.parse_args(["--pn=1_2_4", "--dataset=mnist"]), 1),
            types.SimpleNamespace(vocab_size=32, Cvae=8), 4, meta),
        "bench.random_train_step": lambda: bench.random_train_step("mvar", 1, "fp32", meta,
                                                                   bench.build_parser().parse_args(["--pn", "1_2_4"])),
    }[builder]
    with pytest.raises(Built) as built:
        build()
    assert built.value.args[0] == meta


def test_init_from_weights_of_another_design_is_said_in_the_log(tmp_path, caplog):
    """--init_from ignored the design its file records: weights of --arch=var loaded into --arch=intra (the same
    names and shapes, another attention mask), as they did under another --num_heads (--anorm=0: no per-head
    scale), without a word. A warm start
    may mean that (an ablation's), so they load, and the log names each field that differs."""
    import train
    from models.loading import mvar_checkpoint
    from models.tokenizer import VQVAE

    vae = VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=(1, 2, 4))

    def build(*flags: str, weights=None):
        flags = ["--pn=1_2_4", "--dataset=mnist", "--depth=2", "--anorm=0", *flags]
        return train.build_model(train.finalize_args(train.parse_args(flags), 1), vae, 4, torch.device("cpu"), weights)

    torch.save(mvar_checkpoint(build("--arch=var", "--drop_path_rate=0.05")), tmp_path / "var.pth")
    cases = {("--arch=var",): [], ("--arch=intra",): ["arch=var -> intra"],
             ("--arch=intra", "--num_heads=4"): ["arch=var -> intra", "num_heads=2 -> 4"]}
    for flags, said in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="train"):
            build(*flags, weights=train.read_init_from(str(tmp_path / "var.pth")))
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert [w for w in warnings if "another design" in w] == ([] if not said else warnings[:1]), flags
        assert all(field in warnings[0] for field in said) and "drop_path_rate" not in "".join(warnings), flags


def test_training_time_samples_take_the_training_precision_only_when_the_forced_kernel_needs_it(monkeypatch):
    """A review: with --attn_backend=flash_attn (fp16/bf16 only) training ran, but the epoch's sample grid and
    --eval_every sampled in fp32, which that kernel refuses: the run failed at its first epoch's end, before the
    checkpoint, and again after every relaunch. They sample in the training's autocast dtype then; with the default
    flags (no --attn_backend: "auto" through --fuse) in fp32, as before (a second review caught the default)."""
    import train
    from models.backends import BackendError
    from utils.flags import parse_args

    tr = tiny(fp16=2)
    for flags in ([], ["--attn_backend=sdpa"], ["--fuse=0"]):
        assert train.inference_dtype(parse_args(flags), tr) is None, flags

    def half_only(backend, device, dtype):
        if backend == "flash_attn" and dtype == torch.float32:
            raise BackendError(f"{backend} needs float16/bfloat16 q/k/v")
        return backend
    monkeypatch.setattr(train, "resolve_backend", half_only)
    assert train.inference_dtype(parse_args(["--attn_backend=flash_attn"]), tr) == tr.amp_dtype
    assert train.inference_dtype(parse_args([]), tr) is None
    seen, real = [], type(tr.mvar).inference_precision
    monkeypatch.setattr(type(tr.mvar), "inference_precision",
                        lambda self, dtype: seen.append(dtype) or real(self, dtype))
    grid = train.sample_grid(tr.mvar, 4, seed=0, dtype=torch.bfloat16, n=4)
    assert seen == [torch.bfloat16] and grid.shape[0] == 3 and torch.isfinite(grid).all()


def test_a_steps_logits_are_dropped_when_the_next_step_starts():
    """A review: the last step's fp32 logits (B, L, V), 1 GB at d16 and batch 96, lived through the next step's
    forward and backward, at the memory peak; the metrics read them right after their own step."""
    tr = tiny(schedule=TEN_STEPS)
    first = tr.scheduled_step(*batch(), 0)
    assert first.logits_BLV is not None and tr.pop_metrics(seconds=1.0)["train/"]["Lm"] > 0
    second = tr.scheduled_step(*batch(seed=1), 1)
    assert first.logits_BLV is None and second.logits_BLV is not None and tr.last is second
