"""Scale-wise attention: M-VAR's intra-scale attention and VAR's block-causal global attention, with kernel backends.

`ScaleAttention` is the attention of every block (VAR's parameter names, so VAR / M-VAR checkpoints load).
mode "intra": bidirectional attention restricted to the tokens of each scale (M-VAR); cost sum(pn^4) per sample.
mode "causal": VAR's global attention, full within a scale and causal across scales; cost L^2 per sample.

The intra-scale kernel has interchangeable backends giving the same numbers (`intra_scale_attention`):
    flash_attn    `flash_attn.flash_attn_varlen_func` (CUDA, fp16/bf16; every scale of every sample is a sequence)
    torch_varlen  `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16, no attention dropout)
    sdpa          `F.scaled_dot_product_attention` per scale, small scales packed into one call (anywhere)
    auto          the first of the above that can run (env var MVAR_ATTN_BACKEND overrides the choice)
Resolution, its env var and its error type are shared with Mamba2: `models.backends`.

Shape legend: B batch, L tokens of the scales present (680 for all scales at 256 px), l tokens of one scale
(pn*pn), H heads, c head dim, C = H*c, K number of scales, T = B*L packed tokens.
"""
import functools
import inspect
import itertools
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import torch_features, triton_autotune
from models.backends import ATTN, BackendError, check_name, resolve

logger = logging.getLogger(__name__)

MODES = ("intra", "causal")
# sdpa backend: consecutive scales are packed into one masked call while their total stays within this many
# tokens (1+4+9+16+25+36 = 91 at 256 px). One call per scale costs more in launches than the few wasted scores.
SDPA_PACK_TOKENS = 128
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Kernel loading and backend resolution
# ---------------------------------------------------------------------------------------------------------------
@functools.cache
def _flash_attn_varlen_func() -> Callable | None:
    """`flash_attn.flash_attn_varlen_func`, or None when flash-attn is not installed or does not import."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception as e:  # ImportError, or an OSError/RuntimeError from a wheel built for another torch/CUDA
        logger.debug("flash_attn unavailable: %s", e)
        return None
    triton_autotune.compile_configs_in_parallel("flash_attn")  # its Triton build's autotuners, if any
    return flash_attn_varlen_func


def _flash_attn_is_rocm_triton() -> bool:
    """Whether the flash_attn that imported is its Triton build for AMD GPUs (chosen by an env var at import)."""
    return bool(getattr(sys.modules.get("flash_attn.flash_attn_interface"), "USE_TRITON_ROCM", False))


@functools.cache
def _torch_varlen_attn() -> Callable | None:
    """`torch.nn.attention.varlen.varlen_attn`, or None on a torch without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _varlen_attn_takes_scale(fn: Callable) -> bool:
    try:
        return "scale" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


FLASH_MAX_HEAD_DIM = 256  # flash-attn 2's and torch's flash kernel's largest head dimension


@functools.cache  # resolve_backend asks it at every attention call
def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The GPU's compute capability; None off CUDA (or where CUDA is absent: tests pretend with a "cuda" device)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" and torch.cuda.is_available() else None


def backend_unavailable_reason(
    backend: str, device: torch.device, dtype: torch.dtype, dropout_p: float = 0.0, head_dim: int | None = None,
    capability: tuple[int, int] | None = None,
) -> str | None:
    """Why `backend` cannot run intra-scale attention on tensors of this device/dtype/head size (None: it can);
    `capability`: the GPU's compute capability, looked up from `device` when not given."""
    if backend == "sdpa":
        return None
    if backend not in ATTN.kernels:
        raise BackendError(f"attention kernel {backend!r}: expected one of {ATTN.kernels}")
    if device.type != "cuda":
        return f"{backend} needs CUDA tensors, got device {device.type!r}"
    if dtype not in _HALF_DTYPES:
        return f"{backend} needs float16/bfloat16 q/k/v (train with --fp16=1 or 2), got {dtype}"
    capability = capability or _cuda_capability(device)  # both are flash attention (torch_varlen: torch's, or cuDNN's)
    if capability is not None and capability < (8, 0):
        return f"{backend} needs a GPU of compute capability 8.0 or newer (Ampere), this one has " \
               f"{capability[0]}.{capability[1]}"
    if head_dim is not None and head_dim > FLASH_MAX_HEAD_DIM:
        return f"{backend} takes heads of at most {FLASH_MAX_HEAD_DIM} channels, these have {head_dim} (more heads)"
    if backend == "flash_attn":
        if _flash_attn_varlen_func() is None:
            return "flash_attn is not importable (pip install flash-attn --no-build-isolation)"
        if _flash_attn_is_rocm_triton() and torch.version.hip is None:
            return ("flash_attn is its ROCm Triton build (FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE), whose kernels do "
                    "not compile for NVIDIA GPUs (AMD-only options such as waves_per_eu); install its CUDA build")
    if backend == "torch_varlen":
        if _torch_varlen_attn() is None:
            return torch_features.missing("varlen_attn") or "torch.nn.attention.varlen.varlen_attn did not import"
        if dropout_p > 0:
            return "torch_varlen has no attention dropout (attn_drop_rate must be 0)"
        if torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled():
            return ("torch_varlen's backward (torch's flash attention) adds with atomics unless torch's deterministic "
                    "mode is strict, and --deterministic runs it with warn_only: use flash_attn or sdpa")
    return None


@torch.compiler.assume_constant_result  # torch.compile runs it, eagerly, when tracing: logging cannot be traced
def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, dropout_p: float = 0.0,
                    head_dim: int | None = None) -> str:
    """The backend that will run: `backend`, or for "auto" $MVAR_ATTN_BACKEND or the fastest available one.

    A forced backend that cannot run raises a `BackendError` saying why. Each resolution is logged once. Under
    torch.compile its arguments must be constants (`head_dim` from the module, not a possibly symbolic shape). The
    kernel's function is looked up here too, into `_resolved` (the lookups import and log: not traceable).
    """
    env_value = os.environ.get(ATTN.env, "") if check_name(ATTN, backend) == "auto" else ""  # part of the cache key
    warn_only_deterministic = torch.are_deterministic_algorithms_enabled() and \
        torch.is_deterministic_algorithms_warn_only_enabled()
    name = _resolve(backend, env_value, device.type, _cuda_capability(device), dtype, dropout_p > 0,
                    warn_only_deterministic, head_dim)
    if name == "flash_attn":
        _resolved[name] = _flash_attn_varlen_func()
    elif name == "torch_varlen":
        fn = _torch_varlen_attn()
        _resolved[name] = fn, _varlen_attn_takes_scale(fn)
    return name


_resolved: dict[str, Any] = {}  # the varlen kernels' functions, as resolve_backend found them (read when traced)


@functools.cache
def _resolve(backend: str, env_value: str, device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype,
             with_dropout: bool, deterministic: bool, head_dim: int | None) -> str:
    device, dropout_p = torch.device(device_type), 1.0 if with_dropout else 0.0
    return resolve(ATTN, backend,
                   lambda n: backend_unavailable_reason(n, device, dtype, dropout_p, head_dim, capability),
                   f"{device_type}, {dtype}")


# ---------------------------------------------------------------------------------------------------------------
# Kernels; q/k/v are (B, L, H, c), outputs (B, L, H, c)
# ---------------------------------------------------------------------------------------------------------------
def _cached_when_eager(maxsize: int) -> Callable[[Callable], Callable]:
    """functools.lru_cache for eager calls; torch.compile traces the function itself (it would skip the cache,
    warning of "potential silent incorrectness" for these pure functions of ints, a device and a dtype)."""
    def decorate(fn: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            return fn(*args) if torch.compiler.is_compiling() else cached(*args)
        return call
    return decorate


def _scale_of_each_token(seg_lens: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int64 (L,): the scale index of each token. The masks and offsets here are made from Python ints on their
    device: no CPU tensor copied in and no data-dependent op (repeat_interleave), which under torch.compile would
    sync with the GPU at every forward."""
    return torch.tensor([si for si, n in enumerate(seg_lens) for _ in range(n)], device=device)


@_cached_when_eager(maxsize=64)
def _cu_seqlens(seg_lens: tuple[int, ...], batch_size: int, device: torch.device) -> torch.Tensor:
    """int32 (B*K+1,) start offsets of every scale of every sample in the packed (B*L) token axis."""
    return torch.tensor([0, *itertools.accumulate(seg_lens * batch_size)], dtype=torch.int32, device=device)


def _intra_flash_attn(q, k, v, seg_lens, softmax_scale, dropout_p):
    """flash-attn varlen: one sequence per (sample, scale). Not yet run on GPU; run on CPU by flash-attn's Triton
    implementation under Triton's interpreter (tests/test_triton_interpreter.py)."""
    B, L, H, c = q.shape
    cu = _cu_seqlens(seg_lens, B, q.device)
    max_l = max(seg_lens)
    o_THc = _resolved["flash_attn"](
        q.reshape(B * L, H, c), k.reshape(B * L, H, c), v.reshape(B * L, H, c), cu, cu, max_l, max_l,
        dropout_p=dropout_p, softmax_scale=softmax_scale, deterministic=torch.are_deterministic_algorithms_enabled(),
    )
    return o_THc.view(B, L, H, c)


def _intra_torch_varlen(q, k, v, seg_lens, softmax_scale, dropout_p):
    """torch varlen_attn, packed as for flash-attn. The seven tensor/length arguments go by position (their
    keywords changed between torch releases); `scale` by keyword where the installed torch takes it (2.14 does),
    else it is folded into q (the default scale is 1/sqrt(c)). Attention dropout is refused at resolution.
    Not yet run on GPU (dispatch tested on CPU).
    """
    B, L, H, c = q.shape
    cu = _cu_seqlens(seg_lens, B, q.device)
    max_l = max(seg_lens)
    fn, takes_scale = _resolved["torch_varlen"]
    q_THc, k_THc, v_THc = q.reshape(B * L, H, c), k.reshape(B * L, H, c), v.reshape(B * L, H, c)
    if takes_scale:
        o_THc = fn(q_THc, k_THc, v_THc, cu, cu, max_l, max_l, scale=softmax_scale)
    else:
        o_THc = fn(q_THc * (softmax_scale * math.sqrt(c)), k_THc, v_THc, cu, cu, max_l, max_l)
    return o_THc.view(B, L, H, c)


@_cached_when_eager(maxsize=64)
def _pack_groups(seg_lens: tuple[int, ...]) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
    """Consecutive scales packed while their total is <= SDPA_PACK_TOKENS: (start, end, lens) per group."""
    groups, start, lens = [], 0, []
    for n in seg_lens:
        if lens and sum(lens) + n > SDPA_PACK_TOKENS:
            groups.append((start, start + sum(lens), tuple(lens)))
            start, lens = start + sum(lens), []
        lens.append(n)
    groups.append((start, start + sum(lens), tuple(lens)))
    return tuple(groups)


@_cached_when_eager(maxsize=64)
def _block_diagonal_mask(lens: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """bool (l, l), True where query and key are in the same scale."""
    lvl = _scale_of_each_token(lens, device)
    return lvl[:, None] == lvl[None, :]


def _intra_sdpa(q, k, v, seg_lens, softmax_scale, dropout_p):
    """SDPA per scale ((B, H, l, c) each, no mask), the small scales packed into one block-diagonal call."""
    q_BHLc, k_BHLc, v_BHLc = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    outs = []
    for s, e, lens in _pack_groups(seg_lens):
        mask = _block_diagonal_mask(lens, q.device) if len(lens) > 1 else None
        outs.append(F.scaled_dot_product_attention(
            q_BHLc[:, :, s:e], k_BHLc[:, :, s:e], v_BHLc[:, :, s:e], attn_mask=mask, dropout_p=dropout_p,
            scale=softmax_scale,
        ))
    o_BHLc = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return o_BHLc.transpose(1, 2)


_INTRA_KERNELS = {"flash_attn": _intra_flash_attn, "torch_varlen": _intra_torch_varlen, "sdpa": _intra_sdpa}


def _check_segments(q: torch.Tensor, seg_lens: Sequence[int]) -> tuple[int, ...]:
    seg_lens = tuple(int(n) for n in seg_lens)
    if sum(seg_lens) != q.shape[1] or min(seg_lens, default=0) < 1:
        raise ValueError(f"seg_lens={seg_lens} must be positive and sum to the sequence length {q.shape[1]}")
    return seg_lens


def intra_scale_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_lens: Sequence[int], softmax_scale: float,
    dropout_p: float = 0.0, backend: str = "auto",
) -> torch.Tensor:
    """Bidirectional attention within each scale: token i of scale s attends to the tokens of scale s only.

    q/k/v (B, L, H, c) with L = sum(seg_lens); returns (B, L, H, c). `backend` as in the module docstring.
    """
    seg_lens = _check_segments(q, seg_lens)
    name = resolve_backend(backend, q.device, q.dtype, dropout_p, q.shape[-1])
    return _INTRA_KERNELS[name](q, k, v, seg_lens, softmax_scale, dropout_p)


@_cached_when_eager(maxsize=16)
def block_causal_mask(seg_lens: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive (L, L) mask: 0 where the key's scale is <= the query's scale, -inf elsewhere (VAR's mask)."""
    lvl = _scale_of_each_token(seg_lens, device)
    allowed = lvl[None, :] <= lvl[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def block_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_lens: Sequence[int], softmax_scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """VAR's global attention: SDPA over all L tokens with the block-causal mask. q/k/v/out (B, L, H, c)."""
    seg_lens = _check_segments(q, seg_lens)
    mask_LL = block_causal_mask(seg_lens, q.device, q.dtype)
    o_BHLc = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask_LL, dropout_p=dropout_p,
        scale=softmax_scale,
    )
    return o_BHLc.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------------------
class ScaleAttention(nn.Module):
    """Multi-head self-attention over a multi-scale token sequence (VAR's parameter names and init).

    With `attn_l2_norm`, q and k are L2-normalised per head and q is multiplied by exp(min(scale_mul_1H11, log 100))
    (a learned per-head temperature, init 4), softmax scale 1; otherwise the softmax scale is 0.25/sqrt(c).
    `backend` picks the intra-scale kernel; mode "causal" always runs SDPA with the block-causal mask (as VAR's
    training path), and with `kv_caching(True)` attends from the current scale to every cached token.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, attn_l2_norm: bool = True, attn_drop: float = 0.0,
        proj_drop: float = 0.0, mode: str = "intra", backend: str = "auto",
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if mode not in MODES:
            raise ValueError(f"attention mode {mode!r}: expected one of {MODES}")
        check_name(ATTN, backend)
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.mode, self.backend, self.attn_l2_norm = mode, backend, attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(embed_dim)), nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop
        self.caching, self.cached_k, self.cached_v = False, None, None  # causal-mode sampling only
        self.last_backend: str | None = None

    def kv_caching(self, enable: bool) -> None:
        """Causal mode: start (or stop) caching k/v across calls for sampling; either way the cache is emptied."""
        if enable and self.mode != "causal":
            raise ValueError("kv_caching is for mode='causal'; intra-scale attention needs no cache")
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x_BLC: torch.Tensor, seg_lens: Sequence[int]) -> torch.Tensor:
        """`seg_lens`: token count (pn*pn) of each scale in `x_BLC`, summing to L."""
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)  # (B, L, H, c) each
        if self.attn_l2_norm:
            scale_mul_11H1 = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp().transpose(1, 2)
            q = F.normalize(q, dim=-1).mul(scale_mul_11H1).to(qkv.dtype)
            k = F.normalize(k, dim=-1).to(qkv.dtype)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.mode == "intra":
            name = resolve_backend(self.backend, q.device, q.dtype, dropout_p, self.head_dim)
            if not torch.compiler.is_compiling():  # dynamo takes no module write inside checkpoint's region
                self.last_backend = name
            kernel = _INTRA_KERNELS[name]
            o = kernel(q, k, v, _check_segments(q, seg_lens), self.scale, dropout_p)
        elif self.caching:  # sampling: this call's scale attends to every cached token (all earlier scales)
            self.cached_k = k if self.cached_k is None else torch.cat((self.cached_k, k), dim=1)
            self.cached_v = v if self.cached_v is None else torch.cat((self.cached_v, v), dim=1)
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), self.cached_k.transpose(1, 2), self.cached_v.transpose(1, 2),
                dropout_p=dropout_p, scale=self.scale,
            ).transpose(1, 2)
        else:
            o = block_causal_attention(q, k, v, seg_lens, self.scale, dropout_p)
        return self.proj_drop(self.proj(o.reshape(B, L, C)))

    def extra_repr(self) -> str:
        kernel = "block-causal sdpa" if self.mode == "causal" else f"{self.backend} (last run: {self.last_backend})"
        return (f"mode={self.mode}, heads={self.num_heads}, attn_l2_norm={self.attn_l2_norm}, kernel={kernel}, "
                f"attn_drop={self.attn_drop:g}")
