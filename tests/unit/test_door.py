"""The door's pure checks (minedraft_sglang/door.py); the checks on a real
server, every route, are in tests/server/test_fuzz.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from minedraft_sglang import door
from minedraft_sglang.drafters import FaultInjectingDrafter, parse_faults

LIMIT = door.vocab_limit(1024)


@pytest.mark.parametrize("ids", [[0], [1023], [5, 6, 7], (1, 2), [np.int64(7)], list(range(1024))])
def test_ids_in_vocabulary_pass(ids):
    assert door.token_ids_error(ids, LIMIT) is None


@pytest.mark.parametrize(
    "ids, index, words",
    [
        ([1000000000, -5], 0, "not a token id of the model: ids must lie in [0, 1024)"),
        ([3, -1], 1, "not a token id"),
        ([1024], 0, "not a token id"),
        ([2**64], 0, "not a token id"),
        ([1, 2.0], 1, "is not an integer token id"),
        (["5"], 0, "is not an integer token id"),
        ([None], 0, "is not an integer token id"),
        ([True], 0, "is not an integer token id"),
        ([[1, 2]], 0, "is not an integer token id"),
    ],
)
def test_bad_ids_name_the_first_bad_entry_in_one_line(ids, index, words):
    error = door.token_ids_error(ids, LIMIT)
    assert error.startswith(f"input_ids[{index}] = ") and words in error, error
    assert "\n" not in error and len(error) < 160, error


def test_not_a_list():
    assert "must be a list of token ids, got str" in door.token_ids_error("1 2", LIMIT)
    assert "got int" in door.token_ids_error(7, LIMIT)


def test_huge_values_are_cut_in_the_message():
    error = door.token_ids_error([10**200], LIMIT)
    assert "..." in error and len(error) < 160


def test_empty_prompt_refused_unless_a_session_or_embeddings_supply_it():
    assert "empty" in door.prompt_error([], LIMIT)
    assert door.prompt_error([], LIMIT, may_be_empty=True) is None
    assert door.prompt_error(None, LIMIT) is None  # input_embeds: no ids to check
    session = SimpleNamespace(session_params={"id": "s1"}, input_embeds=None, contains_mm_input=lambda: False)
    assert door.request_error(session, [], LIMIT) is None
    plain = SimpleNamespace(session_params=None, input_embeds=None, contains_mm_input=lambda: False)
    assert "empty" in door.request_error(plain, [], LIMIT)
    assert "not a token id" in door.request_error(plain, [5, 4096], LIMIT)


@pytest.mark.parametrize("stops, refused", [([5, 1023], False), ([], False), ([5, 1025], True), ([-1], True)])
def test_stop_token_ids_beyond_the_target_vocabulary_refused(stops, refused):
    """A stop id past the vocabulary kills SGLang's scheduler once a min_new_tokens request shares its batch."""
    req = SimpleNamespace(session_params=None, input_embeds=None, contains_mm_input=lambda: False)
    req.sampling_params = {"stop_token_ids": stops, "min_new_tokens": 1}
    error = door.request_error(req, [5, 6], LIMIT)
    assert (error is not None and error.startswith("stop_token_ids[")) == refused, error


def test_multimodal_requests_are_left_to_sglang():
    mm = SimpleNamespace(session_params=None, input_embeds=None, contains_mm_input=lambda: True)
    assert door.request_error(mm, [10**9], LIMIT) is None


def test_smaller_draft_vocabulary_is_the_bound_and_named():
    limit = door.vocab_limit(152064, 151936)
    assert limit.size == 151936
    assert door.token_ids_error([151935], limit) is None
    error = door.token_ids_error([151936], limit)
    assert "the draft model (the target's is 152064)" in error and "[0, 151936)" in error
    assert door.vocab_limit(1024, 2048) == door.vocab_limit(1024)  # startup refuses that pair anyway


def _model(tmp_path, name, vocab):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    return str(path)


def test_server_limit_reads_the_draft_only_for_minedraft(tmp_path):
    draft = _model(tmp_path, "draft", 900)
    md = SimpleNamespace(speculative_algorithm="MINEDRAFT", speculative_draft_model_path=draft)
    assert door.server_vocab_limit(1024, md).size == 900
    other = SimpleNamespace(speculative_algorithm="STANDALONE", speculative_draft_model_path=draft)
    assert door.server_vocab_limit(1024, other).size == 1024
    plain = SimpleNamespace(speculative_algorithm=None, speculative_draft_model_path=None)
    assert door.server_vocab_limit(1024, plain) == door.vocab_limit(1024)
    missing = SimpleNamespace(speculative_algorithm="MINEDRAFT", speculative_draft_model_path=str(tmp_path / "no"))
    assert door.server_vocab_limit(1024, missing).size == 1024


def test_hook_refuses_before_sglang_and_caches_the_limit():
    calls = []
    manager = SimpleNamespace(
        model_config=SimpleNamespace(vocab_size=1024), server_args=SimpleNamespace(speculative_algorithm=None)
    )
    obj = SimpleNamespace(session_params=None, input_embeds=None, contains_mm_input=lambda: False)
    original = lambda m, o, ids: calls.append(ids)
    door.validate_one_request_around(original, manager, obj, [1, 2])
    assert calls == [[1, 2]] and manager._minedraft_vocab_limit == LIMIT
    with pytest.raises(ValueError, match=r"input_ids\[0\] = -5 is not a token id"):
        door.validate_one_request_around(original, manager, obj, [-5])
    assert calls == [[1, 2]]


def test_fault_spec():
    assert parse_faults("draft_raise:0.2") == {"draft_raise": 0.2}
    assert parse_faults("draft_raise:0.2,prefill_raise:1") == {"draft_raise": 0.2, "prefill_raise": 1.0}
    for bad in ("draft_raise", "oops:0.5", "prefill_raise:2", "draft_raise:x"):
        with pytest.raises(ValueError, match="MINEDRAFT_FAULT_INJECT"):
            parse_faults(bad)


def test_injected_prefill_fault_raises_after_the_inner_prefill():
    done = []
    inner = SimpleNamespace(
        device="cpu",
        needs_target_features=False,
        aux_layer_ids=(),
        weights="checkpoint",
        prefill=lambda reqs: done.append(reqs),
    )
    drafter = FaultInjectingDrafter(inner, "prefill_raise:1")
    with pytest.raises(RuntimeError, match="injected drafter prefill fault"):
        drafter.prefill(["r"])
    assert done == [["r"]]


@pytest.mark.parametrize("params", [None, {}, {"n": 1}, {"n": 3}, [{"n": 2}, {"n": 2}], [{}, {}]])
def test_parallel_samples_pass(params):
    assert door.parallel_sample_error(params) is None


@pytest.mark.parametrize("n", [0, -1, None, 2.0, "2", True])
def test_bad_parallel_samples_refused_in_one_line(n):
    for params in ({"n": n}, [{"n": 2}, {"n": n}]):
        assert door.parallel_sample_error(params) == f"sampling_params.n must be an integer >= 1, got {n!r}"


@pytest.mark.parametrize(
    "text, ids, n",
    [(None, [1, 2], 3), ("a", None, 3), ("a", [1, 2], 1), (["a", "b"], [[1], [2]], 1), ("a", [], 1)],
)
def test_text_with_ids_served_where_sglang_can(text, ids, n):
    assert door.text_and_ids_error(text, ids, n) is None


@pytest.mark.parametrize("text, ids, n", [("a", [1, 2], 3), (["a", "b"], [[1]], 1), ("a", [[1], [2]], 1)])
def test_text_with_ids_refused_where_sglang_answers_500(text, ids, n):
    assert "give only one of them" in door.text_and_ids_error(text, ids, n)


def _batch(size: int, **fields):
    base = {"is_single": size == 1, "batch_size": size, **dict.fromkeys(door.PER_REQUEST_FIELDS)}
    return SimpleNamespace(**{**base, **fields})


@pytest.mark.parametrize("field", door.PER_REQUEST_FIELDS)
def test_a_per_request_list_of_another_length_than_the_batch_refused(field):
    # SGLang 0.5.23 answers an unhandled 500 (checked 2026-12-05: return_logprob [true] and
    # top_logprobs_num [1] with two prompts).
    assert door.batch_fields_error(_batch(2, **{field: [1]})) == (
        f"{field} has 1 values for 2 prompts: give one value or one per prompt"
    )
    assert door.batch_fields_error(_batch(2, **{field: [1, 0, 0]})) is not None
    assert door.batch_fields_error(_batch(2, **{field: [1, 0]})) is None
    assert door.batch_fields_error(_batch(2, **{field: 1})) is None
    # A single request's list is the logprob check's business (request_error).
    assert door.batch_fields_error(_batch(1, **{field: [1, 0]})) is None


def _logprob_request(top_logprobs_num, logprob_start_len):
    """A text request (no session, no images) that asks for logprobs."""
    return SimpleNamespace(
        session_params=None,
        input_embeds=None,
        contains_mm_input=lambda: False,
        return_logprob=True,
        top_logprobs_num=top_logprobs_num,
        logprob_start_len=logprob_start_len,
    )


def test_top_logprobs_beyond_the_vocabulary_or_a_list_refused_asked_for_or_not():
    assert door.logprobs_error(True, 1024, -1, 1024) is None
    assert door.logprobs_error(True, -3, -1, 1024) is None  # SGLang serves it (no top logprobs)
    assert door.logprobs_error(True, 1025, -1, 1024) == "top_logprobs_num = 1025 is more than the model's 1024 tokens"
    # Without return_logprob too: batched with a request that asks, it killed
    # a plain server (2026-12-05).
    assert door.logprobs_error(False, 10**6, -1, 1024) is not None
    assert door.logprobs_error(None, 10**6, None, 1024) is not None
    # A single request may carry a list, which SGLang keeps: [1029] killed the
    # scheduler (2026-12-03), and so does [1] (2026-12-05).
    message = "top_logprobs_num must be one integer for one request, got [1]"
    assert door.logprobs_error(True, [1], -1, 1024) == message
    assert door.logprobs_error(False, [1], -1, 1024) == message
    assert "top_logprobs_num = 5000" in door.request_error(_logprob_request(5000, -1), [1, 2], LIMIT)


def test_a_logprob_start_below_minus_one_or_a_list_refused_when_logprobs_are_asked_for():
    # -2 or less with return_logprob failed an assert in the prefill's input
    # logprobs and the scheduler died (fuzz seed 2924814198, 2026-12-05); a
    # list on a single request fails a comparison.
    message = "logprob_start_len = -3: give one integer, -1 (output logprobs only) or a prompt position >= 0"
    assert door.logprobs_error(True, 1, -3, 1024) == message
    assert door.logprobs_error(True, None, [1], 1024) is not None
    # A single request's [False] asks: the scheduler reads it as truthy.
    assert door.logprobs_error([False], 1, -3, 1024) == message
    for start in (-1, 0, 7, None):
        assert door.logprobs_error(True, 1, start, 1024) is None
    # Not asked for: SGLang resets it to -1 and serves the request.
    assert door.logprobs_error(False, 1, -3, 1024) is None
    assert door.logprobs_error(None, 1, [1], 1024) is None
    assert door.request_error(_logprob_request(0, -3), [1, 2], LIMIT) == message
