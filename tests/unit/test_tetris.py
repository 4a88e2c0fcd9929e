"""TETRIS selection: budget, prefix closure, tie-break, optimality."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from minedraft_sglang.sampling.tetris import tetris_select


def _random_logprobs(gen: torch.Generator, bs: int, k: int) -> torch.Tensor:
    return torch.rand((bs, k), generator=gen).clamp_min(1e-3).log()


def test_budget_spent_exactly_and_selection_is_prefix_closed():
    gen = torch.Generator().manual_seed(0)
    for bs, k in [(1, 1), (4, 3), (7, 5)]:
        logprobs = _random_logprobs(gen, bs, k)
        for budget in range(bs * k + 3):
            n = tetris_select(logprobs, budget)
            assert n.dtype == torch.int64 and n.shape == (bs,)
            assert int(n.sum()) == min(budget, bs * k)
            assert bool(((n >= 0) & (n <= k)).all())


def test_prefix_closed_even_when_scores_rise():
    # Positive "log-probs" make later cumulative scores larger; the selection
    # must still be a prefix per request and still spend the whole budget.
    # Raw cumulative scores of request 0 are -1, 2, 2: its later positions
    # would outrank its first one.
    logprobs = torch.tensor([[-1.0, 3.0, 0.0], [-0.5, -0.5, -0.5]])
    assert tetris_select(logprobs, 2).tolist() == [1, 1]
    assert tetris_select(logprobs, 3).tolist() == [2, 1]
    assert tetris_select(logprobs, 4).tolist() == [2, 2]


def test_budget_zero_and_zero_drafts():
    logprobs = torch.tensor([[-0.1, -0.2], [-9.0, -9.0]])
    assert tetris_select(logprobs, 0).tolist() == [0, 0]
    # The unlikely request gets nothing: it is still verified with 0 drafts.
    assert tetris_select(logprobs, 2).tolist() == [2, 0]
    with pytest.raises(ValueError):
        tetris_select(logprobs, -1)


def test_ties_spread_in_request_order_and_are_deterministic():
    flat = torch.zeros((4, 3))
    assert tetris_select(flat, 6).tolist() == [2, 2, 1, 1]
    assert tetris_select(flat, 1).tolist() == [1, 0, 0, 0]
    # Equal non-zero scores: -inf drafts (impossible tokens) tie among themselves.
    tied = torch.tensor([[-1.0, -math.inf], [-1.0, -math.inf], [-1.0, -1.0]])
    assert tetris_select(tied, 3).tolist() == [1, 1, 1]
    assert tetris_select(tied, 4).tolist() == [1, 1, 2]
    assert tetris_select(tied, 5).tolist() == [2, 1, 2]
    gen = torch.Generator().manual_seed(1)
    coarse = torch.randint(0, 3, (6, 4), generator=gen).float() * -0.5
    assert torch.equal(tetris_select(coarse, 11), tetris_select(coarse.clone(), 11))


def _brute_force_best(logprobs: torch.Tensor, budget: int) -> float:
    """Max expected number of accepted drafts (sum over verified positions of
    the drafter's prefix-survival probability) over all prefix-closed
    selections of exactly ``budget`` positions."""
    bs, k = logprobs.shape
    survive = logprobs.double().cumsum(dim=1).exp()
    best = -math.inf
    for lengths in itertools.product(range(k + 1), repeat=bs):
        if sum(lengths) == budget:
            best = max(best, sum(float(survive[i, :n].sum()) for i, n in enumerate(lengths)))
    return best


def test_maximizes_expected_accepted_drafts_vs_brute_force():
    """Property: the selection equals the top-``budget`` set of cumulative
    scores, hence maximizes the drafter's expected accepted-draft count
    among all prefix-closed selections of the same size."""
    gen = torch.Generator().manual_seed(2)
    for trial in range(40):
        bs, k = 1 + trial % 4, 1 + trial % 3
        logprobs = _random_logprobs(gen, bs, k)
        budget = int(torch.randint(0, bs * k + 1, (1,), generator=gen))
        n = tetris_select(logprobs, budget)
        survive = logprobs.double().cumsum(dim=1).exp()
        got = sum(float(survive[i, : int(n[i])].sum()) for i in range(bs))
        assert got == pytest.approx(_brute_force_best(logprobs, budget), rel=1e-12, abs=1e-12)
        # Same set as the plain global top-budget of cumulative scores.
        scores = logprobs.cumsum(dim=1).reshape(-1)
        top = set(torch.topk(scores, budget).indices.tolist())
        picked = {i * k + t for i in range(bs) for t in range(int(n[i]))}
        assert picked == top
