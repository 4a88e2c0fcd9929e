"""The TP exchanges (``tp_sync.py``) over a real two-process gloo group.

Two processes are forked from this one (the modules are loaded already, so they start at once), join a gloo
group through a file, and run one side each: rank 0 shares, rank 1 receives. What each rank ends up with comes
back through a queue and is compared here. A rank that waits for a message that never comes fails after
``TIMEOUT`` instead of hanging the test.
"""

from __future__ import annotations

import datetime
import math
import multiprocessing
import queue
import traceback
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from minedraft_sglang.tp_sync import TpLink, VerifyDecision
from minedraft_sglang.verify import VerifyContext, sample_chain

TIMEOUT = datetime.timedelta(seconds=30)
FORK = multiprocessing.get_context("fork")


def run_ranks(tmp_path, fn, *args) -> list:
    """``fn(link, *args)`` on rank 0 and rank 1 of a gloo group; returns their results, rank 0's first."""
    results = FORK.Queue()
    procs = [
        FORK.Process(target=_rank_main, args=(rank, str(tmp_path / "rendezvous"), results, fn, args)) for rank in (0, 1)
    ]
    for p in procs:
        p.start()
    try:
        out = dict(results.get(timeout=2 * TIMEOUT.total_seconds()) for _ in procs)
    except queue.Empty:
        raise AssertionError("a rank neither finished nor failed") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for rank in (0, 1):
        if isinstance(out[rank], BaseException):
            raise AssertionError(f"rank {rank} failed") from out[rank]
    return [out[0], out[1]]


def _rank_main(rank, rendezvous, results, fn, args):
    # A forked child inherits the parent's OpenMP pool state but none of its
    # threads (earlier tests give the test process a pool: the worker's
    # thread teams); one thread never waits on them.
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2, timeout=TIMEOUT)
        group = dist.group.WORLD
        link = TpLink(rank=rank, cpu_group=group, device_group=group, src=0)
        results.put((rank, fn(link, *args)))
    except BaseException:  # noqa: BLE001 - reported to the test process
        results.put((rank, RuntimeError(traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------ the decision


def decisions() -> list[tuple[VerifyDecision, int]]:
    """(decision, running batch size) pairs covering every shape a step takes: a PSD half in a non-sorted
    order (the order must survive: it is the verify's row order), TETRIS counts, a plain step (no drafts), a
    full batch at the widest window, one request."""
    g = torch.Generator().manual_seed(0)
    drafts = lambda n, w: torch.randint(0, 50_000, (n, w), generator=g)  # noqa: E731
    return [
        (VerifyDecision([4, 1, 3], drafts(3, 3), None), 6),
        (VerifyDecision([0, 2], drafts(2, 5), torch.tensor([5, 1])), 5),
        (VerifyDecision([0, 1, 2, 3], drafts(4, 0), None), 4),
        (VerifyDecision(list(range(7)), drafts(7, 5), torch.tensor([0, 1, 2, 3, 4, 5, 5])), 7),
        (VerifyDecision([0], drafts(1, 2), None), 1),
    ]


def _share_decisions(link: TpLink, max_width: int) -> list:
    out = []
    for decision, bs in decisions():
        got = link.share_decision(decision if link.leads else None, batch_size=bs, max_width=max_width)
        num_drafts = None if got.num_drafts is None else got.num_drafts.tolist()
        out.append((got.rows, got.drafts.dtype, got.drafts.tolist(), list(got.drafts.shape), num_drafts))
    return out


def test_rank_1_receives_exactly_rank_0s_decision(tmp_path):
    rank0, rank1 = run_ranks(tmp_path, _share_decisions, 5)
    sent = [
        (
            d.rows,
            torch.int64,
            d.drafts.tolist(),
            list(d.drafts.shape),
            None if d.num_drafts is None else d.num_drafts.tolist(),
        )
        for d, _ in decisions()
    ]
    assert rank0 == sent
    assert rank1 == sent


def test_a_decision_too_big_for_the_batch_is_refused_before_it_is_sent():
    # The receiving ranks size their buffer from the batch and --speculative-num-steps; a bigger decision
    # would be cut short there, so rank 0 stops instead (no group needed: nothing is sent).
    link = TpLink(rank=0, cpu_group=None, device_group=None, src=0)
    for decision, bs, width in [
        (VerifyDecision([0, 1, 2], torch.zeros(3, 2, dtype=torch.int64), None), 2, 5),
        (VerifyDecision([0], torch.zeros(1, 6, dtype=torch.int64), None), 2, 5),
    ]:
        with pytest.raises(ValueError, match="does not fit"):
            link.share_decision(decision, batch_size=bs, max_width=width)


# ------------------------------------------------------------------ the sampled acceptance

BS, WIDTH, VOCAB = 16, 4, 40


def _sample_both_ways(link: TpLink) -> dict:
    """``sample_chain`` on this rank's own random coins (seeded by the rank), without and with the link."""
    g = torch.Generator().manual_seed(1)
    drafts = torch.randint(0, VOCAB, (BS * WIDTH,), generator=g, dtype=torch.int64)
    # Near-uniform, except that each draft has probability ~1/2 where it is checked: accept lengths vary, and
    # different coins pick differently.
    logits = torch.randn(BS * WIDTH, VOCAB, generator=g) * 0.1
    checked = torch.arange(BS * WIDTH) % WIDTH < WIDTH - 1
    logits[checked.nonzero()[:, 0], drafts.roll(-1)[checked]] += math.log(VOCAB)
    verify_input = SimpleNamespace(draft_token_num=WIDTH, draft_token=drafts)
    sampling_info = SimpleNamespace(
        logit_bias=None,
        temperatures=torch.ones(BS, 1),
        top_ks=torch.full((BS,), VOCAB),
        top_ps=torch.ones(BS),
        min_ps=torch.zeros(BS),
        need_top_k_sampling=False,
        need_top_p_sampling=False,
        need_min_p_sampling=False,
        max_top_k=None,
    )
    batch = SimpleNamespace(sampling_info=sampling_info, seq_lens=torch.full((BS,), 10))
    out = {}
    for name, tp in (("own", None), ("shared", link)):
        chains = drafts.view(BS, WIDTH)[:, 1:]  # each window's bonus token first
        context = VerifyContext(chains, None, None, torch.Generator().manual_seed(100 + link.rank), tp)
        logits_output = SimpleNamespace(next_token_logits=logits.clone())
        out[name] = [t.tolist() for t in sample_chain(verify_input, batch, logits_output, context)]
    return out


def test_every_rank_commits_rank_0s_sampled_acceptance(tmp_path):
    rank0, rank1 = run_ranks(tmp_path, _sample_both_ways)
    # The premise: each rank's own coins pick differently, so keeping its own result would part the ranks.
    assert rank0["own"] != rank1["own"]
    assert len(set(rank0["own"][1])) > 2, "accept lengths should vary"
    assert rank0["shared"] == rank0["own"]
    assert rank1["shared"] == rank0["own"]
