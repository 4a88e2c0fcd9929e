"""TETRIS draft selection (Wu et al., ACL 2025, arXiv 2502.15197).

Under a batch-wide verification budget, verify the draft positions most
likely to be accepted: the drafter's probability that a whole prefix
survives is the product of its token probabilities, so positions are ranked
by cumulative draft log-probability and the global top ``budget`` win.
"""

from __future__ import annotations

import torch


def tetris_select(draft_logprobs: torch.Tensor, budget: int) -> torch.Tensor:
    """Per-request number of drafts to verify, int64 [bs].

    draft_logprobs [bs, K]: log draft probability of each proposed token.
    Exactly ``min(budget, bs*K)`` positions are selected, and each request's
    selection is a prefix of its drafts (a draft is only useful if all the
    drafts before it are verified too).

    Ranking key is the running minimum of the cumulative log-probability.
    For real log-probabilities (<= 0) it equals the cumulative score itself;
    the minimum only matters for inputs whose scores rise along a request,
    where it makes a later position never outrank an earlier one, so the
    top-``budget`` set stays prefix-closed without giving budget back. Ties
    go to the earlier position, then to the lower request index, so equal
    scores spread the budget across requests in order.
    """
    if budget < 0:
        raise ValueError(f"TETRIS budget must be >= 0, got {budget}")
    bs, k = draft_logprobs.shape
    score = draft_logprobs.float().cumsum(dim=1).cummin(dim=1).values
    # Position-major flattening (index t*bs + i) plus a stable sort encodes
    # the tie-break: among equal scores the lower flat index ranks first.
    flat = score.t().reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    selected = torch.zeros_like(flat, dtype=torch.bool)
    selected[order[:budget]] = True
    return selected.view(k, bs).sum(dim=0)
