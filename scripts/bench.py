"""Speed of M-VAR against VAR, piece by piece and whole, printed as markdown tables.

Sections (`--only`, default all):
    attn    intra-scale vs VAR's block-causal global attention: kernel alone and ScaleAttention layer
    block   one block of each --archs (M-VAR vs VAR by default)
    mamba   one Mamba2 layer vs the FFN of the same block
    train   a training step (forward, backward, clip, AdamW) on random tokens, tokenizer excluded: images/s,
            model GFLOP/s and % of peak, --train_dtypes side by side (bf16 speed-up over fp32)
    ckpt    activation checkpointing (--grad_ckpt): step time and peak memory with and without it at --depth and
            2x --depth; the batch of M-VAR-d30 per 80 GB / 141 GB GPU, projected from the measured per-block bytes
    sample  sampling per image: Mamba2 state cached, the official prefix re-run, VAR's KV cache; tokens per block
    paper   the paper's speed claims: M-VAR-d24 vs VAR-d30, M-VAR-D and M-VAR-d16 (also with the prefix re-run) vs
            VAR-d16, fp32 and bf16, batch 1 and 8: time and model-FLOP ratios beside the paper's
    digest  a checkpoint's digest at every save and load: weights_digest (one core) vs file_digest (threads), GB/s
Shapes follow --depth (width 64*depth, depth heads) and --pn; timing, memory and tables come from scripts.timing
(variants alternated over rounds in one process, median). Weights are random: speed does not depend on them.

    python scripts/bench.py --only attn block mamba --device cpu --threads 1           # d16 pieces on a CPU
    python scripts/bench.py --only train sample --depth 4 --device cpu --threads 1
    python scripts/bench.py --only train --depth 8 --device cpu --threads 1 --archs mvar var intra mamba \
        --train_dtypes fp32 bf16                                                          # CPU training throughput
    python scripts/bench.py --only train --depth 4 --device cpu --threads 1 --compiled  # eager vs torch.compile
    python scripts/bench.py --only train --depth 4 --width 128 --heads 2 --pn 1_2_3_4_5_6_8 --bs 64 --V 512 \
        --device cpu --threads 1 --train_dtypes fp32                                      # the study's scale
    python scripts/bench.py --only ckpt --depth 2 --width 256 --bs 2 --dtype bf16 --device cpu --threads 1
    python scripts/bench.py --device cuda --dtype bf16 --depth 16 --bs 32 --out docs/gpu.md
    python scripts/bench.py --only paper --device cpu --threads 1 --pn 1_2_3_4_5 --repeats 1 --warmup 1  # a quick look
    python scripts/bench.py --only digest --device cpu --digest_mib 1024
"""
import argparse
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from models import build_vae_mvar
from models.attention import ScaleAttention, block_causal_attention, intra_scale_attention, resolve_backend
from models.flops import model_flops, train_step_flops
from models.loading import file_digest, hash_threads, weights_digest
from models import mamba2
from models.mamba2 import Mamba2
from models.mvar import FFN, MVAR, HybridBlock, MVARConfig
from models.precision import effective_amp_dtype
from models.presets import ARCH_BRANCHES, MVAR_models, format_patch_nums, parse_patch_nums
from scripts import timing as bm
from trainer import Trainer
from utils.flags import add_backend_flags, sampling_problems
from utils.run.checkpoint import OutputFolderError, check_writable

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16/fp16 tensor-core peaks, quoted beside
TRAIN_FP16 = {"fp32": 0, "fp16": 1, "bf16": 2}  # train.py --fp16 of each --train_dtypes


def shape(args: argparse.Namespace) -> tuple[int, int, tuple[int, ...]]:
    """(C, H, seg_lens) of --depth and --pn."""
    return 64 * args.depth, args.depth, tuple(p * p for p in parse_patch_nums(args.pn))


def timed_with_memory(variants: dict[str, tuple[Callable[[], torch.Tensor], list[torch.Tensor]]],
                      device: torch.device, args: argparse.Namespace) -> dict[str, dict[str, tuple[float, float]]]:
    """{variant: {pass: (median ms, peak MiB)}} for the forward and forward+backward passes of each variant."""
    fns = {(v, p): fn for v, (run, leaves) in variants.items() for p, fn in bm.passes(run, leaves).items()}
    ms = bm.time_alternating(fns, device, args.warmup, args.repeats)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for (v, p), fn in fns.items():
        out.setdefault(v, {})[p] = (ms[v, p], bm.peak_mib(fn, device))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Sections: each returns its markdown
# ---------------------------------------------------------------------------------------------------------------
def bench_attn(device: torch.device, args: argparse.Namespace) -> str:
    """Intra-scale attention (M-VAR) vs block-causal masked global attention (VAR): kernel and full layer."""
    (C, H, seg_lens), B, dtype = shape(args), args.bs, bm.DTYPES[args.dtype]
    L, c, scale = sum(seg_lens), C // H, 1.0
    kernel = resolve_backend(args.attn_backend, device, dtype)
    torch.manual_seed(0)
    qkv = [torch.randn(B, L, H, c, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    x_BLC = torch.randn(B, L, C, device=device, requires_grad=True)
    layers = {mode: ScaleAttention(C, H, mode=mode, backend=args.attn_backend).to(device)
              for mode in ("intra", "causal")}

    def layer_run(mode: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with bm.autocast(device, dtype):
                return layers[mode](x_BLC, seg_lens)
        return run

    res = timed_with_memory({
        "kernel intra": (lambda: intra_scale_attention(*qkv, seg_lens, scale, backend=args.attn_backend), qkv),
        "kernel global": (lambda: block_causal_attention(*qkv, seg_lens, scale), qkv),
        "layer intra": (layer_run("intra"), [x_BLC]), "layer global": (layer_run("causal"), [x_BLC]),
    }, device, args)
    rows = []
    for part in ("kernel", "layer"):
        for p in ("fwd", "fwd+bwd"):
            (ti, mi), (tg, mg) = res[f"{part} intra"][p], res[f"{part} global"][p]
            rows.append([device.type, part, p, f"{ti:.2f}", f"{tg:.2f}", f"**{tg / ti:.2f}x**", f"{mi:.1f}",
                         f"{mg:.1f}", f"{mg / mi:.2f}x"])
    headers = ["device", "what", "pass", f"intra ms ({kernel})", "global ms (sdpa+mask)", "speed-up",
               "intra peak MiB", "global peak MiB", "memory ratio"]
    intra_scores, global_scores = B * H * sum(n * n for n in seg_lens), B * H * L * L
    return "\n".join([
        f"### attn: B={B}, L={L}, C={C}, H={H}, {args.dtype}, {device.type}", "", bm.markdown_table(headers, rows), "",
        f"Score entries (analytic, B*H*sum(l^2) vs B*H*L^2): intra {intra_scores:,} vs global {global_scores:,} "
        f"({global_scores / intra_scores:.2f}x)."])


def bench_block(device: torch.device, args: argparse.Namespace) -> str:
    """One block of each architecture in --archs, forward and forward+backward."""
    (C, H, seg_lens), B, dtype = shape(args), args.bs, bm.DTYPES[args.dtype]
    torch.manual_seed(0)
    x_BLC = torch.randn(B, sum(seg_lens), C, device=device, requires_grad=True)
    cond_BD = torch.randn(B, C, device=device)
    blocks = {arch: HybridBlock(MVARConfig(depth=args.depth, arch=arch, patch_nums=parse_patch_nums(args.pn),
                                           drop_path_rate=0.0), 0, 0.0, args.attn_backend,
                                args.mamba_backend).to(device) for arch in args.archs}

    def block_run(block: HybridBlock) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with bm.autocast(device, dtype):
                return block(x_BLC, cond_BD, seg_lens)
        return run

    res = timed_with_memory({arch: (block_run(block), [x_BLC]) for arch, block in blocks.items()}, device, args)
    ref = res.get("var")
    headers = ["device", "arch", "branches", "params M", "fwd ms", "fwd+bwd ms", "fwd peak MiB", "fwd+bwd peak MiB"]
    headers += ["fwd vs var", "fwd+bwd vs var"] if ref else []
    rows = []
    for arch, block in blocks.items():
        (tf, mf), (tb, mb) = res[arch]["fwd"], res[arch]["fwd+bwd"]
        row = [device.type, arch, " + ".join(block.branches), f"{sum(p.numel() for p in block.parameters()) / 1e6:.2f}",
               f"{tf:.1f}", f"{tb:.1f}", f"{mf:.1f}", f"{mb:.1f}"]
        rows.append(row + ([f"{tf / ref['fwd'][0]:.2f}x", f"{tb / ref['fwd+bwd'][0]:.2f}x"] if ref else []))
    return "\n".join([f"### block: B={B}, L={sum(seg_lens)}, C={C}, H={H}, {args.dtype}, {device.type}", "",
                      bm.markdown_table(headers, rows)])


def bench_mamba(device: torch.device, args: argparse.Namespace) -> str:
    """One Mamba2 layer (d_state 64, expand 2, as in M-VAR) vs the FFN (mlp_ratio 4) of the same width."""
    (C, _, seg_lens), B, dtype = shape(args), args.bs, bm.DTYPES[args.dtype]
    torch.manual_seed(0)
    x_BLC = torch.randn(B, sum(seg_lens), C, device=device, requires_grad=True)
    mamba = Mamba2(C, d_state=64, d_conv=4, expand=2, backend=args.mamba_backend).to(device)
    ffn = FFN(C, 4 * C).to(device)

    def run(module: nn.Module) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with bm.autocast(device, dtype):
                return module(x_BLC)
        return fn

    res = timed_with_memory({"mamba": (run(mamba), [x_BLC]), "ffn": (run(ffn), [x_BLC])}, device, args)
    names = {"mamba": f"Mamba2 ({mamba.active_backend})", "ffn": f"FFN {C}-{4 * C}-{C}"}
    rows = [[device.type, names[m], f"{sum(p.numel() for p in mod.parameters()) / 1e6:.2f}",
             *(f"{res[m][p][0]:.1f}" for p in ("fwd", "fwd+bwd")), *(f"{res[m][p][1]:.1f}" for p in ("fwd", "fwd+bwd"))]
            for m, mod in (("mamba", mamba), ("ffn", ffn))]
    ratio = [f"{res['mamba'][p][0] / res['ffn'][p][0]:.2f}x" for p in ("fwd", "fwd+bwd")]
    rows.append([device.type, "ratio Mamba2 / FFN", "", *ratio, "", ""])
    return "\n".join([f"### mamba: B={B}, L={sum(seg_lens)}, C={C}, {args.dtype}, {device.type}", "",
                      bm.markdown_table(["device", "module", "params M", "fwd ms", "fwd+bwd ms", "fwd peak MiB",
                                         "fwd+bwd peak MiB"], rows)])


def random_train_step(arch: str, depth: int, dtype_name: str, device: torch.device, args: argparse.Namespace,
                      fused_adam: bool = True) -> tuple[MVAR, Trainer, functools.partial]:
    """A random-weight model of `arch` at `depth` (width --width or 64*depth, --heads or head dim 64), its Trainer in
    `dtype_name` (AdamW fused or not), and its training step (`Trainer.micro_step_tokens` on random tokens of batch
    --bs: the partial's args are gt_BL, x_BLCv, label_B)."""
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs (the largest-batch probe builds a d16 once per batch tried)
        mvar = MVAR(MVARConfig(depth=depth, patch_nums=parse_patch_nums(args.pn), arch=arch, V=args.V,
                               embed_dim=args.width or None, num_heads=args.heads or None),
                    attn_backend=args.attn_backend, mamba_backend=args.mamba_backend)
    mvar.init_weights()
    trainer = Trainer(vae=None, model=mvar, device=device, lr=1e-4, fp16=TRAIN_FP16[dtype_name], fused_adam=fused_adam)
    return mvar, trainer, random_tokens_step(trainer, args.bs, device)


def random_tokens_step(trainer: Trainer, batch: int, device: torch.device) -> functools.partial:
    """`trainer`'s training step on random tokens of `batch` images (gt_BL, x_BLCv, label_B)."""
    mvar = trainer.mvar
    gt_BL = torch.randint(0, mvar.V, (batch, mvar.L), device=device)
    x_BLCv = torch.randn(batch, mvar.L - mvar.first_l, mvar.Cvae, device=device)
    label_B = torch.randint(0, mvar.num_classes, (batch,), device=device)
    return functools.partial(trainer.micro_step_tokens, gt_BL, x_BLCv, label_B)


def one_pass(step: Callable[[], object]) -> Callable[[], object]:
    """`step` with Mamba2's CPU path running each batch in one pass instead of cache-sized slices
    (`models.mamba2.CPU_SLICE_BYTES`): what the slicing gains, timed in turn with the sliced step."""
    def run() -> object:
        saved, mamba2.CPU_SLICE_BYTES = mamba2.CPU_SLICE_BYTES, 1 << 62
        try:
            return step()
        finally:
            mamba2.CPU_SLICE_BYTES = saved
    return run


def bench_train(device: torch.device, args: argparse.Namespace) -> str:
    """`Trainer.micro_step_tokens` (forward, backward, clip, AdamW) of each --archs at --depth in each
    --train_dtypes, on random tokens; all (arch, dtype) steps alternated in one process. Achieved model GFLOP/s
    (`models.flops.train_step_flops`) and its share of this device's peak in the step's dtype."""
    B, steps, models, flops, compile_s = args.bs, {}, {}, {}, {}
    dtypes = args.train_dtypes or [args.dtype]
    for arch in args.archs:
        for dtype_name in dtypes:
            mvar, trainer, step = random_train_step(arch, args.depth, dtype_name, device, args)
            if dtype_name != "fp32" and trainer.amp_dtype is None:  # bf16 on a CPU without bf16 instructions
                dtype_name += " (ran fp32)"
            _, x_BLCv, label_B = step.args
            # FLOPs are linear in the batch: counted on one sample, since the count runs in fp32 and at the full
            # batch could run out of memory where the low-precision step it describes fits (the GPU batch probe)
            flops[arch, dtype_name] = B * train_step_flops(mvar, label_B[:1], x_BLCv[:1])
            steps[arch, dtype_name], models[arch, dtype_name] = step, mvar
            if args.mamba_one_pass and device.type == "cpu" and "mamba" in ARCH_BRANCHES[arch]:
                name = f"{arch}, Mamba2 batch in one pass"
                steps[name, dtype_name], models[name, dtype_name] = one_pass(step), mvar
                flops[name, dtype_name] = flops[arch, dtype_name]
            if args.mamba_torch and "mamba" in ARCH_BRANCHES[arch]:  # the portable Mamba2 path (own copy)
                name, portable = f"{arch}, Mamba2 backend torch", argparse.Namespace(**{**vars(args),
                                                                                      "mamba_backend": "torch"})
                models[name, dtype_name], _, steps[name, dtype_name] = random_train_step(
                    arch, args.depth, dtype_name, device, portable)
                flops[name, dtype_name] = flops[arch, dtype_name]
            if args.compiled:  # the same step with the model compiled as train.py --tfast does (its own copy)
                name = f"{arch}, compiled ({args.compiled})"
                models[name, dtype_name], _, steps[name, dtype_name] = random_train_step(
                    arch, args.depth, dtype_name, device, args)
                models[name, dtype_name].compile_for_training(mode=args.compiled)
                t0 = time.perf_counter()
                steps[name, dtype_name]()  # the compilation (forward and backward), not timed below
                compile_s[name, dtype_name] = time.perf_counter() - t0
                flops[name, dtype_name] = flops[arch, dtype_name]
            if args.unfused_adam:  # the same step with the single-tensor AdamW (its own copy of the model)
                name = f"{arch}, unfused AdamW"
                models[name, dtype_name], _, steps[name, dtype_name] = random_train_step(
                    arch, args.depth, dtype_name, device, args, fused_adam=False)
                flops[name, dtype_name] = flops[arch, dtype_name]
    ms = bm.time_alternating(steps, device, args.warmup, args.repeats)
    n = bm.MATMUL_SIDE[device.type]  # this device's practical peaks, measured in the same run
    peaks = {name: bm.matmul_gflops(device, bm.DTYPES[name]) for name in ("fp32", "bf16", "fp16")
             if (name in dtypes or name in ("fp32", "bf16")) and effective_amp_dtype(device, bm.DTYPES[name])}
    peak_note = f"{n}^3 matmuls measured in this run, " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
    if compile_s:
        peak_note += "; first compiled step (compilation) " + ", ".join(f"{a} {d} {t:.0f} s"
                                                                          for (a, d), t in compile_s.items())
    if device.type == "cuda":
        sheet = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
        peak_note += f"; datasheet dense bf16 peak {sheet:g} TFLOP/s" if sheet else ""
    rows = []
    for (arch, dtype_name), mvar in models.items():
        s, gflops = ms[arch, dtype_name] / 1e3, flops[arch, dtype_name] / 1e9
        peak = peaks.get(dtype_name if dtype_name in bm.DTYPES else "fp32")  # a fallback row ran fp32
        fp32_ms = ms.get((arch, "fp32")) if dtype_name in bm.DTYPES and dtype_name != "fp32" else None
        rows.append([device.type, arch, dtype_name, f"{sum(p.numel() for p in mvar.parameters()) / 1e6:.1f}",
                     f"{ms[arch, dtype_name]:.1f}", f"{B / s:.2f}",
                     f"{gflops:.1f}" if gflops >= 10 else f"{gflops:.3g}", f"{gflops / s:.1f}",
                     f"{gflops / s / peak * 100:.1f}" if peak else "-",
                     f"**{fp32_ms / ms[arch, dtype_name]:.2f}x**" if fp32_ms else ""])
    L = next(iter(models.values())).L
    width = f", width {args.width}, {args.heads or args.width // 64} heads, V={args.V}" if args.width else ""
    return "\n".join([f"### train: depth {args.depth}{width}, L={L}, batch {B}, {device.type} (tokenizer excluded; "
                      f"model GFLOP = linear layers forward and backward + attention scores and Mamba2 mixing x3 "
                      f"(models/flops.py), counted on one step; "
                      f"peak: {peak_note})", "",
                      bm.markdown_table(["device", "arch", "dtype", "params M", "ms / step", "images / s",
                                         "model GFLOP / step", "GFLOP/s", "% of peak", "speed-up vs fp32"], rows)])


def bench_sample(device: torch.device, args: argparse.Namespace) -> str:
    """Per image: M-VAR with the Mamba2 state carried scale to scale, M-VAR re-running Mamba over the prefix (the
    official sampler), VAR with its KV cache, and the tokenizer decode alone; guidance doubles the batch."""
    patch_nums, dtype, B = parse_patch_nums(args.pn), bm.DTYPES[args.dtype], args.bs
    label_B = torch.arange(B, device=device) % 1000
    variants, rows, images = {}, [], []
    for arch, use_cache, name in (("mvar", True, "M-VAR, Mamba state cached"),
                                  ("mvar", False, "M-VAR, prefix recompute (official)"),
                                  ("var", True, "VAR, KV cache")):
        torch.manual_seed(0)
        vae, mvar = build_vae_mvar(device, patch_nums=patch_nums, V=args.V, ch=args.vae_ch, depth=args.depth,
                                   arch=arch, attn_backend=args.attn_backend, mamba_backend=args.mamba_backend)
        mvar.eval()

        def sample(mvar=mvar, use_cache=use_cache) -> torch.Tensor:
            with torch.inference_mode(), bm.autocast(device, dtype):
                return mvar.autoregressive_infer_cfg(B, label_B, g_seed=0, cfg=args.cfg, top_k=args.top_k,
                                                     top_p=args.top_p, use_cache=use_cache)

        with torch.inference_mode():
            tokens = bm.count_block_tokens(mvar, use_cache, args.cfg)
            images.append(sample().float())
        variants[name] = sample
        rows.append([name, mvar.C, f"{sum(p.numel() for p in mvar.parameters()) / 1e6:.1f}M", tokens["mamba"],
                     tokens["attn"], bm.attention_scores(mvar)])
    f_hat = torch.randn(B, mvar.Cvae, patch_nums[-1], patch_nums[-1], device=device)
    decode = f"tokenizer decode only (ch={args.vae_ch})"
    variants[decode] = lambda: vae.fhat_to_img(f_hat)
    with torch.inference_mode():
        ms = bm.time_alternating(variants, device, args.warmup, args.repeats)
    ref = ms["M-VAR, prefix recompute (official)"]
    rows = [[*row, f"{ms[row[0]] / 1e3 / B:.4f}", f"{ref / ms[row[0]]:.2f}x"] for row in rows]
    rows.append([decode, "", "", "", "", "", f"{ms[decode] / 1e3 / B:.4f}", ""])
    headers = ["sampler", "C", "params", "Mamba tokens / block", "attention tokens / block",
               "attention scores / block", "s / image", "speed-up vs recompute"]
    return "\n".join([
        f"### sample: depth {args.depth}, L={sum(p * p for p in patch_nums)}, batch {B} (x2 for guidance), cfg "
        f"{args.cfg}, {args.dtype}, {device.type}", "", bm.markdown_table(headers, rows), "",
        f"max |image difference| cached vs recompute, same seed: {(images[0] - images[1]).abs().max().item():.2e}"])


# The paper's speed claims (Tables 2 and 5, relative inference time on one GPU): M-VAR variant, VAR variant, the
# paper's time ratio. M-VAR-d16's 1.0 was timed with the official sampler, which re-runs Mamba over the prefix.
PAPER_PAIRS: tuple[tuple[str, str, float], ...] = (
    ("M-VAR-d24", "VAR-d30", 0.6 / 0.7), ("M-VAR-D", "VAR-d16", 0.7 / 0.9), ("M-VAR-d16", "VAR-d16", 1.0 / 0.9),
    ("M-VAR-d16, prefix re-run (official)", "VAR-d16", 1.0 / 0.9))
PREFIX_RERUN = ", prefix re-run (official)"


def build_paper_model(name: str, patch_nums: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                      args: argparse.Namespace) -> MVAR:
    """A randomly initialised `MVAR_models[name]` (at --paper_width when set) for sampling, its Linear weights held
    in `dtype` as `MVAR.inference_precision` holds them (cast here once, so fp32 copies do not double the memory),
    with a tokenizer whose decode is skipped: the timings exclude it."""
    torch.manual_seed(0)
    size = dict(MVAR_models[name.removesuffix(PREFIX_RERUN)])
    if args.paper_width:
        size.update(embed_dim=args.paper_width, num_heads=1)
    vae, mvar = build_vae_mvar(device, patch_nums=patch_nums, ch=32, attn_backend=args.attn_backend,
                               mamba_backend=args.mamba_backend, **size)
    vae.fhat_to_img = lambda f_hat: f_hat  # decode excluded (an instance attribute shadows the method)
    for layer in mvar.modules():
        if isinstance(layer, nn.Linear) and layer is not mvar.word_embed:  # kept in fp32, as inference_precision
            layer.to(dtype)
    return mvar.eval()


def time_paper_models(models: dict[str, MVAR], names: list[str], dtype: torch.dtype, B: int, device: torch.device,
                      args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """{name: (s, model FLOPs) per generated image} for `names` (models' names, or one + PREFIX_RERUN) sampled in
    turn at batch B on `device`; the FLOP count is the first warm-up round."""
    label_B = torch.arange(B, device=device) % 1000

    def sample(name: str) -> None:
        mvar = models[name.removesuffix(PREFIX_RERUN)]
        with torch.inference_mode(), mvar.inference_precision(None if dtype == torch.float32 else dtype):
            mvar.autoregressive_infer_cfg(B, label_B, g_seed=0, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                          use_cache=PREFIX_RERUN not in name)

    runs = {n: functools.partial(sample, n) for n in names}
    flops = {n: model_flops(models[n.removesuffix(PREFIX_RERUN)], runs[n]) / B for n in names}
    ms = bm.time_alternating(runs, device, max(args.warmup - 1, 0), args.repeats)
    return {n: (ms[n] / 1e3 / B, flops[n]) for n in names}


def bench_paper(device: torch.device, args: argparse.Namespace) -> str:
    """The paper's pairs (PAPER_PAIRS), sampling with cfg, per generated image: time, model FLOPs (linear layers,
    attention scores and Mamba2 mixing, `models.flops`) and their ratios, for each --paper_dtypes and --paper_bs.
    The models of one pair (both M-VAR-d16 samplers with VAR-d16) are alternated in one process; pairs run one
    after another."""
    patch_nums = parse_patch_nums(args.pn)
    groups: dict[str, list[str]] = {}
    for mvar_name, var_name, _ in PAPER_PAIRS:
        if mvar_name in args.paper_pairs:
            groups.setdefault(var_name, [var_name]).insert(-1, mvar_name)
    results: dict[tuple[str, int, str], tuple[float, float]] = {}  # (dtype, batch, model) -> (s, FLOPs) per image
    for dtype_name in args.paper_dtypes:
        for names in groups.values():
            models = {m: build_paper_model(m, patch_nums, bm.DTYPES[dtype_name], device, args)  # the re-run's too
                      for m in dict.fromkeys(n.removesuffix(PREFIX_RERUN) for n in names)}
            for B in args.paper_bs:
                timed = time_paper_models(models, names, bm.DTYPES[dtype_name], B, device, args)
                results.update({(dtype_name, B, n): v for n, v in timed.items()})
                print(f"  paper, {dtype_name}, batch {B}: " + ", ".join(f"{n} {s:.2f} s/image"
                                                                         for n, (s, _) in timed.items()), flush=True)
            del models
    return paper_tables(results, args, patch_nums, device.type)


def paper_tables(results: dict[tuple[str, int, str], tuple[float, float]], args: argparse.Namespace,
                 patch_nums: tuple[int, ...], device_type: str = "cpu") -> str:
    """The per-model table (s / image, GFLOP / image, GFLOP/s) and the per-pair ratios beside the paper's."""
    model_rows = [[d, B, n, f"{s:.3f}", f"{f / 1e9:.1f}", f"{f / s / 1e9:.1f}"]
                  for (d, B, n), (s, f) in results.items()]
    pair_rows = []
    for (d, B, mvar_name), (t_m, f_m) in results.items():
        pair = next(((v, paper) for m, v, paper in PAPER_PAIRS if m == mvar_name), None)
        if pair is None or (d, B, pair[0]) not in results:
            continue
        t_v, f_v = results[d, B, pair[0]]
        pair_rows.append([d, B, f"{mvar_name} / {pair[0]}", f"**{t_m / t_v:.2f}x**", f"{f_m / f_v:.2f}x",
                          f"{t_m / t_v / (f_m / f_v):.2f}", f"{pair[1]:.2f}x"])
    for (d, B, n), (t_bf16, _) in results.items():  # bf16 against fp32, for each model timed in both
        if d == "bf16" and ("fp32", B, n) in results:
            pair_rows.append(["bf16 / fp32", B, n, f"**{t_bf16 / results['fp32', B, n][0]:.2f}x**", "", "", ""])
    return "\n".join([
        f"### paper: sampling per generated image, cfg {args.cfg} (batch x2), patch_nums "
        f"{format_patch_nums(patch_nums)} (L={sum(p * p for p in patch_nums)}), random weights, decode excluded, "
        f"{device_type}{f', every model at width {args.paper_width}' if args.paper_width else ''}",
        "", bm.markdown_table(["dtype", "batch", "model", "s / image", "model GFLOP / image", "GFLOP/s"], model_rows),
        "", bm.markdown_table(["dtype", "batch", "pair", "time ratio", "model-FLOP ratio",
                               "time per FLOP, M-VAR / VAR", "paper's time ratio"], pair_rows)])


def bench_ckpt(device: torch.device, args: argparse.Namespace) -> str:
    """Activation checkpointing (train.py --grad_ckpt): step time and peak memory with and without it, for each
    --archs at --depth and 2x --depth (timed alternated in one process, at --bs). Peak memory is measured after a
    warm-up step at --bs and 2x --bs: what grows with the batch is per image (what grows with neither is the
    weights' gradients and the optimizer's, which the 16 bytes per parameter of `d30_fit` count), and per image it is
    linear in depth: the slope is what one block keeps per image, the intercept the rest (embeddings, head,
    logits); both give the batch that fits M-VAR-d30 (256 px) on a GPU."""
    B, depths, rows, fits, steps, mems = args.bs, (args.depth, 2 * args.depth), [], {}, {}, {}
    for arch in args.archs:
        for depth in depths:
            mvar, trainer, step = random_train_step(arch, depth, args.dtype, device, args)
            for ckpt in (False, True):
                for batch, batch_step in ((B, step), (2 * B, random_tokens_step(trainer, 2 * B, device))):
                    def run(mvar=mvar, step=batch_step, ckpt=ckpt):
                        mvar.grad_ckpt = ckpt
                        step()
                    run()  # AdamW's lazy state and first-call allocations are not the step's
                    mems[arch, depth, ckpt, batch] = bm.peak_mib(run, device)
                    if batch == B:
                        steps[arch, depth, ckpt] = run
    ms = bm.time_alternating(steps, device, args.warmup, args.repeats)
    L, width = mvar.L, args.width or 64 * args.depth
    ran = args.dtype if args.dtype == "fp32" or effective_amp_dtype(device, bm.DTYPES[args.dtype]) else \
        f"{args.dtype} (ran fp32)"
    for arch in args.archs:
        for ckpt in (False, True):
            per_image = {d: (mems[arch, d, ckpt, 2 * B] - mems[arch, d, ckpt, B]) * 2**20 / B for d in depths}
            slope = (per_image[depths[1]] - per_image[depths[0]]) / (depths[1] - depths[0])
            fits[arch, ckpt] = (slope / (L * width), per_image[depths[0]] - depths[0] * slope)
            for depth in depths:
                rows.append([device.type, arch, depth, "on" if ckpt else "off", f"{ms[arch, depth, ckpt]:.1f}",
                             f"{ms[arch, depth, ckpt] / ms[arch, depth, False]:.2f}x",
                             f"{mems[arch, depth, ckpt, B]:.0f}", f"{mems[arch, depth, ckpt, 2 * B]:.0f}",
                             f"{fits[arch, ckpt][0]:.1f}"])
    return "\n".join([f"### ckpt: batch {B}, L={L}, width {width} (head dim 64), {ran}, {device.type}", "",
                      bm.markdown_table(["device", "arch", "depth", "--grad_ckpt", "ms / step", "time vs off",
                                         f"peak MiB, batch {B}", f"peak MiB, batch {2 * B}",
                                         "bytes / image / token / block / channel"], rows), "",
                      d30_fit(fits, L)])


CKPT_INPUT_BYTES = 4  # what a checkpointed block keeps per token and channel: its input, the fp32 residual stream


def d30_fit(fits: dict[tuple[str, bool], tuple[float, float]], L: int) -> str:
    """Images per GPU of M-VAR-d30 and VAR-d30 under DDP: (GPU memory - 16 bytes per parameter for fp32 weights,
    gradients and AdamW's moments) / activations per image. Activations per image, from the measured plain step:
    its bytes per token, block and channel x L x depth x width, plus its rest (embeddings, head, logits). With
    checkpointing each block keeps its input (CKPT_INPUT_BYTES, or the measured bytes where more) and one block's
    full activations are alive again while it is recomputed, with the same rest: the checkpointed step's own depth
    slope cannot tell at small depths, where its peak falls at the head's logits, not in the blocks."""
    rows = []
    for arch, name in (("mvar", "M-VAR-d30"), ("var", "VAR-d30")):
        if (arch, False) not in fits:
            continue
        with torch.device("meta"):
            mvar = MVAR(MVARConfig(**{"patch_nums": parse_patch_nums(256), **MVAR_models[name]}))
        states_gib = 16 * sum(p.numel() for p in mvar.parameters()) / 2**30
        plain_block, rest = fits[arch, False]
        for ckpt in (False, True):
            per_block = max(fits[arch, True][0], CKPT_INPUT_BYTES) if ckpt else plain_block
            per_image = (per_block * mvar.depth + (plain_block if ckpt else 0)) * L * mvar.C + rest
            per_image_gib = per_image / 2**30
            rows.append([name, "on" if ckpt else "off", f"{states_gib:.0f}", f"{per_image_gib:.2f}",
                         *(max(0, int((gib * 1e9 / 2**30 - states_gib) / per_image_gib)) for gib in (80, 141))])
    scale = "" if L == 680 else f" (measured at L={L}: this projection needs --pn 256)"
    return "\n".join([f"Projected to 256 px, L=680{scale}, DDP, with the activations as measured here (a GPU's "
                      "attention kernel may keep fewer: flash attention stores no score matrix):", "",
                      bm.markdown_table(["model", "--grad_ckpt", "weights+grads+AdamW GiB", "activations GiB / image",
                                         "images per 80 GB GPU", "per 141 GB GPU"], rows)])


DIGEST_TENSOR_FLOATS = 4 << 20  # the digest section's state: fp32 tensors of 16 MiB


def bench_digest(device: torch.device, args: argparse.Namespace) -> str:
    """The digest a checkpoint records at every save and verifies at every load: `weights_digest` (the weights'
    identity, one core) against `file_digest` (what files record, on `hash_threads()` threads), alternated, over
    --digest_mib MiB of random fp32 tensors on `device` (a GPU's are copied to the CPU tensor by tensor, as at a
    save)."""
    floats = args.digest_mib * 2**20 // 4
    state = {f"t{i}": torch.randn(min(DIGEST_TENSOR_FLOATS, floats - start), device=device)
             for i, start in enumerate(range(0, floats, DIGEST_TENSOR_FLOATS))}
    fns = {"weights_digest": functools.partial(weights_digest, state),
           "file_digest": functools.partial(file_digest, state)}
    ms = bm.time_alternating(fns, device, args.warmup, args.repeats)
    rows = [[device.type, name, f"{ms[name]:.0f}", f"{floats * 4 / 1e6 / ms[name]:.2f}",
             f"{ms['weights_digest'] / ms[name]:.2f}x"] for name in fns]
    return "\n".join([f"### digest: {args.digest_mib} MiB in {len(state)} fp32 tensors on {device.type}, "
                      f"file_digest on {hash_threads()} threads", "",
                      bm.markdown_table(["device", "digest", "ms", "GB/s", "speed-up"], rows)])


SECTIONS: dict[str, Callable[[torch.device, argparse.Namespace], str]] = {
    "attn": bench_attn, "block": bench_block, "mamba": bench_mamba, "train": bench_train, "ckpt": bench_ckpt,
    "sample": bench_sample, "paper": bench_paper, "digest": bench_digest}


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), help="sections to run (default: all)")
    bm.add_flags(p)
    p.add_argument("--depth", type=int, default=16, help="width 64*depth and depth heads (16: C=1024, H=16)")
    p.add_argument("--pn", default="256", help="patch schedule: 256, 512 or sides joined by '_'")
    p.add_argument("--bs", type=int, default=2, help="batch size")
    p.add_argument("--width", type=int, default=0, help="train and ckpt sections: model width (0: 64*depth)")
    p.add_argument("--heads", type=int, default=0, help="train section: attention heads (0: width // 64)")
    p.add_argument("--mamba_one_pass", action="store_true",
                   help="train section, CPU: also time each Mamba2 arch with the batch in one pass (no slices)")
    p.add_argument("--mamba_torch", action="store_true",
                   help="train section: also time each Mamba2 arch with --mamba_backend=torch (the portable path)")
    p.add_argument("--compiled", nargs="?", const="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="train section: also time each arch compiled as train.py --tfast (mode: default, as "
                        "--tfast=3; reduce-overhead as --tfast=1), its compile time reported")
    p.add_argument("--unfused_adam", action="store_true",
                   help="train section: also time each arch with the single-tensor AdamW (train.py --afuse=0)")
    p.add_argument("--archs", nargs="+", default=["mvar", "var"], choices=list(ARCH_BRANCHES),
                   help="block and train sections: the architectures to compare")
    add_backend_flags(p)
    p.add_argument("--train_dtypes", nargs="+", choices=list(TRAIN_FP16), default=None,
                   help="train section: precisions timed side by side (default: --dtype)")
    g = p.add_argument_group("sample section")
    g.add_argument("--V", type=int, default=4096, help="vocabulary size (the train section too)")
    g.add_argument("--vae_ch", type=int, default=32, help="tokenizer width (160 = VAR's; 32 keeps decoding cheap)")
    g.add_argument("--cfg", type=float, default=1.5)
    g.add_argument("--top_k", type=int, default=900)
    g.add_argument("--top_p", type=float, default=0.96)
    g = p.add_argument_group("paper section (also reads --pn, --cfg, --top_k, --top_p, --repeats, --warmup)")
    g.add_argument("--paper_pairs", nargs="+", default=[m for m, _, _ in PAPER_PAIRS],
                   choices=[m for m, _, _ in PAPER_PAIRS], help="M-VAR variants to time (each against its VAR)")
    g.add_argument("--paper_dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    g.add_argument("--paper_bs", nargs="+", type=int, default=[1, 8], help="images per sampling call")
    g.add_argument("--paper_width", type=int, default=0, help="every model at this width, one head, depths kept "
                   "(0: the named sizes; a small width makes a quick dry run)")
    p.add_argument("--digest_mib", type=int, default=512, help="digest section: MiB of tensors hashed")
    return p


def flag_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the flags, before any section runs (each named): sizes, the patch schedule, the models
    they make, the sampling settings (sample.py's rule: --top_p in (0, 1], --cfg finite and >= 0)."""
    problems = [f"--{flag} must be >= 1, got {getattr(args, flag)}"
                for flag in ("depth", "bs", "repeats", "V", "digest_mib") if getattr(args, flag) < 1]
    problems += [f"--{flag} must be >= 0, got {getattr(args, flag)}"
                 for flag in ("warmup", "threads", "width", "heads", "paper_width") if getattr(args, flag) < 0]
    problems += [f"--paper_bs must be >= 1, got {b}" for b in args.paper_bs if b < 1][:1]
    if args.vae_ch < 1 or args.vae_ch % 32:
        problems.append(f"--vae_ch must be a positive multiple of 32 (GroupNorm groups), got {args.vae_ch}")
    try:
        patch_nums = parse_patch_nums(args.pn)
    except ValueError as e:
        problems.append(f"--pn={args.pn}: {e}")
        patch_nums = None
    if patch_nums and not problems:  # the models of the sections: --width/--heads (train, ckpt), --paper_width
        sizes = [(f"--archs={arch} --depth={args.depth} --width={args.width} --heads={args.heads}",
                  dict(arch=arch, depth=args.depth, embed_dim=args.width or None, num_heads=args.heads or None))
                 for arch in args.archs]
        sizes += [(f"--paper_width={args.paper_width}", dict(depth=1, embed_dim=args.paper_width, num_heads=1))
                  ] if args.paper_width else []
        for flags, size in sizes:
            try:
                MVARConfig(patch_nums=patch_nums, V=args.V, **size)
            except ValueError as e:
                problems.append(f"{flags} make no model: {e}")
                break  # the next --archs would say the same
    return problems + sampling_problems(args.cfg, args.top_k, args.top_p)


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    if problems := flag_problems(args):
        raise SystemExit("error: " + "; ".join(problems))
    if args.out:  # written after every section ran: an unwritable place is an error now
        try:
            if Path(args.out).is_dir():
                raise OutputFolderError(f"--out={args.out} is a folder: expected a markdown file")
            check_writable(Path(args.out).parent, f"--out={args.out}")
        except OutputFolderError as e:
            raise SystemExit(f"error: {e}") from e
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [bm.preamble(args)]
    print(parts[0] + "\n", flush=True)
    for name in args.only or list(SECTIONS):
        for device in bm.devices(args):
            parts.append(SECTIONS[name](device, args))
            print(parts[-1] + "\n", flush=True)
    text = "\n\n".join(parts) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
