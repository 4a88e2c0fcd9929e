"""The standalone drafter against transformers' own greedy decoding."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from minedraft_sglang import model_files
from minedraft_sglang.drafters import kv_cache
from minedraft_sglang.drafters.base import DraftRequest
from minedraft_sglang.drafters.standalone import StandaloneDrafter
from minedraft_sglang.lab import tiny_models

K = 4
# (device, step mode) of the drafter tests (also test_eagle.py's).
# "graph-semantics" runs the CUDA-graph path of kv_cache.StepRunner on the
# CPU: padded shapes, one capture per shape, static inputs copied in before
# each replay, outputs that the next replay overwrites in place. Its stand-in
# for a capture runs the step once (as the real warm-up does), blanks the
# outputs (a capture computes nothing), and replays by running the step again
# on the captured inputs, into the captured outputs. It is strict about
# autograd, since on CUDA a capture that records it keeps every saved
# activation of every capture alive (issue 34, N2: out of memory on the
# drafter's GPU): it fails a capture made with grad mode on, one that saves a
# tensor for backward (the cache's in-place writes included) and one whose
# outputs require grad, through pytest.fail, which the drafter's fallback to
# eager steps (``except Exception``) does not swallow.
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
STEP_MODES = [
    pytest.param("cpu", "eager", id="cpu-eager"),
    pytest.param("cpu", "graph-semantics", id="cpu-graph-semantics"),
    pytest.param("cuda", "eager", marks=GPU, id="cuda-eager"),
    pytest.param("cuda", "graph", marks=GPU, id="cuda-graph"),
]


def step_mode(mode: str, monkeypatch) -> str:
    if mode == "graph-semantics":
        monkeypatch.setattr(kv_cache, "cuda_graph", _graph_on_cpu)
        return "graph"
    return mode


def _graph_on_cpu(fn, device, pool):
    if torch.is_grad_enabled():
        pytest.fail("a step graph captured with grad mode on")

    def saved(tensor):
        pytest.fail(f"a step graph's capture saved a tensor {tuple(tensor.shape)} for backward")

    with torch.autograd.graph.saved_tensors_hooks(saved, lambda packed: packed):
        out = fn()
    if any(o.requires_grad or o.grad_fn is not None for o in out):
        pytest.fail("a step graph's outputs require grad")
    for o in out:
        o.fill_(-1)

    def replay():
        for o, new in zip(out, fn()):
            o.copy_(new)

    return replay, out, pool


def make_drafter(path, device, mode, monkeypatch):
    return StandaloneDrafter(path, device, torch.float32, step_mode=step_mode(mode, monkeypatch))


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


@pytest.mark.parametrize("device, mode", STEP_MODES)
def test_drafts_equal_transformers_greedy_through_accept_and_reject(path, hf, device, mode, monkeypatch):
    drafter = make_drafter(path, device, mode, monkeypatch)
    drafter.allocate(max_requests=4, max_len=256)
    captured = set(drafter.steps.graphs)
    g = torch.Generator().manual_seed(0)
    # Lengths across key buckets (64, 128): eager reads them in groups.
    seqs = {f"r{i}": torch.randint(3, 1000, (n,), generator=g).tolist() for i, n in enumerate((1, 5, 17, 90))}
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
    assert set(drafter.steps.graphs) == captured, "a step's graph was captured on the hot path"


@pytest.mark.parametrize("device, mode", STEP_MODES)
def test_a_draft_stop_ends_the_call_once_every_chain_holds_an_unsure_token(path, hf, device, mode, monkeypatch):
    """``stop_below``: the drafts are the full call's, cut after the column
    where the last chain met its first token below it; the cache stays right
    for the next call (whose drafts again equal transformers' greedy)."""
    g = torch.Generator().manual_seed(1)
    seqs = {f"r{i}": torch.randint(3, 1000, (n,), generator=g).tolist() for i, n in enumerate((4, 30))}
    reqs = [DraftRequest(rid, s[:1], s[1:]) for rid, s in seqs.items()]
    full = make_drafter(path, device, mode, monkeypatch)
    full.allocate(max_requests=2, max_len=256)
    want = full.draft(reqs, K)
    # Every chain ends by its second token: a call of at most 2 steps.
    stop = float(want.probs[:, :2].max()) * 1.0001
    chain_ends = [next((j + 1 for j, p in enumerate(row) if p < stop), K) for row in want.probs.tolist()]
    drafter = make_drafter(path, device, mode, monkeypatch)
    drafter.allocate(max_requests=2, max_len=256)
    out = drafter.draft(reqs, K, stop_below=stop)
    width = max(chain_ends)
    assert width < K and out.tokens.tolist() == want.tokens[:, :width].tolist()
    assert torch.allclose(out.probs, want.probs[:, :width])
    for s, drafted in zip(seqs.values(), out.tokens.tolist()):
        s.extend([*drafted[:1], 7])  # one draft accepted, then a correction
    again = drafter.draft([DraftRequest(rid, s[:1], s[1:]) for rid, s in seqs.items()], K)
    assert again.tokens.tolist() == [hf_greedy(hf, s, K) for s in seqs.values()]


def replayed_graphs(drafter) -> set[tuple]:
    """The keys of ``drafter``'s captured step graphs replayed from now on."""
    replayed = set()
    graphs = drafter.steps.graphs
    for key, (replay, static, out) in graphs.items():
        graphs[key] = (lambda key=key, replay=replay: (replayed.add(key), replay())[1], static, out)
    return replayed


def caught_up(drafter, monkeypatch) -> list[int]:
    """The requests each of ``drafter``'s draft calls from now on caught up."""
    counts = []
    catch_up = drafter._catch_up
    monkeypatch.setattr(drafter, "_catch_up", lambda feeds: (counts.append(len(feeds)), catch_up(feeds))[1])
    return counts


def test_allocate_captures_the_step_shapes_that_serving_reaches_and_no_other(path, monkeypatch, caplog):
    """``allocate(max_drafts=k)`` under graphs captures each (requests,
    width, keys) bucket a step takes in serving, and no other: the cache
    holds the rows of a call's drafts but the last, so after a verify a
    call's first step feeds a request the last draft and the bonus token at
    most, and every later step one token: widths 1 and 2, whatever k. A
    prompt catches up, then feeds 1; calls after full and after no
    acceptance catch up nothing. At every batch size and key bucket they
    replay every graph captured and capture none. Without ``max_drafts``:
    every width; eagerly: nothing."""
    drafter = make_drafter(path, "cpu", "graph-semantics", monkeypatch)
    with caplog.at_level("INFO", logger=kv_cache.__name__):
        drafter.allocate(max_requests=2, max_len=128, max_drafts=K)
    captured = set(drafter.steps.graphs)
    assert drafter.steps.widths == (1, 2)
    reachable = {((bs, width), kv) for bs in (1, 2) for width in (1, 2) for kv in (64, 128)}
    assert {(key[0], key[-1]) for key in captured} == reachable and len(captured) == len(reachable)
    assert drafter.step_graphs["graphs"] == len(reachable) and drafter.step_graphs["seconds"] >= 0
    assert "8 step graphs captured in" in caplog.text
    replayed, catch_ups = replayed_graphs(drafter), caught_up(drafter, monkeypatch)
    g = torch.Generator().manual_seed(2)
    for bs, n in itertools.product((1, 2), (5, 70)):  # key buckets 64, 128
        seqs = {f"{bs}-{n}-{i}": torch.randint(3, 1000, (n,), generator=g).tolist() for i in range(bs)}
        drafts = []
        for accepted in (None, K, 0):  # the prompt, then after every draft and after none accepted
            for s, drafted in zip(seqs.values(), drafts):
                s.extend([*drafted[:accepted], 7])
            drafts = drafter.draft([DraftRequest(rid, s[:1], s[1:]) for rid, s in seqs.items()], K).tokens.tolist()
        assert catch_ups[-3:] == [bs, 0, 0]
        for rid in seqs:
            drafter.release(rid)
    assert set(drafter.steps.graphs) == captured, "a step's graph was captured on the hot path"
    assert replayed == captured, f"captured, never replayed: {sorted(captured - replayed)}"

    every = make_drafter(path, "cpu", "graph-semantics", monkeypatch)
    every.allocate(max_requests=2, max_len=128)
    assert every.steps.widths == kv_cache.STEP_WIDTHS and len(every.steps.graphs) == 2 * 4 * 2
    eager = make_drafter(path, "cpu", "eager", monkeypatch)
    eager.allocate(max_requests=2, max_len=128, max_drafts=K)
    assert not eager.steps.graphs and eager.step_graphs is None
    assert eager.steps.widths == kv_cache.STEP_WIDTHS  # one forward beats a catch-up and a step


def assert_no_autograd(drafter, module, drafts) -> None:
    """No parameter of ``module`` requires grad; the cache, the step graphs'
    outputs and ``drafts`` hold no autograd graph."""
    assert [name for name, p in module.named_parameters() if p.requires_grad] == []
    outputs = [o for _, _, out in drafter.steps.graphs.values() for o in out]
    for t in (drafter.cache.k, drafter.cache.v, *outputs, *drafts):
        assert t.grad_fn is None and not t.requires_grad, t.grad_fn


@pytest.mark.parametrize("device, mode", STEP_MODES)
def test_allocate_and_drafts_with_grad_mode_on_record_no_autograd(path, device, mode, monkeypatch):
    """SGLang's scheduler allocates the drafter (so captures its step
    graphs) with grad mode on, and its threads draft with it on. A capture
    that recorded autograd kept every saved activation of every capture
    alive through the cache's in-place writes: out of memory on the
    drafter's GPU (issue 34, N2)."""
    drafter = make_drafter(path, device, mode, monkeypatch)
    seqs = {"a": [5, 6, 7], "b": list(range(3, 20))}
    with torch.enable_grad():
        drafter.allocate(max_requests=2, max_len=64, max_drafts=K)
        for accepted in (K, 0):
            out = drafter.draft([DraftRequest(rid, s, []) for rid, s in seqs.items()], K)
            for s, drafted in zip(seqs.values(), out.tokens.tolist()):
                s.extend([*drafted[:accepted], 7])
    assert_no_autograd(drafter, drafter.model, (out.tokens, out.probs))


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


@pytest.mark.parametrize("device, mode", STEP_MODES)
def test_cache_grows_with_concurrent_requests_and_keeps_state(path, hf, device, mode, monkeypatch):
    """Eagerly on the CPU the cache grows as requests arrive and keeps their
    state; under graphs (which hold its addresses) it is whole from the
    start."""
    drafter = make_drafter(path, device, mode, monkeypatch)
    drafter.allocate(max_requests=20, max_len=64)
    reqs = [DraftRequest(f"r{i}", [5 + i, 6, 7], []) for i in range(12)]
    out = drafter.draft(reqs[:3], K)  # fits the initial slots
    out_all = drafter.draft(reqs, K)  # eagerly: a resize mid-way through assignment
    slots = 20 if drafter.steps.mode == "graph" or device == "cuda" else 16
    assert drafter.cache.k.shape[1] - 1 == slots and drafter.free_slots() == 8
    assert out_all.tokens[:3].tolist() == out.tokens.tolist()
    for req, drafted in zip(reqs, out_all.tokens.tolist()):
        assert drafted == hf_greedy(hf, list(req.prompt), K)
    # Steps of the first call's shapes again, now over the grown cache.
    assert drafter.draft(reqs[:3], K).tokens.tolist() == out.tokens.tolist()


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


@torch.no_grad()
def hf_greedy_below(hf, tokens, n, vocab):
    tokens = list(tokens)
    for _ in range(n):
        tokens.append(int(hf(torch.tensor([tokens])).logits[0, -1, :vocab].argmax()))
    return tokens[-n:]


def test_a_draft_vocabulary_limit_proposes_the_greedy_token_among_the_first_ids_only(path, hf):
    """--minedraft-draft-vocab N: each draft is the argmax over the first N
    logits (the LM head's first N rows)."""
    vocab = 400
    g = torch.Generator().manual_seed(1)
    seqs = {f"r{i}": torch.randint(3, 1000, (n,), generator=g).tolist() for i, n in enumerate((3, 9, 30))}
    full = [hf_greedy(hf, s, K) for s in seqs.values()]
    # Not vacuous: unlimited, the tiny target's greedy tokens go beyond N.
    assert max(max(d) for d in full) >= vocab
    drafter = StandaloneDrafter(path, "cpu", torch.float32, vocab=str(vocab))
    rows = drafter.model.lm_head.weight.shape[0]
    assert drafter.vocab.rows == vocab
    drafter.allocate(max_requests=4, max_len=128)
    out = drafter.draft([DraftRequest(rid, s, []) for rid, s in seqs.items()], K)
    assert out.tokens.tolist() == [hf_greedy_below(hf, s, K, vocab) for s in seqs.values()]
    # 0, or a limit at or beyond the vocabulary: the whole head.
    for limit in (0, rows, rows + 5):
        assert StandaloneDrafter(path, "cpu", torch.float32, vocab=str(limit)).vocab.rows == rows


def test_auto_draft_vocabulary_follows_the_tokens_the_drafter_is_fed(path, hf, monkeypatch):
    """--minedraft-draft-vocab auto (the limit lowered to fit the tiny
    vocabulary): a prompt mostly beyond the limit turns the whole vocabulary
    on before its first draft; a long run of tokens within turns the limit
    back on. Drafts are the greedy tokens among the rows in use."""
    from minedraft_sglang.drafters import draft_vocab

    monkeypatch.setattr(draft_vocab, "AUTO_LIMIT", 400)
    drafter = StandaloneDrafter(path, "cpu", torch.float32, vocab="auto")
    drafter.allocate(max_requests=2, max_len=1024)
    beyond = [900 + i % 50 for i in range(40)]
    assert drafter.vocab.rows == 400
    assert drafter.draft([DraftRequest("a", beyond, [])], K).tokens.tolist() == [hf_greedy(hf, beyond, K)]
    assert drafter.vocab.rows == hf.config.vocab_size
    within = [3 + i % 300 for i in range(900)]
    out = drafter.draft([DraftRequest("b", within, [])], K)
    assert drafter.vocab.rows == 400
    assert out.tokens.tolist() == [hf_greedy_below(hf, within, K, 400)]


def test_drafter_dtype_follows_the_target_except_float16_on_cpu():
    from minedraft_sglang.drafters import drafter_dtype

    assert drafter_dtype("cpu", torch.bfloat16) == torch.bfloat16
    assert drafter_dtype("cpu", torch.float32) == torch.float32
    assert drafter_dtype("cpu", torch.float16) == torch.float32
    assert drafter_dtype("cuda:1", torch.float16) == torch.float16


def test_compiled_steps_equal_transformers_greedy(path, hf):
    """torch.compile for real, on one shape (each new shape compiles anew)."""
    drafter = StandaloneDrafter(path, "cpu", torch.float32, step_mode="compile")
    drafter.allocate(max_requests=1, max_len=64)
    prompt = [5, 6, 7, 8]
    drafter.prefill([DraftRequest("a", prompt, [])])
    out = drafter.draft([DraftRequest("a", prompt, [9])], 2)
    assert out.tokens[0].tolist() == hf_greedy(hf, [*prompt, 9], 2)


PROMPTS = {"a": 3, "b": 70, "c": 150, "d": 8, "e": 33, "f": 20}


def _prompts():
    g = torch.Generator().manual_seed(1)
    return {rid: torch.randint(3, 1000, (n,), generator=g).tolist() for rid, n in PROMPTS.items()}


def _cached_rows(drafter, rid, n):
    index = drafter.cache.slot(rid).index
    return drafter.cache.k[:, index, :, :n], drafter.cache.v[:, index, :, :n]


def test_catch_up_equals_unpadded_forwards_one_request_at_a_time(path, hf):
    """Newcomers' prompts fed in forwards of at most 64 tokens (prompts cut
    into pieces, pieces of similar length together) write the same cache
    rows as one unpadded forward per prompt, and draft the same."""
    prompts = _prompts()
    drafter = StandaloneDrafter(path, "cpu", torch.float32)
    drafter.allocate(max_requests=8, max_len=256)
    drafter.catch_up.max_tokens = 64
    shapes = []
    forward = drafter._forward
    drafter._forward = lambda tokens, *a, **kw: (shapes.append(tuple(tokens.shape)), forward(tokens, *a, **kw))[1]
    reqs = [DraftRequest(rid, p, []) for rid, p in prompts.items()]
    out = drafter.draft(reqs, K)
    catch_up, step = shapes[:-K], shapes[-K]
    assert all(rows * width <= 64 for rows, width in catch_up), catch_up
    # All but each prompt's last token, padded by less than a third overall.
    fed = sum(n - 1 for n in PROMPTS.values() if n > kv_cache.STEP_WIDTHS[-1])
    assert fed <= sum(r * w for r, w in catch_up) < 1.34 * fed
    assert step == (len(reqs), kv_cache.STEP_WIDTHS[-1])  # the short prompts' whole feed
    for req, drafted in zip(reqs, out.tokens.tolist()):
        assert drafted == hf_greedy(hf, req.prompt, K), req.rid

    reference = StandaloneDrafter(path, "cpu", torch.float32)
    reference.allocate(max_requests=8, max_len=256)
    for rid, prompt in prompts.items():
        reference.prefill([DraftRequest(rid, prompt, [])])
    for rid, prompt in prompts.items():
        n = len(prompt) - 1
        for got, want in zip(_cached_rows(drafter, rid, n), _cached_rows(reference, rid, n)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_out_of_memory_in_catch_up_shrinks_the_forwards_and_still_drafts(path, hf, monkeypatch):
    prompts = _prompts()
    drafter = StandaloneDrafter(path, "cpu", torch.float32)
    drafter.allocate(max_requests=8, max_len=256)
    forward, fed = drafter._forward, []

    def forward_below_100_tokens(tokens, *args, **kwargs):
        if tokens.numel() > 100:
            raise torch.OutOfMemoryError("simulated: 100 tokens at most")
        fed.append(tokens.numel())
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(drafter, "_forward", forward_below_100_tokens)
    reqs = [DraftRequest(rid, p, [7]) for rid, p in prompts.items()]
    drafter.prefill(reqs)  # the worker's prefill: the same catch-up
    assert drafter.catch_up.max_tokens == 64
    assert {rid: len(drafter.cache.slot(rid).cached) for rid in prompts} == {r: n + 1 for r, n in PROMPTS.items()}
    out = drafter.draft(reqs, K)
    for req, drafted in zip(reqs, out.tokens.tolist()):
        assert drafted == hf_greedy(hf, [*req.prompt, 7], K), req.rid
    assert drafter.active_rids() == set(prompts)


def test_step_mode_graphs_on_a_gpu_and_runs_eagerly_on_cpu_unless_told():
    from minedraft_sglang.drafters import step_mode

    assert [step_mode("cuda:1", c) for c in ("auto", "on", "off")] == ["graph", "graph", "eager"]
    assert [step_mode("cpu", c) for c in ("auto", "on", "off")] == ["eager", "compile", "eager"]


def mapped_from(module, folder: str) -> list[str]:
    """The parameters and buffers of ``module`` whose memory lies in this
    process's mapping of a file in ``folder``."""
    folder = os.path.realpath(folder)
    with open("/proc/self/maps") as f:
        spans = [[int(a, 16) for a in line.split()[0].split("-")] for line in f if folder + os.sep in line]
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return [name for name, t in named if any(lo <= t.data_ptr() < hi for lo, hi in spans)]


def test_cpu_drafter_weights_are_its_own_memory_not_the_checkpoint_file(path):
    """Weights still mapped from the checkpoint are page cache, which the
    kernel evicts under memory pressure (model_files.resident). The tiny
    checkpoint is float32, so loading it converts nothing: transformers maps
    every weight."""
    drafter = StandaloneDrafter(path, "cpu", torch.float32)
    assert mapped_from(drafter.model, path) == []
    drafter.allocate(max_requests=1, max_len=32)
    assert drafter.draft([DraftRequest("a", [5, 6, 7], [])], K).tokens.shape == (1, K)


def test_resident_copies_weights_and_keeps_shared_ones_shared(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert len(mapped_from(model, path)) == len(list(model.parameters()))
    # EAGLE's tied head: two Parameters over one tensor's memory.
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.data)
    before = {name: p.clone() for name, p in model.named_parameters()}
    model_files.resident(model)
    assert mapped_from(model, path) == []
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
