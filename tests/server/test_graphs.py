"""MINEDRAFT's target verify inside SGLang's graph runners.

On CPU (``--enable-torch-compile``, SGLang's CPU graph runner) a MINEDRAFT
server's verify batches replay captured graphs, and greedy output stays
token-identical to plain decoding, in psd and sequential modes. The CUDA
decode runner's capture-time spec input cannot run here; the hook that builds
it is checked on a stand-in runner.
"""

from __future__ import annotations

import json
import pkgutil
import types

import pytest
import torch
from conftest import K
from test_plain_tp import check_greedy_identical
from test_server import _server_info

from minedraft_sglang import graphs, plugin
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
    assert "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.get_spec_info" in targets
    for target in targets:
        owner, attr = target.rsplit(".", 1)
        assert hasattr(pkgutil.resolve_name(owner), attr), target


def cuda_runner(algorithm, *, width=K + 1, draft=False):
    """The attributes of SGLang's DecodeCudaGraphRunner the hook reads."""
    return types.SimpleNamespace(
        model_runner=types.SimpleNamespace(is_draft_worker=draft, spec_algorithm=algorithm),
        captured_req_width=width,
        buffers=types.SimpleNamespace(custom_mask=torch.ones(64, dtype=torch.bool)),
    )


def test_cuda_capture_spec_input_is_a_chain_verify_with_full_hidden_states():
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, get_required_capture_hidden_mode
    from sglang.srt.speculative.eagle_info import EagleVerifyInput
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    plugin.register()
    algorithm = SpeculativeAlgorithm.from_string("MINEDRAFT")
    runner = cuda_runner(algorithm)
    info = graphs.decode_graph_spec_info_around(lambda *_: None, runner, runner.captured_req_width * 2)
    assert isinstance(info, EagleVerifyInput)
    assert (info.topk, info.tree_topk, info.draft_token_num, info.spec_steps) == (1, 1, K + 1, K)
    # The runner's width check at replay reads this.
    assert info.num_tokens_per_req == runner.captured_req_width
    assert info.custom_mask is runner.buffers.custom_mask
    # SGLang's verify asks for FULL hidden states for any algorithm that is not
    # STANDALONE (eagle_prepare_for_verify); a graph captured with less cannot
    # replay it.
    assert not algorithm.is_standalone()
    assert get_required_capture_hidden_mode(CaptureHiddenMode.NULL, info) == CaptureHiddenMode.FULL


def test_cuda_capture_spec_input_of_other_runners_is_sglangs():
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    plugin.register()
    sglang_answer = object()
    for runner in (
        cuda_runner(SpeculativeAlgorithm.EAGLE),
        cuda_runner(SpeculativeAlgorithm.NONE),
        cuda_runner(SpeculativeAlgorithm.from_string("MINEDRAFT"), draft=True),
    ):
        assert graphs.decode_graph_spec_info_around(lambda *_: sglang_answer, runner, 4) is sglang_answer


# ---------------------------------------------------------------------------
# Real servers: MINEDRAFT with SGLang's CPU graph runner
# ---------------------------------------------------------------------------

MODES = ("psd", "sequential")


@pytest.fixture(scope="module")
def servers(pool):
    target, draft = (str(tiny_models.model_path(m)) for m in ("target", "draft"))
    for mode in MODES:
        # psd: the target drafts for itself, so greedy drafts are accepted and
        # every row of the verify graph decides output; sequential: an
        # unrelated draft, so drafts are rejected. psd verifies one sub-batch
        # of the (at most two) requests at a time, so it needs a graph for one
        # request only (each batch size captured costs a torch.compile).
        name = f"graphs-{mode}"
        graphs = ["--enable-torch-compile", "--torch-compile-max-bs", "1" if mode == "psd" else "2"]
        trace = ["--minedraft-trace-file", str(pool.trace_path(name))]
        pool.register(name, minedraft_args(target, target if mode == "psd" else draft, mode, K, [*trace, *graphs]))
    return pool


@pytest.mark.server
@pytest.mark.parametrize("mode", MODES)
def test_minedraft_verifies_in_cpu_graphs_identical_to_plain(servers, mode):
    name = f"graphs-{mode}"
    server = servers.get(name)
    check_greedy_identical(servers.get("plain-target"), server)
    steps = [json.loads(line) for line in servers.trace_path(name).read_text().splitlines()]
    # Every verify (one per step, all of the captured width and batch sizes)
    # replayed a graph, counted by the runner itself.
    assert _server_info(server)["verify_graph_replays"] == len(steps)
    assert {s["mode"] for s in steps} == ({"psd", "sequential"} if mode == "psd" else {"sequential"})
    accepted = sum(sum(s["accept_lens"]) - len(s["accept_lens"]) for s in steps)
    assert (accepted > len(steps)) if mode == "psd" else (accepted < len(steps))
