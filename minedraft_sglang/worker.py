"""The MINEDRAFT speculative worker: the PSD loop lives in this file.

SGLang's scheduler keeps one running batch and calls
``forward_batch_generation`` once per engine step. In ``psd`` mode this worker
splits that batch into two sub-batches and, in each step, verifies one on the
target while the drafter drafts the other on its own device (its own thread
on CPU); the roles swap every step. In ``sequential`` mode it drafts the whole
batch, then verifies it: classic speculative decoding. In ``auto`` mode (the
default) a step with only one non-empty half (e.g. a single running request)
drafts ahead instead: while the target verifies, the drafter drafts the next
step assuming the current drafts are all accepted (PEARL).

A PSD step returns results for the verified sub-batch only; ``verify.py``
makes the scheduler's result processing look at just those rows.

Under ``--tp N`` every TP rank builds this worker; only rank 0 loads the
drafter and plans, and the other ranks verify what it decides
(``tp_sync.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from sglang.srt.managers.schedule_batch import ScheduleBatch
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
from sglang.srt.runtime_context import get_spec
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.spec_info import SpecInput, SpecInputType

from minedraft_sglang import adaptive_k, devices, metrics, tp_sync
from minedraft_sglang.config import MineDraftConfig
from minedraft_sglang.cpu import affinity
from minedraft_sglang.drafters import create_drafter
from minedraft_sglang.drafters.base import Drafter, DraftRequest, read_on_this_stream
from minedraft_sglang.metrics import StepMode
from minedraft_sglang.sampling.tetris import tetris_select
from minedraft_sglang.sub_batches import SubBatches
from minedraft_sglang.tp_sync import VerifyDecision
from minedraft_sglang.verify import mark_rows, sub_batch_view, verify_chain

logger = logging.getLogger(__name__)

MAX_DRAFT_REQUESTS = 256
# Drafts need recent context, not the whole window; requests longer than
# this are verified without drafts unless --minedraft-draft-max-len says more.
DEFAULT_DRAFT_MAX_LEN = 4096


class _Drafts:
    """Draft tokens proposed for one request, valid while its length is
    still the one they were drafted from (and, for a draft-ahead guess, while
    its last token is the guessed ``anchor``)."""

    __slots__ = ("tokens", "probs", "base_len", "anchor")

    def __init__(self, tokens, probs, base_len: int, anchor: int | None = None):
        self.tokens = tokens
        self.probs = probs
        self.base_len = base_len
        self.anchor = anchor


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


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one engine step does: verify ``verify_rows`` (indices into the
    running batch) while the drafter drafts ``k`` tokens per request for
    ``draft_rows`` (psd) or the verified rows' next step (draft_ahead), on
    ``draft_cores`` of the server's cores (the rest verify; 0: cores not
    managed). A stage that runs alone runs on every core."""

    mode: StepMode
    verify_rows: list[int]
    draft_rows: list[int]
    k: int
    draft_cores: int = 0


class MineDraftWorker(BaseSpecWorker):
    def __init__(self, server_args, gpu_id: int, nccl_port: int, target_worker):
        super().__init__()
        self.server_args = server_args
        self._target_worker = target_worker
        self._draft_worker = None
        self.model_runner = target_worker.model_runner
        spec = get_spec()
        config = MineDraftConfig.from_env()
        tp = tp_sync.TpLink.from_sglang()
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
                draft_revision=getattr(server_args, "speculative_draft_model_revision", None),
                target_revision=getattr(server_args, "revision", None),
            )
            if drafter.aux_layer_ids is not None:
                # EAGLE-3: the target returns these layers' outputs side by
                # side as its hidden states. The scheduler builds this worker
                # before the pools, attention backends and graphs, so the
                # target's graphs are captured with these outputs already on.
                # Only rank 0 reads features; keeping them is local to a rank
                # (no collective), so the other ranks' forwards need not.
                self.model_runner.model.set_eagle3_layers_to_capture(drafter.aux_layer_ids)
        self._init_loop(
            config=config,
            drafter=drafter,
            draft_device=draft_device,
            device=self.model_runner.device,
            num_steps=spec.speculative_num_steps,
            num_draft_tokens=spec.speculative_num_draft_tokens,
            prometheus=server_args.enable_metrics,
            tp=tp,
        )

    def _init_loop(
        self,
        *,
        config: MineDraftConfig,
        drafter: Drafter | None,
        draft_device: str | None,
        device,
        num_steps: int,
        num_draft_tokens: int,
        prometheus: bool = False,
        tp: tp_sync.TpLink | None = None,
    ) -> None:
        """The PSD loop's own state, apart from SGLang's objects (the unit
        tests build a worker through this alone). ``drafter`` is None on a TP
        rank other than 0."""
        self.config = config
        self.tp = tp
        self.drafter = drafter
        self.draft_device = draft_device
        self.device = device
        self.topk = 1
        self.speculative_num_steps = num_steps
        self.speculative_num_draft_tokens = num_draft_tokens
        # k: drafts per request SD would verify. With TETRIS the drafter
        # proposes k + extra and the budget is k per verified request.
        self.k = num_steps - (config.tetris_extra if config.tetris else 0)
        self.cores = None
        if drafter is None:
            # Sub-batches, pending drafts, the planner, the trace, the cores
            # and the drafter's thread are rank 0's alone.
            logger.info("MineDraft: TP rank %d verifies what TP rank 0 decides (the drafter lives there)", tp.rank)
            return
        self.cores = self._plan_cores()
        # --minedraft-k auto: the mode, k (k = 0: a plain decode step) and the
        # core split are chosen every step from the measured costs.
        self.planner = (
            adaptive_k.KPlanner(
                num_steps,
                total_cores=len(self.cores.all) if self.cores else 0,
                draft_core_counts=sorted(self.cores.splits) if self.cores else [0],
            )
            if config.k == "auto"
            else None
        )
        self.sub_batches = SubBatches()
        self.pending: dict[str, _Drafts] = {}
        self.drafter_failures = 0
        self.tracer = metrics.StepTracer(
            config.trace_file, metrics.PrometheusMetrics(num_steps) if prometheus else None
        )
        # One thread owns the drafter: PSD drafts there while this (the
        # scheduler) thread runs the target's verify.
        self.executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="minedraft-drafter",
            initializer=_init_drafter_thread,
            initargs=(draft_device,),
        )
        # Started now, not at the first PSD step, so /server_info and /proc
        # show both threads from the start.
        self.scheduler_tid = threading.get_native_id()
        self.drafter_tid = self.executor.submit(threading.get_native_id).result()
        if self.cores:
            # One after the other: each finds its OpenMP threads by the CPU
            # time they burn while nothing else computes.
            self.verify_team = affinity.Team.discover(self.cores.all)
            widest = self.cores.splits[max(self.cores.splits)].drafter
            self.drafter_team = self.executor.submit(affinity.Team.discover, widest).result()
        logger.info(
            "MineDraft: mode=%s drafter=%s on %s, k=%s, drafts per request=%d, tetris=%s",
            config.mode,
            type(drafter).__name__,
            draft_device,
            f"auto (0..{self.k})" if self.planner else self.k,
            num_steps,
            config.tetris,
        )

    def _plan_cores(self) -> affinity.CorePlan | None:
        """A CPU drafter shares the scheduler process's cores with the target:
        the splits its steps may overlap on. None where they are not ours to
        move: a GPU drafter, or TP (the ranks share the machine's cores)."""
        if self.draft_device != "cpu" or self.tp is not None:
            return None
        cores = affinity.plan_cores(os.sched_getaffinity(0), self.config.draft_cores)
        if cores is None:
            logger.warning(
                "MineDraft: one CPU core available; draft and verify share it, so PSD "
                "cannot overlap them (give the server two cores or more)"
            )
            return None
        logger.info(
            "MineDraft: cores %s; a stage that runs alone uses all of them, overlapping stages split them "
            "(drafter on %s)",
            affinity.format_cores(cores.all),
            " or ".join(affinity.format_cores(s.drafter) for s in cores.splits.values()),
        )
        return cores

    @property
    def draft_worker(self):
        # No SGLang ModelRunner for the draft: the drafter is ours.
        return None

    def alloc_memory_pool(self, **kwargs):
        self.req_to_token_pool, self.token_to_kv_pool_allocator = self._target_worker.get_memory_pool()
        if self.drafter is None:
            return
        # SGLang's request cap defaults to thousands; dense per-request draft
        # KV for all of them would not fit, so the drafter holds at most
        # MAX_DRAFT_REQUESTS (requests beyond it are verified without drafts).
        max_requests = min(self.model_runner.max_running_requests, MAX_DRAFT_REQUESTS)
        max_len = (
            self.config.draft_max_len
            or min(self.model_runner.model_config.context_len, DEFAULT_DRAFT_MAX_LEN)
            + self.speculative_num_draft_tokens
        )
        nbytes = self.drafter.allocate(max_requests, max_len)
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
        return {
            "mode": self.config.mode,
            "draft_device": self.draft_device,
            # Read back from the kernel, not from our split: what the threads
            # really have.
            "scheduler_cores": sorted(affinity.thread_cores(self.scheduler_tid)),
            "drafter_cores": sorted(affinity.thread_cores(self.drafter_tid)),
            **({"core_plan": _describe(self.cores, self.verify_team, self.drafter_team)} if self.cores else {}),
            "drafter_free_slots": self.drafter.free_slots(),
            "drafter_total_slots": self.drafter_slots,
            "drafter_active_requests": len(self.drafter.active_rids()),
            "pending_drafts": len(self.pending),
            "drafter_failures": self.drafter_failures,
            "sub_batch_sizes": self.sub_batches.sizes(),
            "k": "auto" if self.planner else self.k,
            **({"planner": self.planner.summary()} if self.planner else {}),
            **self.tracer.summary(),
        }

    def note_request_finished(self, *, rid: str, natural_stop: bool) -> None:
        # Called between steps, when no draft is in flight.
        if self.drafter is not None:
            self._release(rid)

    def _release(self, rid: str) -> None:
        self.pending.pop(rid, None)
        self.drafter.release(rid)

    # ------------------------------------------------------------------ step

    def forward_batch_generation(
        self,
        batch: ScheduleBatch,
        on_publish=None,
        grammar_barrier=None,
        pp_proxy_tensors=None,
    ) -> GenerationBatchResult:
        if batch.forward_mode.is_extend() or batch.is_extend_in_batch:
            return self._prefill(batch, on_publish)
        if self.drafter is None:
            # A TP rank other than 0: it verifies what rank 0 decided.
            decision = self.tp.share_decision(None, batch_size=len(batch.reqs), max_width=self.speculative_num_steps)
            view, result = self._verify_rows(batch, decision, grammar_barrier)
            return self._finish(batch, view, decision.rows, result, on_publish)
        rids = [req.rid for req in batch.reqs]
        for rid in (self.drafter.active_rids() | self.pending.keys()) - set(rids):
            # Retracted (or aborted) requests: their drafts are stale. (A
            # request whose draft failed holds placeholder drafts only.)
            self._release(rid)
        plan = self._plan(rids)
        return self._step(batch, plan, on_publish=on_publish, grammar_barrier=grammar_barrier)

    def _plan(self, rids: list[str]) -> StepPlan:
        everyone = list(range(len(rids)))
        verify_rows, draft_rows = self.sub_batches.split(rids) if self.config.mode != "sequential" else (everyone, [])
        modes = _modes(self.config.mode, psd=bool(verify_rows and draft_rows))
        if self.planner is not None:
            choice = self.planner.choose(len(verify_rows), len(draft_rows), modes)
        else:
            # A fixed k: PSD where both halves hold requests; otherwise
            # draft-ahead in auto mode, sequential SD in the others.
            mode = next(m for m in (StepMode.PSD, StepMode.DRAFT_AHEAD, StepMode.SEQUENTIAL) if m in modes)
            overlap = self.cores and mode in adaptive_k.OVERLAP
            choice = adaptive_k.Option(mode, self.speculative_num_steps, self.cores.default if overlap else 0)
        if choice.mode is StepMode.PSD:
            return StepPlan(choice.mode, verify_rows, draft_rows, choice.k, choice.draft_cores)
        return StepPlan(choice.mode, everyone, [], choice.k, choice.draft_cores)

    def _use_all_cores(self) -> None:
        """This (the scheduler) thread's team on every core: called while the
        drafter's thread is idle."""
        if self.cores:
            self.verify_team.use(self.cores.all)

    def _prefill(self, batch: ScheduleBatch, on_publish) -> GenerationBatchResult:
        # Without a drafter (TP ranks other than 0) only the target prefills.
        needs_features = self.drafter is not None and self.drafter.needs_target_features
        drafter_prefill = None
        if self.drafter is not None and not self.cores:
            # The drafter's own device is idle during a prefill step: it fills
            # the drafter's cache with the same prompts meanwhile, which
            # otherwise lands in the requests' first draft, on the critical
            # path. A CPU drafter prefills after the target instead, each on
            # every core: prefill is compute-bound, so a stage should take
            # about 1/n of its one-core time on n cores, and the sum of the
            # two beat the longer one on a split (docs/design.md).
            drafter_prefill = self.executor.submit(self._safe_prefill, _draft_requests(batch.reqs))
        self._use_all_cores()
        result = self.target_worker.forward_batch_generation(
            batch, capture_hidden_mode=CaptureHiddenMode.FULL if needs_features else None
        )
        if drafter_prefill is not None:
            drafter_prefill.result()
        elif self.drafter is not None:
            self._safe_prefill(_draft_requests(batch.reqs))
        if needs_features:
            features = result.logits_output.hidden_states.split(list(batch.extend_lens))
            for req, start, f in zip(batch.reqs, batch.prefix_lens, features):
                self.drafter.observe(req.rid, start, f)
            self._features_copied()
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

    def _step(self, batch: ScheduleBatch, plan: StepPlan, *, on_publish, grammar_barrier) -> GenerationBatchResult:
        """One engine step: verify ``plan.verify_rows`` on the target while the
        drafter drafts k tokens per request in the background for
          psd:         the other sub-batch (``draft_rows``), for the next step;
          draft_ahead: the verified requests themselves, assuming all their
                       drafts get accepted (PEARL); kept only where that held;
          sequential:  nothing (drafts were made before the verify);
          plain:       nothing (k = 0: every request verifies its last token
                       alone, a plain decode step).
        """
        mode, verify_rows, draft_rows, k = plan.mode, plan.verify_rows, plan.draft_rows, plan.k
        reqs = batch.reqs
        verify_reqs = [reqs[i] for i in verify_rows]
        split = self.cores.splits[plan.draft_cores] if self.cores and mode in adaptive_k.OVERLAP else None
        t0 = time.monotonic()
        missing = []
        if mode is StepMode.PLAIN:
            for r in verify_reqs:
                self.pending.pop(r.rid, None)
            drafts = torch.zeros(len(verify_reqs), 0, dtype=torch.int64)
            taken = []
        else:
            missing = [r for r in verify_reqs if not self._has_drafts(r)]
            if missing:
                # Newcomers of the verified half, requests moved by
                # re-balancing, failed draft-ahead guesses, requests after a
                # plain step, or every request in sequential mode: drafted
                # alone, on every core.
                self._use_all_cores()
                self._draft(_draft_requests(missing), k)
            taken = [self.pending.pop(r.rid) for r in verify_reqs]
            read_on_this_stream([t for d in taken for t in (d.tokens, d.probs)])
            # Drafts made at different k (the planner moved): verify the
            # common prefix; a prefix of a chain draft is a chain draft.
            width = min(len(d.tokens) for d in taken)
            drafts = torch.stack([d.tokens[:width] for d in taken])
        num_drafts = None
        if self.config.tetris:
            logprobs = torch.stack([d.probs for d in taken]).clamp_min(1e-30).log()
            num_drafts = tetris_select(logprobs, self.k * len(verify_reqs))
        background: Future | None = None
        if split is not None:
            # This thread's team leaves the drafter's cores before the
            # drafter's team takes them.
            self.verify_team.use(split.scheduler)
        else:
            self._use_all_cores()
        if mode is StepMode.PSD:
            background = self.executor.submit(
                self._timed, split, self._draft, _draft_requests([reqs[i] for i in draft_rows]), k
            )
        elif mode is StepMode.DRAFT_AHEAD:
            ahead = _draft_requests(verify_reqs, extra=drafts.tolist())
            background = self.executor.submit(self._timed, split, self._draft_ahead, ahead, k)
        if missing:
            # The drafts made on this thread may still be computing: the
            # draft ends, and the verify starts, at their completion.
            _sync_stream(self.draft_device)
        t1 = time.monotonic()
        decision = VerifyDecision(verify_rows, drafts, num_drafts)
        if self.tp is not None:
            self.tp.share_decision(decision, batch_size=len(reqs), max_width=self.speculative_num_steps)
        view, result = self._verify_rows(batch, decision, grammar_barrier)
        # The verify's kernels may still be running: it ends at their
        # completion (the planner and the trace read t2).
        _sync_stream(self.device)
        t2 = time.monotonic()
        if background is not None:
            _, draft_interval, draft_thread = background.result()
        else:
            draft_interval, draft_thread = (t0, t1), threading.current_thread().name
        if self.drafter.needs_target_features:
            # After the background draft: the drafter is this thread's now.
            self._observe_verified(view.reqs, result, drafts.shape[1] + 1)
        accept_lens = result.accept_lens.tolist()
        verify_cores, draft_cores = adaptive_k.stage_cores(
            len(self.cores.all) if self.cores else 0, plan.mode, plan.draft_cores
        )
        if self.planner is not None:
            self._measure(
                plan,
                drafts=drafts,
                accept_lens=accept_lens,
                times=(t0, t1, t2),
                n_missing=len(missing),
                background=background and draft_interval,
                cores=(verify_cores, draft_cores),
            )
        self.tracer.step(
            mode=mode,
            draft=draft_interval,
            verify=(t1, t2),
            verify_bs=len(verify_rows),
            draft_bs=len(draft_rows) or len(verify_rows),
            draft_thread=draft_thread,
            accept_lens=accept_lens,
            verified_drafts=int(num_drafts.sum()) if num_drafts is not None else drafts.numel(),
            k=drafts.shape[1],
            verify_cores=verify_cores,
            draft_cores=draft_cores,
        )
        return self._finish(batch, view, verify_rows, result, on_publish)

    def _verify_rows(self, batch: ScheduleBatch, decision: VerifyDecision, grammar_barrier):
        """Verify ``decision`` (on every TP rank alike); returns the batch the
        verify ran on (``batch`` itself when every row is verified) and
        SGLang's result."""
        rows = decision.rows
        view = batch if len(rows) == len(batch.reqs) else sub_batch_view(batch, rows)
        result = self._verify(view, decision.drafts, num_drafts=decision.num_drafts, grammar_barrier=grammar_barrier)
        return view, result

    def _measure(self, plan: StepPlan, *, drafts, accept_lens, times, n_missing, background, cores) -> None:
        """Feed the planner this step's stage costs (with the cores each
        stage ran on) and acceptance."""
        t0, t1, t2 = times
        k = plan.k
        bs, width = drafts.shape
        verify_cores, draft_cores = cores
        self.planner.observe_verify(verify_cores, bs * (width + 1), t2 - t1)
        if n_missing:
            # Drafted before the verify, on this thread, on every core.
            self.planner.observe_draft(self.planner.total_cores, n_missing, k, t1 - t0)
        if background:
            # psd: the other half, k tokens; draft_ahead: the verified rows, k + 1.
            requests, forwards = (bs, k + 1) if plan.mode is StepMode.DRAFT_AHEAD else (len(plan.draft_rows), k)
            self.planner.observe_draft(draft_cores, requests, forwards, background[1] - background[0])
        if width:
            self.planner.observe_acceptance([n - 1 for n in accept_lens], [width] * bs)

    # --------------------------------------------------------------- helpers

    def _timed(self, split: affinity.CoreSplit | None, fn, *args):
        """On the drafter's thread: ``fn(*args)`` (on the drafter's cores of
        ``split``) and its interval, ended when its kernels have finished
        (the scheduler thread reads the drafts next, from another stream)."""
        if split is not None:
            self.drafter_team.use(split.drafter)
        t0 = time.monotonic()
        out = fn(*args)
        _sync_stream(self.draft_device)
        return out, (t0, time.monotonic()), threading.current_thread().name

    def _has_drafts(self, req) -> bool:
        d = self.pending.get(req.rid)
        if d is None or d.base_len != len(req.origin_input_ids) + len(req.output_ids):
            return False
        # Draft-ahead guesses also bet on the bonus token.
        return d.anchor is None or req.output_ids[-1] == d.anchor

    def _draft(self, draft_reqs: Sequence[DraftRequest], k: int) -> None:
        """Draft ``draft_reqs`` on the drafter's device and remember the
        tokens ([k] each) until the request is verified."""
        tokens, probs = self._safe_draft(draft_reqs, k)
        for req, t, p in zip(draft_reqs, tokens, probs):
            self.pending[req.rid] = _Drafts(t, p, len(req))

    def _draft_ahead(self, draft_reqs: Sequence[DraftRequest], k: int) -> None:
        """``draft_reqs`` end with this step's drafts. Propose k + 1 more: the
        first is a guess of the bonus token, the rest are next step's drafts,
        valid if every draft and the guess turn out right."""
        tokens, probs = self._safe_draft(draft_reqs, k + 1)
        for req, t, p in zip(draft_reqs, tokens, probs):
            self.pending[req.rid] = _Drafts(t[1:], p[1:], len(req) + 1, anchor=int(t[0]))

    def _safe_prefill(self, draft_reqs: Sequence[DraftRequest]) -> None:
        try:
            self.drafter.prefill(draft_reqs)
        except Exception as e:  # noqa: BLE001 - the first draft recomputes what is missing
            logger.warning("MineDraft drafter prefill failed (%s: %s)", type(e).__name__, e)
            for req in draft_reqs:
                self.drafter.release(req.rid)

    def _safe_draft(self, draft_reqs: Sequence[DraftRequest], num_tokens: int):
        """The drafter's proposal, or, if the drafter fails, a placeholder
        that the target verifies like any draft: the affected requests then
        decode one token per step (plain decoding) and stay exact."""
        try:
            out = self.drafter.draft(draft_reqs, num_tokens)
            return out.tokens, out.probs
        except Exception as e:  # noqa: BLE001 - any drafter failure must not stop serving
            self.drafter_failures += 1
            logger.warning(
                "MineDraft drafter failed (%s: %s); %d request(s) fall back to plain "
                "decoding for this step (%d failures so far)",
                type(e).__name__,
                e,
                len(draft_reqs),
                self.drafter_failures,
            )
            for req in draft_reqs:
                # Its cache rows may be half written.
                self.drafter.release(req.rid)
            # On the drafter's device, like the drafts they are stacked with.
            last = torch.tensor([req.token(len(req) - 1) for req in draft_reqs], device=self.draft_device)
            # Zero probability also tells TETRIS not to spend budget here.
            return last[:, None].repeat(1, num_tokens), torch.zeros(
                len(draft_reqs), num_tokens, device=self.draft_device
            )

    def _verify(self, batch: ScheduleBatch, drafts: torch.Tensor, *, num_drafts, grammar_barrier):
        bonus = torch.tensor([req.output_ids[-1] for req in batch.reqs], dtype=torch.int32, device=self.device)
        return verify_chain(
            batch,
            bonus,
            drafts.to(self.device),
            num_drafts=None if num_drafts is None else num_drafts.to(self.device),
            target_worker=self.target_worker,
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool_allocator=self.token_to_kv_pool_allocator,
            grammar_barrier=grammar_barrier,
            tp=self.tp,
        )

    def _observe_verified(self, reqs, result, width: int) -> None:
        """Hand the drafter the target's features of the accepted positions:
        the last committed token's and each accepted draft's (``width``:
        the verify window, drafts + 1)."""
        features = result.logits_output.hidden_states.view(len(reqs), width, -1)
        for req, f, n in zip(reqs, features, result.accept_lens.tolist()):
            start = len(req.origin_input_ids) + len(req.output_ids) - 1
            self.drafter.observe(req.rid, start, f[:n])
        self._features_copied()

    def _features_copied(self) -> None:
        # Features were copied on this thread's stream; the drafter's thread
        # reads them on its own.
        if self.draft_device.startswith("cuda"):
            torch.cuda.synchronize(self.draft_device)

    def _finish(self, batch: ScheduleBatch, view: ScheduleBatch, rows: list[int], result, on_publish):
        """The step's result for the scheduler: ``new_seq_lens`` of the whole
        running batch, and which of its rows the (compact) results are for."""
        if view is batch:
            rows = None  # all of them
        else:
            new_seq_lens = batch.seq_lens.clone()
            new_seq_lens[torch.tensor(rows, device=self.device)] = result.new_seq_lens
            result.new_seq_lens = new_seq_lens
        if on_publish is not None:
            on_publish(result.new_seq_lens)
        result.next_draft_input = MineDraftState()
        mark_rows(result, rows)
        return result


def _draft_requests(reqs, extra: list[list[int]] | None = None) -> list[DraftRequest]:
    """Snapshots of the requests' tokens (plus ``extra`` tokens each) that the
    drafter thread can read while the scheduler thread moves on."""
    extra = extra or [[] for _ in reqs]
    return [DraftRequest(r.rid, r.origin_input_ids, [*r.output_ids, *e]) for r, e in zip(reqs, extra)]


def _sync_stream(device) -> None:
    """Wait for the work this thread queued on ``device`` (a CUDA device's
    current stream; nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _init_drafter_thread(device: str) -> None:
    """The drafter's thread gets its own CUDA stream: PSD drafting must not
    queue behind the target's verify kernels on a shared GPU. (On CPU each
    step moves it onto its cores: ``_timed``.) Its OS-level name is inherited
    by the OpenMP threads it starts."""
    affinity.name_current_thread("minedraft-draft")
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.cuda.set_stream(torch.cuda.Stream(device))


def _modes(setting: str, *, psd: bool) -> set[StepMode]:
    """What a step may run as under --minedraft-mode ``setting``; ``psd``:
    both sub-batches hold requests."""
    if setting == "sequential":
        return {StepMode.PLAIN, StepMode.SEQUENTIAL}
    if setting == "psd":
        return {StepMode.PLAIN, StepMode.PSD if psd else StepMode.SEQUENTIAL}
    return {StepMode.PLAIN, StepMode.SEQUENTIAL, StepMode.DRAFT_AHEAD, *([StepMode.PSD] if psd else [])}


def _describe(cores: affinity.CorePlan, *teams: affinity.Team) -> dict:
    """/server_info's view of the core plan and the two teams' threads."""
    fmt = affinity.format_cores
    return {
        "all": fmt(cores.all),
        "splits": {d: {"scheduler": fmt(s.scheduler), "drafter": fmt(s.drafter)} for d, s in cores.splits.items()},
        "scheduler_team": sorted([teams[0].master, *teams[0].workers]),
        "drafter_team": sorted([teams[1].master, *teams[1].workers]),
    }
