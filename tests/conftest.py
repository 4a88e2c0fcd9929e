"""Shared fixtures: tiny models and a pool of real SGLang servers on CPU.

Servers start on first use, one at a time (SGLang sizes its KV pool from the
free memory it measures around model loading, which concurrent startups
disturb). Each server is three processes, 2.7 GiB together (PSS, a tiny
psd server, 2026-12-06), so at most MAX_ALIVE stay up; the least recently
used one (but those in KEEP) is stopped to make room. The run
ends with each server's starts and startup seconds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from minedraft_sglang.lab import tiny_eagle, tiny_models
from minedraft_sglang.lab.launcher import Server, minedraft_args, start_ready

K = 3  # --speculative-num-steps used by the test servers
DRAFT_VOCAB = 512  # of the tiny models' 1024 token ids
# Drafters whose built or borrowed weights are the test's premise (a bigram draft that is right, and
# sure or unsure where built so; a target drafting for itself), not the CPU default's int8 copy. Both
# bigram tests failed in one of two suite runs with int8 drafts (2026-12-07); with these weights the
# draft-stop test's planner still ran k <= 2 throughout one run (a cost call), which its check now allows.
BUILT = ["--minedraft-draft-weights", "checkpoint"]


def _specs(tmp: Path) -> dict[str, list[str]]:
    m = {
        name: str(tiny_models.model_path(name))
        for name in ("target", "draft", "bigram", "bigram-draft", "bigram-mixed-draft")
    }
    trace = lambda name: ["--minedraft-trace-file", str(tmp / f"{name}.trace.jsonl")]  # noqa: E731
    return {
        "plain-target": ["--model-path", m["target"]],
        "seq-target": minedraft_args(m["target"], m["draft"], "sequential", K, trace("seq-target")),
        # Small prefill chunks: long prompts go through chunked prefill.
        "psd-target": minedraft_args(
            m["target"],
            m["draft"],
            "psd",
            K,
            [*trace("psd-target"), "--enable-metrics", "--chunked-prefill-size", "32"],
        ),
        # The target drafting for itself: its greedy drafts are often, not
        # always, what a sampled target picks, so both acceptance branches run.
        "psd-self": minedraft_args(m["target"], m["target"], "psd", K),
        # The same, proposing only token ids below DRAFT_VOCAB, with the
        # target's own weights: its greedy drafts are the target's.
        "seq-self-vocab": minedraft_args(
            m["target"], m["target"], "sequential", K, ["--minedraft-draft-vocab", str(DRAFT_VOCAB), *BUILT]
        ),
        # SGLang's own speculative decoding on CPU, for comparison.
        "standalone-self": [
            "--model-path",
            m["target"],
            "--speculative-algorithm",
            "STANDALONE",
            "--speculative-draft-model-path",
            m["target"],
            "--speculative-num-steps",
            str(K),
            "--speculative-eagle-topk",
            "1",
            "--speculative-num-draft-tokens",
            str(K + 1),
        ],
        "tetris-target": minedraft_args(
            m["target"],
            m["target"],
            "psd",
            K,
            [*trace("tetris-target"), "--minedraft-tetris", "--minedraft-tetris-extra", "2"],
        ),
        # EAGLE heads trained on the target's own text (tiny_eagle.py); the EAGLE-3 one names no target
        # layers (no eagle_config), so the target returns SGLang's default ones (named layers: unit tests).
        **{
            f"{head}-{mode}": minedraft_args(
                m["target"], str(tiny_eagle.model_path(head)), mode, K, trace(f"{head}-{mode}")
            )
            for head, mode in (("eagle", "sequential"), ("eagle3-default", "auto"))
        },
        # k chosen online: an unrelated draft (drafting does not pay) and an
        # agreeing one (it does).
        "autok-target": minedraft_args(
            m["target"], m["draft"], "psd", K, [*trace("autok-target"), "--minedraft-k", "auto"]
        ),
        "autok-bigram": minedraft_args(
            m["bigram"], m["bigram-draft"], "psd", K, [*trace("autok-bigram"), "--minedraft-k", "auto", *BUILT]
        ),
        "plain-bigram": ["--model-path", m["bigram"]],
        "seq-bigram": minedraft_args(m["bigram"], m["bigram-draft"], "sequential", K, trace("seq-bigram")),
        "auto-bigram": minedraft_args(m["bigram"], m["bigram-draft"], "auto", K, trace("auto-bigram")),
        # A draft that is right and confident after two thirds of the tokens,
        # wrong and unsure after the rest: with and without TETRIS.
        "psd-mixed": minedraft_args(m["bigram"], m["bigram-mixed-draft"], "psd", K, trace("psd-mixed")),
        # The same draft ending each chain after its first unsure token
        # (hard guesses have probability <= 0.57, easy ones >= 0.997).
        "stop-mixed": minedraft_args(
            m["bigram"],
            m["bigram-mixed-draft"],
            "sequential",
            K,
            [*trace("stop-mixed"), "--minedraft-k", "auto", "--minedraft-draft-stop", "0.9", *BUILT],
        ),
        "tetris-mixed": minedraft_args(
            m["bigram"],
            m["bigram-mixed-draft"],
            "psd",
            K,
            [*trace("tetris-mixed"), "--minedraft-tetris", "--minedraft-tetris-extra", "2"],
        ),
    }


MAX_ALIVE = 6
# Never the ones stopped to make room: the exactness references (plain-target
# of seven modules; plain-bigram of six tests of test_server.py, between which
# seven other servers start: it started three times in CI on 2026-12-06), and
# two servers of two modules each that others ran between (each started twice
# on 2026-12-06 with only the first kept).
KEEP = {"plain-target", "plain-bigram", "psd-target", "autok-target"}
# Modules that stop every pooled server (they need the machine to themselves,
# or a smaller pool) run first, so the servers the others share start once.
POOL_CLOSERS = ("test_parallel.py", "test_reliability.py")


class ServerPool:
    """Servers by name, started on demand; at most ``max_alive`` at once (the
    least recently used one stops to make room). A server that died in an
    earlier test starts afresh (recorded in ``restarts``)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.max_alive = MAX_ALIVE
        self.specs: dict[str, tuple[list[str], dict]] = {name: (args, {}) for name, args in _specs(tmp).items()}
        self.servers: dict[str, Server] = {}  # in least-recently-used order
        self.logs: dict[str, Path] = {}
        self.starts: dict[str, list[float]] = {}  # startup seconds, per start
        self.restarts: list[str] = []

    def register(self, name: str, args: list[str], env: dict | None = None) -> None:
        """A server spec of one test module (extra environment in ``env``)."""
        self.specs[name] = (args, env or {})

    def get(self, name: str) -> Server:
        server = self.servers.pop(name, None)
        if server is not None and server.proc.poll() is not None:
            # Died in an earlier test: that test failed; start afresh.
            self.restarts.append(name)
            server.stop()
            server = None
        if server is None:
            while len(self.servers) >= self.max_alive:
                lru = next((n for n in self.servers if n not in KEEP), next(iter(self.servers)))
                self.servers.pop(lru).stop()
            args, env = self.specs[name]
            log = self.tmp / f"{name}.{sum(1 for _ in self.tmp.glob(name + '.*log'))}.log"
            t0 = time.monotonic()
            server = start_ready(args, log, env=env)
            self.starts.setdefault(name, []).append(time.monotonic() - t0)
            self.logs[name] = log
        self.servers[name] = server
        return server

    def log_text(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def trace_path(self, name: str) -> Path:
        return self.tmp / f"{name}.trace.jsonl"

    def stop_unkept(self) -> None:
        """Stop every server not in KEEP (to make room for one outside the pool)."""
        for name in [n for n in self.servers if n not in KEEP]:
            self.servers.pop(name).stop()

    def close(self) -> None:
        """Stop every server (they start again on demand)."""
        for server in self.servers.values():
            server.stop()
        self.servers.clear()


_pools: list[ServerPool] = []


@pytest.fixture(scope="session")
def pool(tmp_path_factory):
    p = ServerPool(tmp_path_factory.mktemp("servers"))
    _pools.append(p)
    yield p
    p.close()


def pytest_terminal_summary(terminalreporter):
    """Where the server tests' time goes: each server's starts and startup
    seconds (the suite's budget is mostly these)."""
    for p in _pools:
        starts = sorted(p.starts.items(), key=lambda kv: -sum(kv[1]))
        total = sum(sum(t) for _, t in starts)
        terminalreporter.section(f"server pool: {sum(len(t) for _, t in starts)} starts, {total:.0f} s")
        for name, times in starts:
            terminalreporter.write_line(f"{name:24s} {len(times)} x, {sum(times):6.0f} s")


@pytest.fixture(scope="session")
def models() -> dict[str, str]:
    return {name: str(path) for name, path in tiny_models.build_all().items()}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in POOL_CLOSERS)


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
