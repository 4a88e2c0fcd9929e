"""Hooks on SGLang's scheduler around the worker (registered by ``plugin.py``
from ``AROUND_HOOKS``): ``/server_info``'s MINEDRAFT state, and the drafter
rows of requests that finish in their prefill step. The verify round trip's
hooks are in ``verify.py``, CPU serving's in ``cpu/hooks.py``.
"""

from __future__ import annotations


def add_speculative_state_around(original, controller, state):
    """``/server_info``'s internal state gains a ``minedraft`` entry: drafter
    slots and pool free counts, which the leak tests read, and with graphs
    how many forwards of each width replayed one."""
    original(controller, state)
    scheduler = controller.scheduler
    stats = getattr(scheduler.draft_worker, "minedraft_stats", None)
    if stats is not None:
        state["minedraft"] = {
            **stats(),
            "token_pool_available": int(scheduler.token_to_kv_pool_allocator.available_size()),
            "req_pool_available": int(scheduler.req_to_token_pool.available_size()),
        }
        from minedraft_sglang import graphs, verify

        # k = 0 steps that ran as SGLang's decode forward.
        state["minedraft"]["decode_forwards"] = verify.decode_forwards
        runner = scheduler.tp_worker.model_runner.decode_cuda_graph_runner
        if isinstance(runner, graphs.GraphRouter):
            # Forwards that replayed a graph, by tokens per request (1: k = 0).
            state["minedraft"]["graph_replays"] = runner.replays()


def process_batch_result_prefill_around(original, processor, batch, result):
    """Requests that finish in their prefill step (one new token, a stop at
    once, an abort) never reach the decode path, where SGLang calls the
    worker's ``note_request_finished``; without this their drafter rows stay
    held until the next decode step sweeps them (the request fuzzer found a
    busy drafter slot on an idle server, tests/server/test_fuzz.py)."""
    out = original(processor, batch, result)
    from minedraft_sglang.worker import MineDraftWorker

    worker = getattr(processor, "draft_worker", None)
    if isinstance(worker, MineDraftWorker):
        for req in batch.reqs:
            if req.finished():
                worker.note_request_finished(rid=req.rid, natural_stop=False)
    return out


AROUND_HOOKS = {
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController._add_speculative": (
        add_speculative_state_around
    ),
    "sglang.srt.managers.scheduler_components.batch_result_processor."
    "SchedulerBatchResultProcessor.process_batch_result_prefill": process_batch_result_prefill_around,
}
