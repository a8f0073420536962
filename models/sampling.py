"""Token sampling primitives for scale-wise generation: top-k / top-p filtering and seeded Gumbel-softmax.

Shapes: B batch, l tokens of the current scale, V vocabulary size.
"""

import torch


def filter_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set to -inf (in place) every logit outside the top-k and outside the top-p nucleus; returns `logits_BlV`.

    top_k <= 0 or >= V and top_p <= 0 or >= 1 disable the respective filter (VAR's topk raises for top_k > V, and
    train.py's default --eval_top_k=900 then keeps a small tokenizer's every token). The nucleus is the smallest set
    of tokens, taken in order of decreasing probability, whose mass reaches `top_p`; the most likely token is always
    kept.
    """
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth_largest = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth_largest, float("-inf"))
    if 0.0 < top_p < 1.0:  # VAR's formulation (same rounding and tie order, hence the same samples)
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        # ascending order: drop a token while the mass of it and all less likely tokens stays <= 1 - top_p
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter_(-1, sorted_idx, drop_sorted)
        logits_BlV.masked_fill_(drop, float("-inf"))
    return logits_BlV


def sample_with_top_k_top_p_(
    logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
    rng: torch.Generator | None = None, num_samples: int = 1,
) -> torch.Tensor:
    """Filter the logits in place (see `filter_top_k_top_p_`) and draw `num_samples` tokens: returns (B, l, n)."""
    B, n_tok, V = logits_BlV.shape
    filter_top_k_top_p_(logits_BlV, top_k, top_p)
    probs = logits_BlV.softmax(dim=-1).view(-1, V)
    replacement = num_samples > 1
    return torch.multinomial(probs, num_samples=num_samples, replacement=replacement, generator=rng).view(B, n_tok, -1)


def gumbel_softmax_with_rng(
    logits: torch.Tensor, tau: float = 1.0, dim: int = -1, rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Soft Gumbel-softmax sample (like `F.gumbel_softmax(hard=False)`) whose noise comes from `rng`."""
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=rng).log()
    return ((logits + gumbels) / tau).softmax(dim)
