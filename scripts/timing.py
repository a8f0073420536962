"""What every benchmark section shares (scripts/bench.py): one timing rule, one memory probe, one table printer,
one set of flags, and the analytic per-block costs the sampling section reports.

Timing rule (`time_alternating`): in one process the variants take turns, one call each per round; the first
`warmup` rounds are not timed; each variant's time is the median of its `repeats` timed calls. Taking turns
spreads any change in machine load (other processes on a shared CPU) over all variants alike, so the ratios
hold even when the absolute times drift.
"""
import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from scripts.markdown import markdown_table  # noqa: F401 (the sections call bm.markdown_table)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MATMUL_SIDE = {"cpu": 2048, "cuda": 8192}  # square matmul timed as the practical peak (a GPU needs ~1 ms of work)
TIMING_RULE = "variants alternated over rounds in one process; median of {repeats} timed rounds after {warmup} warm-up"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every section reads: where, how long, at which precision, and where to write the tables."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cpu, + cuda if any")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the median counts)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="autocast dtype (q/k/v dtype for the "
                        "attention kernels; training: fp16 = GradScaler, bf16 = no scaler)")
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")


def devices(args: argparse.Namespace) -> list[torch.device]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    names = [args.device] if args.device != "auto" else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [torch.device(n) for n in names]


def preamble(args: argparse.Namespace) -> str:
    """One line naming torch, the threads, the timing rule and, on a loaded CPU, a warning."""
    line = (f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
            + TIMING_RULE.format(repeats=args.repeats, warmup=args.warmup) + ".")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2:
        line += (f" Load average {load:.1f} on {cores} cores at the start: absolute times are inflated, the ratios "
                 f"between variants timed in turn are what to read.")
    return line


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                     repeats: int) -> dict[str, float]:
    """Median milliseconds of each function under the module's timing rule."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats}, warmup={warmup}: expected repeats >= 1 and warmup >= 0")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 3) -> float:
    """Achieved GFLOP/s of an n x n x n matmul in `dtype` (median of `repeats` after one warm-up; n defaults to the
    device's MATMUL_SIDE): the practical peak that throughput is compared with."""
    n = n or MATMUL_SIDE[device.type]
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    ms = time_alternating({"mm": lambda: a @ b}, device, warmup=1, repeats=repeats)["mm"]
    return 2 * n**3 / (ms / 1e3) / 1e9


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory allocated by one call of `fn` above what was allocated before it: torch.cuda's peak on CUDA;
    on the CPU replayed from torch.profiler's allocator records (every allocation and free, in time order; an op's
    net memory at its start would read low inside custom autograd Functions, whose temporaries are freed within)."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision as in training (weights stay fp32); nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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


# ---------------------------------------------------------------------------------------------------------------
# Per-block costs of sampling (reported next to the times)
# ---------------------------------------------------------------------------------------------------------------
def count_block_tokens(mvar: nn.Module, use_cache: bool, cfg: float) -> dict[str, int]:
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


def attention_scores(mvar: nn.Module) -> int:
    """Query-key pairs per sequence and head in one `arch` block: within each scale (intra-scale) or against the
    KV cache (VAR)."""
    block = mvar.blocks[-1]
    if block.uses_kv_cache:
        return sum(n * end for n, (_, end) in zip(mvar.seg_lens, mvar.begin_ends, strict=True))
    return sum(n * n for n in mvar.seg_lens) if "attn" in block.branches else 0
