"""The target's verify of chain drafts: the SGLang round trip, in one file.

Down: the worker calls ``verify_chain`` with the drafts; the verify forward
and the KV commit are SGLang's own (``run_eagle_verify``), so verification
runs through whatever attention backend the target uses (FlashInfer on GPU,
intel_amx on CPU), with grammar and logprobs. Inside it SGLang calls back
two hooks (``AROUND_HOOKS``, installed by ``plugin.register``):
``eagle_prepare_for_verify`` (a k = 0 step becomes SGLang's decode forward)
and ``eagle_sample`` (exact penalties, our rejection sampling); they find the
verify's ``VerifyContext``, drafts included, on their thread.

Up: the worker marks which rows of the running batch its result holds
(``mark_rows``; a PSD step verifies one sub-batch), and the third hook runs
the scheduler's decode-result processing on a view of just those rows.

Acceptance: all-greedy batches use SGLang's greedy walk. Batches with sampled
requests use our rejection sampling (``acceptance.py``) instead of SGLang's,
which on CPU silently falls back to greedy acceptance (its sampling kernel is
CUDA-only) and so would change the output distribution. The drafter drafts
greedily, so its proposal distribution q is one-hot at each draft token: only
token ids cross from the drafter's device.

SGLang is imported where it is used: ``plugin.py`` imports this file for its
hook table in every SGLang process, while SGLang itself is still importing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
from typing import TYPE_CHECKING

import torch

from minedraft_sglang.sampling.acceptance import rejection_sample
from minedraft_sglang.sampling.penalties import PenaltyFn, chain_penalties
from minedraft_sglang.sampling.probs import target_probs
from minedraft_sglang.tp_sync import TpLink

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import ScheduleBatch


@dataclasses.dataclass(frozen=True)
class VerifyContext:
    """What the hooks below need from the MINEDRAFT verify running on their
    thread: SGLang calls them deep inside its own verify, so these cannot
    travel as arguments."""

    # [bs, k] the drafts verified, on the target's device.
    drafts: torch.Tensor
    # Exact per-position penalties; None when no request has one.
    penalties: PenaltyFn | None
    # [bs] drafts to verify per request (TETRIS); None: all of them.
    num_drafts: torch.Tensor | None
    generator: torch.Generator | None
    # Under --tp N: every rank commits TP rank 0's sampled acceptance.
    tp: TpLink | None = None


_current = threading.local()

# k = 0 steps run as SGLang's decode forward in this process (/server_info).
decode_forwards = 0


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
    from sglang.srt.speculative.eagle_utils import default_tree_mask_mode
    from sglang.srt.speculative.eagle_worker_common import build_eagle_verify_input, run_eagle_verify

    bs, num_steps = draft_tokens.shape
    device = batch.device
    context = VerifyContext(draft_tokens, chain_penalties(batch.reqs, draft_tokens), num_drafts, generator, tp)
    # SGLang's speculative penalties are "relaxed" (one vector for the whole
    # chain, counting only the last token of each step); ours replace them.
    # (In a sub-batch view these whole-batch tensors are also unsliced:
    # filter_batch leaves them alone.)
    batch.sampling_info = dataclasses.replace(
        batch.sampling_info, acc_additive_penalties=None, acc_scaling_penalties=None
    )
    if num_steps == 0:
        # k = 0, a plain step: its forward is SGLang's decode
        # (decode_forward_batch); the tree kernel refuses depth 0.
        batch.spec_info = plain_verify_input(batch, bonus_tokens)
    else:
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


def plain_verify_input(batch: ScheduleBatch, bonus_tokens: torch.Tensor):
    """The verify input of a k = 0 step: each request's window is its last
    token alone (a one-node tree), built without SGLang's tree kernel, which
    refuses depth 0 on CUDA (``tree.cuh``: ``CHECK_HOST(topk > 0 && depth >
    0)``). Its forward is a decode (``decode_forward_batch``), which reads
    no tree mask; sampling, grammar, logprobs and the KV commit read the
    rest, as for any verify of width 1."""
    from sglang.srt.speculative.eagle_info import EagleVerifyInput

    bs = len(batch.seq_lens)
    device = batch.seq_lens.device
    no_link = torch.full((bs, 1), -1, dtype=torch.int64, device=device)
    return EagleVerifyInput(
        draft_token=bonus_tokens.to(torch.int64),
        custom_mask=torch.ones(bs, dtype=torch.bool, device=device),
        positions=batch.seq_lens.to(torch.int64),
        retrieve_index=torch.arange(bs, dtype=torch.int64, device=device)[:, None],
        retrieve_next_token=no_link,
        retrieve_next_sibling=no_link.clone(),
        retrieve_cum_len=None,
        spec_steps=0,
        topk=1,
        draft_token_num=1,
        capture_hidden_mode=None,
        seq_lens_sum=None,
        seq_lens_cpu=None,
    )


def is_plain_step(verify_input) -> bool:
    """A MINEDRAFT verify of width 1 on this thread: a k = 0 step."""
    return current_verify() is not None and getattr(verify_input, "draft_token_num", None) == 1


def decode_forward_batch(verify_input, req_to_token_pool, batch: ScheduleBatch, target_worker):
    """What ``eagle_prepare_for_verify`` returns for a verify, made for a
    k = 0 step: SGLang's own decode forward (``ForwardMode.DECODE``, no spec
    input) of each request's last token, so that it costs what plain
    SGLang's step costs and runs where a decode runs (called by the
    ``eagle_prepare_for_verify`` hook below). The token is written where a width-1 verify
    writes it: position seq_len, the first slot of SGLang's speculative
    reserve. ``batch`` itself is left as a verify leaves it (TARGET_VERIFY,
    its window's ids and slots), since the rest of SGLang's verify
    (sampling, grammar, logprobs, the KV commit) reads it."""
    from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_uniform_func
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode

    model_runner = target_worker.model_runner
    batch.input_ids = verify_input.draft_token
    batch.out_cache_loc = assign_extend_cache_locs_uniform_func(
        req_pool_indices=batch.req_pool_indices,
        req_to_token=req_to_token_pool.req_to_token,
        start_offset=batch.seq_lens,
        batch_size=len(batch.req_pool_indices),
        draft_token_num=1,
        device=batch.device,
    )
    verify_input.seq_lens_cpu = batch.seq_lens_cpu
    verify_input.seq_lens_sum = int(batch.seq_lens_cpu.sum()) if batch.seq_lens_cpu is not None else None
    batch.forward_mode = ForwardMode.TARGET_VERIFY
    # A decode's lengths count the token it feeds (ScheduleBatch.prepare_for_decode).
    decode = copy.copy(batch)
    decode.forward_mode = ForwardMode.DECODE
    decode.spec_info = None
    decode.seq_lens = batch.seq_lens + 1
    decode.seq_lens_cpu = None if batch.seq_lens_cpu is None else batch.seq_lens_cpu + 1
    decode.orig_seq_lens = None if batch.orig_seq_lens is None else batch.orig_seq_lens + 1
    decode.seq_lens_sum = None
    capture = CaptureHiddenMode.NULL if model_runner.spec_algorithm.is_standalone() else CaptureHiddenMode.FULL
    forward_batch = ForwardBatch.init_new(
        decode, model_runner, capture_hidden_mode=capture, return_hidden_states_before_norm=False
    )
    global decode_forwards
    decode_forwards += 1
    # A decode graph replays it where one was captured: the target's graph
    # runner sends a DECODE forward to its decode runner (graphs.GraphRouter),
    # as the model runner's forward asks it. SGLang's verify reports this as
    # the step's can_run_cuda_graph.
    runner = model_runner.decode_cuda_graph_runner
    return forward_batch, bool(runner and runner.can_run_graph(forward_batch))


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
    num_drafts = context.num_drafts
    if num_drafts is None:
        num_drafts = torch.full((bs,), width - 1, dtype=torch.int64, device=probs.device)
    out, accept_lens = rejection_sample(context.drafts.to(torch.int64), probs, num_drafts, context.generator)
    predict = out.clamp_min(0).to(torch.int32).flatten()
    cols = torch.arange(width, device=probs.device)
    rows = torch.arange(bs, device=probs.device)[:, None] * width
    accept_index = torch.where(cols[None, :] < accept_lens[:, None], rows + cols[None, :], -1)
    accepted = predict, accept_lens.to(torch.int32), accept_index.to(torch.int32)
    if context.tp is not None:
        return context.tp.share_acceptance(*accepted)
    return accepted


# ------------------------------------------------------------- the rows


def mark_rows(result, rows: list[int] | None) -> None:
    """Say which rows of the running batch ``result`` is for (None: all)."""
    result.minedraft_rows = rows


def result_rows(result) -> list[int] | None:
    """The rows ``mark_rows`` gave ``result``; None for all rows, and for a
    result that is not MINEDRAFT's."""
    return getattr(result, "minedraft_rows", None)


# ------------------------------------------------------------- the hooks


def eagle_prepare_for_verify_around(original, verify_input, req_to_token_pool, batch, target_worker):
    """A MINEDRAFT verify of width 1 (k = 0, a plain step) runs as SGLang's
    own decode forward (``decode_forward_batch``); every other verify is
    SGLang's."""
    if is_plain_step(verify_input) and not batch.forward_mode.is_idle():
        return decode_forward_batch(verify_input, req_to_token_pool, batch, target_worker)
    return original(verify_input, req_to_token_pool, batch, target_worker)


def eagle_sample_around(original, verify_input, batch, logits_output, grammar_mask=None, *args, **kwargs):
    """MINEDRAFT verifies apply exact per-position penalties, and batches with
    sampled requests use our rejection sampling (``sample_chain``);
    everything else is SGLang's."""
    context = current_verify()
    if context is not None and not batch.forward_mode.is_idle():
        if context.penalties is not None:
            context.penalties(logits_output.next_token_logits)
        if not batch.sampling_info.is_all_greedy:
            return sample_chain(verify_input, batch, logits_output, context, grammar_mask)
    return original(verify_input, batch, logits_output, grammar_mask, *args, **kwargs)


def process_batch_result_decode_around(original, processor, batch, result):
    """The scheduler processes a MINEDRAFT result on the rows it is for."""
    rows = result_rows(result)
    if rows is None:
        return original(processor, batch, result)
    return original(processor, sub_batch_view(batch, rows), result)


AROUND_HOOKS = {
    "sglang.srt.speculative.eagle_worker_common.eagle_prepare_for_verify": eagle_prepare_for_verify_around,
    "sglang.srt.speculative.eagle_worker_common.eagle_sample": eagle_sample_around,
    "sglang.srt.managers.scheduler_components.batch_result_processor."
    "SchedulerBatchResultProcessor.process_batch_result_decode": process_batch_result_decode_around,
}
