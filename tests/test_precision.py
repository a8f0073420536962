"""bf16 sampling (models.precision, MVAR.inference_precision): the same numbers as plain autocast without per-call
weight casts, logits close to fp32, the fp32 weights restored, and the fallback on a CPU without bf16."""
import logging

import pytest
import torch

import models.precision as precision
import sample
from trainer import Trainer
from conftest import build_tiny_mvar
from test_mvar import record_sampling

pytestmark = pytest.mark.numerics  # rerun by `make test` at the lowest ISA level

BF16 = torch.bfloat16
# max |bf16 - fp32| of the sampling logits over the fp32 logits' std: measured 0.017 (depth 4, width 256, head
# init 1: logits std 0.56, max error 0.0095); the test allows 0.04
LOGITS_REL_TOL_BF16 = 0.04


def sample_kw(B=2):
    return dict(B=B, label_B=torch.arange(B), g_seed=3, cfg=1.5, top_k=0, top_p=0.0)


def test_held_bf16_weights_give_plain_autocast_numbers_and_are_restored():
    _, mvar = build_tiny_mvar()
    mvar.eval()
    before = {n: p for n, p in mvar.named_parameters()}
    storage_before = {n: (p.data_ptr(), p.dtype) for n, p in before.items()}
    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
        ref = mvar.autoregressive_infer_cfg(**sample_kw())
    with torch.inference_mode(), mvar.inference_precision(BF16):
        assert mvar.blocks[0].mamba.in_proj.weight.dtype == BF16 and mvar.head.bias.dtype == BF16
        assert mvar.pos_1LC.dtype == torch.float32  # only the Linear layers
        assert mvar.vae.quantize.embedding.weight.dtype == torch.float32  # the tokenizer as it was
        held = mvar.autoregressive_infer_cfg(**sample_kw())
    assert torch.equal(held, ref)
    for n, p in mvar.named_parameters():  # the same Parameters, on their fp32 storage again
        assert p is before[n] and (p.data_ptr(), p.dtype) == storage_before[n], n
    mvar.train()
    mvar(torch.tensor([1]), torch.randn(1, mvar.L - 1, mvar.Cvae)).sum().backward()  # trainable as before


def test_teacher_forced_forward_under_held_weights_equals_plain_autocast():
    """forward embeds the tokens with autocast off (fp32 embeddings): its Linear keeps fp32 weights, so forward
    runs under inference_precision (it raised a dtype mismatch) with plain autocast's numbers."""
    _, mvar = build_tiny_mvar()
    mvar.eval()
    label_B, x_BLCv = torch.tensor([1, 2]), torch.randn(2, mvar.L - 1, mvar.Cvae)
    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
        ref = mvar(label_B, x_BLCv)
    with torch.inference_mode(), mvar.inference_precision(BF16):
        assert torch.equal(mvar(label_B, x_BLCv), ref)


def test_a_cast_that_fails_half_way_restores_the_weights(monkeypatch):
    _, mvar = build_tiny_mvar()
    layers = [m for m in mvar.modules() if isinstance(m, torch.nn.Linear)]
    original = {id(m.weight): m.weight.data_ptr() for m in layers}
    real_to, calls = torch.Tensor.to, []

    def failing_to(self, *args, **kwargs):  # the third cast runs out of memory
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("no room for the bf16 copy")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", failing_to)
    with pytest.raises(torch.OutOfMemoryError), precision.linear_weights_in(mvar, BF16):
        pass
    monkeypatch.undo()
    assert all(m.weight.data_ptr() == original[id(m.weight)] and m.weight.dtype == torch.float32 for m in layers)


def test_inference_precision_none_is_fp32():
    _, mvar = build_tiny_mvar()
    with torch.inference_mode():
        ref = mvar.autoregressive_infer_cfg(**sample_kw())
        with mvar.inference_precision(None):
            assert torch.equal(mvar.autoregressive_infer_cfg(**sample_kw()), ref)


def test_bf16_sampling_logits_close_to_fp32_teacher_forcing(monkeypatch):
    """The logits bf16 sampling draws from vs the fp32 model on the same tokens (teacher forcing, cfg 0)."""
    vae, mvar = build_tiny_mvar(depth=4, embed_dim=256, num_heads=4, d_state=64, init_head=1.0)
    mvar.eval()
    calls = record_sampling(monkeypatch)
    label_B = torch.tensor([1, 7])
    with torch.inference_mode(), mvar.inference_precision(BF16):
        mvar.autoregressive_infer_cfg(2, label_B, g_seed=3, cfg=0.0, top_k=0, top_p=0.0)
    logits_bf16 = torch.cat([logits for logits, _ in calls], dim=1)
    with torch.no_grad():
        logits_fp32 = mvar(label_B, vae.quantize.idxBl_to_var_input([idx for _, idx in calls]))
    assert logits_bf16.dtype == torch.float32  # the head's output is returned in fp32, as under autocast
    err = (logits_bf16 - logits_fp32).abs().max().item() / logits_fp32.std().item()
    assert 0 < err < LOGITS_REL_TOL_BF16, err  # > 0: bf16 really ran


def test_bf16_on_a_cpu_without_bf16_falls_back_to_fp32_with_one_log_line(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)  # auto: the (faked) flags decide
    precision._log_fallback.cache_clear()
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="models.precision"):
        assert precision.effective_amp_dtype(cpu, BF16) is None
        assert precision.effective_amp_dtype(cpu, BF16) is None
        assert precision.effective_amp_dtype(torch.device("cuda"), BF16) is BF16  # GPUs unchanged
        assert precision.effective_amp_dtype(cpu, torch.float16) is torch.float16
    assert len([r for r in caplog.records if "running in fp32" in r.message]) == 1
    args = sample.parse_args(["--depth", "16", "--bf16"])
    sample.fall_back_to_fp32_where_slow(args, cpu)
    assert sample.amp_dtype(args) is None and sample.precision_name(args) == "fp32"
    vae, mvar = build_tiny_mvar()  # training with --fp16=2 falls back alike; fp16 (1) is kept
    assert Trainer(vae, mvar, cpu, fp16=2).amp_dtype is None
    assert Trainer(vae, mvar, cpu, fp16=1).amp_dtype is torch.float16


@pytest.mark.skipif(not precision.cpu_bf16_flags(), reason="this CPU has no bf16 instructions")
def test_this_cpu_keeps_bf16(monkeypatch):
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    assert precision.effective_amp_dtype(torch.device("cpu"), BF16) is BF16


@pytest.mark.parametrize("flags", [(), ("avx512_bf16",)])
def test_env_forces_bf16_or_fp32_whatever_the_cpu(monkeypatch, flags):
    """MVAR_CPU_BF16=1 keeps bf16 (emulated on a CPU without the instructions: how the tests reach the bf16 paths
    on every CPU), =0 falls back everywhere; a bad value is an error naming the variable."""
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: flags)
    cpu = torch.device("cpu")
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    assert precision.effective_amp_dtype(cpu, BF16) is BF16
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    assert precision.effective_amp_dtype(cpu, BF16) is None
    assert precision.effective_amp_dtype(torch.device("cuda"), BF16) is BF16  # GPUs unchanged
    monkeypatch.setenv(precision.CPU_BF16_ENV, "auto")
    assert precision.effective_amp_dtype(cpu, BF16) is (BF16 if flags else None)
    monkeypatch.setenv(precision.CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="MVAR_CPU_BF16='yes': expected 1"):
        precision.effective_amp_dtype(cpu, BF16)



@pytest.mark.parametrize("value, runs_bf16", [("", False), (" AUTO ", False), ("1 ", True), ("\t0", False)])
def test_env_value_is_read_trimmed_and_case_blind_and_empty_is_auto(monkeypatch, value, runs_bf16):
    """MVAR_CPU_BF16 set but empty means auto (here: a CPU without the flags, so fp32), and the value is read with
    spaces trimmed and in any case. Refusing the empty value (mutant: "" left out of the accepted values) or reading
    it untrimmed (mutant: no .strip().lower()) passed the suite."""
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    monkeypatch.setenv(precision.CPU_BF16_ENV, value)
    assert precision.cpu_runs_bf16() is runs_bf16
    assert precision.effective_amp_dtype(torch.device("cpu"), BF16) is (BF16 if runs_bf16 else None)


@pytest.mark.parametrize("flags, found", [("fpu sse2 avx512f avx512_bf16", ("avx512_bf16",)),
                                          ("amx_tile amx_bf16 avx512_bf16", ("amx_bf16", "avx512_bf16")),
                                          ("avx2 avx512f avx512_fp16", ())])
def test_either_bf16_instruction_set_in_cpuinfo_counts(monkeypatch, flags, found):
    """/proc/cpuinfo's flags: AVX512-BF16 alone (Cooper Lake, Zen 4) is a bf16 CPU as well as AMX-BF16; looking for
    the first flag only (mutant) passed the suite, which fakes the result of this function, not its input."""
    monkeypatch.setattr(precision, "cpu_info", lambda: {"model name": "a test CPU", "flags": flags})
    precision.cpu_bf16_flags.cache_clear()
    try:
        assert precision.cpu_bf16_flags() == found
    finally:
        precision.cpu_bf16_flags.cache_clear()

def test_sample_cli_bf16_writes_pictures_and_records_the_precision(tmp_path, monkeypatch):
    """`sample.py --bf16` end to end on the CPU (bf16 forced: emulated on a CPU without bf16 instructions): the FID
    dump's settings say bf16; pictures come out."""
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    from models.loading import mvar_checkpoint

    vae, mvar = build_tiny_mvar()
    ckpt = tmp_path / "tiny.pth"
    torch.save(mvar_checkpoint(mvar, vae), ckpt)
    flags = ["--ckpt", str(ckpt), "--device", "cpu", "--bf16", "--cfg", "1.5", "--top_k", "10"]
    grid = sample.main([*flags, "--classes", "1", "2", "--num_per_class", "2", "--out", str(tmp_path / "g.png")])
    assert grid.is_file()
    npz = sample.main([*flags, "--fid", "--fid_num_per_class", "1", "--bs", "5", "--fid_dir", str(tmp_path / "fid")])
    assert '"precision": "bf16"' in npz.with_suffix(".json").read_text()


def test_word_embed_runs_in_fp32_under_bf16_inference():
    """word_embed takes the tokenizer's latents with autocast off, in teacher-forced forward and in sampling alike:
    forward's autocast-off block gone, it ran in bf16 and both sides of the plain-autocast comparison agreed."""
    _, mvar = build_tiny_mvar()
    mvar.eval()
    seen = []
    mvar.word_embed.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.inference_mode(), mvar.inference_precision(BF16):
        mvar(torch.tensor([1, 2]), torch.zeros(2, mvar.L - 1, mvar.Cvae))
        assert seen == [(torch.float32, torch.float32)]
        mvar.autoregressive_infer_cfg(**sample_kw())
    assert len(seen) == len(mvar.patch_nums) and set(seen) == {(torch.float32, torch.float32)}
