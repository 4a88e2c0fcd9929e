"""Hooks on SGLang's scheduler and CPU platform (registered in ``plugin.py``).

A PSD step verifies only one of the two sub-batches, so the worker returns
results for those rows alone (``result.minedraft_rows``). The scheduler's
decode-result processing is run on a view of the running batch holding just
those rows; the other half is untouched until its own turn.

The rest lets stock SGLang run on CPU with tensor parallelism and
torch.compile (``docs/design.md``, "Tensor parallelism and graphs on CPU").
MINEDRAFT's verify under SGLang's graph runners is ``graphs.py``.
"""

from __future__ import annotations

import inspect

import torch


def process_batch_result_decode_around(original, processor, batch, result):
    rows = getattr(result, "minedraft_rows", None)
    if rows is None:
        return original(processor, batch, result)
    from minedraft_sglang.verify import sub_batch_view

    return original(processor, sub_batch_view(batch, rows), result)


def eagle_prepare_for_verify_around(original, verify_input, req_to_token_pool, batch, target_worker):
    """A MINEDRAFT verify of width 1 (k = 0, a plain step) runs as SGLang's
    own decode forward (``verify.decode_forward_batch``); every other verify
    is SGLang's."""
    from minedraft_sglang.verify import decode_forward_batch, is_plain_step

    if is_plain_step(verify_input) and not batch.forward_mode.is_idle():
        return decode_forward_batch(verify_input, req_to_token_pool, batch, target_worker)
    return original(verify_input, req_to_token_pool, batch, target_worker)


def add_speculative_state_around(original, controller, state):
    """``/server_info``'s internal state gains a ``minedraft`` entry: drafter
    slots and pool free counts, which the leak tests read, and on CPU with
    graphs how many verifies replayed one."""
    original(controller, state)
    scheduler = controller.scheduler
    stats = getattr(scheduler.draft_worker, "minedraft_stats", None)
    if stats is not None:
        state["minedraft"] = {
            **stats(),
            "token_pool_available": int(scheduler.token_to_kv_pool_allocator.available_size()),
            "req_pool_available": int(scheduler.req_to_token_pool.available_size()),
        }
        from minedraft_sglang import verify

        # k = 0 steps that ran as SGLang's decode forward.
        state["minedraft"]["decode_forwards"] = verify.decode_forwards
        graphs = scheduler.tp_worker.model_runner.decode_cuda_graph_runner
        if hasattr(graphs, "replays"):
            state["minedraft"]["verify_graph_replays"] = graphs.replays


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


def init_model_parallel_group_around(original, *args, **kwargs):
    """No CUDA communicators on a gloo (CPU) group.

    SGLang 0.5.23 builds a PyNcclCommunicator for every group unless the
    platform is NPU or XPU, which fails in every CPU TP rank ("Expected a cuda
    device"), and tries its CUDA custom all-reduce (a warning); gloo does the
    CPU collectives without either.
    """
    bound = inspect.signature(original).bind(*args, **kwargs)
    if bound.arguments["backend"] == "gloo":
        bound.arguments["use_pynccl"] = False
        bound.arguments["use_custom_allreduce"] = False
    return original(*bound.args, **bound.kwargs)


def register_cpu_compile_fake_around(original, op_name):
    """Skip the torch.compile fake of an sgl_kernel op that does not exist.

    The CPU graph runner registers fakes for every sgl-kernel CPU op, and
    registering one for a missing op raises; our pure-torch op set
    (``cpu_kernels/``) leaves the AMX compute kernels out on purpose, so SGLang
    never calls them and they need no fake.
    """
    if hasattr(torch.ops.sgl_kernel, op_name):
        return original(op_name)
    return lambda fake: fake


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
