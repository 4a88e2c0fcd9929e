"""Which CPU cores the drafter's thread and the scheduler's (verify) thread use.

A server with a CPU drafter owns the cores the scheduler process may run on.
Whichever stage runs alone (a plain decode step, a sequential draft, the
verify of a sequential step, a prefill) uses all of them; while the drafter
drafts beside the target's verify (PSD, draft-ahead) they are split, the
scheduler thread verifying on one part and the drafter's thread drafting on
the other. Which split, and whether to overlap at all, is decided per step
(``adaptive_k``); ``CorePlan`` holds the splits to choose from.

Linux keeps a CPU set per *thread*, a new thread inherits its creator's set,
and torch's intra-op thread count is per calling thread too. So each side is
a ``Team``: the thread that runs its forwards plus the OpenMP threads of that
thread's parallel regions, moved together, and each side sets its own thread
count: never more busy compute threads than cores.

``--minedraft-draft-cores`` is ``auto`` (every split the planner may choose;
with a fixed k the drafter overlaps on the last core) or a core list such as
``1``, ``2-3`` or ``0,2-3`` (the drafter overlaps on exactly those).

Pure functions except ``Team`` and the thin wrappers over the kernel's calls
(``pin_current_thread``, ``name_current_thread``, ``thread_cores``,
``cpu_ticks``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import threading
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

FLAG = "--minedraft-draft-cores"
AUTO = "auto"

_LIST_RE = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


class CoreError(ValueError):
    """A bad core list; the message is one line naming the flag."""


@dataclass(frozen=True)
class CoreSplit:
    scheduler: frozenset[int]  # the scheduler thread: target prefill and verify
    drafter: frozenset[int]  # the drafter's thread


def parse_cores(text: str) -> frozenset[int]:
    """``"0,2-3"`` -> {0, 2, 3} (the syntax of ``taskset -c`` and cpusets)."""
    if not _LIST_RE.match(text):
        raise CoreError(f"{FLAG} {text!r} is not 'auto' or a core list like '1', '2-3' or '0,2-3'")
    cores: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise CoreError(f"{FLAG} {text!r}: range {part} runs backwards")
        cores.update(range(first, last + 1))
    return frozenset(cores)


def split_cores(allowed: AbstractSet[int], draft_cores: str) -> CoreSplit | None:
    """Split ``allowed`` (the process's cores) between scheduler and drafter.

    None when ``auto`` finds a single core: draft and verify must then share
    it, and PSD can hide nothing. An explicit list must be a proper subset of
    ``allowed``: the scheduler keeps the rest.
    """
    allowed = frozenset(allowed)
    if draft_cores == AUTO:
        if len(allowed) < 2:
            return None
        last = max(allowed)
        return CoreSplit(scheduler=allowed - {last}, drafter=frozenset({last}))
    drafter = parse_cores(draft_cores)
    if not drafter <= allowed:
        raise CoreError(
            f"{FLAG} {draft_cores!r}: cores {format_cores(drafter - allowed)} are not among this "
            f"process's allowed cores {format_cores(allowed)}"
        )
    if drafter == allowed:
        raise CoreError(
            f"{FLAG} {draft_cores!r} takes every allowed core ({format_cores(allowed)}); "
            "leave at least one for the target"
        )
    return CoreSplit(scheduler=allowed - drafter, drafter=drafter)


def format_cores(cores: AbstractSet[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


@dataclass(frozen=True)
class CorePlan:
    """The cores of a server with a CPU drafter: ``all`` for a stage that runs
    alone, ``splits[d]`` (d cores to the drafter) while the stages overlap."""

    all: frozenset[int]
    splits: dict[int, CoreSplit] = field(hash=False)
    # The split a server without the planner (a fixed k) overlaps on.
    default: int


def plan_cores(allowed: AbstractSet[int], draft_cores: str) -> CorePlan | None:
    """The splits of ``allowed`` a server may overlap on; None with a single
    core (nothing to overlap on). ``auto``: the drafter takes the last d
    cores for a few d spread over 1..n-1 (every d up to 4 cores); an explicit
    list is the one split."""
    allowed = frozenset(allowed)
    if draft_cores != AUTO:
        split = split_cores(allowed, draft_cores)
        return CorePlan(allowed, {len(split.drafter): split}, len(split.drafter))
    n = len(allowed)
    if n < 2:
        return None
    ordered = sorted(allowed)
    counts = sorted({1, n // 4, n // 2, 3 * n // 4, n - 1} - {0})
    splits = {d: CoreSplit(scheduler=frozenset(ordered[:-d]), drafter=frozenset(ordered[-d:])) for d in counts}
    return CorePlan(allowed, splits, default=1)


# How long Team.discover keeps a team busy: at least DISCOVER_S, and until
# every member burned a few clock ticks (10 ms each) or DISCOVER_MAX_S passed
# (a loaded machine).
DISCOVER_S = 0.1
DISCOVER_MAX_S = 2.0


@dataclass
class Team:
    """A thread that runs forwards (``master``) and the OpenMP threads that
    run its parallel regions (``workers``: GNU OpenMP keeps a pool per
    master thread, each pool thread with the CPU set it was created with).

    ``use(cores)``, called on the master thread, moves every member onto
    ``cores`` and sets the master's intra-op thread count to one per core.
    What a switch costs is measured in docs/design.md, "Cores follow the step".
    """

    master: int
    workers: frozenset[int]
    cores: frozenset[int] | None = None

    @classmethod
    def discover(cls, cores: AbstractSet[int]) -> Team:
        """Called on the master thread: runs it at one thread per core of
        ``cores`` and takes as workers the ``len(cores) - 1`` other threads
        of this process that burned the most CPU time meanwhile. The pool
        then holds every thread a team of up to ``len(cores)`` uses."""
        import torch  # the server has it loaded; the lab's core tools run without it

        cores = frozenset(cores)
        master = threading.get_native_id()
        pin_current_thread(cores)
        torch.set_num_threads(len(cores))
        if len(cores) == 1:
            return cls(master, frozenset(), cores)
        # The pool threads burn CPU only inside the team's parallel regions
        # (at startup nothing else here computes): the busiest others are
        # the team, once each has a few ticks or time is up.
        before = cpu_ticks()
        a = torch.ones(256, 256)
        start = time.monotonic()
        while True:
            for _ in range(20):
                a @ a
            burnt = {tid: ticks - before.get(tid, 0) for tid, ticks in cpu_ticks().items() if tid != master}
            busiest = sorted(burnt, key=burnt.get, reverse=True)[: len(cores) - 1]
            elapsed = time.monotonic() - start
            if elapsed > DISCOVER_MAX_S or (elapsed > DISCOVER_S and min((burnt[t] for t in busiest), default=0) >= 3):
                break
        workers = frozenset(t for t in busiest if burnt[t] > 0)
        if len(workers) != len(cores) - 1:
            logger.warning(
                "MineDraft: found %d OpenMP threads beside thread %d, expected %d; threads not found keep "
                "their CPU set when the split changes",
                len(workers),
                master,
                len(cores) - 1,
            )
        return cls(master, workers, cores)

    def use(self, cores: frozenset[int]) -> None:
        """On the master thread: run on ``cores``, one thread per core."""
        import torch

        if cores == self.cores:
            return
        gone = set()
        for tid in (self.master, *self.workers):
            try:
                os.sched_setaffinity(tid, cores)
            except ProcessLookupError:  # OpenMP let a pool thread go
                gone.add(tid)
        self.workers -= gone
        torch.set_num_threads(len(cores))
        self.cores = cores


def pin_current_thread(cores: AbstractSet[int]) -> None:
    # pid 0 is the calling thread on Linux, not the whole process.
    os.sched_setaffinity(0, cores)


def thread_cores(tid: int) -> frozenset[int]:
    """The kernel's CPU set of one thread (a native thread id)."""
    return frozenset(os.sched_getaffinity(tid))


def stat_fields(path: str | Path) -> list[str]:
    """The fields of a ``/proc/.../stat`` file after the command, which is in
    parentheses and may hold spaces: [0] the state, [9] majflt, [11] utime,
    [12] stime (fields 3, 12, 14 and 15 of proc(5))."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def cpu_ticks() -> dict[int, int]:
    """utime + stime in clock ticks of every thread of this process
    (``/proc/self/task/*/stat`` fields 14 and 15)."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = stat_fields(task / "stat")
        except OSError:  # the thread ended meanwhile
            continue
        out[int(task.name)] = int(fields[11]) + int(fields[12])
    return out


_PR_SET_NAME = 15


def name_current_thread(name: str) -> None:
    """Give the calling thread an OS-level name (``/proc/.../comm``, ``top -H``),
    which Python's thread names are not; the kernel keeps 15 bytes."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
