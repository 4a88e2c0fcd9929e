"""Sampling exactness: with temperature > 0, MINEDRAFT's output distribution
is the target's. A chi-square test compares sampled continuations from the
real server with the exact distribution computed from the model, and the same
test rejects a server with a wrong acceptance rule."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM, AutoTokenizer

from minedraft_sglang.lab import tiny_models

pytestmark = pytest.mark.server

PROMPT = "The farmer walked to the old barn and"
TEMPERATURE, TOP_K, NEW_TOKENS = 10.0, 3, 3
SAMPLES = 2400


@pytest.fixture(scope="module")
def exact():
    """P(x1, x2, x3) under the target with SGLang's sampling transform
    (temperature, then top-k renormalisation), in float64."""
    path = tiny_models.model_path("target")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt_ids = AutoTokenizer.from_pretrained(path)(PROMPT)["input_ids"]

    @torch.no_grad()
    def dist(prefix):
        logits = model(torch.tensor([prompt_ids + list(prefix)])).logits[0, -1].double()
        probs = torch.softmax(logits / TEMPERATURE, -1)
        top = probs.topk(TOP_K)
        return dict(zip(top.indices.tolist(), (top.values / top.values.sum()).tolist()))

    table = {(): 1.0}
    for _ in range(NEW_TOKENS):
        table = {seq + (tok,): p * q for seq, p in table.items() for tok, q in dist(seq).items()}
    return table


def _sample(server) -> Counter:
    counts: Counter = Counter()
    batch = 200
    for _ in range(SAMPLES // batch):
        outs = server.generate(
            [PROMPT] * batch,
            NEW_TOKENS,
            sampling={"temperature": TEMPERATURE, "top_k": TOP_K, "ignore_eos": True},
        )
        counts.update(tuple(o["output_ids"]) for o in outs)
    return counts


def _p_value(counts: Counter, exact: dict) -> float:
    assert sum(counts.values()) == SAMPLES
    unexpected = sum(n for seq, n in counts.items() if seq not in exact)
    assert unexpected == 0, "sampled a sequence outside the target's top-k support"
    seqs = sorted(exact, key=exact.get, reverse=True)
    # Pool the rarest sequences so every bin expects >= 5 samples.
    bins, current = [], []
    for seq in seqs:
        current.append(seq)
        if sum(exact[s] for s in current) * SAMPLES >= 5:
            bins.append(current)
            current = []
    if current:
        bins[-1].extend(current)
    observed = [sum(counts[s] for s in b) for b in bins]
    expected = [sum(exact[s] for s in b) * SAMPLES for b in bins]
    return chisquare(observed, expected).pvalue


def test_minedraft_sampling_matches_target_distribution(pool, exact):
    server = pool.get("psd-self")
    counts = _sample(server)
    p = _p_value(counts, exact)
    assert p > 1e-3, p
    # The drafts were really put to the test: some accepted, some rejected.
    meta = server.generate([PROMPT] * 50, 8, sampling={"temperature": TEMPERATURE, "top_k": TOP_K})
    accept = [m["meta_info"]["spec_accept_length"] for m in meta]
    assert 1.05 < sum(accept) / len(accept) < 3.9


def test_the_same_test_rejects_a_wrong_acceptance_rule(pool, exact):
    """SGLang's STANDALONE on CPU accepts drafts greedily even for sampled
    requests (its sampling verify kernel is CUDA-only): a wrong rule, which
    this test must catch."""
    p = _p_value(_sample(pool.get("standalone-self")), exact)
    assert p < 1e-6, p
