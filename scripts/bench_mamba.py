"""Time one Mamba2 layer against an FFN of the same width (forward, forward+backward) and print a table.

    python scripts/bench_mamba.py                    # C=1024, B=2, L=680, fp32, CPU (+ CUDA when available)
    python scripts/bench_mamba.py --devices cpu --iters 3 --backend torch
"""
import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from models.mamba2 import Mamba2


def build_ffn(C: int) -> nn.Module:
    return nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(approximate="tanh"), nn.Linear(4 * C, C))


def time_ms(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of `fn` in milliseconds (synchronising CUDA around each call)."""
    times: list[float] = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_module(module: nn.Module, x: torch.Tensor, warmup: int, iters: int) -> tuple:
    def fwd() -> None:
        with torch.no_grad():
            module(x)

    def fwd_bwd() -> None:
        module(x.requires_grad_()).sum().backward()
    return time_ms(fwd, x.device, warmup, iters), time_ms(fwd_bwd, x.device, warmup, iters)


def main(args: argparse.Namespace) -> None:
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"C={args.C} B={args.B} L={args.L} fp32, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'device':<8}{'module':<26}{'fwd ms':>10}{'fwd+bwd ms':>12}")
    for name in devices:
        device = torch.device(name)
        torch.manual_seed(0)
        x = torch.randn(args.B, args.L, args.C, device=device)
        mamba = Mamba2(args.C, d_state=64, d_conv=4, expand=2, backend=args.backend).to(device)
        ffn = build_ffn(args.C).to(device)
        m_f, m_fb = bench_module(mamba, x, args.warmup, args.iters)
        f_f, f_fb = bench_module(ffn, x, args.warmup, args.iters)
        label = f"Mamba2 ({mamba.active_backend})"
        print(f"{name:<8}{label:<26}{m_f:>10.1f}{m_fb:>12.1f}")
        print(f"{name:<8}{'FFN 1024-4096-1024' if args.C == 1024 else 'FFN C-4C-C':<26}{f_f:>10.1f}{f_fb:>12.1f}")
        print(f"{name:<8}{'ratio Mamba2/FFN':<26}{m_f / f_f:>10.2f}{m_fb / f_fb:>12.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--C", type=int, default=1024, help="model width")
    parser.add_argument("--B", type=int, default=2, help="batch size")
    parser.add_argument("--L", type=int, default=680, help="sequence length (680 = 256 px schedule)")
    parser.add_argument("--devices", nargs="*", choices=["cpu", "cuda"], help="default: cpu, plus cuda if present")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "mamba_ssm"], help="Mamba2 backend")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(parser.parse_args())
