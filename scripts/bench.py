"""Speed bench of M-VAR's pieces against VAR's, printed as markdown tables (median of --repeats after warm-up).

Sections (`--only`): attn  intra-scale vs VAR's block-causal global attention, kernel alone and ScaleAttention layer
                     block one M-VAR block vs one VAR block (and, with --archs, the other ablation blocks)
Each section measures its variants side by side in one run, at d16 shapes by default (B=2, L=680, C=1024, H=16).
Peak memory above what was allocated before: torch.cuda.max_memory_allocated on CUDA; on CPU, replayed from the
profiler's per-op allocations and frees (torch.profiler, profile_memory=True; kineto prints two lines to stderr).
The attention table also counts score entries (analytic, B*H*sum(l^2) vs B*H*L^2).

    python scripts/bench.py                                  # all sections, CPU (+ CUDA when available)
    python scripts/bench.py --only attn --device cpu --repeats 5 --threads 1
    python scripts/bench.py --only block --device cuda --dtype bf16
"""
import argparse
import contextlib
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/bench.py` from anywhere

from models.attention import ScaleAttention, block_causal_attention, intra_scale_attention, resolve_backend  # noqa: E402
from models.mvar import HybridBlock, MVARConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATCH_NUMS = {256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def passes(run: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor]) -> dict[str, Callable[[], None]]:
    """The two timed passes of `run`: forward without grad, and forward+backward (grads of `leaves` reset)."""

    def fwd() -> None:
        with torch.no_grad():
            run()

    def fwd_bwd() -> None:
        out = run()
        out.backward(torch.ones_like(out))
        for t in leaves:
            t.grad = None

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def measure(
    variants: dict[str, tuple[Callable[[], torch.Tensor], Sequence[torch.Tensor]]], device: torch.device,
    args: argparse.Namespace,
) -> dict[str, dict[str, tuple[float, float]]]:
    """{variant: {pass: (median ms, peak MiB)}}. The variants take turns within every repeat, so load
    from other processes on a shared machine hits them alike."""
    fns = {name: passes(run, leaves) for name, (run, leaves) in variants.items()}
    times: dict[tuple[str, str], list[float]] = {(v, p): [] for v in fns for p in fns[v]}
    for i in range(args.warmup + args.repeats):
        for (v, p), ts in times.items():
            sync(device)
            t0 = time.perf_counter()
            fns[v][p]()
            sync(device)
            if i >= args.warmup:
                ts.append((time.perf_counter() - t0) * 1e3)
    return {v: {p: (statistics.median(times[(v, p)]), peak_mib(fns[v][p], device)) for p in fns[v]} for v in fns}


def peak_mib(fn: Callable[[], None], device: torch.device) -> float:
    """Peak memory allocated by `fn` above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0  # replay every op's own allocations (+) and the frees (-) in time order
    for event in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision as in training (module weights stay fp32); nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------
def bench_attn(device: torch.device, args: argparse.Namespace) -> str:
    """Intra-scale attention (M-VAR) vs block-causal masked global attention (VAR): kernel and full layer."""
    B, C, H, dtype = args.batch_size, args.width, args.heads, DTYPES[args.dtype]
    seg_lens = tuple(pn * pn for pn in PATCH_NUMS[args.reso])
    L, c, scale = sum(seg_lens), C // H, 1.0
    backend = resolve_backend(args.attn_backend, device, dtype)
    torch.manual_seed(0)
    qkv = [torch.randn(B, L, H, c, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    x_BLC = torch.randn(B, L, C, device=device, requires_grad=True)
    layers = {mode: ScaleAttention(C, H, mode=mode, backend=args.attn_backend).to(device)
              for mode in ("intra", "causal")}

    def layer_run(mode: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with autocast(device, dtype):
                return layers[mode](x_BLC, seg_lens)
        return run

    res = measure({
        "kernel intra": (lambda: intra_scale_attention(*qkv, seg_lens, scale, backend=args.attn_backend), qkv),
        "kernel global": (lambda: block_causal_attention(*qkv, seg_lens, scale), qkv),
    }, device, args)
    res |= measure({"layer intra": (layer_run("intra"), [x_BLC]), "layer global": (layer_run("causal"), [x_BLC])},
                   device, args)
    rows = []
    for part in ("kernel", "layer"):
        for p in ("fwd", "fwd+bwd"):
            (ti, mi), (tg, mg) = res[f"{part} intra"][p], res[f"{part} global"][p]
            mem = [f"{mi:.1f}", f"{mg:.1f}", f"{mg / mi:.2f}x"]
            rows.append([device.type, part, p, f"{ti:.2f}", f"{tg:.2f}", f"**{tg / ti:.2f}x**", *mem])
    headers = ["device", "what", "pass", f"intra ms ({backend})", "global ms (sdpa+mask)", "speed-up",
               "intra peak MiB", "global peak MiB", "memory ratio"]
    intra_scores, global_scores = B * H * sum(n * n for n in seg_lens), B * H * L * L
    out = [f"### attn: B={B}, L={L} ({args.reso} px), C={C}, H={H}, {args.dtype}, {device.type}", "",
           markdown_table(headers, rows), "",
           f"Score entries (analytic, B*H*sum(l^2) vs B*H*L^2): intra {intra_scores:,} vs global {global_scores:,} "
           f"({global_scores / intra_scores:.2f}x)."]
    if device.type == "cpu":
        fwd_x = res["kernel global"]["fwd"][0] / res["kernel intra"]["fwd"][0]
        fb_x = res["kernel global"]["fwd+bwd"][0] / res["kernel intra"]["fwd+bwd"][0]
        out.append(f"CPU targets (kernel): fwd >= 3x: {'met' if fwd_x >= 3 else 'NOT met'} ({fwd_x:.2f}x); "
                   f"fwd+bwd >= 2x: {'met' if fb_x >= 2 else 'NOT met'} ({fb_x:.2f}x).")
    return "\n".join(out)


def bench_block(device: torch.device, args: argparse.Namespace) -> str:
    """One block of each architecture in `--archs` (M-VAR vs VAR by default), forward and forward+backward."""
    B, C, dtype = args.batch_size, args.width, DTYPES[args.dtype]
    seg_lens = tuple(pn * pn for pn in PATCH_NUMS[args.reso])
    torch.manual_seed(0)
    x_BLC = torch.randn(B, sum(seg_lens), C, device=device, requires_grad=True)
    cond_BD = torch.randn(B, C, device=device)
    blocks = {}
    for arch in args.archs:
        config = MVARConfig(depth=C // 64, embed_dim=C, num_heads=args.heads, arch=arch,
                            patch_nums=PATCH_NUMS[args.reso], drop_path_rate=0.0, attn_backend=args.attn_backend)
        blocks[arch] = HybridBlock(config, block_idx=0, drop_path=0.0).to(device)

    def block_run(block: HybridBlock) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with autocast(device, dtype):
                return block(x_BLC, cond_BD, seg_lens)
        return run

    res = measure({arch: (block_run(block), [x_BLC]) for arch, block in blocks.items()}, device, args)
    headers = ["device", "arch", "branches", "params M", "fwd ms", "fwd+bwd ms", "fwd peak MiB", "fwd+bwd peak MiB"]
    if "var" in res:
        headers += ["fwd vs var", "fwd+bwd vs var"]
    rows = []
    for arch, block in blocks.items():
        (tf, mf), (tb, mb) = res[arch]["fwd"], res[arch]["fwd+bwd"]
        row = [device.type, arch, " + ".join(block.branches), f"{sum(p.numel() for p in block.parameters()) / 1e6:.2f}",
               f"{tf:.1f}", f"{tb:.1f}", f"{mf:.1f}", f"{mb:.1f}"]
        if "var" in res:
            row += [f"{tf / res['var']['fwd'][0]:.2f}x", f"{tb / res['var']['fwd+bwd'][0]:.2f}x"]
        rows.append(row)
    return "\n".join([f"### block: B={B}, L={sum(seg_lens)}, C={C}, H={args.heads}, {args.dtype}, {device.type}", "",
                      markdown_table(headers, rows)])


SECTIONS: dict[str, Callable[[torch.device, argparse.Namespace], str]] = {"attn": bench_attn, "block": bench_block}


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [args.device] if args.device != "auto" else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if "cpu" in devices and load > cores and torch.get_num_threads() > 1:
        logging.getLogger(__name__).warning(
            "load average %.1f on %d cores: CPU timings are distorted (threads wait at every parallel region; "
            "many small kernels suffer most); --threads 1 gives steadier numbers", load, cores)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, median of {args.repeats} "
          f"after {args.warmup} warm-up\n")
    for name in args.only or list(SECTIONS):
        for device in devices:
            print(SECTIONS[name](torch.device(device), args) + "\n", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), help="sections to run (default: all)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cpu, + cuda if any")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="q/k/v dtype; autocast dtype for layers")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--width", type=int, default=1024, help="C (1024 = d16)")
    parser.add_argument("--heads", type=int, default=16, help="H (16 = d16)")
    parser.add_argument("--reso", type=int, default=256, choices=list(PATCH_NUMS), help="patch schedule")
    parser.add_argument("--attn-backend", default="auto", choices=["auto", "flash_attn", "torch_varlen", "sdpa"])
    parser.add_argument("--archs", nargs="+", default=["mvar", "var"], choices=["mvar", "var", "intra", "mamba"],
                        help="block section: architectures to compare")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(parser.parse_args())
