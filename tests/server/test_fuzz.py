"""One bad request cannot take a server down (issue 23).

- The door (minedraft_sglang/door.py): requests that would crash the
  scheduler are refused with a 400 and one line, on every route, on a
  MINEDRAFT server and on a plain server where the plugin is installed, and
  by ``sgl.Engine.generate`` (a ValueError).
- Requests that end in their prefill step free their drafter rows at once
  (hooks.process_batch_result_prefill_around; found by the fuzzer).
- A request fuzzer (hypothesis): rounds of random request bodies built from
  SGLang's request schema (``sglang.api.v1.api_types.GenerateRequest`` and
  ``SamplingParams``; the OpenAI completions and chat routes) against the
  pool's "psd-target" server, each round sent together with a fixed set of
  good greedy requests. Every fuzz request must be answered within its
  timeout (200, a 4xx with a message, or a 5xx SGLang reports with a
  message; never an unhandled exception), the server must stay up, and the good
  requests must equal plain decoding ("plain-target", float32) in every
  round. Bounded by FUZZ_ROUNDS and FUZZ_BUDGET_S; the seed is printed
  (``-s``) and in every failure, and MINEDRAFT_FUZZ_SEED=N replays it.

Drafter-side failures (prefill included) are test_reliability.py's scenario 5.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import K
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from minedraft_sglang.cpu.server import cpu_environ
from minedraft_sglang.lab import tiny_models
from minedraft_sglang.lab.launcher import minedraft_args

pytestmark = pytest.mark.server

VOCAB = 1024  # the tiny target's (and draft's) vocabulary
CONTEXT = 2048  # the tiny target's context length
FUZZ_ROUNDS = 24
FUZZ_BUDGET_S = 90.0  # rounds after this are skipped: the suite's time is tight
FUZZ_PER_ROUND = 6
TIMEOUT_S = 90.0  # one request; longer means it hung

GOOD = [
    {"text": "the cat sat on", "sampling_params": {"max_new_tokens": 12, "temperature": 0}},
    {"input_ids": [5, 77, 300, 12, 9], "sampling_params": {"max_new_tokens": 20, "temperature": 0}},
    {
        "text": "In the morning the farmer walked to the old barn to feed the animals and",
        "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True},
    },
]

# What SGLang 0.5.23 kills its scheduler on without the door (docs/reliability.md).
CRASHERS = [
    ("/generate", {"input_ids": [1000000000, -5], "sampling_params": {"max_new_tokens": 4}}),
    ("/generate", {"input_ids": [[5, 6], [7, VOCAB]], "sampling_params": {"max_new_tokens": 4}}),
    ("/generate", {"text": "", "sampling_params": {"max_new_tokens": 4}}),
    ("/generate", {"text": "hi", "return_logprob": True, "top_logprobs_num": VOCAB + 1}),
    ("/generate", {"input_ids": [5, 6, 7, 8], "return_logprob": True, "logprob_start_len": -2}),
    ("/generate", {"text": "hi", "return_logprob": [False], "logprob_start_len": [1]}),
    ("/generate", {"text": "hi", "return_logprob": True, "top_logprobs_num": [1]}),
    # The first prompt asks for no logprobs, but shares the batch's topk.
    ("/generate", {"input_ids": [[5, 6], [7, 8]], "return_logprob": [False, True], "top_logprobs_num": [VOCAB + 1, 1]}),
    ("/v1/completions", {"model": "default", "prompt": [3, VOCAB + 7], "max_tokens": 4}),
    ("/v1/completions", {"model": "default", "prompt": [[3, 4], [-1]], "max_tokens": 4}),
]
# What SGLang 0.5.23 answers with an unhandled 500 (the server lives).
UNHANDLED = [
    ("/generate", {"input_ids": [[5, 6], [7, 8]], "return_logprob": [True]}),
    ("/generate", {"input_ids": [[5, 6], [7, 8]], "return_logprob": True, "top_logprobs_num": [1]}),
]


# ------------------------------------------------------------------ helpers


def _send(server, route: str, body, *, stream: bool = False, abort_after: int | None = None) -> tuple[int, object]:
    """POST ``body`` (NaN/Infinity allowed: they are part of what is fuzzed);
    a stream is read to its end, or dropped after ``abort_after`` events.
    Returns (status, parsed body or the events)."""
    data = json.dumps(body)
    headers = {"Content-Type": "application/json"}
    r = requests.post(server.url + route, data=data, headers=headers, timeout=TIMEOUT_S, stream=stream)
    with r:
        if stream and r.status_code == 200:
            events = []
            for line in r.iter_lines():
                if line.startswith(b"data:") and line != b"data: [DONE]":
                    events.append(json.loads(line[5:]))
                    if abort_after is not None and len(events) >= abort_after:
                        break
            return r.status_code, events
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text


def _message(body) -> str:
    """The error message of a refused request, '' when it has none."""
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message")))
        if isinstance(error, dict):
            error = error.get("message")
        if isinstance(error, list):
            error = json.dumps(error)
        return error if isinstance(error, str) else ""
    return body if isinstance(body, str) else ""


def _greedy_ids(server, payloads) -> list:
    with ThreadPoolExecutor(len(payloads)) as ex:
        outs = list(ex.map(lambda p: _send(server, "/generate", p), payloads))
    assert all(status == 200 for status, _ in outs), outs
    return [body["output_ids"] for _, body in outs]


def _alive(server) -> bool:
    return server.proc.poll() is None


def _healthy(server) -> bool:
    try:
        return _alive(server) and requests.get(server.url + "/health_generate", timeout=60).status_code == 200
    except requests.RequestException:
        return False


# ------------------------------------------------------------ the door


@pytest.mark.parametrize("name", ["psd-target", "plain-target"])
def test_door_refuses_what_crashes_sglang_on_every_route(pool, name):
    """Out-of-range ids (single, in a batch, through the OpenAI completions
    route), an empty prompt, bad logprob fields, and what SGLang answers with
    an unhandled 500: each a 400 with one line naming the problem;
    the server stays up and serves the next request unchanged. On the plain
    server too: the plugin is installed there, and without it each of
    CRASHERS kills plain SGLang 0.5.23 and each of UNHANDLED gets a bare 500
    (docs/reliability.md)."""
    server = pool.get(name)
    before = _greedy_ids(server, GOOD)
    for route, body in CRASHERS + UNHANDLED:
        status, reply = _send(server, route, body)
        message = _message(reply)
        assert status == 400, (route, body, status, reply)
        words = ("not a token id", "prompt is empty", "top_logprobs_num", "logprob_start_len", "values for 2 prompts")
        assert any(w in message for w in words), message
        assert "\n" not in message, message
        assert _alive(server), f"{route} {body} killed the server:\n{server.log_tail(30)}"
    assert _greedy_ids(server, GOOD) == before
    assert _healthy(server)


def test_requests_finished_at_prefill_release_their_drafter_rows(pool):
    """A request that ends in its prefill step (one new token) frees its
    drafter rows at once, not at some later decode step (the fuzzer found
    them held on an idle server)."""
    server = pool.get("psd-target")
    payloads = [{"text": f"{w} upon a time", "sampling_params": {"max_new_tokens": 1}} for w in ("once", "twice", "x")]
    assert all(len(ids) == 1 for ids in _greedy_ids(server, payloads))
    _assert_idle(server, timeout=5)


# ------------------------------------------------------------ the fuzzer


# Each fuzz request is valid, or wrong in one place (a prompt, a sampling
# parameter or a top-level field) drawn from BAD_*: most requests then really
# run, next to the good ones, and a failure points at one field.
GOOD_ID = st.integers(0, VOCAB - 1)
BAD_ID = st.sampled_from([-1, VOCAB, VOCAB + 1, 2**31, 2**63 - 1, -(2**63), 10**20])


def _token_ids(min_size: int = 0, max_size: int = 24):
    return st.lists(GOOD_ID, min_size=min_size, max_size=max_size)


@st.composite
def _with_bad_id(draw, ids):
    """``ids`` with one entry replaced or added: out of the vocabulary."""
    ids = list(ids)
    bad = draw(BAD_ID)
    if ids and draw(st.booleans()):
        ids[draw(st.integers(0, len(ids) - 1))] = bad
    else:
        ids.insert(draw(st.integers(0, len(ids))), bad)
    return ids


_WORDS = ["the", "cat", "sat", "on", "a", "mat", "once", "upon", "time", " ", "\n", "é", "🙂", "<s>", "</s>", ""]
_text = st.lists(st.sampled_from(_WORDS), max_size=12).map(" ".join) | st.text(max_size=16)
_prompt_text = st.lists(st.sampled_from(_WORDS[:9]), min_size=1, max_size=12).map(" ".join) | st.text(
    min_size=1, max_size=16
)
_json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_any_json = _json_leaf | st.lists(_json_leaf, max_size=3) | st.dictionaries(st.text(max_size=5), _json_leaf, max_size=3)
_regexes = [r"[0-9]{3}-[a-z]{2,4}", r"(cat|dog)\.", r"[a-z]{2,5}", r".{0,8}"]
_schemas = [
    json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}),
    json.dumps({"type": "string", "maxLength": 5}),
]

GOOD_SAMPLING = {
    "max_new_tokens": st.integers(0, 24),
    "temperature": st.just(0.0) | st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(1, 50) | st.just(-1),
    "min_p": st.floats(0, 1),
    "frequency_penalty": st.floats(-2, 2),
    "presence_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 2),
    "min_new_tokens": st.integers(0, 8),
    "n": st.integers(1, 3),
    "stop": _text | st.lists(_text, max_size=3),
    "stop_token_ids": _token_ids(max_size=4),
    "regex": st.sampled_from(_regexes),
    "json_schema": st.sampled_from(_schemas),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "no_stop_trim": st.booleans(),
    "logit_bias": st.dictionaries(GOOD_ID.map(str), st.floats(-100, 100), max_size=3),
    "sampling_seed": st.integers(-(2**63), 2**63 - 1),
    "stream_interval": st.integers(1, 4),
}
INTEGER_SAMPLING = {"max_new_tokens", "top_k", "min_new_tokens", "n", "sampling_seed", "stream_interval"}
BAD_SAMPLING = {
    "max_new_tokens": st.sampled_from([-1, 10**9]),
    "temperature": st.sampled_from([-1.0, float("inf"), float("nan")]),
    "top_p": st.sampled_from([0.0, 1.5]),
    "top_k": st.sampled_from([0, -2]),
    "min_p": st.sampled_from([-0.5, 1.5]),
    "frequency_penalty": st.sampled_from([-3.0, 3.0]),
    "repetition_penalty": st.sampled_from([0.0, 3.0]),
    "min_new_tokens": st.sampled_from([-1, 30]),
    "n": st.sampled_from([0, -1, None]),
    "stop_token_ids": _token_ids(max_size=3).flatmap(_with_bad_id),
    "regex": st.just("("),
    "json_schema": st.sampled_from(["{", "not json"]),
    "logit_bias": BAD_ID.map(lambda i: {str(i): 1.0}) | st.just({"abc": 1.0}),
    "sampling_seed": st.just(2**64),
    "stream_interval": st.sampled_from([-1, 0]),
    "bogus": st.integers(),  # an unknown key
}
GOOD_TOP = {
    "return_logprob": st.booleans(),
    "logprob_start_len": st.integers(-1, 2),
    "top_logprobs_num": st.integers(0, 5),
    "token_ids_logprob": _token_ids(min_size=1, max_size=4),
    "return_text_in_logprobs": st.booleans(),
    "stream": st.booleans(),
}
BAD_TOP = {
    # A list on a single request is kept by SGLang's schema; [False] reads as true.
    "return_logprob": st.sampled_from([[False], [True]]),
    "logprob_start_len": st.sampled_from([-3, -2, 10**6, [1]]),
    "top_logprobs_num": st.sampled_from([-1, VOCAB + 5, 10**6, [1], [VOCAB + 5]]),
    "token_ids_logprob": _token_ids(max_size=3).flatmap(_with_bad_id),
}


@st.composite
def _good_prompt(draw):
    kind = draw(st.sampled_from(["text", "ids", "texts", "id_lists"]))
    if kind == "text":
        return {"text": draw(_prompt_text)}
    if kind == "ids":
        return {"input_ids": draw(_token_ids(min_size=1))}
    if kind == "texts":
        return {"text": draw(st.lists(_prompt_text, min_size=1, max_size=3))}
    return {"input_ids": draw(st.lists(_token_ids(min_size=1), min_size=1, max_size=3))}


@st.composite
def _bad_prompt(draw):
    kind = draw(st.sampled_from(["id", "id_in_list", "empty_text", "empty_in_list", "long", "both", "neither"]))
    if kind == "id":
        return {"input_ids": draw(_token_ids(max_size=8).flatmap(_with_bad_id))}
    if kind == "id_in_list":
        good = draw(st.lists(_token_ids(min_size=1, max_size=8), min_size=1, max_size=2))
        return {"input_ids": [*good, draw(_token_ids(max_size=8).flatmap(_with_bad_id))]}
    if kind == "empty_text":
        return {"text": ""}
    if kind == "empty_in_list":
        return {"text": [draw(_prompt_text), ""]}
    if kind == "long":
        return {"input_ids": [7] * draw(st.sampled_from([CONTEXT - 1, CONTEXT, CONTEXT + 50]))}
    if kind == "both":
        return {"text": draw(_prompt_text), "input_ids": draw(_token_ids(min_size=1))}
    return {}


@st.composite
def _generate_request(draw):
    wrong = draw(st.sampled_from([None, None, None, "prompt", "sampling", "type", "top"]))
    prompt = draw(_bad_prompt() if wrong == "prompt" else _good_prompt())
    params = draw(st.fixed_dictionaries({}, optional=GOOD_SAMPLING))
    if wrong == "sampling":
        key = draw(st.sampled_from(sorted(BAD_SAMPLING)))
        params[key] = draw(BAD_SAMPLING[key])
    elif wrong == "type":
        # A wrong type: the schema's contract must refuse it. (Not an integer
        # where one is due: that is a right type, and n = 60993 drawn here
        # once was a request served as asked, for minutes; docs/reliability.md.)
        key = draw(st.sampled_from(sorted(GOOD_SAMPLING)))
        right_type = key in INTEGER_SAMPLING and (lambda v: isinstance(v, int) and not isinstance(v, bool))
        params[key] = draw(_any_json.filter(lambda v: not (right_type and right_type(v))))
    top = draw(st.fixed_dictionaries({}, optional=GOOD_TOP))
    if wrong == "top":
        key = draw(st.sampled_from(sorted(BAD_TOP)))
        top[key] = draw(BAD_TOP[key])
    return "/generate", {**prompt, "sampling_params": params, **top}


@st.composite
def _completions_request(draw):
    prompt = st.one_of(
        _prompt_text,
        _token_ids(min_size=1),
        st.lists(_token_ids(min_size=1), min_size=1, max_size=3),
        _token_ids(max_size=6).flatmap(_with_bad_id),
    )
    body = {"model": "default", "prompt": draw(prompt), "max_tokens": draw(st.integers(-1, 24))}
    optional = {
        "temperature": st.floats(0, 2) | st.just(-1.0),
        "top_p": st.floats(0, 1),
        "n": st.integers(0, 3),
        "stop": _text | st.lists(_text, max_size=3),
        "logprobs": st.integers(-1, 6),
        "echo": st.booleans(),
        "stream": st.booleans(),
        "seed": st.integers(0, 2**31),
    }
    body.update(draw(st.fixed_dictionaries({}, optional=optional)))
    return "/v1/completions", body


@st.composite
def _chat_request(draw):
    messages = draw(
        st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant", "system", "bogus"]), "content": _text}
            ),
            max_size=3,
        )
    )
    # Always a max_tokens: the chat route's default is the whole context
    # (~2000 tokens), minutes on this CPU, which would read as a hang.
    body = {"model": "default", "messages": messages, "max_tokens": draw(st.integers(-1, 24))}
    optional = {
        "temperature": st.floats(0, 2),
        "n": st.integers(0, 3),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(-1, 25),
        "stream": st.booleans(),
    }
    body.update(draw(st.fixed_dictionaries({}, optional=optional)))
    return "/v1/chat/completions", body


@st.composite
def _fuzz_request(draw):
    """(route, body, abort_after): a request of any route; a streamed one
    may be dropped by the client after a few events (an abort)."""
    route, body = draw(st.one_of(_generate_request(), _generate_request(), _completions_request(), _chat_request()))
    abort_after = draw(st.none() | st.integers(1, 3)) if body.get("stream") is True else None
    return route, body, abort_after


def _outcome_problem(status: int, body) -> str | None:
    """What is wrong with a fuzz request's answer, or None. Fine: a 200, a
    4xx that says why (SGLang's contract and checks, or the door), or a 5xx
    that SGLang reports for this request with a message (a JSON-schema
    grammar that completes before min_new_tokens is aborted with "Grammar
    accept_token failed", 500, on plain SGLang 0.5.23 too). Wrong: no answer,
    a 4xx without a message, or an unhandled exception (starlette's bare
    "Internal Server Error")."""
    if status == 200:
        return None
    if 400 <= status < 500 and _message(body):
        return None
    if status >= 500 and isinstance(body, dict) and _message(body):
        return None
    return f"status {status}: {str(body)[:300]}"


def test_fuzz_requests_never_take_the_server_down(pool):
    """Random requests from SGLang's request schema, FUZZ_PER_ROUND per
    round sent at once with the GOOD greedy requests, against one MINEDRAFT
    server: every request is answered in time (200 or a 4xx with a message),
    the server stays up, and the good requests equal plain decoding in every
    round; at the end /health_generate answers and the drafter and KV pools
    are back to idle."""
    seed = int(os.environ.get("MINEDRAFT_FUZZ_SEED") or random.randrange(2**32))
    print(f"\nfuzz seed {seed} (replay: MINEDRAFT_FUZZ_SEED={seed})")
    want = _greedy_ids(pool.get("plain-target"), GOOD)
    server = pool.get("psd-target")
    start = time.monotonic()
    log = {"rounds": 0, "requests": 0, "statuses": {}}

    @hypothesis_seed(seed)
    @settings(
        max_examples=FUZZ_ROUNDS,
        deadline=None,
        database=None,
        # No shrinking: after a crash every request fails, and a shrunk
        # example would blame the simplest one; the failing round is shown as
        # drawn, and the seed replays it.
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(batch=st.lists(_fuzz_request(), min_size=FUZZ_PER_ROUND, max_size=FUZZ_PER_ROUND))
    def fuzz_round(batch):
        if time.monotonic() - start > FUZZ_BUDGET_S:
            return
        jobs = [(route, body, abort) for route, body, abort in batch]
        jobs += [("/generate", g, None) for g in GOOD]

        def run(job):
            route, body, abort = job
            try:
                return _send(server, route, body, stream=body.get("stream") is True, abort_after=abort)
            except requests.Timeout:
                return -1, f"no answer within {TIMEOUT_S} s (hung)"
            except requests.RequestException as e:
                return -2, f"{type(e).__name__}: {e}"

        with ThreadPoolExecutor(len(jobs)) as ex:
            results = list(ex.map(run, jobs))
        log["rounds"] += 1
        log["requests"] += len(batch)
        problems = []
        for (route, body, _), (status, reply) in zip(batch, results):
            log["statuses"][status] = log["statuses"].get(status, 0) + 1
            problem = _outcome_problem(status, reply)
            if problem:
                problems.append(f"{route} {json.dumps(body)[:400]} -> {problem}")
        if not _alive(server):
            problems.append(f"the server died; log tail:\n{server.log_tail(40)}")
        else:
            got = [
                reply.get("output_ids") if status == 200 else (status, reply) for status, reply in results[-len(GOOD) :]
            ]
            if got != want:
                problems.append(f"good greedy requests differ from plain decoding: {got} != {want}")
        assert not problems, f"fuzz seed {seed}: " + "\n".join(problems)

    fuzz_round()
    print(f"fuzz: {log} in {time.monotonic() - start:.0f} s")
    assert log["rounds"] >= 3, log  # the budget must leave room for a real run
    assert _healthy(server), f"fuzz seed {seed}: unhealthy after the fuzz:\n{server.log_tail(40)}"
    _assert_idle(server)
    assert _greedy_ids(server, GOOD) == want


def _assert_idle(server, timeout: float = 120) -> None:
    """After the traffic: no request left running (every drafter slot free,
    no pending drafts) once the server has flushed."""
    deadline = time.monotonic() + timeout
    while True:
        flushed = requests.post(server.url + "/flush_cache", timeout=60).status_code == 200
        info = requests.get(server.url + "/server_info", timeout=60).json()["internal_states"][0]["minedraft"]
        idle = (
            flushed
            and info["drafter_active_requests"] == 0
            and info["pending_drafts"] == 0
            and info["drafter_free_slots"] == info["drafter_total_slots"]
        )
        if idle:
            return
        assert time.monotonic() < deadline, f"requests still in flight after the fuzz: {info}"
        time.sleep(1)


# ------------------------------------------------------------ sgl.Engine

ENGINE_SCRIPT = """
import json, sys
import sglang as sgl
from sglang.srt.plugins import load_plugins
from sglang.srt.server_args import prepare_server_args
from minedraft_sglang.cpu.server import CPU_FLAGS


def main():
    load_plugins()  # Engine() would, but the --minedraft-* flags are parsed first
    engine = sgl.Engine(server_args=prepare_server_args([*CPU_FLAGS, *json.loads(sys.argv[1])]))
    out = {}
    for name, ids in (("bad", [1000000000, -5]), ("batch", [[5, 6], [7, 1024]]), ("empty", [])):
        try:
            engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 4, "temperature": 0})
            out[name] = "served"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"
    params = {"max_new_tokens": 20, "temperature": 0}
    out["good"] = engine.generate(input_ids=[5, 77, 300, 12, 9], sampling_params=params)["output_ids"]
    engine.shutdown()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":  # the scheduler process is spawned: it imports this file
    main()
"""


def test_engine_generate_refuses_bad_ids(pool, tmp_path):
    """``sgl.Engine.generate`` of a MINEDRAFT engine (in a subprocess): each
    bad prompt raises a ValueError with the door's one line, and the engine
    then serves the good request exactly as the plain server does."""
    want = _greedy_ids(pool.get("plain-target"), GOOD[1:2])[0]
    pool.stop_unkept()  # the engine is a server too
    target, draft = (str(tiny_models.model_path(n)) for n in ("target", "draft"))
    args = [*minedraft_args(target, draft, "psd", K), "--dtype", "float32", "--log-level", "error"]
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(args)],
        env=cpu_environ(os.environ, args),
        capture_output=True,
        text=True,
        timeout=400,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["bad"].startswith("ValueError: input_ids[0] = 1000000000 is not a token id"), out
    assert out["batch"].startswith("ValueError: input_ids[1] = 1024 is not a token id"), out
    assert out["empty"].startswith("ValueError: input_ids cannot be empty"), out  # SGLang's own check
    assert out["good"] == want
