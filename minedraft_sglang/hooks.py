"""The one place MineDraft changes SGLang's scheduler behaviour.

A PSD step verifies only one of the two sub-batches, so the worker returns
results for those rows alone (``result.minedraft_rows``). The scheduler's
decode-result processing is run on a view of the running batch holding just
those rows; the other half is untouched until its own turn.
"""

from __future__ import annotations


def process_batch_result_decode_around(original, processor, batch, result):
    rows = getattr(result, "minedraft_rows", None)
    if rows is None:
        return original(processor, batch, result)
    from minedraft_sglang.verify import sub_batch_view

    return original(processor, sub_batch_view(batch, rows), result)


def add_speculative_state_around(original, controller, state):
    """``/server_info``'s internal state gains a ``minedraft`` entry: drafter
    slots and pool free counts, which the leak tests read."""
    original(controller, state)
    scheduler = controller.scheduler
    stats = getattr(scheduler.draft_worker, "minedraft_stats", None)
    if stats is not None:
        state["minedraft"] = {
            **stats(),
            "token_pool_available": int(scheduler.token_to_kv_pool_allocator.available_size()),
            "req_pool_available": int(scheduler.req_to_token_pool.available_size()),
        }


def eagle_sample_around(original, verify_input, batch, logits_output, grammar_mask=None, *args, **kwargs):
    """MINEDRAFT verifies apply exact per-position penalties, and batches with
    sampled requests use our rejection sampling (verify.sample_chain);
    everything else is SGLang's."""
    from minedraft_sglang.verify import current_verify, sample_chain

    context = current_verify()
    if context is not None and not batch.forward_mode.is_idle():
        if context.penalties is not None:
            context.penalties(logits_output.next_token_logits)
        if not batch.sampling_info.is_all_greedy:
            return sample_chain(verify_input, batch, logits_output, context, grammar_mask)
    return original(verify_input, batch, logits_output, grammar_mask, *args, **kwargs)
