"""The chain replay of the draft-confidence study, on hand-made tables."""

from __future__ import annotations

from minedraft_sglang.lab.draft_confidence import replay

# Six output positions: the drafter is right at all but position 2, and
# unsure (0.2) at position 1.
RIGHT = [True, True, False, True, True, True]
PROBS = [0.9, 0.2, 0.9, 0.9, 0.9, 0.9]


def test_fixed_k_verifies_k_and_commits_accepted_plus_one():
    # k = 3: drafts 0-2, accepts 0-1, commits 3 (the target's token at 2);
    # then drafts 3-5, all accepted, commits 3 (nothing past the end).
    assert replay(RIGHT, PROBS, 3, 0.0) == (2, 6, 6)
    # k = 1: steps of one draft; the wrong one commits only the target's token.
    assert replay(RIGHT, PROBS, 1, 0.0) == (4, 4, 6)


def test_a_chain_ends_after_its_first_unsure_token():
    # Drafts 0-1 (1 is unsure), both accepted: commits 3, then 3-5 as above.
    assert replay(RIGHT, PROBS, 3, 0.5) == (2, 5, 6)
    # Without the stop, the same K drafts position 2 too and loses it.
    assert replay(RIGHT, PROBS, 4, 0.0) == (2, 7, 6)
