"""Which CPU cores the drafter's thread and the scheduler's (verify) thread own.

PSD on CPU overlaps two forwards only if they run on different cores. Linux
keeps a CPU set per *thread*, and a new thread inherits its creator's set, so
the split is decided once, from the scheduler process's allowed cores at
startup, and each side is pinned explicitly to its own part: nothing depends
on which thread is created first.

``--minedraft-draft-cores`` is ``auto`` (the last allowed core drafts, the
others verify) or a core list such as ``1``, ``2-3`` or ``0,2-3``.

Pure functions except ``pin_current_thread``, ``name_current_thread`` and
``thread_cores``, which are thin wrappers over the kernel's calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

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


def pin_current_thread(cores: AbstractSet[int]) -> None:
    # pid 0 is the calling thread on Linux, not the whole process.
    os.sched_setaffinity(0, cores)


def thread_cores(tid: int) -> frozenset[int]:
    """The kernel's CPU set of one thread (a native thread id)."""
    return frozenset(os.sched_getaffinity(tid))


_PR_SET_NAME = 15


def name_current_thread(name: str) -> None:
    """Give the calling thread an OS-level name (``/proc/.../comm``, ``top -H``),
    which Python's thread names are not; the kernel keeps 15 bytes."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
