"""The distributions the target samples from, with SGLang's sampling rules.

The rules, per request: temperature, then top-k (the k most likely tokens),
top-p (drop a token once the mass ranked before it exceeds top-p) and min-p
(drop tokens below min-p times the most likely one's probability), then
renormalise. Written over a full sort they cost a [bs, W, V] sort and its
int64 indices per verify; here each rule does only the work it needs:

- min-p needs the max only, not a ranking;
- top-k and top-p need the k highest probabilities of a row, in order: the
  batch's largest top-k (``torch.topk``), or the whole vocabulary (a sort)
  only when some request has top-p < 1 without a top-k;
- temperature alone is a softmax.
"""

from __future__ import annotations

import torch


def target_probs(logits: torch.Tensor, sampling_info) -> torch.Tensor:
    """[bs, W, V] logits -> the distributions the target samples from, fp32
    [bs, W, V] (greedy requests have top-k 1, so theirs is one-hot at the
    argmax).

    ``sampling_info`` needs, as SGLang's ``SamplingBatchInfo`` has them, the
    per-request ``temperatures``, ``top_ks``, ``top_ps``, ``min_ps`` and the
    batch's host-side summaries ``need_top_k_sampling``,
    ``need_top_p_sampling``, ``need_min_p_sampling`` (True when some request
    has the rule; a PSD sub-batch keeps its whole batch's, which costs work,
    never exactness) and ``max_top_k`` (an int >= every top-k when every
    request has one, else None). Without ``max_top_k`` a batch with top-k or
    top-p reads its largest top-k from the device (one host sync).
    """
    bs, _, vocab = logits.shape
    temps = sampling_info.temperatures.view(bs, 1, 1).to(logits.dtype)
    probs = torch.softmax(logits.float() / temps, dim=-1)
    top = sampling_info.need_top_k_sampling or sampling_info.need_top_p_sampling
    if sampling_info.need_min_p_sampling:
        # The max survives every rule, so min-p's threshold is the same
        # before or after the others: no ranking needed.
        threshold = sampling_info.min_ps.view(bs, 1, 1) * probs.amax(dim=-1, keepdim=True)
        probs.masked_fill_(probs < threshold, 0)
    if top:
        ranks = _ranks_needed(sampling_info, vocab)
        _keep_top(probs, sampling_info.top_ks.view(bs, 1, 1), sampling_info.top_ps.view(bs, 1, 1), ranks)
    if top or sampling_info.need_min_p_sampling:
        probs.div_(probs.sum(dim=-1, keepdim=True))
    return probs


def _ranks_needed(sampling_info, vocab: int) -> int:
    """How many of each row's highest probabilities top-k and top-p look at:
    the batch's largest top-k below V, or V (a full sort) when a request has
    top-p < 1 and no top-k; 0 when no request has either."""
    if sampling_info.max_top_k is not None:
        return min(sampling_info.max_top_k, vocab)
    top_ks, top_ps = sampling_info.top_ks, sampling_info.top_ps
    needed = torch.where(top_ks < vocab, top_ks, torch.where(top_ps < 1, vocab, 0))
    return int(needed.max())


def _keep_top(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, ranks: int) -> None:
    """Zero in ``probs`` [bs, W, V], in place, what top-k and top-p drop;
    top_k, top_p [bs, 1, 1]. Every token either rule keeps is among the
    ``ranks`` highest of its row, but for rows with neither rule, which are
    left as they are."""
    if ranks == 0:
        return
    vocab = probs.shape[-1]
    # [bs, W, ranks], descending
    ranked, order = probs.sort(dim=-1, descending=True) if ranks == vocab else probs.topk(ranks, dim=-1)
    rank = torch.arange(ranks, device=probs.device)
    # Same rule as SGLang's sampler: drop a token once the mass before it
    # exceeds top-p (min-p zeroed only tokens ranked after every survivor,
    # so the mass before a survivor is unchanged).
    keep = (rank < top_k) & (ranked.cumsum(dim=-1).sub_(ranked) <= top_p)
    unlimited = (top_k >= vocab) & (top_p >= 1)
    ranked.mul_(keep | unlimited)
    probs.masked_fill_(~unlimited, 0).scatter_(-1, order, ranked)
