"""The canonical model pairs as users give them (issue 21, item 1): the draft
as a hub id, resolved from the local Hugging Face cache, and a target whose
vocabulary is padded past its tokenizer's (Qwen2.5-7B/14B/32B: 152064 rows;
0.5B: 151936). MINEDRAFT serves both, greedy output token-identical to plain
decoding of the same target, with the draft's proposals accepted (so the
drafter really ran from the resolved snapshot)."""

from __future__ import annotations

import pytest
from conftest import K

from minedraft_sglang.lab import hub_cache
from minedraft_sglang.lab.launcher import minedraft_args

pytestmark = pytest.mark.server

HUB_ID = "tiny-org/bigram-draft"
PADDED_VOCAB = 1152  # the tiny tokenizer has 1024 tokens
PROMPTS = ["the cat sat on", "hello", "In the morning the farmer walked to the old barn to feed the animals and"]


@pytest.fixture(scope="module")
def hub_pair(pool, models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub-pair")
    hub_cache.publish(tmp / "hub", HUB_ID, models["bigram-draft"])
    target = hub_cache.padded_vocab(models["bigram"], tmp / "bigram-padded", PADDED_VOCAB)
    trace = str(tmp / "trace.jsonl")
    pool.register(
        "hub-padded",
        minedraft_args(str(target), HUB_ID, "sequential", K, ["--minedraft-trace-file", trace]),
        env={"HF_HUB_CACHE": str(tmp / "hub"), "HF_HUB_OFFLINE": "1"},
    )
    pool.register("plain-bigram-padded", ["--model-path", str(target)])
    return "hub-padded"


def test_hub_id_draft_and_padded_target_serve_exactly_with_drafts_accepted(pool, hub_pair):
    spec, plain = pool.get(hub_pair), pool.get("plain-bigram-padded")
    for prompt in PROMPTS:
        out = spec.generate(prompt, 32)
        assert out["output_ids"] == plain.generate(prompt, 32)["output_ids"], prompt
        # The bigram draft agrees with the bigram target: k + 1 per verify.
        assert out["meta_info"]["spec_accept_length"] >= K + 0.5, out["meta_info"]
    assert "Traceback" not in pool.log_text(hub_pair)
