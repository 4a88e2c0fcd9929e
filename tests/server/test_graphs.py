"""MINEDRAFT's target forwards inside SGLang's graph runners.

On CPU (``--enable-torch-compile``, SGLang's CPU graph runner) every forward
of a MINEDRAFT server's decode steps replays the graph of its width: k = 0
steps a decode graph, a verify of k drafts that of width k + 1, at every
width ``--minedraft-k auto`` runs. Greedy output stays token-identical to
plain decoding, in psd and sequential modes. The routing and the CUDA
runners, which cannot run here: tests/unit/test_graph_routing.py.
"""

from __future__ import annotations

import collections
import json
import pkgutil

import pytest
from conftest import K
from test_plain_tp import check_greedy_identical
from test_server import _server_info

from minedraft_sglang import plugin
from minedraft_sglang.lab import tiny_models
from minedraft_sglang.lab.launcher import minedraft_args

# ---------------------------------------------------------------------------
# The hooks, without a server
# ---------------------------------------------------------------------------


def test_every_hook_target_exists_in_the_installed_sglang():
    from sglang.srt.plugins.hook_registry import HookRegistry

    plugin.register()
    targets = [
        t for t, hs in HookRegistry._hooks.items() if any(h.__module__.startswith("minedraft_sglang") for _, h, _ in hs)
    ]
    assert "sglang.srt.model_executor.model_runner_components.cuda_graph_setup.capture_decode_graph" in targets
    for target in targets:
        owner, attr = target.rsplit(".", 1)
        assert hasattr(pkgutil.resolve_name(owner), attr), target


# ---------------------------------------------------------------------------
# Real servers: MINEDRAFT with SGLang's CPU graph runner
# ---------------------------------------------------------------------------

MODES = ("psd", "sequential")
# What each server captures. Every (batch size, width) costs a torch.compile,
# about 25 s for the tiny target on this machine (a psd step's verify, on
# fewer threads, compiles its shape once more at its first replay).
# psd: a fixed k, the full width, batches of one (it verifies one sub-batch
# of the at most two requests at a time). sequential: --minedraft-k auto,
# every width (graphs.graph_widths), batches of two only, which batches of
# one replay padded.
GRAPHS = {
    "psd": ["--torch-compile-max-bs", "1"],
    "sequential": ["--torch-compile-max-bs", "2", "--cuda-graph-bs-decode", "2", "--minedraft-k", "auto"],
}
WIDTHS = {"psd": [K + 1], "sequential": range(1, K + 2)}


@pytest.fixture(scope="module")
def servers(pool):
    target, draft = (str(tiny_models.model_path(m)) for m in ("target", "draft"))
    for mode in MODES:
        # psd: the target drafts for itself, so greedy drafts are accepted and
        # every row of the verify graph decides output; sequential: an
        # unrelated draft, so drafts are rejected and the planner runs plain
        # steps between verifies of each k it tries.
        name = f"graphs-{mode}"
        trace = ["--minedraft-trace-file", str(pool.trace_path(name))]
        extra = [*trace, "--enable-torch-compile", *GRAPHS[mode]]
        pool.register(name, minedraft_args(target, target if mode == "psd" else draft, mode, K, extra))
    return pool


@pytest.mark.server
@pytest.mark.parametrize("mode", MODES)
def test_minedraft_forwards_replay_the_graph_of_their_width_identical_to_plain(servers, mode):
    name = f"graphs-{mode}"
    server = servers.get(name)
    check_greedy_identical(servers.get("plain-target"), server)
    steps = [json.loads(line) for line in servers.trace_path(name).read_text().splitlines()]
    info = _server_info(server)
    # Every forward (one per step, of at most the captured batch size)
    # replayed the graph of its width, k + 1 (a k = 0 step's DECODE: 1),
    # counted by the runners themselves.
    widths = collections.Counter(s["k"] + 1 for s in steps)
    assert info["graph_replays"] == {str(w): widths[w] for w in WIDTHS[mode]}
    # The trace's plain steps are the decode forwards SGLang ran.
    assert info["decode_forwards"] == widths[1]
    modes = {s["mode"] for s in steps}
    accepted = sum(sum(s["accept_lens"]) - len(s["accept_lens"]) for s in steps)
    if mode == "psd":
        assert modes == {"psd", "sequential"}
        assert accepted > len(steps)
    else:
        # Plain steps and a verify of every k ran (the planner tries each
        # option once), each in a graph of its own.
        assert modes == {"plain", "sequential"} and set(widths) == set(WIDTHS[mode]), widths
        assert accepted < len(steps)
