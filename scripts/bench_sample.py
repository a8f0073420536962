"""Sampling speed at equal depth: M-VAR with the Mamba2 state carried from scale to scale (cached), M-VAR
re-running Mamba over the whole prefix at every scale (the official sampler, `use_cache=False`), and VAR with
its KV cache; plus the tokens each block processes per generated sequence. Prints a markdown table.

    python scripts/bench_sample.py --depth 4 --bs 2 --repeats 3            # small CPU run
    python scripts/bench_sample.py --depth 16 --bs 32 --device cuda --bf16   # the paper's d16 shape

Weights are random (speed does not depend on them); the tokenizer is a narrow one (`--vae_ch`) so that its
decoder, timed on its own in the last row, does not hide the transformer. Time per image includes the
classifier-free-guidance doubling of the batch, as in real sampling.
"""
import argparse
import logging
import sys
import time
from pathlib import Path
from collections.abc import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/bench_sample.py`
from models import MVAR, build_vae_mvar  # noqa: E402
from models.tokenizer import parse_patch_nums  # noqa: E402

logger = logging.getLogger("bench_sample")


def count_block_tokens(mvar: MVAR, use_cache: bool, cfg: float) -> dict[str, int]:
    """Tokens entering block 0's Mamba2 and attention during one B=1 generation (per sequence)."""
    counts = {"mamba": 0, "attn": 0}
    block = mvar.blocks[0]
    hooks = []
    for name in counts:
        if hasattr(block, name):
            def hook(module, args, _out, name=name):
                counts[name] += args[0].shape[1]
            hooks.append(getattr(block, name).register_forward_hook(hook))
    try:
        mvar.autoregressive_infer_cfg(1, torch.zeros(1, dtype=torch.long), g_seed=0, cfg=cfg, use_cache=use_cache)
    finally:
        for h in hooks:
            h.remove()
    return counts


def attention_scores(mvar: MVAR) -> int:
    """Query-key pairs per sequence and head in one `arch` block: within each scale (intra-scale) or against the
    KV cache (VAR)."""
    block = mvar.blocks[-1]
    if block.uses_kv_cache:
        return sum(n * end for n, (_, end) in zip(mvar.seg_lens, mvar.begin_ends, strict=True))
    return sum(n * n for n in mvar.seg_lens) if "attn" in block.branches else 0


def timed(fn, device: torch.device):
    """(seconds, result) of one call of `fn`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def measure(args: argparse.Namespace) -> dict:
    """Build the three samplers, warm each up, then time them in turns (`repeats` rounds, so load from other
    processes hits all alike) and keep each one's fastest round."""
    device = torch.device(args.device)
    patch_nums = parse_patch_nums(args.pn)
    amp_dtype = torch.bfloat16 if args.bf16 else None
    common = dict(patch_nums=patch_nums, V=args.V, Cvae=32, ch=args.vae_ch, num_classes=1000, depth=args.depth,
                  flash_if_available=not args.portable, fused_if_available=not args.portable)
    label_B = torch.arange(args.bs, device=device) % 1000
    samplers, rows = [], []
    for arch, use_cache, name in (("mvar", True, "M-VAR, Mamba state cached"),
                                  ("mvar", False, "M-VAR, prefix recompute (official)"),
                                  ("var", True, "VAR, KV cache")):
        torch.manual_seed(0)
        vae, mvar = build_vae_mvar(device, arch=arch, **common)
        mvar.eval()

        def sample(mvar=mvar, use_cache=use_cache):
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                return mvar.autoregressive_infer_cfg(args.bs, label_B, g_seed=0, cfg=args.cfg, top_k=args.top_k,
                                                     top_p=args.top_p, use_cache=use_cache)

        with torch.inference_mode():
            tokens = count_block_tokens(mvar, use_cache, args.cfg)
        samplers.append(sample)
        rows.append(dict(name=name, C=mvar.C, params=sum(p.numel() for p in mvar.parameters()), tokens=tokens,
                         scores=attention_scores(mvar), s_per_img=float("inf")))
    f_hat = torch.randn(args.bs, 32, patch_nums[-1], patch_nums[-1], device=device)

    def decode():
        with torch.inference_mode():
            return vae.fhat_to_img(f_hat)

    images = [sample().float() for sample in samplers]  # warm-up, and the images for the parity check
    decode_s = float("inf")
    for _ in range(args.repeats):
        for row, sample in zip(rows, samplers, strict=True):
            row["s_per_img"] = min(row["s_per_img"], timed(sample, device)[0] / args.bs)
        decode_s = min(decode_s, timed(decode, device)[0] / args.bs)
    for row in rows:
        logger.info("%s: %.4f s/image", row["name"], row["s_per_img"])
    return {"rows": rows, "decode_s_per_img": decode_s, "max_diff_cached_vs_recompute":
            (images[0] - images[1]).abs().max().item(), "L": sum(p * p for p in patch_nums)}


def format_table(args: argparse.Namespace, result: dict) -> str:
    rows, ref = result["rows"], result["rows"][1]["s_per_img"]
    lines = [
        f"Sampling, depth {args.depth}, patch_nums {args.pn} (L={result['L']}), batch {args.bs} (x2 for guidance), "
        f"cfg {args.cfg}, {args.device}{' bf16' if args.bf16 else ' fp32'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads",
        "",
        "| sampler | C | params | Mamba tokens / block | attention tokens / block | attention scores / block "
        "| s / image | speed-up vs recompute |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['C']} | {r['params'] / 1e6:.1f}M | {r['tokens']['mamba']} | "
                     f"{r['tokens']['attn']} | {r['scores']} | {r['s_per_img']:.4f} | {ref / r['s_per_img']:.2f}x |")
    lines.append(f"| tokenizer decode only (ch={args.vae_ch}) | | | | | | {result['decode_s_per_img']:.4f} | |")
    lines += ["", "max |image difference| cached vs recompute, same seed: "
              f"{result['max_diff_cached_vs_recompute']:.2e}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--pn", default="256", help="patch schedule: 256, 512 or 1_2_3_...")
    p.add_argument("--V", type=int, default=4096, help="vocabulary size")
    p.add_argument("--vae_ch", type=int, default=32, help="tokenizer width (160 = VAR's; 32 keeps decoding cheap)")
    p.add_argument("--bs", type=int, default=2, help="images per batch")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up (the fastest counts)")
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--top_k", type=int, default=900)
    p.add_argument("--top_p", type=float, default=0.96)
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    p.add_argument("--portable", action="store_true", help="force SDPA attention and the PyTorch Mamba2 scan")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    return p


def main(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    table = format_table(args, measure(args))
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
