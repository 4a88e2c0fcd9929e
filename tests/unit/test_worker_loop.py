"""The PSD loop of ``MineDraftWorker`` driven step by step, without SGLang's model runner.

A fake target (``FakeTarget``) stands in for the verify forward: its greedy next token is a fixed function of
the tokens so far (``next_token``), it accepts a draft chain up to its first wrong token and adds its own
token after it, like SGLang's greedy verify. A fake drafter (``FakeDrafter``) proposes from a rule the test
picks (the target's rule: all accepted; a wrong rule: all rejected; a mix), records every call and can be made
to fail. A tiny fake scheduler (``run_requests``) calls ``forward_batch_generation`` once per engine step and
appends each result's tokens to the rows in ``result.minedraft_rows``, as SGLang's result processing does
through ``hooks.py``.

Covered:
  * step planning (``_plan``): psd / draft-ahead / sequential / plain and the sub-batch swap;
  * exactness of the whole loop (every mode x drafter right / wrong / mixed, requests joining at different
    steps): each request's output equals the target's greedy sequence, and drafts are verified at the position
    they were drafted for;
  * which thread drafts what: in a PSD step the other sub-batch, on the drafter's thread, while the target
    verifies;
  * row stitching of a PSD step's result (``new_seq_lens``, ``minedraft_rows``);
  * the draft-ahead anchor rule (drafts made ahead are used only if the guessed bonus token was right);
  * the fallback when the drafter raises, and the release of retracted requests' draft state;
  * the trace file.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence

import pytest
import torch

import minedraft_sglang.worker as worker_mod
from minedraft_sglang.config import MineDraftConfig
from minedraft_sglang.drafters.base import Drafter, DraftOutput, DraftRequest
from minedraft_sglang.metrics import StepMode, read_trace
from minedraft_sglang.worker import MineDraftWorker, StepPlan

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
    logits_output: None = None  # read only for drafters that need the target's features
    next_draft_input: object = None
    minedraft_rows: list[int] | None = None


@dataclasses.dataclass(frozen=True)
class VerifyCall:
    rids: tuple[str, ...]
    drafts: tuple[tuple[int, ...], ...]  # [verify_bs][width]
    committed: tuple[tuple[int, ...], ...]


class FakeTarget:
    """Greedy chain verification by ``next_token``; optionally meets the drafter's thread at ``barrier``."""

    def __init__(self, barrier: threading.Barrier | None = None):
        self.calls: list[VerifyCall] = []
        self.barrier = barrier

    def verify(self, view: FakeBatch, drafts: torch.Tensor, *, num_drafts, grammar_barrier) -> FakeResult:
        assert num_drafts is None  # no TETRIS here
        assert drafts.dtype == torch.int64 and drafts.shape[0] == len(view.reqs)
        if self.barrier is not None:
            self.barrier.wait()
        committed = []
        for req, row in zip(view.reqs, drafts.tolist()):
            ctx = req.tokens()
            for d in row:
                if d != next_token(ctx):
                    break
                ctx.append(d)
            ctx.append(next_token(ctx))  # the target's own token after the accepted drafts
            committed.append(ctx[len(req.tokens()) :])
        self.calls.append(
            VerifyCall(
                rids=tuple(r.rid for r in view.reqs),
                drafts=tuple(tuple(row) for row in drafts.tolist()),
                committed=tuple(tuple(c) for c in committed),
            )
        )
        accept_lens = torch.tensor([len(c) for c in committed], dtype=torch.int32)
        return FakeResult(accept_lens=accept_lens, new_seq_lens=view.seq_lens + accept_lens, committed=committed)


@dataclasses.dataclass(frozen=True)
class DraftCall:
    rids: tuple[str, ...]
    lens: tuple[int, ...]  # each request's tokens handed to the drafter
    num_tokens: int
    thread: str
    tid: int
    tokens: tuple[tuple[int, ...], ...]  # what it proposed; () when it raised
    failed: bool


class FakeDrafter(Drafter):
    """Proposes ``rule``'s tokens; raises instead when ``fail(reqs)``; records every call and its thread."""

    device = torch.device("cpu")

    def __init__(
        self,
        rule: Rule,
        fail: Callable[[Sequence[DraftRequest]], bool] = lambda reqs: False,
        barrier: threading.Barrier | None = None,
    ):
        self.rule = rule
        self.fail = fail
        self.barrier = barrier  # met by calls on the drafter's thread (the background drafts)
        self.calls: list[DraftCall] = []
        self.active: set[str] = set()
        self.released: list[str] = []

    def allocate(self, max_requests: int, max_len: int) -> int:
        return 0

    def draft(self, reqs: Sequence[DraftRequest], num_tokens: int) -> DraftOutput:
        thread, tid = threading.current_thread().name, threading.get_native_id()
        if self.barrier is not None and thread.startswith("minedraft-drafter"):
            self.barrier.wait()
        # Cache rows get written before anything can fail: a failed call leaves state to release.
        self.active.update(r.rid for r in reqs)
        rids, lens = tuple(r.rid for r in reqs), tuple(len(r) for r in reqs)
        if self.fail(reqs):
            self.calls.append(DraftCall(rids, lens, num_tokens, thread, tid, (), True))
            raise RuntimeError("fake drafter fault")
        rows = [self.rule([*r.prompt, *r.output], num_tokens) for r in reqs]
        self.calls.append(DraftCall(rids, lens, num_tokens, thread, tid, tuple(map(tuple, rows)), False))
        return DraftOutput(
            tokens=torch.tensor(rows, dtype=torch.int64).view(len(reqs), num_tokens),
            probs=torch.full((len(reqs), num_tokens), 0.5),
        )

    def release(self, rid: str) -> None:
        self.released.append(rid)
        self.active.discard(rid)

    def active_rids(self) -> set[str]:
        return set(self.active)

    def free_slots(self) -> int:
        return 64 - len(self.active)


class StubPlanner:
    """Stands in for adaptive_k.KPlanner: k from a fixed cycle, measurements ignored."""

    def __init__(self, ks: Sequence[int]):
        self.ks = list(ks)
        self.decisions = 0

    def choose(self, verify_bs: int, draft_bs: int, ahead: bool = False) -> int:
        k = self.ks[self.decisions % len(self.ks)]
        self.decisions += 1
        return k

    def observe_verify(self, *args) -> None:
        pass

    def observe_draft(self, *args) -> None:
        pass

    def observe_acceptance(self, *args) -> None:
        pass


# ------------------------------------------------------------------ worker and scheduler


@pytest.fixture
def make_worker(monkeypatch):
    """Builds workers through ``_init_loop``; shuts their drafter threads down and gives the pytest process
    its cores back (a CPU drafter pins the scheduler thread, here the test's thread)."""
    saved = os.sched_getaffinity(0)
    monkeypatch.setattr(worker_mod, "sub_batch_view", fake_sub_batch_view)
    workers = []

    def make(mode: str, drafter: FakeDrafter, target: FakeTarget, trace_file: str | None = None):
        w = MineDraftWorker.__new__(MineDraftWorker)
        w._init_loop(
            config=MineDraftConfig(mode=mode, k="fixed", draft_device="cpu", trace_file=trace_file),
            drafter=drafter,
            draft_device="cpu",
            device="cpu",
            num_steps=K,
            num_draft_tokens=K + 1,
        )
        workers.append(w)
        w._verify = target.verify
        return w

    yield make
    for w in workers:
        w.executor.shutdown()
    os.sched_setaffinity(0, saved)


def spy_plans(w: MineDraftWorker) -> list[StepPlan]:
    """Records the plan of every step the worker makes from now on."""
    plans: list[StepPlan] = []
    plan = w._plan

    def spy(rids):
        plans.append(plan(rids))
        return plans[-1]

    w._plan = spy
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


def run_requests(w: MineDraftWorker, target: FakeTarget, arrivals: Sequence[Arrival], max_steps: int = 400):
    """The fake scheduler: admits arrivals (with the token their prefill committed), runs decode steps, applies
    each result to the rows it names, retires requests at max_new tokens. Returns (outputs by rid, step logs)."""
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
        result = w.forward_batch_generation(batch)
        assert len(target.calls) == n_verifies + 1, "one verify per decode step"
        calls = drafter.calls[n_calls:]
        logs.append(StepLog(**before, plan=plans[-1], draft_calls=calls, verify=target.calls[-1], result=result))
        rows = result.minedraft_rows if result.minedraft_rows is not None else range(len(running))
        for row, tokens in zip(rows, result.committed):
            running[row].output_ids.extend(tokens)
        seq_lens = result.new_seq_lens
        assert seq_lens.tolist() == [len(r.tokens()) for r in running], "new_seq_lens disagree with the rows' tokens"
        keep = []
        for i, req in enumerate(running):
            if len(req.output_ids) >= max_new[req.rid]:
                # Speculation may overshoot; SGLang stops at max_new_tokens.
                outputs[req.rid] = req.output_ids[: max_new[req.rid]]
                w.note_request_finished(rid=req.rid, natural_stop=False)
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


def test_psd_mode_splits_rows_into_halves_that_swap(make_worker):
    w = make_worker("psd", FakeDrafter(rule_right), FakeTarget())
    rids = ["a", "b", "c", "d", "e"]
    first, second = w._plan(rids), w._plan(rids)
    for plan in (first, second):
        assert plan.mode is StepMode.PSD and plan.k == K
        assert not set(plan.verify_rows) & set(plan.draft_rows)
        assert sorted(plan.verify_rows + plan.draft_rows) == list(range(len(rids)))
        assert abs(len(plan.verify_rows) - len(plan.draft_rows)) <= 1
    # The half drafted in one step is the one verified in the next.
    assert (second.verify_rows, second.draft_rows) == (first.draft_rows, first.verify_rows)


@pytest.mark.parametrize("mode, expected", [("auto", StepMode.DRAFT_AHEAD), ("psd", StepMode.SEQUENTIAL)])
def test_one_request_drafts_ahead_in_auto_and_sequentially_in_psd(make_worker, mode, expected):
    w = make_worker(mode, FakeDrafter(rule_right), FakeTarget())
    for _ in range(3):  # whichever half the lone request sits in
        assert w._plan(["a"]) == StepPlan(expected, [0], [], K)


def test_sequential_mode_verifies_every_row(make_worker):
    w = make_worker("sequential", FakeDrafter(rule_right), FakeTarget())
    for _ in range(2):
        assert w._plan(["a", "b", "c"]) == StepPlan(StepMode.SEQUENTIAL, [0, 1, 2], [], K)


@pytest.mark.parametrize("mode", ["auto", "psd", "sequential"])
@pytest.mark.parametrize("rids", [["a"], ["a", "b", "c"]])
def test_k_zero_is_a_plain_step_of_every_row(make_worker, mode, rids):
    w = make_worker(mode, FakeDrafter(rule_right), FakeTarget())
    w.planner = StubPlanner([0])
    assert w._plan(rids) == StepPlan(StepMode.PLAIN, list(range(len(rids))), [], 0)


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
def test_outputs_equal_greedy_decoding(make_worker, mode, rule, k_cycle):
    drafter, target = FakeDrafter(RULES[rule]), FakeTarget()
    w = make_worker(mode, drafter, target)
    if k_cycle:
        # The planner moving k between steps: drafts made at one k get verified in a step planned at another.
        w.planner = StubPlanner(k_cycle)
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
    assert w.pending == {} and drafter.active == set()
    assert w.drafter_failures == 0


def test_psd_drafts_the_other_half_while_the_target_verifies(make_worker):
    """The verify and the background draft meet at a barrier: if the worker ran them one after the other the
    first to arrive would wait in vain and the barrier would break."""
    barrier = threading.Barrier(2, timeout=5)
    drafter, target = FakeDrafter(rule_right, barrier=barrier), FakeTarget(barrier=barrier)
    w = make_worker("psd", drafter, target)
    reqs = [FakeReq("a", prompt(1, 4), [5]), FakeReq("b", prompt(2, 6), [9])]
    batch = FakeBatch(reqs, torch.tensor([len(r.tokens()) for r in reqs]))
    for _ in range(4):
        result = w.forward_batch_generation(batch)
        for row, tokens in zip(result.minedraft_rows, result.committed):
            reqs[row].output_ids.extend(tokens)
        batch.seq_lens = result.new_seq_lens
    assert w.tracer.mode_counts == {"psd": 4}
    assert not barrier.broken


# ------------------------------------------------------------------ 3. row stitching


def test_psd_step_returns_the_verified_rows_stitched_into_the_batch(make_worker):
    drafter, target = FakeDrafter(rule_right), FakeTarget()
    w = make_worker("psd", drafter, target)
    plans = spy_plans(w)
    reqs = [FakeReq(rid, prompt(i, 2 + i), [i]) for i, rid in enumerate("abcde")]
    lens = [len(r.tokens()) for r in reqs]  # 3, 4, 5, 6, 7: distinct, so a row moved shows
    batch = FakeBatch(reqs, torch.tensor(lens))

    result = w.forward_batch_generation(batch)
    verified, unverified = plans[-1].verify_rows, plans[-1].draft_rows
    assert plans[-1].mode is StepMode.PSD and verified and unverified
    assert result.minedraft_rows == verified
    assert target.calls[-1].rids == tuple(reqs[row].rid for row in verified)
    new = result.new_seq_lens.tolist()
    # [bs]: verified rows advanced by their accept length (right drafts: K accepted + the target's token),
    # the drafted rows unchanged.
    assert new == [lens[row] + (K + 1 if row in verified else 0) for row in range(len(reqs))]
    assert batch.seq_lens.tolist() == lens, "the running batch's own seq_lens stay untouched"

    # Next step: the other half, verified with the drafts made for it in the background (no redraft here).
    for row, tokens in zip(result.minedraft_rows, result.committed):
        reqs[row].output_ids.extend(tokens)
    batch.seq_lens = result.new_seq_lens
    n_calls = len(drafter.calls)
    result = w.forward_batch_generation(batch)
    assert result.minedraft_rows == unverified
    assert result.new_seq_lens.tolist() == [new[row] + (K + 1 if row in unverified else 0) for row in range(len(reqs))]
    assert all(on_drafter_thread(w, c) for c in drafter.calls[n_calls:])


def test_a_full_batch_step_names_no_rows(make_worker):
    # Sequential (and plain, draft-ahead) steps verify the whole batch: None tells the scheduler "all rows".
    w = make_worker("sequential", FakeDrafter(rule_right), FakeTarget())
    reqs = [FakeReq("a", prompt(1, 3), [4]), FakeReq("b", prompt(2, 5), [6])]
    result = w.forward_batch_generation(FakeBatch(reqs, torch.tensor([4, 6])))
    assert result.minedraft_rows is None
    assert result.new_seq_lens.tolist() == [4 + K + 1, 6 + K + 1]


# ------------------------------------------------------------------ 4. draft-ahead anchor rule


@pytest.mark.parametrize("rule", ["right", "bad_anchor", "lucky_guess", "mixed", "wrong"])
def test_draft_ahead_drafts_are_used_only_when_the_bonus_guess_was_right(make_worker, rule):
    """Drafts made ahead are used iff every draft of the step was accepted (the request has the length they were
    drafted at) and the guessed bonus token (the anchor) is the request's real last token."""
    rules = {**RULES, "bad_anchor": rule_bad_anchor_every_other, "lucky_guess": rule_lucky_guess}
    drafter, target = FakeDrafter(rules[rule]), FakeTarget()
    w = make_worker("auto", drafter, target)
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
def test_a_failing_drafter_falls_back_to_placeholder_drafts(make_worker, mode):
    drafter, target = FakeDrafter(rule_right, fail=fails_for("b")), FakeTarget()
    w = make_worker(mode, drafter, target)
    # "a" alone, then with "b", then "b" alone.
    arrivals = [Arrival(0, "a", prompt(1, 4), 20), Arrival(2, "b", prompt(2, 3), 30)]
    outputs, logs = run_requests(w, target, arrivals)
    check_exact(outputs, arrivals)

    failed = [c for c in drafter.calls if c.failed]
    assert failed and w.drafter_failures == len(failed)
    # Each failure releases the state (half written, in a real drafter) of every request in the call.
    for rid in ("a", "b"):
        assert drafter.released.count(rid) >= sum(rid in c.rids for c in failed) + 1  # + its finish
    assert drafter.active == set() and w.pending == {}
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


def test_retracted_requests_lose_their_draft_state(make_worker):
    drafter = FakeDrafter(rule_right)
    w = make_worker("psd", drafter, FakeTarget())
    plans = spy_plans(w)
    reqs = [FakeReq(rid, prompt(i, 3), [i]) for i, rid in enumerate("abc")]
    w.forward_batch_generation(FakeBatch(reqs, torch.tensor([4, 4, 4])))
    # A request of the drafted half now holds drafts; the scheduler retracts it before its turn.
    retracted = reqs[plans[-1].draft_rows[0]]
    assert retracted.rid in w.pending and retracted.rid in drafter.active
    rest = [r for r in reqs if r is not retracted]
    w.forward_batch_generation(FakeBatch(rest, torch.tensor([len(r.tokens()) for r in rest])))
    assert retracted.rid in drafter.released
    assert retracted.rid not in w.pending and retracted.rid not in drafter.active


def test_retracted_request_with_failed_drafts_loses_its_placeholder(make_worker):
    drafter = FakeDrafter(rule_right, fail=fails_for("b"))
    w = make_worker("psd", drafter, FakeTarget())
    plans = spy_plans(w)
    # The first request joins the drafted half: "b"'s background draft fails and leaves a placeholder.
    reqs = [FakeReq("b", prompt(2, 3), [2]), FakeReq("a", prompt(1, 3), [1])]
    w.forward_batch_generation(FakeBatch(reqs, torch.tensor([4, 4])))
    assert plans[-1].draft_rows == [0] and w.drafter_failures == 1
    assert "b" in w.pending and "b" not in drafter.active
    w.forward_batch_generation(FakeBatch(reqs[1:], torch.tensor([len(reqs[1].tokens())])))  # "b" retracted
    assert "b" not in w.pending


# ------------------------------------------------------------------ 6. trace


def test_trace_file_has_one_record_per_step(make_worker, tmp_path):
    path = tmp_path / "trace.jsonl"
    target = FakeTarget()
    w = make_worker("auto", FakeDrafter(rule_mixed), target, trace_file=str(path))
    w.planner = StubPlanner([3, 2, 0, 3])  # plain steps too
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
