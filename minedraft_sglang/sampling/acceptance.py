"""Acceptance of chain drafts with per-request (ragged) draft lengths.

Pure tensor functions, batched over requests, so the worker can run them on
whichever device holds the target's probabilities and the tests can check
them without SGLang. Ragged lengths come from TETRIS: every request carries K
draft slots, of which only the first ``num_drafts[i]`` are verified.
"""

from __future__ import annotations

import torch

PAD = -1


def _residual_probs(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Unnormalized distribution to resample from after a rejection."""
    return (p - q).clamp_min(0)


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
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    num_drafts: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    draft_tokens [bs, K] int64, sampled from ``draft_probs`` [bs, K, V];
    target_probs [bs, K+1, V], row j being the target's distribution after
    the first j drafts; num_drafts [bs] in 0..K. Slots at or beyond
    ``num_drafts[i]`` are never read as tokens, so they may hold anything.

    Returns (output_tokens [bs, K+1] padded with -1, accept_lens [bs]) where
    accept_lens = accepted drafts + 1: the accepted drafts are followed by
    one token from the residual at the first rejection, or by the bonus token
    from the target when every verified draft was accepted. The output is
    distributed exactly as sampling from the target token by token.
    """
    bs, k = draft_tokens.shape
    device = target_probs.device
    tokens = draft_tokens.clamp_min(0)[:, :, None]
    p_tok = target_probs[:, :k].gather(2, tokens).squeeze(2).float()
    q_tok = draft_probs.gather(2, tokens).squeeze(2).float()
    u = torch.rand((bs, k), generator=generator, device=device)
    # u < p/q written without the division, so q(d) = 0 accepts iff p(d) > 0.
    accept = u * q_tok < p_tok
    accept &= torch.arange(k, device=device) < num_drafts[:, None]
    num_accepted = _accepted_prefix(accept)

    rows = torch.arange(bs, device=device)
    p_last = target_probs[rows, num_accepted].float()
    q_last = draft_probs[rows, num_accepted.clamp_max(k - 1)].float() if k else p_last
    rejected = num_accepted < num_drafts
    residual = _residual_probs(p_last, q_last)
    # A rejection with zero residual mass can only come from rounding (p == q)
    # or from a draft outside q's support; p is then the right distribution.
    use_residual = rejected & (residual.sum(dim=-1) > 0)
    weights = torch.where(use_residual[:, None], residual, p_last)
    return _assemble(draft_tokens, num_accepted, _sample(weights, generator))


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
