"""The servers the benchmark measures: one per mode (ModeServer), and a Pool
that keeps at most --max-alive of them running, starting each when its turn
comes. Manual: docs/lab.md.
"""

from __future__ import annotations

import shlex
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from minedraft_sglang.lab.bench.client import send_all
from minedraft_sglang.lab.bench.plan import RunSpec
from minedraft_sglang.lab.launcher import PortTaken, Server, minedraft_args
from minedraft_sglang.metrics import StepRecord, read_trace


@dataclass(frozen=True)
class ServerSettings:
    """What every server of one benchmark invocation shares."""

    target: str
    draft: str
    k: int
    # --server-args, split into words: appended to every server's command.
    extra: tuple[str, ...]
    # Server logs and trace files go here.
    workdir: Path
    startup_timeout: float
    # After a start, requests that fill every slot once (see ModeServer.warm_up).
    warmup_prompts: tuple[str, ...]
    warmup_tokens: int
    # The CPU set every server runs on: each baseline gets exactly the cores
    # the MINEDRAFT servers get, all of them working (see threads()).
    cores: frozenset[int]


def threads(spec: RunSpec, cores: frozenset[int]) -> tuple[dict[str, str], str]:
    """The OpenMP environment of ``spec``'s server on ``cores`` and a line
    saying how its threads use them: one thread per core in one process, one
    rank per core under --tp, and for MINEDRAFT the worker's own per-step
    split (cpu/affinity.py)."""
    n = len(cores)
    if spec.engine == "plain-tp":
        return {"OMP_NUM_THREADS": "1"}, f"--tp {n}: {n} ranks x 1 thread"
    if spec.engine in ("plain", "standalone"):
        return {"OMP_NUM_THREADS": str(n)}, f"1 process x {n} threads"
    return {"OMP_NUM_THREADS": str(n)}, f"{n} threads, split per step between verify and draft"


def served_dtype(server_args: str) -> str:
    """The --dtype the servers get (the launcher's float32 unless --server-args says otherwise)."""
    words = shlex.split(server_args)
    return next((words[i + 1] for i in range(len(words) - 1) if words[i] == "--dtype"), "float32")


def server_args(spec: RunSpec, settings: ServerSettings, *, max_running: int, trace: Path) -> list[str]:
    """The sglang arguments of ``spec``'s mode; a MINEDRAFT server writes its
    steps to ``trace``."""
    s = settings
    cap = ["--max-running-requests", str(max_running)]
    if spec.engine == "plain":
        return ["--model-path", s.target, *cap, *s.extra]
    if spec.engine == "plain-tp":
        return ["--model-path", s.target, "--tp", str(len(s.cores)), *cap, *s.extra]
    if spec.engine == "standalone":
        return [
            "--model-path",
            s.target,
            "--speculative-algorithm",
            "STANDALONE",
            "--speculative-draft-model-path",
            s.draft,
            "--speculative-num-steps",
            str(s.k),
            "--speculative-eagle-topk",
            "1",
            "--speculative-num-draft-tokens",
            str(s.k + 1),
            *cap,
            *spec.flags,
            *s.extra,
        ]
    return minedraft_args(
        s.target, s.draft, spec.engine, s.k, [*cap, "--minedraft-trace-file", str(trace), *spec.flags, *s.extra]
    )


class ModeServer:
    """The server of one mode, started and stopped as often as needed; its
    --max-running-requests is the largest concurrency among the mode's runs,
    so nothing queues in the server."""

    def __init__(self, mode: str, specs: list[RunSpec], settings: ServerSettings):
        self.mode = mode
        self.specs = specs
        self.settings = settings
        self.max_running = max(s.concurrency for s in specs)
        self.trace = settings.workdir / f"{mode}.trace.jsonl"
        self.cmd = server_args(specs[0], settings, max_running=self.max_running, trace=self.trace)
        self.env, self.threads = threads(specs[0], settings.cores)
        self.starts = 0
        self.started = 0.0
        self.server: Server | None = None

    def start(self) -> None:
        """Starts the process; wait_ready() waits for it."""
        log = self.settings.workdir / f"{self.mode}.{self.starts}.log"
        self.starts += 1
        tqdm.write(f"[bench] starting {self.mode} server (--max-running-requests {self.max_running}, log {log})")
        self.started = time.monotonic()
        self.server = Server(self.cmd, log, env=self.env, cores=self.settings.cores)

    def wait_ready(self, tries: int = 3) -> None:
        """Waits for the started server to answer; one whose port was taken
        before it bound starts again on a new port (``tries`` starts in all)."""
        for _ in range(tries - 1):
            try:
                self.server.wait_ready(self.settings.startup_timeout)
                break
            except PortTaken:
                self.start()
        else:
            self.server.wait_ready(self.settings.startup_timeout)
        tqdm.write(f"[bench]   {self.mode} ready {time.monotonic() - self.started:.0f} s after its start")

    def warm_up(self) -> None:
        """First-use costs (allocator growth, the drafter thread's start, the
        prompts' prefill shapes) and a MINEDRAFT planner's first explorations
        are paid here, unmeasured, with every slot (both PSD sub-batches)
        filled for as many tokens as a measured request gets: a server's
        first minute, not its steady state (2026-12-06: a fresh server's
        first prefill of 8 prompts took 16 s, then 5-6 s; the planner's
        explorations at decisions 8, 16 and 32 fell in the first measured
        run of 20-30 steps, docs/benchmarks.md)."""
        warmup = (list(self.settings.warmup_prompts) * self.max_running)[: self.max_running]
        send_all(self.server.url, warmup, max_new_tokens=self.settings.warmup_tokens, concurrency=self.max_running)

    def steps(self) -> list[StepRecord]:
        """Every step the server's MINEDRAFT worker traced so far, across
        starts (none for plain and STANDALONE servers)."""
        return read_trace(self.trace) if self.trace.exists() else []

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.stop()
        self.server = None


def mode_servers(plan: list[RunSpec], settings: ServerSettings) -> list[ModeServer]:
    """One server per mode of ``plan``, in the order the modes first appear."""
    by_mode: dict[str, list[RunSpec]] = {}
    for spec in plan:
        by_mode.setdefault(spec.mode, []).append(spec)
    return [ModeServer(mode, specs, settings) for mode, specs in by_mode.items()]


def stop_all(servers: list[ModeServer]) -> None:
    for s in servers:
        s.stop()


class Pool:
    """Serves ``visits`` in order with at most ``capacity`` servers alive.
    When a server must start, those with no visit left are stopped, then the
    least recently used ones while there is no room, and the next servers to
    be visited start together with it to fill the free places."""

    def __init__(self, visits: list[ModeServer], capacity: int):
        self.visits = visits
        self.capacity = capacity
        self.alive: OrderedDict[str, ModeServer] = OrderedDict()

    def visit(self, index: int) -> None:
        """Makes the server of visit ``index`` ready."""
        s = self.visits[index]
        if s.mode not in self.alive:
            self._make_room(index)
            self._start_group(index)
        self.alive.move_to_end(s.mode)

    def _make_room(self, index: int) -> None:
        upcoming = self.visits[index:]
        stop_all([self.alive.pop(m) for m in list(self.alive) if self.alive[m] not in upcoming])
        while len(self.alive) >= self.capacity:
            self.alive.popitem(last=False)[1].stop()

    def _start_group(self, index: int) -> None:
        group: list[ModeServer] = []
        for t in self.visits[index:]:
            if t.mode not in self.alive and t not in group and len(group) < self.capacity - len(self.alive):
                group.append(t)
        # Startups overlap, but every one is done before the next run, and
        # each warm-up runs alone, not beside another server's startup. (A
        # MINEDRAFT server's first steps still run 3-7x slow alone: first
        # uses, 2026-12-06, docs/benchmarks.md; the planner copes with that.)
        for t in group:
            t.start()
        for t in group:
            t.wait_ready()
        for t in group:
            t.warm_up()
            self.alive[t.mode] = t
