"""Low-precision inference: which autocast dtype really runs on a device, and Linear weights held in it.

Under plain `torch.autocast` every `F.linear` casts its fp32 weight to the low dtype on every call (outside
inference mode there is a cache, but sampling runs under `torch.inference_mode`, where there is none).
`linear_weights_in(module, dtype)` casts the weights and biases of the module's `nn.Linear` layers once and puts
the fp32 tensors back on exit. Inside autocast a weight already in the autocast dtype is used as is, so the
numbers are exactly those of autocast with fp32 weights; only the per-call casts are gone.

bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX-BF16) is emulated and slower than fp32:
`effective_amp_dtype` then falls back to fp32 with one log line.
"""
import contextlib
import functools
import logging
from collections.abc import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of the x86 bf16 dot-product instructions


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The `CPU_BF16_FLAGS` this CPU has: read from /proc/cpuinfo; elsewhere, torch's "AMX" capability level."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ("amx_bf16",) if "AMX" in torch.backends.cpu.get_cpu_capability() else ()
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)


def effective_amp_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype | None:
    """`dtype` (None = fp32), or None where bf16 is asked on a CPU without bf16 instructions (logged once)."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_bf16_flags():
        _log_fallback(torch.backends.cpu.get_cpu_capability())
        return None
    return dtype


@functools.cache
def _log_fallback(capability: str) -> None:
    logger.warning("bf16 requested but this CPU (torch capability %s) has neither of %s: bf16 would be emulated "
                   "and slower, running in fp32", capability, "/".join(CPU_BF16_FLAGS))


@contextlib.contextmanager
def linear_weights_in(module: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Hold the weights and biases of every `nn.Linear` in `module` in `dtype` (None: leave them) and restore the
    original tensors on exit. Meant for inference under autocast to the same dtype (no gradients flow)."""
    if dtype is None:
        yield
        return
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    with torch.inference_mode(False), torch.no_grad():  # plain tensors: they outlive any inference-mode caller
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                for p in (layer.weight, layer.bias):
                    if p is not None and p.dtype != dtype:
                        saved.append((p, p.data))
                        p.data = p.data.to(dtype)
    try:
        yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for p, original in saved:
                p.data = original
