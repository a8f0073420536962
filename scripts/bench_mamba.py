"""Time one Mamba2 layer against an FFN of the same width (forward, forward+backward) and print a table.

    python -m scripts.bench_mamba                    # C=1024, B=2, L=680, fp32, CPU (+ CUDA when available)
    python -m scripts.bench_mamba --devices cpu --iters 3 --threads 1 --backend torch
"""
import argparse
import functools
import logging
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from models.mamba2 import Mamba2


def build_ffn(C: int) -> nn.Module:
    return nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(approximate="tanh"), nn.Linear(4 * C, C))


def timed_ms(fn: Callable[[], None], device: torch.device) -> float:
    """Wall time of one call of `fn` in milliseconds (synchronising CUDA around it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def bench(modules: dict[str, nn.Module], x: torch.Tensor, warmup: int, iters: int) -> dict[str, tuple]:
    """Median (fwd ms, fwd+bwd ms) per module. The modules take turns in every round, so a change in machine
    load (shared CPUs) hits all of them alike and the ratios stay meaningful."""
    def fwd(module: nn.Module) -> None:
        with torch.no_grad():
            module(x)

    def fwd_bwd(module: nn.Module) -> None:
        module(x.detach().requires_grad_()).sum().backward()

    times = {name: ([], []) for name in modules}
    for i in range(warmup + iters):
        for name, module in modules.items():
            t_f = timed_ms(functools.partial(fwd, module), x.device)
            t_fb = timed_ms(functools.partial(fwd_bwd, module), x.device)
            if i >= warmup:
                times[name][0].append(t_f)
                times[name][1].append(t_fb)
    return {name: (statistics.median(f), statistics.median(fb)) for name, (f, fb) in times.items()}


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"C={args.C} B={args.B} L={args.L} fp32, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"median of {args.iters}")
    print(f"{'device':<8}{'module':<26}{'fwd ms':>10}{'fwd+bwd ms':>12}")
    for name in devices:
        device = torch.device(name)
        torch.manual_seed(0)
        x = torch.randn(args.B, args.L, args.C, device=device)
        mamba = Mamba2(args.C, d_state=64, d_conv=4, expand=2, backend=args.backend).to(device)
        with torch.no_grad():
            mamba(x[:, :1])  # resolve the backend for the label
        label = f"Mamba2 ({mamba.active_backend})"
        ffn_label = f"FFN {args.C}-{4 * args.C}-{args.C}"
        res = bench({label: mamba, ffn_label: build_ffn(args.C).to(device)}, x, args.warmup, args.iters)
        for module_name, (t_f, t_fb) in res.items():
            print(f"{name:<8}{module_name:<26}{t_f:>10.1f}{t_fb:>12.1f}")
        (m_f, m_fb), (f_f, f_fb) = res[label], res[ffn_label]
        print(f"{name:<8}{'ratio Mamba2/FFN':<26}{m_f / f_f:>10.2f}{m_fb / f_fb:>12.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--C", type=int, default=1024, help="model width")
    parser.add_argument("--B", type=int, default=2, help="batch size")
    parser.add_argument("--L", type=int, default=680, help="sequence length (680 = 256 px schedule)")
    parser.add_argument("--devices", nargs="*", choices=["cpu", "cuda"], help="default: cpu, plus cuda if present")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "mamba_ssm"], help="Mamba2 backend")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(parser.parse_args())
