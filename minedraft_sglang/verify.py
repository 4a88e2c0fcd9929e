"""Target-side verification of chain drafts.

The drafts come from our drafter; the verify forward, the acceptance walk and
the KV commit are SGLang's own (``run_eagle_verify``), so verification runs
through whatever attention backend the target uses (FlashInfer on GPU,
intel_amx on CPU), with grammar, logprobs and SGLang's lossless sampling.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch

from sglang.srt.managers.schedule_batch import ScheduleBatch
from sglang.srt.speculative.eagle_utils import default_tree_mask_mode
from sglang.srt.speculative.eagle_worker_common import (
    build_eagle_verify_input,
    run_eagle_verify,
)
from sglang.srt.speculative.spec_info import SpecInput, SpecInputType


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
    target_worker,
    req_to_token_pool,
    token_to_kv_pool_allocator,
    grammar_barrier=None,
):
    """One target verify forward of ``[bonus, d_1..d_k]`` per request;
    returns SGLang's GenerationBatchResult (accept_lens include the bonus)."""
    bs, num_steps = draft_tokens.shape
    device = batch.device
    parents, scores = chain_topology(num_steps, bs, device)
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
