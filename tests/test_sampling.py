"""Top-k / top-p filtering and seeded sampling primitives."""
import math

import pytest
import torch

from models.sampling import filter_top_k_top_p_, gumbel_softmax_with_rng, sample_with_top_k_top_p_

pytestmark = pytest.mark.numerics  # rerun by `make test` at the lowest ISA level


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[[0.0, 3.0, 1.0, 2.0, -1.0]]])
    out = filter_top_k_top_p_(logits.clone(), top_k=2)
    assert torch.equal(torch.isfinite(out), torch.tensor([[[False, True, False, True, False]]]))
    assert torch.equal(filter_top_k_top_p_(logits.clone(), top_k=0), logits)  # 0 disables


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().view(1, 1, 4)
    kept = lambda p: torch.isfinite(filter_top_k_top_p_(logits.clone(), top_p=p)).view(-1).tolist()  # noqa: E731
    assert kept(0.4) == [True, False, False, False]  # the top token alone reaches 0.4
    assert kept(0.7) == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert kept(0.9) == [True, True, True, False]  # 0.8 < 0.9 <= 0.95
    assert kept(0.99) == [True, True, True, True]
    assert kept(1e-6) == [True, False, False, False]  # the most likely token always stays


def test_top_p_at_an_exact_threshold_keeps_the_nucleus_only():
    """Four equally likely tokens (probabilities 1/4: exact in binary, as are their sums and 1 - top_p here): the
    nucleus reaching top_p = 0.25 / 0.5 / 0.75 has 1 / 2 / 3 tokens (VAR drops a token while its tail mass is
    <= 1 - top_p). A strict < kept one token more at every threshold, and the filter tests above have no tie."""
    logits = torch.zeros(1, 1, 4)
    kept = [int(torch.isfinite(filter_top_k_top_p_(logits.clone(), top_p=p)).sum()) for p in (0.25, 0.5, 0.75)]
    assert kept == [1, 2, 3]


def test_top_p_nucleus_is_taken_over_the_top_k_tokens_renormalised():
    """VAR filters top-k first, then takes the nucleus of the softmax over the k kept tokens: of probabilities
    (0.5, 0.3, 0.2), top_k=2 leaves (0.625, 0.375), whose nucleus at top_p=0.6 is the top token alone; the nucleus
    of the unfiltered distribution (top-p first) keeps the 0.5 and 0.3 tokens."""
    logits = torch.tensor([0.5, 0.3, 0.2]).log().view(1, 1, 3)
    kept = torch.isfinite(filter_top_k_top_p_(logits.clone(), top_k=2, top_p=0.6)).view(-1).tolist()
    assert kept == [True, False, False]


def test_sampling_respects_the_filters_and_the_generator():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, 100, generator=g)
    a = sample_with_top_k_top_p_(logits.clone(), top_k=5, rng=torch.Generator().manual_seed(1))
    b = sample_with_top_k_top_p_(logits.clone(), top_k=5, rng=torch.Generator().manual_seed(1))
    assert a.shape == (4, 50, 1) and torch.equal(a, b)
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == a).any(dim=-1).all()


def test_gumbel_softmax_is_a_seeded_distribution():
    logits = torch.randn(3, 7, 11)
    a = gumbel_softmax_with_rng(logits, tau=0.5, rng=torch.Generator().manual_seed(2))
    b = gumbel_softmax_with_rng(logits, tau=0.5, rng=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert math.isclose(a.sum(-1).mean().item(), 1.0, rel_tol=1e-5) and (a >= 0).all()


def test_gumbel_softmax_divides_the_noisy_logits_by_tau():
    """gumbel_softmax_with_rng(logits, tau, rng) is softmax((logits - log E) / tau), E the exponential draw of the
    same seeded generator (a temperature multiplied in still summed to 1)."""
    logits = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(1))
    got = gumbel_softmax_with_rng(logits, tau=0.3, rng=torch.Generator().manual_seed(2))
    E = torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, ((logits - E.log()) / 0.3).softmax(-1), rtol=1e-6, atol=0)


LOGITS_4 = torch.tensor([2.0, 1.0, 0.5, -1.0])


def frequencies(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens.flatten(), minlength=4).double() / tokens.numel()


def test_tokens_are_drawn_from_the_softmax_of_the_kept_logits():
    """20,000 seeded draws: the frequencies of the top-3 filtered sampler are the softmax over the 3 kept logits
    (0.015: over 4 standard deviations of a frequency at this count)."""
    logits = LOGITS_4.expand(1, 20000, 4).clone()
    tokens = sample_with_top_k_top_p_(logits, top_k=3, rng=torch.Generator().manual_seed(0))
    want = torch.cat([LOGITS_4[:3].softmax(0), torch.zeros(1)]).double()
    assert (frequencies(tokens) - want).abs().max() < 0.015, frequencies(tokens)


def test_gumbel_noise_samples_the_softmax():
    """argmax(logits + Gumbel noise), the argmax of the Gumbel softmax at any temperature, is a draw from
    softmax(logits): 20,000 seeded draws within 0.015 of it (noise of the wrong sign: 0.06 off)."""
    soft = gumbel_softmax_with_rng(LOGITS_4.expand(20000, 4), tau=0.5, rng=torch.Generator().manual_seed(0))
    assert (frequencies(soft.argmax(-1)) - LOGITS_4.softmax(0).double()).abs().max() < 0.015
