"""Shared fixtures: tiny models and a pool of real SGLang servers on CPU.

Servers start on first use, one at a time (SGLang sizes its KV pool from the
free memory it measures around model loading, which concurrent startups
disturb), and stay up for the whole session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from minedraft_sglang import tiny_models
from minedraft_sglang.launcher import Server, minedraft_args

K = 3  # --speculative-num-steps used by the test servers


def _specs(tmp: Path) -> dict[str, list[str]]:
    m = {name: str(tiny_models.model_path(name)) for name in ("target", "draft", "bigram", "bigram-draft")}
    trace = lambda name: ["--minedraft-trace-file", str(tmp / f"{name}.trace.jsonl")]  # noqa: E731
    return {
        "plain-target": ["--model-path", m["target"]],
        "seq-target": minedraft_args(m["target"], m["draft"], "sequential", K, trace("seq-target")),
        # Small prefill chunks: long prompts go through chunked prefill.
        "psd-target": minedraft_args(
            m["target"], m["draft"], "psd", K,
            [*trace("psd-target"), "--enable-metrics", "--chunked-prefill-size", "32"],
        ),
        "plain-bigram": ["--model-path", m["bigram"]],
        "seq-bigram": minedraft_args(m["bigram"], m["bigram-draft"], "sequential", K, trace("seq-bigram")),
        "auto-bigram": minedraft_args(m["bigram"], m["bigram-draft"], "auto", K, trace("auto-bigram")),
    }


class ServerPool:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.specs = _specs(tmp)
        self.servers: dict[str, Server] = {}

    def get(self, name: str) -> Server:
        if name not in self.servers:
            self.servers[name] = Server(self.specs[name], self.tmp / f"{name}.log").wait_ready()
        return self.servers[name]

    def trace_path(self, name: str) -> Path:
        return self.tmp / f"{name}.trace.jsonl"

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="session")
def pool(tmp_path_factory):
    p = ServerPool(tmp_path_factory.mktemp("servers"))
    yield p
    p.close()


@pytest.fixture(scope="session")
def models() -> dict[str, str]:
    return {name: str(path) for name, path in tiny_models.build_all().items()}


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
