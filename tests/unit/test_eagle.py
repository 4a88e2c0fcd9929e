"""EAGLE / EAGLE-3 drafters against a full-sequence reference of the same
head, and the tiny trained heads' acceptance on text they were not trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_drafter import (
    GPU,
    STEP_MODES,
    assert_no_autograd,
    caught_up,
    mapped_from,
    replayed_graphs,
    step_mode,
)
from torch import nn
from transformers import AutoModelForCausalLM

from minedraft_sglang.drafters import create_drafter, eagle
from minedraft_sglang.drafters.base import DraftRequest
from minedraft_sglang.lab import tiny_eagle, tiny_models

K = 3
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=GPU)]


def make_drafter(path, device="cpu", mode="eager", monkeypatch=None):
    target = str(tiny_models.model_path("target"))
    return eagle.EagleDrafter(path, target, device, torch.float32, step_mode=step_mode(mode, monkeypatch))


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


@pytest.mark.parametrize("device, mode", STEP_MODES)
def test_drafts_equal_full_sequence_reference_through_accept_and_reject(random_head, target, device, mode, monkeypatch):
    version, path, head = random_head
    drafter = make_drafter(path, device, mode, monkeypatch)
    drafter.allocate(max_requests=4, max_len=128)
    captured = set(drafter.steps.graphs)
    seqs, features = tiny_eagle.target_text_and_features(target, version, seed=7, num_seqs=3, length=90)
    real = {f"r{i}": (seqs[i].tolist(), features[i]) for i in range(3)}
    # Feeds past the widest step catch up first; lengths across key buckets.
    lengths = {"r0": 9, "r1": 12, "r2": 70}
    for rid, n in lengths.items():
        drafter.observe(rid, 0, real[rid][1][: n - 1].to(device))
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
            drafter.observe(req.rid, n - 1, feats[n - 1 : n - 1 + m].to(device))
            lengths[req.rid] = n + m
    for rid in lengths:
        drafter.release(rid)
    assert not drafter.active_rids() and drafter.free_slots() == 4
    assert set(drafter.steps.graphs) == captured, "a step's graph was captured on the hot path"


@pytest.mark.parametrize("device, mode", STEP_MODES)
def test_draft_ahead_tokens_without_features_are_fed_with_own_features(random_head, target, device, mode, monkeypatch):
    """Tokens past the last target feature (a draft-ahead guess) are fed
    autoregressively with the head's own features, like its drafts."""
    version, path, head = random_head
    drafter = make_drafter(path, device, mode, monkeypatch)
    drafter.allocate(max_requests=2, max_len=128)
    seqs, features = tiny_eagle.target_text_and_features(target, version, seed=8, num_seqs=1, length=24)
    toks, feats = seqs[0].tolist(), features[0]
    n = 10
    drafter.observe("a", 0, feats[: n - 1].to(device))
    guess = drafter.draft([DraftRequest("a", toks[:1], toks[1:n])], K).tokens[0].tolist()
    ahead = drafter.draft([DraftRequest("a", toks[:1], toks[1:n] + guess)], K).tokens[0].tolist()
    assert ahead == reference_drafts(head, toks[:n], feats[: n - 1], 2 * K)[K:]


def test_prefix_cache_hit_starts_the_cache_late(random_head, target):
    """Features that start past position 0 (SGLang's prefix cache skipped
    them) still give drafts, from a cache that begins there."""
    version, path, _ = random_head
    drafter = make_drafter(path)
    drafter.allocate(max_requests=2, max_len=128)
    seqs, features = tiny_eagle.target_text_and_features(target, version, seed=9, num_seqs=1, length=24)
    toks, feats = seqs[0].tolist(), features[0]
    drafter.observe("a", 6, feats[6:11])
    out = drafter.draft([DraftRequest("a", toks[:1], toks[1:12])], K)
    assert bool((out.probs > 0).all())
    # Without any feature the request gets a placeholder the target rejects.
    out = drafter.draft([DraftRequest("b", toks[:1], toks[1:12])], K)
    assert bool((out.probs == 0).all())


def test_catch_up_after_out_of_memory_drafts_as_the_reference(random_head, target, monkeypatch):
    """Long feature runs (newcomers) catch up in forwards that an
    out-of-memory shrank, and still draft what the reference drafts."""
    version, path, head = random_head
    drafter = make_drafter(path)
    drafter.allocate(max_requests=4, max_len=128)
    forward = drafter._forward

    def forward_below_40_tokens(tokens, *args, **kwargs):
        if tokens.numel() > 40:
            raise torch.OutOfMemoryError("simulated: 40 tokens at most")
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(drafter, "_forward", forward_below_40_tokens)
    seqs, features = tiny_eagle.target_text_and_features(target, version, seed=11, num_seqs=3, length=64)
    lengths = {"r0": 9, "r1": 30, "r2": 60}
    reqs = []
    for i, (rid, n) in enumerate(lengths.items()):
        drafter.observe(rid, 0, features[i][: n - 1])
        reqs.append(DraftRequest(rid, seqs[i][:1].tolist(), seqs[i][1:n].tolist()))
    out = drafter.draft(reqs, K)
    assert drafter.catch_up.max_tokens == 32
    for i, (req, drafted) in enumerate(zip(reqs, out.tokens.tolist())):
        n = lengths[req.rid]
        assert drafted == reference_drafts(head, seqs[i][:n].tolist(), features[i][: n - 1], K), req.rid


@pytest.mark.parametrize("device", DEVICES)
def test_observed_features_are_copied_not_kept_as_views(random_head, target, device):
    """SGLang hands ``observe`` a view of its hidden-state buffer, which its
    next forward (a graph replay) rewrites in place: the drafter must draft
    from what it was given, whatever the buffer holds later."""
    version, path, head = random_head
    drafter = make_drafter(path, device)
    drafter.allocate(max_requests=2, max_len=128)
    seqs, features = tiny_eagle.target_text_and_features(target, version, seed=10, num_seqs=1, length=24)
    toks, feats, n = seqs[0].tolist(), features[0], 12
    buffer = feats[: n - 1].to(device, copy=True)
    drafter.observe("a", 0, buffer[:5])
    drafter.observe("a", 5, buffer[5:])
    buffer.fill_(3.0)
    out = drafter.draft([DraftRequest("a", toks[:1], toks[1:n])], K)
    assert out.tokens[0].tolist() == reference_drafts(head, toks[:n], feats[: n - 1], K)


@pytest.mark.parametrize("name", list(tiny_eagle.HEADS))
def test_trained_tiny_heads_accept_more_than_one_token_on_new_text(name, target):
    """Greedy chain verification simulated against the target's own text
    (prompts the heads were not trained on)."""
    version = tiny_eagle.HEADS[name]
    drafter = eagle.EagleDrafter(
        str(tiny_eagle.model_path(name)), str(tiny_models.model_path("target")), "cpu", torch.float32
    )
    drafter.allocate(max_requests=8, max_len=128)
    layers = tiny_eagle.feature_layers(name, target.config)
    seqs, features = tiny_eagle.target_text_and_features(
        target, version, seed=123, num_seqs=8, length=64, layers=layers
    )
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


def test_cpu_head_weights_are_its_own_memory_not_the_checkpoints(random_head):
    """Neither the head's checkpoint nor the target's (embedding, LM head)
    stays mapped: page cache the kernel could evict (model_files.resident)."""
    _, path, _ = random_head
    drafter = make_drafter(path)
    assert mapped_from(drafter.head, path) == []
    assert mapped_from(drafter.head, str(tiny_models.model_path("target"))) == []
    drafter.allocate(max_requests=1, max_len=32)
    assert drafter.draft([DraftRequest("a", [5, 6, 7], [])], 2).tokens.shape == (1, 2)


@pytest.mark.parametrize("device, mode", STEP_MODES)
def test_allocate_and_drafts_with_grad_mode_on_record_no_autograd(random_head, target, device, mode, monkeypatch):
    """As the standalone drafter (test_drafter.py): SGLang allocates the
    drafter (so captures its step graphs) with grad mode on, and its threads
    observe and draft with it on."""
    version, path, _ = random_head
    drafter = make_drafter(path, device, mode, monkeypatch)
    seqs, features = tiny_eagle.target_text_and_features(target, version, seed=13, num_seqs=1, length=24)
    toks, feats, n = seqs[0].tolist(), features[0].to(device), 10
    with torch.enable_grad():
        drafter.allocate(max_requests=2, max_len=64, max_drafts=K)
        drafter.observe("a", 0, feats[: n - 1])
        drafter.draft([DraftRequest("a", toks[:1], toks[1:n])], K)
        drafter.observe("a", n - 1, feats[n - 1 : n + K])  # every draft accepted
        out = drafter.draft([DraftRequest("a", toks[:1], toks[1 : n + K + 1])], K)
    assert_no_autograd(drafter, drafter.head, (out.tokens, out.probs))


@pytest.mark.parametrize("k, widths", [(2, (1, 2, 4)), (3, (1, 2, 4, 8))])
def test_allocate_captures_the_step_shapes_that_serving_reaches_and_no_other(
    random_head, target, k, widths, monkeypatch
):
    """``allocate(max_drafts=k)`` under graphs: a call's first step feeds a
    request again the last pair it fed, then a pair per feature the verify
    observed (the last committed token's and each accepted draft's): at most
    k + 2 pairs, so k = 2 captures widths 1, 2 and 4, k = 3 also 8 (EAGLE-3:
    width 1 also with the head's own, narrower features, which the later
    steps feed). A prompt catches up, then feeds 1; calls after full, no and
    one accepted draft catch up nothing. At every batch size and key bucket
    they replay every graph captured and capture none."""
    version, path, _ = random_head
    drafter = make_drafter(path, "cpu", "graph-semantics", monkeypatch)
    drafter.allocate(max_requests=2, max_len=128, max_drafts=k)
    captured = set(drafter.steps.graphs)
    assert drafter.steps.widths == widths
    assert drafter.step_graphs["widths"] == ([1, *widths] if version == 3 else list(widths))
    assert len(captured) == drafter.step_graphs["graphs"] == 2 * len(drafter.step_graphs["widths"]) * 2
    replayed, catch_ups = replayed_graphs(drafter), caught_up(drafter, monkeypatch)
    seqs, features = tiny_eagle.target_text_and_features(target, version, seed=12, num_seqs=2, length=90)
    for bs in (1, 2):
        for n in (widths[-1] + 2, 70):  # prompts past the widest feed, key buckets 64, 128
            lengths = {f"{bs}-{n}-{i}": n for i in range(bs)}
            for i, rid in enumerate(lengths):
                drafter.observe(rid, 0, features[i][: n - 1])
            for accepted in (None, k, 0, 1):
                if accepted is not None:
                    for i, (rid, m) in enumerate(lengths.items()):
                        drafter.observe(rid, m - 1, features[i][m - 1 : m + accepted])
                        lengths[rid] = m + accepted + 1
                reqs = [
                    DraftRequest(rid, seqs[i][:1].tolist(), seqs[i][1:m].tolist())
                    for i, (rid, m) in enumerate(lengths.items())
                ]
                drafter.draft(reqs, k)
            assert catch_ups[-4:] == [bs, 0, 0, 0]
            for rid in lengths:
                drafter.release(rid)
    assert set(drafter.steps.graphs) == captured, "a step's graph was captured on the hot path"
    assert replayed == captured, f"captured, never replayed: {sorted(captured - replayed)}"


def factory_drafter(path) -> eagle.EagleDrafter:
    """The drafter the worker builds for ``path`` (``create_drafter``), eager on the CPU."""
    return create_drafter(
        device="cpu",
        model_path=str(path),
        target_path=str(tiny_models.model_path("target")),
        target_dtype=torch.float32,
        draft_compile="off",
    )


def drafts_of(drafter, target, version: int) -> list[list[int]]:
    """``drafter``'s K drafts for two requests fed the target's features of their first tokens."""
    drafter.allocate(max_requests=2, max_len=64)
    seqs, features = tiny_eagle.target_text_and_features(target, version, seed=14, num_seqs=2, length=24)
    lengths = (9, 14)
    for i, n in enumerate(lengths):
        drafter.observe(f"r{i}", 0, features[i][: n - 1])
    reqs = [DraftRequest(f"r{i}", seqs[i][:1].tolist(), seqs[i][1:n].tolist()) for i, n in enumerate(lengths)]
    return drafter.draft(reqs, K).tokens.tolist()


def assert_same_head(a: eagle.EagleHead, b: eagle.EagleHead) -> None:
    want, got = a.state_dict(), b.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("random_head", [3], indirect=True, ids=["eagle3"])
def test_an_eagle3_head_without_eagle_config_loads_and_drafts_as_with_it(random_head, target, tmp_path):
    """An EAGLE-3 head without eagle_config names no target layers: SGLang then has the target return its
    default layers and sizes fc for 3 outputs (``llama_eagle3.py``). Through the factory such a head is the
    same head as with its layers named, and drafts what that one drafts from the same features (which layers
    they are is the worker's part: ``test_worker_capture.py``)."""
    version, path, _ = random_head
    named = factory_drafter(path)
    unnamed = factory_drafter(tiny_eagle.variant(Path(path), tmp_path / "unnamed", named_layers=False))
    assert "eagle_config" not in json.loads((tmp_path / "unnamed" / "config.json").read_text())
    assert unnamed.head.fc.in_features == 3 * target.config.hidden_size
    assert_same_head(named.head, unnamed.head)
    assert drafts_of(unnamed, target, version) == drafts_of(named, target, version)


def test_a_head_shipped_as_pytorch_model_bin_loads_and_drafts_as_from_safetensors(random_head, target, tmp_path):
    """Some EAGLE repos ship ``pytorch_model.bin`` alone; SGLang's loader reads it when a folder has no
    safetensors, and so does the factory's drafter."""
    version, path, _ = random_head
    folder = tiny_eagle.variant(Path(path), tmp_path / "bin", pytorch_bin=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin"]
    from_bin, from_safetensors = factory_drafter(folder), factory_drafter(path)
    assert_same_head(from_safetensors.head, from_bin.head)
    assert drafts_of(from_bin, target, version) == drafts_of(from_safetensors, target, version)
