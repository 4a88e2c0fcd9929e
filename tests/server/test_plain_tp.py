"""Stock SGLang on CPU, no speculation, with tensor parallelism (``--tp 2``)
and with its CPU graph runner (``--enable-torch-compile``): greedy output
token-identical to the plain eager ``--tp 1`` server (float32 models).

Neither ran before the plugin's hooks and collective ops (``cpu/hooks.py``,
``cpu/kernels/ops.py``): TP ranks failed building a NCCL communicator, graph
capture on the sgl_kernel ops our CPU set lacks (``shm_allreduce`` first).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_server import PROMPTS, _batched, _ids

from minedraft_sglang.lab import tiny_models

pytestmark = pytest.mark.server

# Graphs for batches of 1 and 2 requests (each batch size costs a
# torch.compile), and a log line for every decode batch saying whether it
# replayed one.
GRAPH_FLAGS = ["--enable-torch-compile", "--torch-compile-max-bs", "2", "--decode-log-interval", "1"]


def graph_replays(log_text: str) -> list[bool]:
    """For every decode batch in a server log: did it run in a CPU graph."""
    return [flag == "True" for flag in re.findall(r"Decode batch, .*?cpu graph: (True|False)", log_text)]


def check_greedy_identical(plain, server, prompts=PROMPTS[:4], max_new_tokens=16):
    """One request at a time, then two at once (graphs cover batches of 1 and 2)."""
    for prompt in prompts:
        assert _ids(server, prompt, max_new_tokens) == _ids(plain, prompt, max_new_tokens), prompt
    pairs = [prompts[i : i + 2] for i in range(0, len(prompts), 2)]
    for pair in pairs:
        assert _batched(server, pair, max_new_tokens) == _batched(plain, pair, max_new_tokens), pair
    # Two clients at once: requests joining a running batch.
    with ThreadPoolExecutor(2) as ex:
        got = list(ex.map(lambda p: _ids(server, p, max_new_tokens), prompts[:2]))
    assert got == [_ids(plain, p, max_new_tokens) for p in prompts[:2]]


@pytest.fixture(scope="module")
def servers(pool):
    target = str(tiny_models.model_path("target"))
    # No SGLANG_CPU_OMP_THREADS_BIND here: the CPU command sets one for --tp 2.
    pool.register("plain-tp2", ["--model-path", target, "--tp", "2"])
    pool.register("plain-graphs", ["--model-path", target, *GRAPH_FLAGS])
    return pool


def test_tp2_greedy_identical_to_tp1(servers):
    check_greedy_identical(servers.get("plain-target"), servers.get("plain-tp2"))
    log = servers.log_text("plain-tp2")
    assert "TP0]" in log and "TP1]" in log


def test_cpu_graphs_greedy_identical_to_eager(servers):
    check_greedy_identical(servers.get("plain-target"), servers.get("plain-graphs"))
    log = servers.log_text("plain-graphs")
    assert "Capture target decode CPU graph end. bs=[1, 2]" in log
    replays = graph_replays(log)
    assert replays and all(replays), replays
