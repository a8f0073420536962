"""Model FLOPs, counted one way for every report: bench.py's tables and the study's cost axes.

Counted: every matrix product with a weight (aten mm/addmm, as torch's FlopCounterMode sees them, backward
included in a training step) plus the attention scores, 4*C per query-key pair. Not counted: the Mamba2 scan, the
convolutions, norms and sampling (they are not model FLOPs in the papers' sense).
"""
from collections.abc import Callable

import torch
from torch import nn


def model_flops(mvar: nn.Module, run: Callable[[], object], attention_passes: int = 1) -> float:
    """Model FLOPs of one call of `run`: the linear layers (every matrix product with a weight: aten mm/addmm, as
    counted by torch's FlopCounterMode, backward included when `run` is a training step) plus the attention scores,
    4*C per query-key pair (q.k and the weighted sum of v) times `attention_passes` (3 for a training step: the
    backward costs twice the forward). The Mamba2 scan, the convolutions and sampling are not counted (they are not
    model FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    attention = 0

    def count_pairs(module, args, _out):
        nonlocal attention
        B, L, C = args[0].shape
        keys = module.cached_k.shape[1] if module.caching else None
        pairs = L * keys if keys is not None else (
            sum(n * n for n in args[1]) if module.mode == "intra" else L * L)  # mode "causal" without cache: masked
        attention += 4 * C * B * pairs

    attns = [m for m in mvar.modules() if type(m).__name__ == "ScaleAttention"]
    hooks = [m.register_forward_hook(count_pairs) for m in attns]
    try:
        with FlopCounterMode(display=False) as counter:
            run()
    finally:
        for h in hooks:
            h.remove()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0) + attention_passes * attention


def train_step_flops(mvar: nn.Module, label_B: torch.Tensor, x_BLCv: torch.Tensor) -> float:
    """Model FLOPs of one training step on this batch: the forward pass and the backward of a scalar loss (input
    and weight gradients; the first layer's input needs none), attention scores counted three times. Gradients are
    cleared afterwards; the optimizer and the loss add no model FLOPs."""
    def step() -> None:
        mvar(label_B, x_BLCv).float().logsumexp(dim=-1).mean().backward()

    try:
        return model_flops(mvar, step, attention_passes=3)
    finally:
        mvar.zero_grad(set_to_none=True)
