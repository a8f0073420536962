"""The `cpu_fused` Mamba2 backend: C kernels for the layer's causal conv + SiLU and its gated RMSNorm.

The PyTorch path (models/mamba2.py) runs each of these as several elementwise passes over memory; the kernels in
`mamba2_cpu.c` make one pass over each row, forward and backward, with the same maths (tests compare them with the
PyTorch Functions, outputs and every gradient). They are compiled on first use (about a second) with the system C
compiler ($CC, else the first of cc, gcc, clang on PATH; `CFLAGS`: vectorised for this CPU, FP exceptions and
errno ignored, no other change to float semantics) into $MVAR_KERNEL_CACHE (default ~/.cache/mvar/kernels), keyed
by the source, the compiler and the CPU's flags, and loaded with ctypes. They run on torch.get_num_threads()
OpenMP threads when the compiler has OpenMP: the library asks for libgomp.so.1, which resolves to the one torch
already loaded, so both share one thread pool. Without a compiler the backend is unavailable and "auto" falls back
to the PyTorch path (logged once). CPU tensors with float32 or bfloat16 activations (fp32 training, bf16 autocast)
and float32 weights; fp16 activations take the PyTorch Functions even when this backend is chosen.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("mamba2_cpu.c")
CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-shared", "-fPIC",
          "-std=c11")

_i64, _int, _float, _ptr = ctypes.c_longlong, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
SIGNATURES = {
    "conv_silu_fwd": (_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _int, _ptr, _int),
    "conv_silu_bwd": (_ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _int, _ptr, _ptr, _ptr, _int),
    "gated_norm_fwd": (_ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _float, _int, _ptr, _ptr, _int),
    "gated_norm_bwd": (_ptr, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _int, _ptr, _ptr, _ptr, _int),
}
ACTIVATION_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}  # the kernels' suffix per activation dtype


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compile(cc: str, out: Path) -> None:
    """Compile SOURCE into `out` (atomically: concurrent processes may build the same file), with OpenMP if the
    compiler has it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        for extra in (("-fopenmp",), ()):
            cmd = [cc, *CFLAGS, *extra, str(SOURCE), "-o", str(so), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(so, out)
                return
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")


@functools.cache
def load() -> tuple[ctypes.CDLL | None, str]:
    """(the compiled library or None, a note saying what happened), built once per process."""
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), "cc")
    if shutil.which(cc) is None:
        return None, f"no C compiler ({cc!r} not on PATH; set $CC)"
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(CFLAGS), _cpu_flags()]).encode())
    cache = Path(os.environ.get("MVAR_KERNEL_CACHE", Path.home() / ".cache" / "mvar" / "kernels"))
    path = cache / f"mamba2_cpu-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            _compile(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as err:
        return None, f"could not build {SOURCE.name}: {err}"
    for name, argtypes in SIGNATURES.items():
        for suffix in ACTIVATION_DTYPES.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, None
    return lib, f"C kernels {path}"


def available() -> str | None:
    """None if the kernels load, else why not."""
    lib, note = load()
    return None if lib is not None else note


def fits(activations: torch.Tensor, *float32: torch.Tensor | None) -> bool:
    """Whether the kernels take these CPU tensors, all with unit stride along channels: `activations` float32 or
    bfloat16, the others (weights, the norm's input) float32 or None."""
    return activations.dtype in ACTIVATION_DTYPES and all(
        t is None or t.dtype == torch.float32 for t in float32) and all(
        t is None or (t.device.type == "cpu" and t.stride(-1) == 1) for t in (activations, *float32))


def _kernel(name: str, activations: torch.Tensor):
    """The compiled kernel `name` for the dtype of `activations`."""
    return getattr(load()[0], f"{name}_{ACTIVATION_DTYPES[activations.dtype]}")


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(t, row stride) such that row r of t's leading dims starts at r * stride: t itself when its rows are evenly
    spaced (a split view of in_proj's output is), else a contiguous copy."""
    if t.dim() == 3 and t.stride(0) != t.shape[1] * t.stride(1):
        t = t.contiguous()
    return t, t.stride(-2)


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CausalConvSiLU(torch.autograd.Function):
    """silu(depthwise causal conv1d + bias) over (B, l, Dc), as models.mamba2._CausalConvSiLU, in C."""

    @staticmethod
    def forward(ctx, x_BlD, w_DK, bias_D):
        x_BlD, sx = _rows(x_BlD)
        (Bsz, n, D), K = x_BlD.shape, w_DK.shape[1]
        w_KD = w_DK.t().contiguous()
        y = torch.empty(Bsz, n, D, dtype=x_BlD.dtype)
        _kernel("conv_silu_fwd", x_BlD)(_p(x_BlD), sx, Bsz, n, D, _p(w_KD), _p(bias_D), K, _p(y),
                                        torch.get_num_threads())
        ctx.save_for_backward(x_BlD, w_KD, bias_D)  # the backward recomputes the pre-activation from x
        return y

    @staticmethod
    def backward(ctx, dy_BlD):
        x_BlD, w_KD, bias_D = ctx.saved_tensors
        (Bsz, n, D), K = x_BlD.shape, w_KD.shape[0]
        dy = dy_BlD.to(x_BlD.dtype).contiguous()
        dx, dw_KD = torch.empty(Bsz, n, D, dtype=x_BlD.dtype), torch.empty(K, D)
        dbias = None if bias_D is None else torch.empty(D)
        _kernel("conv_silu_bwd", x_BlD)(_p(dy), _p(x_BlD), x_BlD.stride(-2), Bsz, n, D, _p(w_KD), _p(bias_D), K,
                                        _p(dx), _p(dw_KD), _p(dbias), torch.get_num_threads())
        return dx, dw_KD.t(), dbias


class GatedRMSNorm(torch.autograd.Function):
    """models.mamba2._GatedRMSNorm in C: RMSNorm over groups of `group_size` channels gated by silu(z)."""

    @staticmethod
    def forward(ctx, y, z, weight, eps, group_size, norm_before_gate):
        y, sy = _rows(y)
        z, sz = _rows(z)
        D = y.shape[-1]
        R = y.numel() // D
        out = torch.empty(y.shape, dtype=z.dtype)  # the activations' dtype, as the PyTorch Function returns
        rstd = torch.empty(R, D // group_size)
        _kernel("gated_norm_fwd", z)(_p(y), sy, _p(z), sz, _p(weight), R, D, group_size, eps, int(norm_before_gate),
                                     _p(out), _p(rstd), torch.get_num_threads())
        ctx.save_for_backward(y, z, weight, rstd)
        ctx.group_size, ctx.norm_before_gate = group_size, norm_before_gate
        return out

    @staticmethod
    def backward(ctx, dout):
        y, z, weight, rstd = ctx.saved_tensors
        D = y.shape[-1]
        R = y.numel() // D
        dout = dout.to(z.dtype).contiguous()
        dy, dz, dw = torch.empty(y.shape), torch.empty(y.shape, dtype=z.dtype), torch.empty(D)
        _kernel("gated_norm_bwd", z)(_p(dout), _p(y), y.stride(-2), _p(z), z.stride(-2), _p(weight), _p(rstd), R, D,
                                     ctx.group_size, int(ctx.norm_before_gate), _p(dy), _p(dz), _p(dw),
                                     torch.get_num_threads())
        return dy, dz, dw, None, None, None
