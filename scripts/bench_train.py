"""Training-step throughput of M-VAR vs VAR (and the ablation archs) at equal depth: images/s, tokens/s, MFU on GPU.

Times `Trainer.step_tokens` (forward, backward, clip, AdamW) on random tokens, so the tokenizer is excluded (it is
the same for every arch). Prints a markdown table and optionally writes it to --out.

    python scripts/bench_train.py --depth 4 --pn 256 --bs 4                       # CPU
    python scripts/bench_train.py --depth 16 --pn 256 --bs 32 --fp16 2 --tfast 0  # one GPU
"""
import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.mvar import MVAR, MVARConfig  # noqa: E402
from models.tokenizer import parse_patch_nums  # noqa: E402
from trainer import Trainer  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16/fp16 tensor-core peaks


def step_flops(mvar: MVAR, n_tokens: int) -> float:
    """Model FLOPs of one training step: 6 * (non-embedding params) * tokens (attention scores excluded)."""
    n = sum(p.numel() for name, p in mvar.named_parameters() if not name.startswith(("pos_", "class_emb", "lvl_")))
    return 6.0 * n * n_tokens


def bench_arch(arch: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = MVARConfig(depth=args.depth, num_classes=1000, patch_nums=parse_patch_nums(args.pn), arch=arch,
                     attn_backend=args.attn_backend, mamba_backend=args.mamba_backend)
    mvar = MVAR(cfg).to(device)
    mvar.init_weights()
    if args.tfast:
        mvar.compile()
    trainer = Trainer(vae=None, model=mvar, device=device, lr=1e-4, fp16=args.fp16)
    B, L = args.bs, mvar.L
    gt_BL = torch.randint(0, cfg.V, (B, L), device=device)
    x_BLCv = torch.randn(B, L - mvar.first_l, cfg.Cvae, device=device)
    label_B = torch.randint(0, 1000, (B,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        trainer.step_tokens(gt_BL, x_BLCv, label_B)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.step_tokens(gt_BL, x_BLCv, label_B)
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    row = {"arch": arch, "params_M": sum(p.numel() for p in mvar.parameters()) / 1e6, "ms_step": dt * 1e3,
           "img_s": B / dt, "tok_s": B * L / dt, "mfu": None}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak:
            row["mfu"] = step_flops(mvar, B * L) / dt / (peak * 1e12) * 100
        row["mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    del trainer, mvar
    return row


def to_markdown(rows, args, device_name: str) -> str:
    head = (f"Training step, depth {args.depth}, {args.pn} px, batch {args.bs}, fp16={args.fp16}, "
            f"tfast={args.tfast}, on {device_name} (tokenizer excluded)\n\n"
            "| arch | params (M) | ms/step | images/s | tokens/s | MFU % |\n|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1f}"
        lines.append(f"| {r['arch']} | {r['params_M']:.1f} | {r['ms_step']:.1f} | {r['img_s']:.2f} | "
                     f"{r['tok_s']:.0f} | {mfu} |")
    return head + "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4, help="depth of every arch (width 64*depth)")
    p.add_argument("--pn", default="256", help="patch schedule (256, 512 or 1_2_3...)")
    p.add_argument("--bs", type=int, default=4, help="batch size")
    p.add_argument("--archs", default="mvar,var", help="comma-separated archs: mvar, var, intra, mamba")
    p.add_argument("--fp16", type=int, default=0, choices=(0, 1, 2), help="0 fp32, 1 fp16 + scaler, 2 bf16")
    p.add_argument("--tfast", type=int, default=0, choices=(0, 1), help="torch.compile the model")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--attn_backend", default="auto", help="intra-scale attention backend")
    p.add_argument("--mamba_backend", default="auto", help="Mamba2 backend")
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [bench_arch(a.strip(), args, device) for a in args.archs.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    table = to_markdown(rows, args, name)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
