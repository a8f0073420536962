"""Runs the GPU kernels' Triton code on CPU tensors under Triton's interpreter and prints what it measured as JSON.

Our Mamba2 on mamba_ssm's kernels and our intra-scale attention on flash-attn's Triton varlen kernel, each against
the PyTorch path with the same weights: outputs, every gradient, carried state. `--plant` reruns with one
integration mistake planted at a kernel call, to show the comparison catches it.
Started by tests/test_triton_interpreter.py in a subprocess: TRITON_INTERPRET=1 (and for flash-attn
FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE) must be set before the kernels are imported, and the stubs below patch
torch.cuda process-wide. fp32 only: the interpreter has no bf16.
Usage: TRITON_INTERPRET=1 python tests/interpreter_worker.py [--mamba] [--attention] [--plants NAME ...]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import types
from collections.abc import Callable

import torch

import models.attention as attn
import models.mamba2 as m2

# The scales of a tiny pyramid, fed one at a time as M-VAR's cached inference does.
SEG_LENS = (1, 4, 9, 16)
# Mamba2 options exercised: M-VAR's own choice (mamba_ssm defaults) and every non-default option we expose.
MAMBA_CASES = {
    "mvar_defaults": {},
    "options": {"ngroups": 2, "D_has_hdim": True, "norm_before_gate": True, "dt_limit": (0.004, 0.05)},
    "no_rmsnorm": {"rmsnorm": False, "ngroups": 2},
}
# (case, options, scale by scale?): the stateful path does not depend on the gate, so no_rmsnorm runs once
MAMBA_RUNS = [(name, options, stateful) for name, options in MAMBA_CASES.items()
              for stateful in ((False,) if name == "no_rmsnorm" else (False, True))]
MAMBA_SIZE = {"d_model": 16, "d_state": 8, "headdim": 8, "chunk_size": 16}  # 4 heads, 2 chunks: ~1 s a pass
# ScaleAttention as M-VAR builds it (q/k L2-normalised, learned temperature) and VAR's plain 0.25/sqrt(c) scale.
ATTENTION_WIDTH, ATTENTION_HEADS = 32, 2  # head dim 16
ATTENTION_CASES = {"l2_norm": {"attn_l2_norm": True}, "plain_scale": {"attn_l2_norm": False}}


# ---------------------------------------------------------------------------------------------------------------
# Interpreter set-up: what a CUDA process has and a CPU one lacks
# ---------------------------------------------------------------------------------------------------------------
def stub_cuda_for_interpreter() -> None:
    """Let the kernels' launchers run on CPU tensors: no device switch, a fixed SM count, one autotune config."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 before starting this worker (triton reads it at import)")
    from triton.runtime import interpreter
    from triton.runtime.autotuner import Autotuner

    torch.cuda.device = lambda index: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(multi_processor_count=4)
    prune = Autotuner.prune_configs

    def cheapest_config(self, kwargs):  # benchmarking needs a GPU; configs differ only in rounding
        return [min(prune(self, kwargs), key=_block_elements)]

    Autotuner.prune_configs = cheapest_config
    # triton 3.2-3.4 still time a single pruned config (3.8 skips it), and timing asks for a GPU driver: nothing to
    # choose, so no timing
    Autotuner._bench = lambda self, *args, config, **meta: [0.0, 0.0, 0.0]
    # int overflow checks on every integer op: debug-only on a GPU, and half the interpreter's time
    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)
    # triton 3.6 (torch 2.11's, the GPU image's) reads a scalar's index as int() of its 1-element 1-d array, which
    # NumPy 2.4 and 2.5 refuse ("only 0-dimensional arrays ...") at the kernels' first loop; 3.8 squeezes it first
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is not None:
        def patch_tensor_index_squeezed(tensor, scope) -> None:
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        interpreter._patch_lang_tensor = patch_tensor_index_squeezed


def _block_elements(config) -> int:
    return math.prod(v for k, v in config.kwargs.items() if k.startswith("BLOCK"))


def let_cpu_tensors_reach_mamba_kernels() -> None:
    m2._is_kernel_device = lambda t: True  # the seam in models/mamba2.py


def let_cpu_tensors_reach_flash_attn() -> None:
    """flash-attn registers its ops for CUDA only: add its own Python implementation for CPU, lift our gate."""
    if os.environ.get("FLASH_ATTENTION_TRITON_AMD_ENABLE") != "TRUE":
        raise SystemExit("set FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE (flash-attn picks its Triton kernels at import)")
    import flash_attn.flash_attn_interface as fa

    for op in (fa._flash_attn_varlen_forward, fa._flash_attn_varlen_backward):
        op.register_kernel("cpu", op._init_fn)
    attn.backend_unavailable_reason = lambda *args, **kwargs: None  # our gate: CUDA and fp16/bf16 only


# ---------------------------------------------------------------------------------------------------------------
# Planted integration mistakes: each wraps a kernel entry point the way a wrong call in our code would
# ---------------------------------------------------------------------------------------------------------------
def _overriding(name: str, value) -> Callable:
    return lambda fn: lambda *a, **kw: fn(*a, **{**kw, name: value})


def _swap_B_C(fn: Callable) -> Callable:
    return lambda x, dt, A, B, C, *a, **kw: fn(x, dt, A, C, B, *a, **kw)


def _softplus_twice(fn: Callable) -> Callable:
    return lambda x, dt, *a, **kw: fn(x, torch.nn.functional.softplus(dt), *a, **kw)


def _A_log_for_A(fn: Callable) -> Callable:
    return lambda x, dt, A, *a, **kw: fn(x, dt, -torch.log(-A), *a, **kw)


def _norm_group_halved(fn: Callable) -> Callable:
    return lambda *a, **kw: fn(*a, **{**kw, "group_size": kw["group_size"] // 2})


def _one_sequence_per_sample(fn: Callable) -> Callable:
    """cu_seqlens over whole samples instead of over each scale of each sample."""
    def call(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        K = len(SEG_LENS)
        return fn(q, k, v, cu_q[::K], cu_k[::K], sum(SEG_LENS), sum(SEG_LENS), **kw)
    return call


PLANTS = {  # name -> (part, kernel, wrapper); kernel: a MambaKernels field or "varlen"
    "dt_bias_omitted": ("mamba", "chunk_scan", _overriding("dt_bias", None)),
    "softplus_twice": ("mamba", "chunk_scan", _softplus_twice),
    "A_log_for_A": ("mamba", "chunk_scan", _A_log_for_A),
    "B_C_swapped": ("mamba", "chunk_scan", _swap_B_C),
    "initial_state_dropped": ("mamba", "chunk_scan", _overriding("initial_states", None)),
    "D_omitted": ("mamba", "chunk_scan", _overriding("D", None)),
    "dt_limit_dropped": ("mamba", "chunk_scan", _overriding("dt_limit", (0.0, float("inf")))),
    "norm_group_halved": ("mamba", "rmsnorm_fn", _norm_group_halved),
    "attn_causal": ("attention", "varlen", _overriding("causal", True)),
    "attn_scale_dropped": ("attention", "varlen", _overriding("softmax_scale", None)),
    "attn_one_sequence_per_sample": ("attention", "varlen", _one_sequence_per_sample),
}


@contextlib.contextmanager
def planted(name: str):
    """Our code gets the real kernels with one integration mistake, for the duration of the block."""
    part, kernel, wrap = PLANTS[name]
    module, loader = (m2, "load_kernels") if part == "mamba" else (attn, "_flash_attn_varlen_func")
    real = getattr(module, loader)
    if part == "mamba":
        kernels, note = real()
        setattr(module, loader, lambda: (dataclasses.replace(kernels, **{kernel: wrap(getattr(kernels, kernel))}),
                                         f"{note}; planted {name}"))
    else:
        setattr(module, loader, lambda: wrap(real()))
    try:
        yield
    finally:
        setattr(module, loader, real)


# ---------------------------------------------------------------------------------------------------------------
# Comparisons: the kernel path against the PyTorch path, same weights and inputs
# ---------------------------------------------------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b is the reference)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def twins(make: Callable[[str], torch.nn.Module], backend: str, reference: str, randomise: Callable) -> tuple:
    """Two copies of a layer with identical (randomised) weights, one per backend."""
    torch.manual_seed(0)
    kernel = make(backend)
    with torch.no_grad():
        randomise(kernel)
    twin = copy.deepcopy(kernel)
    twin.backend = reference
    return kernel, twin


def results(layer: torch.nn.Module, x: torch.Tensor, call: Callable, backward: bool) -> dict[str, torch.Tensor]:
    """`call(layer, x)` -> (output, extra results); with `backward`, also the input and parameter gradients of a
    fixed random linear loss."""
    x = x.detach().clone().requires_grad_(backward)
    layer.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(backward):
        y, extra = call(layer, x)
    out = {"out": y.detach(), **extra}
    if backward:
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        out["grad:input"] = x.grad
        # a parameter the loss does not reach gets zeros, so it shows as an error of 1, not as a crash
        out.update({f"grad:{n}": torch.zeros_like(p) if p.grad is None else p.grad
                    for n, p in layer.named_parameters()})
    return out


def compare(pair: tuple, x: torch.Tensor, call: Callable, backward: bool) -> dict[str, float]:
    got, want = (results(layer, x, call, backward) for layer in pair)
    return {name: rel_err(got[name], ref) for name, ref in want.items()}


def mamba_call(stateful: bool) -> Callable:
    """Run Mamba2 over the whole sequence, or scale by scale carrying the conv and SSM state."""
    def call(layer: m2.Mamba2, u: torch.Tensor):
        if not stateful:
            y, extra = layer(u), {}
        else:
            state = layer.allocate_state(u.shape[0])
            y = torch.cat([layer(piece, state) for piece in u.split(SEG_LENS, dim=1)], dim=1)
            extra = {"ssm_state": state.ssm_state, "conv_state": state.conv_state}
        assert layer.active_backend == layer.backend, (layer.active_backend, layer.backend)
        return y, extra
    return call


def compare_mamba(options: dict, stateful: bool, backward: bool = True) -> dict[str, float]:
    def randomise(m: m2.Mamba2) -> None:  # D and the norm weight away from 1, so a misplaced one shows
        for p in (m.D, *([m.norm.weight] if m.rmsnorm else [])):
            p.uniform_(0.5, 1.5)

    pair = twins(lambda b: m2.Mamba2(**MAMBA_SIZE, **options, backend=b), "mamba_ssm", "torch", randomise)
    u = torch.randn(1, sum(SEG_LENS), MAMBA_SIZE["d_model"], generator=torch.Generator().manual_seed(2))
    return compare(pair, u, mamba_call(stateful), backward)


def attention_call(layer: attn.ScaleAttention, x: torch.Tensor):
    y = layer(x, SEG_LENS)
    assert layer.last_backend == layer.backend, (layer.last_backend, layer.backend)
    return y, {}


def compare_attention(options: dict, backward: bool = True) -> dict[str, float]:
    def randomise(a: attn.ScaleAttention) -> None:  # non-zero q/v biases
        a.q_bias.normal_(), a.v_bias.normal_()

    make = lambda b: attn.ScaleAttention(ATTENTION_WIDTH, ATTENTION_HEADS, **options, backend=b)  # noqa: E731
    pair = twins(make, "flash_attn", "sdpa", randomise)
    x = torch.randn(2, sum(SEG_LENS), ATTENTION_WIDTH, generator=torch.Generator().manual_seed(2))
    return compare(pair, x, attention_call, backward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mamba", action="store_true", help="Mamba2 on mamba_ssm's Triton kernels")
    parser.add_argument("--attention", action="store_true", help="intra-scale attention on flash-attn's Triton kernel")
    parser.add_argument("--plants", nargs="*", default=[], choices=sorted(PLANTS),
                        help="also run the forward pass with each of these integration mistakes planted")
    args = parser.parse_args()
    stub_cuda_for_interpreter()
    measured: dict[str, dict[str, float]] = {}
    if args.mamba:
        let_cpu_tensors_reach_mamba_kernels()
        for name, options, stateful in MAMBA_RUNS:
            measured[f"mamba2/{name}/{'scale_by_scale' if stateful else 'full'}"] = compare_mamba(options, stateful)
    if args.attention:
        let_cpu_tensors_reach_flash_attn()
        for name, options in ATTENTION_CASES.items():
            measured[f"attention/{name}"] = compare_attention(options)
    for name in args.plants:  # forward only, on the case where each option is in play
        with planted(name):
            measured[f"planted/{name}"] = compare_mamba(MAMBA_CASES["options"], stateful=True, backward=False) \
                if PLANTS[name][0] == "mamba" else compare_attention(ATTENTION_CASES["l2_norm"], backward=False)
    print(json.dumps({"mamba_kernels": m2.load_kernels()[1], "measured": measured}))


if __name__ == "__main__":
    main()
