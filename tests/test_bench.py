"""The benchmark harness: its timing rule (scripts.timing) and the sampling section run as a user runs it."""
import contextlib
import os
import re
import subprocess
import sys
import types
from itertools import accumulate
from pathlib import Path

import pytest
import torch

from models.flops import model_flops, train_step_flops
from models.mvar import MVAR, MVARConfig
from scripts import bench
from scripts import timing as bm
from scripts.markdown import read_tables
from test_embedded_data import needs_fmnist

REPO = Path(__file__).resolve().parents[1]


def test_variants_take_turns_and_the_median_of_timed_rounds_counts(monkeypatch):
    calls, clock = [], iter(range(1000))
    monkeypatch.setattr(bm.time, "perf_counter", lambda: next(clock) * 0.001)  # every reading 1 ms later
    durations = {"a": [50, 1, 9, 2], "b": [0, 7, 5, 9]}  # extra ms each call spends, per round

    def fn(name):
        def run():
            calls.append(name)
            for _ in range(durations[name][sum(c == name for c in calls) - 1]):
                next(clock)
        return run

    ms = bm.time_alternating({"a": fn("a"), "b": fn("b")}, torch.device("cpu"), warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4  # alternated, round by round, warm-up round included
    # median of (1+1, 9+1, 2+1) and (7+1, 5+1, 9+1), warm-up dropped (a's mean, 5, passed the suite before)
    assert ms == pytest.approx({"a": 3.0, "b": 8.0})
    with pytest.raises(ValueError, match="repeats=0"):
        bm.time_alternating({"a": fn("a")}, torch.device("cpu"), warmup=0, repeats=0)


def test_the_matmul_rate_counts_2_n_cubed_flops_in_the_dtype_asked_for(monkeypatch):
    """The practical peak that the train section's "% of peak" (the GPU check's 35% target) divides by: 2 n^3 FLOPs
    per n x n x n matmul, its operands in the dtype asked for, timed after an untimed call (a GPU's first matmul sets
    up cuBLAS: timed, it lowers the rate and raises every share). n^3 (every % of peak doubled), operands left in
    fp32 (the fp32 rate taken for bf16's) and no warm-up each passed the suite."""
    products = []

    def one_second(fns, device, warmup, repeats):
        products.append((fns["mm"](), warmup))
        return {"mm": 1000.0}

    monkeypatch.setattr(bm, "time_alternating", one_second)
    assert bm.matmul_gflops(torch.device("cpu"), torch.bfloat16, n=4) == 128 / 1e9
    (product, warmup), = products
    assert product.dtype == torch.bfloat16 and product.shape == (4, 4) and warmup == 1


def test_markdown_table():
    assert bm.markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


def test_sample_section_counts_tokens_and_cached_sampling_matches_recompute(tmp_path):
    """The harness as a user runs it; each block processes 14 tokens per sequence with the Mamba2 state carried
    (L = 1 + 4 + 9), 1 + 5 + 14 re-running the prefix, and VAR's attention scores every key of the cache."""
    out = tmp_path / "bench.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(REPO / "scripts/bench.py"), "--only", "sample", "--depth", "1", "--pn",
                    "1_2_3", "--V", "64", "--bs", "1", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                    "--attn_backend", "sdpa", "--mamba_backend", "torch", "--out", str(out)],
                   env=env, check=True, capture_output=True, text=True, timeout=300)
    table = out.read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| M-VAR") or line.startswith("| VAR")]
    assert [r[0] for r in rows] == ["M-VAR, Mamba state cached", "M-VAR, prefix recompute (official)", "VAR, KV cache"]
    assert [int(r[3]) for r in rows] == [14, 1 + 5 + 14, 0]  # Mamba tokens per block
    assert [int(r[4]) for r in rows] == [14, 14, 14]  # attention tokens per block
    assert [int(r[5]) for r in rows] == [1 + 16 + 81, 1 + 16 + 81, 1 * 1 + 4 * 5 + 9 * 14]
    assert re.search(r"cached vs recompute, same seed: 0\.00e\+00", table)
    assert "| VAR, KV cache |" in table and "median of 1 timed rounds" in table


def test_model_flops_count_linear_layers_and_attention_scores():
    """2*in*out per token through each weight, 4*C per query-key pair: within each scale (intra), against the
    cache (VAR sampling)."""
    from models.attention import ScaleAttention

    C, B = 64, 2
    linear = 2 * C * 3 * C + 2 * C * C  # mat_qkv and proj, per token
    intra = ScaleAttention(C, 2, mode="intra")
    x = torch.randn(B, 5, C)
    assert model_flops(intra, lambda: intra(x, (1, 4))) == B * 5 * linear + 4 * C * B * (1 + 16)
    assert model_flops(intra, lambda: intra(x, (1, 4)), passes=3) == \
        B * 5 * linear + 3 * 4 * C * B * (1 + 16)  # a training step counts the scores' backward twice
    var = ScaleAttention(C, 2, mode="causal")
    var.kv_caching(True)
    model_flops(var, lambda: var(x[:, :1], (1,)))
    assert model_flops(var, lambda: var(x[:, 1:], (4,))) == B * 4 * linear + 4 * C * B * (4 * 5)


def hand_count(mvar, sampling: bool) -> int:
    """Model FLOPs per image of a training step's forward (sampling=False) or of cfg sampling, counted here by
    hand from the configuration: 2*in*out per token and weight, 4*C per attention pair, 4*d_inner*d_state +
    2*d_conv*conv_dim per token of Mamba2 mixing."""
    cfg, C = mvar.config, mvar.config.embed_dim
    seg = [p * p for p in cfg.patch_nums]
    L, S = sum(seg), 2 if sampling else 1  # sampling runs 2 sequences per image (guided and unguided)
    per_cond = len(seg) if sampling else 1  # sampling applies the condition's adaLN at every scale
    total = 2 * (L - seg[0]) * cfg.Cvae * C  # word_embed (sampling: once per image, before the doubling)
    for i, block in enumerate(mvar.blocks):
        arch = cfg.block_arch(i)
        total += S * per_cond * 2 * C * block.n_chunks * C  # the block's adaLN projection
        if arch != "mamba":
            total += S * L * 2 * 4 * C * C  # mat_qkv and proj
            pairs = sum(n * n for n in seg) if arch in ("intra", "mvar") else \
                sum(n * e for n, e in zip(seg, accumulate(seg), strict=True)) if sampling else L * L  # VAR
            total += S * 4 * C * pairs
        if arch in ("mvar", "mamba"):
            m = block.mamba
            total += S * L * 2 * (C * (2 * m.d_inner + 2 * m.ngroups * m.d_state + m.nheads) + m.d_inner * C)
            total += S * L * (4 * m.d_inner * m.d_state + 2 * m.d_conv * (m.d_inner + 2 * m.ngroups * m.d_state))
        total += S * L * 2 * 2 * C * round(C * cfg.mlp_ratio)  # FFN
    return total + S * per_cond * 2 * C * 2 * C + S * L * 2 * C * cfg.V  # head's adaLN and head


@pytest.mark.parametrize("arch", ["mvar", "var", "intra", "mamba"])
def test_model_flops_equal_a_count_by_hand(arch):
    """Training (forward, input and weight gradients, attention and Mamba2 mixing three times) and cfg sampling,
    per image, as hand_count gives them: a layer the counter misses (the scan, once; word_embed on a transposed
    input in sampling) fails here."""
    from conftest import build_tiny_mvar
    _, mvar = build_tiny_mvar(arch=arch)
    B, C, first_l = 3, mvar.config.embed_dim, mvar.first_l
    forward, mixing_and_pairs = hand_count(mvar, sampling=False), 0
    for i, block in enumerate(mvar.blocks):  # what counts three times in a training step, not twice
        if hasattr(block, "attn"):
            seg = [p * p for p in mvar.config.patch_nums]
            mixing_and_pairs += 4 * C * (mvar.L ** 2 if mvar.config.block_arch(i) == "var" else sum(n * n for n in seg))
        if hasattr(block, "mamba"):
            m = block.mamba
            mixing_and_pairs += mvar.L * (4 * m.d_inner * m.d_state + 2 * m.d_conv * m.conv_dim)
    linear = forward - mixing_and_pairs
    word_embed_input_grad = 2 * (mvar.L - first_l) * mvar.config.Cvae * C
    x_BLCv = torch.randn(B, mvar.L - first_l, mvar.config.Cvae)
    assert train_step_flops(mvar, torch.arange(B), x_BLCv) == \
        B * (3 * linear - word_embed_input_grad + 3 * mixing_and_pairs)
    mvar.grad_ckpt = True  # recomputation is not counted (the hooks would run twice)
    assert train_step_flops(mvar, torch.arange(B), x_BLCv) == \
        B * (3 * linear - word_embed_input_grad + 3 * mixing_and_pairs) and mvar.grad_ckpt
    mvar.eval()
    with torch.inference_mode():
        sampled = model_flops(mvar, lambda: mvar.autoregressive_infer_cfg(B, torch.arange(B), g_seed=0, cfg=1.5))
    assert sampled == B * hand_count(mvar, sampling=True)


def test_the_training_count_runs_mamba2s_pytorch_path_and_restores_the_backend(monkeypatch):
    """A review: on a GPU the count compiled and autotuned mamba_ssm's fp32 kernels (a minute) for a count alone. It
    runs the PyTorch path, whose count is the hand count above, and leaves each layer's backend as it was."""
    from conftest import build_tiny_mvar
    from models import mamba2

    _, mvar = build_tiny_mvar(arch="mvar")
    layers = [m for m in mvar.modules() if isinstance(m, mamba2.Mamba2)]
    for m in layers:
        m.backend = "auto"
    used, real = [], mamba2.resolve_kernels
    monkeypatch.setattr(mamba2, "resolve_kernels", lambda backend, *a, **k: used.append(backend) or real(backend, *a,
                                                                                                        **k))
    train_step_flops(mvar, torch.arange(2), torch.randn(2, mvar.L - mvar.first_l, mvar.config.Cvae))
    assert layers and set(used) == {"torch"} and all(m.backend == "auto" for m in layers)


def test_paper_tables_ratios():
    args = bench.build_parser().parse_args([])
    results = {("bf16", 1, "M-VAR-d24"): (3.0, 6e9), ("bf16", 1, "VAR-d30"): (4.0, 8e9),
               ("fp32", 1, "M-VAR-d24"): (9.0, 6e9), ("fp32", 1, "VAR-d30"): (10.0, 8e9)}
    text = bench.paper_tables(results, args, (1, 2))
    assert "| bf16 | 1 | M-VAR-d24 / VAR-d30 | **0.75x** | 0.75x | 1.00 | 0.86x |" in text
    assert "| fp32 | 1 | M-VAR-d24 / VAR-d30 | **0.90x** | 0.75x | 1.20 | 0.86x |" in text
    assert "| bf16 / fp32 | 1 | M-VAR-d24 | **0.33x** |" in text
    assert "| bf16 | 1 | VAR-d30 | 4.000 | 8.0 | 2.0 |" in text


def test_train_section_times_fp32_and_bf16_side_by_side(monkeypatch):
    """One row per (arch, dtype), the same model FLOPs in both precisions (the counter sees the same matmuls),
    M-VAR's step counted above VAR's (the Mamba2 projections), the speed-up only on the low-precision rows; bf16
    on a CPU without bf16 instructions is labelled as the fp32 it ran."""
    flags = ["--only", "train", "--depth", "1", "--pn", "1_2", "--archs", "mvar", "var", "--train_dtypes", "fp32",
             "bf16", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--attn_backend", "sdpa",
             "--mamba_backend", "torch"]
    monkeypatch.setattr(bm, "matmul_gflops", lambda device, dtype: 100.0)  # the peak is not what is tested
    rows = {(r[1], r[2]): r for r in ([c.strip() for c in line.strip("|").split("|")]
                                      for line in bench.main(flags).splitlines() if line.startswith("| cpu |"))}
    assert set(rows) == {("mvar", "fp32"), ("mvar", "bf16"), ("var", "fp32"), ("var", "bf16")} or \
        set(rows) == {("mvar", "fp32"), ("mvar", "bf16 (ran fp32)"), ("var", "fp32"), ("var", "bf16 (ran fp32)")}
    gflop = {key: float(r[6]) for key, r in rows.items()}
    assert gflop["mvar", "fp32"] > gflop["var", "fp32"] > 0
    for arch in ("mvar", "var"):
        low = next(k for k in rows if k[0] == arch and k[1] != "fp32")
        assert gflop[arch, "fp32"] == gflop[low]
        # a step is ~3 forward passes (backward: input and weight gradients; the first layer's input needs none)
        torch.manual_seed(0)
        mvar = MVAR(MVARConfig(depth=1, patch_nums=(1, 2), arch=arch), attn_backend="sdpa", mamba_backend="torch")
        x_BLCv = torch.randn(2, mvar.L - mvar.first_l, mvar.Cvae)
        with torch.no_grad():
            forward = model_flops(mvar, lambda m=mvar, x=x_BLCv: m(torch.tensor([0, 1]), x)) / 1e9
        assert 2.8 < gflop[arch, "fp32"] / forward <= 3.01, (arch, gflop[arch, "fp32"], forward)
        labels = torch.tensor([0, 1])  # the section counts one sample and scales: exact, FLOPs are linear in B
        assert train_step_flops(mvar, labels, x_BLCv) == 2 * train_step_flops(mvar, labels[:1], x_BLCv[:1])
        assert rows[arch, "fp32"][9] == ""
        if low[1] == "bf16":  # the speed-up is fp32's time over bf16's, within the rounding of the printed numbers
            speedup = float(rows[low][9].strip("*x"))
            fp32_ms, low_ms = float(rows[arch, "fp32"][4]), float(rows[low][4])  # printed to 0.1 ms
            assert (fp32_ms - 0.05) / (low_ms + 0.05) - 0.005 <= speedup <= (fp32_ms + 0.05) / (low_ms - 0.05) + 0.005
        else:
            assert rows[low][9] == ""
    monkeypatch.setattr("models.precision.cpu_bf16_flags", lambda: ())
    labels = [line.split("|")[3].strip() for line in bench.main(flags).splitlines() if line.startswith("| cpu |")]
    assert labels == ["fp32", "bf16 (ran fp32)"] * 2


def test_train_section_times_mamba2_in_one_pass_beside_the_sliced_step(monkeypatch):
    """--mamba_one_pass: a row per Mamba2 arch whose steps run with the slicing off (and only those steps), timed in
    turn with the sliced one; the slice size is restored after each step."""
    from models import mamba2
    seen = []
    forward = mamba2.Mamba2._forward
    monkeypatch.setattr(mamba2.Mamba2, "_forward",
                        lambda self, *a: seen.append(mamba2.CPU_SLICE_BYTES) or forward(self, *a))
    monkeypatch.setattr(bm, "matmul_gflops", lambda device, dtype: 100.0)
    flags = ["--only", "train", "--depth", "1", "--pn", "1_2", "--archs", "mvar", "var", "--train_dtypes", "fp32",
             "--repeats", "1", "--warmup", "0", "--device", "cpu", "--mamba_backend", "torch", "--mamba_one_pass"]
    arches = [line.split("|")[2].strip() for line in bench.main(flags).splitlines() if line.startswith("| cpu |")]
    assert arches == ["mvar", "mvar, Mamba2 batch in one pass", "var"]
    assert set(seen) == {1 << 62, mamba2.CPU_SLICE_BYTES} and mamba2.CPU_SLICE_BYTES == 4 << 20


def test_train_section_times_the_single_tensor_adamw_beside_the_fused_one(monkeypatch):
    """--unfused_adam: a row per arch whose Trainer's AdamW is not fused (train.py --afuse=0), timed in turn."""
    built = []
    monkeypatch.setattr(bm, "matmul_gflops", lambda device, dtype: 100.0)
    init = bench.Trainer.__init__
    monkeypatch.setattr(bench.Trainer, "__init__", lambda self, *a, **kw: built.append(kw["fused_adam"]) or init(
        self, *a, **kw))
    flags = ["--only", "train", "--depth", "1", "--pn", "1_2", "--archs", "mvar", "var", "--train_dtypes", "fp32",
             "--repeats", "1", "--warmup", "0", "--device", "cpu", "--mamba_backend", "torch", "--unfused_adam"]
    arches = [line.split("|")[2].strip() for line in bench.main(flags).splitlines() if line.startswith("| cpu |")]
    assert arches == ["mvar", "mvar, unfused AdamW", "var", "var, unfused AdamW"]
    assert built == [True, False, True, False]


def test_train_section_times_the_portable_mamba2_beside_cpu_fused(monkeypatch):
    """--mamba_torch: a row per Mamba2 arch on --mamba_backend=torch, timed in turn with the chosen backend."""
    monkeypatch.setattr(bm, "matmul_gflops", lambda device, dtype: 100.0)
    backends_built = []
    init = bench.MVAR.__init__
    monkeypatch.setattr(bench.MVAR, "__init__", lambda self, *a, **kw: backends_built.append(kw["mamba_backend"])
                        or init(self, *a, **kw))
    flags = ["--only", "train", "--depth", "1", "--pn", "1_2", "--archs", "mvar", "var", "--train_dtypes", "fp32",
             "--repeats", "1", "--warmup", "0", "--device", "cpu", "--mamba_backend", "cpu_fused", "--mamba_torch"]
    arches = [line.split("|")[2].strip() for line in bench.main(flags).splitlines() if line.startswith("| cpu |")]
    assert arches == ["mvar", "mvar, Mamba2 backend torch", "var"]  # VAR has no Mamba2: no extra row
    assert backends_built == ["cpu_fused", "torch", "cpu_fused"]


def test_train_section_times_the_compiled_step_beside_eager(monkeypatch):
    """--compiled: a row per arch whose copy of the model is compiled as train.py --tfast compiles it (dynamo's
    "eager" backend here: the wiring, not inductor's minutes), timed in turn; the compilation is timed apart."""
    monkeypatch.setattr(bm, "matmul_gflops", lambda device, dtype: 100.0)
    compiled = []
    original = bench.MVAR.compile_for_training
    monkeypatch.setattr(bench.MVAR, "compile_for_training", lambda self, mode: compiled.append(mode) or original(
        self, backend="eager"))
    flags = ["--only", "train", "--depth", "1", "--pn", "1_2", "--archs", "mvar", "var", "--train_dtypes", "fp32",
             "--repeats", "1", "--warmup", "0", "--device", "cpu", "--mamba_backend", "torch", "--compiled"]
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):  # it raises the limit
        out = bench.main(flags)
    arches = [line.split("|")[2].strip() for line in out.splitlines() if line.startswith("| cpu |")]
    assert arches == ["mvar", "mvar, compiled (default)", "var", "var, compiled (default)"] and compiled == [
        "default", "default"]
    assert re.search(r"first compiled step \(compilation\) mvar, compiled \(default\) fp32 \d+ s, var", out)
    torch._dynamo.reset()


def test_ckpt_section_keeps_less_with_checkpointing_and_projects_d30():
    """Checkpointing keeps each block's input instead of its activations: less peak memory per step and fewer bytes
    per block, so more M-VAR-d30 images fit a GPU (times are printed, not asserted)."""
    text = bench.main(["--only", "ckpt", "--depth", "1", "--width", "64", "--pn", "1_2_3_4", "--archs", "mvar",
                       "--repeats", "1", "--warmup", "0", "--device", "cpu", "--attn_backend", "sdpa",
                       "--mamba_backend", "torch"])
    rows = {(r[2], r[3]): r for r in ([c.strip() for c in line.strip("|").split("|")]
                                      for line in text.splitlines() if line.startswith("| cpu | mvar |"))}
    assert set(rows) == {("1", "off"), ("2", "off"), ("1", "on"), ("2", "on")}
    assert float(rows["2", "on"][6]) < float(rows["2", "off"][6])  # peak MiB at depth 2
    assert float(rows["2", "on"][8]) < float(rows["2", "off"][8])  # bytes kept per block and image
    # a checkpointed block keeps its fp32 input per image; the gradients the backward holds are per parameter
    assert float(rows["2", "on"][8]) == pytest.approx(4.0, abs=0.5)
    fit = {r[1]: r for r in ([c.strip() for c in line.strip("|").split("|")]
                             for line in text.splitlines() if line.startswith("| M-VAR-d30 |"))}
    assert int(fit["on"][4]) > int(fit["off"][4]) >= 0


def test_ckpt_section_fits_bytes_per_block_and_the_rest_from_four_peaks(monkeypatch):
    """Peaks faked at 100 MiB + batch x (depth x 2 MiB + 4 MiB) without checkpointing, 1 MiB per block with it, and
    50 MiB more on a model's first step (AdamW's state: the warm-up step takes it): per image 2 MiB per block (the
    slope over depths 2 and 4) and 4 MiB of rest (the intercept), printed per token and channel (L=5, --width 64);
    each peak under its batch's header; the batch-1 steps timed, "time vs off" the step's time over the plain
    step's (20 ms off, 30 ms on)."""
    steps, fits = [], {}  # (depth, batch, ckpt) of every training step
    real = bench.Trainer.micro_step_tokens

    def step(self, gt_BL, x_BLCv, label_B):
        steps.append((self.mvar.depth, len(label_B), self.mvar.grad_ckpt))
        return real(self, gt_BL, x_BLCv, label_B)

    def peak(fn, device):
        fn()
        depth, batch, ckpt = steps[-1]
        return 100 + batch * (depth * (1 if ckpt else 2) + 4) + 50 * ([s[0] for s in steps].count(depth) == 1)

    monkeypatch.setattr(bench.Trainer, "micro_step_tokens", step)
    monkeypatch.setattr(bm, "peak_mib", peak)
    monkeypatch.setattr(bench, "d30_fit", lambda measured, L: fits.update(measured) or "")
    fake_timing(monkeypatch, lambda key: 30.0 if key[2] else 20.0)
    text = run_section(bench.bench_ckpt, "--archs", "mvar", "--depth", "2", "--width", "64")
    assert columns(text, "depth", "--grad_ckpt", "ms / step", "time vs off", "peak MiB, batch 1", "peak MiB, batch 2",
                   "bytes / image / token / block / channel") == [
        ["2", "off", "20.0", "1.00x", "108", "116", "6553.6"], ["4", "off", "20.0", "1.00x", "112", "124", "6553.6"],
        ["2", "on", "30.0", "1.50x", "106", "112", "3276.8"], ["4", "on", "30.0", "1.50x", "108", "116", "3276.8"]]
    assert [batch for _, batch, _ in steps[-4:]] == [1] * 4  # the timed round, after the probes
    assert fits == {("mvar", False): (2 * 2**20 / 320, 4 * 2**20), ("mvar", True): (2**20 / 320, 4 * 2**20)}


class _Scratch(torch.autograd.Function):
    """8 MiB of scratch freed inside the Function, then 4 MiB out: the peak is 8 MiB."""

    @staticmethod
    def forward(ctx, x):
        tmp = torch.empty(2 * 2**20).fill_(1.0)
        del tmp
        return x.new_empty(2**20).fill_(2.0)

    @staticmethod
    def backward(ctx, g):
        return None


def test_cpu_peak_memory_sees_temporaries_freed_inside_a_custom_function():
    """The CPU peak replays the allocator's own records: it read 4 MiB here, an op's net memory placed at its start
    (Mamba2's custom Functions free their temporaries within, so its peaks read low against VAR's)."""
    from scripts import timing
    assert timing.peak_mib(lambda: _Scratch.apply(torch.ones(4)), torch.device("cpu")) == pytest.approx(8, abs=0.01)


def fake_timing(monkeypatch, ms_of, mib_of=None):
    """bm.time_alternating replaced: each function runs once and takes `ms_of(its key)` ms; with `mib_of`, bm.peak_mib
    of a function timed before peaks at `mib_of(its key)` MiB. Returns the (keys, warmup, repeats) of each timing
    call and each function's output, by key."""
    calls, outputs, key_of = [], {}, {}

    def timed(fns, device, warmup, repeats):
        calls.append((list(fns), warmup, repeats))
        key_of.update({id(fn): key for key, fn in fns.items()})
        outputs.update({key: fn() for key, fn in fns.items()})
        return {key: ms_of(key) for key in fns}

    monkeypatch.setattr(bm, "time_alternating", timed)
    if mib_of:
        monkeypatch.setattr(bm, "peak_mib", lambda fn, device: mib_of(key_of[id(fn)]))
    return calls, outputs


def run_section(section, *flags: str) -> str:
    """A section's markdown, run on the CPU at depth 1, patch_nums 1_2, batch 1 and portable kernels unless `flags`
    say otherwise."""
    args = bench.build_parser().parse_args(["--depth", "1", "--pn", "1_2", "--bs", "1", "--attn_backend", "sdpa",
                                            "--mamba_backend", "torch", *flags])
    return section(torch.device("cpu"), args)


def columns(text: str, *headers: str, table: int = 0) -> list[list[str]]:
    """The cells under `headers`, in that order, of each row of the `table`-th table in `text`."""
    return [[row[h] for h in headers] for row in read_tables(text)[table]]


PASS = {"fwd": 1, "fwd+bwd": 3}  # a fake forward+backward takes three forwards' time and twice their memory


def test_attn_section_divides_global_attention_by_intra_scale_per_column(monkeypatch):
    """The speed-up is global (VAR) time over intra-scale time and the memory ratio global peak over intra peak,
    kernel and layer, each pass in its row and each number under its header; the analytic score count is sum(l^2)
    against L^2. An inverted ratio would publish M-VAR's gain as a loss."""
    ms = {"kernel intra": 2, "kernel global": 6, "layer intra": 4, "layer global": 5}
    mib = {"kernel intra": 1, "kernel global": 4, "layer intra": 2, "layer global": 3}
    calls, _ = fake_timing(monkeypatch, lambda k: ms[k[0]] * PASS[k[1]], lambda k: mib[k[0]] * min(PASS[k[1]], 2))
    text = run_section(bench.bench_attn, "--warmup", "2", "--repeats", "3")
    assert columns(text, "what", "pass", "intra ms (sdpa)", "global ms (sdpa+mask)", "speed-up", "intra peak MiB",
                   "global peak MiB", "memory ratio") == [
        ["kernel", "fwd", "2.00", "6.00", "3.00x", "1.0", "4.0", "4.00x"],
        ["kernel", "fwd+bwd", "6.00", "18.00", "3.00x", "2.0", "8.0", "4.00x"],
        ["layer", "fwd", "4.00", "5.00", "1.25x", "2.0", "3.0", "1.50x"],
        ["layer", "fwd+bwd", "12.00", "15.00", "1.25x", "4.0", "6.0", "1.50x"]]
    assert "intra 17 vs global 25 (1.47x)" in text  # B=H=1, scales of 1 and 4 tokens
    assert len(calls) == 1 and len(calls[0][0]) == 8 and calls[0][1:] == (2, 3)  # all eight alternated at once


def test_attn_section_times_each_variant_with_its_own_attention(monkeypatch):
    """The global variants run VAR's block-causal kernel and a causal-mode layer, the intra ones the intra-scale
    kernel and an intra-mode layer: a variant timing the other's code would print a speed-up of about 1."""
    ran = []

    def spy(name):
        real = getattr(bench, name)
        return lambda *args, **kwargs: ran.append(name) or real(*args, **kwargs)

    for name in ("intra_scale_attention", "block_causal_attention"):
        monkeypatch.setattr(bench, name, spy(name))
    forward = bench.ScaleAttention.forward
    monkeypatch.setattr(bench.ScaleAttention, "forward", lambda self, *a: ran.append(self.mode) or forward(self, *a))
    fake_timing(monkeypatch, lambda k: 1.0, lambda k: 1.0)
    run_section(bench.bench_attn)
    assert ran == ["intra_scale_attention"] * 2 + ["block_causal_attention"] * 2 + ["intra"] * 2 + ["causal"] * 2


def test_block_section_compares_each_arch_with_var_pass_by_pass(monkeypatch):
    """"fwd vs var" is the arch's forward time over VAR's forward, "fwd+bwd vs var" its forward+backward over VAR's
    forward+backward; each peak under its own pass."""
    ms, mib = {"mvar": 3, "var": 4}, {"mvar": 5, "var": 1}
    fake_timing(monkeypatch, lambda k: ms[k[0]] * PASS[k[1]], lambda k: mib[k[0]] * min(PASS[k[1]], 2))
    text = run_section(bench.bench_block, "--archs", "mvar", "var")
    assert columns(text, "arch", "fwd ms", "fwd+bwd ms", "fwd peak MiB", "fwd+bwd peak MiB", "fwd vs var",
                   "fwd+bwd vs var") == [["mvar", "3.0", "9.0", "5.0", "10.0", "0.75x", "0.75x"],
                                         ["var", "4.0", "12.0", "1.0", "2.0", "1.00x", "1.00x"]]


def test_mamba_section_divides_mamba2_by_an_ffn_four_times_as_wide(monkeypatch):
    """The ratio row is Mamba2's time over the FFN's, pass by pass under the time headers; the FFN is C-4C-C (64-256-64
    at depth 1: 33,088 parameters, 0.02M were it C-2C-C)."""
    ms = {("mamba", "fwd"): 6, ("mamba", "fwd+bwd"): 10, ("ffn", "fwd"): 3, ("ffn", "fwd+bwd"): 4}
    fake_timing(monkeypatch, ms.get, lambda k: 1.0)
    assert columns(run_section(bench.bench_mamba), "module", "params M", "fwd ms", "fwd+bwd ms", "fwd peak MiB") == [
        ["Mamba2 (torch)", "0.03", "6.0", "10.0", "1.0"], ["FFN 64-256-64", "0.03", "3.0", "4.0", "1.0"],
        ["ratio Mamba2 / FFN", "", "2.00x", "2.50x", ""]]


def fake_train_costs(monkeypatch) -> list[int]:
    """The train section's FLOP count faked at 7.5 GFLOP per counted step (returns the batch of each count) and its
    matmul rates at 100, 400 and 250 GFLOP/s in fp32, bf16 and fp16."""
    counted = []
    monkeypatch.setattr(bench, "train_step_flops", lambda mvar, label_B, x: counted.append(len(label_B)) or 7.5e9)
    monkeypatch.setattr(bm, "matmul_gflops", lambda device, dtype: {torch.float32: 100.0, torch.bfloat16: 400.0,
                                                                    torch.float16: 250.0}[dtype])
    return counted


def test_train_section_rates_and_shares_of_each_dtypes_own_peak(monkeypatch):
    """Per (arch, dtype): images/s = batch / step time, GFLOP/s = the step's model FLOPs (one sample's count x the
    batch) / step time, % of peak against the matmul rate of the row's own dtype (the GPU check's 35% target reads
    it), and the speed-up fp32 time / this dtype's time; all steps alternated in one timing call."""
    monkeypatch.setenv("MVAR_CPU_BF16", "1")  # bf16 runs as bf16 on any CPU: no "(ran fp32)" row
    counted = fake_train_costs(monkeypatch)
    ms = {"fp32": 500.0, "bf16": 250.0, "fp16": 300.0}
    calls, _ = fake_timing(monkeypatch, lambda k: ms[k[1]])
    text = run_section(bench.bench_train, "--bs", "2", "--archs", "mvar", "--train_dtypes", "fp32", "bf16", "fp16",
                       "--warmup", "2", "--repeats", "3")
    assert columns(text, "dtype", "ms / step", "images / s", "model GFLOP / step", "GFLOP/s", "% of peak",
                   "speed-up vs fp32") == [["fp32", "500.0", "4.00", "15.0", "30.0", "30.0", ""],
                                           ["bf16", "250.0", "8.00", "15.0", "60.0", "15.0", "2.00x"],
                                           ["fp16", "300.0", "6.67", "15.0", "50.0", "20.0", "1.67x"]]
    assert counted == [1, 1, 1] and calls == [([("mvar", "fp32"), ("mvar", "bf16"), ("mvar", "fp16")], 2, 3)]


def test_a_bf16_row_that_ran_fp32_is_rated_as_fp32_without_a_speed_up(monkeypatch):
    """On a CPU without bf16 (or MVAR_CPU_BF16=0) the bf16 row says it ran fp32, its share is of the fp32 matmul
    rate and it claims no speed-up over the fp32 row: it is the same precision."""
    monkeypatch.setenv("MVAR_CPU_BF16", "0")
    fake_train_costs(monkeypatch)
    fake_timing(monkeypatch, lambda key: 400.0 if key[1] == "fp32" else 500.0)
    text = run_section(bench.bench_train, "--bs", "2", "--archs", "mvar", "--train_dtypes", "fp32", "bf16")
    assert columns(text, "dtype", "% of peak", "speed-up vs fp32") == [["fp32", "37.5", ""],
                                                                      ["bf16 (ran fp32)", "30.0", ""]]


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_each_train_dtype_steps_in_that_precision(monkeypatch, name):
    """--train_dtypes reach the Trainer as train.py's --fp16 of the same precision: a row labelled bf16 that
    stepped in fp16 (or fp32) would compare the wrong precisions."""
    monkeypatch.setenv("MVAR_CPU_BF16", "1")
    args = bench.build_parser().parse_args(["--pn", "1_2", "--mamba_backend", "torch"])
    _, trainer, _ = bench.random_train_step("mvar", 1, name, torch.device("cpu"), args)
    assert trainer.amp_dtype == (None if name == "fp32" else bm.DTYPES[name])


def test_sample_section_times_per_image_and_speed_up_over_the_prefix_rerun(monkeypatch):
    """s / image is a call's time over the batch; the speed-up is the official prefix re-run's time over each
    sampler's; the decode row decodes the whole batch and sits under s / image; all four alternated in one timing
    call, after --warmup rounds."""
    ms = {"M-VAR, Mamba state cached": 10.0, "M-VAR, prefix recompute (official)": 40.0, "VAR, KV cache": 20.0}
    calls, outputs = fake_timing(monkeypatch, lambda k: ms.get(k, 5.0))
    text = run_section(bench.bench_sample, "--pn", "1_2_3", "--V", "64", "--bs", "2", "--warmup", "2", "--repeats", "3")
    assert columns(text, "sampler", "s / image", "speed-up vs recompute") == [
        ["M-VAR, Mamba state cached", "0.0050", "4.00x"], ["M-VAR, prefix recompute (official)", "0.0200", "1.00x"],
        ["VAR, KV cache", "0.0100", "2.00x"], ["tokenizer decode only (ch=32)", "0.0025", ""]]
    assert outputs["tokenizer decode only (ch=32)"].shape[0] == 2 and calls == [([*ms, "tokenizer decode only (ch=32)"],
                                                                                 2, 3)]


def test_paper_section_alternates_each_pairs_models_at_each_dtype_and_batch(monkeypatch):
    """The models of one VAR (its M-VARs and itself) are timed in one call, per dtype and batch, each built once per
    dtype with weights in that dtype; only the --paper_pairs asked for run; each (dtype, batch) has its ratios."""
    built, timed = [], []
    monkeypatch.setattr(bench, "build_paper_model", lambda name, pn, dtype, device, args: built.append((name, dtype))
                        or name)
    monkeypatch.setattr(bench, "time_paper_models", lambda models, names, dtype, B, device, args: timed.append(
        ([*models], names, dtype, B)) or {n: (1.0, 1e9) for n in names})
    text = run_section(bench.bench_paper, "--paper_pairs", "M-VAR-d24", "M-VAR-D", "--paper_dtypes", "fp32", "bf16",
                       "--paper_bs", "1", "8")
    groups = [["M-VAR-d24", "VAR-d30"], ["M-VAR-D", "VAR-d16"]]
    assert built == [(n, dtype) for dtype in (torch.float32, torch.bfloat16) for names in groups for n in names]
    assert timed == [(names, names, dtype, B) for dtype in (torch.float32, torch.bfloat16) for names in groups
                     for B in (1, 8)]
    assert [[r["dtype"], r["batch"], r["pair"]] for r in read_tables(text)[1] if r["dtype"] != "bf16 / fp32"] == [
        [d, B, f"{names[0]} / {names[1]}"] for d in ("fp32", "bf16") for names in groups for B in ("1", "8")]


def test_paper_ratios_pair_each_m_var_with_its_var_at_the_same_batch():
    """Each M-VAR is divided by its own VAR at the same batch (batch 8's ratio against batch 1's VAR would mix
    per-image times of different batches; issue 19's target is judged at batch 64), beside the paper's ratio
    (Tables 2 and 5: 0.6 / 0.7 and 0.7 / 0.9)."""
    times = {1: {"M-VAR-d24": 3.0, "VAR-d30": 4.0, "M-VAR-D": 2.0, "VAR-d16": 4.0},
             8: {"M-VAR-d24": 1.0, "VAR-d30": 2.0}}
    results = {("bf16", B, n): (t, 1e9) for B, models in times.items() for n, t in models.items()}
    text = bench.paper_tables(results, bench.build_parser().parse_args([]), (1, 2))
    assert columns(text, "batch", "pair", "time ratio", "paper's time ratio", table=1) == [
        ["1", "M-VAR-d24 / VAR-d30", "0.75x", "0.86x"], ["1", "M-VAR-D / VAR-d16", "0.50x", "0.78x"],
        ["8", "M-VAR-d24 / VAR-d30", "0.50x", "0.86x"]]


def test_a_paper_model_holds_its_linear_weights_in_the_sampling_dtype_but_word_embed():
    """As MVAR.inference_precision holds them: every Linear in bf16 but word_embed (it reads fp32 tokenizer
    features); --paper_width gives every model that width with one head (not width // 64), its depth kept (M-VAR-D:
    12)."""
    args = bench.build_parser().parse_args(["--paper_width", "128", "--attn_backend", "sdpa", "--mamba_backend",
                                            "torch"])
    mvar = bench.build_paper_model("M-VAR-D", (1, 2), torch.bfloat16, torch.device("cpu"), args)
    weights = {m.weight.dtype for m in mvar.modules() if isinstance(m, torch.nn.Linear) and m is not mvar.word_embed}
    assert weights == {torch.bfloat16} and mvar.word_embed.weight.dtype == torch.float32
    assert (mvar.C, mvar.config.num_heads, mvar.depth, mvar.training) == (128, 1, 12, False)


class FakeSampler(torch.nn.Module):
    """An MVAR as the paper section samples it: one 4 -> 8 matmul per sequence of cfg's doubled batch (128 model
    FLOPs per image); records each call's (batch, use_cache, inference precision)."""

    def __init__(self):
        super().__init__()
        self.linear, self.calls, self.dtype = torch.nn.Linear(4, 8, bias=False), [], None

    @contextlib.contextmanager
    def inference_precision(self, dtype):
        self.dtype = dtype
        yield

    def autoregressive_infer_cfg(self, B, label_B, g_seed, cfg, top_k, top_p, use_cache):
        self.calls.append((len(label_B), use_cache, self.dtype))
        return self.linear(torch.ones(2 * B, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paper_timing_is_per_image_and_only_the_prefix_rerun_samples_without_cache(monkeypatch, dtype):
    """Seconds and model FLOPs per generated image (a call's over its batch); the name ending in PREFIX_RERUN samples
    its M-VAR with use_cache=False, every other with the cache; bf16 samples in inference_precision(bf16), fp32 in
    none; the FLOP count is the first warm-up round."""
    models = {"M-VAR-d16": FakeSampler(), "VAR-d16": FakeSampler()}
    names = ["M-VAR-d16", "M-VAR-d16" + bench.PREFIX_RERUN, "VAR-d16"]
    calls, _ = fake_timing(monkeypatch, dict(zip(names, (800.0, 1200.0, 1000.0), strict=True)).get)
    out = bench.time_paper_models(models, names, dtype, 4, torch.device("cpu"),
                                  bench.build_parser().parse_args(["--warmup", "2"]))
    assert out == {names[0]: (0.2, 128.0), names[1]: (0.3, 128.0), names[2]: (0.25, 128.0)}
    precision = None if dtype == torch.float32 else dtype
    assert models["M-VAR-d16"].calls == [(4, True, precision), (4, False, precision)] * 2
    assert models["VAR-d16"].calls == [(4, True, precision)] * 2 and calls[0][1] == 1


def test_d30_projection_divides_free_gpu_memory_by_activations_per_image():
    """Images per GPU = (GPU GB in GiB - 16 bytes per parameter) / activations per image; a plain block keeps its
    measured bytes per token and channel, a checkpointed one at least its fp32 input (4 bytes) while one block is
    recomputed in full; the rest (embeddings, head) on top. Worked by hand for M-VAR-d30 (30 blocks, width 1920,
    680 tokens) at 100 bytes per plain block, 1 measured with checkpointing and 0.5 GiB of rest. VAR measured alone
    projects VAR-d30, with a note when not measured at 680 tokens."""
    text = bench.d30_fit({("mvar", False): (100.0, 2**29), ("mvar", True): (1.0, 2**29)}, 680)
    with torch.device("meta"):
        states_gib = 16 * sum(p.numel() for p in MVAR(MVARConfig(depth=30)).parameters()) / 2**30
    act_gib = {"off": 100 * 30 * 680 * 1920 / 2**30 + 0.5, "on": (4 * 30 + 100) * 680 * 1920 / 2**30 + 0.5}
    rows = read_tables(text)[0]
    assert [[*r.values()] for r in rows] == [
        ["M-VAR-d30", c, f"{states_gib:.0f}", f"{act_gib[c]:.2f}",
         *(str(int((gb * 1e9 / 2**30 - states_gib) / act_gib[c])) for gb in (80, 141))] for c in ("off", "on")]
    var_only = bench.d30_fit({("var", False): (1.0, 0.0), ("var", True): (1.0, 0.0)}, 30)
    assert "needs --pn 256" not in text and "needs --pn 256" in var_only
    assert [r["model"] for r in read_tables(var_only)[0]] == ["VAR-d30"] * 2


@pytest.mark.parametrize("flag", ["--depth", "--bs", "--repeats"])
def test_a_zero_size_flag_is_refused_before_any_section_runs(flag):
    """--depth, --bs or --repeats 0 stops with the flag's name, not a division by zero or an empty median later."""
    with pytest.raises(SystemExit, match=f"{flag} must be >= 1, got 0"):
        bench.main(["--only", "attn", flag, "0"])


@pytest.mark.parametrize("flags, message", [
    (["--warmup=-1"], "--warmup must be >= 0, got -1"), (["--threads=-2"], "--threads must be >= 0, got -2"),
    (["--pn=abc"], "--pn=abc: bad patch schedule 'abc'"), (["--only", "sample", "--V=0"], "--V must be >= 1, got 0"),
    (["--only", "train", "--width=-64"], "--width must be >= 0, got -64"),
    (["--only", "train", "--heads=3"], "--archs=mvar --depth=16 --width=0 --heads=3 make no model: embed_dim=1024 is "
                                       "not divisible by num_heads=3"),
    (["--only", "sample", "--cfg=nan"], "--cfg must be >= 0 and finite"),
    (["--only", "sample", "--top_p=0"], r"--top_p must be in \(0, 1\]"),  # as sample.py: a nucleus of no mass
    (["--vae_ch=40"], "--vae_ch must be a positive multiple of 32"),
])
def test_bad_flags_are_one_error_line_before_any_section_runs(flags, message, monkeypatch):
    """A review: these ended in tracebacks inside a section (--top_p=0 was accepted)."""
    monkeypatch.setattr(bm, "devices", lambda args: pytest.fail("a section ran before the check"))
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        bench.main(flags)


@pytest.mark.parametrize("out", ["file/bench.md", "folder"])
def test_an_unwritable_out_is_refused_before_any_section_runs(out, tmp_path, monkeypatch):
    """A review: --out under a regular file raised NotADirectoryError after every section ran."""
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    monkeypatch.setattr(bm, "devices", lambda args: pytest.fail("a section ran before the check"))
    with pytest.raises(SystemExit, match=f"^error: --out={re.escape(str(tmp_path / out))}"):
        bench.main(["--only", "attn", "--out", str(tmp_path / out)])
    assert (tmp_path / "file").read_text() == ""


def test_each_section_runs_on_each_device_and_out_gets_the_printed_text(monkeypatch, tmp_path):
    """--device auto on a machine with a GPU: every section once per device (the CPU and the GPU), in --only's order;
    --out holds what main returns."""
    ran = []
    monkeypatch.setattr(bm, "devices", lambda args: [torch.device("cpu"), torch.device("cuda")])
    for name in ("attn", "mamba"):
        monkeypatch.setitem(bench.SECTIONS, name, lambda device, args, name=name: ran.append((name, device.type))
                            or f"### {name} on {device.type}")
    text = bench.main(["--only", "mamba", "attn", "--out", str(tmp_path / "bench.md")])
    assert ran == [("mamba", "cpu"), ("mamba", "cuda"), ("attn", "cpu"), ("attn", "cuda")]
    assert "### mamba on cuda\n\n### attn on cpu" in text and (tmp_path / "bench.md").read_text() == text


def test_on_a_gpu_each_timed_call_is_synchronized_before_and_after(monkeypatch):
    """CUDA launches return before the kernels finish: the clock starts after the queue is drained and stops after
    the call's kernels ran. Without either sync a GPU time is a launch time, or carries the previous call's work."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(bm.time, "perf_counter", lambda: events.append("clock") or 0.0)
    bm.time_alternating({"a": lambda: events.append("call")}, torch.device("cuda"), warmup=0, repeats=1)
    assert events == ["sync", "clock", "call", "sync", "clock"]


def test_the_gpu_peak_is_the_calls_own_above_what_was_allocated(monkeypatch):
    """torch.cuda's peak is reset before the call (an earlier, larger peak is not the call's) and the memory held
    before it is subtracted: 100 MiB held, an old 500 MiB peak, the call allocates 60 MiB and frees 20."""
    mib = {"allocated": 100, "peak": 500}

    def call():
        mib["allocated"] += 60
        mib["peak"] = max(mib["peak"], mib["allocated"])
        mib["allocated"] -= 20

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: mib["allocated"] * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: mib.update(peak=mib["allocated"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: mib["peak"] * 2**20)
    assert bm.peak_mib(call, torch.device("cuda")) == 60


def test_autocast_is_off_for_fp32_and_in_the_dtype_asked_for_otherwise():
    """The pieces run under mixed precision as training does: a bf16 row that ran fp32 would time the wrong math."""
    with bm.autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with bm.autocast(torch.device("cpu"), torch.float32):
        assert not torch.is_autocast_enabled("cpu")


def test_the_forward_pass_builds_no_graph_and_the_backward_pass_resets_the_leaves_grads():
    """"fwd" times inference (no autograd graph recorded), "fwd+bwd" a backward from ones that leaves no gradient
    behind: accumulated gradients would add a growing sum to every later timed call."""
    x, grad_enabled, grads = torch.ones(3, requires_grad=True), [], []
    x.register_hook(grads.append)
    passes = bm.passes(lambda: grad_enabled.append(torch.is_grad_enabled()) or 2 * x, [x])
    passes["fwd"]()
    passes["fwd+bwd"]()
    assert grad_enabled == [False, True] and torch.equal(grads[0], torch.full((3,), 2.0)) and x.grad is None


@pytest.mark.parametrize("load,warned", [(2.5, True), (1.5, False)])
def test_the_preamble_warns_when_the_load_exceeds_half_the_cores(monkeypatch, load, warned):
    """On a CPU busy with other work (load above half the cores) absolute times are inflated: the preamble says so."""
    monkeypatch.setattr(bm.os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(bm.os, "cpu_count", lambda: 4)
    line = bm.preamble(bench.build_parser().parse_args([]))
    assert ("absolute times are inflated" in line) is warned and "median of 5 timed rounds after 2 warm-up" in line


@pytest.mark.parametrize("device,cuda,expected", [("auto", False, ["cpu"]), ("auto", True, ["cpu", "cuda"]),
                                                  ("cuda", True, ["cuda"]), ("cuda", False, None)])
def test_devices_are_the_cpu_and_a_visible_gpu(monkeypatch, device, cuda, expected):
    """auto: the CPU, and the GPU when one is visible; --device cuda without one stops with a message instead of
    an error deep in a section."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    args = bench.build_parser().parse_args(["--device", device])
    if expected is None:
        with pytest.raises(SystemExit, match="no CUDA device"):
            bm.devices(args)
    else:
        assert [d.type for d in bm.devices(args)] == expected


def test_read_tables_returns_each_table_by_header_without_bold_marks():
    """What the GPU check reads back: every table (the last one ending the text too), rows keyed by header, cells
    stripped of spaces and bold, the separator line skipped, text between tables (even with a '|') not a row."""
    text = "### a\n\n| x | y |\n|---|---|\n| **1.50x** | b |\n\nratio a | b\n| z |\n|---|\n| 3 |\n| 4 |"
    assert read_tables(text) == [[{"x": "1.50x", "y": "b"}], [{"z": "3"}, {"z": "4"}]]


def test_paper_section_builds_the_model_that_the_prefix_rerun_samples(monkeypatch):
    """--paper_pairs naming the prefix re-run of M-VAR-d16 but not M-VAR-d16 itself: the M-VAR-d16 it samples is
    built (it was not, and the section stopped with a KeyError after building the others)."""
    monkeypatch.setattr(bench, "build_paper_model", lambda name, *args: FakeSampler())
    fake_timing(monkeypatch, lambda key: 1.0)
    text = run_section(bench.bench_paper, "--paper_pairs", "M-VAR-d16" + bench.PREFIX_RERUN, "--paper_dtypes", "fp32",
                       "--paper_bs", "1")
    assert [r["pair"] for r in read_tables(text)[1]] == ["M-VAR-d16, prefix re-run (official) / VAR-d16"]


@needs_fmnist
def test_bench_tokens_times_both_data_paths_of_the_study_set_up(capsys):
    """scripts/bench_tokens.py ran in no test, so a renamed flag of extract_tokens or a moved loader would have broken
    it unseen. The study set-up at batch 2, one round: a row per data path, each rate the batch over its step time,
    the cache 155 uint16 ids per image (its 1_2_3_4_5_6_8 schedule)."""
    from scripts import bench_tokens

    bench_tokens.main(["--setups", "study", "--bs", "2", "--rounds", "1"])
    rows = read_tables(capsys.readouterr().out)[0]
    assert [(r["set-up"], r["from"], r["batch"]) for r in rows] == [("study", "images", "2"), ("study", "tokens", "2")]
    for r in rows:  # the two ms cells are rounded to 1 ms, the rate to 0.1
        step_ms = float(r["data ms/step"]) + float(r["model ms/step"])
        assert 2e3 / (step_ms + 1) - 0.05 <= float(r["train img/s"]) <= 2e3 / max(step_ms - 1, 0.5) + 0.05, r
    assert rows[1]["cache bytes/img/view"] == "310" and float(rows[1]["extraction img/s"]) > 0


# Tests added by a mutation review of the benchmarks and the GPU check's runners (each names the mutant it kills).
class _FakeEvent:
    """An event of torch.profiler's kineto results: a "[memory]" record of `nbytes` at `start_ns`."""

    def __init__(self, start_ns, nbytes, name="[memory]", device_type=torch.autograd.DeviceType.CPU):
        self._start, self._nbytes, self._name, self._device = start_ns, nbytes, name, device_type

    def start_ns(self):
        return self._start

    def nbytes(self):
        return self._nbytes

    def name(self):
        return self._name

    def device_type(self):
        return self._device


def test_cpu_peak_memory_replays_the_records_in_time_order(monkeypatch):
    """The profiler lists its records thread by thread: thread 1 allocates 8 MiB at t=1 and frees it at t=4, thread 2
    holds 4 MiB from t=2 to t=3, so 12 MiB are live at once; an op that is no memory record, and a CUDA record, are
    not the CPU's. Replayed in the listed order (`sorted` dropped: it read 8 MiB) passed the suite."""
    mib = 2**20
    events = [_FakeEvent(1, 8 * mib), _FakeEvent(4, -8 * mib), _FakeEvent(2, 4 * mib), _FakeEvent(3, -4 * mib),
              _FakeEvent(2, 100 * mib, name="aten::add"),
              _FakeEvent(2, 100 * mib, device_type=torch.autograd.DeviceType.CUDA)]

    class Profile:
        def __init__(self, activities, profile_memory):
            assert profile_memory
            self.profiler = types.SimpleNamespace(kineto_results=types.SimpleNamespace(events=lambda: events))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.profiler, "profile", Profile)
    assert bm.peak_mib(lambda: None, torch.device("cpu")) == 12


def test_autocast_runs_fp16_in_fp16():
    """--dtype fp16 (the attention kernels' and the layers' sections) runs under fp16 autocast, as bf16 does under
    bf16. Autocast for bf16 alone (fp16 timed in fp32) passed the suite, which asked bf16 and fp32 only."""
    with bm.autocast(torch.device("cpu"), torch.float16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16


def test_a_bf16_only_row_that_ran_fp32_still_gets_its_share_of_the_fp32_rate(monkeypatch):
    """--train_dtypes bf16 alone (the GPU check's dry run) on a CPU that runs bf16 as fp32: the fp32 matmul rate is
    measured all the same, so the row's "% of peak" is a number (fp32's), not "-". Measuring only the --train_dtypes'
    rates passed the suite (its fallback test also timed fp32)."""
    monkeypatch.setenv("MVAR_CPU_BF16", "0")
    fake_train_costs(monkeypatch)
    fake_timing(monkeypatch, lambda key: 500.0)
    text = run_section(bench.bench_train, "--bs", "2", "--archs", "mvar", "--train_dtypes", "bf16")
    assert columns(text, "dtype", "GFLOP/s", "% of peak") == [["bf16 (ran fp32)", "30.0", "30.0"]]


def test_the_compiled_steps_first_call_is_its_compilation_timed_apart(monkeypatch):
    """--compiled: the compiled copy's first step (the compilation) runs before the timed rounds and its seconds are
    reported; here that first step takes 7 s of a fake clock. Not running it before the timing (the compilation
    timed as a warm-up round, "0 s" reported) passed the suite."""
    clock, compiled, events = [0.0], [], []
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(bench.MVAR, "compile_for_training", lambda self, mode: compiled.append(self))
    real = bench.Trainer.micro_step_tokens

    def step(self, *args):
        if self.mvar in compiled and "compiled" not in events:
            clock[0] += 7.0
            events.append("compiled")
        return real(self, *args)

    monkeypatch.setattr(bench.Trainer, "micro_step_tokens", step)
    fake_train_costs(monkeypatch)
    calls, _ = fake_timing(monkeypatch, lambda key: events.append("timed") or 10.0)
    text = run_section(bench.bench_train, "--archs", "mvar", "--train_dtypes", "fp32", "--compiled")
    assert "first compiled step (compilation) mvar, compiled (default) fp32 7 s" in text
    assert events[0] == "compiled" and calls[0][0] == [("mvar", "fp32"), ("mvar, compiled (default)", "fp32")]


def test_the_training_flop_count_leaves_no_gradient_behind():
    """train_step_flops runs a backward for the count: its gradients are cleared, or the first training step of
    the counted model (the train section's, the study's) would add them into its own. Leaving them passed the
    suite."""
    from conftest import build_tiny_mvar

    _, mvar = build_tiny_mvar(arch="mvar")
    train_step_flops(mvar, torch.arange(2), torch.randn(2, mvar.L - mvar.first_l, mvar.config.Cvae))
    assert all(p.grad is None for p in mvar.parameters())


@needs_fmnist
def test_bench_tokens_rates_are_medians_of_the_rounds_after_the_warm_up(monkeypatch, tmp_path):
    """bench_setup's row arithmetic on a fake clock (the study set-up at batch 2, 2 timed rounds): the first round
    warms up (1 s data, 2 s step, on both paths) and is not in the medians; images/s is the batch over data + step
    ms, the data share data / (data + step), the extraction rate both splits' 2 x 6 images over its 4 s. The warm-up
    in the medians, one split's images in the extraction rate, and the share over the step alone each passed the
    suite."""
    from scripts import bench_tokens

    clock, calls = [0.0], []
    data_ms = {"images": (1000, 10, 30), "tokens": (1000, 2, 6)}  # per round; the first warms up
    step_ms = {"images": (2000, 40, 60), "tokens": (2000, 40, 60)}
    monkeypatch.setattr(bench_tokens, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    extract = bench_tokens.extract_tokens.main

    def timed_extract(args):
        extract(args)
        clock[0] += 4.0

    monkeypatch.setattr(bench_tokens.extract_tokens, "main", timed_extract)
    targets = bench_tokens.Trainer.targets

    def timed_targets(self, inp):
        path = ("images", "tokens")[len(calls) % 2]
        clock[0] += data_ms[path][len(calls) // 2] / 1e3
        return targets(self, inp)

    def timed_step(self, gt_BL, x_BLCv, label_B):
        path = ("images", "tokens")[len(calls) % 2]
        clock[0] += step_ms[path][len(calls) // 2] / 1e3
        calls.append(path)

    monkeypatch.setattr(bench_tokens.Trainer, "targets", timed_targets)
    monkeypatch.setattr(bench_tokens.Trainer, "micro_step_tokens", timed_step)
    rows = bench_tokens.bench_setup("study", 2, 6, 2, tmp_path)
    assert calls == ["images", "tokens"] * 3
    assert rows == [["study", "images", 2, "28.6", "20", "50", "29%", "", ""],
                    ["study", "tokens", 2, "37.0", "4", "50", "7%", "3.0", 310]]


def test_the_apps_first_image_is_its_first_partial_result(monkeypatch):
    """bench_app's /sample client: the first image's time is when the first partial result arrives, the whole
    batch's when the last does, each from the submit; the app is asked the FLAGS sample.py runs. The last partial
    taken as the first (the app's first-image latency read as its whole time) passed the suite: no test ran it."""
    from scripts import bench_app

    clock, submitted = [10.0], []
    monkeypatch.setattr(bench_app, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Client:
        def submit(self, *args, api_name):
            submitted.append((args, api_name))
            for wait in (1.5, 2.0, 3.0):  # two batches of 4, then the grid
                clock[0] += wait
                yield f"after {wait} s"

    assert bench_app.app_run(Client()) == (1.5, 6.5)
    flags = dict(zip(bench_app.FLAGS[::2], bench_app.FLAGS[1::2], strict=False))
    assert submitted == [(([flags["--classes"]], int(flags["--num_per_class"]), float(flags["--cfg"]),
                           int(flags["--top_k"]), float(flags["--top_p"]), int(flags["--seed"]), False,
                           int(flags["--bs"])), "/sample")]


def test_digest_section_rates_each_digest_over_the_whole_state(monkeypatch):
    """Both digests hash the same --digest_mib MiB (tensors of 16 MiB, the last one short), timed alternated in one
    call; GB/s = bytes / time and the speed-up is weights_digest's time over each row's."""
    hashed = []
    monkeypatch.setattr(bench, "weights_digest", lambda state: hashed.append(sum(t.nbytes for t in state.values())))
    monkeypatch.setattr(bench, "file_digest", lambda state: hashed.append([t.numel() for t in state.values()]))
    calls, _ = fake_timing(monkeypatch, {"weights_digest": 100.0, "file_digest": 25.0}.get)
    text = run_section(bench.bench_digest, "--digest_mib", "40", "--warmup", "0", "--repeats", "2")
    assert hashed == [40 * 2**20, [4 << 20, 4 << 20, 2 << 20]]
    assert calls == [(["weights_digest", "file_digest"], 0, 2)]
    assert columns(text, "digest", "ms", "GB/s", "speed-up") == [["weights_digest", "100", "0.42", "1.00x"],
                                                                 ["file_digest", "25", "1.68", "4.00x"]]
