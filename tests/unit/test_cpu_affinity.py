"""The core split between the scheduler (verify) thread and the drafter's
thread, and that pinning acts on one thread only, whatever order threads are
created in (the kernel's view, read back with sched_getaffinity)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from minedraft_sglang.cpu import affinity
from minedraft_sglang.cpu.affinity import CoreError, CoreSplit, parse_cores, split_cores


def test_parse_cores():
    assert parse_cores("1") == {1}
    assert parse_cores("2-4") == {2, 3, 4}
    assert parse_cores("0,2-3,7") == {0, 2, 3, 7}
    for bad in ("", "a", "1-", "1,,2", " 1", "3-1"):
        with pytest.raises(CoreError, match="--minedraft-draft-cores"):
            parse_cores(bad)


def test_auto_gives_the_drafter_the_last_core():
    assert split_cores({0, 1}, "auto") == CoreSplit(scheduler=frozenset({0}), drafter=frozenset({1}))
    assert split_cores({0, 1, 2, 3}, "auto") == CoreSplit(frozenset({0, 1, 2}), frozenset({3}))
    assert split_cores({5}, "auto") is None


def test_explicit_cores_must_leave_the_scheduler_some():
    assert split_cores({0, 1, 2, 3}, "2-3") == CoreSplit(frozenset({0, 1}), frozenset({2, 3}))
    with pytest.raises(CoreError, match="cores 4 are not among"):
        split_cores({0, 1}, "1,4")
    with pytest.raises(CoreError, match="takes every allowed core"):
        split_cores({0, 1}, "0-1")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_pinning_is_per_thread_and_independent_of_creation_order():
    """The bug this guards against: the scheduler thread pinned itself first,
    the drafter's thread (created later) inherited that one core and never
    got its own. Here the 'scheduler' pins first, then a new thread pins
    itself explicitly; the kernel must show two disjoint sets."""
    split = split_cores(os.sched_getaffinity(0), "auto")
    seen = {}

    def scheduler():
        affinity.pin_current_thread(split.scheduler)
        drafter = threading.Thread(target=drafter_thread)
        drafter.start()
        drafter.join()
        seen["scheduler"] = affinity.thread_cores(threading.get_native_id())

    def drafter_thread():
        inherited = affinity.thread_cores(threading.get_native_id())
        affinity.pin_current_thread(split.drafter)
        affinity.name_current_thread("minedraft-draft")
        seen["inherited"] = inherited
        seen["drafter"] = affinity.thread_cores(threading.get_native_id())
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            seen["name"] = f.read().strip()

    t = threading.Thread(target=scheduler)
    t.start()
    t.join()
    assert seen["inherited"] == split.scheduler  # what a new thread gets by default
    assert seen["scheduler"] == split.scheduler
    assert seen["drafter"] == split.drafter
    assert seen["name"] == "minedraft-draft"
    # This (the test's) thread was never pinned.
    assert affinity.thread_cores(threading.get_native_id()) == split.scheduler | split.drafter


def test_plan_cores_offers_splits_of_every_core():
    two = affinity.plan_cores({0, 1}, "auto")
    assert two.all == {0, 1} and two.default == 1
    assert two.splits == {1: CoreSplit(scheduler=frozenset({0}), drafter=frozenset({1}))}
    assert sorted(affinity.plan_cores(range(4), "auto").splits) == [1, 2, 3]
    sixteen = affinity.plan_cores(range(16), "auto")
    assert sorted(sixteen.splits) == [1, 4, 8, 12, 15]
    assert all(s.scheduler | s.drafter == sixteen.all and not s.scheduler & s.drafter for s in sixteen.splits.values())
    explicit = affinity.plan_cores(range(4), "2-3")
    assert explicit.splits == {2: CoreSplit(frozenset({0, 1}), frozenset({2, 3}))} and explicit.default == 2
    assert affinity.plan_cores({3}, "auto") is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_team_moves_its_openmp_threads_with_it():
    """OpenMP pool threads keep the CPU set they were created with: a team that re-pinned only its own
    thread would leave them on the cores the other side now uses. Run in a thread of its own (its pool is
    its own) so the test process's main thread keeps no OpenMP pool (fork-based tests follow)."""
    allowed = frozenset(os.sched_getaffinity(0))
    first = min(allowed)
    seen = {}

    def master():
        team = affinity.Team.discover(allowed)
        seen["workers"] = team.workers
        seen["all"] = {tid: affinity.thread_cores(tid) for tid in (team.master, *team.workers)}
        team.use(frozenset({first}))
        seen["one"] = {tid: affinity.thread_cores(tid) for tid in (team.master, *team.workers)}
        seen["threads_one"] = torch.get_num_threads()
        team.use(allowed)
        seen["threads_all"] = torch.get_num_threads()

    t = threading.Thread(target=master)
    t.start()
    t.join()
    assert len(seen["workers"]) == len(allowed) - 1, seen
    assert all(cores == allowed for cores in seen["all"].values()), seen
    assert all(cores == {first} for cores in seen["one"].values()), seen
    assert (seen["threads_one"], seen["threads_all"]) == (1, len(allowed))
