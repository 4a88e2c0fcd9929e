"""The PSD loop: what one engine step drafts, verifies and records. No SGLang here.

Each decode step of the running batch (``PSDLoop.step``):

    plan    -> which rows verify now, in which mode, at which k, on which cores
    take    -> the verified rows' drafts (``PendingDrafts``; missing ones are drafted now, on every core)
    launch  -> the background draft on the drafter's thread: the other sub-batch (psd) or the verified
               rows' next step (draft_ahead)
    verify  -> the target verifies the taken drafts (``verify``, given by the caller: ``worker.py`` runs
               SGLang's verify forward)
    record  -> one ``StepRecord`` feeds the planner and the trace

Modes (``metrics.StepMode``): psd (two sub-batches, the drafter drafts one while the target verifies the
other), draft_ahead (one sub-batch: the drafter drafts the next step betting on every draft, PEARL),
sequential (draft, then verify: classic SD), plain (k = 0: a plain decode step). ``--minedraft-k auto``
chooses among them every step (``adaptive_k``).

The target is reached through two calls the caller passes in: ``forward()`` for a prefill and
``verify(decision)`` for a step, which returns the target's result (``accept_lens`` [bs]; with a drafter
that needs the target's features, ``logits_output.hidden_states``). Requests are read as SGLang's are
(``rid``, ``origin_input_ids``, ``output_ids``) and never changed here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from minedraft_sglang import adaptive_k, metrics
from minedraft_sglang.config import MineDraftConfig
from minedraft_sglang.cpu import affinity
from minedraft_sglang.drafters.base import Drafter, DraftRequest, read_on_this_stream
from minedraft_sglang.metrics import StepMode, StepRecord
from minedraft_sglang.sampling.tetris import tetris_select
from minedraft_sglang.sub_batches import SubBatches
from minedraft_sglang.tp_sync import TpLink, VerifyDecision

logger = logging.getLogger(__name__)

# The target's verify of one step: the rows, drafts and TETRIS counts to verify -> its result.
VerifyFn = Callable[[VerifyDecision], object]


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


@dataclasses.dataclass(frozen=True)
class _Drafts:
    tokens: torch.Tensor  # [k] on the drafter's device
    probs: torch.Tensor  # [k] the drafter's probability of each token
    base_len: int  # the request's length they were drafted after
    anchor: int | None = None  # draft-ahead: the guessed last token


class PendingDrafts:
    """Drafts made for requests not yet verified, by request id: the one
    place that says whether a request's drafts still hold. They hold while
    the request's length is the one they were drafted after and, for a
    draft-ahead guess, while its last token is the guessed one."""

    def __init__(self) -> None:
        self._by_rid: dict[str, _Drafts] = {}

    def __len__(self) -> int:
        return len(self._by_rid)

    def rids(self) -> set[str]:
        return set(self._by_rid)

    def put(self, reqs: Sequence[DraftRequest], tokens: torch.Tensor, probs: torch.Tensor) -> None:
        """``tokens``, ``probs`` [bs, k]: drafts after each request's tokens."""
        for req, t, p in zip(reqs, tokens, probs):
            self._by_rid[req.rid] = _Drafts(t, p, len(req))

    def put_ahead(self, reqs: Sequence[DraftRequest], tokens: torch.Tensor, probs: torch.Tensor) -> None:
        """``reqs`` end with this step's drafts; ``tokens`` [bs, k + 1] are a
        guess of the bonus token, then next step's drafts."""
        for req, t, p in zip(reqs, tokens, probs):
            self._by_rid[req.rid] = _Drafts(t[1:], p[1:], len(req) + 1, anchor=int(t[0]))

    def holds(self, req) -> bool:
        d = self._by_rid.get(req.rid)
        if d is None or d.base_len != len(req.origin_input_ids) + len(req.output_ids):
            return False
        return d.anchor is None or req.output_ids[-1] == d.anchor

    def take(self, reqs) -> tuple[torch.Tensor, torch.Tensor]:
        """Removes and returns the drafts of ``reqs`` (each must hold) as
        tokens, probs [bs, width]: drafts made at different k (the planner
        moved) give their common prefix, itself a chain draft."""
        taken = [self._by_rid.pop(r.rid) for r in reqs]
        read_on_this_stream([t for d in taken for t in (d.tokens, d.probs)])
        width = min(len(d.tokens) for d in taken)
        return torch.stack([d.tokens[:width] for d in taken]), torch.stack([d.probs[:width] for d in taken])

    def drop(self, rid: str) -> None:
        self._by_rid.pop(rid, None)


class PSDLoop:
    """The drafter side of MINEDRAFT and the step that joins it to the
    target's verify. ``drafter`` is None on a TP rank other than 0: that rank
    verifies what rank 0 decides (``follow``)."""

    def __init__(
        self,
        *,
        config: MineDraftConfig,
        drafter: Drafter | None,
        draft_device: str | None,
        device,
        num_steps: int,
        prometheus: bool = False,
        tp: TpLink | None = None,
    ):
        self.config = config
        self.tp = tp
        self.drafter = drafter
        self.draft_device = draft_device
        self.device = device
        self.num_steps = num_steps
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
        self.pending = PendingDrafts()
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

    # ------------------------------------------------------------- requests

    def release(self, rid: str) -> None:
        """A request finished or left the batch: its drafts and drafter state go."""
        self.pending.drop(rid)
        self.drafter.release(rid)

    def prefill(self, reqs, forward: Callable[[], object]):
        """The target's prefill of ``reqs`` (``forward()``, whose result is
        returned) and the drafter's of the same prompts."""
        if self.drafter is None:
            return forward()
        if self.cores:
            # A CPU drafter shares the target's cores, so its prefill cannot
            # hide behind the target's: it waits for the request's first
            # draft (``_prefill_new``). The first token comes at plain
            # decoding's time, and a request the planner never drafts (plain
            # steps) never costs the drafter anything.
            self._use_all_cores()
            return forward()
        # The drafter's own device is idle during a prefill step: it fills
        # the drafter's cache with the same prompts meanwhile, which
        # otherwise lands in the requests' first draft, on the critical path.
        drafter_prefill = self.executor.submit(self._safe_prefill, _draft_requests(reqs))
        result = forward()
        drafter_prefill.result()
        return result

    def observe(self, features: Iterable[tuple[str, int, torch.Tensor]]) -> None:
        """Hand a drafter that reads the target's features (EAGLE) each
        request's features from position ``start`` on: (rid, start, [n, H])."""
        for rid, start, f in features:
            self.drafter.observe(rid, start, f)
        # Copied on this thread's stream; the drafter's thread reads them on its own.
        if self.draft_device.startswith("cuda"):
            torch.cuda.synchronize(self.draft_device)

    # ----------------------------------------------------------------- step

    def step(self, reqs, verify: VerifyFn) -> tuple[list[int], object]:
        """One decode step of the running batch ``reqs``: returns the rows
        verified (indices into ``reqs``) and the target's result for them."""
        for rid in (self.drafter.active_rids() | self.pending.rids()) - {r.rid for r in reqs}:
            # Retracted (or aborted) requests: their drafts are stale. (A
            # request whose draft failed holds placeholder drafts only.)
            self.release(rid)
        plan = self.plan([r.rid for r in reqs])
        verify_reqs = [reqs[i] for i in plan.verify_rows]
        split = self.cores.splits[plan.draft_cores] if self.cores and plan.mode in adaptive_k.OVERLAP else None

        t0 = time.monotonic()
        drafts, probs, missing, drafted_width, prefilled = self._take(verify_reqs, plan)
        num_drafts = (
            tetris_select(probs.clamp_min(1e-30).log(), self.k * len(verify_reqs)) if self.config.tetris else None
        )
        background = self._launch(reqs, plan, drafts, split)
        if missing:
            # The drafts made on this thread may still be computing: the
            # draft ends, and the verify starts, at their completion.
            _sync_stream(self.draft_device)
        t1 = time.monotonic()

        decision = VerifyDecision(plan.verify_rows, drafts, num_drafts)
        if self.tp is not None:
            self.tp.share_decision(decision, batch_size=len(reqs), max_width=self.num_steps)
        result = verify(decision)
        # The verify's kernels may still be running: it ends at their
        # completion (the planner and the trace read t2).
        _sync_stream(self.device)
        t2 = time.monotonic()

        draft, draft_thread, behind_width, behind_prefilled = (
            background.result() if background else ((t0, t1), threading.current_thread().name, 0, 0.0)
        )
        if self.drafter.needs_target_features:
            # After the background draft: the drafter is this thread's now.
            self._observe_verified(verify_reqs, result, drafts.shape[1] + 1)
        verify_cores, draft_cores = adaptive_k.stage_cores(
            len(self.cores.all) if self.cores else 0, plan.mode, plan.draft_cores
        )
        record = StepRecord(
            step=self.tracer.count,
            pid=os.getpid(),
            mode=plan.mode,
            draft=draft,
            verify=(t1, t2),
            verify_bs=len(verify_reqs),
            draft_bs=len(plan.draft_rows) or len(verify_reqs),
            verified_drafts=int(num_drafts.sum()) if num_drafts is not None else drafts.numel(),
            k=drafts.shape[1],
            draft_thread=draft_thread,
            accept_lens=tuple(result.accept_lens.tolist()),
            verify_cores=verify_cores,
            draft_cores=draft_cores,
        )
        if self.planner is not None:
            behind = (behind_width, draft[1] - draft[0] - behind_prefilled) if background else None
            self._measure(record, here=(len(missing), drafted_width, t1 - t0 - prefilled), behind=behind)
        self.tracer.add(record)
        return plan.verify_rows, result

    def follow(self, batch_size: int, verify: VerifyFn) -> tuple[list[int], object]:
        """A TP rank other than 0: verify what rank 0 decided for this step."""
        decision = self.tp.share_decision(None, batch_size=batch_size, max_width=self.num_steps)
        return decision.rows, verify(decision)

    def plan(self, rids: list[str]) -> StepPlan:
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
            choice = adaptive_k.Option(mode, self.num_steps, self.cores.default if overlap else 0)
        if choice.mode is StepMode.PSD:
            return StepPlan(choice.mode, verify_rows, draft_rows, choice.k, choice.draft_cores)
        return StepPlan(choice.mode, everyone, [], choice.k, choice.draft_cores)

    def _take(self, verify_reqs, plan: StepPlan):
        """The verified rows' drafts, tokens and probs [bs, width], drafting
        on this thread those that have none that hold (also returned, with
        the width drafted for them and the seconds their drafter prefill
        took)."""
        if plan.mode is StepMode.PLAIN:
            for r in verify_reqs:
                self.pending.drop(r.rid)
            empty = torch.zeros(len(verify_reqs), 0)
            return empty.long(), empty, [], 0, 0.0
        missing = [r for r in verify_reqs if not self.pending.holds(r)]
        prefilled, width = 0.0, 0
        if missing:
            # Newcomers of the verified half, requests moved by re-balancing,
            # failed draft-ahead guesses, requests after a plain step, or
            # every request in sequential mode: drafted alone, on every core.
            self._use_all_cores()
            reqs = _draft_requests(missing)
            prefilled = self._prefill_new(reqs)
            tokens, probs = self._safe_draft(reqs, plan.k)
            self.pending.put(reqs, tokens, probs)
            width = tokens.shape[1]
        return *self.pending.take(verify_reqs), missing, width, prefilled

    def _launch(self, reqs, plan: StepPlan, drafts: torch.Tensor, split: affinity.CoreSplit | None):
        """Start the step's background draft, if its mode has one; returns
        its future, which yields ``_timed``'s result."""
        if split is not None:
            # This thread's team leaves the drafter's cores before the
            # drafter's team takes them.
            self.verify_team.use(split.scheduler)
        else:
            self._use_all_cores()
        if plan.mode is StepMode.PSD:
            draft_reqs = _draft_requests([reqs[i] for i in plan.draft_rows])
            return self.executor.submit(self._timed, split, self.pending.put, draft_reqs, plan.k)
        if plan.mode is StepMode.DRAFT_AHEAD:
            # Next step's drafts after this step's, and a guess of the bonus token between them.
            ahead = _draft_requests([reqs[i] for i in plan.verify_rows], extra=drafts.tolist())
            return self.executor.submit(self._timed, split, self.pending.put_ahead, ahead, plan.k + 1)
        return None

    def _measure(self, record: StepRecord, *, here: tuple[int, int, float], behind: tuple[int, float] | None):
        """Feed the planner this step's stage costs (with the cores each
        stage ran on; drafter prefills left out: they are paid once per
        request, not per step) and acceptance. ``here``: the requests
        drafted on this thread before the verify, the width (forwards)
        drafted, the seconds; ``behind``: the background draft's width and
        seconds (psd: the other half; draft_ahead: the verified rows, a
        guessed bonus token first), None if the step had none."""
        bs, width = record.verify_bs, record.k
        self.planner.observe_verify(record.verify_cores, bs * (width + 1), record.verify[1] - record.verify[0], bs)
        n_missing, forwards, seconds = here
        if n_missing:
            # Drafted before the verify, on this thread, on every core.
            self.planner.observe_draft(self.planner.total_cores, n_missing, forwards, seconds)
        if behind is not None:
            self.planner.observe_draft(record.draft_cores, record.draft_bs, *behind)
        if width:
            self.planner.observe_acceptance([n - 1 for n in record.accept_lens], [width] * bs)

    # -------------------------------------------------------------- drafter

    def _use_all_cores(self) -> None:
        """This (the scheduler) thread's team on every core: called while the
        drafter's thread is idle."""
        if self.cores:
            self.verify_team.use(self.cores.all)

    def _timed(self, split: affinity.CoreSplit | None, keep, draft_reqs: Sequence[DraftRequest], num_tokens: int):
        """On the drafter's thread: draft ``num_tokens`` per request (on the
        drafter's cores of ``split``), ``keep`` them, and return the
        interval, ended when the kernels have finished (the scheduler thread
        reads the drafts next, from another stream), the thread's name, the
        width drafted and the seconds of that interval spent prefilling
        newcomers."""
        if split is not None:
            self.drafter_team.use(split.drafter)
        t0 = time.monotonic()
        prefilled = self._prefill_new(draft_reqs)
        tokens, probs = self._safe_draft(draft_reqs, num_tokens)
        keep(draft_reqs, tokens, probs)
        _sync_stream(self.draft_device)
        return (t0, time.monotonic()), threading.current_thread().name, tokens.shape[1], prefilled

    def _prefill_new(self, draft_reqs: Sequence[DraftRequest]) -> float:
        """On cores shared with the target (``prefill``), prefill the
        requests the drafter holds nothing for yet: newcomers at their first
        draft, and requests whose prefill failed. Returns the seconds it took.
        (A drafter on its own device prefilled them beside the target.)"""
        active = self.drafter.active_rids()
        new = [r for r in draft_reqs if r.rid not in active] if self.cores else []
        if not new:
            return 0.0
        t0 = time.monotonic()
        self._safe_prefill(new)
        _sync_stream(self.draft_device)
        return time.monotonic() - t0

    def _safe_prefill(self, draft_reqs: Sequence[DraftRequest]) -> None:
        try:
            self.drafter.prefill(draft_reqs)
        except Exception as e:  # noqa: BLE001 - the first draft recomputes what is missing
            logger.warning("MineDraft drafter prefill failed (%s: %s)", type(e).__name__, e)
            for req in draft_reqs:
                self.drafter.release(req.rid)

    def _safe_draft(self, draft_reqs: Sequence[DraftRequest], num_tokens: int):
        """The drafter's proposal, tokens and probs [bs, width] (width
        ``num_tokens``, or less where ``--minedraft-draft-stop`` ended every
        chain sooner), or, if
        the drafter fails, a placeholder that the target verifies like any
        draft: the affected requests then decode one token per step (plain
        decoding) and stay exact."""
        try:
            out = self.drafter.draft(draft_reqs, num_tokens, self.config.draft_stop)
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

    def _observe_verified(self, reqs, result, width: int) -> None:
        """Hand the drafter the target's features of the accepted positions:
        the last committed token's and each accepted draft's (``width``:
        the verify window, drafts + 1)."""
        features = result.logits_output.hidden_states.view(len(reqs), width, -1)
        self.observe(
            (req.rid, len(req.origin_input_ids) + len(req.output_ids) - 1, f[:n])
            for req, f, n in zip(reqs, features, result.accept_lens.tolist())
        )

    # ---------------------------------------------------------------- state

    def stats(self) -> dict:
        """The loop's part of ``/server_info``'s ``minedraft`` entry."""
        return {
            "mode": self.config.mode,
            "draft_device": self.draft_device,
            "draft_weights": self.drafter.weights,
            # Read back from the kernel, not from our split: what the threads
            # really have.
            "scheduler_cores": sorted(affinity.thread_cores(self.scheduler_tid)),
            "drafter_cores": sorted(affinity.thread_cores(self.drafter_tid)),
            **({"core_plan": _describe(self.cores, self.verify_team, self.drafter_team)} if self.cores else {}),
            "drafter_free_slots": self.drafter.free_slots(),
            "drafter_active_requests": len(self.drafter.active_rids()),
            "pending_drafts": len(self.pending),
            "drafter_failures": self.drafter_failures,
            "drafter_step_graphs": self.drafter.step_graphs,
            "sub_batch_sizes": self.sub_batches.sizes(),
            "k": "auto" if self.planner else self.k,
            **({"planner": self.planner.summary()} if self.planner else {}),
            **self.tracer.summary(),
        }


def stitch_seq_lens(seq_lens: torch.Tensor, rows: list[int], verified: torch.Tensor) -> torch.Tensor:
    """The running batch's lengths [bs] after a step that verified ``rows``
    only (their new lengths: ``verified`` [len(rows)]); ``seq_lens`` is left
    as it is."""
    out = seq_lens.clone()
    out[torch.tensor(rows, device=seq_lens.device)] = verified
    return out


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
    queue behind the target's verify kernels on a shared GPU. Its priority is
    the highest the device offers, so that there the drafter's short kernels
    are scheduled before blocks of the target's long ones and the draft ends
    under the verify (issue 21; not measured yet: no GPU has run it). (On CPU
    each step moves it onto its cores: ``_timed``.) Its OS-level name is
    inherited by the OpenMP threads it starts."""
    affinity.name_current_thread("minedraft-draft")
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        _, highest = torch.cuda.Stream.priority_range()
        torch.cuda.set_stream(torch.cuda.Stream(device, priority=highest))


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
