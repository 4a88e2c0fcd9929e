"""The standalone drafter against transformers' own greedy decoding."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from minedraft_sglang.drafters.base import DraftRequest
from minedraft_sglang.drafters.standalone import StandaloneDrafter
from minedraft_sglang.lab import tiny_models

K = 4


@pytest.fixture(scope="module")
def path():
    return str(tiny_models.model_path("target"))


@pytest.fixture(scope="module")
def hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(hf, tokens, n):
    tokens = list(tokens)
    for _ in range(n):
        tokens.append(int(hf(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[-n:]


def test_drafts_equal_transformers_greedy_through_accept_and_reject(path, hf):
    drafter = StandaloneDrafter(path, "cpu", torch.float32)
    drafter.allocate(max_requests=4, max_len=256)
    g = torch.Generator().manual_seed(0)
    seqs = {f"r{i}": torch.randint(3, 1000, (n,), generator=g).tolist() for i, n in enumerate((1, 5, 17, 40))}
    for round_ in range(6):
        reqs = [DraftRequest(rid, s[:1], s[1:]) for rid, s in seqs.items()]
        out = drafter.draft(reqs, K)
        assert out.tokens.shape == (4, K) and bool((out.probs > 0).all())
        for (rid, s), drafted in zip(seqs.items(), out.tokens.tolist()):
            assert drafted == hf_greedy(hf, s, K), (round_, rid)
            # Vary acceptance per request and round: keep j drafts, then a
            # token the draft did not propose (the target's correction).
            j = (round_ + len(s)) % (K + 1)
            s.extend(drafted[:j] + [(drafted[j] + 1) % 1000 + 3 if j < K else 7])
    for rid in seqs:
        drafter.release(rid)
    assert drafter.free_slots() == 4 and not drafter.active_rids()


def test_requests_beyond_the_cache_get_a_proposal_of_the_right_shape(path):
    drafter = StandaloneDrafter(path, "cpu", torch.float32)
    drafter.allocate(max_requests=1, max_len=16)
    reqs = [DraftRequest("a", [5, 6, 7], []), DraftRequest("b", [5, 6], []), DraftRequest("c", list(range(3, 30)), [])]
    out = drafter.draft(reqs, K)
    assert out.tokens.shape == (3, K)
    assert drafter.active_rids() == {"a"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_draft_model_and_kv_live_on_the_named_gpu(path):
    device = f"cuda:{torch.cuda.device_count() - 1}"
    drafter = StandaloneDrafter(path, device, torch.bfloat16)
    drafter.allocate(max_requests=2, max_len=64)
    assert {p.device for p in drafter.model.parameters()} == {torch.device(device)}
    assert drafter.cache.k.device == drafter.cache.v.device == torch.device(device)
    out = drafter.draft([DraftRequest("a", [5, 6, 7], [])], K)
    assert out.tokens.device == torch.device(device)


def test_cpu_drafter_state_stays_on_cpu(path):
    drafter = StandaloneDrafter(path, "cpu", torch.float32)
    drafter.allocate(max_requests=2, max_len=64)
    assert {p.device.type for p in drafter.model.parameters()} == {"cpu"}
    assert drafter.cache.k.device.type == "cpu"


def test_cache_grows_with_concurrent_requests_and_keeps_state(path, hf):
    drafter = StandaloneDrafter(path, "cpu", torch.float32)
    drafter.allocate(max_requests=20, max_len=64)
    reqs = [DraftRequest(f"r{i}", [5 + i, 6, 7], []) for i in range(12)]
    out = drafter.draft(reqs[:3], K)  # fits the initial slots
    out_all = drafter.draft(reqs, K)  # needs a resize mid-way through assignment
    assert drafter.cache.k.shape[1] - 1 == 16 and drafter.free_slots() == 8
    assert out_all.tokens[:3].tolist() == out.tokens.tolist()
    for req, drafted in zip(reqs, out_all.tokens.tolist()):
        assert drafted == hf_greedy(hf, list(req.prompt), K)


def test_prefilled_prompts_are_not_fed_again_and_drafts_stay_exact(path, hf):
    """The worker prefills the drafter's cache while the target prefills; the
    first draft then feeds only the token after the prompt."""
    drafter = StandaloneDrafter(path, "cpu", torch.float32)
    drafter.allocate(max_requests=4, max_len=128)
    prompts = {"a": [5, 6, 7, 8, 9, 10], "b": list(range(20, 61)), "c": [11]}
    drafter.prefill([DraftRequest(rid, p, []) for rid, p in prompts.items()])
    assert {rid: drafter.cache.slot(rid).cached for rid in prompts} == prompts
    fed = []
    forward = drafter._forward
    drafter._forward = lambda tokens, *a, **kw: (fed.append(tokens.shape[1]), forward(tokens, *a, **kw))[1]
    # The target's first token follows each prompt.
    reqs = [DraftRequest(rid, p, [17]) for rid, p in prompts.items()]
    out = drafter.draft(reqs, K)
    assert fed[0] == 1, fed
    for req, drafted in zip(reqs, out.tokens.tolist()):
        assert drafted == hf_greedy(hf, [*req.prompt, *req.output], K)


def test_drafter_dtype_follows_the_target_except_float16_on_cpu():
    from minedraft_sglang.drafters import drafter_dtype

    assert drafter_dtype("cpu", torch.bfloat16) == torch.bfloat16
    assert drafter_dtype("cpu", torch.float32) == torch.float32
    assert drafter_dtype("cpu", torch.float16) == torch.float32
    assert drafter_dtype("cuda:1", torch.float16) == torch.float16
