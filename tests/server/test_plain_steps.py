"""k = 0 steps of --minedraft-k auto (issue 21, item 2): a plain step is
SGLang's own decode forward (ForwardMode.DECODE, no spec input), not a verify
of a window of one, whose tree kernel refuses depth 0 on CUDA (and, since
cpu_kernels refuse what the CUDA kernels refuse, on CPU too). With an
unrelated draft the planner takes k = 0 for most steps; each of them must be
one decode forward, with output equal to plain decoding, logit bias,
min_new_tokens, logprobs and sampling included."""

from __future__ import annotations

import json

import pytest
import requests

pytestmark = pytest.mark.server

PROMPTS = ["hello", "the cat sat on", "once upon a time there was a", "we", "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12"]


def _minedraft_info(server) -> dict:
    return requests.get(server.url + "/server_info", timeout=30).json()["internal_states"][0]["minedraft"]


def _trace(pool, name) -> list[dict]:
    path = pool.trace_path(name)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_plain_steps_are_sglang_decode_forwards_and_exact(pool):
    auto, plain = pool.get("autok-target"), pool.get("plain-target")
    steps_before, forwards_before = len(_trace(pool, "autok-target")), _minedraft_info(auto)["decode_forwards"]
    for prompt in PROMPTS:
        # (Counting penalties are compared with a reference decoder in
        # test_reliability.py: plain SGLang applies them one token late.)
        for sampling in ({}, {"logit_bias": {"729": -100.0, "852": 5.0}, "min_new_tokens": 20}):
            got = auto.generate(prompt, 40, return_logprob=True, sampling=dict(sampling))
            want = plain.generate(prompt, 40, return_logprob=True, sampling=dict(sampling))
            assert got["output_ids"] == want["output_ids"], (prompt, sampling)
            assert len(got["meta_info"]["output_token_logprobs"]) == len(got["output_ids"])
    # Sampled requests take the same path (our rejection sampling over a window of one).
    sampled = auto.generate(PROMPTS, 24, sampling={"temperature": 1.0})
    assert all(len(o["output_ids"]) == 24 for o in sampled)

    steps = _trace(pool, "autok-target")[steps_before:]
    plain_steps = sum(s["k"] == 0 for s in steps)
    assert plain_steps >= 0.5 * len(steps), (plain_steps, len(steps))
    # Every k = 0 step was one SGLang decode forward, and nothing else was.
    assert _minedraft_info(auto)["decode_forwards"] - forwards_before == plain_steps
