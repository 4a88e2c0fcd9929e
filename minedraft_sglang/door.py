"""Request checks at the door: a bad request is refused before it is queued.

SGLang 0.5.23 checks a prompt's length, but not its token ids: an id outside
the target's vocabulary travels to the scheduler, whose prefill indexes the
embedding out of range and raises; the scheduler process dies, every request
in flight is lost and the port goes dead (plain serving included, see
docs/reliability.md). A prompt of zero tokens (``"text": ""`` with a
tokenizer that adds no BOS) crashes the same prefill.

Every generate route (``/generate`` with ``text`` or ``input_ids``, batched
lists, the OpenAI completions and chat routes, ``sgl.Engine.generate``) goes
through ``TokenizerManager._validate_one_request`` with the request's final
token ids, one request at a time, before it is sent to the scheduler;
``validate_one_request_around`` (registered by ``plugin.register``) checks
them there. Its ``ValueError`` becomes an HTTP 400 with that one line (or the
Engine's exception); nothing reaches the scheduler.

A second hook, on ``GenerateReqInput._handle_parallel_sampling``, refuses
what SGLang answers with an unhandled 500 before a batch is split: ``n`` < 1,
``text`` with ``input_ids`` where they cannot be paired, and per-request
logprob fields listed with another length than the batch.

The checks run on every server in a process where the plugin is installed,
plain ones included: they refuse only requests that a plain SGLang 0.5.23
server cannot serve, alone or beside others (a dead scheduler, an unhandled
500), so a plain user loses nothing and gains the same protection. Two
values a plain server serves in some cases are refused in all, as their
cases cannot be told apart at the door or the value has no meaning: a
``top_logprobs_num`` above the vocabulary on a request without logprobs
(fatal only when batched with one that asks) and a ``logprob_start_len``
below -1 on a one-token prompt. The drafter's vocabulary is an extra limit
on MINEDRAFT servers only.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Sequence
from typing import NamedTuple

from minedraft_sglang.config import ALGORITHM_NAME

# Long values are cut in messages: an error is one readable line.
_MAX_SHOWN = 24


class VocabLimit(NamedTuple):
    """Token ids must lie in ``[0, size)``; ``owner`` names whose vocabulary
    sets the bound, for the message."""

    size: int
    owner: str


def vocab_limit(target_vocab: int, draft_vocab: int | None = None) -> VocabLimit:
    """The bound on prompt ids: the target's vocabulary, or the drafter's
    when it is smaller (a padded-vocabulary pair: every prompt id is also
    fed to the drafter, whose embedding would be indexed out of range)."""
    if draft_vocab is not None and draft_vocab < target_vocab:
        return VocabLimit(draft_vocab, f"the draft model (the target's is {target_vocab})")
    return VocabLimit(target_vocab, "the model")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def token_ids_error(ids, limit: VocabLimit, field: str = "input_ids") -> str | None:
    """One line saying what is wrong with ``ids`` as token ids under
    ``limit`` (the first bad entry), or None when every entry is an integer
    in ``[0, limit.size)``. Integer-like values (numpy integers from Engine
    users) count as integers; booleans do not."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        return f"{field} must be a list of token ids, got {type(ids).__name__}"
    for i, value in enumerate(ids):
        try:
            if isinstance(value, bool):
                raise TypeError
            token = operator.index(value)
        except TypeError:
            return f"{field}[{i}] = {_shown(value)} is not an integer token id"
        if not 0 <= token < limit.size:
            return (
                f"{field}[{i}] = {_shown(token)} is not a token id of {limit.owner}: ids must lie in [0, {limit.size})"
            )
    return None


def prompt_error(input_ids, limit: VocabLimit, *, may_be_empty: bool = False) -> str | None:
    """One line saying why the prompt ``input_ids`` (after tokenization)
    cannot be served, or None. ``None`` ids (an ``input_embeds`` request)
    pass; an empty prompt passes only when ``may_be_empty`` (a session
    supplies the history)."""
    if input_ids is None:
        return None
    error = token_ids_error(input_ids, limit)
    if error is None and len(input_ids) == 0 and not may_be_empty:
        return "the prompt is empty (0 tokens): give at least one token"
    return error


def logprobs_error(return_logprob, top_logprobs_num, logprob_start_len, vocab: int) -> str | None:
    """One line when a request's logprob fields kill SGLang 0.5.23's
    scheduler, else None (every case found by the fuzzer or its sweep, and
    checked on a plain server without the plugin, docs/reliability.md):

    - ``top_logprobs_num`` above the model's tokens (the sampler's ``topk``
      raises) or a list (SGLang's schema lets a single request carry one and
      keeps it; ``list > int`` raises). Whether or not the request itself asks
      for logprobs: once one request of a batch asks, the batch's ``topk``
      covers every request's number.
    - ``logprob_start_len`` below -1 (an assert on the prefill's input
      logprobs fails) or a list, when the request asks for logprobs; without
      them SGLang resets it to -1 and serves the request.

    A request asks when ``return_logprob`` is truthy, as the scheduler reads
    it: a single request's ``[False]`` asks. Split batches carry numbers."""
    if isinstance(top_logprobs_num, list):
        return f"top_logprobs_num must be one integer for one request, got {_shown(top_logprobs_num)}"
    if isinstance(top_logprobs_num, int) and top_logprobs_num > vocab:
        return f"top_logprobs_num = {_shown(top_logprobs_num)} is more than the model's {vocab} tokens"
    start = logprob_start_len
    if return_logprob and (isinstance(start, list) or (isinstance(start, int) and start < -1)):
        positions = "give one integer, -1 (output logprobs only) or a prompt position >= 0"
        return f"logprob_start_len = {_shown(start)}: {positions}"
    return None


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def request_error(obj, input_ids, limit: VocabLimit, vocab: int | None = None) -> str | None:
    """The door check of one request (``GenerateReqInput`` or
    ``EmbeddingReqInput``, already split from its batch) whose prompt
    tokenized to ``input_ids``: one line, or None. ``vocab``: the target's
    vocabulary (``limit.size`` when not given).

    Multimodal requests are left to SGLang: their ids come from the model's
    processor, whose placeholder tokens this module cannot judge."""
    vocab = vocab or limit.size
    error = logprobs_error(
        getattr(obj, "return_logprob", None),
        getattr(obj, "top_logprobs_num", None),
        getattr(obj, "logprob_start_len", None),
        vocab,
    )
    if error is not None:
        return error
    params = getattr(obj, "sampling_params", None)
    stops = params.get("stop_token_ids") if isinstance(params, dict) else None
    if stops is not None:
        # SGLang's min_new_tokens penalizer scatters every stop id of a batch
        # into a [vocab + 1] row: one beyond it kills the scheduler as soon
        # as a request with min_new_tokens shares the batch (the fuzzer,
        # 2026-12-06: stop id 1025 on a 1024-token model).
        error = token_ids_error(stops, VocabLimit(vocab, "the model"), "stop_token_ids")
        if error is not None:
            return error
    contains_mm = getattr(obj, "contains_mm_input", None)
    if contains_mm is not None and contains_mm():
        return None
    session = getattr(obj, "session_params", None)
    may_be_empty = getattr(obj, "input_embeds", None) is not None or bool(
        isinstance(session, dict) and session.get("id")
    )
    return prompt_error(input_ids, limit, may_be_empty=may_be_empty)


def _local_folder(model: str) -> str | None:
    """``model`` when it is a folder, else the cached snapshot of hub id
    ``model`` (startup's checks fetched its config already); never a
    download."""
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=["config.json"], local_files_only=True)
    except Exception:  # noqa: BLE001 - no folder: no extra limit, the target's still holds
        return None


def parallel_sample_error(sampling_params) -> str | None:
    """One line when a request's ``n`` (in ``sampling_params``: a dict, a
    list of dicts or None) is not an integer >= 1, else None. SGLang 0.5.23
    multiplies the batch by ``n`` before checking it: ``n`` <= 0 on a batched
    request answers 500 (an IndexError), ``n: null`` a TypeError."""
    rows = _as_list(sampling_params)
    for row in rows:
        if isinstance(row, dict) and "n" in row:
            n = row["n"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                return f"sampling_params.n must be an integer >= 1, got {_shown(n)}"
    return None


def _prompt_count(prompts) -> int:
    """Prompts in a ``text`` or ``input_ids`` field: one string / id list, or a list of them."""
    if isinstance(prompts, str):
        return 1
    return len(prompts) if prompts and isinstance(prompts[0], (str, list, tuple)) else 1


def text_and_ids_error(text, input_ids, n: int) -> str | None:
    """One line when a request carries both ``text`` and ``input_ids`` in a
    way SGLang 0.5.23 cannot split (it answers 500, an IndexError in
    ``GenerateReqInput.__getitem__``): with ``n`` > 1 (only ``text`` is
    repeated per sample) or with more prompts in one field than in the
    other. One prompt each and n = 1 stays served as before (SGLang uses the
    ids)."""
    if text is None or input_ids is None:
        return None
    if n != 1 or _prompt_count(text) != _prompt_count(input_ids):
        return "text and input_ids given together need n = 1 and one id list per text: give only one of them"
    return None


# Per-request fields SGLang 0.5.23 takes as one value for the whole batch or
# as a list with one value per request (``_normalize_logprob_params``).
PER_REQUEST_FIELDS = ("return_logprob", "logprob_start_len", "top_logprobs_num")


def batch_fields_error(obj) -> str | None:
    """One line when a batched request gives a per-request field as a list
    of another length than its prompts, else None. SGLang keeps such a list
    and answers an unhandled 500 (checked 2026-12-05)."""
    if getattr(obj, "is_single", True):
        return None
    for field in PER_REQUEST_FIELDS:
        value = getattr(obj, field, None)
        if isinstance(value, list) and len(value) != obj.batch_size:
            return f"{field} has {len(value)} values for {obj.batch_size} prompts: give one value or one per prompt"
    return None


def config_vocab(model: str | None) -> int | None:
    """``vocab_size`` from the config.json (or its ``text_config``) of a
    local checkpoint or cached hub model; None when there is none to read."""
    folder = _local_folder(model) if model else None
    if folder is None:
        return None
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(vocab) if vocab else None


def server_vocab_limit(target_vocab: int, server_args) -> VocabLimit:
    """The limit for a server: the drafter's vocabulary counts on MINEDRAFT
    servers only."""
    draft_vocab = None
    if (getattr(server_args, "speculative_algorithm", None) or "").upper() == ALGORITHM_NAME:
        draft_vocab = config_vocab(getattr(server_args, "speculative_draft_model_path", None))
    return vocab_limit(target_vocab, draft_vocab)


def validate_one_request_around(original, manager, obj, input_ids, *args, **kwargs):
    """AROUND hook on ``TokenizerManager._validate_one_request``: the door
    check first, then SGLang's own (length, logprob ids, ...)."""
    limit = getattr(manager, "_minedraft_vocab_limit", None)
    if limit is None:
        limit = server_vocab_limit(manager.model_config.vocab_size, manager.server_args)
        manager._minedraft_vocab_limit = limit
    error = request_error(obj, input_ids, limit, manager.model_config.vocab_size)
    if error is not None:
        raise ValueError(error)
    return original(manager, obj, input_ids, *args, **kwargs)


def handle_parallel_sampling_around(original, obj, *args, **kwargs):
    """AROUND hook on ``GenerateReqInput._handle_parallel_sampling``, where
    SGLang reads ``n`` while normalizing a request (before it is split)."""
    params = obj.sampling_params
    error = parallel_sample_error(params)
    if error is None:
        first = (params[0] if params else None) if isinstance(params, list) else params
        n = first.get("n", 1) if isinstance(first, dict) else 1
        error = text_and_ids_error(obj.text, obj.input_ids, n) or batch_fields_error(obj)
    if error is not None:
        raise ValueError(error)
    return original(obj, *args, **kwargs)


# On every server, plain ones too (the module docstring says why).
AROUND_HOOKS = {
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request": validate_one_request_around,
    "sglang.srt.managers.io_struct.GenerateReqInput._handle_parallel_sampling": handle_parallel_sampling_around,
}
