"""Exact sampling penalties along a chain of drafts.

SGLang's speculative penalties are "relaxed": one vector for the whole verify
window, counting only the last token of each step. Plain decoding penalises
position j of a chain by the output *plus drafts 1..j*; these functions do
that, so speculative output equals plain decoding under penalties too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# Applies the penalties in place to [bs * W, V] logits.
PenaltyFn = Callable[[torch.Tensor], None]


def is_penalized(params) -> bool:
    """``params``: a request's SGLang ``SamplingParams``."""
    return (
        params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
        or params.repetition_penalty != 1.0
        or params.min_new_tokens > 0
    )


def stop_token_ids(req) -> set[int]:
    """The tokens min_new_tokens holds back: SGLang's own set (see
    BatchedMinNewTokensPenalizer)."""
    tokenizer = req.tokenizer
    ids = (req.sampling_params.stop_token_ids or set()) | (req.eos_token_ids or set())
    if tokenizer is not None:
        ids |= getattr(tokenizer, "additional_stop_token_ids", None) or set()
        if tokenizer.eos_token_id is not None:
            ids |= {tokenizer.eos_token_id}
    return {t for t in ids if t is not None}


def chain_penalties(reqs: Sequence, drafts: torch.Tensor) -> PenaltyFn | None:
    """Exact frequency/presence/repetition penalties and min_new_tokens at
    every position of each chain: position j follows the request's output
    plus drafts 1..j, so it is penalised exactly as plain decoding would
    penalise that token. Returns a function that applies them to [bs*W, V]
    logits (additive first, then scaling, as SGLang does), or None when no
    request has a penalty.

    reqs: bs requests with ``output_ids``, ``sampling_params``,
    ``eos_token_ids`` and ``tokenizer`` (SGLang's ``Req``); drafts [bs, k].
    """
    if not any(is_penalized(r.sampling_params) for r in reqs):
        return None
    bs, k = drafts.shape
    width = k + 1

    def apply(logits: torch.Tensor) -> None:
        vocab, device = logits.shape[-1], logits.device
        counts = torch.zeros(bs, vocab, device=device)
        for i, req in enumerate(reqs):
            if req.output_ids:
                counts[i] = torch.bincount(torch.tensor(req.output_ids, device=device), minlength=vocab)[:vocab]
        steps = F.one_hot(drafts.to(device, torch.int64), vocab).float().cumsum(1)
        counts = counts[:, None, :] + F.pad(steps, (0, 0, 1, 0))  # [bs, W, V]
        seen = counts > 0

        def per_req(name):
            return torch.tensor([float(getattr(r.sampling_params, name)) for r in reqs], device=device).view(bs, 1, 1)

        additive = -per_req("frequency_penalty") * counts - per_req("presence_penalty") * seen
        out_lens = torch.tensor([len(r.output_ids) for r in reqs], device=device).view(bs, 1)
        held = (out_lens + torch.arange(width, device=device)) < per_req("min_new_tokens").view(bs, 1)
        for i, req in enumerate(reqs):
            if held[i].any():
                stops = torch.tensor(sorted(stop_token_ids(req)), dtype=torch.int64, device=device)
                stops = stops[stops < vocab]
                additive[i, :, stops] = torch.where(held[i, :, None], float("-inf"), additive[i, :, stops])
        logits.add_(additive.view(bs * width, vocab))
        scaling = torch.where(seen, per_req("repetition_penalty"), 1.0).view(bs * width, vocab)
        logits.copy_(torch.where(logits < 0, logits * scaling, logits / scaling))

    return apply
