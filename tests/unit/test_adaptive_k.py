"""The online k planner (adaptive_k.py): pure arithmetic, no server."""

from __future__ import annotations

import pytest

from minedraft_sglang.adaptive_k import EXPLORE_EVERY, EXPLORE_STEPS, HYSTERESIS, KPlanner, LinearFit, accept_length


def test_linear_fit_recovers_intercept_and_slope_and_degrades_to_a_constant():
    fit = LinearFit()
    for x in (1, 4, 8, 16):
        fit.add(x, 0.010 + 0.001 * x)
    assert fit(0) == pytest.approx(0.010) and fit(32) == pytest.approx(0.042)
    one_x = LinearFit()
    for y in (0.02, 0.04):
        one_x.add(8, y)
    assert one_x(1) == one_x(100) == pytest.approx(one_x.sy / one_x.w)


def _planner(alpha: float, t_verify, t_draft, k_max: int = 4) -> KPlanner:
    """A planner that has seen verifies of every width and drafts of every
    batch size with the given cost functions, and acceptance ``alpha``."""
    p = KPlanner(k_max)
    for n in range(1, 65):
        p.observe_verify(n, t_verify(n))
    for b in range(1, 9):
        p.observe_draft(b, 3, 3 * t_draft(b))
    offered = 10_000
    accepted = round(alpha * offered)
    # 'accepted' accepted drafts and 'offered - accepted' rejections.
    p.observe_acceptance([accepted], [accepted + 1])
    p.accepted, p.offered = accepted, offered
    return p


def _best(p: KPlanner, verify_bs: int, draft_bs: int) -> int:
    return max(range(p.k_max + 1), key=lambda k: p.rate(k, verify_bs, draft_bs))


def test_good_drafts_and_a_costly_verify_pick_the_longest_chain():
    p = _planner(0.95, t_verify=lambda n: 0.100 + 0.0005 * n, t_draft=lambda b: 0.005 + 0.001 * b)
    assert _best(p, 1, 0) == 4
    assert _best(p, 2, 2) == 4


def test_useless_drafts_pick_plain_decoding():
    p = _planner(0.02, t_verify=lambda n: 0.100 + 0.0005 * n, t_draft=lambda b: 0.005 + 0.001 * b)
    assert _best(p, 1, 0) == 0
    assert _best(p, 4, 4) == 0


def test_psd_balances_the_stages():
    # Drafting is as slow as verifying: PSD hides k*t_d behind t_v only for
    # small k, so the best k is the one that balances them, not the longest.
    p = _planner(0.9, t_verify=lambda n: 0.060 + 0.0001 * n, t_draft=lambda b: 0.030)
    assert _best(p, 2, 2) == 2
    assert p.rate(2, 2, 2) > p.rate(4, 2, 2)


def test_cheap_batching_makes_speculation_lose_at_high_concurrency():
    # A weight-bound target: tokens are nearly free, so 8 requests decode
    # plainly at 8 tokens per verify; drafting adds its full cost.
    p = _planner(0.7, t_verify=lambda n: 0.080 + 0.0002 * n, t_draft=lambda b: 0.030 + 0.004 * b)
    assert _best(p, 1, 0) > 0
    assert _best(p, 4, 4) == 0


def test_choose_starts_at_k_max_then_explores_every_k_for_a_few_steps():
    p = KPlanner(3)
    assert p.choose(2, 2) == 3  # nothing measured yet
    p = _planner(0.02, t_verify=lambda n: 0.1, t_draft=lambda b: 0.01, k_max=3)
    chosen = [p.choose(2, 2) for _ in range(3 * EXPLORE_EVERY + EXPLORE_STEPS)]
    assert chosen.count(0) == len(chosen) - 3 * EXPLORE_STEPS
    # Each exploration is a run of EXPLORE_STEPS steps at one k, every k in turn.
    runs = "".join(map(str, chosen)).replace("0", " ").split()
    assert runs == [str(k) * EXPLORE_STEPS for k in (1, 2, 3)]


def test_a_near_tie_does_not_flip_the_choice():
    p = _planner(0.9, t_verify=lambda n: 0.300, t_draft=lambda b: 0.150, k_max=2)
    p.current = 0
    p.rate = lambda k, *_: {0: 1.0, 1: 1.0 + HYSTERESIS / 2, 2: 0.5}[k]
    assert p.choose(1, 1) == 0
    p.rate = lambda k, *_: {0: 1.0, 1: 1.0 + 2 * HYSTERESIS, 2: 0.5}[k]
    assert p.choose(1, 1) == 1


def test_acceptance_counts_a_rejection_only_for_chains_cut_short():
    p = KPlanner(4)
    p.observe_acceptance([4, 0, 2], [4, 4, 4])
    # 6 accepted, 2 rejections (the full chain had none).
    assert p.alpha == pytest.approx(6 / 8)
    assert accept_length(1.0, 3) == 4 and accept_length(0.0, 3) == 1


def test_draft_ahead_hides_drafting_when_guesses_hold():
    # Drafting 2 tokens costs about one verify: sequential SD pays both,
    # draft-ahead with good drafts mostly hides it.
    p = _planner(0.95, t_verify=lambda n: 0.300, t_draft=lambda b: 0.150)
    assert p.rate(2, 1, 0, ahead=True) > p.rate(2, 1, 0) > p.rate(0, 1, 0)
    # Useless guesses: draft-ahead is sequential SD plus drafts thrown away.
    p = _planner(0.1, t_verify=lambda n: 0.300, t_draft=lambda b: 0.150)
    assert p.rate(2, 1, 0, ahead=True) < p.rate(0, 1, 0)
