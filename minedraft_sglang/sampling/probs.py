"""The distributions the target samples from, with SGLang's sampling rules."""

from __future__ import annotations

import torch


def target_probs(logits: torch.Tensor, sampling_info) -> torch.Tensor:
    """[bs, W, V] logits -> the distributions the target samples from, with
    each request's temperature, top-k, top-p and min-p (greedy requests have
    top-k 1, so their distribution is one-hot at the argmax).

    ``sampling_info`` needs ``temperatures``, ``top_ks``, ``top_ps`` and
    ``min_ps``, one value per request (SGLang's ``SamplingBatchInfo`` has them).
    """
    bs = logits.shape[0]
    temps = sampling_info.temperatures.view(bs, 1, 1).to(logits.dtype)
    probs = torch.softmax(logits.float() / temps, dim=-1)
    top_k = sampling_info.top_ks.view(bs, 1, 1)
    ranked, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)
    keep = (
        (rank < top_k.clamp_min(1))
        # Same rule as SGLang's sampler: drop a token once the mass before it exceeds top-p.
        & ((ranked.cumsum(-1) - ranked) <= sampling_info.top_ps.view(bs, 1, 1))
        & (ranked >= sampling_info.min_ps.view(bs, 1, 1) * ranked[..., :1])
    )
    ranked = ranked * keep
    return torch.zeros_like(probs).scatter_(-1, order, ranked / ranked.sum(-1, keepdim=True))
