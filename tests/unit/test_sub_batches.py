"""Sub-batch bookkeeping: which request is verified and which drafted."""

from __future__ import annotations

import random

import pytest

from minedraft_sglang.sub_batches import SubBatches


def _check_invariants(sb: SubBatches, rids, verify, draft):
    assert sorted(verify + draft) == list(range(len(rids)))
    assert set(sb.group) == set(rids)
    sizes = sb.sizes()
    assert abs(sizes[0] - sizes[1]) <= 1, sizes


def test_sub_batches_alternate_and_stay_balanced_under_churn():
    rng = random.Random(0)
    sb = SubBatches()
    running: list[str] = []
    next_id = 0
    last_verified: set[str] = set()
    for _ in range(500):
        for rid in list(running):
            if rng.random() < 0.15:
                running.remove(rid)
        for _ in range(rng.choice([0, 0, 1, 2, 5])):
            running.append(f"r{next_id}")
            next_id += 1
        if not running:
            continue
        prev_group = dict(sb.group)
        verify, draft = sb.split(running)
        _check_invariants(sb, running, verify, draft)
        verified = {running[i] for i in verify}
        # A request that stayed in its half is verified every other step.
        for rid in verified:
            if rid in prev_group and sb.group[rid] == prev_group[rid] and rid in last_verified:
                pytest.fail(f"{rid} verified twice in a row without moving")
        last_verified = verified


def test_newcomers_are_drafted_before_their_first_verification():
    sb = SubBatches()
    verify, draft = sb.split(["a", "b"])
    assert (len(verify), len(draft)) == (1, 1)
    verify, draft = sb.split(["a", "b", "c"])
    # "c" arrives; the two halves are even, so it joins the drafted half.
    assert 2 in draft
