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

import torch
import torch.nn.functional as F
from sglang.srt.managers.schedule_batch import ScheduleBatch
from sglang.srt.speculative.eagle_utils import default_tree_mask_mode
from sglang.srt.speculative.eagle_worker_common import (
    build_eagle_verify_input,
    run_eagle_verify,
)
from sglang.srt.speculative.spec_info import SpecInput, SpecInputType

from minedraft_sglang.sampling.acceptance import rejection_sample
from minedraft_sglang.sampling.penalties import PenaltyFn, chain_penalties
from minedraft_sglang.sampling.probs import target_probs
from minedraft_sglang.tp_sync import TpLink


@dataclasses.dataclass(frozen=True)
class VerifyContext:
    """What the eagle_sample hook (hooks.py) needs from the MINEDRAFT verify
    running on its thread: SGLang calls the hook deep inside its own verify,
    so these cannot travel as arguments."""

    # Exact per-position penalties; None when no request has one.
    penalties: PenaltyFn | None
    # [bs] drafts to verify per request (TETRIS); None: all of them.
    num_drafts: torch.Tensor | None
    generator: torch.Generator | None
    # Under --tp N: every rank commits TP rank 0's sampled acceptance.
    tp: TpLink | None = None


_current = threading.local()


def current_verify() -> VerifyContext | None:
    """The MINEDRAFT verify running on this thread, if any: the hook must
    leave every other verify (SGLang's own algorithms) alone."""
    return getattr(_current, "context", None)


@contextlib.contextmanager
def _verifying(context: VerifyContext):
    _current.context = context
    try:
        yield
    finally:
        _current.context = None


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
    view.sampling_info = dataclasses.replace(batch.sampling_info, penalizer_orchestrator=_KeepPenalties())
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
    num_drafts: torch.Tensor | None = None,  # [bs]: verify only this many (TETRIS)
    target_worker,
    req_to_token_pool,
    token_to_kv_pool_allocator,
    grammar_barrier=None,
    generator: torch.Generator | None = None,
    tp: TpLink | None = None,
):
    """One target verify forward of ``[bonus, d_1..d_k]`` per request;
    returns SGLang's GenerationBatchResult (accept_lens include the bonus)."""
    bs, num_steps = draft_tokens.shape
    device = batch.device
    parents, scores = chain_topology(num_steps, bs, device)
    context = VerifyContext(chain_penalties(batch.reqs, draft_tokens), num_drafts, generator, tp)
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
    with _verifying(context):
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


def sample_chain(verify_input, batch: ScheduleBatch, logits_output, context: VerifyContext, grammar_mask=None):
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
    num_drafts = context.num_drafts
    if num_drafts is None:
        num_drafts = torch.full((bs,), width - 1, dtype=torch.int64, device=probs.device)
    out, accept_lens = rejection_sample(drafts, q, probs, num_drafts, context.generator)
    predict = out.clamp_min(0).to(torch.int32).flatten()
    cols = torch.arange(width, device=probs.device)
    rows = torch.arange(bs, device=probs.device)[:, None] * width
    accept_index = torch.where(cols[None, :] < accept_lens[:, None], rows + cols[None, :], -1)
    accepted = predict, accept_lens.to(torch.int32), accept_index.to(torch.int32)
    if context.tp is not None:
        return context.tp.share_acceptance(*accepted)
    return accepted
