"""Acceptance of chain drafts with per-request (ragged) draft lengths.

Pure tensor functions, batched over requests, so the worker can run them on
whichever device holds the target's probabilities and the tests can check
them without SGLang. Ragged lengths come from TETRIS: every request carries K
draft slots, of which only the first ``num_drafts[i]`` are verified.

The drafter drafts greedily, so each draft is a point mass q = one-hot(d):
the acceptance test p(d)/q(d) needs only p(d), and the residual max(p - q, 0)
is p without d. Neither needs q as a [bs, K, V] tensor.
"""

from __future__ import annotations

import torch

PAD = -1


def _residual_(p: torch.Tensor, draft: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """``p`` [bs, V] turned in place, on the ``rejected`` rows [bs], into the
    unnormalized distribution to resample from after rejecting ``draft``
    [bs]: max(p - one-hot(draft), 0), that is p without the draft."""
    at_draft = p.gather(1, draft[:, None])
    return p.scatter_(1, draft[:, None], at_draft.masked_fill_(rejected[:, None], 0))


def _sample(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from unnormalized ``weights`` [bs, V].

    argmax(w / E) with E ~ Exp(1) picks index v with probability w_v / sum(w)
    and, unlike torch.multinomial, needs no host sync on CUDA. The clamp
    keeps a rare zero draw from turning 0/0 into a NaN that argmax would pick.
    """
    race = torch.empty_like(weights).exponential_(generator=generator)
    race.clamp_min_(torch.finfo(race.dtype).tiny)
    return (weights / race).argmax(dim=-1)


def _accepted_prefix(accept: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of True per row of ``accept`` [bs, K]."""
    return accept.to(torch.int64).cumprod(dim=1).sum(dim=1)


def _assemble(
    draft_tokens: torch.Tensor, num_accepted: torch.Tensor, last_token: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output rows: accepted drafts, then ``last_token``, then PAD."""
    bs, k = draft_tokens.shape
    pos = torch.arange(k + 1, device=draft_tokens.device).expand(bs, k + 1)
    drafts = torch.cat([draft_tokens, draft_tokens.new_full((bs, 1), PAD)], dim=1)
    out = torch.where(pos < num_accepted[:, None], drafts, PAD)
    out = out.scatter(1, num_accepted[:, None], last_token[:, None].to(out.dtype))
    return out, num_accepted + 1


def rejection_sample(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    num_drafts: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) of
    point-mass drafts: accept d with probability p(d), else sample p without d.

    draft_tokens [bs, K] int64, each a point mass (chosen by any rule that
    does not look at this function's coins); target_probs [bs, K+1, V], row j
    being the target's distribution after the first j drafts; num_drafts [bs]
    in 0..K. Slots at or beyond ``num_drafts[i]`` are never read as tokens,
    so they may hold anything.

    Returns (output_tokens [bs, K+1] padded with -1, accept_lens [bs]) where
    accept_lens = accepted drafts + 1: the accepted drafts are followed by
    one token from the residual at the first rejection, or by the bonus token
    from the target when every verified draft was accepted. The output is
    distributed exactly as sampling from the target token by token.
    """
    bs, k = draft_tokens.shape
    device = target_probs.device
    tokens = draft_tokens.clamp_min(0)
    p_tok = target_probs[:, :k].gather(2, tokens[:, :, None]).squeeze(2).float()
    u = torch.rand((bs, k), generator=generator, device=device)
    accept = u < p_tok
    accept &= torch.arange(k, device=device) < num_drafts[:, None]
    num_accepted = _accepted_prefix(accept)

    rows = torch.arange(bs, device=device)
    rejected = num_accepted < num_drafts
    # The draft at the first rejection (past the last slot, where nothing is
    # rejected, a stand-in 0).
    stop = torch.cat([tokens, tokens.new_zeros(bs, 1)], dim=1)[rows, num_accepted]
    # The target's distribution there (indexing copies: ours to edit), less
    # the draft where it was rejected.
    weights = _residual_(target_probs[rows, num_accepted].float(), stop, rejected)
    # A rejection with zero residual mass can only come from rounding (all of
    # p's mass on d, yet p(d) below 1): sampling p would give d.
    empty = rejected & (weights.sum(dim=-1) == 0)
    return _assemble(draft_tokens, num_accepted, torch.where(empty, stop, _sample(weights, generator)))


def greedy_accept(
    draft_tokens: torch.Tensor, target_argmax: torch.Tensor, num_drafts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature-0 acceptance: keep drafts while they equal the target's
    argmax. target_argmax [bs, K+1]; same outputs as ``rejection_sample``.
    The token after the accepted drafts is the target's argmax there (the
    correction at a mismatch, the bonus after ``num_drafts[i]`` matches)."""
    bs, k = draft_tokens.shape
    match = draft_tokens == target_argmax[:, :k]
    match &= torch.arange(k, device=draft_tokens.device) < num_drafts[:, None]
    num_accepted = _accepted_prefix(match)
    last = target_argmax.gather(1, num_accepted[:, None]).squeeze(1)
    return _assemble(draft_tokens, num_accepted, last)
