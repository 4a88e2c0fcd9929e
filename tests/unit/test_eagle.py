"""EAGLE / EAGLE-3 drafters against a full-sequence reference of the same
head, and the tiny trained heads' acceptance on text they were not trained on."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from minedraft_sglang.drafters import eagle
from minedraft_sglang.drafters.base import DraftRequest
from minedraft_sglang.lab import tiny_eagle, tiny_models

K = 3


@pytest.fixture(scope="module")
def target():
    return AutoModelForCausalLM.from_pretrained(tiny_models.model_path("target"), dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=[1, 3], ids=["eagle", "eagle3"])
def random_head(request, target, tmp_path_factory):
    """A randomly initialised head written in SGLang's format and loaded back."""
    version = request.param
    torch.manual_seed(version)
    config = tiny_eagle._config(version, target.config)
    lm_head = None
    if version == 1:
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        lm_head.weight = nn.Parameter(target.lm_head.weight.detach().clone(), requires_grad=False)
    head = eagle.EagleHead(
        config, version, nn.Embedding.from_pretrained(target.model.embed_tokens.weight.clone()), lm_head
    )
    with torch.no_grad():
        # Large enough that attention changes the drafts: at 0.05 the head's
        # residual path alone decided them, and a drafter that dropped the
        # newest key still matched the reference.
        for p in head.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp(f"eagle{version}")
    eagle.save_eagle_head(head, config, str(path))
    return version, str(path), head


def test_saved_head_loads_back_identically(random_head):
    version, path, head = random_head
    loaded = eagle.load_eagle_head(path, str(tiny_models.model_path("target")))
    want = {k: v for k, v in head.state_dict().items()}
    got = loaded.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@torch.no_grad()
def reference_drafts(head, tokens: list[int], features: torch.Tensor, n: int) -> list[int]:
    """Greedy drafts by running the head over the whole sequence at every
    step: pairs (token t+1, feature t), target features first (EAGLE-3's
    through fc), then the head's own."""
    feats = [head.fc(f) if head.version == 3 else f for f in features]
    tokens, drafts = list(tokens), []
    for _ in range(n):
        seq, x = torch.tensor([tokens[1:]]), torch.stack(feats)[None]
        positions = torch.arange(seq.shape[1])[None]
        out, head_in = head.step(seq, x, head.rotary_emb(x, positions), eagle.causal_attention)
        drafts.append(int(head.to_target_ids(head.logits(head_in[0, -1]).argmax())))
        tokens.append(drafts[-1])
        feats.append(out[0, -1])
    return drafts


def test_drafts_equal_full_sequence_reference_through_accept_and_reject(random_head, target):
    version, path, head = random_head
    drafter = eagle.EagleDrafter(path, str(tiny_models.model_path("target")), "cpu", torch.float32)
    drafter.allocate(max_requests=4, max_len=128)
    seqs, features = tiny_eagle.target_text_and_features(target, version, seed=7, num_seqs=3, length=48)
    real = {f"r{i}": (seqs[i].tolist(), features[i]) for i in range(3)}
    lengths = {"r0": 9, "r1": 12, "r2": 20}
    for rid, n in lengths.items():
        drafter.observe(rid, 0, real[rid][1][: n - 1])
    for round_ in range(5):
        reqs = [DraftRequest(rid, real[rid][0][:1], real[rid][0][1:n]) for rid, n in lengths.items()]
        out = drafter.draft(reqs, K)
        for req, drafted in zip(reqs, out.tokens.tolist()):
            toks, feats = real[req.rid]
            n = lengths[req.rid]
            want = reference_drafts(head, toks[:n], feats[: n - 1], K)
            assert drafted == want, (round_, req.rid)
            # Accept a different number of real tokens each round.
            m = 1 + (round_ + n) % (K + 1)
            drafter.observe(req.rid, n - 1, feats[n - 1 : n - 1 + m])
            lengths[req.rid] = n + m
    for rid in lengths:
        drafter.release(rid)
    assert not drafter.active_rids() and drafter.free_slots() == 4


def test_draft_ahead_tokens_without_features_are_fed_with_own_features(random_head, target):
    """Tokens past the last target feature (a draft-ahead guess) are fed
    autoregressively with the head's own features, like its drafts."""
    version, path, head = random_head
    drafter = eagle.EagleDrafter(path, str(tiny_models.model_path("target")), "cpu", torch.float32)
    drafter.allocate(max_requests=2, max_len=128)
    seqs, features = tiny_eagle.target_text_and_features(target, version, seed=8, num_seqs=1, length=24)
    toks, feats = seqs[0].tolist(), features[0]
    n = 10
    drafter.observe("a", 0, feats[: n - 1])
    guess = drafter.draft([DraftRequest("a", toks[:1], toks[1:n])], K).tokens[0].tolist()
    ahead = drafter.draft([DraftRequest("a", toks[:1], toks[1:n] + guess)], K).tokens[0].tolist()
    assert ahead == reference_drafts(head, toks[:n], feats[: n - 1], 2 * K)[K:]


def test_prefix_cache_hit_starts_the_cache_late(random_head, target):
    """Features that start past position 0 (SGLang's prefix cache skipped
    them) still give drafts, from a cache that begins there."""
    version, path, _ = random_head
    drafter = eagle.EagleDrafter(path, str(tiny_models.model_path("target")), "cpu", torch.float32)
    drafter.allocate(max_requests=2, max_len=128)
    seqs, features = tiny_eagle.target_text_and_features(target, version, seed=9, num_seqs=1, length=24)
    toks, feats = seqs[0].tolist(), features[0]
    drafter.observe("a", 6, feats[6:11])
    out = drafter.draft([DraftRequest("a", toks[:1], toks[1:12])], K)
    assert bool((out.probs > 0).all())
    # Without any feature the request gets a placeholder the target rejects.
    out = drafter.draft([DraftRequest("b", toks[:1], toks[1:12])], K)
    assert bool((out.probs == 0).all())


@pytest.mark.parametrize("name", list(tiny_eagle.HEADS))
def test_trained_tiny_heads_accept_more_than_one_token_on_new_text(name, target):
    """Greedy chain verification simulated against the target's own text
    (prompts the heads were not trained on)."""
    version = tiny_eagle.HEADS[name]
    drafter = eagle.EagleDrafter(
        str(tiny_eagle.model_path(name)), str(tiny_models.model_path("target")), "cpu", torch.float32
    )
    drafter.allocate(max_requests=8, max_len=128)
    seqs, features = tiny_eagle.target_text_and_features(target, version, seed=123, num_seqs=8, length=64)
    accepted = []
    for i in range(8):
        toks, feats, n = seqs[i].tolist(), features[i], 12
        drafter.observe(f"r{i}", 0, feats[: n - 1])
        while n + K + 1 < len(toks):
            drafted = drafter.draft([DraftRequest(f"r{i}", toks[:1], toks[1:n])], K).tokens[0].tolist()
            m = 0
            while m < K and drafted[m] == toks[n + m]:
                m += 1
            accepted.append(m + 1)
            drafter.observe(f"r{i}", n - 1, feats[n - 1 : n + m])
            n += m + 1
    assert sum(accepted) / len(accepted) > 1.2, sum(accepted) / len(accepted)
