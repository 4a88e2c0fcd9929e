"""EAGLE and EAGLE-3 drafters inside real MINEDRAFT servers: greedy output
token-identical to plain decoding in sequential and auto (PSD with two or
more requests, draft-ahead with one) modes, and drafts that really get
accepted. One head per mode, not every pair: the heads differ only in the
target layers they read (the same hooks in every mode), and each mode's loop
runs the standalone drafter in test_server.py too (two server starts, ~100 s
of the suite, saved)."""

from __future__ import annotations

import json

import pytest
from test_server import PROMPTS, _check_greedy_identical

pytestmark = pytest.mark.server

SERVERS = ["eagle-sequential", "eagle3-auto"]


@pytest.mark.parametrize("name", SERVERS)
def test_eagle_greedy_identical_to_plain_and_accepting(pool, name):
    server = pool.get(name)
    _check_greedy_identical(pool.get("plain-target"), server)
    meta = [server.generate(p, 64)["meta_info"] for p in PROMPTS[:6]]
    verifies = sum(m["spec_verify_ct"] for m in meta)
    accept = sum(m["spec_accept_length"] * m["spec_verify_ct"] for m in meta) / verifies
    assert accept > 1.2, accept
    modes = {json.loads(line)["mode"] for line in pool.trace_path(name).read_text().splitlines()}
    assert modes == ({"sequential"} if name.endswith("sequential") else {"psd", "draft_ahead"}), modes
