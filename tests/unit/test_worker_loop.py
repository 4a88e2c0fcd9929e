"""The PSD loop (``psd_loop.PSDLoop``) driven step by step, through the calls ``worker.py`` makes, on fakes.

A fake target (``FakeTarget``) stands in for the verify forward: its greedy next token is a fixed function of
the tokens so far (``next_token``), it accepts a draft chain up to its first wrong token and adds its own
token after it, like SGLang's greedy verify. A fake drafter (``FakeDrafter``) proposes from a rule the test
picks (the target's rule: all accepted; a wrong rule: all rejected; a mix), records every call and can be made
to fail. A tiny fake scheduler (``run_requests``) runs one ``step`` per engine step, as ``worker.py`` does (the loop's
step with the fake target as its verify, then the lengths stitched over the whole batch), and appends each
result's tokens to the rows the step verified, as SGLang's result processing does through ``verify.py``'s hook.

Covered:
  * step planning (``_plan``): psd / draft-ahead / sequential / plain and the sub-batch swap;
  * exactness of the whole loop (every mode x drafter right / wrong / mixed, requests joining at different
    steps): each request's output equals the target's greedy sequence, and drafts are verified at the position
    they were drafted for;
  * which thread drafts what: in a PSD step the other sub-batch, on the drafter's thread, while the target
    verifies;
  * row stitching of a PSD step's result (``new_seq_lens``, the verified rows);
  * the draft-ahead anchor rule (drafts made ahead are used only if the guessed bonus token was right);
  * the fallback when the drafter raises, and the release of retracted requests' draft state;
  * the trace file;
  * tensor parallelism: only TP rank 0 loads a drafter; rank 1 verifies exactly rank 0's rows, drafts and
    TETRIS counts, step by step, and returns the same results (the exchange in-process; ``test_tp_sync.py``
    runs it over a real gloo group);
  * device safety, with devices as parameters: a stage's interval ends when its (CUDA) stream is done, nothing
    waits on the CPU; placeholder drafts on the drafter's device; no view of the target's hidden states kept.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import pytest
import torch

import minedraft_sglang.worker as worker_mod
from minedraft_sglang import psd_loop, tp_sync
from minedraft_sglang.adaptive_k import Option
from minedraft_sglang.config import MineDraftConfig
from minedraft_sglang.drafters.base import Drafter, DraftOutput, DraftRequest
from minedraft_sglang.lab import tiny_models
from minedraft_sglang.metrics import StepMode, read_trace
from minedraft_sglang.psd_loop import PSDLoop, StepPlan, stitch_seq_lens
from minedraft_sglang.worker import MineDraftWorker

V = 97  # the fake target's vocabulary size
K = 3  # --speculative-num-steps: drafts per request


# ------------------------------------------------------------------ the fake target's language


def next_token(tokens: Sequence[int]) -> int:
    """The target's greedy choice after ``tokens``. It depends on the position too, so a draft verified at
    another position than the one it was drafted for is rejected (and shows up as lower acceptance)."""
    return (7 * tokens[-1] + 3 * len(tokens) + 1) % V


def greedy(prompt: Sequence[int], n: int) -> list[int]:
    """What plain decoding outputs: n greedy tokens after the prompt."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def chain(tokens: Sequence[int], n: int, step: Callable[[list[int]], int] = next_token) -> list[int]:
    """n tokens, each ``step`` of everything before it."""
    ctx = list(tokens)
    for _ in range(n):
        ctx.append(step(ctx))
    return ctx[len(tokens) :]


def wrong_token(tokens: Sequence[int]) -> int:
    return (next_token(tokens) + 1) % V


# A drafter rule: (the request's tokens so far, tokens wanted) -> proposed tokens.
Rule = Callable[[list[int], int], list[int]]


def rule_right(tokens, n):
    return chain(tokens, n)


def rule_wrong(tokens, n):
    return chain(tokens, n, wrong_token)


def rule_mixed(tokens, n):
    # The first m tokens right, the rest wrong; m varies with the length, so acceptance varies by request and step.
    m = len(tokens) % (n + 1)
    right = chain(tokens, m)
    return right + chain([*tokens, *right], n - m, wrong_token)


def rule_bad_anchor_every_other(tokens, n):
    """Right drafts, but a draft-ahead call (n = K + 1: bonus guess first) guesses the bonus token wrong every
    other time. With every draft accepted a request grows by K + 1 per step, so ``len // (K + 1)`` steps by one."""
    out = chain(tokens, n)
    if n == K + 1 and (len(tokens) // (K + 1)) % 2:
        out[0] = (out[0] + 1) % V
    return out


def rule_lucky_guess(tokens, n):
    """Drafts of which only the first is right; drafting ahead, it guesses the token the target will commit
    after that first draft. The guess then matches the real last token, but at another length."""
    if n == K + 1:
        base, first_draft = tokens[:-K], tokens[-K]
        return [next_token([*base, first_draft]), *chain(tokens, K)]
    first = next_token(tokens)
    return [first, *chain([*tokens, first], n - 1, wrong_token)]


RULES = {"right": rule_right, "wrong": rule_wrong, "mixed": rule_mixed}


# ------------------------------------------------------------------ fakes of SGLang's objects


@dataclasses.dataclass
class FakeReq:
    rid: str
    origin_input_ids: list[int]
    output_ids: list[int]

    def tokens(self) -> list[int]:
        return [*self.origin_input_ids, *self.output_ids]


class _DecodeMode:
    def is_extend(self) -> bool:
        return False


@dataclasses.dataclass
class FakeBatch:
    """The parts of a decode ScheduleBatch the worker reads."""

    reqs: list[FakeReq]
    seq_lens: torch.Tensor  # [bs] int64
    forward_mode: _DecodeMode = dataclasses.field(default_factory=_DecodeMode)
    is_extend_in_batch: bool = False


def fake_sub_batch_view(batch: FakeBatch, rows: list[int]) -> FakeBatch:
    return FakeBatch([batch.reqs[i] for i in rows], batch.seq_lens[rows])


@dataclasses.dataclass
class FakeResult:
    """The parts of GenerationBatchResult the worker reads or sets, plus ``committed``: the tokens each
    verified row commits, in the view's row order (SGLang's next_token_ids, unflattened)."""

    accept_lens: torch.Tensor  # [verify_bs] int32: accepted drafts + 1
    new_seq_lens: torch.Tensor  # [verify_bs]; [bs] once the worker stitched it
    committed: list[list[int]]
    # Read only for drafters that need the target's features: ``hidden_states`` [verify_bs * (width + 1), H].
    logits_output: SimpleNamespace | None = None
    next_draft_input: object = None
    # The rows of the running batch this result is for; None: all of them.
    rows: list[int] | None = None


@dataclasses.dataclass(frozen=True)
class VerifyCall:
    rids: tuple[str, ...]
    drafts: tuple[tuple[int, ...], ...]  # [verify_bs][width]
    num_drafts: tuple[int, ...] | None  # TETRIS: drafts verified per request
    committed: tuple[tuple[int, ...], ...]
    # The calling thread's CPU set and intra-op thread count, as the kernel and torch have them.
    cores: frozenset[int] = frozenset()
    threads: int = 0


class FakeTarget:
    """Greedy chain verification by ``next_token`` (of the first ``num_drafts`` drafts, under TETRIS);
    optionally meets the drafter's thread at ``barrier``; with ``hidden`` > 0 its result carries hidden
    states of that width (random), keeping only weak references to them in ``hidden_refs``."""

    def __init__(self, barrier: threading.Barrier | None = None, hidden: int = 0):
        self.calls: list[VerifyCall] = []
        self.barrier = barrier
        self.hidden = hidden
        self.hidden_refs: list[weakref.ref] = []

    def verify(self, view: FakeBatch, drafts: torch.Tensor, *, num_drafts, grammar_barrier) -> FakeResult:
        assert drafts.dtype == torch.int64 and drafts.shape[0] == len(view.reqs)
        if self.barrier is not None:
            self.barrier.wait()
        counts = [drafts.shape[1]] * len(view.reqs) if num_drafts is None else num_drafts.tolist()
        committed = []
        for req, row, n in zip(view.reqs, drafts.tolist(), counts):
            ctx = req.tokens()
            for d in row[:n]:
                if d != next_token(ctx):
                    break
                ctx.append(d)
            ctx.append(next_token(ctx))  # the target's own token after the accepted drafts
            committed.append(ctx[len(req.tokens()) :])
        self.calls.append(
            VerifyCall(
                rids=tuple(r.rid for r in view.reqs),
                drafts=tuple(tuple(row) for row in drafts.tolist()),
                num_drafts=None if num_drafts is None else tuple(counts),
                committed=tuple(tuple(c) for c in committed),
                cores=frozenset(os.sched_getaffinity(0)),
                threads=torch.get_num_threads(),
            )
        )
        accept_lens = torch.tensor([len(c) for c in committed], dtype=torch.int32)
        logits_output = None
        if self.hidden:
            hidden_states = torch.randn(len(view.reqs) * (drafts.shape[1] + 1), self.hidden)
            self.hidden_refs.append(weakref.ref(hidden_states))
            logits_output = SimpleNamespace(hidden_states=hidden_states)
        return FakeResult(
            accept_lens=accept_lens,
            new_seq_lens=view.seq_lens + accept_lens,
            committed=committed,
            logits_output=logits_output,
        )


@dataclasses.dataclass(frozen=True)
class DraftCall:
    rids: tuple[str, ...]
    lens: tuple[int, ...]  # each request's tokens handed to the drafter
    num_tokens: int
    thread: str
    tid: int
    tokens: tuple[tuple[int, ...], ...]  # what it proposed; () when it raised
    failed: bool
    cores: frozenset[int] = frozenset()  # the calling thread's, as in VerifyCall
    threads: int = 0


@dataclasses.dataclass(frozen=True)
class PrefillCall:
    rids: tuple[str, ...]
    thread: str
    cores: frozenset[int]
    drafts_before: int  # draft calls made before it


class FakeDrafter(Drafter):
    """Proposes ``rule``'s tokens; raises instead when ``fail(reqs)``; records every call and its thread. Its
    prefill takes ``prefill_seconds``."""

    device = torch.device("cpu")

    def __init__(
        self,
        rule: Rule,
        fail: Callable[[Sequence[DraftRequest]], bool] = lambda reqs: False,
        barrier: threading.Barrier | None = None,
        prefill_seconds: float = 0.0,
    ):
        self.rule = rule
        self.fail = fail
        self.barrier = barrier  # met by calls on the drafter's thread (the background drafts)
        self.prefill_seconds = prefill_seconds
        self.calls: list[DraftCall] = []
        self.prefills: list[PrefillCall] = []
        self.active: set[str] = set()
        self.released: list[str] = []

    def allocate(self, max_requests: int, max_len: int, *, max_drafts: int | None = None) -> int:
        return 0

    def draft(self, reqs: Sequence[DraftRequest], num_tokens: int, stop_below: float = 0.0) -> DraftOutput:
        thread, tid = threading.current_thread().name, threading.get_native_id()
        if self.barrier is not None and thread.startswith("minedraft-drafter"):
            self.barrier.wait()
        # Cache rows get written before anything can fail: a failed call leaves state to release.
        self.active.update(r.rid for r in reqs)
        rids, lens = tuple(r.rid for r in reqs), tuple(len(r) for r in reqs)
        if self.fail(reqs):
            self.calls.append(DraftCall(rids, lens, num_tokens, thread, tid, (), True))
            raise RuntimeError("fake drafter fault")
        tokens = torch.tensor([self.rule([*r.prompt, *r.output], num_tokens) for r in reqs], dtype=torch.int64)
        tokens = tokens.view(len(reqs), num_tokens)
        # Varied, so TETRIS gives requests different counts.
        probs = (tokens % 5 + 1) / 6
        if stop_below:
            # As the real drafter: each chain ends after its first unsure token, the output at the longest.
            chain = torch.where(probs < stop_below, torch.arange(1, num_tokens + 1), num_tokens).min(dim=1).values
            tokens, probs = tokens[:, : chain.max()], probs[:, : chain.max()]
        placement = dict(cores=frozenset(os.sched_getaffinity(0)), threads=torch.get_num_threads())
        rows = tuple(map(tuple, tokens.tolist()))
        self.calls.append(DraftCall(rids, lens, num_tokens, thread, tid, rows, False, **placement))
        return DraftOutput(tokens=tokens, probs=probs)

    def prefill(self, reqs: Sequence[DraftRequest]) -> None:
        time.sleep(self.prefill_seconds)
        self.active.update(r.rid for r in reqs)
        where = dict(thread=threading.current_thread().name, cores=frozenset(os.sched_getaffinity(0)))
        self.prefills.append(PrefillCall(tuple(r.rid for r in reqs), **where, drafts_before=len(self.calls)))

    def release(self, rid: str) -> None:
        self.released.append(rid)
        self.active.discard(rid)

    def active_rids(self) -> set[str]:
        return set(self.active)

    def free_slots(self) -> int:
        return 64 - len(self.active)


class StubPlanner:
    """Stands in for adaptive_k.KPlanner: k from a fixed cycle, in the mode a fixed-k server takes (plain for
    k = 0) and on the worker's default core split; measurements ignored."""

    def __init__(self, ks: Sequence[int], w: PSDLoop):
        self.ks = list(ks)
        self.decisions = 0
        self.total_cores = len(w.cores.all) if w.cores else 0
        self.draft_cores = w.cores.default if w.cores else 0

    def choose(self, verify_bs: int, draft_bs: int, modes) -> Option:
        k = self.ks[self.decisions % len(self.ks)]
        self.decisions += 1
        if k == 0:
            return Option(StepMode.PLAIN, 0)
        mode = next(m for m in (StepMode.PSD, StepMode.DRAFT_AHEAD, StepMode.SEQUENTIAL) if m in modes)
        return Option(mode, k, self.draft_cores)

    def observe_verify(self, *args) -> None:
        pass

    def observe_draft(self, *args) -> None:
        pass

    def observe_acceptance(self, *args) -> None:
        pass


# ------------------------------------------------------------------ worker and scheduler


@pytest.fixture
def built():
    """The loops a test builds (it appends them): their drafter threads are shut down afterwards and the
    pytest process gets its cores and thread count back (a CPU drafter moves the scheduler thread's team, here
    the test's thread)."""
    saved, threads = os.sched_getaffinity(0), torch.get_num_threads()
    loops: list[PSDLoop] = []
    yield loops
    for w in loops:
        if w.drafter is not None:
            w.executor.shutdown()
    os.sched_setaffinity(0, saved)
    torch.set_num_threads(threads)


@pytest.fixture
def make_loop(built):
    def make(
        mode: str,
        drafter: FakeDrafter,
        trace_file: str | None = None,
        *,
        device: str = "cpu",
        draft_device: str = "cpu",
    ) -> PSDLoop:
        w = PSDLoop(
            config=MineDraftConfig(mode=mode, k="fixed", draft_device=draft_device, trace_file=trace_file),
            drafter=drafter,
            draft_device=draft_device,
            device=device,
            num_steps=K,
        )
        built.append(w)
        return w

    return make


def run_step(w: PSDLoop, batch: FakeBatch, target: FakeTarget) -> FakeResult:
    """One decode step as ``worker.py`` runs it: the loop's step (``follow`` on a TP rank without a drafter),
    verifying through ``target`` on a view of the verified rows; the result's ``new_seq_lens`` stitched over the
    whole batch and ``rows`` set where it is for some rows only."""

    def verify(decision):
        rows = decision.rows
        view = batch if len(rows) == len(batch.reqs) else fake_sub_batch_view(batch, rows)
        return target.verify(view, decision.drafts, num_drafts=decision.num_drafts, grammar_barrier=None)

    rows, result = w.step(batch.reqs, verify) if w.drafter is not None else w.follow(len(batch.reqs), verify)
    if len(rows) != len(batch.reqs):
        result.rows = rows
        result.new_seq_lens = stitch_seq_lens(batch.seq_lens, rows, result.new_seq_lens)
    return result


def spy_plans(w: PSDLoop) -> list[StepPlan]:
    """Records the plan of every step the worker makes from now on."""
    plans: list[StepPlan] = []
    plan = w.plan

    def spy(rids):
        plans.append(plan(rids))
        return plans[-1]

    w.plan = spy
    return plans


@dataclasses.dataclass(frozen=True)
class Arrival:
    step: int
    rid: str
    prompt: list[int]
    max_new: int


@dataclasses.dataclass
class StepLog:
    rids: list[str]
    lens: list[int]  # each request's tokens before the step
    last: list[int]  # each request's last token before the step
    plan: StepPlan
    draft_calls: list[DraftCall]
    verify: VerifyCall
    result: FakeResult


def run_requests(
    w: PSDLoop,
    target: FakeTarget,
    arrivals: Sequence[Arrival],
    max_steps: int = 400,
    followers: Sequence[tuple[PSDLoop, FakeTarget]] = (),
):
    """The fake scheduler: admits arrivals (with the token their prefill committed), runs decode steps, applies
    each result to the rows it names, retires requests at max_new tokens. Returns (outputs by rid, step logs).
    ``followers``: TP ranks other than ``w``'s rank 0, each with its own target, stepped after ``w`` on the
    same batch as their schedulers would; each must verify what ``w`` verified and return the same result."""
    plans = spy_plans(w)
    drafter = w.drafter
    running: list[FakeReq] = []
    seq_lens = torch.zeros(0, dtype=torch.int64)
    max_new = {a.rid: a.max_new for a in arrivals}
    outputs: dict[str, list[int]] = {}
    logs: list[StepLog] = []
    for step in range(max_steps):
        for a in arrivals:
            if a.step == step:
                req = FakeReq(a.rid, list(a.prompt), [next_token(a.prompt)])
                w.prefill([req], lambda: None)
                running.append(req)
                seq_lens = torch.cat([seq_lens, torch.tensor([len(req.tokens())])])
        if not running:
            if step > max(a.step for a in arrivals):
                break
            continue
        batch = FakeBatch(list(running), seq_lens)
        n_calls, n_verifies = len(drafter.calls), len(target.calls)
        before = dict(
            rids=[r.rid for r in running],
            lens=[len(r.tokens()) for r in running],
            last=[r.output_ids[-1] for r in running],
        )
        result = run_step(w, batch, target)
        assert len(target.calls) == n_verifies + 1, "one verify per decode step"
        for follower, follower_target in followers:
            same = run_step(follower, batch, follower_target)
            assert follower_target.calls[-1] == target.calls[-1], "a TP rank verified otherwise than rank 0"
            assert same.rows == result.rows
            assert same.new_seq_lens.tolist() == result.new_seq_lens.tolist()
        calls = drafter.calls[n_calls:]
        logs.append(StepLog(**before, plan=plans[-1], draft_calls=calls, verify=target.calls[-1], result=result))
        rows = result.rows if result.rows is not None else range(len(running))
        for row, tokens in zip(rows, result.committed):
            running[row].output_ids.extend(tokens)
        seq_lens = result.new_seq_lens
        assert seq_lens.tolist() == [len(r.tokens()) for r in running], "new_seq_lens disagree with the rows' tokens"
        keep = []
        for i, req in enumerate(running):
            if len(req.output_ids) >= max_new[req.rid]:
                # Speculation may overshoot; SGLang stops at max_new_tokens.
                outputs[req.rid] = req.output_ids[: max_new[req.rid]]
                w.release(req.rid)
            else:
                keep.append(i)
        running = [running[i] for i in keep]
        seq_lens = seq_lens[keep]
    assert not running and len(outputs) == len(arrivals), "requests left running"
    return outputs, logs


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 31 + 17 * i) % V for i in range(n)]


# Requests of different lengths joining at different steps: in auto/psd mode "a" runs alone first
# (draft-ahead / sequential), then two and three run (PSD), and "d" ends alone again.
ARRIVALS = [
    Arrival(0, "a", prompt(1, 5), 14),
    Arrival(2, "b", prompt(2, 3), 9),
    Arrival(3, "c", prompt(3, 8), 12),
    Arrival(5, "d", prompt(4, 1), 40),
]


def check_exact(outputs, arrivals):
    for a in arrivals:
        assert outputs[a.rid] == greedy(a.prompt, a.max_new), a.rid


def on_drafter_thread(w, call: DraftCall) -> bool:
    return call.thread.startswith("minedraft-drafter") and call.tid == w.drafter_tid


# ------------------------------------------------------------------ 1. step planning


def test_psd_mode_splits_rows_into_halves_that_swap(make_loop):
    w = make_loop("psd", FakeDrafter(rule_right))
    rids = ["a", "b", "c", "d", "e"]
    first, second = w.plan(rids), w.plan(rids)
    for plan in (first, second):
        assert plan.mode is StepMode.PSD and plan.k == K
        assert not set(plan.verify_rows) & set(plan.draft_rows)
        assert sorted(plan.verify_rows + plan.draft_rows) == list(range(len(rids)))
        assert abs(len(plan.verify_rows) - len(plan.draft_rows)) <= 1
    # The half drafted in one step is the one verified in the next.
    assert (second.verify_rows, second.draft_rows) == (first.draft_rows, first.verify_rows)


@pytest.mark.parametrize("mode, expected", [("auto", StepMode.DRAFT_AHEAD), ("psd", StepMode.SEQUENTIAL)])
def test_one_request_drafts_ahead_in_auto_and_sequentially_in_psd(make_loop, mode, expected):
    w = make_loop(mode, FakeDrafter(rule_right))
    # Draft-ahead overlaps the stages, on the default split where cores are managed.
    draft_cores = w.cores.default if w.cores and expected is StepMode.DRAFT_AHEAD else 0
    for _ in range(3):  # whichever half the lone request sits in
        assert w.plan(["a"]) == StepPlan(expected, [0], [], K, draft_cores)


def test_sequential_mode_verifies_every_row(make_loop):
    w = make_loop("sequential", FakeDrafter(rule_right))
    for _ in range(2):
        assert w.plan(["a", "b", "c"]) == StepPlan(StepMode.SEQUENTIAL, [0, 1, 2], [], K)


@pytest.mark.parametrize("mode", ["auto", "psd", "sequential"])
@pytest.mark.parametrize("rids", [["a"], ["a", "b", "c"]])
def test_k_zero_is_a_plain_step_of_every_row(make_loop, mode, rids):
    w = make_loop(mode, FakeDrafter(rule_right))
    w.planner = StubPlanner([0], w)
    assert w.plan(rids) == StepPlan(StepMode.PLAIN, list(range(len(rids))), [], 0)


# ------------------------------------------------------------------ 2. exactness of the loop


def check_step_drafting(w, log: StepLog):
    """Who drafted what in one step: the background draft of a PSD step is the other sub-batch, on the
    drafter's thread; drafts made on this thread before the verify are only for verified requests."""
    plan, rids = log.plan, log.rids
    verified = [rids[i] for i in plan.verify_rows]
    background = [c for c in log.draft_calls if on_drafter_thread(w, c)]
    foreground = [c for c in log.draft_calls if not on_drafter_thread(w, c)]
    for c in foreground:
        assert c.thread == threading.current_thread().name and c.num_tokens == plan.k
        assert set(c.rids) <= set(verified)
    if plan.mode is StepMode.PSD:
        # The other sub-batch: every running request this step does not verify.
        others = tuple(rid for i, rid in enumerate(rids) if i not in plan.verify_rows)
        assert others and [(c.rids, c.num_tokens) for c in background] == [(others, plan.k)]
    elif plan.mode is StepMode.DRAFT_AHEAD:
        # The verified requests themselves, extended by this step's drafts; k + 1 tokens: the bonus guess first.
        width = len(log.verify.drafts[0])
        assert [(c.rids, c.lens, c.num_tokens) for c in background] == [
            (tuple(verified), tuple(n + width for n in log.lens), plan.k + 1)
        ]
    else:
        assert background == []
    if plan.mode is StepMode.PLAIN:
        assert log.draft_calls == [] and all(d == () for d in log.verify.drafts)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("k_cycle", [None, [3, 1, 0, 2, 3, 3]], ids=["k-fixed", "k-varying"])
@pytest.mark.parametrize("mode", ["psd", "auto", "sequential"])
def test_outputs_equal_greedy_decoding(make_loop, mode, rule, k_cycle):
    drafter, target = FakeDrafter(RULES[rule]), FakeTarget()
    w = make_loop(mode, drafter)
    if k_cycle:
        # The planner moving k between steps: drafts made at one k get verified in a step planned at another.
        w.planner = StubPlanner(k_cycle, w)
    outputs, logs = run_requests(w, target, ARRIVALS)
    check_exact(outputs, ARRIVALS)

    modes = {log.plan.mode for log in logs}
    expected = {
        "psd": {StepMode.PSD, StepMode.SEQUENTIAL},
        "auto": {StepMode.PSD, StepMode.DRAFT_AHEAD},
        "sequential": {StepMode.SEQUENTIAL},
    }[mode]
    assert modes == expected | ({StepMode.PLAIN} if k_cycle else set())
    for log in logs:
        check_step_drafting(w, log)
        assert log.verify.rids == tuple(log.rids[i] for i in log.plan.verify_rows)
        accepted = [len(c) - 1 for c in log.verify.committed]
        widths = [len(d) for d in log.verify.drafts]
        if rule == "right":
            # Drafts are verified at the position they were drafted for (a draft from another length is
            # rejected by the position-dependent target).
            assert accepted == widths, log
        elif rule == "wrong":
            assert accepted == [0] * len(widths), log
    if rule == "mixed":
        assert len({n for log in logs for n in log.result.accept_lens.tolist()}) > 2, "acceptance should vary"
    # Finished requests leave no draft state behind.
    assert len(w.pending) == 0 and drafter.active == set()
    assert w.drafter_failures == 0


def test_psd_drafts_the_other_half_while_the_target_verifies(make_loop):
    """The verify and the background draft meet at a barrier: if the worker ran them one after the other the
    first to arrive would wait in vain and the barrier would break."""
    barrier = threading.Barrier(2, timeout=5)
    drafter, target = FakeDrafter(rule_right, barrier=barrier), FakeTarget(barrier=barrier)
    w = make_loop("psd", drafter)
    reqs = [FakeReq("a", prompt(1, 4), [5]), FakeReq("b", prompt(2, 6), [9])]
    batch = FakeBatch(reqs, torch.tensor([len(r.tokens()) for r in reqs]))
    for _ in range(4):
        result = run_step(w, batch, target)
        for row, tokens in zip(result.rows, result.committed):
            reqs[row].output_ids.extend(tokens)
        batch.seq_lens = result.new_seq_lens
    assert w.tracer.mode_counts == {"psd": 4}
    assert not barrier.broken


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
@pytest.mark.parametrize("mode", ["auto", "psd", "sequential"])
def test_a_stage_alone_runs_on_every_core_and_overlapping_stages_on_the_split(make_loop, mode):
    """The split follows the step: a plain step's verify, a sequential step's draft and verify, and the drafts
    made before an overlap run on every core with one thread per core; while the stages overlap, the verify
    runs on the split's scheduler part and the background draft on its drafter part. Fails if the cores are
    split once for good (as before), or if thread counts do not follow the cores."""
    target = FakeTarget()
    w = make_loop(mode, FakeDrafter(rule_mixed))
    w.planner = StubPlanner([3, 0, 2, 3], w)  # plain steps between the drafting ones
    _, logs = run_requests(w, target, ARRIVALS)
    every = (w.cores.all, len(w.cores.all))
    split = w.cores.splits[w.cores.default]
    seen = set()
    for log in logs:
        overlap = log.plan.mode in (StepMode.PSD, StepMode.DRAFT_AHEAD)
        seen.add(overlap)
        assert (log.verify.cores, log.verify.threads) == ((split.scheduler, len(split.scheduler)) if overlap else every)
        for call in log.draft_calls:
            background = on_drafter_thread(w, call)
            assert background == overlap or not background
            assert (call.cores, call.threads) == ((split.drafter, len(split.drafter)) if background else every)
    # Both kinds of step ran (sequential mode never overlaps).
    assert seen == ({False} if mode == "sequential" else {False, True})


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
@pytest.mark.parametrize("mode", ["auto", "psd", "sequential"])
def test_a_cpu_drafter_prefills_at_a_requests_first_draft_not_in_its_prefill_step(make_loop, mode):
    """On cores it shares with the target, the drafter's prefill cannot hide behind the target's: the prefill
    step runs the target alone (the first token comes at plain decoding's time), and each request's prompt is
    prefilled once, by the call that makes its first draft, on that call's thread and cores. Fails if the
    prefill step prefills the drafter too (as before)."""
    drafter = FakeDrafter(rule_mixed)
    w = make_loop(mode, drafter)
    w.planner = StubPlanner([3, 0, 2, 3], w)
    outputs, _ = run_requests(w, FakeTarget(), ARRIVALS)
    check_exact(outputs, ARRIVALS)
    assert sorted(r for p in drafter.prefills for r in p.rids) == sorted(a.rid for a in ARRIVALS)
    for p in drafter.prefills:
        first = drafter.calls[p.drafts_before]
        assert set(p.rids) <= set(first.rids)
        assert not any(set(p.rids) & set(c.rids) for c in drafter.calls[: p.drafts_before])
        assert (p.thread, p.cores) == (first.thread, first.cores)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_requests_served_by_plain_steps_alone_never_cost_the_drafter_a_prefill(make_loop):
    drafter = FakeDrafter(rule_right)
    w = make_loop("auto", drafter)
    w.planner = StubPlanner([0], w)
    outputs, _ = run_requests(w, FakeTarget(), ARRIVALS)
    check_exact(outputs, ARRIVALS)
    assert drafter.prefills == [] and drafter.calls == []


@pytest.mark.parametrize("mode", ["auto", "psd", "sequential"])
def test_the_planner_leaves_the_drafters_prefill_out_of_its_draft_costs(make_loop, mode):
    """A prefill is paid once per request, a draft every step: the planner's draft costs are the drafts'. The
    fake prefill takes 0.3 s and a fake draft about nothing, so any observed draft of 0.15 s or more held a
    prefill."""
    w = make_loop(mode, FakeDrafter(rule_mixed, prefill_seconds=0.3))
    w.planner = StubPlanner([3, 0, 2, 3], w)
    observed = []
    w.planner.observe_draft = lambda cores, requests, forwards, seconds: observed.append(seconds)
    arrivals = ARRIVALS[:3]
    outputs, _ = run_requests(w, FakeTarget(), arrivals)
    check_exact(outputs, arrivals)
    assert len(w.drafter.prefills) >= len(arrivals) - 1 and observed
    assert max(observed) < 0.15


@pytest.mark.parametrize("mode", ["auto", "psd", "sequential"])
def test_a_draft_stop_narrows_verifies_and_the_planner_counts_the_forwards_run(make_loop, mode):
    """``--minedraft-draft-stop``: the drafter ends chains after an unsure token, so steps verify fewer
    drafts; the output stays exact and the planner's draft costs are per forward the drafter ran."""
    drafter = FakeDrafter(rule_mixed)
    w = make_loop(mode, drafter)
    w.config = dataclasses.replace(w.config, k="auto", draft_stop=0.5)
    w.planner = StubPlanner([3], w)
    forwards = []
    w.planner.observe_draft = lambda cores, requests, n, seconds: forwards.append(n)
    outputs, logs = run_requests(w, FakeTarget(), ARRIVALS)
    check_exact(outputs, ARRIVALS)
    widths = [len(log.verify.drafts[0]) for log in logs if log.verify.drafts]
    assert min(widths) < 3 and max(widths) == 3, widths
    assert forwards == [len(call.tokens[0]) for call in drafter.calls]


# ------------------------------------------------------------------ 3. row stitching


def test_psd_step_returns_the_verified_rows_stitched_into_the_batch(make_loop):
    drafter, target = FakeDrafter(rule_right), FakeTarget()
    w = make_loop("psd", drafter)
    plans = spy_plans(w)
    reqs = [FakeReq(rid, prompt(i, 2 + i), [i]) for i, rid in enumerate("abcde")]
    lens = [len(r.tokens()) for r in reqs]  # 3, 4, 5, 6, 7: distinct, so a row moved shows
    batch = FakeBatch(reqs, torch.tensor(lens))

    result = run_step(w, batch, target)
    verified, unverified = plans[-1].verify_rows, plans[-1].draft_rows
    assert plans[-1].mode is StepMode.PSD and verified and unverified
    assert result.rows == verified
    assert target.calls[-1].rids == tuple(reqs[row].rid for row in verified)
    new = result.new_seq_lens.tolist()
    # [bs]: verified rows advanced by their accept length (right drafts: K accepted + the target's token),
    # the drafted rows unchanged.
    assert new == [lens[row] + (K + 1 if row in verified else 0) for row in range(len(reqs))]
    assert batch.seq_lens.tolist() == lens, "the running batch's own seq_lens stay untouched"

    # Next step: the other half, verified with the drafts made for it in the background (no redraft here).
    for row, tokens in zip(result.rows, result.committed):
        reqs[row].output_ids.extend(tokens)
    batch.seq_lens = result.new_seq_lens
    n_calls = len(drafter.calls)
    result = run_step(w, batch, target)
    assert result.rows == unverified
    assert result.new_seq_lens.tolist() == [new[row] + (K + 1 if row in unverified else 0) for row in range(len(reqs))]
    assert all(on_drafter_thread(w, c) for c in drafter.calls[n_calls:])


def test_a_full_batch_step_names_no_rows(make_loop):
    # Sequential (and plain, draft-ahead) steps verify the whole batch: None tells the scheduler "all rows".
    w = make_loop("sequential", FakeDrafter(rule_right))
    reqs = [FakeReq("a", prompt(1, 3), [4]), FakeReq("b", prompt(2, 5), [6])]
    result = run_step(w, FakeBatch(reqs, torch.tensor([4, 6])), FakeTarget())
    assert result.rows is None
    assert result.new_seq_lens.tolist() == [4 + K + 1, 6 + K + 1]


# ------------------------------------------------------------------ 4. draft-ahead anchor rule


@pytest.mark.parametrize("rule", ["right", "bad_anchor", "lucky_guess", "mixed", "wrong"])
def test_draft_ahead_drafts_are_used_only_when_the_bonus_guess_was_right(make_loop, rule):
    """Drafts made ahead are used iff every draft of the step was accepted (the request has the length they were
    drafted at) and the guessed bonus token (the anchor) is the request's real last token."""
    rules = {**RULES, "bad_anchor": rule_bad_anchor_every_other, "lucky_guess": rule_lucky_guess}
    drafter, target = FakeDrafter(rules[rule]), FakeTarget()
    w = make_loop("auto", drafter)
    arrivals = [Arrival(0, "a", prompt(5, 4), 60)]
    outputs, logs = run_requests(w, target, arrivals)
    check_exact(outputs, arrivals)
    assert all(log.plan.mode is StepMode.DRAFT_AHEAD for log in logs)
    hits = misses = anchor_misses = length_misses = 0
    for prev, log in zip(logs, logs[1:]):
        # The previous step drafted ahead: [bonus guess, next step's K drafts] from the request plus its drafts.
        [ahead] = [c for c in prev.draft_calls if on_drafter_thread(w, c)]
        guess, drafts = ahead.tokens[0][0], ahead.tokens[0][1:]
        length_right = ahead.lens[0] + 1 == log.lens[0]  # every draft was accepted
        foreground = [c for c in log.draft_calls if not on_drafter_thread(w, c)]
        if length_right and guess == log.last[0]:
            hits += 1
            assert foreground == [] and log.verify.drafts[0] == drafts
        else:
            misses += 1
            anchor_misses += length_right
            length_misses += guess == log.last[0]
            # Discarded: redrafted on this thread, from the request as it is, and those drafts verified.
            assert [(c.rids, c.lens, c.num_tokens) for c in foreground] == [(("a",), (log.lens[0],), K)]
            assert log.verify.drafts[0] == foreground[0].tokens[0]
    if rule == "right":
        assert misses == 0 and hits == len(logs) - 1
    elif rule == "wrong":
        assert hits == 0
    elif rule == "bad_anchor":
        # Every draft accepted each step; only the guess decides.
        assert hits > 0 and anchor_misses == misses > 0
    elif rule == "lucky_guess":
        # The guess is always right, the length never.
        assert hits == 0 and length_misses == misses == len(logs) - 1
    else:
        assert hits > 0 and misses > 0


# ------------------------------------------------------------------ 5. drafter faults


def fails_for(rid: str):
    return lambda reqs: any(r.rid == rid for r in reqs)


@pytest.mark.parametrize("mode", ["psd", "auto", "sequential"])
def test_a_failing_drafter_falls_back_to_placeholder_drafts(make_loop, mode):
    drafter, target = FakeDrafter(rule_right, fail=fails_for("b")), FakeTarget()
    w = make_loop(mode, drafter)
    # "a" alone, then with "b", then "b" alone.
    arrivals = [Arrival(0, "a", prompt(1, 4), 20), Arrival(2, "b", prompt(2, 3), 30)]
    outputs, logs = run_requests(w, target, arrivals)
    check_exact(outputs, arrivals)

    failed = [c for c in drafter.calls if c.failed]
    assert failed and w.drafter_failures == len(failed)
    # Each failure releases the state (half written, in a real drafter) of every request in the call.
    for rid in ("a", "b"):
        assert drafter.released.count(rid) >= sum(rid in c.rids for c in failed) + 1  # + its finish
    assert drafter.active == set() and len(w.pending) == 0
    verified_b = 0
    for log in logs:
        for j, row in enumerate(log.plan.verify_rows):
            drafts = log.verify.drafts[j]
            if log.rids[row] == "b":
                # The placeholder: b's last token repeated, verified like any draft.
                verified_b += 1
                assert drafts == (log.last[row],) * len(drafts) and len(drafts) == K
            elif mode == "psd":
                # "a" never shares a draft call with "b" in psd mode (one request per half): unaffected.
                assert len(log.verify.committed[j]) == len(drafts) + 1
    assert verified_b > 5


def test_retracted_requests_lose_their_draft_state(make_loop):
    drafter = FakeDrafter(rule_right)
    w = make_loop("psd", drafter)
    plans = spy_plans(w)
    reqs = [FakeReq(rid, prompt(i, 3), [i]) for i, rid in enumerate("abc")]
    run_step(w, FakeBatch(reqs, torch.tensor([4, 4, 4])), FakeTarget())
    # A request of the drafted half now holds drafts; the scheduler retracts it before its turn.
    retracted = reqs[plans[-1].draft_rows[0]]
    assert retracted.rid in w.pending.rids() and retracted.rid in drafter.active
    rest = [r for r in reqs if r is not retracted]
    run_step(w, FakeBatch(rest, torch.tensor([len(r.tokens()) for r in rest])), FakeTarget())
    assert retracted.rid in drafter.released
    assert retracted.rid not in w.pending.rids() and retracted.rid not in drafter.active


def test_retracted_request_with_failed_drafts_loses_its_placeholder(make_loop):
    drafter = FakeDrafter(rule_right, fail=fails_for("b"))
    w = make_loop("psd", drafter)
    plans = spy_plans(w)
    # The first request joins the drafted half: "b"'s background draft fails and leaves a placeholder.
    reqs = [FakeReq("b", prompt(2, 3), [2]), FakeReq("a", prompt(1, 3), [1])]
    run_step(w, FakeBatch(reqs, torch.tensor([4, 4])), FakeTarget())
    assert plans[-1].draft_rows == [0] and w.drafter_failures == 1
    assert "b" in w.pending.rids() and "b" not in drafter.active
    run_step(w, FakeBatch(reqs[1:], torch.tensor([len(reqs[1].tokens())])), FakeTarget())  # "b" retracted
    assert "b" not in w.pending.rids()


# ------------------------------------------------------------------ 6. trace


def test_trace_file_has_one_record_per_step(make_loop, tmp_path):
    path = tmp_path / "trace.jsonl"
    target = FakeTarget()
    w = make_loop("auto", FakeDrafter(rule_mixed), trace_file=str(path))
    w.planner = StubPlanner([3, 2, 0, 3], w)  # plain steps too
    outputs, logs = run_requests(w, target, ARRIVALS)
    check_exact(outputs, ARRIVALS)
    records = read_trace(path)
    assert [r.step for r in records] == list(range(len(logs)))
    assert {r.mode for r in records} == {StepMode.PSD, StepMode.DRAFT_AHEAD, StepMode.PLAIN}
    for record, log in zip(records, logs):
        widths = [len(d) for d in log.verify.drafts]
        assert record.mode is log.plan.mode
        assert (
            record.accept_lens == tuple(log.result.accept_lens.tolist()) == tuple(len(c) for c in log.verify.committed)
        )
        assert record.verify_bs == len(log.plan.verify_rows)
        assert record.draft_bs == (len(log.plan.draft_rows) or len(log.plan.verify_rows))
        assert (record.k, record.verified_drafts) == (widths[0], sum(widths))
        assert record.pid == os.getpid()
        assert record.verify[0] <= record.verify[1] and record.draft[0] <= record.draft[1]
        in_background = record.mode in (StepMode.PSD, StepMode.DRAFT_AHEAD)
        assert record.draft_thread.startswith("minedraft-drafter") == in_background


# ------------------------------------------------------------------ 7. tensor parallelism


class PairedLink(tp_sync.TpLink):
    """TP ranks 0 and 1 in this process: rank 0's broadcast leaves its tensor in ``mailbox``, rank 1's takes
    it. What travels is tp_sync's own packing; only the transport is in-process (``test_tp_sync.py`` runs it
    over a real gloo group)."""

    def __init__(self, rank: int, mailbox: list):
        super().__init__(rank=rank, cpu_group=None, device_group=None, src=0)
        self.mailbox = mailbox

    def _broadcast(self, tensor, group) -> None:
        if self.leads:
            self.mailbox.append(tensor.clone())
        else:
            tensor.copy_(self.mailbox.pop(0))


@pytest.fixture
def make_tp_ranks(built, monkeypatch):
    """Builds TP ranks 0 and 1 through ``MineDraftWorker.__init__`` (SGLang's objects faked: the spec, the
    target worker, the TP group as a ``PairedLink``) and returns their loops; ``drafter`` is what
    ``create_drafter`` returns, and ``created`` records the ranks that asked for one."""
    created: list[int] = []

    def make(config: MineDraftConfig, drafter: FakeDrafter, targets: Sequence[FakeTarget], num_steps: int = K):
        spec = SimpleNamespace(
            # A real standalone draft: every rank reads its config (the capture mode, test_worker_capture.py).
            speculative_draft_model_path=str(tiny_models.model_path("draft")),
            speculative_num_steps=num_steps,
            speculative_num_draft_tokens=num_steps + 1,
        )
        monkeypatch.setattr(worker_mod, "get_spec", lambda: spec)
        monkeypatch.setattr(MineDraftConfig, "from_env", classmethod(lambda cls: config))
        server_args = SimpleNamespace(tp_size=2, gpu_id_step=1, nnodes=1, model_path="target", enable_metrics=False)
        mailbox: list[torch.Tensor] = []
        ranks = []
        for rank in range(len(targets)):
            monkeypatch.setattr(worker_mod, "_tp_link", lambda r=rank: PairedLink(r, mailbox))
            monkeypatch.setattr(worker_mod, "create_drafter", lambda r=rank, **kwargs: created.append(r) or drafter)
            runner = SimpleNamespace(
                device="cpu",
                gpu_id=rank,
                dtype=torch.float32,
                max_running_requests=16,
                model_config=SimpleNamespace(context_len=128),
            )
            target_worker = SimpleNamespace(model_runner=runner, get_memory_pool=lambda: (None, None))
            w = MineDraftWorker(server_args, gpu_id=rank, nccl_port=0, target_worker=target_worker)
            w.alloc_memory_pool()
            built.append(w.loop)
            ranks.append(w.loop)
        return ranks

    make.created = created
    return make


@pytest.mark.parametrize("k_cycle", [None, [3, 1, 0, 2, 3, 3]], ids=["k-fixed", "k-varying"])
@pytest.mark.parametrize("mode", ["psd", "auto", "sequential"])
def test_tp_rank_1_verifies_what_rank_0_decides_and_never_drafts(make_tp_ranks, mode, k_cycle):
    drafter, targets = FakeDrafter(rule_mixed), [FakeTarget(), FakeTarget()]
    rank0, rank1 = make_tp_ranks(MineDraftConfig(mode=mode, k="fixed"), drafter, targets)
    if k_cycle:
        # Rank 0's planner alone moves k (rank 1 has none): the widths reach rank 1 with the drafts.
        rank0.planner = StubPlanner(k_cycle, rank0)
    assert make_tp_ranks.created == [0], "only TP rank 0 loads a drafter"
    assert rank1.drafter is None and rank0.drafter is drafter
    outputs, logs = run_requests(rank0, targets[0], ARRIVALS, followers=[(rank1, targets[1])])
    check_exact(outputs, ARRIVALS)
    assert targets[1].calls == targets[0].calls
    assert drafter.calls
    if k_cycle:
        assert StepMode.PLAIN in {log.plan.mode for log in logs}


def test_tp_rank_1_verifies_rank_0s_tetris_counts(make_tp_ranks):
    extra = 2
    config = MineDraftConfig(mode="psd", k="fixed", tetris=True, tetris_extra=extra)
    drafter, targets = FakeDrafter(rule_right), [FakeTarget(), FakeTarget()]
    rank0, rank1 = make_tp_ranks(config, drafter, targets, num_steps=K + extra)
    outputs, _ = run_requests(rank0, targets[0], ARRIVALS, followers=[(rank1, targets[1])])
    check_exact(outputs, ARRIVALS)
    assert targets[1].calls == targets[0].calls
    counts = [n for call in targets[0].calls for n in call.num_drafts]
    # TETRIS really chose: requests got different numbers of their K + extra drafts.
    assert len(set(counts)) > 1 and max(counts) > K


# ------------------------------------------------------------------ 8. device safety

QUEUED_S = 0.1


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.cuda`` as far as the worker's timing and drafter thread use it, on a machine without a GPU:
    every stream still has ``QUEUED_S`` of work queued, which ``synchronize()`` waits out. Returns the log of
    (device, thread name) of every synchronize."""
    log: list[tuple[str, str]] = []

    class Stream:
        def __init__(self, device=None, priority=0):
            self.device = str(device)

        @staticmethod
        def priority_range() -> tuple[int, int]:
            return 0, -5

        def synchronize(self) -> None:
            log.append((self.device, threading.current_thread().name))
            time.sleep(QUEUED_S)

    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    return log


@pytest.mark.parametrize(
    "device, draft_device", [("cpu", "cpu"), ("cuda:0", "cpu"), ("cpu", "cuda:1"), ("cuda:0", "cuda:1")]
)
def test_draft_and_verify_end_when_their_devices_have_finished(make_loop, fake_cuda, tmp_path, device, draft_device):
    """Kernels run after the call that queued them returns: a stage's interval (the trace's, the planner's) ends
    once its device's stream is done. On the CPU nothing is waited for."""
    trace = tmp_path / "trace.jsonl"
    target = FakeTarget()
    # Sequential: the drafts are made on this thread before the verify, each step.
    w = make_loop("sequential", FakeDrafter(rule_right), str(trace), device=device, draft_device=draft_device)
    arrivals = [Arrival(0, "a", prompt(1, 4), 3 * (K + 1))]
    outputs, logs = run_requests(w, target, arrivals)
    check_exact(outputs, arrivals)
    records = read_trace(trace)
    assert len(records) == len(logs) == 3
    scheduler = threading.current_thread().name
    expected = [(d, scheduler) for d in (draft_device, device) if d.startswith("cuda")]
    assert fake_cuda == expected * len(records)
    for r in records:
        if draft_device.startswith("cuda"):
            assert r.draft[1] - r.draft[0] >= QUEUED_S
        if device.startswith("cuda"):
            assert r.verify[1] - r.verify[0] >= QUEUED_S


def test_background_drafts_end_when_the_drafters_stream_has_finished(make_loop, fake_cuda, tmp_path):
    trace = tmp_path / "trace.jsonl"
    target = FakeTarget()
    w = make_loop("psd", FakeDrafter(rule_right), str(trace), draft_device="cuda:1")
    arrivals = [Arrival(0, "a", prompt(1, 4), 3 * (K + 1)), Arrival(0, "b", prompt(2, 5), 3 * (K + 1))]
    run_requests(w, target, arrivals)
    psd = [r for r in read_trace(trace) if r.mode is StepMode.PSD]
    assert psd and all(r.draft[1] - r.draft[0] >= QUEUED_S for r in psd)
    assert ("cuda:1", psd[0].draft_thread) in fake_cuda


@pytest.mark.parametrize("mode", ["psd", "sequential"])
def test_drafts_are_recorded_on_the_stream_that_takes_them(make_loop, monkeypatch, mode):
    """Drafts are made on the drafter's stream and read, then freed, on the scheduler's: the drafts the
    scheduler takes go through ``read_on_this_stream`` on its thread (else the caching allocator may give
    their memory back to the drafter's stream while the verify still reads it)."""
    made, recorded = [], []
    drafter = FakeDrafter(rule_right)
    draft = drafter.draft

    def recording_draft(reqs, num_tokens, stop_below):
        out = draft(reqs, num_tokens, stop_below)
        made.extend([out.tokens, out.probs])
        return out

    drafter.draft = recording_draft
    scheduler = threading.current_thread().name
    monkeypatch.setattr(
        psd_loop,
        "read_on_this_stream",
        lambda tensors: recorded.extend((t, threading.current_thread().name) for t in tensors),
    )
    target = FakeTarget()
    w = make_loop(mode, drafter)
    arrivals = [Arrival(0, "a", prompt(1, 4), 3 * (K + 1)), Arrival(0, "b", prompt(2, 5), 3 * (K + 1))]
    outputs, _ = run_requests(w, target, arrivals)
    check_exact(outputs, arrivals)
    assert recorded and {name for _, name in recorded} == {scheduler}
    # Each recorded tensor is a row of a draft call's output.
    assert all(any(t.data_ptr() in range(m.data_ptr(), m.data_ptr() + m.nbytes) for m in made) for t, _ in recorded)


@pytest.mark.parametrize("draft_device", ["cpu", "meta"])
def test_placeholder_drafts_are_made_on_the_drafters_device(make_loop, draft_device):
    """They are stacked with the drafter's real drafts, which fails across devices ("meta" stands in for a GPU
    here)."""
    w = make_loop("psd", FakeDrafter(rule_right, fail=lambda reqs: True), draft_device=draft_device)
    tokens, probs = w._safe_draft([DraftRequest("a", [1, 2], [3]), DraftRequest("b", [4], [5, 6])], K)
    assert tokens.device == probs.device == torch.device(draft_device)
    assert tokens.shape == probs.shape == (2, K)


class FeatureDrafter(FakeDrafter):
    """A drafter that reads the target's features; it copies what it keeps, as the drafter contract asks."""

    needs_target_features = True

    def __init__(self, rule: Rule):
        super().__init__(rule)
        self.observed: list[tuple[str, int, torch.Tensor]] = []

    def observe(self, rid: str, start: int, features: torch.Tensor) -> None:
        self.observed.append((rid, start, features.clone()))


@pytest.mark.parametrize("mode", ["psd", "auto", "sequential"])
def test_the_worker_keeps_no_view_of_the_targets_hidden_states(make_loop, mode):
    """SGLang reuses its hidden-state buffer (static under graphs): once a step's result is handed back, nothing
    the worker holds may still reference it. Each verify's hidden states are watched through a weak reference,
    which dies only when no tensor (a view keeps its base) refers to them."""
    drafter, target = FeatureDrafter(rule_mixed), FakeTarget(hidden=8)
    w = make_loop(mode, drafter)
    reqs = [FakeReq("a", prompt(1, 4), [5]), FakeReq("b", prompt(2, 6), [9]), FakeReq("c", prompt(3, 5), [2])]
    batch = FakeBatch(reqs, torch.tensor([len(r.tokens()) for r in reqs]))
    for _ in range(6):
        result = run_step(w, batch, target)
        rows = result.rows if result.rows is not None else range(len(reqs))
        observed = drafter.observed[-len(result.committed) :]
        for row, tokens, (rid, start, features) in zip(rows, result.committed, observed):
            # The features of the last committed token and of each accepted draft.
            assert (rid, start, len(features)) == (reqs[row].rid, len(reqs[row].tokens()) - 1, len(tokens))
            reqs[row].output_ids.extend(tokens)
        batch.seq_lens = result.new_seq_lens
        del result
    gc.collect()
    assert len(target.hidden_refs) == 6
    assert [ref() is None for ref in target.hidden_refs] == [True] * 6
