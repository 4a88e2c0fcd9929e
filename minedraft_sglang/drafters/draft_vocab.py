"""Which token ids a standalone drafter chooses among (``--minedraft-draft-vocab``).

A small draft model with a large vocabulary spends much of each decode-sized
step in its LM head: Qwen2.5 0.5B's is 136M of its 494M weights, and a draft
step streams every weight per token. Byte-level BPE vocabularies number their
tokens in merge order, roughly by frequency, so Qwen2.5's first 65,536 ids
hold 98.5% of HumanEval's prompt tokens, 99.2% of its reference solutions'
and 97.5% of MT-bench's first turns' (the first 32,768: 96.2%, 96.4%, 93%),
but 26% of a sample Chinese sentence's. Drafting among the first ids
only reads the head's first rows (a view, no copy); a target token beyond
them is never drafted, so that chain stops there. Output is exact either way:
the target verifies every draft.

``auto`` limits the rows while the tokens the drafter sees,
prompts and outputs, rarely go beyond them, and drafts among the whole
vocabulary while they often do (a server whose traffic turns to Chinese stops
losing its chains). It applies to eager steps only: a CUDA graph or a compiled
step has its head's shape built in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from minedraft_sglang.config import DRAFT_VOCAB_AUTO

logger = logging.getLogger(__name__)

# Against 32,768: 57% of the head's bytes saved instead of 78% (16% of a
# 0.5B draft step's weights instead of 22%), and a quarter of the chains
# broken on code (0.8% of HumanEval's solution tokens beyond, against 3.6%).
AUTO_LIMIT = 65536
# Share of seen tokens beyond the limit above which the whole vocabulary is
# drafted, and below which the limit returns (hysteresis: no flapping).
WHOLE_ABOVE = 0.05
LIMIT_BELOW = 0.025
# Per seen token: the weight of what was seen before (memory ~500 tokens).
DECAY = 0.998


class DraftVocab:
    """The rows of the LM head a draft step computes (``rows``), for a
    vocabulary of ``size`` ids: the first ``limit`` (0 or >= size: all),
    and under ``adaptive`` all of them while the share of seen tokens at or
    beyond ``limit`` is high."""

    @classmethod
    def from_flag(cls, size: int, value: str, step_mode: str) -> DraftVocab:
        """For ``--minedraft-draft-vocab`` ``value`` (validated by config.py)."""
        if value == DRAFT_VOCAB_AUTO:
            return cls(size, AUTO_LIMIT, adaptive=True) if step_mode == "eager" else cls(size, 0)
        return cls(size, int(value))

    def __init__(self, size: int, limit: int, *, adaptive: bool = False):
        self.size = size
        self.limit = limit if 0 < limit < size else size
        self.adaptive = adaptive and self.limit < size
        self.rows = self.limit
        self.seen = 0.0  # decayed counts of tokens seen, and of those beyond the limit
        self.beyond = 0.0

    @property
    def share_beyond(self) -> float:
        return self.beyond / self.seen if self.seen else 0.0

    def observe(self, tokens: Sequence[int]) -> None:
        """Real tokens the drafter was fed (a prompt, then each step's new
        output), in any order."""
        if not self.adaptive or not tokens:
            return
        keep = DECAY ** len(tokens)
        self.seen = keep * self.seen + len(tokens)
        self.beyond = keep * self.beyond + sum(t >= self.limit for t in tokens)
        share, rows = self.share_beyond, self.rows
        if share > WHOLE_ABOVE:
            self.rows = self.size
        elif share < LIMIT_BELOW:
            self.rows = self.limit
        if self.rows != rows:
            logger.info(
                "MineDraft: drafting among the first %d of %d token ids (%.1f%% of recent tokens lie beyond %d)",
                self.rows,
                self.size,
                100 * share,
                self.limit,
            )
