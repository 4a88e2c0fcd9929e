"""End to end: stock sglang.launch_server with --speculative-algorithm MINEDRAFT
on CPU, compared with a plain server on the same model (real HTTP, no mocks)."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from conftest import DRAFT_VOCAB, K

from minedraft_sglang.cpu.affinity import parse_cores

pytestmark = pytest.mark.server

PROMPTS = [
    "hello",
    "the cat sat on",
    "once upon a time there was a",
    "a b c d e f g h i j k l m n o p q r s t",
    "In the morning the farmer walked to the old barn to feed the animals and",
    "we",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12",
    "The garden was quiet; the birds had gone south for the winter, and the",
    "x",
    "Write a story about a dragon who learns to cook soup in a small village by the sea.",
    # Longer than the PSD server's prefill chunk (32 tokens).
    " ".join(["The river ran past the mill and the baker counted loaves for the market."] * 6),
]


def _ids(server, prompt, n, **extra):
    return server.generate(prompt, n, **extra)["output_ids"]


def _batched(server, prompts, n):
    """One /generate call carrying a list of prompts (a single batched request)."""
    out = server.generate(list(prompts), n)
    return [o["output_ids"] for o in out]


def _check_greedy_identical(plain, spec):
    lengths = [1, 2, 5, 16, 33, 64]
    for i, prompt in enumerate(PROMPTS):
        n = lengths[i % len(lengths)]
        assert _ids(spec, prompt, n) == _ids(plain, prompt, n), (prompt, n)
    for n in (1, 7, 64):
        assert _batched(spec, PROMPTS, n) == _batched(plain, PROMPTS, n), n


def test_endpoints_answer(pool):
    server = pool.get("seq-target")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    comp = client.completions.create(model="default", prompt="the cat", max_tokens=8, temperature=0)
    assert comp.usage.completion_tokens == 8 and comp.choices[0].text
    chat = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
    )
    assert chat.usage.completion_tokens == 8 and chat.choices[0].message.content
    plain = pool.get("plain-target")
    plain_client = openai.OpenAI(base_url=plain.url + "/v1", api_key="none")
    plain_comp = plain_client.completions.create(model="default", prompt="the cat", max_tokens=8, temperature=0)
    assert comp.choices[0].text == plain_comp.choices[0].text


@pytest.mark.parametrize("mode", ["seq", "psd"])
def test_greedy_identical_to_plain_single_and_batched(pool, mode):
    _check_greedy_identical(pool.get("plain-target"), pool.get(f"{mode}-target"))


def test_acceptance_lower_with_unrelated_draft(pool):
    unrelated = [pool.get("seq-target").generate(p, 64)["meta_info"] for p in PROMPTS[:4]]
    mean_unrelated = sum(m["spec_accept_length"] for m in unrelated) / len(unrelated)
    assert 1.0 <= mean_unrelated < 2.0, unrelated


def test_sglang_frontend_program_matches_plain(pool):
    import sglang as sgl

    @sgl.function
    def program(s, topic):
        s += "Here is a note about " + topic + ": "
        s += sgl.gen("note", max_tokens=12, temperature=0)
        s += " The mood is "
        s += sgl.select("mood", choices=["happy", "sad", "calm"])

    def run(server):
        state = program.run(topic="the garden", backend=sgl.RuntimeEndpoint(server.url))
        return state["note"], state["mood"]

    assert run(pool.get("psd-target")) == run(pool.get("plain-target"))


def _stream_with_stop(server, prompt, n, stop):
    payload = {
        "text": prompt,
        "sampling_params": {"max_new_tokens": n, "temperature": 0, **stop},
    }
    r = requests.post(server.url + "/generate", json=payload, timeout=600)
    r.raise_for_status()
    out = r.json()
    return out["text"], out["meta_info"]["finish_reason"]


def test_psd_many_staggered_requests_match_plain(pool):
    """>= 32 concurrent requests with mixed lengths, staggered arrivals, stop
    strings and stop tokens that can fall inside a drafted span."""
    plain, psd = pool.get("plain-target"), pool.get("psd-target")
    rng = random.Random(1)
    reference = _ids(plain, PROMPTS[4], 40)
    jobs = []
    for i in range(40):
        prompt = PROMPTS[i % len(PROMPTS)] + " " * (i % 3)
        n = rng.choice([1, 1, 3, 9, 17, 40, 64])
        stop = {}
        if i % 5 == 0:
            stop = {"stop_token_ids": [reference[min(5, len(reference) - 1)]]}
        elif i % 5 == 1:
            stop = {"stop": [plain.generate(prompt, 12)["text"][4:7] or "zz"]}
        jobs.append((prompt, n, stop, rng.random() * 1.0))

    def run(server, job):
        prompt, n, stop, delay = job
        time.sleep(delay)
        return _stream_with_stop(server, prompt, n, stop)

    with ThreadPoolExecutor(len(jobs)) as ex:
        got = list(ex.map(lambda j: run(psd, j), jobs))
    want = [_stream_with_stop(plain, p, n, s) for p, n, s, _ in jobs]
    assert got == want
    steps = [json.loads(line) for line in pool.trace_path("psd-target").read_text().splitlines()]
    # Both halves were busy at once: a real PSD workload, not a trickle.
    assert any(s["mode"] == "psd" and s["verify_bs"] + s["draft_bs"] >= 8 for s in steps)


def _server_info(server):
    return requests.get(server.url + "/server_info", timeout=30).json()["internal_states"][0]["minedraft"]


def test_psd_schedules_draft_and_verify_together_on_separate_threads(pool):
    """The schedule, from timestamps taken on both threads: in PSD steps the
    draft interval and the verify interval intersect, on the drafter's thread,
    which owns cores the scheduler does not; in sequential steps they never
    intersect. (Overlapping intervals would also appear with both threads on
    one core: that they really run in parallel is test_parallel.py's proof.)"""
    psd, seq = pool.get("psd-target"), pool.get("seq-target")
    for server in (psd, seq):
        with ThreadPoolExecutor(16) as ex:
            list(ex.map(lambda p: server.generate(p, 48), PROMPTS + PROMPTS[:6]))  # noqa: B023 (used at once)
    psd_steps = [json.loads(l) for l in pool.trace_path("psd-target").read_text().splitlines()]
    psd_steps = [s for s in psd_steps if s["mode"] == "psd"]
    assert len(psd_steps) >= 10
    overlapping = [s for s in psd_steps if s["draft"][0] < s["verify"][1] and s["verify"][0] < s["draft"][1]]
    assert len(overlapping) >= 0.8 * len(psd_steps)
    assert all(s["draft_thread"].startswith("minedraft-drafter") for s in psd_steps)
    seq_steps = [json.loads(l) for l in pool.trace_path("seq-target").read_text().splitlines()]
    assert seq_steps and all(s["draft"][1] <= s["verify"][0] for s in seq_steps)
    info = _server_info(psd)
    assert info["mean_overlap_ratio"] > 0.3
    assert info["drafter_cores"] and info["scheduler_cores"]
    # The splits the steps overlap on share no core and cover every core the scheduler may use (at
    # rest the scheduler thread holds whichever part its last step gave it).
    plan = info["core_plan"]
    every = set(parse_cores(plan["all"]))
    assert every >= set(info["scheduler_cores"]) | set(info["drafter_cores"]), info
    for split in plan["splits"].values():
        scheduler, drafter = set(parse_cores(split["scheduler"])), set(parse_cores(split["drafter"]))
        assert scheduler and drafter and not scheduler & drafter and scheduler | drafter == every, info


def test_no_leaks_after_aborts_and_completion(pool):
    """Aborted requests lose nothing for the others; afterwards every drafter
    slot and every target KV slot is free again."""
    psd, plain = pool.get("psd-target"), pool.get("plain-target")
    for server in (psd,):
        requests.post(server.url + "/flush_cache", timeout=60)
    start = _server_info(psd)

    def aborted(prompt):
        try:
            requests.post(
                psd.url + "/generate",
                json={"text": prompt, "sampling_params": {"max_new_tokens": 500, "temperature": 0, "ignore_eos": True}},
                timeout=0.5,
            )
        except requests.exceptions.ReadTimeout:
            pass

    with ThreadPoolExecutor(16) as ex:
        kept = [ex.submit(psd.generate, p, 30) for p in PROMPTS]
        for p in PROMPTS[:6]:
            ex.submit(aborted, p)
        got = [f.result()["output_ids"] for f in kept]
    assert got == [_ids(plain, p, 30) for p in PROMPTS]
    deadline = time.monotonic() + 60
    while True:
        requests.post(psd.url + "/flush_cache", timeout=60)
        end = _server_info(psd)
        # Aborted requests release their drafter rows and their KV slots when SGLang gets to them: wait for
        # both (the assertions below then say what is still held).
        idle = end["drafter_active_requests"] == 0 and end["token_pool_available"] == start["token_pool_available"]
        if idle or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert end["drafter_free_slots"] == end["drafter_total_slots"] == start["drafter_total_slots"]
    assert end["pending_drafts"] == 0
    assert end["token_pool_available"] == start["token_pool_available"]
    assert end["req_pool_available"] == start["req_pool_available"]


def test_prometheus_metrics(pool):
    server = pool.get("psd-target")
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda p: server.generate(p, 24), PROMPTS))
    text = requests.get(server.url + "/metrics", timeout=30).text
    for name in (
        "minedraft_draft_seconds",
        "minedraft_verify_seconds",
        "minedraft_step_seconds",
        "minedraft_accept_length",
    ):
        count = [l for l in text.splitlines() if l.startswith(name + "_count")]
        assert count and float(count[0].split()[-1]) > 0, name
    gauge = [l for l in text.splitlines() if l.startswith("minedraft_overlap_ratio")]
    assert gauge and 0.0 <= float(gauge[0].split()[-1]) <= 1.0


def test_tetris_greedy_identical_and_within_budget(pool):
    """TETRIS drafts k + 2 tokens per request and verifies at most k per
    request of the sub-batch, a different number for each."""
    tetris, plain = pool.get("tetris-target"), pool.get("plain-target")
    with ThreadPoolExecutor(12) as ex:
        got = list(ex.map(lambda p: _ids(tetris, p, 40), PROMPTS))
    assert got == [_ids(plain, p, 40) for p in PROMPTS]
    steps = [json.loads(l) for l in pool.trace_path("tetris-target").read_text().splitlines()]
    assert any(s["mode"] == "psd" for s in steps)
    for s in steps:
        assert s["verified_drafts"] <= K * s["verify_bs"], s
    # Ragged: some requests got more than k drafts verified, some fewer.
    assert any(max(s["accept_lens"]) > K + 1 for s in steps)


# ---- the agreeing (bigram) pair: plain-bigram, seq-bigram, auto-bigram,
# and the bigram-mixed-draft that is right only after some tokens


def _accepted_per_verified_draft(trace) -> float:
    steps = [json.loads(l) for l in trace.read_text().splitlines()]
    psd = [s for s in steps if s["mode"] == "psd"]
    assert psd, "no PSD steps"
    for s in psd:
        assert s["verified_drafts"] <= K * s["verify_bs"], s
    return sum(a - 1 for s in psd for a in s["accept_lens"]) / sum(s["verified_drafts"] for s in psd)


def test_tetris_spends_the_verify_budget_where_drafts_get_accepted(pool):
    """Mixed easy/hard positions: TETRIS verifies the confident drafts of
    every request and skips the unsure ones, so more of the verified drafts
    are accepted than when each request gets k; outputs stay exact."""
    plain = pool.get("plain-bigram")
    want = _batched(plain, PROMPTS, 48)
    ratios = {}
    for name in ("psd-mixed", "tetris-mixed"):
        assert _batched(pool.get(name), PROMPTS, 48) == want, name
        ratios[name] = _accepted_per_verified_draft(pool.trace_path(name))
    assert ratios["tetris-mixed"] > ratios["psd-mixed"], ratios


def test_a_cpu_drafter_drafts_from_int8_weights_by_default_close_to_its_checkpoints(pool):
    """psd-self, the target drafting for itself with the defaults: the drafter
    holds int8 weights (``/server_info``), the output is plain decoding's, and
    the rounded weights still draft the target's greedy tokens nearly always
    (with the checkpoint's, every draft holds: k + 1 tokens per verify)."""
    plain, server = pool.get("plain-target"), pool.get("psd-self")
    assert _server_info(server)["draft_weights"] == "int8"
    n, tokens, verifies = 48, 0, 0
    for prompt in PROMPTS[:6]:
        out = server.generate(prompt, n)
        assert out["output_ids"] == _ids(plain, prompt, n)
        tokens += len(out["output_ids"]) - 1  # the first comes from the prefill
        verifies += out["meta_info"]["spec_verify_ct"]
    assert tokens / verifies > 0.9 * (K + 1), (tokens, verifies)


def test_a_draft_vocabulary_limit_is_exact_and_stops_each_chain_at_the_first_token_beyond_it(pool):
    """The target drafting for itself with --minedraft-draft-vocab: unlimited,
    every greedy draft would be accepted (k + 1 tokens per verify); limited,
    a verify commits the drafts up to the first target token at or beyond the
    limit, then that token. The verify count follows from the output alone."""
    plain, limited = pool.get("plain-target"), pool.get("seq-self-vocab")
    _check_greedy_identical(plain, limited)
    n, verifies, predicted, beyond = 48, 0, 0, 0
    for prompt in PROMPTS[:6]:
        out = limited.generate(prompt, n)
        ids = out["output_ids"]
        assert ids == _ids(plain, prompt, n)
        verifies += out["meta_info"]["spec_verify_ct"]
        beyond += sum(t >= DRAFT_VOCAB for t in ids)
        i = 1  # the first token comes from the prefill
        while i < len(ids):
            j = 0
            while j < K and i + j < len(ids) and ids[i + j] < DRAFT_VOCAB:
                j += 1
            i += j + 1
            predicted += 1
    assert beyond >= 6 * n // 10, "the check needs target tokens beyond the limit"
    # Unlimited: about 6 * n / (k + 1) = 72 verifies. A near-tie between the
    # drafter's and SGLang's float32 logits may cost a verify here or there.
    assert abs(verifies - predicted) <= 3 and predicted >= 6 * n // (K + 1) + 20, (verifies, predicted)


@pytest.mark.parametrize("mode", ["seq", "auto"])
def test_greedy_identical_to_plain_agreeing_pair(pool, mode):
    _check_greedy_identical(pool.get("plain-bigram"), pool.get(f"{mode}-bigram"))


def test_acceptance_close_to_k_plus_one_with_agreeing_draft(pool):
    agree = [pool.get(f"{m}-bigram").generate(p, 64)["meta_info"] for m in ("seq", "auto") for p in PROMPTS[:4]]
    for meta in agree:
        # k + 1 per verify, except the last verify of a request may be cut by max_new_tokens.
        assert meta["spec_accept_length"] >= K + 0.5, meta
        assert meta["spec_verify_ct"] <= 64 // (K + 1) + 1


def test_a_draft_stop_is_exact_and_verifies_at_most_one_draft_past_a_chains_first_miss(pool):
    """--minedraft-draft-stop 0.9 with the mixed draft (sure and right
    after two thirds of the tokens, unsure and wrong after the rest): each
    chain ends at its first unsure token, so a lone request's verify holds
    at most one draft the target rejects, where a chain of k would verify
    the drafts after it too. Outputs equal plain decoding."""
    stop, plain = pool.get("stop-mixed"), pool.get("plain-bigram")
    _check_greedy_identical(plain, stop)
    trace = pool.trace_path("stop-mixed")
    trace.write_text("")
    for p in PROMPTS[:6]:
        _ids(stop, p, 48)
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    drafting = [s for s in steps if s["k"] > 0]
    # Chains of two or more (the stop does not end every chain at its first
    # draft). Not K itself: whether the planner runs k = 2 or 3 for this
    # pair is a cost call that moves with the machine's load (2026-12-07:
    # k <= 2 in every step of one suite run and of one rerun).
    assert len(drafting) >= 0.8 * len(steps) and max(s["k"] for s in drafting) >= 2
    rejected_past_first = [s["k"] - (s["accept_lens"][0] - 1) - 1 for s in drafting]
    assert max(rejected_past_first) <= 0, Counter(rejected_past_first)


def test_auto_mode_switches_between_draft_ahead_and_psd(pool):
    """One request alone, a burst of 16, one alone again: outputs equal plain
    decoding, and the trace shows draft-ahead steps for the lone requests and
    PSD steps for the burst."""
    auto, plain = pool.get("auto-bigram"), pool.get("plain-bigram")
    trace = pool.trace_path("auto-bigram")
    trace.write_text("")
    got = [_ids(auto, PROMPTS[0], 40)]
    with ThreadPoolExecutor(16) as ex:
        got += list(ex.map(lambda p: _ids(auto, p, 40), (PROMPTS * 2)[:16]))
    got.append(_ids(auto, PROMPTS[1], 40))
    want = [_ids(plain, p, 40) for p in [PROMPTS[0], *(PROMPTS * 2)[:16], PROMPTS[1]]]
    assert got == want
    modes = [json.loads(line)["mode"] for line in trace.read_text().splitlines()]
    first_psd = modes.index("psd")
    assert set(modes[:first_psd]) == {"draft_ahead"}
    assert modes[-1] == "draft_ahead" and modes.count("psd") >= 5
    steps = _server_info(auto)["steps"]
    assert steps["psd"] >= 5 and steps["draft_ahead"] >= 10


def test_adaptive_k_is_exact_and_stops_drafting_only_where_it_does_not_pay(pool):
    """--minedraft-k auto: with an unrelated draft most steps are plain
    decode steps (k = 0), with an agreeing draft nearly all draft; the
    outputs equal plain decoding either way. (Which k > 0 an agreeing draft
    gets is the planner's cost call: the tiny pair's draft forward costs a
    fifth to a half of a verify depending on the machine's load, and k = 2
    and 3 rate within a few percent of each other.)"""
    auto = pool.get("autok-target")
    _check_greedy_identical(pool.get("plain-target"), auto)
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda p: auto.generate(p, 48), PROMPTS))
    unrelated = [json.loads(l) for l in pool.trace_path("autok-target").read_text().splitlines()]
    plain_steps = sum(s["k"] == 0 for s in unrelated)
    assert plain_steps >= 0.7 * len(unrelated), (plain_steps, len(unrelated))
    assert _server_info(auto)["k"] == "auto" and _server_info(auto)["planner"]["alpha"] < 0.2

    agreeing = pool.get("autok-bigram")
    _check_greedy_identical(pool.get("plain-bigram"), agreeing)
    steps = [json.loads(l) for l in pool.trace_path("autok-bigram").read_text().splitlines()]
    # One request at a time (the check's first half) an agreeing draft pays the tiny bigram pair 1.5x and
    # more, and it drafts. With all eleven in one batch drafting paid it only 10-60% per token beside
    # plain steps (psd k3, 2026-12-08 runs), a close call that the planner's first measurements at a new
    # batch, carrying first uses, tipped to plain decoding in 2 of 5 runs (issue 35's cold start).
    alone = [s for s in steps if s["verify_bs"] == 1]
    drafting = sum(s["k"] > 0 for s in alone)
    assert len(alone) >= 20 and drafting >= 0.8 * len(alone), Counter((s["mode"], s["k"]) for s in alone)
