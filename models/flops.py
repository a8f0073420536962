"""Model FLOPs, counted one way for every report: bench.py's tables and the study's cost axes.

Counted, whatever the kernels: every matrix product with a weight (aten mm/addmm as torch's FlopCounterMode sees
them, backward included in a training step, and the bmm a Linear layer runs on a non-contiguous input); the
attention scores, 4*C per query-key pair (q.k and the weighted sum of v) for the pairs the reference kernels
compute: all L*L of VAR's masked dense training attention (its block-causal mask keeps 63% of them at 155 tokens,
62% at 680), the cached keys in sampling, each scale's own pairs for intra-scale attention; and each Mamba2 layer's
sequence mixing, per token: the scan as its recurrence computes it, 4*d_inner*d_state (state update and read-out;
the chunked algorithm the kernels run does more, by an amount that depends on the chunk size), and the depthwise
causal convolution, 2*d_conv*conv_dim. Attention and Mamba2 mixing count three times in a training step (the
backward costs twice the forward). Not counted: norms, activations, the loss and sampling's filtering.
"""
from collections.abc import Callable

import torch
from torch import nn

COUNT_VERSION = 2  # raised when what is counted changes (2: Mamba2 mixing, and a Linear run as bmm); reports that
# keep FLOP numbers record it, so that numbers of two counts are never mixed


def mamba_mixing_flops_per_token(mamba: nn.Module) -> int:
    """A Mamba2 layer's forward FLOPs per token outside its projections: the scan's recurrence (h = a*h + dt*x*B^T
    and y = C.h, 4*d_inner*d_state) and the depthwise causal convolution (2*d_conv*conv_dim)."""
    return 4 * mamba.d_inner * mamba.d_state + 2 * mamba.d_conv * mamba.conv_dim


def model_flops(mvar: nn.Module, run: Callable[[], object], passes: int = 1) -> float:
    """Model FLOPs of one call of `run` (see the module's docstring): the linear layers as torch's FlopCounterMode
    counts them (backward included when `run` is a training step), plus the attention scores and the Mamba2 mixing
    counted by hand, times `passes` (3 for a training step)."""
    from torch.utils.flop_counter import FlopCounterMode

    hand = 0  # attention scores and Mamba2 mixing, forward
    linear_bmm = 0  # a Linear on a non-contiguous input runs as aten.bmm, which the mm/addmm rule does not see
    bmm_before: list[int] = []

    def count_pairs(module, args, _out):
        nonlocal hand
        B, L, C = args[0].shape
        keys = module.cached_k.shape[1] if module.caching else None
        pairs = L * keys if keys is not None else (
            sum(n * n for n in args[1]) if module.mode == "intra" else L * L)  # mode "causal" without cache: masked
        hand += 4 * C * B * pairs

    def count_mixing(module, args, _out):
        nonlocal hand
        hand += args[0].shape[0] * args[0].shape[1] * mamba_mixing_flops_per_token(module)

    def bmm_so_far() -> int:
        return sum(n for op, n in counter.get_flop_counts().get("Global", {}).items() if str(op) == "aten.bmm")

    def linear_start(_module, _args):
        bmm_before.append(bmm_so_far())

    def linear_end(_module, _args, _out):
        nonlocal linear_bmm
        linear_bmm += bmm_so_far() - bmm_before.pop()

    hooks = []
    for m in mvar.modules():
        if type(m).__name__ == "ScaleAttention":
            hooks.append(m.register_forward_hook(count_pairs))
        elif type(m).__name__ == "Mamba2":
            hooks.append(m.register_forward_hook(count_mixing))
        elif isinstance(m, nn.Linear):
            hooks += [m.register_forward_pre_hook(linear_start), m.register_forward_hook(linear_end)]
    try:
        with FlopCounterMode(display=False) as counter:
            run()
    finally:
        for h in hooks:
            h.remove()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0) + linear_bmm + passes * hand


def train_step_flops(mvar: nn.Module, label_B: torch.Tensor, x_BLCv: torch.Tensor) -> float:
    """Model FLOPs of one training step on this batch: the forward pass and the backward of a scalar loss (input
    and weight gradients; the first layer's input needs none), attention and Mamba2 mixing counted three times.
    Activation checkpointing is off for the count (its recomputation is not model FLOPs, and would run the hooks
    twice), and Mamba2 runs its PyTorch path: the same count (the mixing is counted by hand), without compiling and
    autotuning a GPU kernel's fp32 variants for a count alone. Gradients are cleared afterwards; the optimizer and
    the loss add no model FLOPs."""
    def step() -> None:
        mvar(label_B, x_BLCv).float().logsumexp(dim=-1).mean().backward()

    grad_ckpt = getattr(mvar, "grad_ckpt", False)
    mambas = [m for m in mvar.modules() if type(m).__name__ == "Mamba2"]
    backends = [m.backend for m in mambas]
    mvar.grad_ckpt = False
    for m in mambas:
        m.backend = "torch"
    try:
        return model_flops(mvar, step, passes=3)
    finally:
        mvar.grad_ckpt = grad_ckpt
        for m, backend in zip(mambas, backends, strict=True):
            m.backend = backend
        mvar.zero_grad(set_to_none=True)
