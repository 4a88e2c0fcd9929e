"""Target-side verification of chain drafts.

The drafts come from our drafter; the verify forward and the KV commit are
SGLang's own (``run_eagle_verify``), so verification runs through whatever
attention backend the target uses (FlashInfer on GPU, intel_amx on CPU), with
grammar and logprobs.

Acceptance: all-greedy batches use SGLang's greedy walk. Batches with sampled
requests use our rejection sampling (``acceptance.py``) instead of SGLang's,
which on CPU silently falls back to greedy acceptance (its sampling kernel is
CUDA-only) and so would change the output distribution. The drafter drafts
greedily, so its proposal distribution q is one-hot at each draft token: only
token ids cross from the drafter's device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from sglang.srt.managers.schedule_batch import ScheduleBatch
from sglang.srt.speculative.eagle_utils import default_tree_mask_mode
from sglang.srt.speculative.eagle_worker_common import (
    build_eagle_verify_input,
    run_eagle_verify,
)
from sglang.srt.speculative.spec_info import SpecInput, SpecInputType

from minedraft_sglang.acceptance import rejection_sample

# Set while a MINEDRAFT verify runs on this thread, so the eagle_sample hook
# (hooks.py) handles only our verifies.
_active = threading.local()


class MineDraftState(SpecInput):
    """What ``batch.spec_info`` carries between rounds: nothing. Draft state
    lives in the drafter keyed by request id, so SGLang's filter/merge of
    running batches needs no per-row bookkeeping here."""

    def __init__(self) -> None:
        super().__init__(SpecInputType.PP_SPEC_RELAY)

    def filter_batch(self, new_indices, new_indices_cpu=None) -> None:
        pass

    def merge_batch(self, spec_info) -> None:
        pass


class _BonusTokens:
    """The part of SGLang's draft input that the verify-input builder reads."""

    def __init__(self, bonus_tokens: torch.Tensor):
        self.bonus_tokens = bonus_tokens


class _KeepPenalties:
    """Stands in for the penalizer while slicing a forward-only sampling info:
    penalties were already accumulated for the whole batch."""

    def filter(self, keep_indices_device) -> None:
        pass


def sub_batch_view(batch: ScheduleBatch, rows: list[int]) -> ScheduleBatch:
    """A ScheduleBatch holding only ``rows`` of ``batch``, for one verify
    forward or one result-processing pass. ``batch`` itself is left intact."""
    view = copy.copy(batch)
    view.spec_info = None
    view.sampling_info = dataclasses.replace(
        batch.sampling_info, penalizer_orchestrator=_KeepPenalties()
    )
    view.filter_batch(keep_indices=rows)
    view.sampling_info.penalizer_orchestrator = None
    return view


def chain_topology(num_steps: int, bs: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang's tree builder input for a chain: node j's parent is j-1."""
    parent_width = num_steps if num_steps > 1 else 0
    parents = torch.arange(-1, parent_width - 1, dtype=torch.long, device=device)
    scores = torch.arange(num_steps, dtype=torch.long, device=device)
    return parents.repeat(bs, 1), scores.repeat(bs, 1)


def verify_chain(
    batch: ScheduleBatch,
    bonus_tokens: torch.Tensor,  # [bs] the last committed token of each request
    draft_tokens: torch.Tensor,  # [bs, k] on the target device
    *,
    num_drafts: Optional[torch.Tensor] = None,  # [bs]: verify only this many (TETRIS)
    target_worker,
    req_to_token_pool,
    token_to_kv_pool_allocator,
    grammar_barrier=None,
    generator: Optional[torch.Generator] = None,
):
    """One target verify forward of ``[bonus, d_1..d_k]`` per request;
    returns SGLang's GenerationBatchResult (accept_lens include the bonus)."""
    bs, num_steps = draft_tokens.shape
    device = batch.device
    parents, scores = chain_topology(num_steps, bs, device)
    _active.generator = generator
    _active.num_drafts = num_drafts
    _active.penalties = chain_penalties(batch.reqs, draft_tokens)
    # SGLang's speculative penalties are "relaxed" (one vector for the whole
    # chain, counting only the last token of each step); ours replace them.
    # (In a sub-batch view these whole-batch tensors are also unsliced:
    # filter_batch leaves them alone.)
    batch.sampling_info = dataclasses.replace(
        batch.sampling_info, acc_additive_penalties=None, acc_scaling_penalties=None
    )
    batch.spec_info = build_eagle_verify_input(
        batch,
        _BonusTokens(bonus_tokens),
        parents,
        scores,
        draft_tokens,
        None,
        target_worker=target_worker,
        topk=1,
        num_steps=num_steps,
        num_draft_tokens=num_steps + 1,
        tree_mask_mode=default_tree_mask_mode(),
        device=device,
    )
    if num_drafts is not None:
        # Cut each chain after its selected drafts: SGLang's greedy walk
        # stops there, and the sampling path reads num_drafts itself.
        rows = torch.arange(bs, device=device)
        batch.spec_info.retrieve_next_token[rows, num_drafts] = -1
    _active.on = True
    try:
        return run_eagle_verify(
            batch,
            target_worker=target_worker,
            req_to_token_pool=req_to_token_pool,
            token_to_kv_pool_allocator=token_to_kv_pool_allocator,
            plan_stream=None,
            plan_stream_ctx=contextlib.nullcontext(),
            topk=1,
            num_draft_tokens=num_steps + 1,
            device=device,
            metadata_ready_pre_pad=False,
            finalize_tree_path=True,
            grammar_barrier=grammar_barrier,
        )
    finally:
        _active.on = False


def in_minedraft_verify() -> bool:
    return getattr(_active, "on", False)


def _is_penalized(params) -> bool:
    return (
        params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
        or params.repetition_penalty != 1.0
        or params.min_new_tokens > 0
    )


def _stop_token_ids(req) -> set[int]:
    """The tokens min_new_tokens holds back: SGLang's own set (see
    BatchedMinNewTokensPenalizer)."""
    tokenizer = req.tokenizer
    ids = (req.sampling_params.stop_token_ids or set()) | (req.eos_token_ids or set())
    if tokenizer is not None:
        ids |= getattr(tokenizer, "additional_stop_token_ids", None) or set()
        if tokenizer.eos_token_id is not None:
            ids |= {tokenizer.eos_token_id}
    return {t for t in ids if t is not None}


def chain_penalties(reqs, drafts: torch.Tensor):
    """Exact frequency/presence/repetition penalties and min_new_tokens at
    every position of each chain: position j follows the request's output
    plus drafts 1..j, so it is penalised exactly as plain decoding would
    penalise that token. Returns a function that applies them to [bs*W, V]
    logits (additive first, then scaling, as SGLang does), or None when no
    request has a penalty."""
    if not any(_is_penalized(r.sampling_params) for r in reqs):
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
                stops = torch.tensor(sorted(_stop_token_ids(req)), dtype=torch.int64, device=device)
                stops = stops[stops < vocab]
                additive[i, :, stops] = torch.where(held[i, :, None], float("-inf"), additive[i, :, stops])
        logits.add_(additive.view(bs * width, vocab))
        scaling = torch.where(seen, per_req("repetition_penalty"), 1.0).view(bs * width, vocab)
        logits.copy_(torch.where(logits < 0, logits * scaling, logits / scaling))

    return apply


def apply_chain_penalties(logits: torch.Tensor) -> None:
    penalties = getattr(_active, "penalties", None)
    if penalties is not None:
        penalties(logits)


def sample_chain(verify_input, batch: ScheduleBatch, logits_output, grammar_mask=None):
    """Rejection-sample a chain verify; returns what SGLang's eagle_sample
    returns: (predict [bs*W], accept_lens [bs], accept_index [bs, W])."""
    sampling_info = batch.sampling_info
    bs = len(batch.seq_lens)
    width = verify_input.draft_token_num
    logits = logits_output.next_token_logits
    # Penalties were applied by the eagle_sample hook; the rest of what
    # SGLang's own verify adds, in its order:
    if sampling_info.logit_bias is not None:
        logits.add_(torch.repeat_interleave(sampling_info.logit_bias, width, dim=0))
    if grammar_mask is not None:
        grammar_mask.apply(logits)
    probs = target_probs(logits.view(bs, width, -1), sampling_info)
    drafts = verify_input.draft_token.view(bs, width)[:, 1:].to(torch.int64)
    q = F.one_hot(drafts, probs.shape[-1]).to(probs.dtype)
    num_drafts = getattr(_active, "num_drafts", None)
    if num_drafts is None:
        num_drafts = torch.full((bs,), width - 1, dtype=torch.int64, device=probs.device)
    out, accept_lens = rejection_sample(drafts, q, probs, num_drafts, getattr(_active, "generator", None))
    predict = out.clamp_min(0).to(torch.int32).flatten()
    cols = torch.arange(width, device=probs.device)
    rows = torch.arange(bs, device=probs.device)[:, None] * width
    accept_index = torch.where(cols[None, :] < accept_lens[:, None], rows + cols[None, :], -1)
    return predict, accept_lens.to(torch.int32), accept_index.to(torch.int32)


def target_probs(logits: torch.Tensor, sampling_info) -> torch.Tensor:
    """[bs, W, V] logits -> the distributions the target samples from, with
    each request's temperature, top-k, top-p and min-p (greedy requests have
    top-k 1, so their distribution is one-hot at the argmax)."""
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
