"""Low-precision inference: which autocast dtype really runs on a device, and Linear weights held in it.

Under plain `torch.autocast` every `F.linear` casts its fp32 weight to the low dtype on every call (outside
inference mode there is a cache, but sampling runs under `torch.inference_mode`, where there is none).
`linear_weights_in(module, dtype)` casts the weights and biases of the module's `nn.Linear` layers once and puts
the fp32 tensors back on exit. Inside autocast a weight already in the autocast dtype is used as is, so the
numbers are exactly those of autocast with fp32 weights; only the per-call casts are gone.

bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX-BF16) is emulated and slower than fp32:
`effective_amp_dtype` then falls back to fp32 with one log line. `MVAR_CPU_BF16=1` keeps bf16 on such a CPU
(emulated: slower, same numerics; the tests use it so that bf16 is tested on every CPU), `MVAR_CPU_BF16=0` falls
back on every CPU; unset (or `auto`), the CPU's flags decide.
"""
import contextlib
import functools
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of the x86 bf16 dot-product instructions
CPU_BF16_ENV = "MVAR_CPU_BF16"  # 1: bf16 on any CPU (emulated without the flags), 0: fp32 on every CPU, auto: flags
AMP_DTYPES = {0: None, 1: torch.float16, 2: torch.bfloat16}  # the trainers' --fp16: 0 fp32, 1 fp16, 2 bf16


@functools.cache
def cpu_info() -> dict[str, str] | None:
    """The first processor's entries of /proc/cpuinfo ("model name", "flags", ...), or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    entries = (line.split(":", 1) for line in text.split("\n\n", 1)[0].splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in entries}


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The `CPU_BF16_FLAGS` this CPU has: read from /proc/cpuinfo; elsewhere, torch's "AMX" capability level."""
    info = cpu_info()
    if info is None:
        return ("amx_bf16",) if "AMX" in torch.backends.cpu.get_cpu_capability() else ()
    flags = info.get("flags", "").split()
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)


def cpu_runs_bf16() -> bool:
    """Whether bf16 asked on the CPU runs in bf16: `MVAR_CPU_BF16` (1 / 0), else (auto) the CPU's bf16 flags."""
    mode = os.environ.get(CPU_BF16_ENV, "auto").strip().lower()
    if mode not in ("1", "0", "auto", ""):
        raise ValueError(f"{CPU_BF16_ENV}={mode!r}: expected 1 (bf16 on any CPU, emulated where it has no bf16 "
                         f"instructions), 0 (fp32 instead of bf16 on every CPU) or auto (by the CPU's flags)")
    return mode == "1" if mode in ("1", "0") else bool(cpu_bf16_flags())


def effective_amp_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype | None:
    """`dtype` (None = fp32), or None where bf16 is asked on a CPU that does not run it (`cpu_runs_bf16`; logged
    once)."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_runs_bf16():
        _log_fallback(torch.backends.cpu.get_cpu_capability())
        return None
    return dtype


def amp_autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """`torch.autocast` to `dtype` on `device` (an `effective_amp_dtype`), or nothing for None (fp32)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@functools.cache
def _log_fallback(capability: str) -> None:
    logger.warning("bf16 requested but this CPU (torch capability %s) has neither of %s (or %s=0): bf16 would be "
                   "emulated and slower, running in fp32 (%s=1 keeps bf16)", capability, "/".join(CPU_BF16_FLAGS),
                   CPU_BF16_ENV, CPU_BF16_ENV)


@contextlib.contextmanager
def linear_weights_in(module: nn.Module, dtype: torch.dtype | None, keep: tuple[nn.Module, ...] = ()
                      ) -> Iterator[None]:
    """Hold the weights and biases of every `nn.Linear` in `module` but those in `keep` in `dtype` (None: leave
    them) and restore the original tensors on exit, also when casting fails half-way. Meant for inference under
    autocast to the same dtype (no gradients flow); `keep`: layers also called with autocast off."""
    if dtype is None:
        yield
        return
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: they outlive any inference-mode caller
            for layer in module.modules():
                if isinstance(layer, nn.Linear) and not any(layer is k for k in keep):
                    for p in (layer.weight, layer.bias):
                        if p is not None and p.dtype != dtype:
                            saved.append((p, p.data))
                            p.data = p.data.to(dtype)
        yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for p, original in saved:
                p.data = original


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TensorFloat32 for CUDA's matmuls and cuDNN's convolutions (the --tf32 flags of train.py, sample.py and
    scripts/extract_tokens.py); on other devices nothing changes."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
