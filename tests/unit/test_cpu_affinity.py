"""The core split between the scheduler (verify) thread and the drafter's
thread, and that pinning acts on one thread only, whatever order threads are
created in (the kernel's view, read back with sched_getaffinity)."""

from __future__ import annotations

import os
import threading

import pytest

from minedraft_sglang import cpu_affinity
from minedraft_sglang.cpu_affinity import CoreError, CoreSplit, parse_cores, split_cores


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
        cpu_affinity.pin_current_thread(split.scheduler)
        drafter = threading.Thread(target=drafter_thread)
        drafter.start()
        drafter.join()
        seen["scheduler"] = cpu_affinity.thread_cores(threading.get_native_id())

    def drafter_thread():
        inherited = cpu_affinity.thread_cores(threading.get_native_id())
        cpu_affinity.pin_current_thread(split.drafter)
        cpu_affinity.name_current_thread("minedraft-draft")
        seen["inherited"] = inherited
        seen["drafter"] = cpu_affinity.thread_cores(threading.get_native_id())
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
    assert cpu_affinity.thread_cores(threading.get_native_id()) == split.scheduler | split.drafter
