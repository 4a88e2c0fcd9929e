"""--minedraft-draft-vocab: which LM-head rows a standalone drafter computes."""

from __future__ import annotations

import pytest

from minedraft_sglang.drafters import draft_vocab
from minedraft_sglang.drafters.draft_vocab import DraftVocab


def test_a_fixed_limit_keeps_its_rows_whatever_it_sees():
    v = DraftVocab(1000, 300)
    v.observe([900] * 50)
    assert v.rows == 300
    for limit in (0, 1000, 5000):
        assert DraftVocab(1000, limit).rows == 1000


def test_auto_drafts_among_all_while_many_seen_tokens_lie_beyond_the_limit_and_returns_with_hysteresis():
    v = DraftVocab(1000, 300, adaptive=True)
    assert v.rows == 300  # nothing seen yet
    v.observe([10, 20, 30] * 20)
    assert v.rows == 300
    # A prompt mostly beyond the limit (a Chinese one against Qwen's first 32k ids).
    v.observe([900, 10] * 30)
    assert v.rows == 1000 and v.share_beyond > draft_vocab.WHOLE_ABOVE
    # The share falls; between the two thresholds the whole vocabulary stays.
    while v.share_beyond >= draft_vocab.WHOLE_ABOVE:
        v.observe([10] * 8)
        assert v.rows == 1000
    while v.share_beyond >= draft_vocab.LIMIT_BELOW:
        assert v.rows == 1000
        v.observe([10] * 8)
    assert v.rows == 300


def test_the_flag_auto_limits_eager_steps_only():
    assert (
        DraftVocab.from_flag(151936, "auto", "eager").rows,
        DraftVocab.from_flag(151936, "auto", "eager").adaptive,
    ) == (
        draft_vocab.AUTO_LIMIT,
        True,
    )
    for mode in ("graph", "compile"):
        assert DraftVocab.from_flag(151936, "auto", mode).rows == 151936
    fixed = DraftVocab.from_flag(151936, "65536", "graph")
    assert (fixed.rows, fixed.adaptive) == (65536, False)
    # A vocabulary within the limit: nothing to limit.
    assert not DraftVocab.from_flag(1024, "auto", "eager").adaptive


@pytest.mark.parametrize("bad", ["-1", "many", ""])
def test_bad_values_are_refused_by_the_config(bad):
    from minedraft_sglang.config import MineDraftConfig, MineDraftConfigError

    with pytest.raises(MineDraftConfigError, match="--minedraft-draft-vocab"):
        MineDraftConfig(draft_vocab=bad).validate()
