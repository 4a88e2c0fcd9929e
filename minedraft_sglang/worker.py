"""The MINEDRAFT speculative worker: SGLang's side of the PSD loop.

SGLang's scheduler keeps one running batch and calls
``forward_batch_generation`` once per engine step. This worker builds the
drafter and the loop (``psd_loop.py``, where the PSD step is) and joins them
to SGLang: the target's prefill, the verify forward (``verify.py``), and the
step's result for the scheduler, which for a PSD step holds the verified
sub-batch's rows only (``verify.mark_rows``).

Under ``--tp N`` every TP rank builds this worker; only rank 0 loads the
drafter and plans, and the other ranks verify what it decides
(``tp_sync.py``).
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.managers.schedule_batch import ScheduleBatch
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
from sglang.srt.runtime_context import get_parallel, get_spec
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.spec_info import SpecInput, SpecInputType

from minedraft_sglang import devices, model_files, tp_sync
from minedraft_sglang.config import DRAFTER_FOR_ARCHITECTURE, MineDraftConfig
from minedraft_sglang.drafters import create_drafter, eagle
from minedraft_sglang.psd_loop import PSDLoop, stitch_seq_lens
from minedraft_sglang.tp_sync import VerifyDecision
from minedraft_sglang.verify import mark_rows, sub_batch_view, verify_chain

logger = logging.getLogger(__name__)


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


class MineDraftWorker(BaseSpecWorker):
    def __init__(self, server_args, gpu_id: int, nccl_port: int, target_worker):
        super().__init__()
        self.server_args = server_args
        self._target_worker = target_worker
        self._draft_worker = None
        self.model_runner = target_worker.model_runner
        spec = get_spec()
        config = MineDraftConfig.from_env()
        tp = _tp_link()
        draft_revision = getattr(server_args, "speculative_draft_model_revision", None)
        # Every TP rank prepares its target alike, from the draft checkpoint's
        # config, though only rank 0 loads the drafter and reads features: a
        # prefill that returns hidden states runs eagerly where one that does
        # not may replay SGLang's prefill graph, and ranks that differ there
        # mix graph and eager collectives (custom all-reduce reads peer
        # buffers the others did not write).
        draft_config = model_files.draft_config(spec.speculative_draft_model_path, draft_revision)
        kind = DRAFTER_FOR_ARCHITECTURE[draft_config["architectures"][0]]
        self.needs_features = kind != "standalone"
        if kind == "eagle3":
            # The target returns the head's layers' outputs side by side as
            # its hidden states. The scheduler builds this worker before the
            # pools, attention backends and graphs, so the target's graphs
            # are captured with these outputs already on.
            self.model_runner.model.set_eagle3_layers_to_capture(
                eagle.target_capture(draft_config, self.model_runner.model_config.num_hidden_layers)
            )
        drafter = draft_device = None
        if tp is None or tp.leads:
            target_on_cuda = torch.device(self.model_runner.device).type == "cuda"
            placement = devices.place_drafter(
                config.draft_device,
                self.model_runner.gpu_id if target_on_cuda else None,
                tp_size=server_args.tp_size,
                gpu_id_step=server_args.gpu_id_step,
                nnodes=server_args.nnodes,
            )
            draft_device = placement.device
            drafter = create_drafter(
                device=draft_device,
                model_path=spec.speculative_draft_model_path,
                target_path=server_args.model_path,
                target_dtype=self.model_runner.dtype,
                draft_compile=config.draft_compile,
                draft_vocab=config.draft_vocab,
                draft_weights=config.draft_weights,
                draft_revision=draft_revision,
                target_revision=getattr(server_args, "revision", None),
            )
        self.config = config
        self.drafter = drafter
        self.draft_device = draft_device
        self.device = self.model_runner.device
        self.topk = 1
        self.speculative_num_steps = spec.speculative_num_steps
        self.speculative_num_draft_tokens = spec.speculative_num_draft_tokens
        self.tp = tp
        self.loop = PSDLoop(
            config=config,
            drafter=drafter,
            draft_device=draft_device,
            device=self.device,
            num_steps=spec.speculative_num_steps,
            prometheus=server_args.enable_metrics,
            tp=tp,
        )

    @property
    def draft_worker(self):
        # No SGLang ModelRunner for the draft: the drafter is ours.
        return None

    def alloc_memory_pool(self, **kwargs):
        self.req_to_token_pool, self.token_to_kv_pool_allocator = self._target_worker.get_memory_pool()
        if self.drafter is None:
            return
        max_requests = devices.drafter_slots(self.model_runner.max_running_requests)
        max_len = devices.drafter_max_len(
            self.config.draft_max_len, self.model_runner.model_config.context_len, self.speculative_num_draft_tokens
        )
        nbytes = self.drafter.allocate(max_requests, max_len, max_drafts=self.speculative_num_steps)
        self.drafter_slots = max_requests
        logger.info(
            "MineDraft: drafter KV cache on %s (outside SGLang's memory pool): up to %d "
            "requests x %d tokens = %.1f MiB, allocated %s",
            self.draft_device,
            max_requests,
            max_len,
            nbytes / 2**20,
            "now (on a GPU it never grows)" if self.draft_device.startswith("cuda") else "as requests arrive",
        )

    def minedraft_stats(self) -> dict:
        if self.drafter is None:
            # SGLang asks every TP rank; rank 0's answer is the one reported.
            return {"mode": self.config.mode, "tp_rank": self.tp.rank}
        return {**self.loop.stats(), "drafter_total_slots": self.drafter_slots}

    def note_request_finished(self, *, rid: str, natural_stop: bool) -> None:
        # Called between steps, when no draft is in flight.
        if self.drafter is not None:
            self.loop.release(rid)

    def forward_batch_generation(
        self,
        batch: ScheduleBatch,
        on_publish=None,
        grammar_barrier=None,
        pp_proxy_tensors=None,
    ) -> GenerationBatchResult:
        if batch.forward_mode.is_extend() or batch.is_extend_in_batch:
            return self._prefill(batch, on_publish)

        def verify(decision: VerifyDecision):
            return self._verify(batch, decision, grammar_barrier)

        if self.drafter is None:
            rows, result = self.loop.follow(len(batch.reqs), verify)
        else:
            rows, result = self.loop.step(batch.reqs, verify)
        return self._finish(batch, rows, result, on_publish)

    def _prefill(self, batch: ScheduleBatch, on_publish) -> GenerationBatchResult:
        capture = CaptureHiddenMode.FULL if self.needs_features else None
        result = self.loop.prefill(
            batch.reqs, lambda: self.target_worker.forward_batch_generation(batch, capture_hidden_mode=capture)
        )
        if self.drafter is not None and self.needs_features:
            features = result.logits_output.hidden_states.split(list(batch.extend_lens))
            self.loop.observe((req.rid, start, f) for req, start, f in zip(batch.reqs, batch.prefix_lens, features))
        new_seq_lens = batch.seq_lens.clone()
        if on_publish is not None:
            on_publish(new_seq_lens)
        return GenerationBatchResult(
            logits_output=result.logits_output,
            next_token_ids=result.next_token_ids,
            can_run_cuda_graph=result.can_run_cuda_graph,
            accept_lens=torch.ones(len(batch.reqs), dtype=torch.int32, device=self.device),
            new_seq_lens=new_seq_lens,
            next_draft_input=MineDraftState(),
            speculative_num_draft_tokens=self.speculative_num_draft_tokens,
        )

    def _verify(self, batch: ScheduleBatch, decision: VerifyDecision, grammar_barrier):
        """SGLang's verify forward of ``decision`` (on every TP rank alike), on
        a view of the verified rows when they are not the whole batch."""
        view = batch if len(decision.rows) == len(batch.reqs) else sub_batch_view(batch, decision.rows)
        bonus = torch.tensor([req.output_ids[-1] for req in view.reqs], dtype=torch.int32, device=self.device)
        num_drafts = decision.num_drafts
        return verify_chain(
            view,
            bonus,
            decision.drafts.to(self.device),
            num_drafts=None if num_drafts is None else num_drafts.to(self.device),
            target_worker=self.target_worker,
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool_allocator=self.token_to_kv_pool_allocator,
            grammar_barrier=grammar_barrier,
            tp=self.tp,
        )

    def _finish(self, batch: ScheduleBatch, rows: list[int], result, on_publish):
        """The step's result for the scheduler: ``new_seq_lens`` of the whole
        running batch, and which of its rows the (compact) results are for."""
        if len(rows) == len(batch.reqs):
            rows = None  # all of them
        else:
            result.new_seq_lens = stitch_seq_lens(batch.seq_lens, rows, result.new_seq_lens)
        if on_publish is not None:
            on_publish(result.new_seq_lens)
        result.next_draft_input = MineDraftState()
        mark_rows(result, rows)
        return result


def _tp_link() -> tp_sync.TpLink | None:
    """This scheduler process's place in the target's TP group (None without TP)."""
    return tp_sync.TpLink.from_group(get_parallel().tp_group)
